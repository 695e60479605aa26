//! libvirt XML: reading domain and snapshot descriptions (roxmltree), writing the few
//! documents we send (always escaped), and editing a domain description for a launch.
//!
//! Edits never rebuild a document: they replace byte ranges that roxmltree reports, so
//! everything we do not understand is passed through untouched.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Namespace of our launch record in a domain's `<metadata>`.
pub const LAUNCH_NS: &str = "https://snapfs.dev/xmlns/launch/1";
/// Prefix (key) of that element.
pub const LAUNCH_KEY: &str = "snapfs";
/// How a snapshot's `<description>` says whether the guest was frozen.
const QUIESCED_TAG: &str = "snapfs: quiesced=";

/// Escape text for an XML attribute value or element content. Characters XML 1.0 cannot
/// carry at all (most control characters) are refused rather than mangled.
pub fn escape(s: &str) -> Result<String> {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push_str(&format!("&#{};", c as u32)),
            c if (c as u32) < 0x20 || c == '\u{fffe}' || c == '\u{ffff}' => {
                return Err(Error::Invalid(format!(
                    "{s:?}: control characters cannot be stored in libvirt XML"
                )))
            }
            c => out.push(c),
        }
    }
    Ok(out)
}

fn parse(xml: &str) -> Result<roxmltree::Document<'_>> {
    roxmltree::Document::parse(xml).map_err(|e| Error::Backend(format!("libvirt XML: {e}")))
}

pub(crate) fn child<'a, 'i>(
    n: roxmltree::Node<'a, 'i>,
    name: &str,
) -> Option<roxmltree::Node<'a, 'i>> {
    n.children().find(|c| c.has_tag_name(name))
}

pub(crate) fn child_text(n: roxmltree::Node<'_, '_>, name: &str) -> Option<String> {
    child(n, name).and_then(|c| c.text()).map(str::to_string)
}

/// Where a disk's bytes live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskSource {
    File(PathBuf),
    /// A host block device.
    Block(PathBuf),
    /// A network disk: protocol and name (for rbd `pool/image`).
    Network {
        protocol: String,
        name: String,
    },
    /// A libvirt storage volume (`<disk type='volume'>`).
    Volume {
        pool: String,
        volume: String,
    },
    None,
}

impl DiskSource {
    pub fn describe(&self) -> String {
        match self {
            DiskSource::File(p) | DiskSource::Block(p) => p.display().to_string(),
            DiskSource::Network { protocol, name } => format!("{protocol}:{name}"),
            DiskSource::Volume { pool, volume } => format!("volume {pool}/{volume}"),
            DiskSource::None => String::new(),
        }
    }
    /// The host path of a file or block-device disk.
    pub fn file(&self) -> Option<&Path> {
        match self {
            DiskSource::File(p) | DiskSource::Block(p) => Some(p),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Disk {
    pub target: String,
    /// `disk`, `cdrom`, `floppy`, `lun`.
    pub device: String,
    /// `<driver type>`: qcow2, raw, …
    pub format: Option<String>,
    pub source: DiskSource,
    pub readonly: bool,
    pub shareable: bool,
}

impl Disk {
    /// A writable hard disk: what a snapshot must cover.
    pub fn is_data_disk(&self) -> bool {
        self.device == "disk" && !self.readonly && !self.shareable
    }
}

fn disk_of(n: roxmltree::Node<'_, '_>) -> Option<Disk> {
    let target = child(n, "target")?.attribute("dev")?.to_string();
    let device = n.attribute("device").unwrap_or("disk").to_string();
    let format = child(n, "driver")
        .and_then(|d| d.attribute("type"))
        .map(str::to_string);
    let src = child(n, "source");
    let source = match (n.attribute("type").unwrap_or("file"), src) {
        ("file", Some(s)) => s
            .attribute("file")
            .map(|f| DiskSource::File(f.into()))
            .unwrap_or(DiskSource::None),
        ("block", Some(s)) => s
            .attribute("dev")
            .map(|f| DiskSource::Block(f.into()))
            .unwrap_or(DiskSource::None),
        ("volume", Some(s)) => DiskSource::Volume {
            pool: s.attribute("pool").unwrap_or("").to_string(),
            volume: s.attribute("volume").unwrap_or("").to_string(),
        },
        ("network", Some(s)) => DiskSource::Network {
            protocol: s.attribute("protocol").unwrap_or("").to_string(),
            name: s.attribute("name").unwrap_or("").to_string(),
        },
        _ => DiskSource::None,
    };
    Some(Disk {
        target,
        device,
        format,
        source,
        readonly: child(n, "readonly").is_some(),
        shareable: child(n, "shareable").is_some(),
    })
}

/// The disks of a `<domain>` element.
fn domain_disks(dom: roxmltree::Node<'_, '_>) -> Vec<Disk> {
    child(dom, "devices")
        .map(|d| {
            d.children()
                .filter(|c| c.has_tag_name("disk"))
                .filter_map(disk_of)
                .collect()
        })
        .unwrap_or_default()
}

/// What we read from a domain's XML.
#[derive(Clone, Debug)]
pub struct DomainXml {
    pub name: String,
    pub disks: Vec<Disk>,
}

pub fn parse_domain(xml: &str) -> Result<DomainXml> {
    let doc = parse(xml)?;
    let root = doc.root_element();
    Ok(DomainXml {
        name: child_text(root, "name").unwrap_or_default(),
        disks: domain_disks(root),
    })
}

/// The directory behind a storage pool whose volumes are host files (`dir`, `fs`, `netfs`).
pub fn pool_dir(xml: &str) -> Result<Option<PathBuf>> {
    let doc = parse(xml)?;
    let root = doc.root_element();
    if !matches!(root.attribute("type"), Some("dir" | "fs" | "netfs")) {
        return Ok(None);
    }
    Ok(child(root, "target")
        .and_then(|t| child_text(t, "path"))
        .map(PathBuf::from))
}

/// One disk entry of a snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapDiskXml {
    pub target: String,
    /// `external`, `internal`, `no` (or `manual`).
    pub kind: String,
    /// For an external snapshot: the overlay it created (the image written after it).
    pub overlay: Option<PathBuf>,
    pub overlay_format: Option<String>,
}

#[derive(Clone, Debug)]
pub struct SnapshotXml {
    pub name: String,
    pub description: Option<String>,
    pub created: Option<i64>,
    /// `disk-snapshot`, `running`, `shutoff`, …
    pub state: String,
    pub parent: Option<String>,
    /// `<memory snapshot=...>`: `no`, `internal`, `external`.
    pub memory: String,
    /// `<memory file=...>`: where an external memory snapshot keeps the guest's state.
    pub memory_file: Option<PathBuf>,
    pub disks: Vec<SnapDiskXml>,
    /// The domain's disks as they were when the snapshot was taken.
    pub domain_disks: Vec<Disk>,
}

impl SnapshotXml {
    /// `Some(true|false)` when the description carries our quiesce tag.
    pub fn quiesced(&self) -> Option<bool> {
        let d = self.description.as_deref()?;
        let at = d.find(QUIESCED_TAG)? + QUIESCED_TAG.len();
        match &d[at..] {
            r if r.starts_with("true") => Some(true),
            r if r.starts_with("false") => Some(false),
            _ => None,
        }
    }
}

pub fn parse_snapshot(xml: &str) -> Result<SnapshotXml> {
    let doc = parse(xml)?;
    let root = doc.root_element();
    let disks = child(root, "disks")
        .map(|d| {
            d.children()
                .filter(|c| c.has_tag_name("disk"))
                .filter_map(|c| {
                    let target = c.attribute("name")?.to_string();
                    let src = child(c, "source");
                    Some(SnapDiskXml {
                        target,
                        kind: c.attribute("snapshot").unwrap_or("").to_string(),
                        overlay: src.and_then(|s| s.attribute("file")).map(PathBuf::from),
                        overlay_format: child(c, "driver")
                            .and_then(|d| d.attribute("type"))
                            .map(str::to_string),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let memory_el = child(root, "memory");
    let memory = memory_el
        .and_then(|m| m.attribute("snapshot"))
        .unwrap_or("no")
        .to_string();
    let memory_file = memory_el
        .and_then(|m| m.attribute("file"))
        .map(PathBuf::from);
    Ok(SnapshotXml {
        name: child_text(root, "name").unwrap_or_default(),
        description: child_text(root, "description"),
        created: child_text(root, "creationTime").and_then(|t| t.trim().parse().ok()),
        state: child_text(root, "state").unwrap_or_default(),
        parent: child(root, "parent").and_then(|p| child_text(p, "name")),
        memory,
        memory_file,
        disks,
        domain_disks: child(root, "domain").map(domain_disks).unwrap_or_default(),
    })
}

/// The `<disks>` element of a request: each of `files` as
/// `<disk name='T' {on} type='file'><driver type='qcow2'/><{file_el} file='F'/></disk>`, each of
/// `excluded` as `<disk name='T' {off}/>`; names and paths escaped.
pub fn request_disks(
    files: &[(String, PathBuf)],
    on: &str,
    file_el: &str,
    excluded: &[String],
    off: &str,
) -> Result<String> {
    let mut x = String::from("  <disks>\n");
    for (target, file) in files {
        let file = file
            .to_str()
            .ok_or_else(|| Error::Invalid(format!("{}: not UTF-8", file.display())))?;
        x.push_str(&format!(
            "    <disk name='{}' {on} type='file'>\n      <driver type='qcow2'/>\n      <{file_el} file='{}'/>\n    </disk>\n",
            escape(target)?,
            escape(file)?
        ));
    }
    for target in excluded {
        x.push_str(&format!("    <disk name='{}' {off}/>\n", escape(target)?));
    }
    x.push_str("  </disks>\n");
    Ok(x)
}

/// The `<domainsnapshot>` we create: an external snapshot, one overlay per disk; every disk
/// not listed in `overlays` is excluded (`snapshot='no'`). With `memory`, the guest's CPU and
/// memory state goes to that file (`<memory snapshot='external'>`); without, disk only.
pub fn snapshot_request(
    name: &str,
    quiesced: bool,
    overlays: &[(String, PathBuf)],
    excluded: &[String],
    memory: Option<&Path>,
) -> Result<String> {
    let memory = match memory {
        Some(f) => {
            let f = f
                .to_str()
                .ok_or_else(|| Error::Invalid(format!("{}: not UTF-8", f.display())))?;
            format!("  <memory snapshot='external' file='{}'/>\n", escape(f)?)
        }
        None => String::new(),
    };
    Ok(format!(
        "<domainsnapshot>\n  <name>{}</name>\n  <description>{QUIESCED_TAG}{quiesced}</description>\n{memory}{}</domainsnapshot>\n",
        escape(name)?,
        request_disks(overlays, "snapshot='external'", "source", excluded, "snapshot='no'")?
    ))
}

/// Our launch record, as the `<metadata>` element libvirt stores for us.
pub fn launch_metadata(instance: &str, snapshot: &str) -> Result<String> {
    Ok(format!(
        "<launch instance='{}' snapshot='{}'/>",
        escape(instance)?,
        escape(snapshot)?
    ))
}

/// (instance, snapshot) from what `virDomainGetMetadata` returned for our namespace.
pub fn parse_launch_metadata(xml: &str) -> Option<(String, String)> {
    let doc = roxmltree::Document::parse(xml).ok()?;
    let root = doc.root_element();
    Some((
        root.attribute("instance")?.to_string(),
        root.attribute("snapshot")?.to_string(),
    ))
}

/// Namespace of our records of RBD-backed instance snapshots in a domain's `<metadata>`.
pub const RBD_SNAPS_NS: &str = "https://snapfs.dev/xmlns/rbd-snapshots/1";
/// Prefix (key) of that element.
pub const RBD_SNAPS_KEY: &str = "snapfsrbd";

/// One instance snapshot of an RBD-backed domain: an RBD snapshot of each disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RbdSnapRecord {
    pub name: String,
    /// Seconds since the epoch.
    pub created: i64,
    pub quiesced: bool,
    /// The guest's CPU and memory state of the same instant (a libvirt save image in snapfs's
    /// store), for a memory snapshot.
    pub memory: Option<PathBuf>,
    pub disks: Vec<RbdSnapDisk>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RbdSnapDisk {
    pub target: String,
    pub pool: String,
    pub image: String,
    pub snap: String,
}

/// The `<snapshots>` element holding every record of a domain.
pub fn rbd_records_xml(records: &[RbdSnapRecord]) -> Result<String> {
    let mut x = String::from("<snapshots>");
    for r in records {
        let memory = match &r.memory {
            Some(f) => format!(
                " memory='{}'",
                escape(
                    f.to_str()
                        .ok_or_else(|| Error::Invalid(format!("{}: not UTF-8", f.display())))?
                )?
            ),
            None => String::new(),
        };
        x.push_str(&format!(
            "<snapshot name='{}' created='{}' quiesced='{}'{memory}>",
            escape(&r.name)?,
            r.created,
            r.quiesced
        ));
        for d in &r.disks {
            x.push_str(&format!(
                "<disk target='{}' pool='{}' image='{}' snap='{}'/>",
                escape(&d.target)?,
                escape(&d.pool)?,
                escape(&d.image)?,
                escape(&d.snap)?
            ));
        }
        x.push_str("</snapshot>");
    }
    x.push_str("</snapshots>");
    Ok(x)
}

/// The records in what `virDomainGetMetadata` returned for [`RBD_SNAPS_NS`]; entries
/// missing a required attribute are skipped.
pub fn parse_rbd_records(xml: &str) -> Result<Vec<RbdSnapRecord>> {
    let doc = parse(xml)?;
    let mut out = Vec::new();
    for s in doc
        .root_element()
        .children()
        .filter(|c| c.has_tag_name("snapshot"))
    {
        let Some(name) = s.attribute("name") else {
            continue;
        };
        let disks = s
            .children()
            .filter(|c| c.has_tag_name("disk"))
            .filter_map(|d| {
                Some(RbdSnapDisk {
                    target: d.attribute("target")?.to_string(),
                    pool: d.attribute("pool")?.to_string(),
                    image: d.attribute("image")?.to_string(),
                    snap: d.attribute("snap")?.to_string(),
                })
            })
            .collect();
        out.push(RbdSnapRecord {
            name: name.to_string(),
            created: s
                .attribute("created")
                .and_then(|c| c.parse().ok())
                .unwrap_or(0),
            quiesced: s.attribute("quiesced") == Some("true"),
            memory: s.attribute("memory").map(PathBuf::from),
            disks,
        });
    }
    Ok(out)
}

/// `pool/image` of an RBD network disk's `name` (`pool/namespace/image` and `image@snap`
/// sources are refused: we never write such disks).
pub fn rbd_pool_image(name: &str) -> Result<(String, String)> {
    match name.split('/').collect::<Vec<_>>().as_slice() {
        [pool, image] if !pool.is_empty() && !image.is_empty() && !image.contains('@') => {
            Ok((pool.to_string(), image.to_string()))
        }
        _ => Err(Error::NotSupported(format!(
            "RBD disk source {name:?}: only pool/image (no namespace, no @snapshot) is supported"
        ))),
    }
}

/// Where a launched disk's bytes go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NewSource {
    /// A file of the given format (`qcow2` overlay, `raw` copy).
    File(PathBuf, &'static str),
    /// An RBD clone `pool/image` (same monitors, auth and config as the source disk).
    Rbd(String),
}

/// How a launch changes one disk.
pub struct DiskEdit {
    pub target: String,
    pub source: NewSource,
}

/// The source domain's inactive XML turned into the clone's: new name, no UUID (libvirt
/// assigns one), no MAC addresses (libvirt generates new ones), disks on their new overlays,
/// our old launch record dropped, and host paths that would clash (file consoles/serials,
/// unix channel sockets, NVRAM) renamed after the new domain. Returns the XML and the
/// list of disks it could not re-point (which makes the launch unsafe).
///
/// The new domain is never cloud-managed: the `<metadata>` elements of the clouds of
/// [`super::managed::RULES`] are always dropped, and with `strip_sysinfo` (a managed source)
/// the SMBIOS `<sysinfo>` and `<os><smbios>` that carry the cloud's identity too.
pub fn launch_domain_xml(
    src_xml: &str,
    src_name: &str,
    new_name: &str,
    disks: &[DiskEdit],
    strip_sysinfo: bool,
) -> Result<String> {
    let doc = parse(src_xml)?;
    let root = doc.root_element();
    let mut edits: Vec<(std::ops::Range<usize>, String)> = Vec::new();
    let new_path = |p: &str| renamed_path(p, src_name, new_name);

    for n in root.children().filter(|n| n.is_element()) {
        match n.tag_name().name() {
            "name" => edits.push((n.range(), format!("<name>{}</name>", escape(new_name)?))),
            "uuid" => edits.push((n.range(), String::new())),
            "metadata" => {
                for m in n.children().filter(|m| m.is_element()) {
                    // Our launch record and RBD snapshot records belong to the source.
                    let ns = m.tag_name().namespace();
                    if ns == Some(LAUNCH_NS)
                        || ns == Some(RBD_SNAPS_NS)
                        || super::managed::is_cloud_metadata_ns(ns)
                    {
                        edits.push((m.range(), String::new()));
                    }
                }
            }
            "os" => {
                // NVRAM is per domain: libvirt makes a fresh one from the template.
                if let Some(nv) = child(n, "nvram") {
                    edits.push((nv.range(), String::new()));
                }
                if strip_sysinfo {
                    if let Some(sm) = child(n, "smbios") {
                        edits.push((sm.range(), String::new()));
                    }
                }
            }
            "sysinfo" if strip_sysinfo => edits.push((n.range(), String::new())),
            "devices" => {
                let mut seen = std::collections::HashSet::new();
                for d in n.children().filter(|d| d.is_element()) {
                    match d.tag_name().name() {
                        "disk" => {
                            let Some(disk) = disk_of(d) else { continue };
                            let Some(edit) = disks.iter().find(|e| e.target == disk.target) else {
                                if disk.is_data_disk() {
                                    return Err(Error::NotSupported(format!(
                                        "disk {} of {src_name} is not in the snapshot: the clone would share it",
                                        disk.target
                                    )));
                                }
                                continue;
                            };
                            seen.insert(disk.target.clone());
                            let new = match &edit.source {
                                NewSource::File(f, format) => rewrite_disk(
                                    src_xml,
                                    d,
                                    f.to_str().ok_or_else(|| {
                                        Error::Invalid(format!("{}: not UTF-8", f.display()))
                                    })?,
                                    format,
                                )?,
                                NewSource::Rbd(name) => rewrite_rbd_disk(src_xml, d, name)?,
                            };
                            edits.push((d.range(), new));
                        }
                        "interface" => {
                            if let Some(mac) = child(d, "mac") {
                                edits.push((mac.range(), String::new()));
                            }
                        }
                        "serial" | "console" | "channel" | "parallel" => {
                            if let Some(s) = child(d, "source") {
                                if let Some(p) = s.attribute("path") {
                                    let np = new_path(p);
                                    edits.push((s.range(), replace_attr(src_xml, s, "path", &np)?));
                                }
                            }
                            if let Some(l) = child(d, "log") {
                                if let Some(p) = l.attribute("file") {
                                    let np = new_path(p);
                                    edits.push((l.range(), replace_attr(src_xml, l, "file", &np)?));
                                }
                            }
                        }
                        _ => {}
                    }
                }
                if let Some(missing) = disks.iter().find(|e| !seen.contains(&e.target)) {
                    return Err(Error::Backend(format!(
                        "disk {} of the snapshot is no longer in {src_name}'s definition",
                        missing.target
                    )));
                }
            }
            _ => {}
        }
    }
    Ok(apply_edits(src_xml, edits))
}

/// A `<disk>` element on a new qcow2 overlay: same attributes and children except the
/// source, the driver type and any stale `<backingStore>`.
fn rewrite_disk(src: &str, d: roxmltree::Node<'_, '_>, file: &str, format: &str) -> Result<String> {
    let mut edits = Vec::new();
    let base = d.range().start;
    let rel = |r: std::ops::Range<usize>| (r.start - base)..(r.end - base);
    let mut has_driver = false;
    for c in d.children().filter(|c| c.is_element()) {
        match c.tag_name().name() {
            "source" => edits.push((
                rel(c.range()),
                format!("<source file='{}'/>", escape(file)?),
            )),
            "backingStore" => edits.push((rel(c.range()), String::new())),
            "driver" => {
                has_driver = true;
                edits.push((rel(c.range()), replace_attr(src, c, "type", format)?));
            }
            _ => {}
        }
    }
    let mut out = apply_edits(&src[d.range()], edits);
    if !has_driver {
        // A disk always has children (its target): insert before the first one.
        if let Some(first) = d.children().next() {
            let at = first.range().start - base;
            out.insert_str(at, &format!("<driver name='qemu' type='{format}'/>"));
        }
    }
    // The disk must be type='file' now (it might have been a block device).
    if let Some(t) = d.attribute_node("type") {
        let r = rel(t.range());
        out = format!("{}type='file'{}", &out[..r.start], &out[r.end..]);
    }
    Ok(out)
}

/// An RBD network `<disk>` on its clone: only the source's `name` changes (monitors, auth
/// and config stay), a stale `<backingStore>` goes.
fn rewrite_rbd_disk(src: &str, d: roxmltree::Node<'_, '_>, name: &str) -> Result<String> {
    if d.attribute("type") != Some("network") {
        return Err(Error::Backend(
            "an RBD clone can only replace a network disk".into(),
        ));
    }
    let base = d.range().start;
    let rel = |r: std::ops::Range<usize>| (r.start - base)..(r.end - base);
    let mut edits = Vec::new();
    for c in d.children().filter(|c| c.is_element()) {
        match c.tag_name().name() {
            "source" => edits.push((rel(c.range()), replace_attr(src, c, "name", name)?)),
            "backingStore" => edits.push((rel(c.range()), String::new())),
            _ => {}
        }
    }
    Ok(apply_edits(&src[d.range()], edits))
}

/// Element `n` with attribute `attr` set to `value` (added when absent).
fn replace_attr(src: &str, n: roxmltree::Node<'_, '_>, attr: &str, value: &str) -> Result<String> {
    let text = &src[n.range()];
    let base = n.range().start;
    let new_attr = format!("{attr}='{}'", escape(value)?);
    if let Some(a) = n.attribute_node(attr) {
        let r = (a.range().start - base)..(a.range().end - base);
        return Ok(format!("{}{new_attr}{}", &text[..r.start], &text[r.end..]));
    }
    let at = 1 + text[1..]
        .find(|c: char| c.is_whitespace() || c == '/' || c == '>')
        .unwrap_or(text.len() - 1);
    Ok(format!("{} {new_attr}{}", &text[..at], &text[at..]))
}

fn apply_edits(src: &str, mut edits: Vec<(std::ops::Range<usize>, String)>) -> String {
    edits.sort_by_key(|(r, _)| std::cmp::Reverse(r.start));
    let mut out = src.to_string();
    let mut last_start = usize::MAX;
    for (r, text) in edits {
        // Nested edits (an element inside one already replaced) are skipped.
        if r.end > last_start {
            continue;
        }
        out.replace_range(r.clone(), &text);
        last_start = r.start;
    }
    out
}

/// A host path that names the source domain, renamed for the new one: a base name starting
/// with `<src>.` or `<src>-` gets `<new>` instead; otherwise `<new>-` is put in front.
pub fn renamed_path(p: &str, src: &str, new: &str) -> String {
    let path = Path::new(p);
    let Some(base) = path.file_name().and_then(|b| b.to_str()) else {
        return format!("{p}.{new}");
    };
    let new_base = match base.strip_prefix(src) {
        Some(rest) if rest.starts_with('.') || rest.starts_with('-') => format!("{new}{rest}"),
        _ => format!("{new}-{base}"),
    };
    path.with_file_name(new_base).display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOMAIN: &str = r#"<domain type='qemu'>
  <name>demo</name>
  <uuid>0b3c3a1e-6d0a-4c53-9d2b-111111111111</uuid>
  <metadata>
    <snapfs:launch xmlns:snapfs="https://snapfs.dev/xmlns/launch/1" instance="old" snapshot="s0"/>
    <other:x xmlns:other="urn:other"/>
  </metadata>
  <memory unit='KiB'>294912</memory>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/img/demo.s1.qcow2'/>
      <backingStore type='file'><format type='qcow2'/><source file='/img/demo.qcow2'/></backingStore>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <source file='/iso/x &amp; y.iso'/>
      <target dev='hdc' bus='ide'/>
      <readonly/>
    </disk>
    <interface type='network'>
      <mac address='52:54:00:aa:bb:cc'/>
      <source network='default'/>
    </interface>
    <channel type='unix'>
      <source mode='bind' path='/run/tb/demo.ctl'/>
      <target type='virtio' name='org.snapfs.ctl'/>
    </channel>
    <channel type='unix'>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <serial type='file'>
      <source path='/var/log/tb/demo.console.log' append='off'/>
      <target port='0'/>
    </serial>
  </devices>
</domain>"#;

    #[test]
    fn escapes() {
        assert_eq!(escape("a'b<&>\"").unwrap(), "a&apos;b&lt;&amp;&gt;&quot;");
        assert!(escape("a\u{1}b").is_err());
    }

    #[test]
    fn domain_disks_parse() {
        let d = parse_domain(DOMAIN).unwrap();
        assert_eq!(d.name, "demo");
        assert_eq!(d.disks.len(), 2);
        assert_eq!(d.disks[0].target, "vda");
        assert!(d.disks[0].is_data_disk());
        assert_eq!(d.disks[1].source, DiskSource::File("/iso/x & y.iso".into()));
        assert!(!d.disks[1].is_data_disk());
    }

    #[test]
    fn snapshot_request_escapes_and_round_trips() {
        let x = snapshot_request(
            "pre <upgrade> & 'x'",
            true,
            &[("vda".into(), "/img/a'b.qcow2".into())],
            &["hdc".into()],
            None,
        )
        .unwrap();
        let doc = roxmltree::Document::parse(&x).unwrap();
        let s = parse_snapshot(&x).unwrap();
        assert_eq!(s.memory, "no");
        assert_eq!(s.memory_file, None);
        assert_eq!(s.name, "pre <upgrade> & 'x'");
        assert_eq!(s.quiesced(), Some(true));
        assert_eq!(
            s.disks[0].overlay.as_deref(),
            Some(Path::new("/img/a'b.qcow2"))
        );
        assert_eq!(s.disks[1].kind, "no");
        drop(doc);
    }

    #[test]
    fn memory_snapshot_request_names_its_state_file() {
        let x = snapshot_request(
            "m1",
            false,
            &[("vda".into(), "/img/web.m1.vda.qcow2".into())],
            &[],
            Some(Path::new("/img/web.m1.memory & state")),
        )
        .unwrap();
        let s = parse_snapshot(&x).unwrap();
        assert_eq!(s.memory, "external");
        assert_eq!(
            s.memory_file.as_deref(),
            Some(Path::new("/img/web.m1.memory & state"))
        );
        assert_eq!(s.disks[0].kind, "external");
        assert_eq!(s.quiesced(), Some(false));
    }

    #[test]
    fn launch_xml_edits() {
        let x = launch_domain_xml(
            DOMAIN,
            "demo",
            "copy<1>",
            &[DiskEdit {
                target: "vda".into(),
                source: NewSource::File("/img/copy.vda.qcow2".into(), "qcow2"),
            }],
            false,
        )
        .unwrap();
        let doc = roxmltree::Document::parse(&x).unwrap();
        let root = doc.root_element();
        assert_eq!(child_text(root, "name").as_deref(), Some("copy<1>"));
        assert!(child(root, "uuid").is_none());
        assert!(!x.contains("52:54:00"));
        assert!(!x.contains(LAUNCH_NS), "{x}");
        assert!(x.contains("urn:other"));
        let d = parse_domain(&x).unwrap();
        assert_eq!(
            d.disks[0].source,
            DiskSource::File("/img/copy.vda.qcow2".into())
        );
        assert_eq!(d.disks[0].format.as_deref(), Some("qcow2"));
        assert!(!x.contains("backingStore"));
        assert_eq!(d.disks[1].source, DiskSource::File("/iso/x & y.iso".into()));
        assert!(x.contains("path='/run/tb/copy&lt;1&gt;.ctl'"), "{x}");
        assert!(x.contains("path='/var/log/tb/copy&lt;1&gt;.console.log'"));
        assert!(x.contains("append='off'"));
    }

    #[test]
    fn launch_of_a_managed_source_drops_the_cloud() {
        let src = DOMAIN
            .replace(
                "<other:x xmlns:other=\"urn:other\"/>",
                "<other:x xmlns:other=\"urn:other\"/><nova:instance xmlns:nova=\"http://openstack.org/xmlns/libvirt/nova/1.1\"><nova:name>web</nova:name></nova:instance>",
            )
            .replace(
                "<memory unit='KiB'>",
                "<sysinfo type='smbios'><system><entry name='manufacturer'>Apache Software Foundation</entry><entry name='product'>CloudStack KVM Hypervisor</entry></system></sysinfo><os><type>hvm</type><smbios mode='sysinfo'/></os><memory unit='KiB'>",
            );
        let edits = [DiskEdit {
            target: "vda".into(),
            source: NewSource::File("/s/c.vda.qcow2".into(), "qcow2"),
        }];
        let x = launch_domain_xml(&src, "demo", "c", &edits, true).unwrap();
        assert!(
            !x.contains("openstack.org") && !x.contains("sysinfo") && !x.contains("CloudStack"),
            "{x}"
        );
        assert!(
            x.contains("urn:other") && x.contains("<type>hvm</type>"),
            "{x}"
        );
        assert!(super::super::managed::ManagedPolicy::default()
            .detect(&x)
            .unwrap()
            .is_none());
        // Without strip_sysinfo the cloud's metadata still goes, the SMBIOS stays.
        let x = launch_domain_xml(&src, "demo", "c", &edits, false).unwrap();
        assert!(!x.contains("openstack.org") && x.contains("sysinfo"), "{x}");
    }

    #[test]
    fn launch_refuses_unsnapshotted_writable_disk() {
        let e = launch_domain_xml(DOMAIN, "demo", "c", &[], false).unwrap_err();
        assert_eq!(e.errno(), libc::ENOTSUP);
    }

    #[test]
    fn renamed_paths() {
        assert_eq!(
            renamed_path("/l/demo.console.log", "demo", "c"),
            "/l/c.console.log"
        );
        assert_eq!(renamed_path("/l/demo-x.sock", "demo", "c"), "/l/c-x.sock");
        assert_eq!(
            renamed_path("/l/serial.log", "demo", "c"),
            "/l/c-serial.log"
        );
        assert_eq!(renamed_path("/l/demox.log", "demo", "c"), "/l/c-demox.log");
    }

    #[test]
    fn launch_metadata_round_trip() {
        let m = launch_metadata("we'b", "s<1>").unwrap();
        assert_eq!(
            parse_launch_metadata(&m),
            Some(("we'b".to_string(), "s<1>".to_string()))
        );
    }

    const RBD_DOMAIN: &str = r#"<domain type='kvm'>
  <name>web</name>
  <uuid>0f0e0d0c-0b0a-0908-0706-050403020100</uuid>
  <metadata>
    <snapfsrbd:snapshots xmlns:snapfsrbd="https://snapfs.dev/xmlns/rbd-snapshots/1"><snapshot name="s1" created="1" quiesced="true"><disk target="vda" pool="vms" image="web_disk" snap="s1"/></snapshot></snapfsrbd:snapshots>
  </metadata>
  <devices>
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw' cache='writeback' discard='unmap'/>
      <auth username='openstack'>
        <secret type='ceph' uuid='5b67401f-dc5e-4d3e-a2ba-3b4a3e3c2f11'/>
      </auth>
      <source protocol='rbd' name='vms/web_disk'>
        <host name='10.0.0.1' port='6789'/>
        <host name='10.0.0.2' port='6789'/>
      </source>
      <target dev='vda' bus='virtio'/>
    </disk>
  </devices>
</domain>"#;

    #[test]
    fn launch_on_rbd_clone_keeps_auth_and_hosts() {
        let x = launch_domain_xml(
            RBD_DOMAIN,
            "web",
            "web2",
            &[DiskEdit {
                target: "vda".into(),
                source: NewSource::Rbd("vms/web2-vda".into()),
            }],
            false,
        )
        .unwrap();
        let d = parse_domain(&x).unwrap();
        assert_eq!(
            d.disks[0].source,
            DiskSource::Network {
                protocol: "rbd".into(),
                name: "vms/web2-vda".into()
            }
        );
        assert_eq!(d.disks[0].format.as_deref(), Some("raw"));
        for kept in [
            "<auth username='openstack'>",
            "uuid='5b67401f-dc5e-4d3e-a2ba-3b4a3e3c2f11'",
            "<host name='10.0.0.1' port='6789'/>",
            "<host name='10.0.0.2' port='6789'/>",
            "discard='unmap'",
        ] {
            assert!(x.contains(kept), "{kept} lost: {x}");
        }
        // The source's RBD snapshot records are not the clone's.
        assert!(!x.contains(RBD_SNAPS_NS), "{x}");
        assert!(!x.contains("0f0e0d0c"));
    }

    #[test]
    fn rbd_records_round_trip() {
        let disk = RbdSnapDisk {
            target: "vda".into(),
            pool: "vms".into(),
            image: "web_disk".into(),
            snap: "before <upgrade> & 'x'".into(),
        };
        let r = vec![
            RbdSnapRecord {
                name: "before <upgrade> & 'x'".into(),
                created: 1_700_000_000,
                quiesced: true,
                memory: None,
                disks: vec![disk.clone()],
            },
            RbdSnapRecord {
                name: "m1".into(),
                created: 1_700_000_001,
                quiesced: false,
                memory: Some(PathBuf::from(
                    "/var/lib/snapfs/store/u/.rbd-memory/web.m1.memory.state",
                )),
                disks: vec![disk],
            },
        ];
        assert_eq!(parse_rbd_records(&rbd_records_xml(&r).unwrap()).unwrap(), r);
        assert!(parse_rbd_records("<snapshots/>").unwrap().is_empty());
        assert_eq!(
            rbd_pool_image("vms/web_disk").unwrap(),
            ("vms".to_string(), "web_disk".to_string())
        );
        for bad in ["web_disk", "vms/ns/web", "vms/web@snap", "/web"] {
            assert_eq!(
                rbd_pool_image(bad).unwrap_err().errno(),
                libc::ENOTSUP,
                "{bad}"
            );
        }
    }
}

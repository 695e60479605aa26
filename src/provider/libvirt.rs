//! The `libvirt` provider: every domain is an instance; its snapshots are libvirt domain
//! snapshots (external disk-only ones, which we make, and internal ones made by others).
//!
//! - mkdir: freeze through the guest agent (per the quiesce policy, see [`freeze`]), one
//!   atomic external disk-only snapshot of every writable disk, thaw.
//! - reads: an external snapshot's data is the image the snapshot's overlay is backed by,
//!   read with our own qcow2 reader; an internal one is read at its internal snapshot.
//! - rmdir: libvirt deletes (and merges) it, unless another domain's backing chain uses an
//!   image the deletion would rewrite or remove.
//! - launch: a qcow2 overlay per disk on the snapshot's image, a domain defined from the
//!   source's XML, our record in the new domain's `<metadata>`.

pub mod agent;
pub mod freeze;
mod lvm;
pub mod managed;
mod memory;
mod rbd;
pub mod remote;
mod revert;
mod settings;
pub mod store;
mod store_rbd;
pub mod xml;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::libvirt::sys;
use crate::libvirt::Connect;
use crate::libvirt::Domain;
use crate::libvirt::DomainSnapshot;
use crate::libvirt::ErrorNumber;
use serde_json::json;
use tracing::{debug, info, warn};

use super::images::ImagesProvider;
use super::rbd::RbdAccess;
use super::{LaunchInfo, ObjectInfo, Owner, Provider, SnapDisk, SnapshotInfo};
use crate::error::{Error, IoContext, Result};
use crate::image::{self, qcow2, BlockCache, BlockImage, Format};
use crate::namespace::registry::lock;
use freeze::{FreezeOutcome, Freezer};
use xml::{DiskSource, SnapshotXml};

/// How hard mkdir tries to freeze the guest's filesystems.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quiesce {
    /// Fail the snapshot (ETIMEDOUT) when the agent cannot freeze.
    Require,
    /// Fall back to a crash-consistent snapshot.
    Prefer,
    /// Never freeze.
    Off,
}

choice_from_str!(Quiesce {
    "require" => Quiesce::Require,
    "prefer" => Quiesce::Prefer,
    "off" => Quiesce::Off,
});

/// How mkdir snapshots an instance (`--snapshot-method`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotMethod {
    /// `copy` for cloud-managed domains, `external` for the others.
    Auto,
    /// External disk-only snapshots (the domain's disks switch to new overlays), or RBD
    /// snapshots for RBD disks. Also for managed domains when asked for explicitly.
    External,
    /// A copy into snapfs's store; nothing on the domain changes ([`store`]).
    Copy,
}

choice_from_str!(SnapshotMethod {
    "auto" => SnapshotMethod::Auto,
    "external" => SnapshotMethod::External,
    "copy" => SnapshotMethod::Copy,
});

/// What the copy method does with the RBD disks of a domain (`--managed-rbd`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ManagedRbd {
    /// Copy them: into `--store-pool` (snap, clone, flatten, source snapshot removed), or,
    /// without it, into the file store by a push backup (running domains only).
    Copy,
    /// Keep an RBD snapshot on the cloud's image instead of a copy (opt-in: Nova's delete of
    /// the instance then fails with ImageHasSnapshots; docs/libvirt.md).
    KeepSnapshot,
}

choice_from_str!(ManagedRbd {
    "copy" => ManagedRbd::Copy,
    "keep-snapshot" => ManagedRbd::KeepSnapshot,
});

#[derive(Clone, Debug)]
pub struct LibvirtOptions {
    pub uri: String,
    pub quiesce: Quiesce,
    pub freeze_timeout: Duration,
    pub state_dir: PathBuf,
    /// Flatten the RBD clones of a launch in the background.
    pub flatten_on_launch: bool,
    /// Which domains count as cloud-managed (`--managed`, `--managed-match`).
    pub managed: managed::ManagedPolicy,
    pub method: SnapshotMethod,
    /// The store of copy snapshots (`--store`; default `<state-dir>/store`).
    pub store: Option<PathBuf>,
    /// The Ceph pool whose RBD namespace `snapfs` holds copies of RBD disks (`--store-pool`).
    pub store_pool: Option<String>,
    pub managed_rbd: ManagedRbd,
    /// Block-device disks that are LVM logical volumes get LVM snapshots (`--lvm-snapshots`)
    /// instead of a copy; thick LVs need the copy-on-write size (`--lvm-cow-size`, bytes).
    pub lvm_snapshots: bool,
    pub lvm_cow_size: Option<u64>,
    /// One of several hosts (`-c` more than once): connections are opened with these bounds
    /// (and keepalive), and a host that does not answer at start-up is no error.
    pub dial: Option<super::hosts::DialLimits>,
}

/// How long `instance.json` waits for a guest-ping.
const PING_TIMEOUT: Duration = Duration::from_millis(300);
/// Longest image file base name we create (NAME_MAX is 255).
const MAX_PART: usize = 60;
const MAX_CHAIN: usize = 64;

pub struct LibvirtProvider {
    opts: LibvirtOptions,
    conn: Mutex<Option<Connect>>,
    dialer: Option<super::hosts::Dialer>,
    /// One of several hosts: freeze records (and the other leftovers of a dead daemon) are
    /// handled at the first connection, which may come long after start-up.
    recover_pending: std::sync::atomic::AtomicBool,
    freezer: Arc<Freezer>,
    cache: Arc<BlockCache>,
    /// The Ceph connection (`--ceph`), for domains whose disks are RBD images.
    rbd: Option<Arc<RbdAccess>>,
    /// Serialises read-modify-write of the RBD snapshot records in domain metadata.
    rbd_records: Mutex<()>,
    store: store::Store,
}

/// A libvirt error with our context, mapped onto the refusals SPEC.md names.
pub(crate) fn lv_err(context: impl Into<String>, e: crate::libvirt::Error) -> Error {
    let what = format!("{}: {}", context.into(), e.message());
    let lower = e.message().to_ascii_lowercase();
    match e.code().known() {
        Some(
            ErrorNumber::NoDomain | ErrorNumber::NoDomainSnapshot | ErrorNumber::NoDomainMetadata,
        ) => Error::NotFound(what),
        Some(ErrorNumber::OperationTimeout | ErrorNumber::AgentCommandTimeout) => {
            Error::TimedOut(what)
        }
        Some(
            ErrorNumber::NoSupport
            | ErrorNumber::OperationUnsupported
            | ErrorNumber::ConfigUnsupported
            | ErrorNumber::ArgumentUnsupported,
        ) => Error::NotSupported(what),
        _ if lower.contains("already exists") => Error::Exists(what),
        _ if lower.contains("no space") || lower.contains("quota") => Error::NoSpace(what),
        _ if lower.contains("lock") => Error::Busy(what),
        _ => Error::Backend(what),
    }
}

/// `--lvm-cow-size`: a size as lvcreate's `-L` takes it, in bytes.
pub fn parse_lvm_size(s: &str) -> std::result::Result<u64, String> {
    lvm::parse_size(s)
}

/// A file name part made only of `[A-Za-z0-9._+-]`, never starting with `.`, bounded.
fn safe_part(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._+-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(MAX_PART)
        .collect();
    if out.starts_with('.') {
        out.replace_range(0..1, "_");
    }
    if out.is_empty() {
        out.push('_');
    }
    out
}

/// `dir/<a>.<b>.<target>.<ext>`, or with `-2`, `-3`… when taken.
fn fresh_image_path(dir: &Path, a: &str, b: &str, target: &str, ext: &str) -> Result<PathBuf> {
    let stem = format!("{}.{}.{}", safe_part(a), safe_part(b), safe_part(target));
    for i in 1..1000 {
        let name = if i == 1 {
            format!("{stem}.{ext}")
        } else {
            format!("{stem}-{i}.{ext}")
        };
        let p = dir.join(name);
        // On the disk's host (a remote one's, through its storage API).
        if !image::hostfile::exists(&p) {
            return Ok(p);
        }
    }
    Err(Error::Exists(format!(
        "no free image name for {stem} in {}",
        dir.display()
    )))
}

/// A path made canonical when it exists (so two spellings of one file compare equal).
fn canonical(p: &Path) -> PathBuf {
    p.canonicalize().unwrap_or_else(|_| p.to_path_buf())
}

/// `path` and every file below it in its backing chain, canonical.
fn chain_files(path: &Path) -> Vec<PathBuf> {
    let mut out = vec![canonical(path)];
    let mut cur = path.to_path_buf();
    for _ in 0..MAX_CHAIN {
        if !matches!(image::probe_format(&cur), Ok(Format::Qcow2)) {
            break;
        }
        match qcow2::inspect(&cur) {
            Ok(info) => match info.backing_path {
                Some(next) => {
                    out.push(canonical(&next));
                    cur = next;
                }
                None => break,
            },
            Err(e) => {
                debug!(image = %cur.display(), error = %e, "cannot follow backing chain");
                break;
            }
        }
    }
    out
}

fn format_name(f: Format) -> &'static str {
    match f {
        Format::Raw => "raw",
        Format::Qcow2 => "qcow2",
        Format::Parallels => "parallels",
    }
}

/// Whether a disk's source is a host block device: `<disk type='block'>`, or a file disk whose
/// path is one.
fn is_block_device(src: &DiskSource) -> bool {
    use std::os::unix::fs::FileTypeExt;
    match src {
        DiskSource::Block(_) => true,
        // A remote host's path says nothing about this machine's files.
        DiskSource::File(p) => {
            !image::hostfile::remote_scope()
                && std::fs::metadata(p).is_ok_and(|m| m.file_type().is_block_device())
        }
        _ => false,
    }
}

/// A block-device disk for instance.json: the device it resolves to and, for an LVM logical
/// volume (a device-mapper device whose uuid starts with `LVM-`, what udev's DM_UUID says),
/// its VG and LV from the mapper name.
fn block_device_json(path: Option<&Path>) -> serde_json::Value {
    let Some(path) = path else {
        return serde_json::Value::Null;
    };
    let real = std::fs::canonicalize(path).ok();
    let lvm = lvm_of(path);
    json!({
        "device": real.map(|r| r.display().to_string()),
        "lvm": lvm.map(|(vg, lv)| json!({ "vg": vg, "lv": lv })),
    })
}

/// The (VG, LV) of a block device that is an LVM logical volume: a device-mapper device
/// whose uuid starts with `LVM-` (what udev's DM_UUID says), names from the mapper name.
fn lvm_of(path: &Path) -> Option<(String, String)> {
    let real = std::fs::canonicalize(path).ok()?;
    let dm = real.file_name()?.to_str()?;
    if !dm.starts_with("dm-") {
        return None;
    }
    let sys = Path::new("/sys/block").join(dm).join("dm");
    let uuid = std::fs::read_to_string(sys.join("uuid")).ok()?;
    if !uuid.starts_with("LVM-") {
        return None;
    }
    lvm_names(std::fs::read_to_string(sys.join("name")).ok()?.trim())
}

/// (VG, LV) from a device-mapper name `VG-LV`, where LVM doubles a `-` inside either name.
fn lvm_names(dm: &str) -> Option<(String, String)> {
    let b = dm.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'-' {
            if b.get(i + 1) == Some(&b'-') {
                i += 2;
                continue;
            }
            return Some((dm[..i].replace("--", "-"), dm[i + 1..].replace("--", "-")));
        }
        i += 1;
    }
    None
}

/// Virtual size of a host image, by our own reader's header parsing.
fn image_size(path: &Path, format: Option<&str>) -> Option<u64> {
    let fmt = match format.and_then(Format::parse) {
        Some(f) => f,
        None => image::probe_format(path).ok()?,
    };
    match fmt {
        Format::Qcow2 => qcow2::inspect(path).ok().map(|i| i.virtual_size),
        // The reader's own size: BLKGETSIZE64 for a block device (whose st_size is 0).
        Format::Raw => image::raw::RawImage::open(path).ok().map(|i| i.size()),
        Format::Parallels => image::parallels::ParallelsImage::open(path, None)
            .ok()
            .map(|i| i.size()),
    }
}

fn state_name(dom: &Domain) -> Result<(String, bool)> {
    use crate::libvirt::DomainState as S;
    let info = dom.info().map_err(|e| lv_err("reading domain state", e))?;
    let name = match info.state.known() {
        Some(S::Running) => "running",
        Some(S::Blocked) => "blocked",
        Some(S::Paused) => "paused",
        Some(S::Shutdown) => "shutting down",
        Some(S::Shutoff) => "shut off",
        Some(S::Crashed) => "crashed",
        Some(S::PMSuspended) => "pmsuspended",
        Some(S::NoState) | None => "unknown",
    };
    let active = dom.is_active().unwrap_or(false);
    Ok((name.to_string(), active))
}

/// Where one disk of a snapshot has its bytes.
#[derive(Clone, Debug)]
struct SnapImage {
    target: String,
    /// `external` or `internal`.
    kind: &'static str,
    /// The image holding the data as of the snapshot.
    path: PathBuf,
    format: Format,
    /// For an internal snapshot: its name inside `path`.
    internal: Option<String>,
    /// For an external snapshot: the overlay written after it.
    overlay: Option<PathBuf>,
    size: Option<u64>,
}

impl LibvirtProvider {
    pub fn new(opts: LibvirtOptions, cache: Arc<BlockCache>) -> Result<Self> {
        // libvirt's default error handler prints every error to stderr; we log them ourselves.
        let freezer = Freezer::new(&opts.state_dir)?;
        let store_dir = opts
            .store
            .clone()
            .unwrap_or_else(|| opts.state_dir.join("store"));
        let store = store::Store::new(&store_dir)?;
        if opts.lvm_snapshots && !lvm::device_mapper_available(&lvm::SystemLvm) {
            warn!("--lvm-snapshots: device-mapper is not available here (dmsetup version failed): block-device disks are copied instead");
        }
        let dialer = opts
            .dial
            .map(|limits| super::hosts::Dialer::new(&opts.uri, limits));
        let p = LibvirtProvider {
            opts,
            conn: Mutex::new(None),
            recover_pending: std::sync::atomic::AtomicBool::new(dialer.is_some()),
            dialer,
            freezer,
            cache,
            rbd: None,
            rbd_records: Mutex::new(()),
            store,
        };
        let c = match p.conn() {
            Ok(c) => c,
            Err(e) if p.dialer.is_some() => {
                warn!(uri = %p.opts.uri, error = %e, "libvirt host does not answer yet: its instances appear when it does");
                return Ok(p);
            }
            Err(e) => return Err(e),
        };
        info!(uri = %p.opts.uri, hypervisor = %c.driver_type().unwrap_or_default(), quiesce = ?p.opts.quiesce, freeze_timeout_ms = p.opts.freeze_timeout.as_millis() as u64, managed = ?p.opts.managed.mode, method = ?p.opts.method, store = %p.store.dir().display(), "libvirt provider");
        Ok(p)
    }

    /// Serve domains whose disks are RBD images through this Ceph connection.
    pub fn attach_rbd(&mut self, rbd: Arc<RbdAccess>) {
        self.rbd = Some(rbd);
    }

    /// The shared connection, reopened when it died (libvirtd restart).
    fn conn(&self) -> Result<Connect> {
        let mut g = lock(&self.conn);
        if let Some(c) = g.as_ref() {
            if c.is_alive().unwrap_or(false) {
                return Ok(c.clone());
            }
            warn!(uri = %self.opts.uri, "libvirt connection lost: reconnecting");
            *g = None;
        }
        if let Some(d) = &self.dialer {
            // Bounded: the wait is not made under the lock, so callers of a silent host
            // each wait at most the dialer's timeout, not one after another.
            drop(g);
            let c = d.dial()?;
            *lock(&self.conn) = Some(c.clone());
            if self
                .recover_pending
                .swap(false, std::sync::atomic::Ordering::SeqCst)
            {
                // (Its own conn() calls get the connection just stored.)
                match self.recover_frozen() {
                    Ok(_) => {}
                    Err(e) => {
                        warn!(uri = %self.opts.uri, error = %e, "freeze records of this host not handled yet");
                        self.recover_pending
                            .store(true, std::sync::atomic::Ordering::SeqCst);
                    }
                }
            }
            return Ok(c);
        }
        let c = Connect::open(Some(&self.opts.uri))
            .map_err(|e| lv_err(format!("connecting to {}", self.opts.uri), e))?;
        *g = Some(c.clone());
        Ok(c)
    }

    /// An opener of this host's files through its storage API (a remote host's provider
    /// reads its disks through this; see [`remote`]).
    pub fn remote_files(&self) -> Result<crate::image::hostfile::Opener> {
        Ok(remote::opener(self.conn()?, &self.opts.uri))
    }

    /// At daemon start: thaw guests a dead daemon left frozen (see [`freeze`]).
    pub fn recover_frozen(&self) -> Result<usize> {
        let conn = self.conn()?;
        let paused = rbd::recover_paused(&self.opts.state_dir, &conn);
        if paused > 0 {
            info!(
                records = paused,
                "pause records from a previous daemon handled"
            );
        }
        let n = self.freezer.recover(&conn)?;
        if n > 0 {
            info!(records = n, "freeze records from a previous daemon handled");
        }
        let parts = self.store.recover(&conn);
        if parts > 0 {
            info!(
                copies = parts,
                "incomplete copy snapshots of a previous daemon removed"
            );
        }
        Ok(n)
    }

    fn store(&self) -> Result<&store::Store> {
        Ok(&self.store)
    }

    /// `managed_by` of a domain (None: not managed), from its live definition.
    fn managed_by(&self, dom: &Domain) -> Result<Option<serde_json::Value>> {
        let x = dom
            .xml_desc(0)
            .map_err(|e| lv_err("reading domain XML", e))?;
        self.opts.managed.detect(&x)
    }

    /// A disk's virtual size: a file's from its header (our reader), an RBD image's from
    /// librbd; None when unknown.
    fn disk_size(&self, d: &xml::Disk) -> Option<u64> {
        match &d.source {
            DiskSource::Network { protocol, name } if protocol == "rbd" => {
                self.rbd_image_size(name)
            }
            s => s.file().and_then(|p| image_size(p, d.format.as_deref())),
        }
    }

    /// The store snapshot `name` of `dom`, if there is one.
    fn store_snapshot(&self, dom: &Domain, name: &str) -> Result<Option<store::StoreSnap>> {
        let uuid = dom.uuid_string().map_err(|e| lv_err("domain uuid", e))?;
        Ok(self.store.find(&uuid, name))
    }

    /// Active storage pools whose volumes are host files: (name, directory).
    fn pool_dirs(&self) -> Result<Vec<(String, PathBuf)>> {
        let pools = self
            .conn()?
            .list_all_storage_pools(sys::VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE)
            .map_err(|e| lv_err("listing storage pools", e))?;
        let mut out = Vec::new();
        for p in pools {
            let (Ok(name), Ok(x)) = (p.name(), p.xml_desc(0)) else {
                continue;
            };
            match xml::pool_dir(&x) {
                Ok(Some(dir)) => out.push((name, dir)),
                Ok(None) => {
                    debug!(pool = %name, "storage pool without a host directory: not shown")
                }
                Err(e) => {
                    crate::input_warn!(
                        "libvirt",
                        "unreadable storage pool XML of {}: {e}",
                        crate::log_limit::esc_str(&name)
                    );
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// A volume of a directory pool behaves exactly like one of the `images` provider.
    fn pool_images(&self, owner: &Owner) -> Result<ImagesProvider> {
        let Owner::Volume { pool, .. } = owner else {
            return Err(Error::NotFound(owner.to_string()));
        };
        self.pool_provider(pool)
    }

    fn pool_provider(&self, pool: &str) -> Result<ImagesProvider> {
        let (name, dir) = self
            .pool_dirs()?
            .into_iter()
            .find(|(n, _)| n == pool)
            .ok_or_else(|| Error::NotFound(format!("pool {pool}")))?;
        Ok(ImagesProvider::named(&name, &dir, self.cache.clone()))
    }

    fn domain(&self, owner: &Owner) -> Result<Domain> {
        let Owner::Instance(name) = owner else {
            return Err(Error::NotFound(owner.to_string()));
        };
        self.domain_named(name)
    }

    fn domain_named(&self, name: &str) -> Result<Domain> {
        self.conn()?
            .lookup_domain_by_name(name)
            .map_err(|e| lv_err(format!("domain {name}"), e))
    }

    fn domain_xml(dom: &Domain, flags: u32) -> Result<xml::DomainXml> {
        let x = dom
            .xml_desc(flags)
            .map_err(|e| lv_err("reading domain XML", e))?;
        xml::parse_domain(&x)
    }

    fn snapshot_xml(snap: &DomainSnapshot) -> Result<SnapshotXml> {
        let x = snap
            .xml_desc(0)
            .map_err(|e| lv_err("reading snapshot XML", e))?;
        xml::parse_snapshot(&x)
    }

    fn lookup_snapshot(dom: &Domain, owner: &Owner, name: &str) -> Result<DomainSnapshot> {
        Domain::lookup_snapshot_by_name(dom, name, 0)
            .map_err(|e| lv_err(format!("snapshot {name} of {owner}"), e))
    }

    /// Where each disk of a snapshot keeps its bytes.
    ///
    /// External: the backing file named in the overlay's qcow2 header. QEMU rewrites that
    /// header whenever a commit changes the chain, so it stays right after other snapshots
    /// are deleted; the source in the snapshot's `<domain>` copy is only metadata and is
    /// used when the overlay is gone or has no backing file.
    fn snap_images(&self, current: &[xml::Disk], sx: &SnapshotXml) -> Result<Vec<SnapImage>> {
        let mut out = Vec::new();
        for d in &sx.disks {
            let recorded = sx
                .domain_disks
                .iter()
                .find(|x| x.target == d.target)
                .or_else(|| current.iter().find(|x| x.target == d.target));
            match d.kind.as_str() {
                "external" => {
                    let from_overlay = d.overlay.as_ref().and_then(|o| {
                        let info = qcow2::inspect(o).ok()?;
                        let fmt = info
                            .backing_format
                            .as_deref()
                            .and_then(Format::parse)
                            .or_else(|| image::probe_format(info.backing_path.as_ref()?).ok())?;
                        Some((info.backing_path?, fmt))
                    });
                    let (path, format) = match from_overlay {
                        Some(x) => x,
                        None => {
                            let Some(p) = recorded.and_then(|r| r.source.file()) else {
                                crate::input_warn!(
                                    "libvirt",
                                    "external snapshot disk without a readable image: snapshot {}, disk {}",
                                    crate::log_limit::esc_str(&sx.name),
                                    crate::log_limit::esc_str(&d.target)
                                );
                                continue;
                            };
                            let fmt = recorded
                                .and_then(|r| r.format.as_deref())
                                .and_then(Format::parse)
                                .map_or_else(|| image::probe_format(p), Ok)?;
                            (p.to_path_buf(), fmt)
                        }
                    };
                    let size = image_size(&path, Some(format_name(format)));
                    out.push(SnapImage {
                        target: d.target.clone(),
                        kind: "external",
                        path,
                        format,
                        internal: None,
                        overlay: d.overlay.clone(),
                        size,
                    });
                }
                "internal" => {
                    // The image that had the disk when the snapshot was taken, else the one
                    // in the current chain that holds an internal snapshot of that name.
                    let mut candidates: Vec<PathBuf> = Vec::new();
                    if let Some(p) = recorded.and_then(|r| r.source.file()) {
                        candidates.push(p.to_path_buf());
                    }
                    if let Some(p) = current
                        .iter()
                        .find(|x| x.target == d.target)
                        .and_then(|x| x.source.file())
                    {
                        candidates.extend(chain_files(p));
                    }
                    let found = candidates.into_iter().find_map(|p| {
                        let info = qcow2::inspect(&p).ok()?;
                        let s = info.snapshots.iter().find(|s| s.name == sx.name)?;
                        Some((p, s.virtual_size))
                    });
                    let Some((path, size)) = found else {
                        crate::input_warn!(
                            "libvirt",
                            "internal snapshot not found in any image of the disk: snapshot {}, disk {}",
                            crate::log_limit::esc_str(&sx.name),
                            crate::log_limit::esc_str(&d.target)
                        );
                        continue;
                    };
                    out.push(SnapImage {
                        target: d.target.clone(),
                        kind: "internal",
                        path,
                        format: Format::Qcow2,
                        internal: Some(sx.name.clone()),
                        overlay: None,
                        size: Some(size),
                    });
                }
                _ => {}
            }
        }
        Ok(out)
    }

    fn snapshot_info(&self, current: &[xml::Disk], sx: &SnapshotXml) -> Result<SnapshotInfo> {
        let images = self.snap_images(current, sx)?;
        let created = sx
            .created
            .and_then(|t| u64::try_from(t).ok())
            .map(|t| UNIX_EPOCH + Duration::from_secs(t))
            .unwrap_or(UNIX_EPOCH);
        let disks_json: Vec<serde_json::Value> = images
            .iter()
            .map(|i| {
                json!({
                    "target": i.target,
                    "kind": i.kind,
                    "source": i.path.display().to_string(),
                    "format": format_name(i.format),
                    "size": i.size,
                    "internal_snapshot": i.internal,
                    "overlay": i.overlay.as_ref().map(|o| o.display().to_string()),
                })
            })
            .collect();
        let j = json!({
            "id": sx.name,
            "name": sx.name,
            "created": super::rfc3339(created),
            "quiesced": sx.quiesced(),
            "memory": sx.memory != "no",
            "memory_file": sx.memory_file.as_ref().map(|f| f.display().to_string()),
            "memory_size": sx
                .memory_file
                .as_ref()
                .and_then(|f| std::fs::metadata(f).ok())
                .map(|m| m.len()),
            "state": sx.state,
            "parent": sx.parent,
            "description": sx.description,
            "method": if images.iter().any(|i| i.kind == "external") {
                "external"
            } else {
                "internal"
            },
            "disks": disks_json,
        });
        Ok(SnapshotInfo {
            name: sx.name.clone(),
            id: sx.name.clone(),
            created,
            disks: images
                .iter()
                .map(|i| SnapDisk {
                    target: i.target.clone(),
                    size: i.size.unwrap_or(0),
                })
                .collect(),
            json: Arc::new(j),
        })
    }

    /// Images a deletion of `sx` would rewrite (the snapshot's own image, the commit target)
    /// or remove (its overlay, merged down).
    fn images_rewritten_by_delete(
        &self,
        current: &[xml::Disk],
        sx: &SnapshotXml,
    ) -> Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        for i in self.snap_images(current, sx)? {
            if i.kind == "external" {
                out.push(canonical(&i.path));
                if let Some(o) = &i.overlay {
                    out.push(canonical(o));
                }
            }
        }
        Ok(out)
    }

    /// A domain other than `owner_uuid` whose disks' chains use one of `images`.
    fn dependent_domain(&self, owner_uuid: &str, images: &[PathBuf]) -> Result<Option<String>> {
        let wanted: HashSet<&PathBuf> = images.iter().collect();
        let conn = self.conn()?;
        let doms = conn
            .list_all_domains(0)
            .map_err(|e| lv_err("listing domains", e))?;
        for d in doms {
            if d.uuid_string().ok().as_deref() == Some(owner_uuid) {
                continue;
            }
            let name = d.name().unwrap_or_default();
            let (state, active) = state_name(&d).unwrap_or_else(|_| ("unknown".into(), false));
            // The live and the persistent definition may differ; both count.
            let mut defs = vec![Self::domain_xml(&d, sys::VIR_DOMAIN_XML_INACTIVE)];
            if active {
                defs.push(Self::domain_xml(&d, 0));
            }
            for def in defs.into_iter().flatten() {
                for disk in &def.disks {
                    let Some(top) = disk.source.file() else {
                        continue;
                    };
                    if let Some(hit) = chain_files(top).into_iter().find(|f| wanted.contains(f)) {
                        return Ok(Some(format!(
                            "domain {name} ({state}) disk {} uses {}",
                            disk.target,
                            hit.display()
                        )));
                    }
                }
            }
        }
        Ok(None)
    }

    /// Freeze the guest per the quiesce policy: `Some` when frozen (thawed when dropped),
    /// `None` for a crash-consistent snapshot, ETIMEDOUT when the policy requires a freeze
    /// the agent could not give.
    fn quiesce(
        &self,
        dom: &Domain,
        uuid: &str,
        dom_name: &str,
        owner: &Owner,
        active: bool,
    ) -> Result<Option<freeze::Frozen>> {
        let policy = if active {
            self.quiesce_policy(dom)
        } else {
            Quiesce::Off
        };
        if policy == Quiesce::Off {
            return Ok(None);
        }
        match self
            .freezer
            .freeze(dom, uuid, dom_name, self.opts.freeze_timeout)
        {
            FreezeOutcome::Frozen(f) => return Ok(Some(f)),
            FreezeOutcome::Failed(e) if policy == Quiesce::Require => {
                return Err(Error::TimedOut(format!(
                    "quiesce required but the guest agent of {owner} could not freeze: {e}"
                )))
            }
            FreezeOutcome::TimedOut if policy == Quiesce::Require => {
                return Err(Error::TimedOut(format!(
                    "quiesce required but the guest agent of {owner} did not freeze within {} ms",
                    self.opts.freeze_timeout.as_millis()
                )))
            }
            FreezeOutcome::Failed(e) => {
                warn!(%owner, error = %e, "freeze failed: taking a crash-consistent snapshot")
            }
            FreezeOutcome::TimedOut => {
                warn!(%owner, "freeze timed out: taking a crash-consistent snapshot")
            }
        }
        Ok(None)
    }

    /// Define `new` from `src`'s definition with `edits` applied, record the launch in its
    /// metadata and start it; on failure nothing of `new` is left defined.
    fn define_and_start(
        &self,
        src: &Domain,
        new: &str,
        instance: &str,
        snapshot: &str,
        edits: &[xml::DiskEdit],
    ) -> Result<()> {
        let src_xml = src
            .xml_desc(sys::VIR_DOMAIN_XML_INACTIVE | sys::VIR_DOMAIN_XML_SECURE)
            .map_err(|e| lv_err(format!("reading {instance}'s definition"), e))?;
        // A clone of a cloud-managed domain must not look managed (nor be taken for the
        // cloud's own by the cloud).
        let managed = self.managed_by(src)?.is_some();
        let new_xml = xml::launch_domain_xml(&src_xml, instance, new, edits, managed)?;
        let conn = self.conn()?;
        let dom = conn
            .define_domain_xml(&new_xml)
            .map_err(|e| lv_err(format!("defining domain {new}"), e))?;
        let undefine = |why: &Error| {
            warn!(domain = %new, error = %why, "launch failed: removing the new domain");
            let _ = dom.destroy();
            let _ = dom.undefine();
        };
        let meta = xml::launch_metadata(instance, snapshot)?;
        if let Err(e) = dom.set_metadata(
            sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
            Some(&meta),
            Some(xml::LAUNCH_KEY),
            Some(xml::LAUNCH_NS),
            sys::VIR_DOMAIN_AFFECT_CONFIG,
        ) {
            let e = lv_err(format!("recording the launch in {new}'s metadata"), e);
            undefine(&e);
            return Err(e);
        }
        if let Err(e) = dom.create() {
            let e = lv_err(format!("starting domain {new}"), e);
            undefine(&e);
            return Err(e);
        }
        Ok(())
    }

    /// `qemu-img create -f qcow2` of a new image of `size` bytes: an overlay on `backing`, or
    /// an empty image.
    fn qemu_img_create(
        &self,
        image: &Path,
        backing: Option<(&Path, Format)>,
        size: u64,
    ) -> Result<()> {
        let mut cmd = Command::new("qemu-img");
        cmd.args(["create", "-q", "-f", "qcow2"]);
        if let Some((backing, fmt)) = backing {
            // -u: the backing image may be in use by a running domain; the size is given.
            cmd.args(["-u", "-b"])
                .arg(backing)
                .args(["-F", format_name(fmt)]);
        }
        let out = cmd
            .arg(image)
            .arg(size.to_string())
            .output()
            .ctx(|| "running qemu-img (is qemu-utils installed?)".to_string())?;
        if out.status.success() {
            return Ok(());
        }
        let msg = String::from_utf8_lossy(&out.stderr).trim().to_string();
        Err(if msg.to_ascii_lowercase().contains("no space") {
            Error::NoSpace(msg)
        } else {
            Error::Backend(format!("qemu-img create {}: {msg}", image.display()))
        })
    }
}

impl Provider for LibvirtProvider {
    fn kind(&self) -> &'static str {
        "libvirt"
    }

    fn pools(&self) -> Result<Vec<String>> {
        Ok(self.pool_dirs()?.into_iter().map(|(n, _)| n).collect())
    }

    fn volumes(&self, pool: &str) -> Result<Vec<String>> {
        self.pool_provider(pool)?.volumes(pool)
    }

    fn instances(&self) -> Result<Vec<String>> {
        let doms = self
            .conn()?
            .list_all_domains(0)
            .map_err(|e| lv_err("listing domains", e))?;
        let mut names: Vec<String> = doms.iter().filter_map(|d| d.name().ok()).collect();
        names.sort();
        Ok(names)
    }

    fn info(&self, owner: &Owner) -> Result<ObjectInfo> {
        if let Owner::Volume { .. } = owner {
            return self.pool_images(owner)?.info(owner);
        }
        let dom = self.domain(owner)?;
        let (state, active) = state_name(&dom)?;
        let info = dom.info().map_err(|e| lv_err("domain info", e))?;
        let def = Self::domain_xml(&dom, 0)?;
        let disks: Vec<serde_json::Value> = def
            .disks
            .iter()
            .map(|d| {
                let size = self.disk_size(d);
                let source = match &d.source {
                    DiskSource::Network { protocol, name } => {
                        json!({ "protocol": protocol, "name": name })
                    }
                    other => json!(other.describe()),
                };
                let mut j = json!({
                    "target": d.target,
                    "device": d.device,
                    "format": d.format,
                    "source": source,
                    "size": size,
                });
                if is_block_device(&d.source) {
                    // What the path resolves to is known on its own host only.
                    j["block_device"] = if image::hostfile::remote_scope() {
                        serde_json::Value::Null
                    } else {
                        block_device_json(d.source.file())
                    };
                }
                j
            })
            .collect();
        let agent = if active {
            let uuid = dom.uuid_string().unwrap_or_default();
            if agent::ping(&dom, &uuid, PING_TIMEOUT) {
                "reachable"
            } else {
                "unreachable"
            }
        } else {
            "not running"
        };
        let launched = dom
            .metadata(
                sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
                Some(xml::LAUNCH_NS),
                0,
            )
            .ok()
            .and_then(|m| xml::parse_launch_metadata(&m))
            .map(|(i, s)| json!({ "instance": i, "snapshot": s }));
        let j = json!({
            "name": def.name,
            "uuid": dom.uuid_string().unwrap_or_default(),
            "state": state,
            "vcpus": info.nr_virt_cpu,
            "memory": info.max_mem.saturating_mul(1024),
            "disks": disks,
            "agent": agent,
            "launched_from": launched,
            "managed_by": self.managed_by(&dom)?,
        });
        Ok(ObjectInfo {
            json: j,
            mtime: SystemTime::now(),
        })
    }

    fn storage_keys(&self, owner: &Owner) -> Result<Vec<String>> {
        if let Owner::Volume { .. } = owner {
            return self.pool_images(owner)?.storage_keys(owner);
        }
        let x = Self::domain_xml(&self.domain(owner)?, 0)?;
        let mut keys = Vec::new();
        // Listed once, and only for an instance with a disk of a storage pool.
        let mut pools: Option<Vec<(String, PathBuf)>> = None;
        for d in x.disks.iter().filter(|d| d.is_data_disk()) {
            match &d.source {
                // The active file only: instances cloned from one base image (Nova's `_base`)
                // share their backing files and must not exclude each other.
                DiskSource::File(p) | DiskSource::Block(p) => keys.push(super::file_key(p)),
                DiskSource::Network { protocol, name } if protocol == "rbd" => {
                    keys.push(super::rbd_key(name))
                }
                DiskSource::Volume { pool, volume } => {
                    if pools.is_none() {
                        pools = Some(self.pool_dirs()?);
                    }
                    if let Some((_, dir)) = pools.iter().flatten().find(|(n, _)| n == pool) {
                        keys.push(super::file_key(&dir.join(volume)));
                    }
                }
                DiskSource::Network { .. } | DiskSource::None => {}
            }
        }
        Ok(keys)
    }

    fn snapshots(&self, owner: &Owner) -> Result<Vec<SnapshotInfo>> {
        if let Owner::Volume { .. } = owner {
            return self.pool_images(owner)?.snapshots(owner);
        }
        let dom = self.domain(owner)?;
        let current = Self::domain_xml(&dom, 0)?.disks;
        let snaps = dom
            .list_all_snapshots(0)
            .map_err(|e| lv_err(format!("listing snapshots of {owner}"), e))?;
        let mut out = Vec::new();
        for s in snaps {
            match Self::snapshot_xml(&s).and_then(|sx| self.snapshot_info(&current, &sx)) {
                Ok(i) => out.push(i),
                Err(e) => {
                    crate::input_warn!(&owner.to_string(), "skipping an unreadable snapshot: {e}");
                }
            }
        }
        out.extend(self.rbd_snapshot_infos(&dom, owner)?);
        let uuid = dom.uuid_string().map_err(|e| lv_err("domain uuid", e))?;
        out.extend(self.store.list(&uuid).iter().map(|s| s.info()));
        out.sort_by(|a, b| a.created.cmp(&b.created).then(a.name.cmp(&b.name)));
        Ok(out)
    }

    fn create_snapshot(&self, owner: &Owner, name: &str) -> Result<()> {
        if let Owner::Volume { .. } = owner {
            return self.pool_images(owner)?.create_snapshot(owner, name);
        }
        if name.is_empty() || name.len() > 255 {
            return Err(Error::Invalid(format!("snapshot name {name:?}")));
        }
        if name.contains('/') {
            return Err(Error::Invalid(format!(
                "{name:?}: libvirt snapshot names cannot contain '/'"
            )));
        }
        xml::escape(name)?;
        let dom = self.domain(owner)?;
        if self.store_snapshot(&dom, name)?.is_some()
            || Domain::lookup_snapshot_by_name(&dom, name, 0).is_ok()
        {
            return Err(Error::Exists(format!("snapshot {name} of {owner}")));
        }
        let managed_by = self.managed_by(&dom)?;
        // A block-device disk (Nova's lvm backend, an attached Cinder LVM/iSCSI volume) is
        // copied: an external snapshot would move the guest onto a file overlay.
        let block_disk = Self::domain_xml(&dom, 0)?
            .disks
            .iter()
            .find(|d| d.is_data_disk() && is_block_device(&d.source))
            .map(|d| d.target.clone());
        let method = match (self.opts.method, &managed_by, &block_disk) {
            (SnapshotMethod::Auto, Some(_), _)
            | (SnapshotMethod::Copy, _, _)
            | (SnapshotMethod::Auto, None, Some(_)) => SnapshotMethod::Copy,
            (SnapshotMethod::External, _, Some(t)) => {
                return Err(Error::NotSupported(format!(
                    "disk {t} of {owner} is a block device: --snapshot-method=external would move the guest onto a file overlay; use auto or copy"
                )))
            }
            (SnapshotMethod::External, Some(m), None) => {
                warn!(%owner, managed_by = %m, "--snapshot-method=external on a cloud-managed domain: its disks switch to new overlays, which the cloud does not know about");
                SnapshotMethod::External
            }
            _ => SnapshotMethod::External,
        };
        let (_, active) = state_name(&dom)?;
        // user.snapfs.memory=on: a running domain's CPU and memory state is saved too.
        let memory = active && self.memory_setting(&dom);
        if method == SnapshotMethod::Copy {
            if memory {
                info!(%owner, snapshot = %name, "user.snapfs.memory=on, but the copy method saves disks only: the snapshot holds no memory state");
            }
            return self.create_copy_snapshot(&dom, owner, name, managed_by);
        }
        let dom_name = dom.name().map_err(|e| lv_err("domain name", e))?;
        let uuid = dom.uuid_string().map_err(|e| lv_err("domain uuid", e))?;
        let def = Self::domain_xml(&dom, 0)?;

        let mut overlays = Vec::new();
        let mut excluded = Vec::new();
        let mut rbd_disks = Vec::new();
        for d in &def.disks {
            if !d.is_data_disk() {
                excluded.push(d.target.clone());
                continue;
            }
            match &d.source {
                DiskSource::File(p) => {
                    let dir = p.parent().unwrap_or(Path::new("/"));
                    overlays.push((
                        d.target.clone(),
                        fresh_image_path(dir, &dom_name, name, &d.target, "qcow2")?,
                    ));
                }
                DiskSource::Network { protocol, name } if protocol == "rbd" => {
                    let (pool, image) = xml::rbd_pool_image(name)?;
                    rbd_disks.push(rbd::RbdDisk {
                        target: d.target.clone(),
                        pool,
                        image,
                    });
                }
                other => {
                    let what = match other {
                        DiskSource::None => "without a source".to_string(),
                        o => o.describe(),
                    };
                    return Err(Error::NotSupported(format!(
                        "disk {} of {owner} is {what}: only file and RBD disks can be snapshotted",
                        d.target
                    )));
                }
            }
        }
        if !rbd_disks.is_empty() {
            if let Some((t, _)) = overlays.first() {
                return Err(Error::NotSupported(format!(
                    "{owner} mixes RBD disks ({}) with file disks ({t}): no snapshot can cover both at once",
                    rbd_disks[0].target
                )));
            }
            if Domain::lookup_snapshot_by_name(&dom, name, 0).is_ok() {
                return Err(Error::Exists(format!("snapshot {name} of {owner}")));
            }
            // The state file goes to this machine's store, which a remote host cannot write.
            let memory = memory && !image::hostfile::remote_scope();
            if !memory && active && self.memory_setting(&dom) {
                info!(%owner, snapshot = %name, "user.snapfs.memory=on, but the domain runs on a remote host whose libvirtd cannot write this machine's store: the snapshot holds no memory state");
            }
            return self.create_rbd_snapshot(&dom, owner, name, &rbd_disks, memory);
        }
        let Some((_, first)) = overlays.first() else {
            return Err(Error::NotSupported(format!(
                "{owner} has no writable file disk"
            )));
        };
        if memory {
            // Beside the first disk's overlay, named like the overlays.
            let dir = first.parent().unwrap_or(Path::new("/"));
            let state = fresh_image_path(dir, &dom_name, name, "memory", "state")?;
            return self.create_memory_snapshot(&dom, owner, name, &overlays, &excluded, &state);
        }

        let frozen = self.quiesce(&dom, &uuid, &dom_name, owner, active)?;
        let quiesced = frozen.is_some();
        let req = xml::snapshot_request(name, quiesced, &overlays, &excluded, None)?;
        let flags =
            sys::VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY | sys::VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC;
        let started = Instant::now();
        let res = dom.create_snapshot_xml(&req, flags);
        let snap_ms = started.elapsed().as_millis() as u64;
        let thawed = frozen.map(|f| f.thaw());
        res.map_err(|e| lv_err(format!("creating snapshot {name} of {owner}"), e))?;
        info!(%owner, snapshot = %name, quiesced, snap_ms, "external disk-only snapshot created");
        if let Some(Err(e)) = thawed {
            return Err(Error::Backend(format!(
                "snapshot {name} of {owner} was created, but thawing the guest failed (snapfs keeps retrying): {e}"
            )));
        }
        Ok(())
    }

    fn delete_snapshot(&self, owner: &Owner, name: &str) -> Result<()> {
        if let Owner::Volume { .. } = owner {
            return self.pool_images(owner)?.delete_snapshot(owner, name);
        }
        let dom = self.domain(owner)?;
        if let Some(snap) = self.store_snapshot(&dom, name)? {
            return self.delete_store_snapshot(&dom, owner, &snap);
        }
        if self.delete_rbd_snapshot(&dom, owner, name)? {
            return Ok(());
        }
        let uuid = dom.uuid_string().map_err(|e| lv_err("domain uuid", e))?;
        let snap = Self::lookup_snapshot(&dom, owner, name)?;
        let sx = Self::snapshot_xml(&snap)?;
        let current = Self::domain_xml(&dom, 0)?.disks;
        let images = self.images_rewritten_by_delete(&current, &sx)?;
        if !images.is_empty() {
            if let Some(who) = self.dependent_domain(&uuid, &images)? {
                return Err(Error::Busy(format!(
                    "deleting snapshot {name} of {owner} would rewrite an image another domain depends on: {who}"
                )));
            }
        }
        let started = Instant::now();
        snap.delete(0)
            .map_err(|e| lv_err(format!("deleting snapshot {name} of {owner}"), e))?;
        Self::remove_memory_state(owner, name, sx.memory_file.as_deref());
        info!(%owner, snapshot = %name, ms = started.elapsed().as_millis() as u64, "snapshot deleted by libvirt");
        Ok(())
    }

    fn rename_snapshot(&self, owner: &Owner, from: &str, to: &str) -> Result<()> {
        if let Owner::Volume { .. } = owner {
            return self.pool_images(owner)?.rename_snapshot(owner, from, to);
        }
        let dom = self.domain(owner)?;
        if let Some(snap) = self.store_snapshot(&dom, from)? {
            if self.store_snapshot(&dom, to)?.is_some()
                || Domain::lookup_snapshot_by_name(&dom, to, 0).is_ok()
            {
                return Err(Error::Exists(format!("snapshot {to} of {owner}")));
            }
            xml::escape(to)?;
            return self.store.rename(&snap, to);
        }
        if self.rename_rbd_snapshot(&dom, owner, from, to)?.is_some() {
            return Ok(());
        }
        Err(Error::NotSupported(format!(
            "libvirt cannot rename snapshot {from} of {owner} (only RBD-backed ones can be)"
        )))
    }

    /// libvirt keeps a parent and a current snapshot only for its own snapshot metadata, not
    /// for snapfs's copies or RBD records: snapfs keeps one lineage for all of them.
    fn records_lineage(&self, owner: &Owner) -> bool {
        match owner {
            Owner::Volume { .. } => self
                .pool_images(owner)
                .is_ok_and(|p| p.records_lineage(owner)),
            Owner::Instance(_) => true,
        }
    }

    fn settings(&self, owner: &Owner) -> Result<Vec<(String, String)>> {
        match owner {
            Owner::Instance(_) => self.instance_settings(owner),
            Owner::Volume { .. } => Ok(Vec::new()),
        }
    }

    fn set_setting(&self, owner: &Owner, name: &str, value: Option<&str>) -> Result<()> {
        match owner {
            Owner::Instance(_) => self.set_instance_setting(owner, name, value),
            Owner::Volume { .. } => Err(Error::NotSupported(format!(
                "volumes keep no settings ({owner}: user.snapfs.{name})"
            ))),
        }
    }

    fn check_revert(&self, owner: &Owner, snap: &SnapshotInfo) -> Result<()> {
        if let Owner::Volume { .. } = owner {
            return self.pool_images(owner)?.check_revert(owner, snap);
        }
        self.check_instance_revert(owner, snap)
    }

    fn revert_snapshot(&self, owner: &Owner, snap: &SnapshotInfo) -> Result<()> {
        if let Owner::Volume { .. } = owner {
            return self.pool_images(owner)?.revert_snapshot(owner, snap);
        }
        self.revert_instance(owner, snap)
    }

    fn keep_before_revert(&self, owner: &Owner, target: &SnapshotInfo, name: &str) -> Result<()> {
        if let Owner::Instance(_) = owner {
            if self.keep_internal(owner, target, name)? {
                return Ok(());
            }
        }
        self.create_snapshot(owner, name)
    }

    fn reverted_to(&self, owner: &Owner, snap: &SnapshotInfo) -> Result<Option<bool>> {
        if let Owner::Volume { .. } = owner {
            return self.pool_images(owner)?.reverted_to(owner, snap);
        }
        self.instance_reverted_to(owner, snap)
    }

    fn open_disk(
        &self,
        owner: &Owner,
        snap: &SnapshotInfo,
        target: &str,
    ) -> Result<Arc<dyn BlockImage>> {
        if let Owner::Volume { .. } = owner {
            return self.pool_images(owner)?.open_disk(owner, snap, target);
        }
        let dom = self.domain(owner)?;
        if snap.id.starts_with(store::ID_PREFIX) {
            let s = self.store_snapshot(&dom, &snap.name)?.ok_or_else(|| {
                Error::NotFound(format!("snapshot {} of {owner} in the store", snap.name))
            })?;
            if let Some(r) = s.disk_rbd(target) {
                return self.open_store_rbd_disk(owner, r);
            }
            let (path, format) = s.disk_path(target).ok_or_else(|| {
                Error::NotFound(format!(
                    "disk {target} of snapshot {} of {owner}",
                    snap.name
                ))
            })?;
            return image::open(&path, Some(format), None, &self.cache);
        }
        if snap.id.starts_with("rbd:") {
            if let Some(img) = self.open_rbd_disk(&dom, owner, &snap.name, target)? {
                return Ok(img);
            }
        }
        let s = Self::lookup_snapshot(&dom, owner, &snap.name)?;
        let sx = Self::snapshot_xml(&s)?;
        let current = Self::domain_xml(&dom, 0)?.disks;
        let img = self
            .snap_images(&current, &sx)?
            .into_iter()
            .find(|i| i.target == target)
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "disk {target} of snapshot {} of {owner}",
                    snap.name
                ))
            })?;
        debug!(%owner, snapshot = %snap.name, target, image = %img.path.display(), internal = ?img.internal, "opening snapshot disk");
        image::open(
            &img.path,
            Some(img.format),
            img.internal.as_deref(),
            &self.cache,
        )
    }

    fn launches(&self) -> Result<Vec<LaunchInfo>> {
        let doms = self
            .conn()?
            .list_all_domains(0)
            .map_err(|e| lv_err("listing domains", e))?;
        let mut out = Vec::new();
        for d in doms {
            let Ok(m) = d.metadata(
                sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
                Some(xml::LAUNCH_NS),
                0,
            ) else {
                continue;
            };
            let (Some((instance, snapshot)), Ok(name)) = (xml::parse_launch_metadata(&m), d.name())
            else {
                continue;
            };
            out.push(LaunchInfo {
                name,
                instance,
                snapshot,
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn launch(&self, new: &str, instance: &str, snapshot: &str) -> Result<()> {
        let owner = Owner::Instance(instance.to_string());
        xml::escape(new)?;
        if new.contains('/') {
            return Err(Error::Invalid(format!(
                "{new:?}: libvirt domain names cannot contain '/'"
            )));
        }
        managed::refuse_cloud_name(new)?;
        let src = self.domain(&owner)?;
        // Overlays of a store snapshot go to the store's launch directory, others next to
        // the snapshot's image.
        let (images, launch_dir) = if let Some(s) = self.store_snapshot(&src, snapshot)? {
            if s.has_rbd() {
                return self.launch_store_rbd(&src, new, instance, snapshot, &s);
            }
            let images = s
                .meta
                .disks
                .iter()
                .filter_map(|d| {
                    let (path, format) = s.disk_path(&d.target)?;
                    Some(SnapImage {
                        target: d.target.clone(),
                        kind: "copy",
                        path,
                        format,
                        internal: None,
                        overlay: None,
                        size: Some(d.size),
                    })
                })
                .collect();
            (images, Some(self.store.launch_dir()?))
        } else {
            if self.launch_rbd(&src, new, instance, snapshot)?.is_some() {
                return Ok(());
            }
            let snap = Self::lookup_snapshot(&src, &owner, snapshot)?;
            let sx = Self::snapshot_xml(&snap)?;
            let current = Self::domain_xml(&src, 0)?.disks;
            (self.snap_images(&current, &sx)?, None)
        };
        if images.is_empty() {
            return Err(Error::NotSupported(format!(
                "snapshot {snapshot} of {instance} has no disk"
            )));
        }
        // On a remote host (paths are its files) the overlays are made and removed by its
        // storage API, not on this machine; a copy in this machine's store is sent there,
        // next to the domain's own disk of the same target.
        let remote = if image::hostfile::remote_scope() {
            let disks = Self::domain_xml(&src, 0)?.disks;
            let beside = move |target: &str| -> Result<PathBuf> {
                disks
                    .iter()
                    .find_map(|d| match &d.source {
                        xml::DiskSource::File(p) if d.target == target => Some(p.clone()),
                        _ => None,
                    })
                    .ok_or_else(|| {
                        Error::NotSupported(format!(
                            "launch {new}: {instance} has no file disk {target} on its host \
                             to place the copy of snapshot {snapshot} beside"
                        ))
                    })
            };
            Some((self.conn()?, beside))
        } else {
            None
        };
        let mut created: Vec<PathBuf> = Vec::new();
        let cleanup = |created: &[PathBuf]| {
            for f in created {
                let r = match &remote {
                    Some((conn, _)) => remote::delete_file(conn, &self.opts.uri, f),
                    None => std::fs::remove_file(f).ctx(|| format!("removing {}", f.display())),
                };
                if let Err(e) = r {
                    warn!(file = %f.display(), error = %e, "cannot remove overlay of a failed launch");
                }
            }
        };
        // Each disk's new image: an overlay on the snapshot, or, for an internal snapshot (no
        // overlay can be backed by one), a sparse raw copy of it written from our own reader.
        // On a remote host, such a copy and a copy of a store snapshot (a file of this
        // machine) are uploaded through its storage API.
        let make = |i: &SnapImage| -> Result<(PathBuf, &'static str)> {
            if let Some((conn, beside)) = &remote {
                if i.internal.is_some() || launch_dir.is_some() {
                    let near = match launch_dir {
                        Some(_) => beside(&i.target)?,
                        None => i.path.clone(),
                    };
                    let dir = near.parent().unwrap_or(Path::new("/"));
                    let copy = fresh_image_path(dir, new, "launch", &i.target, "raw")?;
                    let open =
                        || image::open(&i.path, Some(i.format), i.internal.as_deref(), &self.cache);
                    let img = match launch_dir {
                        Some(_) => image::hostfile::local(open)?,
                        None => open()?,
                    };
                    remote::upload_copy(conn, &self.opts.uri, &copy, &near, img.as_ref())?;
                    return Ok((copy, "raw"));
                }
            }
            let dir = launch_dir
                .as_deref()
                .unwrap_or_else(|| i.path.parent().unwrap_or(Path::new("/")));
            if let Some(internal) = &i.internal {
                let copy = fresh_image_path(dir, new, "launch", &i.target, "raw")?;
                // copy_sparse removes its own file when it fails.
                image::open(&i.path, Some(i.format), Some(internal), &self.cache)
                    .and_then(|img| image::copy_sparse(img.as_ref(), &copy))?;
                return Ok((copy, "raw"));
            }
            let overlay = fresh_image_path(dir, new, "launch", &i.target, "qcow2")?;
            let size = i.size.ok_or_else(|| {
                Error::Backend(format!("cannot read the size of {}", i.path.display()))
            })?;
            match &remote {
                Some((conn, _)) => remote::create_overlay(
                    conn,
                    &self.opts.uri,
                    &overlay,
                    &i.path,
                    format_name(i.format),
                    size,
                )?,
                None => self.qemu_img_create(&overlay, Some((&i.path, i.format)), size)?,
            }
            Ok((overlay, "qcow2"))
        };
        let mut edits = Vec::new();
        for i in &images {
            // Any failure removes what the earlier disks got.
            let (file, format) = match make(i) {
                Ok(made) => made,
                Err(e) => {
                    cleanup(&created);
                    return Err(e);
                }
            };
            created.push(file.clone());
            edits.push(xml::DiskEdit {
                target: i.target.clone(),
                source: xml::NewSource::File(file, format),
            });
        }
        let result = self.define_and_start(&src, new, instance, snapshot, &edits);
        if let Err(e) = result {
            cleanup(&created);
            return Err(match e {
                Error::Exists(_)
                | Error::NotSupported(_)
                | Error::Invalid(_)
                | Error::NoSpace(_) => e,
                other => Error::Backend(other.to_string()),
            });
        }
        info!(domain = %new, %instance, %snapshot, "launched");
        Ok(())
    }

    fn forget_launch(&self, name: &str) -> Result<()> {
        let dom = self.domain_named(name)?;
        dom.metadata(
            sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
            Some(xml::LAUNCH_NS),
            0,
        )
        .map_err(|e| lv_err(format!("launch record of {name}"), e))?;
        let mut flags = sys::VIR_DOMAIN_AFFECT_CONFIG;
        if dom.is_active().unwrap_or(false) {
            flags |= sys::VIR_DOMAIN_AFFECT_LIVE;
        }
        dom.set_metadata(
            sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
            None,
            None,
            Some(xml::LAUNCH_NS),
            flags,
        )
        .map_err(|e| lv_err(format!("removing the launch record of {name}"), e))?;
        info!(domain = %name, "launch record removed");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lvm_names_from_device_mapper_names() {
        assert_eq!(
            lvm_names("nova-6f1c_disk"),
            Some(("nova".into(), "6f1c_disk".into()))
        );
        assert_eq!(
            lvm_names("cinder--volumes-volume--1"),
            Some(("cinder-volumes".into(), "volume-1".into()))
        );
        assert_eq!(lvm_names("nodash"), None);
    }

    #[test]
    fn safe_parts() {
        assert_eq!(safe_part("pre-upgrade"), "pre-upgrade");
        assert_eq!(safe_part("../x/y z"), "_._x_y_z");
        assert_eq!(safe_part(""), "_");
        assert_eq!(safe_part(&"a".repeat(300)).len(), MAX_PART);
    }

    #[test]
    fn fresh_paths_do_not_clobber() {
        let t = tempfile::tempdir().unwrap();
        let a = fresh_image_path(t.path(), "web", "s/1", "vda", "qcow2").unwrap();
        assert_eq!(a.file_name().unwrap(), "web.s_1.vda.qcow2");
        std::fs::write(&a, "x").unwrap();
        let b = fresh_image_path(t.path(), "web", "s/1", "vda", "qcow2").unwrap();
        assert_eq!(b.file_name().unwrap(), "web.s_1.vda-2.qcow2");
    }

    #[test]
    fn quiesce_parses() {
        assert_eq!("require".parse::<Quiesce>(), Ok(Quiesce::Require));
        assert!("maybe".parse::<Quiesce>().is_err());
    }
}

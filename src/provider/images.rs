//! The `images` provider: every `*.qcow2`, `*.raw`, `*.img`, `*.hds` (Parallels) file of a host
//! directory is a volume of pool `basename(dir)`; its snapshots are qcow2 internal snapshots.
//! A subdirectory holding a ploop `DiskDescriptor.xml` is a volume too, whose snapshots are the
//! descriptor's shots (read-only: making ploop snapshots needs Virtuozzo's `ploop` tool).
//!
//! Reads use our own qcow2 reader. Creating and deleting snapshots goes through
//! `qemu-img snapshot`, which takes the image's write lock, so a VM holding the image
//! makes it fail: that is reported as `EBUSY`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::json;
use tracing::{debug, info};

use super::{ObjectInfo, Owner, Provider, SnapDisk, SnapshotInfo, VOLUME_DISK};
use crate::error::{Error, IoContext, Result};
use crate::image::{self, ploop, qcow2, BlockCache, BlockImage, Format};

/// Host file extensions that make a file a volume.
const EXTENSIONS: [&str; 4] = ["qcow2", "raw", "img", "hds"];
/// A backing chain deeper than this is reported, not followed (it is also a loop guard).
const MAX_CHAIN: usize = 64;
/// Snapshots listed per volume (QEMU allows 65,536): each listed one costs about 2.3 KiB per
/// listing (its `SnapshotInfo` and `snapshot.json` value, its directory entry), and a listing
/// made on each of the FUSE threads stays in that thread's malloc arena: measured, 8,192
/// snapshots took the daemon to 95 MiB. 4,096 keeps a volume's listings near 40 MiB.
/// volume.json says when a volume has more (`snapshots_listed`).
pub const MAX_LISTED: usize = 4096;

pub struct ImagesProvider {
    pools: Vec<(String, PathBuf)>,
    cache: Arc<BlockCache>,
}

impl ImagesProvider {
    /// One pool per directory, named after its base name; two directories with the same
    /// base name are refused rather than silently merged.
    pub fn new(dirs: &[PathBuf], cache: Arc<BlockCache>) -> Result<Self> {
        let mut pools: Vec<(String, PathBuf)> = Vec::new();
        for dir in dirs {
            let dir = dir
                .canonicalize()
                .ctx(|| format!("images directory {}", dir.display()))?;
            if !dir.is_dir() {
                return Err(Error::Invalid(format!(
                    "{} is not a directory",
                    dir.display()
                )));
            }
            let name = dir
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| {
                    Error::Invalid(format!("{} has no usable base name", dir.display()))
                })?
                .to_string();
            if let Some((_, other)) = pools.iter().find(|(n, _)| *n == name) {
                return Err(Error::Invalid(format!(
                    "pool name {name} would be both {} and {}",
                    other.display(),
                    dir.display()
                )));
            }
            info!(pool = %name, dir = %dir.display(), "images pool");
            pools.push((name, dir));
        }
        Ok(ImagesProvider { pools, cache })
    }

    /// One pool with a given name (a libvirt storage pool's), not the directory's base name.
    pub fn named(pool: &str, dir: &Path, cache: Arc<BlockCache>) -> Self {
        ImagesProvider {
            pools: vec![(pool.to_string(), dir.to_path_buf())],
            cache,
        }
    }

    fn pool_dir(&self, pool: &str) -> Result<&Path> {
        self.pools
            .iter()
            .find(|(n, _)| n == pool)
            .map(|(_, d)| d.as_path())
            .ok_or_else(|| Error::NotFound(format!("pool {pool}")))
    }

    /// The host file behind a volume, checked to be one of the pool's volumes.
    fn volume_path(&self, owner: &Owner) -> Result<PathBuf> {
        let Owner::Volume { pool, name } = owner else {
            return Err(Error::NotFound(owner.to_string()));
        };
        let dir = self.pool_dir(pool)?;
        let path = dir.join(name);
        if is_ploop_volume(&path, name) {
            return Ok(path);
        }
        if !is_volume_name(name) {
            return Err(Error::NotFound(owner.to_string()));
        }
        match std::fs::metadata(&path) {
            Ok(m) if m.is_file() => Ok(path),
            Ok(_) => Err(Error::NotFound(owner.to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(Error::NotFound(owner.to_string()))
            }
            Err(e) => Err(Error::io(format!("stat {}", path.display()), e)),
        }
    }

    fn qemu_img_snapshot(&self, op: &str, arg: &str, path: &Path) -> Result<()> {
        let started = std::time::Instant::now();
        // A snapshot name in the internal form goes to qemu-img as the bytes it stands for.
        let arg_bytes = crate::namespace::names::to_bytes(arg);
        // qemu-img resolves a relative external data file name against its working directory.
        let out = Command::new("qemu-img")
            .args(["snapshot", op])
            .arg(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&arg_bytes))
            .arg(path)
            .current_dir(path.parent().unwrap_or(Path::new("/")))
            .output()
            .ctx(|| "running qemu-img (is qemu-utils installed?)".to_string())?;
        debug!(op, arg, path = %path.display(), ms = started.elapsed().as_millis() as u64, "qemu-img snapshot");
        if out.status.success() {
            return Ok(());
        }
        let msg = String::from_utf8_lossy(&out.stderr).trim().to_string();
        let what = format!(
            "qemu-img snapshot {op} {} {}: {}",
            crate::log_limit::esc(&arg_bytes),
            path.display(),
            crate::log_limit::esc_str(&msg)
        );
        Err(classify_qemu_img_error(&msg, what))
    }

    fn snapshot_list(&self, path: &Path) -> Result<Vec<qcow2::SnapshotEntry>> {
        if image::probe_format(path)? != Format::Qcow2 {
            return Ok(Vec::new());
        }
        let info = qcow2::inspect(path)?;
        let scope = path.display().to_string();
        let mut seen = std::collections::HashSet::new();
        let (mut dups, mut long, mut more) = (0u64, 0u64, 0u64);
        let mut out = Vec::new();
        for s in info.snapshots.iter() {
            if out.len() >= MAX_LISTED {
                more += 1;
            } else if s.name_len > crate::namespace::names::NAME_MAX {
                // Cannot be a file name (only its first bytes were even kept).
                long += 1;
            } else if !seen.insert(s.name.clone()) {
                // qcow2 allows two snapshots with one name; the first is the one a name reaches.
                dups += 1;
            } else {
                out.push(s.clone());
            }
        }
        if more > 0 {
            crate::input_warn!(
                &scope,
                "{} snapshots: only the first {MAX_LISTED} are listed",
                info.snapshots.len()
            );
        }
        if dups + long > 0 {
            crate::input_warn!(
                &scope,
                "{dups} snapshots hidden behind an earlier one of the same name, {long} with a \
                 name longer than 255 bytes hidden"
            );
        }
        Ok(out)
    }
}

/// A subdirectory with a ploop descriptor (`name` is its entry in the pool directory).
fn is_ploop_volume(path: &Path, name: &str) -> bool {
    !name.contains('/') && name != "." && name != ".." && ploop::is_ploop_dir(path)
}

/// ENOTSUP for a change to a ploop disk, said once in the log with the reason.
fn ploop_read_only(owner: &Owner, what: &str) -> Error {
    crate::input_warn!(
        &owner.to_string(),
        "{what}: ploop snapshots are read-only here (making and deleting them needs Virtuozzo's ploop tool, which Debian does not ship)"
    );
    Error::NotSupported(format!(
        "{what} of ploop disk {owner}: needs Virtuozzo's ploop tool"
    ))
}

/// The snapshots of a ploop disk, from its descriptor: one per shot but the live top.
fn ploop_snapshots(dir: &Path) -> Result<Vec<SnapshotInfo>> {
    let desc = ploop::Descriptor::read(dir)?;
    let mut out = Vec::new();
    for shot in desc.snapshots() {
        let chain = desc.chain(&shot.guid);
        let delta = chain
            .as_ref()
            .ok()
            .and_then(|c| c.last())
            .map(|d| d.file.clone());
        // A ploop delta stops changing when a snapshot freezes it: its mtime is that moment.
        let created = delta
            .as_ref()
            .and_then(|f| std::fs::metadata(dir.join(f)).ok())
            .and_then(|m| m.modified().ok())
            .unwrap_or(UNIX_EPOCH);
        let name = ploop::snapshot_name(&shot.guid);
        let j = json!({
            "id": shot.guid,
            "name": name,
            "created": super::rfc3339(created),
            "quiesced": serde_json::Value::Null,
            "memory": false,
            "parent": shot.parent.as_deref().map(ploop::snapshot_name),
            "virtual_size": desc.size,
            "chain": chain.as_ref().map(|c| c.iter().map(|d| d.file.clone()).collect::<Vec<_>>()).ok(),
            "error": chain.as_ref().err().map(|e| e.to_string()),
            "disks": [{ "target": VOLUME_DISK, "format": "ploop", "source": dir.display().to_string(), "size": desc.size }],
        });
        out.push(SnapshotInfo {
            name,
            id: shot.guid.clone(),
            created,
            disks: vec![SnapDisk {
                target: VOLUME_DISK.into(),
                size: desc.size,
            }],
            json: Arc::new(j),
        });
    }
    Ok(out)
}

fn ploop_info(dir: &Path, j: &mut serde_json::Value) {
    match ploop::Descriptor::read(dir) {
        Ok(d) => {
            j["format"] = json!("ploop");
            j["virtual_size"] = json!(d.size);
            j["ploop"] = json!({
                "top": d.top,
                "deltas": d.deltas.iter().map(|x| json!({"guid": x.guid, "file": x.file})).collect::<Vec<_>>(),
            });
            j["snapshots"] = json!(d.snapshots().count());
        }
        Err(e) => j["error"] = json!(e.to_string()),
    }
}

fn is_volume_name(name: &str) -> bool {
    !name.contains('/')
        && Path::new(name)
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| EXTENSIONS.contains(&e))
}

/// Map qemu-img's English error text onto the refusals SPEC.md names.
fn classify_qemu_img_error(stderr: &str, what: String) -> Error {
    let lower = stderr.to_ascii_lowercase();
    if lower.contains("lock") {
        Error::Busy(what)
    } else if lower.contains("no space") || lower.contains("quota") {
        Error::NoSpace(what)
    } else if lower.contains("not supported") {
        Error::NotSupported(what)
    } else if lower.contains("already exists") {
        Error::Exists(what)
    } else if lower.contains("not found") || lower.contains("can't find") {
        Error::NotFound(what)
    } else {
        Error::Backend(what)
    }
}

/// A snapshot id or name (internal form) for JSON: as it is when UTF-8, else escaped.
fn shown(internal: &str) -> String {
    let bytes = crate::namespace::names::to_bytes(internal);
    match std::str::from_utf8(&bytes) {
        Ok(s) => s.to_string(),
        Err(_) => crate::log_limit::esc(&bytes),
    }
}

fn snapshot_time(s: &qcow2::SnapshotEntry) -> SystemTime {
    UNIX_EPOCH + Duration::new(u64::from(s.date_sec), s.date_nsec.min(999_999_999))
}

/// The backing chain below `path`, top first (excluding `path` itself).
fn backing_chain(path: &Path) -> Vec<serde_json::Value> {
    let mut chain = Vec::new();
    let mut cur = path.to_path_buf();
    for _ in 0..MAX_CHAIN {
        let Ok(Format::Qcow2) = image::probe_format(&cur) else {
            break;
        };
        let Ok(info) = qcow2::inspect(&cur) else {
            break;
        };
        let Some(next) = info.backing_path else {
            break;
        };
        let format = info
            .backing_format
            .clone()
            .or_else(|| {
                image::probe_format(&next)
                    .ok()
                    .map(|f| format!("{f:?}").to_lowercase())
            })
            .unwrap_or_else(|| "unknown".into());
        chain.push(json!({ "path": next.display().to_string(), "format": format }));
        cur = next;
    }
    chain
}

impl Provider for ImagesProvider {
    fn kind(&self) -> &'static str {
        "images"
    }

    fn pools(&self) -> Result<Vec<String>> {
        Ok(self.pools.iter().map(|(n, _)| n.clone()).collect())
    }

    fn volumes(&self, pool: &str) -> Result<Vec<String>> {
        let dir = self.pool_dir(pool)?;
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).ctx(|| format!("listing {}", dir.display()))? {
            let entry = entry.ctx(|| format!("listing {}", dir.display()))?;
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                crate::input_warn!(
                    &dir.display().to_string(),
                    "skipping non-UTF-8 file name {}",
                    crate::log_limit::esc(std::os::unix::ffi::OsStrExt::as_bytes(
                        entry.file_name().as_os_str()
                    ))
                );
                continue;
            };
            if is_ploop_volume(&entry.path(), &name) {
                out.push(name);
                continue;
            }
            if !is_volume_name(&name) {
                continue;
            }
            // Follows symlinks: a link to an image is a volume too.
            if std::fs::metadata(entry.path()).is_ok_and(|m| m.is_file()) {
                out.push(name);
            }
        }
        out.sort();
        Ok(out)
    }

    fn info(&self, owner: &Owner) -> Result<ObjectInfo> {
        let path = self.volume_path(owner)?;
        let meta = std::fs::metadata(&path).ctx(|| format!("stat {}", path.display()))?;
        let mtime = meta.modified().unwrap_or(UNIX_EPOCH);
        let Owner::Volume { pool, name } = owner else {
            return Err(Error::NotFound(owner.to_string()));
        };
        if meta.is_dir() {
            let mut j = json!({ "pool": pool, "name": name, "path": path.display().to_string(),
                                "modified": super::rfc3339(mtime) });
            ploop_info(&path, &mut j);
            return Ok(ObjectInfo { json: j, mtime });
        }
        let format = image::probe_format(&path)?;
        let mut j = json!({
            "pool": pool,
            "name": name,
            "path": path.display().to_string(),
            "format": format,
            "file_size": meta.len(),
            "actual_size": std::os::unix::fs::MetadataExt::blocks(&meta) * 512,
            "modified": super::rfc3339(mtime),
        });
        match format {
            Format::Raw => {
                j["virtual_size"] = json!(meta.len());
                j["backing_chain"] = json!([]);
                j["snapshots"] = json!(0);
            }
            Format::Parallels => match image::parallels::ParallelsImage::open(&path, None) {
                Ok(img) => {
                    j["virtual_size"] = json!(img.size());
                    j["parallels"] = json!({
                        "cluster_size": img.header().cluster_size(),
                        "in_use": img.header().in_use,
                    });
                    j["backing_chain"] = json!([]);
                    j["snapshots"] = json!(0);
                }
                Err(e) => j["error"] = json!(e.to_string()),
            },
            Format::Qcow2 => match qcow2::inspect(&path) {
                Ok(info) => {
                    j["virtual_size"] = json!(info.virtual_size);
                    j["qcow2"] = json!({
                        "version": info.version,
                        "cluster_size": info.cluster_size,
                        "compression": info.compression,
                        "extended_l2": info.extended_l2,
                        "data_file": info.data_file,
                        "dirty": info.dirty,
                    });
                    j["backing_chain"] = json!(backing_chain(&path));
                    j["snapshots"] = json!(info.snapshots.len());
                    if info.snapshots.len() > MAX_LISTED {
                        j["snapshots_listed"] = json!(MAX_LISTED);
                    }
                    if !info.damaged.is_empty() {
                        // QEMU would refuse to open this image; the snapshots are still served.
                        j["damaged"] = json!(info.damaged);
                    }
                }
                // volume.json stays readable for a corrupt image; the error is the answer.
                Err(e) => j["error"] = json!(e.to_string()),
            },
        }
        Ok(ObjectInfo { json: j, mtime })
    }

    fn storage_keys(&self, owner: &Owner) -> Result<Vec<String>> {
        Ok(vec![super::file_key(&self.volume_path(owner)?)])
    }

    fn snapshots(&self, owner: &Owner) -> Result<Vec<SnapshotInfo>> {
        let path = self.volume_path(owner)?;
        if path.is_dir() {
            return ploop_snapshots(&path);
        }
        let list = self.snapshot_list(&path)?;
        Ok(list
            .into_iter()
            .map(|s| {
                let created = snapshot_time(&s);
                let disks = vec![SnapDisk {
                    target: VOLUME_DISK.into(),
                    size: s.virtual_size,
                }];
                let j = json!({
                    "id": shown(&s.id),
                    "name": shown(&s.name),
                    "created": super::rfc3339(created),
                    "quiesced": serde_json::Value::Null,
                    "memory": s.vm_state_size > 0,
                    "vm_state_size": s.vm_state_size,
                    "vm_clock_nsec": s.vm_clock_nsec,
                    "parent": serde_json::Value::Null,
                    "virtual_size": s.virtual_size,
                    "disks": [{ "target": VOLUME_DISK, "format": "qcow2", "source": path.display().to_string(), "size": s.virtual_size }],
                });
                SnapshotInfo {
                    name: s.name,
                    id: s.id,
                    created,
                    disks,
                    json: Arc::new(j),
                }
            })
            .collect())
    }

    fn create_snapshot(&self, owner: &Owner, name: &str) -> Result<()> {
        let path = self.volume_path(owner)?;
        if path.is_dir() {
            return Err(ploop_read_only(owner, "creating a snapshot"));
        }
        let format = image::probe_format(&path)?;
        if format != Format::Qcow2 {
            return Err(Error::NotSupported(format!(
                "{owner} is a {format:?} image: only qcow2 images have internal snapshots"
            )));
        }
        if name.is_empty() || name.len() > 255 {
            return Err(Error::Invalid(format!("snapshot name {name:?}")));
        }
        self.qemu_img_snapshot("-c", name, &path)
    }

    fn delete_snapshot(&self, owner: &Owner, name: &str) -> Result<()> {
        let path = self.volume_path(owner)?;
        if path.is_dir() {
            return Err(ploop_read_only(owner, "deleting a snapshot"));
        }
        if !self.snapshot_list(&path)?.iter().any(|s| s.name == name) {
            return Err(Error::NotFound(format!("snapshot {name} of {owner}")));
        }
        // qemu-img -d looks its argument up by name, first match: the one our tree shows.
        self.qemu_img_snapshot("-d", name, &path)
    }

    /// qcow2 keeps no lineage; a ploop descriptor keeps its own (ParentGUID).
    fn records_lineage(&self, owner: &Owner) -> bool {
        self.volume_path(owner).is_ok_and(|p| !p.is_dir())
    }

    /// `qemu-img snapshot -a`: the image's active state becomes the snapshot's (it takes the
    /// image's write lock, so a VM holding the image makes it EBUSY).
    fn revert_snapshot(&self, owner: &Owner, snap: &SnapshotInfo) -> Result<()> {
        let path = self.volume_path(owner)?;
        if path.is_dir() {
            return Err(ploop_read_only(owner, "reverting"));
        }
        if image::probe_format(&path)? != Format::Qcow2 {
            return Err(Error::NotSupported(format!(
                "{owner}: only qcow2 images have snapshots to revert to"
            )));
        }
        // -a looks its argument up by id first, then by name: the id is unambiguous.
        self.qemu_img_snapshot("-a", &snap.id, &path)
    }

    /// `qemu-img snapshot -a` copies the snapshot's L1 table over the active one: the revert
    /// happened iff the active L1 table names the snapshot's L2 tables (see
    /// [`qcow2::active_is_snapshot`]).
    fn reverted_to(&self, owner: &Owner, snap: &SnapshotInfo) -> Result<Option<bool>> {
        let path = self.volume_path(owner)?;
        if path.is_dir() || image::probe_format(&path)? != Format::Qcow2 {
            return Ok(None);
        }
        qcow2::active_is_snapshot(&path, &snap.id).map(Some)
    }

    fn open_disk(
        &self,
        owner: &Owner,
        snap: &SnapshotInfo,
        target: &str,
    ) -> Result<Arc<dyn BlockImage>> {
        if target != VOLUME_DISK {
            return Err(Error::NotFound(format!("disk {target} of {owner}")));
        }
        let path = self.volume_path(owner)?;
        if path.is_dir() {
            let desc = ploop::Descriptor::read(&path)?;
            return ploop::open(&path, &desc, &snap.id);
        }
        image::open(&path, Some(Format::Qcow2), Some(&snap.name), &self.cache)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_names() {
        assert!(is_volume_name("a.qcow2"));
        assert!(is_volume_name("b.raw"));
        assert!(is_volume_name("c.img"));
        assert!(is_volume_name("e.hds"));
        assert!(!is_volume_name("d.qcow2.data"));
        assert!(!is_volume_name("qcow2"));
        assert!(!is_volume_name("x/y.raw"));
    }

    #[test]
    fn qemu_img_errors_map_to_refusals() {
        let e = classify_qemu_img_error(
            "qemu-img: Could not open 'x': Failed to get \"write\" lock",
            "x".into(),
        );
        assert_eq!(e.errno(), libc::EBUSY);
        let e = classify_qemu_img_error("No space left on device", "x".into());
        assert_eq!(e.errno(), libc::ENOSPC);
        let e = classify_qemu_img_error("something else", "x".into());
        assert_eq!(e.errno(), libc::EIO);
    }
}

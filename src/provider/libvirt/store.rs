//! The copy snapshot method and snapfs's own snapshot store.
//!
//! A cloud-managed domain (see [`super::managed`]) must not change when it is snapshotted:
//! no new overlay as its active disk, no libvirt snapshot or checkpoint metadata. So the
//! snapshot's data is copied into the store instead:
//!
//! - running domain: freeze (the quiesce policy), `virDomainBackupBegin` in push mode to a
//!   fresh qcow2 per disk in the store (QEMU's copy-before-write filter holds the point in
//!   time from that instant), thaw, then wait for the backup job to complete. The guest is
//!   frozen only for the backup start, never for the copy.
//! - shut-off domain: each disk's chain is read with our own reader and written sparse
//!   (`<target>.raw`); the domain must still be shut off afterwards, or the copy is dropped.
//!
//! Layout: `<store>/<domain-uuid>/<id>/` holds `meta.json` and one image per disk. A
//! snapshot is written as `<domain-uuid>/.part-<id>/` (with `job.json` naming the daemon)
//! and renamed to `<id>` once complete; a removal renames it to `.del-<id>` first. Dot
//! directories are never listed; start-up ([`Store::recover`]) aborts a backup job left on
//! a domain by a killed daemon (only one whose target is in that `.part-` directory) and
//! removes the directory.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tracing::{debug, info, warn};

use super::xml::{self, DiskSource};
use super::{format_name, lv_err, state_name, LibvirtProvider};
use crate::error::{Error, IoContext, Result};
use crate::image::{self, Format};
use crate::libvirt::{sys, Connect, Domain, JobType, JOB_OPERATION_BACKUP};
use crate::namespace::registry::lock;
use crate::provider::{Owner, SnapDisk, SnapshotInfo};

const META: &str = "meta.json";
const JOB: &str = "job.json";
const PART: &str = ".part-";
const DEL: &str = ".del-";
/// Prefix of a store snapshot's id in `SnapshotInfo`.
pub const ID_PREFIX: &str = "store:";
/// How often the backup job is polled (doubling up to the maximum).
const POLL_FIRST: Duration = Duration::from_millis(10);
const POLL_MAX: Duration = Duration::from_millis(200);

/// `meta.json` of a store snapshot.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Meta {
    pub name: String,
    /// Seconds since the epoch.
    pub created: u64,
    pub quiesced: bool,
    /// `copy`.
    pub method: String,
    /// `backup` (running domain, libvirt push backup) or `read` (shut off, our reader).
    pub via: String,
    pub domain: String,
    pub uuid: String,
    pub disks: Vec<MetaDisk>,
    /// Freeze sent → thaw returned, when frozen.
    pub stall_ms: Option<u64>,
    /// mkdir to complete.
    pub copy_ms: u64,
    #[serde(default)]
    pub managed_by: Option<Value>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MetaDisk {
    pub target: String,
    /// File name inside the snapshot's directory.
    pub file: String,
    /// `qcow2` or `raw`.
    pub format: String,
    pub size: u64,
    /// The disk's source when the snapshot was taken.
    pub source: String,
    /// The disk's data is in Ceph, not in `file` (`--store-pool`, `--managed-rbd`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rbd: Option<RbdRef>,
    /// The disk's data is an LVM snapshot (`--lvm-snapshots`), not `file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lvm: Option<super::lvm::LvRef>,
}

/// An RBD snapshot that holds a store snapshot's disk: `pool[/namespace]/image@snap`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RbdRef {
    pub pool: String,
    /// RBD namespace ("" = the pool's default one).
    #[serde(default)]
    pub namespace: String,
    pub image: String,
    pub snap: String,
    /// The image is the store's own (a copy in `--store-pool`): removing the snapshot removes
    /// the image. Otherwise only the snapshot is ours (on the cloud's image, keep-snapshot).
    #[serde(default)]
    pub owned: bool,
}

impl RbdRef {
    /// `pool[/namespace]/image`, as the rbd CLI spells it.
    pub fn image_spec(&self) -> String {
        if self.namespace.is_empty() {
            format!("{}/{}", self.pool, self.image)
        } else {
            format!("{}/{}/{}", self.pool, self.namespace, self.image)
        }
    }

    pub fn spec(&self) -> String {
        format!("{}@{}", self.image_spec(), self.snap)
    }
}

/// What a snapshot under way has made (or is about to make) in Ceph, for each RBD disk:
/// the snapshot on the source image and, when copied, the store image. Written to `job.json`
/// before either exists, so a restart can remove them.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RbdStep {
    /// The snapshot on the source image (None: already gone, as in a removal).
    #[serde(default)]
    pub source: Option<RbdRef>,
    #[serde(default)]
    pub copy: Option<RbdRef>,
}

#[derive(Serialize, Deserialize)]
struct Job {
    pid: u32,
    uuid: String,
    domain: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    rbd: Vec<RbdStep>,
    /// LVM snapshots about to be made (`--lvm-snapshots`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    lvm: Vec<super::lvm::LvRef>,
}

/// A hidden store directory whose Ceph objects a previous daemon left: `.part-` (the steps
/// of its job) or `.del-` (the disks of its `meta.json`). Handled once Ceph is reachable.
#[derive(Debug)]
pub struct RbdLeftover {
    pub dir: PathBuf,
    /// Store images and source snapshots of an unfinished mkdir, or the refs of a
    /// half-removed snapshot.
    pub steps: Vec<RbdStep>,
}

/// One complete snapshot in the store.
#[derive(Clone, Debug)]
pub struct StoreSnap {
    pub id: String,
    pub dir: PathBuf,
    pub meta: Meta,
}

impl StoreSnap {
    pub fn disk_path(&self, target: &str) -> Option<(PathBuf, Format)> {
        let d = self.meta.disks.iter().find(|d| d.target == target)?;
        if d.rbd.is_some() {
            return None;
        }
        if let Some(lv) = &d.lvm {
            return Some((lv.device(), Format::Raw));
        }
        Some((self.dir.join(&d.file), Format::parse(&d.format)?))
    }

    /// The RBD snapshot holding disk `target`, when its data is in Ceph.
    pub fn disk_rbd(&self, target: &str) -> Option<&RbdRef> {
        self.meta
            .disks
            .iter()
            .find(|d| d.target == target)
            .and_then(|d| d.rbd.as_ref())
    }

    /// Whether any disk's data is in Ceph.
    pub fn has_rbd(&self) -> bool {
        self.meta.disks.iter().any(|d| d.rbd.is_some())
    }

    pub fn info(&self) -> SnapshotInfo {
        let m = &self.meta;
        let created = UNIX_EPOCH + Duration::from_secs(m.created);
        let disks: Vec<Value> = m
            .disks
            .iter()
            .map(|d| {
                if let Some(r) = &d.rbd {
                    return json!({
                        "target": d.target,
                        "kind": if r.owned { "copy" } else { "rbd" },
                        "source": r.spec(),
                        "format": "raw",
                        "size": d.size,
                        "store_bytes": Value::Null,
                        "copied_from": d.source,
                    });
                }
                if let Some(lv) = &d.lvm {
                    return json!({
                        "target": d.target,
                        "kind": "lvm",
                        "source": lv.device().display().to_string(),
                        "lv": lv.spec(),
                        "format": "raw",
                        "size": d.size,
                        "store_bytes": Value::Null,
                        "copied_from": d.source,
                    });
                }
                let path = self.dir.join(&d.file);
                let allocated = std::fs::metadata(&path)
                    .ok()
                    .map(|md| std::os::unix::fs::MetadataExt::blocks(&md) * 512);
                json!({
                    "target": d.target,
                    "kind": "copy",
                    "source": path.display().to_string(),
                    "format": d.format,
                    "size": d.size,
                    "store_bytes": allocated,
                    "copied_from": d.source,
                })
            })
            .collect();
        let id = format!("{ID_PREFIX}{}", self.id);
        SnapshotInfo {
            name: m.name.clone(),
            id: id.clone(),
            created,
            disks: m
                .disks
                .iter()
                .map(|d| SnapDisk {
                    target: d.target.clone(),
                    size: d.size,
                })
                .collect(),
            json: Arc::new(json!({
                "id": id,
                "name": m.name,
                "created": crate::provider::rfc3339(created),
                "quiesced": m.quiesced,
                "memory": false,
                "state": "disk-snapshot",
                "parent": Value::Null,
                "description": Value::Null,
                "method": m.method,
                "via": m.via,
                "stall_ms": m.stall_ms,
                "copy_ms": m.copy_ms,
                "managed_by": m.managed_by,
                "disks": disks,
            })),
        }
    }
}

/// The store directory (`--store`).
pub struct Store {
    dir: PathBuf,
    /// Domains with a copy under way in this daemon.
    busy: Mutex<std::collections::HashSet<String>>,
}

fn fsync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

fn read_meta(dir: &Path) -> Result<Meta> {
    let p = dir.join(META);
    let b = std::fs::read(&p).ctx(|| format!("reading {}", p.display()))?;
    serde_json::from_slice(&b).map_err(|e| Error::Backend(format!("{}: {e}", p.display())))
}

/// A snapshot being written: removed on drop unless committed.
pub struct Part<'a> {
    store: &'a Store,
    uuid: String,
    domain: String,
    id: String,
    pub dir: PathBuf,
    done: bool,
}

impl Part<'_> {
    /// Make it a snapshot: `meta.json` and the images synced, the directory renamed.
    pub(super) fn commit(mut self, meta: &Meta) -> Result<StoreSnap> {
        for d in meta
            .disks
            .iter()
            .filter(|d| d.rbd.is_none() && d.lvm.is_none())
        {
            let p = self.dir.join(&d.file);
            std::fs::File::open(&p)
                .and_then(|f| f.sync_all())
                .ctx(|| format!("syncing {}", p.display()))?;
        }
        let body = serde_json::to_vec_pretty(meta)
            .map_err(|e| Error::Backend(format!("encoding {META}: {e}")))?;
        super::freeze::write_record_file(&self.dir, META, &body)?;
        let _ = std::fs::remove_file(self.dir.join(JOB));
        let final_dir = self.store.domain_dir(&self.uuid).join(&self.id);
        std::fs::rename(&self.dir, &final_dir)
            .ctx(|| format!("renaming {} into place", self.dir.display()))?;
        fsync_dir(&self.store.domain_dir(&self.uuid));
        self.done = true;
        Ok(StoreSnap {
            id: self.id.clone(),
            dir: final_dir,
            meta: meta.clone(),
        })
    }
}

impl Part<'_> {
    /// The snapshot's id (unique in the store).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Record the Ceph objects this snapshot is about to make (synced before they exist).
    pub fn record_rbd(&self, steps: &[RbdStep]) -> Result<()> {
        let job = Job {
            pid: std::process::id(),
            uuid: self.uuid.clone(),
            domain: self.domain.clone(),
            rbd: steps.to_vec(),
            lvm: Vec::new(),
        };
        let body =
            serde_json::to_vec(&job).map_err(|e| Error::Backend(format!("encoding {JOB}: {e}")))?;
        super::freeze::write_record_file(&self.dir, JOB, &body)
    }

    /// Record the LVM snapshots this snapshot is about to make (synced before they exist).
    pub fn record_lvm(&self, snaps: &[super::lvm::LvRef]) -> Result<()> {
        let job = Job {
            pid: std::process::id(),
            uuid: self.uuid.clone(),
            domain: self.domain.clone(),
            rbd: Vec::new(),
            lvm: snaps.to_vec(),
        };
        let body =
            serde_json::to_vec(&job).map_err(|e| Error::Backend(format!("encoding {JOB}: {e}")))?;
        super::freeze::write_record_file(&self.dir, JOB, &body)
    }
}

impl Drop for Part<'_> {
    fn drop(&mut self) {
        if !self.done {
            match std::fs::remove_dir_all(&self.dir) {
                Ok(()) => debug!(dir = %self.dir.display(), "incomplete store snapshot removed"),
                Err(e) => {
                    warn!(dir = %self.dir.display(), error = %e, "cannot remove an incomplete store snapshot (the next start removes it)")
                }
            }
        }
    }
}

/// Marks a domain busy for the life of the guard.
pub(super) struct Busy<'a>(&'a Store, String);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        lock(&self.0.busy).remove(&self.1);
    }
}

impl Store {
    pub fn new(dir: &Path) -> Result<Store> {
        std::fs::create_dir_all(dir).ctx(|| format!("creating store {}", dir.display()))?;
        Ok(Store {
            dir: dir.to_path_buf(),
            busy: Mutex::new(Default::default()),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn domain_dir(&self, uuid: &str) -> PathBuf {
        self.dir.join(super::safe_part(uuid))
    }

    /// Where launched clones of store snapshots keep their overlays.
    pub fn launch_dir(&self) -> Result<PathBuf> {
        let d = self.dir.join("launch");
        std::fs::create_dir_all(&d).ctx(|| format!("creating {}", d.display()))?;
        Ok(d)
    }

    /// Complete snapshots of a domain, oldest first.
    pub fn list(&self, uuid: &str) -> Vec<StoreSnap> {
        let dir = self.domain_dir(uuid);
        let Ok(rd) = std::fs::read_dir(&dir) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for e in rd.flatten() {
            let id = e.file_name().to_string_lossy().into_owned();
            if id.starts_with('.') {
                continue;
            }
            match read_meta(&e.path()) {
                Ok(meta) => out.push(StoreSnap {
                    id,
                    dir: e.path(),
                    meta,
                }),
                Err(err) => {
                    warn!(dir = %e.path().display(), error = %err, "skipping an unreadable store snapshot")
                }
            }
        }
        out.sort_by(|a, b| (a.meta.created, &a.meta.name).cmp(&(b.meta.created, &b.meta.name)));
        out
    }

    pub fn find(&self, uuid: &str, name: &str) -> Option<StoreSnap> {
        self.list(uuid).into_iter().find(|s| s.meta.name == name)
    }

    pub(super) fn claim(&self, uuid: &str, owner: &Owner) -> Result<Busy<'_>> {
        if !lock(&self.busy).insert(uuid.to_string()) {
            return Err(Error::Busy(format!(
                "a copy snapshot of {owner} is already in progress"
            )));
        }
        Ok(Busy(self, uuid.to_string()))
    }

    /// How every store snapshot starts (a copy, RBD store snapshots, LVM snapshots): the
    /// domain's name and uuid, `EEXIST` for a name the domain already has in the store, and
    /// the claim that keeps a second store snapshot of the domain out until this one ends.
    pub(super) fn start_snapshot(
        &self,
        dom: &Domain,
        owner: &Owner,
        name: &str,
    ) -> Result<(String, String, Busy<'_>)> {
        let dom_name = dom.name().map_err(|e| lv_err("domain name", e))?;
        let uuid = dom.uuid_string().map_err(|e| lv_err("domain uuid", e))?;
        if self.find(&uuid, name).is_some() {
            return Err(Error::Exists(format!("snapshot {name} of {owner}")));
        }
        let busy = self.claim(&uuid, owner)?;
        Ok((dom_name, uuid, busy))
    }

    pub(super) fn begin(&self, uuid: &str, domain: &str) -> Result<Part<'_>> {
        static N: AtomicU64 = AtomicU64::new(0);
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        let id = format!(
            "{ms:x}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let ddir = self.domain_dir(uuid);
        std::fs::create_dir_all(&ddir).ctx(|| format!("creating {}", ddir.display()))?;
        let dir = ddir.join(format!("{PART}{id}"));
        std::fs::create_dir(&dir).ctx(|| format!("creating {}", dir.display()))?;
        let part = Part {
            store: self,
            domain: domain.to_string(),
            uuid: uuid.to_string(),
            id,
            dir,
            done: false,
        };
        let job = Job {
            pid: std::process::id(),
            uuid: uuid.to_string(),
            domain: domain.to_string(),
            rbd: Vec::new(),
            lvm: Vec::new(),
        };
        let body = serde_json::to_vec(&job).unwrap_or_default();
        super::freeze::write_record_file(&part.dir, JOB, &body)?;
        fsync_dir(&ddir);
        Ok(part)
    }

    /// Remove a snapshot: renamed out of sight first, so a crash never shows half of it.
    pub fn remove(&self, snap: &StoreSnap) -> Result<()> {
        let gone = self.hide(snap)?;
        Self::purge(&gone)
    }

    /// First step of a removal: the snapshot renamed to `.del-<id>` (no longer listed).
    pub fn hide(&self, snap: &StoreSnap) -> Result<PathBuf> {
        let parent = snap.dir.parent().unwrap_or(&self.dir);
        let gone = parent.join(format!("{DEL}{}", snap.id));
        std::fs::rename(&snap.dir, &gone).ctx(|| format!("removing {}", snap.dir.display()))?;
        fsync_dir(parent);
        Ok(gone)
    }

    /// Undo [`Self::hide`] (the removal of its Ceph objects failed).
    pub fn unhide(&self, hidden: &Path, snap: &StoreSnap) -> Result<()> {
        std::fs::rename(hidden, &snap.dir).ctx(|| format!("restoring {}", snap.dir.display()))?;
        fsync_dir(snap.dir.parent().unwrap_or(&self.dir));
        Ok(())
    }

    /// Last step of a removal: the hidden directory deleted.
    pub fn purge(hidden: &Path) -> Result<()> {
        std::fs::remove_dir_all(hidden).ctx(|| format!("removing {}", hidden.display()))
    }

    /// Hidden directories a previous daemon left with Ceph objects to remove (see
    /// [`Self::recover`], which leaves them for this): `.part-` with RBD steps in its job,
    /// `.del-` with RBD disks in its `meta.json`. Directories of a live snapfs are skipped.
    pub fn rbd_leftovers(&self) -> Vec<RbdLeftover> {
        let mut out = Vec::new();
        let Ok(domains) = std::fs::read_dir(&self.dir) else {
            return out;
        };
        for d in domains.flatten() {
            let Ok(entries) = std::fs::read_dir(d.path()) else {
                continue;
            };
            for e in entries.flatten() {
                if let Some(steps) = rbd_steps_of(&e.path()) {
                    out.push(RbdLeftover {
                        dir: e.path(),
                        steps,
                    });
                }
            }
        }
        out
    }

    pub fn rename(&self, snap: &StoreSnap, to: &str) -> Result<()> {
        let mut meta = snap.meta.clone();
        meta.name = to.to_string();
        let body = serde_json::to_vec_pretty(&meta)
            .map_err(|e| Error::Backend(format!("encoding {META}: {e}")))?;
        super::freeze::write_record_file(&snap.dir, META, &body)
    }

    /// At start-up: abort backup jobs a killed daemon left running into the store, and
    /// remove incomplete (`.part-`) and half-removed (`.del-`) snapshots.
    pub fn recover(&self, conn: &Connect) -> usize {
        let Ok(domains) = std::fs::read_dir(&self.dir) else {
            return 0;
        };
        let mut n = 0;
        for d in domains.flatten() {
            let Ok(entries) = std::fs::read_dir(d.path()) else {
                continue;
            };
            for e in entries.flatten() {
                let file = e.file_name().to_string_lossy().into_owned();
                if !file.starts_with(PART) && !file.starts_with(DEL) {
                    continue;
                }
                let job: Option<Job> = std::fs::read(e.path().join(JOB))
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok());
                if let Some(j) = &job {
                    if j.pid != std::process::id() && snapfs_alive(j.pid) {
                        info!(dir = %e.path().display(), pid = j.pid, "copy of a running snapfs daemon: left alone");
                        continue;
                    }
                }
                if rbd_steps_of(&e.path()).is_some() {
                    // Its Ceph objects go first: done once Ceph is reachable (rbd_leftovers).
                    info!(dir = %e.path().display(), "incomplete store snapshot with RBD images or snapshots: removed once Ceph is reachable (--ceph)");
                    continue;
                }
                if let (Some(j), true) = (&job, file.starts_with(PART)) {
                    abort_our_backup(conn, &j.uuid, &j.domain, &e.path());
                }
                // LVM snapshots of an unfinished mkdir (its job) or of a half-done rmdir.
                let lvs: Vec<super::lvm::LvRef> = if file.starts_with(PART) {
                    job.map(|j| j.lvm).unwrap_or_default()
                } else {
                    read_meta(&e.path())
                        .map(|m| m.disks.into_iter().filter_map(|d| d.lvm).collect())
                        .unwrap_or_default()
                };
                if !lvs.is_empty() {
                    // Already gone is fine (lvcreate never ran, or lvremove did).
                    if let Err(err) = super::lvm::remove_present(&super::lvm::SystemLvm, &lvs) {
                        warn!(dir = %e.path().display(), error = %err, "LVM snapshots of an incomplete store snapshot not removable: kept for the next start");
                        continue;
                    }
                }
                n += 1;
                match std::fs::remove_dir_all(e.path()) {
                    Ok(()) => {
                        info!(dir = %e.path().display(), "incomplete store snapshot of a previous daemon removed")
                    }
                    Err(err) => {
                        warn!(dir = %e.path().display(), error = %err, "cannot remove an incomplete store snapshot")
                    }
                }
            }
        }
        n
    }
}

/// The Ceph objects of a hidden store directory a previous daemon left (None: nothing in
/// Ceph, or the directory belongs to a live snapfs, or it is not hidden).
fn rbd_steps_of(dir: &Path) -> Option<Vec<RbdStep>> {
    let file = dir.file_name()?.to_string_lossy().into_owned();
    let job: Option<Job> = std::fs::read(dir.join(JOB))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    if let Some(j) = &job {
        if j.pid != std::process::id() && snapfs_alive(j.pid) {
            return None;
        }
    }
    let steps: Vec<RbdStep> = if file.starts_with(PART) {
        job?.rbd
    } else if file.starts_with(DEL) {
        // A removal: the refs of its disks; a copy's source snapshot is already gone.
        read_meta(dir)
            .ok()?
            .disks
            .into_iter()
            .filter_map(|d| d.rbd)
            .map(|r| {
                if r.owned {
                    RbdStep {
                        source: None,
                        copy: Some(r),
                    }
                } else {
                    RbdStep {
                        source: Some(r),
                        copy: None,
                    }
                }
            })
            .collect()
    } else {
        return None;
    };
    (!steps.is_empty()).then_some(steps)
}

/// Whether `pid` is a live snapfs process (a killed daemon may linger as a zombie until
/// its parent reaps it: that one is dead).
fn snapfs_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // `pid (comm) state …`; comm may itself contain ") ".
    let Some((head, tail)) = stat.rsplit_once(") ") else {
        return false;
    };
    let comm = head.split_once(" (").map_or("", |(_, c)| c);
    comm == "snapfs" && !matches!(tail.chars().next(), Some('Z' | 'X') | None)
}

/// Abort the backup job on domain `uuid` if it writes into `part` (ours); wait until it is gone.
fn abort_our_backup(conn: &Connect, uuid: &str, name: &str, part: &Path) {
    let Ok(dom) = conn.lookup_domain_by_uuid_string(uuid) else {
        return;
    };
    let Ok(stats) = dom.job_stats(0) else {
        return;
    };
    if matches!(stats.job_type, JobType::None)
        || stats.int("operation") != Some(JOB_OPERATION_BACKUP)
    {
        return;
    }
    let part_s = part.display().to_string();
    match dom.backup_xml_desc() {
        Ok(x) if x.contains(&part_s) => {}
        Ok(_) => {
            info!(domain = %name, "a backup job runs on the domain, but not into our store: left alone");
            return;
        }
        Err(e) => {
            warn!(domain = %name, error = %e, "cannot read the running backup job: left alone");
            return;
        }
    }
    warn!(domain = %name, dir = %part_s, "backup job of a killed daemon still running: aborting it");
    if let Err(e) = dom.abort_job() {
        warn!(domain = %name, error = %e, "cannot abort the backup job");
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        match dom.job_stats(0) {
            Ok(s) if !matches!(s.job_type, JobType::None) => {
                std::thread::sleep(Duration::from_millis(50))
            }
            _ => {
                info!(domain = %name, "backup job aborted");
                return;
            }
        }
    }
    warn!(domain = %name, "backup job still there 30 s after the abort");
}

/// `<domainbackup>` in push mode: each of `disks` to its qcow2 target, the rest excluded.
pub fn backup_request(disks: &[(String, PathBuf)], excluded: &[String]) -> Result<String> {
    Ok(format!(
        "<domainbackup mode='push'>\n{}</domainbackup>\n",
        xml::request_disks(disks, "backup='yes'", "target", excluded, "backup='no'")?
    ))
}

/// Wait for the backup job started on `dom` to end; its outcome from the completed job's
/// statistics.
fn wait_backup(dom: &Domain, owner: &Owner) -> Result<()> {
    let mut pause = POLL_FIRST;
    loop {
        let s = dom
            .job_stats(0)
            .map_err(|e| lv_err(format!("watching the backup job of {owner}"), e))?;
        if matches!(s.job_type, JobType::None) {
            break;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(POLL_MAX);
    }
    let done = dom
        .job_stats(sys::VIR_DOMAIN_JOB_STATS_COMPLETED)
        .map_err(|e| lv_err(format!("reading the backup job result of {owner}"), e))?;
    let op = done.int("operation");
    match done.job_type {
        JobType::Completed if op == Some(JOB_OPERATION_BACKUP) => Ok(()),
        t => Err(Error::Backend(format!(
            "backup job of {owner} ended as {t:?} (operation {op:?}): {}",
            done.string("errmsg").unwrap_or("no error message")
        ))),
    }
}

impl LibvirtProvider {
    /// The copy method: a snapshot in the store, nothing changed on the domain.
    pub(super) fn create_copy_snapshot(
        &self,
        dom: &Domain,
        owner: &Owner,
        name: &str,
        managed_by: Option<Value>,
    ) -> Result<()> {
        let store = self.store()?;
        if let Some(mode) = self.rbd_store_mode() {
            // All data disks RBD images: the copy (or the kept snapshot) lives in Ceph.
            let mut rbd_disks = Vec::new();
            let mut other = None;
            for d in Self::domain_xml(dom, 0)?
                .disks
                .iter()
                .filter(|d| d.is_data_disk())
            {
                match &d.source {
                    DiskSource::Network { protocol, name } if protocol == "rbd" => {
                        let (pool, image) = xml::rbd_pool_image(name)?;
                        rbd_disks.push(super::rbd::RbdDisk {
                            target: d.target.clone(),
                            pool,
                            image,
                        });
                    }
                    _ => other = Some(d.target.clone()),
                }
            }
            match (rbd_disks.is_empty(), other) {
                (false, None) => {
                    return self
                        .create_rbd_store_snapshot(dom, owner, name, managed_by, &rbd_disks, mode)
                }
                (false, Some(t)) => {
                    warn!(%owner, disk = %t, "RBD disks mixed with other disks: the whole domain is copied into the file store")
                }
                _ => {}
            }
        }
        let def = Self::domain_xml(dom, 0)?;
        if let Some(lvs) = self.lvm_origins(&def) {
            // Every data disk an LVM LV (--lvm-snapshots): LVM snapshots, no copy.
            return self.create_lvm_snapshot(dom, owner, name, managed_by, &lvs);
        }
        let started = Instant::now();
        let (dom_name, uuid, _busy) = store.start_snapshot(dom, owner, name)?;
        let (_, active) = state_name(dom)?;
        let mut included = Vec::new();
        let mut excluded = Vec::new();
        for d in &def.disks {
            if d.is_data_disk() {
                included.push(d);
            } else {
                excluded.push(d.target.clone());
            }
        }
        if included.is_empty() {
            return Err(Error::NotSupported(format!("{owner} has no writable disk")));
        }
        let part = store.begin(&uuid, &dom_name)?;
        let mut disks = Vec::new();
        let mut stall_ms = None;
        let quiesced;
        let via;
        if active {
            let targets: Vec<(String, PathBuf)> = included
                .iter()
                .map(|d| {
                    let file = format!("{}.qcow2", super::safe_part(&d.target));
                    (d.target.clone(), part.dir.join(file))
                })
                .collect();
            let req = backup_request(&targets, &excluded)?;
            // The targets are made before the freeze (libvirt would otherwise create them
            // inside backupBegin, with the guest frozen): an empty qcow2 of each disk's size.
            let mut flags = sys::VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL;
            for (d, (_, path)) in included.iter().zip(&targets) {
                match self.disk_size(d) {
                    Some(size) => self.qemu_img_create(path, None, size)?,
                    None => flags = 0,
                }
            }
            if flags == 0 {
                for (_, path) in &targets {
                    let _ = std::fs::remove_file(path);
                }
            }
            let freeze_sent = Instant::now();
            let frozen = self.quiesce(dom, &uuid, &dom_name, owner, true)?;
            quiesced = frozen.is_some();
            let begin_sent = Instant::now();
            let begun = dom.backup_begin(&req, flags);
            let begin_ms = begin_sent.elapsed().as_millis() as u64;
            let thaw_sent = Instant::now();
            let thawed = frozen.map(|f| f.thaw());
            let thaw_ms = thaw_sent.elapsed().as_millis() as u64;
            if quiesced {
                stall_ms = Some(freeze_sent.elapsed().as_millis() as u64);
            }
            begun.map_err(|e| lv_err(format!("starting the backup of {owner}"), e))?;
            info!(%owner, snapshot = %name, quiesced, stall_ms, freeze_ms = (begin_sent - freeze_sent).as_millis() as u64, begin_ms, thaw_ms, "backup job started: copying");
            if let Some(Err(e)) = thawed {
                warn!(%owner, error = %e, "thaw after the backup start failed (snapfs keeps retrying)");
            }
            if let Err(e) = wait_backup(dom, owner) {
                // Never leave our job running on the domain.
                if let Ok(s) = dom.job_stats(0) {
                    if s.int("operation") == Some(JOB_OPERATION_BACKUP) {
                        let _ = dom.abort_job();
                    }
                }
                return Err(e);
            }
            for (d, (_, path)) in included.iter().zip(&targets) {
                let img = image::open(path, Some(Format::Qcow2), None, &self.cache)?;
                disks.push(meta_disk(d, path, "qcow2", img.size()));
            }
            via = "backup";
        } else {
            quiesced = false;
            for d in &included {
                let (DiskSource::File(src) | DiskSource::Block(src)) = &d.source else {
                    return Err(Error::NotSupported(format!(
                        "disk {} of shut-off {owner} is {}: only file and block-device disks are copied into the file store while shut off (RBD disks: --store-pool POOL, or --managed-rbd=keep-snapshot)",
                        d.target,
                        d.source.describe()
                    )));
                };
                let fmt = d.format.as_deref().and_then(Format::parse);
                let img = image::open(src, fmt, None, &self.cache)?;
                let path = part
                    .dir
                    .join(format!("{}.raw", super::safe_part(&d.target)));
                image::copy_sparse(img.as_ref(), &path)?;
                disks.push(meta_disk(d, &path, format_name(Format::Raw), img.size()));
            }
            if dom.is_active().unwrap_or(true) {
                return Err(Error::Busy(format!(
                    "{owner} was started while its disks were being copied: copy dropped"
                )));
            }
            via = "read";
        }
        let meta = Meta {
            name: name.to_string(),
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs(),
            quiesced,
            method: "copy".into(),
            via: via.into(),
            domain: dom_name,
            uuid: uuid.clone(),
            disks,
            stall_ms,
            copy_ms: started.elapsed().as_millis() as u64,
            managed_by,
        };
        let snap = part.commit(&meta)?;
        info!(%owner, snapshot = %name, via, quiesced, stall_ms, copy_ms = meta.copy_ms, dir = %snap.dir.display(), "copy snapshot complete");
        Ok(())
    }
}

impl LibvirtProvider {
    /// rmdir of a store snapshot: EBUSY while a launched domain's chain uses one of its images.
    pub(super) fn delete_store_snapshot(
        &self,
        dom: &Domain,
        owner: &Owner,
        snap: &StoreSnap,
    ) -> Result<()> {
        if snap.has_rbd() {
            return self.delete_store_rbd(owner, snap);
        }
        let uuid = dom.uuid_string().map_err(|e| lv_err("domain uuid", e))?;
        let images: Vec<PathBuf> = snap
            .meta
            .disks
            .iter()
            .map(|d| {
                let p = snap
                    .disk_path(&d.target)
                    .map_or_else(|| snap.dir.join(&d.file), |(p, _)| p);
                super::canonical(&p)
            })
            .collect();
        if let Some(who) = self.dependent_domain(&uuid, &images)? {
            return Err(Error::Busy(format!(
                "snapshot {} of {owner} is used by another domain: {who}",
                snap.meta.name
            )));
        }
        if snap.meta.disks.iter().any(|d| d.lvm.is_some()) {
            return self.delete_store_lvm(owner, snap);
        }
        self.store()?.remove(snap)?;
        info!(%owner, snapshot = %snap.meta.name, "store snapshot removed");
        Ok(())
    }
}

fn meta_disk(d: &xml::Disk, path: &Path, format: &str, size: u64) -> MetaDisk {
    MetaDisk {
        target: d.target.clone(),
        file: path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default(),
        format: format.to_string(),
        size,
        source: d.source.describe(),
        rbd: None,
        lvm: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(name: &str, created: u64) -> Meta {
        Meta {
            name: name.into(),
            created,
            quiesced: true,
            method: "copy".into(),
            via: "read".into(),
            domain: "d".into(),
            uuid: "u".into(),
            disks: vec![MetaDisk {
                target: "vda".into(),
                file: "vda.raw".into(),
                format: "raw".into(),
                size: 4096,
                source: "/x".into(),
                rbd: None,
                lvm: None,
            }],
            stall_ms: None,
            copy_ms: 1,
            managed_by: None,
        }
    }

    #[test]
    fn part_commit_list_rename_remove() {
        let t = tempfile::tempdir().unwrap();
        let s = Store::new(t.path()).unwrap();
        {
            let p = s.begin("u", "d").unwrap();
            std::fs::write(p.dir.join("vda.raw"), [0u8; 4096]).unwrap();
            // Dropped without commit: gone.
        }
        assert!(s.list("u").is_empty());
        assert_eq!(std::fs::read_dir(s.domain_dir("u")).unwrap().count(), 0);
        let p = s.begin("u", "d").unwrap();
        std::fs::write(p.dir.join("vda.raw"), [0u8; 4096]).unwrap();
        let half = s.begin("u", "d").unwrap();
        let half_dir = half.dir.clone();
        std::mem::forget(half);
        p.commit(&meta("s/1 'x'", 5)).unwrap();
        let l = s.list("u");
        assert_eq!(l.len(), 1, "a .part- directory is never listed");
        assert_eq!(l[0].meta.name, "s/1 'x'");
        assert_eq!(l[0].info().json["method"], "copy");
        assert!(l[0].disk_path("vda").unwrap().0.exists());
        s.rename(&l[0], "s2").unwrap();
        let snap = s.find("u", "s2").unwrap();
        assert!(half_dir.exists());
        // The half copy's domain is unknown to the test driver: nothing to abort, removed.
        let c = Connect::open(Some("test:///default")).unwrap();
        assert_eq!(s.recover(&c), 1);
        assert!(!half_dir.exists());
        assert_eq!(s.list("u").len(), 1);
        s.remove(&snap).unwrap();
        assert!(s.list("u").is_empty());
    }

    #[test]
    fn ceph_leftovers_wait_for_ceph() {
        let t = tempfile::tempdir().unwrap();
        let s = Store::new(t.path()).unwrap();
        let r = RbdRef {
            pool: "p".into(),
            namespace: "snapfs".into(),
            image: "u.1.vda".into(),
            snap: "snapfs".into(),
            owned: true,
        };
        let step = RbdStep {
            source: Some(RbdRef {
                pool: "cloud".into(),
                namespace: String::new(),
                image: "vda".into(),
                snap: "snapfs.1".into(),
                owned: false,
            }),
            copy: Some(r.clone()),
        };
        let p = s.begin("u", "d").unwrap();
        p.record_rbd(std::slice::from_ref(&step)).unwrap();
        let part_dir = p.dir.clone();
        std::mem::forget(p);
        // A committed snapshot in Ceph, half removed.
        let p = s.begin("u", "d").unwrap();
        let mut m = meta("s1", 1);
        m.disks[0].rbd = Some(r.clone());
        let snap = p.commit(&m).unwrap();
        assert_eq!(
            snap.info().json["disks"][0]["source"],
            "p/snapfs/u.1.vda@snapfs"
        );
        assert!(snap.disk_path("vda").is_none() && snap.disk_rbd("vda") == Some(&r));
        let hidden = s.hide(&snap).unwrap();
        // Recovery without Ceph leaves both (their Ceph objects go first).
        let c = Connect::open(Some("test:///default")).unwrap();
        assert_eq!(s.recover(&c), 0);
        assert!(part_dir.exists() && hidden.exists());
        let mut l = s.rbd_leftovers();
        l.sort_by(|a, b| a.dir.cmp(&b.dir));
        assert_eq!(l.len(), 2);
        let del = l.iter().find(|x| x.dir == hidden).unwrap();
        assert!(del.steps[0].source.is_none() && del.steps[0].copy.as_ref() == Some(&r));
        let part = l.iter().find(|x| x.dir == part_dir).unwrap();
        assert_eq!(part.steps[0].source, step.source);
        assert!(s.list("u").is_empty());
    }

    #[test]
    fn liveness_of_job_owners() {
        assert!(
            !snapfs_alive(std::process::id()),
            "the test binary is not snapfs"
        );
        assert!(!snapfs_alive(u32::MAX));
    }

    #[test]
    fn backup_request_escapes() {
        let x = backup_request(
            &[("vda".into(), "/s/a'b/vda.qcow2".into())],
            &["hdc".into()],
        )
        .unwrap();
        let doc = roxmltree::Document::parse(&x).unwrap();
        let disks: Vec<_> = doc
            .descendants()
            .filter(|n| n.has_tag_name("disk"))
            .collect();
        assert_eq!(disks[0].attribute("backup"), Some("yes"));
        let target = disks[0]
            .children()
            .find(|c| c.has_tag_name("target"))
            .unwrap();
        assert_eq!(target.attribute("file"), Some("/s/a'b/vda.qcow2"));
        assert_eq!(disks[1].attribute("backup"), Some("no"));
    }
}

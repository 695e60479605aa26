//! RBD-backed instances: domains whose disks are `type='network' protocol='rbd'` (Nova's
//! `rbd` image backend). libvirt cannot snapshot such disks itself, so we do what Nova's
//! "direct snapshot" does:
//!
//! - mkdir: freeze through the agent (same policy as file disks), an RBD snapshot of every
//!   disk named like the instance snapshot, thaw; then a record of the set in the domain's
//!   `<metadata>` (namespace [`xml::RBD_SNAPS_NS`]), which is what makes the RBD snapshots
//!   one instance snapshot in `.snapshots/`. A failure part way removes what was made.
//! - reads: each disk's RBD snapshot through librbd, like `volumes/`.
//! - rmdir: EBUSY while any disk's snapshot has clones; otherwise unprotect + remove each,
//!   then drop the record.
//! - memory (`user.snapfs.memory=on`, running domain): the guest is paused, its CPU and
//!   memory state saved by libvirt into a file in snapfs's store (an external memory snapshot
//!   without libvirt metadata: a save image), the RBD snapshots taken, the guest resumed; disks
//!   and memory are one instant. The record names the file.
//! - revert (`current`): shut-off domains only (`EBUSY` while it runs: RBD snapshots hold no
//!   memory state); every disk must still be the image of the record and have no other client
//!   (`EBUSY`); then `rbd_snap_rollback` of each disk in turn, its rate logged. A memory
//!   snapshot reverts a running domain too: destroyed, rolled back, restored from the state
//!   file, running.
//! - launch: protect each disk's snapshot, `rbd_clone3` it into the disk's pool, define and
//!   start a domain on the clones; with `--flatten-on-launch` the clones are flattened in
//!   the background, after which the snapshot is deletable.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::libvirt::sys;
use crate::libvirt::Connect;
use crate::libvirt::Domain;
use crate::libvirt::ErrorNumber;
use serde_json::json;
use tracing::{debug, info, warn};

use super::xml::{self, RbdSnapDisk, RbdSnapRecord};
use super::{lv_err, safe_part, LibvirtProvider};
use crate::ceph::{Image, Pool, SnapEntry};
use crate::error::{Error, IoContext, Result};
use crate::image::BlockImage;
use crate::provider::rbd::{check_snap_name, refuse_if_watched, RbdAccess};
use crate::provider::{Owner, SnapDisk, SnapshotInfo};

/// One RBD disk of a domain.
#[derive(Clone, Debug)]
pub(super) struct RbdDisk {
    pub target: String,
    pub pool: String,
    pub image: String,
}

/// A disk image opened at its head, with its snapshot list.
type OpenedDisk = (Arc<Pool>, Image, Vec<SnapEntry>);

/// The clone of a launched disk: `<new>-<target>` in the source disk's pool.
pub(super) fn clone_name(new: &str, target: &str, attempt: u32) -> String {
    let base = format!("{}-{}", safe_part(new), safe_part(target));
    if attempt <= 1 {
        base
    } else {
        format!("{base}-{attempt}")
    }
}

/// vCPUs paused while the RBD snapshots of several disks of an unfrozen guest are taken:
/// QEMU drains in-flight I/O when it stops, so the snapshots are one crash-consistent point.
/// A record `<state-dir>/paused/<uuid>` (synced before the pause) lets the next daemon resume
/// a guest this one was killed with; the guard resumes on every way out.
pub(super) struct Paused<'a> {
    dom: &'a Domain,
    record: PathBuf,
    name: String,
    since: Instant,
}

impl Paused<'_> {
    pub(super) fn start<'a>(
        dom: &'a Domain,
        state_dir: &Path,
        uuid: &str,
        name: &str,
    ) -> Result<Paused<'a>> {
        let dir = state_dir.join(PAUSED_DIR);
        std::fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
        let record = dir.join(uuid);
        super::freeze::write_record_file(&dir, uuid, name.as_bytes())?;
        if let Err(e) = dom.suspend() {
            let _ = std::fs::remove_file(&record);
            return Err(lv_err(format!("pausing {name}"), e));
        }
        Ok(Paused {
            dom,
            record,
            name: name.to_string(),
            since: Instant::now(),
        })
    }
}

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        match self.dom.resume() {
            Ok(_) => {
                let _ = std::fs::remove_file(&self.record);
                info!(domain = %self.name, paused_ms = self.since.elapsed().as_millis() as u64, "resumed");
            }
            Err(e) => {
                warn!(domain = %self.name, error = %e.message(), "cannot resume the guest: the record stays for the next start")
            }
        }
    }
}

/// At start-up: resume guests a dead daemon left paused mid-snapshot, per the records.
pub(super) fn recover_paused(state_dir: &Path, conn: &Connect) -> usize {
    let dir = state_dir.join(PAUSED_DIR);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return 0;
    };
    let mut n = 0;
    for e in entries.flatten() {
        n += 1;
        let uuid = e.file_name().to_string_lossy().into_owned();
        if let Ok(dom) = conn.lookup_domain_by_uuid_string(&uuid) {
            let paused = dom
                .info()
                .is_ok_and(|i| i.state.known() == Some(crate::libvirt::DomainState::Paused));
            if paused {
                match dom.resume() {
                    Ok(_) => warn!(uuid, "guest left paused by a previous daemon: resumed"),
                    Err(err) => {
                        warn!(uuid, error = %err.message(), "cannot resume a guest left paused");
                        continue;
                    }
                }
            }
        }
        let _ = std::fs::remove_file(e.path());
    }
    n
}

const PAUSED_DIR: &str = "paused";

/// Where the memory states of RBD-backed instances live: `<store>/<uuid>/.rbd-memory/` (a dot
/// directory: the store's listing and recovery pass it by).
const MEMORY_DIR: &str = ".rbd-memory";

/// How long a memory revert waits for the stopped QEMU's watches on the disks (a QEMU killed
/// hard leaves them until the OSD times them out, 30 s).
const QEMU_WATCH_WAIT: Duration = Duration::from_secs(40);

impl LibvirtProvider {
    /// The Ceph connection, or the refusal that says how to get one.
    pub(super) fn rbd_access(&self, owner: &Owner) -> Result<&Arc<RbdAccess>> {
        self.rbd.as_ref().ok_or_else(|| {
            Error::NotSupported(format!(
                "{owner} has RBD disks: start snapfs with --ceph CEPH_CONF to reach them"
            ))
        })
    }

    /// Size of the RBD image behind a disk source `pool/image` (None without `--ceph`).
    pub(super) fn rbd_image_size(&self, source: &str) -> Option<u64> {
        let (pool, image) = xml::rbd_pool_image(source).ok()?;
        let access = self.rbd.as_ref()?;
        let img = access.pool(&pool).ok()?.open(&image, None, false).ok()?;
        img.stat().ok().map(|s| s.size)
    }

    /// The RBD snapshot records of a domain (none when it has no metadata of ours), from its
    /// persistent definition when it has one (both are written alike, but a domain restored
    /// from a memory state runs on the state's live definition until snapfs puts the records
    /// back: a daemon killed in between must still find them).
    pub(super) fn rbd_records(dom: &Domain) -> Result<Vec<RbdSnapRecord>> {
        let flags = if dom.is_persistent().unwrap_or(false) {
            sys::VIR_DOMAIN_AFFECT_CONFIG
        } else {
            0
        };
        match dom.metadata(
            sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
            Some(xml::RBD_SNAPS_NS),
            flags,
        ) {
            Ok(m) => xml::parse_rbd_records(&m),
            Err(e) if e.code().known() == Some(ErrorNumber::NoDomainMetadata) => Ok(Vec::new()),
            Err(e) => Err(lv_err("reading RBD snapshot records", e)),
        }
    }

    /// Store `records` in the domain's persistent definition and, when it runs, its live one.
    fn write_rbd_records(dom: &Domain, records: &[RbdSnapRecord]) -> Result<()> {
        let mut flags = 0;
        if dom.is_persistent().unwrap_or(true) {
            flags |= sys::VIR_DOMAIN_AFFECT_CONFIG;
        }
        if dom.is_active().unwrap_or(false) {
            flags |= sys::VIR_DOMAIN_AFFECT_LIVE;
        }
        let meta = if records.is_empty() {
            None
        } else {
            Some(xml::rbd_records_xml(records)?)
        };
        dom.set_metadata(
            sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
            meta.as_deref(),
            meta.as_ref().map(|_| xml::RBD_SNAPS_KEY),
            Some(xml::RBD_SNAPS_NS),
            flags,
        )
        .map_err(|e| lv_err("recording RBD snapshots in the domain's metadata", e))?;
        Ok(())
    }

    /// `instances/<name>/.snapshots/` entries of the RBD records.
    pub(super) fn rbd_snapshot_infos(
        &self,
        dom: &Domain,
        owner: &Owner,
    ) -> Result<Vec<SnapshotInfo>> {
        let records = Self::rbd_records(dom)?;
        if records.is_empty() {
            return Ok(Vec::new());
        }
        // Without --ceph the records are still listed (without disks), not an error.
        // Each disk image opened once: its snapshot list answers every record.
        let mut images: Vec<((String, String), Option<OpenedDisk>)> = Vec::new();
        let mut out = Vec::new();
        for r in &records {
            let mut disks = Vec::new();
            let mut disks_json = Vec::new();
            let mut first_id = None;
            for d in &r.disks {
                let key = (d.pool.clone(), d.image.clone());
                if !images.iter().any(|(k, _)| *k == key) {
                    let opened = self
                        .rbd_access(owner)
                        .and_then(|a| a.pool(&d.pool))
                        .and_then(|p| {
                            let img = p.open(&d.image, None, false)?;
                            let snaps = img.snapshots()?;
                            Ok((p, img, snaps))
                        });
                    let v = match opened {
                        Ok(v) => Some(v),
                        Err(e) => {
                            warn!(%owner, pool = %d.pool, image = %d.image, error = %e, "cannot read an RBD disk of a snapshot");
                            None
                        }
                    };
                    images.push((key.clone(), v));
                }
                let Some((pool, img, snaps)) = images
                    .iter()
                    .find(|(k, _)| *k == key)
                    .and_then(|(_, v)| v.as_ref())
                else {
                    continue;
                };
                let Some(entry) = snaps.iter().find(|s| s.name == d.snap) else {
                    warn!(%owner, snapshot = %r.name, disk = %d.target, "RBD snapshot {}/{}@{} is gone", d.pool, d.image, d.snap);
                    continue;
                };
                first_id.get_or_insert(entry.id);
                let protected = img.snap_is_protected(&d.snap).unwrap_or(false);
                // The clones of each snapshot from the handle already open, set to that
                // snapshot (a fresh open of every snapshot cost 5–140 ms each at load, paid
                // by every listing after a change, a revert's included: docs/libvirt.md).
                let clones = img
                    .snap_set(Some(&d.snap))
                    .and_then(|()| img.children())
                    .map(|c| {
                        c.iter()
                            .map(|c| format!("{}/{}", c.pool, c.image))
                            .collect::<Vec<_>>()
                    })
                    .or_else(|_| RbdAccess::clones(pool, &d.image, &d.snap))
                    .unwrap_or_default();
                disks.push(SnapDisk {
                    target: d.target.clone(),
                    size: entry.size,
                });
                disks_json.push(json!({
                    "target": d.target,
                    "kind": "rbd",
                    "source": format!("{}/{}@{}", d.pool, d.image, d.snap),
                    "format": "raw",
                    "size": entry.size,
                    "protected": protected,
                    "children": clones.len(),
                    "clones": clones,
                }));
            }
            let created = UNIX_EPOCH + Duration::from_secs(u64::try_from(r.created).unwrap_or(0));
            let id = format!("rbd:{}", first_id.unwrap_or(0));
            out.push(SnapshotInfo {
                name: r.name.clone(),
                id: id.clone(),
                created,
                disks,
                json: Arc::new(json!({
                    "id": id,
                    "name": r.name,
                    "created": crate::provider::rfc3339(created),
                    "quiesced": r.quiesced,
                    "memory": r.memory.is_some(),
                    "memory_file": r.memory.as_ref().map(|f| f.display().to_string()),
                    "memory_size": r
                        .memory
                        .as_ref()
                        .and_then(|f| std::fs::metadata(f).ok())
                        .map(|m| m.len()),
                    "state": if r.memory.is_some() { "running" } else { "disk-snapshot" },
                    "parent": serde_json::Value::Null,
                    "description": serde_json::Value::Null,
                    "method": "rbd-snapshot",
                    "disks": disks_json,
                })),
            });
        }
        Ok(out)
    }

    /// mkdir for a domain whose data disks are all RBD images.
    pub(super) fn create_rbd_snapshot(
        &self,
        dom: &Domain,
        owner: &Owner,
        name: &str,
        disks: &[RbdDisk],
        memory: bool,
    ) -> Result<()> {
        check_snap_name(name)?;
        let access = self.rbd_access(owner)?;
        let dom_name = dom.name().map_err(|e| lv_err("domain name", e))?;
        let uuid = dom.uuid_string().map_err(|e| lv_err("domain uuid", e))?;
        let active = dom.is_active().unwrap_or(false);
        // The namespace lets one operation at a time touch an instance's snapshots; the
        // records lock only guards the metadata read-modify-write (never held across a
        // freeze, so instances are snapshotted in parallel).
        if Self::rbd_records(dom)?.iter().any(|r| r.name == name) {
            return Err(Error::Exists(format!("snapshot {name} of {owner}")));
        }
        // Every image opened writable at its head before anything is frozen or made.
        let mut opened = Vec::new();
        for d in disks {
            let pool = access.pool(&d.pool)?;
            let img = pool.open(&d.image, None, true)?;
            if img.snapshots()?.iter().any(|s| s.name == name) {
                return Err(Error::Exists(format!(
                    "RBD image {}/{} (disk {} of {owner}) already has a snapshot named {name}",
                    d.pool, d.image, d.target
                )));
            }
            opened.push((d, pool, img));
        }

        // A memory snapshot needs no quiesce: the saved RAM holds the filesystems' state.
        let state = if memory {
            let dir = self.store.dir().join(&uuid).join(MEMORY_DIR);
            std::fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
            Some(super::fresh_image_path(
                &dir, &dom_name, name, "memory", "state",
            )?)
        } else {
            None
        };
        let frozen = match &state {
            Some(_) => None,
            None => self.quiesce(dom, &uuid, &dom_name, owner, active)?,
        };
        let quiesced = frozen.is_some();
        // Only a running guest is paused (and later resumed): one already paused by its
        // operator issues no I/O and stays paused.
        let running = dom
            .info()
            .is_ok_and(|i| i.state.known() == Some(crate::libvirt::DomainState::Running));
        let paused = if running && (state.is_some() || (!quiesced && opened.len() > 1)) {
            Some(Paused::start(dom, &self.opts.state_dir, &uuid, &dom_name)?)
        } else {
            None
        };
        let started = Instant::now();
        if let Some(state) = &state {
            if let Err(e) = Self::save_memory(dom, owner, name, state) {
                drop(paused);
                return Err(e);
            }
        }
        let mut made: Vec<usize> = Vec::new();
        let mut failed = None;
        for (i, (d, _, img)) in opened.iter().enumerate() {
            match img.snap_create(name) {
                Ok(()) => made.push(i),
                Err(e) => {
                    warn!(%owner, disk = %d.target, error = %e, "RBD snapshot failed");
                    failed = Some(e);
                    break;
                }
            }
        }
        if failed.is_none() && crate::namespace::failpoint_fails("rbd-mkdir-after-snapshots") {
            failed = Some(Error::Backend(format!(
                "snapshot {name} of {owner}: failure injected after the RBD snapshots (SNAPFS_FAILPOINT)"
            )));
        }
        let snap_ms = started.elapsed().as_millis() as u64;
        drop(paused);
        let thawed = frozen.map(|f| f.thaw());
        let undo = |why: &str| {
            if let Some(state) = &state {
                Self::remove_memory_state(owner, name, Some(state));
            }
            for &i in &made {
                let (d, pool, img) = &opened[i];
                // With a removal record, as every snapfs removal: a kill -9 inside it is
                // finished at the next start (chaos finding F2).
                if let Err(e) = RbdAccess::remove_snapshot(pool, &d.image, img, name) {
                    warn!(%owner, disk = %d.target, error = %e, "cannot remove the RBD snapshot of a failed mkdir ({why})");
                }
            }
        };
        if let Some(e) = failed {
            undo("a disk failed");
            return Err(e);
        }
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0));
        let recorded = (|| {
            let _records = crate::namespace::registry::lock(&self.rbd_records);
            let mut records = Self::rbd_records(dom)?;
            records.push(RbdSnapRecord {
                name: name.to_string(),
                created,
                quiesced,
                memory: state.clone(),
                disks: disks
                    .iter()
                    .map(|d| RbdSnapDisk {
                        target: d.target.clone(),
                        pool: d.pool.clone(),
                        image: d.image.clone(),
                        snap: name.to_string(),
                    })
                    .collect(),
            });
            Self::write_rbd_records(dom, &records)
        })();
        if let Err(e) = recorded {
            undo("no record");
            return Err(e);
        }
        info!(%owner, snapshot = %name, quiesced, memory = state.is_some(), snap_ms, disks = disks.len(), "RBD snapshot of every disk created");
        if let Some(Err(e)) = thawed {
            return Err(Error::Backend(format!(
                "snapshot {name} of {owner} was created, but thawing the guest failed (snapfs keeps retrying): {e}"
            )));
        }
        Ok(())
    }

    /// rmdir of a recorded RBD snapshot: EBUSY while a disk's snapshot has clones.
    pub(super) fn delete_rbd_snapshot(
        &self,
        dom: &Domain,
        owner: &Owner,
        name: &str,
    ) -> Result<bool> {
        let _records = crate::namespace::registry::lock(&self.rbd_records);
        let mut records = Self::rbd_records(dom)?;
        let Some(at) = records.iter().position(|r| r.name == name) else {
            return Ok(false);
        };
        let access = self.rbd_access(owner)?;
        // Refuse before removing anything.
        for d in &records[at].disks {
            let pool = access.pool(&d.pool)?;
            RbdAccess::refuse_if_cloned(&pool, &d.image, &d.snap).map_err(|e| match e {
                Error::Busy(m) => Error::Busy(format!(
                    "snapshot {name} of {owner}, disk {}: {m}",
                    d.target
                )),
                e => e,
            })?;
        }
        let mut result = Ok(());
        let mut left = Vec::new();
        for d in records[at].disks.clone() {
            let r = access.pool(&d.pool).and_then(|pool| {
                let img = match pool.open(&d.image, None, true) {
                    Err(Error::NotFound(_)) => return Ok(()),
                    other => other?,
                };
                if !img.snapshots()?.iter().any(|s| s.name == d.snap) {
                    return Ok(());
                }
                RbdAccess::remove_snapshot(&pool, &d.image, &img, &d.snap)
            });
            if let Err(e) = r {
                left.push(d);
                if result.is_ok() {
                    result = Err(e);
                }
            }
        }
        let memory = if left.is_empty() {
            records.remove(at).memory
        } else {
            records[at].disks = left;
            None
        };
        Self::write_rbd_records(dom, &records)?;
        // Once no record names it (a part-removed snapshot keeps its memory with its record).
        Self::remove_memory_state(owner, name, memory.as_deref());
        result.map(|()| true)
    }

    /// mv of a recorded RBD snapshot: every disk's RBD snapshot renamed, then the record
    /// (None: not such a snapshot). A disk that fails undoes the ones already renamed.
    pub(super) fn rename_rbd_snapshot(
        &self,
        dom: &Domain,
        owner: &Owner,
        from: &str,
        to: &str,
    ) -> Result<Option<()>> {
        let _records = crate::namespace::registry::lock(&self.rbd_records);
        let mut records = Self::rbd_records(dom)?;
        let Some(at) = records.iter().position(|r| r.name == from) else {
            return Ok(None);
        };
        check_snap_name(to)?;
        if records.iter().any(|r| r.name == to) {
            return Err(Error::Exists(format!("snapshot {to} of {owner}")));
        }
        let access = self.rbd_access(owner)?;
        let mut opened = Vec::new();
        for d in &records[at].disks {
            let img = access.pool(&d.pool)?.open(&d.image, None, true)?;
            if img.snapshots()?.iter().any(|s| s.name == to) {
                return Err(Error::Exists(format!(
                    "RBD image {}/{} already has a snapshot named {to}",
                    d.pool, d.image
                )));
            }
            opened.push(img);
        }
        let disks = records[at].disks.clone();
        for (i, (d, img)) in disks.iter().zip(&opened).enumerate() {
            if let Err(e) = img.snap_rename(&d.snap, to) {
                for (d0, img0) in disks.iter().zip(&opened).take(i) {
                    if let Err(e2) = img0.snap_rename(to, &d0.snap) {
                        warn!(%owner, disk = %d0.target, error = %e2, "cannot undo the rename of an RBD snapshot");
                    }
                }
                return Err(e);
            }
        }
        records[at].name = to.to_string();
        for d in &mut records[at].disks {
            d.snap = to.to_string();
        }
        Self::write_rbd_records(dom, &records)?;
        info!(%owner, from, to, "RBD instance snapshot renamed");
        Ok(Some(()))
    }

    /// The RBD record named `name` of `dom` (None: the snapshot is not one).
    pub(super) fn rbd_record(dom: &Domain, name: &str) -> Result<Option<RbdSnapRecord>> {
        Ok(Self::rbd_records(dom)?.into_iter().find(|r| r.name == name))
    }

    /// The disks of record `rec` opened writable at their heads, each checked for a revert:
    /// the domain's disk of that target is still that RBD image (`EINVAL` if it was swapped),
    /// the image still has the snapshot, and no other client has it open (`EBUSY`).
    /// `running`: the domain's own QEMU is one of the clients (a memory revert stops it first).
    fn rbd_revert_images(
        &self,
        dom: &Domain,
        owner: &Owner,
        rec: &RbdSnapRecord,
        running: bool,
    ) -> Result<Vec<(RbdSnapDisk, Image)>> {
        if rec.disks.is_empty() {
            return Err(Error::Invalid(format!(
                "snapshot {} of {owner} records no disk",
                rec.name
            )));
        }
        let access = self.rbd_access(owner)?;
        let def = Self::domain_xml(dom, 0)?;
        let mut out = Vec::new();
        for d in &rec.disks {
            let now = def.disks.iter().find(|x| x.target == d.target);
            let same = match now.map(|x| &x.source) {
                Some(xml::DiskSource::Network { protocol, name }) if protocol == "rbd" => {
                    xml::rbd_pool_image(name).ok() == Some((d.pool.clone(), d.image.clone()))
                }
                _ => false,
            };
            if !same {
                warn!(%owner, snapshot = %rec.name, disk = %d.target, "revert refused: the disk is no longer the snapshot's RBD image");
                return Err(Error::Invalid(format!(
                    "disk {} of {owner} is no longer RBD image {}/{} (of snapshot {}): attach it back, or launch the snapshot instead",
                    d.target, d.pool, d.image, rec.name
                )));
            }
            let img = access.pool(&d.pool)?.open(&d.image, None, true)?;
            if !img.snapshots()?.iter().any(|s| s.name == d.snap) {
                return Err(Error::Invalid(format!(
                    "RBD snapshot {}/{}@{} (disk {} of snapshot {} of {owner}) is gone",
                    d.pool, d.image, d.snap, d.target, rec.name
                )));
            }
            if running {
                // Our open and the domain's QEMU.
                let watchers = img.watchers()?;
                if watchers > 2 {
                    return Err(Error::Busy(format!(
                        "disk {} of {owner} is open by {} client(s) besides the domain (krbd, rbd-nbd, another VM): close it first",
                        d.target,
                        watchers - 2
                    )));
                }
            } else {
                refuse_if_watched(owner, &img).map_err(|e| match e {
                    Error::Busy(m) => Error::Busy(format!("disk {}: {m}", d.target)),
                    e => e,
                })?;
            }
            out.push((d.clone(), img));
        }
        Ok(out)
    }

    /// `check_revert` of an RBD record: refused while the domain runs or a disk is in use.
    pub(super) fn check_rbd_revert(
        &self,
        dom: &Domain,
        owner: &Owner,
        rec: &RbdSnapRecord,
    ) -> Result<()> {
        let active = dom.is_active().unwrap_or(true);
        match &rec.memory {
            // Refused before the state being discarded is kept.
            Some(f) if std::fs::symlink_metadata(f).is_err() => {
                warn!(%owner, snapshot = %rec.name, state = %f.display(), "revert refused: the memory state file is gone");
                return Err(Error::Invalid(format!(
                    "the memory state of snapshot {} of {owner} ({}) is gone: the guest cannot be resumed from it",
                    rec.name,
                    f.display()
                )));
            }
            Some(_) => {}
            None if active => {
                let (state, _) = super::state_name(dom)?;
                return Err(Error::Busy(format!(
                    "{owner} is {state} and snapshot {} (RBD snapshots of its disks) holds no memory state: shut the instance off first",
                    rec.name
                )));
            }
            None => {}
        }
        self.rbd_revert_images(dom, owner, rec, active).map(drop)
    }

    /// Revert a shut-off RBD-backed domain to record `rec`: `rbd_snap_rollback` of every disk
    /// (O(image size) each; the rate is logged). A disk that fails leaves the ones before it
    /// rolled back: the error names them (the `before-revert-…` snapshot holds what was).
    pub(super) fn revert_rbd(
        &self,
        dom: &Domain,
        owner: &Owner,
        rec: &RbdSnapRecord,
    ) -> Result<()> {
        // Where the time goes (issue 14: the memory revert's time against virsh's), logged
        // with the revert's last line.
        let mut steps = StepTimer::new();
        self.check_rbd_revert(dom, owner, rec)?;
        steps.lap("check");
        // Taken now, after `before-revert-…` was recorded: what the restore must put back.
        let metadata = if rec.memory.is_some() {
            our_metadata(dom, owner)
        } else {
            Vec::new()
        };
        steps.lap("read_metadata");
        if rec.memory.is_some() && dom.is_active().unwrap_or(false) {
            self.stop_for_memory_revert(dom, owner, rec, &mut steps)?;
        }
        let images = self.rbd_revert_images(dom, owner, rec, false)?;
        steps.lap("open_disks");
        let mut done: Vec<&str> = Vec::new();
        for (d, img) in &images {
            let size = img.stat().map_or(0, |s| s.size);
            let started = Instant::now();
            if let Err(e) = img.snap_rollback(&d.snap) {
                warn!(%owner, snapshot = %rec.name, disk = %d.target, rolled_back = ?done, error = %e, "RBD rollback of a disk failed");
                if done.is_empty() {
                    return Err(e);
                }
                return Err(Error::Backend(format!(
                    "reverting {owner} to snapshot {}: disks {done:?} were rolled back, disk {} failed ({e}): revert again, or to the before-revert snapshot",
                    rec.name, d.target
                )));
            }
            let secs = started.elapsed().as_secs_f64();
            info!(%owner, snapshot = %rec.name, disk = %d.target, image = %format!("{}/{}", d.pool, d.image), size, secs, mib_per_s = size as f64 / 1048576.0 / secs.max(1e-3), "rbd rollback of a disk");
            steps.lap("rollback");
            done.push(&d.target);
            if done.len() < images.len() {
                crate::namespace::failpoint("revert-rbd-after-a-disk");
            }
        }
        drop(images);
        steps.lap("close_disks");
        if let Some(state) = &rec.memory {
            let started = Instant::now();
            self.conn()?
                .restore_flags(state, sys::VIR_DOMAIN_SAVE_RUNNING)
                .map_err(|e| {
                    lv_err(
                        format!(
                            "reverting {owner} to snapshot {}: the disks were rolled back, but starting it from its memory state {} failed",
                            rec.name,
                            state.display()
                        ),
                        e,
                    )
                })?;
            steps.lap("restore");
            put_live_metadata(dom, owner, &metadata);
            steps.lap("put_metadata");
            info!(%owner, snapshot = %rec.name, ms = started.elapsed().as_millis() as u64, "running again from the snapshot's memory state");
        }
        info!(%owner, snapshot = %rec.name, steps = %steps, "rbd revert steps (ms)");
        Ok(())
    }

    /// The CPU and memory state of the paused `dom` saved into `state` by libvirt (an
    /// external memory snapshot with every disk excluded and no libvirt metadata: nothing is
    /// left on the domain, and the file is a save image `virDomainRestore` starts from).
    fn save_memory(dom: &Domain, owner: &Owner, name: &str, state: &Path) -> Result<()> {
        let all: Vec<String> = Self::domain_xml(dom, 0)?
            .disks
            .iter()
            .map(|d| d.target.clone())
            .collect();
        let req = xml::snapshot_request(name, false, &[], &all, Some(state))?;
        let started = Instant::now();
        if let Err(e) = dom.create_snapshot_xml(&req, sys::VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA) {
            Self::remove_memory_state(owner, name, Some(state));
            return Err(lv_err(
                format!("saving the memory state of {owner} for snapshot {name}"),
                e,
            ));
        }
        let bytes = std::fs::metadata(state).map(|m| m.len()).unwrap_or(0);
        info!(%owner, snapshot = %name, state = %state.display(), ms = started.elapsed().as_millis() as u64, memory_bytes = bytes,
            "memory state saved while the guest is paused; no quiesce needed (the saved RAM holds the filesystems' state)");
        crate::namespace::failpoint("rbd-memory-saved");
        Ok(())
    }

    /// A running domain reverted to a memory snapshot is stopped first (its state is kept as
    /// `before-revert-…`); its QEMU's watches must be gone before the rollback.
    fn stop_for_memory_revert(
        &self,
        dom: &Domain,
        owner: &Owner,
        rec: &RbdSnapRecord,
        steps: &mut StepTimer,
    ) -> Result<()> {
        dom.destroy().map_err(|e| {
            lv_err(
                format!("stopping {owner} for the revert to {}", rec.name),
                e,
            )
        })?;
        steps.lap("destroy");
        info!(%owner, snapshot = %rec.name, "guest stopped for the revert to a memory snapshot");
        let deadline = Instant::now() + QEMU_WATCH_WAIT;
        let mut polls = 0u32;
        loop {
            polls += 1;
            match self.rbd_revert_images(dom, owner, rec, false) {
                Ok(_) => {
                    steps.lap(if polls == 1 {
                        "watch_check"
                    } else {
                        "watch_wait"
                    });
                    return Ok(());
                }
                Err(Error::Busy(m)) if Instant::now() < deadline => {
                    debug!(%owner, reason = %m, polls, "waiting for the stopped QEMU's watches to go");
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The bytes of one disk of a recorded RBD snapshot (None: not such a snapshot).
    pub(super) fn open_rbd_disk(
        &self,
        dom: &Domain,
        owner: &Owner,
        snap: &str,
        target: &str,
    ) -> Result<Option<Arc<dyn BlockImage>>> {
        let records = Self::rbd_records(dom)?;
        let Some(r) = records.iter().find(|r| r.name == snap) else {
            return Ok(None);
        };
        let d = r.disks.iter().find(|d| d.target == target).ok_or_else(|| {
            Error::NotFound(format!("disk {target} of snapshot {snap} of {owner}"))
        })?;
        let access = self.rbd_access(owner)?;
        let pool = access.pool(&d.pool)?;
        access.open_snapshot(&pool, &d.image, &d.snap).map(Some)
    }

    /// Launch `new` from a recorded RBD snapshot (None: not such a snapshot).
    pub(super) fn launch_rbd(
        &self,
        src: &Domain,
        new: &str,
        instance: &str,
        snapshot: &str,
    ) -> Result<Option<()>> {
        let owner = Owner::Instance(instance.to_string());
        let records = Self::rbd_records(src)?;
        let Some(r) = records.into_iter().find(|r| r.name == snapshot) else {
            return Ok(None);
        };
        if r.disks.is_empty() {
            return Err(Error::NotSupported(format!(
                "snapshot {snapshot} of {instance} has no disk"
            )));
        }
        let access = self.rbd_access(&owner)?;
        let mut clones: Vec<(Arc<Pool>, String)> = Vec::new();
        let mut edits = Vec::new();
        let started = Instant::now();
        for d in &r.disks {
            let made = (|| -> Result<(Arc<Pool>, String)> {
                let pool = access.pool(&d.pool)?;
                let img = pool.open(&d.image, None, true)?;
                if !img.snap_is_protected(&d.snap)? {
                    img.snap_protect(&d.snap)?;
                }
                for attempt in 1..100 {
                    let name = clone_name(new, &d.target, attempt);
                    match pool.clone_snapshot(&d.image, &d.snap, &pool, &name) {
                        Ok(()) => return Ok((pool, name)),
                        Err(Error::Exists(_)) => continue,
                        Err(e) => return Err(e),
                    }
                }
                Err(Error::Exists(format!(
                    "no free clone name for {new}-{} in pool {}",
                    d.target, d.pool
                )))
            })();
            match made {
                Ok((pool, name)) => {
                    edits.push(xml::DiskEdit {
                        target: d.target.clone(),
                        source: xml::NewSource::Rbd(format!("{}/{name}", pool.name)),
                    });
                    clones.push((pool, name));
                }
                Err(e) => {
                    remove_clones(&clones);
                    return Err(e);
                }
            }
        }
        self.start_on_clones(src, new, instance, snapshot, &edits, clones, started, "")?;
        Ok(Some(()))
    }

    /// The last step of a launch on RBD clones (`clones`, made since `started`, which `edits`
    /// put in the new domain's disks): define and start the domain, or remove the clones when
    /// that fails; then `--flatten-on-launch`. `of` is what the log line adds after "launched
    /// on RBD clones".
    #[allow(clippy::too_many_arguments)]
    pub(super) fn start_on_clones(
        &self,
        src: &Domain,
        new: &str,
        instance: &str,
        snapshot: &str,
        edits: &[xml::DiskEdit],
        clones: Vec<(Arc<Pool>, String)>,
        started: Instant,
        of: &str,
    ) -> Result<()> {
        let clone_ms = started.elapsed().as_millis() as u64;
        if let Err(e) = self.define_and_start(src, new, instance, snapshot, edits) {
            remove_clones(&clones);
            return Err(e);
        }
        info!(domain = %new, %instance, %snapshot, clone_ms, clones = clones.len(), "launched on RBD clones{of}");
        if self.opts.flatten_on_launch {
            flatten_in_background(clones);
        }
        Ok(())
    }
}

/// snapfs's own `<metadata>` elements of a domain: its RBD snapshot records, its settings, its
/// launch record.
const OUR_METADATA: [(&str, &str); 3] = [
    (xml::RBD_SNAPS_NS, xml::RBD_SNAPS_KEY),
    (super::settings::SETTINGS_NS, super::settings::SETTINGS_KEY),
    (xml::LAUNCH_NS, xml::LAUNCH_KEY),
];

/// Our metadata elements as the domain has them now (None: absent). A domain restored from a
/// memory state runs with the definition saved in that state, whose metadata is as old as the
/// state (without the records of the snapshot itself and of every later one), so the restore
/// puts these back into the live definition ([`put_live_metadata`]).
///
/// Read from the persistent definition when there is one: it is never restored from a state,
/// so a revert done again after a kill -9 (the live definition then possibly already the
/// state's) still finds today's records there.
fn our_metadata(dom: &Domain, owner: &Owner) -> Vec<(&'static str, &'static str, Option<String>)> {
    let flags = if dom.is_persistent().unwrap_or(false) {
        sys::VIR_DOMAIN_AFFECT_CONFIG
    } else {
        0
    };
    OUR_METADATA
        .iter()
        .filter_map(
            |&(ns, key)| match dom.metadata(sys::VIR_DOMAIN_METADATA_ELEMENT as i32, Some(ns), flags) {
                Ok(m) => Some((ns, key, Some(m))),
                Err(e) if e.code().known() == Some(ErrorNumber::NoDomainMetadata) => {
                    Some((ns, key, None))
                }
                Err(e) => {
                    warn!(%owner, namespace = ns, error = %e.message(), "cannot read our metadata before a memory revert");
                    None
                }
            },
        )
        .collect()
}

/// Put `kept` (from [`our_metadata`]) into the live definition of the restored domain.
fn put_live_metadata(
    dom: &Domain,
    owner: &Owner,
    kept: &[(&'static str, &'static str, Option<String>)],
) {
    for (ns, key, m) in kept {
        if let Err(e) = dom.set_metadata(
            sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
            m.as_deref(),
            m.as_ref().map(|_| *key),
            Some(ns),
            sys::VIR_DOMAIN_AFFECT_LIVE,
        ) {
            warn!(%owner, namespace = %ns, error = %e.message(), "cannot put our metadata back into the restored domain");
        }
    }
}

/// Milliseconds of the named steps of one operation, for its log line: `check=12 destroy=480 …`.
struct StepTimer {
    last: Instant,
    steps: Vec<(&'static str, u128)>,
}

impl StepTimer {
    fn new() -> Self {
        StepTimer {
            last: Instant::now(),
            steps: Vec::new(),
        }
    }

    /// The time since the previous lap (or the start) is step `name`'s.
    fn lap(&mut self, name: &'static str) {
        let now = Instant::now();
        self.steps
            .push((name, now.duration_since(self.last).as_millis()));
        self.last = now;
    }
}

impl std::fmt::Display for StepTimer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (name, ms)) in self.steps.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{name}={ms}")?;
        }
        Ok(())
    }
}

/// Remove the RBD clones a failed launch had made (logged, not returned: the launch's own
/// error is what the caller reports).
pub(super) fn remove_clones(clones: &[(Arc<Pool>, String)]) {
    for (pool, name) in clones {
        if let Err(e) = pool.remove_image(name) {
            warn!(image = %name, error = %e, "cannot remove the RBD clone of a failed launch");
        }
    }
}

/// `--flatten-on-launch`: flatten the clones of a launch in a thread of their own.
pub(super) fn flatten_in_background(clones: Vec<(Arc<Pool>, String)>) {
    let names: Vec<String> = clones
        .iter()
        .map(|(p, n)| format!("{}/{n}", p.name))
        .collect();
    let spawned = std::thread::Builder::new()
        .name("rbd-flatten".into())
        .spawn(move || {
            for (pool, name) in clones {
                let t = Instant::now();
                match pool.open(&name, None, true).and_then(|img| img.flatten()) {
                    Ok(()) => info!(image = %format!("{}/{name}", pool.name), ms = t.elapsed().as_millis() as u64, "clone flattened"),
                    Err(e) => warn!(image = %format!("{}/{name}", pool.name), error = %e, "flattening the clone failed"),
                }
            }
        });
    if let Err(e) = spawned {
        warn!(clones = ?names, error = %e, "cannot start flattening the clones");
    }
}

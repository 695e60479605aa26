//! Store snapshots of RBD disks (`--store-pool`, `--managed-rbd=keep-snapshot`).
//!
//! The copy method must leave nothing on what a cloud manages, and an RBD snapshot left on
//! a Nova-owned image makes Nova's instance delete fail (`ImageHasSnapshots`). So for a
//! domain whose data disks are all RBD images, mkdir does Nova's "direct snapshot" but
//! takes the snapshot back off the cloud's image:
//!
//! 1. `.part-<id>/job.json` names every object about to be made (synced first);
//! 2. freeze (the quiesce policy; vCPUs paused for several disks of an unfrozen guest),
//!    `rbd_snap_create` `snapfs.<id>` on every disk, thaw: the point in time;
//! 3. per disk: `rbd_clone3` (clone v2: no protection, another namespace) into
//!    `<store-pool>/snapfs/<uuid>.<id>.<target>`, `rbd_flatten`, snapshot `snapfs` of the
//!    copy (what reads and launches use), then the source snapshot removed (unprotected
//!    first if someone protected it);
//! 4. `meta.json`, the directory renamed to `<id>`: listed.
//!
//! Any failure, and a restart after a kill (the job's objects, see [`recover_leftovers`]),
//! removes the copies and the source snapshots. With `--managed-rbd=keep-snapshot` step 3
//! is skipped: the snapshot on the source image is the store snapshot's data.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use tracing::{info, warn};

use super::rbd::{clone_name, remove_clones, Paused, RbdDisk};
use super::store::{Meta, MetaDisk, RbdLeftover, RbdRef, RbdStep, Store, StoreSnap};
use super::{safe_part, xml, LibvirtProvider, ManagedRbd};
use crate::ceph::Pool;
use crate::error::{Error, Result};
use crate::image::BlockImage;
use crate::libvirt::Domain;
use crate::provider::rbd::RbdAccess;
use crate::provider::Owner;

/// The RBD namespace of `--store-pool` that holds the copies.
pub const STORE_NS: &str = "snapfs";
/// The snapshot of each copy that reads and launches use.
pub const STORE_SNAP: &str = "snapfs";
/// How long a restart keeps trying to remove what a killed daemon left in Ceph (a dead
/// client's watch on an image blocks its removal until the OSD drops it, ~30 s).
const LEFTOVER_RETRY: Duration = Duration::from_secs(300);
const LEFTOVER_PAUSE: Duration = Duration::from_secs(3);

/// Remove `r`'s snapshot (unprotected first), and the image when it is the store's own.
/// Already gone is fine.
fn remove_ref(access: &RbdAccess, r: &RbdRef) -> Result<()> {
    let pool = access.pool_ns(&r.pool, &r.namespace)?;
    let img = match pool.open(&r.image, None, true) {
        Ok(i) => i,
        Err(Error::NotFound(_)) => return Ok(()),
        Err(e) => return Err(e),
    };
    if !r.snap.is_empty() && img.snapshots()?.iter().any(|s| s.name == r.snap) {
        RbdAccess::refuse_if_cloned(&pool, &r.image, &r.snap)?;
        RbdAccess::remove_snapshot(&pool, &r.image, &img, &r.snap)?;
    }
    drop(img);
    if r.owned {
        match pool.remove_image(&r.image) {
            Ok(()) | Err(Error::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Undo one disk's step: the copy first (it is a clone of the source snapshot until
/// flattened), then the source snapshot.
fn undo_step(access: &RbdAccess, step: &RbdStep) -> Result<()> {
    if let Some(c) = &step.copy {
        remove_ref(access, c)?;
    }
    if let Some(s) = &step.source {
        remove_ref(access, s)?;
    }
    Ok(())
}

/// Removes what a failed mkdir made in Ceph, unless disarmed.
struct Undo<'a> {
    access: &'a RbdAccess,
    steps: Vec<RbdStep>,
    armed: bool,
}

impl Drop for Undo<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        for s in &self.steps {
            if let Err(e) = undo_step(self.access, s) {
                warn!(error = %e, step = ?s, "cannot remove what a failed snapshot made in Ceph (the next start retries)");
            }
        }
    }
}

/// At start-up (once Ceph is reachable): remove the Ceph objects of hidden store directories
/// a killed daemon left, then the directories, in a background thread. Steps that fail (a
/// dead client's watch still on a copy) are retried for a while; the directories are never
/// listed meanwhile.
pub(super) fn recover_leftovers(access: Arc<RbdAccess>, leftovers: Vec<RbdLeftover>) {
    if leftovers.is_empty() {
        return;
    }
    fn attempt(access: &RbdAccess, l: &RbdLeftover) -> Result<()> {
        for s in &l.steps {
            undo_step(access, s)?;
        }
        Store::purge(&l.dir)
    }
    // All in the background: a dead client's lock or watch can hold the first attempt for
    // ~30 s, and the directories are hidden meanwhile, so the mount need not wait.
    let mut left = leftovers;
    let spawned = std::thread::Builder::new()
        .name("store-recover".into())
        .spawn(move || {
            let until = Instant::now() + LEFTOVER_RETRY;
            let mut first = true;
            while !left.is_empty() && Instant::now() < until {
                if !first {
                    std::thread::sleep(LEFTOVER_PAUSE);
                }
                left.retain(|l| match attempt(&access, l) {
                    Ok(()) => {
                        info!(dir = %l.dir.display(), "incomplete store snapshot of a previous daemon removed (and its RBD images and snapshots)");
                        false
                    }
                    Err(e) => {
                        if first {
                            info!(dir = %l.dir.display(), error = %e, "RBD objects of an incomplete store snapshot not removable yet: retrying");
                        }
                        true
                    }
                });
                first = false;
            }
            for l in &left {
                warn!(dir = %l.dir.display(), "RBD objects of an incomplete store snapshot still not removable: the next start retries");
            }
        });
    if let Err(e) = spawned {
        warn!(error = %e, "cannot start the store recovery thread: the next start retries");
    }
}

impl LibvirtProvider {
    /// `--store-pool`'s `snapfs` namespace (created when missing).
    fn store_pool(&self, access: &RbdAccess) -> Result<Option<Arc<Pool>>> {
        let Some(name) = &self.opts.store_pool else {
            return Ok(None);
        };
        access.pool(name)?.ensure_namespace(STORE_NS)?;
        access.pool_ns(name, STORE_NS).map(Some)
    }

    /// After `--ceph` is attached: check `--store-pool` (its namespace made) and remove what
    /// a killed daemon left in Ceph.
    pub fn prepare_rbd_store(&self) -> Result<()> {
        let Some(access) = self.rbd.clone() else {
            if self.opts.store_pool.is_some() {
                return Err(Error::Invalid(
                    "--store-pool needs --ceph CEPH_CONF".to_string(),
                ));
            }
            return Ok(());
        };
        if let Some(p) = self.store_pool(&access)? {
            info!(pool = %p.label(), "store pool for copies of RBD disks");
        }
        recover_leftovers(access, self.store.rbd_leftovers());
        Ok(())
    }

    /// Whether mkdir of a copy-method domain with these RBD disks goes through Ceph (store
    /// pool or keep-snapshot) rather than the file store.
    pub(super) fn rbd_store_mode(&self) -> Option<ManagedRbd> {
        match self.opts.managed_rbd {
            ManagedRbd::KeepSnapshot => Some(ManagedRbd::KeepSnapshot),
            ManagedRbd::Copy if self.opts.store_pool.is_some() => Some(ManagedRbd::Copy),
            ManagedRbd::Copy => None,
        }
    }

    /// mkdir of a store snapshot of a domain whose data disks are all RBD images.
    pub(super) fn create_rbd_store_snapshot(
        &self,
        dom: &Domain,
        owner: &Owner,
        name: &str,
        managed_by: Option<Value>,
        disks: &[RbdDisk],
        mode: ManagedRbd,
    ) -> Result<()> {
        let access = self.rbd_access(owner)?;
        let store = self.store()?;
        let started = Instant::now();
        let (dom_name, uuid, _busy) = store.start_snapshot(dom, owner, name)?;
        let active = dom.is_active().unwrap_or(false);
        let keep = mode == ManagedRbd::KeepSnapshot;
        let into = if keep {
            None
        } else {
            Some(self.store_pool(access)?.ok_or_else(|| {
                Error::Invalid("copies of RBD disks need --store-pool".to_string())
            })?)
        };
        // Every source image opened writable at its head before anything is made.
        let mut opened = Vec::new();
        for d in disks {
            let pool = access.pool(&d.pool)?;
            let img = pool.open(&d.image, None, true)?;
            opened.push((d, pool, img));
        }
        let part = store.begin(&uuid, &dom_name)?;
        let snap = format!("snapfs.{}", part.id());
        let steps: Vec<RbdStep> = disks
            .iter()
            .map(|d| RbdStep {
                source: Some(RbdRef {
                    pool: d.pool.clone(),
                    namespace: String::new(),
                    image: d.image.clone(),
                    snap: snap.clone(),
                    owned: false,
                }),
                copy: into.as_ref().map(|p| RbdRef {
                    pool: p.name.clone(),
                    namespace: STORE_NS.to_string(),
                    image: format!(
                        "{}.{}.{}",
                        safe_part(&uuid),
                        part.id(),
                        safe_part(&d.target)
                    ),
                    snap: STORE_SNAP.to_string(),
                    owned: true,
                }),
            })
            .collect();
        part.record_rbd(&steps)?;
        // Dropped before `part` (declared after it): the Ceph objects go before the record.
        let mut undo = Undo {
            access,
            steps: steps.clone(),
            armed: true,
        };

        let freeze_sent = Instant::now();
        let frozen = self.quiesce(dom, &uuid, &dom_name, owner, active)?;
        let quiesced = frozen.is_some();
        let running = dom
            .info()
            .is_ok_and(|i| i.state.known() == Some(crate::libvirt::DomainState::Running));
        let paused = if !quiesced && running && opened.len() > 1 {
            Some(Paused::start(dom, &self.opts.state_dir, &uuid, &dom_name)?)
        } else {
            None
        };
        let mut failed = None;
        for (d, _, img) in &opened {
            if let Err(e) = img.snap_create(&snap) {
                warn!(%owner, disk = %d.target, error = %e, "RBD snapshot failed");
                failed = Some(e);
                break;
            }
        }
        drop(paused);
        let thawed = frozen.map(|f| f.thaw());
        let stall_ms = quiesced.then(|| freeze_sent.elapsed().as_millis() as u64);
        if let Some(e) = failed {
            return Err(e);
        }
        info!(%owner, snapshot = %name, rbd_snap = %snap, quiesced, stall_ms, disks = disks.len(), "RBD snapshot of every disk taken");
        if let Some(Err(e)) = thawed {
            warn!(%owner, error = %e, "thaw after the RBD snapshots failed (snapfs keeps retrying)");
        }

        let mut meta_disks = Vec::new();
        let mut flatten_ms = 0u64;
        for ((d, pool, img), step) in opened.iter().zip(&steps) {
            let size = img
                .snapshots()?
                .iter()
                .find(|s| s.name == snap)
                .map(|s| s.size)
                .ok_or_else(|| {
                    Error::Backend(format!(
                        "RBD snapshot {}/{}@{snap} vanished",
                        d.pool, d.image
                    ))
                })?;
            let data = match (&step.copy, &into) {
                (Some(c), Some(into)) => {
                    pool.clone_snapshot_v2(&d.image, &snap, into, &c.image)?;
                    let t = Instant::now();
                    let copy = into.open(&c.image, None, true)?;
                    copy.flatten()?;
                    let ms = t.elapsed().as_millis() as u64;
                    flatten_ms += ms;
                    copy.snap_create(STORE_SNAP)?;
                    drop(copy);
                    info!(%owner, disk = %d.target, copy = %c.spec(), bytes = size, flatten_ms = ms, "RBD disk copied into the store pool");
                    // Off the cloud's image as soon as the copy no longer needs it.
                    RbdAccess::remove_snapshot(pool, &d.image, img, &snap)?;
                    c.clone()
                }
                _ => step.source.clone().ok_or_else(|| {
                    Error::Backend("RBD snapshot step without a source".to_string())
                })?,
            };
            meta_disks.push(MetaDisk {
                target: d.target.clone(),
                file: String::new(),
                format: "raw".into(),
                size,
                source: format!("rbd {}/{}", d.pool, d.image),
                rbd: Some(data),
                lvm: None,
            });
        }
        let meta = Meta {
            name: name.to_string(),
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs(),
            quiesced,
            method: if keep { "rbd-snapshot" } else { "copy" }.into(),
            via: if keep { "keep-snapshot" } else { "rbd-clone" }.into(),
            domain: dom_name,
            uuid: uuid.clone(),
            disks: meta_disks,
            stall_ms,
            copy_ms: started.elapsed().as_millis() as u64,
            managed_by,
        };
        let committed = part.commit(&meta)?;
        undo.armed = false;
        info!(%owner, snapshot = %name, keep, quiesced, stall_ms, flatten_ms, copy_ms = meta.copy_ms, dir = %committed.dir.display(), "RBD store snapshot complete");
        Ok(())
    }

    /// rmdir of a store snapshot whose disks are in Ceph: EBUSY while a launch's clone
    /// depends on one; otherwise hidden, its RBD snapshots (and copies) removed, then gone.
    pub(super) fn delete_store_rbd(&self, owner: &Owner, snap: &StoreSnap) -> Result<()> {
        let access = self.rbd_access(owner)?;
        let refs: Vec<&RbdRef> = snap
            .meta
            .disks
            .iter()
            .filter_map(|d| d.rbd.as_ref())
            .collect();
        for r in &refs {
            let pool = access.pool_ns(&r.pool, &r.namespace)?;
            RbdAccess::refuse_if_cloned(&pool, &r.image, &r.snap).map_err(|e| match e {
                Error::Busy(m) => {
                    Error::Busy(format!("snapshot {} of {owner}: {m}", snap.meta.name))
                }
                e => e,
            })?;
        }
        let store = self.store()?;
        let hidden = store.hide(snap)?;
        for r in refs {
            if let Err(e) = remove_ref(access, r) {
                if let Err(e2) = store.unhide(&hidden, snap) {
                    warn!(%owner, error = %e2, "cannot restore a store snapshot whose removal failed (the next start finishes the removal)");
                }
                return Err(e);
            }
        }
        Store::purge(&hidden)?;
        info!(%owner, snapshot = %snap.meta.name, "RBD store snapshot removed");
        Ok(())
    }

    /// The bytes of disk `target` of a store snapshot kept in Ceph.
    pub(super) fn open_store_rbd_disk(
        &self,
        owner: &Owner,
        r: &RbdRef,
    ) -> Result<Arc<dyn BlockImage>> {
        let access = self.rbd_access(owner)?;
        let pool = access.pool_ns(&r.pool, &r.namespace)?;
        access.open_snapshot(&pool, &r.image, &r.snap)
    }

    /// Launch `new` from a store snapshot kept in Ceph: each disk's snapshot cloned (v2)
    /// into the pool of the source domain's disk (the new domain keeps its monitors and
    /// `<auth>`), then defined and started.
    pub(super) fn launch_store_rbd(
        &self,
        src: &Domain,
        new: &str,
        instance: &str,
        snapshot: &str,
        s: &StoreSnap,
    ) -> Result<()> {
        let owner = Owner::Instance(instance.to_string());
        let access = self.rbd_access(&owner)?;
        let current = Self::domain_xml(src, 0)?.disks;
        let mut clones: Vec<(Arc<Pool>, String)> = Vec::new();
        let mut edits = Vec::new();
        let started = Instant::now();
        for d in &s.meta.disks {
            let Some(r) = &d.rbd else {
                remove_clones(&clones);
                return Err(Error::NotSupported(format!(
                    "snapshot {snapshot} of {instance} mixes RBD and file disks"
                )));
            };
            // The clone goes where the domain's disk is now (else the copy's pool).
            let target_pool = current
                .iter()
                .find(|c| c.target == d.target)
                .and_then(|c| match &c.source {
                    xml::DiskSource::Network { protocol, name } if protocol == "rbd" => {
                        xml::rbd_pool_image(name).ok().map(|(p, _)| p)
                    }
                    _ => None,
                })
                .unwrap_or_else(|| r.pool.clone());
            let made = (|| -> Result<(Arc<Pool>, String)> {
                let parent = access.pool_ns(&r.pool, &r.namespace)?;
                let into = access.pool(&target_pool)?;
                for attempt in 1..100 {
                    let name = clone_name(new, &d.target, attempt);
                    match parent.clone_snapshot_v2(&r.image, &r.snap, &into, &name) {
                        Ok(()) => return Ok((into, name)),
                        Err(Error::Exists(_)) => continue,
                        Err(e) => return Err(e),
                    }
                }
                Err(Error::Exists(format!(
                    "no free clone name for {new}-{} in pool {target_pool}",
                    d.target
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
        self.start_on_clones(
            src,
            new,
            instance,
            snapshot,
            &edits,
            clones,
            started,
            " of a store snapshot",
        )
    }
}

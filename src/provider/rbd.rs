//! The `rbd` provider: every RBD image of the configured Ceph pools is a volume of pool
//! `<pool>`; its snapshots are the image's RBD (user) snapshots.
//!
//! Metadata calls open the image at its head (read-only, so no watch or lock is taken);
//! snapshot changes open it writable, which works while a running VM holds the exclusive
//! lock (librbd forwards the request to the lock owner). Disk reads open the image
//! read-only at the snapshot. Every librados/librbd call is bounded by the configured
//! timeouts, so a dead cluster answers EIO instead of hanging.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tracing::{debug, info, warn};

use super::{ObjectInfo, Owner, Provider, SnapDisk, SnapshotInfo, VOLUME_DISK};
use crate::ceph::{self, Cluster, Image, Pool, Timeouts};
use crate::error::{Error, Result};
use crate::image::rbd::RbdImage;
use crate::image::{BlockCache, BlockImage};

mod removal;

/// How to reach the cluster.
#[derive(Clone, Debug)]
pub struct RbdConfig {
    pub conf: PathBuf,
    /// Client id (`admin` → `client.admin`).
    pub id: String,
    pub pools: Vec<String>,
    /// Bound of every mon/OSD operation; a read of a dead cluster fails after this.
    pub op_timeout: Duration,
    /// Bound of the connection at start-up.
    pub connect_timeout: Duration,
    /// Bytes read ahead of a sequential reader of a snapshot (0: no read-ahead).
    pub read_ahead: u64,
    /// Serve disks through the kernel page cache instead of with direct I/O.
    pub page_cache: bool,
}

pub struct RbdProvider {
    pools: Vec<Arc<Pool>>,
    access: Arc<RbdAccess>,
}

/// The cluster connection and read path, shared with the libvirt provider for domains whose
/// disks are RBD images (of any pool, not only the `--pool` ones).
pub struct RbdAccess {
    cluster: Arc<Cluster>,
    /// Pools opened so far, by name.
    pools: Mutex<HashMap<String, Arc<Pool>>>,
    /// Where read-ahead chunks wait for their readers (shared by all opened snapshots).
    cache: Arc<BlockCache>,
    read_ahead: u64,
    page_cache: bool,
}

impl RbdAccess {
    /// An I/O context on `name`, opened once.
    pub fn pool(&self, name: &str) -> Result<Arc<Pool>> {
        let mut g = crate::namespace::registry::lock(&self.pools);
        if let Some(p) = g.get(name) {
            return Ok(p.clone());
        }
        let p = self.cluster.pool(name)?;
        g.insert(name.to_string(), p.clone());
        Ok(p)
    }

    /// An I/O context on RBD namespace `ns` of pool `name` ("": the default one), opened
    /// once.
    pub fn pool_ns(&self, name: &str, ns: &str) -> Result<Arc<Pool>> {
        if ns.is_empty() {
            return self.pool(name);
        }
        // A pool name has no '/', so the key cannot clash with a plain pool's.
        let key = format!("{name}/{ns}");
        let mut g = crate::namespace::registry::lock(&self.pools);
        if let Some(p) = g.get(&key) {
            return Ok(p.clone());
        }
        let p = self.cluster.pool_ns(name, ns)?;
        g.insert(key, p.clone());
        Ok(p)
    }

    /// The bytes of `pool/image@snap`, through our reader with read-ahead.
    pub fn open_snapshot(
        &self,
        pool: &Arc<Pool>,
        image: &str,
        snap: &str,
    ) -> Result<Arc<dyn BlockImage>> {
        let img = pool.open(image, Some(snap), false)?;
        Ok(Arc::new(RbdImage::new(
            img,
            self.cache.clone(),
            self.read_ahead,
            !self.page_cache,
        )?))
    }

    /// The clones of `image@snap` as `pool/image` names (empty when the snapshot is gone).
    pub fn clones(pool: &Arc<Pool>, image: &str, snap: &str) -> Result<Vec<String>> {
        let probe = match pool.open(image, Some(snap), false) {
            Ok(p) => p,
            Err(Error::NotFound(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        Ok(probe
            .children()?
            .iter()
            .map(|c| format!("{}/{}", c.pool, c.image))
            .collect())
    }

    /// EBUSY, naming them, while clones of `image@snap` depend on it.
    pub fn refuse_if_cloned(pool: &Arc<Pool>, image: &str, snap: &str) -> Result<()> {
        let children = Self::clones(pool, image, snap)?;
        if children.is_empty() {
            return Ok(());
        }
        Err(Error::Busy(format!(
            "snapshot {snap} of {}/{image} has {} clone(s) that depend on it: {} (flatten or remove them first)",
            pool.name,
            children.len(),
            children.join(", ")
        )))
    }

    /// Remove snapshot `name` of `img` (opened writable at its head, image `image` of `pool`),
    /// which the caller found without clones ([`Self::refuse_if_cloned`]); a protected one is
    /// unprotected first, as `rbd snap rm` would require by hand.
    ///
    /// A removal record ([`removal`]) names the image and snap id while `rbd_snap_remove`
    /// runs: librbd moves the snapshot to the trash namespace first, and a daemon killed
    /// before librbd is done leaves it there (chaos finding F2); the next start finishes it.
    pub fn remove_snapshot(pool: &Pool, image: &str, img: &Image, name: &str) -> Result<()> {
        let record = removal::begin(pool, image, img, name)?;
        let result = Self::unprotect_and_remove(pool, image, img, name, record.as_ref());
        if let Some(r) = record {
            r.end(img, result.is_ok());
        }
        result
    }

    fn unprotect_and_remove(
        pool: &Pool,
        image: &str,
        img: &Image,
        name: &str,
        record: Option<&removal::Pending>,
    ) -> Result<()> {
        let protected = img.snap_is_protected(name)?;
        if protected {
            img.snap_unprotect(name)?;
        }
        let result = removal::test_pause(img, record).and_then(|()| img.snap_remove(name));
        if let Err(e) = result {
            if protected {
                if let Err(e2) = img.snap_protect(name) {
                    warn!(pool = %pool.name, image, snap = name, error = %e2, "could not re-protect after a failed remove");
                }
            }
            return Err(e);
        }
        Ok(())
    }
}

impl RbdProvider {
    /// Connect and open every pool; a missing pool or an unreachable cluster is an error
    /// that says which, returned within about `connect_timeout`.
    pub fn new(cfg: &RbdConfig) -> Result<Self> {
        if !cfg.conf.is_file() {
            return Err(Error::NotFound(format!(
                "Ceph configuration {} (give --ceph PATH)",
                cfg.conf.display()
            )));
        }
        let cluster = Cluster::connect(
            &cfg.conf,
            &cfg.id,
            Timeouts {
                op: cfg.op_timeout,
                connect: cfg.connect_timeout,
            },
        )?;
        let mut pools: Vec<Arc<Pool>> = Vec::new();
        for name in &cfg.pools {
            if pools.iter().any(|p| &p.name == name) {
                continue;
            }
            let pool = cluster.pool(name).map_err(|e| match e {
                Error::NotFound(_) => Error::NotFound(format!(
                    "Ceph pool {name} (cluster of {})",
                    cfg.conf.display()
                )),
                e => e,
            })?;
            info!(pool = %name, "rbd pool");
            pools.push(pool);
        }
        // Read-ahead chunks get their own LRU: 4 MiB chunks would flush the shared metadata
        // cache, and a reader that stops early leaves chunks that must age out somewhere.
        let budget = cfg.read_ahead.saturating_mul(4).max(64 << 20);
        let cache = Arc::new(BlockCache::new(
            usize::try_from(budget).unwrap_or(usize::MAX),
        ));
        crate::image::rbd::register_cache(&cache);
        let access = Arc::new(RbdAccess {
            cluster,
            pools: Mutex::new(pools.iter().map(|p| (p.name.clone(), p.clone())).collect()),
            cache,
            read_ahead: cfg.read_ahead,
            page_cache: cfg.page_cache,
        });
        Ok(RbdProvider { pools, access })
    }

    /// From now on removals are recorded under `state_dir`; the records a killed daemon left
    /// are handled in the background ([`removal::recover`]).
    pub fn recover_removals(&self, state_dir: &std::path::Path) {
        removal::recover(self.access.clone(), state_dir);
    }

    /// The connection, for the libvirt provider's RBD-backed domains.
    pub fn access(&self) -> Arc<RbdAccess> {
        self.access.clone()
    }

    fn pool(&self, name: &str) -> Result<&Arc<Pool>> {
        self.pools
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| Error::NotFound(format!("pool {name}")))
    }

    /// The pool and image name of a volume owner.
    fn volume<'a>(&self, owner: &'a Owner) -> Result<(&Arc<Pool>, &'a str)> {
        match owner {
            Owner::Volume { pool, name } => Ok((self.pool(pool)?, name.as_str())),
            Owner::Instance(_) => Err(Error::NotFound(owner.to_string())),
        }
    }

    fn open(&self, owner: &Owner, snap: Option<&str>, writable: bool) -> Result<Image> {
        let (pool, name) = self.volume(owner)?;
        pool.open(name, snap, writable)
    }
}

fn parent_json(p: Option<ceph::Parent>) -> serde_json::Value {
    match p {
        None => serde_json::Value::Null,
        Some(p) => json!({
            "pool": p.pool,
            "namespace": p.namespace,
            "image": p.image,
            "snapshot": p.snapshot,
        }),
    }
}

/// Tell a snapshot name librbd would mangle or refuse from one it takes as is.
pub(crate) fn check_snap_name(name: &str) -> Result<()> {
    // The rbd CLI splits pool/image@snap on these; librbd stores them, but no tool could name
    // such a snapshot afterwards.
    if name.contains('@') || name.contains('/') {
        return Err(Error::Invalid(format!(
            "RBD snapshot name {name:?} may not contain '@' or '/'"
        )));
    }
    Ok(())
}

impl Provider for RbdProvider {
    fn kind(&self) -> &'static str {
        "rbd"
    }

    fn pools(&self) -> Result<Vec<String>> {
        Ok(self.pools.iter().map(|p| p.name.clone()).collect())
    }

    fn volumes(&self, pool: &str) -> Result<Vec<String>> {
        let mut v = self.pool(pool)?.images()?;
        v.sort();
        Ok(v)
    }

    fn info(&self, owner: &Owner) -> Result<ObjectInfo> {
        let (pool, name) = self.volume(owner)?;
        let img = pool.open(name, None, false)?;
        let st = img.stat()?;
        let features = img.features()?;
        let created = img.create_time()?;
        let modified = img.modify_time().unwrap_or(created);
        let snaps = img.snapshots()?;
        let j = json!({
            "pool": pool.name,
            "name": name,
            "id": img.id()?,
            "format": "rbd",
            "size": st.size,
            "virtual_size": st.size,
            "object_size": st.obj_size,
            "order": st.order,
            "features": ceph::feature_names(features),
            "parent": parent_json(img.parent()?),
            "snapshots": snaps.len(),
            "created": super::rfc3339(created),
            "modified": super::rfc3339(modified),
        });
        Ok(ObjectInfo {
            json: j,
            mtime: modified.max(created),
        })
    }

    fn storage_keys(&self, owner: &Owner) -> Result<Vec<String>> {
        let (pool, name) = self.volume(owner)?;
        Ok(vec![super::rbd_key(&format!("{}/{name}", pool.name))])
    }

    fn snapshots(&self, owner: &Owner) -> Result<Vec<SnapshotInfo>> {
        let (pool, name) = self.volume(owner)?;
        let img = pool.open(name, None, false)?;
        let features = img.features()?;
        let mut out = Vec::new();
        for s in img.snapshots()? {
            // A snapshot removed by another client between the list and these calls is
            // left out; it must not make the whole listing fail.
            let details = (|| -> Result<_> {
                let created = img.snap_timestamp(s.id)?;
                let protected = img.snap_is_protected(&s.name)?;
                img.snap_set(Some(&s.name))?;
                Ok((created, protected, img.parent()?, img.children()?))
            })();
            let (created, protected, parent, children) = match details {
                Ok(d) => d,
                Err(Error::NotFound(e)) => {
                    debug!(%owner, snap = %s.name, error = %e, "snapshot gone while listing");
                    continue;
                }
                Err(e) => return Err(e),
            };
            let source = format!("{}/{name}@{}", pool.name, s.name);
            let j = json!({
                "id": s.id.to_string(),
                "name": s.name,
                "created": super::rfc3339(created),
                "quiesced": serde_json::Value::Null,
                "memory": false,
                "size": s.size,
                "protected": protected,
                "clones": children.iter().map(|c| format!("{}/{}", c.pool, c.image)).collect::<Vec<_>>(),
                "image_parent": parent_json(parent),
                "features": ceph::feature_names(features),
                "disks": [{ "target": VOLUME_DISK, "format": "rbd", "source": source, "size": s.size }],
            });
            out.push(SnapshotInfo {
                name: s.name,
                id: s.id.to_string(),
                created,
                disks: vec![SnapDisk {
                    target: VOLUME_DISK.into(),
                    size: s.size,
                }],
                json: Arc::new(j),
            });
        }
        Ok(out)
    }

    fn create_snapshot(&self, owner: &Owner, name: &str) -> Result<()> {
        check_snap_name(name)?;
        self.open(owner, None, true)?.snap_create(name)
    }

    /// A snapshot with clones cannot go (EBUSY); see [`RbdAccess::refuse_if_cloned`].
    fn delete_snapshot(&self, owner: &Owner, name: &str) -> Result<()> {
        let (pool, image) = self.volume(owner)?;
        let img = pool.open(image, None, true)?;
        if !img.snapshots()?.iter().any(|s| s.name == name) {
            return Err(Error::NotFound(format!("snapshot {name} of {owner}")));
        }
        RbdAccess::refuse_if_cloned(pool, image, name)?;
        RbdAccess::remove_snapshot(pool, image, &img, name)
    }

    fn rename_snapshot(&self, owner: &Owner, from: &str, to: &str) -> Result<()> {
        check_snap_name(to)?;
        self.open(owner, None, true)?.snap_rename(from, to)
    }

    fn records_lineage(&self, _owner: &Owner) -> bool {
        true
    }

    fn check_revert(&self, owner: &Owner, _snap: &SnapshotInfo) -> Result<()> {
        let (_, image) = self.volume(owner)?;
        if let Some(cloud) = cloud_owned(image) {
            return Err(Error::NotPermitted(format!(
                "{owner} is named like a {cloud} image: the cloud owns its state, revert it with \
                 the cloud's own command (e.g. cinder revert-to-snapshot, nova rebuild)"
            )));
        }
        refuse_if_watched(owner, &self.open(owner, None, true)?)
    }

    /// `rbd_snap_rollback`, only while nobody else has the image open: librbd would ask a
    /// running client for the exclusive lock and roll the disk back under it.
    fn revert_snapshot(&self, owner: &Owner, snap: &SnapshotInfo) -> Result<()> {
        let img = self.open(owner, None, true)?;
        refuse_if_watched(owner, &img)?;
        let started = std::time::Instant::now();
        img.snap_rollback(&snap.name)?;
        let secs = started.elapsed().as_secs_f64();
        info!(%owner, snapshot = %snap.name, secs, mib_per_s = snap.disks.first().map_or(0.0, |d| d.size as f64 / 1048576.0 / secs.max(1e-3)), "rbd rollback");
        Ok(())
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
        let (pool, image) = self.volume(owner)?;
        self.access.open_snapshot(pool, image, &snap.name)
    }
}

/// The cloud whose naming an RBD image follows: Nova's `<uuid>_disk*` (disk, .local, .swap,
/// .config, .eph0…), Cinder's `volume-<uuid>`, Glance's `<uuid>`. Such an image's state belongs
/// to the cloud's database: snapfs never reverts it.
fn cloud_owned(image: &str) -> Option<&'static str> {
    fn uuid(s: &str) -> bool {
        s.len() == 36
            && s.char_indices().all(|(i, c)| match i {
                8 | 13 | 18 | 23 => c == '-',
                _ => c.is_ascii_hexdigit(),
            })
    }
    if image.len() > 36 && uuid(&image[..36]) && image[36..].starts_with("_disk") {
        Some("Nova")
    } else if image.strip_prefix("volume-").is_some_and(uuid) {
        Some("Cinder")
    } else if uuid(image) {
        Some("Glance")
    } else {
        None
    }
}

/// EBUSY while a client other than our own writable open (one watcher) has the image open.
pub(crate) fn refuse_if_watched(owner: &Owner, img: &ceph::Image) -> Result<()> {
    let watchers = img.watchers()?;
    if watchers > 1 {
        return Err(Error::Busy(format!(
            "{owner} is open by {} other client(s) (a running VM, krbd, rbd-nbd): close it first",
            watchers - 1
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cloud_images_are_recognised_by_name() {
        let u = "6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b";
        assert_eq!(cloud_owned(&format!("{u}_disk")), Some("Nova"));
        assert_eq!(cloud_owned(&format!("{u}_disk.config")), Some("Nova"));
        assert_eq!(cloud_owned(&format!("volume-{u}")), Some("Cinder"));
        assert_eq!(cloud_owned(u), Some("Glance"));
        assert_eq!(cloud_owned("web-disk"), None);
        assert_eq!(cloud_owned(&format!("{u}x")), None);
        assert_eq!(cloud_owned(&format!("volume-{u}-extra")), None);
    }

    #[test]
    fn snapshot_names() {
        assert!(check_snap_name("before-upgrade").is_ok());
        assert_eq!(check_snap_name("a@b").unwrap_err().errno(), libc::EINVAL);
    }
}

//! The mounted tree of SPEC.md as paths, independent of any backend and of FUSE.
//!
//! A path (a list of file names below the mount) is parsed into a [`Node`]; every operation
//! is answered from the [`Registry`] of providers. Nothing here knows inode numbers.

pub mod bytelru;
pub mod files;
pub mod lineage;
pub mod names;
pub mod registry;
pub mod since;

use std::collections::{HashMap, HashSet};
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use lru::LruCache;
use tracing::{debug, info};

use crate::error::{Error, Result};
use crate::image::BlockImage;
use crate::provider::{Owner, Provider, SnapshotInfo, VOLUME_DISK};
use files::{FilesCache, FilesPath, GuestFile, FILES};
use lineage::{Lineage, SnapRef};
use names::{check_new_name, escape, unescape};
use registry::{lock, Registry};
use since::SINCE;

pub const INSTANCES: &str = "instances";
pub const VOLUMES: &str = "volumes";
pub const LAUNCH: &str = "launch";
pub const SNAPSHOTS: &str = ".snapshots";
pub const SNAPSHOT_JSON: &str = "snapshot.json";
pub const INSTANCE_JSON: &str = "instance.json";
pub const VOLUME_JSON: &str = "volume.json";
/// `<object>/current -> .snapshots/<snap>`: the snapshot the live state descends from.
pub const CURRENT: &str = "current";
/// `<snap>/parent -> ../<older>`: the snapshot that was current when it was taken.
pub const PARENT: &str = "parent";
/// A symlink made in an object directory (to rename onto `current`) lives this long unused.
const PENDING_TTL: Duration = Duration::from_secs(60);
/// Most pending links at once in the whole mount (each is a few dozen bytes).
const MAX_PENDING: usize = 4096;
const DISK_SUFFIX: &str = ".raw";

/// What a path names.
/// Extended attributes of an object directory that are its settings (`user.snapfs.memory`).
pub const SETTING_PREFIX: &str = "user.snapfs.";

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    Root,
    Instances,
    Volumes,
    Launch,
    Pool(String),
    Object(Owner),
    ObjectJson(Owner),
    Snaps(Owner),
    Snap(Owner, String),
    SnapJson(Owner, String),
    /// A disk of a snapshot: owner, snapshot, target.
    Disk(Owner, String, String),
    LaunchLink(String),
    /// `<object>/current`.
    Current(Owner),
    /// Any other name in an object directory: a pending link (made by `ln -s` to be renamed
    /// onto `current`), or nothing.
    ObjLink(Owner, String),
    /// `<snap>/parent`.
    SnapParent(Owner, String),
    /// `files/` of a snapshot or anything below it.
    Files(FilesPath),
    /// `<snap>/since/`: one directory per older snapshot.
    Since(Owner, String),
    /// `<snap>/since/<older>/`.
    SinceDir(Owner, String, String),
    /// `<snap>/since/<older>/<target>.raw`: owner, snapshot, older snapshot, target.
    SinceDisk(Owner, String, String, String),
    /// `<snap>/since/<older>/<target>.extents.json`.
    SinceJson(Owner, String, String, String),
    /// `<snap>/since/<older>/<target>.rbddiff`.
    SinceRbdDiff(Owner, String, String, String),
    /// A name inside a snapshot directory that is none of its files: never exists, never writable.
    InSnapshot,
}

impl Node {
    pub fn parse<S: AsRef<str>>(path: &[S]) -> Option<Node> {
        let p: Vec<&str> = path.iter().map(AsRef::as_ref).collect();
        Some(match p.as_slice() {
            [] => Node::Root,
            [INSTANCES] => Node::Instances,
            [VOLUMES] => Node::Volumes,
            [LAUNCH] => Node::Launch,
            [INSTANCES, i, rest @ ..] => {
                return object_node(Owner::Instance(unescape(i)), rest, INSTANCE_JSON)
            }
            [VOLUMES, pool] => Node::Pool(unescape(pool)),
            [VOLUMES, pool, v, rest @ ..] => {
                let owner = Owner::Volume {
                    pool: unescape(pool),
                    name: unescape(v),
                };
                return object_node(owner, rest, VOLUME_JSON);
            }
            [LAUNCH, n] => Node::LaunchLink(unescape(n)),
            _ => return None,
        })
    }

    /// Whether the path is a snapshot directory or lies inside one (writes there are EROFS).
    pub fn in_snapshot(&self) -> bool {
        matches!(
            self,
            Node::Snap(..)
                | Node::SnapJson(..)
                | Node::SnapParent(..)
                | Node::Disk(..)
                | Node::Files(_)
                | Node::Since(..)
                | Node::SinceDir(..)
                | Node::SinceDisk(..)
                | Node::SinceJson(..)
                | Node::SinceRbdDiff(..)
                | Node::InSnapshot
        )
    }
}

fn object_node(owner: Owner, rest: &[&str], json_name: &str) -> Option<Node> {
    Some(match rest {
        [] => Node::Object(owner),
        [j] if *j == json_name => Node::ObjectJson(owner),
        [CURRENT] => Node::Current(owner),
        [SNAPSHOTS] => Node::Snaps(owner),
        [n] => Node::ObjLink(owner, unescape(n)),
        [SNAPSHOTS, s] => Node::Snap(owner, unescape(s)),
        [SNAPSHOTS, s, f] if *f == SNAPSHOT_JSON => Node::SnapJson(owner, unescape(s)),
        [SNAPSHOTS, s, f] if *f == PARENT => Node::SnapParent(owner, unescape(s)),
        [SNAPSHOTS, s, f, rest @ ..] if *f == FILES => {
            Node::Files(FilesPath::parse(owner, unescape(s), rest))
        }
        [SNAPSHOTS, s, f, rest @ ..] if *f == SINCE => since::parse(owner, unescape(s), rest),
        [SNAPSHOTS, s, f] => match disk_target(&owner, f) {
            Some(t) => Node::Disk(owner, unescape(s), t),
            None => Node::InSnapshot,
        },
        [SNAPSHOTS, _, ..] => Node::InSnapshot,
        _ => return None,
    })
}

/// `vda.raw` → `vda` for instances; only `disk.raw` for volumes.
fn disk_target(owner: &Owner, file: &str) -> Option<String> {
    let stem = file.strip_suffix(DISK_SUFFIX)?;
    match owner {
        Owner::Instance(_) if !stem.is_empty() => Some(unescape(stem)),
        Owner::Volume { .. } if stem == VOLUME_DISK => Some(VOLUME_DISK.to_string()),
        _ => None,
    }
}

fn disk_file_name(target: &str) -> String {
    format!("{}{DISK_SUFFIX}", escape(target))
}

/// File types of the tree: the guest filesystems' own set, so `files/` maps one to one.
pub use crate::restore::FileKind as Kind;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    pub kind: Kind,
    pub size: u64,
    /// Allocated bytes (st_blocks × 512).
    pub allocated: u64,
    pub mtime: SystemTime,
    /// Mode bits, including setuid/setgid/sticky.
    pub perm: u16,
    /// (uid, gid) as stored in a guest filesystem; None: the user who mounted.
    pub owner: Option<(u32, u32)>,
    /// Link count as stored in a guest filesystem; None: 2 for directories, 1 otherwise.
    pub nlink: Option<u32>,
    pub atime: Option<SystemTime>,
    pub ctime: Option<SystemTime>,
    /// The inode number to report (guest files: the same for hard links); None: the node id.
    pub ino: Option<u64>,
    pub rdev: u32,
}

impl Stat {
    /// A guest file: its node id is derived from the snapshot's identity and its guest inode,
    /// so neither it nor (a directory) its entries ever change; the kernel may cache them long.
    pub fn fixed(&self) -> bool {
        self.ino.is_some()
    }

    pub fn new(kind: Kind, size: u64, allocated: u64, mtime: SystemTime, perm: u16) -> Stat {
        Stat {
            kind,
            size,
            allocated,
            mtime,
            perm,
            owner: None,
            nlink: None,
            atime: None,
            ctime: None,
            ino: None,
            rdev: 0,
        }
    }
}

/// An opened file's content, fixed for the life of the handle.
#[derive(Clone)]
pub enum Content {
    Bytes(Arc<Vec<u8>>),
    Disk(Arc<OpenDisk>),
    Guest(GuestFile),
}

/// A snapshot disk opened once and shared by every reader of it.
pub struct OpenDisk {
    pub image: Arc<dyn BlockImage>,
    allocated: OnceLock<u64>,
    /// For a `since/` disk: the changed extents it shows.
    changes: Option<Arc<crate::image::changes::Changes>>,
}

impl OpenDisk {
    /// Bytes of allocated data (computed once: the snapshot never changes).
    pub fn allocated(&self) -> u64 {
        *self.allocated.get_or_init(|| {
            crate::image::allocated_bytes(self.image.as_ref()).unwrap_or_else(|e| {
                crate::log_limit::warn_error("allocation", &e);
                0
            })
        })
    }
}

pub struct Namespace {
    reg: Registry,
    /// Where we are mounted, to accept absolute launch targets.
    mountpoint: PathBuf,
    started: SystemTime,
    disks: Mutex<LruCache<String, Arc<OpenDisk>>>,
    /// Owners with a snapshot operation under way, and the storage under them
    /// ([`Provider::storage_keys`]): a second operation on either is EBUSY.
    busy: Mutex<HashSet<BusyKey>>,
    files: Mutex<FilesCache>,
    /// Reads the subdirectories of listed guest directories ahead.
    prefetch: crate::restore::prefetch::Prefetcher,
    /// `current` and parents, for providers that keep none.
    lineage: Lineage,
    /// Links made in object directories, waiting to be renamed onto `current`:
    /// (owner, name) → (snapshot, last used).
    pending: Mutex<HashMap<(Owner, String), (String, Instant)>>,
    /// Take `before-revert-…` before a revert (`--revert-keep`).
    revert_keep: bool,
    /// Held while changed extents are computed (one pair at a time, never twice).
    since_busy: Mutex<()>,
}

/// What a snapshot operation marks busy: its owner, and each piece of storage under it (an
/// instance's disks are also volumes: CloudStack's rule, an instance snapshot while one of its
/// volumes is being snapshotted, or the reverse, is refused).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum BusyKey {
    Owner(Owner),
    Storage(String),
}

/// Releases an operation's busy marks on every way out.
struct BusyGuard<'a> {
    set: &'a Mutex<HashSet<BusyKey>>,
    keys: Vec<BusyKey>,
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        let mut set = lock(self.set);
        for k in &self.keys {
            set.remove(k);
        }
    }
}

const DIR_PERM: u16 = 0o755;
const FILE_PERM: u16 = 0o444;

impl Namespace {
    /// What the namespace's caches and tables hold ([`crate::memreport`]).
    pub fn memory(&self) -> Vec<crate::memreport::Held> {
        use crate::memreport::Held;
        let disks = lock(&self.disks).len();
        let pending = lock(&self.pending).len();
        let mut v = lock(&self.files).memory();
        // Counts only: an open disk's own caches are in the block cache, and a pending link
        // is a few dozen bytes (its names at most 255 bytes each).
        v.push(Held::new("open_disks", disks, 0));
        v.push(Held::new("pending_links", pending, pending * 640));
        v
    }

    pub fn new(providers: Vec<Arc<dyn Provider>>, mountpoint: PathBuf, ttl: Duration) -> Self {
        Namespace {
            reg: Registry::new(providers, ttl),
            mountpoint,
            started: SystemTime::now(),
            disks: Mutex::new(LruCache::new(
                NonZeroUsize::new(256).unwrap_or(NonZeroUsize::MIN),
            )),
            busy: Mutex::new(HashSet::new()),
            files: Mutex::new(FilesCache::new(32)),
            prefetch: Default::default(),
            lineage: Lineage::new(None),
            pending: Mutex::new(HashMap::new()),
            revert_keep: true,
            since_busy: Mutex::new(()),
        }
    }

    /// Keep lineage records under `state_dir/lineage`; `revert_keep` false skips the
    /// `before-revert-…` snapshot.
    pub fn with_state(mut self, state_dir: &std::path::Path, revert_keep: bool) -> Self {
        self.lineage = Lineage::new(Some(state_dir.join("lineage")));
        self.revert_keep = revert_keep;
        self
    }

    pub fn registry(&self) -> &Registry {
        &self.reg
    }

    fn dir(&self, mtime: SystemTime) -> Stat {
        Stat::new(Kind::Dir, 0, 0, mtime, DIR_PERM)
    }

    fn file(&self, size: u64, mtime: SystemTime) -> Stat {
        Stat::new(Kind::File, size, size.div_ceil(512) * 512, mtime, FILE_PERM)
    }

    fn exists(&self, owner: &Owner) -> Result<()> {
        self.reg.provider(owner).map(|_| ())
    }

    pub fn stat(&self, node: &Node) -> Result<Stat> {
        Ok(match node {
            Node::Root | Node::Instances | Node::Volumes | Node::Launch => self.dir(self.started),
            Node::Pool(p) => {
                let pools = self.reg.pools()?;
                if !pools.iter().any(|(n, _)| n == p) {
                    return Err(pools.missing(&format!("pool {p}")));
                }
                self.dir(self.started)
            }
            Node::Object(o) => self.dir(self.reg.info(o)?.mtime),
            Node::ObjectJson(o) => {
                let info = self.reg.info(o)?;
                self.file(json_bytes(&info.json).len() as u64, info.mtime)
            }
            Node::Snaps(o) => {
                self.exists(o)?;
                self.dir(self.started)
            }
            Node::Snap(o, s) => self.dir(self.reg.snapshot(o, s)?.created),
            Node::SnapJson(o, s) => {
                let snap = self.reg.snapshot(o, s)?;
                self.file(self.snapshot_json(o, &snap)?.len() as u64, snap.created)
            }
            Node::Disk(o, s, t) => {
                let snap = self.reg.snapshot(o, s)?;
                let disk = self.open_disk(o, &snap, t)?;
                Stat::new(
                    Kind::File,
                    disk.image.size(),
                    disk.allocated(),
                    snap.created,
                    FILE_PERM,
                )
            }
            Node::LaunchLink(n) => {
                let target = self.launch_target(&Node::LaunchLink(n.clone()))?;
                Stat::new(Kind::Symlink, target.len() as u64, 0, self.started, 0o777)
            }
            Node::Current(_) | Node::ObjLink(..) | Node::SnapParent(..) => {
                let target = self.link_target(node)?;
                Stat::new(Kind::Symlink, target.len() as u64, 0, self.started, 0o777)
            }
            Node::Files(p) => self.files_stat(p)?,
            Node::Since(..)
            | Node::SinceDir(..)
            | Node::SinceDisk(..)
            | Node::SinceJson(..)
            | Node::SinceRbdDiff(..) => self.since_stat(node)?,
            Node::InSnapshot => return Err(Error::NotFound("no such file in snapshot".into())),
        })
    }

    /// The attributes of every child of `node` by node id, read in one pass where that is
    /// cheaper than a lookup per name (a guest directory: resolved once, each child's inode
    /// read directly). Empty where there is no such shortcut or it failed; callers then look
    /// each name up.
    pub fn child_stats(&self, node: &Node) -> HashMap<u64, Stat> {
        match node {
            Node::Files(p) => self.files_child_stats(p).unwrap_or_default(),
            _ => HashMap::new(),
        }
    }

    /// Children of a directory: (file name, kind, inode number it must have, if any).
    pub fn list(&self, node: &Node) -> Result<Vec<(String, Kind, Option<u64>)>> {
        let dirs = |names: &mut dyn Iterator<Item = &String>| -> Vec<(String, Kind, Option<u64>)> {
            names
                .map(|n| escape(n))
                .filter(|n| {
                    // The kernel cannot pass such a name back to us: hide it, say so.
                    let fits = n.len() <= names::NAME_MAX;
                    if !fits {
                        crate::input_warn!(
                            "names",
                            "backend name longer than 255 bytes is not shown: {}",
                            crate::log_limit::esc(&names::to_bytes(n))
                        );
                    }
                    fits
                })
                .map(|n| (n, Kind::Dir, None))
                .collect()
        };
        Ok(match node {
            Node::Root => [INSTANCES, VOLUMES, LAUNCH]
                .iter()
                .map(|n| (n.to_string(), Kind::Dir, None))
                .collect(),
            Node::Instances => dirs(&mut self.reg.instances()?.iter().map(|(n, _)| n)),
            Node::Volumes => dirs(&mut self.reg.pools()?.iter().map(|(n, _)| n)),
            Node::Pool(p) => dirs(&mut self.reg.volumes(p)?.iter()),
            Node::Object(o) => {
                self.exists(o)?;
                let json = match o {
                    Owner::Instance(_) => INSTANCE_JSON,
                    Owner::Volume { .. } => VOLUME_JSON,
                };
                let mut v = vec![
                    (json.to_string(), Kind::File, None),
                    (SNAPSHOTS.to_string(), Kind::Dir, None),
                ];
                // Best effort: a backend that cannot list snapshots still lists the object.
                if matches!(self.current_of(o), Ok(Some(_))) {
                    v.push((CURRENT.to_string(), Kind::Symlink, None));
                }
                v.extend(
                    self.pending_links(o)
                        .into_iter()
                        .map(|n| (escape(&n), Kind::Symlink, None)),
                );
                v
            }
            Node::Snaps(o) => dirs(&mut self.reg.snapshots(o)?.iter().map(|s| &s.name)),
            Node::Snap(o, s) => {
                let snap = self.reg.snapshot(o, s)?;
                let mut v = vec![(SNAPSHOT_JSON.to_string(), Kind::File, None)];
                v.extend(
                    snap.disks
                        .iter()
                        .map(|d| (disk_file_name(&d.target), Kind::File, None)),
                );
                v.push((FILES.to_string(), Kind::Dir, None));
                v.push((SINCE.to_string(), Kind::Dir, None));
                if matches!(self.parent_of(o, &snap), Ok(Some(_))) {
                    v.push((PARENT.to_string(), Kind::Symlink, None));
                }
                v
            }
            Node::Launch => self
                .reg
                .launches()?
                .iter()
                .map(|(l, _)| (escape(&l.name), Kind::Symlink, None))
                .collect(),
            Node::Files(p) => self.files_list(p)?,
            Node::Since(..) | Node::SinceDir(..) => self.since_list(node)?,
            _ => return Err(Error::NotDir(format!("{node:?}"))),
        })
    }

    pub fn open(&self, node: &Node) -> Result<Content> {
        Ok(match node {
            Node::ObjectJson(o) => Content::Bytes(Arc::new(json_bytes(&self.reg.info(o)?.json))),
            Node::SnapJson(o, s) => {
                let snap = self.reg.snapshot(o, s)?;
                Content::Bytes(Arc::new(self.snapshot_json(o, &snap)?))
            }
            Node::Disk(o, s, t) => {
                let snap = self.reg.snapshot(o, s)?;
                Content::Disk(self.open_disk(o, &snap, t)?)
            }
            Node::Files(p) => self.files_open(p)?,
            Node::SinceDisk(..) | Node::SinceJson(..) | Node::SinceRbdDiff(..) => {
                self.since_open(node)?
            }
            Node::LaunchLink(_) | Node::Current(_) | Node::ObjLink(..) | Node::SnapParent(..) => {
                return Err(Error::Invalid("open of a symlink".into()))
            }
            _ => return Err(Error::IsDir(format!("{node:?}"))),
        })
    }

    fn open_disk(&self, owner: &Owner, snap: &SnapshotInfo, target: &str) -> Result<Arc<OpenDisk>> {
        if !snap.disks.iter().any(|d| d.target == target) {
            return Err(Error::NotFound(format!(
                "disk {target} in snapshot {} of {owner}",
                snap.name
            )));
        }
        let key = disk_key(owner, snap, target);
        if let Some(d) = lock(&self.disks).get(&key) {
            return Ok(d.clone());
        }
        let image = self.reg.provider(owner)?.open_disk(owner, snap, target)?;
        let disk = Arc::new(OpenDisk {
            image,
            allocated: OnceLock::new(),
            changes: None,
        });
        lock(&self.disks).put(key, disk.clone());
        Ok(disk)
    }

    fn forget_disks(&self, owner: &Owner, snap: &str) {
        let prefix = format!("{owner:?}\0{snap}\0");
        let mut disks = lock(&self.disks);
        let stale: Vec<String> = disks
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .map(|(k, _)| k.clone())
            .collect();
        for k in stale {
            disks.pop(&k);
        }
    }

    pub fn readlink(&self, node: &Node) -> Result<Vec<u8>> {
        match node {
            Node::Files(p) => self.files_readlink(p),
            Node::LaunchLink(_) => self.launch_target(node).map(String::into_bytes),
            _ => self.link_target(node).map(String::into_bytes),
        }
    }

    /// The snapshots of `owner` when snapfs keeps its lineage (None: the provider keeps none).
    fn lineage_snaps(&self, owner: &Owner) -> Result<Option<Arc<Vec<SnapshotInfo>>>> {
        if !self.reg.provider(owner)?.records_lineage(owner) {
            return Ok(None);
        }
        Ok(Some(self.reg.snapshots(owner)?))
    }

    fn current_of(&self, owner: &Owner) -> Result<Option<SnapshotInfo>> {
        Ok(self
            .lineage_snaps(owner)?
            .and_then(|snaps| self.lineage.current(owner, &snaps).cloned()))
    }

    fn parent_of(&self, owner: &Owner, snap: &SnapshotInfo) -> Result<Option<SnapshotInfo>> {
        Ok(self
            .lineage_snaps(owner)?
            .and_then(|snaps| self.lineage.parent(owner, snap, &snaps).cloned()))
    }

    /// snapshot.json; with snapfs's lineage, `parent` and `children` as it records them.
    fn snapshot_json(&self, owner: &Owner, snap: &SnapshotInfo) -> Result<Vec<u8>> {
        let Some(snaps) = self.lineage_snaps(owner)? else {
            return Ok(json_bytes(&snap.json));
        };
        let mut j = (*snap.json).clone();
        if let Some(obj) = j.as_object_mut() {
            let parent = self
                .lineage
                .parent(owner, snap, &snaps)
                .map(|p| p.name.clone());
            let children: Vec<&str> = snaps
                .iter()
                .filter(|c| {
                    self.lineage
                        .parent(owner, c, &snaps)
                        .is_some_and(|p| p.id == snap.id)
                })
                .map(|c| c.name.as_str())
                .collect();
            obj.insert("parent".into(), serde_json::json!(parent));
            obj.insert("children".into(), serde_json::json!(children));
        }
        Ok(json_bytes(&j))
    }

    /// Live pending links of `owner` (expired ones are dropped).
    fn pending_links(&self, owner: &Owner) -> Vec<String> {
        let mut p = lock(&self.pending);
        p.retain(|_, (_, used)| used.elapsed() < PENDING_TTL);
        let mut v: Vec<String> = p
            .keys()
            .filter(|(o, _)| o == owner)
            .map(|(_, n)| n.clone())
            .collect();
        v.sort();
        v
    }

    fn pending_target(&self, owner: &Owner, name: &str) -> Option<String> {
        let mut p = lock(&self.pending);
        let e = p.get_mut(&(owner.clone(), name.to_string()))?;
        if e.1.elapsed() >= PENDING_TTL {
            p.remove(&(owner.clone(), name.to_string()));
            return None;
        }
        e.1 = Instant::now();
        Some(e.0.clone())
    }

    /// The target of `current`, a pending link, or a snapshot's `parent`.
    fn link_target(&self, node: &Node) -> Result<String> {
        match node {
            Node::Current(o) => self
                .current_of(o)?
                .map(|s| format!("{SNAPSHOTS}/{}", escape(&s.name)))
                .ok_or_else(|| Error::NotFound(format!("{o} has no current snapshot"))),
            Node::ObjLink(o, n) => {
                self.exists(o)?;
                self.pending_target(o, n)
                    .map(|s| format!("{SNAPSHOTS}/{}", escape(&s)))
                    .ok_or_else(|| Error::NotFound(format!("{n} in {o}")))
            }
            Node::SnapParent(o, s) => {
                let snap = self.reg.snapshot(o, s)?;
                self.parent_of(o, &snap)?
                    .map(|p| format!("../{}", escape(&p.name)))
                    .ok_or_else(|| Error::NotFound(format!("snapshot {s} of {o} has no parent")))
            }
            _ => Err(Error::Invalid("not a symlink".into())),
        }
    }

    /// Extended attributes (only guest files have any).
    pub fn xattrs(&self, node: &Node) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        match node {
            Node::Files(p) => self.files_xattrs(p),
            Node::Object(o) => Ok(self
                .reg
                .provider(o)?
                .settings(o)?
                .into_iter()
                .map(|(n, v)| (format!("{SETTING_PREFIX}{n}").into_bytes(), v.into_bytes()))
                .collect()),
            _ => Ok(Vec::new()),
        }
    }

    /// setxattr (`Some`) or removexattr (`None`) of `name` on `node`: only the settings of an
    /// object directory (`user.snapfs.<setting>`) can be changed.
    pub fn set_xattr(&self, node: &Node, name: &[u8], value: Option<&[u8]>) -> Result<()> {
        let Node::Object(o) = node else {
            return Err(Self::refusal(Some(node), "setxattr"));
        };
        let setting = std::str::from_utf8(name)
            .ok()
            .and_then(|n| n.strip_prefix(SETTING_PREFIX))
            .ok_or_else(|| {
                Error::NotSupported(format!(
                    "{}: only {SETTING_PREFIX}* attributes can be set on {o}",
                    String::from_utf8_lossy(name)
                ))
            })?;
        let value = match value {
            None => None,
            Some(v) => Some(std::str::from_utf8(v).map_err(|_| {
                Error::Invalid(format!("value of {SETTING_PREFIX}{setting} is not UTF-8"))
            })?),
        };
        self.reg.provider(o)?.set_setting(o, setting, value)
    }

    fn launch_target(&self, node: &Node) -> Result<String> {
        let Node::LaunchLink(n) = node else {
            return Err(Error::Invalid("not a symlink".into()));
        };
        let launches = self.reg.launches()?;
        let (l, _) = launches
            .iter()
            .find(|(l, _)| &l.name == n)
            .ok_or_else(|| launches.missing(&format!("launch {n}")))?;
        Ok(format!(
            "../{INSTANCES}/{}/{SNAPSHOTS}/{}",
            escape(&l.instance),
            escape(&l.snapshot)
        ))
    }

    /// The error for a write-type operation on a path that does not support it.
    pub fn refusal(node: Option<&Node>, what: &str) -> Error {
        match node {
            Some(n) if n.in_snapshot() => {
                Error::ReadOnly(format!("{what}: snapshot contents are read-only"))
            }
            _ => Error::NotPermitted(format!("{what}: not a place snapfs can change")),
        }
    }

    /// Mark `owner` and its storage busy for one snapshot operation, or `EBUSY` if another
    /// operation holds either. Storage the provider cannot name now (a disk it cannot read) is
    /// left out: the owner's own mark still holds, and the backend's own locks stay the last
    /// word.
    fn begin(&self, owner: &Owner) -> Result<BusyGuard<'_>> {
        let storage = match self.reg.provider(owner).and_then(|p| p.storage_keys(owner)) {
            Ok(k) => k,
            Err(e) => {
                tracing::debug!(%owner, error = %e, "storage under the owner not known");
                Vec::new()
            }
        };
        let mut keys = vec![BusyKey::Owner(owner.clone())];
        keys.extend(storage.into_iter().map(BusyKey::Storage));
        keys.dedup();
        let mut set = lock(&self.busy);
        if let Some(k) = keys.iter().find(|k| set.contains(k)) {
            return Err(Error::Busy(match k {
                BusyKey::Owner(_) => {
                    format!("another snapshot operation on {owner} is in progress")
                }
                BusyKey::Storage(s) => format!(
                    "a snapshot operation on {s} (storage of {owner}, through another \
                     instance or volume) is in progress"
                ),
            }));
        }
        set.extend(keys.iter().cloned());
        drop(set);
        Ok(BusyGuard {
            set: &self.busy,
            keys,
        })
    }

    /// mkdir: take a snapshot. `file_name` is the name as typed, for the name checks.
    pub fn mkdir(&self, node: &Node, file_name: &str) -> Result<()> {
        let Node::Snap(owner, snap) = node else {
            return Err(Self::refusal(Some(node), "mkdir"));
        };
        check_new_name(file_name)?;
        let provider = self.reg.provider(owner)?;
        let _busy = self.begin(owner)?;
        failpoint("mkdir-busy");
        if self.reg.snapshots(owner)?.iter().any(|s| &s.name == snap) {
            return Err(Error::Exists(format!("snapshot {snap} of {owner}")));
        }
        let prev = self.current_of(owner)?;
        let started = std::time::Instant::now();
        let res = provider.create_snapshot(owner, snap);
        self.reg.changed(owner);
        res?;
        info!(%owner, %snap, ms = started.elapsed().as_millis() as u64, "snapshot created");
        self.record_created(owner, snap, prev);
        Ok(())
    }

    /// Lineage after a snapshot was made: it is current, `prev` its parent.
    fn record_created(&self, owner: &Owner, snap: &str, prev: Option<SnapshotInfo>) {
        if !self
            .reg
            .provider(owner)
            .is_ok_and(|p| p.records_lineage(owner))
        {
            return;
        }
        match self.reg.snapshot(owner, snap) {
            Ok(new) => {
                self.lineage
                    .created(owner, SnapRef::of(&new), prev.as_ref().map(SnapRef::of))
            }
            Err(e) => {
                tracing::warn!(%owner, %snap, error = %e, "new snapshot not listed; lineage not recorded")
            }
        }
    }

    /// rmdir: delete a snapshot.
    pub fn rmdir(&self, node: &Node) -> Result<()> {
        let Node::Snap(owner, snap) = node else {
            return Err(Self::refusal(Some(node), "rmdir"));
        };
        let provider = self.reg.provider(owner)?;
        let _busy = self.begin(owner)?;
        let gone = self.reg.snapshot(owner, snap)?;
        let res = provider.delete_snapshot(owner, snap);
        self.reg.changed(owner);
        self.forget_disks(owner, snap);
        res?;
        info!(%owner, %snap, "snapshot deleted");
        if provider.records_lineage(owner) {
            self.lineage.deleted(owner, &SnapRef::of(&gone));
        }
        Ok(())
    }

    pub fn rename(&self, from: &Node, to: &Node, to_file_name: &str) -> Result<()> {
        match (from, to) {
            // `ln -sfn .snapshots/s1 current`, `mv -T tmp current`, os.replace(tmp, current).
            (Node::ObjLink(o, n), Node::Current(o2)) if o == o2 => {
                let snap = self
                    .pending_target(o, n)
                    .ok_or_else(|| Error::NotFound(format!("{n} in {o}")))?;
                self.revert(o, &snap)?;
                lock(&self.pending).remove(&(o.clone(), n.clone()));
                return Ok(());
            }
            (Node::ObjLink(o, n), Node::ObjLink(o2, m)) if o == o2 => {
                check_new_name(to_file_name)?;
                let snap = self
                    .pending_target(o, n)
                    .ok_or_else(|| Error::NotFound(format!("{n} in {o}")))?;
                let mut p = lock(&self.pending);
                p.remove(&(o.clone(), n.clone()));
                p.insert((o.clone(), m.clone()), (snap, Instant::now()));
                return Ok(());
            }
            (Node::Current(o), _) => {
                return Err(Error::NotPermitted(format!(
                    "{o}/current moves only by reverting: rename a link onto it"
                )))
            }
            (_, Node::Current(o)) | (Node::ObjLink(o, _), _) => {
                return Err(Error::Invalid(format!(
                    "only a link to a snapshot of {o} can be renamed onto its current"
                )))
            }
            _ => {}
        }
        let (Node::Snap(o1, a), Node::Snap(o2, b)) = (from, to) else {
            return Err(match (from, to) {
                (Node::Snap(..), _) | (_, Node::Snap(..)) => {
                    Error::CrossDevice("a snapshot stays in its own .snapshots".into())
                }
                _ => Self::refusal(Some(if from.in_snapshot() { from } else { to }), "rename"),
            });
        };
        if o1 != o2 {
            return Err(Error::CrossDevice(format!(
                "snapshots move only within one instance or volume ({o1} → {o2})"
            )));
        }
        check_new_name(to_file_name)?;
        let provider = self.reg.provider(o1)?;
        let _busy = self.begin(o1)?;
        let snaps = self.reg.snapshots(o1)?;
        if !snaps.iter().any(|s| &s.name == a) {
            return Err(Error::NotFound(format!("snapshot {a} of {o1}")));
        }
        if a == b {
            return Ok(());
        }
        if snaps.iter().any(|s| &s.name == b) {
            return Err(Error::Exists(format!("snapshot {b} of {o1}")));
        }
        let res = provider.rename_snapshot(o1, a, b);
        self.reg.changed(o1);
        self.forget_disks(o1, a);
        res?;
        if provider.records_lineage(o1) {
            self.lineage.renamed(o1, a, b);
        }
        Ok(())
    }

    /// Revert `owner` to its snapshot `snap`: first keep the state being discarded as
    /// `before-revert-<time>` (unless `--revert-keep=no`), then the backend's revert. The
    /// lineage gets an intent before the backend is asked and the new `current` only once it
    /// answered: a daemon killed in between leaves the intent, which the next one resolves by
    /// asking the backend ([`Namespace::recover_reverts`]).
    fn revert(&self, owner: &Owner, snap: &str) -> Result<()> {
        let listed = std::time::Instant::now();
        let provider = self.reg.provider(owner)?;
        let _busy = self.begin(owner)?;
        let snaps = self.reg.snapshots(owner)?;
        let list_ms = listed.elapsed().as_millis() as u64;
        let target = snaps
            .iter()
            .find(|s| s.name == snap)
            .cloned()
            .ok_or_else(|| Error::Invalid(format!("snapshot {snap} of {owner} is gone")))?;
        let checked = std::time::Instant::now();
        provider.check_revert(owner, &target)?;
        let check_ms = checked.elapsed().as_millis() as u64;
        if self.revert_keep {
            let stamp = rfc3339_name(SystemTime::now());
            let mut keep = format!("before-revert-{stamp}");
            for i in 2.. {
                if !snaps.iter().any(|s| s.name == keep) {
                    break;
                }
                keep = format!("before-revert-{stamp}-{i}");
            }
            let prev = self.current_of(owner)?;
            let res = provider.keep_before_revert(owner, &target, &keep);
            self.reg.changed(owner);
            res?;
            info!(%owner, snapshot = %keep, "kept the state being reverted");
            self.record_created(owner, &keep, prev);
        }
        let records = provider.records_lineage(owner);
        if records {
            self.lineage.begin_revert(owner, SnapRef::of(&target));
        }
        failpoint("revert-before-backend");
        let started = std::time::Instant::now();
        let res = provider.revert_snapshot(owner, &target);
        self.reg.changed(owner);
        if let Err(e) = res {
            if records {
                self.lineage.revert_failed(owner);
            }
            return Err(e);
        }
        failpoint("revert-after-backend");
        if records {
            self.lineage.reverted(owner, SnapRef::of(&target));
        }
        info!(%owner, %snap, ms = started.elapsed().as_millis() as u64, list_ms, check_ms, "reverted");
        Ok(())
    }

    /// At start-up, before the mount serves: reverts a killed daemon began. The backend tells
    /// whether each happened (`current` becomes the target) or not (`current` stays); where it
    /// cannot tell (an RBD rollback runs in the daemon and may have stopped half way), the
    /// revert is done again, so the instance or volume ends fully reverted. Returns how many
    /// were resolved; one that cannot be resolved now keeps its intent for the next start.
    pub fn recover_reverts(&self) -> usize {
        let mut n = 0;
        for (owner, to) in self.lineage.interrupted() {
            match self.recover_revert(&owner, &to) {
                Ok(()) => n += 1,
                Err(Error::NotFound(what)) => {
                    tracing::warn!(%owner, snapshot = %to.name, %what, "a revert a previous daemon was killed in: the instance or volume is gone, its intent is dropped");
                    self.lineage.revert_failed(&owner);
                }
                Err(e) => {
                    tracing::error!(%owner, snapshot = %to.name, error = %e, "cannot resolve a revert a previous daemon was killed in: current stays as it was; snapfs tries again at its next start")
                }
            }
        }
        n
    }

    fn recover_revert(&self, owner: &Owner, to: &SnapRef) -> Result<()> {
        let provider = self.reg.provider(owner)?;
        let snaps = self.reg.snapshots(owner)?;
        let Some(target) = to.find(&snaps).cloned() else {
            tracing::warn!(%owner, snapshot = %to.name, "a revert a previous daemon was killed in: its snapshot is gone, current stays");
            self.lineage.revert_failed(owner);
            return Ok(());
        };
        match provider.reverted_to(owner, &target)? {
            Some(true) => {
                tracing::warn!(%owner, snapshot = %target.name, "a revert a previous daemon was killed in had happened: current is its snapshot");
                self.lineage.reverted(owner, SnapRef::of(&target));
            }
            Some(false) => {
                tracing::warn!(%owner, snapshot = %target.name, "a revert a previous daemon was killed in had not happened: current stays");
                self.lineage.revert_failed(owner);
            }
            None => {
                tracing::warn!(%owner, snapshot = %target.name, "a revert a previous daemon was killed in may have stopped part way: doing it again");
                // The killed daemon's own opens stay watchers of the images until the OSDs
                // time them out (osd_client_watch_timeout, 30 s by default): EBUSY that long.
                let waiting = std::time::Instant::now();
                loop {
                    match provider.check_revert(owner, &target) {
                        Err(Error::Busy(m)) if waiting.elapsed() < RECOVERY_BUSY_WAIT => {
                            tracing::info!(%owner, reason = %m, "waiting for the killed daemon's watches to time out");
                            std::thread::sleep(Duration::from_secs(2));
                        }
                        other => break other?,
                    }
                }
                let started = std::time::Instant::now();
                let res = provider.revert_snapshot(owner, &target);
                self.reg.changed(owner);
                res?;
                self.lineage.reverted(owner, SnapRef::of(&target));
                info!(%owner, snapshot = %target.name, ms = started.elapsed().as_millis() as u64, "interrupted revert finished");
            }
        }
        Ok(())
    }

    /// symlink in launch/: boot a new instance from an instance snapshot.
    pub fn symlink(&self, node: &Node, file_name: &str, target: &str) -> Result<()> {
        match node {
            Node::ObjLink(o, n) => {
                check_new_name(file_name)?;
                let started = Instant::now();
                let snap = self.parse_object_link_target(o, target)?;
                debug!(owner = %o, link = %n, %snap, ms = started.elapsed().as_millis() as u64, "pending link to a snapshot");
                let mut p = lock(&self.pending);
                p.retain(|_, (_, used)| used.elapsed() < PENDING_TTL);
                let key = (o.clone(), n.clone());
                if p.contains_key(&key) {
                    return Err(Error::Exists(format!("{n} in {o}")));
                }
                if p.len() >= MAX_PENDING {
                    return Err(Error::NoSpace(format!(
                        "{MAX_PENDING} links already wait to be renamed onto a current"
                    )));
                }
                p.insert(key, (snap, Instant::now()));
                return Ok(());
            }
            Node::Current(o) => {
                if self.current_of(o)?.is_some() {
                    return Err(Error::Exists(format!("{o}/current")));
                }
                let snap = self.parse_object_link_target(o, target)?;
                return self.revert(o, &snap);
            }
            _ => {}
        }
        let Node::LaunchLink(new) = node else {
            return Err(Self::refusal(Some(node), "symlink"));
        };
        check_new_name(file_name)?;
        let (instance, snap) = self.parse_launch_target(target)?;
        let instances = self.reg.instances()?;
        let launches = self.reg.launches()?;
        if instances.iter().any(|(n, _)| n == new) || launches.iter().any(|(l, _)| &l.name == new) {
            return Err(Error::Exists(format!("instance {new}")));
        }
        if !launches.complete() {
            return Err(launches.missing(&format!("whether launch {new} exists")));
        }
        if !instances.complete() {
            // A backend that does not answer may hold that name already.
            return Err(instances.missing(&format!("whether instance {new} exists")));
        }
        let owner = Owner::Instance(instance.clone());
        let provider = self.reg.provider(&owner)?;
        let res = provider.launch(new, &instance, &snap);
        self.reg.instances_changed();
        self.reg.changed(&owner);
        res?;
        info!(%new, %instance, %snap, "launched");
        Ok(())
    }

    /// The name a launch `launch/<new>` of `target` is listed under when that is not `new`:
    /// `<new>@<host>` for a snapshot of `<instance>@<host>` (several hosts in one mount).
    pub fn launched_as(&self, new: &str, target: &str) -> Option<String> {
        if new.contains('@') {
            return None;
        }
        let (instance, _) = self.parse_launch_target(target).ok()?;
        let (_, host) = instance.rsplit_once('@')?;
        let full = format!("{new}@{host}");
        self.reg
            .launches()
            .ok()?
            .iter()
            .any(|(l, _)| l.name == full)
            .then_some(full)
    }

    /// `../instances/web/.snapshots/s1` (relative to launch/) or an absolute path in this mount.
    fn parse_launch_target(&self, target: &str) -> Result<(String, String)> {
        match self.resolve_target(&[LAUNCH.to_string()], target) {
            Some(Node::Snap(Owner::Instance(i), s))
                if self.reg.snapshot(&Owner::Instance(i.clone()), &s).is_ok() =>
            {
                Ok((i, s))
            }
            _ => Err(Error::Invalid(format!(
                "{target}: not an instance snapshot directory of this mount"
            ))),
        }
    }

    /// `.snapshots/s1` (relative to the object's directory) or an absolute path in this mount,
    /// naming an existing snapshot of `owner`: its name.
    fn parse_object_link_target(&self, owner: &Owner, target: &str) -> Result<String> {
        let base: Vec<String> = match owner {
            Owner::Instance(i) => vec![INSTANCES.into(), escape(i)],
            Owner::Volume { pool, name } => vec![VOLUMES.into(), escape(pool), escape(name)],
        };
        match self.resolve_target(&base, target) {
            Some(Node::Snap(o, s)) if &o == owner && self.reg.snapshot(owner, &s).is_ok() => Ok(s),
            _ => Err(Error::Invalid(format!(
                "{target}: not a snapshot of {owner} (a link here must point into its own .snapshots)"
            ))),
        }
    }

    /// The node a symlink target names, for a link living in directory `base` (components
    /// below the mount); an absolute target must lie inside this mount.
    fn resolve_target(&self, base: &[String], target: &str) -> Option<Node> {
        let mut comps: Vec<String> = Vec::new();
        let rel = if let Some(abs) = target.strip_prefix('/') {
            let mp = self.mountpoint.to_string_lossy();
            let mp = mp.trim_start_matches('/');
            let rest = abs.strip_prefix(mp)?;
            if !(rest.is_empty() || rest.starts_with('/')) {
                return None;
            }
            rest.to_string()
        } else {
            comps.extend(base.iter().cloned());
            target.to_string()
        };
        for c in rel.split('/') {
            match c {
                "" | "." => {}
                ".." => {
                    comps.pop()?;
                }
                c => comps.push(c.to_string()),
            }
        }
        Node::parse(&comps)
    }

    /// unlink in launch/: forget a launch record (the instance keeps running).
    pub fn unlink(&self, node: &Node) -> Result<()> {
        match node {
            Node::ObjLink(o, n) => {
                return lock(&self.pending)
                    .remove(&(o.clone(), n.clone()))
                    .map(|_| ())
                    .ok_or_else(|| Error::NotFound(format!("{n} in {o}")))
            }
            Node::Current(o) => {
                return Err(Error::NotPermitted(format!(
                    "{o}/current cannot be removed: switch it to revert"
                )))
            }
            _ => {}
        }
        let Node::LaunchLink(name) = node else {
            return Err(Self::refusal(Some(node), "unlink"));
        };
        let launches = self.reg.launches()?;
        let (_, i) = launches
            .iter()
            .find(|(l, _)| &l.name == name)
            .ok_or_else(|| launches.missing(&format!("launch {name}")))?;
        let res = self.reg.provider_at(*i)?.forget_launch(name);
        self.reg.instances_changed();
        res
    }
}

/// The cache key of one disk of one snapshot. A namesake made after a delete has another id
/// or creation time, so it never hits the old entry.
fn disk_key(owner: &Owner, snap: &SnapshotInfo, target: &str) -> String {
    let created = snap
        .created
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!("{owner:?}\0{}\0{}\0{created}\0{target}", snap.name, snap.id)
}

/// How long the start-up waits for a busy image before doing an interrupted revert again.
const RECOVERY_BUSY_WAIT: Duration = Duration::from_secs(45);

/// Whether `SNAPFS_FAILPOINT` (read once) names `name`.
fn failpoint_is(name: &str) -> bool {
    static POINT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    POINT
        .get_or_init(|| std::env::var("SNAPFS_FAILPOINT").ok())
        .as_deref()
        == Some(name)
}

/// A test hook: with `SNAPFS_FAILPOINT=<name>` in the daemon's environment, the daemon stops
/// at the point `name` (logging that it did) for ten minutes, so a test can kill it there.
/// Points: `revert-before-backend`, `revert-after-backend`, `revert-rbd-after-a-disk` (an
/// RBD-backed instance's revert, after the first disk's rollback), `mkdir-busy` (a mkdir that
/// holds its busy marks, for `SNAPFS_FAILPOINT_HOLD`).
pub(crate) fn failpoint(name: &str) {
    if !failpoint_is(name) {
        return;
    }
    tracing::warn!(failpoint = name, "failpoint reached: pausing");
    // With SNAPFS_FAILPOINT_HOLD=FILE the pause lasts while FILE exists (a test releases it),
    // else 600 s (a test kills the daemon there).
    let until = Instant::now() + Duration::from_secs(600);
    match std::env::var_os("SNAPFS_FAILPOINT_HOLD") {
        Some(f) => {
            while std::path::Path::new(&f).exists() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(20));
            }
            tracing::warn!(failpoint = name, "failpoint released");
        }
        None => std::thread::sleep(Duration::from_secs(600)),
    }
}

/// An injected failure for the tests: true when `SNAPFS_FAILPOINT` names `name`, and the
/// caller then fails as if its backend had (logged, so a test can wait for it).
pub(crate) fn failpoint_fails(name: &str) -> bool {
    let hit = failpoint_is(name);
    if hit {
        tracing::warn!(failpoint = name, "failpoint reached: failing here");
    }
    hit
}

/// RFC 3339 UTC with `-` for `:`, for snapshot names (`before-revert-2026-12-06T03-55-12Z`).
fn rfc3339_name(t: SystemTime) -> String {
    crate::provider::rfc3339(t).replace(':', "-")
}

fn json_bytes(v: &serde_json::Value) -> Vec<u8> {
    let mut b = serde_json::to_vec_pretty(v).unwrap_or_else(|_| b"{}".to_vec());
    b.push(b'\n');
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Vec<String> {
        s.split('/')
            .filter(|c| !c.is_empty())
            .map(String::from)
            .collect()
    }

    #[test]
    fn parse_paths() {
        let vol = Owner::Volume {
            pool: "images".into(),
            name: "a.qcow2".into(),
        };
        assert_eq!(Node::parse(&p("")), Some(Node::Root));
        assert_eq!(
            Node::parse(&p("volumes/images/a.qcow2/.snapshots/s%2F1/disk.raw")),
            Some(Node::Disk(vol.clone(), "s/1".into(), "disk".into()))
        );
        assert_eq!(
            Node::parse(&p("volumes/images/a.qcow2/.snapshots/s1/vda.raw")),
            Some(Node::InSnapshot)
        );
        assert_eq!(
            Node::parse(&p("instances/web/.snapshots/s1/vdb.raw")),
            Some(Node::Disk(
                Owner::Instance("web".into()),
                "s1".into(),
                "vdb".into()
            ))
        );
        assert_eq!(
            Node::parse(&p("instances/web/.snapshots/s1/files/vda/p1/etc/hosts")),
            Some(Node::Files(FilesPath {
                owner: Owner::Instance("web".into()),
                snap: "s1".into(),
                target: Some("vda".into()),
                part: Some("p1".into()),
                rest: vec!["etc".into(), "hosts".into()],
            }))
        );
        assert_eq!(
            Node::parse(&p("instances/web/.snapshots/s1/other/x")),
            Some(Node::InSnapshot)
        );
        assert_eq!(
            Node::parse(&p("instances/web/other")),
            Some(Node::ObjLink(Owner::Instance("web".into()), "other".into()))
        );
        assert_eq!(
            Node::parse(&p("instances/web/current")),
            Some(Node::Current(Owner::Instance("web".into())))
        );
        assert_eq!(
            Node::parse(&p("volumes/images/a.qcow2/.snapshots/s1/parent")),
            Some(Node::SnapParent(vol.clone(), "s1".into()))
        );
        assert_eq!(Node::parse(&p("instances/web/x/y")), None);
        assert_eq!(Node::parse(&p("launch/x/y")), None);
        assert!(Node::parse(&p("volumes/images/a.qcow2/.snapshots/s1"))
            .is_some_and(|n| n.in_snapshot()));
    }

    /// Intents a killed daemon left: one for a volume that is gone is dropped; one for a
    /// provider that cannot tell whether its revert happened (the in-memory one, like RBD) is
    /// done again, and `current` becomes its target.
    #[test]
    fn interrupted_reverts_are_resolved_at_start() {
        use crate::provider::memory::MemoryProvider;
        let dir = tempfile::tempdir().unwrap();
        let mem = Arc::new(MemoryProvider::default());
        mem.add_volume("p", "v", vec![1u8; 4096]);
        let v = Owner::Volume {
            pool: "p".into(),
            name: "v".into(),
        };
        mem.create_snapshot(&v, "s1").unwrap();
        let ns = Namespace::new(vec![mem.clone()], "/mnt".into(), Duration::ZERO)
            .with_state(dir.path(), true);
        let s1 = ns.reg.snapshot(&v, "s1").unwrap();
        ns.lineage.created(&v, SnapRef::of(&s1), None);
        mem.create_snapshot(&v, "before-revert-x").unwrap();
        let kept = ns.reg.snapshot(&v, "before-revert-x").unwrap();
        ns.lineage
            .created(&v, SnapRef::of(&kept), Some(SnapRef::of(&s1)));
        ns.lineage.begin_revert(&v, SnapRef::of(&s1));
        let gone = Owner::Volume {
            pool: "p".into(),
            name: "gone".into(),
        };
        ns.lineage.begin_revert(&gone, SnapRef::of(&s1));
        assert_eq!(ns.current_of(&v).unwrap().unwrap().name, "before-revert-x");

        // A new daemon on the same state directory.
        let again = Namespace::new(vec![mem.clone()], "/mnt".into(), Duration::ZERO)
            .with_state(dir.path(), true);
        assert_eq!(again.lineage.interrupted().len(), 2);
        assert_eq!(again.recover_reverts(), 1);
        assert!(again.lineage.interrupted().is_empty());
        assert_eq!(again.current_of(&v).unwrap().unwrap().name, "s1");
    }
}

//! `files/` inside a snapshot: the guest's own files, read through `crate::restore`.
//!
//! Instances: `files/<target>/<part>/…`; volumes: `files/<part>/…`. Nothing is parsed until
//! someone looks inside; partition tables and opened filesystems are cached and shared.

use std::collections::HashMap;
use std::sync::Arc;

use super::bytelru::{heap, ByteLru, Cost};
use super::names::{self, escape};
use super::registry::lock;
use super::{Kind, Namespace, Stat};
use crate::error::{Error, Result};
use crate::provider::{Owner, SnapshotInfo, VOLUME_DISK};
use crate::restore::{self, FileKind, FileStat, GuestFs, Partition, Volume};

pub const FILES: &str = "files";
pub const README: &str = "README";
/// Inside a partition that is an LVM2 physical volume: `lvm/<vg>/<lv>/`.
pub const LVM: &str = "lvm";
/// files/ itself: root only, so a host user never reaches a guest file by sharing its uid.
const FILES_PERM: u16 = 0o700;
/// Guest inode numbers become node ids with this bit set (counter-made ids never reach it).
const GUEST_BIT: u64 = 1 << 63;
const GUEST_INO_BITS: u32 = 44;

/// A path at or below a snapshot's `files/`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FilesPath {
    pub owner: Owner,
    pub snap: String,
    /// The disk; None only at an instance's `files/` (which lists disks).
    pub target: Option<String>,
    pub part: Option<String>,
    /// Guest path components below the partition.
    pub rest: Vec<String>,
}

impl FilesPath {
    /// `rest` is what follows `files` in the path.
    pub fn parse(owner: Owner, snap: String, rest: &[&str]) -> FilesPath {
        let (target, after): (Option<String>, &[&str]) = match owner {
            Owner::Volume { .. } => (Some(VOLUME_DISK.to_string()), rest),
            Owner::Instance(_) => match rest.split_first() {
                Some((t, r)) => (Some(super::names::unescape(t)), r),
                None => (None, &[]),
            },
        };
        let (part, rest) = match after.split_first() {
            Some((p, r)) => (
                Some(p.to_string()),
                r.iter().map(|s| s.to_string()).collect(),
            ),
            None => (None, Vec::new()),
        };
        FilesPath {
            owner,
            snap,
            target,
            part,
            rest,
        }
    }

    /// The directory that lists partitions (an instance's `files/<target>`, a volume's `files`).
    fn at_disk(&self) -> bool {
        self.target.is_some() && self.part.is_none()
    }

    fn at_root(&self) -> bool {
        self.target.is_none() || (matches!(self.owner, Owner::Volume { .. }) && self.at_disk())
    }
}

/// What a files/ path resolves to.
enum Resolved {
    /// A directory snapfs makes inside a partition: README holders and `lvm/<vg>/<lv>` levels.
    Synthetic(Vec<(String, Kind)>),
    /// files/ of an instance: one directory per disk; files/ of a volume: partitions.
    Dir(u16),
    Readme(Arc<Vec<u8>>),
    Guest {
        fs: Arc<dyn GuestFs>,
        stat: FileStat,
        vol: u16,
    },
}

/// A guest file opened for reading.
#[derive(Clone)]
pub struct GuestFile {
    pub fs: Arc<dyn GuestFs>,
    pub ino: u64,
    pub size: u64,
}

/// A node id of a guest file (see [`Stat::fixed`]).
pub fn is_guest_node(id: u64) -> bool {
    id & GUEST_BIT != 0
}

/// A guest inode of an opened volume: what a guest node id stands for, answered with no path
/// (the volume number says where the filesystem lies, see [`Namespace::guest_fs`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GuestRef {
    pub vol: u16,
    pub ino: u64,
}

impl GuestRef {
    /// The guest inode a guest node id stands for (`None` for other ids).
    pub fn from_id(id: u64) -> Option<GuestRef> {
        is_guest_node(id).then_some(GuestRef {
            vol: ((id & !GUEST_BIT) >> GUEST_INO_BITS) as u16,
            ino: id & ((1 << GUEST_INO_BITS) - 1),
        })
    }

    /// Its node id, when the guest inode number fits one.
    pub fn id(self) -> Option<u64> {
        guest_node_id(self.vol, self.ino)
    }
}

/// The node id for guest inode `ino` of volume number `vol`, when it fits.
fn guest_node_id(vol: u16, ino: u64) -> Option<u64> {
    (ino < 1 << GUEST_INO_BITS).then(|| GUEST_BIT | (u64::from(vol) << GUEST_INO_BITS) | ino)
}

fn guest_stat(s: &FileStat, vol: u16) -> Stat {
    Stat {
        kind: s.kind,
        size: s.size,
        allocated: s.allocated,
        mtime: s.mtime,
        perm: s.perm & 0o7777,
        owner: Some((s.uid, s.gid)),
        nlink: Some(s.nlink),
        atime: Some(s.atime),
        ctime: Some(s.ctime),
        ino: guest_node_id(vol, s.ino),
        rdev: s.rdev,
    }
}

/// Names a guest stores as bytes, as the tree's strings: bytes that are not UTF-8 are kept
/// through the reversible mapping of [`names::from_bytes`] (the kernel gets them back byte for
/// byte). Only names no file name can carry (empty, `/`, NUL: a corrupt directory) are skipped.
fn guest_name(name: &[u8]) -> Option<String> {
    if name.is_empty() || name.contains(&b'/') || name.contains(&0) {
        crate::input_warn!(
            "files",
            "guest directory entry with an impossible name: not shown: {}",
            crate::log_limit::esc(name)
        );
        return None;
    }
    Some(names::from_bytes(name).into_owned())
}

/// Bytes of partition tables kept ([`FilesCache::partitions`]).
pub const PARTITIONS_BYTES: usize = 1 << 20;
/// Bytes of guest paths kept ([`FilesCache::paths`]).
pub const PATHS_BYTES: usize = 4 << 20;

impl Cost for Partition {
    fn cost(&self) -> usize {
        self.name.cost() + self.type_desc.cost()
    }
}

/// Caches of the files/ subtree, owned by the namespace.
pub struct FilesCache {
    volumes: lru::LruCache<String, Arc<Volume>>,
    /// Partition tables by disk key, at most [`PARTITIONS_BYTES`].
    partitions: ByteLru<String, Arc<Vec<Partition>>>,
    /// (volume number, guest path) → guest inode, so deep lookups do not walk from the root
    /// every time; at most [`PATHS_BYTES`] (a deep path of long names is kilobytes, and each
    /// of its prefixes is kept).
    paths: ByteLru<(u16, String), u64>,
    /// A small, stable number per opened volume key, for node ids.
    numbers: HashMap<String, u16>,
    /// What each number stands for (indexed by number): one entry per volume opened since
    /// mount (at most 65,535), so a guest node id is answered without a path.
    roots: Vec<Arc<VolumeRoot>>,
}

/// Where the filesystem of a volume number lies.
#[derive(Clone)]
struct VolumeRoot {
    /// The volume's root directory (`rest` empty, or `lvm/<vg>/<lv>` for a logical volume).
    path: FilesPath,
    /// The snapshot's identity when the volume was opened (see [`SnapshotInfo::id`]): a
    /// snapshot deleted and taken again under the same name has another, and the old volume's
    /// node ids are gone (ENOENT), never the new one's bytes.
    snap_id: String,
    created: std::time::SystemTime,
    /// The key the volume is cached under.
    key: String,
}

impl FilesCache {
    /// What it holds ([`crate::memreport`]): the byte-budgeted caches as charged, the volume
    /// numbers and roots estimated from their lengths.
    pub fn memory(&self) -> Vec<crate::memreport::Held> {
        use crate::memreport::Held;
        let roots: usize = self
            .roots
            .iter()
            .map(|r| {
                let p = &r.path;
                // The key holds the owner's, snapshot's, disk's and partition's names: it
                // stands for the path's strings too. Then the numbers map's copy of the key.
                let names = [&p.snap, &r.snap_id, &r.key, &r.key]
                    .iter()
                    .map(|s| heap(s.len()))
                    .sum::<usize>()
                    + heap(r.key.len());
                heap(std::mem::size_of::<VolumeRoot>() + 16) + names + 64
            })
            .sum();
        vec![
            Held::new("volumes", self.volumes.len(), 0),
            Held::new("partitions", self.partitions.len(), self.partitions.bytes()),
            Held::new("guest_paths", self.paths.len(), self.paths.bytes()),
            Held::new("volume_roots", self.roots.len(), roots),
        ]
    }

    pub fn new(volumes: usize) -> Self {
        let n = |v: usize| std::num::NonZeroUsize::new(v).unwrap_or(std::num::NonZeroUsize::MIN);
        FilesCache {
            volumes: lru::LruCache::new(n(volumes)),
            partitions: ByteLru::new(PARTITIONS_BYTES),
            // Only paths resolved by name (partition roots, guest inodes whose numbers do not
            // fit a node id) come here: guest nodes are answered by number.
            paths: ByteLru::new(PATHS_BYTES),
            numbers: HashMap::new(),
            roots: Vec::new(),
        }
    }
}

impl Namespace {
    /// The snapshot `p` lies in: looked up once per operation and handed down.
    fn snapshot_of(&self, p: &FilesPath) -> Result<SnapshotInfo> {
        self.reg.snapshot(&p.owner, &p.snap)
    }

    fn disk_key(
        &self,
        p: &FilesPath,
        snap: &SnapshotInfo,
    ) -> Result<(String, Arc<super::OpenDisk>)> {
        let target = p
            .target
            .as_deref()
            .ok_or_else(|| Error::Invalid("files/ has no disk here".into()))?;
        let disk = self.open_disk(&p.owner, snap, target)?;
        Ok((super::disk_key(&p.owner, snap, target), disk))
    }

    fn partitions_of(
        &self,
        p: &FilesPath,
        snap: &SnapshotInfo,
    ) -> Result<(String, Arc<super::OpenDisk>, Arc<Vec<Partition>>)> {
        let (key, disk) = self.disk_key(p, snap)?;
        if let Some(parts) = lock(&self.files).partitions.get(&key) {
            return Ok((key, disk, parts.clone()));
        }
        let parts = Arc::new(restore::partitions(disk.image.as_ref())?);
        lock(&self.files).partitions.put(key.clone(), parts.clone());
        Ok((key, disk, parts))
    }

    /// The filesystem (or README) of `p`'s partition, and its volume number.
    fn volume_of(&self, p: &FilesPath, snap: &SnapshotInfo) -> Result<(String, Arc<Volume>, u16)> {
        let part_name = p
            .part
            .as_deref()
            .ok_or_else(|| Error::Invalid("no partition".into()))?;
        let (disk_key, disk, parts) = self.partitions_of(p, snap)?;
        let part = parts
            .iter()
            .find(|x| x.name == part_name)
            .ok_or_else(|| Error::NotFound(format!("partition {part_name}")))?;
        let key = format!("{disk_key}\0{part_name}");
        let root = VolumeRoot {
            path: FilesPath {
                rest: Vec::new(),
                ..p.clone()
            },
            snap_id: snap.id.clone(),
            created: snap.created,
            key: key.clone(),
        };
        let (vol, number) = self.cached_volume(root, || {
            restore::worker::open_volume(disk.image.clone(), part)
        })?;
        Ok((key, vol, number))
    }

    /// The volume cached under `root.key`, opened by `open` on a miss, and its node-id number.
    fn cached_volume(
        &self,
        root: VolumeRoot,
        open: impl FnOnce() -> Result<Volume>,
    ) -> Result<(Arc<Volume>, u16)> {
        let key = root.key.clone();
        let key = key.as_str();
        let number = {
            let mut c = lock(&self.files);
            match c.numbers.get(key) {
                Some(&n) => n,
                None => {
                    // Node ids hold the number in 16 bits: refuse rather than let two
                    // volumes share ids (a daemon would need 65,535 distinct snapshot
                    // partitions opened since it was mounted).
                    let next = u16::try_from(c.numbers.len())
                        .ok()
                        .filter(|&n| n < u16::MAX)
                        .ok_or_else(|| {
                            Error::Busy(
                                "65,535 guest volumes opened since mount: unmount and mount again to open more".into(),
                            )
                        })?;
                    c.numbers.insert(key.to_string(), next);
                    c.roots.push(Arc::new(root));
                    next
                }
            }
        };
        if let Some(v) = lock(&self.files).volumes.get(key) {
            return Ok((v.clone(), number));
        }
        let started = std::time::Instant::now();
        let vol = Arc::new(open()?);
        tracing::info!(
            volume = %key.replace('\0', "/"),
            ms = started.elapsed().as_millis() as u64,
            what = %match vol.as_ref() {
                Volume::Fs(fs) => fs.describe(),
                Volume::Unsupported { .. } => "unsupported".into(),
                Volume::Lvm(lvs) => format!("LVM2 PV with {} logical volumes", lvs.len()),
            },
            "guest volume opened"
        );
        lock(&self.files).volumes.put(key.to_string(), vol.clone());
        Ok((vol, number))
    }

    fn resolve(&self, p: &FilesPath, snap: &SnapshotInfo) -> Result<Resolved> {
        if p.at_root() || p.at_disk() {
            // The disk exists (and its partition table reads) or this is not a directory.
            if p.target.is_some() {
                self.partitions_of(p, snap)?;
            }
            return Ok(Resolved::Dir(if p.at_root() {
                FILES_PERM
            } else {
                super::DIR_PERM
            }));
        }
        let (key, vol, number) = self.volume_of(p, snap)?;
        let root = FilesPath {
            rest: Vec::new(),
            ..p.clone()
        };
        self.resolve_in(&root, &key, &vol, number, &p.rest)
    }

    /// Resolve `rest` inside an opened volume: a filesystem, a README holder, or an LVM PV
    /// whose logical volumes appear as `lvm/<vg>/<lv>/`, each a volume of its own.
    fn resolve_in(
        &self,
        root: &FilesPath,
        key: &str,
        vol: &Volume,
        number: u16,
        rest: &[String],
    ) -> Result<Resolved> {
        let fs = match vol {
            Volume::Fs(fs) => fs.clone(),
            Volume::Unsupported { readme } => {
                return match rest {
                    [] => Ok(Resolved::Synthetic(vec![(README.to_string(), Kind::File)])),
                    [r] if r == README => {
                        Ok(Resolved::Readme(Arc::new(readme.clone().into_bytes())))
                    }
                    _ => Err(Error::NotFound(rest.join("/"))),
                };
            }
            Volume::Lvm(lvs) => {
                let dirs = |names: Vec<String>| {
                    let mut v: Vec<(String, Kind)> =
                        names.into_iter().map(|n| (escape(&n), Kind::Dir)).collect();
                    v.dedup();
                    Resolved::Synthetic(v)
                };
                return match rest {
                    [] => Ok(dirs(vec![LVM.to_string()])),
                    [l] if l == LVM => Ok(dirs(lvs.iter().map(|x| x.vg.clone()).collect())),
                    [l, vg] if l == LVM => {
                        let names: Vec<String> = lvs
                            .iter()
                            .filter(|x| escape(&x.vg) == *vg)
                            .map(|x| x.lv.clone())
                            .collect();
                        if names.is_empty() {
                            return Err(Error::NotFound(format!("volume group {vg}")));
                        }
                        Ok(dirs(names))
                    }
                    [l, vg, lv, inner @ ..] if l == LVM => {
                        let found = lvs
                            .iter()
                            .find(|x| escape(&x.vg) == *vg && escape(&x.lv) == *lv)
                            .ok_or_else(|| Error::NotFound(format!("logical volume {vg}/{lv}")))?;
                        let lv_key = format!("{key}\0{LVM}/{vg}/{lv}");
                        let mut lv_root = root.clone();
                        lv_root.rest.extend([l.clone(), vg.clone(), lv.clone()]);
                        // The logical volume lies in the physical volume's snapshot.
                        let pv = lock(&self.files).roots.get(usize::from(number)).cloned();
                        let (snap_id, created) = pv
                            .map(|r| (r.snap_id.clone(), r.created))
                            .unwrap_or_else(|| (String::new(), std::time::UNIX_EPOCH));
                        let volume_root = VolumeRoot {
                            path: lv_root.clone(),
                            snap_id,
                            created,
                            key: lv_key.clone(),
                        };
                        let (inner_vol, inner_number) = self.cached_volume(volume_root, || {
                            match &found.image {
                                Some(img) => {
                                    let whole = Partition::whole(img.size(), "LVM logical volume");
                                    match restore::worker::open_volume(img.clone(), &whole)? {
                                        // LVM inside an LV is not followed.
                                        Volume::Lvm(_) => Ok(Volume::Unsupported {
                                            readme: format!("{vg}/{lv} holds another LVM2 physical volume; snapfs does not nest LVM.\n"),
                                        }),
                                        v => Ok(v),
                                    }
                                }
                                None => Ok(Volume::Unsupported {
                                    readme: format!("Logical volume {}/{}: {}\n", found.vg, found.lv, found.note),
                                }),
                            }
                        })?;
                        self.resolve_in(&lv_root, &lv_key, &inner_vol, inner_number, inner)
                    }
                    _ => Err(Error::NotFound(rest.join("/"))),
                };
            }
        };
        // Walk from the deepest cached ancestor.
        let mut ino = fs.root();
        let mut start = 0;
        {
            let mut c = lock(&self.files);
            for i in (1..=rest.len()).rev() {
                if let Some(&cached) = c.paths.get(&(number, rest[..i].join("/"))) {
                    ino = cached;
                    start = i;
                    break;
                }
            }
        }
        let mut found: Option<FileStat> = None;
        for i in start..rest.len() {
            if found.as_ref().is_some_and(|s| s.kind != FileKind::Dir) {
                return Err(Error::NotDir(rest[..i].join("/")));
            }
            let s = fs.lookup(ino, &names::to_bytes(&rest[i]))?;
            ino = s.ino;
            found = Some(s);
            lock(&self.files)
                .paths
                .put((number, rest[..=i].join("/")), ino);
        }
        let stat = match found {
            Some(s) => s,
            None => fs.stat(ino)?,
        };
        Ok(Resolved::Guest {
            fs,
            stat,
            vol: number,
        })
    }

    /// Synthetic directories and READMEs take the snapshot's time.
    pub(super) fn files_stat(&self, p: &FilesPath) -> Result<Stat> {
        let snap = self.snapshot_of(p)?;
        let mtime = snap.created;
        Ok(match self.resolve(p, &snap)? {
            Resolved::Dir(perm) => {
                let mut s = Stat::new(Kind::Dir, 0, 0, mtime, perm);
                s.owner = Some((0, 0));
                s
            }
            Resolved::Synthetic(_) => Stat::new(Kind::Dir, 0, 0, mtime, super::DIR_PERM),
            Resolved::Readme(b) => Stat::new(
                Kind::File,
                b.len() as u64,
                b.len() as u64,
                mtime,
                super::FILE_PERM,
            ),
            Resolved::Guest { stat, vol, .. } => guest_stat(&stat, vol),
        })
    }

    pub(super) fn files_list(&self, p: &FilesPath) -> Result<Vec<(String, Kind, Option<u64>)>> {
        let snap = self.snapshot_of(p)?;
        if p.target.is_none() {
            return Ok(snap
                .disks
                .iter()
                .map(|d| (escape(&d.target), Kind::Dir, None))
                .collect());
        }
        if p.at_disk() {
            let (_, _, parts) = self.partitions_of(p, &snap)?;
            return Ok(parts
                .iter()
                .map(|x| (x.name.clone(), Kind::Dir, None))
                .collect());
        }
        match self.resolve(p, &snap)? {
            Resolved::Dir(_) => Err(Error::Backend(
                "files/ level resolved as a partition".into(),
            )),
            Resolved::Synthetic(children) => {
                Ok(children.into_iter().map(|(n, k)| (n, k, None)).collect())
            }
            Resolved::Readme(_) => Err(Error::NotDir(README.into())),
            Resolved::Guest { fs, stat, vol } => {
                if stat.kind != FileKind::Dir {
                    return Err(Error::NotDir(p.rest.join("/")));
                }
                let list = fs.readdir(stat.ino)?;
                self.prefetch.dirs(&fs, &restore::subdirs(&list));
                Ok(list
                    .iter()
                    .filter_map(|&(ref name, ino, k)| {
                        guest_name(name).map(|n| (n, k, guest_node_id(vol, ino)))
                    })
                    .collect())
            }
        }
    }

    /// See [`Namespace::child_stats`].
    pub(super) fn files_child_stats(&self, p: &FilesPath) -> Result<HashMap<u64, Stat>> {
        if p.at_root() || p.at_disk() {
            return Ok(HashMap::new());
        }
        let snap = self.snapshot_of(p)?;
        let Resolved::Guest { fs, stat, vol } = self.resolve(p, &snap)? else {
            return Ok(HashMap::new());
        };
        if stat.kind != FileKind::Dir {
            return Err(Error::NotDir(p.rest.join("/")));
        }
        child_stats(fs.as_ref(), stat.ino, vol)
    }

    pub(super) fn files_open(&self, p: &FilesPath) -> Result<super::Content> {
        match self.resolve(p, &self.snapshot_of(p)?)? {
            Resolved::Readme(b) => Ok(super::Content::Bytes(b)),
            Resolved::Guest { fs, stat, .. } => open_guest(fs, &stat, || p.rest.join("/")),
            _ => Err(Error::IsDir(p.rest.join("/"))),
        }
    }

    pub(super) fn files_readlink(&self, p: &FilesPath) -> Result<Vec<u8>> {
        match self.resolve(p, &self.snapshot_of(p)?)? {
            Resolved::Guest { fs, stat, .. } if stat.kind == FileKind::Symlink => {
                fs.readlink(stat.ino)
            }
            _ => Err(Error::Invalid("not a symlink".into())),
        }
    }

    pub(super) fn files_xattrs(&self, p: &FilesPath) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        match self.resolve(p, &self.snapshot_of(p)?)? {
            Resolved::Guest { fs, stat, .. } => fs.xattrs(stat.ino),
            _ => Ok(Vec::new()),
        }
    }
}

/// One page of a guest directory's listing by node id ([`Namespace::guest_page`]): each
/// shown entry as (cookie after it, name as the tree shows it, kind, where it is).
pub struct GuestPage {
    pub entries: Vec<(u64, String, Kind, GuestRef)>,
    /// No entries after these.
    pub end: bool,
    /// The cookie after the reader's last entry of the page (shown or not).
    pub after: u64,
}

/// Guest nodes by number: each call needs only the volume's snapshot check and the reader
/// (no path, nothing kept per guest name).
impl Namespace {
    /// The instance or volume guest volume number `vol` was opened from (for fair shares of
    /// the FUSE threads, [`crate::fairness`]); None for a number never given out.
    pub fn guest_owner(&self, vol: u16) -> Option<crate::provider::Owner> {
        let root = lock(&self.files).roots.get(usize::from(vol)).cloned()?;
        Some(root.path.owner.clone())
    }

    /// The filesystem guest inode `g` lies in, while its snapshot is the one the volume was
    /// opened from: a deleted snapshot (or one taken again under its name) gives ENOENT.
    fn guest_fs(&self, g: GuestRef) -> Result<Arc<dyn GuestFs>> {
        let gone = || Error::NotFound(format!("guest volume {} is gone", g.vol));
        let root = lock(&self.files)
            .roots
            .get(usize::from(g.vol))
            .cloned()
            .ok_or_else(gone)?;
        // The snapshot is still the one the volume was opened from (checked in the registry's
        // list, not copied out of it).
        let same = |s: &SnapshotInfo| {
            s.name == root.path.snap && s.id == root.snap_id && s.created == root.created
        };
        if !self.reg.snapshots(&root.path.owner)?.iter().any(same) {
            return Err(gone());
        }
        let cached = lock(&self.files).volumes.get(&root.key).cloned();
        if let Some(Volume::Fs(fs)) = cached.as_deref() {
            return Ok(fs.clone());
        }
        // Evicted from the cache: opened again through its path (same key, same number).
        let snap = self.snapshot_of(&root.path)?;
        if !same(&snap) {
            return Err(gone());
        }
        match self.resolve(&root.path, &snap)? {
            Resolved::Guest { fs, vol, .. } if vol == g.vol => Ok(fs),
            _ => Err(gone()),
        }
    }

    /// The attributes of guest inode `g`.
    pub fn guest_stat(&self, g: GuestRef) -> Result<Stat> {
        Ok(guest_stat(&self.guest_fs(g)?.stat(g.ino)?, g.vol))
    }

    /// `name` in guest directory `g`: its attributes and where it is.
    pub fn guest_lookup(&self, g: GuestRef, name: &str) -> Result<(Stat, GuestRef)> {
        let s = self.guest_fs(g)?.lookup(g.ino, &names::to_bytes(name))?;
        Ok((
            guest_stat(&s, g.vol),
            GuestRef {
                vol: g.vol,
                ino: s.ino,
            },
        ))
    }

    /// The entries of guest directory `g` from reader cookie `cookie` on, about `budget`
    /// bytes of them ([`restore::GuestFs::readdir_page`]); names no file name can carry are
    /// left out (their cookies are passed over). The subdirectories met are read ahead.
    pub fn guest_page(&self, g: GuestRef, cookie: u64, budget: usize) -> Result<GuestPage> {
        let fs = self.guest_fs(g)?;
        let page = fs.readdir_page(g.ino, cookie, budget)?;
        self.prefetch.dirs(&fs, &page.subdirs());
        let after = page.entries.last().map_or(cookie, |e| e.3);
        let entries = page
            .entries
            .into_iter()
            .filter_map(|(name, ino, kind, next)| {
                guest_name(&name).map(|n| (next, n, kind, GuestRef { vol: g.vol, ino }))
            })
            .collect();
        Ok(GuestPage {
            entries,
            end: page.end,
            after,
        })
    }

    /// The attributes of guest inode `g` listed in a directory (for READDIRPLUS).
    pub fn guest_listed_stat(&self, g: GuestRef) -> Result<Stat> {
        self.guest_stat(g)
    }

    pub fn guest_open(&self, g: GuestRef) -> Result<super::Content> {
        let fs = self.guest_fs(g)?;
        let stat = fs.stat(g.ino)?;
        open_guest(fs, &stat, || format!("guest inode {}", g.ino))
    }

    pub fn guest_readlink(&self, g: GuestRef) -> Result<Vec<u8>> {
        let fs = self.guest_fs(g)?;
        if fs.stat(g.ino)?.kind != FileKind::Symlink {
            return Err(Error::Invalid("not a symlink".into()));
        }
        fs.readlink(g.ino)
    }

    pub fn guest_xattrs(&self, g: GuestRef) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.guest_fs(g)?.xattrs(g.ino)
    }
}

fn child_stats(fs: &dyn GuestFs, dir: u64, vol: u16) -> Result<HashMap<u64, Stat>> {
    let mut out = HashMap::new();
    for &(_, ino, _) in fs.readdir(dir)?.iter() {
        if let (Some(id), Ok(s)) = (guest_node_id(vol, ino), fs.stat(ino)) {
            out.insert(id, guest_stat(&s, vol));
        }
    }
    Ok(out)
}

fn open_guest(
    fs: Arc<dyn GuestFs>,
    stat: &FileStat,
    what: impl FnOnce() -> String,
) -> Result<super::Content> {
    match stat.kind {
        FileKind::File => {
            fs.check_open(stat.ino)?;
            Ok(super::Content::Guest(GuestFile {
                fs,
                ino: stat.ino,
                size: stat.size,
            }))
        }
        FileKind::Dir => Err(Error::IsDir(what())),
        _ => Err(Error::NotSupported(
            "only regular guest files can be opened".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The guest path cache and the partition tables stay under their bytes with 255-byte
    /// names and deep paths (issue 20 item 2), keeping the most recent entries.
    #[test]
    fn files_caches_stay_under_their_bytes_with_long_names() {
        let mut c = FilesCache::new(4);
        let name = "\u{ff}".repeat(127) + "n";
        let mut path = String::new();
        for depth in 0..600u64 {
            if !path.is_empty() {
                path.push('/');
            }
            path.push_str(&name);
            for vol in 0..4u16 {
                c.paths.put((vol, path.clone()), depth);
            }
            assert!(c.paths.bytes() <= PATHS_BYTES);
            if path.len() > 64 << 10 {
                path.clear();
            }
        }
        assert!(c.paths.len() > 50, "{} paths kept", c.paths.len());
        for disk in 0..10_000 {
            let parts: Vec<Partition> = (0..128)
                .map(|i| Partition {
                    name: format!("p{i}"),
                    offset: 0,
                    length: 0,
                    type_desc: name.clone(),
                })
                .collect();
            c.partitions
                .put(format!("{}{disk}", name.repeat(4)), Arc::new(parts));
            assert!(c.partitions.bytes() <= PARTITIONS_BYTES);
        }
        assert!(c.partitions.len() >= 10, "{}", c.partitions.len());
    }
}

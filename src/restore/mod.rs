//! File-level restore: the guest's own files inside a disk image, read natively and read-only.
//!
//! [`partitions`] splits a disk into byte ranges (GPT, MBR, or `whole`); [`open_volume`] probes one
//! range and returns a [`GuestFs`] for a filesystem we read, or a README text naming what was found.
//! Nothing here writes to the disk: journals are replayed in memory only.

mod bytes;
pub mod ext4;
pub mod fat;
pub mod lvm;
pub mod lznt1;
pub mod ntfs;
pub mod partition;
pub mod prefetch;
pub mod probe;
pub mod slice;
pub mod worker;
pub mod xfs;
mod xfs_log;

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::error::Result;
use crate::image::BlockImage;

pub use partition::partitions;
pub use slice::{ChunkCache, Dev, MemDisk, Slice};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    Dir,
    File,
    Symlink,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileStat {
    pub ino: u64,
    pub kind: FileKind,
    /// Permission bits including setuid/setgid/sticky (0o7777).
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    /// Bytes allocated on disk.
    pub allocated: u64,
    pub nlink: u32,
    pub rdev: u32,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    pub btime: Option<SystemTime>,
}

/// A guest filesystem, read-only, addressed by inode number.
pub trait GuestFs: Send + Sync {
    fn root(&self) -> u64;
    fn stat(&self, ino: u64) -> Result<FileStat>;
    /// `Error::NotFound` if `dir` has no entry `name`.
    fn lookup(&self, dir: u64, name: &[u8]) -> Result<FileStat>;
    /// Entries without `.` and `..` (shared with the reader's listing cache).
    fn readdir(&self, dir: u64) -> Result<DirList>;
    /// The entries of `dir` from `cookie` on (0: the first), as many as fill `budget` bytes
    /// of FUSE directory entries ([`dirent_cost`]; at least one), each with the cookie that
    /// goes on after it. Cookies stay valid for the reader's life (a snapshot does not
    /// change), so a listing needs no state between pages. Every reader honours
    /// [`INDEX_COOKIE`] cookies (positions in [`GuestFs::readdir`]'s listing); ext4 and XFS
    /// page their large directories by on-disk offsets instead, so that no whole listing of
    /// a huge directory is built.
    fn readdir_page(&self, dir: u64, cookie: u64, budget: usize) -> Result<DirPage> {
        Ok(page_of_list(&self.readdir(dir)?, cookie, budget))
    }
    /// Short only at end of file.
    fn read(&self, ino: u64, offset: u64, buf: &mut [u8]) -> Result<usize>;
    /// Whether regular file `ino` may be opened for reading: an error here is what `open`
    /// answers (ext4 files encrypted without their key: ENOKEY, as Linux).
    fn check_open(&self, _ino: u64) -> Result<()> {
        Ok(())
    }
    /// The guest's bytes verbatim.
    fn readlink(&self, ino: u64) -> Result<Vec<u8>>;
    /// Names as Linux shows them: `user.x`, `security.selinux`, `trusted.x`, `system.posix_acl_access`.
    fn xattrs(&self, ino: u64) -> Result<Vec<(Vec<u8>, Vec<u8>)>>;
    /// Read directory `dir` into whatever caches serve [`GuestFs::readdir`] and lookups in it,
    /// for [`prefetch::Prefetcher`]; returns its subdirectories. Errors are left for the real
    /// request to meet.
    fn prefetch_dir(&self, dir: u64) -> Vec<u64> {
        match self.readdir_page(dir, 0, PREFETCH_PAGE) {
            Ok(p) => p.subdirs(),
            Err(_) => Vec::new(),
        }
    }
    /// Data ranges `(offset, length)` for SEEK_DATA/SEEK_HOLE; `None` = all data.
    fn data_ranges(&self, _ino: u64) -> Result<Option<Vec<(u64, u64)>>> {
        Ok(None)
    }
    /// Where the bytes `[offset, offset + len)` of regular file `ino` lie on the volume, for a
    /// caller that reads the volume itself (the restore worker's daemon side: file bytes need
    /// not cross the worker's socket). `None`: the reader transforms the bytes (inline or
    /// resident data, compression, encryption) or the file is not a regular file; `read` then
    /// serves them. See [`FileMap`].
    fn map(&self, _ino: u64, _offset: u64, _len: u64) -> Result<Option<FileMap>> {
        Ok(None)
    }
    /// e.g. "ext4, 24 MiB, label rootfs".
    fn describe(&self) -> String;
}

/// Where a file's bytes lie, from [`GuestFs::map`]: `runs` start at the offset asked for and
/// follow each other without gaps; they end at the file's size or at the end of the range
/// asked for, or earlier after [`MAX_MAP_RUNS`] runs (ask again from where they end). No runs
/// when the offset is at or past the end of the file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileMap {
    /// The file's size.
    pub size: u64,
    pub runs: Vec<MapRun>,
}

/// A stretch of a file: `len` bytes from file offset `offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapRun {
    pub offset: u64,
    pub len: u64,
    pub place: Place,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    /// Zeros: a hole, an uninitialized (ext4) or unwritten (XFS) extent.
    Zero,
    /// The volume's bytes from this offset (relative to the start of the partition).
    Disk(u64),
    /// Only the reader can give these bytes (a block the in-memory journal replay changed, a
    /// run past the end of the volume whose error is the reader's to give).
    Reader,
}

/// Most runs one [`FileMap`] holds (24 bytes each).
pub const MAX_MAP_RUNS: usize = 1024;

impl FileMap {
    /// An empty map of a file of `size` bytes, and where a window of `len` bytes from
    /// `offset` ends inside it (`offset` or less: nothing of the file is asked for).
    pub(crate) fn window(size: u64, offset: u64, len: u64) -> (FileMap, u64) {
        let map = FileMap {
            size,
            runs: Vec::new(),
        };
        (map, offset.saturating_add(len).min(size))
    }

    /// Append `len` bytes at file offset `offset` (the end of the runs so far), merged with the
    /// last run where they continue it. `volume_len` turns a disk run past the volume's end
    /// into [`Place::Reader`]. `false` once the map is full: stop adding.
    pub(crate) fn push(&mut self, offset: u64, len: u64, place: Place, volume_len: u64) -> bool {
        if len == 0 {
            return self.runs.len() < MAX_MAP_RUNS;
        }
        let place = match place {
            Place::Disk(d) if d.checked_add(len).is_none_or(|e| e > volume_len) => Place::Reader,
            p => p,
        };
        if let Some(last) = self.runs.last_mut() {
            let continues = match (last.place, place) {
                (Place::Zero, Place::Zero) | (Place::Reader, Place::Reader) => true,
                (Place::Disk(a), Place::Disk(b)) => a + last.len == b,
                _ => false,
            };
            if continues && last.offset + last.len == offset {
                last.len += len;
                return true;
            }
        }
        if self.runs.len() >= MAX_MAP_RUNS {
            return false;
        }
        self.runs.push(MapRun { offset, len, place });
        true
    }

    /// Where the runs end (the offset asked for when there are none).
    pub fn end(&self, start: u64) -> u64 {
        self.runs.last().map_or(start, |r| r.offset + r.len)
    }
}

/// One entry of `files/`: a filesystem we read, or a note on what was found instead.
pub enum Volume {
    Fs(Arc<dyn GuestFs>),
    Unsupported {
        readme: String,
    },
    /// An LVM2 physical volume: its logical volumes (shown as `<part>/lvm/<vg>/<lv>/`). Each
    /// readable one has a block image: open it with `open_volume(image, &Partition::whole(..))`.
    Lvm(Vec<lvm::LogicalVolume>),
}

/// A parsed directory listing: (name, inode, kind), without `.` and `..`.
pub type DirList = Arc<Vec<(Vec<u8>, u64, FileKind)>>;

/// One page of a listing ([`GuestFs::readdir_page`]): (name, inode, kind, cookie after it).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirPage {
    pub entries: Vec<(Vec<u8>, u64, FileKind, u64)>,
    /// No entries after these.
    pub end: bool,
}

impl DirPage {
    /// The inodes of the directories in the page.
    pub fn subdirs(&self) -> Vec<u64> {
        self.entries
            .iter()
            .filter(|e| e.2 == FileKind::Dir)
            .map(|e| e.1)
            .collect()
    }
}

/// A cookie with this bit is a position in the reader's whole listing plus one (the entry
/// after it is at that position). On-disk cookies (ext4 block and offset, XFS data offset)
/// stay below it.
pub const INDEX_COOKIE: u64 = 1 << 62;

/// What one entry takes of a FUSE READDIR reply (`struct fuse_dirent`, 8-byte aligned).
pub fn dirent_cost(name_len: usize) -> usize {
    (24 + name_len + 7) & !7
}

/// What one READDIR asks for: the kernel's READDIR buffer is one page.
pub const READDIR_BUDGET: usize = 4096;
/// What the directory read-ahead reads of a directory: its first page of this many bytes.
const PREFETCH_PAGE: usize = 256 << 10;

/// The page of a whole listing from `cookie` ([`INDEX_COOKIE`] positions; 0 or any other
/// cookie counts as a position too, so a stale or forged one only lists from elsewhere).
pub fn page_of_list(list: &[(Vec<u8>, u64, FileKind)], cookie: u64, budget: usize) -> DirPage {
    let start = usize::try_from(cookie & !INDEX_COOKIE).unwrap_or(usize::MAX);
    let mut page = DirPage::default();
    let mut used = 0;
    for (i, (name, ino, kind)) in list.iter().enumerate().skip(start) {
        let cost = dirent_cost(name.len());
        if !page.entries.is_empty() && used + cost > budget {
            return page;
        }
        used += cost;
        page.entries
            .push((name.clone(), *ino, *kind, INDEX_COOKIE | (i as u64 + 1)));
    }
    page.end = true;
    page
}

/// Collects a page from entries met in on-disk order: `push` answers false once the budget
/// is spent (the entry is then not taken).
pub(crate) struct PageFill {
    pub page: DirPage,
    used: usize,
    budget: usize,
}

impl PageFill {
    pub(crate) fn new(budget: usize) -> PageFill {
        PageFill {
            page: DirPage::default(),
            used: 0,
            budget,
        }
    }

    pub(crate) fn push(&mut self, name: &[u8], ino: u64, kind: FileKind, next: u64) -> bool {
        let cost = dirent_cost(name.len());
        if !self.page.entries.is_empty() && self.used + cost > self.budget {
            return false;
        }
        self.used += cost;
        self.page.entries.push((name.to_vec(), ino, kind, next));
        true
    }
}

/// Directory listings a reader keeps parsed (ext4, XFS): at most [`DIR_CACHE`] of them holding
/// at most [`DIR_CACHE_ENTRIES`] entries in all, least recently used dropped first. Big enough
/// to hold what [`prefetch`] reads ahead before a walker gets there.
pub(crate) struct DirCache {
    lru: lru::LruCache<u64, DirList>,
    /// Name indexes of cached listings, built on their first lookup (dropped with them).
    indexes: std::collections::HashMap<u64, Arc<NameIndex>>,
    entries: usize,
}

/// A listing's names ordered by a hash of their ASCII-lowercased bytes (16 bytes an entry), so
/// a lookup in a cached listing costs a binary search, not a scan of every name: a walk of a
/// directory of n entries would otherwise cost n^2/2 name comparisons.
pub(crate) struct NameIndex {
    list: DirList,
    by_hash: Vec<(u64, u32)>,
}

fn name_hash(name: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for b in name {
        b.to_ascii_lowercase().hash(&mut h);
    }
    h.finish()
}

impl NameIndex {
    fn new(list: DirList) -> NameIndex {
        let mut by_hash: Vec<(u64, u32)> = list
            .iter()
            .enumerate()
            .map(|(i, (n, _, _))| (name_hash(n), i as u32))
            .collect();
        by_hash.sort_unstable();
        NameIndex { list, by_hash }
    }

    /// The entry called exactly `name`, else with `caseless` the first (in listing order)
    /// whose name equals it ignoring ASCII case.
    fn find(&self, name: &[u8], caseless: bool) -> Option<&(Vec<u8>, u64, FileKind)> {
        let h = name_hash(name);
        let from = self.by_hash.partition_point(|&(x, _)| x < h);
        let same = self.by_hash[from..].iter().take_while(|&&(x, _)| x == h);
        let mut fold: Option<u32> = None;
        for &(_, i) in same {
            let e = self.list.get(i as usize)?;
            if e.0 == name {
                return Some(e);
            }
            if caseless && e.0.eq_ignore_ascii_case(name) && fold.is_none_or(|f| i < f) {
                fold = Some(i);
            }
        }
        fold.and_then(|i| self.list.get(i as usize))
    }
}

pub(crate) const DIR_CACHE: usize = 1024;
/// About 64 bytes each with its name, 16 more once indexed: 10 MiB at most per filesystem
/// whatever its directories (32 filesystems stay open: 320 MiB at the very worst). A walk needs
/// only the listings between the read-ahead and the walker (a whole Debian root is 8,813
/// entries), plus the big directory being walked: room for the largest FAT directory (65,534
/// entries) and the read-ahead's listings beside it, or a lookup in it would read it again.
pub(crate) const DIR_CACHE_ENTRIES: usize = 128 << 10;

impl Default for DirCache {
    fn default() -> Self {
        DirCache {
            lru: lru::LruCache::unbounded(),
            indexes: std::collections::HashMap::new(),
            entries: 0,
        }
    }
}

impl DirCache {
    /// The listing of `dir` kept in `cache`, else the one `read` gives, which is then kept.
    /// The lock is not held while reading.
    pub(crate) fn get_or_read(
        cache: &Mutex<DirCache>,
        dir: u64,
        read: impl FnOnce() -> Result<Vec<(Vec<u8>, u64, FileKind)>>,
    ) -> Result<DirList> {
        if let Some(d) = cache.lock().ok().and_then(|mut c| c.get(&dir).cloned()) {
            return Ok(d);
        }
        let list = Arc::new(read()?);
        if let Ok(mut c) = cache.lock() {
            c.put(dir, list.clone());
        }
        Ok(list)
    }

    /// The inode of the entry `name` in directory `dir` (cached listing or `read`), through the
    /// listing's name index (built on first use); with `caseless`, an exact match first, else
    /// the first that equals it ignoring ASCII case.
    pub(crate) fn find(
        cache: &Mutex<DirCache>,
        dir: u64,
        name: &[u8],
        caseless: bool,
        read: impl FnOnce() -> Result<Vec<(Vec<u8>, u64, FileKind)>>,
    ) -> Result<u64> {
        let list = Self::get_or_read(cache, dir, read)?;
        let cached = cache
            .lock()
            .ok()
            .and_then(|c| c.indexes.get(&dir).cloned())
            .filter(|x| Arc::ptr_eq(&x.list, &list));
        let index = match cached {
            Some(x) => x,
            None => {
                let x = Arc::new(NameIndex::new(list.clone()));
                if let Ok(mut c) = cache.lock() {
                    // Only while its listing is still the cached one.
                    if c.lru.peek(&dir).is_some_and(|l| Arc::ptr_eq(l, &list)) {
                        c.indexes.insert(dir, x.clone());
                    }
                }
                x
            }
        };
        index.find(name, caseless).map(|e| e.1).ok_or_else(|| {
            crate::error::Error::NotFound(String::from_utf8_lossy(name).into_owned())
        })
    }

    pub(crate) fn get(&mut self, dir: &u64) -> Option<&DirList> {
        self.lru.get(dir)
    }

    /// Keep `list`; a listing larger than the whole bound is still kept (alone).
    pub(crate) fn put(&mut self, dir: u64, list: DirList) {
        self.entries += list.len();
        if let Some(old) = self.lru.put(dir, list) {
            self.entries -= old.len();
            self.indexes.remove(&dir);
        }
        while self.lru.len() > 1 && (self.lru.len() > DIR_CACHE || self.entries > DIR_CACHE_ENTRIES)
        {
            match self.lru.pop_lru() {
                Some((old_dir, old)) => {
                    self.entries -= old.len();
                    self.indexes.remove(&old_dir);
                }
                None => break,
            }
        }
    }
}

/// The inodes of the directories in a listing.
pub(crate) fn subdirs(list: &[(Vec<u8>, u64, FileKind)]) -> Vec<u64> {
    list.iter()
        .filter(|(_, _, k)| *k == FileKind::Dir)
        .map(|(_, ino, _)| *ino)
        .collect()
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    /// "p1", "p2", … or "whole".
    pub name: String,
    pub offset: u64,
    pub length: u64,
    pub type_desc: String,
}

impl Volume {
    /// The README text for what is not a filesystem: the probe's note, or for an LVM2 PV the list
    /// of its logical volumes (for a tree that does not show LVs as nested volumes yet).
    pub fn readme(&self) -> Option<String> {
        match self {
            Volume::Fs(_) => None,
            Volume::Unsupported { readme } => Some(readme.clone()),
            Volume::Lvm(lvs) => Some(lvm::summary(lvs)),
        }
    }
}

impl Partition {
    /// A whole block device (an LVM logical volume, a disk without a partition table).
    pub fn whole(length: u64, type_desc: &str) -> Partition {
        Partition {
            name: "whole".into(),
            offset: 0,
            length,
            type_desc: type_desc.into(),
        }
    }
}

/// Probe and open the filesystem inside a byte range of a disk. Reads only what the probe needs
/// and the chosen filesystem's superblock; never panics on corrupt data.
pub fn open_volume(disk: Arc<dyn BlockImage>, part: &Partition) -> Result<Volume> {
    let dev = Dev::new(disk.clone(), part.offset, part.length, &part.name)?;
    let found = probe::probe(&dev)?;
    tracing::debug!(part = %part.name, ?found, "probed");
    match found.clone() {
        probe::Found::Ext4 => Ok(Volume::Fs(Arc::new(ext4::Ext4Fs::open(dev)?))),
        probe::Found::Fat => Ok(Volume::Fs(Arc::new(fat::FatFs::open(dev)?))),
        probe::Found::Xfs => Ok(Volume::Fs(Arc::new(xfs::XfsFs::open(dev)?))),
        probe::Found::Ntfs => Ok(Volume::Fs(Arc::new(ntfs::NtfsFs::open(dev)?))),
        probe::Found::Lvm2 => match lvm::logical_volumes(disk, &dev, part.offset) {
            Ok(lvs) => Ok(Volume::Lvm(lvs)),
            Err(e) => {
                crate::input_warn!(&part.name, "LVM2 metadata unreadable: {e}");
                Ok(Volume::Unsupported {
                    readme: format!(
                        "{}\nsnapfs could not read its metadata: {e}\n",
                        probe::readme(&found, part)
                    ),
                })
            }
        },
        other => Ok(Volume::Unsupported {
            readme: probe::readme(&other, part),
        }),
    }
}

/// "24 MiB", "1.5 GiB": sizes for `describe`.
pub(crate) fn human_size(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 || v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Seconds + nanoseconds since the epoch (may be negative) as a `SystemTime`.
pub(crate) fn unix_time(secs: i64, nanos: u32) -> SystemTime {
    let nanos = nanos.min(999_999_999);
    if secs >= 0 {
        SystemTime::UNIX_EPOCH + std::time::Duration::new(secs as u64, nanos)
    } else {
        let back = std::time::Duration::new(secs.unsigned_abs(), 0);
        (SystemTime::UNIX_EPOCH - back) + std::time::Duration::new(0, nanos)
    }
}

/// Touch every operation of a filesystem, within bounds: at most `max_entries` entries, 16
/// levels deep, the first and last 4 KiB of each file. Errors are ignored; for fuzz targets and
/// mutation tests, which only care that this returns (no panic, no hang). Returns entries seen.
#[doc(hidden)]
pub fn exercise(fs: &dyn GuestFs, max_entries: usize) -> usize {
    let _ = fs.describe();
    let root = fs.root();
    let _ = fs.stat(root);
    let mut seen = 0;
    let mut stack = vec![(root, 0u32)];
    let mut buf = vec![0u8; 4096];
    while let Some((dir, depth)) = stack.pop() {
        let Ok(list) = fs.readdir(dir) else { continue };
        for &(ref name, ino, kind) in list.iter() {
            seen += 1;
            if seen >= max_entries {
                return seen;
            }
            let looked = fs.lookup(dir, name);
            let _ = fs.stat(ino);
            let _ = fs.xattrs(ino);
            match kind {
                FileKind::File => {
                    let _ = fs.read(ino, 0, &mut buf);
                    if let Ok(st) = &looked {
                        let _ = fs.read(ino, st.size.saturating_sub(4096), &mut buf);
                    }
                    let _ = fs.data_ranges(ino);
                }
                FileKind::Symlink => {
                    let _ = fs.readlink(ino);
                }
                FileKind::Dir if depth < 16 && looked.is_ok() => stack.push((ino, depth + 1)),
                _ => {}
            }
        }
    }
    seen
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_maps_merge_runs_and_stop_when_full() {
        let mut m = FileMap::default();
        assert!(m.push(0, 4096, Place::Disk(8192), 1 << 20));
        assert!(m.push(4096, 4096, Place::Disk(12288), 1 << 20)); // continues on disk
        assert!(m.push(8192, 100, Place::Zero, 1 << 20));
        assert!(m.push(8292, 100, Place::Zero, 1 << 20));
        assert!(m.push(8392, 4096, Place::Disk(1 << 20), 1 << 20)); // past the volume
        assert_eq!(
            m.runs,
            [
                MapRun {
                    offset: 0,
                    len: 8192,
                    place: Place::Disk(8192)
                },
                MapRun {
                    offset: 8192,
                    len: 200,
                    place: Place::Zero
                },
                MapRun {
                    offset: 8392,
                    len: 4096,
                    place: Place::Reader
                },
            ]
        );
        assert_eq!(m.end(0), 12488);
        let mut m = FileMap::default();
        for i in 0..MAX_MAP_RUNS as u64 {
            assert!(m.push(i * 10, 10, Place::Disk(i * 20), 1 << 20));
        }
        assert!(!m.push(MAX_MAP_RUNS as u64 * 10, 10, Place::Disk(0), 1 << 20));
        assert_eq!(m.runs.len(), MAX_MAP_RUNS);
    }

    fn list(n: usize) -> DirList {
        Arc::new(
            (0..n)
                .map(|i| (vec![b'x'], i as u64, FileKind::File))
                .collect(),
        )
    }

    #[test]
    fn lookups_in_cached_listings_go_through_a_name_index() {
        let names: Vec<(Vec<u8>, u64, FileKind)> = (0..50_000u64)
            .map(|i| (format!("n{i}").into_bytes(), i + 100, FileKind::File))
            .chain([
                (b"README.TXT".to_vec(), 7, FileKind::File),
                (b"readme.txt".to_vec(), 8, FileKind::File),
            ])
            .collect();
        let cache = Mutex::new(DirCache::default());
        let reads = std::cell::Cell::new(0);
        let find = |name: &[u8], caseless| {
            DirCache::find(&cache, 1, name, caseless, || {
                reads.set(reads.get() + 1);
                Ok(names.clone())
            })
        };
        for i in (0..50_000u64).step_by(997) {
            assert_eq!(find(format!("n{i}").as_bytes(), false).ok(), Some(i + 100));
        }
        assert_eq!(reads.get(), 1, "read once, then from the cache");
        assert!(find(b"N5", false).is_err(), "exact unless caseless");
        assert_eq!(find(b"N5", true).ok(), Some(105));
        assert_eq!(
            find(b"readme.txt", true).ok(),
            Some(8),
            "an exact match wins"
        );
        assert_eq!(
            find(b"Readme.txt", true).ok(),
            Some(7),
            "else the first caseless one"
        );
        assert!(find(b"n50000", true).is_err());
        // Evicted with its listing.
        if let Ok(mut c) = cache.lock() {
            for d in 2..(DIR_CACHE as u64 + 2) {
                c.put(d, list(1));
            }
            assert!(c.indexes.is_empty());
        };
    }

    #[test]
    fn pages_of_a_listing_resume_from_their_cookies() {
        let names: Vec<(Vec<u8>, u64, FileKind)> = (0..1000u64)
            .map(|i| {
                (
                    format!("name-{i}").repeat(1 + i as usize % 5).into_bytes(),
                    i,
                    FileKind::File,
                )
            })
            .collect();
        for budget in [0, 1, 100, 4096, 1 << 20] {
            let mut cookie = 0;
            let mut got = Vec::new();
            loop {
                let p = page_of_list(&names, cookie, budget);
                assert!(
                    !p.entries.is_empty() || p.end,
                    "an empty page only at the end"
                );
                let used: usize = p.entries.iter().map(|e| dirent_cost(e.0.len())).sum();
                assert!(
                    p.entries.len() == 1 || used <= budget.max(1),
                    "budget {budget}"
                );
                got.extend(p.entries.iter().map(|e| e.1));
                if p.end {
                    break;
                }
                cookie = p.entries.last().map(|e| e.3).unwrap_or(cookie);
                assert_ne!(cookie & INDEX_COOKIE, 0);
            }
            assert_eq!(got, (0..1000).collect::<Vec<_>>(), "budget {budget}");
        }
        // A cookie past the end, or forged: an end, never a panic.
        assert!(page_of_list(&names, INDEX_COOKIE | 5000, 4096).end);
        assert!(page_of_list(&names, u64::MAX, 4096).entries.is_empty());
    }

    #[test]
    fn dir_cache_is_bounded_by_count_and_by_entries() {
        let mut c = DirCache::default();
        for ino in 0..(DIR_CACHE as u64 + 10) {
            c.put(ino, list(1));
        }
        assert_eq!(c.lru.len(), DIR_CACHE);
        assert!(c.get(&0).is_none(), "least recently used dropped first");
        assert!(c.get(&(DIR_CACHE as u64 + 9)).is_some());

        let mut c = DirCache::default();
        c.put(1, list(DIR_CACHE_ENTRIES / 2));
        c.put(2, list(DIR_CACHE_ENTRIES / 2));
        c.put(1, list(DIR_CACHE_ENTRIES / 2)); // replaced, not added
        assert_eq!(c.entries, DIR_CACHE_ENTRIES);
        c.put(3, list(10));
        assert!(c.entries <= DIR_CACHE_ENTRIES);
        assert!(c.get(&2).is_none() && c.get(&1).is_some() && c.get(&3).is_some());
        // One listing larger than the bound is still kept (it is being used).
        c.put(4, list(DIR_CACHE_ENTRIES + 1));
        assert_eq!(c.lru.len(), 1);
        assert_eq!(c.entries, DIR_CACHE_ENTRIES + 1);
    }
}

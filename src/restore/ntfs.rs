//! NTFS through the `ntfs` crate (0.4): files, directories, times, hard links. Inode numbers are
//! MFT record numbers (root = 5). The crate takes `&mut` reader per call, so one `Slice` sits
//! behind a mutex; crate panics on corrupt input are caught and reported as `Error::Corrupt`.
//! File data is read from the $DATA runs (all pieces of an attribute list, in VCN order), so
//! sparse runs are holes for SEEK_HOLE. Compressed (LZNT1) attributes are decompressed one
//! compression unit at a time (`lznt1.rs`), with a small cache of decompressed units. Symlink
//! and junction reparse points are symlinks to their print name with `\` turned into `/`; other
//! reparse points are what their record says (a file or a directory), except WOF (Compact OS)
//! and deduplicated files, whose data lives elsewhere: EOPNOTSUPP. Not read: encrypted files,
//! alternate data streams, security descriptors.

use std::collections::{HashMap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};

use ntfs::attribute_value::NtfsAttributeValue;
use ntfs::indexes::NtfsFileNameIndex;
use ntfs::structured_values::{
    NtfsAttributeList, NtfsFileAttributeFlags, NtfsFileName, NtfsFileNamespace,
    NtfsIndexAllocation, NtfsIndexRoot,
};
use ntfs::{NtfsAttributeFlags, NtfsAttributeType, NtfsFile, NtfsReadSeek, NtfsTime, UpcaseOrd};

use super::bytes::{le16, le32, le64};
use super::{
    human_size, lznt1, page_of_list, unix_time, Dev, DirCache, DirList, DirPage, FileKind, FileMap,
    FileStat, GuestFs, PageFill, Place, Slice, INDEX_COOKIE,
};
use crate::error::{Error, Result};

const ROOT: u64 = 5;
/// MFT records below this are metafiles ($MFT, $LogFile, …) or reserved: never listed.
const FIRST_USER_RECORD: u64 = 24;
/// Most entries read from one directory index (a corrupt index must not run forever).
const MAX_DIR_ENTRIES: usize = 1 << 20;
const CACHE: usize = 256;
/// Decompressed compression units kept (bytes; 64 units of the usual 64 KiB).
const UNIT_CACHE_BYTES: usize = 4 << 20;
/// Largest compression unit we decompress (Windows: 16 clusters of at most 4 KiB).
const MAX_UNIT: u64 = 1 << 20;

/// Reparse tags we show as symlinks.
const IO_REPARSE_TAG_MOUNT_POINT: u32 = 0xA000_0003;
const IO_REPARSE_TAG_SYMLINK: u32 = 0xA000_000C;
/// Reparse tags whose file data is not in the unnamed $DATA: refused rather than read as zeros.
const IO_REPARSE_TAG_DEDUP: u32 = 0x8000_0013;
const IO_REPARSE_TAG_WOF: u32 = 0x8000_0017;
/// Reparse data is at most 16 KiB.
const MAX_REPARSE: usize = 16 * 1024;

/// The value of a record's $REPARSE_POINT attribute, if it has one.
fn reparse_data(fs: &mut Slice, file: &NtfsFile) -> ntfs::Result<Option<Vec<u8>>> {
    let mut attrs = file.attributes();
    while let Some(item) = attrs.next(fs) {
        let item = item?;
        let a = item.to_attribute()?;
        if a.ty()? == NtfsAttributeType::ReparsePoint {
            let mut v = a.value(fs)?;
            let mut out = vec![0u8; (v.len() as usize).min(MAX_REPARSE)];
            v.read_exact(fs, &mut out)?;
            return Ok(Some(out));
        }
    }
    Ok(None)
}

/// What a symlink or junction reparse point is shown to point at: its print name (or, when that
/// is empty, its substitute name without the `\??\` prefix), with `\` turned into `/`. So
/// `..\a\b` reads `../a/b` and `C:\Users` reads `C:/Users` (on the host it dangles, as it
/// would on any other machine). None for other tags and for data that does not parse.
fn link_target(data: &[u8]) -> Option<Vec<u8>> {
    let path_buffer = match le32(data, 0) {
        IO_REPARSE_TAG_SYMLINK => 20,
        IO_REPARSE_TAG_MOUNT_POINT => 16,
        _ => return None,
    };
    let name = |off: usize, len: usize| -> Option<String> {
        let start = path_buffer + off;
        let b = data.get(start..start.checked_add(len)?)?;
        let units: Vec<u16> = b
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        Some(String::from_utf16_lossy(&units))
    };
    let field = |at: usize| usize::from(le16(data, at));
    let print = name(field(12), field(14)).filter(|n| !n.is_empty());
    let target = match print {
        Some(p) => p,
        None => {
            let subst = name(field(8), field(10))?;
            subst
                .strip_prefix("\\??\\")
                .map(str::to_string)
                .unwrap_or(subst)
        }
    };
    (!target.is_empty()).then(|| target.replace('\\', "/").into_bytes())
}

/// `len` bytes of an attribute from byte `start`: at byte `disk` of the volume, or sparse.
#[derive(Clone, Copy, Debug)]
struct Run {
    start: u64,
    len: u64,
    disk: Option<u64>,
}

/// Where a file's unnamed $DATA lives.
enum FileData {
    Resident(Vec<u8>),
    /// Runs in VCN order, contiguous from 0.
    Runs {
        size: u64,
        /// The initialized size: bytes from here to `size` read as zeros, as on Windows.
        valid: u64,
        runs: Vec<Run>,
        /// Compression unit in bytes of a compressed (LZNT1) attribute.
        unit: Option<u64>,
    },
}

/// How one compression unit is stored.
#[derive(Debug, PartialEq, Eq)]
enum UnitKind {
    /// No cluster allocated: zeros, a hole.
    Sparse,
    /// Every cluster allocated: stored uncompressed.
    Stored,
    /// Some clusters allocated, the rest sparse: the allocated ones hold LZNT1 data.
    Compressed,
}

/// Decompressed units by (record, unit index), evicted oldest first past `UNIT_CACHE_BYTES`.
#[derive(Default)]
struct UnitCache {
    map: HashMap<(u64, u64), Arc<Vec<u8>>>,
    order: VecDeque<(u64, u64)>,
    bytes: usize,
}

impl UnitCache {
    fn insert(&mut self, key: (u64, u64), unit: Arc<Vec<u8>>) {
        if self.map.contains_key(&key) {
            return;
        }
        self.bytes += unit.len();
        self.map.insert(key, unit);
        self.order.push_back(key);
        while self.bytes > UNIT_CACHE_BYTES {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some(u) = self.map.remove(&old) {
                self.bytes -= u.len();
            }
        }
    }
}

/// The index of the first run that ends after `offset`.
fn first_run(runs: &[Run], offset: u64) -> usize {
    runs.partition_point(|r| r.start + r.len <= offset)
}

fn unit_kind(runs: &[Run], start: u64, unit: u64) -> UnitKind {
    let end = start.saturating_add(unit);
    let mut allocated = 0;
    for r in &runs[first_run(runs, start)..] {
        if r.start >= end {
            break;
        }
        if r.disk.is_some() {
            allocated += (r.start + r.len).min(end) - r.start.max(start);
        }
    }
    match allocated {
        0 => UnitKind::Sparse,
        a if a == unit => UnitKind::Stored,
        _ => UnitKind::Compressed,
    }
}

/// Directories whose `$INDEX_ALLOCATION` holds more than this many bytes are listed page by
/// page from the B+tree ([`NtfsFs::index_page`]); smaller ones whole, as ext4's and XFS's
/// directories below 1 MiB (`docs/restore.md`, "NTFS `$I30` pages").
const PAGED_INDEX_BYTES: u64 = 1 << 20;
/// Deepest `$I30` tree walked: a 4 KiB-node tree of 32 levels would hold far more names than a
/// volume can; deeper is a loop between index blocks.
const MAX_INDEX_DEPTH: usize = 32;
/// Entries one page may pass over without listing them (DOS aliases, metafiles) before the
/// page ends there.
const MAX_PAGE_VISITS: usize = 1 << 16;
/// Index node ids: 0 is `$INDEX_ROOT`, an index block is its VCN + 1; a cookie is the id << 16 |
/// the entry's position in its node + 1, so it stays below `INDEX_COOKIE` (ids below 2^46).
const MAX_NODE_ID: u64 = 1 << 46;

/// Why a walk of a `$I30` index stopped.
enum WalkErr {
    Ntfs(ntfs::NtfsError),
    Bad(String),
}

impl From<ntfs::NtfsError> for WalkErr {
    fn from(e: ntfs::NtfsError) -> WalkErr {
        WalkErr::Ntfs(e)
    }
}

type Walked<T> = std::result::Result<T, WalkErr>;

fn bad<T>(what: impl Into<String>) -> Walked<T> {
    Err(WalkErr::Bad(what.into()))
}

/// One entry of an index node: `key` is `None` for the node's end entry.
struct IndexEnt {
    key: Option<NtfsFileName>,
    rec: u64,
    /// The index block (VCN) holding the names before this entry.
    sub: Option<u64>,
}

/// The entries of one node, always ending with an end entry (one is added when a damaged node
/// has none).
fn parse_node(entries: ntfs::NtfsIndexNodeEntries<'_, NtfsFileNameIndex>) -> Walked<Vec<IndexEnt>> {
    let mut out = Vec::new();
    for e in entries {
        let e = e?;
        let sub = match e.subnode_vcn() {
            None => None,
            Some(v) => match u64::try_from(v?.value()) {
                Ok(v) if v < MAX_NODE_ID - 1 => Some(v),
                _ => return bad("index entry with a subnode VCN out of range"),
            },
        };
        if e.flags().contains(ntfs::NtfsIndexEntryFlags::LAST_ENTRY) {
            out.push(IndexEnt {
                key: None,
                rec: 0,
                sub,
            });
            return Ok(out);
        }
        let Some(key) = e.key() else {
            return bad("index entry without a name");
        };
        out.push(IndexEnt {
            key: Some(key?),
            rec: e.file_reference().file_record_number(),
            sub,
        });
    }
    out.push(IndexEnt {
        key: None,
        rec: 0,
        sub: None,
    });
    Ok(out)
}

/// The order of names in a `$I30` index (COLLATION_FILENAME): by the volume's `$UpCase`
/// table, then, for names equal but for case, by their UTF-16 code units (`A` before `a`), as
/// NTFS and ntfs-3g insert them.
fn collate(ntfs: &ntfs::Ntfs, a: &NtfsFileName, b: &NtfsFileName) -> std::cmp::Ordering {
    let (x, y) = (a.name(), b.name());
    x.upcase_cmp(ntfs, &y)
        .then_with(|| x.u16_iter().cmp(y.u16_iter()))
}

/// [`collate`] of an index name against a name looked up.
fn collate_str(ntfs: &ntfs::Ntfs, a: &NtfsFileName, want: &str) -> std::cmp::Ordering {
    let x = a.name();
    x.upcase_cmp(ntfs, &want)
        .then_with(|| x.u16_iter().cmp(want.encode_utf16()))
}

/// Index blocks last parsed, by (directory, node id): a listing's pages resume in the blocks
/// the page before ended in, and every search passes the same upper nodes. At most
/// [`NODE_CACHE`] blocks (~30 names of ~600 bytes each).
#[derive(Default)]
struct NodeCache {
    map: HashMap<(u64, u64), Arc<Vec<IndexEnt>>>,
    order: VecDeque<(u64, u64)>,
}

const NODE_CACHE: usize = 64;

impl NodeCache {
    fn get(&self, key: (u64, u64)) -> Option<Arc<Vec<IndexEnt>>> {
        self.map.get(&key).cloned()
    }

    fn put(&mut self, key: (u64, u64), node: Arc<Vec<IndexEnt>>) {
        if self.map.insert(key, node).is_none() {
            self.order.push_back(key);
        }
        while self.order.len() > NODE_CACHE {
            if let Some(old) = self.order.pop_front() {
                self.map.remove(&old);
            }
        }
    }
}

/// A directory's `$I30` index, opened for one call.
struct I30<'n, 'f> {
    ntfs: &'n ntfs::Ntfs,
    dir: u64,
    nodes: &'n Mutex<NodeCache>,
    root: Arc<Vec<IndexEnt>>,
    alloc: Option<NtfsIndexAllocation<'n, 'f>>,
    record_size: u32,
    /// Bytes of `$INDEX_ALLOCATION` (0 for an index that is only its root).
    alloc_len: u64,
}

impl I30<'_, '_> {
    /// Node `id`'s entries (read again each time: a walk keeps only its path).
    fn node(&self, fs: &mut Slice, id: u64) -> Walked<Arc<Vec<IndexEnt>>> {
        if id == 0 {
            return Ok(self.root.clone());
        }
        let Some(alloc) = &self.alloc else {
            return bad("index block in an index that has only its root");
        };
        if let Some(n) = self.nodes.lock().ok().and_then(|c| c.get((self.dir, id))) {
            return Ok(n);
        }
        let vcn = i64::try_from(id - 1).map_err(|_| WalkErr::Bad("VCN out of range".into()))?;
        let rec = alloc.record_from_vcn(fs, self.record_size, ntfs::types::Vcn::from(vcn))?;
        let node = Arc::new(parse_node(rec.entries::<NtfsFileNameIndex>()?)?);
        if let Ok(mut c) = self.nodes.lock() {
            c.put((self.dir, id), node.clone());
        }
        Ok(node)
    }

    /// The entry named exactly `want` ([`collate_str`]), searched from the root.
    fn find(&self, fs: &mut Slice, want: &str) -> Walked<Option<(u64, NtfsFileName)>> {
        let mut id = 0;
        for _ in 0..MAX_INDEX_DEPTH {
            let ents = self.node(fs, id)?;
            let mut down = None;
            for e in ents.iter() {
                let Some(key) = &e.key else {
                    down = e.sub;
                    break;
                };
                match collate_str(self.ntfs, key, want) {
                    std::cmp::Ordering::Less => {}
                    std::cmp::Ordering::Equal => return Ok(Some((e.rec, key.clone()))),
                    std::cmp::Ordering::Greater => {
                        down = e.sub;
                        break;
                    }
                }
            }
            match down {
                Some(v) => id = v + 1,
                None => return Ok(None),
            }
        }
        bad(format!("index deeper than {MAX_INDEX_DEPTH} levels"))
    }
}

/// Opens directory `dir`'s `$I30` index for `f`.
fn with_i30<'n, R>(
    ntfs: &'n ntfs::Ntfs,
    nodes: &'n Mutex<NodeCache>,
    fs: &mut Slice,
    dir: u64,
    f: impl FnOnce(&I30, &mut Slice) -> Walked<R>,
) -> Walked<R> {
    let file = ntfs.file(fs, dir)?;
    if !file.is_directory() {
        return bad("not a directory");
    }
    let (mut root_item, mut alloc_item) = (None, None);
    let mut attrs = file.attributes();
    while let Some(item) = attrs.next(fs) {
        let item = item?;
        let (ty, named) = {
            let a = item.to_attribute()?;
            let ty = a.ty()?;
            let named = matches!(
                ty,
                NtfsAttributeType::IndexRoot | NtfsAttributeType::IndexAllocation
            ) && a.name()?.to_string_lossy() == "$I30";
            (ty, named)
        };
        match ty {
            NtfsAttributeType::IndexRoot if named && root_item.is_none() => root_item = Some(item),
            NtfsAttributeType::IndexAllocation if named && alloc_item.is_none() => {
                alloc_item = Some(item)
            }
            _ => {}
        }
    }
    let Some(root_item) = root_item else {
        return bad("directory without a $I30 $INDEX_ROOT");
    };
    let root_attr = root_item.to_attribute()?;
    let root = root_attr.resident_structured_value::<NtfsIndexRoot>()?;
    let alloc_attr = match (root.is_large_index(), &alloc_item) {
        (false, _) => None,
        (true, Some(item)) => Some(item.to_attribute()?),
        (true, None) => return bad("large index without $INDEX_ALLOCATION"),
    };
    let alloc = match &alloc_attr {
        Some(a) => Some(a.structured_value::<_, NtfsIndexAllocation>(fs)?),
        None => None,
    };
    let ix = I30 {
        ntfs,
        dir,
        nodes,
        root: Arc::new(parse_node(root.entries::<NtfsFileNameIndex>()?)?),
        alloc,
        record_size: root.index_record_size(),
        alloc_len: alloc_attr.as_ref().map_or(0, |a| a.value_length()),
    };
    f(&ix, fs)
}

/// A name the walk reached: its node's id, its position there, and the node.
type Named = (u64, usize, Arc<Vec<IndexEnt>>);

/// A node on the walk's path and the entry in it whose names come next (those of its
/// subnode first).
struct Frame {
    id: u64,
    ents: Arc<Vec<IndexEnt>>,
    at: usize,
}

/// An in-order walk of a `$I30` B+tree that keeps only the path from the root. Every name it
/// gives must come strictly after the one before ([`collate`]): a damaged tree (out of
/// order, an index block reached twice, a loop) ends the walk with an error, never loops.
struct Walk<'a, 'n, 'f> {
    ix: &'a I30<'n, 'f>,
    path: Vec<Frame>,
    prev: Option<NtfsFileName>,
}

impl<'a, 'n, 'f> Walk<'a, 'n, 'f> {
    fn new(ix: &'a I30<'n, 'f>) -> Self {
        Walk {
            ix,
            path: Vec::new(),
            prev: None,
        }
    }

    fn push(&mut self, fs: &mut Slice, id: u64) -> Walked<()> {
        if self.path.len() >= MAX_INDEX_DEPTH {
            return bad(format!("index deeper than {MAX_INDEX_DEPTH} levels"));
        }
        let ents = self.ix.node(fs, id)?;
        self.path.push(Frame { id, ents, at: 0 });
        Ok(())
    }

    /// Goes down from node `id` to the first name under it.
    fn descend(&mut self, fs: &mut Slice, mut id: u64) -> Walked<()> {
        loop {
            self.push(fs, id)?;
            let sub = self
                .path
                .last()
                .and_then(|f| f.ents.get(f.at))
                .and_then(|e| e.sub);
            match sub {
                Some(v) => id = v + 1,
                None => return Ok(()),
            }
        }
    }

    /// Positions the walk at the first name.
    fn start(&mut self, fs: &mut Slice) -> Walked<()> {
        self.descend(fs, 0)
    }

    /// Positions the walk at the first name after `key`: a search from the root, O(depth)
    /// index blocks.
    fn seek_after(&mut self, fs: &mut Slice, key: &NtfsFileName) -> Walked<()> {
        let mut id = 0;
        loop {
            self.push(fs, id)?;
            let ntfs = self.ix.ntfs;
            let Some(top) = self.path.last_mut() else {
                return bad("empty index path");
            };
            let at = top
                .ents
                .iter()
                .position(|e| {
                    e.key
                        .as_ref()
                        .is_none_or(|k| collate(ntfs, k, key) == std::cmp::Ordering::Greater)
                })
                .unwrap_or(top.ents.len().saturating_sub(1));
            top.at = at;
            match top.ents.get(at).and_then(|e| e.sub) {
                Some(v) => id = v + 1,
                None => break,
            }
        }
        self.prev = Some(key.clone());
        Ok(())
    }

    /// The next name: its node's id, its position there, and the node.
    fn next(&mut self, fs: &mut Slice) -> Walked<Option<Named>> {
        loop {
            let Some(top) = self.path.last_mut() else {
                return Ok(None);
            };
            if top.ents.get(top.at).is_none_or(|e| e.key.is_none()) {
                // The node's end: its parent's entry comes next.
                self.path.pop();
                continue;
            }
            let (id, at, ents) = (top.id, top.at, top.ents.clone());
            top.at += 1;
            if let Some(v) = ents.get(at + 1).and_then(|e| e.sub) {
                self.descend(fs, v + 1)?;
            }
            let Some(key) = ents.get(at).and_then(|e| e.key.as_ref()) else {
                return bad("index entry vanished");
            };
            if let Some(p) = &self.prev {
                if collate(self.ix.ntfs, key, p) != std::cmp::Ordering::Greater {
                    return bad(format!(
                        "index names out of order ({:?} after {:?}): a damaged or looping index",
                        key.name().to_string_lossy(),
                        p.name().to_string_lossy()
                    ));
                }
            }
            self.prev = Some(key.clone());
            return Ok(Some((id, at, ents)));
        }
    }
}

/// The cookie of the entry at position `at` of node `id`.
fn index_cookie(id: u64, at: usize) -> Walked<u64> {
    match u64::try_from(at) {
        Ok(at) if id < MAX_NODE_ID && at < 0xffff => Ok(id << 16 | (at + 1)),
        _ => bad("index position too large for a cookie"),
    }
}

pub struct NtfsFs {
    ntfs: ntfs::Ntfs,
    reader: Mutex<Slice>,
    dev: Dev,
    label: String,
    dirs: Mutex<DirCache>,
    nodes: Mutex<NodeCache>,
    /// [`PAGED_INDEX_BYTES`] (tests lower it).
    paged_above: u64,
    data: Mutex<HashMap<u64, Arc<FileData>>>,
    units: Mutex<UnitCache>,
}

fn nt_time(t: NtfsTime) -> std::time::SystemTime {
    // 100 ns intervals since 1601-01-01.
    let ts = t.nt_timestamp();
    let secs = (ts / 10_000_000) as i64 - 11_644_473_600;
    unix_time(secs, ((ts % 10_000_000) * 100) as u32)
}

impl NtfsFs {
    pub fn open(dev: Dev) -> Result<NtfsFs> {
        let name = dev.name().to_string();
        // The crate's boot sector parse panics instead of failing on a short read.
        if dev.len() < 8192 {
            return Err(Error::corrupt(
                &name,
                0,
                "NTFS: volume smaller than its boot area",
            ));
        }
        let mut slice = Slice::new(dev.clone());
        let opened = catch_unwind(AssertUnwindSafe(|| -> std::result::Result<_, String> {
            let mut n = ntfs::Ntfs::new(&mut slice).map_err(|e| e.to_string())?;
            n.read_upcase_table(&mut slice).map_err(|e| e.to_string())?;
            let label = match n.volume_name(&mut slice) {
                Some(Ok(v)) => v.name().to_string_lossy(),
                _ => String::new(),
            };
            let root = n.root_directory(&mut slice).map_err(|e| e.to_string())?;
            if !root.is_directory() {
                return Err("root record is not a directory".into());
            }
            Ok((n, label))
        }));
        let (ntfs, label) = match opened {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => return Err(Error::corrupt(&name, 0, format!("NTFS: {e}"))),
            Err(_) => {
                return Err(Error::corrupt(
                    &name,
                    0,
                    "NTFS: reader panicked on the volume header",
                ))
            }
        };
        Ok(NtfsFs {
            ntfs,
            reader: Mutex::new(slice),
            dev,
            label,
            dirs: Mutex::new(DirCache::default()),
            nodes: Mutex::new(NodeCache::default()),
            paged_above: PAGED_INDEX_BYTES,
            data: Mutex::new(HashMap::new()),
            units: Mutex::new(UnitCache::default()),
        })
    }

    /// Run `f` with the reader; crate errors and panics become `Error::Corrupt`.
    fn with<R>(
        &self,
        what: &str,
        f: impl FnOnce(&ntfs::Ntfs, &mut Slice) -> ntfs::Result<R>,
    ) -> Result<R> {
        let mut g = self
            .reader
            .lock()
            .map_err(|_| self.dev.corrupt(0, "NTFS reader lock poisoned"))?;
        match catch_unwind(AssertUnwindSafe(|| f(&self.ntfs, &mut g))) {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.dev.corrupt(0, format!("NTFS {what}: {e}"))),
            Err(_) => Err(self.dev.corrupt(0, format!("NTFS {what}: reader panicked"))),
        }
    }

    fn file<'n>(ntfs: &'n ntfs::Ntfs, fs: &mut Slice, ino: u64) -> ntfs::Result<NtfsFile<'n>> {
        ntfs.file(fs, ino)
    }

    /// The runs of a file's unnamed $DATA, read piece by piece when an attribute list splits it
    /// over several records (the crate's own reader stops at the first piece boundary there).
    fn file_data(&self, ino: u64) -> Result<Arc<FileData>> {
        if let Ok(c) = self.data.lock() {
            if let Some(d) = c.get(&ino) {
                return Ok(d.clone());
            }
        }
        let cluster = u64::from(self.ntfs.cluster_size());
        let r = self.with("read", |ntfs, fs| {
            let file = Self::file(ntfs, fs, ino)?;
            if file.is_directory() {
                return Ok(Err(Error::IsDir(format!("NTFS record {ino}"))));
            }
            if let Some(tag) = reparse_data(fs, &file)?.map(|d| le32(&d, 0)) {
                if tag == IO_REPARSE_TAG_WOF || tag == IO_REPARSE_TAG_DEDUP {
                    return Ok(Err(Error::NotSupported(format!(
                        "NTFS record {ino}: data kept by reparse tag {tag:#x} (WOF/Compact OS \
                         compression or deduplication) is not read"
                    ))));
                }
            }
            let mut list = None;
            let mut base_data = None;
            let base_pos = file.position().value().map_or(0, |p| p.get());
            let mut raw = file.attributes_raw();
            for a in raw.by_ref() {
                let a = a?;
                match a.ty()? {
                    NtfsAttributeType::AttributeList => {
                        list = Some(a.structured_value::<_, NtfsAttributeList>(fs)?)
                    }
                    NtfsAttributeType::Data if a.name_length() == 0 && base_data.is_none() => {
                        base_data = Some(a)
                    }
                    _ => {}
                }
            }
            let mut pieces = Vec::new();
            let mut files = Vec::new();
            if let Some(list) = list {
                let mut entries = list.entries();
                while let Some(e) = entries.next(fs) {
                    let e = e?;
                    if e.ty()? == NtfsAttributeType::Data && e.name_length() == 0 {
                        // A negative VCN is corrupt: sorts last and fails the overlap check below.
                        let vcn = u64::try_from(e.lowest_vcn().value()).unwrap_or(u64::MAX);
                        files.push((vcn, e.to_file(ntfs, fs)?, e));
                    }
                }
                files.sort_by_key(|(vcn, _, _)| *vcn);
            }
            for (vcn, f, e) in &files {
                let pos = f.position().value().map_or(0, |p| p.get());
                pieces.push((*vcn, e.to_attribute(f)?, pos));
            }
            if pieces.is_empty() {
                match base_data {
                    Some(a) => pieces.push((0, a, base_pos)),
                    None => return Ok(Ok(FileData::Resident(Vec::new()))),
                }
            }
            let mut runs: Vec<Run> = Vec::new();
            let mut size = 0;
            let mut valid = 0;
            let mut unit = None;
            let mut total = 0u64;
            for (vcn, a, record_pos) in &pieces {
                if a.flags().contains(NtfsAttributeFlags::ENCRYPTED) {
                    return Ok(Err(Error::NotSupported(format!(
                        "NTFS record {ino} is encrypted"
                    ))));
                }
                if *vcn == 0 {
                    size = a.value_length();
                    valid = size;
                    if !a.is_resident() {
                        let attr_pos = a.position().value().map_or(0, |p| p.get());
                        let h = match self.nonresident_header(*record_pos, attr_pos) {
                            Ok(h) => h,
                            Err(e) => return Ok(Err(e)),
                        };
                        valid = le64(&h, 0x38).min(size);
                        if a.flags().contains(NtfsAttributeFlags::COMPRESSED) {
                            // A resident value is never compressed; the unit is 2^n clusters.
                            let u = 1u64
                                .checked_shl(u32::from(h[0x22]))
                                .and_then(|n| n.checked_mul(cluster))
                                .unwrap_or(0);
                            if u == 0 || u > MAX_UNIT {
                                return Ok(Err(Error::NotSupported(format!(
                                    "NTFS record {ino}: compression unit of 2^{} clusters",
                                    h[0x22]
                                ))));
                            }
                            unit = Some(u);
                        }
                    }
                }
                if a.is_resident() {
                    if pieces.len() != 1 {
                        return Ok(Err(self.dev.corrupt(
                            0,
                            format!("NTFS record {ino}: resident piece in a list"),
                        )));
                    }
                    let mut v = a.value(fs)?;
                    let mut out = vec![0u8; v.len() as usize];
                    v.read_exact(fs, &mut out)?;
                    return Ok(Ok(FileData::Resident(out)));
                }
                let start = vcn.saturating_mul(cluster);
                if start < total || start == u64::MAX {
                    return Ok(Err(self.dev.corrupt(
                        0,
                        format!("NTFS record {ino}: overlapping $DATA pieces"),
                    )));
                }
                if start > total {
                    runs.push(Run {
                        start: total,
                        len: start - total,
                        disk: None,
                    });
                    total = start;
                }
                let NtfsAttributeValue::NonResident(nr) = a.value(fs)? else {
                    return Ok(Err(self
                        .dev
                        .corrupt(0, format!("NTFS record {ino}: unexpected $DATA form"))));
                };
                for run in nr.data_runs() {
                    let run = run?;
                    let len = run.allocated_size();
                    let disk = run.data_position().value().map(|p| p.get());
                    if let Some(d) = disk {
                        if d.checked_add(len).is_none_or(|e| e > self.dev.len()) {
                            return Ok(Err(self
                                .dev
                                .corrupt(d, format!("NTFS record {ino}: data run past the end"))));
                        }
                    }
                    let Some(end) = total.checked_add(len) else {
                        return Ok(Err(self.dev.corrupt(
                            0,
                            format!("NTFS record {ino}: data runs past 2^64 bytes"),
                        )));
                    };
                    runs.push(Run {
                        start: total,
                        len,
                        disk,
                    });
                    total = end;
                    if runs.len() > 1 << 22 {
                        return Ok(Err(self
                            .dev
                            .corrupt(0, format!("NTFS record {ino}: too many data runs"))));
                    }
                }
            }
            Ok(Ok(FileData::Runs {
                size: size.min(total),
                valid: valid.min(total),
                runs,
                unit,
            }))
        })??;
        let r = Arc::new(r);
        if let Ok(mut c) = self.data.lock() {
            if c.len() >= CACHE {
                c.clear();
            }
            c.insert(ino, r.clone());
        }
        Ok(r)
    }

    /// The first 0x48 bytes of a non-resident attribute header as stored (the record read again
    /// and its fixups applied): the crate keeps the compression unit (0x22) and the initialized
    /// size (0x38) to itself.
    fn nonresident_header(&self, record_pos: u64, attr_pos: u64) -> Result<[u8; 0x48]> {
        let size = self.ntfs.file_record_size() as usize;
        let mut rec = self.dev.read_vec(record_pos, size)?;
        let (usa, count) = (usize::from(le16(&rec, 4)), usize::from(le16(&rec, 6)));
        for k in 1..count {
            let (at, from) = (k * 512 - 2, usa + 2 * k);
            let (Some(fix), true) = (rec.get(from..from + 2), at + 2 <= rec.len()) else {
                return Err(self
                    .dev
                    .corrupt(record_pos, "NTFS record: update sequence out of bounds"));
            };
            let fix = [fix[0], fix[1]];
            rec[at..at + 2].copy_from_slice(&fix);
        }
        let off = attr_pos.wrapping_sub(record_pos) as usize;
        rec.get(off..off.saturating_add(0x48))
            .and_then(|h| <[u8; 0x48]>::try_from(h).ok())
            .ok_or_else(|| {
                self.dev
                    .corrupt(attr_pos, "NTFS: non-resident header past its record")
            })
    }

    /// `buf.len()` bytes of an attribute from `offset`, raw (no decompression). Sparse runs are
    /// left as they are: the caller zeroes `buf`.
    fn read_runs(&self, runs: &[Run], offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = offset + buf.len() as u64;
        for r in &runs[first_run(runs, offset)..] {
            if r.start >= end {
                break;
            }
            let (s, e) = (r.start.max(offset), (r.start + r.len).min(end));
            if let Some(d) = r.disk {
                self.dev.read_exact_at(
                    d + (s - r.start),
                    &mut buf[(s - offset) as usize..(e - offset) as usize],
                )?;
            }
        }
        Ok(())
    }

    /// `buf.len()` bytes of a compressed attribute from `offset` (`buf` zeroed by the caller).
    fn read_compressed(
        &self,
        ino: u64,
        runs: &[Run],
        unit: u64,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let index = pos / unit;
            let start = index * unit;
            let stop = start.saturating_add(unit).min(end);
            let out = &mut buf[(pos - offset) as usize..(stop - offset) as usize];
            match unit_kind(runs, start, unit) {
                UnitKind::Sparse => {}
                UnitKind::Stored => self.read_runs(runs, pos, out)?,
                UnitKind::Compressed => {
                    let data = self.unit_data(ino, runs, index, unit)?;
                    let from = (pos - start) as usize;
                    out.copy_from_slice(&data[from..from + out.len()]);
                }
            }
            pos = stop;
        }
        Ok(())
    }

    /// Compression unit `index` of a compressed attribute, decompressed (cached).
    fn unit_data(&self, ino: u64, runs: &[Run], index: u64, unit: u64) -> Result<Arc<Vec<u8>>> {
        if let Some(u) = self
            .units
            .lock()
            .ok()
            .and_then(|c| c.map.get(&(ino, index)).cloned())
        {
            return Ok(u);
        }
        let start = index * unit;
        let mut raw = vec![0u8; unit as usize];
        self.read_runs(runs, start, &mut raw)?;
        let mut out = vec![0u8; unit as usize];
        lznt1::decompress(&raw, &mut out).map_err(|c| {
            self.dev.corrupt(
                0,
                format!(
                    "NTFS record {ino}: compression unit at byte {start}: {} (byte {} of it)",
                    c.what, c.at
                ),
            )
        })?;
        let out = Arc::new(out);
        if let Ok(mut c) = self.units.lock() {
            c.insert((ino, index), out.clone());
        }
        Ok(out)
    }

    fn dir_entries(&self, dir: u64) -> Result<DirList> {
        DirCache::get_or_read(&self.dirs, dir, || self.read_dir(dir))
    }

    /// `name` in directory `dir` through its `$I30` index B+tree (the crate's finder, which
    /// compares upcased names as the index is sorted): `Some(record)`, `NotFound`, or `None`
    /// when the entry found is not exactly `name` (another case, a DOS alias) or the name is
    /// not UTF-8; the listing decides those.
    fn find_indexed(&self, dir: u64, name: &[u8]) -> Result<Option<u64>> {
        let Ok(want) = std::str::from_utf8(name) else {
            return Ok(None);
        };
        let found = self.with("lookup", |ntfs, fs| {
            let file = Self::file(ntfs, fs, dir)?;
            let index = file.directory_index(fs)?;
            let mut finder = index.finder();
            let Some(e) = NtfsFileNameIndex::find(&mut finder, ntfs, fs, want) else {
                return Ok(Some(None));
            };
            let e = e?;
            let Some(key) = e.key() else {
                return Ok(None);
            };
            let key = key?;
            let exact =
                key.namespace() != NtfsFileNamespace::Dos && key.name().to_string_lossy() == want;
            let rec = e.file_reference().file_record_number();
            Ok(exact.then_some(Some(rec)))
        })?;
        match found {
            Some(Some(rec)) if rec >= FIRST_USER_RECORD && rec != dir => Ok(Some(rec)),
            Some(None) => Err(Error::NotFound(want.to_string())),
            _ => Ok(None),
        }
    }

    /// Directory `dir`'s entries as stored, in the index's order (see [`Self::dir_entries`] for
    /// the cached ones): at most [`MAX_DIR_ENTRIES`] index names looked at.
    fn read_dir(&self, dir: u64) -> Result<Vec<(Vec<u8>, u64, FileKind)>> {
        let page = self
            .index_page(dir, 0, usize::MAX, MAX_DIR_ENTRIES, true)?
            .unwrap_or_default();
        Ok(page
            .entries
            .into_iter()
            .map(|(n, i, k, _)| (n, i, k))
            .collect())
    }

    /// A walk's error as the reader's.
    fn walked<T>(&self, dir: u64, r: Walked<T>) -> Result<T> {
        r.map_err(|e| match e {
            WalkErr::Bad(s) => self.dev.corrupt(0, format!("NTFS directory {dir}: {s}")),
            WalkErr::Ntfs(e) => self.dev.corrupt(0, format!("NTFS directory {dir}: {e}")),
        })
    }

    /// The page of directory `dir` after `cookie` (0: from the first name; else a cookie this
    /// gave: the index node and position of the last name listed) in the index's order,
    /// walking its B+tree from the root: O(depth) index blocks to resume, nothing kept
    /// between pages. At most `max_visits` index names are looked at. Unless `whole`, a
    /// directory small enough to be kept whole ([`PAGED_INDEX_BYTES`]) is listed whole into the
    /// listing cache and its first page given with `INDEX_COOKIE` cookies (`None` for any
    /// other cookie: the caller pages the cached listing).
    fn index_page(
        &self,
        dir: u64,
        cookie: u64,
        budget: usize,
        max_visits: usize,
        whole: bool,
    ) -> Result<Option<DirPage>> {
        let paged_above = self.paged_above;
        let asked = budget;
        let r = self.with("directory", |ntfs, fs| {
            Ok(with_i30(ntfs, &self.nodes, fs, dir, |ix, fs| {
                // A small directory is listed whole (from its start only), for the cache.
                let small = !whole && ix.alloc_len <= paged_above;
                if small && cookie != 0 {
                    return Ok(None);
                }
                let (budget, max_visits) = if small {
                    (usize::MAX, MAX_DIR_ENTRIES)
                } else {
                    (budget, max_visits)
                };
                let mut walk = Walk::new(ix);
                if cookie == 0 {
                    walk.start(fs)?;
                } else {
                    if cookie >= INDEX_COOKIE {
                        return bad(format!("cookie {cookie:#x} is not an index position"));
                    }
                    let ents = ix.node(fs, cookie >> 16)?;
                    let key = usize::try_from(cookie & 0xffff)
                        .ok()
                        .and_then(|at| at.checked_sub(1))
                        .and_then(|at| ents.get(at))
                        .and_then(|e| e.key.clone());
                    let Some(key) = key else {
                        return bad(format!("cookie {cookie:#x} names no index entry"));
                    };
                    walk.seek_after(fs, &key)?;
                }
                let mut fill = PageFill::new(budget);
                let mut reparse = Vec::new();
                let mut visits = 0;
                loop {
                    let Some((id, at, ents)) = walk.next(fs)? else {
                        fill.page.end = true;
                        break;
                    };
                    visits += 1;
                    if visits > max_visits {
                        if fill.page.entries.is_empty() && !whole && !small {
                            return bad(format!(
                                "{max_visits} index names in a row that are not listed"
                            ));
                        }
                        break;
                    }
                    let Some((e, key)) = ents.get(at).and_then(|e| Some((e, e.key.as_ref()?)))
                    else {
                        continue;
                    };
                    if key.namespace() == NtfsFileNamespace::Dos
                        || e.rec < FIRST_USER_RECORD
                        || e.rec == dir
                    {
                        continue;
                    }
                    let name = key.name().to_string_lossy().into_bytes();
                    let kind = if key.is_directory() {
                        FileKind::Dir
                    } else {
                        FileKind::File
                    };
                    if !fill.push(&name, e.rec, kind, index_cookie(id, at)?) {
                        break;
                    }
                    if key
                        .file_attributes()
                        .contains(NtfsFileAttributeFlags::REPARSE_POINT)
                    {
                        reparse.push(fill.page.entries.len() - 1);
                    }
                }
                Ok(Some((fill.page, reparse, small)))
            }))
        })?;
        let Some((mut page, reparse, small)) = self.walked(dir, r)? else {
            return Ok(None);
        };
        // A reparse point may be a symlink: its record says (only these few are read).
        for i in reparse {
            if let Ok(st) = self.stat(page.entries[i].1) {
                page.entries[i].2 = st.kind;
            }
        }
        if small {
            let list = DirCache::get_or_read(&self.dirs, dir, || {
                Ok(page
                    .entries
                    .into_iter()
                    .map(|(n, i, k, _)| (n, i, k))
                    .collect())
            })?;
            return Ok(Some(page_of_list(&list, 0, asked)));
        }
        Ok(Some(page))
    }

    /// `name` in directory `dir` when it is listed page by page (`None` for one kept whole):
    /// an exact search of its index ([`collate`]: the crate's finder only matches case
    /// insensitively), else, for a name with U+FFFD (shown for UTF-16 that is not valid), a
    /// scan of its pages; never a whole listing.
    fn find_paged(&self, dir: u64, name: &[u8]) -> Result<Option<u64>> {
        let paged_above = self.paged_above;
        let r = self.with("lookup", |ntfs, fs| {
            Ok(with_i30(ntfs, &self.nodes, fs, dir, |ix, fs| {
                if ix.alloc_len <= paged_above {
                    return Ok(None);
                }
                let Ok(want) = std::str::from_utf8(name) else {
                    return Ok(Some(None));
                };
                Ok(Some(ix.find(fs, want)?.and_then(|(rec, key)| {
                    (key.namespace() != NtfsFileNamespace::Dos
                        && rec >= FIRST_USER_RECORD
                        && rec != dir)
                        .then_some(rec)
                })))
            }))
        })?;
        match self.walked(dir, r)? {
            None => Ok(None),
            Some(Some(rec)) => Ok(Some(rec)),
            Some(None) if name.windows(3).any(|w| w == "\u{FFFD}".as_bytes()) => {
                let mut cookie = 0;
                while let Some(page) =
                    self.index_page(dir, cookie, 64 << 10, MAX_PAGE_VISITS, true)?
                {
                    if let Some(e) = page.entries.iter().find(|e| e.0 == name) {
                        return Ok(Some(e.1));
                    }
                    match page.entries.last() {
                        Some(e) if !page.end => cookie = e.3,
                        _ => break,
                    }
                }
                Err(Error::NotFound(String::from_utf8_lossy(name).into_owned()))
            }
            Some(None) => Err(Error::NotFound(String::from_utf8_lossy(name).into_owned())),
        }
    }
}

impl GuestFs for NtfsFs {
    fn root(&self) -> u64 {
        ROOT
    }

    fn stat(&self, ino: u64) -> Result<FileStat> {
        let cluster = u64::from(self.ntfs.cluster_size());
        self.with("stat", |ntfs, fs| {
            let file = Self::file(ntfs, fs, ino)?;
            let info = file.info()?;
            let dir = file.is_directory();
            // Hard links: every $FILE_NAME but the DOS 8.3 alias of a long name.
            let mut nlink = 0u32;
            let mut size = 0u64;
            let mut attrs = file.attributes();
            while let Some(item) = attrs.next(fs) {
                let item = item?;
                let a = item.to_attribute()?;
                match a.ty()? {
                    NtfsAttributeType::FileName => {
                        let n = a.structured_value::<_, NtfsFileName>(fs)?;
                        if n.namespace() != NtfsFileNamespace::Dos {
                            nlink += 1;
                        }
                    }
                    NtfsAttributeType::Data if !dir && a.name_length() == 0 => {
                        size = a.value_length()
                    }
                    _ => {}
                }
            }
            let mut perm = if dir { 0o755 } else { 0o644 };
            let mut kind = if dir { FileKind::Dir } else { FileKind::File };
            let flags = info.file_attributes();
            if flags.contains(NtfsFileAttributeFlags::READ_ONLY) {
                perm &= !0o222;
            }
            if flags.contains(NtfsFileAttributeFlags::REPARSE_POINT) {
                if let Some(target) = reparse_data(fs, &file)?.and_then(|d| link_target(&d)) {
                    (kind, perm, size) = (FileKind::Symlink, 0o777, target.len() as u64);
                }
            }
            let mtime = nt_time(info.modification_time());
            Ok(FileStat {
                ino,
                kind,
                perm,
                uid: 0,
                gid: 0,
                size,
                allocated: size.div_ceil(cluster).saturating_mul(cluster),
                nlink: nlink.max(1),
                rdev: 0,
                atime: nt_time(info.access_time()),
                mtime,
                ctime: nt_time(info.mft_record_modification_time()),
                btime: Some(nt_time(info.creation_time())),
            })
        })
    }

    fn lookup(&self, dir: u64, name: &[u8]) -> Result<FileStat> {
        let ino = match self.find_indexed(dir, name)? {
            Some(ino) => ino,
            None => match self.find_paged(dir, name)? {
                Some(ino) => ino,
                None => DirCache::find(&self.dirs, dir, name, false, || self.read_dir(dir))?,
            },
        };
        let st = self.stat(ino)?;
        if st.kind == FileKind::Dir {
            // A directory has one parent: one of its names must point back at `dir`.
            let ok = self.with("lookup", |ntfs, fs| {
                let f = Self::file(ntfs, fs, ino)?;
                Ok(f.name(fs, None, Some(dir)).is_some())
            })?;
            if !ok {
                return Err(self
                    .dev
                    .corrupt(0, format!("NTFS record {ino}: no name in parent {dir}")));
            }
        }
        Ok(st)
    }

    fn readdir(&self, dir: u64) -> Result<DirList> {
        self.dir_entries(dir)
    }

    /// Directories with more than [`PAGED_INDEX_BYTES`] of index blocks page by their
    /// B+tree ([`NtfsFs::index_page`]); smaller ones page their cached whole listing.
    fn readdir_page(&self, dir: u64, cookie: u64, budget: usize) -> Result<DirPage> {
        if cookie & INDEX_COOKIE == 0 {
            // A listing cached whole (a small directory read ahead) starts its pages.
            let cached = if cookie == 0 {
                self.dirs.lock().ok().and_then(|mut c| c.get(&dir).cloned())
            } else {
                None
            };
            if let Some(list) = cached {
                return Ok(page_of_list(&list, cookie, budget));
            }
            if let Some(p) = self.index_page(dir, cookie, budget, MAX_PAGE_VISITS, false)? {
                return Ok(p);
            }
        }
        Ok(page_of_list(&self.dir_entries(dir)?, cookie, budget))
    }

    fn read(&self, ino: u64, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let data = self.file_data(ino)?;
        match data.as_ref() {
            FileData::Resident(v) => {
                let Some(rest) = usize::try_from(offset).ok().and_then(|o| v.get(o..)) else {
                    return Ok(0);
                };
                let n = rest.len().min(buf.len());
                buf[..n].copy_from_slice(&rest[..n]);
                Ok(n)
            }
            FileData::Runs {
                size,
                valid,
                runs,
                unit,
            } => {
                if offset >= *size {
                    return Ok(0);
                }
                let want = (buf.len() as u64).min(size - offset) as usize;
                let buf = &mut buf[..want];
                buf.fill(0);
                // Past the initialized size: zeros, whatever the clusters hold.
                let n = valid.saturating_sub(offset).min(want as u64) as usize;
                match unit {
                    None => self.read_runs(runs, offset, &mut buf[..n])?,
                    Some(u) => self.read_compressed(ino, runs, *u, offset, &mut buf[..n])?,
                }
                Ok(want)
            }
        }
    }

    fn map(&self, ino: u64, offset: u64, len: u64) -> Result<Option<FileMap>> {
        if self.stat(ino)?.kind != FileKind::File {
            return Ok(None);
        }
        let data = self.file_data(ino)?;
        // Resident and compressed data are the reader's to give.
        let FileData::Runs {
            size,
            valid,
            runs,
            unit: None,
        } = data.as_ref()
        else {
            return Ok(None);
        };
        let (mut map, end) = FileMap::window(*size, offset, len);
        let vol = self.dev.len();
        let mut pos = offset;
        for r in &runs[first_run(runs, offset)..] {
            if pos >= end || r.start >= end {
                break;
            }
            let (s, e) = (r.start.max(pos), r.start.saturating_add(r.len).min(end));
            if s >= e {
                continue;
            }
            if s > pos {
                // Runs are contiguous from 0; a gap is the reader's to judge.
                return Ok(None);
            }
            // Past the initialized size: zeros, whatever the clusters hold.
            let disk_end = e.min(*valid).max(s);
            if let Some(d) = r.disk {
                if !map.push(s, disk_end - s, Place::Disk(d + (s - r.start)), vol) {
                    return Ok(Some(map));
                }
            } else if !map.push(s, disk_end - s, Place::Zero, vol) {
                return Ok(Some(map));
            }
            if !map.push(disk_end, e - disk_end, Place::Zero, vol) {
                return Ok(Some(map));
            }
            pos = e;
        }
        if pos < end {
            // Runs shorter than the size: the reader's to judge.
            map.push(pos, end - pos, Place::Reader, vol);
        }
        Ok(Some(map))
    }

    fn data_ranges(&self, ino: u64) -> Result<Option<Vec<(u64, u64)>>> {
        if self.stat(ino)?.kind != FileKind::File {
            return Ok(None);
        }
        let data = self.file_data(ino)?;
        let FileData::Runs {
            size, runs, unit, ..
        } = data.as_ref()
        else {
            return Ok(None);
        };
        // Compressed: a unit with any cluster allocated is data, an all-sparse one a hole.
        let align = unit.unwrap_or(1);
        let mut out: Vec<(u64, u64)> = Vec::new();
        for r in runs.iter().filter(|r| r.disk.is_some()) {
            let s = r.start / align * align;
            let e = (r.start + r.len)
                .div_ceil(align)
                .saturating_mul(align)
                .min(*size);
            if e <= s {
                continue;
            }
            match out.last_mut() {
                Some(l) if l.0 + l.1 >= s => l.1 = l.1.max(e - l.0),
                _ => out.push((s, e - s)),
            }
        }
        Ok(Some(out))
    }

    fn readlink(&self, ino: u64) -> Result<Vec<u8>> {
        let target = self.with("readlink", |ntfs, fs| {
            let file = Self::file(ntfs, fs, ino)?;
            Ok(reparse_data(fs, &file)?.and_then(|d| link_target(&d)))
        })?;
        target.ok_or_else(|| Error::Invalid(format!("NTFS record {ino} is not a symlink")))
    }

    fn xattrs(&self, _ino: u64) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        Ok(Vec::new())
    }

    fn describe(&self) -> String {
        let mut s = format!("NTFS, {}", human_size(self.ntfs.size()));
        if !self.label.is_empty() {
            s.push_str(&format!(", label {}", self.label));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::restore::MemDisk;
    use std::process::Command;

    fn run(c: &mut Command) {
        let out = c.output().unwrap_or_else(|e| panic!("{c:?}: {e}"));
        assert!(
            out.status.success(),
            "{c:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Names made in `big/`: ordinary ones, names equal but for case (POSIX namespace, as
    /// ntfs-3g makes them), non-ASCII ones and subdirectories.
    fn names() -> Vec<String> {
        let mut v: Vec<String> = (0..3000)
            .map(|i| format!("f-{:05}-{}", (i * 7919) % 3000, "x".repeat(i % 40)))
            .collect();
        v.extend(
            [
                "case-a", "Case-a", "CASE-A", "cASE-a", "é-1", "É-1", "ß", "Ω-z", "~tilde",
            ]
            .map(String::from),
        );
        v
    }

    /// An NTFS image made by mkntfs with `big/` filled through ntfs-3g.
    fn image() -> Vec<u8> {
        let t = tempfile::Builder::new()
            .prefix("snapfs-issue-19n-unit")
            .tempdir()
            .unwrap();
        let raw = t.path().join("n.raw");
        let mnt = t.path().join("m");
        std::fs::create_dir(&mnt).unwrap();
        run(Command::new("truncate").args(["-s", "32M"]).arg(&raw));
        run(Command::new("mkntfs").args(["-q", "-F", "-f"]).arg(&raw));
        run(Command::new("ntfs-3g").arg(&raw).arg(&mnt));
        let made = (|| -> std::io::Result<()> {
            let big = mnt.join("big");
            std::fs::create_dir(&big)?;
            for (i, n) in names().iter().enumerate() {
                if i % 500 == 7 {
                    std::fs::create_dir(big.join(n))?;
                } else {
                    std::fs::write(big.join(n), b"")?;
                }
            }
            Ok(())
        })();
        run(Command::new("umount").arg(&mnt));
        made.unwrap();
        std::fs::read(&raw).unwrap()
    }

    fn open(img: Vec<u8>) -> NtfsFs {
        let len = img.len() as u64;
        NtfsFs::open(Dev::new(Arc::new(MemDisk(img)), 0, len, "t").unwrap()).unwrap()
    }

    fn whole(fs: &NtfsFs, dir: u64, cookie: u64) -> Result<DirPage> {
        Ok(fs
            .index_page(dir, cookie, usize::MAX, usize::MAX, true)?
            .unwrap())
    }

    /// The listing in pages from `cookie` 0 of `budget` bytes.
    fn paged(fs: &NtfsFs, dir: u64, budget: usize) -> Result<DirPage> {
        let (mut out, mut cookie) = (DirPage::default(), 0);
        loop {
            let p = fs.readdir_page(dir, cookie, budget)?;
            assert!(
                !p.entries.is_empty() || p.end,
                "an empty page before the end"
            );
            out.entries.extend(p.entries.iter().cloned());
            if p.end {
                out.end = true;
                return Ok(out);
            }
            cookie = p.entries.last().unwrap().3;
            assert!(out.entries.len() < 1 << 20, "a listing that does not end");
        }
    }

    /// The `$I30` walk lists every name once in the index's order (the crate's own in-order
    /// iterator is the reference), and resuming after any cookie gives exactly the rest.
    #[test]
    fn index_pages_resume_from_every_cookie() {
        let mut fs = open(image());
        let big = fs.lookup(ROOT, b"big").unwrap().ino;
        let all = whole(&fs, big, 0).unwrap();
        assert!(all.end);
        let mut want: Vec<String> = names();
        let mut got: Vec<String> = all
            .entries
            .iter()
            .map(|e| String::from_utf8(e.0.clone()).unwrap())
            .collect();
        // The crate's iterator: same names, same order.
        let crate_order = fs
            .with("test", |ntfs, fs| {
                let file = ntfs.file(fs, big)?;
                let index = file.directory_index(fs)?;
                let mut entries = index.entries();
                let mut out = Vec::new();
                while let Some(e) = entries.next(fs) {
                    out.push(e?.key().unwrap()?.name().to_string_lossy());
                }
                Ok(out)
            })
            .unwrap();
        assert_eq!(got, crate_order);
        got.sort();
        want.sort();
        assert_eq!(got, want, "names listed");
        // After every cookie: the next entries (a short page), and every 97th all the rest.
        for (i, e) in all.entries.iter().enumerate() {
            let next = fs
                .index_page(big, e.3, 200, usize::MAX, true)
                .unwrap()
                .unwrap();
            let n = next.entries.len();
            assert_eq!(
                next.entries,
                all.entries[i + 1..i + 1 + n],
                "after {:#x}",
                e.3
            );
            assert_eq!(next.end, i + 1 + n == all.entries.len());
            if i % 97 == 0 {
                let rest = whole(&fs, big, e.3).unwrap();
                assert!(rest.end);
                assert_eq!(
                    rest.entries,
                    all.entries[i + 1..],
                    "after cookie {:#x}",
                    e.3
                );
            }
        }
        // Below the threshold: the whole listing cached, paged by its positions.
        let kept = paged(&fs, big, 4096).unwrap();
        assert!(kept.entries.iter().all(|e| e.3 & INDEX_COOKIE != 0));
        let strip = |p: &DirPage| -> Vec<(Vec<u8>, u64, FileKind)> {
            p.entries.iter().map(|e| (e.0.clone(), e.1, e.2)).collect()
        };
        assert_eq!(strip(&kept), strip(&all));
        fs.dirs = Mutex::new(DirCache::default());
        // Pages of one FUSE buffer (and of one entry) give the same listing.
        fs.paged_above = 0;
        for budget in [1, 4096] {
            assert_eq!(paged(&fs, big, budget).unwrap(), all, "budget {budget}");
        }
        // Lookups in a paged directory: exact names only, no other case.
        for n in ["case-a", "CASE-A", "É-1", "ß", "f-00000-"] {
            let st = fs.lookup(big, n.as_bytes()).unwrap();
            let e = all.entries.iter().find(|e| e.0 == n.as_bytes()).unwrap();
            assert_eq!(st.ino, e.1, "{n}");
        }
        for n in ["CASE-a", "case-A", "e-1", "f-00000"] {
            assert!(
                matches!(fs.lookup(big, n.as_bytes()), Err(Error::NotFound(_))),
                "{n}"
            );
        }
        // Cookies that name no entry: errors, not another listing.
        let last = all.entries.last().unwrap().3;
        for bad in [last + 1, (last | 0xffff), (1 << 45) << 16 | 1] {
            assert!(whole(&fs, big, bad).is_err(), "cookie {bad:#x}");
        }
    }

    /// A damaged index (a name rewritten so that it sorts after those that follow it, or an
    /// index block's subnode pointing back up the tree) ends the listing with an error, never
    /// with names twice or a loop.
    #[test]
    fn damaged_index_is_an_error_not_a_loop() {
        let img = image();
        let fs = open(img.clone());
        let big = fs.lookup(ROOT, b"big").unwrap().ino;
        let all = whole(&fs, big, 0).unwrap().entries;
        drop(fs);
        // Every index block of the image (4 KiB, "INDX"): the name of the second entry of each
        // block made to start with U+FFEE, which sorts after every name made.
        let mut bad = img.clone();
        let mut damaged = 0;
        for at in (0..bad.len()).step_by(4096) {
            if &bad[at..at + 4] != b"INDX" {
                continue;
            }
            let first = at + 0x18 + le32(&bad, at + 0x18) as usize;
            let second = first + usize::from(le16(&bad, first + 8));
            let name = second + 0x10 + 0x42;
            // Not an update-sequence slot (the last two bytes of a sector).
            if name % 512 < 510 && le16(&bad, second + 0x0a) > 0 {
                bad[name..name + 2].copy_from_slice(&0xffeeu16.to_le_bytes());
                damaged += 1;
            }
        }
        assert!(damaged > 0, "no index block damaged");
        let mut fs = open(bad);
        let r = whole(&fs, big, 0);
        assert!(
            r.is_err(),
            "a damaged index listed: {:?}",
            r.map(|p| p.entries.len())
        );
        fs.paged_above = 0;
        match paged(&fs, big, 4096) {
            Err(e) => eprintln!("paged listing of a damaged index: {e}"),
            Ok(l) => panic!(
                "a damaged index listed {} of {} names",
                l.entries.len(),
                all.len()
            ),
        }
    }
}

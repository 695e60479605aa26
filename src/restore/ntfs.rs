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
};
use ntfs::{NtfsAttributeFlags, NtfsAttributeType, NtfsFile, NtfsReadSeek, NtfsTime};

use super::bytes::{le16, le32, le64};
use super::{
    human_size, lznt1, unix_time, Dev, DirCache, DirList, FileKind, FileMap, FileStat, GuestFs,
    Place, Slice,
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

pub struct NtfsFs {
    ntfs: ntfs::Ntfs,
    reader: Mutex<Slice>,
    dev: Dev,
    label: String,
    dirs: Mutex<DirCache>,
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

    /// Directory `dir`'s entries as stored (see [`Self::dir_entries`] for the cached ones).
    fn read_dir(&self, dir: u64) -> Result<Vec<(Vec<u8>, u64, FileKind)>> {
        let list = self.with("directory", |ntfs, fs| {
            let file = Self::file(ntfs, fs, dir)?;
            let index = file.directory_index(fs)?;
            let mut entries = index.entries();
            let mut out = Vec::new();
            let mut reparse = Vec::new();
            let mut n = 0;
            while let Some(e) = entries.next(fs) {
                n += 1;
                if n > MAX_DIR_ENTRIES {
                    break;
                }
                let e = e?;
                let Some(key) = e.key() else { continue };
                let key = key?;
                if key.namespace() == NtfsFileNamespace::Dos {
                    continue;
                }
                let rec = e.file_reference().file_record_number();
                if rec < FIRST_USER_RECORD || rec == dir {
                    continue;
                }
                let name = key.name().to_string_lossy().into_bytes();
                let kind = if key.is_directory() {
                    FileKind::Dir
                } else {
                    FileKind::File
                };
                if key
                    .file_attributes()
                    .contains(NtfsFileAttributeFlags::REPARSE_POINT)
                {
                    reparse.push(out.len());
                }
                out.push((name, rec, kind));
            }
            Ok((out, reparse))
        })?;
        // A reparse point may be a symlink: its record says (only these few are read).
        let (mut list, reparse) = list;
        for i in reparse {
            if let Ok(st) = self.stat(list[i].1) {
                list[i].2 = st.kind;
            }
        }
        Ok(list)
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
            None => DirCache::find(&self.dirs, dir, name, false, || self.read_dir(dir))?,
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

//! FAT12/16/32 with long file names, our own reader (see docs/restore.md: the `fatfs` crate has
//! no inode numbers to hand out and follows cluster chains without a bound).
//!
//! FAT has no inode numbers: a file's number is derived from where its short directory entry
//! lies on disk (byte offset / 32 + `INO_BASE`), which is stable and unique; the root is 1.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use super::bytes::{le16, le32, sub, u8at};
use super::{human_size, Dev, DirCache, DirList, FileKind, FileMap, FileStat, GuestFs, Place};
use crate::error::{Error, Result};

const ROOT: u64 = 1;
const INO_BASE: u64 = 16;
/// Largest FAT we keep in memory (bigger ones are read entry by entry).
const MAX_FAT_IN_MEMORY: u64 = 64 << 20;
const MAX_DIR_BYTES: u64 = 64 << 20;
const CHAIN_CACHE: usize = 256;

const ATTR_READ_ONLY: u8 = 0x01;
const ATTR_VOLUME: u8 = 0x08;
const ATTR_DIR: u8 = 0x10;
const ATTR_LFN: u8 = 0x0F;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Fat12,
    Fat16,
    Fat32,
}

pub struct FatFs {
    dev: Dev,
    kind: Kind,
    cluster_size: u64,
    /// Byte offset of cluster 2.
    data_start: u64,
    /// Highest valid cluster number.
    max_cluster: u32,
    fat_start: u64,
    fat: Option<Vec<u8>>,
    /// FAT12/16: the fixed root directory region (offset, length).
    root_region: (u64, u64),
    root_cluster: u32,
    label: String,
    chains: Mutex<HashMap<u32, Arc<Vec<u32>>>>,
    dirs: Mutex<DirCache>,
}

/// A short directory entry and where it is.
struct Entry {
    raw: [u8; 32],
}

impl Entry {
    fn attr(&self) -> u8 {
        self.raw[11]
    }
    fn is_dir(&self) -> bool {
        self.attr() & ATTR_DIR != 0
    }
    fn first_cluster(&self, kind: Kind) -> u32 {
        let hi = if kind == Kind::Fat32 {
            u32::from(le16(&self.raw, 20))
        } else {
            0
        };
        (hi << 16) | u32::from(le16(&self.raw, 26))
    }
    fn size(&self) -> u64 {
        u64::from(le32(&self.raw, 28))
    }
}

/// A FAT date and time (local time of the guest; read as UTC) to `SystemTime`.
fn fat_time(date: u16, time: u16, centis: u8) -> SystemTime {
    let year = 1980 + i64::from(date >> 9);
    let month = i64::from((date >> 5) & 0xF).clamp(1, 12);
    let day = i64::from(date & 0x1F).max(1);
    let secs = i64::from(time >> 11) * 3600
        + i64::from((time >> 5) & 0x3F) * 60
        + i64::from(time & 0x1F) * 2
        + i64::from(centis / 100);
    let nanos = u32::from(centis % 100) * 10_000_000;
    super::unix_time(days_from_civil(year, month, day) * 86400 + secs, nanos)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

impl FatFs {
    pub fn open(dev: Dev) -> Result<FatFs> {
        let b = dev.read_vec(0, 512)?;
        let c = |what: &str| dev.corrupt(0, format!("FAT boot sector: {what}"));
        if !super::probe::is_fat(&b) {
            return Err(c("no BIOS parameter block"));
        }
        let bps = u64::from(le16(&b, 11));
        let spc = u64::from(u8at(&b, 13));
        let reserved = u64::from(le16(&b, 14));
        let fats = u64::from(u8at(&b, 16));
        let root_entries = u64::from(le16(&b, 17));
        let total = match le16(&b, 19) {
            0 => u64::from(le32(&b, 32)),
            n => u64::from(n),
        };
        let fat_size = match le16(&b, 22) {
            0 => u64::from(le32(&b, 36)),
            n => u64::from(n),
        };
        if fat_size == 0 || total == 0 {
            return Err(c("zero FAT or volume size"));
        }
        let root_sectors = (root_entries * 32).div_ceil(bps);
        let first_data = reserved + fats * fat_size + root_sectors;
        if first_data >= total {
            return Err(c("no data region"));
        }
        let clusters = (total - first_data) / spc;
        let kind = if clusters < 4085 {
            Kind::Fat12
        } else if clusters < 65525 {
            Kind::Fat16
        } else {
            Kind::Fat32
        };
        let fat_bytes = fat_size * bps;
        let needed = match kind {
            Kind::Fat12 => (clusters + 2) * 3 / 2,
            Kind::Fat16 => (clusters + 2) * 2,
            Kind::Fat32 => (clusters + 2) * 4,
        };
        if needed > fat_bytes {
            return Err(c("FAT smaller than the cluster count needs"));
        }
        let fat_start = reserved * bps;
        let fat = if fat_bytes <= MAX_FAT_IN_MEMORY {
            Some(dev.read_vec(fat_start, fat_bytes as usize)?)
        } else {
            None
        };
        let label_off = if kind == Kind::Fat32 { 71 } else { 43 };
        let label = String::from_utf8_lossy(sub(&b, label_off, 11))
            .trim_end()
            .to_string();
        let label = if label == "NO NAME" {
            String::new()
        } else {
            label
        };
        let root_cluster = if kind == Kind::Fat32 { le32(&b, 44) } else { 0 };
        let max_cluster = u32::try_from(clusters + 1).map_err(|_| c("too many clusters"))?;
        let fs = FatFs {
            kind,
            cluster_size: spc * bps,
            data_start: first_data * bps,
            max_cluster,
            fat_start,
            fat,
            root_region: ((reserved + fats * fat_size) * bps, root_sectors * bps),
            root_cluster,
            label,
            chains: Mutex::new(HashMap::new()),
            dirs: Mutex::new(DirCache::default()),
            dev,
        };
        if kind == Kind::Fat32 && !(2..=max_cluster).contains(&root_cluster) {
            return Err(fs.dev.corrupt(0, "FAT32 root cluster out of range"));
        }
        Ok(fs)
    }

    fn fat_entry(&self, n: u32) -> Result<u32> {
        let (off, width) = match self.kind {
            Kind::Fat12 => (u64::from(n) * 3 / 2, 2),
            Kind::Fat16 => (u64::from(n) * 2, 2),
            Kind::Fat32 => (u64::from(n) * 4, 4),
        };
        let mut raw = [0u8; 4];
        match &self.fat {
            Some(f) => {
                let s = sub(f, off as usize, width);
                raw[..s.len()].copy_from_slice(s);
            }
            None => self
                .dev
                .read_exact_at(self.fat_start + off, &mut raw[..width])?,
        }
        let v = u32::from_le_bytes(raw);
        Ok(match self.kind {
            Kind::Fat12 if n & 1 == 1 => (v >> 4) & 0xFFF,
            Kind::Fat12 => v & 0xFFF,
            Kind::Fat16 => v & 0xFFFF,
            Kind::Fat32 => v & 0x0FFF_FFFF,
        })
    }

    fn is_end(&self, v: u32) -> bool {
        match self.kind {
            Kind::Fat12 => v >= 0xFF8,
            Kind::Fat16 => v >= 0xFFF8,
            Kind::Fat32 => v >= 0x0FFF_FFF8,
        }
    }

    /// The clusters of a chain, at most `limit` long (a chain cannot be longer than the volume).
    fn chain(&self, first: u32, limit: u64) -> Result<Arc<Vec<u32>>> {
        if let Ok(c) = self.chains.lock() {
            if let Some(ch) = c.get(&first) {
                if ch.len() as u64 >= limit.min(u64::from(self.max_cluster)) {
                    return Ok(ch.clone());
                }
            }
        }
        let limit = limit.min(u64::from(self.max_cluster));
        let mut out = Vec::new();
        let mut cur = first;
        while (out.len() as u64) < limit {
            if !(2..=self.max_cluster).contains(&cur) {
                return Err(self.dev.corrupt(
                    self.fat_start,
                    format!("FAT chain from cluster {first} reaches invalid cluster {cur}"),
                ));
            }
            out.push(cur);
            let next = self.fat_entry(cur)?;
            if self.is_end(next) {
                break;
            }
            cur = next;
        }
        let out = Arc::new(out);
        if let Ok(mut c) = self.chains.lock() {
            if c.len() >= CHAIN_CACHE {
                c.clear();
            }
            c.insert(first, out.clone());
        }
        Ok(out)
    }

    fn cluster_offset(&self, c: u32) -> u64 {
        self.data_start + u64::from(c - 2) * self.cluster_size
    }

    /// (byte offset on the partition, bytes) of every region a directory occupies.
    fn dir_regions(&self, ino: u64) -> Result<Vec<(u64, u64)>> {
        let first = if ino == ROOT {
            if self.kind != Kind::Fat32 {
                return Ok(vec![self.root_region]);
            }
            self.root_cluster
        } else {
            let e = self.entry(ino)?;
            if !e.is_dir() {
                return Err(Error::NotDir(format!("FAT entry {ino}")));
            }
            e.first_cluster(self.kind)
        };
        if first == 0 {
            return Ok(Vec::new());
        }
        let chain = self.chain(first, MAX_DIR_BYTES / self.cluster_size)?;
        Ok(chain
            .iter()
            .map(|&c| (self.cluster_offset(c), self.cluster_size))
            .collect())
    }

    fn entry(&self, ino: u64) -> Result<Entry> {
        let off = ino
            .checked_sub(INO_BASE)
            .and_then(|i| i.checked_mul(32))
            .ok_or_else(|| Error::NotFound(format!("FAT inode {ino}")))?;
        let mut raw = [0u8; 32];
        self.dev.read_exact_at(off, &mut raw)?;
        let e = Entry { raw };
        if raw[0] == 0
            || raw[0] == 0xE5
            || e.attr() & ATTR_LFN == ATTR_LFN
            || e.attr() & ATTR_VOLUME != 0
        {
            return Err(self
                .dev
                .corrupt(off, format!("FAT inode {ino} is not a directory entry")));
        }
        Ok(e)
    }

    fn dir_entries(&self, ino: u64) -> Result<DirList> {
        DirCache::get_or_read(&self.dirs, ino, || self.read_dir(ino))
    }

    /// Directory `ino`'s entries as stored (see [`Self::dir_entries`] for the cached ones).
    fn read_dir(&self, ino: u64) -> Result<Vec<(Vec<u8>, u64, FileKind)>> {
        let mut out = Vec::new();
        let mut lfn: Vec<u16> = Vec::new();
        let mut lfn_sum: Option<u8> = None;
        'regions: for (start, len) in self.dir_regions(ino)? {
            let data = self.dev.read_vec(start, len as usize)?;
            for i in 0..(len / 32) as usize {
                let raw = sub(&data, i * 32, 32);
                let first = u8at(raw, 0);
                if first == 0 {
                    break 'regions;
                }
                if first == 0xE5 {
                    lfn.clear();
                    continue;
                }
                let attr = u8at(raw, 11);
                if attr & ATTR_LFN == ATTR_LFN {
                    let ord = first & 0x3F;
                    if first & 0x40 != 0 {
                        lfn = vec![0xFFFF; usize::from(ord) * 13];
                        lfn_sum = Some(u8at(raw, 13));
                    }
                    let base = usize::from(ord.saturating_sub(1)) * 13;
                    let offsets = [1, 3, 5, 7, 9, 14, 16, 18, 20, 22, 24, 28, 30];
                    for (k, &o) in offsets.iter().enumerate() {
                        if let Some(slot) = lfn.get_mut(base + k) {
                            *slot = le16(raw, o);
                        }
                    }
                    continue;
                }
                let short = sub(raw, 0, 11);
                let name = if attr & ATTR_VOLUME != 0 {
                    None
                } else if !lfn.is_empty() && lfn_sum == Some(sfn_checksum(short)) {
                    let units: Vec<u16> = lfn
                        .iter()
                        .copied()
                        .take_while(|&u| u != 0 && u != 0xFFFF)
                        .collect();
                    Some(String::from_utf16_lossy(&units).into_bytes())
                } else {
                    Some(short_name(raw))
                };
                lfn.clear();
                lfn_sum = None;
                let Some(name) = name else { continue };
                if name == b"." || name == b".." || name.is_empty() {
                    continue;
                }
                let pos = start + (i as u64) * 32;
                let child = pos / 32 + INO_BASE;
                let kind = if attr & ATTR_DIR != 0 {
                    FileKind::Dir
                } else {
                    FileKind::File
                };
                if kind == FileKind::Dir {
                    let c = (if self.kind == Kind::Fat32 {
                        u32::from(le16(raw, 20)) << 16
                    } else {
                        0
                    }) | u32::from(le16(raw, 26));
                    if self.dir_first_cluster(ino)? == Some(c) || c == self.root_cluster && c != 0 {
                        crate::input_warn!(
                            "fat",
                            "FAT directory entry loops back in directory {ino}; hidden"
                        );
                        continue;
                    }
                }
                out.push((name, child, kind));
            }
        }
        Ok(out)
    }

    fn dir_first_cluster(&self, ino: u64) -> Result<Option<u32>> {
        if ino == ROOT {
            return Ok((self.kind == Kind::Fat32).then_some(self.root_cluster));
        }
        Ok(Some(self.entry(ino)?.first_cluster(self.kind)))
    }

    /// The cluster a directory's `..` entry names (0 = the root).
    fn dotdot(&self, ino: u64) -> Result<u32> {
        let regions = self.dir_regions(ino)?;
        let Some(&(start, _)) = regions.first() else {
            return Ok(0);
        };
        let raw = self.dev.read_vec(start + 32, 32)?;
        if sub(&raw, 0, 2) != b".." {
            return Err(self.dev.corrupt(start, "FAT directory without a .. entry"));
        }
        Ok((if self.kind == Kind::Fat32 {
            u32::from(le16(&raw, 20)) << 16
        } else {
            0
        }) | u32::from(le16(&raw, 26)))
    }

    fn stat_entry(&self, ino: u64, e: &Entry) -> FileStat {
        let dir = e.is_dir();
        let r = &e.raw;
        let mtime = fat_time(le16(r, 24), le16(r, 22), 0);
        let ctime_raw = le16(r, 16);
        let btime = (ctime_raw != 0).then(|| fat_time(ctime_raw, le16(r, 14), u8at(r, 13)));
        let atime = match le16(r, 18) {
            0 => mtime,
            d => fat_time(d, 0, 0),
        };
        let mut perm = if dir { 0o755 } else { 0o644 };
        if e.attr() & ATTR_READ_ONLY != 0 {
            perm &= !0o222;
        }
        let size = if dir { 0 } else { e.size() };
        FileStat {
            ino,
            kind: if dir { FileKind::Dir } else { FileKind::File },
            perm,
            uid: 0,
            gid: 0,
            size,
            allocated: if dir {
                self.cluster_size
            } else {
                size.div_ceil(self.cluster_size) * self.cluster_size
            },
            nlink: if dir { 2 } else { 1 },
            rdev: 0,
            atime,
            mtime,
            ctime: mtime,
            btime,
        }
    }
}

fn sfn_checksum(name: &[u8]) -> u8 {
    name.iter().fold(0u8, |sum, &c| {
        (if sum & 1 != 0 { 0x80u8 } else { 0 })
            .wrapping_add(sum >> 1)
            .wrapping_add(c)
    })
}

/// "README  TXT" → "README.TXT", lower-cased where the NT case bits say so (as Linux shows it).
fn short_name(raw: &[u8]) -> Vec<u8> {
    let flags = u8at(raw, 12);
    let conv = |s: &[u8], lower: bool| -> Vec<u8> {
        let mut v: Vec<u8> = s.to_vec();
        while v.last() == Some(&b' ') {
            v.pop();
        }
        if let Some(f) = v.first_mut() {
            if *f == 0x05 {
                *f = 0xE5;
            }
        }
        let v: Vec<u8> = if lower { v.to_ascii_lowercase() } else { v };
        // Bytes above 0x7F are in the guest's OEM code page: show them as Latin-1.
        v.iter()
            .map(|&b| b as char)
            .collect::<String>()
            .into_bytes()
    };
    let mut n = conv(sub(raw, 0, 8), flags & 0x08 != 0);
    let ext = conv(sub(raw, 8, 3), flags & 0x10 != 0);
    if !ext.is_empty() {
        n.push(b'.');
        n.extend_from_slice(&ext);
    }
    n
}

impl GuestFs for FatFs {
    fn root(&self) -> u64 {
        ROOT
    }

    fn stat(&self, ino: u64) -> Result<FileStat> {
        if ino == ROOT {
            let t = SystemTime::UNIX_EPOCH;
            return Ok(FileStat {
                ino,
                kind: FileKind::Dir,
                perm: 0o755,
                uid: 0,
                gid: 0,
                size: 0,
                allocated: self.cluster_size,
                nlink: 2,
                rdev: 0,
                atime: t,
                mtime: t,
                ctime: t,
                btime: None,
            });
        }
        let e = self.entry(ino)?;
        Ok(self.stat_entry(ino, &e))
    }

    fn lookup(&self, dir: u64, name: &[u8]) -> Result<FileStat> {
        // Linux's vfat is case-insensitive; an exact match wins, else the first caseless one.
        let hit = DirCache::find(&self.dirs, dir, name, true, || self.read_dir(dir))?;
        let st = self.stat(hit)?;
        if st.kind == FileKind::Dir {
            let parent = match self.dir_first_cluster(dir)? {
                Some(c) if dir != ROOT => c,
                _ => 0,
            };
            let dd = self.dotdot(hit)?;
            if dd != parent && !(dir == ROOT && dd == self.root_cluster) {
                return Err(self
                    .dev
                    .corrupt(0, format!("FAT directory {}: .. is not its parent", hit)));
            }
        }
        Ok(st)
    }

    fn readdir(&self, dir: u64) -> Result<DirList> {
        self.dir_entries(dir)
    }

    fn read(&self, ino: u64, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let e = self.entry(ino)?;
        if e.is_dir() {
            return Err(Error::IsDir(format!("FAT entry {ino}")));
        }
        let size = e.size();
        if offset >= size || buf.is_empty() {
            return Ok(0);
        }
        let want = (buf.len() as u64).min(size - offset) as usize;
        let first = e.first_cluster(self.kind);
        let chain = self.chain(first, size.div_ceil(self.cluster_size))?;
        let mut done = 0usize;
        while done < want {
            let pos = offset + done as u64;
            let idx = (pos / self.cluster_size) as usize;
            let Some(&c) = chain.get(idx) else {
                return Err(self.dev.corrupt(
                    self.fat_start,
                    format!("FAT chain of entry {ino} shorter than its size"),
                ));
            };
            let in_cluster = pos % self.cluster_size;
            // Extend over clusters that follow each other on disk: one read for the stretch.
            let mut run = 1usize;
            while chain
                .get(idx + run)
                .is_some_and(|&n| u64::from(n) == u64::from(c) + run as u64)
                && (run as u64 * self.cluster_size - in_cluster) < (want - done) as u64
            {
                run += 1;
            }
            let n = ((run as u64 * self.cluster_size - in_cluster) as usize).min(want - done);
            self.dev.read_exact_at(
                self.cluster_offset(c) + in_cluster,
                &mut buf[done..done + n],
            )?;
            done += n;
        }
        Ok(want)
    }

    fn map(&self, ino: u64, offset: u64, len: u64) -> Result<Option<FileMap>> {
        let e = self.entry(ino)?;
        if e.is_dir() {
            return Ok(None);
        }
        let size = e.size();
        let (mut map, end) = FileMap::window(size, offset, len);
        if offset >= end {
            return Ok(Some(map));
        }
        let first = e.first_cluster(self.kind);
        let chain = self.chain(first, size.div_ceil(self.cluster_size))?;
        let vol = self.dev.len();
        let mut pos = offset;
        while pos < end {
            let idx = (pos / self.cluster_size) as usize;
            let Some(&c) = chain.get(idx) else {
                // A chain shorter than the size: the reader's error to give.
                map.push(pos, end - pos, Place::Reader, vol);
                break;
            };
            let in_cluster = pos % self.cluster_size;
            let n = (self.cluster_size - in_cluster).min(end - pos);
            if !map.push(
                pos,
                n,
                Place::Disk(self.cluster_offset(c) + in_cluster),
                vol,
            ) {
                break;
            }
            pos += n;
        }
        Ok(Some(map))
    }

    fn readlink(&self, ino: u64) -> Result<Vec<u8>> {
        Err(Error::Invalid(format!("FAT entry {ino} is not a symlink")))
    }

    fn xattrs(&self, _ino: u64) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        Ok(Vec::new())
    }

    fn describe(&self) -> String {
        let k = match self.kind {
            Kind::Fat12 => "FAT12",
            Kind::Fat16 => "FAT16",
            Kind::Fat32 => "FAT32",
        };
        let mut s = format!("{k}, {}", human_size(self.dev.len()));
        if !self.label.is_empty() {
            s.push_str(&format!(", label {}", self.label));
        }
        s
    }
}

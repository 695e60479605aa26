//! Parallels expandable images (QEMU's `parallels` driver, Virtuozzo/OpenVZ ploop deltas):
//! a 64-byte header, a BAT of 32-bit cluster offsets, a data area.
//!
//! Two header magics: `WithoutFreeSpace` (ploop v1: BAT entries are offsets in 512-byte
//! sectors, disk size in the low 32 bits of `nb_sectors`) and `WithouFreSpacExt` (v2: entries
//! are in clusters). A zero entry is a cluster this file does not hold: zeros, or for a ploop
//! delta the same cluster of the delta below (`lower`). Format extensions (dirty bitmaps) do
//! not change the disk's bytes and are not read. BAT entries are read from the file when a
//! cluster is first needed (never the whole table into memory: a 64 TiB disk of 1 MiB clusters
//! has a 256 MiB BAT); the last BAT page read is kept.

use std::sync::{Arc, Mutex};

use super::hostfile::HostFile;
use super::raw::push_extent;
use super::readahead::{self, ReadAhead};
use super::{BlockImage, Extent, ExtentKind};
use crate::error::{Error, Result};

pub const MAGIC_V1: &[u8; 16] = b"WithoutFreeSpace";
pub const MAGIC_V2: &[u8; 16] = b"WithouFreSpacExt";
const HEADER_LEN: u64 = 64;
const SECTOR: u64 = 512;
/// BAT entries read per page (16 KiB).
const BAT_PAGE: u64 = 4096;
/// Most extents one `map` call returns, and most clusters it looks at; callers loop.
const MAX_EXTENTS: usize = 4096;
const MAX_MAP_CLUSTERS: u64 = 1 << 16;
/// QEMU refuses clusters above this many sectors (`tracks > INT32_MAX / 513`).
const MAX_TRACKS: u32 = i32::MAX as u32 / 513;

/// The header fields a reader needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub v2: bool,
    /// Cluster size in sectors (`tracks`).
    pub tracks: u32,
    pub bat_entries: u32,
    /// Virtual size in bytes.
    pub size: u64,
    /// Start of the data area, in bytes.
    pub data_off: u64,
    /// `in_use` says a writer had it open (0x746F6E59) and did not close it.
    pub in_use: bool,
    /// The "empty image" flag: every cluster reads as zeros.
    pub empty: bool,
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        u64::from(self.tracks) * SECTOR
    }

    /// Parse and check the first 64 bytes (`file_len` bounds the data offset).
    pub fn parse(b: &[u8], file_len: u64, name: &str) -> Result<Header> {
        let bad = |off: u64, what: String| Error::corrupt(name.to_string(), off, what);
        if b.len() < HEADER_LEN as usize {
            return Err(bad(0, "shorter than a Parallels header (64 bytes)".into()));
        }
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| u64::from(u32_at(o)) | (u64::from(u32_at(o + 4)) << 32);
        let v2 = match &b[..16] {
            m if m == MAGIC_V2 => true,
            m if m == MAGIC_V1 => false,
            _ => return Err(bad(0, "no Parallels magic".into())),
        };
        let version = u32_at(16);
        if version != 2 {
            return Err(bad(16, format!("version {version}, expected 2")));
        }
        let tracks = u32_at(28);
        if tracks == 0 {
            return Err(bad(28, "zero sectors per cluster (tracks)".into()));
        }
        if tracks > MAX_TRACKS {
            return Err(bad(28, format!("cluster of {tracks} sectors is too big")));
        }
        let bat_entries = u32_at(32);
        let mut sectors = u64_at(36);
        if !v2 {
            sectors &= 0xffff_ffff;
        }
        let size = sectors
            .checked_mul(SECTOR)
            .ok_or_else(|| bad(36, format!("{sectors} sectors overflow")))?;
        let cluster = u64::from(tracks) * SECTOR;
        // Every cluster of the disk needs an entry (QEMU: "too many sectors" otherwise).
        if size.div_ceil(cluster) > u64::from(bat_entries) {
            return Err(bad(
                32,
                format!(
                    "{bat_entries} BAT entries cannot map {size} bytes of {cluster}-byte clusters"
                ),
            ));
        }
        let bat_end = HEADER_LEN + u64::from(bat_entries) * 4;
        let in_use = match u32_at(44) {
            0 | 0x312e_3276 => false,
            0x746F_6E59 => true,
            v => return Err(bad(44, format!("in_use {v:#x} is neither open nor closed"))),
        };
        let data_off = match u64::from(u32_at(48)) * SECTOR {
            0 if !v2 => bat_end.next_multiple_of(SECTOR),
            0 => return Err(bad(48, "zero data offset".into())),
            d if d < bat_end => {
                return Err(bad(
                    48,
                    format!("data offset {d:#x} inside the BAT (ends {bat_end:#x})"),
                ))
            }
            d => d,
        };
        if bat_end > file_len {
            return Err(bad(
                HEADER_LEN,
                format!(
                    "BAT of {bat_entries} entries runs past the end of the file ({file_len} bytes)"
                ),
            ));
        }
        Ok(Header {
            v2,
            tracks,
            bat_entries,
            size,
            data_off,
            in_use,
            empty: u32_at(52) & 1 != 0,
        })
    }
}

pub struct ParallelsImage {
    file: HostFile,
    header: Header,
    /// The delta below (ploop): where clusters this file does not hold are read.
    lower: Option<Arc<dyn BlockImage>>,
    /// The last BAT page read: (first entry index, entries).
    bat_page: Mutex<(u64, Vec<u32>)>,
    ahead: Mutex<ReadAhead>,
}

impl ParallelsImage {
    /// Open `path`; `lower` is the delta below it in a ploop chain (None: zeros below).
    pub fn open(path: &std::path::Path, lower: Option<Arc<dyn BlockImage>>) -> Result<Self> {
        let file = HostFile::open(path)?;
        let mut head = [0u8; HEADER_LEN as usize];
        file.read_or_zero(&mut head, 0)?;
        let header = Header::parse(&head, file.len(), &path.display().to_string())?;
        Ok(ParallelsImage {
            file,
            header,
            lower,
            bat_page: Mutex::new((0, Vec::new())),
            ahead: Mutex::new(ReadAhead::default()),
        })
    }

    /// Ask the kernel to start reading the host clusters of the virtual range that follows a
    /// sequential read (`POSIX_FADV_WILLNEED`: it queues the reads and returns), so the next
    /// requests find their clusters in the page cache. Clusters this file does not hold are
    /// the lower delta's (which reads ahead for itself when they are read). Advice only:
    /// errors are left to the reads.
    fn read_ahead(&self, offset: u64, end: u64) {
        let Some(file) = self.file.file() else {
            return;
        };
        let window = {
            let mut a = self.ahead.lock().unwrap_or_else(|p| p.into_inner());
            let w = readahead::window_for(self.header.cluster_size());
            a.next(offset, end, self.header.size, self.header.size, w)
        };
        let Some((from, to)) = window else { return };
        let cs = self.header.cluster_size();
        let last = to.div_ceil(cs).min(from / cs + readahead::MAX_LOOKUPS);
        let ranges = readahead::merge_ranges(
            (from / cs..last).map(|idx| self.cluster_offset(idx).ok().flatten().map(|h| (h, cs))),
        );
        readahead::will_need(file, self.file.len(), &ranges);
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Host byte offset of virtual cluster `idx`, or None when this file does not hold it.
    fn cluster_offset(&self, idx: u64) -> Result<Option<u64>> {
        if self.header.empty || idx >= u64::from(self.header.bat_entries) {
            return Ok(None);
        }
        let entry = {
            let mut page = self.bat_page.lock().unwrap_or_else(|p| p.into_inner());
            if idx < page.0 || idx >= page.0 + page.1.len() as u64 {
                let first = idx - idx % BAT_PAGE;
                let n = BAT_PAGE.min(u64::from(self.header.bat_entries) - first);
                let mut raw = vec![0u8; n as usize * 4];
                self.file.read_or_zero(&mut raw, HEADER_LEN + first * 4)?;
                page.1 = raw
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                page.0 = first;
            }
            page.1[(idx - page.0) as usize]
        };
        if entry == 0 {
            return Ok(None);
        }
        let unit = if self.header.v2 {
            self.header.cluster_size()
        } else {
            SECTOR
        };
        let host = u64::from(entry) * unit;
        let bat_at = HEADER_LEN + idx * 4;
        if host < self.header.data_off {
            return Err(self.file.corrupt(
                bat_at,
                format!(
                    "BAT entry {idx} points at {host:#x}, before the data area ({:#x})",
                    self.header.data_off
                ),
            ));
        }
        if host >= self.file.len() {
            return Err(self.file.corrupt(
                bat_at,
                format!(
                    "BAT entry {idx} points at {host:#x}, past the end of the file ({:#x})",
                    self.file.len()
                ),
            ));
        }
        Ok(Some(host))
    }
}

impl BlockImage for ParallelsImage {
    fn size(&self) -> u64 {
        self.header.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let cs = self.header.cluster_size();
        self.read_ahead(offset, offset.saturating_add(buf.len() as u64));
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let in_cluster = pos % cs;
            let n = ((cs - in_cluster) as usize).min(buf.len() - done);
            let out = &mut buf[done..done + n];
            match self.cluster_offset(pos / cs)? {
                // Bytes of an allocated cluster past the end of the file read as zeros (QEMU
                // allocates the file lazily at the tail).
                Some(host) => self.file.read_or_zero(out, host + in_cluster)?,
                None => match &self.lower {
                    Some(lower) if pos < lower.size() => {
                        let m = out.len().min((lower.size() - pos) as usize);
                        lower.read_at(&mut out[..m], pos)?;
                        out[m..].fill(0);
                    }
                    _ => out.fill(0),
                },
            }
            done += n;
        }
        Ok(())
    }

    fn map(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        let size = self.header.size;
        let end = offset.saturating_add(length).min(size);
        let cs = self.header.cluster_size();
        let mut out = Vec::new();
        let mut pos = offset;
        let stop_at = (offset / cs + MAX_MAP_CLUSTERS).saturating_mul(cs);
        while pos < end && pos < stop_at && out.len() < MAX_EXTENTS {
            let stop = ((pos / cs + 1) * cs).min(end);
            match self.cluster_offset(pos / cs)? {
                Some(_) => push_extent(&mut out, pos, stop, ExtentKind::Data),
                None => match &self.lower {
                    Some(lower) if pos < lower.size() => {
                        let sub_end = stop.min(lower.size());
                        let mut p = pos;
                        while p < sub_end {
                            let ext = lower.map(p, sub_end - p)?;
                            let Some(last) = ext.last() else { break };
                            let next = last.offset + last.length;
                            for e in ext {
                                push_extent(&mut out, e.offset, e.offset + e.length, e.kind);
                            }
                            p = next;
                        }
                        push_extent(&mut out, sub_end, stop, ExtentKind::Zero);
                    }
                    _ => push_extent(&mut out, pos, stop, ExtentKind::Zero),
                },
            }
            pos = stop;
        }
        Ok(out)
    }

    fn describe(&self) -> String {
        let h = &self.header;
        format!(
            "parallels {}, {} KiB clusters{}{}",
            if h.v2 {
                "v2 (WithouFreSpacExt)"
            } else {
                "v1 (WithoutFreeSpace)"
            },
            h.cluster_size() >> 10,
            if h.in_use {
                ", left open by a writer"
            } else {
                ""
            },
            if self.lower.is_some() {
                ", over a lower delta"
            } else {
                ""
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(magic: &[u8; 16], tracks: u32, entries: u32, sectors: u64, data_off: u32) -> Vec<u8> {
        let mut b = vec![0u8; 64];
        b[..16].copy_from_slice(magic);
        b[16..20].copy_from_slice(&2u32.to_le_bytes());
        b[28..32].copy_from_slice(&tracks.to_le_bytes());
        b[32..36].copy_from_slice(&entries.to_le_bytes());
        b[36..44].copy_from_slice(&sectors.to_le_bytes());
        b[48..52].copy_from_slice(&data_off.to_le_bytes());
        b
    }

    #[test]
    fn headers_are_checked_field_by_field() {
        let ok = Header::parse(&header(MAGIC_V2, 2048, 8, 16384, 2048), 1 << 20, "t").unwrap();
        assert_eq!(
            (ok.size, ok.cluster_size(), ok.data_off),
            (8 << 20, 1 << 20, 1 << 20)
        );
        let err = |b: Vec<u8>| Header::parse(&b, 1 << 20, "t").unwrap_err().to_string();
        assert!(err(header(b"WithoutFreeSpacX", 2048, 8, 16384, 2048)).contains("magic"));
        assert!(err(header(MAGIC_V2, 0, 8, 16384, 2048)).contains("tracks"));
        assert!(err(header(MAGIC_V2, u32::MAX, 8, 16384, 2048)).contains("too big"));
        assert!(err(header(MAGIC_V2, 2048, 7, 16384, 2048)).contains("cannot map"));
        assert!(err(header(MAGIC_V2, 2048, 8, 16384, 0)).contains("zero data offset"));
        assert!(
            err(header(MAGIC_V2, 1, u32::MAX, u64::from(u32::MAX), 1)).contains("inside the BAT")
        );
        let mut v = header(MAGIC_V2, 2048, 8, 16384, 2048);
        v[16] = 3;
        assert!(err(v).contains("version"));
        let mut v = header(MAGIC_V2, 2048, 8, 16384, 2048);
        v[44..48].copy_from_slice(&0xdead_beefu32.to_le_bytes());
        assert!(err(v).contains("in_use"));
        // v1: only the low 32 bits of nb_sectors count; data_off 0 means "after the BAT".
        let v1 = Header::parse(&header(MAGIC_V1, 64, 4, (7 << 32) | 256, 0), 1 << 20, "t").unwrap();
        assert_eq!((v1.size, v1.data_off), (256 * 512, 512));
        // A BAT longer than the file.
        assert!(
            Header::parse(&header(MAGIC_V2, 1, 1 << 20, 1 << 20, 8193), 4096, "t")
                .unwrap_err()
                .to_string()
                .contains("past the end")
        );
    }
}

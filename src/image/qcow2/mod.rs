//! Our own qcow2 reader (versions 2 and 3): see docs/image-readers.md for why and what.
//!
//! One file per on-disk concept: `header` (header and extensions), `l2` (L1/L2 mapping),
//! `snapshot` (internal snapshot table), `compress` (compressed clusters).

mod compress;
mod header;
mod l2;
mod snapshot;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::cache::{CacheKey, CacheKind};
use super::hostfile::HostFile;
use super::raw::{push_extent, RawImage};
use super::{BlockCache, BlockImage, Extent, ExtentKind, Format};
use crate::error::{Error, Result};
use header::Header;
use l2::{Cursor, Mapping, Tables};

/// Longest backing chain we follow; deeper is treated as corrupt (or a loop in disguise).
pub const MAX_CHAIN_DEPTH: usize = 64;
/// Most extents one `map` call returns; callers loop.
const MAX_EXTENTS: usize = 4096;
/// Most L2 lookups one `map` call makes, so a crafted image cannot make one call take minutes.
const MAX_LOOKUPS: usize = 1 << 18;

/// One internal snapshot as the qcow2 snapshot table stores it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SnapshotEntry {
    pub id: String,
    pub name: String,
    /// Creation time, seconds since the epoch.
    pub date_sec: u32,
    pub date_nsec: u32,
    pub vm_clock_nsec: u64,
    pub vm_state_size: u64,
    /// The snapshot's own virtual size (v3 extra data), else the image's.
    pub virtual_size: u64,
}

/// What the header says, for volume.json and the provider; no data is read.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Qcow2Info {
    pub version: u32,
    pub cluster_size: u64,
    pub virtual_size: u64,
    /// The backing file as stored in the header.
    pub backing_file: Option<String>,
    /// The same, resolved relative to the image's directory.
    pub backing_path: Option<PathBuf>,
    pub backing_format: Option<String>,
    pub data_file: Option<String>,
    pub compression: String,
    pub extended_l2: bool,
    pub dirty: bool,
    pub snapshots: Vec<SnapshotEntry>,
}

/// Read the header and snapshot table of a qcow2 file (backing files are not opened).
pub fn inspect(path: &Path) -> Result<Qcow2Info> {
    let f = HostFile::open(path)?;
    let h = Header::read(&f)?;
    let snaps = snapshot::read_table(&f, &h)?;
    let backing_path = match &h.backing_file {
        Some(b) => Some(resolve_relative(path, b)?),
        None => None,
    };
    Ok(Qcow2Info {
        version: h.version,
        cluster_size: h.cluster_size(),
        virtual_size: h.size,
        backing_file: h.backing_file.clone(),
        backing_path,
        backing_format: h.backing_format.clone(),
        data_file: h.data_file.clone(),
        compression: h.compression.name().to_string(),
        extended_l2: h.extended_l2(),
        dirty: h.dirty(),
        snapshots: snaps.into_iter().map(|s| s.entry).collect(),
    })
}

/// A backing (or data) file name from a header, resolved as qemu does: relative to the image's
/// directory. Protocol and `json:` names are refused.
fn resolve_relative(image: &Path, name: &str) -> Result<PathBuf> {
    if name.starts_with("json:") || name.contains("://") {
        return Err(Error::NotSupported(format!(
            "backing file name {name:?} of {} is not a plain path",
            image.display()
        )));
    }
    let p = Path::new(name);
    if p.is_absolute() {
        return Ok(p.to_path_buf());
    }
    let dir = image.parent().unwrap_or(Path::new("."));
    Ok(dir.join(p))
}

pub struct Qcow2Image {
    meta: HostFile,
    /// The external data file, when the image has one; else data lives in `meta`.
    data: Option<HostFile>,
    header: Header,
    tables: Tables,
    size: u64,
    image_id: u64,
    backing: Option<Box<dyn BlockImage>>,
    backing_desc: Option<String>,
    snapshot: Option<String>,
    cache: Arc<BlockCache>,
}

/// A pending run of guest bytes with one source, flushed with one pread (or fill/backing read).
#[derive(Clone, Copy)]
enum RunKind {
    Data(u64),
    Zero,
    Unallocated,
}

struct Run {
    kind: RunKind,
    start: usize,
    len: usize,
}

impl Qcow2Image {
    /// Open `path` (and its backing chain), at internal snapshot `snapshot` (name, then id).
    pub fn open(path: &Path, snapshot: Option<&str>, cache: &Arc<BlockCache>) -> Result<Self> {
        let mut chain = Vec::new();
        Self::open_in_chain(path, snapshot, cache, &mut chain)
    }

    fn open_in_chain(
        path: &Path,
        snapshot: Option<&str>,
        cache: &Arc<BlockCache>,
        chain: &mut Vec<PathBuf>,
    ) -> Result<Self> {
        let canon = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        if chain.contains(&canon) {
            let names: Vec<_> = chain.iter().map(|p| p.display().to_string()).collect();
            return Err(Error::corrupt(
                path.display().to_string(),
                8,
                format!(
                    "backing chain loop: {} -> {}",
                    names.join(" -> "),
                    canon.display()
                ),
            ));
        }
        if chain.len() >= MAX_CHAIN_DEPTH {
            return Err(Error::corrupt(
                path.display().to_string(),
                8,
                format!("backing chain deeper than {MAX_CHAIN_DEPTH}"),
            ));
        }
        chain.push(canon);

        let meta = HostFile::open(path)?;
        let header = Header::read(&meta)?;
        let image_id = BlockCache::new_image_id();
        // Parsed even when not opening a snapshot: a broken table means a broken image.
        let snaps = snapshot::read_table(&meta, &header)?;
        let (l1_offset, l1_size, size) = match snapshot {
            None => (header.l1_table_offset, header.l1_size, header.size),
            Some(want) => {
                let s = snapshot::find(&snaps, want).ok_or_else(|| {
                    Error::NotFound(format!("snapshot {want} in {}", path.display()))
                })?;
                if s.entry.virtual_size > (1 << 62) {
                    return Err(
                        meta.corrupt(header.snapshots_offset, "snapshot virtual size too large")
                    );
                }
                (s.l1_table_offset, s.l1_size, s.entry.virtual_size)
            }
        };
        let tables = Tables::load(&meta, &header, l1_offset, l1_size, image_id)?;

        let data = if header.has_data_file() {
            let name = header.data_file.as_deref().ok_or_else(|| {
                Error::NotSupported(format!(
                    "{} needs an external data file but names none",
                    path.display()
                ))
            })?;
            Some(HostFile::open(&resolve_relative(path, name)?)?)
        } else {
            None
        };

        let (backing, backing_desc) = match &header.backing_file {
            None => (None, None),
            Some(name) => {
                let bpath = resolve_relative(path, name)?;
                let fmt = match header.backing_format.as_deref() {
                    Some(f) => Format::parse(f).ok_or_else(|| {
                        Error::NotSupported(format!("backing format {f:?} of {}", path.display()))
                    })?,
                    None => super::probe_format(&bpath)?,
                };
                let b: Box<dyn BlockImage> = match fmt {
                    Format::Raw => Box::new(RawImage::open(&bpath)?),
                    Format::Qcow2 => Box::new(Self::open_in_chain(&bpath, None, cache, chain)?),
                    Format::Parallels => {
                        Box::new(super::parallels::ParallelsImage::open(&bpath, None)?)
                    }
                };
                let desc = format!("{name} ({})", b.describe());
                (Some(b), Some(desc))
            }
        };
        tracing::debug!(path = %path.display(), size, snapshot, "opened qcow2");
        Ok(Qcow2Image {
            meta,
            data,
            header,
            tables,
            size,
            image_id,
            backing,
            backing_desc,
            snapshot: snapshot.map(str::to_string),
            cache: cache.clone(),
        })
    }

    fn data_file(&self) -> &HostFile {
        self.data.as_ref().unwrap_or(&self.meta)
    }

    fn flush(&self, buf: &mut [u8], base: u64, run: &mut Option<Run>) -> Result<()> {
        let Some(r) = run.take() else { return Ok(()) };
        let Some(dst) = buf.get_mut(r.start..r.start + r.len) else {
            return Ok(());
        };
        match r.kind {
            RunKind::Data(host) => self.data_file().read_or_zero(dst, host),
            RunKind::Zero => {
                dst.fill(0);
                Ok(())
            }
            RunKind::Unallocated => self.read_backing(dst, base + r.start as u64),
        }
    }

    /// Unallocated bytes: the backing file's, zeros beyond its end (or without one).
    fn read_backing(&self, dst: &mut [u8], guest: u64) -> Result<()> {
        let Some(b) = &self.backing else {
            dst.fill(0);
            return Ok(());
        };
        let avail = b.size().saturating_sub(guest).min(dst.len() as u64) as usize;
        let (inside, beyond) = dst.split_at_mut(avail);
        if !inside.is_empty() {
            b.read_at(inside, guest)?;
        }
        beyond.fill(0);
        Ok(())
    }

    /// Bytes `[guest, guest + dst.len())` of one compressed cluster.
    fn read_compressed(
        &self,
        dst: &mut [u8],
        guest: u64,
        d: compress::CompressedDescriptor,
    ) -> Result<()> {
        let cs = self.header.cluster_size();
        let in_cluster = (guest & (cs - 1)) as usize;
        if in_cluster == 0 && dst.len() as u64 == cs {
            // A whole cluster wanted: decompress straight into the caller's buffer, skip the cache.
            return compress::read_compressed(&self.meta, d, self.header.compression, dst);
        }
        let key = CacheKey {
            image: self.image_id,
            kind: CacheKind::Decompressed,
            offset: d.offset,
        };
        let cluster = self.cache.get_or_load(key, || {
            let mut v = vec![0u8; cs as usize];
            compress::read_compressed(&self.meta, d, self.header.compression, &mut v)?;
            Ok(v)
        })?;
        let src = cluster
            .get(in_cluster..in_cluster + dst.len())
            .ok_or_else(|| {
                self.meta
                    .corrupt(d.offset, "compressed run outside its cluster")
            })?;
        dst.copy_from_slice(src);
        Ok(())
    }

    /// The header as parsed.
    pub fn version(&self) -> u32 {
        self.header.version
    }

    pub fn cluster_size(&self) -> u64 {
        self.header.cluster_size()
    }
}

impl BlockImage for Qcow2Image {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        // Past the virtual size reads zeros (callers should not ask).
        let valid = self.size.saturating_sub(offset).min(buf.len() as u64) as usize;
        let (buf, beyond) = buf.split_at_mut(valid);
        beyond.fill(0);
        let mut cur = Cursor::default();
        let mut run: Option<Run> = None;
        let mut done = 0usize;
        while done < buf.len() {
            let guest = offset + done as u64;
            let remain = (buf.len() - done) as u64;
            let (m, n) = self
                .tables
                .lookup(&self.meta, &self.cache, &mut cur, guest, remain)?;
            let n = n.clamp(1, remain) as usize;
            let kind = match m {
                Mapping::Compressed(d) => {
                    self.flush(buf, offset, &mut run)?;
                    if let Some(dst) = buf.get_mut(done..done + n) {
                        self.read_compressed(dst, guest, d)?;
                    }
                    done += n;
                    continue;
                }
                Mapping::Data(h) => RunKind::Data(h),
                Mapping::Zero => RunKind::Zero,
                Mapping::Unallocated => RunKind::Unallocated,
            };
            // Extend the pending run when this piece continues it (host-contiguous for data).
            let extends = match (&run, kind) {
                (Some(r), RunKind::Data(h)) => {
                    matches!(r.kind, RunKind::Data(s) if s + r.len as u64 == h)
                }
                (Some(r), RunKind::Zero) => matches!(r.kind, RunKind::Zero),
                (Some(r), RunKind::Unallocated) => matches!(r.kind, RunKind::Unallocated),
                (None, _) => false,
            };
            match &mut run {
                Some(r) if extends => r.len += n,
                _ => {
                    self.flush(buf, offset, &mut run)?;
                    run = Some(Run {
                        kind,
                        start: done,
                        len: n,
                    });
                }
            }
            done += n;
        }
        self.flush(buf, offset, &mut run)
    }

    fn map(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        let end = offset.saturating_add(length).min(self.size);
        let mut out = Vec::new();
        let mut cur = Cursor::default();
        let mut pos = offset;
        let mut lookups = 0;
        while pos < end && out.len() < MAX_EXTENTS && lookups < MAX_LOOKUPS {
            lookups += 1;
            let (m, n) = self
                .tables
                .lookup(&self.meta, &self.cache, &mut cur, pos, end - pos)?;
            let mut next = pos + n.clamp(1, end - pos);
            match m {
                Mapping::Data(_) | Mapping::Compressed(_) => {
                    push_extent(&mut out, pos, next, ExtentKind::Data)
                }
                Mapping::Zero => push_extent(&mut out, pos, next, ExtentKind::Zero),
                Mapping::Unallocated => match &self.backing {
                    Some(b) if pos < b.size() => {
                        // One backing map call per piece; if it stops short, so do we.
                        let bend = next.min(b.size());
                        let ext = b.map(pos, bend - pos)?;
                        let stop = ext.last().map_or(pos, |e| e.offset + e.length);
                        for e in ext {
                            push_extent(&mut out, e.offset, e.offset + e.length, e.kind);
                        }
                        if stop > pos && stop < bend {
                            next = stop;
                        } else {
                            // Beyond the backing file's end: zeros.
                            push_extent(&mut out, stop.clamp(pos, bend), next, ExtentKind::Zero);
                        }
                    }
                    _ => push_extent(&mut out, pos, next, ExtentKind::Zero),
                },
            }
            pos = next;
        }
        Ok(out)
    }

    fn describe(&self) -> String {
        let h = &self.header;
        let cs = h.cluster_size();
        let csize = if cs >= 1 << 20 {
            format!("{} MiB", cs >> 20)
        } else if cs >= 1024 {
            format!("{} KiB", cs >> 10)
        } else {
            format!("{cs} B")
        };
        let mut s = format!("qcow2 v{}, {csize} clusters", h.version);
        if h.compression != header::Compression::Zlib {
            s += &format!(", {} compression", h.compression.name());
        }
        if h.extended_l2() {
            s += ", extended L2";
        }
        if let Some(d) = &h.data_file {
            s += &format!(", data file {d}");
            if h.data_file_raw() {
                s += " (raw)";
            }
        }
        if let Some(b) = &self.backing_desc {
            s += &format!(", backing {b}");
        }
        if let Some(snap) = &self.snapshot {
            s += &format!(", snapshot {snap}");
        }
        s
    }
}

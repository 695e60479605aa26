//! Our own qcow2 reader (versions 2 and 3): see docs/image-readers.md for why and what.
//!
//! One file per on-disk concept: `header` (header and extensions), `l2` (L1/L2 mapping),
//! `snapshot` (internal snapshot table), `compress` (compressed clusters).

mod compress;
mod header;
mod l2;
mod meta_cache;
mod snapshot;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::cache::{CacheKey, CacheKind};
use super::changes::Collector;
use super::hostfile::HostFile;
use super::raw::{push_extent, RawImage};
use super::readahead::{self, ReadAhead};
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
#[derive(Clone, Debug)]
pub struct SnapshotEntry {
    /// The id's bytes, in the reversible internal form of `names::from_bytes`; only the first
    /// `snapshot::KEPT_NAME_BYTES` bytes of a longer one.
    pub id: String,
    /// The name, likewise.
    pub name: String,
    /// Lengths in the table (the kept bytes are shorter when these pass 256).
    pub id_len: usize,
    pub name_len: usize,
    /// Creation time, seconds since the epoch.
    pub date_sec: u32,
    pub date_nsec: u32,
    pub vm_clock_nsec: u64,
    pub vm_state_size: u64,
    /// The snapshot's own virtual size (v3 extra data), else the image's.
    pub virtual_size: u64,
}

/// The snapshot table of one file generation, shared with the metadata cache (not copied).
#[derive(Clone)]
pub struct Snapshots(Arc<meta_cache::Parsed>);

impl Snapshots {
    pub fn iter(&self) -> impl Iterator<Item = &SnapshotEntry> {
        self.0.snapshots.iter().map(|s| &s.entry)
    }

    pub fn len(&self) -> usize {
        self.0.snapshots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.snapshots.is_empty()
    }
}

impl std::fmt::Debug for Snapshots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} snapshots", self.len())
    }
}

/// What the header says, for volume.json and the provider; no data is read.
#[derive(Clone, Debug)]
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
    pub snapshots: Snapshots,
    /// What QEMU would refuse at open that our snapshot reads do not use (see `Header::damage`).
    pub damaged: Vec<String>,
}

/// Read the header and snapshot table of a qcow2 file (backing files are not opened); parsed
/// once per file generation.
pub fn inspect(path: &Path) -> Result<Qcow2Info> {
    let f = HostFile::open(path)?;
    let parsed = meta_cache::get(&f)?;
    let h = &parsed.header;
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
        damaged: h.damage.clone(),
        snapshots: Snapshots(parsed.clone()),
    })
}

/// Whether the active state of a qcow2 file is its internal snapshot `id`'s: the active L1
/// table names the same L2 tables as the snapshot's (flags aside, entries past the shorter
/// table zero) and the virtual sizes agree. Right after `qemu-img snapshot -a` (which copies
/// the snapshot's L1 table over the active one) this is true; before it, it is true only when
/// the two states share every L2 table, i.e. hold the same data.
pub fn active_is_snapshot(path: &Path, id: &str) -> Result<bool> {
    let f = HostFile::open(path)?;
    let parsed = meta_cache::get(&f)?;
    let h = &parsed.header;
    let Some(snap) = parsed.snapshots.iter().find(|s| s.entry.id == id) else {
        return Err(Error::NotFound(format!(
            "snapshot id {id} in {}",
            path.display()
        )));
    };
    if snap.entry.virtual_size != h.size {
        return Ok(false);
    }
    let active = Tables::load(&f, h, h.l1_table_offset, h.l1_size, 0)?;
    let then = Tables::load(&f, h, snap.l1_table_offset, snap.l1_size, 0)?;
    Ok(active.same_l2_tables(&then))
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
    /// An internal snapshot: how to notice that it was deleted while open.
    still: Option<StillThere>,
    cache: Arc<BlockCache>,
    /// Sequential-read detection for the read-ahead into the host page cache.
    ahead: std::sync::Mutex<ReadAhead>,
}

/// An open internal snapshot's clusters are freed when the snapshot is deleted, and the next
/// write to the image may reuse them: reading on through the old L1 table would return those
/// writes as the snapshot's bytes. Every change of the snapshot table rewrites the header's
/// `nb_snapshots` and `snapshots_offset` (bytes 60..72), so after each read these 12 bytes are
/// compared with the last ones seen while the snapshot existed; when they differ, the table is
/// parsed again and the read fails with `EIO` unless the snapshot is still there.
struct StillThere {
    stamp: std::sync::Mutex<[u8; 12]>,
    name: String,
    l1: u64,
}

fn table_stamp(h: &Header) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[..4].copy_from_slice(&h.nb_snapshots.to_be_bytes());
    b[4..].copy_from_slice(&h.snapshots_offset.to_be_bytes());
    b
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
        // Parsed even when not opening a snapshot: a broken table means a broken image.
        let parsed = meta_cache::get(&meta)?;
        let header = parsed.header.clone();
        let image_id = BlockCache::new_image_id();
        let (l1_offset, l1_size, size) = match snapshot {
            None => {
                // The active layer uses what the damage is about: refused, as QEMU does.
                if let Some(d) = header.damage.first() {
                    return Err(meta.corrupt(0, d.clone()));
                }
                (header.l1_table_offset, header.l1_size, header.size)
            }
            Some(want) => {
                let s = snapshot::find(&parsed.snapshots, want).ok_or_else(|| {
                    Error::NotFound(format!(
                        "snapshot {} in {}",
                        crate::log_limit::esc_str(want),
                        path.display()
                    ))
                })?;
                s.check_l1(&meta, &header)?;
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
        let still = snapshot.map(|name| StillThere {
            stamp: std::sync::Mutex::new(table_stamp(&header)),
            name: name.to_string(),
            l1: l1_offset,
        });
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
            still,
            cache: cache.clone(),
            ahead: std::sync::Mutex::new(ReadAhead::default()),
        })
    }

    /// `Err` (`EIO`) when the internal snapshot this image reads was deleted (see
    /// [`StillThere`]); Ok for the active layer.
    fn check_still_there(&self) -> Result<()> {
        let Some(st) = &self.still else {
            return Ok(());
        };
        let mut now = [0u8; 12];
        self.meta.read_or_zero(&mut now, 60)?;
        let mut seen = st.stamp.lock().unwrap_or_else(|e| e.into_inner());
        if *seen == now {
            return Ok(());
        }
        let gone = || {
            Error::Backend(format!(
                "snapshot {} of {} was deleted while open: its clusters may hold other data now",
                crate::log_limit::esc_str(&st.name),
                self.meta.path().display()
            ))
        };
        // Another host's file (read through its storage API) is not opened again: its path
        // means nothing on this machine. A changed table there counts as the snapshot gone.
        if self.meta.file().is_none() {
            return Err(gone());
        }
        // A new descriptor: the file has grown since open (the new table is often at its end).
        let parsed = meta_cache::get(&HostFile::open(self.meta.path())?)?;
        match snapshot::find(&parsed.snapshots, &st.name) {
            Some(s) if s.l1_table_offset == st.l1 => {
                *seen = table_stamp(&parsed.header);
                Ok(())
            }
            _ => Err(gone()),
        }
    }

    fn read_inner(&self, buf: &mut [u8], offset: u64) -> Result<()> {
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

    /// Read-ahead for a read of `[offset, end)` by a caller that reads nothing at or past
    /// `limit` next (see `readahead`): a sequential reader's window ahead is advised.
    fn read_ahead(&self, offset: u64, end: u64, limit: u64) {
        let window = {
            let mut a = self.ahead.lock().unwrap_or_else(|p| p.into_inner());
            let w = readahead::window_for(self.cluster_size());
            a.next(offset, end, self.size, limit, w)
        };
        if let Some((from, to)) = window {
            self.advise(&[(from, to - from)]);
        }
    }

    /// Ask the kernel to start reading the host bytes of the guest `ranges`: this file's data
    /// and compressed clusters there, and the backing file's bytes of the pieces this layer
    /// does not hold (the backing chain advises its own clusters the same way). Advice only:
    /// a lookup error ends the step, the read reports it.
    fn advise(&self, ranges: &[(u64, u64)]) {
        let (own, below) = self.advice_plan(ranges);
        if let Some(file) = self.data_file().file() {
            readahead::will_need(file, self.data_file().len(), &own);
        }
        if let Some(b) = &self.backing {
            let size = b.size();
            let below: Vec<(u64, u64)> = below
                .into_iter()
                .filter(|&(off, _)| off < size)
                .map(|(off, len)| (off, len.min(size - off)))
                .collect();
            if !below.is_empty() {
                b.will_need(&below);
            }
        }
    }

    /// What [`advise`](Self::advise) asks for `ranges` (sorted guest `(offset, length)`): the
    /// host ranges of this layer's data file (data clusters, compressed clusters' stored
    /// bytes), merged where contiguous, and the guest ranges left to the backing file
    /// (unallocated clusters). At most `readahead::MAX_LOOKUPS` lookups a call, so a chain
    /// of N layers makes at most N times that per step; a lookup error ends the plan there.
    fn advice_plan(&self, ranges: &[(u64, u64)]) -> (readahead::Ranges, readahead::Ranges) {
        let external = self.data.is_some();
        let mut cur = Cursor::default();
        let mut own = Vec::new();
        let mut below = Vec::new();
        let mut lookups = 0;
        'ranges: for &(start, len) in ranges {
            let to = start.saturating_add(len).min(self.size);
            let mut pos = start;
            while pos < to {
                if lookups >= readahead::MAX_LOOKUPS {
                    break 'ranges;
                }
                lookups += 1;
                let Ok((m, n)) =
                    self.tables
                        .lookup(&self.meta, &self.cache, &mut cur, pos, to - pos)
                else {
                    break 'ranges;
                };
                let n = n.clamp(1, to - pos);
                own.push(advice_piece(&m, n, external));
                below.push(matches!(m, Mapping::Unallocated).then_some((pos, n)));
                pos += n;
            }
        }
        (readahead::merge_ranges(own), readahead::merge_ranges(below))
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
            b.read_for_overlay(inside, guest)?;
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

    /// (device, inode) of the image file, to relate snapshots and chain layers.
    pub fn file_id(&self) -> (u64, u64) {
        self.meta.file_id()
    }

    /// Whether this is the file's active layer (not an internal snapshot).
    pub fn is_active_layer(&self) -> bool {
        self.snapshot.is_none()
    }

    pub fn backing(&self) -> Option<&dyn BlockImage> {
        self.backing.as_deref()
    }

    /// Guest ranges in `[0, limit)` this layer maps itself (data, compressed, zero): everything
    /// it changed over its backing. Past its own size (shorter than `limit`) all counts.
    pub fn own_allocation(&self, limit: u64, col: &mut Collector) -> Result<()> {
        let end = limit.min(self.size);
        let mut cur = Cursor::default();
        let mut pos = 0;
        while pos < end {
            let (m, n) = self
                .tables
                .lookup(&self.meta, &self.cache, &mut cur, pos, end - pos)?;
            let n = n.clamp(1, end - pos);
            if m != Mapping::Unallocated {
                col.push(pos, n);
            }
            pos += n;
        }
        if limit > end {
            col.push(end, limit - end);
        }
        Ok(())
    }

    /// Where this image and `older`, two states of one file (internal snapshots or the active
    /// layer), differ in `[0, limit)`: by their L1/L2 tables. A span whose L1 entries name the
    /// same L2 table is unchanged (qcow2 copies a shared table before writing); inside, a
    /// cluster is unchanged when both map the same host cluster, the same compressed
    /// descriptor, or both zero/unallocated.
    pub fn table_changes(&self, older: &Qcow2Image, limit: u64, col: &mut Collector) -> Result<()> {
        let end = limit.min(self.size).min(older.size);
        let no_backing = self.backing.is_none();
        let (mut cn, mut co) = (Cursor::default(), Cursor::default());
        let mut pos = 0;
        while pos < end {
            let (tn, span_end) = self.tables.l2_table_at(pos);
            let (to, _) = older.tables.l2_table_at(pos);
            if tn == to && self.cluster_size() == older.cluster_size() {
                pos = span_end.min(end);
                continue;
            }
            let (mn, nn) = self
                .tables
                .lookup(&self.meta, &self.cache, &mut cn, pos, end - pos)?;
            let (mo, no) =
                older
                    .tables
                    .lookup(&older.meta, &older.cache, &mut co, pos, end - pos)?;
            let n = nn.min(no).clamp(1, end - pos);
            let same =
                match (mn, mo) {
                    (Mapping::Data(a), Mapping::Data(b)) => a == b,
                    (Mapping::Compressed(a), Mapping::Compressed(b)) => a == b,
                    (Mapping::Zero, Mapping::Zero)
                    | (Mapping::Unallocated, Mapping::Unallocated) => true,
                    (Mapping::Zero, Mapping::Unallocated)
                    | (Mapping::Unallocated, Mapping::Zero) => no_backing,
                    _ => false,
                };
            if !same {
                col.push(pos, n);
            }
            pos += n;
        }
        if limit > end {
            col.push(end, limit - end);
        }
        Ok(())
    }
}

/// The host bytes (offset, length) in the data file that one looked-up piece of `n` guest bytes
/// reads, for the read-ahead: a data run's own bytes, a compressed cluster's stored bytes
/// (whole, once per cluster: a lookup never runs past its cluster), nothing for zero and
/// unallocated clusters (no bytes in this file) nor for compressed clusters beside an
/// external data file (they would live in the image file, which QEMU does not allow).
fn advice_piece(m: &Mapping, n: u64, external_data: bool) -> Option<(u64, u64)> {
    match m {
        Mapping::Data(h) => Some((*h, n)),
        Mapping::Compressed(d) if !external_data => Some((d.offset, d.len)),
        Mapping::Compressed(_) | Mapping::Zero | Mapping::Unallocated => None,
    }
}

impl BlockImage for Qcow2Image {
    fn diff_source(&self) -> super::changes::DiffSource<'_> {
        super::changes::DiffSource::Qcow2(self)
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.read_within(buf, offset, self.size)
    }

    fn read_within(&self, buf: &mut [u8], offset: u64, limit: u64) -> Result<()> {
        self.read_ahead(offset, offset.saturating_add(buf.len() as u64), limit);
        self.read_for_overlay(buf, offset)
    }

    fn read_for_overlay(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.read_inner(buf, offset)?;
        // Checked after the read: bytes read from clusters reused meanwhile are not returned.
        self.check_still_there()
    }

    fn will_need(&self, ranges: &[(u64, u64)]) {
        self.advise(ranges);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn run(cmd: &str, args: &[&str]) -> Vec<u8> {
        let out = std::process::Command::new(cmd)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("running {cmd}: {e}"));
        assert!(
            out.status.success(),
            "{cmd} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// QEMU's own answer: the host ranges of `file` (`qemu-img map`, its own layer only)
    /// that hold the guest `ranges`, merged where contiguous.
    fn qemu_host_ranges(file: &Path, ranges: &[(u64, u64)]) -> Vec<(u64, u64)> {
        let path = file.to_str().unwrap();
        let json = run("qemu-img", &["map", "--output=json", path]);
        let map: Vec<serde_json::Value> = serde_json::from_slice(&json).unwrap();
        let mut pieces = Vec::new();
        for &(gs, gl) in ranges {
            for e in &map {
                let (Some(s), Some(l), Some(h)) = (
                    e["start"].as_u64(),
                    e["length"].as_u64(),
                    e["offset"].as_u64(),
                ) else {
                    continue;
                };
                let (a, b) = (gs.max(s), (gs + gl).min(s + l));
                if a < b && e["depth"].as_u64() == Some(0) {
                    pieces.push((a, Some((h + (a - s), b - a))));
                }
            }
        }
        pieces.sort_by_key(|p| p.0);
        readahead::merge_ranges(pieces.into_iter().map(|p| p.1))
    }

    /// The read-ahead's plan against a real chain built by qemu: data clusters at QEMU's host
    /// offsets, a compressed cluster's stored bytes, nothing for a zero cluster, the holes
    /// left to the backing file, whose own plan for them is its clusters at QEMU's offsets.
    #[test]
    fn read_ahead_plan_follows_a_real_backing_chain() {
        const C: u64 = 65536;
        const M: u64 = 1 << 20;
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.qcow2");
        let top = dir.path().join("top.qcow2");
        let (b, t) = (base.to_str().unwrap(), top.to_str().unwrap());
        run("qemu-img", &["create", "-q", "-f", "qcow2", b, "4M"]);
        run("qemu-io", &["-c", "write -P 1 0 1M", b]);
        run(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-b", b, "-F", "qcow2", t],
        );
        run(
            "qemu-io",
            &[
                "-c",
                "write -P 2 128k 64k",
                "-c",
                "write -z 192k 64k",
                "-c",
                "write -c -P 3 256k 64k",
                "-c",
                "write -P 4 2M 128k",
                t,
            ],
        );
        let cache = Arc::new(BlockCache::default());
        let img = Qcow2Image::open(&top, None, &cache).unwrap();
        let (own, below) = img.advice_plan(&[(0, 4 * M)]);
        // The holes of the top layer, guest ranges, for the backing file.
        assert_eq!(
            below,
            vec![
                (0, 2 * C),
                (5 * C, 2 * M - 5 * C),
                (2 * M + 2 * C, 2 * M - 2 * C)
            ]
        );
        // Data clusters where QEMU put them, plus one compressed cluster's bytes (less than
        // a cluster), nothing for the zero cluster.
        let data = qemu_host_ranges(&top, &[(0, 4 * M)]);
        assert_eq!(data.iter().map(|r| r.1).sum::<u64>(), 3 * C, "{data:?}");
        for d in &data {
            assert!(
                own.iter().any(|o| o.0 <= d.0 && d.0 + d.1 <= o.0 + o.1),
                "{d:?} not in {own:?}"
            );
        }
        let extra = own.iter().map(|r| r.1).sum::<u64>() - 3 * C;
        assert!(
            0 < extra && extra < C,
            "compressed bytes {extra} in {own:?}"
        );
        let file_len = std::fs::metadata(&top).unwrap().len();
        assert!(own.iter().all(|o| o.0 + o.1 <= file_len), "{own:?}");

        // The backing file's plan for those holes: its clusters at QEMU's offsets, its own
        // holes left below (it has no backing file: nothing is asked for them).
        let bimg = Qcow2Image::open(&base, None, &cache).unwrap();
        let (bown, bbelow) = bimg.advice_plan(&below);
        assert_eq!(bown, qemu_host_ranges(&base, &below));
        assert_eq!(bown.iter().map(|r| r.1).sum::<u64>(), M - 3 * C);
        assert_eq!(bbelow, vec![(M, M), (2 * M + 2 * C, 2 * M - 2 * C)]);
    }

    /// One step makes at most `MAX_LOOKUPS` lookups: with 512-byte clusters a 4 MiB range
    /// is planned only as far as 1024 clusters.
    #[test]
    fn read_ahead_plan_is_bounded_per_step() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("small.qcow2");
        let s = p.to_str().unwrap();
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=512",
                s,
                "4M",
            ],
        );
        run("qemu-io", &["-c", "write -P 5 0 4M", s]);
        let cache = Arc::new(BlockCache::default());
        let img = Qcow2Image::open(&p, None, &cache).unwrap();
        let (own, below) = img.advice_plan(&[(0, 4 << 20)]);
        assert!(below.is_empty(), "{below:?}");
        assert_eq!(
            own.iter().map(|r| r.1).sum::<u64>(),
            512 * readahead::MAX_LOOKUPS
        );
        assert_eq!(readahead::window_for(img.cluster_size()), 512 * 1024);
    }

    #[test]
    fn read_ahead_advises_data_and_compressed_clusters_only() {
        const C: u64 = 65536;
        let z = |off, len| Mapping::Compressed(compress::CompressedDescriptor { offset: off, len });
        // A map as a sequential step looks it up: two host-contiguous data clusters, a hole
        // (the backing file's), a zero cluster, two compressed clusters, data far away, a
        // half cluster at the window's end.
        let map = [
            (Mapping::Data(5 * C), C),
            (Mapping::Data(6 * C), C),
            (Mapping::Unallocated, 16 * C),
            (Mapping::Zero, C),
            (z(9 * C + 100, 700), C),
            (z(9 * C + 1024, 3000), C),
            (Mapping::Data(7 * C), C),
            (Mapping::Data(100 * C), C / 2),
        ];
        let pieces = |external| map.iter().map(move |(m, n)| advice_piece(m, *n, external));
        assert_eq!(
            readahead::merge_ranges(pieces(false)),
            vec![
                (5 * C, 2 * C),
                (9 * C + 100, 700),
                (9 * C + 1024, 3000),
                (7 * C, C),
                (100 * C, C / 2)
            ]
        );
        // Beside an external data file only data clusters name bytes of that file.
        assert_eq!(
            readahead::merge_ranges(pieces(true)),
            vec![(5 * C, 3 * C), (100 * C, C / 2)]
        );
        // A layer that holds nothing of the range (all in the backing file) advises nothing.
        let none = [(Mapping::Unallocated, 64 * C), (Mapping::Zero, C)];
        assert!(
            readahead::merge_ranges(none.iter().map(|(m, n)| advice_piece(m, *n, false)))
                .is_empty()
        );
    }
}

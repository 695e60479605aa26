//! Block readers: the bytes of a virtual disk, whatever format holds them.
//!
//! Every reader implements [`BlockImage`]. Readers are read-only and safe to share between
//! threads; metadata (L2 tables) and decompressed clusters go through one byte-budgeted
//! [`cache::BlockCache`] shared by all images of the daemon.

pub mod cache;
pub mod changes;
mod copy;
pub mod hostfile;
pub mod parallels;
pub mod ploop;
pub mod qcow2;
pub mod raw;
pub mod rbd;
mod readahead;

use std::path::Path;
use std::sync::Arc;

use crate::error::Result;

pub use cache::BlockCache;
pub use copy::{copy_sparse, for_each_data};

/// What a stretch of the virtual disk holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtentKind {
    /// Allocated data somewhere in the chain (may still contain zero bytes).
    Data,
    /// Reads as zeros: unallocated through the whole chain, or a zero cluster. A hole for SEEK_HOLE.
    Zero,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    pub kind: ExtentKind,
}

/// A read-only virtual disk.
pub trait BlockImage: Send + Sync {
    /// Virtual size in bytes.
    fn size(&self) -> u64;

    /// Fill `buf` with the disk's bytes starting at `offset`. The caller guarantees
    /// `offset + buf.len() <= size()`. Corrupt metadata is `Error::Corrupt`, never a panic.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;

    /// Allocation status of `[offset, offset + length)`, clipped to `size()`: sorted, adjacent
    /// extents of the same kind merged, covering the range from `offset` without gaps. It may
    /// stop early (returning a shorter cover, at least one extent when `offset < size()`), so
    /// callers loop.
    fn map(&self, offset: u64, length: u64) -> Result<Vec<Extent>>;

    /// As [`read_at`](Self::read_at), for a caller that will read nothing at or past `limit`
    /// next (a `since/` file reads one changed extent, then seeks to the next): read-ahead
    /// stops there instead of fetching the hole that follows.
    fn read_within(&self, buf: &mut [u8], offset: u64, limit: u64) -> Result<()> {
        let _ = limit;
        self.read_at(buf, offset)
    }

    /// For an overlay's read-ahead (see `readahead`): ask the host to start reading this
    /// image's bytes of the guest `ranges` (sorted `(offset, length)`), the pieces the overlay
    /// does not hold. Advice only, bounded per call. Default: nothing.
    fn will_need(&self, ranges: &[(u64, u64)]) {
        let _ = ranges;
    }

    /// As [`read_at`](Self::read_at), for an overlay reading the pieces it does not hold: the
    /// overlay's read-ahead already asked for them ([`will_need`](Self::will_need)), so this
    /// image does not follow these reads for read-ahead of its own. Default: `read_at`.
    fn read_for_overlay(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.read_at(buf, offset)
    }

    /// `[offset, offset + len)` as part of a buffer the reader already holds (RBD read-ahead
    /// chunks), so a FUSE reply needs no copy. `Ok(None)`: use [`read_at`](Self::read_at).
    fn read_shared(&self, offset: u64, len: usize) -> Result<Option<SharedBytes>> {
        self.read_shared_within(offset, len, self.size())
    }

    /// [`read_shared`](Self::read_shared) with read-ahead stopping at `limit`, as
    /// [`read_within`](Self::read_within).
    fn read_shared_within(
        &self,
        offset: u64,
        len: usize,
        limit: u64,
    ) -> Result<Option<SharedBytes>> {
        let _ = (offset, len, limit);
        Ok(None)
    }

    /// Whether FUSE should bypass the kernel page cache for this disk (`FOPEN_DIRECT_IO`):
    /// each `read(2)` then reaches [`read_at`](Self::read_at) at the caller's size, and the
    /// reply is copied once, straight into the reader's buffer.
    fn direct_io(&self) -> bool {
        false
    }

    /// The local regular file whose bytes are this disk's, offset for offset, from 0 to
    /// [`size`](Self::size) (a raw image): FUSE passthrough may then hand its reads to the
    /// kernel, which reads the file itself and the daemon sees none of them. `None` for
    /// every format with metadata (qcow2, Parallels: their guest offsets are not the file's),
    /// for remote files and block devices. Only snapshot disks are opened, and their files
    /// are no longer written (see docs/incremental.md, "Copy-out speed").
    fn passthrough_file(&self) -> Option<&std::fs::File> {
        None
    }

    /// A short human description, e.g. "qcow2 v3, 64 KiB clusters, backing base.qcow2".
    fn describe(&self) -> String;

    /// What this reader is, so [`changes::changed_extents`] can relate two images of one disk
    /// by their metadata (same RBD image, same qcow2 file, one backing chain). The default
    /// relates nothing: changes are then found by comparing content.
    fn diff_source(&self) -> changes::DiffSource<'_> {
        changes::DiffSource::None
    }
}

/// A range of a shared buffer, from [`BlockImage::read_shared`].
pub struct SharedBytes {
    pub buf: Arc<Vec<u8>>,
    pub start: usize,
    pub len: usize,
}

impl SharedBytes {
    pub fn as_slice(&self) -> &[u8] {
        self.buf
            .get(self.start..self.start + self.len)
            .unwrap_or(&[])
    }
}

/// Disk image formats we can read from a host file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Raw,
    Qcow2,
    /// Parallels expandable image (QEMU's `parallels`, a ploop delta).
    Parallels,
}

impl Format {
    pub fn parse(s: &str) -> Option<Format> {
        match s {
            "raw" => Some(Format::Raw),
            "qcow2" => Some(Format::Qcow2),
            "parallels" | "ploop" => Some(Format::Parallels),
            _ => None,
        }
    }
}

/// Guess a host file's format from its first bytes (qcow2 or Parallels magic, else raw).
pub fn probe_format(path: &Path) -> Result<Format> {
    let mut magic = [0u8; 16];
    // Through HostFile: a remote host's file inside hostfile::with_opener.
    let f = hostfile::HostFile::open(path)?;
    let n = f.len().min(16) as usize;
    f.read_or_zero(&mut magic[..n], 0)?;
    Ok(if n >= 4 && magic[..4] == *b"QFI\xfb" {
        Format::Qcow2
    } else if n == 16 && (&magic == parallels::MAGIC_V1 || &magic == parallels::MAGIC_V2) {
        Format::Parallels
    } else {
        Format::Raw
    })
}

/// Open a host image file read-only. `format` None probes it; `snapshot` names a qcow2
/// internal snapshot (by name, or by id when no name matches) whose state to read.
pub fn open(
    path: &Path,
    format: Option<Format>,
    snapshot: Option<&str>,
    cache: &Arc<BlockCache>,
) -> Result<Arc<dyn BlockImage>> {
    let format = match format {
        Some(f) => f,
        None => probe_format(path)?,
    };
    match format {
        Format::Raw => {
            if let Some(s) = snapshot {
                return Err(crate::error::Error::NotSupported(format!(
                    "raw image {} has no snapshot {s}",
                    path.display()
                )));
            }
            Ok(Arc::new(raw::RawImage::open(path)?))
        }
        Format::Qcow2 => Ok(Arc::new(qcow2::Qcow2Image::open(path, snapshot, cache)?)),
        Format::Parallels => {
            if let Some(s) = snapshot {
                return Err(crate::error::Error::NotSupported(format!(
                    "Parallels image {} has no internal snapshot {s} (ploop snapshots are \
                     deltas named in DiskDescriptor.xml)",
                    path.display()
                )));
            }
            Ok(Arc::new(parallels::ParallelsImage::open(path, None)?))
        }
    }
}

/// Total bytes of `Data` extents: what `st_blocks` reports.
pub fn allocated_bytes(img: &dyn BlockImage) -> Result<u64> {
    let mut off = 0;
    let mut total = 0;
    let size = img.size();
    while off < size {
        let ext = img.map(off, size - off)?;
        let Some(last) = ext.last() else { break };
        for e in &ext {
            if e.kind == ExtentKind::Data {
                total += e.length;
            }
        }
        off = last.offset + last.length;
    }
    Ok(total)
}

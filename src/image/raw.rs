//! Raw images: the host file is the disk. Allocation comes from SEEK_DATA/SEEK_HOLE.

use std::os::fd::AsRawFd;
use std::path::Path;

use super::hostfile::HostFile;
use super::{BlockImage, Extent, ExtentKind};
use crate::error::Result;

/// Most extents one `map` call returns; callers loop.
const MAX_EXTENTS: usize = 4096;

pub struct RawImage {
    file: HostFile,
}

impl RawImage {
    pub fn open(path: &Path) -> Result<Self> {
        Ok(RawImage {
            file: HostFile::open(path)?,
        })
    }

    /// (device, inode) of the file, to find it in a backing chain.
    pub fn file_id(&self) -> (u64, u64) {
        self.file.file_id()
    }

    /// `lseek(fd, pos, whence)`; `Ok(None)` for ENXIO (no more data / past end).
    fn seek(&self, pos: u64, whence: i32) -> std::result::Result<Option<u64>, i32> {
        let Ok(pos) = libc::off_t::try_from(pos) else {
            return Err(libc::EINVAL);
        };
        let Some(file) = self.file.file() else {
            // A remote file: no SEEK_DATA there.
            return Err(libc::EOPNOTSUPP);
        };
        // SAFETY: lseek on an fd we own; the returned offset is used, the file position is not.
        let r = unsafe { libc::lseek(file.as_raw_fd(), pos, whence) };
        if r < 0 {
            let e = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
            if e == libc::ENXIO {
                Ok(None)
            } else {
                Err(e)
            }
        } else {
            Ok(Some(r as u64))
        }
    }
}

/// Append `[start, end)` of `kind` to `out`, merging with the previous extent when it matches.
pub(crate) fn push_extent(out: &mut Vec<Extent>, start: u64, end: u64, kind: ExtentKind) {
    if end <= start {
        return;
    }
    if let Some(last) = out.last_mut() {
        if last.kind == kind && last.offset + last.length == start {
            last.length = end - last.offset;
            return;
        }
    }
    out.push(Extent {
        offset: start,
        length: end - start,
        kind,
    });
}

impl BlockImage for RawImage {
    fn diff_source(&self) -> super::changes::DiffSource<'_> {
        super::changes::DiffSource::Raw(self)
    }

    fn size(&self) -> u64 {
        self.file.len()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.file.read_or_zero(buf, offset)
    }

    fn will_need(&self, ranges: &[(u64, u64)]) {
        // A raw backing file under a qcow2 overlay: its guest offsets are its file's.
        if let Some(file) = self.file.file() {
            super::readahead::will_need(file, self.file.len(), ranges);
        }
    }

    fn passthrough_file(&self) -> Option<&std::fs::File> {
        // A block device's reads go through the daemon: its size is not the file's length.
        self.file.file().filter(|_| self.file.is_regular())
    }

    fn map(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        let end = offset.saturating_add(length).min(self.size());
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end && out.len() < MAX_EXTENTS {
            let data = match self.seek(pos, libc::SEEK_DATA) {
                Ok(Some(d)) => d.max(pos),
                Ok(None) => end,
                Err(e) => {
                    // No SEEK_DATA on this filesystem: everything counts as data.
                    tracing::debug!(path = %self.file.path().display(), errno = e, "SEEK_DATA unsupported");
                    push_extent(&mut out, pos, end, ExtentKind::Data);
                    break;
                }
            };
            push_extent(&mut out, pos, data.min(end), ExtentKind::Zero);
            pos = data;
            if pos >= end {
                break;
            }
            let hole = match self.seek(pos, libc::SEEK_HOLE) {
                Ok(Some(h)) if h > pos => h,
                _ => end,
            };
            push_extent(&mut out, pos, hole.min(end), ExtentKind::Data);
            pos = hole;
        }
        Ok(out)
    }

    fn describe(&self) -> String {
        "raw".into()
    }
}

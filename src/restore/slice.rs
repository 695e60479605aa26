//! A byte range of a disk: [`Dev`] for our own parsers (bounds-checked reads that fail as
//! `Error::Corrupt`), [`Slice`] for crates that want `Read + Seek` (with a `Write` that refuses).

use std::io::{self, Read, Seek, SeekFrom, Write};
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use lru::LruCache;

use crate::error::{Error, Result};
use crate::image::BlockImage;

/// A partition's bytes: `[offset, offset + len)` of `disk`, clipped to the disk's size.
#[derive(Clone)]
pub struct Dev {
    disk: Arc<dyn BlockImage>,
    offset: u64,
    len: u64,
    name: String,
}

impl Dev {
    pub fn new(disk: Arc<dyn BlockImage>, offset: u64, len: u64, name: &str) -> Result<Dev> {
        let size = disk.size();
        if offset > size {
            return Err(Error::corrupt(
                name,
                offset,
                "partition starts past the end of the disk",
            ));
        }
        let len = len.min(size - offset);
        Ok(Dev {
            disk,
            offset,
            len,
            name: name.to_string(),
        })
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Fill `buf` from `off` (relative to the range). Past the end is `Error::Corrupt`.
    pub fn read_exact_at(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        off.checked_add(buf.len() as u64)
            .filter(|&e| e <= self.len)
            .ok_or_else(|| {
                Error::corrupt(
                    &self.name,
                    off,
                    format!("read of {} bytes past the end", buf.len()),
                )
            })?;
        if buf.is_empty() {
            return Ok(());
        }
        self.disk.read_at(buf, self.offset + off)
    }

    /// `len` bytes from `off` in a new vector; `len` is bounded by the caller.
    pub fn read_vec(&self, off: u64, len: usize) -> Result<Vec<u8>> {
        let mut v = vec![0u8; len];
        self.read_exact_at(off, &mut v)?;
        Ok(v)
    }

    /// Like `read_exact_at`, but a range past the end reads what exists and zero-fills the rest
    /// (for probing small ranges).
    pub fn read_lenient(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        buf.fill(0);
        if off >= self.len {
            return Ok(());
        }
        let n = (buf.len() as u64).min(self.len - off) as usize;
        self.read_exact_at(off, &mut buf[..n])
    }

    pub fn corrupt(&self, offset: u64, what: impl Into<String>) -> Error {
        Error::corrupt(&self.name, offset, what)
    }
}

/// Metadata reads of one filesystem reader, served from a small LRU of aligned chunks that are
/// read whole (read-around). On a cold image every inode-table or directory block would
/// otherwise be its own 4 KiB disk read; their neighbours are usually wanted next.
pub struct ChunkCache {
    chunk: u64,
    lru: Mutex<LruCache<u64, Arc<Vec<u8>>>>,
}

impl ChunkCache {
    /// `chunks` chunks of `chunk` bytes each (a power of two).
    pub fn new(chunk: u64, chunks: usize) -> ChunkCache {
        ChunkCache {
            chunk: chunk.max(1).next_power_of_two(),
            lru: Mutex::new(LruCache::new(
                NonZeroUsize::new(chunks).unwrap_or(NonZeroUsize::MIN),
            )),
        }
    }

    /// Like [`Dev::read_exact_at`]; a range inside one chunk is served from (and loads) it.
    pub fn read(&self, dev: &Dev, off: u64, buf: &mut [u8]) -> Result<()> {
        let start = off - off % self.chunk;
        let inside = off
            .checked_add(buf.len() as u64)
            .is_some_and(|end| end <= dev.len() && end <= start.saturating_add(self.chunk));
        if !inside || buf.is_empty() {
            return dev.read_exact_at(off, buf);
        }
        let at = (off - start) as usize;
        let cached = self
            .lru
            .lock()
            .ok()
            .and_then(|mut l| l.get(&start).cloned());
        let chunk = match cached {
            Some(c) => c,
            None => {
                let len = self.chunk.min(dev.len() - start) as usize;
                match dev.read_vec(start, len) {
                    Ok(v) => {
                        let v = Arc::new(v);
                        if let Ok(mut l) = self.lru.lock() {
                            l.put(start, v.clone());
                        }
                        v
                    }
                    // A damaged neighbour must not fail a read of good bytes.
                    Err(_) => return dev.read_exact_at(off, buf),
                }
            }
        };
        match chunk.get(at..at + buf.len()) {
            Some(src) => {
                buf.copy_from_slice(src);
                Ok(())
            }
            None => dev.read_exact_at(off, buf),
        }
    }
}

/// `Read + Seek` over a [`Dev`], for crates that take a stream. Writes fail.
pub struct Slice {
    dev: Dev,
    pos: u64,
}

impl Slice {
    pub fn new(dev: Dev) -> Slice {
        Slice { dev, pos: 0 }
    }
}

impl Read for Slice {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.dev.len() {
            return Ok(0);
        }
        let n = (buf.len() as u64).min(self.dev.len() - self.pos) as usize;
        self.dev
            .read_exact_at(self.pos, &mut buf[..n])
            .map_err(|e| io::Error::other(e.to_string()))?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for Slice {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let new = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.dev.len().checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        match new {
            Some(p) => {
                self.pos = p;
                Ok(p)
            }
            None => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek out of range",
            )),
        }
    }
}

impl Write for Slice {
    fn write(&mut self, _buf: &[u8]) -> io::Result<usize> {
        Err(io::Error::new(io::ErrorKind::PermissionDenied, "read-only"))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A disk held in memory (all data, no holes): for fuzz targets and tests.
#[doc(hidden)]
pub struct MemDisk(pub Vec<u8>);

impl BlockImage for MemDisk {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let src = usize::try_from(offset)
            .ok()
            .and_then(|o| self.0.get(o..o.checked_add(buf.len())?))
            .ok_or_else(|| Error::corrupt("memory", offset, "read past the end"))?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn map(&self, offset: u64, length: u64) -> Result<Vec<crate::image::Extent>> {
        let length = length.min(self.size().saturating_sub(offset));
        Ok(vec![crate::image::Extent {
            offset,
            length,
            kind: crate::image::ExtentKind::Data,
        }])
    }

    fn describe(&self) -> String {
        "memory".into()
    }
}

//! A byte range of a disk: [`Dev`] for our own parsers (bounds-checked reads that fail as
//! `Error::Corrupt`), [`Slice`] for crates that want `Read + Seek` (with a `Write` that refuses).

use std::io::{self, Read, Seek, SeekFrom, Write};
use std::sync::Arc;

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

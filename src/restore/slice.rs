//! A byte range of a disk: [`Dev`] for our own parsers (bounds-checked reads that fail as
//! `Error::Corrupt`), [`Slice`] for crates that want `Read + Seek` (with a `Write` that refuses).

use std::io::{self, Read, Seek, SeekFrom, Write};
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

/// Metadata reads of one filesystem reader, served from a small LRU of aligned chunks.
///
/// Read-around adapts to the access pattern: the first miss in a chunk reads only the
/// sub-blocks (1/16 of a chunk) it needs; a later miss in the same chunk reads the whole chunk
/// when it is next to what is kept (a sequential scan: a small directory tree's inode table
/// or directory blocks) or when the chunk missed twice already. On a cold image every
/// inode-table or directory block of a small tree would otherwise be its own disk read, while
/// a huge directory's subdirectories have their inodes and blocks spread over the disk: there
/// a whole chunk per miss brought one useful block and 16 times the bytes to copy (issue 19:
/// two 64 KiB reads per subdirectory of a 100,000-subdirectory `find`).
pub struct ChunkCache {
    chunk: u64,
    sub: u64,
    budget: usize,
    inner: Mutex<ChunkLru>,
}

struct ChunkLru {
    lru: LruCache<u64, Piece>,
    bytes: usize,
}

/// Bytes `[from, from + data.len())` of the chunk (offsets within the chunk).
struct Piece {
    from: u64,
    data: Arc<Vec<u8>>,
    /// Misses this chunk had while kept in part.
    misses: u8,
}

impl Piece {
    fn end(&self) -> u64 {
        self.from + self.data.len() as u64
    }
}

/// Sub-blocks per chunk.
const SUBS: u64 = 16;

impl ChunkCache {
    /// At most `chunks` whole chunks' worth of bytes, in chunks of `chunk` bytes (a power of
    /// two).
    pub fn new(chunk: u64, chunks: usize) -> ChunkCache {
        let chunk = chunk.max(1).next_power_of_two();
        ChunkCache {
            chunk,
            sub: (chunk / SUBS).max(512).min(chunk),
            budget: usize::try_from(chunk)
                .unwrap_or(usize::MAX)
                .saturating_mul(chunks.max(1)),
            inner: Mutex::new(ChunkLru {
                lru: LruCache::unbounded(),
                bytes: 0,
            }),
        }
    }

    /// Like [`Dev::read_exact_at`]; a range inside one chunk is served from (and loads) it.
    pub fn read(&self, dev: &Dev, off: u64, buf: &mut [u8]) -> Result<()> {
        self.read_from(dev.len(), off, buf, &|o, b| dev.read_exact_at(o, b))
    }

    /// [`Self::read`] over any source of `len` bytes read by `fetch(offset, buffer)`.
    pub fn read_from(
        &self,
        len: u64,
        off: u64,
        buf: &mut [u8],
        fetch: &dyn Fn(u64, &mut [u8]) -> Result<()>,
    ) -> Result<()> {
        let start = off - off % self.chunk;
        let inside = off
            .checked_add(buf.len() as u64)
            .is_some_and(|end| end <= len && end <= start.saturating_add(self.chunk));
        if !inside || buf.is_empty() {
            return fetch(off, buf);
        }
        let (at, end) = (off - start, off - start + buf.len() as u64);
        let chunk_len = self.chunk.min(len - start);
        // What is kept of this chunk, and what to read if it does not hold the range.
        let (kept, misses) = {
            let mut g = lock(&self.inner);
            match g.lru.get(&start) {
                Some(p) if p.from <= at && end <= p.end() => (Some((p.from, p.data.clone())), 0),
                Some(p) => {
                    let near = end >= p.from && at <= p.end();
                    (None, if near { u8::MAX } else { p.misses + 1 })
                }
                None => (None, 0),
            }
        };
        if let Some((from, data)) = kept {
            let s = (at - from) as usize;
            buf.copy_from_slice(&data[s..s + buf.len()]);
            return Ok(());
        }
        let (from, to) = if misses >= 2 {
            (0, chunk_len)
        } else {
            (
                at - at % self.sub,
                end.div_ceil(self.sub)
                    .saturating_mul(self.sub)
                    .min(chunk_len),
            )
        };
        let mut v = vec![0u8; (to - from) as usize];
        if fetch(start + from, &mut v).is_err() {
            // A damaged neighbour must not fail a read of good bytes.
            return fetch(off, buf);
        }
        let s = (at - from) as usize;
        buf.copy_from_slice(&v[s..s + buf.len()]);
        let piece = Piece {
            from,
            data: Arc::new(v),
            misses: if to - from == chunk_len {
                0
            } else {
                misses.min(2)
            },
        };
        let mut g = lock(&self.inner);
        g.bytes += piece.data.len();
        if let Some(old) = g.lru.put(start, piece) {
            g.bytes -= old.data.len();
        }
        while g.bytes > self.budget && g.lru.len() > 1 {
            match g.lru.pop_lru() {
                Some((_, p)) => g.bytes -= p.data.len(),
                None => break,
            }
        }
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A 1 MiB source whose byte i is (i * 7 + i / 4096) mod 251, and the reads made of it.
    struct Source {
        reads: Mutex<Vec<(u64, usize)>>,
    }

    fn byte(i: u64) -> u8 {
        ((i * 7 + i / 4096) % 251) as u8
    }

    const LEN: u64 = 1 << 20;

    impl Source {
        fn new() -> Source {
            Source {
                reads: Mutex::new(Vec::new()),
            }
        }
        fn fetch(&self, off: u64, buf: &mut [u8]) -> Result<()> {
            self.reads.lock().unwrap().push((off, buf.len()));
            for (i, b) in buf.iter_mut().enumerate() {
                *b = byte(off + i as u64);
            }
            Ok(())
        }
        fn take(&self) -> Vec<(u64, usize)> {
            std::mem::take(&mut self.reads.lock().unwrap())
        }
    }

    fn read(c: &ChunkCache, s: &Source, off: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        c.read_from(LEN, off, &mut b, &|o, b| s.fetch(o, b))
            .unwrap();
        let want: Vec<u8> = (off..off + len as u64).map(byte).collect();
        assert_eq!(b, want, "bytes of {off}+{len}");
        b
    }

    #[test]
    fn scattered_blocks_read_only_their_sub_block() {
        let (c, s) = (ChunkCache::new(64 << 10, 32), Source::new());
        // One 256-byte inode in each of 8 chunks: one 4 KiB read each, not 64 KiB.
        for k in 0..8u64 {
            read(&c, &s, k * (64 << 10) + 4096 * 5 + 256, 256);
        }
        let r = s.take();
        assert_eq!(r.len(), 8);
        assert!(r.iter().all(|&(o, l)| l == 4096 && o % 4096 == 0), "{r:?}");
        // Read again: served from the cache.
        read(&c, &s, 4096 * 5 + 512, 256);
        assert!(s.take().is_empty());
    }

    #[test]
    fn a_sequential_scan_reads_the_chunk_whole() {
        let (c, s) = (ChunkCache::new(64 << 10, 32), Source::new());
        for blk in 0..16u64 {
            read(&c, &s, (64 << 10) + blk * 4096, 4096);
        }
        // The first block alone, then its neighbour brings the whole chunk.
        assert_eq!(s.take(), vec![(64 << 10, 4096), (64 << 10, 64 << 10)]);
    }

    #[test]
    fn a_third_scattered_miss_in_a_chunk_reads_it_whole() {
        let (c, s) = (ChunkCache::new(64 << 10, 32), Source::new());
        read(&c, &s, 0, 100);
        read(&c, &s, 8 * 4096, 100);
        read(&c, &s, 14 * 4096, 100);
        read(&c, &s, 3 * 4096, 100);
        assert_eq!(s.take(), vec![(0, 4096), (8 * 4096, 4096), (0, 64 << 10)]);
    }

    #[test]
    fn kept_bytes_stay_within_the_budget() {
        let (c, s) = (ChunkCache::new(64 << 10, 4), Source::new());
        for k in 0..16u64 {
            // Whole chunks (sequential), then scattered blocks.
            read(&c, &s, k * (64 << 10), 4096);
            read(&c, &s, k * (64 << 10) + 4096, 4096);
        }
        assert!(c.inner.lock().unwrap().bytes <= 4 * (64 << 10));
        let before = s.take().len();
        // The most recent chunk is still there.
        read(&c, &s, 15 * (64 << 10) + 9 * 4096, 4096);
        assert!(s.take().is_empty(), "after {before} reads");
        // Reads across a chunk boundary or past the end go straight to the source.
        read(&c, &s, (64 << 10) - 10, 20);
        assert_eq!(s.take(), vec![((64 << 10) - 10, 20)]);
    }

    #[test]
    fn a_failing_wider_read_falls_back_to_the_exact_range() {
        let c = ChunkCache::new(64 << 10, 4);
        // Bytes past 4096 + 300 cannot be read; the 4 KiB-aligned read fails, the exact works.
        let fetch = |o: u64, b: &mut [u8]| -> Result<()> {
            if o + b.len() as u64 > 4096 + 300 {
                return Err(Error::corrupt("t", o, "bad sector"));
            }
            b.fill(1);
            Ok(())
        };
        let mut b = [0u8; 100];
        c.read_from(LEN, 4096 + 100, &mut b, &fetch).unwrap();
        assert_eq!(b, [1u8; 100]);
    }
}

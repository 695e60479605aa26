//! The restore worker's wire format: length-prefixed frames of little-endian fields over a
//! `socketpair`. Both ends decode with bounds checks: a short or oversized frame is a protocol
//! error (the daemon then ends the worker), never a panic or an allocation the peer chose.

use std::io::{Read, Write};
use std::time::SystemTime;

use crate::error::{Error, Result};
use crate::restore::{FileKind, FileStat};

/// Largest frame either side accepts: a 1 MiB read, a big listing, a 16 MiB block read.
pub const MAX_FRAME: usize = 64 << 20;
/// Largest block read the worker may ask for at once.
pub const MAX_BLOCK_READ: u32 = 16 << 20;

// Requests (daemon → worker).
pub const OPEN: u8 = 1;
pub const STAT: u8 = 2;
pub const LOOKUP: u8 = 3;
pub const READDIR: u8 = 4;
pub const READ: u8 = 5;
pub const READLINK: u8 = 6;
pub const XATTRS: u8 = 7;
pub const PREFETCH_DIR: u8 = 8;
pub const DATA_RANGES: u8 = 9;
/// Where a file's bytes lie (ino, offset, len): the daemon then reads them from the disk.
pub const MAP: u8 = 10;
pub const CHECK_OPEN: u8 = 11;
/// Several names of one directory looked up at once (dir, count, names): lookup read-ahead.
pub const LOOKUPS: u8 = 12;
/// A page of a listing (dir, cookie, budget u32): the answer is (end u8, count u32, then
/// name, inode, kind, cookie after it each), then listings ahead as `READDIR` (of the page's
/// subdirectories).
pub const READDIR_PAGE: u8 = 13;
/// Most bytes of FUSE entries one `READDIR_PAGE` asks for.
pub const MAX_PAGE_BUDGET: u32 = 4 << 20;
/// Most bytes of FUSE entries a `READDIR_PAGE` answer carries for a paged (large) directory,
/// whatever was asked: a READDIR uses 4 KiB of them, the rest feeds the read-ahead.
pub const PAGED_PAGE_BUDGET: usize = 64 << 10;
/// Most names one `LOOKUPS` carries.
pub const MAX_LOOKUPS: usize = 64;
/// A `LOOKUPS` answer carries a file's extended attributes when they take at most this many
/// bytes, and the map of a regular file of at most [`AHEAD_MAP_SIZE`] bytes in at most
/// [`AHEAD_MAP_RUNS`] runs: `cp -a` of small files then needs no round trip per file.
pub const AHEAD_XATTR_BYTES: usize = 512;
pub const AHEAD_MAP_SIZE: u64 = 1 << 20;
pub const AHEAD_MAP_RUNS: usize = 16;
/// A `READDIR` answer carries the listings of the directory's first subdirectories too, at
/// most this many, while the answer stays under [`AHEAD_LISTING_BYTES`].
pub const AHEAD_LISTINGS: usize = 64;
pub const AHEAD_LISTING_BYTES: usize = 256 << 10;
/// Lookups of the names a walk in inode order asks for next (dir, after u64, from u64, to u64,
/// max u32): among `dir`'s entries listed from cookie `from` up to the one whose cookie is `to`
/// (to the directory's end when none is, or `to` is `u64::MAX`), the `max` (at most
/// [`MAX_INO_BATCH`]) whose inode numbers are the smallest above `after`, in ascending inode
/// order. GNU `find` and `du` (gnulib's `fts`) read a directory of more than 10,000 entries
/// (up to 100,000 at a time) and then visit them sorted by inode number, which is no order a
/// listing has. The answer: a count, then per name the name and its `LOOKUPS` answer, then
/// listings ahead as `READDIR` (of the subdirectories among them, up to [`MAX_INO_BATCH`] and
/// [`INO_BATCH_LISTING_BYTES`]).
pub const LOOKUPS_BY_INO: u8 = 14;
/// Most names one `LOOKUPS_BY_INO` answers.
pub const MAX_INO_BATCH: usize = 2048;
/// Most bytes of listings ahead one `LOOKUPS_BY_INO` answer carries.
pub const INO_BATCH_LISTING_BYTES: usize = 1 << 20;
/// Most entries one `LOOKUPS_BY_INO` looks at (fts reads at most 100,000 at a time).
pub const MAX_INO_SCAN: usize = 1 << 20;
/// Test hooks: the worker calls `open(2)` (the filter must kill it) / sleeps until killed.
pub const TEST_OPEN: u8 = 100;
pub const TEST_HANG: u8 = 101;

// Replies (worker → daemon), and the daemon's answers to block reads.
pub const OK: u8 = 0;
pub const ERR: u8 = 1;
/// Inside a request: the worker asks for disk bytes (offset u64, len u32).
pub const BLOCK_READ: u8 = 2;
/// The daemon's answer to a block read: the bytes are at the start of the shared window
/// (len u32), not in the frame.
pub const IN_WINDOW: u8 = 3;

// Places in a MAP reply: zeros, disk bytes (offset follows), ask the worker (READ).
pub const PLACE_ZERO: u8 = 0;
pub const PLACE_DISK: u8 = 1;
pub const PLACE_READER: u8 = 2;

// Outcomes of OPEN.
pub const OPENED_FS: u8 = 0;
pub const OPENED_README: u8 = 1;
pub const OPENED_LVM: u8 = 2;

/// A frame under construction.
#[derive(Default)]
pub struct W(pub Vec<u8>);

impl W {
    pub fn new(tag: u8) -> W {
        let mut v = Vec::with_capacity(64);
        v.extend_from_slice(&[0, 0, 0, 0, tag]);
        W(v)
    }
    pub fn u8(mut self, x: u8) -> W {
        self.0.push(x);
        self
    }
    pub fn u16(mut self, x: u16) -> W {
        self.0.extend_from_slice(&x.to_le_bytes());
        self
    }
    pub fn u32(mut self, x: u32) -> W {
        self.0.extend_from_slice(&x.to_le_bytes());
        self
    }
    pub fn u64(mut self, x: u64) -> W {
        self.0.extend_from_slice(&x.to_le_bytes());
        self
    }
    pub fn i64(self, x: i64) -> W {
        self.u64(x as u64)
    }
    pub fn bytes(self, b: &[u8]) -> W {
        let mut s = self.u32(b.len() as u32);
        s.0.extend_from_slice(b);
        s
    }
    pub fn time(self, t: SystemTime) -> W {
        let (secs, nanos) = split_time(t);
        self.i64(secs).u32(nanos)
    }
    pub fn stat(self, s: &FileStat) -> W {
        let w = self
            .u64(s.ino)
            .u8(kind_code(s.kind))
            .u16(s.perm)
            .u32(s.uid)
            .u32(s.gid)
            .u64(s.size)
            .u64(s.allocated)
            .u32(s.nlink)
            .u32(s.rdev)
            .time(s.atime)
            .time(s.mtime)
            .time(s.ctime);
        match s.btime {
            Some(t) => w.u8(1).time(t),
            None => w.u8(0),
        }
    }
    pub fn error(self, e: &Error) -> W {
        let (code, errno, path, offset, what) = match e {
            Error::NotFound(m) => (1, 0, "", 0, m.as_str()),
            Error::NotDir(m) => (2, 0, "", 0, m.as_str()),
            Error::IsDir(m) => (3, 0, "", 0, m.as_str()),
            Error::NotSupported(m) => (4, 0, "", 0, m.as_str()),
            Error::Invalid(m) => (5, 0, "", 0, m.as_str()),
            Error::NoAttr => (6, 0, "", 0, ""),
            Error::Range => (7, 0, "", 0, ""),
            Error::NoSuchOffset => (8, 0, "", 0, ""),
            Error::Corrupt { path, offset, what } => (9, 0, path.as_str(), *offset, what.as_str()),
            Error::Io { context, source } => (
                10,
                source.raw_os_error().unwrap_or(libc::EIO),
                "",
                0,
                context.as_str(),
            ),
            Error::Busy(m) => (11, 0, "", 0, m.as_str()),
            Error::NoKey(m) => (13, 0, "", 0, m.as_str()),
            other => {
                return self
                    .u8(12)
                    .u32(0)
                    .bytes(b"")
                    .u64(0)
                    .bytes(other.to_string().as_bytes())
            }
        };
        self.u8(code)
            .u32(errno as u32)
            .bytes(path.as_bytes())
            .u64(offset)
            .bytes(what.as_bytes())
    }
    /// The finished frame, its length filled in.
    pub fn done(mut self) -> Vec<u8> {
        let n = (self.0.len() - 4) as u32;
        self.0[..4].copy_from_slice(&n.to_le_bytes());
        self.0
    }
}

/// A received frame's body (tag first).
pub struct R<'a> {
    buf: &'a [u8],
    pos: usize,
}

fn short() -> Error {
    Error::Backend("restore worker protocol: short frame".into())
}

impl<'a> R<'a> {
    pub fn new(buf: &'a [u8]) -> R<'a> {
        R { buf, pos: 0 }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).ok_or_else(short)?;
        let s = self.buf.get(self.pos..end).ok_or_else(short)?;
        self.pos = end;
        Ok(s)
    }
    pub fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    pub fn u16(&mut self) -> Result<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    pub fn u32(&mut self) -> Result<u32> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }
    pub fn u64(&mut self) -> Result<u64> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    pub fn i64(&mut self) -> Result<i64> {
        Ok(self.u64()? as i64)
    }
    pub fn bytes(&mut self) -> Result<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    pub fn string(&mut self) -> Result<String> {
        Ok(String::from_utf8_lossy(self.bytes()?).into_owned())
    }
    pub fn rest(&mut self) -> &'a [u8] {
        let s = &self.buf[self.pos.min(self.buf.len())..];
        self.pos = self.buf.len();
        s
    }
    pub fn time(&mut self) -> Result<SystemTime> {
        let secs = self.i64()?;
        let nanos = self.u32()?;
        Ok(crate::restore::unix_time(secs, nanos))
    }
    pub fn kind(&mut self) -> Result<FileKind> {
        kind_of(self.u8()?)
    }
    pub fn stat(&mut self) -> Result<FileStat> {
        Ok(FileStat {
            ino: self.u64()?,
            kind: self.kind()?,
            perm: self.u16()?,
            uid: self.u32()?,
            gid: self.u32()?,
            size: self.u64()?,
            allocated: self.u64()?,
            nlink: self.u32()?,
            rdev: self.u32()?,
            atime: self.time()?,
            mtime: self.time()?,
            ctime: self.time()?,
            btime: match self.u8()? {
                0 => None,
                _ => Some(self.time()?),
            },
        })
    }
    /// An error the worker reported (its reader's verdict, not a protocol failure).
    pub fn error(&mut self) -> Result<Error> {
        let code = self.u8()?;
        let errno = self.u32()? as i32;
        let path = self.string()?;
        let offset = self.u64()?;
        let what = self.string()?;
        Ok(match code {
            1 => Error::NotFound(what),
            2 => Error::NotDir(what),
            3 => Error::IsDir(what),
            4 => Error::NotSupported(what),
            5 => Error::Invalid(what),
            6 => Error::NoAttr,
            7 => Error::Range,
            8 => Error::NoSuchOffset,
            9 => Error::Corrupt { path, offset, what },
            10 => Error::Io {
                context: what,
                source: std::io::Error::from_raw_os_error(errno),
            },
            11 => Error::Busy(what),
            13 => Error::NoKey(what),
            _ => Error::Backend(what),
        })
    }
}

fn kind_code(k: FileKind) -> u8 {
    match k {
        FileKind::Dir => 0,
        FileKind::File => 1,
        FileKind::Symlink => 2,
        FileKind::Fifo => 3,
        FileKind::Socket => 4,
        FileKind::CharDev => 5,
        FileKind::BlockDev => 6,
    }
}

fn kind_of(c: u8) -> Result<FileKind> {
    Ok(match c {
        0 => FileKind::Dir,
        1 => FileKind::File,
        2 => FileKind::Symlink,
        3 => FileKind::Fifo,
        4 => FileKind::Socket,
        5 => FileKind::CharDev,
        6 => FileKind::BlockDev,
        _ => {
            return Err(Error::Backend(
                "restore worker protocol: bad file kind".into(),
            ))
        }
    })
}

pub fn write_kind(w: W, k: FileKind) -> W {
    w.u8(kind_code(k))
}

/// Seconds (possibly negative) and nanoseconds, as [`crate::restore::unix_time`] takes them.
fn split_time(t: SystemTime) -> (i64, u32) {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => (d.as_secs() as i64, d.subsec_nanos()),
        Err(e) => {
            let d = e.duration();
            let (s, n) = (d.as_secs() as i64, d.subsec_nanos());
            if n == 0 {
                (-s, 0)
            } else {
                (-s - 1, 1_000_000_000 - n)
            }
        }
    }
}

/// One frame from `r` into `buf` (its body: tag and fields). `Ok(false)` at a clean end of
/// stream before a frame starts.
pub fn read_frame(r: &mut impl Read, buf: &mut Vec<u8>) -> std::io::Result<bool> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let n = u32::from_le_bytes(len) as usize;
    if n == 0 || n > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {n} bytes"),
        ));
    }
    buf.clear();
    buf.resize(n, 0);
    r.read_exact(buf)?;
    Ok(true)
}

/// Write a frame made by [`W::done`].
pub fn write_frame(w: &mut impl Write, frame: &[u8]) -> std::io::Result<()> {
    w.write_all(frame)
}

/// A frame of `tag` followed by a raw payload, without building it in one buffer first.
pub fn write_payload(w: &mut impl Write, tag: u8, payload: &[u8]) -> std::io::Result<()> {
    let n = (payload.len() + 1) as u32;
    let mut head = [0u8; 5];
    head[..4].copy_from_slice(&n.to_le_bytes());
    head[4] = tag;
    w.write_all(&head)?;
    w.write_all(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_errors_and_times_round_trip() {
        let t = |s: i64, n: u32| crate::restore::unix_time(s, n);
        let st = FileStat {
            ino: 42,
            kind: FileKind::Symlink,
            perm: 0o4755,
            uid: 1000,
            gid: u32::MAX,
            size: 1 << 40,
            allocated: 4096,
            nlink: 3,
            rdev: 0x0801,
            atime: t(-5, 250),
            mtime: t(1_700_000_000, 999_999_999),
            ctime: t(-1, 0),
            btime: Some(t(0, 1)),
        };
        let f = W::new(OK).stat(&st).done();
        let mut r = R::new(&f[4..]);
        assert_eq!(r.u8().unwrap(), OK);
        assert_eq!(r.stat().unwrap(), st);
        let e = Error::corrupt("p1", 77, "bad extent");
        let f = W::new(ERR).error(&e).done();
        let mut r = R::new(&f[5..]);
        let back = r.error().unwrap();
        assert_eq!(back.to_string(), e.to_string());
        assert_eq!(back.errno(), libc::EIO);
        let f = W::new(ERR).error(&Error::NoAttr).done();
        assert_eq!(R::new(&f[5..]).error().unwrap().errno(), libc::ENODATA);
    }

    #[test]
    fn short_and_oversized_frames_are_errors() {
        let mut r = R::new(&[1, 2, 3]);
        assert!(r.u64().is_err());
        let mut r = R::new(&[255, 255, 255, 255]);
        assert!(r.bytes().is_err());
        let mut big = &((MAX_FRAME as u32 + 1).to_le_bytes())[..];
        assert!(read_frame(&mut big, &mut Vec::new()).is_err());
        let mut empty: &[u8] = &[];
        assert!(!read_frame(&mut empty, &mut Vec::new()).unwrap());
    }
}

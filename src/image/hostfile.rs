//! A read-only host file read with pread (no shared cursor, no lock), shared by all readers.
//!
//! Or a file of another host: inside [`with_opener`], [`HostFile::open`] asks the opener
//! (e.g. libvirt's storage API of a remote host) instead of this machine's filesystem, so the
//! image readers and their backing chains work unchanged on files they cannot open here.

use std::cell::RefCell;
use std::fs::File;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, IoContext, Result};

/// The bytes of a file somewhere else.
pub trait RemoteFile: Send + Sync {
    /// Fill `buf` from `offset`; the caller keeps the range inside the file's length.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
}

/// What an opener returns for a path: the bytes, the file's length, and what identifies this
/// version of it (any change of the file changes its times).
pub struct RemoteOpen {
    pub file: Arc<dyn RemoteFile>,
    pub len: u64,
    /// Which file this is (stable across opens).
    pub id: u64,
    pub mtime: (i64, i64),
    pub ctime: (i64, i64),
}

pub type Opener = Arc<dyn Fn(&Path) -> Result<RemoteOpen> + Send + Sync>;

thread_local! {
    static OPENER: RefCell<Option<Opener>> = const { RefCell::new(None) };
}

/// Run `f` with every [`HostFile::open`] of this thread going through `opener`.
pub fn with_opener<T>(opener: Opener, f: impl FnOnce() -> T) -> T {
    scoped(Some(opener), f)
}

/// Run `f` with paths naming this machine's files again, also inside [`with_opener`] (a
/// store copy on this machine sent to a remote host).
pub fn local<T>(f: impl FnOnce() -> T) -> T {
    scoped(None, f)
}

/// Run `f` with this thread's opener set to `opener`, the previous one back after.
fn scoped<T>(opener: Option<Opener>, f: impl FnOnce() -> T) -> T {
    struct Restore(Option<Opener>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let prev = self.0.take();
            OPENER.with(|o| *o.borrow_mut() = prev);
        }
    }
    let _restore = Restore(OPENER.with(|o| std::mem::replace(&mut *o.borrow_mut(), opener)));
    f()
}

/// Whether this thread is inside [`with_opener`]: paths name another host's files.
pub fn remote_scope() -> bool {
    OPENER.with(|o| o.borrow().is_some())
}

/// Whether something is at `path`: on this machine, or inside [`with_opener`] on the
/// opener's host (where only what the opener can open counts).
pub fn exists(path: &Path) -> bool {
    match OPENER.with(|o| o.borrow().clone()) {
        Some(opener) => !matches!(opener(path), Err(Error::NotFound(_))),
        None => std::fs::symlink_metadata(path).is_ok(),
    }
}

/// `dev` of a remote file's [`Generation`]: no local device has it.
const REMOTE_DEV: u64 = u64::MAX;

enum Src {
    Local(File),
    Remote(Arc<dyn RemoteFile>),
}

pub struct HostFile {
    file: Src,
    path: PathBuf,
    /// Length at open; snapshots and backing files do not change under us.
    len: u64,
    generation: Generation,
    /// A local regular file (not a block device, not a remote file).
    regular: bool,
}

/// Which version of a file this is: its metadata changes only when the file does, so what was
/// parsed from one generation holds until the next (a rewrite, `qemu-img snapshot`, a copy over it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Generation {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl HostFile {
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(opener) = OPENER.with(|o| o.borrow().clone()) {
            let r = opener(path)?;
            return Ok(HostFile {
                file: Src::Remote(r.file),
                path: path.to_path_buf(),
                len: r.len,
                generation: Generation {
                    dev: REMOTE_DEV,
                    ino: r.id,
                    len: r.len,
                    mtime: r.mtime,
                    ctime: r.ctime,
                },
                regular: false,
            });
        }
        // O_NONBLOCK so a header naming a FIFO cannot hang the open; it is refused below.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .ctx(|| format!("opening {}", path.display()))?;
        let meta = file
            .metadata()
            .ctx(|| format!("stat of {}", path.display()))?;
        let ft = meta.file_type();
        if ft.is_dir() {
            return Err(Error::IsDir(path.display().to_string()));
        }
        if !ft.is_file() && !ft.is_block_device() {
            return Err(Error::NotSupported(format!(
                "{} is neither a regular file nor a block device",
                path.display()
            )));
        }
        let len = if ft.is_block_device() {
            block_device_len(&file).ctx(|| format!("size of {}", path.display()))?
        } else {
            meta.len()
        };
        use std::os::unix::fs::MetadataExt;
        let generation = Generation {
            dev: meta.dev(),
            ino: meta.ino(),
            len,
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        };
        Ok(HostFile {
            file: Src::Local(file),
            path: path.to_path_buf(),
            len,
            generation,
            regular: ft.is_file(),
        })
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A local regular file (not a block device, not another host's file).
    pub fn is_regular(&self) -> bool {
        self.regular
    }

    pub fn generation(&self) -> Generation {
        self.generation
    }

    /// (device, inode): which file this is, whatever its name.
    pub fn file_id(&self) -> (u64, u64) {
        (self.generation.dev, self.generation.ino)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The local file (None: a remote one).
    pub fn file(&self) -> Option<&File> {
        match &self.file {
            Src::Local(f) => Some(f),
            Src::Remote(_) => None,
        }
    }

    /// `Error::Corrupt` naming this file.
    pub fn corrupt(&self, offset: u64, what: impl Into<String>) -> Error {
        Error::corrupt(self.path.display().to_string(), offset, what)
    }

    /// Fill `buf` from `offset`; bytes past the end of the file read as zeros.
    pub fn read_or_zero(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let file = match &self.file {
            Src::Local(f) => f,
            Src::Remote(r) => {
                let inside = self.len.saturating_sub(offset).min(buf.len() as u64) as usize;
                if inside > 0 {
                    r.read_at(&mut buf[..inside], offset)?;
                }
                buf[inside..].fill(0);
                return Ok(());
            }
        };
        let mut done = 0;
        while done < buf.len() {
            let Some(pos) = offset.checked_add(done as u64) else {
                break;
            };
            match file.read_at(&mut buf[done..], pos) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(Error::io(
                        format!("reading {} at {pos:#x}", self.path.display()),
                        e,
                    ))
                }
            }
        }
        buf[done..].fill(0);
        Ok(())
    }

    /// Read metadata that must lie wholly inside the file, else `Error::Corrupt` naming `what`.
    pub fn read_meta(&self, buf: &mut [u8], offset: u64, what: &str) -> Result<()> {
        let end = offset.checked_add(buf.len() as u64);
        match end {
            Some(end) if end <= self.len => self.read_or_zero(buf, offset),
            _ => Err(self.corrupt(
                offset,
                format!("{what} ({} bytes) extends past end of file", buf.len()),
            )),
        }
    }

    /// Like [`read_meta`](Self::read_meta) into a new buffer; the caller bounds `len`.
    pub fn read_meta_vec(&self, len: usize, offset: u64, what: &str) -> Result<Vec<u8>> {
        // Checked before allocating so a header field cannot drive a huge allocation.
        if offset
            .checked_add(len as u64)
            .is_none_or(|end| end > self.len)
        {
            return Err(self.corrupt(
                offset,
                format!("{what} ({len} bytes) extends past end of file"),
            ));
        }
        let mut v = vec![0u8; len];
        self.read_or_zero(&mut v, offset)?;
        Ok(v)
    }
}

/// A block device's size: its end, as lseek reports it (metadata says 0).
fn block_device_len(file: &File) -> std::io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = file;
    f.seek(SeekFrom::End(0))
}

//! A read-only host file read with pread (no shared cursor, no lock), shared by all readers.

use std::fs::File;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};

pub struct HostFile {
    file: File,
    path: PathBuf,
    /// Length at open; snapshots and backing files do not change under us.
    len: u64,
    generation: Generation,
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
            file,
            path: path.to_path_buf(),
            len,
            generation,
        })
    }

    pub fn len(&self) -> u64 {
        self.len
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

    pub fn file(&self) -> &File {
        &self.file
    }

    /// `Error::Corrupt` naming this file.
    pub fn corrupt(&self, offset: u64, what: impl Into<String>) -> Error {
        Error::corrupt(self.path.display().to_string(), offset, what)
    }

    /// Fill `buf` from `offset`; bytes past the end of the file read as zeros.
    pub fn read_or_zero(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let Some(pos) = offset.checked_add(done as u64) else {
                break;
            };
            match self.file.read_at(&mut buf[done..], pos) {
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

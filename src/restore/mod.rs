//! STUB (interface only): replaced by the guest-filesystem work on branch `restore`.
use std::sync::Arc;
use std::time::SystemTime;

use crate::error::{Error, Result};
use crate::image::BlockImage;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    Dir,
    File,
    Symlink,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
}

#[derive(Clone, Debug)]
pub struct FileStat {
    pub ino: u64,
    pub kind: FileKind,
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub allocated: u64,
    pub nlink: u32,
    pub rdev: u32,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    pub btime: Option<SystemTime>,
}

pub trait GuestFs: Send + Sync {
    fn root(&self) -> u64;
    fn stat(&self, ino: u64) -> Result<FileStat>;
    fn lookup(&self, dir: u64, name: &[u8]) -> Result<FileStat>;
    fn readdir(&self, dir: u64) -> Result<Vec<(Vec<u8>, u64, FileKind)>>;
    fn read(&self, ino: u64, offset: u64, buf: &mut [u8]) -> Result<usize>;
    fn readlink(&self, ino: u64) -> Result<Vec<u8>>;
    fn xattrs(&self, ino: u64) -> Result<Vec<(Vec<u8>, Vec<u8>)>>;
    fn data_ranges(&self, _ino: u64) -> Result<Option<Vec<(u64, u64)>>> {
        Ok(None)
    }
    fn describe(&self) -> String;
}

pub enum Volume {
    Fs(Arc<dyn GuestFs>),
    Unsupported { readme: String },
}

#[derive(Clone, Debug)]
pub struct Partition {
    pub name: String,
    pub offset: u64,
    pub length: u64,
    pub type_desc: String,
}

pub fn partitions(disk: &dyn BlockImage) -> Result<Vec<Partition>> {
    Ok(vec![Partition {
        name: "whole".into(),
        offset: 0,
        length: disk.size(),
        type_desc: "unknown".into(),
    }])
}

pub fn open_volume(_disk: Arc<dyn BlockImage>, part: &Partition) -> Result<Volume> {
    let _ = Error::NotSupported(String::new());
    Ok(Volume::Unsupported {
        readme: format!(
            "snapfs cannot read the filesystem in {} yet ({}).\n",
            part.name, part.type_desc
        ),
    })
}

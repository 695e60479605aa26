//! FAT12/16/32 (placeholder until the reader lands).
use super::{Dev, FileKind, FileStat, GuestFs};
use crate::error::{Error, Result};

pub struct FatFs;

impl FatFs {
    pub fn open(_dev: Dev) -> Result<FatFs> {
        Err(Error::NotSupported("FAT reader not built yet".into()))
    }
}

impl GuestFs for FatFs {
    fn root(&self) -> u64 {
        1
    }
    fn stat(&self, _ino: u64) -> Result<FileStat> {
        Err(Error::NotSupported("fat".into()))
    }
    fn lookup(&self, _dir: u64, _name: &[u8]) -> Result<FileStat> {
        Err(Error::NotSupported("fat".into()))
    }
    fn readdir(&self, _dir: u64) -> Result<Vec<(Vec<u8>, u64, FileKind)>> {
        Err(Error::NotSupported("fat".into()))
    }
    fn read(&self, _ino: u64, _offset: u64, _buf: &mut [u8]) -> Result<usize> {
        Err(Error::NotSupported("fat".into()))
    }
    fn readlink(&self, _ino: u64) -> Result<Vec<u8>> {
        Err(Error::NotSupported("fat".into()))
    }
    fn xattrs(&self, _ino: u64) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        Ok(Vec::new())
    }
    fn describe(&self) -> String {
        "FAT".into()
    }
}

//! STUB: replaced by the image-reader work.
use std::path::Path;

use super::{BlockImage, Extent};
use crate::error::{Error, Result};

pub struct RawImage;

impl RawImage {
    pub fn open(path: &Path) -> Result<Self> {
        Err(Error::NotSupported(format!("stub {}", path.display())))
    }
}

impl BlockImage for RawImage {
    fn size(&self) -> u64 {
        0
    }
    fn read_at(&self, _buf: &mut [u8], _offset: u64) -> Result<()> {
        Ok(())
    }
    fn map(&self, _offset: u64, _length: u64) -> Result<Vec<Extent>> {
        Ok(vec![])
    }
    fn describe(&self) -> String {
        "raw".into()
    }
}

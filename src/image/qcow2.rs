//! STUB: replaced by the image-reader work (becomes the folder qcow2/).
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{BlockCache, BlockImage, Extent};
use crate::error::{Error, Result};

/// One internal snapshot as the qcow2 snapshot table stores it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SnapshotEntry {
    pub id: String,
    pub name: String,
    /// Creation time, seconds since the epoch.
    pub date_sec: u32,
    pub date_nsec: u32,
    pub vm_clock_nsec: u64,
    pub vm_state_size: u64,
    /// The snapshot's own virtual size (v3 extra data), else the image's.
    pub virtual_size: u64,
}

/// What the header says, for volume.json and the provider; no data is read.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Qcow2Info {
    pub version: u32,
    pub cluster_size: u64,
    pub virtual_size: u64,
    /// The backing file as stored in the header.
    pub backing_file: Option<String>,
    /// The same, resolved relative to the image's directory.
    pub backing_path: Option<PathBuf>,
    pub backing_format: Option<String>,
    pub data_file: Option<String>,
    pub compression: String,
    pub extended_l2: bool,
    pub dirty: bool,
    pub snapshots: Vec<SnapshotEntry>,
}

pub fn inspect(path: &Path) -> Result<Qcow2Info> {
    Err(Error::NotSupported(format!("stub {}", path.display())))
}

pub struct Qcow2Image;

impl Qcow2Image {
    pub fn open(path: &Path, _snapshot: Option<&str>, _cache: &Arc<BlockCache>) -> Result<Self> {
        Err(Error::NotSupported(format!("stub {}", path.display())))
    }
}

impl BlockImage for Qcow2Image {
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
        "qcow2".into()
    }
}

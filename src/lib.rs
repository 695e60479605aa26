//! snapfs: VM snapshots as plain files and directories, over FUSE.

pub mod error;
pub mod image;

//! snapfs: VM snapshots as plain files and directories, over FUSE.

pub mod ceph;
pub mod cli;
pub mod daemon;
pub mod dl;
pub mod error;
pub mod fairness;
pub mod fs;
pub mod fuse;
pub mod image;
pub mod libvirt;
pub mod log_limit;
pub mod logfile;
pub mod memreport;
pub mod namespace;
pub mod notify;
pub mod passthrough;
pub mod provider;
pub mod restore;

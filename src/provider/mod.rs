//! Control planes behind one trait: who owns instances, volumes and their snapshots.
//!
//! A provider speaks backend names (any string); escaping them into file names is the
//! namespace's job, not the provider's.

/// `FromStr` for a command-line choice: each variant from its exact name.
macro_rules! choice_from_str {
    ($ty:ty { $($name:literal => $v:expr),+ $(,)? }) => {
        impl std::str::FromStr for $ty {
            type Err = String;
            fn from_str(s: &str) -> std::result::Result<Self, String> {
                match s {
                    $($name => Ok($v),)+
                    _ => Err(format!("{s:?}: expected one of {}", [$($name),+].join(", "))),
                }
            }
        }
    };
}

pub mod hosts;
pub mod images;
pub mod libvirt;
#[cfg(test)]
pub mod memory;
pub mod rbd;

use std::sync::Arc;
use std::time::SystemTime;

use crate::error::{Error, Result};
use crate::image::BlockImage;

/// The thing snapshots belong to: an instance (VM) or a volume in a pool.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Owner {
    Instance(String),
    Volume { pool: String, name: String },
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Owner::Instance(n) => write!(f, "instance {n}"),
            Owner::Volume { pool, name } => write!(f, "volume {pool}/{name}"),
        }
    }
}

/// An instance or volume as `instance.json` / `volume.json` shows it.
#[derive(Clone, Debug)]
pub struct ObjectInfo {
    pub json: serde_json::Value,
    pub mtime: SystemTime,
}

/// One disk inside a snapshot. Volumes have exactly one, with target [`VOLUME_DISK`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapDisk {
    pub target: String,
    pub size: u64,
}

/// [`Provider::storage_keys`] of a file or block device of this host.
pub fn file_key(path: &std::path::Path) -> String {
    let p = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    format!("file:{}", p.display())
}

/// [`Provider::storage_keys`] of an RBD image (`pool/image`, or `pool/namespace/image`).
pub fn rbd_key(spec: &str) -> String {
    format!("rbd:{spec}")
}

/// Target name of a volume snapshot's only disk (file `disk.raw`).
pub const VOLUME_DISK: &str = "disk";

#[derive(Clone, Debug)]
pub struct SnapshotInfo {
    pub name: String,
    /// Backend identity; together with `created` it tells a re-created namesake apart.
    pub id: String,
    pub created: SystemTime,
    pub disks: Vec<SnapDisk>,
    /// The whole `snapshot.json` (shared: the info is copied out of the registry on every
    /// operation below a snapshot).
    pub json: std::sync::Arc<serde_json::Value>,
}

/// A launch record: instance `name` was booted from `instance`'s snapshot `snapshot`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaunchInfo {
    pub name: String,
    pub instance: String,
    pub snapshot: String,
}

/// A control plane. Every method has a default that says the provider has no such thing,
/// so a volume-only provider implements only the volume half.
pub trait Provider: Send + Sync {
    /// Short name for logs, e.g. "images" or "libvirt".
    fn kind(&self) -> &'static str;

    fn pools(&self) -> Result<Vec<String>> {
        Ok(Vec::new())
    }
    fn volumes(&self, pool: &str) -> Result<Vec<String>> {
        Err(Error::NotFound(format!("pool {pool}")))
    }
    fn instances(&self) -> Result<Vec<String>> {
        Ok(Vec::new())
    }

    /// Why `owner`, absent from this provider's listing, cannot be reached now (e.g. its
    /// libvirt host does not answer): the error of an access to it instead of `ENOENT`.
    fn unavailable(&self, owner: &Owner) -> Option<Error> {
        let _ = owner;
        None
    }

    fn info(&self, owner: &Owner) -> Result<ObjectInfo>;

    /// The storage `owner`'s snapshots are taken on, as keys every provider spells alike:
    /// `rbd:<pool>/<image>` for an RBD image, `file:<canonical path>` for a file or block device
    /// of this host (a disk's active file, not its backing files: instances cloned from one
    /// base image share those), `<host>:file:<path>` for another host's.
    /// An instance's disks are volumes too (in an image directory, a libvirt pool, an RBD pool),
    /// so two snapshot operations whose keys meet exclude each other (`EBUSY`). Default: none.
    fn storage_keys(&self, owner: &Owner) -> Result<Vec<String>> {
        let _ = owner;
        Ok(Vec::new())
    }
    fn snapshots(&self, owner: &Owner) -> Result<Vec<SnapshotInfo>>;
    fn create_snapshot(&self, owner: &Owner, name: &str) -> Result<()>;
    fn delete_snapshot(&self, owner: &Owner, name: &str) -> Result<()>;
    fn rename_snapshot(&self, owner: &Owner, from: &str, to: &str) -> Result<()> {
        let _ = (from, to);
        Err(Error::NotSupported(format!(
            "{} provider cannot rename snapshots of {owner}",
            self.kind()
        )))
    }
    /// The bytes of one disk of a snapshot.
    fn open_disk(
        &self,
        owner: &Owner,
        snap: &SnapshotInfo,
        target: &str,
    ) -> Result<Arc<dyn BlockImage>>;

    /// Whether snapfs keeps the lineage of `owner` (`current`, each snapshot's parent) in its
    /// state directory: for backends that keep none themselves. Where this is false, neither
    /// `current` nor `parent` links are shown (yet) and snapshot.json is the provider's own.
    fn records_lineage(&self, owner: &Owner) -> bool {
        let _ = owner;
        false
    }
    /// Refuse a revert before anything is done (e.g. `EBUSY` while a client has the image
    /// open), so a refused revert leaves no `before-revert-…` behind.
    fn check_revert(&self, owner: &Owner, snap: &SnapshotInfo) -> Result<()> {
        let _ = (owner, snap);
        Ok(())
    }
    /// Keep the live state of `owner` as snapshot `name` before a revert to `target`: by
    /// default mkdir's snapshot; a backend whose revert needs another kind makes that one.
    fn keep_before_revert(&self, owner: &Owner, target: &SnapshotInfo, name: &str) -> Result<()> {
        let _ = target;
        self.create_snapshot(owner, name)
    }
    /// Return the live state of `owner` to snapshot `snap` (the `current` link's switch).
    fn revert_snapshot(&self, owner: &Owner, snap: &SnapshotInfo) -> Result<()> {
        let _ = snap;
        Err(Error::NotSupported(format!(
            "{} provider cannot revert {owner}",
            self.kind()
        )))
    }

    /// Whether the live state of `owner` is now snapshot `snap`'s, for a revert a killed daemon
    /// asked for: `Some(true)` it happened, `Some(false)` it did not; `None` cannot tell (the
    /// revert may have stopped part way), so the namespace does it again.
    fn reverted_to(&self, owner: &Owner, snap: &SnapshotInfo) -> Result<Option<bool>> {
        let _ = (owner, snap);
        Ok(None)
    }

    /// The per-object settings shown as `user.snapfs.<name>` extended attributes of the
    /// object directory, with their effective values; none where the backend keeps none.
    fn settings(&self, owner: &Owner) -> Result<Vec<(String, String)>> {
        let _ = owner;
        Ok(Vec::new())
    }
    /// Set (or with `None` reset to the mount's default) setting `name` of `owner`. An unknown
    /// name is `ENOTSUP`, a bad value `EINVAL`, as setxattr(2) documents.
    fn set_setting(&self, owner: &Owner, name: &str, value: Option<&str>) -> Result<()> {
        let _ = value;
        Err(Error::NotSupported(format!(
            "{} provider keeps no setting {name:?} for {owner}",
            self.kind()
        )))
    }

    fn launches(&self) -> Result<Vec<LaunchInfo>> {
        Ok(Vec::new())
    }
    fn launch(&self, new: &str, instance: &str, snapshot: &str) -> Result<()> {
        let _ = (new, instance, snapshot);
        Err(Error::NotSupported(format!(
            "{} provider cannot launch instances",
            self.kind()
        )))
    }
    fn forget_launch(&self, name: &str) -> Result<()> {
        Err(Error::NotFound(format!("launch {name}")))
    }
}

/// RFC 3339 (UTC) for JSON files.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

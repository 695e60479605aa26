//! `<snap>/since/<older>/`: what changed on each disk since an older snapshot of the same
//! instance/volume, for every provider alike (see `crate::image::changes` for where the
//! extents come from and docs/incremental.md for the contract).

use std::sync::{Arc, OnceLock};

use super::names::{self, escape};
use super::registry::lock;
use super::{disk_key, disk_target, Kind, Namespace, Node, OpenDisk, Stat, DIR_PERM, FILE_PERM};
use crate::error::{Error, Result};
use crate::image::changes::{changed_extents, RbdDiffStream, SinceImage};
use crate::provider::{Owner, SnapshotInfo};

pub const SINCE: &str = "since";
pub const EXTENTS_SUFFIX: &str = ".extents.json";
pub const RBDDIFF_SUFFIX: &str = ".rbddiff";

/// The node of a path below `<snap>/since/`; `rest` is what follows `since`.
pub fn parse(owner: Owner, snap: String, rest: &[&str]) -> Node {
    match rest {
        [] => Node::Since(owner, snap),
        [older] => Node::SinceDir(owner, snap, names::unescape(older)),
        [older, f] => {
            let older = names::unescape(older);
            if let Some(stem) = f.strip_suffix(EXTENTS_SUFFIX) {
                match disk_target(&owner, &format!("{stem}.raw")) {
                    Some(t) => Node::SinceJson(owner, snap, older, t),
                    None => Node::InSnapshot,
                }
            } else if let Some(stem) = f.strip_suffix(RBDDIFF_SUFFIX) {
                match disk_target(&owner, &format!("{stem}.raw")) {
                    Some(t) => Node::SinceRbdDiff(owner, snap, older, t),
                    None => Node::InSnapshot,
                }
            } else {
                match disk_target(&owner, f) {
                    Some(t) => Node::SinceDisk(owner, snap, older, t),
                    None => Node::InSnapshot,
                }
            }
        }
        _ => Node::InSnapshot,
    }
}

impl Namespace {
    /// Snapshots of `owner` created before `snap` (ties in creation time: earlier in the
    /// backend's list), oldest first.
    fn older_snapshots(&self, owner: &Owner, snap: &SnapshotInfo) -> Result<Vec<SnapshotInfo>> {
        let all = self.reg.snapshots(owner)?;
        let at = all
            .iter()
            .position(|s| s.id == snap.id && s.name == snap.name);
        Ok(all
            .iter()
            .enumerate()
            .filter(|(i, s)| {
                s.created < snap.created
                    || (s.created == snap.created && at.is_some_and(|a| *i < a))
            })
            .map(|(_, s)| s.clone())
            .collect())
    }

    fn older_snapshot(
        &self,
        owner: &Owner,
        snap: &SnapshotInfo,
        older: &str,
    ) -> Result<SnapshotInfo> {
        self.older_snapshots(owner, snap)?
            .into_iter()
            .find(|s| s.name == older)
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "snapshot {older} older than {} of {owner}",
                    snap.name
                ))
            })
    }

    /// The `since/<older>/<target>.raw` disk of `snap`: changes computed once and cached with
    /// the snapshot's disks (dropped with them when the snapshot goes).
    fn since_disk(
        &self,
        owner: &Owner,
        snap: &SnapshotInfo,
        older: &SnapshotInfo,
        target: &str,
    ) -> Result<Arc<OpenDisk>> {
        let older_key = if older.disks.iter().any(|d| d.target == target) {
            disk_key(owner, older, target)
        } else {
            "absent".to_string()
        };
        let key = format!("{}\0since\0{older_key}", disk_key(owner, snap, target));
        if let Some(d) = lock(&self.disks).get(&key) {
            return Ok(d.clone());
        }
        // One computation at a time: a second reader of the same pair waits and finds it.
        let _one = lock(&self.since_busy);
        if let Some(d) = lock(&self.disks).get(&key) {
            return Ok(d.clone());
        }
        let newer = self.open_disk(owner, snap, target)?;
        let old = if older_key == "absent" {
            None
        } else {
            Some(self.open_disk(owner, older, target)?)
        };
        let started = std::time::Instant::now();
        let changes = changed_extents(newer.image.as_ref(), old.as_ref().map(|d| d.image.as_ref()))
            .map_err(|e| {
                tracing::warn!(%owner, snapshot = %snap.name, older = %older.name, target, error = %e, "changed extents failed");
                e
            })?;
        tracing::info!(
            %owner,
            snapshot = %snap.name,
            older = %older.name,
            target,
            method = changes.method,
            extents = changes.extents.len(),
            bytes = changes.bytes(),
            ms = started.elapsed().as_millis() as u64,
            "changed extents"
        );
        let changes = Arc::new(changes);
        let disk = Arc::new(OpenDisk {
            image: Arc::new(SinceImage::new(newer.image.clone(), changes.clone())),
            allocated: OnceLock::from(changes.bytes()),
            changes: Some(changes),
        });
        lock(&self.disks).put(key, disk.clone());
        Ok(disk)
    }

    fn since_json(
        &self,
        o: &Owner,
        s: &str,
        older: &str,
        t: &str,
    ) -> Result<(Vec<u8>, SnapshotInfo)> {
        let snap = self.reg.snapshot(o, s)?;
        let older = self.older_snapshot(o, &snap, older)?;
        let disk = self.since_disk(o, &snap, &older, t)?;
        let json = disk.changes.as_ref().map(|c| c.json()).unwrap_or_default();
        Ok((json, snap))
    }

    pub(super) fn since_stat(&self, node: &Node) -> Result<Stat> {
        Ok(match node {
            Node::Since(o, s) => {
                Stat::new(Kind::Dir, 0, 0, self.reg.snapshot(o, s)?.created, DIR_PERM)
            }
            Node::SinceDir(o, s, older) => {
                let snap = self.reg.snapshot(o, s)?;
                self.older_snapshot(o, &snap, older)?;
                Stat::new(Kind::Dir, 0, 0, snap.created, DIR_PERM)
            }
            Node::SinceDisk(o, s, older, t) => {
                let snap = self.reg.snapshot(o, s)?;
                self.check_target(o, &snap, t)?;
                let older = self.older_snapshot(o, &snap, older)?;
                let disk = self.since_disk(o, &snap, &older, t)?;
                Stat::new(
                    Kind::File,
                    disk.image.size(),
                    disk.allocated(),
                    snap.created,
                    FILE_PERM,
                )
            }
            Node::SinceJson(o, s, older, t) => {
                let snap = self.reg.snapshot(o, s)?;
                self.check_target(o, &snap, t)?;
                let (json, snap) = self.since_json(o, s, older, t)?;
                self.file(json.len() as u64, snap.created)
            }
            Node::SinceRbdDiff(o, s, older, t) => {
                let snap = self.reg.snapshot(o, s)?;
                let d = self.since_rbddiff(o, &snap, older, t)?;
                Stat::new(
                    Kind::File,
                    d.image.size(),
                    d.image.size(),
                    snap.created,
                    FILE_PERM,
                )
            }
            _ => return Err(Error::NotFound(format!("{node:?}"))),
        })
    }

    pub(super) fn since_list(&self, node: &Node) -> Result<Vec<(String, Kind, Option<u64>)>> {
        Ok(match node {
            Node::Since(o, s) => {
                let snap = self.reg.snapshot(o, s)?;
                self.older_snapshots(o, &snap)?
                    .iter()
                    .map(|s| escape(&s.name))
                    .filter(|n| n.len() <= names::NAME_MAX)
                    .map(|n| (n, Kind::Dir, None))
                    .collect()
            }
            Node::SinceDir(o, s, older) => {
                let snap = self.reg.snapshot(o, s)?;
                self.older_snapshot(o, &snap, older)?;
                let mut v = Vec::new();
                for d in &snap.disks {
                    let stem = escape(&d.target);
                    v.push((format!("{stem}.raw"), Kind::File, None));
                    v.push((format!("{stem}{EXTENTS_SUFFIX}"), Kind::File, None));
                    v.push((format!("{stem}{RBDDIFF_SUFFIX}"), Kind::File, None));
                }
                v
            }
            _ => return Err(Error::NotDir(format!("{node:?}"))),
        })
    }

    pub(super) fn since_open(&self, node: &Node) -> Result<super::Content> {
        Ok(match node {
            Node::SinceDisk(o, s, older, t) => {
                let snap = self.reg.snapshot(o, s)?;
                self.check_target(o, &snap, t)?;
                let older = self.older_snapshot(o, &snap, older)?;
                super::Content::Disk(self.since_disk(o, &snap, &older, t)?)
            }
            Node::SinceJson(o, s, older, t) => {
                let snap = self.reg.snapshot(o, s)?;
                self.check_target(o, &snap, t)?;
                super::Content::Bytes(Arc::new(self.since_json(o, s, older, t)?.0))
            }
            Node::SinceRbdDiff(o, s, older, t) => {
                let snap = self.reg.snapshot(o, s)?;
                super::Content::Disk(self.since_rbddiff(o, &snap, older, t)?)
            }
            _ => return Err(Error::IsDir(format!("{node:?}"))),
        })
    }

    /// The `.rbddiff` stream over the cached changes of the pair.
    fn since_rbddiff(
        &self,
        o: &Owner,
        snap: &SnapshotInfo,
        older: &str,
        t: &str,
    ) -> Result<Arc<OpenDisk>> {
        self.check_target(o, snap, t)?;
        let older = self.older_snapshot(o, snap, older)?;
        let disk = self.since_disk(o, snap, &older, t)?;
        let changes = disk
            .changes
            .clone()
            .ok_or_else(|| Error::NotFound(format!("changes of {t} since {}", older.name)))?;
        let from = older
            .disks
            .iter()
            .any(|d| d.target == t)
            .then_some(older.name.as_str());
        let newer = self.open_disk(o, snap, t)?;
        let stream = RbdDiffStream::new(newer.image.clone(), changes, from, &snap.name);
        Ok(Arc::new(OpenDisk {
            image: Arc::new(stream),
            allocated: OnceLock::new(),
            changes: None,
        }))
    }

    fn check_target(&self, owner: &Owner, snap: &SnapshotInfo, target: &str) -> Result<()> {
        if snap.disks.iter().any(|d| d.target == target) {
            Ok(())
        } else {
            Err(Error::NotFound(format!(
                "disk {target} in snapshot {} of {owner}",
                snap.name
            )))
        }
    }
}

//! Which snapshot the live state of an instance or volume descends from (`current`) and the
//! parent of each snapshot, for backends that keep neither (qcow2 internal snapshots). One small
//! JSON file per owner in the state directory, written whole to a temporary name and renamed, so
//! a daemon killed mid-write leaves the old record or the new one, never half of one.
//!
//! A revert is recorded in two steps around the backend's work: first an intent (`reverting`:
//! the target, and whose record it is), then, once the backend has reverted, the new `current`
//! with the intent cleared, in one write. A daemon killed in between leaves the intent; the
//! next one asks the backend whether the revert happened ([`Lineage::interrupted`]) and keeps
//! the old `current` or takes the target, so `current` never names a state the live one is not.
//!
//! Snapshots are referred to by (id, name): the id survives a rename, the name finds snapshots
//! of backends whose ids change. A record naming snapshots that no longer exist is not an error:
//! those references are ignored (the image was replaced, or changed behind our back).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tracing::warn;

use super::names::escape;
use super::registry::lock;
use crate::provider::{Owner, SnapshotInfo};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapRef {
    pub id: String,
    pub name: String,
}

impl SnapRef {
    pub fn of(s: &SnapshotInfo) -> SnapRef {
        SnapRef {
            id: s.id.clone(),
            name: s.name.clone(),
        }
    }

    /// The snapshot of `snaps` this refers to: by id, else by name.
    pub fn find<'a>(&self, snaps: &'a [SnapshotInfo]) -> Option<&'a SnapshotInfo> {
        snaps
            .iter()
            .find(|s| s.id == self.id)
            .or_else(|| snaps.iter().find(|s| s.name == self.name))
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    current: Option<SnapRef>,
    /// Snapshot id → the snapshot that was current when it was taken.
    parents: BTreeMap<String, SnapRef>,
    /// A revert asked of the backend and not known to be over (see the module's text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reverting: Option<Reverting>,
}

/// The intent of a revert: to which snapshot, of which owner (the file name is an escaped key,
/// so the owner is written out for the next daemon).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Reverting {
    to: SnapRef,
    owner: OwnerKey,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum OwnerKey {
    Instance(String),
    Volume { pool: String, name: String },
}

impl OwnerKey {
    fn of(o: &Owner) -> OwnerKey {
        match o {
            Owner::Instance(i) => OwnerKey::Instance(i.clone()),
            Owner::Volume { pool, name } => OwnerKey::Volume {
                pool: pool.clone(),
                name: name.clone(),
            },
        }
    }

    fn owner(self) -> Owner {
        match self {
            OwnerKey::Instance(i) => Owner::Instance(i),
            OwnerKey::Volume { pool, name } => Owner::Volume { pool, name },
        }
    }
}

/// The records of every owner; `dir` None keeps them in memory only (unit tests).
pub struct Lineage {
    dir: Option<PathBuf>,
    records: Mutex<BTreeMap<String, Record>>,
}

impl Lineage {
    pub fn new(dir: Option<PathBuf>) -> Lineage {
        Lineage {
            dir,
            records: Mutex::new(BTreeMap::new()),
        }
    }

    fn file(&self, owner: &Owner) -> Option<PathBuf> {
        let key = match owner {
            Owner::Instance(i) => format!("instance-{}", escape(i)),
            Owner::Volume { pool, name } => format!("volume-{}-{}", escape(pool), escape(name)),
        };
        self.dir.as_ref().map(|d| d.join(format!("{key}.json")))
    }

    fn load(&self, owner: &Owner) -> Record {
        let key = owner.to_string();
        if let Some(r) = lock(&self.records).get(&key) {
            return r.clone();
        }
        let rec: Record = self
            .file(owner)
            .and_then(|f| std::fs::read(&f).ok())
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        lock(&self.records).insert(key, rec.clone());
        rec
    }

    fn update(&self, owner: &Owner, f: impl FnOnce(&mut Record)) {
        let mut rec = self.load(owner);
        f(&mut rec);
        if let Some(path) = self.file(owner) {
            if let Err(e) = write_atomically(&path, &rec) {
                warn!(%owner, path = %path.display(), error = %e, "cannot record snapshot lineage");
            }
        }
        lock(&self.records).insert(owner.to_string(), rec);
    }

    /// The snapshot the live state descends from: the recorded one if it still exists, else
    /// the newest (by creation time); None without snapshots.
    pub fn current<'a>(
        &self,
        owner: &Owner,
        snaps: &'a [SnapshotInfo],
    ) -> Option<&'a SnapshotInfo> {
        let rec = self.load(owner);
        match rec.current.as_ref().and_then(|c| c.find(snaps)) {
            Some(s) => Some(s),
            None => snaps.iter().max_by_key(|s| s.created),
        }
    }

    /// The parent of `snap` (the snapshot current when it was taken), if recorded and present.
    pub fn parent<'a>(
        &self,
        owner: &Owner,
        snap: &SnapshotInfo,
        snaps: &'a [SnapshotInfo],
    ) -> Option<&'a SnapshotInfo> {
        let rec = self.load(owner);
        rec.parents.get(&snap.id)?.find(snaps)
    }

    /// A snapshot was taken while `prev` was current: it is the new current, `prev` its parent.
    pub fn created(&self, owner: &Owner, new: SnapRef, prev: Option<SnapRef>) {
        self.update(owner, |r| {
            match prev {
                Some(p) => r.parents.insert(new.id.clone(), p),
                None => r.parents.remove(&new.id),
            };
            r.current = Some(new);
        });
    }

    /// A revert to `to` is about to be asked of the backend: `current` stays as it is until
    /// [`Lineage::reverted`] (or [`Lineage::revert_failed`]).
    pub fn begin_revert(&self, owner: &Owner, to: SnapRef) {
        self.update(owner, |r| {
            r.reverting = Some(Reverting {
                to,
                owner: OwnerKey::of(owner),
            })
        });
    }

    /// The live state was reverted to `to`.
    pub fn reverted(&self, owner: &Owner, to: SnapRef) {
        self.update(owner, |r| {
            r.current = Some(to);
            r.reverting = None;
        });
    }

    /// The backend's revert failed (or never happened): `current` stays.
    pub fn revert_failed(&self, owner: &Owner) {
        self.update(owner, |r| r.reverting = None);
    }

    /// Reverts a previous daemon began and did not see end: (owner, target), from the records
    /// in the state directory.
    pub fn interrupted(&self) -> Vec<(Owner, SnapRef)> {
        let Some(dir) = &self.dir else {
            return Vec::new();
        };
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for e in entries.flatten() {
            let path = e.path();
            if path.extension().is_none_or(|x| x != "json") {
                continue;
            }
            let rec: Record = match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
            {
                Ok(r) => r,
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "unreadable lineage record");
                    continue;
                }
            };
            if let Some(r) = rec.reverting {
                out.push((r.owner.owner(), r.to));
            }
        }
        out
    }

    /// `gone` was deleted: its children now descend from its parent, and so does the live state
    /// if it descended from `gone` (as libvirt does).
    pub fn deleted(&self, owner: &Owner, gone: &SnapRef) {
        self.update(owner, |r| {
            let up = r.parents.remove(&gone.id);
            for p in r.parents.values_mut() {
                if p.id == gone.id {
                    if let Some(u) = &up {
                        *p = u.clone();
                    }
                }
            }
            r.parents.retain(|_, p| p.id != gone.id);
            if r.current.as_ref().is_some_and(|c| c.id == gone.id) {
                r.current = up;
            }
        });
    }

    /// A snapshot was renamed (its id may stay).
    pub fn renamed(&self, owner: &Owner, from: &str, to: &str) {
        self.update(owner, |r| {
            let fix = |s: &mut SnapRef| {
                if s.name == from {
                    s.name = to.to_string();
                }
            };
            r.current.iter_mut().for_each(fix);
            r.parents.values_mut().for_each(fix);
        });
    }
}

fn write_atomically(path: &std::path::Path, rec: &Record) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec_pretty(rec).unwrap_or_default())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::{Duration, SystemTime};

    fn snap(name: &str, id: &str, secs: u64) -> SnapshotInfo {
        SnapshotInfo {
            name: name.into(),
            id: id.into(),
            created: SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
            disks: vec![],
            json: Arc::new(serde_json::Value::Null),
        }
    }

    #[test]
    fn chains_survive_revert_delete_and_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let o = Owner::Volume {
            pool: "p".into(),
            name: "v".into(),
        };
        let l = Lineage::new(Some(dir.path().to_path_buf()));
        let (s1, s2, s3) = (
            snap("s1", "1", 10),
            snap("s2", "2", 20),
            snap("s3", "3", 30),
        );
        assert!(l.current(&o, &[]).is_none());
        // Without a record the newest is current.
        assert_eq!(l.current(&o, &[s1.clone(), s2.clone()]).unwrap().name, "s2");
        l.created(&o, SnapRef::of(&s1), None);
        l.created(&o, SnapRef::of(&s2), Some(SnapRef::of(&s1)));
        l.reverted(&o, SnapRef::of(&s1));
        l.created(&o, SnapRef::of(&s3), Some(SnapRef::of(&s1)));
        let all = [s1.clone(), s2.clone(), s3.clone()];
        assert_eq!(l.current(&o, &all).unwrap().name, "s3");
        assert_eq!(l.parent(&o, &s2, &all).unwrap().name, "s1");
        assert_eq!(l.parent(&o, &s3, &all).unwrap().name, "s1");
        assert!(l.parent(&o, &s1, &all).is_none());
        // A new daemon reads the same from the state directory.
        let again = Lineage::new(Some(dir.path().to_path_buf()));
        assert_eq!(again.current(&o, &all).unwrap().name, "s3");
        // Deleting s1 re-parents its children to its own parent (none).
        again.deleted(&o, &SnapRef::of(&s1));
        let left = [s2.clone(), s3.clone()];
        assert!(again.parent(&o, &s3, &left).is_none());
        // An intent left by a killed daemon is found by the next one; `current` stays until
        // the outcome is known.
        again.begin_revert(&o, SnapRef::of(&s2));
        let third = Lineage::new(Some(dir.path().to_path_buf()));
        assert_eq!(third.interrupted(), vec![(o.clone(), SnapRef::of(&s2))]);
        assert_eq!(third.current(&o, &left).unwrap().name, "s3");
        third.revert_failed(&o);
        assert!(third.interrupted().is_empty());
        third.begin_revert(&o, SnapRef::of(&s2));
        third.reverted(&o, SnapRef::of(&s2));
        assert!(third.interrupted().is_empty());
        assert_eq!(third.current(&o, &left).unwrap().name, "s2");
        again.renamed(&o, "s3", "s3b");
        assert_eq!(
            again.current(&o, &[s2, snap("s3b", "3", 30)]).unwrap().name,
            "s3b"
        );
    }
}

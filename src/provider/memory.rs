//! An in-process provider for unit tests: instances and volumes held in memory, with
//! optional delays so tests can overlap operations.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde_json::json;

use super::{LaunchInfo, ObjectInfo, Owner, Provider, SnapDisk, SnapshotInfo, VOLUME_DISK};
use crate::error::{Error, Result};
use crate::image::{BlockImage, Extent, ExtentKind};
use crate::namespace::registry::lock;

/// A disk whose bytes are a vector; zero bytes count as holes, 4 KiB at a time.
pub struct MemImage(pub Vec<u8>);

impl BlockImage for MemImage {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let start = usize::try_from(offset).map_err(|_| Error::Invalid("offset".into()))?;
        let src = self
            .0
            .get(start..start + buf.len())
            .ok_or_else(|| Error::Invalid("read past end".into()))?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn map(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        let end = (offset + length).min(self.size());
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let next = ((pos / 4096) + 1) * 4096;
            let chunk_end = next.min(end);
            let zero = self.0[pos as usize..chunk_end as usize]
                .iter()
                .all(|&b| b == 0);
            let kind = if zero {
                ExtentKind::Zero
            } else {
                ExtentKind::Data
            };
            match out.last_mut() {
                Some(l) if l.kind == kind => l.length += chunk_end - pos,
                _ => out.push(Extent {
                    offset: pos,
                    length: chunk_end - pos,
                    kind,
                }),
            }
            pos = chunk_end;
        }
        Ok(out)
    }
    fn describe(&self) -> String {
        "memory".into()
    }
}

/// A disk's target and bytes.
type Disks = Vec<(String, Vec<u8>)>;

#[derive(Default)]
struct State {
    /// owner → (live disks, snapshots: name → disks at that time)
    objects: BTreeMap<String, (Disks, BTreeMap<String, Disks>)>,
    launches: Vec<LaunchInfo>,
    next_id: u64,
}

#[derive(Default)]
pub struct MemoryProvider {
    state: Mutex<State>,
    /// How long create_snapshot takes, to make overlapping calls in tests.
    pub snapshot_delay: Duration,
    /// [`Provider::storage_keys`] per owner (none unless set).
    storage: Mutex<BTreeMap<String, Vec<String>>>,
}

fn key(owner: &Owner) -> String {
    match owner {
        Owner::Instance(n) => format!("i/{n}"),
        Owner::Volume { pool, name } => format!("v/{pool}/{name}"),
    }
}

impl MemoryProvider {
    pub fn with_delay(snapshot_delay: Duration) -> Self {
        MemoryProvider {
            state: Mutex::default(),
            snapshot_delay,
            storage: Mutex::default(),
        }
    }

    /// Say which storage `owner` lies on (shared keys make operations exclude each other).
    pub fn set_storage(&self, owner: &Owner, keys: &[&str]) {
        lock(&self.storage).insert(key(owner), keys.iter().map(|k| k.to_string()).collect());
    }

    pub fn add_instance(&self, name: &str, disks: &[(&str, Vec<u8>)]) {
        lock(&self.state).objects.insert(
            key(&Owner::Instance(name.into())),
            (
                disks
                    .iter()
                    .map(|(t, b)| (t.to_string(), b.clone()))
                    .collect(),
                BTreeMap::new(),
            ),
        );
    }

    /// The live bytes of one disk.
    pub fn live(&self, owner: &Owner, target: &str) -> Option<Vec<u8>> {
        let s = lock(&self.state);
        let (disks, _) = s.objects.get(&key(owner))?;
        disks
            .iter()
            .find(|(t, _)| t == target)
            .map(|(_, b)| b.clone())
    }

    pub fn add_volume(&self, pool: &str, name: &str, bytes: Vec<u8>) {
        let o = Owner::Volume {
            pool: pool.into(),
            name: name.into(),
        };
        lock(&self.state).objects.insert(
            key(&o),
            (vec![(VOLUME_DISK.to_string(), bytes)], BTreeMap::new()),
        );
    }

    /// Change a live disk after a snapshot, as a running guest would.
    pub fn write_live(&self, owner: &Owner, target: &str, offset: usize, data: &[u8]) {
        if let Some((disks, _)) = lock(&self.state).objects.get_mut(&key(owner)) {
            if let Some((_, b)) = disks.iter_mut().find(|(t, _)| t == target) {
                b[offset..offset + data.len()].copy_from_slice(data);
            }
        }
    }
}

impl Provider for MemoryProvider {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn pools(&self) -> Result<Vec<String>> {
        let s = lock(&self.state);
        let mut pools: Vec<String> = s
            .objects
            .keys()
            .filter_map(|k| k.strip_prefix("v/"))
            .filter_map(|k| k.split('/').next().map(String::from))
            .collect();
        pools.dedup();
        Ok(pools)
    }

    fn volumes(&self, pool: &str) -> Result<Vec<String>> {
        let prefix = format!("v/{pool}/");
        Ok(lock(&self.state)
            .objects
            .keys()
            .filter_map(|k| k.strip_prefix(&prefix).map(String::from))
            .collect())
    }

    fn instances(&self) -> Result<Vec<String>> {
        Ok(lock(&self.state)
            .objects
            .keys()
            .filter_map(|k| k.strip_prefix("i/").map(String::from))
            .collect())
    }

    fn info(&self, owner: &Owner) -> Result<ObjectInfo> {
        if !lock(&self.state).objects.contains_key(&key(owner)) {
            return Err(Error::NotFound(owner.to_string()));
        }
        Ok(ObjectInfo {
            json: json!({ "name": owner.to_string() }),
            mtime: SystemTime::UNIX_EPOCH,
        })
    }

    fn snapshots(&self, owner: &Owner) -> Result<Vec<SnapshotInfo>> {
        let s = lock(&self.state);
        let (_, snaps) = s
            .objects
            .get(&key(owner))
            .ok_or_else(|| Error::NotFound(owner.to_string()))?;
        Ok(snaps
            .iter()
            .map(|(name, disks)| SnapshotInfo {
                name: name.clone(),
                id: name.clone(),
                created: SystemTime::UNIX_EPOCH,
                disks: disks
                    .iter()
                    .map(|(t, b)| SnapDisk {
                        target: t.clone(),
                        size: b.len() as u64,
                    })
                    .collect(),
                json: Arc::new(json!({ "name": name })),
            })
            .collect())
    }

    fn storage_keys(&self, owner: &Owner) -> Result<Vec<String>> {
        Ok(lock(&self.storage)
            .get(&key(owner))
            .cloned()
            .unwrap_or_default())
    }

    fn create_snapshot(&self, owner: &Owner, name: &str) -> Result<()> {
        std::thread::sleep(self.snapshot_delay);
        let mut s = lock(&self.state);
        s.next_id += 1;
        let (disks, snaps) = s
            .objects
            .get_mut(&key(owner))
            .ok_or_else(|| Error::NotFound(owner.to_string()))?;
        let copy = disks.clone();
        snaps.insert(name.to_string(), copy);
        Ok(())
    }

    fn delete_snapshot(&self, owner: &Owner, name: &str) -> Result<()> {
        let mut s = lock(&self.state);
        if s.launches
            .iter()
            .any(|l| Owner::Instance(l.instance.clone()) == *owner && l.snapshot == name)
        {
            return Err(Error::Busy(format!(
                "a launched instance depends on {name}"
            )));
        }
        let (_, snaps) = s
            .objects
            .get_mut(&key(owner))
            .ok_or_else(|| Error::NotFound(owner.to_string()))?;
        snaps
            .remove(name)
            .map(|_| ())
            .ok_or_else(|| Error::NotFound(name.to_string()))
    }

    fn rename_snapshot(&self, owner: &Owner, from: &str, to: &str) -> Result<()> {
        let mut s = lock(&self.state);
        let (_, snaps) = s
            .objects
            .get_mut(&key(owner))
            .ok_or_else(|| Error::NotFound(owner.to_string()))?;
        let v = snaps
            .remove(from)
            .ok_or_else(|| Error::NotFound(from.to_string()))?;
        snaps.insert(to.to_string(), v);
        Ok(())
    }

    fn records_lineage(&self, _owner: &Owner) -> bool {
        true
    }

    fn revert_snapshot(&self, owner: &Owner, snap: &SnapshotInfo) -> Result<()> {
        let mut s = lock(&self.state);
        let (disks, snaps) = s
            .objects
            .get_mut(&key(owner))
            .ok_or_else(|| Error::NotFound(owner.to_string()))?;
        *disks = snaps
            .get(&snap.name)
            .cloned()
            .ok_or_else(|| Error::NotFound(snap.name.clone()))?;
        Ok(())
    }

    fn open_disk(
        &self,
        owner: &Owner,
        snap: &SnapshotInfo,
        target: &str,
    ) -> Result<Arc<dyn BlockImage>> {
        let s = lock(&self.state);
        let bytes = s
            .objects
            .get(&key(owner))
            .and_then(|(_, snaps)| snaps.get(&snap.name))
            .and_then(|d| d.iter().find(|(t, _)| t == target))
            .map(|(_, b)| b.clone())
            .ok_or_else(|| Error::NotFound(format!("{target} of {}", snap.name)))?;
        Ok(Arc::new(MemImage(bytes)))
    }

    fn launches(&self) -> Result<Vec<LaunchInfo>> {
        Ok(lock(&self.state).launches.clone())
    }

    fn launch(&self, new: &str, instance: &str, snapshot: &str) -> Result<()> {
        let mut s = lock(&self.state);
        let disks = s
            .objects
            .get(&key(&Owner::Instance(instance.into())))
            .and_then(|(_, snaps)| snaps.get(snapshot))
            .cloned()
            .ok_or_else(|| Error::NotFound(snapshot.to_string()))?;
        s.objects
            .insert(key(&Owner::Instance(new.into())), (disks, BTreeMap::new()));
        s.launches.push(LaunchInfo {
            name: new.into(),
            instance: instance.into(),
            snapshot: snapshot.into(),
        });
        Ok(())
    }

    fn forget_launch(&self, name: &str) -> Result<()> {
        let mut s = lock(&self.state);
        let before = s.launches.len();
        s.launches.retain(|l| l.name != name);
        if s.launches.len() == before {
            return Err(Error::NotFound(name.to_string()));
        }
        Ok(())
    }
}

//! Which provider owns which pool and instance, and short-lived caches of what they list.
//!
//! Listings are cached for a short TTL so `ls -l` does not ask the backend once per entry;
//! every change made through snapfs invalidates what it touched, so our own changes are
//! never seen stale.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::provider::{LaunchInfo, ObjectInfo, Owner, Provider, SnapshotInfo};

/// A map whose entries expire after `ttl`.
///
/// A load runs without the lock, so it may read the backend before a change made through
/// snapfs and finish after that change's `invalidate`: caching its answer then would bring
/// the old state back for a whole TTL (F8: a `mkdir` whose new snapshot was not found right
/// after it was made, because a listing begun before it was cached after it). So every
/// `invalidate` counts, and a load is cached only when no invalidation happened while it ran
/// (its answer is still returned to its own caller, which asked before the change ended).
struct Ttl<K, V> {
    ttl: Duration,
    map: Mutex<Cache<K, V>>,
}

struct Cache<K, V> {
    entries: HashMap<K, (Instant, V)>,
    /// Invalidations so far.
    epoch: u64,
}

impl<K: Eq + Hash + Clone, V: Clone> Ttl<K, V> {
    fn new(ttl: Duration) -> Self {
        Ttl {
            ttl,
            map: Mutex::new(Cache {
                entries: HashMap::new(),
                epoch: 0,
            }),
        }
    }

    /// The cached value, or `load()`'s, cached. The backend is called without the lock held.
    fn get(&self, key: &K, load: impl FnOnce() -> Result<V>) -> Result<V> {
        let epoch = {
            let g = lock(&self.map);
            if let Some((at, v)) = g.entries.get(key) {
                if at.elapsed() < self.ttl {
                    return Ok(v.clone());
                }
            }
            g.epoch
        };
        let v = load()?;
        let mut g = lock(&self.map);
        if g.epoch == epoch {
            g.entries.insert(key.clone(), (Instant::now(), v.clone()));
        }
        Ok(v)
    }

    fn invalidate(&self, key: &K) {
        let mut g = lock(&self.map);
        g.entries.remove(key);
        g.epoch += 1;
    }
}

/// A poisoned lock only means another request panicked; the data is still usable.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

type Index = Arc<Names>;

/// Names listed by the providers, each with the index of its provider.
pub type Names = Listed<(String, usize)>;

/// What the providers listed, and what the providers that did not answer said: one backend's
/// outage (libvirtd stopped, a remote host gone) must not take the others' entries out of the
/// tree.
pub struct Listed<T> {
    items: Vec<T>,
    /// "<kind>: <error>" of each provider whose listing failed.
    failed: Vec<String>,
}

impl<T> Default for Listed<T> {
    fn default() -> Self {
        Listed {
            items: Vec::new(),
            failed: Vec::new(),
        }
    }
}

impl<T> std::ops::Deref for Listed<T> {
    type Target = Vec<T>;
    fn deref(&self) -> &Self::Target {
        &self.items
    }
}

impl<T> Listed<T> {
    /// `what` is not among the entries: ENOENT, or EIO while a provider that might hold it
    /// did not answer.
    pub fn missing(&self, what: &str) -> Error {
        if self.failed.is_empty() {
            Error::NotFound(what.to_string())
        } else {
            Error::Backend(format!(
                "{what} not listed while a backend does not answer ({})",
                self.failed.join("; ")
            ))
        }
    }

    /// Whether every provider answered.
    pub fn complete(&self) -> bool {
        self.failed.is_empty()
    }
}

pub struct Registry {
    providers: Vec<Arc<dyn Provider>>,
    pools: Ttl<(), Index>,
    instances: Ttl<(), Index>,
    launches: Ttl<(), Arc<Listed<(LaunchInfo, usize)>>>,
    volumes: Ttl<String, Arc<Vec<String>>>,
    infos: Ttl<Owner, ObjectInfo>,
    snapshots: Ttl<Owner, Arc<Vec<SnapshotInfo>>>,
}

impl Registry {
    pub fn new(providers: Vec<Arc<dyn Provider>>, ttl: Duration) -> Self {
        Registry {
            providers,
            pools: Ttl::new(ttl),
            instances: Ttl::new(ttl),
            launches: Ttl::new(ttl),
            volumes: Ttl::new(ttl),
            infos: Ttl::new(ttl),
            snapshots: Ttl::new(ttl),
        }
    }

    /// What every provider lists, each entry with its provider's index. A provider whose
    /// listing fails is left out (and noted, so a lookup of a name not found is EIO, not
    /// ENOENT); only when every provider fails is the listing an error.
    fn gather<T>(
        &self,
        what: &str,
        list: impl Fn(&dyn Provider) -> Result<Vec<T>>,
    ) -> Result<Listed<(T, usize)>> {
        let mut out = Vec::new();
        let mut failed = Vec::new();
        let mut first_err = None;
        for (i, p) in self.providers.iter().enumerate() {
            match list(p.as_ref()) {
                Ok(items) => out.extend(items.into_iter().map(|x| (x, i))),
                Err(e) => {
                    // Once per provider and error (rate-limited): an outage may last hours.
                    crate::input_warn!(
                        p.kind(),
                        "listing {what} failed, its entries are left out until it answers: {e}"
                    );
                    failed.push(format!("{}: {e}", p.kind()));
                    first_err.get_or_insert(e);
                }
            }
        }
        if failed.len() == self.providers.len() {
            if let Some(e) = first_err {
                return Err(e);
            }
        }
        Ok(Listed { items: out, failed })
    }

    /// Names from every provider (see [`Registry::gather`]); a name two providers both have
    /// goes to the first.
    fn index(
        &self,
        what: &str,
        list: impl Fn(&dyn Provider) -> Result<Vec<String>>,
    ) -> Result<Index> {
        let all = self.gather(what, list)?;
        let mut seen = std::collections::HashSet::new();
        let mut names = Vec::new();
        for (name, i) in all.items {
            if seen.insert(name.clone()) {
                names.push((name, i));
            } else {
                let kind = self.providers.get(i).map_or("?", |p| p.kind());
                crate::input_warn!(
                    kind,
                    "name {} already taken by another provider; hidden",
                    crate::log_limit::esc_str(&name)
                );
            }
        }
        Ok(Arc::new(Listed {
            items: names,
            failed: all.failed,
        }))
    }

    pub fn pools(&self) -> Result<Index> {
        self.pools.get(&(), || self.index("pools", |p| p.pools()))
    }

    pub fn instances(&self) -> Result<Index> {
        self.instances
            .get(&(), || self.index("instances", |p| p.instances()))
    }

    /// The launches of every provider that answered (see [`Registry::gather`]).
    pub fn launches(&self) -> Result<Arc<Listed<(LaunchInfo, usize)>>> {
        self.launches.get(&(), || {
            Ok(Arc::new(self.gather("launches", |p| p.launches())?))
        })
    }

    pub fn volumes(&self, pool: &str) -> Result<Arc<Vec<String>>> {
        let p = self.pool_provider(pool)?;
        self.volumes
            .get(&pool.to_string(), || Ok(Arc::new(p.volumes(pool)?)))
    }

    fn pool_provider(&self, pool: &str) -> Result<&Arc<dyn Provider>> {
        let idx = self.pools()?;
        let i = idx
            .iter()
            .find(|(n, _)| n == pool)
            .map(|(_, i)| *i)
            .ok_or_else(|| idx.missing(&format!("pool {pool}")))?;
        self.providers
            .get(i)
            .ok_or_else(|| Error::NotFound(format!("pool {pool}")))
    }

    /// The provider that owns an existing instance or volume; `NotFound` when it does not exist.
    pub fn provider(&self, owner: &Owner) -> Result<&Arc<dyn Provider>> {
        match owner {
            Owner::Instance(name) => {
                let idx = self.instances()?;
                let Some(i) = idx.iter().find(|(n, _)| n == name).map(|(_, i)| *i) else {
                    // A host that does not answer: EIO rather than ENOENT.
                    if let Some(e) = self.providers.iter().find_map(|p| p.unavailable(owner)) {
                        return Err(e);
                    }
                    return Err(idx.missing(&owner.to_string()));
                };
                self.providers
                    .get(i)
                    .ok_or_else(|| Error::NotFound(owner.to_string()))
            }
            Owner::Volume { pool, name } => {
                if !self.volumes(pool)?.iter().any(|v| v == name) {
                    return Err(Error::NotFound(owner.to_string()));
                }
                self.pool_provider(pool)
            }
        }
    }

    /// The provider with index `i`, as handed out by `launches()`.
    pub fn provider_at(&self, i: usize) -> Result<&Arc<dyn Provider>> {
        self.providers
            .get(i)
            .ok_or_else(|| Error::Backend(format!("no provider {i}")))
    }

    pub fn providers(&self) -> &[Arc<dyn Provider>] {
        &self.providers
    }

    pub fn info(&self, owner: &Owner) -> Result<ObjectInfo> {
        let p = self.provider(owner)?;
        self.infos.get(owner, || p.info(owner))
    }

    pub fn snapshots(&self, owner: &Owner) -> Result<Arc<Vec<SnapshotInfo>>> {
        let p = self.provider(owner)?;
        self.snapshots
            .get(owner, || Ok(Arc::new(p.snapshots(owner)?)))
    }

    pub fn snapshot(&self, owner: &Owner, name: &str) -> Result<SnapshotInfo> {
        self.snapshots(owner)?
            .iter()
            .find(|s| s.name == name)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("snapshot {name} of {owner}")))
    }

    /// Forget what we know of `owner` after changing it.
    pub fn changed(&self, owner: &Owner) {
        self.snapshots.invalidate(owner);
        self.infos.invalidate(owner);
    }

    /// Forget the instance and launch lists after a launch or a forgotten launch.
    pub fn instances_changed(&self) {
        self.instances.invalidate(&());
        self.launches.invalidate(&());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::BlockImage;
    use crate::provider::memory::MemoryProvider;

    /// A control plane that does not answer (libvirtd stopped, a host gone).
    struct Down;

    impl Provider for Down {
        fn kind(&self) -> &'static str {
            "down"
        }
        fn pools(&self) -> Result<Vec<String>> {
            Err(Error::Backend("connecting: no such socket".into()))
        }
        fn instances(&self) -> Result<Vec<String>> {
            Err(Error::Backend("connecting: no such socket".into()))
        }
        fn launches(&self) -> Result<Vec<LaunchInfo>> {
            Err(Error::Backend("connecting: no such socket".into()))
        }
        fn info(&self, owner: &Owner) -> Result<ObjectInfo> {
            Err(Error::NotFound(owner.to_string()))
        }
        fn snapshots(&self, owner: &Owner) -> Result<Vec<SnapshotInfo>> {
            Err(Error::NotFound(owner.to_string()))
        }
        fn create_snapshot(&self, owner: &Owner, _: &str) -> Result<()> {
            Err(Error::NotFound(owner.to_string()))
        }
        fn delete_snapshot(&self, owner: &Owner, _: &str) -> Result<()> {
            Err(Error::NotFound(owner.to_string()))
        }
        fn open_disk(
            &self,
            owner: &Owner,
            _: &SnapshotInfo,
            _: &str,
        ) -> Result<Arc<dyn BlockImage>> {
            Err(Error::NotFound(owner.to_string()))
        }
    }

    #[test]
    fn one_provider_down_leaves_the_others_names_and_makes_misses_eio() {
        let mem = MemoryProvider::with_delay(Duration::ZERO);
        mem.add_volume("pool", "vol", vec![0; 512]);
        mem.add_instance("web", &[("vda", vec![0; 512])]);
        let reg = Registry::new(vec![Arc::new(Down), Arc::new(mem)], Duration::ZERO);
        // The answering provider's names are all there.
        let pools = reg.pools().unwrap();
        assert_eq!(
            pools.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
            ["pool"]
        );
        assert!(!pools.complete());
        let vol = Owner::Volume {
            pool: "pool".into(),
            name: "vol".into(),
        };
        assert!(reg.provider(&vol).is_ok());
        assert!(reg.provider(&Owner::Instance("web".into())).is_ok());
        // A name nobody listed may be the silent provider's: EIO, not ENOENT.
        assert!(matches!(
            reg.provider(&Owner::Instance("db".into())),
            Err(Error::Backend(m)) if m.contains("does not answer")
        ));
        // Every provider down: the listing is the error, as before.
        let alone = Registry::new(vec![Arc::new(Down)], Duration::ZERO);
        assert!(matches!(alone.instances(), Err(Error::Backend(_))));
        // All answering: a miss is ENOENT.
        let up = Registry::new(
            vec![Arc::new(MemoryProvider::with_delay(Duration::ZERO))],
            Duration::ZERO,
        );
        assert!(matches!(
            up.provider(&Owner::Instance("db".into())),
            Err(Error::NotFound(_))
        ));
    }

    #[test]
    fn one_provider_down_leaves_the_others_launches_and_makes_misses_eio() {
        let mem = MemoryProvider::with_delay(Duration::ZERO);
        mem.add_instance("web", &[("vda", vec![0; 512])]);
        mem.create_snapshot(&Owner::Instance("web".into()), "s1")
            .unwrap();
        mem.launch("copy", "web", "s1").unwrap();
        let reg = Registry::new(vec![Arc::new(Down), Arc::new(mem)], Duration::ZERO);
        let launches = reg.launches().unwrap();
        assert_eq!(
            launches
                .iter()
                .map(|(l, i)| (l.name.as_str(), *i))
                .collect::<Vec<_>>(),
            [("copy", 1)]
        );
        assert!(!launches.complete());
        assert!(matches!(
            launches.missing("launch other"),
            Error::Backend(m) if m.contains("does not answer")
        ));
        // Every provider down: the listing is the error.
        let alone = Registry::new(vec![Arc::new(Down)], Duration::ZERO);
        assert!(matches!(alone.launches(), Err(Error::Backend(_))));
        // All answering: complete, a miss is ENOENT.
        let up = Registry::new(
            vec![Arc::new(MemoryProvider::with_delay(Duration::ZERO))],
            Duration::ZERO,
        );
        let l = up.launches().unwrap();
        assert!(l.complete());
        assert!(matches!(l.missing("launch other"), Error::NotFound(_)));
    }

    /// A provider whose snapshot listing reads its state, then waits to be let go: a listing
    /// that began before a change and ends after it.
    struct Gated {
        snaps: Mutex<Vec<String>>,
        /// When set, the next listing reports on `read` once it has read, then waits on `go`.
        gate: Mutex<Option<(std::sync::mpsc::Sender<()>, std::sync::mpsc::Receiver<()>)>>,
    }

    impl Provider for Gated {
        fn kind(&self) -> &'static str {
            "gated"
        }
        fn pools(&self) -> Result<Vec<String>> {
            Ok(vec!["pool".into()])
        }
        fn volumes(&self, _: &str) -> Result<Vec<String>> {
            Ok(vec!["vol".into()])
        }
        fn info(&self, owner: &Owner) -> Result<ObjectInfo> {
            Err(Error::NotFound(owner.to_string()))
        }
        fn snapshots(&self, _: &Owner) -> Result<Vec<SnapshotInfo>> {
            let names = lock(&self.snaps).clone();
            let gate = lock(&self.gate).take();
            if let Some((read, go)) = gate {
                let _ = read.send(());
                let _ = go.recv();
            }
            Ok(names
                .into_iter()
                .map(|n| SnapshotInfo {
                    id: n.clone(),
                    name: n,
                    created: std::time::UNIX_EPOCH,
                    disks: Vec::new(),
                    json: Arc::new(serde_json::Value::Null),
                })
                .collect())
        }
        fn create_snapshot(&self, _: &Owner, name: &str) -> Result<()> {
            lock(&self.snaps).push(name.to_string());
            Ok(())
        }
        fn delete_snapshot(&self, owner: &Owner, _: &str) -> Result<()> {
            Err(Error::NotFound(owner.to_string()))
        }
        fn open_disk(
            &self,
            owner: &Owner,
            _: &SnapshotInfo,
            _: &str,
        ) -> Result<Arc<dyn BlockImage>> {
            Err(Error::NotFound(owner.to_string()))
        }
    }

    /// F8: a listing begun before a snapshot was made and finished after the registry was told
    /// of the change must not be cached: the new snapshot is found right after its mkdir.
    #[test]
    fn a_listing_begun_before_a_change_is_not_cached_after_it() {
        let (read_tx, read_rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel();
        let gated = Arc::new(Gated {
            snaps: Mutex::new(vec!["c1".into()]),
            gate: Mutex::new(Some((read_tx, go_rx))),
        });
        let reg = Arc::new(Registry::new(
            vec![gated.clone() as Arc<dyn Provider>],
            Duration::from_secs(3600),
        ));
        let vol = Owner::Volume {
            pool: "pool".into(),
            name: "vol".into(),
        };
        let (r2, v2) = (reg.clone(), vol.clone());
        let early = std::thread::spawn(move || r2.snapshots(&v2).map(|s| s.len()));
        // The early listing has read the old state ...
        read_rx.recv().unwrap();
        // ... the snapshot is made and the registry told, as mkdir does ...
        gated.create_snapshot(&vol, "c7").unwrap();
        reg.changed(&vol);
        // ... and then the early listing ends, with the old state, which its caller gets.
        go_tx.send(()).unwrap();
        assert_eq!(early.join().unwrap().unwrap(), 1);
        // The lookup after the mkdir sees the new snapshot.
        assert!(
            reg.snapshot(&vol, "c7").is_ok(),
            "the stale listing was cached after the change"
        );
        // And a listing with no change during it is cached (the backend is not asked again).
        lock(&gated.snaps).push("c8".into());
        assert!(reg.snapshot(&vol, "c8").is_err());
    }
}

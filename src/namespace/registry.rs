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
struct Ttl<K, V> {
    ttl: Duration,
    map: Mutex<HashMap<K, (Instant, V)>>,
}

impl<K: Eq + Hash + Clone, V: Clone> Ttl<K, V> {
    fn new(ttl: Duration) -> Self {
        Ttl {
            ttl,
            map: Mutex::new(HashMap::new()),
        }
    }

    /// The cached value, or `load()`'s, cached. The backend is called without the lock held.
    fn get(&self, key: &K, load: impl FnOnce() -> Result<V>) -> Result<V> {
        if let Some((at, v)) = lock(&self.map).get(key) {
            if at.elapsed() < self.ttl {
                return Ok(v.clone());
            }
        }
        let v = load()?;
        lock(&self.map).insert(key.clone(), (Instant::now(), v.clone()));
        Ok(v)
    }

    fn invalidate(&self, key: &K) {
        lock(&self.map).remove(key);
    }
}

/// A poisoned lock only means another request panicked; the data is still usable.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

type Index = Arc<Names>;

/// Names listed by the providers, each with the index of its provider, and what the
/// providers that did not answer said: one backend's outage (libvirtd stopped, a remote host
/// gone) must not take the others' names out of the tree.
#[derive(Default)]
pub struct Names {
    names: Vec<(String, usize)>,
    /// "<kind>: <error>" of each provider whose listing failed.
    failed: Vec<String>,
}

impl std::ops::Deref for Names {
    type Target = Vec<(String, usize)>;
    fn deref(&self) -> &Self::Target {
        &self.names
    }
}

impl Names {
    /// `what` is not among the names: ENOENT, or EIO while a provider that might hold it did
    /// not answer.
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
    launches: Ttl<(), Arc<Vec<(LaunchInfo, usize)>>>,
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

    /// Names from every provider; a name two providers both have goes to the first. A
    /// provider whose listing fails is left out (and noted, so a lookup of a name not found
    /// is EIO, not ENOENT); only when every provider fails is the listing an error.
    fn index(&self, list: impl Fn(&dyn Provider) -> Result<Vec<String>>) -> Result<Index> {
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        let mut failed = Vec::new();
        let mut first_err = None;
        for (i, p) in self.providers.iter().enumerate() {
            let names = match list(p.as_ref()) {
                Ok(names) => names,
                Err(e) => {
                    tracing::warn!(provider = p.kind(), error = %e, "listing failed: its names are left out until it answers");
                    failed.push(format!("{}: {e}", p.kind()));
                    first_err.get_or_insert(e);
                    continue;
                }
            };
            for name in names {
                if seen.insert(name.clone()) {
                    out.push((name, i));
                } else {
                    crate::input_warn!(
                        p.kind(),
                        "name {} already taken by another provider; hidden",
                        crate::log_limit::esc_str(&name)
                    );
                }
            }
        }
        if failed.len() == self.providers.len() {
            if let Some(e) = first_err {
                return Err(e);
            }
        }
        Ok(Arc::new(Names { names: out, failed }))
    }

    pub fn pools(&self) -> Result<Index> {
        self.pools.get(&(), || self.index(|p| p.pools()))
    }

    pub fn instances(&self) -> Result<Index> {
        self.instances.get(&(), || self.index(|p| p.instances()))
    }

    pub fn launches(&self) -> Result<Arc<Vec<(LaunchInfo, usize)>>> {
        self.launches.get(&(), || {
            let mut out = Vec::new();
            for (i, p) in self.providers.iter().enumerate() {
                out.extend(p.launches()?.into_iter().map(|l| (l, i)));
            }
            Ok(Arc::new(out))
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
}

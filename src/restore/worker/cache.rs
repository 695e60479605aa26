//! What the daemon keeps of its workers' answers (attributes, file maps, listings, lookups and
//! xattr lists read ahead), for every volume in one least-recently-used cache with one byte
//! budget (`--restore-worker-cache-mb`, [`super::WorkerConfig::cache_bytes`]): a hundred open
//! volumes take no more than one. Each entry is charged what it costs on the heap (estimated
//! from its lengths, allocator overhead included). When the total passes the budget, the
//! volume holding the most gives up its least recently used entries first, so a volume walked
//! hard (a `find` of a million names) cannot push out what the other volumes keep: it ends
//! with what they leave, and each of them keeps up to an equal share. An entry larger than an
//! eighth of the budget is not kept (it would empty the cache for itself).

use std::collections::HashMap;
use std::mem::size_of;
use std::sync::{Arc, Mutex, OnceLock};

use super::{Attrs, Listing, Mapped, PageWindow, XattrList};
use crate::restore::MapRun;

/// A cached answer's key: the volume's number ([`super::WorkerFs::id`]) first.
#[derive(Clone, PartialEq, Eq, Hash)]
pub(super) enum Key {
    Stat(u64, u64),
    Map(u64, u64),
    Listing(u64, u64),
    /// (volume, directory): the last page(s) of a paged directory ([`PageWindow`]).
    Window(u64, u64),
    /// (volume, directory, name): a lookup answered ahead of the kernel's request.
    Looked(u64, u64, Vec<u8>),
    Xattrs(u64, u64),
}

impl Key {
    fn volume(&self) -> u64 {
        match self {
            Key::Stat(v, _)
            | Key::Map(v, _)
            | Key::Listing(v, _)
            | Key::Window(v, _)
            | Key::Looked(v, _, _)
            | Key::Xattrs(v, _) => *v,
        }
    }
}

#[derive(Clone)]
pub(super) enum Entry {
    Attrs(Attrs),
    Map(Arc<Mapped>),
    Listing(Arc<Listing>),
    Window(Arc<PageWindow>),
    Xattrs(Arc<XattrList>),
}

/// Heap bytes of one allocation of `n` bytes: glibc's header and 16-byte rounding.
fn alloc(n: usize) -> usize {
    if n == 0 {
        0
    } else {
        (n + 8).div_ceil(16) * 16
    }
}

/// One cache slot besides what its key and value point to: the `lru` crate's node (key, value,
/// two links) in an allocation of its own, and the hash table's pointer and control byte at
/// its load factor.
const SLOT: usize = size_of::<Key>() + size_of::<Entry>() + size_of::<usize>() + 2 * 8;
const TABLE: usize = 16;

/// What keeping `entry` under `key` costs, in bytes.
pub(super) fn cost(key: &Key, entry: &Entry) -> usize {
    let key_heap = match key {
        Key::Looked(_, _, name) => alloc(name.len()),
        _ => 0,
    };
    let value_heap = match entry {
        Entry::Attrs(_) => 0,
        Entry::Map(m) => {
            alloc(size_of::<Mapped>() + 16)
                + match m.as_ref() {
                    Mapped::No => 0,
                    Mapped::Window { map, .. } => alloc(map.runs.len() * size_of::<MapRun>()),
                }
        }
        Entry::Listing(l) => listing_cost(l),
        Entry::Window(w) => window_cost(w),
        Entry::Xattrs(x) => {
            alloc(x.len() * size_of::<(Vec<u8>, Vec<u8>)>())
                + x.iter()
                    .map(|(k, v)| alloc(k.len()) + alloc(v.len()))
                    .sum::<usize>()
        }
    };
    alloc(SLOT) + TABLE + key_heap + value_heap
}

/// A listing and the name index it gets on its first lookup (charged up front): each name
/// twice, the entries, and the index's table at its load factor (7/8).
fn listing_cost(l: &Listing) -> usize {
    let entry = size_of::<(Vec<u8>, u64, crate::restore::FileKind)>();
    let slot = (size_of::<(Vec<u8>, u32)>() + 1) * 8 / 7 + 1;
    alloc(size_of::<Listing>() + 16)
        + alloc(16 + l.list.len() * entry)
        + alloc(l.list.len().next_power_of_two() * slot * 8 / 7)
        + l.list
            .iter()
            .map(|(n, _, _)| 2 * alloc(n.len()))
            .sum::<usize>()
}

/// A page window and the name index it gets on its first lookup (charged up front), as
/// [`listing_cost`] with each entry's cookie.
fn window_cost(w: &PageWindow) -> usize {
    let entry = size_of::<(Vec<u8>, u64, crate::restore::FileKind, u64)>();
    let slot = (size_of::<(Vec<u8>, u32)>() + 1) * 8 / 7 + 1;
    alloc(size_of::<PageWindow>() + 16)
        + alloc(w.entries.len() * entry)
        + alloc(w.entries.len().next_power_of_two() * slot * 8 / 7)
        + w.entries
            .iter()
            .map(|(n, _, _, _)| 2 * alloc(n.len()))
            .sum::<usize>()
}

/// Entries of every volume: one least-recently-used list per volume, one budget for all.
pub(super) struct Cache {
    inner: Mutex<Inner>,
}

struct Inner {
    vols: HashMap<u64, Volume>,
    bytes: usize,
    budget: usize,
}

struct Volume {
    lru: lru::LruCache<Key, (Entry, usize)>,
    bytes: usize,
}

impl Inner {
    fn take(&mut self, key: &Key) -> Option<Entry> {
        let v = key.volume();
        let vol = self.vols.get_mut(&v)?;
        let (e, n) = vol.lru.pop(key)?;
        vol.bytes -= n;
        self.bytes -= n;
        if vol.lru.is_empty() {
            self.vols.remove(&v);
        }
        Some(e)
    }

    /// Drop the least recently used entry of the volume holding the most; false when empty.
    fn evict_one(&mut self) -> bool {
        let Some((&v, _)) = self.vols.iter().max_by_key(|(_, vol)| vol.bytes) else {
            return false;
        };
        let Some(vol) = self.vols.get_mut(&v) else {
            return false;
        };
        if let Some((_, (_, n))) = vol.lru.pop_lru() {
            vol.bytes -= n;
            self.bytes -= n;
        }
        if vol.lru.is_empty() {
            self.vols.remove(&v);
        }
        true
    }
}

impl Cache {
    pub(super) fn new(budget: usize) -> Cache {
        Cache {
            inner: Mutex::new(Inner {
                vols: HashMap::new(),
                bytes: 0,
                budget,
            }),
        }
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn get(&self, key: &Key) -> Option<Entry> {
        let mut c = self.inner();
        let vol = c.vols.get_mut(&key.volume())?;
        vol.lru.get(key).map(|(e, _)| e.clone())
    }

    /// Taken out (a lookup read ahead is used once).
    pub(super) fn pop(&self, key: &Key) -> Option<Entry> {
        self.inner().take(key)
    }

    /// Keep `entry` (replacing what `key` held), then drop entries, the largest volume's least
    /// recently used first, until the total is within the budget.
    pub(super) fn put(&self, key: Key, entry: Entry) {
        let n = cost(&key, &entry);
        let mut c = self.inner();
        c.take(&key);
        if n > c.budget / 8 {
            return;
        }
        let vol = c.vols.entry(key.volume()).or_insert_with(|| Volume {
            lru: lru::LruCache::unbounded(),
            bytes: 0,
        });
        vol.lru.push(key, (entry, n));
        vol.bytes += n;
        c.bytes += n;
        while c.bytes > c.budget && c.evict_one() {}
    }

    /// Drop every entry of volume `vol` (closed).
    pub(super) fn forget_volume(&self, vol: u64) {
        let mut c = self.inner();
        if let Some(v) = c.vols.remove(&vol) {
            c.bytes -= v.bytes;
        }
    }

    /// (entries, bytes charged), for tests and figures.
    pub(super) fn usage(&self) -> (usize, usize) {
        let c = self.inner();
        (c.vols.values().map(|v| v.lru.len()).sum(), c.bytes)
    }
}

static CACHE: OnceLock<Cache> = OnceLock::new();

/// The daemon's one cache, with the budget configured ([`super::configure`]).
pub(super) fn global() -> &'static Cache {
    CACHE.get_or_init(|| Cache::new(super::config().cache_bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xattrs(len: usize) -> Entry {
        Entry::Xattrs(Arc::new(vec![(b"user.k".to_vec(), vec![0u8; len])]))
    }

    /// A volume walked hard does not push out what another volume keeps: the one holding the
    /// most gives up entries first (a single least-recently-used list would have dropped the
    /// quiet volume's entries, the oldest, first). The total stays within the budget.
    #[test]
    fn the_volume_holding_the_most_gives_up_first() {
        let c = Cache::new(64 << 10);
        for ino in 0..8 {
            c.put(Key::Xattrs(1, ino), xattrs(1000));
        }
        for ino in 0..10_000 {
            c.put(Key::Xattrs(2, ino), xattrs(1000));
            assert!(c.usage().1 <= 64 << 10);
        }
        for ino in 0..8 {
            assert!(c.get(&Key::Xattrs(1, ino)).is_some(), "volume 1 lost {ino}");
        }
        assert!(c.get(&Key::Xattrs(2, 9_999)).is_some());
        assert!(c.get(&Key::Xattrs(2, 0)).is_none());
        // A closed volume's entries go, and its bytes with them.
        let before = c.usage().1;
        c.forget_volume(1);
        assert!(c.usage().1 < before);
        assert!(c.get(&Key::Xattrs(1, 0)).is_none());
        // An entry over an eighth of the budget is not kept, and replaces nothing stale.
        c.put(Key::Xattrs(3, 1), xattrs(100));
        c.put(Key::Xattrs(3, 1), xattrs(9 << 10));
        assert!(c.get(&Key::Xattrs(3, 1)).is_none());
    }

    /// Each volume keeps up to an equal share when all are busy.
    #[test]
    fn busy_volumes_share_the_budget() {
        let c = Cache::new(64 << 10);
        for ino in 0..2_000 {
            for v in 1..=4 {
                c.put(Key::Xattrs(v, ino), xattrs(1000));
            }
        }
        let inner = c.inner();
        let shares: Vec<usize> = (1..=4).map(|v| inner.vols[&v].bytes).collect();
        let (lo, hi) = (shares.iter().min().unwrap(), shares.iter().max().unwrap());
        assert!(hi - lo <= 2048, "unequal shares: {shares:?}");
    }
}

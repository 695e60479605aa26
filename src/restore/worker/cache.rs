//! What the daemon keeps of its workers' answers (attributes, file maps, listings, lookups and
//! xattr lists read ahead), for every volume in one least-recently-used cache with one byte
//! budget (`--restore-worker-cache-mb`, [`super::WorkerConfig::cache_bytes`]): a hundred open
//! volumes take no more than one. Each entry is charged what it costs on the heap (estimated
//! from its lengths, allocator overhead included); the least recently used entries of any
//! volume go first when the total passes the budget. An entry larger than an eighth of the
//! budget is not kept (it would empty the cache for itself).

use std::mem::size_of;
use std::sync::{Arc, Mutex, OnceLock};

use super::{Attrs, Listing, Mapped, XattrList};
use crate::restore::MapRun;

/// A cached answer's key: the volume's number ([`super::WorkerFs::id`]) first.
#[derive(Clone, PartialEq, Eq, Hash)]
pub(super) enum Key {
    Stat(u64, u64),
    Map(u64, u64),
    Listing(u64, u64),
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

/// Entries of every volume, least recently used first out.
pub(super) struct Cache {
    inner: Mutex<Inner>,
}

struct Inner {
    lru: lru::LruCache<Key, (Entry, usize)>,
    bytes: usize,
    budget: usize,
}

impl Cache {
    pub(super) fn new(budget: usize) -> Cache {
        Cache {
            inner: Mutex::new(Inner {
                lru: lru::LruCache::unbounded(),
                bytes: 0,
                budget,
            }),
        }
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn get(&self, key: &Key) -> Option<Entry> {
        self.inner().lru.get(key).map(|(e, _)| e.clone())
    }

    /// Taken out (a lookup read ahead is used once).
    pub(super) fn pop(&self, key: &Key) -> Option<Entry> {
        let mut c = self.inner();
        let (e, n) = c.lru.pop(key)?;
        c.bytes -= n;
        Some(e)
    }

    /// Keep `entry` (replacing what `key` held), then drop the least recently used entries
    /// until the total is within the budget.
    pub(super) fn put(&self, key: Key, entry: Entry) {
        let n = cost(&key, &entry);
        let mut c = self.inner();
        if n > c.budget / 8 {
            if let Some((_, old)) = c.lru.pop(&key) {
                c.bytes -= old;
            }
            return;
        }
        c.bytes += n;
        if let Some((_, (_, old))) = c.lru.push(key, (entry, n)) {
            c.bytes -= old;
        }
        while c.bytes > c.budget {
            match c.lru.pop_lru() {
                Some((_, (_, old))) => c.bytes -= old,
                None => break,
            }
        }
    }

    /// Drop every entry of volume `vol` (closed).
    pub(super) fn forget_volume(&self, vol: u64) {
        let mut c = self.inner();
        let keys: Vec<Key> = c
            .lru
            .iter()
            .filter(|(k, _)| k.volume() == vol)
            .map(|(k, _)| k.clone())
            .collect();
        for k in keys {
            if let Some((_, n)) = c.lru.pop(&k) {
                c.bytes -= n;
            }
        }
    }

    /// (entries, bytes charged), for tests and figures.
    pub(super) fn usage(&self) -> (usize, usize) {
        let c = self.inner();
        (c.lru.len(), c.bytes)
    }
}

static CACHE: OnceLock<Cache> = OnceLock::new();

/// The daemon's one cache, with the budget configured ([`super::configure`]).
pub(super) fn global() -> &'static Cache {
    CACHE.get_or_init(|| Cache::new(super::config().cache_bytes))
}

//! One byte budget shared by every image of the daemon: L2 tables and decompressed
//! clusters, keyed by (image id, kind, host offset).
//!
//! Fair shares: each image id belongs to a group (the volume whose FUSE request opened it,
//! [`BlockCache::with_group`]; else the image alone), each group has its own least recently
//! used list, and when the budget is passed the group holding the most gives up its least
//! recently used buffer first. A volume read hard (a hostile chain whose every read misses)
//! then ends with what the others leave, and each of the others keeps up to an equal share,
//! as in the restore workers' cache (`restore/worker/cache.rs`).

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use lru::LruCache;

use crate::error::Result;

/// Default budget when the caller has no opinion: 64 MiB.
pub const DEFAULT_BUDGET: usize = 64 << 20;

/// What a cached buffer holds; part of the key so a corrupt image cannot alias two kinds.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum CacheKind {
    L2Table,
    Decompressed,
    /// A chunk of an RBD snapshot read ahead for a sequential reader (offset = chunk start).
    ReadAhead,
    /// A block of a remote host's file (offset = block start).
    Remote,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct CacheKey {
    /// From [`BlockCache::new_image_id`]: unique per opened host file, never reused.
    pub image: u64,
    pub kind: CacheKind,
    /// Host offset of the table or compressed cluster in that file.
    pub offset: u64,
}

/// The fairness group of an image id: its upper 32 bits ([`BlockCache::new_image_id`]).
fn group_of(image: u64) -> u32 {
    (image >> 32) as u32
}

/// One group's buffers, least recently used first out.
struct Group {
    lru: LruCache<CacheKey, Arc<Vec<u8>>>,
    used: usize,
}

struct Inner {
    groups: HashMap<u32, Group>,
    used: usize,
    len: usize,
}

impl Inner {
    fn get(&mut self, key: &CacheKey) -> Option<Arc<Vec<u8>>> {
        self.groups
            .get_mut(&group_of(key.image))?
            .lru
            .get(key)
            .cloned()
    }

    fn pop(&mut self, key: &CacheKey) -> Option<Arc<Vec<u8>>> {
        let g = group_of(key.image);
        let group = self.groups.get_mut(&g)?;
        let v = group.lru.pop(key)?;
        group.used -= v.len();
        self.used -= v.len();
        self.len -= 1;
        if group.lru.is_empty() {
            self.groups.remove(&g);
        }
        Some(v)
    }

    fn put(&mut self, key: CacheKey, value: Arc<Vec<u8>>) {
        let len = value.len();
        let group = self
            .groups
            .entry(group_of(key.image))
            .or_insert_with(|| Group {
                lru: LruCache::unbounded(),
                used: 0,
            });
        match group.lru.put(key, value) {
            Some(old) => {
                group.used -= old.len();
                self.used -= old.len();
            }
            None => self.len += 1,
        }
        group.used += len;
        self.used += len;
    }

    /// Drop the least recently used buffer of the group holding the most; false when empty.
    fn evict_one(&mut self) -> bool {
        let Some((&g, _)) = self.groups.iter().max_by_key(|(_, group)| group.used) else {
            return false;
        };
        let Some(group) = self.groups.get_mut(&g) else {
            return false;
        };
        if let Some((_, v)) = group.lru.pop_lru() {
            group.used -= v.len();
            self.used -= v.len();
            self.len -= 1;
        }
        if group.lru.is_empty() {
            self.groups.remove(&g);
        }
        true
    }
}

thread_local! {
    /// The group images opened on this thread join ([`BlockCache::with_group`]).
    static GROUP: Cell<Option<u32>> = const { Cell::new(None) };
}

pub struct BlockCache {
    /// Most bytes of buffers kept at once.
    pub budget: usize,
    inner: Mutex<Inner>,
}

static NEXT_IMAGE_ID: AtomicU64 = AtomicU64::new(1);

impl BlockCache {
    pub fn new(budget_bytes: usize) -> Self {
        BlockCache {
            budget: budget_bytes,
            inner: Mutex::new(Inner {
                groups: HashMap::new(),
                used: 0,
                len: 0,
            }),
        }
    }

    /// A fresh id for one opened host file; ids are never reused (for 2^32 opens of one
    /// group), so stale entries just age out. Its upper 32 bits are its fairness group: the
    /// one [`Self::with_group`] set on this thread, else the image's own sequence number.
    pub fn new_image_id() -> u64 {
        let seq = NEXT_IMAGE_ID.fetch_add(1, Ordering::Relaxed) as u32;
        let group = GROUP.with(|g| g.get()).unwrap_or(seq);
        (u64::from(group) << 32) | u64::from(seq)
    }

    /// Run `f` with images opened on this thread in fairness group `group` (the FUSE request's
    /// volume, [`crate::fairness`]); the previous group is restored after.
    pub fn with_group<T>(group: u32, f: impl FnOnce() -> T) -> T {
        struct Restore(Option<u32>);
        impl Drop for Restore {
            fn drop(&mut self) {
                GROUP.with(|g| g.set(self.0));
            }
        }
        let _restore = Restore(GROUP.with(|g| g.replace(Some(group))));
        f()
    }

    /// Bytes held by each group (for tests and reports).
    pub fn group_usage(&self) -> Vec<(u32, usize)> {
        let inner = self.lock();
        inner
            .groups
            .iter()
            .map(|(&g, group)| (g, group.used))
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the LRU inconsistent, so poisoning is ignored.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, key: &CacheKey) -> Option<Arc<Vec<u8>>> {
        self.lock().get(key)
    }

    /// Keep `value`, then evict buffers (the largest group's least recently used first)
    /// until the budget holds.
    pub fn insert(&self, key: CacheKey, value: Arc<Vec<u8>>) {
        let len = value.len();
        if len > self.budget {
            return;
        }
        let mut inner = self.lock();
        inner.put(key, value);
        while inner.used > self.budget {
            if !inner.evict_one() {
                break;
            }
        }
    }

    /// The cached buffer, or `load()`'s result inserted; `load` runs without the lock held.
    pub fn get_or_load(
        &self,
        key: CacheKey,
        load: impl FnOnce() -> Result<Vec<u8>>,
    ) -> Result<Arc<Vec<u8>>> {
        if let Some(v) = self.get(&key) {
            return Ok(v);
        }
        let v = Arc::new(load()?);
        self.insert(key, v.clone());
        Ok(v)
    }

    /// Take one buffer out (a read-ahead chunk its readers have finished with).
    pub fn remove(&self, key: &CacheKey) -> Option<Arc<Vec<u8>>> {
        self.lock().pop(key)
    }

    /// Drop least recently used buffers (of the volume holding the most first) until at most
    /// `bytes` are held.
    pub fn shrink_to(&self, bytes: usize) {
        let mut inner = self.lock();
        while inner.used > bytes && inner.evict_one() {}
    }

    /// Bytes currently held.
    pub fn used(&self) -> usize {
        self.lock().used
    }

    /// Number of buffers currently held.
    pub fn len(&self) -> usize {
        self.lock().len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Default for BlockCache {
    fn default() -> Self {
        BlockCache::new(DEFAULT_BUDGET)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(offset: u64) -> CacheKey {
        CacheKey {
            image: 1,
            kind: CacheKind::L2Table,
            offset,
        }
    }

    #[test]
    fn evicts_by_bytes_in_lru_order() {
        let c = BlockCache::new(300);
        c.insert(key(0), Arc::new(vec![0; 100]));
        c.insert(key(1), Arc::new(vec![0; 100]));
        c.insert(key(2), Arc::new(vec![0; 100]));
        assert!(c.get(&key(0)).is_some()); // 0 is now most recent
        c.insert(key(3), Arc::new(vec![0; 100]));
        assert!(c.get(&key(1)).is_none());
        assert!(c.get(&key(0)).is_some());
        assert_eq!(c.used(), 300);
        c.insert(key(4), Arc::new(vec![0; 1000])); // larger than the budget: not kept
        assert_eq!(c.used(), 300);
        assert_eq!(c.len(), 3);
        c.get(&key(2));
        c.shrink_to(150);
        assert_eq!((c.used(), c.len()), (100, 1));
        assert!(c.get(&key(2)).is_some(), "the most recently used stays");
    }

    fn key_in(image: u64, offset: u64) -> CacheKey {
        CacheKey {
            image,
            kind: CacheKind::L2Table,
            offset,
        }
    }

    /// One image making 10,000 inserts leaves another's few entries in place: a single LRU
    /// across images would have evicted them after the first few hundred.
    #[test]
    fn a_busy_image_does_not_evict_a_quiet_one() {
        let c = BlockCache::new(100 * 1000);
        let quiet = BlockCache::with_group(7, BlockCache::new_image_id);
        let busy = BlockCache::with_group(8, BlockCache::new_image_id);
        assert_ne!(group_of(quiet), group_of(busy));
        for i in 0..10 {
            c.insert(key_in(quiet, i), Arc::new(vec![0; 1000]));
        }
        for i in 0..10_000 {
            c.insert(key_in(busy, i), Arc::new(vec![0; 1000]));
        }
        for i in 0..10 {
            assert!(
                c.get(&key_in(quiet, i)).is_some(),
                "quiet entry {i} evicted"
            );
        }
        assert_eq!(c.used(), 100 * 1000);
        assert_eq!(c.len(), 100);
        // The busy image keeps the rest, its most recent entries.
        assert!(c.get(&key_in(busy, 9_999)).is_some());
        assert!(c.get(&key_in(busy, 0)).is_none());
    }

    /// Two groups that both want more than the budget end with equal shares, and an image
    /// opened outside any group is a group of its own.
    #[test]
    fn groups_that_both_want_more_end_with_equal_shares() {
        let c = BlockCache::new(100 * 1000);
        let a = BlockCache::with_group(1, BlockCache::new_image_id);
        let b = BlockCache::new_image_id();
        let b2 = BlockCache::new_image_id();
        assert_ne!(group_of(b), group_of(b2));
        for i in 0..1000 {
            c.insert(key_in(a, i), Arc::new(vec![0; 1000]));
            c.insert(key_in(b, i), Arc::new(vec![0; 1000]));
        }
        let mut usage = c.group_usage();
        usage.sort();
        assert_eq!(usage.len(), 2, "{usage:?}");
        assert!(usage.iter().all(|&(_, u)| u == 50 * 1000), "{usage:?}");
        // Taking a buffer out keeps the counts.
        assert!(c.remove(&key_in(a, 999)).is_some());
        assert_eq!(c.used(), 99 * 1000);
        assert_eq!(c.len(), 99);
    }
}

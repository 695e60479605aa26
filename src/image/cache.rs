//! One byte-budgeted LRU shared by every image of the daemon: L2 tables and decompressed
//! clusters, keyed by (image id, kind, host offset).

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

struct Inner {
    lru: LruCache<CacheKey, Arc<Vec<u8>>>,
    used: usize,
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
                lru: LruCache::unbounded(),
                used: 0,
            }),
        }
    }

    /// A fresh id for one opened host file; ids are never reused, so stale entries just age out.
    pub fn new_image_id() -> u64 {
        NEXT_IMAGE_ID.fetch_add(1, Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the LRU inconsistent, so poisoning is ignored.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, key: &CacheKey) -> Option<Arc<Vec<u8>>> {
        self.lock().lru.get(key).cloned()
    }

    /// Keep `value`, evicting least recently used buffers until the budget holds.
    pub fn insert(&self, key: CacheKey, value: Arc<Vec<u8>>) {
        let len = value.len();
        if len > self.budget {
            return;
        }
        let mut inner = self.lock();
        if let Some(old) = inner.lru.put(key, value) {
            inner.used -= old.len();
        }
        inner.used += len;
        while inner.used > self.budget {
            match inner.lru.pop_lru() {
                Some((_, v)) => inner.used -= v.len(),
                None => break,
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
        let mut inner = self.lock();
        let v = inner.lru.pop(key)?;
        inner.used -= v.len();
        Some(v)
    }

    /// Drop least recently used buffers until at most `bytes` are held.
    pub fn shrink_to(&self, bytes: usize) {
        let mut inner = self.lock();
        while inner.used > bytes {
            match inner.lru.pop_lru() {
                Some((_, v)) => inner.used -= v.len(),
                None => break,
            }
        }
    }

    /// Bytes currently held.
    pub fn used(&self) -> usize {
        self.lock().used
    }

    /// Number of buffers currently held.
    pub fn len(&self) -> usize {
        self.lock().lru.len()
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
}

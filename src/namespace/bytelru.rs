//! A least-recently-used map bounded by the bytes its entries cost on the heap, not by their
//! count (issue 20 item 2): the namespace's caches keyed by guest paths and disk names would,
//! bounded by count, grow with the length of what an image or a guest names (4,096 paths of
//! 16 KiB each are 64 MiB). Each entry is charged its estimated heap cost ([`Cost`]) plus a
//! fixed overhead for the list node and its table slot; past the budget the least recently
//! used entries go, and an entry larger than the whole budget is not kept (what is not kept is
//! looked up again: it costs time, never an answer).

use std::hash::Hash;

use lru::LruCache;

/// Bytes an entry of the cache holds on the heap beyond the map's own node (see [`ENTRY`]).
pub trait Cost {
    fn cost(&self) -> usize;
}

/// Per entry: the LRU node (key, value, two links), its hash table slot, malloc's header and
/// rounding. A generous estimate: the charge must not be below what is used.
pub const ENTRY: usize = 96;

/// What a heap block of `n` bytes costs with glibc's header and 16-byte rounding.
pub fn heap(n: usize) -> usize {
    if n == 0 {
        0
    } else {
        (n + 8).div_ceil(16).max(2) * 16
    }
}

impl Cost for String {
    fn cost(&self) -> usize {
        heap(self.capacity())
    }
}

impl Cost for u64 {
    fn cost(&self) -> usize {
        0
    }
}

impl Cost for u16 {
    fn cost(&self) -> usize {
        0
    }
}

impl<A: Cost, B: Cost> Cost for (A, B) {
    fn cost(&self) -> usize {
        self.0.cost() + self.1.cost()
    }
}

impl<T: Cost> Cost for std::sync::Arc<T> {
    /// The shared value and its two counters (charged in full to each cache that holds it).
    fn cost(&self) -> usize {
        heap(16 + std::mem::size_of::<T>()) + self.as_ref().cost()
    }
}

impl<T: Cost> Cost for Vec<T> {
    fn cost(&self) -> usize {
        heap(self.capacity() * std::mem::size_of::<T>())
            + self.iter().map(Cost::cost).sum::<usize>()
    }
}

/// An LRU map of at most `budget` bytes (as charged).
pub struct ByteLru<K: Hash + Eq, V> {
    map: LruCache<K, (V, usize)>,
    bytes: usize,
    budget: usize,
}

impl<K: Hash + Eq + Cost, V: Cost> ByteLru<K, V> {
    pub fn new(budget: usize) -> Self {
        ByteLru {
            map: LruCache::unbounded(),
            bytes: 0,
            budget,
        }
    }

    pub fn get(&mut self, k: &K) -> Option<&V> {
        self.map.get(k).map(|(v, _)| v)
    }

    /// Keep `v` under `k`, dropping the least recently used entries past the budget; an entry
    /// that alone costs more than the budget is not kept.
    pub fn put(&mut self, k: K, v: V) {
        let cost = ENTRY + k.cost() + v.cost();
        if let Some((_, old)) = self.map.pop(&k) {
            self.bytes -= old;
        }
        if cost > self.budget {
            return;
        }
        self.bytes += cost;
        self.map.put(k, (v, cost));
        while self.bytes > self.budget {
            match self.map.pop_lru() {
                Some((_, (_, c))) => self.bytes -= c,
                None => break,
            }
        }
    }

    /// Bytes charged now (at most the budget).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stays_under_its_budget_with_long_names() {
        let mut c: ByteLru<(u16, String), u64> = ByteLru::new(64 << 10);
        // Deep paths of 255-byte names: each key longer than the last.
        let name = "\u{ff}".repeat(127) + "x";
        assert_eq!(name.len(), 255);
        let mut path = String::new();
        for i in 0..200u64 {
            if !path.is_empty() {
                path.push('/');
            }
            path.push_str(&name);
            c.put((1, path.clone()), i);
            assert!(c.bytes() <= 64 << 10, "{} bytes after {i}", c.bytes());
        }
        // The most recent entry that fits is kept; one over the budget is not kept at all.
        assert!(!c.is_empty());
        let huge = "y".repeat(65 << 10);
        c.put((2, huge.clone()), 7);
        assert!(c.get(&(2, huge)).is_none());
        assert!(c.bytes() <= 64 << 10);
    }

    #[test]
    fn the_charge_covers_the_key_and_the_node() {
        let k = (3u16, "z".repeat(255));
        let mut c: ByteLru<(u16, String), u64> = ByteLru::new(usize::MAX);
        c.put(k.clone(), 1);
        let node = std::mem::size_of::<((u16, String), (u64, usize))>() + 2 * 8;
        assert!(c.bytes() >= k.1.capacity() + node, "{}", c.bytes());
        let shared = std::sync::Arc::new(vec!["p1".to_string(); 4]);
        assert!(shared.cost() >= 4 * (24 + 2));
    }

    #[test]
    fn replacing_an_entry_does_not_count_it_twice() {
        let mut c: ByteLru<String, u64> = ByteLru::new(1 << 20);
        for _ in 0..1000 {
            c.put("a".repeat(255), 1);
        }
        assert_eq!(c.len(), 1);
        assert!(c.bytes() < 1024);
    }
}

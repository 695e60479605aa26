//! Inode numbers for paths, with the kernel's lookup counts.
//!
//! An inode number stays bound to its path while the kernel holds a reference to it. A
//! removed path loses its number at once, so a namesake created later gets a fresh one and
//! the kernel never confuses the two. Numbers are never reused.

use std::collections::HashMap;
use std::mem::size_of;
use std::sync::Arc;

pub const ROOT: u64 = 1;

/// One path component. Paths share their components: a child's path is its parent's
/// components (reference-counted, not copied) and its own name.
pub type Name = Arc<str>;
/// A path, stored once and shared by both maps (and handed out without copying).
pub type Path = Arc<[Name]>;

struct Entry {
    path: Path,
    /// Other paths bound to this inode (hard links inside a guest filesystem).
    aliases: Vec<Path>,
    lookups: u64,
    /// False once removed or renamed away: only the kernel's references keep it.
    linked: bool,
}

pub struct InodeTable {
    by_path: HashMap<Path, u64>,
    entries: HashMap<u64, Entry>,
    next: u64,
}

impl Default for InodeTable {
    fn default() -> Self {
        let mut t = InodeTable {
            by_path: HashMap::new(),
            entries: HashMap::new(),
            next: ROOT + 1,
        };
        t.entries.insert(
            ROOT,
            Entry {
                path: Path::from([]),
                aliases: Vec::new(),
                lookups: 1,
                linked: true,
            },
        );
        t.by_path.insert(Path::from([]), ROOT);
        t
    }
}

impl InodeTable {
    pub fn path(&self, ino: u64) -> Option<Path> {
        self.entries.get(&ino).map(|e| e.path.clone())
    }

    /// The inode for `path`, creating it if new; `count` adds a kernel lookup reference.
    pub fn get_or_insert(&mut self, path: Vec<Name>, count: bool) -> u64 {
        let ino = match self.by_path.get(path.as_slice()) {
            Some(&ino) => ino,
            None => {
                let ino = self.next;
                self.next += 1;
                let path = Path::from(path);
                self.by_path.insert(path.clone(), ino);
                self.entries.insert(
                    ino,
                    Entry {
                        path,
                        aliases: Vec::new(),
                        lookups: 0,
                        linked: true,
                    },
                );
                ino
            }
        };
        if count {
            if let Some(e) = self.entries.get_mut(&ino) {
                e.lookups += 1;
            }
        }
        ino
    }

    /// Like `get_or_insert`, but the inode number is chosen by the caller (`want`, derived
    /// from a guest inode number): two paths with the same `want` share one inode, as hard
    /// links do. The caller keeps such numbers out of the counter's range.
    ///
    /// A path bound to another number before is bound to `want` now: what it names changed
    /// identity (a snapshot deleted and taken again under the same name gives its files new
    /// numbers), and the kernel must see a new inode, not keep the old one's cached pages.
    pub fn get_or_insert_pinned(&mut self, path: Vec<Name>, want: u64, count: bool) -> u64 {
        if let Some(&old) = self.by_path.get(path.as_slice()) {
            if old != want {
                self.unbind(old, &path);
            }
        }
        let ino = match self.by_path.get(path.as_slice()) {
            Some(&ino) => ino,
            None => {
                let path = Path::from(path);
                match self.entries.get_mut(&want) {
                    Some(e) => e.aliases.push(path.clone()),
                    None => {
                        self.entries.insert(
                            want,
                            Entry {
                                path: path.clone(),
                                aliases: Vec::new(),
                                lookups: 0,
                                linked: true,
                            },
                        );
                    }
                }
                self.by_path.insert(path, want);
                want
            }
        };
        if count {
            if let Some(e) = self.entries.get_mut(&ino) {
                e.lookups += 1;
            }
        }
        ino
    }

    /// `path` no longer names inode `ino` (which keeps the kernel's references).
    fn unbind(&mut self, ino: u64, path: &[Name]) {
        self.by_path.remove(path);
        if let Some(e) = self.entries.get_mut(&ino) {
            if &*e.path == path {
                match e.aliases.pop() {
                    Some(a) => e.path = a,
                    None => e.linked = false,
                }
            } else {
                e.aliases.retain(|a| &**a != path);
            }
        }
    }

    /// The inode already bound to `path`, if any (no new reference).
    pub fn find(&self, path: &[Name]) -> Option<u64> {
        self.by_path.get(path).copied()
    }

    pub fn forget(&mut self, ino: u64, n: u64) {
        if ino == ROOT {
            return;
        }
        let Some(e) = self.entries.get_mut(&ino) else {
            return;
        };
        e.lookups = e.lookups.saturating_sub(n);
        if e.lookups == 0 {
            if e.linked {
                self.by_path.remove(&e.path);
            }
            for a in std::mem::take(&mut e.aliases) {
                if self.by_path.get(&a) == Some(&ino) {
                    self.by_path.remove(&a);
                }
            }
            self.entries.remove(&ino);
        }
    }

    /// `path` and everything below it were removed.
    pub fn unlink(&mut self, path: &[Name]) {
        let gone: Vec<Path> = self
            .by_path
            .keys()
            .filter(|p| p.starts_with(path))
            .cloned()
            .collect();
        for p in gone {
            if let Some(ino) = self.by_path.remove(&p) {
                if let Some(e) = self.entries.get_mut(&ino) {
                    e.linked = false;
                }
            }
        }
    }

    /// `from` (and everything below it) is now called `to`; the kernel keeps its inodes.
    pub fn rename(&mut self, from: &[Name], to: &[Name]) {
        self.unlink(to);
        let moved: Vec<(Path, u64)> = self
            .by_path
            .iter()
            .filter(|(p, _)| p.starts_with(from))
            .map(|(p, i)| (p.clone(), *i))
            .collect();
        for (old, ino) in moved {
            self.by_path.remove(&old);
            let mut new = to.to_vec();
            new.extend_from_slice(&old[from.len()..]);
            let new = Path::from(new);
            if let Some(e) = self.entries.get_mut(&ino) {
                e.path = new.clone();
            }
            self.by_path.insert(new, ino);
        }
    }

    #[cfg(test)]
    pub fn count(&self) -> usize {
        self.entries.len()
    }

    /// (entries, bytes estimated from their lengths): each path's slice and its last name
    /// (the others are shared with its parent's), and both maps' slots.
    pub fn memory(&self) -> (usize, usize) {
        let heap = crate::namespace::bytelru::heap;
        let slot = size_of::<(Path, u64)>() + size_of::<(u64, Entry)>() + 2;
        let bytes = self
            .entries
            .values()
            .map(|e| {
                let own = |p: &Path| {
                    heap(16 + p.len() * size_of::<Name>())
                        + p.last().map_or(0, |n| heap(16 + n.len()))
                };
                own(&e.path)
                    + e.aliases.iter().map(own).sum::<usize>()
                    + heap(e.aliases.len() * size_of::<Path>())
                    + slot * 8 / 7
            })
            .sum();
        (self.entries.len(), bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Vec<Name> {
        s.split('/').map(Name::from).collect()
    }

    #[test]
    fn lookup_forget_cycle() {
        let mut t = InodeTable::default();
        let a = t.get_or_insert(p("volumes/x"), true);
        assert_eq!(t.get_or_insert(p("volumes/x"), true), a);
        t.forget(a, 1);
        assert_eq!(t.path(a).as_deref(), Some(p("volumes/x").as_slice()));
        t.forget(a, 1);
        assert_eq!(t.path(a), None);
        assert_eq!(t.count(), 1);
        assert_ne!(
            t.get_or_insert(p("volumes/x"), true),
            a,
            "numbers are not reused"
        );
    }

    /// The memory report's estimate of the table is not below what its names take, grows
    /// with the nodes the kernel holds and falls when they are forgotten.
    #[test]
    fn memory_estimate_follows_the_nodes() {
        let mut t = InodeTable::default();
        let (n0, b0) = t.memory();
        let long = "n".repeat(255);
        let inos: Vec<u64> = (0..1000)
            .map(|i| t.get_or_insert(p(&format!("volumes/{long}{i}")), true))
            .collect();
        let (n1, b1) = t.memory();
        assert_eq!(n1, n0 + 1000);
        assert!(b1 - b0 >= 1000 * 255, "{b0} -> {b1}");
        for ino in inos {
            t.forget(ino, 1);
        }
        assert_eq!(t.memory(), (n0, b0));
    }

    #[test]
    fn removed_name_gets_a_new_inode() {
        let mut t = InodeTable::default();
        let a = t.get_or_insert(p("v/.snapshots/s"), true);
        let f = t.get_or_insert(p("v/.snapshots/s/disk.raw"), true);
        t.unlink(&p("v/.snapshots/s"));
        assert_eq!(t.find(&p("v/.snapshots/s/disk.raw")), None);
        let b = t.get_or_insert(p("v/.snapshots/s"), true);
        assert_ne!(a, b);
        t.forget(a, 1);
        t.forget(f, 1);
        assert_eq!(t.find(&p("v/.snapshots/s")), Some(b));
    }

    #[test]
    fn pinned_inodes_share_hard_links() {
        let mut t = InodeTable::default();
        let want = 1 << 63 | 12;
        let a = t.get_or_insert_pinned(p("f/p1/a"), want, true);
        let b = t.get_or_insert_pinned(p("f/p1/dir/b"), want, true);
        assert_eq!((a, b), (want, want));
        assert_eq!(t.find(&p("f/p1/dir/b")), Some(want));
        t.forget(want, 2);
        assert_eq!(t.find(&p("f/p1/a")), None);
        assert_eq!(t.find(&p("f/p1/dir/b")), None);
        assert_eq!(t.count(), 1);
    }

    #[test]
    fn rename_moves_children() {
        let mut t = InodeTable::default();
        let a = t.get_or_insert(p("v/.snapshots/a"), true);
        let f = t.get_or_insert(p("v/.snapshots/a/disk.raw"), true);
        t.rename(&p("v/.snapshots/a"), &p("v/.snapshots/b"));
        assert_eq!(t.find(&p("v/.snapshots/b")), Some(a));
        assert_eq!(
            t.path(f).as_deref(),
            Some(p("v/.snapshots/b/disk.raw").as_slice())
        );
        assert_eq!(t.find(&p("v/.snapshots/a")), None);
    }

    #[test]
    fn a_pinned_path_that_changes_identity_gets_the_new_number() {
        let mut t = InodeTable::default();
        let old = t.get_or_insert_pinned(p("s/files/vda/p1/etc"), 1 << 63 | 5, true);
        assert_eq!(old, 1 << 63 | 5);
        // Same path, now pinned to another guest inode (the snapshot was taken again).
        let new = t.get_or_insert_pinned(p("s/files/vda/p1/etc"), 1 << 63 | 9, true);
        assert_eq!(new, 1 << 63 | 9);
        assert_eq!(t.find(&p("s/files/vda/p1/etc")), Some(new));
        // The old inode lives on for the kernel's reference, bound to no path.
        assert_eq!(t.count(), 3);
        t.forget(old, 1);
        assert_eq!(t.count(), 2);
        assert_eq!(t.find(&p("s/files/vda/p1/etc")), Some(new));
        // A hard link that moves away keeps the inode's other name.
        let a = t.get_or_insert_pinned(p("x/a"), 1 << 63 | 20, true);
        t.get_or_insert_pinned(p("x/b"), 1 << 63 | 20, true);
        t.get_or_insert_pinned(p("x/a"), 1 << 63 | 21, true);
        assert_eq!(t.path(a).as_deref(), Some(&*Path::from(p("x/b"))));
        assert_eq!(t.find(&p("x/b")), Some(a));
    }
}

//! The filesystem core: inode-numbered operations over the [`Namespace`], each returning
//! `Result<_, Error>`. `fuse.rs` is only glue around this, so everything here can be tested
//! without a kernel in the loop.

pub mod inode;

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crate::error::{Error, Result};
use crate::image::ExtentKind;
use crate::namespace::files::GuestRef;
use crate::namespace::registry::lock;
use crate::namespace::{Content, Kind, Namespace, Node, Stat, SETTING_PREFIX};
use inode::{InodeTable, Name, Path, ROOT};

#[derive(Clone, Copy, Debug)]
pub struct Attr {
    pub ino: u64,
    pub stat: Stat,
    pub uid: u32,
    pub gid: u32,
    pub blksize: u32,
}

#[derive(Clone, Debug)]
pub struct DirEntry {
    pub ino: u64,
    pub name: String,
    pub kind: Kind,
    /// The guest inode of an entry of a guest directory.
    at: Option<GuestRef>,
}

/// How the kernel should cache an opened file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Opened {
    pub fh: u64,
    /// The content never changes (a snapshot's bytes): keep the page cache across opens.
    pub keep_cache: bool,
    /// The content is generated at open and its size may differ from a stat taken earlier.
    pub direct_io: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Whence {
    Data,
    Hole,
}

/// An open directory. Ours: its entries as listed at opendir (a stable view for the
/// handle's life), and for readdirplus the children's attributes, read once on first use.
/// A guest directory's handle holds nothing of its listing: each READDIR asks the reader
/// for a page from the offset it is given (see [`SnapFs::dir_page`]).
pub struct DirListing {
    ino: u64,
    body: Listed,
    stats: OnceLock<HashMap<u64, Stat>>,
}

enum Listed {
    /// A directory of snapfs's own tree: its entries, `.` and `..` first.
    Entries { path: Path, entries: Vec<DirEntry> },
    /// A guest directory, listed by pages after `.` and `..`.
    Guest { at: GuestRef, parent: u64 },
}

/// READDIR offsets of a guest directory: 1 after `.`, 2 after `..`, then the reader's cookie
/// after an entry plus this (cookies are below 2^63 - 2).
const GUEST_COOKIE_BASE: u64 = 2;

impl DirListing {
    /// Our own entries from position `start` on, each with the position after it (the
    /// offset READDIR gets back to go on: positions never change while the handle is open).
    fn from(&self, start: usize) -> impl Iterator<Item = (u64, DirEntry)> + '_ {
        let entries: &[DirEntry] = match &self.body {
            Listed::Entries { entries, .. } => entries,
            Listed::Guest { .. } => &[],
        };
        entries
            .iter()
            .enumerate()
            .skip(start)
            .map(|(i, e)| (i as u64 + 1, e.clone()))
    }
}

/// The `ino` a listing shows for a guest inode whose number does not fit a node id.
const UNNUMBERED: u64 = u64::MAX;
/// Most pages of hidden names (names no file name can carry) one READDIR passes over: past
/// that many in a row the listing ends there (an empty answer is the end for the kernel).
const MAX_HIDDEN_PAGES: usize = 1024;

/// What a node id stands for: a path of the tree, or a guest inode (no path kept).
enum At {
    Path(Path),
    Guest(GuestRef),
}

/// The first component of the table's path for a guest inode whose number does not fit a
/// node id (`\0` is in no file name): `[GUEST_PATH, volume, inode]`.
const GUEST_PATH: &str = "\0guest";

fn guest_path(g: GuestRef) -> Vec<Name> {
    vec![
        Name::from(GUEST_PATH),
        Name::from(g.vol.to_string()),
        Name::from(g.ino.to_string()),
    ]
}

fn parse_guest_path(p: &[Name]) -> Option<GuestRef> {
    match p {
        [tag, vol, ino] if &**tag == GUEST_PATH => Some(GuestRef {
            vol: vol.parse().ok()?,
            ino: ino.parse().ok()?,
        }),
        _ => None,
    }
}

/// How many guest directories' parents are remembered for their `..` entry.
const PARENTS: usize = 4096;

enum Handle {
    Dir(Arc<DirListing>),
    File(Content),
}

/// Options that change what the core reports, not what it reads.
#[derive(Clone, Debug)]
pub struct FsOptions {
    pub uid: u32,
    pub gid: u32,
    /// `--read-only` (fstab `ro`): every change to the tree is EROFS; reads are as usual.
    pub read_only: bool,
}

pub struct SnapFs {
    ns: Namespace,
    inodes: Mutex<InodeTable>,
    /// Guest directory → the directory it was looked up in, for its `..` entry (bounded).
    parents: Mutex<lru::LruCache<u64, u64>>,
    handles: Mutex<HashMap<u64, Handle>>,
    next_fh: AtomicU64,
    opts: FsOptions,
}

/// Files advertise a large block so `cp` and friends read disks in big chunks.
const FILE_BLKSIZE: u32 = 1 << 20;
const BLKSIZE: u32 = 4096;
/// The longest single read we serve (the kernel never asks for more than max_pages).
const MAX_READ: usize = 16 << 20;

thread_local! {
    /// One read buffer per FUSE worker thread, so a 1 MiB read allocates nothing.
    static READ_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl SnapFs {
    pub fn new(ns: Namespace, opts: FsOptions) -> Self {
        SnapFs {
            ns,
            inodes: Mutex::new(InodeTable::default()),
            parents: Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(PARENTS).unwrap_or(std::num::NonZeroUsize::MIN),
            )),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            opts,
        }
    }

    pub fn namespace(&self) -> &Namespace {
        &self.ns
    }

    /// What this core's tables and the namespace's caches hold ([`crate::memreport`]).
    pub fn memory(&self) -> Vec<crate::memreport::Held> {
        use crate::memreport::Held;
        let (n, b) = lock(&self.inodes).memory();
        let parents = lock(&self.parents).len();
        let handles = lock(&self.handles).len();
        let mut v = vec![
            Held::new("inodes", n, b),
            // Two u64 in an LRU node with its table slot.
            Held::new("parents", parents, parents * 96),
            // A handle's own bytes (a directory of our tree keeps its entries besides).
            Held::new("handles", handles, handles * 128),
        ];
        v.extend(self.ns.memory());
        v
    }

    fn path(&self, ino: u64) -> Result<Path> {
        lock(&self.inodes)
            .path(ino)
            .ok_or_else(|| Error::NotFound(format!("inode {ino}")))
    }

    /// The instance or volume node `ino` belongs to, as a key for fair shares of the FUSE
    /// threads ([`crate::fairness`]): a hash of its owner, the same for its snapshots, disks
    /// and guest files; None outside any (the root, `instances/`, `volumes/<pool>/`, `launch/`).
    pub fn volume_key(&self, ino: u64) -> Option<u64> {
        use crate::namespace::{names::unescape, INSTANCES, VOLUMES};
        use crate::provider::Owner;
        use std::hash::{Hash, Hasher};
        let owner = match self.at(ino).ok()? {
            At::Guest(g) => self.ns.guest_owner(g.vol)?,
            At::Path(p) => match &p[..] {
                [top, i, ..] if &**top == INSTANCES => Owner::Instance(unescape(i)),
                [top, pool, v, ..] if &**top == VOLUMES => Owner::Volume {
                    pool: unescape(pool),
                    name: unescape(v),
                },
                _ => return None,
            },
        };
        let mut h = std::hash::DefaultHasher::new();
        owner.hash(&mut h);
        Some(h.finish())
    }

    /// What node `ino` stands for.
    fn at(&self, ino: u64) -> Result<At> {
        if let Some(g) = GuestRef::from_id(ino) {
            return Ok(At::Guest(g));
        }
        let path = self.path(ino)?;
        Ok(match parse_guest_path(&path) {
            Some(g) => At::Guest(g),
            None => At::Path(path),
        })
    }

    fn check_name(name: &str) -> Result<()> {
        if name.is_empty() || name == "." || name == ".." || name.contains('/') {
            return Err(Error::Invalid(format!("name {name:?}")));
        }
        Ok(())
    }

    /// The path of `name` in `parent`; inside a guest directory (which has no path) the
    /// refusal a change inside a snapshot gets.
    fn child(&self, parent: u64, name: &str) -> Result<Vec<Name>> {
        Self::check_name(name)?;
        match self.at(parent)? {
            At::Path(p) => {
                let mut p = p.to_vec();
                p.push(Name::from(name));
                Ok(p)
            }
            At::Guest(_) => Err(Namespace::refusal(
                Some(&Node::InSnapshot),
                "change a guest file",
            )),
        }
    }

    /// The node id of guest inode `g` whose stat is `stat`: its own number, or (when the guest
    /// inode number does not fit one) an entry of the table, counted if `count`.
    fn guest_ino(&self, stat: &Stat, g: GuestRef, count: bool) -> u64 {
        match stat.ino {
            Some(id) => id,
            None => lock(&self.inodes).get_or_insert(guest_path(g), count),
        }
    }

    fn node(path: &[Name]) -> Result<Node> {
        Node::parse(path).ok_or_else(|| Error::NotFound(path.join("/")))
    }

    fn attr(&self, ino: u64, stat: Stat) -> Attr {
        Attr {
            ino,
            stat,
            uid: self.opts.uid,
            gid: self.opts.gid,
            blksize: if stat.kind == Kind::File {
                FILE_BLKSIZE
            } else {
                BLKSIZE
            },
        }
    }

    fn stat_path(&self, path: &[Name]) -> Result<Stat> {
        self.ns.stat(&Self::node(path)?)
    }

    /// Look `name` up in `parent`; on success the kernel holds one more reference.
    ///
    /// A guest node (its id derived from its volume and guest inode) is answered by number
    /// and enters nothing in the inode table: the kernel's lookup counts need no bookkeeping,
    /// as the id stays valid for as long as the volume's snapshot exists.
    pub fn lookup(&self, parent: u64, name: &str) -> Result<Attr> {
        Self::check_name(name)?;
        let (ino, stat) = match self.at(parent)? {
            At::Guest(g) => {
                let (stat, child) = self.ns.guest_lookup(g, name)?;
                (self.guest_ino(&stat, child, true), stat)
            }
            At::Path(p) => {
                let mut path = p.to_vec();
                path.push(Name::from(name));
                let stat = self.stat_path(&path)?;
                let ino = match stat.ino {
                    Some(id) if crate::namespace::files::is_guest_node(id) => id,
                    Some(want) => lock(&self.inodes).get_or_insert_pinned(path, want, true),
                    None => lock(&self.inodes).get_or_insert(path, true),
                };
                (ino, stat)
            }
        };
        if stat.kind == Kind::Dir && stat.fixed() {
            lock(&self.parents).put(ino, parent);
        }
        Ok(self.attr(ino, stat))
    }

    pub fn forget(&self, ino: u64, n: u64) {
        lock(&self.inodes).forget(ino, n);
    }

    pub fn getattr(&self, ino: u64) -> Result<Attr> {
        let stat = match self.at(ino)? {
            At::Guest(g) => self.ns.guest_stat(g)?,
            At::Path(path) => self.stat_path(&path)?,
        };
        Ok(self.attr(ino, stat))
    }

    /// Opened with `keep_cache` for a guest directory: its listing never changes.
    pub fn opendir(&self, ino: u64) -> Result<Opened> {
        let path = match self.at(ino)? {
            At::Path(p) => p,
            At::Guest(g) => return self.opendir_guest(ino, g),
        };
        let node = Self::node(&path)?;
        let children = self.ns.list(&node)?;
        let parent_ino = if path.is_empty() {
            ROOT
        } else {
            lock(&self.inodes)
                .find(&path[..path.len() - 1])
                .unwrap_or(ROOT)
        };
        let mut entries = Vec::with_capacity(children.len() + 2);
        entries.push(DirEntry {
            ino,
            name: ".".into(),
            kind: Kind::Dir,
            at: None,
        });
        entries.push(DirEntry {
            ino: parent_ino,
            name: "..".into(),
            kind: Kind::Dir,
            at: None,
        });
        {
            let mut inodes = lock(&self.inodes);
            for (name, kind, want) in children {
                // A listing only shows inode numbers; the kernel looks a name up before it
                // uses the node. Guest entries have their number already (it is derived from
                // the guest inode, and lookup pins the same one), so they are not entered in
                // the table here: a `find` over a guest tree would otherwise clone a path
                // and hash it for every entry, and keep all of them.
                let child = match want {
                    Some(w) => w,
                    None => {
                        let mut p = path.to_vec();
                        p.push(Name::from(name.as_str()));
                        inodes.get_or_insert(p, false)
                    }
                };
                entries.push(DirEntry {
                    ino: child,
                    name,
                    kind,
                    at: None,
                });
            }
        }
        let fh = self.new_handle(Handle::Dir(Arc::new(DirListing {
            ino,
            body: Listed::Entries { path, entries },
            stats: OnceLock::new(),
        })));
        Ok(Opened {
            fh,
            keep_cache: crate::namespace::files::is_guest_node(ino),
            direct_io: false,
        })
    }

    /// A guest directory: nothing of its listing is read here (READDIR reads it by pages).
    fn opendir_guest(&self, ino: u64, g: GuestRef) -> Result<Opened> {
        // The directory is still there (its snapshot too): opendir fails as before.
        let st = self.ns.guest_stat(g)?;
        if st.kind != Kind::Dir {
            return Err(Error::NotDir(format!("guest inode {}", g.ino)));
        }
        // `..`: the directory it was looked up in (almost always just now), else the guest's
        // own `..`, else itself (a filesystem's root).
        let remembered = lock(&self.parents).get(&ino).copied();
        let parent = match remembered {
            Some(p) => p,
            None => match self.ns.guest_lookup(g, "..") {
                Ok((stat, _)) => stat.ino.unwrap_or(ino),
                Err(_) => ino,
            },
        };
        let fh = self.new_handle(Handle::Dir(Arc::new(DirListing {
            ino,
            body: Listed::Guest { at: g, parent },
            stats: OnceLock::new(),
        })));
        Ok(Opened {
            fh,
            keep_cache: true,
            direct_io: false,
        })
    }

    /// The open directory of handle `fh`.
    pub fn readdir(&self, fh: u64) -> Result<Arc<DirListing>> {
        match lock(&self.handles).get(&fh) {
            Some(Handle::Dir(e)) => Ok(e.clone()),
            _ => Err(Error::Invalid(format!("bad directory handle {fh}"))),
        }
    }

    /// The entries of `dir` from READDIR offset `offset` on, each with the offset after it,
    /// about `budget` bytes of FUSE entries ([`restore::dirent_cost`]; the caller sends what
    /// fits and is asked again from there). Empty at the end. Our own directories: positions
    /// in the listing made at opendir; guest ones: reader cookies, asked for page by page.
    pub fn dir_page(
        &self,
        dir: &DirListing,
        offset: u64,
        budget: usize,
    ) -> Result<Vec<(u64, DirEntry)>> {
        let (at, parent) = match &dir.body {
            Listed::Entries { .. } => {
                let start = usize::try_from(offset).unwrap_or(usize::MAX);
                let mut used = 0;
                return Ok(dir
                    .from(start)
                    .take_while(|(_, e)| {
                        used += crate::restore::dirent_cost(e.name.len());
                        used <= budget.max(crate::restore::READDIR_BUDGET)
                    })
                    .collect());
            }
            Listed::Guest { at, parent } => (*at, *parent),
        };
        let dot = |ino, name: &str| DirEntry {
            ino,
            name: name.into(),
            kind: Kind::Dir,
            at: None,
        };
        let mut out = Vec::new();
        if offset == 0 {
            out.push((1, dot(dir.ino, ".")));
        }
        if offset <= 1 {
            out.push((GUEST_COOKIE_BASE, dot(parent, "..")));
        }
        let mut cookie = offset.saturating_sub(GUEST_COOKIE_BASE);
        // Pages whose names are all hidden are passed over (an empty answer ends the listing).
        for _ in 0..MAX_HIDDEN_PAGES {
            let page = self.ns.guest_page(at, cookie, budget)?;
            for (next, name, kind, g) in page.entries {
                out.push((
                    next.saturating_add(GUEST_COOKIE_BASE),
                    DirEntry {
                        // A guest inode whose number does not fit a node id shows a number
                        // no node has; a lookup of the name gives it one.
                        ino: g.id().unwrap_or(UNNUMBERED),
                        name,
                        kind,
                        at: Some(g),
                    },
                ));
            }
            if !out.is_empty() || page.end || page.after == cookie {
                break;
            }
            cookie = page.after;
        }
        Ok(out)
    }

    /// The attributes of entry `e` of `dir`, for readdirplus: every entry but `.` and `..`
    /// counts as a lookup (the kernel holds a reference; [`SnapFs::forget`] it if the entry
    /// is not sent). Guest entries take their attributes from one pass over the directory
    /// ([`Namespace::child_stats`]); others are looked up by name.
    pub fn listed_attr(&self, dir: &DirListing, e: &DirEntry) -> Result<Attr> {
        if e.name == "." || e.name == ".." {
            return self.getattr(e.ino);
        }
        if let (Listed::Guest { .. }, Some(g)) = (&dir.body, e.at) {
            // One entry at a time: nothing kept per name of a guest directory.
            let stat = self.ns.guest_listed_stat(g)?;
            return Ok(self.attr(self.enter_listed(dir, e), stat));
        }
        let stats = dir.stats.get_or_init(|| match &dir.body {
            Listed::Entries { path, .. } => match Self::node(path) {
                Ok(n) => self.ns.child_stats(&n),
                Err(_) => HashMap::new(),
            },
            Listed::Guest { .. } => HashMap::new(),
        });
        match stats.get(&e.ino) {
            Some(stat) => Ok(self.attr(self.enter_listed(dir, e), *stat)),
            None => self.lookup(dir.ino, &e.name),
        }
    }

    /// Enter entry `e` of `dir` in the inode table with one kernel reference (its number is
    /// the one the listing showed). A guest node needs no entry.
    fn enter_listed(&self, dir: &DirListing, e: &DirEntry) -> u64 {
        match (&dir.body, e.at) {
            (_, Some(g)) => match g.id() {
                Some(id) => id,
                None => lock(&self.inodes).get_or_insert(guest_path(g), true),
            },
            (Listed::Entries { path, .. }, None) => {
                let mut p = path.to_vec();
                p.push(Name::from(e.name.as_str()));
                lock(&self.inodes).get_or_insert_pinned(p, e.ino, true)
            }
            (Listed::Guest { .. }, None) => e.ino,
        }
    }

    /// For readdirplus, an entry whose attributes cannot be read: still listed, with only its
    /// type (counted as a lookup like [`SnapFs::listed_attr`]). Sent with no validity, so the
    /// kernel asks again at once and the path itself gives the error, as with readdir.
    pub fn placeholder_attr(&self, dir: &DirListing, e: &DirEntry) -> Attr {
        self.attr(
            self.enter_listed(dir, e),
            Stat::new(e.kind, 0, 0, std::time::SystemTime::UNIX_EPOCH, 0),
        )
    }

    fn new_handle(&self, h: Handle) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        lock(&self.handles).insert(fh, h);
        fh
    }

    pub fn release(&self, fh: u64) {
        lock(&self.handles).remove(&fh);
    }

    pub fn open(&self, ino: u64, write: bool) -> Result<Opened> {
        let content = match self.at(ino)? {
            At::Guest(_) if write => {
                return Err(Namespace::refusal(
                    Some(&Node::InSnapshot),
                    "open for writing",
                ))
            }
            At::Guest(g) => self.ns.guest_open(g)?,
            At::Path(path) => {
                let node = Self::node(&path)?;
                if write {
                    return Err(Namespace::refusal(Some(&node), "open for writing"));
                }
                self.ns.open(&node)?
            }
        };
        // Snapshot bytes never change: let the page cache keep them across opens. Generated
        // files are made at open, so their size may differ from an earlier stat; some disks
        // (RBD) are read faster without the page cache.
        let generated = matches!(content, Content::Bytes(_));
        let direct = generated || matches!(&content, Content::Disk(d) if d.image.direct_io());
        Ok(Opened {
            fh: self.new_handle(Handle::File(content)),
            keep_cache: !direct,
            direct_io: direct,
        })
    }

    /// For an open disk whose bytes are a host file's, offset for offset (a raw snapshot disk,
    /// [`crate::image::BlockImage::passthrough_file`]): a new descriptor of that file and its
    /// (device, inode), so FUSE passthrough can let the kernel read it. None for any other
    /// content (qcow2, Parallels, RBD, `since/` disks, guest files, generated files).
    pub fn passthrough_file(&self, fh: u64) -> Option<(std::fs::File, (u64, u64))> {
        use std::os::unix::fs::MetadataExt;
        let Ok(Content::Disk(d)) = self.handle_content(fh) else {
            return None;
        };
        let f = d.image.passthrough_file()?;
        let meta = f.metadata().ok()?;
        // The kernel reads the file to its end: only while that is the disk's end.
        if !meta.is_file() || meta.len() != d.image.size() {
            return None;
        }
        let dup = f.try_clone().ok()?;
        Some((dup, (meta.dev(), meta.ino())))
    }

    fn handle_content(&self, fh: u64) -> Result<Content> {
        match lock(&self.handles).get(&fh) {
            Some(Handle::File(c)) => Ok(c.clone()),
            _ => Err(Error::Invalid(format!("bad file handle {fh}"))),
        }
    }

    /// Read up to `size` bytes at `offset` and hand them to `reply` (short only at EOF).
    pub fn read(&self, fh: u64, offset: u64, size: u32, reply: impl FnOnce(&[u8])) -> Result<()> {
        let content = self.handle_content(fh)?;
        if let Content::Bytes(b) = &content {
            let start = usize::try_from(offset).unwrap_or(usize::MAX).min(b.len());
            let end = start.saturating_add(size as usize).min(b.len());
            reply(&b[start..end]);
            return Ok(());
        }
        let file_size = content_size(&content);
        let len = (size as usize)
            .min(MAX_READ)
            .min(usize::try_from(file_size.saturating_sub(offset)).unwrap_or(usize::MAX));
        if len == 0 {
            reply(&[]);
            return Ok(());
        }
        // A reader that already holds these bytes (RBD read-ahead) replies without a copy.
        if let Content::Disk(d) = &content {
            if let Some(shared) = d.image.read_shared(offset, len)? {
                reply(shared.as_slice());
                return Ok(());
            }
        }
        READ_BUF.with(|buf| {
            let mut buf = buf.borrow_mut();
            if buf.len() < len {
                buf.resize(len, 0);
            }
            let n = match &content {
                Content::Disk(d) => {
                    d.image.read_at(&mut buf[..len], offset)?;
                    len
                }
                Content::Guest(g) => {
                    let mut n = 0;
                    while n < len {
                        let k = g.fs.read(g.ino, offset + n as u64, &mut buf[n..len])?;
                        if k == 0 {
                            break;
                        }
                        n += k;
                    }
                    n
                }
                Content::Bytes(_) => 0,
            };
            reply(&buf[..n]);
            Ok(())
        })
    }

    /// SEEK_DATA / SEEK_HOLE over the allocation map. The end of the file is a hole.
    pub fn lseek(&self, fh: u64, offset: u64, whence: Whence) -> Result<u64> {
        let content = self.handle_content(fh)?;
        let size = content_size(&content);
        if offset >= size {
            return Err(Error::NoSuchOffset);
        }
        let disk = match content {
            Content::Disk(d) => d,
            Content::Guest(g) => {
                let ranges = g.fs.data_ranges(g.ino)?.unwrap_or_else(|| vec![(0, size)]);
                return seek_in_ranges(&ranges, offset, size, whence);
            }
            // Generated files are all data.
            Content::Bytes(_) => return seek_in_ranges(&[(0, size)], offset, size, whence),
        };
        let img = &disk.image;
        let want = match whence {
            Whence::Data => ExtentKind::Data,
            Whence::Hole => ExtentKind::Zero,
        };
        let mut pos = offset;
        while pos < size {
            let extents = img.map(pos, size - pos)?;
            let Some(last) = extents.last() else { break };
            if let Some(e) = extents
                .iter()
                .find(|e| e.kind == want && e.offset + e.length > pos)
            {
                return Ok(e.offset.max(offset));
            }
            let next = last.offset + last.length;
            if next <= pos {
                return Err(Error::Backend(format!(
                    "allocation map made no progress at {pos:#x}"
                )));
            }
            pos = next;
        }
        match whence {
            Whence::Data => Err(Error::NoSuchOffset),
            Whence::Hole => Ok(size),
        }
    }

    /// The value of extended attribute `name`.
    pub fn getxattr(&self, ino: u64, name: &[u8]) -> Result<Vec<u8>> {
        let path = match self.at(ino)? {
            At::Path(p) => p,
            At::Guest(g) => {
                return self
                    .ns
                    .guest_xattrs(g)?
                    .into_iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, v)| v)
                    .ok_or(Error::NoAttr)
            }
        };
        let node = Self::node(&path)?;
        // `ls -l` asks every entry for security.selinux and the POSIX ACLs: an object
        // directory has only settings, so those are answered without asking the provider
        // (a libvirt round trip per instance).
        if matches!(node, Node::Object(_)) && !name.starts_with(SETTING_PREFIX.as_bytes()) {
            return Err(Error::NoAttr);
        }
        self.ns
            .xattrs(&node)?
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
            .ok_or(Error::NoAttr)
    }

    /// setxattr (`Some`) or removexattr (`None`): the settings of an object directory.
    pub fn setxattr(&self, ino: u64, name: &[u8], value: Option<&[u8]>) -> Result<()> {
        let path = match self.at(ino)? {
            At::Path(p) => p,
            At::Guest(_) => {
                self.writable("setxattr")?;
                return Err(Namespace::refusal(Some(&Node::InSnapshot), "setxattr"));
            }
        };
        let node = Self::node(&path)?;
        self.writable("setxattr")?;
        self.ns.set_xattr(&node, name, value)
    }

    /// Attribute names, each NUL-terminated, as listxattr(2) returns them.
    pub fn listxattr(&self, ino: u64) -> Result<Vec<u8>> {
        let xattrs = match self.at(ino)? {
            At::Path(path) => self.ns.xattrs(&Self::node(&path)?)?,
            At::Guest(g) => self.ns.guest_xattrs(g)?,
        };
        let mut out = Vec::new();
        for (n, _) in xattrs {
            out.extend_from_slice(&n);
            out.push(0);
        }
        Ok(out)
    }

    pub fn readlink(&self, ino: u64) -> Result<Vec<u8>> {
        match self.at(ino)? {
            At::Path(path) => self.ns.readlink(&Self::node(&path)?),
            At::Guest(g) => self.ns.guest_readlink(g),
        }
    }

    pub fn mkdir(&self, parent: u64, name: &str) -> Result<Attr> {
        self.writable("mkdir")?;
        let path = self.child(parent, name)?;
        let node = Node::parse(&path);
        match &node {
            Some(n @ Node::Snap(..)) => self.ns.mkdir(n, name)?,
            n => return Err(Namespace::refusal(n.as_ref(), "mkdir")),
        }
        self.lookup(parent, name)
    }

    pub fn rmdir(&self, parent: u64, name: &str) -> Result<()> {
        self.writable("rmdir")?;
        let path = self.child(parent, name)?;
        let node = Node::parse(&path);
        match &node {
            Some(n @ Node::Snap(..)) => self.ns.rmdir(n)?,
            n => return Err(Namespace::refusal(n.as_ref(), "rmdir")),
        }
        lock(&self.inodes).unlink(&path);
        Ok(())
    }

    pub fn unlink(&self, parent: u64, name: &str) -> Result<()> {
        self.writable("unlink")?;
        let path = self.child(parent, name)?;
        match &Node::parse(&path) {
            Some(n @ (Node::LaunchLink(_) | Node::ObjLink(..) | Node::Current(_))) => {
                self.ns.unlink(n)?
            }
            n => return Err(Namespace::refusal(n.as_ref(), "unlink")),
        }
        lock(&self.inodes).unlink(&path);
        Ok(())
    }

    pub fn symlink(&self, parent: u64, name: &str, target: &str) -> Result<Attr> {
        self.writable("symlink")?;
        let path = self.child(parent, name)?;
        match &Node::parse(&path) {
            Some(n @ (Node::LaunchLink(_) | Node::ObjLink(..) | Node::Current(_))) => {
                self.ns.symlink(n, name, target)?
            }
            n => return Err(Namespace::refusal(n.as_ref(), "symlink")),
        }
        match self.lookup(parent, name) {
            // Several hosts: `launch/<new>` made `<new>@<host>` on the snapshot's host; the
            // reply is that link (the kernel keeps it under the name given for a while).
            Err(Error::NotFound(e)) => match self.ns.launched_as(name, target) {
                Some(full) => self.lookup(parent, &full),
                None => Err(Error::NotFound(e)),
            },
            r => r,
        }
    }

    pub fn rename(&self, parent: u64, name: &str, new_parent: u64, new_name: &str) -> Result<()> {
        self.writable("rename")?;
        let from = self.child(parent, name)?;
        let to = self.child(new_parent, new_name)?;
        let (Some(a), Some(b)) = (Node::parse(&from), Node::parse(&to)) else {
            let n = Node::parse(&from).or_else(|| Node::parse(&to));
            return Err(Namespace::refusal(n.as_ref(), "rename"));
        };
        self.ns.rename(&a, &b, new_name)?;
        lock(&self.inodes).rename(&from, &to);
        Ok(())
    }

    /// EROFS for every change when the mount is read-only (`--read-only`, fstab `ro`).
    fn writable(&self, what: &str) -> Result<()> {
        if self.opts.read_only {
            return Err(Error::ReadOnly(format!("{what}: mounted read-only")));
        }
        Ok(())
    }

    /// The refusal for create, mknod, link, setattr, setxattr… on `ino` (or `parent/name`).
    pub fn refuse(&self, ino: u64, name: Option<&str>, what: &str) -> Error {
        if let Ok(At::Guest(_)) = self.at(ino) {
            return Namespace::refusal(Some(&Node::InSnapshot), what);
        }
        let path = match name {
            Some(n) => self.child(ino, n).map(Path::from),
            None => self.path(ino),
        };
        match path {
            Ok(p) => {
                // A new name directly inside a snapshot directory is inside the snapshot too.
                let node = Node::parse(&p).or_else(|| {
                    Node::parse(&p[..p.len().saturating_sub(1)]).filter(|n| n.in_snapshot())
                });
                Namespace::refusal(node.as_ref(), what)
            }
            Err(e) => e,
        }
    }

    /// Whether `ino` exists (for calls such as getxattr that only need that).
    pub fn check(&self, ino: u64) -> Result<()> {
        self.getattr(ino).map(|_| ())
    }
}

fn content_size(c: &Content) -> u64 {
    match c {
        Content::Bytes(b) => b.len() as u64,
        Content::Disk(d) => d.image.size(),
        Content::Guest(g) => g.size,
    }
}

/// SEEK_DATA/SEEK_HOLE over sorted data ranges; `offset < size` is checked by the caller.
fn seek_in_ranges(ranges: &[(u64, u64)], offset: u64, size: u64, whence: Whence) -> Result<u64> {
    match whence {
        Whence::Data => ranges
            .iter()
            .find(|(_, end)| *end > offset)
            .map(|(start, _)| (*start).max(offset))
            .ok_or(Error::NoSuchOffset),
        Whence::Hole => {
            let mut pos = offset;
            for (start, end) in ranges {
                if *start > pos {
                    break;
                }
                if *end > pos {
                    pos = *end;
                }
            }
            Ok(pos.min(size))
        }
    }
}

#[cfg(test)]
mod tests;

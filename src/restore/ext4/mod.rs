//! ext2/3/4, read with our own reader (see docs/restore.md for why not ext4-view alone): superblock,
//! group descriptors (incl. meta_bg), inodes with extent trees or block maps, inline data,
//! directories (listed linearly; names looked up through the htree index, `htree.rs`, or in a
//! linear directory block by block from the last hit), xattrs in the inode and in an xattr
//! block (and EA inodes), and in-memory jbd2 journal replay for crash-consistent images.

mod htree;
pub mod journal;

use std::collections::HashMap;
use std::sync::Mutex;

use super::bytes::{le16, le32, sub, u8at};
use super::{
    human_size, page_of_list, unix_time, ChunkCache, Dev, DirCache, DirList, DirPage, FileKind,
    FileMap, FileStat, GuestFs, PageFill, Place, INDEX_COOKIE,
};
use crate::error::{Error, Result};

const ROOT: u64 = 2;
/// Deepest extent tree the format allows.
const MAX_EXTENT_DEPTH: u16 = 5;
/// Largest directory we read (bytes): bounds memory on a corrupt size.
const MAX_DIR_BYTES: u64 = 256 << 20;
/// Directories larger than this are listed by pages of their blocks, smaller ones whole
/// (cached with the reader's listings, which the directory read-ahead fills, and on the
/// worker's daemon side up to 16,384 entries, whose lookups are then read ahead in batches:
/// `du` and `find` look names up in listing order).
const PAGED_DIR_BYTES: u64 = 1 << 20;
/// A paged directory's cookie: logical block << this | byte offset in the block (blocks are
/// at most 64 KiB, and an offset may be the block's size: the next block).
const COOKIE_SHIFT: u32 = 17;
/// How many blocks of a paged directory's map are looked up at once.
const PAGE_WINDOW_BLOCKS: u64 = 16;
/// Largest xattr value or symlink we read.
const MAX_VALUE: u64 = 64 << 10;
/// Metadata blocks are read in aligned chunks of this size and this many chunks are kept
/// (2 MiB per filesystem). A cold find over a Debian root: 4,779 reads of 4 KiB without,
/// 210 with 256 KiB chunks. But a huge directory's subdirectories have their blocks spread
/// over the disk, and each cold 256 KiB read then brought one useful block: cold find of
/// 10,000 subdirectories 5.2 s with 256 KiB x 8, 1.2 s with 64 KiB x 32 (kernel 0.24-0.35 s).
/// Since issue 19's profile the cache reads a scattered block alone and a chunk whole only
/// once it is read in sequence ([`ChunkCache`]): 64 KiB per subdirectory before.
const META_CHUNK: u64 = 64 << 10;
const META_CHUNKS: usize = 32;

const INCOMPAT_RECOVER: u32 = 0x4;
const INCOMPAT_JOURNAL_DEV: u32 = 0x8;
const INCOMPAT_META_BG: u32 = 0x10;
const INCOMPAT_64BIT: u32 = 0x80;
const INCOMPAT_LARGEDIR: u32 = 0x4000;
const COMPAT_DIR_INDEX: u32 = 0x20;
/// `s_flags`: directory hashes use unsigned `char`.
const FLAGS_UNSIGNED_HASH: u32 = 0x2;
const RO_COMPAT_SPARSE_SUPER: u32 = 0x1;
const RO_COMPAT_HUGE_FILE: u32 = 0x8;

const FL_HUGE_FILE: u32 = 0x4_0000;
const FL_EXTENTS: u32 = 0x8_0000;
const FL_EA_INODE: u32 = 0x20_0000;
const FL_INLINE_DATA: u32 = 0x1000_0000;
const FL_ENCRYPT: u32 = 0x800;
const FL_INDEX: u32 = 0x1000;
const FL_CASEFOLD: u32 = 0x4000_0000;

/// Called with (name, inode, dirent file type, the whole record) per directory entry; false
/// stops the walk.
type DirentVisitor<'a> = dyn FnMut(&[u8], u64, u8, &[u8]) -> Result<bool> + 'a;
/// (name, inode, dirent file type, the whole record, where the entry ends in its block) → go on.
type DirentAtVisitor<'a> = dyn FnMut(&[u8], u64, u8, &[u8], usize) -> Result<bool> + 'a;

/// Stored hashes of an encrypted and casefolded directory's entries, by ciphertext name.
type StoredHashes = HashMap<Vec<u8>, (u32, u32)>;

/// (name index, name without prefix, value) as stored.
type RawXattr = (u8, Vec<u8>, Vec<u8>);

pub struct Ext4Fs {
    dev: Dev,
    bs: u64,
    blocks: u64,
    inodes: u64,
    inodes_per_group: u64,
    inode_size: u64,
    ro_compat: u32,
    /// htree lookups: `dir_index` is on; the hash seed, unsigned hashes, `largedir`.
    dir_index: bool,
    hash_seed: [u32; 4],
    hash_unsigned: bool,
    largedir: bool,
    /// `s_def_hash_version`: the hash of directories without an index (no-key names).
    def_hash: u8,
    /// Inode table's first block per group.
    inode_tables: Vec<u64>,
    /// Blocks replaced by the journal replay.
    replaced: HashMap<u64, journal::Replaced>,
    /// The fast-commit replay, applied over the replaced blocks: inodes rewritten whole, block
    /// maps replaced by extent lists, and directory entries added (`Some`) or removed (`None`).
    fc_inodes: HashMap<u64, Vec<u8>>,
    fc_extents: HashMap<u64, Vec<Run>>,
    fc_dirs: HashMap<u64, FcDir>,
    label: String,
    kind: &'static str,
    note: String,
    dirs: Mutex<DirCache>,
    /// Per linear directory, the block where the last lookup found its name: the next one
    /// starts there (ext4's `i_dir_start_lookup`), so lookups in listing order cost one block.
    start_lookup: Mutex<lru::LruCache<u64, u64>>,
    meta: ChunkCache,
}

/// Linear directories whose last lookup position is remembered.
const START_LOOKUPS: usize = 4096;

/// A directory's entries as fast-commit replay changed them: name → (inode, dirent file type),
/// or `None` for a name it removed.
type FcDir = HashMap<Vec<u8>, Option<(u64, u8)>>;

/// An inode's on-disk bytes, decoded on demand.
struct Inode {
    ino: u64,
    raw: Vec<u8>,
}

impl Inode {
    fn mode(&self) -> u16 {
        le16(&self.raw, 0)
    }
    fn flags(&self) -> u32 {
        le32(&self.raw, 0x20)
    }
    fn size(&self) -> u64 {
        u64::from(le32(&self.raw, 0x4)) | (u64::from(le32(&self.raw, 0x6C)) << 32)
    }
    fn i_block(&self) -> &[u8] {
        sub(&self.raw, 0x28, 60)
    }
    fn file_acl(&self) -> u64 {
        u64::from(le32(&self.raw, 0x68)) | (u64::from(le16(&self.raw, 0x76)) << 32)
    }
    fn extra_isize(&self) -> usize {
        if self.raw.len() > 128 {
            usize::from(le16(&self.raw, 0x80))
        } else {
            0
        }
    }
    /// A timestamp: seconds at `lo`, the `_extra` word (epoch bits + nanoseconds) at `extra`.
    fn time(&self, lo: usize, extra: usize) -> std::time::SystemTime {
        let secs = i64::from(le32(&self.raw, lo) as i32);
        let (secs, nanos) = if 128 + self.extra_isize() >= extra + 4 && self.raw.len() >= extra + 4
        {
            let x = le32(&self.raw, extra);
            (secs + (i64::from(x & 3) << 32), x >> 2)
        } else {
            (secs, 0)
        };
        unix_time(secs, nanos)
    }
    fn kind(&self) -> Option<FileKind> {
        Some(match self.mode() & 0xF000 {
            0x4000 => FileKind::Dir,
            0x8000 => FileKind::File,
            0xA000 => FileKind::Symlink,
            0x1000 => FileKind::Fifo,
            0xC000 => FileKind::Socket,
            0x2000 => FileKind::CharDev,
            0x6000 => FileKind::BlockDev,
            _ => return None,
        })
    }
}

fn kind_from_dirent(t: u8) -> Option<FileKind> {
    Some(match t {
        1 => FileKind::File,
        2 => FileKind::Dir,
        3 => FileKind::CharDev,
        4 => FileKind::BlockDev,
        5 => FileKind::Fifo,
        6 => FileKind::Socket,
        7 => FileKind::Symlink,
        _ => return None,
    })
}

/// A run of a file's blocks: logical start, physical start (0 = hole), length, uninitialized.
#[derive(Clone, Copy, Debug)]
struct Run {
    logical: u64,
    physical: u64,
    len: u64,
    uninit: bool,
}

impl Ext4Fs {
    pub fn open(dev: Dev) -> Result<Ext4Fs> {
        let sb = dev.read_vec(1024, 1024)?;
        let c = |what: &str| dev.corrupt(1024, format!("ext4 superblock: {what}"));
        if le16(&sb, 56) != 0xEF53 {
            return Err(c("bad magic"));
        }
        let log_bs = le32(&sb, 24);
        if log_bs > 6 {
            return Err(c("block size"));
        }
        let bs = 1024u64 << log_bs;
        let incompat = le32(&sb, 0x60);
        let ro_compat = le32(&sb, 0x64);
        let compat = le32(&sb, 0x5C);
        let blocks = u64::from(le32(&sb, 4))
            | if incompat & INCOMPAT_64BIT != 0 {
                u64::from(le32(&sb, 0x150)) << 32
            } else {
                0
            };
        let inodes = u64::from(le32(&sb, 0));
        let blocks_per_group = u64::from(le32(&sb, 32));
        let inodes_per_group = u64::from(le32(&sb, 40));
        let first_data_block = u64::from(le32(&sb, 20));
        let rev = le32(&sb, 76);
        let inode_size = if rev == 0 {
            128
        } else {
            u64::from(le16(&sb, 88))
        };
        if blocks_per_group == 0 || inodes_per_group == 0 || inodes == 0 {
            return Err(c("zero group size"));
        }
        if !(128..=bs).contains(&inode_size) || !inode_size.is_power_of_two() {
            return Err(c("inode size"));
        }
        if blocks.checked_mul(bs).is_none_or(|b| b > dev.len()) {
            crate::input_warn!(
                dev.name(),
                "ext4 block count exceeds the partition; reads past its end will fail"
            );
        }
        let groups = blocks
            .saturating_sub(first_data_block)
            .div_ceil(blocks_per_group);
        if groups == 0
            || groups > (1 << 24)
            || groups
                .checked_mul(inodes_per_group)
                .is_none_or(|n| n < inodes)
        {
            return Err(c("group count"));
        }
        let desc_size = if incompat & INCOMPAT_64BIT != 0 {
            u64::from(le16(&sb, 0xFE)).max(32)
        } else {
            32
        };
        if desc_size > bs || !desc_size.is_power_of_two() {
            return Err(c("descriptor size"));
        }
        let label_raw = sub(&sb, 0x78, 16);
        let label_end = label_raw
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(label_raw.len());
        let label = String::from_utf8_lossy(&label_raw[..label_end]).into_owned();
        let kind = if incompat & 0x40 != 0 || incompat & INCOMPAT_64BIT != 0 || ro_compat & 0x8 != 0
        {
            "ext4"
        } else if compat & 0x4 != 0 {
            "ext3"
        } else {
            "ext2"
        };

        let mut fs = Ext4Fs {
            dev,
            bs,
            blocks,
            inodes,
            inodes_per_group,
            inode_size,
            ro_compat,
            dir_index: compat & COMPAT_DIR_INDEX != 0,
            hash_seed: [
                le32(&sb, 0xEC),
                le32(&sb, 0xF0),
                le32(&sb, 0xF4),
                le32(&sb, 0xF8),
            ],
            hash_unsigned: le32(&sb, 0x160) & FLAGS_UNSIGNED_HASH != 0,
            largedir: incompat & INCOMPAT_LARGEDIR != 0,
            def_hash: u8at(&sb, 0xFC),
            inode_tables: Vec::new(),
            replaced: HashMap::new(),
            fc_inodes: HashMap::new(),
            fc_extents: HashMap::new(),
            fc_dirs: HashMap::new(),
            label,
            kind,
            note: String::new(),
            dirs: Mutex::new(DirCache::default()),
            start_lookup: Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(START_LOOKUPS).unwrap_or(std::num::NonZeroUsize::MIN),
            )),
            meta: ChunkCache::new(META_CHUNK.max(bs), META_CHUNKS),
        };
        let layout = GdtLayout {
            groups,
            desc_size,
            first_data_block,
            blocks_per_group,
            incompat,
            ro_compat,
            first_meta_bg: u64::from(le32(&sb, 0x104)),
        };
        fs.inode_tables = fs.read_gdt(&layout)?;

        // Journal: replay in memory when the filesystem was not cleanly unmounted.
        let journal_inum = u64::from(le32(&sb, 0xE0));
        if incompat & INCOMPAT_RECOVER != 0 {
            if incompat & INCOMPAT_JOURNAL_DEV != 0 || journal_inum == 0 {
                fs.note = "needs recovery from an external journal: read without replay".into();
                crate::input_warn!(fs.dev.name(), "ext4 has an external journal; not replayed");
            } else {
                // e2fsck's rule: a journal inode that cannot be used gives way to the copy of
                // its block map (or extent root) and size kept in the superblock.
                let mut from = "";
                let mut outcome = fs
                    .inode(journal_inum)
                    .and_then(|ji| fs.journal_outcome(&ji));
                if let (Err(e), Some(ji)) = (&outcome, journal_backup(&sb, journal_inum)) {
                    tracing::warn!(part = fs.dev.name(), error = %e, "ext4 journal inode unusable; trying the superblock's s_jnl_blocks");
                    if let Ok(o) = fs.journal_outcome(&ji) {
                        from = " from the superblock's copy of the journal inode";
                        outcome = Ok(o);
                    }
                }
                match outcome {
                    Ok(journal::Outcome::Clean) => {
                        fs.note = format!("needs recovery, but the journal{from} is empty");
                    }
                    Ok(journal::Outcome::Replay(r)) => {
                        let n = r.transactions;
                        fs.replaced = r.map;
                        // Group descriptors may be among the replaced blocks.
                        fs.inode_tables = fs.read_gdt(&layout)?;
                        let mut note =
                            format!("journal replayed in memory ({n} transactions{from}");
                        if !r.fast_commit.is_empty() {
                            let total = r.fast_commit.len();
                            let (done, err) = fs.apply_fast_commit(&r.fast_commit);
                            note.push_str(&format!(", {done} fast-commit tags"));
                            if let Some(e) = err {
                                note.push_str(&format!(
                                    "; fast-commit tag {} of {total} not applied ({e}), nor any after it",
                                    done + 1
                                ));
                            }
                        }
                        note.push(')');
                        if !r.notes.is_empty() {
                            note.push_str(&format!("; not replayed: {}", r.notes.join("; ")));
                        }
                        tracing::info!(
                            part = fs.dev.name(),
                            transactions = n,
                            what = %note,
                            "ext4 journal replayed in memory"
                        );
                        fs.note = note;
                    }
                    Ok(journal::Outcome::Refused(why)) => {
                        fs.note = format!(
                            "journal not replayed ({why}): read as on disk, as Linux and e2fsck \
                             leave it, so the last changes before the snapshot may be missing"
                        );
                        crate::input_warn!(fs.dev.name(), "ext4 journal not replayed: {why}");
                    }
                    Err(e) => {
                        fs.note = format!("journal unreadable ({e}): read without replay");
                        crate::input_warn!(fs.dev.name(), "ext4 journal not replayed: {e}");
                    }
                }
            }
        }
        if fs.inode_tables.len() as u64 * fs.inodes_per_group < fs.inodes {
            return Err(fs.dev.corrupt(1024, "ext4: fewer groups than inodes need"));
        }
        let root = fs.inode(ROOT)?;
        if root.kind() != Some(FileKind::Dir) {
            return Err(fs.dev.corrupt(0, "ext4: root inode is not a directory"));
        }
        Ok(fs)
    }

    fn read_gdt(&self, l: &GdtLayout) -> Result<Vec<u64>> {
        let per_block = self.bs / l.desc_size;
        let gdt_blocks = l.groups.div_ceil(per_block);
        let mut tables = Vec::with_capacity(l.groups as usize);
        for gb in 0..gdt_blocks {
            // The superblock's own block (1 with 1 KiB blocks, else 0), as Linux's
            // ext4_descriptor_loc: not s_first_data_block, which bigalloc sets to 0 even with
            // 1 KiB blocks (the descriptors are then at block 2, not at the superblock's 1).
            let sb_block = 1024 / self.bs;
            let block = if l.incompat & INCOMPAT_META_BG != 0 && gb >= l.first_meta_bg {
                // meta_bg: the descriptors of a metagroup live in its first group.
                let g = gb * per_block;
                let extra = u64::from(self.bs == 1024 && g == 0 && l.first_data_block == 0);
                l.first_data_block + g * l.blocks_per_group + u64::from(l.has_super(g)) + extra
            } else {
                sb_block + 1 + gb
            };
            let b = self.block(block)?;
            for i in 0..per_block {
                if tables.len() as u64 >= l.groups {
                    break;
                }
                let d = sub(&b, (i * l.desc_size) as usize, l.desc_size as usize);
                let mut t = u64::from(le32(d, 8));
                if l.desc_size >= 64 {
                    t |= u64::from(le32(d, 0x28)) << 32;
                }
                tables.push(t);
            }
        }
        Ok(tables)
    }

    /// What recovery makes of the journal in inode `ji`, which must be usable as e2fsck's
    /// `e2fsck_get_journal` requires: a linked regular file, not encrypted, at least 1,024
    /// blocks, every block up to its size mapped inside the filesystem (block map or extents).
    fn journal_outcome(&self, ji: &Inode) -> Result<journal::Outcome> {
        let bad = |what: &str| self.corrupt_ino(ji.ino, format!("journal inode {what}"));
        if le16(&ji.raw, 0x1A) == 0 || ji.kind() != Some(FileKind::File) {
            return Err(bad("is not a linked regular file"));
        }
        if ji.flags() & FL_ENCRYPT != 0 {
            return Err(bad("is encrypted"));
        }
        let len = ji.size() / self.bs;
        if len < 1024 {
            return Err(bad("is too small"));
        }
        if len > 1 << 24 {
            return Err(bad("is too large"));
        }
        let runs = self.runs(ji, 0, len)?;
        let mut next = 0u64;
        for r in &runs {
            if r.logical != next || r.physical == 0 {
                break;
            }
            next = r.logical + r.len;
        }
        if next < len {
            return Err(bad(&format!("maps {next} of its {len} blocks")));
        }
        let jb = JournalReader { fs: self, runs };
        journal::replay(&jb, len)
    }

    /// Apply the fast-commit tags as e2fsck's `ext4_fc_replay` does, in memory. Returns how many
    /// were applied and, when one fails (e2fsck stops there), why.
    fn apply_fast_commit(&mut self, tags: &[journal::FcTag]) -> (usize, Option<String>) {
        for (i, t) in tags.iter().enumerate() {
            if let Err(e) = self.apply_fc_tag(t) {
                crate::input_warn!(
                    self.dev.name(),
                    "ext4 fast-commit tag {} ({t:?}) not applied: {e}; replay stops there",
                    i + 1
                );
                return (i, Some(e.to_string()));
            }
        }
        (tags.len(), None)
    }

    fn apply_fc_tag(&mut self, t: &journal::FcTag) -> Result<()> {
        use journal::FcTag;
        match t {
            FcTag::AddRange {
                ino,
                lblk,
                len,
                pblk,
                uninit,
            } => {
                let ino = u64::from(*ino);
                let mut list = self.fc_extent_list(ino)?;
                let (lblk, len) = (u64::from(*lblk), u64::from(*len));
                punch(&mut list, lblk, len);
                if len > 0 {
                    if pblk.checked_add(len).is_none_or(|e| e > self.blocks) {
                        return Err(self.corrupt_ino(ino, "fast-commit extent past the end"));
                    }
                    list.push(Run {
                        logical: lblk,
                        physical: *pblk,
                        len,
                        uninit: *uninit,
                    });
                }
                merge_runs(&mut list);
                self.fc_extents.insert(ino, list);
            }
            FcTag::DelRange { ino, lblk, len } => {
                let ino = u64::from(*ino);
                let mut list = self.fc_extent_list(ino)?;
                punch(&mut list, u64::from(*lblk), u64::from(*len));
                merge_runs(&mut list);
                self.fc_extents.insert(ino, list);
            }
            FcTag::Inode { ino, raw } => {
                let ino = u64::from(*ino);
                let cur = self.inode(ino)?.raw;
                let mut inode_len = 128usize;
                if self.inode_size > 128 {
                    let extra = usize::from(le16(raw, 0x80));
                    if extra < 4 || extra as u64 > self.inode_size - 128 {
                        return Err(self.corrupt_ino(ino, "fast-commit inode has a bad extra size"));
                    }
                    inode_len += extra;
                }
                if raw.len() < inode_len {
                    return Err(self.corrupt_ino(ino, "fast-commit inode is truncated"));
                }
                // Everything but i_block comes from the tag; i_block stays as it was (the
                // extent list replaces the tree), except for inline data.
                let mut new = cur.clone();
                new[..0x28].copy_from_slice(&raw[..0x28]);
                new[0x64..inode_len].copy_from_slice(&raw[0x64..inode_len]);
                let flags = le32(&new, 0x20);
                if flags & FL_EXTENTS != 0 {
                    if le16(&cur, 0x28) != 0xF30A {
                        new[0x28..0x64].fill(0);
                        new[0x28..0x2A].copy_from_slice(&0xF30Au16.to_le_bytes());
                        new[0x2C..0x2E].copy_from_slice(&4u16.to_le_bytes());
                    }
                } else if flags & FL_INLINE_DATA != 0 {
                    new[0x28..0x64].copy_from_slice(&raw[0x28..0x64]);
                }
                self.fc_inodes.insert(ino, new);
            }
            FcTag::Link { parent, ino, name } => {
                let (parent, ino) = (u64::from(*parent), u64::from(*ino));
                let ftype = match self.inode(ino)?.kind() {
                    Some(FileKind::File) => 1,
                    Some(FileKind::Dir) => 2,
                    Some(FileKind::CharDev) => 3,
                    Some(FileKind::BlockDev) => 4,
                    Some(FileKind::Fifo) => 5,
                    Some(FileKind::Socket) => 6,
                    Some(FileKind::Symlink) => 7,
                    None => return Err(self.corrupt_ino(ino, "fast-commit link of no file type")),
                };
                if self.inode(parent)?.kind() != Some(FileKind::Dir) {
                    return Err(Error::NotDir(format!("ext4 inode {parent}")));
                }
                // ext2fs_link walks the directory's blocks: a corrupt one fails the link
                // (checked once per directory: a walk can be long).
                if !self.fc_dirs.contains_key(&parent) {
                    self.read_dir(parent)?;
                }
                self.fc_dirs
                    .entry(parent)
                    .or_default()
                    .insert(name.clone(), Some((ino, ftype)));
            }
            FcTag::Unlink { parent, ino, name } => {
                let (parent, ino) = (u64::from(*parent), u64::from(*ino));
                match self.entry_of(parent, name)? {
                    Some(found) if ino == 0 || found == ino => {
                        self.fc_dirs
                            .entry(parent)
                            .or_default()
                            .insert(name.clone(), None);
                    }
                    _ => {
                        return Err(Error::NotFound(format!(
                            "fast-commit unlink of {} in directory {parent}",
                            String::from_utf8_lossy(name)
                        )))
                    }
                }
            }
            FcTag::Tail => {}
        }
        Ok(())
    }

    /// The extent list of an inode for fast-commit replay: the one replay keeps, else its map.
    fn fc_extent_list(&self, ino: u64) -> Result<Vec<Run>> {
        if let Some(l) = self.fc_extents.get(&ino) {
            return Ok(l.clone());
        }
        let inode = self.inode(ino)?;
        Ok(self
            .runs(&inode, 0, 1 << 32)?
            .into_iter()
            .filter(|r| r.physical != 0)
            .collect())
    }

    /// The inode named `name` in directory `dir` now (fast-commit entries first).
    fn entry_of(&self, dir: u64, name: &[u8]) -> Result<Option<u64>> {
        if let Some(e) = self.fc_dirs.get(&dir).and_then(|d| d.get(name)) {
            return Ok(e.map(|(ino, _)| ino));
        }
        let found = match self.find_indexed(dir, name) {
            Ok(Some(ino)) => Ok(ino),
            Ok(None) => self.find_linear(dir, name),
            Err(e) => Err(e),
        };
        match found {
            Ok(ino) => Ok(Some(ino)),
            Err(Error::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// One filesystem block, through the journal replay map.
    fn block(&self, n: u64) -> Result<Vec<u8>> {
        if n >= self.blocks {
            return Err(self.dev.corrupt(
                n.saturating_mul(self.bs),
                format!("ext4 block {n} past the end"),
            ));
        }
        let (phys, escaped) = match self.replaced.get(&n) {
            Some(r) => (r.block, r.escaped),
            None => (n, false),
        };
        let mut b = self.raw_block(phys)?;
        if escaped {
            journal::unescape(&mut b);
        }
        Ok(b)
    }

    /// `len` bytes from `start` of block `n` (within the block), through the journal replay
    /// map: an inode is read alone, not its whole block.
    fn block_part(&self, n: u64, start: u64, len: u64) -> Result<Vec<u8>> {
        let len = len.min(self.bs.saturating_sub(start));
        if self.replaced.contains_key(&n) || n >= self.blocks {
            let b = self.block(n)?;
            return Ok(sub(&b, start as usize, len as usize).to_vec());
        }
        let off = n
            .checked_mul(self.bs)
            .and_then(|o| o.checked_add(start))
            .ok_or_else(|| self.dev.corrupt(0, format!("ext4 block {n} overflows")))?;
        let mut b = vec![0u8; len as usize];
        self.meta.read(&self.dev, off, &mut b)?;
        Ok(b)
    }

    fn raw_block(&self, n: u64) -> Result<Vec<u8>> {
        let off = n
            .checked_mul(self.bs)
            .ok_or_else(|| self.dev.corrupt(0, format!("ext4 block {n} overflows")))?;
        let mut b = vec![0u8; self.bs as usize];
        self.meta.read(&self.dev, off, &mut b)?;
        Ok(b)
    }

    fn inode(&self, ino: u64) -> Result<Inode> {
        if ino == 0 || ino > self.inodes {
            return Err(self
                .dev
                .corrupt(0, format!("ext4 inode number {ino} out of range")));
        }
        if let Some(raw) = self.fc_inodes.get(&ino) {
            return Ok(Inode {
                ino,
                raw: raw.clone(),
            });
        }
        let idx = ino - 1;
        let group = (idx / self.inodes_per_group) as usize;
        let table = *self.inode_tables.get(group).ok_or_else(|| {
            self.dev
                .corrupt(0, format!("ext4 inode {ino}: no group {group}"))
        })?;
        let byte = (idx % self.inodes_per_group) * self.inode_size;
        let block = table
            .checked_add(byte / self.bs)
            .ok_or_else(|| self.dev.corrupt(0, "ext4 inode table overflows"))?;
        let start = byte % self.bs;
        let raw = self.block_part(block, start, self.inode_size.min(self.bs - start))?;
        if raw.len() < 128 {
            return Err(self
                .dev
                .corrupt(block * self.bs, format!("ext4 inode {ino} truncated")));
        }
        Ok(Inode { ino, raw })
    }

    fn corrupt_ino(&self, ino: u64, what: impl std::fmt::Display) -> Error {
        self.dev.corrupt(0, format!("ext4 inode {ino}: {what}"))
    }

    /// The block runs of an inode covering logical blocks `[from, from + count)`, in order,
    /// holes included as runs with physical 0.
    fn runs(&self, inode: &Inode, from: u64, count: u64) -> Result<Vec<Run>> {
        let mut out = Vec::new();
        if count == 0 {
            return Ok(out);
        }
        if let Some(list) = self.fc_extents.get(&inode.ino) {
            let to = from.saturating_add(count);
            for r in list {
                let (s, e) = (r.logical.max(from), (r.logical + r.len).min(to));
                if s < e {
                    out.push(Run {
                        logical: s,
                        physical: r.physical + (s - r.logical),
                        len: e - s,
                        uninit: r.uninit,
                    });
                }
            }
            return Ok(out);
        }
        if inode.flags() & FL_EXTENTS != 0 {
            let mut budget = 1u32 << 20;
            self.extent_runs(
                inode,
                inode.i_block(),
                from,
                from.saturating_add(count),
                None,
                &mut out,
                &mut budget,
            )?;
        } else {
            self.map_runs(inode, from, count, &mut out)?;
        }
        Ok(out)
    }

    #[allow(clippy::too_many_arguments)]
    fn extent_runs(
        &self,
        inode: &Inode,
        node: &[u8],
        from: u64,
        to: u64,
        want_depth: Option<u16>,
        out: &mut Vec<Run>,
        budget: &mut u32,
    ) -> Result<()> {
        if le16(node, 0) != 0xF30A {
            return Err(self.corrupt_ino(inode.ino, "bad extent header"));
        }
        let entries = usize::from(le16(node, 2));
        let depth = le16(node, 6);
        if depth > MAX_EXTENT_DEPTH || want_depth.is_some_and(|d| d != depth) {
            return Err(self.corrupt_ino(inode.ino, "bad extent tree depth"));
        }
        if 12 + entries * 12 > node.len() {
            return Err(self.corrupt_ino(inode.ino, "too many extents in a node"));
        }
        for i in 0..entries {
            *budget = budget
                .checked_sub(1)
                .ok_or_else(|| self.corrupt_ino(inode.ino, "extent tree too large"))?;
            let e = sub(node, 12 + i * 12, 12);
            let start = u64::from(le32(e, 0));
            if depth == 0 {
                let raw_len = u64::from(le16(e, 4));
                let (len, uninit) = if raw_len > 32768 {
                    (raw_len - 32768, true)
                } else {
                    (raw_len, false)
                };
                let phys = (u64::from(le16(e, 6)) << 32) | u64::from(le32(e, 8));
                let end = start + len;
                if end <= from || start >= to {
                    continue;
                }
                if phys.checked_add(len).is_none_or(|p| p > self.blocks) {
                    return Err(self.corrupt_ino(
                        inode.ino,
                        format!("extent past the end of the filesystem (block {phys})"),
                    ));
                }
                let s = start.max(from);
                let e_ = end.min(to);
                out.push(Run {
                    logical: s,
                    physical: phys + (s - start),
                    len: e_ - s,
                    uninit,
                });
            } else {
                let next_start = if i + 1 < entries {
                    u64::from(le32(node, 12 + (i + 1) * 12))
                } else {
                    u64::MAX
                };
                if next_start <= from || start >= to {
                    continue;
                }
                let leaf = (u64::from(le16(e, 8)) << 32) | u64::from(le32(e, 4));
                let child = self.block(leaf)?;
                self.extent_runs(inode, &child, from, to, Some(depth - 1), out, budget)?;
            }
        }
        Ok(())
    }

    /// ext2/3 block maps: 12 direct pointers, then single, double and triple indirect blocks.
    /// Zero pointers skip the whole subtree they cover; a budget bounds corrupt trees.
    fn map_runs(&self, inode: &Inode, from: u64, count: u64, out: &mut Vec<Run>) -> Result<()> {
        let per = self.bs / 4;
        let ib = inode.i_block();
        let to = from.saturating_add(count);
        let mut budget = 1u64 << 24;
        for i in 0..12u64 {
            let p = u64::from(le32(ib, (i * 4) as usize));
            self.map_leaf(inode, i, p, from, to, out)?;
        }
        let mut base = 12u64;
        let mut span = per;
        for (level, slot) in [(1u32, 48usize), (2, 52), (3, 56)] {
            let p = u64::from(le32(ib, slot));
            self.map_tree(inode, level, p, base, span, from, to, out, &mut budget)?;
            base += span;
            span = span.saturating_mul(per);
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn map_tree(
        &self,
        inode: &Inode,
        level: u32,
        block: u64,
        base: u64,
        span: u64,
        from: u64,
        to: u64,
        out: &mut Vec<Run>,
        budget: &mut u64,
    ) -> Result<()> {
        if block == 0 || base >= to || base.saturating_add(span) <= from {
            return Ok(());
        }
        let b = self.block(block)?;
        let per = self.bs / 4;
        let child_span = span / per;
        for i in 0..per {
            *budget = budget
                .checked_sub(1)
                .ok_or_else(|| self.corrupt_ino(inode.ino, "block map too large"))?;
            let p = u64::from(le32(&b, (i * 4) as usize));
            let cbase = base + i * child_span;
            if cbase >= to {
                break;
            }
            if level == 1 {
                self.map_leaf(inode, cbase, p, from, to, out)?;
            } else {
                self.map_tree(
                    inode,
                    level - 1,
                    p,
                    cbase,
                    child_span,
                    from,
                    to,
                    out,
                    budget,
                )?;
            }
        }
        Ok(())
    }

    fn map_leaf(
        &self,
        inode: &Inode,
        lblk: u64,
        phys: u64,
        from: u64,
        to: u64,
        out: &mut Vec<Run>,
    ) -> Result<()> {
        if lblk < from || lblk >= to || phys == 0 {
            return Ok(());
        }
        if phys >= self.blocks {
            return Err(self.corrupt_ino(inode.ino, format!("block pointer {phys} past the end")));
        }
        match out.last_mut() {
            Some(r) if r.logical + r.len == lblk && r.physical + r.len == phys => r.len += 1,
            _ => out.push(Run {
                logical: lblk,
                physical: phys,
                len: 1,
                uninit: false,
            }),
        }
        Ok(())
    }

    /// Bytes `[offset, offset+buf.len())` of an inode's data (extents, block map or inline).
    fn read_data(&self, inode: &Inode, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let size = inode.size();
        if offset >= size {
            return Ok(0);
        }
        let want = (buf.len() as u64).min(size - offset) as usize;
        if want == 0 {
            return Ok(0);
        }
        let buf = &mut buf[..want];
        if inode.flags() & FL_INLINE_DATA != 0 {
            let data = self.inline_data(inode)?;
            buf.fill(0);
            let start = offset as usize;
            if start < data.len() {
                let n = (data.len() - start).min(want);
                buf[..n].copy_from_slice(&data[start..start + n]);
            }
            return Ok(want);
        }
        let first = offset / self.bs;
        let last = (offset + want as u64 - 1) / self.bs;
        let runs = self.runs(inode, first, last - first + 1)?;
        buf.fill(0);
        let end = offset + want as u64;
        for r in runs {
            if r.physical == 0 || r.uninit {
                continue;
            }
            // The bytes of the request this run covers, in the file and on disk.
            let s = (r.logical * self.bs).max(offset);
            let e = ((r.logical + r.len) * self.bs).min(end);
            if s >= e {
                continue;
            }
            let first_phys = r.physical + (s / self.bs - r.logical);
            let last_phys = r.physical + ((e - 1) / self.bs - r.logical);
            let dst = buf
                .get_mut((s - offset) as usize..(e - offset) as usize)
                .ok_or_else(|| self.corrupt_ino(inode.ino, "extent arithmetic"))?;
            let journaled = !self.replaced.is_empty()
                && (first_phys..=last_phys).any(|b| self.replaced.contains_key(&b));
            if !journaled {
                // One read for the whole contiguous stretch.
                let disk = first_phys * self.bs + s % self.bs;
                self.dev.read_exact_at(disk, dst)?;
                continue;
            }
            let mut pos = s;
            while pos < e {
                let b = self.block(r.physical + (pos / self.bs - r.logical))?;
                let n = (self.bs - pos % self.bs).min(e - pos);
                let src = sub(&b, (pos % self.bs) as usize, n as usize);
                let at = (pos - s) as usize;
                if let Some(d) = dst.get_mut(at..at + src.len()) {
                    d.copy_from_slice(src);
                }
                pos += n;
            }
        }
        Ok(want)
    }

    /// Inline data: the 60 bytes of i_block, continued in the `system.data` xattr.
    fn inline_data(&self, inode: &Inode) -> Result<Vec<u8>> {
        let mut d = inode.i_block().to_vec();
        for (idx, name, value) in self.raw_xattrs(inode)? {
            if idx == 7 && name == b"data" {
                d.extend_from_slice(&value);
            }
        }
        d.truncate(inode.size() as usize);
        Ok(d)
    }

    fn dir_entries(&self, ino: u64) -> Result<DirList> {
        DirCache::get_or_read(&self.dirs, ino, || self.read_dir(ino))
    }

    /// `name` in directory `dir` through its htree index: `Some(inode)`, `NotFound`, or `None`
    /// when the directory has no index we can use (search its listing instead).
    fn find_indexed(&self, dir: u64, name: &[u8]) -> Result<Option<u64>> {
        if !self.dir_index {
            return Ok(None);
        }
        let inode = self.inode(dir)?;
        let flags = inode.flags();
        // Casefolded and encrypted names are hashed in a form we do not compute.
        if inode.kind() != Some(FileKind::Dir)
            || flags & FL_INDEX == 0
            || flags & (FL_INLINE_DATA | FL_ENCRYPT | FL_CASEFOLD) != 0
        {
            return Ok(None);
        }
        let nblocks = inode.size() / self.bs;
        let read = |lblk: u32| -> Option<Vec<u8>> {
            let lblk = u64::from(lblk);
            if lblk >= nblocks {
                return None;
            }
            let run = self.runs(&inode, lblk, 1).ok()?.into_iter().next()?;
            (run.physical != 0 && !run.uninit)
                .then(|| self.block(run.physical))?
                .ok()
        };
        let Some(root) = read(0) else {
            return Ok(None);
        };
        let search = |b: &[u8]| -> Option<Result<u64>> {
            let mut found = None;
            match self.visit_dirents(dir, b, false, &mut |n, ino, _, _| {
                if n == name {
                    found = Some(ino);
                    Ok(false)
                } else {
                    Ok(true)
                }
            }) {
                Ok(()) => found.map(Ok),
                Err(e) => Some(Err(e)),
            }
        };
        match htree::find(
            &root,
            name,
            &self.hash_seed,
            self.hash_unsigned,
            self.largedir,
            read,
            search,
        ) {
            htree::Found::Yes(r) => r.map(Some),
            htree::Found::No => Err(Error::NotFound(String::from_utf8_lossy(name).into_owned())),
            htree::Found::Linear => Ok(None),
        }
    }

    /// `name` in directory `dir` by reading its blocks in turn from where the last lookup in
    /// it succeeded, never the whole listing at once (inline directories: their listing).
    fn find_linear(&self, dir: u64, name: &[u8]) -> Result<u64> {
        let not_found = || Error::NotFound(String::from_utf8_lossy(name).into_owned());
        let inode = self.inode(dir)?;
        if inode.kind() != Some(FileKind::Dir) {
            return Err(Error::NotDir(format!("ext4 inode {dir}")));
        }
        // Inline directories, and encrypted ones (whose listed names are encoded).
        if inode.flags() & (FL_INLINE_DATA | FL_ENCRYPT) != 0 {
            return DirCache::find(&self.dirs, dir, name, false, || self.read_dir(dir));
        }
        let size = inode.size();
        if size > MAX_DIR_BYTES {
            return Err(self.corrupt_ino(dir, "directory too large"));
        }
        // The directory's mapped blocks, numbered 0.. in file order (holes hold no entries):
        // (first number, physical block) per run.
        let mut flat: Vec<(u64, u64)> = Vec::new();
        let mut mapped_blocks = 0u64;
        for r in self.runs(&inode, 0, size.div_ceil(self.bs))? {
            if r.physical != 0 && !r.uninit {
                flat.push((mapped_blocks, r.physical));
                mapped_blocks += r.len;
            }
        }
        let start = self
            .start_lookup
            .lock()
            .ok()
            .and_then(|mut c| c.get(&dir).copied())
            .filter(|&s| s < mapped_blocks)
            .unwrap_or(0);
        for i in 0..mapped_blocks {
            let k = (start + i) % mapped_blocks;
            let at = flat.partition_point(|&(first, _)| first <= k);
            let Some(&(first, phys)) = at.checked_sub(1).and_then(|i| flat.get(i)) else {
                break;
            };
            let b = self.block(phys + (k - first))?;
            let mut found = None;
            self.visit_dirents(dir, &b, false, &mut |n, ino, _, _| {
                if n == name {
                    found = Some(ino);
                }
                Ok(found.is_none())
            })?;
            if let Some(ino) = found {
                if let Ok(mut c) = self.start_lookup.lock() {
                    c.put(dir, k);
                }
                return Ok(ino);
            }
        }
        Err(not_found())
    }

    /// `name` in casefolded directory `dir` as Linux matches it (`ext4_match` with
    /// `utf8_strncasecmp_folded`): the names' canonical caseless forms (NFD, full case folding,
    /// NFD again) are equal; a name that is not UTF-8 matches only itself, as Linux without
    /// the strict encoding flag. Asked only after the exact name was not found (what `find`
    /// and `ls` look up is the stored name), so the walk over the cached listing is the cost
    /// of a name typed in another case alone. Encrypted casefolded directories are listed
    /// (and looked up) by their no-key names only.
    fn find_folded(&self, dir: u64, name: &[u8]) -> Result<u64> {
        let not_found = || Error::NotFound(String::from_utf8_lossy(name).into_owned());
        let Some(key) = casefold(name) else {
            return Err(not_found());
        };
        let list = self.dir_entries(dir)?;
        list.iter()
            .find(|(n, _, _)| casefold(n).as_deref() == Some(key.as_str()))
            .map(|&(_, ino, _)| ino)
            .ok_or_else(not_found)
    }

    /// Whether directory `inode` is listed by pages of its blocks ([`Self::block_page`]):
    /// one larger than [`PAGED_DIR_BYTES`] in blocks, its names as stored. Inline and
    /// encrypted directories (no-key names) and those a fast commit changed are listed whole.
    fn paged(&self, inode: &Inode) -> bool {
        inode.kind() == Some(FileKind::Dir)
            && inode.size() > PAGED_DIR_BYTES
            && inode.flags() & (FL_INLINE_DATA | FL_ENCRYPT) == 0
            && !self.fc_dirs.contains_key(&inode.ino)
    }

    /// A page of a paged directory from cookie `cookie`: the logical block shifted left by
    /// [`COOKIE_SHIFT`], plus the byte offset in the block of the next entry. Blocks are read
    /// in logical order, htree directories too (their index blocks hold no names): every
    /// name once, and a cookie stays valid however the pages were cut (docs/restore.md).
    fn block_page(&self, inode: &Inode, cookie: u64, budget: usize) -> Result<DirPage> {
        let dir = inode.ino;
        let size = inode.size();
        if size > MAX_DIR_BYTES {
            return Err(self.corrupt_ino(dir, "directory too large"));
        }
        let nblocks = size.div_ceil(self.bs);
        let (mut lblk, mut skip) = (cookie >> COOKIE_SHIFT, cookie & ((1 << COOKIE_SHIFT) - 1));
        if skip >= self.bs {
            (lblk, skip) = (lblk + 1, 0);
        }
        let mut fill = PageFill::new(budget);
        if lblk >= nblocks {
            fill.page.end = true;
            return Ok(fill.page);
        }
        // The block map a window at a time: a page needs a block or two, not the map of the
        // rest of a directory of thousands of extents.
        let mut at = lblk;
        while at < nblocks {
            let to = nblocks.min(at + PAGE_WINDOW_BLOCKS);
            for r in self.runs(inode, at, to - at)? {
                if r.physical == 0 || r.uninit {
                    continue;
                }
                for k in 0..r.len {
                    let l = r.logical + k;
                    if l < at || l >= to {
                        continue;
                    }
                    let from = if l == lblk { skip as usize } else { 0 };
                    let b = self.block(r.physical + k)?;
                    let mut full = false;
                    self.visit_dirents_at(dir, &b, false, &mut |name, ino, ftype, _, end| {
                        if end <= from {
                            return Ok(true);
                        }
                        let kind = match kind_from_dirent(ftype) {
                            Some(k) => k,
                            None => self.inode(ino)?.kind().unwrap_or(FileKind::File),
                        };
                        full = !fill.push(name, ino, kind, (l << COOKIE_SHIFT) | end as u64);
                        Ok(!full)
                    })?;
                    if full {
                        return Ok(fill.page);
                    }
                }
            }
            at = to;
        }
        fill.page.end = true;
        Ok(fill.page)
    }

    /// Directory `ino`'s entries as stored (see [`Self::dir_entries`] for the cached ones).
    fn read_dir(&self, ino: u64) -> Result<Vec<(Vec<u8>, u64, FileKind)>> {
        let inode = self.inode(ino)?;
        if inode.kind() != Some(FileKind::Dir) {
            return Err(Error::NotDir(format!("ext4 inode {ino}")));
        }
        let mut out = Vec::new();
        // Encrypted and casefolded: each entry stores its name's hash (Linux lists by it).
        let mut stored = (inode.flags() & (FL_ENCRYPT | FL_CASEFOLD) == FL_ENCRYPT | FL_CASEFOLD)
            .then(StoredHashes::new);
        if inode.flags() & FL_INLINE_DATA != 0 {
            let data = self.inline_data(&inode)?;
            // First 4 bytes: the parent's inode number; then entries, in i_block and system.data.
            let ib_end = data.len().min(60);
            let head = sub(&data, 4, ib_end.saturating_sub(4));
            self.parse_dirents(ino, head, &mut out, true, stored.as_mut())?;
            if data.len() > 60 {
                self.parse_dirents(ino, &data[60..], &mut out, true, stored.as_mut())?;
            }
        } else {
            let size = inode.size();
            if size > MAX_DIR_BYTES {
                return Err(self.corrupt_ino(ino, "directory too large"));
            }
            let nblocks = size.div_ceil(self.bs);
            for r in self.runs(&inode, 0, nblocks)? {
                if r.physical == 0 || r.uninit {
                    continue;
                }
                for k in 0..r.len {
                    let b = self.block(r.physical + k)?;
                    self.parse_dirents(ino, &b, &mut out, false, stored.as_mut())?;
                }
            }
        }
        if let Some(changes) = self.fc_dirs.get(&ino) {
            // Fast-commit replay: names it removed or re-linked go, the ones it links come.
            out.retain(|(n, _, _)| !changes.contains_key(n));
            for (name, e) in changes {
                if let Some((child, ftype)) = e {
                    let kind = kind_from_dirent(*ftype).unwrap_or(FileKind::File);
                    out.push((name.clone(), *child, kind));
                }
            }
        }
        if inode.flags() & FL_ENCRYPT != 0 {
            self.nokey_names(&inode, &mut out, stored.as_ref())?;
        }
        Ok(out)
    }

    /// An encrypted directory's names as Linux lists them without the key (`fscrypt_fname_
    /// disk_to_usr`): the base64url (no padding) of the name's htree hash and minor hash (the
    /// 32-bit words as stored in memory, little-endian here) followed by the ciphertext, or its
    /// first 149 bytes and the SHA-256 of the rest when longer. The hash is what `readdir`
    /// computes: of the ciphertext, with the index root's hash version in an indexed
    /// directory, `s_def_hash_version` in a one-block or inline one (both read through
    /// `ext4_dx_readdir`); zero in a linear directory of more blocks or without `dir_index`.
    /// A name shorter than one cipher block (16 bytes) is not a valid ciphertext: hidden
    /// (Linux's readdir fails with EUCLEAN there). A directory both encrypted and casefolded
    /// (`stored`) has its names' hashes stored in each entry, after the name (the hash is of
    /// the casefolded plaintext, which needs the key): Linux lists by those in every form
    /// (`ext4_hash_in_dirent` in `htree_dirblock_to_tree`, `IS_CASEFOLDED` in the linear
    /// `ext4_readdir`); an entry without room for them gets zeros.
    fn nokey_names(
        &self,
        dir: &Inode,
        out: &mut Vec<(Vec<u8>, u64, FileKind)>,
        stored: Option<&StoredHashes>,
    ) -> Result<()> {
        let flags = dir.flags();
        let dx = self.dir_index
            && (flags & (FL_INDEX | FL_INLINE_DATA) != 0 || dir.size() / self.bs == 1);
        let version = if !dx {
            None
        } else if flags & FL_INDEX != 0 {
            let run = self.runs(dir, 0, 1)?.into_iter().next();
            match run.filter(|r| r.physical != 0 && !r.uninit) {
                Some(r) => Some(u8at(&self.block(r.physical)?, 0x1C)),
                None => None,
            }
        } else {
            Some(self.def_hash)
        };
        let version = version.map(|v| {
            if v <= htree::TEA && self.hash_unsigned {
                v + 3
            } else {
                v
            }
        });
        let before = out.len();
        out.retain(|(name, _, _)| name.len() >= 16);
        if out.len() != before {
            crate::input_warn!(
                self.dev.name(),
                "ext4 encrypted directory {} has {} names shorter than a cipher block; hidden",
                dir.ino,
                before - out.len()
            );
        }
        for (name, _, _) in out.iter_mut() {
            let (hash, minor) = match stored {
                Some(h) => h.get(name.as_slice()).copied().unwrap_or((0, 0)),
                None => version
                    .and_then(|v| htree::dirhash2(v, name, &self.hash_seed))
                    .unwrap_or((0, 0)),
            };
            *name = nokey_name(hash, minor, name);
        }
        Ok(())
    }

    fn parse_dirents(
        &self,
        dir: u64,
        b: &[u8],
        out: &mut Vec<(Vec<u8>, u64, FileKind)>,
        inline: bool,
        mut stored: Option<&mut StoredHashes>,
    ) -> Result<()> {
        self.visit_dirents(dir, b, inline, &mut |name, ino, ftype, rec| {
            if let Some(h) = stored.as_deref_mut() {
                h.insert(
                    name.to_vec(),
                    dirent_hashes(rec, name.len()).unwrap_or((0, 0)),
                );
            }
            let kind = match kind_from_dirent(ftype) {
                Some(k) => k,
                None => self.inode(ino)?.kind().unwrap_or(FileKind::File),
            };
            out.push((name.to_vec(), ino, kind));
            Ok(true)
        })
    }

    /// Every shown entry of a directory block (not `.`, `..`, unused or looping ones) as
    /// (name, inode, dirent file type), until `f` returns false.
    fn visit_dirents(&self, dir: u64, b: &[u8], inline: bool, f: &mut DirentVisitor) -> Result<()> {
        self.visit_dirents_at(dir, b, inline, &mut |name, ino, ftype, rec, _| {
            f(name, ino, ftype, rec)
        })
    }

    /// [`Self::visit_dirents`], with where each entry ends in the block.
    fn visit_dirents_at(
        &self,
        dir: u64,
        b: &[u8],
        inline: bool,
        f: &mut DirentAtVisitor,
    ) -> Result<()> {
        let mut off = 0usize;
        while off + 8 <= b.len() {
            let ino = u64::from(le32(b, off));
            let rec_len = usize::from(le16(b, off + 4));
            let name_len = usize::from(u8at(b, off + 6));
            let ftype = u8at(b, off + 7);
            if rec_len < 8 || off + rec_len > b.len() || 8 + name_len > rec_len {
                if inline && ino == 0 && rec_len == 0 {
                    break;
                }
                return Err(self.corrupt_ino(dir, format!("bad directory entry at byte {off}")));
            }
            let name = sub(b, off + 8, name_len);
            if ino != 0 && name != b"." && name != b".." && !name.is_empty() {
                if ino > self.inodes {
                    return Err(
                        self.corrupt_ino(dir, "directory entry points past the inode table")
                    );
                }
                if ino == dir || ino == ROOT {
                    crate::input_warn!(
                        self.dev.name(),
                        "ext4 directory entry {} loops back in directory {dir}; hidden",
                        crate::log_limit::esc(name)
                    );
                } else if !f(name, ino, ftype, sub(b, off, rec_len), off + rec_len)? {
                    return Ok(());
                }
            }
            off += rec_len;
        }
        Ok(())
    }

    /// The parent recorded in a directory's `..` entry.
    fn dotdot(&self, ino: u64) -> Result<u64> {
        let inode = self.inode(ino)?;
        if inode.flags() & FL_INLINE_DATA != 0 {
            return Ok(u64::from(le32(inode.i_block(), 0)));
        }
        let runs = self.runs(&inode, 0, 1)?;
        let r = runs
            .first()
            .filter(|r| r.physical != 0)
            .ok_or_else(|| self.corrupt_ino(ino, "directory without a first block"))?;
        let b = self.block(r.physical)?;
        // "." then "..".
        let first_len = usize::from(le16(&b, 4));
        if first_len < 12 || u8at(&b, 6) != 1 || u8at(&b, 8) != b'.' {
            return Err(self.corrupt_ino(ino, "directory does not start with ."));
        }
        Ok(u64::from(le32(&b, first_len)))
    }

    /// (name index, name, value) of every xattr, in the inode then in the xattr block.
    fn raw_xattrs(&self, inode: &Inode) -> Result<Vec<RawXattr>> {
        let mut out = Vec::new();
        let start = 128 + inode.extra_isize();
        if inode.raw.len() > start + 4 && le32(&inode.raw, start) == 0xEA02_0000 {
            let region = &inode.raw[start + 4..];
            self.parse_xattr_entries(inode, region, region, &mut out)?;
        }
        let acl = inode.file_acl();
        if acl != 0 {
            let b = self.block(acl)?;
            if le32(&b, 0) != 0xEA02_0000 {
                return Err(self.corrupt_ino(inode.ino, "xattr block has a bad magic"));
            }
            self.parse_xattr_entries(inode, b.get(32..).unwrap_or(&[]), &b, &mut out)?;
        }
        Ok(out)
    }

    fn parse_xattr_entries(
        &self,
        inode: &Inode,
        entries: &[u8],
        values: &[u8],
        out: &mut Vec<RawXattr>,
    ) -> Result<()> {
        let mut off = 0usize;
        while off + 16 <= entries.len() && le32(entries, off) != 0 {
            let name_len = usize::from(u8at(entries, off));
            let idx = u8at(entries, off + 1);
            let voff = usize::from(le16(entries, off + 2));
            let vinum = u64::from(le32(entries, off + 4));
            let vsize = le32(entries, off + 8) as usize;
            let name = sub(entries, off + 16, name_len);
            if name.len() != name_len {
                return Err(self.corrupt_ino(inode.ino, "xattr name past its region"));
            }
            let value = if vinum != 0 {
                let vi = self.inode(vinum)?;
                // An EA inode never has inline data: that would recurse into xattrs again.
                if vi.flags() & FL_EA_INODE == 0
                    || vi.flags() & FL_INLINE_DATA != 0
                    || vsize as u64 > MAX_VALUE
                {
                    return Err(self.corrupt_ino(inode.ino, "bad xattr value inode"));
                }
                let mut v = vec![0u8; vsize];
                let n = self.read_data(&vi, 0, &mut v)?;
                v.truncate(n);
                v
            } else {
                let v = sub(values, voff, vsize);
                if v.len() != vsize {
                    return Err(self.corrupt_ino(inode.ino, "xattr value past its region"));
                }
                v.to_vec()
            };
            out.push((idx, name.to_vec(), value));
            off += (16 + name_len).div_ceil(4) * 4;
        }
        Ok(())
    }

    /// A symlink's target; an encrypted one's as Linux shows it without the key
    /// (`fscrypt_get_symlink`: the ciphertext after its 2-byte length, as a no-key name with
    /// zero hashes).
    fn link_target(&self, inode: &Inode) -> Result<Vec<u8>> {
        let ino = inode.ino;
        if inode.kind() != Some(FileKind::Symlink) {
            return Err(Error::Invalid(format!("ext4 inode {ino} is not a symlink")));
        }
        let size = inode.size();
        if size > MAX_VALUE {
            return Err(self.corrupt_ino(ino, "symlink too long"));
        }
        let blocks = u64::from(le32(&inode.raw, 0x1C));
        let ea_blocks = if inode.file_acl() != 0 {
            self.bs / 512
        } else {
            0
        };
        let fast = inode.flags() & (FL_EXTENTS | FL_INLINE_DATA) == 0 && blocks <= ea_blocks;
        if fast {
            if size > 60 {
                return Err(self.corrupt_ino(ino, "fast symlink longer than 60 bytes"));
            }
            return self.plain_target(inode, sub(inode.i_block(), 0, size as usize).to_vec());
        }
        let mut v = vec![0u8; size as usize];
        let n = self.read_data(inode, 0, &mut v)?;
        v.truncate(n);
        self.plain_target(inode, v)
    }

    fn plain_target(&self, inode: &Inode, v: Vec<u8>) -> Result<Vec<u8>> {
        if inode.flags() & FL_ENCRYPT == 0 {
            return Ok(v);
        }
        let len = usize::from(le16(&v, 0));
        match v.get(2..2 + len) {
            Some(c) if len >= 16 => Ok(nokey_name(0, 0, c)),
            _ => Err(self.corrupt_ino(inode.ino, "encrypted symlink target")),
        }
    }

    fn stat_inode(&self, inode: &Inode) -> Result<FileStat> {
        let r = &inode.raw;
        let kind = inode.kind().ok_or_else(|| {
            self.corrupt_ino(inode.ino, format!("unknown file type {:#o}", inode.mode()))
        })?;
        let blocks = u64::from(le32(r, 0x1C)) | (u64::from(le16(r, 0x74)) << 32);
        let allocated =
            if self.ro_compat & RO_COMPAT_HUGE_FILE != 0 && inode.flags() & FL_HUGE_FILE != 0 {
                blocks.saturating_mul(self.bs)
            } else {
                blocks.saturating_mul(512)
            };
        let rdev = if matches!(kind, FileKind::CharDev | FileKind::BlockDev) {
            let ib = inode.i_block();
            let old = le32(ib, 0);
            if old != 0 {
                let (major, minor) = ((old >> 8) & 0xff, old & 0xff);
                (minor & 0xff) | (major << 8)
            } else {
                le32(ib, 4)
            }
        } else {
            0
        };
        let btime =
            (128 + inode.extra_isize() >= 0x98 && r.len() >= 0x98).then(|| inode.time(0x90, 0x94));
        Ok(FileStat {
            ino: inode.ino,
            kind,
            perm: inode.mode() & 0o7777,
            uid: u32::from(le16(r, 2)) | (u32::from(le16(r, 0x78)) << 16),
            gid: u32::from(le16(r, 0x18)) | (u32::from(le16(r, 0x7A)) << 16),
            size: if kind == FileKind::Symlink && inode.flags() & FL_ENCRYPT != 0 {
                // Linux's getattr gives the length of the target readlink shows.
                self.link_target(inode)?.len() as u64
            } else {
                inode.size()
            },
            allocated,
            nlink: u32::from(le16(r, 0x1A)),
            rdev,
            atime: inode.time(0x8, 0x8C),
            mtime: inode.time(0x10, 0x88),
            ctime: inode.time(0xC, 0x84),
            btime,
        })
    }
}

/// Punch `[lblk, lblk + len)` out of an extent list (e2fsck's `ext4_modify_extent_list`).
fn punch(list: &mut Vec<Run>, lblk: u64, len: u64) {
    if len == 0 {
        return;
    }
    let end = lblk.saturating_add(len);
    let mut out = Vec::with_capacity(list.len() + 1);
    for r in list.drain(..) {
        let r_end = r.logical + r.len;
        if r_end <= lblk || r.logical >= end {
            out.push(r);
            continue;
        }
        if r.logical < lblk {
            out.push(Run {
                len: lblk - r.logical,
                ..r
            });
        }
        if r_end > end {
            out.push(Run {
                logical: end,
                physical: r.physical + (end - r.logical),
                len: r_end - end,
                uninit: r.uninit,
            });
        }
    }
    *list = out;
}

/// Sort an extent list by logical block and merge neighbours contiguous on disk too.
fn merge_runs(list: &mut Vec<Run>) {
    list.retain(|r| r.len > 0);
    list.sort_by_key(|r| (r.logical, r.len));
    let mut out: Vec<Run> = Vec::with_capacity(list.len());
    for r in list.drain(..) {
        match out.last_mut() {
            Some(p)
                if p.logical + p.len == r.logical
                    && p.physical + p.len == r.physical
                    && p.uninit == r.uninit =>
            {
                p.len += r.len
            }
            _ => out.push(r),
        }
    }
    *list = out;
}

/// The journal inode as the superblock's backup describes it (`s_jnl_backup_type` 1,
/// `EXT3_JNL_BACKUP_BLOCKS`: `s_jnl_blocks` holds its `i_block`, then `i_size_high`, `i_size`).
fn journal_backup(sb: &[u8], ino: u64) -> Option<Inode> {
    if u8at(sb, 0xFD) != 1 {
        return None;
    }
    let jnl = sub(sb, 0x10C, 17 * 4);
    let mut raw = vec![0u8; 128];
    raw[0..2].copy_from_slice(&0o100600u16.to_le_bytes());
    // One link, as e2fsck gives the inode it builds from the backup.
    raw[0x1A..0x1C].copy_from_slice(&1u16.to_le_bytes());
    raw.get_mut(0x28..0x64)?.copy_from_slice(jnl.get(..60)?);
    raw[0x4..0x8].copy_from_slice(jnl.get(64..68)?);
    raw[0x6C..0x70].copy_from_slice(jnl.get(60..64)?);
    if le16(jnl, 0) == 0xF30A {
        raw[0x20..0x24].copy_from_slice(&FL_EXTENTS.to_le_bytes());
    }
    Some(Inode { ino, raw })
}

struct GdtLayout {
    groups: u64,
    desc_size: u64,
    first_data_block: u64,
    blocks_per_group: u64,
    incompat: u32,
    ro_compat: u32,
    first_meta_bg: u64,
}

impl GdtLayout {
    /// Whether group `g` carries a superblock backup (sparse_super: 0, 1, powers of 3, 5, 7).
    fn has_super(&self, g: u64) -> bool {
        if self.ro_compat & RO_COMPAT_SPARSE_SUPER == 0 || g <= 1 {
            return true;
        }
        [3u64, 5, 7].iter().any(|&p| {
            let mut x = p;
            while x < g {
                x *= p;
            }
            x == g
        })
    }
}

struct JournalReader<'a> {
    fs: &'a Ext4Fs,
    runs: Vec<Run>,
}

impl journal::JournalBlocks for JournalReader<'_> {
    fn block_size(&self) -> usize {
        self.fs.bs as usize
    }
    fn physical(&self, n: u64) -> Result<u64> {
        self.runs
            .iter()
            .find(|r| n >= r.logical && n < r.logical + r.len && r.physical != 0)
            .map(|r| r.physical + (n - r.logical))
            .ok_or_else(|| {
                self.fs
                    .dev
                    .corrupt(0, format!("ext4 journal block {n} unmapped"))
            })
    }
    fn read(&self, n: u64) -> Result<Vec<u8>> {
        self.fs.raw_block(self.physical(n)?)
    }
}

/// ext4 ACLs are stored in a compact form; Linux shows the `posix_acl_xattr` form (version 2,
/// 8-byte entries with id 0xFFFFFFFF for the owner/group/mask/other entries).
/// The (hash, minor hash) an encrypted and casefolded directory's entry stores after its name
/// (`EXT4_DIRENT_HASHES`: at the name's end rounded up to 4 bytes), if the record holds them.
fn dirent_hashes(rec: &[u8], name_len: usize) -> Option<(u32, u32)> {
    let at = (8 + name_len + 3) & !3;
    (rec.len() >= at + 8).then(|| (le32(rec, at), le32(rec, at + 4)))
}

fn acl_to_xattr(v: &[u8]) -> Option<Vec<u8>> {
    if le32(v, 0) != 1 {
        return None;
    }
    let mut out = 2u32.to_le_bytes().to_vec();
    let mut off = 4;
    while off + 4 <= v.len() {
        let tag = le16(v, off);
        let perm = le16(v, off + 2);
        let (id, step) = match tag {
            2 | 8 => (le32(v, off + 4), 8),
            1 | 4 | 0x10 | 0x20 => (u32::MAX, 4),
            _ => return None,
        };
        if off + step > v.len() {
            return None;
        }
        out.extend_from_slice(&tag.to_le_bytes());
        out.extend_from_slice(&perm.to_le_bytes());
        out.extend_from_slice(&id.to_le_bytes());
        off += step;
    }
    Some(out)
}

/// The canonical caseless form of a UTF-8 name (Unicode D145: NFD, default full case
/// folding, NFD), what Linux's `utf8_casefold` compares; `None` for a name that is not UTF-8.
fn casefold(name: &[u8]) -> Option<String> {
    use caseless::Caseless;
    use unicode_normalization::UnicodeNormalization;
    let s = std::str::from_utf8(name).ok()?;
    Some(s.nfd().default_case_fold().nfd().collect())
}

/// Linux's no-key name (`struct fscrypt_nokey_name`, base64url without padding): the two hash
/// words, then the ciphertext, or its first 149 bytes and the SHA-256 of the rest.
fn nokey_name(hash: u32, minor: u32, ciphertext: &[u8]) -> Vec<u8> {
    use base64::Engine;
    use sha2::Digest;
    const BYTES: usize = 149;
    let mut v = Vec::with_capacity(8 + BYTES + 32);
    v.extend_from_slice(&hash.to_le_bytes());
    v.extend_from_slice(&minor.to_le_bytes());
    if ciphertext.len() <= BYTES {
        v.extend_from_slice(ciphertext);
    } else {
        v.extend_from_slice(&ciphertext[..BYTES]);
        v.extend_from_slice(&sha2::Sha256::digest(&ciphertext[BYTES..]));
    }
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(v)
        .into_bytes()
}

impl GuestFs for Ext4Fs {
    fn root(&self) -> u64 {
        ROOT
    }

    fn stat(&self, ino: u64) -> Result<FileStat> {
        let inode = self.inode(ino)?;
        self.stat_inode(&inode)
    }

    fn lookup(&self, dir: u64, name: &[u8]) -> Result<FileStat> {
        let ino = match self.fc_dirs.get(&dir).and_then(|d| d.get(name)) {
            Some(Some((ino, _))) => *ino,
            Some(None) => return Err(Error::NotFound(String::from_utf8_lossy(name).into_owned())),
            None => match self.find_indexed(dir, name)? {
                Some(ino) => ino,
                None => match self.find_linear(dir, name) {
                    // Caseless only over plaintext names: an encrypted directory's no-key
                    // names are matched exactly, as Linux decodes and compares them.
                    Err(Error::NotFound(_))
                        if self.inode(dir)?.flags() & (FL_CASEFOLD | FL_ENCRYPT) == FL_CASEFOLD =>
                    {
                        self.find_folded(dir, name)?
                    }
                    r => r?,
                },
            },
        };
        let st = self.stat(ino)?;
        // Linux's ext4_iget refuses an inode without links (ESTALE): an entry left pointing at
        // a freed inode, e.g. when a journal block that would have set it up was not replayed.
        if st.nlink == 0 {
            return Err(self.corrupt_ino(ino, "entry names an inode with no links"));
        }
        // Directories have exactly one parent: a child whose `..` disagrees is a loop or damage.
        // A directory whose first block is unreadable is still found, as Linux finds it (its
        // listing then fails, there too).
        if st.kind == FileKind::Dir && self.dotdot(ino).is_ok_and(|p| p != dir) {
            return Err(self.corrupt_ino(ino, format!("directory's .. is not its parent {dir}")));
        }
        Ok(st)
    }

    fn readdir(&self, dir: u64) -> Result<DirList> {
        self.dir_entries(dir)
    }

    fn readdir_page(&self, dir: u64, cookie: u64, budget: usize) -> Result<DirPage> {
        if cookie & INDEX_COOKIE == 0 {
            let inode = self.inode(dir)?;
            if self.paged(&inode) {
                return self.block_page(&inode, cookie, budget);
            }
        }
        Ok(page_of_list(&self.dir_entries(dir)?, cookie, budget))
    }

    fn read(&self, ino: u64, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let inode = self.inode(ino)?;
        match inode.kind() {
            Some(FileKind::File) => {}
            Some(FileKind::Dir) => return Err(Error::IsDir(format!("ext4 inode {ino}"))),
            _ => {
                return Err(Error::Invalid(format!(
                    "ext4 inode {ino} is not a regular file"
                )))
            }
        }
        if inode.flags() & FL_ENCRYPT != 0 {
            return Err(Error::NoKey(format!("ext4 inode {ino} is encrypted")));
        }
        self.read_data(&inode, offset, buf)
    }

    fn check_open(&self, ino: u64) -> Result<()> {
        if self.inode(ino)?.flags() & FL_ENCRYPT != 0 {
            return Err(Error::NoKey(format!("ext4 inode {ino} is encrypted")));
        }
        Ok(())
    }

    fn readlink(&self, ino: u64) -> Result<Vec<u8>> {
        let inode = self.inode(ino)?;
        self.link_target(&inode)
    }

    fn xattrs(&self, ino: u64) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let inode = self.inode(ino)?;
        let mut out = Vec::new();
        for (idx, name, value) in self.raw_xattrs(&inode)? {
            let prefix: &[u8] = match idx {
                1 => b"user.",
                2 | 3 => {
                    let full: &[u8] = if idx == 2 {
                        b"system.posix_acl_access"
                    } else {
                        b"system.posix_acl_default"
                    };
                    if let Some(v) = acl_to_xattr(&value) {
                        out.push((full.to_vec(), v));
                    } else {
                        crate::input_warn!(
                            self.dev.name(),
                            "ext4 ACL in an unknown format; hidden (inode {ino})"
                        );
                    }
                    continue;
                }
                4 => b"trusted.",
                6 => b"security.",
                _ => continue,
            };
            let mut n = prefix.to_vec();
            n.extend_from_slice(&name);
            out.push((n, value));
        }
        Ok(out)
    }

    fn data_ranges(&self, ino: u64) -> Result<Option<Vec<(u64, u64)>>> {
        let inode = self.inode(ino)?;
        if inode.kind() != Some(FileKind::File) || inode.flags() & FL_INLINE_DATA != 0 {
            return Ok(None);
        }
        let size = inode.size();
        let nblocks = size.div_ceil(self.bs);
        let mut out: Vec<(u64, u64)> = Vec::new();
        for r in self.runs(&inode, 0, nblocks)? {
            if r.physical == 0 || r.uninit {
                continue;
            }
            let s = r.logical * self.bs;
            let e = ((r.logical + r.len) * self.bs).min(size);
            if e <= s {
                continue;
            }
            match out.last_mut() {
                Some(last) if last.0 + last.1 == s => last.1 += e - s,
                _ => out.push((s, e - s)),
            }
        }
        Ok(Some(out))
    }

    fn map(&self, ino: u64, offset: u64, len: u64) -> Result<Option<FileMap>> {
        let inode = self.inode(ino)?;
        if inode.kind() != Some(FileKind::File)
            || inode.flags() & (FL_INLINE_DATA | FL_ENCRYPT) != 0
        {
            return Ok(None);
        }
        let size = inode.size();
        let (mut map, end) = FileMap::window(size, offset, len);
        if offset >= end {
            return Ok(Some(map));
        }
        let first = offset / self.bs;
        let last = (end - 1) / self.bs;
        let vol = self.dev.len();
        let mut pos = offset;
        for r in self.runs(&inode, first, last - first + 1)? {
            let s = r.logical.saturating_mul(self.bs).max(offset);
            let e = r
                .logical
                .saturating_add(r.len)
                .saturating_mul(self.bs)
                .min(end);
            if s >= e {
                continue;
            }
            if s < pos {
                // Overlapping extents: how they combine is `read_data`'s to say.
                return Ok(None);
            }
            if !map.push(pos, s - pos, Place::Zero, vol) {
                return Ok(Some(map));
            }
            let first_phys = r.physical + (s / self.bs - r.logical);
            let last_phys = r.physical + ((e - 1) / self.bs - r.logical);
            let place = if r.physical == 0 || r.uninit {
                Place::Zero
            } else if !self.replaced.is_empty()
                && (first_phys..=last_phys).any(|b| self.replaced.contains_key(&b))
            {
                Place::Reader
            } else {
                Place::Disk(first_phys * self.bs + s % self.bs)
            };
            if !map.push(s, e - s, place, vol) {
                return Ok(Some(map));
            }
            pos = e;
        }
        map.push(pos, end - pos, Place::Zero, vol);
        Ok(Some(map))
    }

    fn describe(&self) -> String {
        let mut s = format!(
            "{}, {}",
            self.kind,
            human_size(self.blocks.saturating_mul(self.bs))
        );
        if !self.label.is_empty() {
            s.push_str(&format!(", label {}", self.label));
        }
        if !self.note.is_empty() {
            s.push_str(&format!(", {}", self.note));
        }
        s
    }
}

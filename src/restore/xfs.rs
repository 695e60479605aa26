//! XFS (v4 and v5), our own reader: superblock, inodes located from their numbers (no inode
//! btree walk: directories are walked from the root), data forks in local, extent-list and
//! B+tree form, short-form/block/leaf/node directories (every data block is parsed linearly, the
//! hash index is not needed), local and remote symlinks, short-form and leaf xattrs.
//! A dirty internal log (a crash-consistent snapshot) is replayed in memory first, as mount-time
//! recovery would (`xfs_log.rs`): committed buffer, inode and icreate items, cancelled buffers
//! skipped, v5 LSN / v4 flushiter checks; every read (metadata and file data) goes through the
//! sectors the replay replaced, the image is never written. Not replayed: intents (EFI, RUI,
//! CUI, BUI, ATTRI, XMI; unfinished ones are counted) and external logs. A damaged log (or one
//! over the memory bounds) is not replayed at all: the filesystem reads as its last checkpoint
//! left it in place, and `describe()` says why. `crash-xfs.raw` (the whole tree only in the
//! log): one checkpoint, 50 buffers, 1,179 inodes, 20 inode chunks, 4–12 ms to open.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::bytes::{be16, be32, be64, sub, u8at};
use super::xfs_log::{self, Outcome, Overlay};
use super::{
    human_size, page_of_list, unix_time, Dev, DirCache, DirList, DirPage, FileKind, FileMap,
    FileStat, GuestFs, PageFill, Place, INDEX_COOKIE,
};
use crate::error::{Error, Result};

/// Most extents one fork may have (a corrupt count must not make us allocate without bound).
const MAX_EXTENTS: u64 = 1 << 22;
const MAX_BTREE_LEVELS: u16 = 9;
const MAX_DIR_BYTES: u64 = 256 << 20;
/// Directories larger than this are listed by pages of their data blocks, smaller ones whole
/// (cached with the reader's listings, which the directory read-ahead fills, and on the
/// worker's daemon side up to 16,384 entries, whose lookups are then read ahead in batches:
/// `du` and `find` look names up in listing order).
const PAGED_DIR_BYTES: u64 = 1 << 20;
const MAX_VALUE: u64 = 64 << 10;
/// Directory data lives below this byte offset of a directory; leaf/free indexes above it.
const DIR_LEAF_OFFSET: u64 = 32 << 30;
const CACHE: usize = 256;

const INCOMPAT_FTYPE: u32 = 0x1;
const DIFLAG2_BIGTIME: u64 = 1 << 3;

const FMT_DEV: u8 = 0;
const FMT_LOCAL: u8 = 1;
const FMT_EXTENTS: u8 = 2;
const FMT_BTREE: u8 = 3;

/// (name, inode, kind, where the entry ends in its block) → go on.
type EntryVisitor<'a> = dyn FnMut(&[u8], u64, FileKind, usize) -> Result<bool> + 'a;

/// (flags, name without prefix, value) as stored.
type RawXattr = (u8, Vec<u8>, Vec<u8>);

#[derive(Clone, Copy, Debug)]
struct Extent {
    /// Logical block in the file.
    off: u64,
    /// Disk block (linear, already converted from AG-relative form).
    block: u64,
    len: u64,
    unwritten: bool,
}

pub struct XfsFs {
    dev: Dev,
    bs: u64,
    dblocks: u64,
    agblocks: u64,
    agblklog: u32,
    inopblog: u32,
    inode_size: u64,
    root: u64,
    v5: bool,
    ftype: bool,
    dir_bs: u64,
    /// `XFS_SB_VERSION_BORGBIT`: names hashed case-insensitively (ASCII).
    ascii_ci: bool,
    label: String,
    extents: Mutex<HashMap<u64, Arc<Vec<Extent>>>>,
    dirs: Mutex<DirCache>,
    /// Sectors replaced by the log replay.
    overlay: Overlay,
    /// What happened to the log, for `describe()`.
    note: String,
}

struct Inode {
    ino: u64,
    raw: Vec<u8>,
    /// Where the data fork starts in `raw`.
    lit: usize,
}

impl Inode {
    fn mode(&self) -> u16 {
        be16(&self.raw, 2)
    }
    fn format(&self) -> u8 {
        u8at(&self.raw, 5)
    }
    fn aformat(&self) -> u8 {
        u8at(&self.raw, 83)
    }
    fn size(&self) -> u64 {
        be64(&self.raw, 56)
    }
    fn nextents(&self) -> u64 {
        u64::from(be32(&self.raw, 76))
    }
    fn anextents(&self) -> u64 {
        u64::from(be16(&self.raw, 80))
    }
    fn forkoff(&self) -> usize {
        usize::from(u8at(&self.raw, 82)) * 8
    }
    fn flags2(&self) -> u64 {
        if u8at(&self.raw, 4) >= 3 {
            be64(&self.raw, 120)
        } else {
            0
        }
    }
    fn data_fork(&self) -> &[u8] {
        let end = if self.forkoff() != 0 {
            self.lit + self.forkoff()
        } else {
            self.raw.len()
        };
        self.raw
            .get(self.lit..end.min(self.raw.len()))
            .unwrap_or(&[])
    }
    fn attr_fork(&self) -> &[u8] {
        if self.forkoff() == 0 {
            return &[];
        }
        self.raw.get(self.lit + self.forkoff()..).unwrap_or(&[])
    }
    fn time(&self, off: usize) -> std::time::SystemTime {
        if self.flags2() & DIFLAG2_BIGTIME != 0 {
            let ns = be64(&self.raw, off);
            let secs = (ns / 1_000_000_000) as i64 - (1i64 << 31);
            unix_time(secs, (ns % 1_000_000_000) as u32)
        } else {
            unix_time(
                i64::from(be32(&self.raw, off) as i32),
                be32(&self.raw, off + 4),
            )
        }
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

fn kind_from_ftype(t: u8) -> Option<FileKind> {
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

/// A packed 128-bit bmbt record.
fn unpack_extent(r: &[u8]) -> (u64, u64, u64, bool) {
    let l0 = be64(r, 0);
    let l1 = be64(r, 8);
    let unwritten = l0 >> 63 != 0;
    let off = (l0 & ((1u64 << 63) - 1)) >> 9;
    let block = ((l0 & 0x1FF) << 43) | (l1 >> 21);
    let len = l1 & ((1u64 << 21) - 1);
    (off, block, len, unwritten)
}

impl XfsFs {
    pub fn open(dev: Dev) -> Result<XfsFs> {
        let sb = dev.read_vec(0, 512)?;
        let c = |what: &str| dev.corrupt(0, format!("XFS superblock: {what}"));
        if sub(&sb, 0, 4) != b"XFSB" {
            return Err(c("bad magic"));
        }
        let bs = u64::from(be32(&sb, 4));
        let blocklog = u32::from(u8at(&sb, 120));
        let inodelog = u32::from(u8at(&sb, 122));
        let inopblog = u32::from(u8at(&sb, 123));
        let agblklog = u32::from(u8at(&sb, 124));
        let dirblklog = u32::from(u8at(&sb, 192));
        if !(9..=16).contains(&blocklog) || bs != 1 << blocklog {
            return Err(c("block size"));
        }
        let inode_size = u64::from(be16(&sb, 104));
        if !(8..=11).contains(&inodelog)
            || inode_size != 1 << inodelog
            || inopblog != blocklog - inodelog
        {
            return Err(c("inode size"));
        }
        let agblocks = u64::from(be32(&sb, 84));
        if agblklog == 0 || agblklog > 31 || agblocks == 0 || agblocks > 1 << agblklog {
            return Err(c("allocation group size"));
        }
        if dirblklog > 8 {
            return Err(c("directory block size"));
        }
        let version = be16(&sb, 100) & 0xF;
        if !(4..=5).contains(&version) {
            return Err(c("unsupported version"));
        }
        let v5 = version == 5;
        let incompat = if v5 { be32(&sb, 216) } else { 0 };
        let features2 = be32(&sb, 200);
        let ftype = if v5 {
            incompat & INCOMPAT_FTYPE != 0
        } else {
            features2 & 0x200 != 0
        };
        let name = sub(&sb, 108, 12);
        let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
        let mut fs = XfsFs {
            bs,
            dblocks: be64(&sb, 8),
            agblocks,
            agblklog,
            inopblog,
            inode_size,
            root: be64(&sb, 56),
            v5,
            ftype,
            dir_bs: bs << dirblklog,
            ascii_ci: be16(&sb, 100) & 0x4000 != 0,
            label: String::from_utf8_lossy(&name[..end]).into_owned(),
            extents: Mutex::new(HashMap::new()),
            dirs: Mutex::new(DirCache::default()),
            overlay: Overlay::default(),
            note: String::new(),
            dev,
        };
        fs.replay_log(&sb);
        let root_ok = |fs: &XfsFs| {
            fs.inode(fs.root).and_then(|r| match r.kind() {
                Some(FileKind::Dir) => Ok(()),
                _ => Err(fs.dev.corrupt(0, "XFS root inode is not a directory")),
            })
        };
        if let Err(e) = root_ok(&fs) {
            if fs.overlay.is_empty() {
                return Err(e);
            }
            crate::input_warn!(
                fs.dev.name(),
                "XFS log replay leaves the root unreadable: not replayed: {e}"
            );
            fs.overlay = Overlay::default();
            fs.note = format!("log replay left the root unreadable ({e}): read without replay");
            root_ok(&fs)?;
        }
        Ok(fs)
    }

    /// Replay the internal log in memory when it is dirty; `note` says what happened.
    fn replay_log(&mut self, sb: &[u8]) {
        let logstart = be64(sb, 48);
        let logblocks = u64::from(be32(sb, 96));
        let part = self.dev.name().to_string();
        if logstart == 0 {
            self.note = "external log (not read, not replayed)".into();
            crate::input_warn!(&part, "XFS with an external log: its log is not replayed");
            return;
        }
        let log_off = self.fsb_to_byte(logstart).filter(|&o| {
            logblocks
                .checked_mul(self.bs)
                .and_then(|l| o.checked_add(l))
                .is_some_and(|end| end <= self.dev.len())
        });
        let Some(log_off) = log_off else {
            self.note = "log outside the filesystem: read without replay".into();
            crate::input_warn!(&part, "XFS log outside the device: not replayed");
            return;
        };
        let meta_uuid = self.v5 && be32(sb, 216) & (1 << 2) != 0;
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(sub(sb, if meta_uuid { 248 } else { 32 }, 16));
        let g = xfs_log::Geometry {
            log_off,
            log_bbs: logblocks * self.bs / 512,
            v5: self.v5,
            bs: self.bs,
            isize: self.inode_size,
            inopblog: self.inopblog,
            agblklog: self.agblklog,
            agblocks: self.agblocks,
            agcount: u64::from(be32(sb, 88)),
            uuid,
        };
        let t = std::time::Instant::now();
        match xfs_log::recover(&self.dev, &g) {
            Outcome::Clean => {}
            Outcome::Replayed(overlay, st) => {
                let mut n = format!(
                    "log replayed in memory ({} transaction{}: {} buffers, {} inodes, {} inode chunks",
                    st.transactions,
                    if st.transactions == 1 { "" } else { "s" },
                    st.buffers,
                    st.inodes,
                    st.icreates
                );
                if st.cancelled > 0 {
                    n.push_str(&format!("; {} cancelled buffers skipped", st.cancelled));
                }
                if st.newer_on_disk > 0 {
                    n.push_str(&format!("; {} already newer on disk", st.newer_on_disk));
                }
                if st.bad_items > 0 {
                    n.push_str(&format!("; {} damaged items skipped", st.bad_items));
                }
                if st.unfinished_intents > 0 {
                    n.push_str(&format!(
                        "; {} unfinished intents not replayed",
                        st.unfinished_intents
                    ));
                }
                n.push(')');
                tracing::info!(part, ?st, bytes = overlay.bytes(), elapsed = ?t.elapsed(), "XFS log replayed in memory");
                self.overlay = overlay;
                self.note = n;
            }
            Outcome::NotReplayed(why) => {
                crate::input_warn!(&part, "XFS log not replayed: {why}");
                self.note = format!("log not replayed ({why}): read without replay");
            }
        }
    }

    /// Device bytes through the log replay.
    fn read_vec(&self, off: u64, len: usize) -> Result<Vec<u8>> {
        let mut v = self.dev.read_vec(off, len)?;
        self.overlay.patch(off, &mut v);
        Ok(v)
    }

    fn read_at(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        self.dev.read_exact_at(off, buf)?;
        self.overlay.patch(off, buf);
        Ok(())
    }

    fn corrupt_ino(&self, ino: u64, what: impl std::fmt::Display) -> Error {
        self.dev.corrupt(0, format!("XFS inode {ino}: {what}"))
    }

    /// AG-relative filesystem block number (agno << agblklog | agbno) to a byte offset.
    fn fsb_to_byte(&self, fsb: u64) -> Option<u64> {
        let agno = fsb >> self.agblklog;
        let agbno = fsb & ((1u64 << self.agblklog) - 1);
        if agbno >= self.agblocks {
            return None;
        }
        agno.checked_mul(self.agblocks)?
            .checked_add(agbno)?
            .checked_mul(self.bs)
    }

    fn read_fsb(&self, fsb: u64, len: usize) -> Result<Vec<u8>> {
        let off = self.fsb_to_byte(fsb).ok_or_else(|| {
            self.dev
                .corrupt(0, format!("XFS block {fsb:#x} out of range"))
        })?;
        self.read_vec(off, len)
    }

    fn inode(&self, ino: u64) -> Result<Inode> {
        let fsb = ino >> self.inopblog;
        let idx = ino & ((1u64 << self.inopblog) - 1);
        let off = self
            .fsb_to_byte(fsb)
            .and_then(|b| b.checked_add(idx * self.inode_size))
            .ok_or_else(|| self.corrupt_ino(ino, "number out of range"))?;
        let raw = self.read_vec(off, self.inode_size as usize)?;
        if sub(&raw, 0, 2) != b"IN" {
            return Err(self.corrupt_ino(ino, "bad magic"));
        }
        let version = u8at(&raw, 4);
        let lit = match version {
            3 => {
                if be64(&raw, 152) != ino {
                    return Err(self.corrupt_ino(ino, "inode records another number"));
                }
                176
            }
            1 | 2 => 100,
            _ => return Err(self.corrupt_ino(ino, "unknown inode version")),
        };
        Ok(Inode { ino, raw, lit })
    }

    /// The extents of a fork (data or attr) in extent-list or B+tree form.
    fn fork_extents(&self, inode: &Inode, attr: bool) -> Result<Vec<Extent>> {
        let (fork, format, n) = if attr {
            (inode.attr_fork(), inode.aformat(), inode.anextents())
        } else {
            (inode.data_fork(), inode.format(), inode.nextents())
        };
        if n > MAX_EXTENTS {
            return Err(self.corrupt_ino(inode.ino, "too many extents"));
        }
        let mut raw = Vec::new();
        match format {
            FMT_EXTENTS => {
                if n as usize * 16 > fork.len() {
                    return Err(self.corrupt_ino(inode.ino, "extent list larger than its fork"));
                }
                raw.push(fork.get(..n as usize * 16).unwrap_or(&[]).to_vec());
            }
            FMT_BTREE => {
                let level = be16(fork, 0);
                let numrecs = usize::from(be16(fork, 2));
                let maxrecs = fork.len().saturating_sub(4) / 16;
                if level == 0 || level > MAX_BTREE_LEVELS || numrecs > maxrecs {
                    return Err(self.corrupt_ino(inode.ino, "bad B+tree root"));
                }
                let mut budget = MAX_EXTENTS;
                for i in 0..numrecs {
                    let ptr = be64(fork, 4 + maxrecs * 8 + i * 8);
                    self.btree_block(inode, ptr, level - 1, &mut raw, &mut budget)?;
                }
            }
            _ => {
                return Err(
                    self.corrupt_ino(inode.ino, format!("fork format {format} has no extents"))
                )
            }
        }
        let mut out = Vec::new();
        for chunk in &raw {
            for r in chunk.chunks_exact(16) {
                let (off, fsb, len, unwritten) = unpack_extent(r);
                let start = self.fsb_to_byte(fsb).map(|b| b / self.bs);
                let end_ok = start
                    .is_some_and(|s| s.checked_add(len).is_some_and(|e| e <= self.dblocks))
                    && (fsb & ((1u64 << self.agblklog) - 1)) + len <= self.agblocks;
                // Logical ends are multiplied by the block size later: keep them in range.
                let off_ok = off
                    .checked_add(len)
                    .and_then(|e| e.checked_mul(self.bs))
                    .is_some();
                let Some(block) = start.filter(|_| end_ok && off_ok) else {
                    return Err(self.corrupt_ino(
                        inode.ino,
                        format!("extent past the end (block {fsb:#x}+{len})"),
                    ));
                };
                out.push(Extent {
                    off,
                    block,
                    len,
                    unwritten,
                });
            }
        }
        out.sort_by_key(|e| e.off);
        Ok(out)
    }

    fn btree_block(
        &self,
        inode: &Inode,
        fsb: u64,
        level: u16,
        out: &mut Vec<Vec<u8>>,
        budget: &mut u64,
    ) -> Result<()> {
        *budget = budget
            .checked_sub(1)
            .ok_or_else(|| self.corrupt_ino(inode.ino, "B+tree too large"))?;
        let b = self.read_fsb(fsb, self.bs as usize)?;
        let (magic, hdr): (&[u8], usize) = if self.v5 {
            (b"BMA3", 72)
        } else {
            (b"BMAP", 24)
        };
        if sub(&b, 0, 4) != magic || be16(&b, 4) != level {
            return Err(self.corrupt_ino(inode.ino, "bad B+tree block"));
        }
        let numrecs = usize::from(be16(&b, 6));
        // Leaf records and node key+pointer pairs are both 16 bytes.
        let maxrecs = b.len().saturating_sub(hdr) / 16;
        if numrecs > maxrecs {
            return Err(self.corrupt_ino(inode.ino, "B+tree block overfull"));
        }
        if level == 0 {
            *budget = budget
                .checked_sub(numrecs as u64)
                .ok_or_else(|| self.corrupt_ino(inode.ino, "B+tree too large"))?;
            out.push(sub(&b, hdr, numrecs * 16).to_vec());
            return Ok(());
        }
        for i in 0..numrecs {
            let ptr = be64(&b, hdr + maxrecs * 8 + i * 8);
            self.btree_block(inode, ptr, level - 1, out, budget)?;
        }
        Ok(())
    }

    fn data_extents(&self, inode: &Inode) -> Result<Arc<Vec<Extent>>> {
        if let Ok(c) = self.extents.lock() {
            if let Some(e) = c.get(&inode.ino) {
                return Ok(e.clone());
            }
        }
        let e = Arc::new(self.fork_extents(inode, false)?);
        if let Ok(mut c) = self.extents.lock() {
            if c.len() >= CACHE {
                c.clear();
            }
            c.insert(inode.ino, e.clone());
        }
        Ok(e)
    }

    /// Bytes of a fork given its extents (holes and unwritten extents read as zeros).
    fn read_extents(&self, ino: u64, ext: &[Extent], offset: u64, buf: &mut [u8]) -> Result<()> {
        buf.fill(0);
        let end = offset + buf.len() as u64;
        let i0 = ext.partition_point(|e| (e.off + e.len) * self.bs <= offset);
        for e in &ext[i0..] {
            let es = e.off * self.bs;
            if es >= end {
                break;
            }
            if e.unwritten {
                continue;
            }
            let ee = (e.off + e.len) * self.bs;
            let s = es.max(offset);
            let t = ee.min(end);
            if s >= t {
                continue;
            }
            let disk = e.block * self.bs + (s - es);
            let dst = buf
                .get_mut((s - offset) as usize..(t - offset) as usize)
                .ok_or_else(|| self.corrupt_ino(ino, "extent arithmetic"))?;
            self.read_at(disk, dst)?;
        }
        Ok(())
    }

    fn dir_entries(&self, ino: u64) -> Result<DirList> {
        DirCache::get_or_read(&self.dirs, ino, || self.read_dir(ino))
    }

    /// Directory `ino`'s entries as stored (see [`Self::dir_entries`] for the cached ones).
    fn read_dir(&self, ino: u64) -> Result<Vec<(Vec<u8>, u64, FileKind)>> {
        let inode = self.inode(ino)?;
        if inode.kind() != Some(FileKind::Dir) {
            return Err(Error::NotDir(format!("XFS inode {ino}")));
        }
        let mut out = Vec::new();
        match inode.format() {
            FMT_LOCAL => self.parse_shortform(&inode, &mut out)?,
            FMT_EXTENTS | FMT_BTREE => {
                if inode.size() > MAX_DIR_BYTES {
                    return Err(self.corrupt_ino(ino, "directory too large"));
                }
                let ext = self.data_extents(&inode)?;
                let per = self.dir_bs / self.bs;
                for e in ext.iter() {
                    if e.unwritten || e.off * self.bs >= DIR_LEAF_OFFSET {
                        continue;
                    }
                    let mut k = 0;
                    while k < e.len {
                        let blk = self.read_vec((e.block + k) * self.bs, self.dir_bs as usize)?;
                        self.parse_data_block(ino, &blk, &mut out)?;
                        k += per;
                    }
                }
            }
            f => return Err(self.corrupt_ino(ino, format!("directory in format {f}"))),
        }
        out.retain(|(name, child, _)| {
            let ok = *child != ino && *child != self.root;
            if !ok {
                crate::input_warn!(
                    self.dev.name(),
                    "XFS directory entry {} loops back in directory {ino}; hidden",
                    crate::log_limit::esc(name)
                );
            }
            ok
        });
        Ok(out)
    }

    fn child_kind(&self, ftype: Option<u8>, child: u64) -> Result<FileKind> {
        match ftype.and_then(kind_from_ftype) {
            Some(k) => Ok(k),
            None => self
                .inode(child)?
                .kind()
                .ok_or_else(|| self.corrupt_ino(child, "unknown file type")),
        }
    }

    fn parse_shortform(
        &self,
        inode: &Inode,
        out: &mut Vec<(Vec<u8>, u64, FileKind)>,
    ) -> Result<()> {
        let f = inode.data_fork();
        let count = usize::from(u8at(f, 0));
        let i8 = u8at(f, 1) != 0;
        let isz = if i8 { 8 } else { 4 };
        let mut off = 2 + isz;
        let count = if i8 { usize::from(u8at(f, 1)) } else { count };
        for _ in 0..count {
            let namelen = usize::from(u8at(f, off));
            let name = sub(f, off + 3, namelen);
            if namelen == 0 || name.len() != namelen {
                return Err(self.corrupt_ino(inode.ino, "short-form directory entry past its fork"));
            }
            let mut p = off + 3 + namelen;
            let ftype = if self.ftype {
                p += 1;
                Some(u8at(f, p - 1))
            } else {
                None
            };
            if p + isz > f.len() {
                return Err(self.corrupt_ino(inode.ino, "short-form directory entry past its fork"));
            }
            let child = if i8 {
                be64(f, p)
            } else {
                u64::from(be32(f, p))
            };
            out.push((name.to_vec(), child, self.child_kind(ftype, child)?));
            off = p + isz;
        }
        Ok(())
    }

    fn parse_data_block(
        &self,
        ino: u64,
        b: &[u8],
        out: &mut Vec<(Vec<u8>, u64, FileKind)>,
    ) -> Result<()> {
        self.visit_data_block(ino, b, &mut |name, child, kind, _| {
            out.push((name.to_vec(), child, kind));
            Ok(true)
        })
    }

    /// Every entry of a directory data block but `.` and `..` as (name, inode, kind, where
    /// the entry ends in the block), until `f` returns false.
    fn visit_data_block(&self, ino: u64, b: &[u8], f: &mut EntryVisitor) -> Result<()> {
        let magic = sub(b, 0, 4);
        let (hdr, block_form) = match magic {
            b"XDB3" => (64, true),
            b"XDD3" => (64, false),
            b"XD2B" => (16, true),
            b"XD2D" => (16, false),
            _ => return Err(self.corrupt_ino(ino, "bad directory block magic")),
        };
        let mut end = b.len();
        if block_form {
            // Block form: the leaf entries and a tail (count, stale) sit at the end.
            let count = be32(b, b.len() - 8) as usize;
            end = count
                .checked_mul(8)
                .and_then(|n| b.len().checked_sub(8 + n))
                .filter(|&e| e >= hdr)
                .ok_or_else(|| self.corrupt_ino(ino, "bad directory block tail"))?;
        }
        let mut off = hdr;
        while off + 8 <= end {
            if be16(b, off) == 0xFFFF {
                let len = usize::from(be16(b, off + 2));
                if len < 8 || len % 8 != 0 {
                    return Err(self.corrupt_ino(ino, "bad free directory space"));
                }
                off += len;
                continue;
            }
            let child = be64(b, off);
            let namelen = usize::from(u8at(b, off + 8));
            let name = sub(b, off + 9, namelen);
            let ft = if self.ftype {
                Some(u8at(b, off + 9 + namelen))
            } else {
                None
            };
            let size = (8 + 1 + namelen + usize::from(self.ftype) + 2).div_ceil(8) * 8;
            if namelen == 0 || name.len() != namelen || off + size > end {
                return Err(self.corrupt_ino(ino, "directory entry past its block"));
            }
            if name != b"."
                && name != b".."
                && !f(name, child, self.child_kind(ft, child)?, off + size)?
            {
                return Ok(());
            }
            off += size;
        }
        Ok(())
    }

    /// Whether directory `inode` is listed by pages of its data blocks ([`Self::data_page`]):
    /// one in blocks (not short form) larger than [`PAGED_DIR_BYTES`].
    fn paged(&self, inode: &Inode) -> bool {
        inode.kind() == Some(FileKind::Dir)
            && matches!(inode.format(), FMT_EXTENTS | FMT_BTREE)
            && inode.size() > PAGED_DIR_BYTES
    }

    /// A page of a paged directory from `cookie`: the byte offset in the directory's data
    /// space of the next entry (Linux's own cookie is this offset / 8). Data blocks are read
    /// in logical order: every name once, and a cookie stays valid however pages were cut.
    fn data_page(&self, inode: &Inode, cookie: u64, budget: usize) -> Result<DirPage> {
        let dir = inode.ino;
        if inode.size() > MAX_DIR_BYTES {
            return Err(self.corrupt_ino(dir, "directory too large"));
        }
        let ext = self.data_extents(inode)?;
        let per = (self.dir_bs / self.bs).max(1);
        let mut fill = PageFill::new(budget);
        let first = ext.partition_point(|e| (e.off + e.len) * self.bs <= cookie);
        for e in &ext[first..] {
            if e.off * self.bs >= DIR_LEAF_OFFSET {
                break;
            }
            if e.unwritten {
                continue;
            }
            let mut k = 0;
            while k < e.len {
                let base = (e.off + k) * self.bs;
                k += per;
                if base + self.dir_bs <= cookie {
                    continue;
                }
                let from = cookie.saturating_sub(base);
                let blk = self.read_vec((e.block + k - per) * self.bs, self.dir_bs as usize)?;
                let mut full = false;
                self.visit_data_block(dir, &blk, &mut |name, child, kind, end| {
                    if (end as u64) <= from {
                        return Ok(true);
                    }
                    if child == dir || child == self.root {
                        crate::input_warn!(
                            self.dev.name(),
                            "XFS directory entry {} loops back in directory {dir}; hidden",
                            crate::log_limit::esc(name)
                        );
                        return Ok(true);
                    }
                    full = !fill.push(name, child, kind, base + end as u64);
                    Ok(!full)
                })?;
                if full {
                    return Ok(fill.page);
                }
            }
        }
        fill.page.end = true;
        Ok(fill.page)
    }

    /// The parent a directory records (`..`).
    fn dotdot(&self, ino: u64) -> Result<u64> {
        let inode = self.inode(ino)?;
        if inode.format() == FMT_LOCAL {
            let f = inode.data_fork();
            return Ok(if u8at(f, 1) != 0 {
                be64(f, 2)
            } else {
                u64::from(be32(f, 2))
            });
        }
        let ext = self.data_extents(&inode)?;
        let first = ext
            .first()
            .filter(|e| e.off == 0)
            .ok_or_else(|| self.corrupt_ino(ino, "directory without a first block"))?;
        let b = self.read_vec(first.block * self.bs, self.dir_bs as usize)?;
        let hdr = if self.v5 { 64 } else { 16 };
        // "." comes first, ".." second; both are ordinary entries.
        let dot = (8 + 1 + 1 + usize::from(self.ftype) + 2).div_ceil(8) * 8;
        if sub(&b, hdr + dot + 9, 2) != b".." {
            return Err(self.corrupt_ino(ino, "directory block without .."));
        }
        Ok(be64(&b, hdr + dot))
    }

    /// (flags, name, value) of each xattr; flags 0 user, 2 trusted (root), 4 security.
    fn raw_xattrs(&self, inode: &Inode) -> Result<Vec<RawXattr>> {
        let mut out = Vec::new();
        match inode.aformat() {
            FMT_LOCAL => {
                let f = inode.attr_fork();
                let count = usize::from(u8at(f, 2));
                let mut off = 4;
                for _ in 0..count {
                    let nl = usize::from(u8at(f, off));
                    let vl = usize::from(u8at(f, off + 1));
                    let flags = u8at(f, off + 2);
                    let name = sub(f, off + 3, nl);
                    let value = sub(f, off + 3 + nl, vl);
                    if name.len() != nl || value.len() != vl {
                        return Err(self.corrupt_ino(inode.ino, "short-form xattr past its fork"));
                    }
                    out.push((flags, name.to_vec(), value.to_vec()));
                    off += 3 + nl + vl;
                }
            }
            FMT_EXTENTS | FMT_BTREE if inode.forkoff() != 0 => {
                let ext = self.fork_extents(inode, true)?;
                if ext.first().is_none_or(|e| e.off != 0) {
                    return Ok(out);
                }
                let read = |lblk: u64| -> Result<Vec<u8>> {
                    let mut b = vec![0u8; self.bs as usize];
                    self.read_extents(inode.ino, &ext, lblk.saturating_mul(self.bs), &mut b)?;
                    Ok(b)
                };
                let mut b = read(0)?;
                // Node form: down the leftmost path of the da-btree to the first leaf, then
                // along the leaves' forward links; every step bounded by the fork's blocks.
                let fork_blocks: u64 = ext.iter().map(|e| e.len).sum();
                let mut steps = 0u64;
                while matches!(be16(&b, 8), 0x3EBE | 0xFEBE) {
                    steps += 1;
                    let (count, entries) = if be16(&b, 8) == 0x3EBE {
                        (be16(&b, 56), 64)
                    } else {
                        (be16(&b, 12), 16)
                    };
                    if count == 0 || steps > 8 {
                        return Err(self.corrupt_ino(inode.ino, "bad xattr node"));
                    }
                    b = read(u64::from(be32(&b, entries + 4)))?;
                }
                let mut seen = 0u64;
                loop {
                    self.attr_leaf(inode, &ext, &b, &mut out)?;
                    let forw = u64::from(be32(&b, 0));
                    seen += 1;
                    if forw == 0 {
                        break;
                    }
                    if seen > fork_blocks {
                        return Err(self.corrupt_ino(inode.ino, "xattr leaves loop"));
                    }
                    b = read(forw)?;
                }
            }
            _ => {}
        }
        Ok(out)
    }

    /// The entries of one xattr leaf block (v5 `XFS_ATTR3_LEAF_MAGIC`, v4 `XFS_ATTR_LEAF_MAGIC`).
    fn attr_leaf(
        &self,
        inode: &Inode,
        ext: &[Extent],
        b: &[u8],
        out: &mut Vec<RawXattr>,
    ) -> Result<()> {
        let magic = be16(b, 8);
        let hdr = match magic {
            0x3BEE => 80,
            0xFBEE => 32,
            _ => return Err(self.corrupt_ino(inode.ino, "bad xattr leaf magic")),
        };
        let count = usize::from(be16(b, if magic == 0x3BEE { 56 } else { 12 }));
        for i in 0..count {
            let e = sub(b, hdr + i * 8, 8);
            let nameidx = usize::from(be16(e, 4));
            let flags = u8at(e, 6);
            if flags & 0x80 != 0 {
                continue; // incomplete
            }
            if flags & 1 != 0 {
                let vl = usize::from(be16(b, nameidx));
                let nl = usize::from(u8at(b, nameidx + 2));
                let name = sub(b, nameidx + 3, nl);
                let value = sub(b, nameidx + 3 + nl, vl);
                if name.len() != nl || value.len() != vl {
                    return Err(self.corrupt_ino(inode.ino, "xattr past its leaf"));
                }
                out.push((flags & !1, name.to_vec(), value.to_vec()));
            } else {
                let vblk = u64::from(be32(b, nameidx));
                let vl = u64::from(be32(b, nameidx + 4));
                let nl = usize::from(u8at(b, nameidx + 8));
                let name = sub(b, nameidx + 9, nl).to_vec();
                if vl > MAX_VALUE {
                    return Err(self.corrupt_ino(inode.ino, "xattr value too large"));
                }
                let value = self.remote_value(inode.ino, ext, vblk, vl)?;
                out.push((flags, name, value));
            }
        }
        Ok(())
    }

    /// A remote xattr value: blocks of the attr fork from `vblk`, each with a header on v5.
    fn remote_value(&self, ino: u64, ext: &[Extent], vblk: u64, len: u64) -> Result<Vec<u8>> {
        let hdr = if self.v5 { 56 } else { 0 };
        let per = self.bs - hdr;
        let mut out = Vec::new();
        let mut blk = vblk;
        while (out.len() as u64) < len {
            let mut b = vec![0u8; self.bs as usize];
            self.read_extents(ino, ext, blk * self.bs, &mut b)?;
            if self.v5 && sub(&b, 0, 4) != b"XARM" {
                return Err(self.corrupt_ino(ino, "bad remote xattr block"));
            }
            let n = per.min(len - out.len() as u64) as usize;
            out.extend_from_slice(sub(&b, hdr as usize, n));
            blk += 1;
        }
        Ok(out)
    }
}

/// XFS ACL (big-endian count, then tag/id/perm entries of 12 bytes) to the `posix_acl_xattr`
/// form Linux shows (version 2, little-endian tag/perm/id entries of 8 bytes).
fn xfs_acl_to_xattr(v: &[u8]) -> Option<Vec<u8>> {
    let count = be32(v, 0) as usize;
    if count > 1024 || 4 + count * 12 > v.len() {
        return None;
    }
    let mut out = 2u32.to_le_bytes().to_vec();
    for i in 0..count {
        let e = sub(v, 4 + i * 12, 12);
        let tag = be32(e, 0);
        let id = match tag {
            2 | 8 => be32(e, 4),
            1 | 4 | 0x10 | 0x20 => u32::MAX,
            _ => return None,
        };
        out.extend_from_slice(&(tag as u16).to_le_bytes());
        out.extend_from_slice(&be16(e, 8).to_le_bytes());
        out.extend_from_slice(&id.to_le_bytes());
    }
    Some(out)
}

/// `xfs_da_hashname`: the hash directory leaves and da-btree nodes are sorted by.
pub(crate) fn da_hashname(name: &[u8]) -> u32 {
    let b = |i: usize| u32::from(name[i]);
    let mut hash = 0u32;
    let mut n = 0;
    while name.len() - n >= 4 {
        hash = (b(n) << 21) ^ (b(n + 1) << 14) ^ (b(n + 2) << 7) ^ b(n + 3) ^ hash.rotate_left(28);
        n += 4;
    }
    match name.len() - n {
        3 => (b(n) << 14) ^ (b(n + 1) << 7) ^ b(n + 2) ^ hash.rotate_left(21),
        2 => (b(n) << 7) ^ b(n + 1) ^ hash.rotate_left(14),
        1 => b(n) ^ hash.rotate_left(7),
        _ => hash,
    }
}

/// The first of `count` (hash, value) pairs of 8 bytes at `at` in `b`, sorted by hash, whose
/// hash is at least `hash` (`count` if none).
fn first_hash_at_least(b: &[u8], at: usize, count: usize, hash: u32) -> usize {
    let (mut lo, mut hi) = (0, count);
    while lo < hi {
        let m = lo + (hi - lo) / 2;
        if be32(b, at + m * 8) < hash {
            lo = m + 1;
        } else {
            hi = m;
        }
    }
    lo
}

/// Data entries compared for one lookup, at most (real collisions are a handful).
const MAX_CANDIDATES: usize = 256;

/// Leaf blocks followed along their sibling pointers for one hash, at most.
const MAX_LEAF_HOPS: usize = 1024;

/// Hash lookups (`xfs_dir2_block_lookup`, `xfs_dir2_leaf_lookup`, `xfs_dir2_node_lookup`):
/// a binary search of the hash-sorted leaf entries, reached in node form through the
/// da-btree, then the data entries they address, compared by name.
impl XfsFs {
    /// `name` in directory `dir` through its hash index: `Some(inode)`, `NotFound`, or `None`
    /// for a short-form directory, an ASCII-CI filesystem or an index we cannot use (search
    /// the listing instead).
    fn find_hashed(&self, dir: u64, name: &[u8]) -> Result<Option<u64>> {
        let inode = self.inode(dir)?;
        if inode.kind() != Some(FileKind::Dir)
            || !matches!(inode.format(), FMT_EXTENTS | FMT_BTREE)
            || self.ascii_ci
            || name.is_empty()
        {
            return Ok(None);
        }
        let ext = self.data_extents(&inode)?;
        let hash = da_hashname(name);
        let leaf_fsb = DIR_LEAF_OFFSET / self.bs;
        let last = ext.iter().map(|e| e.off + e.len).max().unwrap_or(0);
        let v5 = self.v5;
        let (leaf_hdr, node_hdr) = if v5 { (64, 64) } else { (16, 16) };
        // Candidate addresses from one sorted run of (hash, address) entries: the first index
        // with the hash, and whether the run may continue past the end.
        let candidates = |b: &[u8], ents: usize, count: usize| -> Option<(Vec<u32>, bool)> {
            if ents.checked_add(count.checked_mul(8)?)? > b.len() {
                return None;
            }
            let h = |i: usize| be32(b, ents + i * 8);
            let first = first_hash_at_least(b, ents, count, hash);
            let mut out = Vec::new();
            let mut i = first;
            while i < count && h(i) == hash {
                let addr = be32(b, ents + i * 8 + 4);
                if addr != 0 {
                    out.push(addr);
                }
                i += 1;
            }
            Some((out, i == count))
        };
        // Data entries read for one lookup, at most: a damaged leaf full of one hash would
        // otherwise read a data block per entry, leaf after leaf. Past it: the listing.
        let budget = std::cell::Cell::new(MAX_CANDIDATES);
        let found = |addrs: &[u32]| -> Result<Option<u64>> {
            for &a in addrs {
                if budget.get() == 0 {
                    return Ok(None);
                }
                budget.set(budget.get() - 1);
                if let Some(ino) = self.data_entry(dir, &ext, u64::from(a) << 3, name)? {
                    return Ok(Some(ino));
                }
            }
            Ok(None)
        };
        let not_found = || Error::NotFound(String::from_utf8_lossy(name).into_owned());
        if inode.size() == self.dir_bs {
            // Block form: the leaf entries and their tail at the end of the one block.
            let b = self.dir_block(dir, &ext, 0)?;
            let count = be32(&b, b.len() - 8) as usize;
            let Some(ents) = count
                .checked_mul(8)
                .and_then(|n| b.len().checked_sub(8 + n))
            else {
                return Ok(None);
            };
            let Some((addrs, _)) = candidates(&b, ents, count) else {
                return Ok(None);
            };
            return match found(&addrs)? {
                Some(ino) => Ok(Some(ino)),
                None if budget.get() == 0 => Ok(None),
                None => Err(not_found()),
            };
        }
        let leaf_magics: [u16; 2] = if v5 {
            [0x3df1, 0x3dff]
        } else {
            [0xd2f1, 0xd2ff]
        };
        let node_magic = if v5 { 0x3ebe } else { 0xfebe };
        let mut blk = leaf_fsb;
        let mut levels = 0;
        // Down the da-btree (node form) to a leaf; leaf form starts at the leaf.
        let mut leaf = loop {
            if blk < leaf_fsb || blk >= last {
                return Ok(None);
            }
            let b = self.dir_block(dir, &ext, blk)?;
            let magic = be16(&b, 8);
            if leaf_magics.contains(&magic) {
                break b;
            }
            levels += 1;
            if magic != node_magic || levels > 5 {
                return Ok(None);
            }
            let count = usize::from(be16(&b, node_hdr - if v5 { 8 } else { 4 }));
            if count == 0 || node_hdr + count * 8 > b.len() {
                return Ok(None);
            }
            // The first entry whose hash is >= the name's, else the last.
            let i = first_hash_at_least(&b, node_hdr, count, hash).min(count - 1);
            blk = u64::from(be32(&b, node_hdr + i * 8 + 4));
        };
        for _ in 0..MAX_LEAF_HOPS {
            let count = usize::from(be16(&leaf, leaf_hdr - if v5 { 8 } else { 4 }));
            let Some((addrs, to_end)) = candidates(&leaf, leaf_hdr, count) else {
                return Ok(None);
            };
            if let Some(ino) = found(&addrs)? {
                return Ok(Some(ino));
            }
            if budget.get() == 0 {
                return Ok(None);
            }
            // The same hash may continue in the next leaf (node form only).
            let forw = u64::from(be32(&leaf, 0));
            if !to_end || forw == 0 || levels == 0 {
                return Err(not_found());
            }
            blk = forw;
            if blk < leaf_fsb || blk >= last {
                return Ok(None);
            }
            leaf = self.dir_block(dir, &ext, blk)?;
            if !leaf_magics.contains(&be16(&leaf, 8)) {
                return Ok(None);
            }
        }
        Ok(None)
    }

    /// The directory block starting at logical filesystem block `fsb` (`dir_bs` bytes).
    fn dir_block(&self, dir: u64, ext: &[Extent], fsb: u64) -> Result<Vec<u8>> {
        let mut b = vec![0u8; self.dir_bs as usize];
        let off = fsb
            .checked_mul(self.bs)
            .ok_or_else(|| self.corrupt_ino(dir, "directory block past the end"))?;
        self.read_extents(dir, ext, off, &mut b)?;
        Ok(b)
    }

    /// The inode of the data entry at byte `off` of directory `dir`'s data space if it is
    /// called `name`.
    fn data_entry(&self, dir: u64, ext: &[Extent], off: u64, name: &[u8]) -> Result<Option<u64>> {
        if off >= DIR_LEAF_OFFSET {
            return Err(self.corrupt_ino(dir, "leaf entry addresses no data block"));
        }
        let db = off / self.dir_bs;
        let b = self.dir_block(dir, ext, db * (self.dir_bs / self.bs))?;
        let at = (off % self.dir_bs) as usize;
        let hdr = if self.v5 { 64 } else { 16 };
        if at < hdr || at + 12 > b.len() || be16(&b, at) == 0xFFFF {
            return Err(self.corrupt_ino(dir, "leaf entry addresses no data entry"));
        }
        let n = usize::from(u8at(&b, at + 8));
        if sub(&b, at + 9, n) != name {
            return Ok(None);
        }
        let child = be64(&b, at);
        if child == dir || child == self.root {
            // Hidden, as in the listing.
            return Ok(None);
        }
        Ok(Some(child))
    }
}

impl GuestFs for XfsFs {
    fn root(&self) -> u64 {
        self.root
    }

    fn stat(&self, ino: u64) -> Result<FileStat> {
        let i = self.inode(ino)?;
        let kind = i
            .kind()
            .ok_or_else(|| self.corrupt_ino(ino, "unknown file type"))?;
        let r = &i.raw;
        let (nlink, uid, gid) = if u8at(r, 4) == 1 {
            (u32::from(be16(r, 6)), be32(r, 8), be32(r, 12))
        } else {
            (be32(r, 16), be32(r, 8), be32(r, 12))
        };
        let rdev = if i.format() == FMT_DEV {
            // Linux's old 32-bit sysv form: major << 18 | minor.
            let d = be32(i.data_fork(), 0);
            let (major, minor) = (d >> 18, d & 0x3FFFF);
            (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
        } else {
            0
        };
        Ok(FileStat {
            ino,
            kind,
            perm: i.mode() & 0o7777,
            uid,
            gid,
            size: if matches!(kind, FileKind::File | FileKind::Dir | FileKind::Symlink) {
                i.size()
            } else {
                0
            },
            allocated: be64(r, 64).saturating_mul(self.bs),
            nlink,
            rdev,
            atime: i.time(32),
            mtime: i.time(40),
            ctime: i.time(48),
            btime: (u8at(r, 4) >= 3).then(|| i.time(144)),
        })
    }

    fn lookup(&self, dir: u64, name: &[u8]) -> Result<FileStat> {
        let ino = match self.find_hashed(dir, name)? {
            Some(ino) => ino,
            None => DirCache::find(&self.dirs, dir, name, false, || self.read_dir(dir))?,
        };
        let st = self.stat(ino)?;
        if st.kind == FileKind::Dir && self.dotdot(ino)? != dir {
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
                return self.data_page(&inode, cookie, budget);
            }
        }
        Ok(page_of_list(&self.dir_entries(dir)?, cookie, budget))
    }

    fn read(&self, ino: u64, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let i = self.inode(ino)?;
        match i.kind() {
            Some(FileKind::File) => {}
            Some(FileKind::Dir) => return Err(Error::IsDir(format!("XFS inode {ino}"))),
            _ => {
                return Err(Error::Invalid(format!(
                    "XFS inode {ino} is not a regular file"
                )))
            }
        }
        let size = i.size();
        if offset >= size {
            return Ok(0);
        }
        let want = (buf.len() as u64).min(size - offset) as usize;
        match i.format() {
            FMT_EXTENTS | FMT_BTREE => {
                let ext = self.data_extents(&i)?;
                self.read_extents(ino, &ext, offset, &mut buf[..want])?;
            }
            FMT_LOCAL => {
                let d = i.data_fork();
                buf[..want].fill(0);
                let s = sub(d, offset as usize, want);
                buf[..s.len()].copy_from_slice(s);
            }
            f => return Err(self.corrupt_ino(ino, format!("regular file in format {f}"))),
        }
        Ok(want)
    }

    fn readlink(&self, ino: u64) -> Result<Vec<u8>> {
        let i = self.inode(ino)?;
        if i.kind() != Some(FileKind::Symlink) {
            return Err(Error::Invalid(format!("XFS inode {ino} is not a symlink")));
        }
        let size = i.size();
        if size > 4096 {
            return Err(self.corrupt_ino(ino, "symlink too long"));
        }
        match i.format() {
            FMT_LOCAL => {
                let t = sub(i.data_fork(), 0, size as usize);
                if t.len() as u64 != size {
                    return Err(self.corrupt_ino(ino, "symlink past its fork"));
                }
                Ok(t.to_vec())
            }
            FMT_EXTENTS | FMT_BTREE => {
                // One buffer per extent (`xfs_readlink_bmap`), on v5 each with its own
                // header: a 2-block extent (1 KiB blocks) holds one header, not two.
                let ext = self.data_extents(&i)?;
                let hdr = if self.v5 { 56 } else { 0 };
                let mut out = Vec::new();
                for e in ext.iter().take(8) {
                    if out.len() as u64 >= size {
                        break;
                    }
                    let len = e.len.saturating_mul(self.bs).min(8192);
                    let mut b = vec![0u8; len as usize];
                    self.read_extents(ino, &ext, e.off.saturating_mul(self.bs), &mut b)?;
                    if self.v5 && sub(&b, 0, 4) != b"XSLM" {
                        return Err(self.corrupt_ino(ino, "bad remote symlink block"));
                    }
                    let n = len.saturating_sub(hdr).min(size - out.len() as u64) as usize;
                    out.extend_from_slice(sub(&b, hdr as usize, n));
                }
                if (out.len() as u64) < size {
                    return Err(self.corrupt_ino(ino, "remote symlink shorter than its size"));
                }
                Ok(out)
            }
            f => Err(self.corrupt_ino(ino, format!("symlink in format {f}"))),
        }
    }

    fn xattrs(&self, ino: u64) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let i = self.inode(ino)?;
        let mut out = Vec::new();
        for (flags, name, value) in self.raw_xattrs(&i)? {
            let prefix: &[u8] = match flags & 0x06 {
                0 => b"user.",
                2 => b"trusted.",
                4 => b"security.",
                _ => continue,
            };
            // POSIX ACLs: root-namespace SGI_ACL_FILE / SGI_ACL_DEFAULT in XFS's own format,
            // shown converted and, as Linux lists them to root, also as the trusted.* they are.
            if flags & 0x06 == 2 && (name == b"SGI_ACL_FILE" || name == b"SGI_ACL_DEFAULT") {
                let full: &[u8] = if name == b"SGI_ACL_FILE" {
                    b"system.posix_acl_access"
                } else {
                    b"system.posix_acl_default"
                };
                match xfs_acl_to_xattr(&value) {
                    Some(v) => out.push((full.to_vec(), v)),
                    None => {
                        crate::input_warn!(
                            self.dev.name(),
                            "XFS ACL in an unknown format; hidden (inode {ino})"
                        );
                    }
                }
            }
            let mut n = prefix.to_vec();
            n.extend_from_slice(&name);
            out.push((n, value));
        }
        Ok(out)
    }

    fn map(&self, ino: u64, offset: u64, len: u64) -> Result<Option<FileMap>> {
        let i = self.inode(ino)?;
        if i.kind() != Some(FileKind::File) || !matches!(i.format(), FMT_EXTENTS | FMT_BTREE) {
            return Ok(None);
        }
        let size = i.size();
        let (mut map, end) = FileMap::window(size, offset, len);
        if offset >= end {
            return Ok(Some(map));
        }
        let ext = self.data_extents(&i)?;
        let vol = self.dev.len();
        let mut pos = offset;
        let i0 = ext.partition_point(|e| (e.off + e.len) * self.bs <= offset);
        for e in &ext[i0..] {
            let es = e.off * self.bs;
            if es >= end {
                break;
            }
            let s = es.max(offset);
            let t = ((e.off + e.len) * self.bs).min(end);
            if s >= t {
                continue;
            }
            if s < pos {
                // Overlapping extents: how they combine is `read_extents`'s to say.
                return Ok(None);
            }
            if !map.push(pos, s - pos, Place::Zero, vol) {
                return Ok(Some(map));
            }
            let disk = e.block * self.bs + (s - es);
            let place = if e.unwritten {
                Place::Zero
            } else if self.overlay.touches(disk, t - s) {
                Place::Reader
            } else {
                Place::Disk(disk)
            };
            if !map.push(s, t - s, place, vol) {
                return Ok(Some(map));
            }
            pos = t;
        }
        map.push(pos, end - pos, Place::Zero, vol);
        Ok(Some(map))
    }

    fn data_ranges(&self, ino: u64) -> Result<Option<Vec<(u64, u64)>>> {
        let i = self.inode(ino)?;
        if i.kind() != Some(FileKind::File) || !matches!(i.format(), FMT_EXTENTS | FMT_BTREE) {
            return Ok(None);
        }
        let size = i.size();
        let mut out: Vec<(u64, u64)> = Vec::new();
        for e in self.data_extents(&i)?.iter() {
            if e.unwritten {
                continue;
            }
            let s = e.off.saturating_mul(self.bs);
            let t = (e.off + e.len).saturating_mul(self.bs).min(size);
            if t <= s {
                continue;
            }
            match out.last_mut() {
                Some(l) if l.0 + l.1 == s => l.1 += t - s,
                _ => out.push((s, t - s)),
            }
        }
        Ok(Some(out))
    }

    fn describe(&self) -> String {
        let mut s = format!(
            "XFS v{}, {}",
            if self.v5 { 5 } else { 4 },
            human_size(self.dblocks.saturating_mul(self.bs))
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

#[cfg(test)]
mod hash_tests {
    /// Expected values from xfsprogs: `xfs_db -r -c 'hash NAME' IMG`.
    #[test]
    fn da_hashname_matches_xfs_db() {
        for (name, want) in [
            ("a", 0x61),
            ("ab", 0x30e2),
            ("abc", 0x187163),
            ("abcd", 0xc38b1e4),
            ("e0000042", 0x6c6dbb1),
            ("héllo-wörld", 0x4c9a4ba6),
            (
                "a-much-longer-name-that-spans-more-than-thirty-two-bytes-é.txt",
                0x73471c4c,
            ),
        ] {
            assert_eq!(super::da_hashname(name.as_bytes()), want, "{name}");
        }
        assert_eq!(super::da_hashname(b""), 0);
    }
}

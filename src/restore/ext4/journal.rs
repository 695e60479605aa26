//! jbd2 journal replay, in memory: which filesystem blocks the committed-but-unapplied
//! transactions of a crash-consistent snapshot replace, where their new contents are, and the
//! fast-commit tags to apply after them.
//!
//! The rules are those of `jbd2_journal_recover` as e2fsprogs 1.47 carries it (`e2fsck/recovery.c`,
//! `e2fsck/journal.c`), which is the reference the tests compare with (`e2fsck -E journal_only`):
//! - the journal superblock is checked first (magic, version, known features, checksum type and
//!   crc32c for csum v2/v3, block size, length, fast-commit size); a bad one refuses the replay;
//! - pass 1 (scan) walks from `s_start`/`s_sequence` while block headers carry the expected
//!   sequence. A descriptor or revoke block whose tail checksum (v2/v3) fails ends the log at the
//!   next commit block when that commit is older than the previous one (stale data), and fails
//!   the whole recovery when it is not. A commit block whose checksum (v1: crc32 over the
//!   transaction's blocks; v2/v3: crc32c of the block) fails ends the log before that
//!   transaction (with `async_commit` the scan goes on but replays nothing past it);
//! - pass 2 collects revoke records (a revoke block whose count overruns it fails recovery);
//! - pass 3 maps every tagged block not revoked by the same or a later transaction; a block
//!   whose tag checksum (v2/v3) fails is skipped and the others replayed;
//! - the fast-commit area after the log is scanned (tags with their crc32c up to a tail of the
//!   expected transaction) and its valid tags returned for the caller to apply.
//!
//! Reads past the journal or through holes in its map during the scan fail the recovery, as
//! there. Every walk is bounded by the journal's length.

use std::collections::HashMap;

use super::super::bytes::{be16, be32, be64, le16, le32, sub};
use crate::error::Result;

const MAGIC: u32 = 0xC03B_3998;
const DESCRIPTOR: u32 = 1;
const COMMIT: u32 = 2;
const SB_V1: u32 = 3;
const SB_V2: u32 = 4;
const REVOKE: u32 = 5;

const COMPAT_CHECKSUM: u32 = 0x1;
const INCOMPAT_64BIT: u32 = 0x2;
const INCOMPAT_ASYNC_COMMIT: u32 = 0x4;
const INCOMPAT_CSUM_V2: u32 = 0x8;
const INCOMPAT_CSUM_V3: u32 = 0x10;
const INCOMPAT_FAST_COMMIT: u32 = 0x20;
const KNOWN_INCOMPAT: u32 = 0x3F;

const TAG_ESCAPE: u16 = 1;
const TAG_SAME_UUID: u16 = 2;
const TAG_LAST: u16 = 8;

const CRC32_CHKSUM: u8 = 1;
const CRC32C_CHKSUM: u8 = 4;
const MIN_JOURNAL_BLOCKS: u64 = 1024;
const DEFAULT_FC_BLOCKS: u64 = 256;

/// Where to read a replaced filesystem block.
#[derive(Clone, Copy, Debug)]
pub struct Replaced {
    /// Physical filesystem block inside the journal holding the new contents.
    pub block: u64,
    /// The block started with the jbd2 magic, which the journal stores escaped (zeroed).
    pub escaped: bool,
}

/// Read access to the journal by its own (logical) block number.
pub trait JournalBlocks {
    fn block_size(&self) -> usize;
    /// Physical filesystem block of journal block `n`.
    fn physical(&self, n: u64) -> Result<u64>;
    /// Contents of journal block `n`.
    fn read(&self, n: u64) -> Result<Vec<u8>>;
}

/// One fast-commit tag to apply, in order, after the full transactions (`EXT4_FC_TAG_*`).
#[derive(Clone, Debug, PartialEq)]
pub enum FcTag {
    /// An extent added to an inode's map (logical, length, physical, uninitialised).
    AddRange {
        ino: u32,
        lblk: u32,
        len: u32,
        pblk: u64,
        uninit: bool,
    },
    /// A logical range removed from an inode's map.
    DelRange { ino: u32, lblk: u32, len: u32 },
    /// A directory entry added (create and link are replayed alike).
    Link {
        parent: u32,
        ino: u32,
        name: Vec<u8>,
    },
    /// A directory entry removed.
    Unlink {
        parent: u32,
        ino: u32,
        name: Vec<u8>,
    },
    /// An inode's on-disk bytes (as many as the tag holds).
    Inode { ino: u32, raw: Vec<u8> },
    /// End of one fast commit.
    Tail,
}

#[derive(Default)]
pub struct Replay {
    pub map: HashMap<u64, Replaced>,
    pub transactions: u32,
    /// What was not replayed and why (for `describe()`), empty when everything was.
    pub notes: Vec<String>,
    /// Valid fast-commit tags, to apply after the blocks of `map`.
    pub fast_commit: Vec<FcTag>,
}

/// What recovery does with a journal.
pub enum Outcome {
    /// Nothing to replay (clean journal).
    Clean,
    /// Replay these blocks (and fast-commit tags).
    Replay(Replay),
    /// The journal is not replayed at all, for this reason (e2fsck's outcome too).
    Refused(String),
}

/// The journal's raw crc32c (Linux's `jbd2_chksum`: no inversion on the way in or out).
fn crc32c(seed: u32, data: &[u8]) -> u32 {
    !crc32c::crc32c_append(!seed, data)
}

/// Linux's `crc32_be` as jbd2 checksum v1 chains it over a transaction (from `~0`).
const CRC32_BE: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_MPEG_2);

struct Layout {
    first: u64,
    last: u64,
    incompat: u32,
    compat: u32,
    tag_bytes: usize,
    /// Bytes at the end of descriptor and revoke blocks for their checksum (v2/v3).
    tail: usize,
    seed: u32,
    bs: usize,
}

impl Layout {
    fn wrap(&self, pos: u64) -> u64 {
        if pos >= self.last {
            pos - (self.last - self.first)
        } else {
            pos
        }
    }

    fn csum_v23(&self) -> bool {
        self.incompat & (INCOMPAT_CSUM_V2 | INCOMPAT_CSUM_V3) != 0
    }

    /// `jbd2_descriptor_block_csum_verify` (descriptor and revoke blocks).
    fn block_tail_ok(&self, b: &[u8]) -> bool {
        if !self.csum_v23() || b.len() < 4 {
            return true;
        }
        let at = b.len() - 4;
        let mut copy = b.to_vec();
        copy[at..].fill(0);
        crc32c(self.seed, &copy) == be32(b, at)
    }

    /// `jbd2_commit_block_csum_verify`.
    fn commit_ok(&self, b: &[u8]) -> bool {
        if !self.csum_v23() {
            return true;
        }
        let mut copy = b.to_vec();
        if let Some(s) = copy.get_mut(16..20) {
            s.fill(0);
        }
        crc32c(self.seed, &copy) == be32(b, 16)
    }

    /// The tags of a descriptor block: (filesystem block, flags, tag checksum).
    fn tags(&self, b: &[u8]) -> Vec<(u64, u16, u32)> {
        let mut out = Vec::new();
        let mut off = 12;
        let end = b.len().saturating_sub(self.tail);
        while off + self.tag_bytes <= end {
            let low = u64::from(be32(b, off));
            // t_flags is read as the 16-bit field of the v2 tag in both layouts, as Linux does.
            let flags = be16(b, off + 6);
            let high = if self.incompat & INCOMPAT_64BIT != 0 {
                u64::from(be32(b, off + 8))
            } else {
                0
            };
            let csum = if self.incompat & INCOMPAT_CSUM_V3 != 0 {
                be32(b, off + 12)
            } else {
                u32::from(be16(b, off + 4))
            };
            out.push(((high << 32) | low, flags, csum));
            off += self.tag_bytes;
            if flags & TAG_SAME_UUID == 0 {
                off += 16;
            }
            if flags & TAG_LAST != 0 {
                break;
            }
        }
        out
    }

    /// `jbd2_block_tag_csum_verify`.
    fn tag_ok(&self, csum: u32, data: &[u8], seq: u32) -> bool {
        if !self.csum_v23() {
            return true;
        }
        let c = crc32c(crc32c(self.seed, &seq.to_be_bytes()), data);
        if self.incompat & INCOMPAT_CSUM_V3 != 0 {
            c == csum
        } else {
            c & 0xFFFF == csum
        }
    }
}

/// Sequence numbers compare modulo 2^32 (`tid_gt`).
fn tid_gt(x: u32, y: u32) -> bool {
    (x.wrapping_sub(y) as i32) > 0
}

/// Replay the journal whose superblock is journal block 0 and that is `journal_len` blocks long.
pub fn replay(j: &dyn JournalBlocks, journal_len: u64) -> Result<Outcome> {
    let sb = j.read(0)?;
    let layout = match check_superblock(&sb, j.block_size(), journal_len) {
        Ok(Some(l)) => l,
        Ok(None) => return Ok(Outcome::Clean),
        Err(why) => return Ok(Outcome::Refused(why)),
    };
    let start_seq = be32(&sb, 0x18);
    let start = u64::from(be32(&sb, 0x1C));
    // j_fc_first = j_last + 1 (the block at j_last belongs to neither).
    let fc_first = layout.last + 1;
    let total = u64::from(be32(&sb, 0x10));
    match recover(j, &layout, start, start_seq, fc_first, total) {
        Ok(r) => Ok(Outcome::Replay(r)),
        Err(Failed(why)) => Ok(Outcome::Refused(why)),
    }
}

/// A recovery that fails as a whole (nothing replayed), with the reason.
struct Failed(String);

/// `e2fsck_journal_load`'s checks. `Ok(None)`: nothing to replay.
fn check_superblock(
    sb: &[u8],
    bs: usize,
    journal_len: u64,
) -> std::result::Result<Option<Layout>, String> {
    if be32(sb, 0) != MAGIC {
        return Err("the journal superblock has a bad magic".into());
    }
    let v2 = match be32(sb, 4) {
        SB_V1 => false,
        SB_V2 => true,
        DESCRIPTOR | COMMIT | REVOKE => {
            return Err("the journal superblock is corrupt (block type)".into())
        }
        t => return Err(format!("journal superblock version {t} is unknown")),
    };
    let (compat, incompat) = if v2 {
        (be32(sb, 0x24), be32(sb, 0x28))
    } else {
        (0, 0)
    };
    if v2 && be32(sb, 0x40) > 1 {
        return Err("the journal is shared by several filesystems".into());
    }
    if incompat & !KNOWN_INCOMPAT != 0 {
        return Err(format!(
            "the journal has unknown incompatible features {:#x}",
            incompat & !KNOWN_INCOMPAT
        ));
    }
    if v2 && be32(sb, 0x2C) != 0 {
        return Err("the journal has unknown read-only features".into());
    }
    let v23 = incompat & (INCOMPAT_CSUM_V2 | INCOMPAT_CSUM_V3) != 0;
    if (incompat & INCOMPAT_CSUM_V2 != 0 && incompat & INCOMPAT_CSUM_V3 != 0)
        || (v23 && compat & COMPAT_CHECKSUM != 0)
    {
        return Err("the journal superblock is corrupt (checksum features)".into());
    }
    if v23 {
        if sub(sb, 0x50, 1).first().copied() != Some(CRC32C_CHKSUM) {
            return Err("the journal superblock is corrupt (checksum type)".into());
        }
        let mut copy = sub(sb, 0, 1024).to_vec();
        if copy.len() < 1024 {
            return Err("the journal superblock is truncated".into());
        }
        copy[0xFC..0x100].fill(0);
        if crc32c(!0, &copy) != be32(sb, 0xFC) {
            return Err("the journal superblock checksum is wrong".into());
        }
    }
    if be32(sb, 0xC) as usize != bs {
        return Err("the journal block size differs from the filesystem's".into());
    }
    let maxlen = u64::from(be32(sb, 0x10));
    if maxlen > journal_len {
        return Err("the journal is shorter than its superblock says".into());
    }
    let mut last = maxlen;
    if incompat & INCOMPAT_FAST_COMMIT != 0 {
        let nfc = match be32(sb, 0x54) {
            0 => DEFAULT_FC_BLOCKS,
            n => u64::from(n),
        };
        if maxlen.saturating_sub(nfc) < MIN_JOURNAL_BLOCKS || nfc >= maxlen {
            return Err("the journal's fast-commit area is impossible".into());
        }
        last = maxlen - nfc;
    }
    let first = u64::from(be32(sb, 0x14));
    let start = u64::from(be32(sb, 0x1C));
    if start == 0 {
        return Ok(None);
    }
    if first == 0 || first >= last || start < first || start >= last {
        return Err(format!(
            "the journal bounds are impossible (first {first}, start {start}, last {last})"
        ));
    }
    let tag_bytes = if incompat & INCOMPAT_CSUM_V3 != 0 {
        16
    } else {
        let mut sz = 12;
        if incompat & INCOMPAT_CSUM_V2 != 0 {
            sz += 2;
        }
        if incompat & INCOMPAT_64BIT == 0 {
            sz -= 4;
        }
        sz
    };
    Ok(Some(Layout {
        first,
        last,
        incompat,
        compat,
        tag_bytes,
        tail: if v23 { 4 } else { 0 },
        seed: if v23 {
            crc32c(!0, sub(sb, 0x30, 16))
        } else {
            0
        },
        bs,
    }))
}

fn recover(
    j: &dyn JournalBlocks,
    l: &Layout,
    start: u64,
    start_seq: u32,
    fc_first: u64,
    total: u64,
) -> std::result::Result<Replay, Failed> {
    let lap = l.last - l.first;
    let jread = |n: u64| -> std::result::Result<Vec<u8>, Failed> {
        if n >= total {
            return Err(Failed(format!("journal block {n} is past its end")));
        }
        j.read(n)
            .map_err(|e| Failed(format!("journal block {n} unreadable: {e}")))
    };
    let mut notes = Vec::new();

    // Pass 1: scan for the end of the log.
    let mut next_id = start_seq;
    let mut pos = start;
    let mut end: Option<u32> = None;
    let mut failed_commit: Option<u32> = None;
    let mut need_check_commit_time = false;
    let mut last_commit_time = 0u64;
    let mut crc_sum = CRC32_BE.digest();
    let mut steps = 0u64;
    loop {
        if steps > lap {
            // A log longer than the journal: only a crafted image gets here.
            notes.push("the journal log loops; replay stops after one lap".into());
            break;
        }
        let b = jread(pos)?;
        pos = l.wrap(pos + 1);
        steps += 1;
        if be32(&b, 0) != MAGIC || be32(&b, 8) != next_id {
            break;
        }
        match be32(&b, 4) {
            DESCRIPTOR => {
                if !l.block_tail_ok(&b) {
                    need_check_commit_time = true;
                }
                let n = l.tags(&b).len() as u64;
                if l.compat & COMPAT_CHECKSUM != 0 && !need_check_commit_time && end.is_none() {
                    crc_sum.update(&b);
                    let mut ok = true;
                    for _ in 0..n {
                        match j.read(pos) {
                            Ok(d) if pos < total => crc_sum.update(&d),
                            _ => {
                                ok = false;
                                break;
                            }
                        }
                        pos = l.wrap(pos + 1);
                    }
                    steps += n;
                    if !ok {
                        break;
                    }
                    continue;
                }
                pos = l.wrap(pos + n);
                steps += n;
            }
            COMMIT => {
                let commit_time = be64(&b, 48);
                if need_check_commit_time {
                    if commit_time >= last_commit_time {
                        return Err(Failed(format!(
                            "a descriptor or revoke block of transaction {next_id} has a bad \
                             checksum (e2fsck and Linux refuse the whole replay)"
                        )));
                    }
                    notes.push(format!(
                        "the log ends at transaction {next_id} (bad checksum on stale blocks)"
                    ));
                    break;
                }
                let mut bad = false;
                if l.compat & COMPAT_CHECKSUM != 0 {
                    if let Some(e) = end {
                        failed_commit = Some(e);
                        break;
                    }
                    let found = be32(&b, 16);
                    let (ty, size) = (
                        sub(&b, 12, 1).first().copied(),
                        sub(&b, 13, 1).first().copied(),
                    );
                    let sum = std::mem::replace(&mut crc_sum, CRC32_BE.digest()).finalize();
                    let matches = sum == found && ty == Some(CRC32_CHKSUM) && size == Some(4);
                    let unused = ty == Some(0) && size == Some(0) && found == 0;
                    bad = !(matches || unused);
                }
                if !bad && !l.commit_ok(&b) {
                    bad = true;
                }
                if bad {
                    if commit_time < last_commit_time {
                        notes.push(format!(
                            "the log ends at transaction {next_id} (bad checksum on stale blocks)"
                        ));
                        break;
                    }
                    end = Some(next_id);
                    if l.incompat & INCOMPAT_ASYNC_COMMIT != 0 {
                        notes.push(format!(
                            "transaction {next_id} has a bad commit checksum (async commit): it \
                             and any later ones are not replayed"
                        ));
                    } else {
                        failed_commit = Some(next_id);
                        break;
                    }
                }
                last_commit_time = commit_time;
                next_id = next_id.wrapping_add(1);
            }
            REVOKE => {
                if !l.block_tail_ok(&b) {
                    need_check_commit_time = true;
                }
            }
            _ => break,
        }
    }
    let end_id = end.unwrap_or(next_id);
    if let Some(f) = failed_commit {
        notes.push(format!(
            "transaction {f} has a bad commit checksum: it and any later ones are not replayed"
        ));
    }

    // Pass 2 (revoke records) and the tags of pass 3, in one walk of the committed part.
    let mut revoked: HashMap<u64, u32> = HashMap::new();
    let mut tagged: Vec<(u64, u32, u64, u16, u32)> = Vec::new();
    let mut pos = start;
    let mut id = start_seq;
    let mut steps = 0u64;
    while tid_gt(end_id, id) && steps <= lap {
        let b = jread(pos)?;
        pos = l.wrap(pos + 1);
        steps += 1;
        if be32(&b, 0) != MAGIC || be32(&b, 8) != id {
            break;
        }
        match be32(&b, 4) {
            DESCRIPTOR => {
                if !l.block_tail_ok(&b) {
                    return Err(Failed(format!(
                        "descriptor block of transaction {id} has a bad checksum"
                    )));
                }
                for (fs_block, flags, csum) in l.tags(&b) {
                    tagged.push((fs_block, id, pos, flags, csum));
                    pos = l.wrap(pos + 1);
                    steps += 1;
                }
            }
            COMMIT => id = id.wrapping_add(1),
            REVOKE => {
                let count = be32(&b, 12) as usize;
                if count > l.bs - l.tail {
                    return Err(Failed(format!(
                        "revoke block of transaction {id} overruns its block"
                    )));
                }
                let rsize = if l.incompat & INCOMPAT_64BIT != 0 {
                    8
                } else {
                    4
                };
                let mut off = 16;
                while off + rsize <= count {
                    let blk = if rsize == 8 {
                        be64(&b, off)
                    } else {
                        u64::from(be32(&b, off))
                    };
                    let e = revoked.entry(blk).or_insert(id);
                    if tid_gt(id, *e) {
                        *e = id;
                    }
                    off += rsize;
                }
            }
            _ => break,
        }
    }
    let committed = end_id.wrapping_sub(start_seq);
    let mut map = HashMap::new();
    let mut bad_blocks = 0usize;
    for (fs_block, tid, jblock, flags, csum) in tagged {
        if revoked.get(&fs_block).is_some_and(|&r| !tid_gt(tid, r)) {
            // Revoked by this or a later transaction: this copy is not replayed.
            continue;
        }
        if l.csum_v23() {
            match j.read(jblock) {
                Ok(d) if l.tag_ok(csum, &d, tid) => {}
                _ => {
                    bad_blocks += 1;
                    if bad_blocks <= 8 {
                        notes.push(format!(
                            "the journal copy of block {fs_block} (transaction {tid}) fails its \
                             checksum: not replayed"
                        ));
                    }
                    continue;
                }
            }
        }
        let Ok(phys) = j.physical(jblock) else {
            notes.push(format!(
                "the journal copy of block {fs_block} is unreadable: not replayed"
            ));
            continue;
        };
        map.insert(
            fs_block,
            Replaced {
                block: phys,
                escaped: flags & TAG_ESCAPE != 0,
            },
        );
    }
    if bad_blocks > 8 {
        notes.push(format!(
            "{} more journal blocks fail their checksum",
            bad_blocks - 8
        ));
    }

    let fast_commit = if l.incompat & INCOMPAT_FAST_COMMIT != 0 {
        let read = &mut |i: u64| -> Option<Vec<u8>> {
            let b = fc_first.checked_add(i)?;
            (b < total).then(|| j.read(b).ok()).flatten()
        };
        scan_fast_commit(read, end_id).map_err(Failed)?
    } else {
        Vec::new()
    };

    Ok(Replay {
        map,
        transactions: committed,
        notes,
        fast_commit,
    })
}

/// Fast-commit blocks scanned at most (bounds the tags kept in memory).
const MAX_FC_BLOCKS: u64 = 16384;
const FC_ADD_RANGE: u16 = 1;
const FC_DEL_RANGE: u16 = 2;
const FC_CREAT: u16 = 3;
const FC_LINK: u16 = 4;
const FC_UNLINK: u16 = 5;
const FC_INODE: u16 = 6;
const FC_PAD: u16 = 7;
const FC_TAIL: u16 = 8;
const FC_HEAD: u16 = 9;

/// Scan the fast-commit area block by block (`read(i)` gives its block `i`, `None` past the
/// end) as e2fsck's `ext4_fc_replay_scan`: the tags up to the last tail whose transaction is
/// `expected` and whose crc32c covers them. An error string is a failed recovery.
pub fn scan_fast_commit(
    read: &mut dyn FnMut(u64) -> Option<Vec<u8>>,
    expected: u32,
) -> std::result::Result<Vec<FcTag>, String> {
    let mut tags: Vec<FcTag> = Vec::new();
    // Tags up to the last verified tail, and the running crc32c since the previous tail.
    let mut valid = 0usize;
    let mut crc = 0u32;
    let mut i = 0u64;
    // What ends the scan where e2fsck's callback returns STOP or an error: an error before
    // any verified tail fails the whole recovery.
    let stop = |tags: &mut Vec<FcTag>, valid: usize, why: &str| {
        if valid > 0 {
            tags.truncate(valid);
            Ok(std::mem::take(tags))
        } else {
            Err(why.to_string())
        }
    };
    loop {
        if i >= MAX_FC_BLOCKS {
            // Linux's default area is 256 blocks; a bigger one is read this far at most.
            return stop(&mut tags, valid, "the fast-commit area is too large");
        }
        let Some(b) = read(i) else {
            if i == 0 {
                return Ok(Vec::new());
            }
            return stop(
                &mut tags,
                valid,
                "the fast-commit area runs past the journal",
            );
        };
        if i == 0 && le16(&b, 0) != FC_HEAD {
            // No fast commit since the last full one.
            return Ok(Vec::new());
        }
        i += 1;
        let end = b.len().saturating_sub(1);
        let mut cur = 0usize;
        while cur < end {
            let tag = le16(&b, cur);
            let len = usize::from(le16(&b, cur + 2));
            // Fixed-size values are read whatever the length says, as e2fsck's memcpy does.
            let val = b.get(cur + 4..).unwrap_or(&[]);
            match tag {
                FC_ADD_RANGE | FC_DEL_RANGE | FC_CREAT | FC_LINK | FC_UNLINK | FC_INODE
                | FC_PAD => {
                    let whole = b.get(cur..cur + 4 + len).ok_or(());
                    let Ok(whole) = whole else {
                        // A tag running past its block: Linux would read beyond it.
                        return stop(&mut tags, valid, "a fast-commit tag runs past its block");
                    };
                    if let Some(t) = decode_tag(tag, val, len) {
                        tags.push(t);
                    }
                    crc = crc32c(crc, whole);
                }
                FC_TAIL => {
                    crc = crc32c(crc, sub(&b, cur, 8));
                    if le32(val, 0) == expected && le32(val, 4) == crc {
                        tags.push(FcTag::Tail);
                        valid = tags.len();
                    } else {
                        return stop(&mut tags, valid, "the first fast commit fails its checksum");
                    }
                    crc = 0;
                }
                FC_HEAD => {
                    if le32(val, 0) != 0 {
                        return Err("the fast-commit area uses unknown features".into());
                    }
                    if le32(val, 4) != expected {
                        return Err(format!(
                            "the fast-commit area belongs to transaction {}, not {expected}",
                            le32(val, 4)
                        ));
                    }
                    crc = crc32c(crc, sub(&b, cur, 4 + len));
                }
                _ => {
                    return stop(
                        &mut tags,
                        valid,
                        "the fast-commit area holds an unknown tag",
                    )
                }
            }
            cur += 4 + len;
        }
    }
}

/// A tag's value (`val` runs to the end of its block; `len` is the tag's own length).
fn decode_tag(tag: u16, val: &[u8], len: usize) -> Option<FcTag> {
    let name = || sub(val, 8, len.saturating_sub(8)).to_vec();
    Some(match tag {
        FC_ADD_RANGE => {
            let raw_len = u32::from(le16(val, 8));
            let (len, uninit) = if raw_len > 32768 {
                (raw_len - 32768, true)
            } else {
                (raw_len, false)
            };
            FcTag::AddRange {
                ino: le32(val, 0),
                lblk: le32(val, 4),
                len,
                pblk: (u64::from(le16(val, 10)) << 32) | u64::from(le32(val, 12)),
                uninit,
            }
        }
        FC_DEL_RANGE => FcTag::DelRange {
            ino: le32(val, 0),
            lblk: le32(val, 4),
            len: le32(val, 8),
        },
        FC_CREAT | FC_LINK => FcTag::Link {
            parent: le32(val, 0),
            ino: le32(val, 4),
            name: name(),
        },
        FC_UNLINK => FcTag::Unlink {
            parent: le32(val, 0),
            ino: le32(val, 4),
            name: name(),
        },
        FC_INODE => FcTag::Inode {
            ino: le32(val, 0),
            raw: sub(val, 4, len.saturating_sub(4)).to_vec(),
        },
        _ => return None,
    })
}

/// Restore the magic of an escaped journal block copy.
pub fn unescape(block: &mut [u8]) {
    if let Some(s) = block.get_mut(0..4) {
        s.copy_from_slice(&MAGIC.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_is_the_raw_castagnoli_crc() {
        // crc32c("123456789") with the usual inversions is 0xE3069283.
        assert_eq!(!crc32c(!0, b"123456789"), 0xE306_9283);
    }

    #[test]
    fn crc32_be_matches_linux() {
        // Linux crc32_be(~0, "123456789") = 0x0376E6E7 (CRC-32/MPEG-2).
        let mut d = CRC32_BE.digest();
        d.update(b"1234");
        d.update(b"56789");
        assert_eq!(d.finalize(), 0x0376_E6E7);
    }

    #[test]
    fn fast_commit_scan_stops_at_an_unverified_tail() {
        let mut b = vec![0u8; 1024];
        // head(features 0, tid 7), pad, tail(tid 7, wrong crc)
        b[0..2].copy_from_slice(&FC_HEAD.to_le_bytes());
        b[2..4].copy_from_slice(&8u16.to_le_bytes());
        b[8..12].copy_from_slice(&7u32.to_le_bytes());
        b[12..14].copy_from_slice(&FC_TAIL.to_le_bytes());
        b[14..16].copy_from_slice(&8u16.to_le_bytes());
        b[16..20].copy_from_slice(&7u32.to_le_bytes());
        let r = scan_fast_commit(&mut |i| (i == 0).then(|| b.clone()), 7);
        assert!(r.is_err(), "{r:?}");
        // With the right crc the tags are valid.
        let crc = crc32c(crc32c(0, &b[0..12]), &b[12..20]);
        b[20..24].copy_from_slice(&crc.to_le_bytes());
        let r = scan_fast_commit(&mut |i| (i == 0).then(|| b.clone()), 7);
        assert_eq!(r, Ok(vec![FcTag::Tail]));
        // Another transaction's area is refused.
        assert!(scan_fast_commit(&mut |i| (i == 0).then(|| b.clone()), 8).is_err());
    }
}

//! jbd2 journal replay, in memory: which filesystem blocks the committed-but-unapplied
//! transactions of a crash-consistent snapshot replace, and where their new contents are.
//!
//! Three passes like the kernel's `jbd2_journal_recover`: scan to the last complete transaction,
//! collect revoke records, then map every tagged block not revoked by a later (or the same)
//! transaction. Works for journals with and without checksums (v1, v2, v3); checksums are not
//! verified, the sequence numbers and commit blocks bound what is replayed.

use std::collections::HashMap;

use super::super::bytes::{be16, be32, be64};
use crate::error::Result;

const MAGIC: u32 = 0xC03B_3998;
const DESCRIPTOR: u32 = 1;
const COMMIT: u32 = 2;
const REVOKE: u32 = 5;

const INCOMPAT_REVOKE: u32 = 0x1;
const INCOMPAT_64BIT: u32 = 0x2;
const INCOMPAT_CSUM_V2: u32 = 0x8;
const INCOMPAT_CSUM_V3: u32 = 0x10;
const INCOMPAT_FAST_COMMIT: u32 = 0x20;

const TAG_ESCAPE: u32 = 1;
const TAG_SAME_UUID: u32 = 2;
const TAG_LAST: u32 = 8;

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

pub struct Replay {
    pub map: HashMap<u64, Replaced>,
    pub transactions: u32,
}

struct Layout {
    first: u64,
    last: u64,
    incompat: u32,
    tag_bytes: usize,
    tail: usize,
}

impl Layout {
    fn next(&self, pos: u64) -> u64 {
        let n = pos + 1;
        if n >= self.last {
            self.first
        } else {
            n
        }
    }

    /// The tags of a descriptor block: (filesystem block, flags).
    fn tags(&self, b: &[u8]) -> Vec<(u64, u32)> {
        let mut out = Vec::new();
        let mut off = 12;
        let end = b.len().saturating_sub(self.tail);
        while off + self.tag_bytes <= end {
            let low = u64::from(be32(b, off));
            let (flags, high) = if self.incompat & INCOMPAT_CSUM_V3 != 0 {
                (be32(b, off + 4), be32(b, off + 8))
            } else {
                let f = u32::from(be16(b, off + 6));
                let h = if self.incompat & INCOMPAT_64BIT != 0 {
                    be32(b, off + 8)
                } else {
                    0
                };
                (f, h)
            };
            let high = if self.incompat & INCOMPAT_64BIT != 0 {
                u64::from(high)
            } else {
                0
            };
            out.push(((high << 32) | low, flags));
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
}

/// Replay the journal whose superblock is journal block 0. `None` when it needs no replay.
pub fn replay(j: &dyn JournalBlocks, journal_len: u64) -> Result<Option<Replay>> {
    let sb = j.read(0)?;
    if be32(&sb, 0) != MAGIC || !matches!(be32(&sb, 4), 3 | 4) {
        crate::input_warn!(
            "ext4",
            "ext4 journal superblock has a bad magic: journal ignored"
        );
        return Ok(None);
    }
    let bs = be32(&sb, 0xC) as usize;
    if bs != j.block_size() {
        crate::input_warn!(
            "ext4",
            "ext4 journal block size {bs} differs from the filesystem's: ignored"
        );
        return Ok(None);
    }
    let maxlen = u64::from(be32(&sb, 0x10)).min(journal_len);
    let first = u64::from(be32(&sb, 0x14));
    let mut seq = be32(&sb, 0x18);
    let start = u64::from(be32(&sb, 0x1C));
    if start == 0 {
        return Ok(None);
    }
    let incompat = if be32(&sb, 4) == 4 {
        be32(&sb, 0x28)
    } else {
        0
    };
    let mut last = maxlen;
    if incompat & INCOMPAT_FAST_COMMIT != 0 {
        let nfc = match be32(&sb, 0x54) {
            0 => 256,
            n => u64::from(n),
        };
        last = maxlen.saturating_sub(nfc);
    }
    if first == 0 || first >= last || start < first || start >= last {
        crate::input_warn!(
            "ext4",
            "ext4 journal bounds are impossible (first {first}, start {start}, last {last}): \
             not replayed"
        );
        return Ok(None);
    }
    let csum = incompat & (INCOMPAT_CSUM_V2 | INCOMPAT_CSUM_V3) != 0;
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
    let layout = Layout {
        first,
        last,
        incompat,
        tag_bytes,
        tail: if csum { 4 } else { 0 },
    };
    let lap = last - first;

    // Pass 1: find the end of the log (the last transaction with a commit block).
    let start_seq = seq;
    let mut pos = start;
    let mut steps = 0u64;
    let mut end_seq = seq;
    'scan: while steps < lap {
        let b = j.read(pos)?;
        if be32(&b, 0) != MAGIC || be32(&b, 8) != seq {
            break;
        }
        match be32(&b, 4) {
            DESCRIPTOR => {
                let n = layout.tags(&b).len() as u64;
                steps += 1 + n;
                pos = layout.next(pos);
                for _ in 0..n {
                    pos = layout.next(pos);
                }
            }
            COMMIT => {
                seq = seq.wrapping_add(1);
                end_seq = seq;
                steps += 1;
                pos = layout.next(pos);
            }
            REVOKE => {
                steps += 1;
                pos = layout.next(pos);
            }
            _ => break 'scan,
        }
    }
    let committed = end_seq.wrapping_sub(start_seq);
    if committed == 0 {
        return Ok(Some(Replay {
            map: HashMap::new(),
            transactions: 0,
        }));
    }

    // Pass 2 and 3 in one walk of the committed part: revokes first needs all of them, so
    // collect tags with their sequence and filter afterwards.
    let mut revoked: HashMap<u64, u32> = HashMap::new();
    let mut tagged: Vec<(u64, u32, u64, bool)> = Vec::new();
    let mut pos = start;
    let mut seq = start_seq;
    let mut steps = 0u64;
    while seq != end_seq && steps < lap {
        let b = j.read(pos)?;
        if be32(&b, 0) != MAGIC || be32(&b, 8) != seq {
            break;
        }
        match be32(&b, 4) {
            DESCRIPTOR => {
                pos = layout.next(pos);
                steps += 1;
                for (fs_block, flags) in layout.tags(&b) {
                    let phys = j.physical(pos)?;
                    tagged.push((fs_block, seq, phys, flags & TAG_ESCAPE != 0));
                    pos = layout.next(pos);
                    steps += 1;
                }
            }
            COMMIT => {
                seq = seq.wrapping_add(1);
                pos = layout.next(pos);
                steps += 1;
            }
            REVOKE if incompat & INCOMPAT_REVOKE != 0 || be32(&sb, 4) == 3 => {
                let count = (be32(&b, 12) as usize).min(b.len());
                let rsize = if incompat & INCOMPAT_64BIT != 0 { 8 } else { 4 };
                let mut off = 16;
                while off + rsize <= count {
                    let blk = if rsize == 8 {
                        be64(&b, off)
                    } else {
                        u64::from(be32(&b, off))
                    };
                    let e = revoked.entry(blk).or_insert(seq);
                    if seq.wrapping_sub(*e) < 0x8000_0000 {
                        *e = seq;
                    }
                    off += rsize;
                }
                pos = layout.next(pos);
                steps += 1;
            }
            _ => {
                pos = layout.next(pos);
                steps += 1;
            }
        }
    }
    let mut map = HashMap::new();
    for (fs_block, tseq, phys, escaped) in tagged {
        if let Some(&rseq) = revoked.get(&fs_block) {
            // Revoked by this or a later transaction: the older copy must not be replayed.
            if rseq.wrapping_sub(tseq) < 0x8000_0000 {
                continue;
            }
        }
        map.insert(
            fs_block,
            Replaced {
                block: phys,
                escaped,
            },
        );
    }
    Ok(Some(Replay {
        map,
        transactions: committed,
    }))
}

/// Restore the magic of an escaped journal block copy.
pub fn unescape(block: &mut [u8]) {
    if let Some(s) = block.get_mut(0..4) {
        s.copy_from_slice(&MAGIC.to_be_bytes());
    }
}

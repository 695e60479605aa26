//! XFS log recovery in memory: what the kernel's mount-time recovery would write, kept as an
//! overlay of 512-byte sectors that every metadata (and file data) read of `XfsFs` goes through.
//! The image is never written.
//!
//! Like `xlog_recover`: find the head (cycle numbers of the basic blocks, a binary search and a
//! scan of the last iclogs' window for holes) and the last record before it, whose `h_tail_lsn`
//! is the tail; walk the records tail→head (v1/v2 headers, extended headers, the first word of
//! every block restored from the cycle data), reassemble transactions by tid across records and
//! split regions, keep the committed ones. Pass 1 collects cancelled buffers, pass 2 replays in
//! commit order (within a transaction: buffers and icreates, other items, inodes, inode buffers)
//! buffer items (128-byte chunk bitmap), inode items (host-endian log dinode to the big-endian
//! disk inode, local/extent forks copied, B+tree roots converted from bmbt to bmdr form, rdev)
//! and icreate items (new inode chunks). On v5, a buffer or inode whose LSN is newer than the
//! transaction is left as it is; on v4 inodes, `di_flushiter` decides. Intents (EFI, RUI, CUI,
//! BUI, ATTRI, XMI) are not replayed: unfinished ones are counted.
//!
//! Damage: a record whose blocks carry an older cycle number (or no header), within the window
//! the last iclogs may span before the head and not at the tail, is the torn end of a crashed
//! log: the walk ends there. Any other invalid record, an item that cannot be replayed, an
//! unreadable block or a log span or overlay over `MAX_LOG_SPAN` / `MAX_OVERLAY` means nothing
//! is replayed (`Outcome::NotReplayed` with the reason). Record CRCs are not verified. Every
//! loop is bounded by the log size.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::bytes::{be16, be32, be64, sub, u8at};
use super::Dev;

const BB: u64 = 512;
const REC_MAGIC: u32 = 0xFEED_BABE;
/// Bytes of record data whose first words one header (or extended header) holds.
const CYCLE_BYTES: u64 = 32 * 1024;
const MAX_RECORD: u64 = 256 * 1024;
/// Blocks the last iclogs may span (8 records of 256 KiB with their headers): damage this close
/// to the head is a torn write at the crash, not a damaged log.
const TORN_WINDOW: u64 = 8 * (MAX_RECORD / BB + 8);
const TRANS_MAGIC: u32 = 0x5452_414E;
/// The most log (tail to head) replayed, and the most sectors the overlay may hold.
pub const MAX_LOG_SPAN: u64 = 256 << 20;
pub const MAX_OVERLAY: u64 = 256 << 20;
const MAX_REGIONS: usize = 512 / 2 + 1;

const OP_START: u8 = 0x01;
const OP_COMMIT: u8 = 0x02;
const OP_CONTINUE: u8 = 0x04;
const OP_WAS_CONT: u8 = 0x08;
const OP_END: u8 = 0x10;
const OP_UNMOUNT: u8 = 0x20;
const CLIENT_TRANS: u8 = 0x69;
const CLIENT_LOG: u8 = 0xAA;

const LI_INODE: u16 = 0x123b;
const LI_BUF: u16 = 0x123c;
const LI_ICREATE: u16 = 0x123f;
/// Intent item types; each one's done item is the next number.
const INTENTS: [u16; 9] = [
    0x1236, 0x1240, 0x1242, 0x1244, 0x1246, 0x1248, 0x124a, 0x124c, 0x124e,
];

const BLF_INODE_BUF: u16 = 1 << 0;
const BLF_CANCEL: u16 = 1 << 1;
const BLF_DQUOT: u16 = (1 << 2) | (1 << 3) | (1 << 4);
const BLF_CHUNK: u64 = 128;
const BLF_MAP_WORDS: usize = 17;

const ILOG_DDATA: u32 = 0x002;
const ILOG_DEXT: u32 = 0x004;
const ILOG_DBROOT: u32 = 0x008;
const ILOG_DEV: u32 = 0x010;
const ILOG_ADATA: u32 = 0x040;
const ILOG_AEXT: u32 = 0x080;
const ILOG_ABROOT: u32 = 0x100;
const ILOG_DFORK: u32 = ILOG_DDATA | ILOG_DEXT | ILOG_DBROOT;
const ILOG_AFORK: u32 = ILOG_ADATA | ILOG_AEXT | ILOG_ABROOT;

const DIFLAG2_BIGTIME: u64 = 1 << 3;
const DIFLAG2_NREXT64: u64 = 1 << 4;
const DI_MAX_FLUSH: u16 = 0xffff;

/// Sectors of the data device that the replay replaced.
#[derive(Default)]
pub struct Overlay {
    map: BTreeMap<u64, Box<[u8]>>,
}

impl Overlay {
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Whether the replay changed any sector of `[off, off + len)`.
    pub fn touches(&self, off: u64, len: u64) -> bool {
        len > 0
            && self
                .map
                .range(off / BB..off.saturating_add(len).div_ceil(BB))
                .next()
                .is_some()
    }

    pub fn bytes(&self) -> u64 {
        self.map.len() as u64 * BB
    }

    /// `buf` holds the device's bytes from `off`: put the replaced sectors over them.
    pub fn patch(&self, off: u64, buf: &mut [u8]) {
        if self.map.is_empty() || buf.is_empty() {
            return;
        }
        let end = off.saturating_add(buf.len() as u64);
        for (&s, data) in self.map.range(off / BB..end.div_ceil(BB)) {
            let so = s * BB;
            let a = so.max(off);
            let b = (so + BB).min(end);
            if a >= b {
                continue;
            }
            let src = data.get((a - so) as usize..(b - so) as usize);
            let dst = buf.get_mut((a - off) as usize..(b - off) as usize);
            if let (Some(src), Some(dst)) = (src, dst) {
                dst.copy_from_slice(src);
            }
        }
    }

    fn read(&self, dev: &Dev, off: u64, len: usize) -> Option<Vec<u8>> {
        let mut v = dev.read_vec(off, len).ok()?;
        self.patch(off, &mut v);
        Some(v)
    }

    /// Replace bytes from `off`.
    fn write(&mut self, dev: &Dev, off: u64, data: &[u8]) -> Result<(), &'static str> {
        let end = match off.checked_add(data.len() as u64) {
            Some(e) if e <= dev.len() => e,
            _ => return Err("log item outside the filesystem"),
        };
        for s in off / BB..end.div_ceil(BB) {
            let so = s * BB;
            if !self.map.contains_key(&s) {
                if self.bytes() >= MAX_OVERLAY {
                    return Err("the replay needs more memory than allowed (256 MiB)");
                }
                let Ok(v) = dev.read_vec(so, BB as usize) else {
                    return Err("a replayed block is unreadable");
                };
                self.map.insert(s, v.into_boxed_slice());
            }
            let a = so.max(off);
            let b = (so + BB).min(end);
            let src = data.get((a - off) as usize..(b - off) as usize);
            let dst = self
                .map
                .get_mut(&s)
                .and_then(|d| d.get_mut((a - so) as usize..(b - so) as usize));
            if let (Some(src), Some(dst)) = (src, dst) {
                dst.copy_from_slice(src);
            }
        }
        Ok(())
    }
}

/// What recovery needs of the superblock.
pub struct Geometry {
    /// Byte offset and length (in basic blocks) of the internal log.
    pub log_off: u64,
    pub log_bbs: u64,
    pub v5: bool,
    pub bs: u64,
    pub isize: u64,
    pub inopblog: u32,
    pub agblklog: u32,
    pub agblocks: u64,
    pub agcount: u64,
    /// The UUID metadata is stamped with (sb_meta_uuid, or sb_uuid).
    pub uuid: [u8; 16],
}

#[derive(Default, Debug)]
pub struct Stats {
    pub transactions: u64,
    pub buffers: u64,
    pub inodes: u64,
    pub icreates: u64,
    /// Items left alone because the disk already holds a newer copy.
    pub newer_on_disk: u64,
    pub cancelled: u64,
    /// Items that do not parse or do not fit the filesystem.
    pub bad_items: u64,
    /// What was wrong with the first of them.
    pub first_bad: Option<String>,
    pub unfinished_intents: u64,
    pub uncommitted: u64,
    pub records: u64,
}

impl Stats {
    fn bad(&mut self, why: &str) {
        self.bad_items += 1;
        if self.first_bad.is_none() {
            self.first_bad = Some(why.to_string());
        }
    }
}

pub enum Outcome {
    /// Nothing to replay.
    Clean,
    Replayed(Overlay, Stats),
    /// Read without replay, and why.
    NotReplayed(String),
}

/// Replay the log described by `g` in memory.
pub fn recover(dev: &Dev, g: &Geometry) -> Outcome {
    let log = Log { dev, g };
    match log.run() {
        Ok(Some((overlay, stats))) => Outcome::Replayed(overlay, stats),
        Ok(None) => Outcome::Clean,
        Err(why) => Outcome::NotReplayed(why),
    }
}

struct Log<'a> {
    dev: &'a Dev,
    g: &'a Geometry,
}

fn cycle_of(b: &[u8]) -> u32 {
    if be32(b, 0) == REC_MAGIC {
        be32(b, 4)
    } else {
        be32(b, 0)
    }
}

/// Next cycle number: the record header magic is never used as one.
fn next_cycle(c: u32) -> u32 {
    match c.wrapping_add(1) {
        REC_MAGIC => REC_MAGIC.wrapping_add(1),
        n => n,
    }
}

/// Why a record is not used: (looks like a torn write, description).
type Stop = (bool, String);

fn torn(why: String) -> Stop {
    (true, why)
}

fn damaged(why: String) -> Stop {
    (false, why)
}

/// Host-endian fields of log items (the log is written in the CPU's byte order).
#[derive(Clone, Copy)]
struct Endian {
    le: bool,
}

impl Endian {
    fn u16(self, b: &[u8], off: usize) -> u16 {
        let v = be16(b, off);
        if self.le {
            v.swap_bytes()
        } else {
            v
        }
    }
    fn u32(self, b: &[u8], off: usize) -> u32 {
        let v = be32(b, off);
        if self.le {
            v.swap_bytes()
        } else {
            v
        }
    }
    fn u64(self, b: &[u8], off: usize) -> u64 {
        let v = be64(b, off);
        if self.le {
            v.swap_bytes()
        } else {
            v
        }
    }
}

struct Item {
    regions: Vec<Vec<u8>>,
}

impl Item {
    fn total(&self, e: Endian) -> usize {
        usize::from(e.u16(self.regions.first().map_or(&[][..], |r| r), 2))
    }
}

struct Trans {
    /// LSN of the record the transaction started in: what on-disk LSNs are compared with.
    lsn: u64,
    header: Vec<u8>,
    endian: Option<Endian>,
    items: Vec<Item>,
}

impl Trans {
    fn add(&mut self, data: &[u8]) -> Result<(), String> {
        if self.endian.is_none() {
            return self.add_header(data);
        }
        if data.is_empty() {
            return Ok(());
        }
        let e = self.endian.unwrap_or(Endian { le: true });
        let start_new = match self.items.last() {
            None => true,
            Some(it) => it.regions.len() >= it.total(e),
        };
        if start_new {
            self.items.push(Item {
                regions: vec![data.to_vec()],
            });
        } else if let Some(it) = self.items.last_mut() {
            it.regions.push(data.to_vec());
        }
        self.check_last(e)
    }

    fn add_cont(&mut self, data: &[u8]) -> Result<(), String> {
        if self.endian.is_none() {
            return self.add_header(data);
        }
        let e = self.endian.unwrap_or(Endian { le: true });
        let r = self
            .items
            .last_mut()
            .and_then(|it| it.regions.last_mut())
            .ok_or("continued region without a start")?;
        r.extend_from_slice(data);
        self.check_last(e)
    }

    fn check_last(&self, e: Endian) -> Result<(), String> {
        if let Some(it) = self.items.last() {
            let first = it.regions.first().map_or(0, |r| r.len());
            // Until the format header is whole its region count is unknown.
            if first >= 4 && (it.total(e) == 0 || it.total(e) > MAX_REGIONS) {
                return Err(format!("log item with {} regions", it.total(e)));
            }
            if first >= 4 && it.regions.len() > it.total(e) {
                return Err("log item with more regions than it announces".into());
            }
        }
        Ok(())
    }

    fn add_header(&mut self, data: &[u8]) -> Result<(), String> {
        self.header.extend_from_slice(data);
        if self.header.len() < 16 {
            return Ok(());
        }
        if be32(&self.header, 0) == TRANS_MAGIC {
            self.endian = Some(Endian { le: false });
        } else if be32(&self.header, 0).swap_bytes() == TRANS_MAGIC {
            self.endian = Some(Endian { le: true });
        } else {
            return Err("transaction header without its magic".into());
        }
        let rest = self
            .header
            .get(16..)
            .map(<[u8]>::to_vec)
            .unwrap_or_default();
        if !rest.is_empty() {
            self.add(&rest)?;
        }
        Ok(())
    }
}

impl Log<'_> {
    fn read_bbs(&self, start: u64, count: u64) -> Result<Vec<u8>, String> {
        let n = self.g.log_bbs;
        let mut out = Vec::with_capacity((count * BB) as usize);
        let mut pos = start % n;
        let mut left = count;
        while left > 0 {
            let run = left.min(n - pos);
            let v = self
                .dev
                .read_vec(self.g.log_off + pos * BB, (run * BB) as usize)
                .map_err(|e| format!("log block {pos} unreadable: {e}"))?;
            out.extend_from_slice(&v);
            left -= run;
            pos = (pos + run) % n;
        }
        Ok(out)
    }

    fn cycle(&self, blk: u64) -> Result<u32, String> {
        Ok(cycle_of(&self.read_bbs(blk, 1)?))
    }

    /// The block after the last block of the current cycle, and that cycle; `None` for a log
    /// never written.
    fn find_head(&self) -> Result<Option<(u64, u32)>, String> {
        let n = self.g.log_bbs;
        let first = self.cycle(0)?;
        let last = self.cycle(n - 1)?;
        if first == 0 {
            return Ok(None);
        }
        let head = if first == last {
            n
        } else {
            // Blocks [0, head) have the current cycle, [head, n) the one before.
            let (mut lo, mut hi) = (0, n - 1);
            while hi - lo > 1 {
                let mid = lo + (hi - lo) / 2;
                if self.cycle(mid)? == first {
                    lo = mid;
                } else {
                    hi = mid;
                }
            }
            hi
        };
        Ok(Some((head, first)))
    }

    /// The last iclogs may have been written out of order: a hole of blocks of the previous
    /// cycle before the head moves the head back to it.
    fn torn_head(&self, head: u64, first: u32) -> Result<u64, String> {
        let w = TORN_WINDOW.min(head);
        let previous = first.wrapping_sub(1);
        if w > 0 {
            let b = self.read_bbs(head - w, w)?;
            if let Some(i) = (0..w).find(|&i| cycle_of(sub(&b, (i * BB) as usize, 8)) == previous) {
                return Ok(head - w + i);
            }
        }
        Ok(head)
    }

    /// The last record header before `head`: (block, header, header blocks, data blocks).
    fn last_record(&self, head: u64) -> Result<(u64, Vec<u8>, u64, u64), String> {
        let n = self.g.log_bbs;
        let mut blk = head % n;
        for _ in 0..n.min(TORN_WINDOW * 2) {
            blk = (blk + n - 1) % n;
            let h = self.read_bbs(blk, 1)?;
            if be32(&h, 0) == REC_MAGIC {
                let (hblks, dblks) = self.record_shape(&h, blk, be32(&h, 4)).map_err(|e| e.1)?;
                return Ok((blk, h, hblks, dblks));
            }
        }
        Err("no log record before the head".into())
    }

    /// The record at `rec` is an unmount record ending at `head`: a clean log.
    fn unmounted(&self, head: u64, rec: u64, h: &[u8], hblks: u64, dblks: u64) -> bool {
        let n = self.g.log_bbs;
        (rec + hblks + dblks) % n == head % n
            && be32(h, 40) == 1
            && self
                .read_bbs(rec + hblks, 1)
                .is_ok_and(|d| u8at(&d, 9) & OP_UNMOUNT != 0)
    }

    /// Validate a record header at `pos`: (header blocks, data blocks).
    /// Errors say whether they look like the end of a torn write (old or missing blocks).
    fn record_shape(&self, h: &[u8], pos: u64, cycle: u32) -> Result<(u64, u64), Stop> {
        if be32(h, 0) != REC_MAGIC {
            return Err(torn(format!("no record header at block {pos}")));
        }
        if be64(h, 16) != (u64::from(cycle) << 32 | pos) || be32(h, 4) != cycle {
            return Err(torn(format!("record at block {pos} has another LSN")));
        }
        let version = be32(h, 8);
        if !matches!(version, 1 | 2) {
            return Err(damaged(format!("record at block {pos}: version {version}")));
        }
        let len = u64::from(be32(h, 12));
        let size = u64::from(be32(h, 320));
        let hblks = if version == 2 && size > CYCLE_BYTES {
            if size > MAX_RECORD {
                return Err(damaged(format!("record at block {pos}: size {size}")));
            }
            size.div_ceil(CYCLE_BYTES)
        } else {
            1
        };
        if len == 0 || len > MAX_RECORD || len > hblks * CYCLE_BYTES {
            return Err(damaged(format!("record at block {pos}: length {len}")));
        }
        Ok((hblks, len.div_ceil(BB)))
    }

    fn run(&self) -> Result<Option<(Overlay, Stats)>, String> {
        let n = self.g.log_bbs;
        if n < 64 {
            return Err(format!("log of {n} blocks"));
        }
        let Some((raw_head, first)) = self.find_head()? else {
            return Ok(None);
        };
        let (rec, h, hblks, dblks) = self.last_record(raw_head)?;
        // Cleanly unmounted (the common case): no need to look for torn writes.
        if self.unmounted(raw_head, rec, &h, hblks, dblks) {
            return Ok(None);
        }
        let head = self.torn_head(raw_head, first)? % n;
        let (rec, h, hblks, dblks) = if head == raw_head % n {
            (rec, h, hblks, dblks)
        } else {
            self.last_record(head)?
        };
        if self.unmounted(head, rec, &h, hblks, dblks) {
            return Ok(None);
        }
        let tail_lsn = be64(&h, 24);
        let (tail_cycle, tail) = ((tail_lsn >> 32) as u32, tail_lsn & 0xFFFF_FFFF);
        if tail >= n {
            return Err(format!("tail block {tail} past the log"));
        }
        if tail == head {
            return Ok(None);
        }
        let span = (head + n - tail) % n;
        if span * BB > MAX_LOG_SPAN {
            return Err(format!(
                "log holds {} MiB to replay, more than the {} MiB replayed in memory",
                (span * BB) >> 20,
                MAX_LOG_SPAN >> 20
            ));
        }

        // Walk the records tail→head.
        let mut stats = Stats::default();
        let mut open: HashMap<u32, Trans> = HashMap::new();
        let mut committed: Vec<Trans> = Vec::new();
        let mut pos = tail;
        let mut cycle = tail_cycle;
        let mut done = 0u64;
        while done < span {
            match self.record(pos, cycle, span - done, &mut open, &mut committed) {
                // A torn write at the crash ends the log within the last iclogs' window.
                Ok(len) => {
                    stats.records += 1;
                    done += len;
                    if pos + len >= n {
                        cycle = next_cycle(cycle);
                    }
                    pos = (pos + len) % n;
                }
                Err((is_torn, why)) => {
                    // The tail record must be there: the last record points at it.
                    if !is_torn || done == 0 || span - done > TORN_WINDOW {
                        return Err(format!("damaged: {why}"));
                    }
                    tracing::debug!(block = pos, why, "XFS log ends at a torn record");
                    break;
                }
            }
        }
        stats.uncommitted = open.len() as u64;
        stats.transactions = committed.len() as u64;
        let overlay = self.replay(&committed, &mut stats);
        if let Some(why) = stats.first_bad.take() {
            // The kernel refuses to mount such a log; a partial replay could mix old and new.
            return Err(format!(
                "{} log items not replayable, the first: {why}",
                stats.bad_items
            ));
        }
        Ok(Some((overlay, stats)))
    }

    /// Parse the record at `pos` and feed its operations to the transactions: its length in
    /// blocks. Nothing of a record that fails is used.
    fn record(
        &self,
        pos: u64,
        cycle: u32,
        room: u64,
        open: &mut HashMap<u32, Trans>,
        committed: &mut Vec<Trans>,
    ) -> Result<u64, Stop> {
        let n = self.g.log_bbs;
        let h = self.read_bbs(pos, 1).map_err(damaged)?;
        let (hblks, dblks) = self.record_shape(&h, pos, cycle)?;
        if hblks + dblks > room {
            return Err(torn(format!("record at block {pos} runs past the head")));
        }
        let stamp = |abs: u64| if abs >= n { next_cycle(cycle) } else { cycle };
        let ext = if hblks > 1 {
            self.read_bbs(pos + 1, hblks - 1).map_err(damaged)?
        } else {
            Vec::new()
        };
        for j in 1..hblks {
            if be32(&ext, ((j - 1) * BB) as usize) != stamp(pos + j) {
                return Err(torn(format!("record at block {pos}: torn extended header")));
            }
        }
        let mut data = self.read_bbs(pos + hblks, dblks).map_err(damaged)?;
        for i in 0..dblks {
            let at = (i * BB) as usize;
            if be32(&data, at) != stamp(pos + hblks + i) {
                return Err(torn(format!("record at block {pos}: torn data block {i}")));
            }
            let (src, k) = if i < CYCLE_BYTES / BB {
                (&h[..], 44 + 4 * i as usize)
            } else {
                let j = (i / (CYCLE_BYTES / BB)) as usize;
                let k = (i % (CYCLE_BYTES / BB)) as usize;
                (sub(&ext, (j - 1) * BB as usize, BB as usize), 4 + 4 * k)
            };
            let word = sub(src, k, 4).to_vec();
            if let (Some(d), 4) = (data.get_mut(at..at + 4), word.len()) {
                d.copy_from_slice(&word);
            }
        }
        let len = be32(&h, 12) as usize;
        data.truncate(len);
        let rec_lsn = be64(&h, 16);

        // The operations, checked before any is used.
        let mut ops = Vec::new();
        let mut off = 0usize;
        let mut left = be32(&h, 40);
        while left > 0 && off + 12 <= data.len() {
            let tid = be32(&data, off);
            let olen = be32(&data, off + 4) as usize;
            let client = u8at(&data, off + 8);
            let flags = u8at(&data, off + 9);
            let body = data
                .get(off + 12..(off + 12).saturating_add(olen))
                .ok_or_else(|| damaged(format!("record at block {pos}: operation past its end")))?;
            if client != CLIENT_TRANS && client != CLIENT_LOG {
                return Err(damaged(format!(
                    "record at block {pos}: operation of client {client:#x}"
                )));
            }
            ops.push((tid, flags, body));
            off += 12 + olen;
            left -= 1;
        }
        for (tid, flags, body) in ops {
            if flags & OP_UNMOUNT != 0 {
                continue;
            }
            let Some(t) = open.get_mut(&tid) else {
                if flags & OP_START != 0 {
                    open.insert(
                        tid,
                        Trans {
                            lsn: rec_lsn,
                            header: Vec::new(),
                            endian: None,
                            items: Vec::new(),
                        },
                    );
                }
                continue;
            };
            let mut f = flags & !OP_END;
            if f & OP_WAS_CONT != 0 {
                f &= !OP_CONTINUE;
            }
            match f {
                0 | OP_CONTINUE => t.add(body),
                OP_WAS_CONT => t.add_cont(body),
                OP_COMMIT => {
                    if let Some(t) = open.remove(&tid) {
                        committed.push(t);
                    }
                    Ok(())
                }
                _ => Err(format!("operation flags {flags:#x}")),
            }
            .map_err(|e| damaged(format!("record at block {pos}: {e}")))?;
        }
        Ok(hblks + dblks)
    }

    /// Pass 1 (cancelled buffers) and pass 2 (replay) over the committed transactions.
    fn replay(&self, committed: &[Trans], stats: &mut Stats) -> Overlay {
        let mut cancels: HashMap<(u64, u16), u32> = HashMap::new();
        for t in committed {
            let Some(e) = t.endian else { continue };
            for it in &t.items {
                let f = it.regions.first().map_or(&[][..], |r| r);
                if e.u16(f, 0) == LI_BUF && e.u16(f, 4) & BLF_CANCEL != 0 {
                    *cancels.entry((e.u64(f, 8), e.u16(f, 6))).or_insert(0) += 1;
                }
            }
        }
        let mut ov = Overlay::default();
        let mut intents: HashSet<(u16, u64)> = HashSet::new();
        for t in committed {
            let Some(e) = t.endian else { continue };
            // The kernel's order: buffers and icreates, other items, inodes, inode buffers,
            // cancelled buffers.
            let rank = |it: &Item| {
                let f = it.regions.first().map_or(&[][..], |r| r);
                match e.u16(f, 0) {
                    LI_BUF if e.u16(f, 4) & BLF_CANCEL != 0 => 4,
                    LI_BUF if e.u16(f, 4) & BLF_INODE_BUF != 0 => 3,
                    LI_BUF | LI_ICREATE => 0,
                    LI_INODE => 2,
                    _ => 1,
                }
            };
            let mut order: Vec<&Item> = t.items.iter().collect();
            order.sort_by_key(|it| rank(it));
            for it in order {
                let complete = it.regions.len() == it.total(e);
                let f = it.regions.first().map_or(&[][..], |r| r);
                let kind = e.u16(f, 0);
                if !complete {
                    stats.bad("incomplete log item");
                    continue;
                }
                match kind {
                    LI_BUF => self.buf_item(e, t.lsn, it, &mut cancels, &mut ov, stats),
                    LI_INODE => self.inode_item(e, t.lsn, it, &cancels, &mut ov, stats),
                    LI_ICREATE => self.icreate_item(it, &cancels, &mut ov, stats),
                    k if INTENTS.contains(&k) => {
                        intents.insert((k, e.u64(f, 8)));
                    }
                    k if INTENTS.contains(&k.wrapping_sub(1)) => {
                        intents.remove(&(k - 1, e.u64(f, 8)));
                    }
                    _ => {}
                }
            }
        }
        stats.unfinished_intents = intents.len() as u64;
        ov
    }

    /// The LSN stamped in a v5 metadata block, when its magic is known and its UUID is ours.
    fn block_lsn(&self, b: &[u8]) -> Option<u64> {
        let (lsn, uuid) = match sub(b, 0, 4) {
            b"AB3B" | b"AB3C" | b"IAB3" | b"FIB3" | b"RMB3" | b"R3FC" => (24, 32),
            b"BMA3" => (32, 40),
            b"XAGF" => (208, 64),
            b"XAFL" => (24, 8),
            b"XAGI" => (320, 296),
            b"XSLM" | b"XARM" => (48, 16),
            b"XDB3" | b"XDD3" | b"XDF3" => (16, 24),
            b"XFSB" => return Some(be64(b, 240)),
            _ => match be16(b, 8) {
                0x3ebe | 0x3df1 | 0x3dff | 0x3bee => (24, 32),
                _ => return None,
            },
        };
        (sub(b, uuid, 16) == self.g.uuid).then(|| be64(b, lsn))
    }

    fn dev_bbs(&self) -> u64 {
        self.dev.len() / BB
    }

    fn buf_item(
        &self,
        e: Endian,
        lsn: u64,
        it: &Item,
        cancels: &mut HashMap<(u64, u16), u32>,
        ov: &mut Overlay,
        stats: &mut Stats,
    ) {
        let f = &it.regions[0];
        let flags = e.u16(f, 4);
        let len = e.u16(f, 6);
        let blkno = e.u64(f, 8);
        if flags & BLF_CANCEL != 0 {
            if let Some(c) = cancels.get_mut(&(blkno, len)) {
                *c -= 1;
                if *c == 0 {
                    cancels.remove(&(blkno, len));
                }
            }
            return;
        }
        if cancels.contains_key(&(blkno, len)) {
            stats.cancelled += 1;
            return;
        }
        if flags & BLF_DQUOT != 0 {
            return;
        }
        let map_words = (e.u32(f, 16) as usize).min(BLF_MAP_WORDS);
        let nbytes = u64::from(len) * BB;
        if len == 0
            || blkno
                .checked_add(u64::from(len))
                .is_none_or(|end| end > self.dev_bbs())
        {
            stats.bad("buffer item outside the filesystem");
            return;
        }
        let base = blkno * BB;
        if self.g.v5 {
            let cur = ov.read(self.dev, base, nbytes as usize).unwrap_or_default();
            if self
                .block_lsn(&cur)
                .is_some_and(|d| d != 0 && d != u64::MAX && d > lsn)
            {
                stats.newer_on_disk += 1;
                return;
            }
        }
        let bit = |b: usize| e.u32(f, 20 + 4 * (b / 32)) >> (b % 32) & 1 != 0;
        let nbits = (map_words * 32).min((nbytes / BLF_CHUNK) as usize);
        // (offset in the buffer, region) for each run of logged chunks.
        let mut runs = Vec::new();
        let mut b = 0;
        let mut r = 1;
        while b < nbits {
            if !bit(b) {
                b += 1;
                continue;
            }
            let start = b;
            while b < nbits && bit(b) {
                b += 1;
            }
            let Some(region) = it.regions.get(r) else {
                break;
            };
            let want = (b - start) * BLF_CHUNK as usize;
            runs.push((start as u64 * BLF_CHUNK, &region[..region.len().min(want)]));
            r += 1;
        }
        let mut ok = Ok(());
        if flags & BLF_INODE_BUF != 0 {
            // Inode buffers log the unlinked-list pointers only: copy just those.
            let per = nbytes / self.g.isize;
            for i in 0..per {
                let at = i * self.g.isize + 96;
                for &(o, d) in &runs {
                    if at >= o && at + 4 <= o + d.len() as u64 {
                        let s = sub(d, (at - o) as usize, 4);
                        ok = ok.and(ov.write(self.dev, base + at, s));
                    }
                }
            }
        } else {
            for (o, d) in runs {
                ok = ok.and(ov.write(self.dev, base + o, d));
            }
        }
        match ok {
            Ok(()) => stats.buffers += 1,
            Err(why) => stats.bad(why),
        }
    }

    fn inode_item(
        &self,
        e: Endian,
        lsn: u64,
        it: &Item,
        cancels: &HashMap<(u64, u16), u32>,
        ov: &mut Overlay,
        stats: &mut Stats,
    ) {
        let f = &it.regions[0];
        // 56 bytes, or 52 from a 32-bit kernel (no padding before ilf_ino).
        let p = match f.len() {
            56 => 4,
            52 => 0,
            _ => {
                stats.bad("inode item format of another size");
                return;
            }
        };
        let size = usize::from(e.u16(f, 2));
        let fields = e.u32(f, 4);
        let rdev = e.u32(f, 20 + p);
        let blkno = e.u64(f, 36 + p);
        let blen = e.u32(f, 44 + p);
        let boff = u64::from(e.u32(f, 48 + p));
        if cancels.contains_key(&(blkno, blen as u16)) {
            stats.cancelled += 1;
            return;
        }
        let isize = self.g.isize;
        let Some(at) = blkno
            .checked_mul(BB)
            .and_then(|b| b.checked_add(boff))
            .filter(|&a| {
                a.checked_add(isize)
                    .is_some_and(|end| end <= self.dev.len())
            })
        else {
            stats.bad("inode item outside the filesystem");
            return;
        };
        let Some(mut d) = ov.read(self.dev, at, isize as usize) else {
            stats.bad("inode item outside the filesystem");
            return;
        };
        let l = it.regions.get(1).map_or(&[][..], |r| r);
        if sub(&d, 0, 2) != b"IN" || e.u16(l, 0) != 0x494e || size < 2 {
            stats.bad("inode item without an inode (magic) on either side");
            return;
        }
        let v3 = u8at(l, 4) >= 3;
        if u8at(&d, 4) >= 3 {
            let dl = be64(&d, 112);
            if dl != 0 && dl != u64::MAX && dl > lsn {
                stats.newer_on_disk += 1;
                return;
            }
        }
        if !self.g.v5 {
            let (lf, df) = (e.u16(l, 30), be16(&d, 30));
            if lf < df && !(df == DI_MAX_FLUSH && lf < DI_MAX_FLUSH >> 1) {
                stats.newer_on_disk += 1;
                return;
            }
        }
        let core = if v3 { 176 } else { 96 };
        if l.len() < core || (isize as usize) < core + 4 {
            stats.bad("inode item with a short core");
            return;
        }
        dinode_to_disk(e, l, &mut d, lsn, v3);
        let lit = if v3 { 176 } else { 100 };
        let forkoff = usize::from(u8at(&d, 82)) * 8;
        let isz = isize as usize;
        let dsize = if forkoff != 0 { forkoff } else { isz - lit };
        if fields & ILOG_DEV != 0 {
            put(&mut d, lit, &rdev.to_be_bytes());
        }
        let mut next = 2;
        if size > 2 && fields & ILOG_DFORK != 0 {
            let src = it.regions.get(2).map_or(&[][..], |r| r);
            if fields & ILOG_DFORK == ILOG_DBROOT {
                bmbt_to_bmdr(src, &mut d, lit, dsize, self.g.v5);
            } else {
                put(&mut d, lit, src.get(..dsize).unwrap_or(src));
            }
            next = 3;
        }
        if size > next && fields & ILOG_AFORK != 0 && forkoff != 0 {
            let src = it.regions.get(next).map_or(&[][..], |r| r);
            let start = lit + forkoff;
            let asize = isz.saturating_sub(start);
            if fields & ILOG_AFORK == ILOG_ABROOT {
                bmbt_to_bmdr(src, &mut d, start, asize, self.g.v5);
            } else {
                put(&mut d, start, src.get(..asize).unwrap_or(src));
            }
        }
        match ov.write(self.dev, at, &d) {
            Ok(()) => stats.inodes += 1,
            Err(why) => stats.bad(why),
        }
    }

    fn icreate_item(
        &self,
        it: &Item,
        cancels: &HashMap<(u64, u16), u32>,
        ov: &mut Overlay,
        stats: &mut Stats,
    ) {
        let f = &it.regions[0];
        // After the host-endian type and size, the fields are big-endian.
        let ag = u64::from(be32(f, 4));
        let agbno = u64::from(be32(f, 8));
        let count = u64::from(be32(f, 12));
        let isize = u64::from(be32(f, 16));
        let length = u64::from(be32(f, 20));
        let gen = be32(f, 24);
        let g = self.g;
        if f.len() < 28
            || ag >= g.agcount
            || isize != g.isize
            || length == 0
            || agbno + length > g.agblocks
            || count == 0
            || count > 1024
            || count * isize != length * g.bs
        {
            stats.bad("icreate item that does not fit the filesystem");
            return;
        }
        let off = (ag * g.agblocks + agbno) * g.bs;
        let (first, last) = (off / BB, (off + length * g.bs) / BB);
        if cancels.keys().any(|&(b, _)| b >= first && b < last) {
            stats.cancelled += 1;
            return;
        }
        let mut chunk = vec![0u8; (count * isize) as usize];
        for i in 0..count {
            let d = &mut chunk[(i * isize) as usize..((i + 1) * isize) as usize];
            put(d, 0, b"IN");
            put(d, 4, &[if g.v5 { 3 } else { 2 }]);
            put(d, 92, &gen.to_be_bytes());
            put(d, 96, &u32::MAX.to_be_bytes());
            if g.v5 {
                let agino = (agbno << g.inopblog) + i;
                let ino = ag << (g.agblklog + g.inopblog) | agino;
                put(d, 152, &ino.to_be_bytes());
                put(d, 160, &g.uuid);
            }
        }
        match ov.write(self.dev, off, &chunk) {
            Ok(()) => stats.icreates += 1,
            Err(why) => stats.bad(why),
        }
    }
}

/// Copy `src` into `d` at `off`, as far as it fits.
fn put(d: &mut [u8], off: usize, src: &[u8]) {
    let n = src.len().min(d.len().saturating_sub(off));
    if let (Some(dst), Some(s)) = (d.get_mut(off..off + n), src.get(..n)) {
        dst.copy_from_slice(s);
    }
}

/// The host-endian log dinode `l` over the big-endian disk inode `d`.
fn dinode_to_disk(e: Endian, l: &[u8], d: &mut [u8], lsn: u64, v3: bool) {
    let conv = |d: &mut [u8], off: usize, width: usize| {
        let v = match width {
            1 => vec![u8at(l, off)],
            2 => e.u16(l, off).to_be_bytes().to_vec(),
            4 => e.u32(l, off).to_be_bytes().to_vec(),
            _ => e.u64(l, off).to_be_bytes().to_vec(),
        };
        put(d, off, &v);
    };
    const FIELDS: [(usize, usize); 21] = [
        (0, 2),
        (2, 2),
        (4, 1),
        (5, 1),
        (6, 2),
        (8, 4),
        (12, 4),
        (16, 4),
        (20, 2),
        (22, 2),
        (56, 8),
        (64, 8),
        (72, 4),
        (76, 4),
        (80, 2),
        (82, 1),
        (83, 1),
        (84, 4),
        (88, 2),
        (90, 2),
        (92, 4),
    ];
    for (off, width) in FIELDS {
        conv(d, off, width);
    }
    let flags2 = if v3 { e.u64(l, 120) } else { 0 };
    let bigtime = flags2 & DIFLAG2_BIGTIME != 0;
    let ts = |d: &mut [u8], off: usize| {
        if bigtime {
            conv(d, off, 8);
        } else {
            conv(d, off, 4);
            conv(d, off + 4, 4);
        }
    };
    for off in [32, 40, 48] {
        ts(d, off);
    }
    if v3 {
        ts(d, 144);
        if flags2 & DIFLAG2_NREXT64 != 0 {
            conv(d, 24, 8);
        } else {
            put(d, 24, &[0; 8]);
        }
        for (off, width) in [(104, 8), (120, 8), (128, 4), (152, 8)] {
            conv(d, off, width);
        }
        put(d, 112, &lsn.to_be_bytes());
        put(d, 132, &[0; 12]);
        put(d, 160, sub(l, 160, 16));
    } else {
        // Replay resets the flush counter, like the kernel.
        put(d, 24, &[0; 8]);
    }
}

/// A B+tree root as the log holds it (an in-core bmbt block with a long-form header) to the
/// on-disk bmdr form of `size` bytes at `d[at..]`.
fn bmbt_to_bmdr(src: &[u8], d: &mut [u8], at: usize, size: usize, v5: bool) {
    let hdr = if v5 { 72 } else { 24 };
    if src.len() < hdr || size < 4 {
        return;
    }
    let mxr = (src.len() - hdr) / 16;
    let dmxr = (size - 4) / 16;
    let n = usize::from(be16(src, 6)).min(mxr).min(dmxr);
    let mut root = vec![0u8; size];
    put(&mut root, 0, sub(src, 4, 2));
    put(&mut root, 2, &(n as u16).to_be_bytes());
    put(&mut root, 4, sub(src, hdr, n * 8));
    put(&mut root, 4 + dmxr * 8, sub(src, hdr + mxr * 8, n * 8));
    put(d, at, &root);
}

#[cfg(test)]
mod tests {
    //! Synthetic logs (little-endian items, as x86 writes them) for what the crash images do
    //! not reach: a record wrapping the end of the log, regions continued across records,
    //! buffer cancellation, v5 LSN checks, inode conversion and B+tree roots.
    use std::sync::Arc;

    use super::*;
    use crate::restore::MemDisk;

    const LOG_OFF: u64 = 512 << 10;
    const LOG_BBS: u64 = 128;
    const UUID: [u8; 16] = [7; 16];

    fn geometry() -> Geometry {
        Geometry {
            log_off: LOG_OFF,
            log_bbs: LOG_BBS,
            v5: true,
            bs: 4096,
            isize: 512,
            inopblog: 3,
            agblklog: 8,
            agblocks: 256,
            agcount: 1,
            uuid: UUID,
        }
    }

    /// A 1 MiB device whose log blocks all carry `cycle` (the previous pass over the log).
    fn device(cycle: u32) -> Vec<u8> {
        let mut d = vec![0u8; 1 << 20];
        for b in 0..LOG_BBS {
            let at = (LOG_OFF + b * BB) as usize;
            d[at..at + 4].copy_from_slice(&cycle.to_be_bytes());
        }
        d
    }

    fn op(tid: u32, flags: u8, data: &[u8]) -> Vec<u8> {
        let mut v = tid.to_be_bytes().to_vec();
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(&[CLIENT_TRANS, flags, 0, 0]);
        v.extend_from_slice(data);
        v
    }

    fn trans_header() -> Vec<u8> {
        let mut v = TRANS_MAGIC.to_le_bytes().to_vec();
        v.extend_from_slice(&[0; 12]);
        v
    }

    /// Buffer log format for `len` blocks at `daddr`, chunks `bits` logged.
    fn buf_format(daddr: u64, len: u16, flags: u16, bits: &[usize], regions: u16) -> Vec<u8> {
        let mut v = LI_BUF.to_le_bytes().to_vec();
        v.extend_from_slice(&regions.to_le_bytes());
        v.extend_from_slice(&flags.to_le_bytes());
        v.extend_from_slice(&len.to_le_bytes());
        v.extend_from_slice(&daddr.to_le_bytes());
        v.extend_from_slice(&(BLF_MAP_WORDS as u32).to_le_bytes());
        let mut map = [0u32; BLF_MAP_WORDS];
        for &b in bits {
            map[b / 32] |= 1 << (b % 32);
        }
        for w in map {
            v.extend_from_slice(&w.to_le_bytes());
        }
        v
    }

    /// Write a record of `ops` at `pos` in `cycle`; the block after it.
    fn record(d: &mut [u8], pos: u64, cycle: u32, tail: u64, ops: &[Vec<u8>]) -> u64 {
        let mut data: Vec<u8> = ops.concat();
        let len = data.len();
        data.resize(len.div_ceil(512) * 512, 0);
        let mut h = vec![0u8; 512];
        h[0..4].copy_from_slice(&REC_MAGIC.to_be_bytes());
        h[4..8].copy_from_slice(&cycle.to_be_bytes());
        h[8..12].copy_from_slice(&2u32.to_be_bytes());
        h[12..16].copy_from_slice(&(data.len() as u32).to_be_bytes());
        h[16..24].copy_from_slice(&(u64::from(cycle) << 32 | pos).to_be_bytes());
        h[24..32].copy_from_slice(&tail.to_be_bytes());
        h[40..44].copy_from_slice(&(ops.len() as u32).to_be_bytes());
        h[320..324].copy_from_slice(&32768u32.to_be_bytes());
        let blocks = data.len() / 512;
        for i in 0..blocks {
            let abs = pos + 1 + i as u64;
            let stamp = if abs >= LOG_BBS { cycle + 1 } else { cycle };
            h[44 + 4 * i..48 + 4 * i].copy_from_slice(&data[i * 512..i * 512 + 4]);
            data[i * 512..i * 512 + 4].copy_from_slice(&stamp.to_be_bytes());
        }
        let mut put_bb = |b: u64, src: &[u8]| {
            let at = (LOG_OFF + (b % LOG_BBS) * BB) as usize;
            d[at..at + 512].copy_from_slice(src);
        };
        put_bb(pos, &h);
        for i in 0..blocks {
            put_bb(pos + 1 + i as u64, &data[i * 512..(i + 1) * 512]);
        }
        (pos + 1 + blocks as u64) % LOG_BBS
    }

    fn run(d: Vec<u8>) -> Outcome {
        let len = d.len() as u64;
        let dev = Dev::new(Arc::new(MemDisk(d)), 0, len, "t").unwrap();
        recover(&dev, &geometry())
    }

    fn replayed(o: Outcome) -> (Overlay, Stats) {
        match o {
            Outcome::Replayed(ov, st) => (ov, st),
            Outcome::Clean => panic!("clean"),
            Outcome::NotReplayed(why) => panic!("not replayed: {why}"),
        }
    }

    fn read(ov: &Overlay, d: &[u8], off: u64, len: usize) -> Vec<u8> {
        let mut v = d[off as usize..off as usize + len].to_vec();
        ov.patch(off, &mut v);
        v
    }

    #[test]
    fn wrapped_continued_and_cancelled() {
        let mut d = device(1);
        let tail = 1u64 << 32 | 120;
        // tid 7: one buffer (daddr 8, chunk 0 and chunks 2..4) in a record that wraps.
        let mut big = vec![0xAB; 384];
        big[0] = 1;
        let pos = record(
            &mut d,
            120,
            1,
            tail,
            &[
                op(7, OP_START, &[]),
                op(7, 0, &trans_header()),
                op(7, 0, &buf_format(8, 8, 0, &[0, 2, 3, 4], 3)),
                op(7, 0, &[0x11; 128]),
                op(7, 0, &big),
                // Enough to run past the end of the log.
                op(7, 0, &buf_format(56, 8, 0, &(0..24).collect::<Vec<_>>(), 2)),
                op(7, 0, &[0x99; 3072]),
            ],
        );
        assert!(pos < 120, "the record wraps");
        // tid 8: a region continued into the next record; tid 9 logs daddr 16, tid 10 cancels
        // it, tid 11 logs it again after the cancellation.
        let pos = record(
            &mut d,
            pos,
            2,
            tail,
            &[
                op(7, OP_COMMIT, &[]),
                op(8, OP_START, &[]),
                op(8, 0, &trans_header()),
                op(8, 0, &buf_format(40, 8, 0, &[1], 2)),
                op(8, OP_CONTINUE, &[0x22; 100]),
                op(9, OP_START, &[]),
                op(9, 0, &trans_header()),
                op(9, 0, &buf_format(16, 8, 0, &[0], 2)),
                op(9, 0, &[0x33; 128]),
                op(9, OP_COMMIT, &[]),
            ],
        );
        let pos = record(
            &mut d,
            pos,
            2,
            tail,
            &[
                op(8, OP_WAS_CONT | OP_END, &[0x44; 28]),
                op(8, OP_COMMIT, &[]),
                op(10, OP_START, &[]),
                op(10, 0, &trans_header()),
                op(10, 0, &buf_format(16, 8, BLF_CANCEL, &[], 1)),
                op(10, OP_COMMIT, &[]),
                op(11, OP_START, &[]),
                op(11, 0, &trans_header()),
                op(11, 0, &buf_format(24, 8, 0, &[0], 2)),
                op(11, 0, &[0x55; 128]),
                op(11, OP_COMMIT, &[]),
                // Never committed: not replayed.
                op(12, OP_START, &[]),
                op(12, 0, &trans_header()),
                op(12, 0, &buf_format(48, 8, 0, &[0], 2)),
                op(12, 0, &[0x66; 128]),
            ],
        );
        let _ = pos;
        let base = d.clone();
        let (ov, st) = replayed(run(d));
        assert_eq!(st.transactions, 5, "{st:?}");
        assert_eq!(read(&ov, &base, 56 * 512 + 3000, 72), vec![0x99; 72]);
        assert_eq!(st.uncommitted, 1, "{st:?}");
        assert_eq!(st.cancelled, 1, "{st:?}");
        assert_eq!(read(&ov, &base, 8 * 512, 128), vec![0x11; 128]);
        assert_eq!(read(&ov, &base, 8 * 512 + 128, 128), vec![0; 128]);
        assert_eq!(read(&ov, &base, 8 * 512 + 256, 384), big);
        let mut cont = vec![0x22; 100];
        cont.extend_from_slice(&[0x44; 28]);
        assert_eq!(read(&ov, &base, 40 * 512 + 128, 128), cont);
        assert_eq!(read(&ov, &base, 16 * 512, 128), vec![0; 128], "cancelled");
        assert_eq!(read(&ov, &base, 24 * 512, 128), vec![0x55; 128]);
        assert_eq!(read(&ov, &base, 48 * 512, 128), vec![0; 128], "uncommitted");
    }

    #[test]
    fn v5_lsn_decides_and_inodes_convert() {
        let mut d = device(0);
        // Block at daddr 8: a v5 directory block stamped with an LSN newer than the log's.
        d[4096..4100].copy_from_slice(b"XDB3");
        d[4096 + 16..4096 + 24].copy_from_slice(&(5u64 << 32).to_be_bytes());
        d[4096 + 24..4096 + 40].copy_from_slice(&UUID);
        // The same at daddr 16 with an older LSN.
        d[8192..8196].copy_from_slice(b"XDB3");
        d[8192 + 24..8192 + 40].copy_from_slice(&UUID);
        // Inode at daddr 24 (byte 12288), v3, di_lsn 0.
        let ino_at = 12288;
        d[ino_at..ino_at + 2].copy_from_slice(b"IN");
        d[ino_at + 4] = 3;
        let mut fmt = LI_INODE.to_le_bytes().to_vec();
        fmt.extend_from_slice(&3u16.to_le_bytes());
        fmt.extend_from_slice(&(0x1 | ILOG_DEXT).to_le_bytes());
        fmt.extend_from_slice(&0u16.to_le_bytes());
        fmt.extend_from_slice(&16u16.to_le_bytes());
        fmt.extend_from_slice(&0u32.to_le_bytes());
        fmt.extend_from_slice(&24u64.to_le_bytes()); // ilf_ino (unused)
        fmt.extend_from_slice(&[0; 16]);
        fmt.extend_from_slice(&24i64.to_le_bytes());
        fmt.extend_from_slice(&16i32.to_le_bytes());
        fmt.extend_from_slice(&0i32.to_le_bytes());
        assert_eq!(fmt.len(), 56);
        let mut ld = vec![0u8; 176];
        ld[0..2].copy_from_slice(&0x494eu16.to_le_bytes());
        ld[2..4].copy_from_slice(&0o100644u16.to_le_bytes());
        ld[4] = 3;
        ld[5] = 2;
        ld[8..12].copy_from_slice(&1000u32.to_le_bytes());
        ld[16..20].copy_from_slice(&1u32.to_le_bytes());
        ld[32..36].copy_from_slice(&1_700_000_000u32.to_le_bytes());
        ld[36..40].copy_from_slice(&5u32.to_le_bytes());
        ld[56..64].copy_from_slice(&12345u64.to_le_bytes());
        ld[76..80].copy_from_slice(&1u32.to_le_bytes());
        ld[152..160].copy_from_slice(&24u64.to_le_bytes());
        let tail = 1u64 << 32;
        let ext = [0x5a; 16];
        record(
            &mut d,
            0,
            1,
            tail,
            &[
                op(1, OP_START, &[]),
                op(1, 0, &trans_header()),
                op(1, 0, &buf_format(8, 8, 0, &[0], 2)),
                op(1, 0, &[0x77; 128]),
                op(1, 0, &buf_format(16, 8, 0, &[0], 2)),
                op(1, 0, &[0x88; 128]),
                op(1, 0, &fmt),
                op(1, 0, &ld),
                op(1, 0, &ext),
                op(1, OP_COMMIT, &[]),
            ],
        );
        let base = d.clone();
        let (ov, st) = replayed(run(d));
        assert_eq!(
            (st.buffers, st.inodes, st.newer_on_disk),
            (1, 1, 1),
            "{st:?}"
        );
        assert_eq!(read(&ov, &base, 4096, 4), b"XDB3", "newer on disk: kept");
        assert_eq!(read(&ov, &base, 8192, 4), vec![0x88; 4]);
        let i = read(&ov, &base, ino_at as u64, 512);
        assert_eq!(&i[0..6], &[b'I', b'N', 0x81, 0xa4, 3, 2]);
        assert_eq!(be32(&i, 8), 1000);
        assert_eq!((be32(&i, 32), be32(&i, 36)), (1_700_000_000, 5));
        assert_eq!(be64(&i, 56), 12345);
        assert_eq!(be32(&i, 76), 1);
        assert_eq!(be64(&i, 112), 1u64 << 32, "di_lsn: the transaction's");
        assert_eq!(be64(&i, 152), 24);
        assert_eq!(&i[176..192], &ext);
    }

    #[test]
    fn clean_and_damaged_logs() {
        // An unmount record last: clean.
        let mut d = device(0);
        let mut um = 0x556eu16.to_le_bytes().to_vec();
        um.extend_from_slice(&[0; 6]);
        let mut u = op(1, OP_UNMOUNT, &um);
        u[8] = CLIENT_LOG;
        record(&mut d, 0, 1, 1u64 << 32, &[u]);
        assert!(matches!(run(d), Outcome::Clean));
        // A zeroed log was never written.
        assert!(matches!(run(device(0)), Outcome::Clean));
        // Garbage everywhere: not replayed, no panic.
        let mut d = device(0);
        let mut x = 0x1234_5678_9abc_def0u64;
        for b in d[LOG_OFF as usize..(LOG_OFF + LOG_BBS * BB) as usize].iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        assert!(!matches!(run(d), Outcome::Replayed(..)));
    }

    #[test]
    fn btree_root_to_bmdr() {
        // An in-core v5 root: 72-byte header, level 1, 2 records, room for 3.
        let mut src = vec![0u8; 72 + 3 * 16];
        src[4..6].copy_from_slice(&1u16.to_be_bytes());
        src[6..8].copy_from_slice(&2u16.to_be_bytes());
        for k in 0..2u64 {
            src[72 + 8 * k as usize..80 + 8 * k as usize].copy_from_slice(&(k * 100).to_be_bytes());
            let p = 72 + 3 * 8 + 8 * k as usize;
            src[p..p + 8].copy_from_slice(&(0x1000 + k).to_be_bytes());
        }
        let mut d = vec![0xffu8; 100 + 68];
        bmbt_to_bmdr(&src, &mut d, 100, 68, true);
        // bmdr: level, numrecs, 4 keys of room ((68-4)/16), then the pointers.
        assert_eq!(be16(&d, 100), 1);
        assert_eq!(be16(&d, 102), 2);
        assert_eq!((be64(&d, 104), be64(&d, 112)), (0, 100));
        assert_eq!((be64(&d, 104 + 32), be64(&d, 112 + 32)), (0x1000, 0x1001));
    }
}

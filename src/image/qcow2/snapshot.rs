//! The internal snapshot table: one variable-length entry per snapshot.
//!
//! Read within QEMU's own open-time limits (`qcow2_read_snapshots`): at most 1 KiB of extra data
//! per entry and 64 MiB of table, counted as QEMU counts it (each entry's 40 bytes, extra data,
//! id and name, plus the padding between entries). Ids and names are kept as bytes (at most
//! [`KEPT_NAME_BYTES`] of each, in the reversible internal form of `names::from_bytes`): a
//! longer one cannot be a file name, so it is only counted, never copied.

use super::super::hostfile::HostFile;
use super::header::{be32, be64, table_problem, Header, MAX_L1_BYTES};
use super::SnapshotEntry;
use crate::error::Result;
use crate::namespace::names;

/// QEMU's limits: 1 KiB of extra data per entry, 64 MiB of table.
const MAX_EXTRA_DATA: u32 = 1024;
const MAX_TABLE_BYTES: u64 = 64 << 20;
/// Bytes of an id or name kept: one more than NAME_MAX, so "longer than a file name" is known.
pub const KEPT_NAME_BYTES: usize = names::NAME_MAX + 1;
/// The table is read through a window of this many bytes (one pread per window, not per field).
const WINDOW: usize = 256 << 10;

/// One parsed entry plus where its L1 table is.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub entry: SnapshotEntry,
    pub l1_table_offset: u64,
    pub l1_size: u32,
    /// Where the entry is in the file (for error messages).
    pub at: u64,
}

/// Reads of the table through one buffered window.
struct Window<'a> {
    f: &'a HostFile,
    start: u64,
    data: Vec<u8>,
}

impl Window<'_> {
    fn get(&mut self, pos: u64, len: usize) -> Result<&[u8]> {
        let inside = pos >= self.start
            && pos
                .checked_add(len as u64)
                .is_some_and(|e| e <= self.start + self.data.len() as u64);
        if !inside {
            let room = self.f.len().saturating_sub(pos);
            let n = (WINDOW.max(len) as u64).min(room) as usize;
            if n < len {
                return Err(self.f.corrupt(
                    pos,
                    format!("snapshot table entry ({len} bytes) extends past end of file"),
                ));
            }
            self.data = self.f.read_meta_vec(n, pos, "snapshot table")?;
            self.start = pos;
        }
        let from = (pos - self.start) as usize;
        Ok(&self.data[from..from + len])
    }
}

pub fn read_table(f: &HostFile, h: &Header) -> Result<Vec<Snapshot>> {
    let n = h.nb_snapshots;
    if n == 0 {
        return Ok(Vec::new());
    }
    // Every entry takes at least 40 bytes: bounds the count by the file before allocating.
    let room = f.len().saturating_sub(h.snapshots_offset);
    if u64::from(n) * 40 > room {
        return Err(f.corrupt(
            h.snapshots_offset,
            format!("snapshot table of {n} entries extends past end of file"),
        ));
    }
    let mut win = Window {
        f,
        start: 0,
        data: Vec::new(),
    };
    let mut out = Vec::with_capacity(n as usize);
    let mut pos = h.snapshots_offset;
    let mut table_len = 0u64;
    for i in 0..n {
        table_len = table_len.div_ceil(8) * 8;
        let at = pos;
        let fixed: [u8; 40] = win
            .get(pos, 40)?
            .try_into()
            .map_err(|_| f.corrupt(pos, "snapshot table entry"))?;
        let l1_table_offset = be64(&fixed, 0);
        let l1_size = be32(&fixed, 8);
        let id_len = usize::from(u16::from_be_bytes([fixed[12], fixed[13]]));
        let name_len = usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
        let extra_len = be32(&fixed, 36);
        if extra_len > MAX_EXTRA_DATA {
            return Err(f.corrupt(
                pos + 36,
                format!(
                    "snapshot table entry {i}: extra_data_size {extra_len} (limit {MAX_EXTRA_DATA})"
                ),
            ));
        }
        table_len += 40 + u64::from(extra_len) + id_len as u64 + name_len as u64;
        if table_len > MAX_TABLE_BYTES {
            return Err(f.corrupt(
                pos,
                format!(
                    "snapshot table larger than 64 MiB at entry {i} of {n} (id, name and \
                     extra data counted, as QEMU does)"
                ),
            ));
        }
        pos += 40;
        let extra = win.get(pos, extra_len as usize)?;
        let vm_state_size = if extra.len() >= 8 {
            be64(extra, 0)
        } else {
            u64::from(be32(&fixed, 32))
        };
        let virtual_size = if extra.len() >= 16 {
            be64(extra, 8)
        } else {
            h.size
        };
        pos += u64::from(extra_len);
        let id = names::from_bytes(win.get(pos, id_len.min(KEPT_NAME_BYTES))?).into_owned();
        pos += id_len as u64;
        let name = names::from_bytes(win.get(pos, name_len.min(KEPT_NAME_BYTES))?).into_owned();
        pos += name_len as u64;
        // The unread tails must be in the file too (QEMU reads them).
        if pos > f.len() {
            return Err(f.corrupt(
                at,
                format!("snapshot table entry {i} extends past end of file"),
            ));
        }
        out.push(Snapshot {
            entry: SnapshotEntry {
                id,
                name,
                id_len,
                name_len,
                date_sec: be32(&fixed, 16),
                date_nsec: be32(&fixed, 20),
                vm_clock_nsec: be64(&fixed, 24),
                vm_state_size,
                virtual_size,
            },
            l1_table_offset,
            l1_size,
            at,
        });
        pos = pos.div_ceil(8) * 8;
    }
    Ok(out)
}

impl Snapshot {
    /// QEMU's checks when a snapshot is loaded (`qcow2_snapshot_load_tmp`): its L1 table.
    pub fn check_l1(&self, f: &HostFile, h: &Header) -> Result<()> {
        match table_problem(
            self.l1_table_offset,
            u64::from(self.l1_size),
            8,
            MAX_L1_BYTES,
            h.cluster_size(),
        ) {
            Some(p) => Err(f.corrupt(
                self.at,
                format!(
                    "snapshot {}: L1 table {p} (l1_table_offset {:#x}, l1_size {})",
                    crate::log_limit::esc(&names::to_bytes(&self.entry.id)),
                    self.l1_table_offset,
                    self.l1_size
                ),
            )),
            None => Ok(()),
        }
    }
}

/// Pick a snapshot by name first, then by id (as qemu-img does). Names and ids longer than a
/// file name are never matched (only their first bytes are kept).
pub fn find<'a>(snaps: &'a [Snapshot], wanted: &str) -> Option<&'a Snapshot> {
    let reachable = |len: usize| len <= names::NAME_MAX;
    snaps
        .iter()
        .find(|s| reachable(s.entry.name_len) && s.entry.name == wanted)
        .or_else(|| {
            snaps
                .iter()
                .find(|s| reachable(s.entry.id_len) && s.entry.id == wanted)
        })
}

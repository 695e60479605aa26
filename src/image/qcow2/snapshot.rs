//! The internal snapshot table: one variable-length entry per snapshot.

use super::super::hostfile::HostFile;
use super::header::{be32, be64, Header, MAX_L1_BYTES};
use super::SnapshotEntry;
use crate::error::Result;

/// qemu's limits: 65536 snapshots, 1 KiB of extra data each, 64 MiB of table.
const MAX_SNAPSHOTS: u32 = 65536;
const MAX_EXTRA_DATA: u32 = 1024;
const MAX_TABLE_BYTES: u64 = 64 << 20;

/// One parsed entry plus where its L1 table is.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub entry: SnapshotEntry,
    pub l1_table_offset: u64,
    pub l1_size: u32,
}

pub fn read_table(f: &HostFile, h: &Header) -> Result<Vec<Snapshot>> {
    let n = h.nb_snapshots;
    if n == 0 {
        return Ok(Vec::new());
    }
    if n > MAX_SNAPSHOTS {
        return Err(f.corrupt(60, format!("{n} snapshots (limit {MAX_SNAPSHOTS})")));
    }
    let cs = h.cluster_size();
    if !h.snapshots_offset.is_multiple_of(cs) || h.snapshots_offset == 0 {
        return Err(f.corrupt(64, "snapshot table offset unaligned"));
    }
    // Every entry takes at least 40 bytes: bounds the count by the file before allocating.
    let room = f.len().saturating_sub(h.snapshots_offset);
    if u64::from(n) * 40 > room {
        return Err(f.corrupt(
            h.snapshots_offset,
            format!("snapshot table of {n} entries extends past end of file"),
        ));
    }
    let mut out = Vec::with_capacity(n as usize);
    let mut pos = h.snapshots_offset;
    for i in 0..n {
        if pos - h.snapshots_offset > MAX_TABLE_BYTES {
            return Err(f.corrupt(pos, "snapshot table larger than 64 MiB"));
        }
        let mut fixed = [0u8; 40];
        f.read_meta(&mut fixed, pos, "snapshot table entry")?;
        let l1_table_offset = be64(&fixed, 0);
        let l1_size = be32(&fixed, 8);
        let id_len = u64::from(u16::from_be_bytes([fixed[12], fixed[13]]));
        let name_len = u64::from(u16::from_be_bytes([fixed[14], fixed[15]]));
        let extra_len = be32(&fixed, 36);
        if extra_len > MAX_EXTRA_DATA {
            return Err(f.corrupt(
                pos + 36,
                format!("snapshot {i}: {extra_len} bytes of extra data"),
            ));
        }
        let var_len = u64::from(extra_len) + id_len + name_len;
        let var = f.read_meta_vec(var_len as usize, pos + 40, "snapshot table entry")?;
        let extra = &var[..extra_len as usize];
        let id_end = extra_len as usize + id_len as usize;
        let id = String::from_utf8_lossy(&var[extra_len as usize..id_end]).into_owned();
        let name = String::from_utf8_lossy(&var[id_end..]).into_owned();
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
        if !l1_table_offset.is_multiple_of(cs) {
            return Err(f.corrupt(pos, format!("snapshot {id}: L1 table offset unaligned")));
        }
        let l1_bytes = u64::from(l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES
            || l1_table_offset
                .checked_add(l1_bytes)
                .is_none_or(|e| e > f.len())
        {
            return Err(f.corrupt(
                pos,
                format!(
                    "snapshot {id}: L1 table ({l1_size} entries) past end of file or too large"
                ),
            ));
        }
        out.push(Snapshot {
            entry: SnapshotEntry {
                id,
                name,
                date_sec: be32(&fixed, 16),
                date_nsec: be32(&fixed, 20),
                vm_clock_nsec: be64(&fixed, 24),
                vm_state_size,
                virtual_size,
            },
            l1_table_offset,
            l1_size,
        });
        pos = (pos + 40 + var_len).div_ceil(8) * 8;
    }
    Ok(out)
}

/// Pick a snapshot by name first, then by id (as qemu-img does).
pub fn find<'a>(snaps: &'a [Snapshot], wanted: &str) -> Option<&'a Snapshot> {
    snaps
        .iter()
        .find(|s| s.entry.name == wanted)
        .or_else(|| snaps.iter().find(|s| s.entry.id == wanted))
}

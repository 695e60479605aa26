//! Guest-to-host mapping: the L1 table and L2 entries (standard and extended with subclusters).

use std::sync::Arc;

use super::super::cache::{BlockCache, CacheKey, CacheKind};
use super::super::hostfile::HostFile;
use super::compress::CompressedDescriptor;
use super::header::{be64, Header, MAX_L1_BYTES};
use crate::error::Result;

/// Bits 9..=55 of L1 and L2 entries: a cluster-aligned host offset.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L2_COMPRESSED: u64 = 1 << 62;
const L2_COPIED: u64 = 1 << 63;
const L2_ZERO: u64 = 1;
const SUBCLUSTERS: u64 = 32;

/// Where a run of guest bytes comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mapping {
    /// Host offset (in the data file) of the first byte of the run.
    Data(u64),
    /// Zero cluster / subcluster: reads as zeros, backing not consulted.
    Zero,
    /// Not allocated in this layer: the backing file decides.
    Unallocated,
    /// One whole compressed cluster; the run is within it.
    Compressed(CompressedDescriptor),
}

/// The L2 table last used, so runs inside one table skip the cache lock.
#[derive(Default)]
pub struct Cursor {
    l2_offset: u64,
    table: Option<Arc<Vec<u8>>>,
}

pub struct Tables {
    l1: Vec<u64>,
    l1_table_offset: u64,
    cluster_bits: u32,
    /// Guest clusters per L2 table.
    l2_entries: u64,
    extended: bool,
    version: u32,
    external_data: bool,
    /// Host data beyond this is corrupt (internal data only; an external data file may be sparse).
    data_limit: u64,
    image_id: u64,
}

impl Tables {
    /// Read the L1 table at `l1_offset` (`l1_size` entries) of image `f`.
    pub fn load(
        f: &HostFile,
        h: &Header,
        l1_offset: u64,
        l1_size: u32,
        image_id: u64,
    ) -> Result<Tables> {
        let cs = h.cluster_size();
        let l1_bytes = u64::from(l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(f.corrupt(36, format!("L1 table of {l1_size} entries is too large")));
        }
        if l1_size > 0 && !l1_offset.is_multiple_of(cs) {
            return Err(f.corrupt(40, format!("L1 table offset {l1_offset:#x} unaligned")));
        }
        let raw = if l1_size > 0 {
            f.read_meta_vec(l1_bytes as usize, l1_offset, "L1 table")?
        } else {
            Vec::new()
        };
        let l1 = raw.chunks_exact(8).map(|c| be64(c, 0)).collect::<Vec<_>>();
        let entry_bytes = if h.extended_l2() { 16 } else { 8 };
        Ok(Tables {
            l1,
            l1_table_offset: l1_offset,
            cluster_bits: h.cluster_bits,
            l2_entries: cs / entry_bytes,
            extended: h.extended_l2(),
            version: h.version,
            external_data: h.has_data_file(),
            data_limit: if h.has_data_file() { u64::MAX } else { f.len() },
            image_id,
        })
    }

    /// Whether both L1 tables name the same L2 tables (flag bits aside; a missing entry of the
    /// shorter table counts as none).
    pub fn same_l2_tables(&self, other: &Tables) -> bool {
        let n = self.l1.len().max(other.l1.len());
        (0..n).all(|i| {
            self.l1.get(i).map_or(0, |e| e & OFFSET_MASK)
                == other.l1.get(i).map_or(0, |e| e & OFFSET_MASK)
        })
    }

    /// The L2 table offset (0: none) covering guest byte `guest`, and the end of the guest span
    /// that table covers: two tables of one file that name the same L2 table map that span alike.
    pub fn l2_table_at(&self, guest: u64) -> (u64, u64) {
        let span = self.l2_entries << self.cluster_bits;
        let l1_index = guest / span;
        let table = usize::try_from(l1_index)
            .ok()
            .and_then(|i| self.l1.get(i))
            .map_or(0, |e| e & OFFSET_MASK);
        (table, (l1_index + 1).saturating_mul(span))
    }

    /// The mapping of guest bytes `[guest, guest + n)` for the longest `n <= max_len` with one
    /// mapping (within one cluster, or one whole unallocated L2 span).
    pub fn lookup(
        &self,
        f: &HostFile,
        cache: &BlockCache,
        cur: &mut Cursor,
        guest: u64,
        max_len: u64,
    ) -> Result<(Mapping, u64)> {
        let cb = self.cluster_bits;
        let cs = 1u64 << cb;
        let cluster = guest >> cb;
        let in_cluster = guest & (cs - 1);
        let l1_index = cluster / self.l2_entries;
        let l2_index = cluster % self.l2_entries;
        let Some(&l1e) = usize::try_from(l1_index).ok().and_then(|i| self.l1.get(i)) else {
            return Ok((Mapping::Unallocated, max_len));
        };
        let l2_offset = l1e & OFFSET_MASK;
        if l2_offset == 0 {
            let span_end = (l1_index + 1).saturating_mul(self.l2_entries << cb);
            return Ok((Mapping::Unallocated, (span_end - guest).min(max_len)));
        }
        let l1_entry_at = self.l1_table_offset + l1_index * 8;
        if !l2_offset.is_multiple_of(cs) {
            return Err(f.corrupt(
                l1_entry_at,
                format!("L2 table offset {l2_offset:#x} unaligned"),
            ));
        }
        let table = match &cur.table {
            Some(t) if cur.l2_offset == l2_offset => t.clone(),
            _ => {
                let key = CacheKey {
                    image: self.image_id,
                    kind: CacheKind::L2Table,
                    offset: l2_offset,
                };
                let t = cache
                    .get_or_load(key, || f.read_meta_vec(cs as usize, l2_offset, "L2 table"))?;
                cur.l2_offset = l2_offset;
                cur.table = Some(t.clone());
                t
            }
        };
        let entry_at = (l2_index * if self.extended { 16 } else { 8 }) as usize;
        let entry = be64(&table, entry_at);
        let entry_file_offset = l2_offset + entry_at as u64;
        let rest_of_cluster = (cs - in_cluster).min(max_len);

        if entry & L2_COMPRESSED != 0 {
            if self.external_data {
                return Err(f.corrupt(
                    entry_file_offset,
                    "compressed cluster with external data file",
                ));
            }
            let d = CompressedDescriptor::decode(entry & !(L2_COMPRESSED | L2_COPIED), cb);
            return Ok((Mapping::Compressed(d), rest_of_cluster));
        }
        let host = entry & OFFSET_MASK;
        let has_host = host != 0 || (self.external_data && entry & L2_COPIED != 0);
        if has_host {
            if !host.is_multiple_of(cs) {
                return Err(f.corrupt(
                    entry_file_offset,
                    format!("data cluster offset {host:#x} unaligned"),
                ));
            }
            if host >= self.data_limit {
                return Err(f.corrupt(
                    entry_file_offset,
                    format!("data cluster {host:#x} past end of file"),
                ));
            }
        }

        if !self.extended {
            let m = if entry & L2_ZERO != 0 {
                if self.version < 3 {
                    return Err(
                        f.corrupt(entry_file_offset, "zero cluster flag in a version 2 image")
                    );
                }
                Mapping::Zero
            } else if has_host {
                Mapping::Data(host + in_cluster)
            } else {
                Mapping::Unallocated
            };
            return Ok((m, rest_of_cluster));
        }

        let bitmap = be64(&table, entry_at + 8);
        let alloc = bitmap & 0xffff_ffff;
        let zero = bitmap >> 32;
        if alloc & zero != 0 {
            return Err(f.corrupt(entry_file_offset, "subcluster both allocated and zero"));
        }
        if alloc != 0 && !has_host {
            return Err(f.corrupt(
                entry_file_offset,
                "allocated subcluster without host cluster",
            ));
        }
        let sc_bits = cb - 5;
        let status = |i: u64| -> Mapping {
            if alloc >> i & 1 != 0 {
                Mapping::Data(0)
            } else if zero >> i & 1 != 0 {
                Mapping::Zero
            } else {
                Mapping::Unallocated
            }
        };
        let first = in_cluster >> sc_bits;
        let kind = status(first);
        let mut last = first + 1;
        while last < SUBCLUSTERS && status(last) == kind {
            last += 1;
        }
        let len = ((last << sc_bits) - in_cluster).min(max_len);
        let m = match kind {
            Mapping::Data(_) => Mapping::Data(host + in_cluster),
            other => other,
        };
        Ok((m, len))
    }
}

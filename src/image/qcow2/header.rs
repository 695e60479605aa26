//! The qcow2 header (first cluster) and its extensions: what the image is and needs.

use super::super::hostfile::HostFile;
use crate::error::{Error, Result};

pub const MAGIC: [u8; 4] = *b"QFI\xfb";
const V2_HEADER_LEN: u64 = 72;
const V3_MIN_HEADER_LEN: u64 = 104;

pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_NAMES: u32 = 0x6803_f857;
const EXT_DATA_FILE: u32 = 0x4441_5441;

/// QEMU's limit on an L1 table (`QCOW_MAX_L1_SIZE`, 32 MiB); larger is refused rather than allocated.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// QEMU's limit on the refcount table (`QCOW_MAX_REFTABLE_SIZE`, 8 MiB).
const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// QEMU's limit on the number of internal snapshots (`QCOW_MAX_SNAPSHOTS`).
pub const MAX_SNAPSHOTS: u32 = 65536;
/// QEMU keeps the backing format in a 16-byte buffer: a longer extension is refused.
const MAX_BACKING_FORMAT: u64 = 15;
/// QEMU's limit on a backing file name (`bs->backing_file` is 1024 bytes with its NUL).
const MAX_BACKING_NAME: u64 = 1023;
/// Largest virtual size we accept: keeps guest offset arithmetic far from overflow.
const MAX_VIRTUAL_SIZE: u64 = 1 << 62;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    Zlib,
    Zstd,
}

impl Compression {
    pub fn name(self) -> &'static str {
        match self {
            Compression::Zlib => "zlib",
            Compression::Zstd => "zstd",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible: u64,
    pub autoclear: u64,
    pub compression: Compression,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    pub data_file: Option<String>,
    /// What QEMU refuses at open in structures a snapshot read does not use (the active L1
    /// table, the refcount table, an empty snapshot table's offset), one line per finding.
    /// Such an image's snapshots are served and flagged; its active layer is refused.
    pub damage: Vec<String>,
}

/// QEMU's `qcow2_validate_table` rule for a table of `entries` of `entry_len` bytes at `offset`:
/// not past `max_bytes`, cluster-aligned, and its end within a signed 64-bit file offset.
/// (QEMU does not compare it with the file size; we do where we read the table.)
pub fn table_problem(
    offset: u64,
    entries: u64,
    entry_len: u64,
    max_bytes: u64,
    cluster_size: u64,
) -> Option<&'static str> {
    let size = entries.checked_mul(entry_len);
    if size.is_none_or(|s| s > max_bytes) {
        return Some("too large");
    }
    let end = size.and_then(|s| offset.checked_add(s));
    if end.is_none_or(|e| e > i64::MAX as u64) || !offset.is_multiple_of(cluster_size) {
        return Some("offset invalid");
    }
    None
}

pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_be_bytes)
        .unwrap_or(0)
}

pub(crate) fn be64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    pub fn extended_l2(&self) -> bool {
        self.incompatible & INCOMPAT_EXTL2 != 0
    }

    pub fn dirty(&self) -> bool {
        self.incompatible & INCOMPAT_DIRTY != 0
    }

    pub fn has_data_file(&self) -> bool {
        self.incompatible & INCOMPAT_DATA_FILE != 0
    }

    pub fn data_file_raw(&self) -> bool {
        self.autoclear & AUTOCLEAR_DATA_FILE_RAW != 0
    }

    /// Parse and validate the header of `f`. Refuses what we cannot read correctly
    /// (encryption, unknown incompatible features) with `Error::NotSupported`.
    pub fn read(f: &HostFile) -> Result<Header> {
        let mut fixed = [0u8; V3_MIN_HEADER_LEN as usize];
        if f.len() < V2_HEADER_LEN {
            return Err(f.corrupt(0, "file too short for a qcow2 header"));
        }
        let fixed_len = (V3_MIN_HEADER_LEN.min(f.len())) as usize;
        f.read_meta(&mut fixed[..fixed_len], 0, "header")?;
        if fixed[..4] != MAGIC {
            return Err(f.corrupt(0, "bad qcow2 magic"));
        }
        let version = be32(&fixed, 4);
        if version != 2 && version != 3 {
            return Err(Error::NotSupported(format!(
                "qcow2 version {version} in {}",
                f.path().display()
            )));
        }
        let cluster_bits = be32(&fixed, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(f.corrupt(20, format!("cluster_bits {cluster_bits} outside 9..=21")));
        }
        let cluster_size = 1u64 << cluster_bits;
        let (incompatible, autoclear, refcount_order, header_len) = if version == 3 {
            if f.len() < V3_MIN_HEADER_LEN {
                return Err(f.corrupt(0, "file too short for a qcow2 v3 header"));
            }
            let hl = be32(&fixed, 100) as u64;
            if hl < V3_MIN_HEADER_LEN {
                return Err(f.corrupt(100, format!("header_length {hl} is below 104")));
            }
            if hl > cluster_size {
                return Err(f.corrupt(
                    100,
                    format!("header_length {hl} exceeds the cluster size {cluster_size}"),
                ));
            }
            if !hl.is_multiple_of(8) {
                return Err(f.corrupt(100, format!("header_length {hl} is not a multiple of 8")));
            }
            (be64(&fixed, 72), be64(&fixed, 88), be32(&fixed, 96), hl)
        } else {
            (0, 0, 4, V2_HEADER_LEN)
        };
        if refcount_order > 6 {
            return Err(f.corrupt(96, format!("refcount_order {refcount_order} > 6")));
        }
        // The whole header area is the first cluster (or the file, if shorter).
        let area_len = cluster_size.min(f.len()) as usize;
        let area = f.read_meta_vec(area_len, 0, "header cluster")?;
        let compression = if header_len > 104 {
            match area.get(104).copied().unwrap_or(0) {
                0 => Compression::Zlib,
                1 => Compression::Zstd,
                t => {
                    return Err(Error::NotSupported(format!(
                        "qcow2 compression type {t} in {}",
                        f.path().display()
                    )))
                }
            }
        } else {
            Compression::Zlib
        };
        if (incompatible & INCOMPAT_COMPRESSION != 0) != (compression != Compression::Zlib) {
            return Err(f.corrupt(
                72,
                "compression type bit disagrees with compression_type field",
            ));
        }

        let mut h = Header {
            version,
            cluster_bits,
            size: be64(&fixed, 24),
            crypt_method: be32(&fixed, 32),
            l1_size: be32(&fixed, 36),
            l1_table_offset: be64(&fixed, 40),
            refcount_table_offset: be64(&fixed, 48),
            refcount_table_clusters: be32(&fixed, 56),
            nb_snapshots: be32(&fixed, 60),
            snapshots_offset: be64(&fixed, 64),
            incompatible,
            autoclear,
            compression,
            backing_file: None,
            backing_format: None,
            data_file: None,
            damage: Vec::new(),
        };

        let backing_offset = be64(&fixed, 8);
        let backing_len = u64::from(be32(&fixed, 16));
        if backing_offset > cluster_size {
            return Err(f.corrupt(
                8,
                format!("backing_file_offset {backing_offset:#x} is past the header cluster"),
            ));
        }
        let feature_names = h.read_extensions(f, &area, header_len, backing_offset)?;
        h.check_features(f, &feature_names)?;
        if backing_offset != 0 {
            // QEMU: the name must fit in the header cluster and in 1023 bytes.
            if backing_len > MAX_BACKING_NAME.min(cluster_size - backing_offset) {
                return Err(f.corrupt(
                    16,
                    format!(
                        "backing_file_size {backing_len} too long (the name must end in the \
                         header cluster and have at most {MAX_BACKING_NAME} bytes)"
                    ),
                ));
            }
            if backing_len == 0 {
                return Err(f.corrupt(16, "backing_file_size 0 with a backing_file_offset"));
            }
            let name =
                f.read_meta_vec(backing_len as usize, backing_offset, "backing file name")?;
            let name = String::from_utf8(name)
                .map_err(|_| f.corrupt(backing_offset, "backing file name is not UTF-8"))?;
            h.backing_file = Some(name);
        }
        h.validate(f)?;
        Ok(h)
    }

    /// Walk the header extensions; returns the feature name table for error messages.
    fn read_extensions(
        &mut self,
        f: &HostFile,
        area: &[u8],
        header_len: u64,
        backing_offset: u64,
    ) -> Result<Vec<(u8, u8, String)>> {
        let mut names = Vec::new();
        let mut end = area.len() as u64;
        if backing_offset != 0 && backing_offset < end {
            end = backing_offset;
        }
        let mut pos = header_len;
        while pos + 8 <= end {
            let p = pos as usize;
            let typ = be32(area, p);
            let len = be32(area, p + 4) as u64;
            if typ == EXT_END {
                break;
            }
            let data_start = pos + 8;
            let data_end = data_start
                .checked_add(len)
                .filter(|e| *e <= end)
                .ok_or_else(|| {
                    f.corrupt(
                        pos + 4,
                        format!(
                            "header extension {typ:#x}: length {len} runs past the header area"
                        ),
                    )
                })?;
            let data = area
                .get(data_start as usize..data_end as usize)
                .ok_or_else(|| f.corrupt(pos, "header extension outside header cluster"))?;
            let text = || {
                String::from_utf8(data.to_vec())
                    .map_err(|_| f.corrupt(pos, format!("header extension {typ:#x} not UTF-8")))
            };
            match typ {
                EXT_BACKING_FORMAT if len > MAX_BACKING_FORMAT => {
                    return Err(f.corrupt(
                        pos + 4,
                        format!(
                            "backing format extension of {len} bytes (limit {MAX_BACKING_FORMAT})"
                        ),
                    ))
                }
                EXT_BACKING_FORMAT => self.backing_format = Some(text()?),
                EXT_DATA_FILE => self.data_file = Some(text()?),
                EXT_FEATURE_NAMES => {
                    for e in data.chunks_exact(48) {
                        let raw = &e[2..];
                        let n = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
                        let name = String::from_utf8_lossy(&raw[..n]).into_owned();
                        names.push((e[0], e[1], name));
                    }
                }
                _ => {}
            }
            pos = data_end.div_ceil(8) * 8;
        }
        Ok(names)
    }

    fn check_features(&self, f: &HostFile, names: &[(u8, u8, String)]) -> Result<()> {
        if self.crypt_method != 0 {
            let m = match self.crypt_method {
                1 => "AES",
                2 => "LUKS",
                _ => "unknown",
            };
            return Err(Error::NotSupported(format!(
                "encrypted qcow2 ({m} encryption, crypt_method {}) in {}",
                self.crypt_method,
                f.path().display()
            )));
        }
        let unknown = self.incompatible & !INCOMPAT_KNOWN;
        if unknown != 0 {
            let bit = unknown.trailing_zeros();
            let name = names
                .iter()
                .find(|(t, b, _)| *t == 0 && u32::from(*b) == bit)
                .map(|(_, _, n)| format!(" \"{n}\""))
                .unwrap_or_default();
            return Err(Error::NotSupported(format!(
                "qcow2 incompatible feature bit {bit}{name} in {}",
                f.path().display()
            )));
        }
        if self.incompatible & INCOMPAT_CORRUPT != 0 {
            crate::input_warn!(
                &f.path().display().to_string(),
                "qcow2 image is marked corrupt; reading anyway"
            );
        }
        Ok(())
    }

    fn validate(&mut self, f: &HostFile) -> Result<()> {
        let cs = self.cluster_size();
        if self.size > MAX_VIRTUAL_SIZE {
            return Err(f.corrupt(24, format!("virtual size {} too large", self.size)));
        }
        if self.extended_l2() && self.cluster_bits < 14 {
            return Err(f.corrupt(20, "extended L2 entries need clusters of 16 KiB or more"));
        }
        if self.has_data_file() && self.backing_file.is_some() && self.data_file_raw() {
            return Err(f.corrupt(88, "raw external data file with a backing file"));
        }
        // The snapshot table: refused when it has entries (we read it), damage when empty.
        if self.nb_snapshots > MAX_SNAPSHOTS {
            return Err(f.corrupt(
                60,
                format!("nb_snapshots {} (limit {MAX_SNAPSHOTS})", self.nb_snapshots),
            ));
        }
        if let Some(p) = table_problem(
            self.snapshots_offset,
            u64::from(self.nb_snapshots),
            40,
            u64::MAX,
            cs,
        ) {
            let what = format!(
                "snapshot table {p} (snapshots_offset {:#x})",
                self.snapshots_offset
            );
            if self.nb_snapshots > 0 {
                return Err(f.corrupt(64, what));
            }
            self.damage.push(what);
        }
        // Structures a snapshot read never touches: what QEMU refuses there is damage.
        let rt_clusters = u64::from(self.refcount_table_clusters);
        if rt_clusters == 0 {
            self.damage
                .push("no refcount table (refcount_table_clusters 0)".to_string());
        } else if let Some(p) = table_problem(
            self.refcount_table_offset,
            rt_clusters,
            cs,
            MAX_REFTABLE_BYTES,
            cs,
        ) {
            self.damage.push(format!(
                "refcount table {p} (refcount_table_offset {:#x}, refcount_table_clusters {})",
                self.refcount_table_offset, self.refcount_table_clusters
            ));
        }
        if let Some(p) = table_problem(
            self.l1_table_offset,
            u64::from(self.l1_size),
            8,
            MAX_L1_BYTES,
            cs,
        ) {
            self.damage.push(format!(
                "active L1 table {p} (l1_table_offset {:#x}, l1_size {})",
                self.l1_table_offset, self.l1_size
            ));
        } else if u64::from(self.l1_size) < self.l1_entries_for(self.size) {
            self.damage.push(format!(
                "active L1 table too small: l1_size {} for a virtual size of {} bytes",
                self.l1_size, self.size
            ));
        }
        Ok(())
    }

    /// L1 entries needed to map `size` guest bytes.
    pub fn l1_entries_for(&self, size: u64) -> u64 {
        let entry_bytes: u32 = if self.extended_l2() { 16 } else { 8 };
        let l2_bits = self.cluster_bits - entry_bytes.trailing_zeros();
        let shift = self.cluster_bits + l2_bits;
        size.div_ceil(1u64 << shift)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_follow_qemus_validate_rule() {
        let cs = 65536;
        assert_eq!(table_problem(cs, 16, 8, MAX_L1_BYTES, cs), None);
        // Empty tables still need a valid offset (QEMU checks the snapshot table's with 0).
        assert_eq!(
            table_problem(0x1234_5678_90ab_cdef, 0, 40, u64::MAX, cs),
            Some("offset invalid")
        );
        assert_eq!(table_problem(0, 0, 40, u64::MAX, cs), None);
        // Size first: QEMU says "too large" before looking at the offset.
        assert_eq!(
            table_problem(513, u64::from(u32::MAX), 8, MAX_L1_BYTES, cs),
            Some("too large")
        );
        assert_eq!(
            table_problem(cs, MAX_L1_BYTES / 8, 8, MAX_L1_BYTES, cs),
            None
        );
        assert_eq!(
            table_problem(cs, MAX_L1_BYTES / 8 + 1, 8, MAX_L1_BYTES, cs),
            Some("too large")
        );
        // The end must stay a signed 64-bit offset; overflow is no escape.
        assert_eq!(
            table_problem(0x7fff_ffff_ffff_0000, 0xffff, 8, MAX_L1_BYTES, cs),
            Some("offset invalid")
        );
        assert_eq!(
            table_problem(u64::MAX - 65535, 2, 8, MAX_L1_BYTES, cs),
            Some("offset invalid")
        );
        assert_eq!(
            table_problem(cs, u64::MAX, u64::MAX, u64::MAX, cs),
            Some("too large")
        );
    }
}

//! Compressed clusters: the L2 descriptor and zlib (raw deflate) / zstd decompression.

use std::cell::RefCell;

use super::super::hostfile::HostFile;
use super::header::Compression;
use crate::error::Result;

/// Where a compressed cluster's bytes live, decoded from its L2 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompressedDescriptor {
    pub offset: u64,
    /// Bytes to read: whole 512-byte sectors from `offset`, minus the offset within the first.
    pub len: u64,
}

impl CompressedDescriptor {
    /// Decode bits 0..=61 of an L2 entry for a compressed cluster.
    pub fn decode(entry: u64, cluster_bits: u32) -> Self {
        // x = 62 - (cluster_bits - 8): bits below x are the offset, x..=61 the extra sectors.
        let shift = 62 - (cluster_bits - 8);
        let offset = entry & ((1u64 << shift) - 1);
        let sectors_mask = (1u64 << (cluster_bits - 8)) - 1;
        let sectors = ((entry >> shift) & sectors_mask) + 1;
        let len = sectors * 512 - (offset & 511);
        CompressedDescriptor { offset, len }
    }
}

thread_local! {
    // One decompressor and input buffer per thread: no per-read allocation of their state.
    static ZLIB: RefCell<flate2::Decompress> = RefCell::new(flate2::Decompress::new(false));
    static ZSTD: RefCell<Option<zstd::stream::raw::Decoder<'static>>> = const { RefCell::new(None) };
    static INPUT: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Read the compressed cluster `d` from `f` and decompress exactly `out.len()` bytes into `out`.
pub fn read_compressed(
    f: &HostFile,
    d: CompressedDescriptor,
    kind: Compression,
    out: &mut [u8],
) -> Result<()> {
    if d.offset >= f.len() {
        return Err(f.corrupt(d.offset, "compressed cluster starts past end of file"));
    }
    // The last sector may be cut short by the end of the file.
    let avail = (f.len() - d.offset).min(d.len) as usize;
    INPUT.with(|input| {
        let mut input = input.borrow_mut();
        input.resize(avail, 0);
        f.read_or_zero(&mut input[..], d.offset)?;
        let ok = match kind {
            Compression::Zlib => inflate(&input, out),
            Compression::Zstd => unzstd(&input, out),
        };
        match ok {
            Ok(true) => Ok(()),
            Ok(false) => Err(f.corrupt(
                d.offset,
                format!(
                    "{} data does not decompress to a whole cluster",
                    kind.name()
                ),
            )),
            Err(e) => Err(f.corrupt(d.offset, format!("{} error: {e}", kind.name()))),
        }
    })
}

/// Raw deflate into `out`; Ok(true) when `out` was filled completely.
fn inflate(input: &[u8], out: &mut [u8]) -> std::result::Result<bool, String> {
    ZLIB.with(|z| {
        let mut z = z.borrow_mut();
        z.reset(false);
        // Output is bounded by `out`, so a decompression bomb just stops at one cluster.
        for _ in 0..4 {
            let inp = z.total_in() as usize;
            let outp = z.total_out() as usize;
            let (Some(i), Some(o)) = (input.get(inp..), out.get_mut(outp..)) else {
                return Ok(false);
            };
            let status = z
                .decompress(i, o, flate2::FlushDecompress::Finish)
                .map_err(|e| e.to_string())?;
            if z.total_out() as usize == out.len() {
                return Ok(true);
            }
            if status == flate2::Status::StreamEnd
                || (z.total_in() as usize == inp && z.total_out() as usize == outp)
            {
                return Ok(false);
            }
        }
        Ok(false)
    })
}

/// Streaming zstd into `out` (trailing bytes after the frame are ignored, as qemu does).
fn unzstd(input: &[u8], out: &mut [u8]) -> std::result::Result<bool, String> {
    use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
    ZSTD.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.is_none() {
            *cell = Some(Decoder::new().map_err(|e| e.to_string())?);
        }
        let Some(dec) = cell.as_mut() else {
            return Err("no zstd decoder".to_string());
        };
        dec.reinit().map_err(|e| e.to_string())?;
        let mut inb = InBuffer::around(input);
        let mut outb = OutBuffer::around(out);
        loop {
            let (ip, op) = (inb.pos, outb.pos());
            let hint = match dec.run(&mut inb, &mut outb) {
                Ok(h) => h,
                Err(e) => {
                    // A decoder in an error state must be rebuilt before next use.
                    *cell = None;
                    return Err(e.to_string());
                }
            };
            if outb.pos() == outb.as_slice().len() {
                return Ok(true);
            }
            if hint == 0 || (inb.pos == ip && outb.pos() == op) {
                return Ok(false);
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn descriptor_decodes_offset_and_sectors() {
        // 64 KiB clusters: shift 54; 3 extra sectors at byte offset 0x10200 + 7.
        let e = (3u64 << 54) | 0x10207;
        let d = CompressedDescriptor::decode(e, 16);
        assert_eq!(d.offset, 0x10207);
        assert_eq!(d.len, 4 * 512 - 7);
    }

    #[test]
    fn inflate_fills_exactly_and_rejects_short() {
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut enc =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(&data).unwrap();
        let mut c = enc.finish().unwrap();
        c.extend_from_slice(&[0xAA; 100]); // trailing garbage, like the next cluster's bytes
        let mut out = vec![0u8; 4096];
        assert_eq!(inflate(&c, &mut out), Ok(true));
        assert_eq!(out, data);
        let mut big = vec![0u8; 8192];
        assert_eq!(inflate(&c, &mut big), Ok(false));
        let mut small = vec![0u8; 1024]; // a bomb is cut at the cluster size
        assert_eq!(inflate(&c, &mut small), Ok(true));
    }

    #[test]
    fn zstd_ignores_trailing_bytes() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 13) as u8).collect();
        let mut c = zstd::bulk::compress(&data, 3).unwrap();
        c.extend_from_slice(&[0x55; 300]);
        let mut out = vec![0u8; 65536];
        assert_eq!(unzstd(&c, &mut out), Ok(true));
        assert_eq!(out, data);
        assert!(unzstd(&[1, 2, 3, 4, 5, 6, 7, 8], &mut out) != Ok(true));
    }
}

//! LZNT1 (MS-XCA section 2.5), the compression of NTFS compressed files: a sequence of chunks,
//! each a 2-byte little-endian header (bits 0-11: chunk data size - 1, bit 15: compressed)
//! followed by its data, each decompressing to at most 4 KiB. A compressed chunk is groups of a
//! flag byte and up to 8 tokens (bit clear: a literal byte; set: a 2-byte back-reference whose
//! split between offset and length bits depends on the position within the 4 KiB chunk).
//! A header of 0 or the end of the input ends the stream. Every bound is checked: corrupt input
//! is an error naming where, never a panic, an out-of-bounds access or a loop without progress.

/// Bytes a chunk decompresses to at most (and exactly, for every chunk but the last).
pub const CHUNK: usize = 4096;

/// Where and why the compressed data is invalid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Corrupt {
    /// Offset in the compressed input.
    pub at: usize,
    pub what: &'static str,
}

/// Decompress `input` into `out`, filling all of it: each chunk's output starts at the next
/// 4 KiB boundary of `out`, and what the chunks do not cover (a short chunk's tail, everything
/// after the end of the stream) is zero. This is how NTFS fills a compression unit.
pub fn decompress(input: &[u8], out: &mut [u8]) -> Result<(), Corrupt> {
    let mut i = 0usize;
    let mut o = 0usize;
    while o < out.len() {
        let Some(h) = input.get(i..i + 2) else { break };
        let header = u16::from_le_bytes([h[0], h[1]]);
        if header == 0 {
            break;
        }
        let start = i + 2;
        let end = start + usize::from(header & 0x0fff) + 1;
        let Some(src) = input.get(start..end) else {
            return Err(Corrupt {
                at: i,
                what: "chunk runs past the end of the compressed data",
            });
        };
        let dst_end = out.len().min(o + CHUNK);
        let dst = &mut out[o..dst_end];
        let n = if header & 0x8000 == 0 {
            // Stored: Windows writes 4096 bytes; a shorter one (a stream's last chunk) is taken
            // as it is.
            let Some(d) = dst.get_mut(..src.len()) else {
                return Err(Corrupt {
                    at: i,
                    what: "stored chunk larger than 4 KiB",
                });
            };
            d.copy_from_slice(src);
            src.len()
        } else {
            decompress_chunk(src, dst).map_err(|(at, what)| Corrupt {
                at: start + at,
                what,
            })?
        };
        dst[n..].fill(0);
        o = dst_end;
        i = end;
    }
    out[o..].fill(0);
    Ok(())
}

/// One compressed chunk into `dst` (at most 4 KiB); the number of bytes written.
fn decompress_chunk(src: &[u8], dst: &mut [u8]) -> Result<usize, (usize, &'static str)> {
    debug_assert!(dst.len() <= CHUNK);
    let (mut s, mut d) = (0usize, 0usize);
    while let Some(&flags) = src.get(s) {
        s += 1;
        for bit in 0..8 {
            let Some(&b) = src.get(s) else { break };
            if flags >> bit & 1 == 0 {
                let Some(slot) = dst.get_mut(d) else {
                    return Err((s, "literal past the end of the 4 KiB chunk"));
                };
                *slot = b;
                d += 1;
                s += 1;
                continue;
            }
            let Some(t) = src.get(s..s + 2) else {
                return Err((s, "back-reference cut off by the end of the chunk"));
            };
            let token = usize::from(u16::from_le_bytes([t[0], t[1]]));
            let (offset, len) = split(d, token).ok_or((s, "back-reference at a chunk's start"))?;
            if offset > d {
                return Err((s, "back-reference before the start of the chunk"));
            }
            if len > dst.len() - d {
                return Err((s, "back-reference past the end of the 4 KiB chunk"));
            }
            if offset >= len {
                dst.copy_within(d - offset..d - offset + len, d);
            } else {
                // Overlapping: a repeated pattern, copied forward byte by byte.
                for k in d..d + len {
                    dst[k] = dst[k - offset];
                }
            }
            d += len;
            s += 2;
        }
    }
    Ok(d)
}

/// The (offset, length) of back-reference `token` at output position `pos` (1..=4095) of a
/// chunk: the offset takes 4 bits up to position 16, then one more bit each time the position
/// doubles (12 bits from 2049 on), and the length the remaining bits, plus 3. None at pos 0.
fn split(pos: usize, token: usize) -> Option<(usize, usize)> {
    let mut p = pos.checked_sub(1)?;
    let mut offset_bits = 4;
    while p >= 0x10 && offset_bits < 12 {
        p >>= 1;
        offset_bits += 1;
    }
    let len_bits = 16 - offset_bits;
    Some(((token >> len_bits) + 1, (token & ((1 << len_bits) - 1)) + 3))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A test compressor: greedy, literal or back-reference per token, exactly like the format
    /// (used to check the position-dependent split round-trips at every position).
    fn compress_chunk(data: &[u8]) -> Vec<u8> {
        assert!(data.len() <= CHUNK);
        let mut body = Vec::new();
        let mut pos = 0;
        while pos < data.len() {
            let flag_at = body.len();
            body.push(0u8);
            for bit in 0..8 {
                if pos >= data.len() {
                    break;
                }
                let mut best = (0, 0);
                if pos > 0 {
                    let mut bits = 4;
                    let mut p = pos - 1;
                    while p >= 0x10 {
                        p >>= 1;
                        bits += 1;
                    }
                    let max_off = (1usize << bits).min(pos);
                    let max_len = ((1usize << (16 - bits)) - 1 + 3).min(data.len() - pos);
                    for off in 1..=max_off {
                        let mut l = 0;
                        while l < max_len && data[pos + l] == data[pos + l - off] {
                            l += 1;
                        }
                        if l > best.1 {
                            best = (off, l);
                        }
                    }
                }
                if best.1 >= 3 {
                    let mut bits = 4;
                    let mut p = pos - 1;
                    while p >= 0x10 {
                        p >>= 1;
                        bits += 1;
                    }
                    let token = ((best.0 - 1) << (16 - bits)) | (best.1 - 3);
                    body.extend_from_slice(&(token as u16).to_le_bytes());
                    body[flag_at] |= 1 << bit;
                    pos += best.1;
                } else {
                    body.push(data[pos]);
                    pos += 1;
                }
            }
        }
        if body.len() > CHUNK {
            // Incompressible: stored, as Windows does.
            let mut out = header(data.len(), false).to_vec();
            out.extend_from_slice(data);
            return out;
        }
        let mut out = header(body.len(), true).to_vec();
        out.extend_from_slice(&body);
        out
    }

    fn header(len: usize, compressed: bool) -> [u8; 2] {
        let h = (len as u16 - 1) | 0x3000 | if compressed { 0x8000 } else { 0 };
        h.to_le_bytes()
    }

    fn unpack(input: &[u8], n: usize) -> Result<Vec<u8>, Corrupt> {
        let mut out = vec![0xaa; n];
        decompress(input, &mut out).map(|()| out)
    }

    #[test]
    fn literals_only() {
        let mut c = header(10, true).to_vec();
        c.extend_from_slice(&[0x00, b'a', b'b', b'c', b'd', b'e', b'f', b'g', b'h', 0x00]);
        // The second flag byte has no tokens after it: the chunk ends there.
        let out = unpack(&c, 4096).unwrap();
        assert_eq!(&out[..8], b"abcdefgh");
        assert!(out[8..].iter().all(|&b| b == 0));
    }

    #[test]
    fn stored_chunk_and_zero_fill_to_the_next_chunk() {
        let mut c = header(4096, false).to_vec();
        c.extend((0..4096).map(|i| (i % 251) as u8));
        // A second, compressed chunk of 2 literals: output at 4096, the rest of the unit zero.
        c.extend_from_slice(&header(3, true));
        c.extend_from_slice(&[0x00, 7, 9]);
        let out = unpack(&c, 16384).unwrap();
        assert!((0..4096).all(|i| out[i] == (i % 251) as u8));
        assert_eq!(&out[4096..4098], &[7, 9]);
        assert!(out[4098..].iter().all(|&b| b == 0));
    }

    #[test]
    fn back_reference_overlapping_run() {
        // 'a', then a back-reference at position 1 (4 offset bits): offset 1, length 3 + 9.
        let token: u16 = 9;
        let mut c = header(4, true).to_vec();
        c.extend_from_slice(&[0b10, b'a']);
        c.extend_from_slice(&token.to_le_bytes());
        let out = unpack(&c, 4096).unwrap();
        assert_eq!(&out[..13], b"aaaaaaaaaaaaa");
        assert_eq!(out[13], 0);
    }

    #[test]
    fn split_boundaries() {
        // (position, offset bits): the split moves exactly after 16, 32, 64, … 2048.
        for (pos, bits) in [
            (1, 4),
            (16, 4),
            (17, 5),
            (32, 5),
            (33, 6),
            (64, 6),
            (65, 7),
            (128, 7),
            (129, 8),
            (256, 8),
            (257, 9),
            (512, 9),
            (513, 10),
            (1024, 10),
            (1025, 11),
            (2048, 11),
            (2049, 12),
            (4095, 12),
        ] {
            let len_bits = 16 - bits;
            let token = (5usize << len_bits) | 2;
            assert_eq!(split(pos, token), Some((6, 5)), "pos {pos}");
            // All offset bits set: the largest offset the position can express.
            let token = usize::MAX >> (usize::BITS - 16);
            assert_eq!(split(pos, token).unwrap().0, 1 << bits, "pos {pos}");
        }
        assert_eq!(split(0, 0), None);
    }

    #[test]
    fn round_trip_at_every_split() {
        // Data whose matches sit at every distance class: the test compressor emits
        // back-references at positions across every boundary, the decompressor must agree.
        let mut data = Vec::new();
        let mut x = 12345u32;
        while data.len() < CHUNK {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let run = (x >> 16) as usize % 40;
            if data.len() > 20 && x & 1 == 0 {
                let back = 1 + (x >> 8) as usize % data.len().min(4000);
                let start = data.len() - back;
                for k in 0..run.min(CHUNK - data.len()) {
                    data.push(data[start + k]);
                }
            } else {
                for _ in 0..run.min(CHUNK - data.len()) {
                    x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    data.push((x >> 24) as u8);
                }
            }
        }
        for n in [1, 15, 16, 17, 33, 100, 2048, 2049, 4095, 4096] {
            let c = compress_chunk(&data[..n]);
            let out = unpack(&c, CHUNK).unwrap();
            assert_eq!(&out[..n], &data[..n], "n {n}");
            assert!(out[n..].iter().all(|&b| b == 0));
        }
        // Several chunks in one unit.
        let mut c = Vec::new();
        let mut want = Vec::new();
        for k in 0..4 {
            let part: Vec<u8> = data.iter().map(|b| b.wrapping_add(k)).collect();
            c.extend(compress_chunk(&part));
            want.extend(part);
        }
        assert_eq!(unpack(&c, 4 * CHUNK).unwrap(), want);
    }

    #[test]
    fn back_reference_at_the_largest_offset_of_its_position() {
        // Position 17 (5 offset bits): offset up to 32, but only 17 bytes exist: 17 ok, 18 bad.
        let mut lits = header(1 + 8 + 1 + 8 + 1 + 1 + 2, true).to_vec();
        lits.push(0);
        lits.extend(1..=8u8);
        lits.push(0);
        lits.extend(9..=16u8);
        lits.extend_from_slice(&[0b10, 17]);
        let at_17 = |off: usize| {
            let mut c = lits.clone();
            c.extend_from_slice(&(((off - 1) << 11) as u16).to_le_bytes());
            unpack(&c, CHUNK)
        };
        let out = at_17(17).unwrap();
        assert_eq!(&out[17..20], &[1, 2, 3]);
        assert_eq!(
            at_17(18).unwrap_err().what,
            "back-reference before the start of the chunk"
        );
    }

    #[test]
    fn corrupt_inputs_are_errors() {
        // A back-reference first in a chunk.
        let mut c = header(3, true).to_vec();
        c.extend_from_slice(&[0x01, 0x00, 0x00]);
        assert_eq!(
            unpack(&c, CHUNK).unwrap_err().what,
            "back-reference at a chunk's start"
        );
        // Truncated: the header promises more than there is.
        let mut c = header(100, true).to_vec();
        c.extend_from_slice(&[0x00, 1, 2, 3]);
        assert_eq!(unpack(&c, CHUNK).unwrap_err().at, 0);
        // A back-reference cut in half by the chunk end.
        let mut c = header(3, true).to_vec();
        c.extend_from_slice(&[0x02, b'x', 0x05]);
        assert!(unpack(&c, CHUNK).is_err());
        // A back-reference running past 4 KiB: 'a' then offset 1, length 4095 + 3 ... too long.
        let mut c = header(4, true).to_vec();
        c.extend_from_slice(&[0x02, b'a', 0xff, 0x0f]);
        assert_eq!(
            unpack(&c, CHUNK).unwrap_err().what,
            "back-reference past the end of the 4 KiB chunk"
        );
        // A stored chunk larger than the output left.
        let mut c = header(4096, false).to_vec();
        c.extend(std::iter::repeat_n(1u8, 4096));
        assert!(unpack(&c, 100).is_err());
        // Odd trailing byte, empty input, zero header: a clean end.
        assert_eq!(unpack(&[0x05], 8).unwrap(), vec![0; 8]);
        assert_eq!(unpack(&[], 8).unwrap(), vec![0; 8]);
        assert_eq!(unpack(&[0, 0, 1, 2], 8).unwrap(), vec![0; 8]);
    }

    #[test]
    fn mutation_loop() {
        // Damage valid streams byte by byte: never a panic; the output is always fully written.
        let data: Vec<u8> = (0..3 * CHUNK as u32)
            .map(|i| (i / 7 % 13) as u8 ^ (i % 5) as u8)
            .collect();
        let mut c = Vec::new();
        for part in data.chunks(CHUNK) {
            c.extend(compress_chunk(part));
        }
        assert_eq!(unpack(&c, 4 * CHUNK).unwrap()[..data.len()], data[..]);
        let mut x = 0x5eed_1171u64;
        let mut errors = 0;
        for _ in 0..20_000 {
            let mut m = c.clone();
            for _ in 0..1 + x % 4 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let at = (x >> 8) as usize % m.len();
                m[at] = (x >> 40) as u8;
            }
            if x.is_multiple_of(7) {
                m.truncate((x >> 20) as usize % m.len());
            }
            let mut out = vec![0xaa; 4 * CHUNK];
            match decompress(&m, &mut out) {
                Ok(()) => assert!(!out.contains(&0xaa) || m.contains(&0xaa)),
                Err(e) => {
                    errors += 1;
                    assert!(e.at < m.len());
                }
            }
        }
        assert!(errors > 1000, "{errors}");
    }
}

//! ext4 htree (`dir_index`) lookups: the directory name hashes of `fs/ext4/hash.c` (legacy,
//! half-MD4 and TEA, each in its signed and unsigned `char` form) and the walk from `dx_root`
//! through `dx_node` blocks to the one leaf block that may hold a name, as `dx_probe` does.
//!
//! A lookup reads the root, at most [`MAX_LEVELS`] index blocks and the leaf (plus its
//! successors while their hash continues the same value), whatever the directory's size.
//! Anything the walk does not understand (an unknown hash version, a count past its limit, a
//! block outside the directory) is [`Probe::Linear`]: the caller searches the directory
//! linearly, as Linux falls back when `dx_probe` reports a bad index.

use crate::restore::bytes::{le16, le32, u8at};

/// Hash versions as stored in `dx_root_info` (the unsigned forms add 3).
pub const LEGACY: u8 = 0;
pub const HALF_MD4: u8 = 1;
pub const TEA: u8 = 2;
pub const LEGACY_UNSIGNED: u8 = 3;
pub const HALF_MD4_UNSIGNED: u8 = 4;
pub const TEA_UNSIGNED: u8 = 5;

/// Index levels below the root: 2 with `largedir` (3-level trees), 1 without.
pub const MAX_LEVELS: u8 = 3;

/// The major hash of `name` under `version` with `seed` (`s_hash_seed`; all zero = the default
/// seed), the low bit cleared as Linux keeps it; `None` for a version we do not know
/// (SipHash of casefolded encrypted names, garbage).
pub fn dirhash(version: u8, name: &[u8], seed: &[u32; 4]) -> Option<u32> {
    dirhash2(version, name, seed).map(|(major, _)| major)
}

/// The major and minor hash of `name` (`ext4fs_dirhash`'s `hinfo->hash` and
/// `hinfo->minor_hash`; the minor one is 0 for the legacy hash).
pub fn dirhash2(version: u8, name: &[u8], seed: &[u32; 4]) -> Option<(u32, u32)> {
    let mut buf = if seed.iter().any(|&s| s != 0) {
        *seed
    } else {
        [0x6745_2301, 0xefcd_ab89, 0x98ba_dcfe, 0x1032_5476]
    };
    let (hash, minor) = match version {
        LEGACY => (dx_hack_hash(name, true), 0),
        LEGACY_UNSIGNED => (dx_hack_hash(name, false), 0),
        HALF_MD4 | HALF_MD4_UNSIGNED => {
            let signed = version == HALF_MD4;
            let mut p = name;
            // Linux hashes a zero-length name as nothing at all (the seed's word).
            while !p.is_empty() {
                let mut input = [0u32; 8];
                str2hashbuf(p, &mut input, signed);
                half_md4_transform(&mut buf, &input);
                p = p.get(32..).unwrap_or(&[]);
            }
            (buf[1], buf[2])
        }
        TEA | TEA_UNSIGNED => {
            let signed = version == TEA;
            let mut p = name;
            while !p.is_empty() {
                let mut input = [0u32; 4];
                str2hashbuf(p, &mut input, signed);
                tea_transform(&mut buf, &input);
                p = p.get(16..).unwrap_or(&[]);
            }
            (buf[0], buf[1])
        }
        _ => return None,
    };
    let hash = hash & !1;
    // EXT4_HTREE_EOF_32BIT << 1 is reserved for the end of a readdir.
    let hash = if hash == 0x7fff_ffff << 1 {
        (0x7fff_ffff - 1) << 1
    } else {
        hash
    };
    Some((hash, minor))
}

/// A name byte as C's `char` would widen it: sign-extended where `char` is signed.
fn widen(b: u8, signed: bool) -> u32 {
    if signed {
        b as i8 as i32 as u32
    } else {
        u32::from(b)
    }
}

fn dx_hack_hash(name: &[u8], signed: bool) -> u32 {
    let (mut hash0, mut hash1) = (0x12a3_fe2du32, 0x37ab_e8f9u32);
    for &b in name {
        let mut hash =
            hash1.wrapping_add(hash0 ^ (widen(b, signed) as i32).wrapping_mul(7_152_373) as u32);
        if hash & 0x8000_0000 != 0 {
            hash = hash.wrapping_sub(0x7fff_ffff);
        }
        hash1 = hash0;
        hash0 = hash;
    }
    hash0 << 1
}

/// `str2hashbuf_{signed,unsigned}`: the first `4 * out.len()` bytes of `msg` packed big-end
/// first into words, padded with the length.
fn str2hashbuf(msg: &[u8], out: &mut [u32], signed: bool) {
    let len = msg.len() as u32;
    let mut pad = len | (len << 8);
    pad |= pad << 16;
    let mut val = pad;
    let take = msg.len().min(out.len() * 4);
    let mut k = 0;
    for (i, &b) in msg[..take].iter().enumerate() {
        val = widen(b, signed).wrapping_add(val << 8);
        if i % 4 == 3 {
            out[k] = val;
            k += 1;
            val = pad;
        }
    }
    if k < out.len() {
        out[k] = val;
        k += 1;
    }
    for o in out.iter_mut().skip(k) {
        *o = pad;
    }
}

fn tea_transform(buf: &mut [u32; 4], input: &[u32; 4]) {
    let (mut sum, mut b0, mut b1) = (0u32, buf[0], buf[1]);
    let [a, b, c, d] = *input;
    for _ in 0..16 {
        sum = sum.wrapping_add(0x9E37_79B9);
        b0 = b0.wrapping_add(
            (b1 << 4).wrapping_add(a) ^ b1.wrapping_add(sum) ^ (b1 >> 5).wrapping_add(b),
        );
        b1 = b1.wrapping_add(
            (b0 << 4).wrapping_add(c) ^ b0.wrapping_add(sum) ^ (b0 >> 5).wrapping_add(d),
        );
    }
    buf[0] = buf[0].wrapping_add(b0);
    buf[1] = buf[1].wrapping_add(b1);
}

fn half_md4_transform(buf: &mut [u32; 4], x: &[u32; 8]) {
    let f = |x: u32, y: u32, z: u32| z ^ (x & (y ^ z));
    let g = |x: u32, y: u32, z: u32| (x & y).wrapping_add((x ^ y) & z);
    let h = |x: u32, y: u32, z: u32| x ^ y ^ z;
    const K2: u32 = 0o13240474631;
    const K3: u32 = 0o15666365641;
    let [mut a, mut b, mut c, mut d] = *buf;
    macro_rules! round {
        ($f:ident, $a:ident, $b:ident, $c:ident, $d:ident, $x:expr, $s:expr) => {
            $a = $a
                .wrapping_add($f($b, $c, $d))
                .wrapping_add($x)
                .rotate_left($s);
        };
    }
    round!(f, a, b, c, d, x[0], 3);
    round!(f, d, a, b, c, x[1], 7);
    round!(f, c, d, a, b, x[2], 11);
    round!(f, b, c, d, a, x[3], 19);
    round!(f, a, b, c, d, x[4], 3);
    round!(f, d, a, b, c, x[5], 7);
    round!(f, c, d, a, b, x[6], 11);
    round!(f, b, c, d, a, x[7], 19);

    round!(g, a, b, c, d, x[1].wrapping_add(K2), 3);
    round!(g, d, a, b, c, x[3].wrapping_add(K2), 5);
    round!(g, c, d, a, b, x[5].wrapping_add(K2), 9);
    round!(g, b, c, d, a, x[7].wrapping_add(K2), 13);
    round!(g, a, b, c, d, x[0].wrapping_add(K2), 3);
    round!(g, d, a, b, c, x[2].wrapping_add(K2), 5);
    round!(g, c, d, a, b, x[4].wrapping_add(K2), 9);
    round!(g, b, c, d, a, x[6].wrapping_add(K2), 13);

    round!(h, a, b, c, d, x[3].wrapping_add(K3), 3);
    round!(h, d, a, b, c, x[7].wrapping_add(K3), 9);
    round!(h, c, d, a, b, x[2].wrapping_add(K3), 11);
    round!(h, b, c, d, a, x[6].wrapping_add(K3), 15);
    round!(h, a, b, c, d, x[1].wrapping_add(K3), 3);
    round!(h, d, a, b, c, x[5].wrapping_add(K3), 9);
    round!(h, c, d, a, b, x[0].wrapping_add(K3), 11);
    round!(h, b, c, d, a, x[4].wrapping_add(K3), 15);

    buf[0] = buf[0].wrapping_add(a);
    buf[1] = buf[1].wrapping_add(b);
    buf[2] = buf[2].wrapping_add(c);
    buf[3] = buf[3].wrapping_add(d);
}

/// What a lookup through the index found.
#[derive(Debug, PartialEq, Eq)]
pub enum Found<T> {
    Yes(T),
    /// The index says the name is in none of the leaves it can be in.
    No,
    /// No usable index (or a block it names is unreadable): search linearly.
    Linear,
}

/// Leaves searched for one name at most (the leaf the hash falls in and its successors while
/// their hash continues it); past this, the directory is searched linearly.
const MAX_LEAVES: usize = 64;

/// One index block on the way down: its bytes, where its entries start, their count, and the
/// entry taken.
struct Frame {
    block: Vec<u8>,
    at: usize,
    count: usize,
    idx: usize,
}

impl Frame {
    /// Validates count/limit; `None` if they do not fit the block.
    fn new(block: Vec<u8>, at: usize) -> Option<Frame> {
        let limit = usize::from(le16(&block, at));
        let count = usize::from(le16(&block, at + 2));
        (count > 0 && count <= limit && at + limit * 8 <= block.len()).then_some(Frame {
            block,
            at,
            count,
            idx: 0,
        })
    }
    fn hash(&self, i: usize) -> u32 {
        le32(&self.block, self.at + i * 8)
    }
    fn child(&self) -> u32 {
        le32(&self.block, self.at + self.idx * 8 + 4) & 0x0fff_ffff
    }
}

/// `ext4_dx_find_entry`: `root` is logical block 0 of the directory, `read` reads a logical
/// block (`None` when it cannot), `search` looks for the name in a leaf block, `unsigned` is
/// the superblock's `EXT2_FLAGS_UNSIGNED_HASH`, `largedir` allows three index levels.
pub fn find<T>(
    root: &[u8],
    name: &[u8],
    seed: &[u32; 4],
    unsigned: bool,
    largedir: bool,
    mut read: impl FnMut(u32) -> Option<Vec<u8>>,
    mut search: impl FnMut(&[u8]) -> Option<T>,
) -> Found<T> {
    // "." (12 bytes) then ".." whose record covers the rest; dx_root_info at 24.
    if root.len() < 40 || le16(root, 4) != 12 || u8at(root, 0x1D) != 8 || u8at(root, 0x1F) & 1 != 0
    {
        return Found::Linear;
    }
    let mut version = u8at(root, 0x1C);
    if version <= TEA && unsigned {
        version += 3;
    }
    let levels = usize::from(u8at(root, 0x1E));
    if levels >= usize::from(if largedir { MAX_LEVELS } else { 2 }) {
        return Found::Linear;
    }
    let Some(hash) = dirhash(version, name, seed) else {
        return Found::Linear;
    };
    // dx_probe: at each level the last entry whose hash is <= the name's (entry 0 has none).
    let mut frames: Vec<Frame> = Vec::with_capacity(levels + 1);
    let Some(mut frame) = Frame::new(root.to_vec(), 32) else {
        return Found::Linear;
    };
    loop {
        let (mut lo, mut hi) = (1usize, frame.count);
        while lo < hi {
            let m = lo + (hi - lo) / 2;
            if frame.hash(m) > hash {
                hi = m;
            } else {
                lo = m + 1;
            }
        }
        frame.idx = lo - 1;
        let child = frame.child();
        frames.push(frame);
        if frames.len() > levels {
            break;
        }
        match read(child).and_then(node) {
            Some(f) => frame = f,
            None => return Found::Linear,
        }
    }
    for _ in 0..MAX_LEAVES {
        let Some(leaf) = frames.last().map(Frame::child).and_then(&mut read) else {
            return Found::Linear;
        };
        if let Some(t) = search(&leaf) {
            return Found::Yes(t);
        }
        // ext4_htree_next_block: the next entry at the deepest level that has one...
        let Some(p) = frames.iter().rposition(|f| f.idx + 1 < f.count) else {
            return Found::No;
        };
        frames[p].idx += 1;
        // ...continues this hash only if it carries it with the continuation bit.
        if frames[p].hash(frames[p].idx) & !1 != hash {
            return Found::No;
        }
        frames.truncate(p + 1);
        while frames.len() <= levels {
            let child = frames[frames.len() - 1].child();
            match read(child).and_then(node) {
                Some(f) => frames.push(f),
                None => return Found::Linear,
            }
        }
    }
    Found::Linear
}

/// A `dx_node` block: a fake dirent (inode 0, its record covering the block), count/limit at 8.
fn node(b: Vec<u8>) -> Option<Frame> {
    if b.len() < 16 || le32(&b, 0) != 0 {
        return None;
    }
    Frame::new(b, 8)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `4b1e3f2a-11c2-4a7d-9e55-0123456789ab` as `s_hash_seed` holds it (little-endian words).
    const SEED: [u32; 4] = [0x2a3f_1e4b, 0x7d4a_c211, 0x2301_559e, 0xab89_6745];
    const LONG: &str = "a-much-longer-name-that-spans-more-than-thirty-two-bytes-é.txt";

    /// Expected values from e2fsprogs 1.47: `debugfs -R 'dx_hash -h VERSION -s SEED NAME'`.
    #[test]
    fn hashes_match_e2fsprogs() {
        let cases: &[(u8, &str, u32)] = &[
            (LEGACY, "a", 0xe74b53e2),
            (LEGACY, "e0000042", 0x2f4a9b3a),
            (LEGACY, "héllo-wörld", 0x030e0ffc),
            (LEGACY, LONG, 0xf5008f68),
            (LEGACY_UNSIGNED, "héllo-wörld", 0xdc831620),
            (LEGACY_UNSIGNED, LONG, 0x79796584),
            (HALF_MD4, "a", 0x62141b5c),
            (HALF_MD4, "e0000042", 0x2f45e09c),
            (HALF_MD4, "héllo-wörld", 0xb043f01c),
            (HALF_MD4, LONG, 0x59da2878),
            (HALF_MD4_UNSIGNED, "héllo-wörld", 0xcf8cb762),
            (HALF_MD4_UNSIGNED, LONG, 0xbe0e0eaa),
            (TEA, "a", 0x1294d9ee),
            (TEA, "e0000042", 0x07f8eb8c),
            (TEA, "héllo-wörld", 0x5537299e),
            (TEA, LONG, 0xc05278a2),
            (TEA_UNSIGNED, "héllo-wörld", 0xad3ca1c4),
            (TEA_UNSIGNED, LONG, 0x286095e4),
        ];
        for &(v, name, want) in cases {
            assert_eq!(
                dirhash(v, name.as_bytes(), &SEED),
                Some(want),
                "version {v} name {name}"
            );
        }
        // An all-zero seed means the default one.
        assert_eq!(dirhash(HALF_MD4, b"e0000042", &[0; 4]), Some(0xe501d9a4));
        assert_eq!(dirhash(TEA, b"e0000042", &[0; 4]), Some(0x1e62416e));
        assert_eq!(dirhash(6, b"x", &SEED), None, "SipHash is not computed");
    }

    /// A two-level index over leaves 1..=3 (hashes from 0, 0x1000 and 0x1000|1, the last
    /// continuing the second's hash) and what the walk reads.
    #[test]
    fn probe_descends_and_follows_continued_hashes() {
        let bs = 1024;
        let mut root = vec![0u8; bs];
        root[4..6].copy_from_slice(&12u16.to_le_bytes());
        root[0x1C] = TEA;
        root[0x1D] = 8;
        root[0x1E] = 1; // one level of dx_node below the root
        let put = |b: &mut Vec<u8>, at: usize, limit: u16, ents: &[(u32, u32)]| {
            b[at..at + 2].copy_from_slice(&limit.to_le_bytes());
            b[at + 2..at + 4].copy_from_slice(&(ents.len() as u16).to_le_bytes());
            for (i, &(h, blk)) in ents.iter().enumerate() {
                if i > 0 {
                    b[at + i * 8..at + i * 8 + 4].copy_from_slice(&h.to_le_bytes());
                }
                b[at + i * 8 + 4..at + i * 8 + 8].copy_from_slice(&blk.to_le_bytes());
            }
        };
        put(&mut root, 32, 10, &[(0, 4)]);
        let name = b"x";
        let h = dirhash(TEA, name, &[0; 4]).unwrap_or(0);
        let mut node = vec![0u8; bs];
        put(&mut node, 8, 10, &[(0, 1), (h, 2), (h | 1, 3)]);
        let blocks = [root.clone(), vec![1u8; 4], vec![2u8; 4], vec![3u8; 4], node];
        let read = |n: u32| blocks.get(n as usize).cloned();
        let mut seen = Vec::new();
        let r: Found<()> = find(&root, name, &[0; 4], false, false, read, |b| {
            seen.push(b[0]);
            None
        });
        assert_eq!(r, Found::No);
        assert_eq!(
            seen,
            vec![2, 3],
            "its leaf, then the one continuing its hash"
        );
        let r = find(&root, name, &[0; 4], false, false, read, |b| {
            (b[0] == 3).then_some(7)
        });
        assert_eq!(r, Found::Yes(7));
        // Damage: a count past its limit, an unknown hash, a missing node.
        let mut bad = root.clone();
        bad[34..36].copy_from_slice(&11u16.to_le_bytes());
        assert_eq!(
            find(&bad, name, &[0; 4], false, false, read, |_| Some(())),
            Found::Linear
        );
        let mut bad = root.clone();
        bad[0x1C] = 9;
        assert_eq!(
            find(&bad, name, &[0; 4], false, false, read, |_| Some(())),
            Found::Linear
        );
        let none = |_: u32| None;
        assert_eq!(
            find(&root, name, &[0; 4], false, false, none, |_| Some(())),
            Found::Linear
        );
    }
}

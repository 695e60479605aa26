//! The image readers against qemu: every byte must equal `qemu-img convert -O raw`, and `map()`
//! must agree with `qemu-img map --output=json` (its `data` field). Images are built here with
//! qemu-img / qemu-io in a tempdir and kept to a few MiB.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use snapfs::error::Error;
use snapfs::image::{self, BlockCache, BlockImage, ExtentKind};

fn run(dir: &Path, prog: &str, args: &[&str]) -> String {
    let out = Command::new(prog)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("running {prog}: {e}"));
    assert!(
        out.status.success(),
        "{prog} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn qemu_img(dir: &Path, args: &[&str]) -> String {
    run(dir, "qemu-img", args)
}

/// Run qemu-io commands (each one `-c`) on `img` of format `fmt`.
fn qemu_io(dir: &Path, fmt: &str, img: &str, cmds: &[&str]) {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(img);
    run(dir, "qemu-io", &args);
}

/// Deterministic test bytes: 4 KiB blocks that are alternately zero, noise, and text.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = vec![0u8; len];
    for (i, chunk) in v.chunks_mut(4096).enumerate() {
        match (i as u64 + seed) % 4 {
            0 => {}
            1 => {
                for b in chunk.iter_mut() {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    *b = x as u8;
                }
            }
            _ => {
                let text = format!("block {i} of seed {seed}; ");
                for (j, b) in chunk.iter_mut().enumerate() {
                    *b = text.as_bytes()[j % text.len()];
                }
            }
        }
    }
    v
}

/// Write a sparse raw file: `pattern` in the given (offset, len) pieces, holes elsewhere.
fn sparse_raw(path: &Path, size: u64, pieces: &[(u64, usize)], seed: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    for (i, &(off, len)) in pieces.iter().enumerate() {
        f.write_all_at(&pattern(seed + i as u64, len), off).unwrap();
    }
}

fn cache() -> Arc<BlockCache> {
    Arc::new(BlockCache::new(8 << 20))
}

/// Merge a list of (start, len, data) into maximal runs.
fn merge(ranges: impl IntoIterator<Item = (u64, u64, bool)>) -> Vec<(u64, u64, bool)> {
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    for (s, l, d) in ranges {
        if l == 0 {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.2 == d && last.0 + last.1 == s => last.1 += l,
            _ => out.push((s, l, d)),
        }
    }
    out
}

fn qemu_map(dir: &Path, spec: &str) -> Vec<(u64, u64, bool)> {
    let json = qemu_img(dir, &["map", "--output=json", spec]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    merge(v.as_array().unwrap().iter().map(|e| {
        (
            e["start"].as_u64().unwrap(),
            e["length"].as_u64().unwrap(),
            e["data"].as_bool().unwrap(),
        )
    }))
}

fn our_map(img: &dyn BlockImage) -> Vec<(u64, u64, bool)> {
    let mut all = Vec::new();
    let mut off = 0;
    while off < img.size() {
        let ext = img.map(off, img.size() - off).unwrap();
        assert!(!ext.is_empty(), "map returned nothing at {off}");
        assert_eq!(ext[0].offset, off, "map does not start at the asked offset");
        for w in ext.windows(2) {
            assert_eq!(w[0].offset + w[0].length, w[1].offset, "gap in map");
            assert!(w[0].kind != w[1].kind, "unmerged extents {w:?}");
        }
        for e in &ext {
            all.push((e.offset, e.length, e.kind == ExtentKind::Data));
        }
        let last = ext.last().unwrap();
        off = last.offset + last.length;
    }
    merge(all)
}

/// Read the whole image with `chunk`-sized reads.
fn read_all(img: &dyn BlockImage, chunk: usize) -> Vec<u8> {
    let size = img.size() as usize;
    let mut out = vec![0xEEu8; size];
    let mut off = 0;
    while off < size {
        let n = chunk.min(size - off);
        img.read_at(&mut out[off..off + n], off as u64).unwrap();
        off += n;
    }
    out
}

/// Check `name` (in `dir`, opened at `snapshot`) byte for byte and map for map against qemu-img.
fn check(dir: &Path, name: &str, snapshot: Option<&str>) -> Arc<dyn BlockImage> {
    let c = cache();
    let img = image::open(&dir.join(name), None, snapshot, &c)
        .unwrap_or_else(|e| panic!("opening {name} at {snapshot:?}: {e}"));
    let raw_name = format!("{name}.{}.ref", snapshot.unwrap_or("active"));
    let mut args = vec!["convert", "-O", "raw"];
    let snap_opt;
    if let Some(s) = snapshot {
        snap_opt = format!("snapshot.name={s}");
        args.push("-l");
        args.push(&snap_opt);
    }
    args.push(name);
    args.push(&raw_name);
    qemu_img(dir, &args);
    let mut want = std::fs::read(dir.join(&raw_name)).unwrap();
    // qemu rounds a raw file up to 512 bytes, and `convert -l` keeps the current virtual size
    // for a snapshot; we use the file's exact size and the snapshot's own size: the rest is zeros.
    if (name.ends_with(".raw") || snapshot.is_some()) && (want.len() as u64) > img.size() {
        assert!(
            want[img.size() as usize..].iter().all(|&b| b == 0),
            "{name}: tail not zero"
        );
        want.truncate(img.size() as usize);
    }
    assert_eq!(img.size(), want.len() as u64, "{name}: virtual size");
    for chunk in [1 << 20, 4096, 12345, 511] {
        let got = read_all(img.as_ref(), chunk);
        if got != want {
            let at = got.iter().zip(&want).position(|(a, b)| a != b).unwrap();
            panic!(
                "{name} at {snapshot:?}: byte {at:#x} differs with {chunk}-byte reads ({})",
                img.describe()
            );
        }
    }
    // Zero extents must read as zeros, whatever qemu says.
    let ours = our_map(img.as_ref());
    for &(s, l, d) in &ours {
        if !d {
            assert!(
                want[s as usize..(s + l) as usize].iter().all(|&b| b == 0),
                "{name}: Zero extent at {s:#x}+{l:#x} holds data"
            );
        }
    }
    if snapshot.is_none() {
        let theirs = merge(
            qemu_map(dir, name)
                .into_iter()
                .filter(|e| e.0 < img.size())
                .map(|(s, l, d)| (s, l.min(img.size() - s), d)),
        );
        assert_eq!(ours, theirs, "{name}: map differs from qemu-img map");
    }
    img
}

#[test]
fn raw_image_reads_and_maps_holes() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    sparse_raw(
        &d.join("a.raw"),
        3 << 20,
        &[(0, 8192), (1 << 20, 300_000)],
        1,
    );
    // An odd size, to check the tail.
    sparse_raw(&d.join("b.raw"), (1 << 20) + 777, &[(4096, 4096)], 2);
    let img = check(d, "a.raw", None);
    assert_eq!(img.describe(), "raw");
    check(d, "b.raw", None);
    let c = cache();
    assert!(matches!(
        image::open(&d.join("a.raw"), Some(image::Format::Raw), Some("s"), &c),
        Err(Error::NotSupported(_))
    ));
}

fn create(dir: &Path, name: &str, opts: &str, size: &str) {
    qemu_img(
        dir,
        &["create", "-q", "-f", "qcow2", "-o", opts, name, size],
    );
}

/// Writes and zero writes at cluster-unaligned places, sized for `cs`.
fn scribble(dir: &Path, name: &str, cs: u64) {
    // Offsets scale with the cluster size but stay inside a 4 MiB disk.
    let cs = cs.min(128 << 10);
    let w = |off: u64, len: u64, p: u8| format!("write -P {p:#x} {off} {len}");
    let z = |off: u64, len: u64| format!("write -z {off} {len}");
    let cmds = [
        w(0, cs * 3, 0x11),
        w(cs * 5 + 512, 1024, 0x22),
        w(cs * 9 + cs / 2, cs, 0x33),
        w(3 << 20, 64 << 10, 0x44),
        z(cs, cs),
        z((3 << 20) + 4096, 8192),
        w((4 << 20) - 4096, 4096, 0x55),
    ];
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(dir, "qcow2", name, &cmds);
}

#[test]
fn qcow2_versions_and_cluster_sizes() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    for (name, opts, cs) in [
        ("v2.qcow2", "compat=0.10,cluster_size=65536", 65536),
        ("v2-512.qcow2", "compat=0.10,cluster_size=512", 512),
        ("v3-512.qcow2", "compat=1.1,cluster_size=512", 512),
        ("v3-4k.qcow2", "compat=1.1,cluster_size=4096", 4096),
        ("v3-64k.qcow2", "compat=1.1,cluster_size=65536", 65536),
        ("v3-2m.qcow2", "compat=1.1,cluster_size=2M", 2 << 20),
        ("v3-64k-rc64.qcow2", "refcount_bits=64", 65536),
    ] {
        create(d, name, opts, "4M");
        scribble(d, name, cs);
        let img = check(d, name, None);
        assert!(img.describe().starts_with("qcow2 v"), "{}", img.describe());
    }
    // An odd virtual size: the last cluster is partial.
    create(d, "odd.qcow2", "cluster_size=4096", "1000000");
    qemu_io(
        d,
        "qcow2",
        "odd.qcow2",
        &["write -P 0x66 995000 5000", "write -P 7 0 100"],
    );
    check(d, "odd.qcow2", None);
}

#[test]
fn qcow2_zero_clusters_and_discard() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    create(d, "z.qcow2", "cluster_size=65536", "4M");
    qemu_io(
        d,
        "qcow2",
        "z.qcow2",
        &[
            "write -P 0xaa 0 1M",
            "write -z 64k 128k",
            "write -z -u 512k 64k",
            "discard 768k 64k",
        ],
    );
    check(d, "z.qcow2", None);
    // Zero clusters over a backing file hide the backing data.
    sparse_raw(&d.join("zb.raw"), 4 << 20, &[(0, 2 << 20)], 3);
    qemu_img(
        d,
        &[
            "create", "-q", "-f", "qcow2", "-b", "zb.raw", "-F", "raw", "zt.qcow2",
        ],
    );
    qemu_io(
        d,
        "qcow2",
        "zt.qcow2",
        &["write -z 64k 192k", "write -P 1 1M 4k"],
    );
    check(d, "zt.qcow2", None);
}

#[test]
fn qcow2_extended_l2_subclusters() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    create(d, "x.qcow2", "extended_l2=on,cluster_size=65536", "4M");
    qemu_io(
        d,
        "qcow2",
        "x.qcow2",
        &[
            "write -P 1 2k 2k",
            "write -z 8k 4k",
            "write -P 2 70k 10k",
            "write -P 3 1M 200k",
            "write -z 1100k 6k",
        ],
    );
    check(d, "x.qcow2", None);
    // Over a backing file: unallocated subclusters show the backing data.
    sparse_raw(&d.join("xb.raw"), 4 << 20, &[(0, 3 << 20)], 4);
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on,cluster_size=32k",
            "-b",
            "xb.raw",
            "-F",
            "raw",
            "xt.qcow2",
        ],
    );
    qemu_io(
        d,
        "qcow2",
        "xt.qcow2",
        &["write -P 5 1k 1k", "write -z 5k 2k", "write -P 6 40k 3k"],
    );
    check(d, "xt.qcow2", None);
    let img = check(d, "x.qcow2", None);
    assert!(img.describe().contains("extended L2"));
}

#[test]
fn qcow2_compressed_zlib_and_zstd() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    sparse_raw(
        &d.join("src.raw"),
        4 << 20,
        &[(0, 1 << 20), ((2 << 20) + 512, 700_000)],
        5,
    );
    for (name, opts) in [
        ("zlib.qcow2", "compression_type=zlib"),
        ("zstd.qcow2", "compression_type=zstd"),
        ("zstd-4k.qcow2", "compression_type=zstd,cluster_size=4096"),
        ("zlib-512.qcow2", "cluster_size=512"),
        ("zlib-2m.qcow2", "cluster_size=2M"),
        ("zstd-xl2.qcow2", "compression_type=zstd,extended_l2=on"),
        ("zlib-v2.qcow2", "compat=0.10"),
    ] {
        qemu_img(
            d,
            &[
                "convert", "-q", "-c", "-O", "qcow2", "-o", opts, "src.raw", name,
            ],
        );
        check(d, name, None);
    }
    // Compressed clusters partly overwritten.
    qemu_io(
        d,
        "qcow2",
        "zstd.qcow2",
        &["write -P 9 100k 8k", "write -z 300k 64k"],
    );
    let img = check(d, "zstd.qcow2", None);
    assert!(img.describe().contains("zstd"), "{}", img.describe());
}

/// Replace the backing-format header extension's type with an unknown one (qemu then probes).
fn drop_backing_format(path: &Path) {
    let mut b = std::fs::read(path).unwrap();
    let magic = 0xe279_2acau32.to_be_bytes();
    let at = b
        .windows(4)
        .position(|w| w == magic)
        .expect("backing_fmt extension");
    b[at..at + 4].copy_from_slice(&0x7777_7777u32.to_be_bytes());
    std::fs::write(path, b).unwrap();
}

#[test]
fn qcow2_backing_chain_raw_base_relative_paths() {
    let t = tempfile::tempdir().unwrap();
    let a = t.path().join("a");
    let b = t.path().join("b");
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    // base.raw is shorter than the overlays: beyond it reads zeros.
    sparse_raw(
        &b.join("base.raw"),
        3 << 20,
        &[(0, 100_000), ((2 << 20) + 4096, 500_000)],
        6,
    );
    sparse_raw(
        &a.join("mid-src.raw"),
        4 << 20,
        &[(0, 100_000), (1 << 20, 64 << 10)],
        7,
    );
    qemu_img(
        &a,
        &[
            "convert",
            "-q",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4096",
            "-B",
            "../b/base.raw",
            "-F",
            "raw",
            "mid-src.raw",
            "mid.qcow2",
        ],
    );
    qemu_img(&a, &["resize", "-q", "mid.qcow2", "4M"]);
    qemu_img(
        &a,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "5M",
        ],
    );
    qemu_io(
        &a,
        "qcow2",
        "top.qcow2",
        &[
            "write -P 0x77 8k 4k",
            "write -z 2M 64k",
            "write -P 0x78 4600k 100k",
        ],
    );
    let img = check(&a, "top.qcow2", None);
    assert!(
        img.describe().contains("backing mid.qcow2"),
        "{}",
        img.describe()
    );
    check(&a, "mid.qcow2", None);
    // Without a backing_fmt extension the backing format is probed.
    std::fs::copy(a.join("top.qcow2"), a.join("probe.qcow2")).unwrap();
    drop_backing_format(&a.join("probe.qcow2"));
    let c = cache();
    let p = image::open(&a.join("probe.qcow2"), None, None, &c).unwrap();
    assert_eq!(
        read_all(p.as_ref(), 1 << 20),
        read_all(img.as_ref(), 1 << 20)
    );
    let info = image::qcow2::inspect(&a.join("top.qcow2")).unwrap();
    assert_eq!(info.backing_file.as_deref(), Some("mid.qcow2"));
    assert_eq!(info.backing_path, Some(a.join("mid.qcow2")));
    assert_eq!(info.backing_format.as_deref(), Some("qcow2"));
}

#[test]
fn qcow2_internal_snapshots() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    create(d, "s.qcow2", "cluster_size=4096", "4M");
    qemu_io(
        d,
        "qcow2",
        "s.qcow2",
        &["write -P 1 0 1M", "write -P 2 3M 4k"],
    );
    qemu_img(d, &["snapshot", "-c", "before-resize", "s.qcow2"]);
    qemu_io(
        d,
        "qcow2",
        "s.qcow2",
        &["write -P 3 512k 1M", "write -z 0 64k"],
    );
    qemu_img(d, &["resize", "-q", "s.qcow2", "6M"]);
    qemu_io(d, "qcow2", "s.qcow2", &["write -P 4 5M 64k"]);
    qemu_img(d, &["snapshot", "-c", "after", "s.qcow2"]);
    qemu_io(
        d,
        "qcow2",
        "s.qcow2",
        &["write -P 5 5M 4k", "discard 3M 4k"],
    );
    check(d, "s.qcow2", None);
    let s1 = check(d, "s.qcow2", Some("before-resize"));
    assert_eq!(s1.size(), 4 << 20);
    let s2 = check(d, "s.qcow2", Some("after"));
    assert_eq!(s2.size(), 6 << 20);
    // By id when no name matches.
    let c = cache();
    let by_id = image::open(&d.join("s.qcow2"), None, Some("1"), &c).unwrap();
    assert_eq!(
        read_all(by_id.as_ref(), 1 << 20),
        read_all(s1.as_ref(), 1 << 20)
    );
    assert!(matches!(
        image::open(&d.join("s.qcow2"), None, Some("nope"), &c),
        Err(Error::NotFound(_))
    ));
    let info = image::qcow2::inspect(&d.join("s.qcow2")).unwrap();
    let names: Vec<_> = info
        .snapshots
        .iter()
        .map(|s| (s.id.as_str(), s.name.as_str(), s.virtual_size))
        .collect();
    assert_eq!(
        names,
        [("1", "before-resize", 4 << 20), ("2", "after", 6 << 20)]
    );
    // Snapshots of a v2 image (no extra data: the image's size).
    create(d, "s2.qcow2", "compat=0.10", "2M");
    qemu_io(d, "qcow2", "s2.qcow2", &["write -P 1 0 64k"]);
    qemu_img(d, &["snapshot", "-c", "one", "s2.qcow2"]);
    qemu_io(d, "qcow2", "s2.qcow2", &["write -P 2 0 32k"]);
    check(d, "s2.qcow2", Some("one"));
    check(d, "s2.qcow2", None);
}

#[test]
fn qcow2_external_data_file() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    create(d, "df.qcow2", "data_file=df.data", "4M");
    qemu_io(
        d,
        "qcow2",
        "df.qcow2",
        &["write -P 1 0 100k", "write -z 64k 64k", "write -P 2 2M 4k"],
    );
    let img = check(d, "df.qcow2", None);
    assert!(
        img.describe().contains("data file df.data"),
        "{}",
        img.describe()
    );
    create(d, "dfr.qcow2", "data_file=dfr.data,data_file_raw=on", "4M");
    qemu_io(
        d,
        "qcow2",
        "dfr.qcow2",
        &["write -P 3 0 100k", "write -z 64k 64k", "write -P 4 3M 4k"],
    );
    let img = check(d, "dfr.qcow2", None);
    assert!(img.describe().contains("(raw)"), "{}", img.describe());
    assert_eq!(
        image::qcow2::inspect(&d.join("dfr.qcow2"))
            .unwrap()
            .data_file
            .as_deref(),
        Some("dfr.data")
    );
}

#[test]
fn qcow2_encrypted_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            "secret,id=sec0,data=abc",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0",
            "e.qcow2",
            "1M",
        ],
    );
    let c = cache();
    match image::open(&d.join("e.qcow2"), None, None, &c) {
        Err(Error::NotSupported(m)) => assert!(m.contains("LUKS"), "{m}"),
        Err(e) => panic!("wrong error {e}"),
        Ok(_) => panic!("encrypted image opened"),
    }
}

#[test]
fn qcow2_dirty_bit_is_read() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    create(d, "dirty.qcow2", "cluster_size=4096", "2M");
    qemu_io(d, "qcow2", "dirty.qcow2", &["write -P 1 0 100k"]);
    let clean = check(d, "dirty.qcow2", None);
    let want = read_all(clean.as_ref(), 1 << 20);
    let p = d.join("dirty.qcow2");
    let mut b = std::fs::read(&p).unwrap();
    b[79] |= 1;
    std::fs::write(&p, b).unwrap();
    let c = cache();
    let img = image::open(&p, None, None, &c).unwrap();
    assert_eq!(read_all(img.as_ref(), 4096), want);
    assert!(image::qcow2::inspect(&p).unwrap().dirty);
}

// ---- corrupt input: always an error value, never a panic ----

fn put_be32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn put_be64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// A small valid image with data, a zero cluster, a compressed cluster and a snapshot.
fn sample_images(d: &Path) -> Vec<PathBuf> {
    sparse_raw(&d.join("c-src.raw"), 1 << 20, &[(0, 200_000)], 8);
    qemu_img(
        d,
        &[
            "convert",
            "-q",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4096",
            "c-src.raw",
            "comp.qcow2",
        ],
    );
    create(d, "plain.qcow2", "cluster_size=512", "1M");
    qemu_io(
        d,
        "qcow2",
        "plain.qcow2",
        &["write -P 1 0 8k", "write -z 8k 4k", "write -P 2 600k 3k"],
    );
    qemu_img(d, &["snapshot", "-c", "snap", "plain.qcow2"]);
    qemu_io(d, "qcow2", "plain.qcow2", &["write -P 3 0 1k"]);
    create(
        d,
        "xl2.qcow2",
        "extended_l2=on,cluster_size=16k,compression_type=zstd",
        "1M",
    );
    qemu_io(
        d,
        "qcow2",
        "xl2.qcow2",
        &[
            "write -P 1 1k 3k",
            "write -z 8k 1k",
            "write -c -P 2 64k 16k",
        ],
    );
    vec![
        d.join("comp.qcow2"),
        d.join("plain.qcow2"),
        d.join("xl2.qcow2"),
    ]
}

/// Open, read and map a few ranges; returns the first error, panics only if the reader does.
fn exercise(path: &Path, snapshot: Option<&str>) -> snapfs::error::Result<()> {
    let c = Arc::new(BlockCache::new(1 << 20));
    let img = image::open(path, Some(image::Format::Qcow2), snapshot, &c)?;
    let size = img.size();
    let mut buf = vec![0u8; 70_000];
    for off in [0u64, 4096, 65536, 600 << 10, size.saturating_sub(70_000)] {
        if off >= size {
            continue;
        }
        let n = (size - off).min(buf.len() as u64) as usize;
        img.read_at(&mut buf[..n], off)?;
        img.map(off, 1 << 20)?;
    }
    img.map(0, size)?;
    let _ = img.describe();
    Ok(())
}

fn expect_corrupt(path: &Path, what: &str) {
    let r = std::panic::catch_unwind(|| exercise(path, None));
    match r {
        Ok(Err(Error::Corrupt { .. } | Error::NotSupported(_))) => {}
        Ok(Err(e)) => panic!("{what}: unexpected error kind {e}"),
        Ok(Ok(())) => panic!("{what}: corrupt image accepted"),
        Err(_) => panic!("{what}: reader panicked"),
    }
}

#[test]
fn corrupt_headers_are_errors() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let imgs = sample_images(d);
    let plain = std::fs::read(&imgs[1]).unwrap();
    let bad = d.join("bad.qcow2");
    let mutate = |f: &dyn Fn(&mut Vec<u8>), what: &str| {
        let mut b = plain.clone();
        f(&mut b);
        std::fs::write(&bad, &b).unwrap();
        expect_corrupt(&bad, what);
    };
    let len = plain.len() as u64;
    mutate(&|b| put_be64(b, 40, len + 512), "L1 offset past EOF");
    mutate(&|b| put_be64(b, 40, 513), "L1 offset unaligned");
    mutate(&|b| put_be32(b, 36, u32::MAX), "huge l1_size");
    mutate(&|b| put_be32(b, 60, u32::MAX), "huge snapshot count");
    mutate(&|b| put_be32(b, 60, 1000), "snapshot count past EOF");
    mutate(&|b| put_be64(b, 64, len * 2), "snapshot table past EOF");
    mutate(&|b| put_be64(b, 48, len * 4), "refcount table past EOF");
    mutate(&|b| put_be32(b, 20, 40), "cluster_bits 40");
    mutate(&|b| put_be64(b, 24, u64::MAX), "absurd virtual size");
    mutate(&|b| b.truncate(50), "truncated header");
    mutate(&|b| put_be64(b, 72, 1 << 20), "unknown incompatible bit");
    mutate(&|b| put_be32(b, 32, 1), "AES encryption");
    mutate(
        &|b| {
            let l1 = be64(b, 40) as usize;
            let l2 = be64(b, l1) & 0x00ff_ffff_ffff_fe00;
            put_be64(b, l1, (l2 + len * 8) | (1 << 63));
        },
        "L2 table past EOF",
    );
    mutate(
        &|b| {
            let l1 = be64(b, 40) as usize;
            let l2 = (be64(b, l1) & 0x00ff_ffff_ffff_fe00) as usize;
            put_be64(b, l2, (len * 8) | (1 << 63));
        },
        "data cluster past EOF",
    );
    // Truncation in the middle of metadata.
    let mut b = plain.clone();
    b.truncate(plain.len() / 2);
    std::fs::write(&bad, &b).unwrap();
    let r = std::panic::catch_unwind(|| exercise(&bad, None));
    assert!(r.is_ok(), "truncated file: panic");

    // A bad compressed descriptor: point every compressed entry past EOF / at garbage.
    let comp = std::fs::read(&imgs[0]).unwrap();
    let l1 = be64(&comp, 40) as usize;
    let l2 = (be64(&comp, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let mut b = comp.clone();
    put_be64(&mut b, l2, (1 << 62) | (comp.len() as u64 * 2));
    std::fs::write(&bad, &b).unwrap();
    expect_corrupt(&bad, "compressed descriptor past EOF");
    let mut b = comp.clone();
    put_be64(&mut b, l2, 1 << 62); // header bytes are not deflate data
    std::fs::write(&bad, &b).unwrap();
    expect_corrupt(&bad, "compressed descriptor at garbage");
}

#[test]
fn backing_chain_loop_is_an_error() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    create(d, "a.qcow2", "cluster_size=4096", "1M");
    qemu_img(
        d,
        &[
            "create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", "b.qcow2",
        ],
    );
    // Point a at b with an unsafe rebase: a -> b -> a.
    qemu_img(
        d,
        &["rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", "a.qcow2"],
    );
    let c = cache();
    match image::open(&d.join("b.qcow2"), None, None, &c) {
        Err(Error::Corrupt { what, .. }) => assert!(what.contains("loop"), "{what}"),
        Err(e) => panic!("wrong error {e}"),
        Ok(_) => panic!("loop opened"),
    }
    // A self-loop too.
    create(d, "self.qcow2", "cluster_size=4096", "1M");
    qemu_img(
        d,
        &[
            "rebase",
            "-u",
            "-b",
            "self.qcow2",
            "-F",
            "qcow2",
            "self.qcow2",
        ],
    );
    assert!(image::open(&d.join("self.qcow2"), None, None, &c).is_err());
}

/// Deterministic "mutate a real header" loop: CI's cheap stand-in for cargo-fuzz.
#[test]
fn mutated_images_never_panic() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let imgs = sample_images(d);
    let originals: Vec<Vec<u8>> = imgs.iter().map(|p| std::fs::read(p).unwrap()).collect();
    let bad = d.join("m.qcow2");
    let mut x: u64 = 0x1234_5678_9abc_def1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let iterations = 3000;
    let mut errors = 0;
    for i in 0..iterations {
        let orig = &originals[i % originals.len()];
        let mut b = orig.clone();
        // Metadata lives in the first clusters and wherever L1/L2/snapshot tables point.
        let hot: Vec<usize> = [0usize, be64(orig, 40) as usize, be64(orig, 64) as usize]
            .into_iter()
            .chain(
                (be64(orig, 40) as usize..)
                    .take(1)
                    .map(|l1| (be64(orig, l1) & 0xffff_ffff_fe00) as usize),
            )
            .filter(|&o| o < orig.len())
            .collect();
        for _ in 0..1 + next() % 4 {
            let base = hot[(next() % hot.len() as u64) as usize];
            let at = (base + (next() % 512) as usize).min(b.len() - 1);
            match next() % 4 {
                0 => b[at] = next() as u8,
                1 => b[at] ^= 1 << (next() % 8),
                2 => b[at] = 0xff,
                _ => b[at] = 0,
            }
        }
        if next() % 16 == 0 {
            let keep = (next() % b.len() as u64) as usize;
            b.truncate(keep);
        }
        std::fs::write(&bad, &b).unwrap();
        let snap = if i % 7 == 0 { Some("snap") } else { None };
        match std::panic::catch_unwind(|| exercise(&bad, snap)) {
            Ok(Ok(())) => {}
            Ok(Err(_)) => errors += 1,
            Err(_) => {
                std::fs::write(d.join("../panic.qcow2"), &b).ok();
                panic!("iteration {i}: reader panicked (image saved as panic.qcow2)");
            }
        }
    }
    assert!(errors > 0, "no mutation was ever detected");
}

#[test]
fn qcow2_preallocation_bitmaps_and_mixed_chains() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    for (name, opts) in [
        ("pm.qcow2", "preallocation=metadata,cluster_size=4096"),
        ("pf.qcow2", "preallocation=falloc"),
        ("x2m.qcow2", "extended_l2=on,cluster_size=2M"),
    ] {
        create(d, name, opts, "4M");
        qemu_io(
            d,
            "qcow2",
            name,
            &["write -P 1 100k 10k", "write -z 1M 70k", "write -P 2 3M 1k"],
        );
        check(d, name, None);
    }
    // A persistent dirty bitmap adds a header extension we do not use.
    qemu_img(d, &["bitmap", "--add", "pm.qcow2", "b0"]);
    check(d, "pm.qcow2", None);
    // Compressed qcow2 base, extended-L2 middle, v2 top: each layer different.
    sparse_raw(&d.join("cb-src.raw"), 4 << 20, &[(0, 3 << 20)], 9);
    qemu_img(
        d,
        &[
            "convert",
            "-q",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "compression_type=zstd",
            "cb-src.raw",
            "cbase.qcow2",
        ],
    );
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on,cluster_size=16k",
            "-b",
            "cbase.qcow2",
            "-F",
            "qcow2",
            "cmid.qcow2",
        ],
    );
    qemu_io(
        d,
        "qcow2",
        "cmid.qcow2",
        &["write -P 3 1k 1k", "write -z 20k 1k", "write -P 4 2M 100k"],
    );
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10,cluster_size=512",
            "-b",
            "cmid.qcow2",
            "-F",
            "qcow2",
            "ctop.qcow2",
        ],
    );
    qemu_io(
        d,
        "qcow2",
        "ctop.qcow2",
        &["write -P 5 10k 1k", "write -P 6 2100k 3k"],
    );
    check(d, "ctop.qcow2", None);
    // Internal snapshot of an overlay: unallocated reads still go to the backing file.
    qemu_img(d, &["snapshot", "-c", "snap", "ctop.qcow2"]);
    qemu_io(d, "qcow2", "ctop.qcow2", &["write -P 7 0 1M"]);
    check(d, "ctop.qcow2", Some("snap"));
    check(d, "ctop.qcow2", None);
}

#[test]
fn backing_chain_too_deep_is_an_error() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    create(d, "c0.qcow2", "cluster_size=4096", "64k");
    for i in 1..=70 {
        let (b, n) = (format!("c{}.qcow2", i - 1), format!("c{i}.qcow2"));
        qemu_img(
            d,
            &["create", "-q", "-f", "qcow2", "-b", &b, "-F", "qcow2", &n],
        );
    }
    let c = cache();
    assert!(image::open(&d.join("c60.qcow2"), None, None, &c).is_ok());
    match image::open(&d.join("c70.qcow2"), None, None, &c) {
        Err(Error::Corrupt { what, .. }) => assert!(what.contains("deeper"), "{what}"),
        Err(e) => panic!("wrong error {e}"),
        Ok(_) => panic!("71-deep chain opened"),
    }
}

/// More extents than one `map` call returns: callers must be able to loop.
#[test]
fn map_of_many_extents_stops_early_and_continues() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let pieces: Vec<(u64, usize)> = (0..5000u64).map(|i| (i * 1024, 512)).collect();
    sparse_raw(&d.join("stripes.raw"), 5000 * 1024, &pieces, 10);
    qemu_img(
        d,
        &[
            "convert",
            "-q",
            "-S",
            "512",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=512",
            "stripes.raw",
            "stripes.qcow2",
        ],
    );
    let img = check(d, "stripes.qcow2", None);
    let first = img.map(0, img.size()).unwrap();
    let all = our_map(img.as_ref());
    assert!(all.len() > 5000, "only {} extents", all.len());
    assert!(
        first.len() < all.len(),
        "one call returned all {} extents",
        first.len()
    );
}

/// Several threads share one image and one small cache (forcing evictions) and still read right.
#[test]
fn concurrent_small_reads_share_the_cache() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    sparse_raw(&d.join("cc.raw"), 4 << 20, &[(0, 4 << 20)], 11);
    qemu_img(
        d,
        &[
            "convert",
            "-q",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "compression_type=zstd",
            "cc.raw",
            "cc.qcow2",
        ],
    );
    let want = Arc::new(std::fs::read(d.join("cc.raw")).unwrap());
    let c = Arc::new(BlockCache::new(256 << 10));
    let img = image::open(&d.join("cc.qcow2"), None, None, &c).unwrap();
    let threads: Vec<_> = (0..4u64)
        .map(|tid| {
            let (img, want) = (img.clone(), want.clone());
            std::thread::spawn(move || {
                let mut x = 0x9E37_79B9u64 + tid;
                let mut buf = vec![0u8; 4096];
                for _ in 0..2000 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let off = (x % ((4 << 20) - 4096)) as usize;
                    img.read_at(&mut buf, off as u64).unwrap();
                    assert_eq!(&buf[..], &want[off..off + 4096], "thread {tid} at {off:#x}");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert!(c.used() <= 256 << 10);
}

/// Parallels images as `qemu-img create -f parallels` makes them and `qemu-io` writes them
/// (v2, "WithouFreSpacExt"), and the same bytes relabelled as v1 ("WithoutFreeSpace": BAT in
/// sectors): every byte and the map equal QEMU's own parallels driver.
#[test]
fn parallels_images_match_qemu() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    for (name, cs, size) in [
        ("c1m.hds", 1u64 << 20, "8M"),
        ("c64k.hds", 64 << 10, "4M"),
        ("c4k.hds", 4 << 10, "4M"),
        ("odd.hds", 64 << 10, "3000000"),
    ] {
        qemu_img(
            d,
            &[
                "create",
                "-q",
                "-f",
                "parallels",
                "-o",
                &format!("cluster_size={cs}"),
                name,
                size,
            ],
        );
        let w = |off: u64, len: u64, p: u8| format!("write -P {p:#x} {off} {len}");
        let cmds = [
            w(0, cs + 4096, 0x11),
            w(cs * 2 + 512, 1024, 0x22),
            w((2 << 20) + 100, 70000, 0x33),
            w(2_900_000, 4096, 0x44),
        ];
        let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
        qemu_io(d, "parallels", name, &cmds);
        let img = check(d, name, None);
        assert!(
            img.describe().starts_with("parallels v2"),
            "{}",
            img.describe()
        );
    }
    // v1: same data, magic "WithoutFreeSpace", BAT entries in sectors instead of clusters.
    let mut b = std::fs::read(d.join("c64k.hds")).unwrap();
    b[..16].copy_from_slice(b"WithoutFreeSpace");
    let tracks = u32::from_le_bytes(b[28..32].try_into().unwrap());
    let entries = u32::from_le_bytes(b[32..36].try_into().unwrap()) as usize;
    for i in 0..entries {
        let at = 64 + i * 4;
        let v = u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
        b[at..at + 4].copy_from_slice(&(v * tracks).to_le_bytes());
    }
    std::fs::write(d.join("v1.hds"), &b).unwrap();
    let img = check(d, "v1.hds", None);
    assert!(
        img.describe().starts_with("parallels v1"),
        "{}",
        img.describe()
    );
}

/// A ploop chain (a delta over a base) reads as QEMU reads the parallels node over its backing.
#[test]
fn ploop_delta_chain_matches_qemu() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    qemu_img(d, &["create", "-q", "-f", "parallels", "base.hds", "8M"]);
    qemu_io(
        d,
        "parallels",
        "base.hds",
        &["write -P 0x61 0 3M", "write -P 0x63 6M 1M"],
    );
    qemu_img(d, &["create", "-q", "-f", "parallels", "top.hds", "8M"]);
    qemu_io(
        d,
        "parallels",
        "top.hds",
        &["write -P 0x62 1M 1M", "write -P 0x64 5M 512k"],
    );
    let spec = r#"json:{"driver":"parallels","file":{"driver":"file","filename":"top.hds"},"backing":{"driver":"parallels","file":{"driver":"file","filename":"base.hds"}}}"#;
    qemu_img(d, &["convert", "-O", "raw", spec, "ref.raw"]);
    let want = std::fs::read(d.join("ref.raw")).unwrap();
    let base: Arc<dyn BlockImage> =
        Arc::new(image::parallels::ParallelsImage::open(&d.join("base.hds"), None).unwrap());
    let top = image::parallels::ParallelsImage::open(&d.join("top.hds"), Some(base)).unwrap();
    for chunk in [1 << 20, 4096, 12345] {
        assert!(
            read_all(&top, chunk) == want,
            "chain differs with {chunk}-byte reads"
        );
    }
    assert_eq!(our_map(&top), qemu_map(d, spec));
}

/// Damaged BATs and headers are errors naming the place, never a panic or a wrong byte.
#[test]
fn parallels_corrupt_bat_is_an_error() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "parallels",
            "-o",
            "cluster_size=65536",
            "p.hds",
            "1M",
        ],
    );
    qemu_io(d, "parallels", "p.hds", &["write -P 1 0 128k"]);
    let good = std::fs::read(d.join("p.hds")).unwrap();
    let len = good.len() as u32;
    for (what, at, value) in [
        ("BAT entry past the end of the file", 64, len / 65536 + 10),
        ("BAT entry at u32::MAX", 68, u32::MAX),
        ("BAT entry inside the header", 64, 0),
    ] {
        let mut b = good.clone();
        if value == 0 {
            // v1 with a BAT entry pointing at sector 0: the header itself.
            b[..16].copy_from_slice(b"WithoutFreeSpace");
            b[at..at + 4].copy_from_slice(&1u32.to_le_bytes());
        } else {
            b[at..at + 4].copy_from_slice(&value.to_le_bytes());
        }
        let path = d.join("bad.hds");
        std::fs::write(&path, &b).unwrap();
        let img = image::open(&path, None, None, &cache()).unwrap();
        let mut buf = vec![0u8; 256 << 10];
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| img.read_at(&mut buf, 0)));
        match r {
            Ok(Err(e @ Error::Corrupt { .. })) => {
                let msg = e.to_string();
                assert!(msg.contains("BAT entry"), "{what}: {msg}");
            }
            Ok(other) => panic!("{what}: expected a corrupt-image error, got {other:?}"),
            Err(_) => panic!("{what}: reader panicked"),
        }
    }
    for (what, at, bytes) in [
        ("zero cluster size", 28, 0u32.to_le_bytes()),
        ("BAT too short for the disk", 32, 1u32.to_le_bytes()),
        ("version 3", 16, 3u32.to_le_bytes()),
    ] {
        let mut b = good.clone();
        b[at..at + 4].copy_from_slice(&bytes);
        let path = d.join("bad.hds");
        std::fs::write(&path, &b).unwrap();
        match image::open(&path, None, None, &cache()) {
            Err(Error::Corrupt { .. }) => {}
            other => panic!(
                "{what}: expected a corrupt-image error, got {:?}",
                other.map(|i| i.describe())
            ),
        }
    }
}

//! `<snap>/since/<older>/`: changed extents between snapshots.
//!
//! A seeded property loop on the core: random writes, zero-writes, discards (and compressed
//! writes on qcow2) through qemu-io between snapshots of (a) an external qcow2 chain,
//! (b) internal qcow2 snapshots, (c) an RBD image on the loopback cluster. For every pair
//! (older, newer) applying the reported extents, with newer's bytes, to a copy of older gives
//! exactly newer (the references are `qemu-img convert` / `rbd export`), extents marked zero
//! read as zeros, and every reported granule (cluster, 4 KiB for RBD) was touched by an
//! operation between the two. Then the same through a real mount with `cp --sparse=always`,
//! and the backup tools people use (tar, rsync, restic, borg) copying snapshots out and back.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use common::{run, Mount, BIN};
use snapfs::image::changes::{changed_extents, Change, Changes, SinceImage};
use snapfs::image::{self, BlockCache, BlockImage};

const SIZE: u64 = 24 << 20;
const CLUSTER: u64 = 64 << 10;

fn rng(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

/// One round of random qemu-io commands; returns them and the byte ranges they touch.
/// Compressed writes go to cluster `compressed_slot` (never written otherwise, so QEMU
/// accepts them).
fn random_ops(seed: &mut u64, compressed_slot: Option<u64>) -> (Vec<String>, Vec<(u64, u64)>) {
    let mut cmds = Vec::new();
    let mut touched = Vec::new();
    let limit = SIZE - 8 * CLUSTER; // the last clusters are for compressed writes
    for _ in 0..(2 + rng(seed) % 6) {
        let off = rng(seed) % (limit / 4096) * 4096;
        let len = ((1 + rng(seed) % 96) * 4096).min(limit - off);
        let cmd = match rng(seed) % 4 {
            0 | 1 => format!("write -P {} {off} {len}", 1 + rng(seed) % 250),
            2 => format!("write -z {off} {len}"),
            _ => format!("discard {off} {len}"),
        };
        cmds.push(cmd);
        touched.push((off, off + len));
    }
    if let Some(slot) = compressed_slot {
        let off = limit + slot * CLUSTER;
        cmds.push(format!(
            "write -c -P {} {off} {CLUSTER}",
            1 + rng(seed) % 250
        ));
        touched.push((off, off + CLUSTER));
    }
    (cmds, touched)
}

fn qemu_io(fmt: &str, target: &str, cmds: &[String]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", fmt]);
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    run(c.arg(target));
}

/// Check one pair: apply `ch` (bytes from `newer`) to `older`, compare with `newer`;
/// reported granules must meet `touched`. Returns (reported bytes, truly differing bytes).
fn check_pair(
    what: &str,
    ch: &Changes,
    since: &SinceImage,
    older: &[u8],
    newer: &[u8],
    touched: &[(u64, u64)],
    granule: u64,
) -> (u64, u64) {
    let mut applied = older.to_vec();
    applied.resize(newer.len(), 0);
    let mut last_end = 0;
    for c in &ch.extents {
        assert!(c.offset >= last_end, "{what}: extents unsorted/overlapping");
        last_end = c.offset + c.length;
        assert!(
            last_end <= newer.len() as u64,
            "{what}: extent past the end"
        );
        let (s, e) = (c.offset as usize, (c.offset + c.length) as usize);
        if c.zero {
            assert!(
                newer[s..e].iter().all(|&b| b == 0),
                "{what}: zero extent at {s} holds data"
            );
        }
        let mut buf = vec![0xeeu8; e - s];
        since.read_at(&mut buf, c.offset).expect("read since");
        assert!(
            buf == newer[s..e],
            "{what}: since/ bytes at {s} differ from newer"
        );
        applied[s..e].copy_from_slice(&newer[s..e]);
    }
    if let Some(i) = (0..newer.len()).find(|&i| applied[i] != newer[i]) {
        panic!(
            "{what}: a change at byte {i} was missed ({} extents)",
            ch.extents.len()
        );
    }
    // Over-report: each granule of a reported extent meets a range touched in between.
    for c in &ch.extents {
        let mut g = c.offset / granule * granule;
        while g < c.offset + c.length {
            let ge = g + granule;
            assert!(
                touched.iter().any(|&(s, e)| s < ge && e > g),
                "{what}: granule {g}..{ge} of {c:?} reported but nothing touched it: {touched:?}"
            );
            g = ge;
        }
    }
    let reported = ch.bytes();
    let differs = older.iter().zip(newer).filter(|(a, b)| a != b).count() as u64;
    (reported, differs)
}

/// A new qcow2 overlay `next` over `top` (format `fmt`), named relative to it.
fn overlay(top: &Path, fmt: &str, next: &Path) {
    run(Command::new("qemu-img").args([
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        top.file_name().and_then(|n| n.to_str()).expect("name"),
        "-F",
        fmt,
        next.to_str().expect("utf8"),
    ]));
}

fn read_file(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

fn cache() -> Arc<BlockCache> {
    Arc::new(BlockCache::new(16 << 20))
}

/// Snapshots (file, reference raw bytes, ranges touched since the previous one).
struct State {
    image: Arc<dyn BlockImage>,
    raw: Vec<u8>,
    touched: Vec<(u64, u64)>,
}

/// Every pair (i < j) of `states`.
fn check_all_pairs(what: &str, states: &[State], method: &str, granule: u64) {
    let (mut rep, mut diff) = (0, 0);
    for j in 1..states.len() {
        for i in 0..j {
            let ch = changed_extents(states[j].image.as_ref(), Some(states[i].image.as_ref()))
                .expect("changed extents");
            assert_eq!(ch.method, method, "{what}: s{i}..s{j}");
            let touched: Vec<(u64, u64)> = states[i + 1..=j]
                .iter()
                .flat_map(|s| s.touched.iter().copied())
                .collect();
            let ch = Arc::new(ch);
            let since = SinceImage::new(states[j].image.clone(), ch.clone());
            let (r, d) = check_pair(
                &format!("{what} s{i}..s{j}"),
                &ch,
                &since,
                &states[i].raw,
                &states[j].raw,
                &touched,
                granule,
            );
            rep += r;
            diff += d;
        }
    }
    eprintln!(
        "{what}: reported {rep} bytes for {diff} differing bytes over all pairs (over-report {:.2}x)",
        rep as f64 / diff.max(1) as f64
    );
}

#[test]
fn changed_extents_of_internal_qcow2_snapshots_rebuild_every_newer_snapshot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("d.qcow2");
    let p = img.to_str().expect("utf8");
    run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", p, &SIZE.to_string()]));
    let mut seed = 0x1515_0001u64;
    let c = cache();
    let mut states = Vec::new();
    for k in 0..5u64 {
        let (cmds, touched) = random_ops(&mut seed, Some(k));
        qemu_io("qcow2", p, &cmds);
        let name = format!("s{k}");
        run(Command::new("qemu-img").args(["snapshot", "-c", &name, p]));
        let raw = dir.path().join(format!("{name}.raw"));
        run(Command::new("qemu-img").args([
            "convert",
            "-l",
            &format!("snapshot.name={name}"),
            "-O",
            "raw",
            p,
            raw.to_str().expect("utf8"),
        ]));
        states.push(State {
            image: image::open(&img, None, Some(&name), &c).expect("open snapshot"),
            raw: read_file(&raw),
            touched,
        });
    }
    check_all_pairs("internal qcow2", &states, "qcow2 tables", CLUSTER);
}

#[test]
fn changed_extents_of_an_external_qcow2_chain_rebuild_every_newer_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut seed = 0x1515_0002u64;
    let c = cache();
    // Layer 0 is a raw base, as a flat-file disk of a libvirt domain.
    let base = dir.path().join("l0.img");
    std::fs::File::create(&base)
        .and_then(|f| f.set_len(SIZE))
        .expect("base");
    let mut states = Vec::new();
    let mut top = base.clone();
    let mut fmt = "raw";
    for k in 0..5u64 {
        let (cmds, touched) = random_ops(&mut seed, (fmt == "qcow2").then_some(k));
        qemu_io(fmt, top.to_str().expect("utf8"), &cmds);
        // The snapshot freezes `top`; a new overlay takes the writes from here on.
        let raw = dir.path().join(format!("s{k}.raw"));
        run(Command::new("qemu-img").args([
            "convert",
            "-O",
            "raw",
            top.to_str().expect("utf8"),
            raw.to_str().expect("utf8"),
        ]));
        states.push(State {
            image: image::open(&top, None, None, &c).expect("open layer"),
            raw: read_file(&raw),
            touched,
        });
        let next = dir.path().join(format!("l{}.qcow2", k + 1));
        overlay(&top, fmt, &next);
        top = next;
        fmt = "qcow2";
    }
    check_all_pairs("qcow2 chain", &states, "qcow2 chain", CLUSTER);

    // Unrelated files (a copy of each state) fall back to comparing content, still exact.
    let copies: Vec<State> = states
        .iter()
        .enumerate()
        .map(|(k, s)| {
            let copy = dir.path().join(format!("copy{k}.raw"));
            std::fs::write(&copy, &s.raw).expect("copy");
            State {
                image: image::open(&copy, None, None, &c).expect("open copy"),
                raw: s.raw.clone(),
                touched: s.touched.clone(),
            }
        })
        .collect();
    check_all_pairs("raw copies", &copies, "content", 64 << 10);
}

/// Whether `[s, e)` meets a reported extent; `Some(zero)` of the first one it meets.
fn reported(ch: &Changes, s: u64, e: u64) -> Option<bool> {
    ch.extents
        .iter()
        .find(|c| c.offset < e && c.offset + c.length > s)
        .map(|c| c.zero)
}

/// The chain case's zeros (issue 15's 2.00x over-report): an overlay's zero-write or discard
/// over an area that already read as zeros changes nothing and is not reported; over an area
/// that held data it is a change, reported with `zero: true`. Checked against the bytes (each
/// state converted by qemu-img) for every pair.
#[test]
fn external_chain_zeros_over_zeros_are_not_reported_and_data_to_zero_is() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = cache();
    let cl = |n: u64| n * CLUSTER;
    let base = dir.path().join("l0.img");
    std::fs::File::create(&base)
        .and_then(|f| f.set_len(SIZE))
        .expect("base");
    // Per state: the qemu-io commands, in the raw base first, then each in a new overlay.
    let steps: [Vec<String>; 4] = [
        // s0: data in clusters 0..4; 10.. reads as zeros.
        vec![format!("write -P 7 0 {}", cl(4))],
        // s1: zeros over zeros (10, 20..22), data to zeros (0 by write -z, 1 by discard),
        // a zero-write straddling data and zeros (3..5), new data (30).
        vec![
            format!("write -z {} {}", cl(10), cl(1)),
            format!("discard {} {}", cl(20), cl(2)),
            format!("write -z {} {}", cl(0), cl(1)),
            format!("discard {} {}", cl(1), cl(1)),
            format!("write -z {} {}", cl(3), cl(2)),
            format!("write -P 9 {} {}", cl(30), cl(1)),
        ],
        // s2: data where zeros were (10).
        vec![format!("write -P 5 {} {}", cl(10), cl(1))],
        // s3: zeros again over 10 (data -> zero since s2, zero -> zero since s1), and over 0
        // and 1 (zero clusters of s1 over the base's data: zero -> zero since s1).
        vec![
            format!("write -z {} {}", cl(10), cl(1)),
            format!("write -z {} {}", cl(0), cl(1)),
            format!("discard {} {}", cl(1), cl(1)),
        ],
    ];
    let mut states: Vec<State> = Vec::new();
    let mut top = base.clone();
    let mut fmt = "raw";
    for (k, cmds) in steps.iter().enumerate() {
        qemu_io(fmt, top.to_str().expect("utf8"), cmds);
        let raw = dir.path().join(format!("s{k}.raw"));
        run(Command::new("qemu-img").args([
            "convert",
            "-O",
            "raw",
            top.to_str().expect("utf8"),
            raw.to_str().expect("utf8"),
        ]));
        states.push(State {
            image: image::open(&top, None, None, &c).expect("open layer"),
            raw: read_file(&raw),
            touched: Vec::new(),
        });
        let next = dir.path().join(format!("l{}.qcow2", k + 1));
        overlay(&top, fmt, &next);
        top = next;
        fmt = "qcow2";
    }
    let pair = |i: usize, j: usize| -> Changes {
        let ch = changed_extents(states[j].image.as_ref(), Some(states[i].image.as_ref()))
            .expect("changed extents");
        assert_eq!(ch.method, "qcow2 chain", "s{i}..s{j}");
        let ch2 = Changes {
            extents: ch.extents.clone(),
            method: ch.method,
            granularity: ch.granularity,
        };
        let since = SinceImage::new(states[j].image.clone(), Arc::new(ch2));
        // Exactness (nothing missed, zero extents read zeros) on the bytes; `touched` is not
        // used here: every range reported must hold a real difference instead (below).
        let all = [(0, SIZE)];
        let (rep, diff) = check_pair(
            &format!("zeros s{i}..s{j}"),
            &ch,
            &since,
            &states[i].raw,
            &states[j].raw,
            &all,
            CLUSTER,
        );
        for x in &ch.extents {
            for g in (x.offset / CLUSTER)..(x.offset + x.length).div_ceil(CLUSTER) {
                let (s, e) = (g * CLUSTER, (g + 1) * CLUSTER);
                assert!(
                    states[i].raw[s as usize..e as usize] != states[j].raw[s as usize..e as usize],
                    "s{i}..s{j}: cluster {g} reported ({x:?}) but reads the same in both"
                );
            }
        }
        eprintln!("zeros s{i}..s{j}: reported {rep} bytes, {diff} differ");
        ch
    };
    // s0 -> s1: zeros over zeros dropped; data -> zero kept as zero; new data kept.
    let ch = pair(0, 1);
    assert_eq!(reported(&ch, cl(10), cl(11)), None, "zero-write over zeros");
    assert_eq!(reported(&ch, cl(20), cl(22)), None, "discard over zeros");
    assert_eq!(reported(&ch, cl(0), cl(1)), Some(true), "data -> write -z");
    assert_eq!(reported(&ch, cl(1), cl(2)), Some(true), "data -> discard");
    assert_eq!(
        reported(&ch, cl(3), cl(4)),
        Some(true),
        "data -> zero (straddling)"
    );
    assert_eq!(
        reported(&ch, cl(4), cl(5)),
        None,
        "straddling zero-write's zero half"
    );
    assert_eq!(reported(&ch, cl(30), cl(31)), Some(false), "new data");
    // s1 -> s3: cluster 10 went zero -> data -> zero; 0 and 1 zero -> zero (s1's zero
    // clusters over the base's data): none changed.
    let ch = pair(1, 3);
    assert_eq!(ch.bytes(), 0, "s1..s3 reported {:?}", ch.extents);
    // s2 -> s3: 10 data -> zero.
    let ch = pair(2, 3);
    assert_eq!(
        reported(&ch, cl(10), cl(11)),
        Some(true),
        "s2..s3 data -> zero"
    );
    // s0 -> s3: the base's data at 0 and 1 now reads zeros.
    let ch = pair(0, 3);
    assert_eq!(
        reported(&ch, cl(0), cl(2)),
        Some(true),
        "s0..s3 data -> zero"
    );
    assert_eq!(reported(&ch, cl(10), cl(11)), None, "s0..s3 zero -> zero");
    for j in 1..states.len() {
        for i in 0..j {
            pair(i, j);
        }
    }
}

const POOL: &str = "rbd";

fn ceph() -> Option<PathBuf> {
    let conf = common::ceph_conf();
    if common::ceph_answers(&conf, POOL) {
        return Some(conf);
    }
    assert!(
        std::env::var("SNAPFS_REQUIRE_CEPH").map_or(true, |v| v != "1"),
        "SNAPFS_REQUIRE_CEPH=1 but no Ceph cluster answers at {}",
        conf.display()
    );
    eprintln!("SKIP: no Ceph cluster at {}", conf.display());
    None
}

fn rbd(conf: &Path, args: &[&str]) -> String {
    run(Command::new("rbd").arg("-c").arg(conf).args(args))
}

/// An RBD image removed (with its snapshots) on drop.
struct RbdImg {
    conf: PathBuf,
    spec: String,
}

impl Drop for RbdImg {
    fn drop(&mut self) {
        common::remove_rbd_image(&self.conf, &self.spec);
    }
}

fn rbd_image(conf: &Path, name: &str) -> RbdImg {
    let spec = format!("{POOL}/{name}");
    common::remove_rbd_image(conf, &spec);
    rbd(
        conf,
        &["create", "--size", &format!("{}M", SIZE >> 20), &spec],
    );
    RbdImg {
        conf: conf.to_path_buf(),
        spec,
    }
}

#[test]
fn changed_extents_of_rbd_snapshots_rebuild_every_newer_snapshot() {
    let Some(conf) = ceph() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let img = rbd_image(&conf, "issue-15-since-core");
    let target = format!("rbd:{}:conf={}", img.spec, conf.display());
    let cluster = snapfs::ceph::Cluster::connect(
        &conf,
        "admin",
        snapfs::ceph::Timeouts {
            op: std::time::Duration::from_secs(30),
            connect: std::time::Duration::from_secs(30),
        },
    )
    .expect("connect");
    let pool = cluster.pool(POOL).expect("pool");
    let c = cache();
    let mut seed = 0x1515_0003u64;
    let mut states = Vec::new();
    for k in 0..5u64 {
        let (cmds, touched) = random_ops(&mut seed, None);
        qemu_io("raw", &target, &cmds);
        let name = format!("s{k}");
        rbd(&conf, &["snap", "create", &format!("{}@{name}", img.spec)]);
        let raw = dir.path().join(format!("{name}.raw"));
        rbd(
            &conf,
            &[
                "export",
                "--no-progress",
                &format!("{}@{name}", img.spec),
                raw.to_str().expect("utf8"),
            ],
        );
        let opened = pool
            .open("issue-15-since-core", Some(&name), false)
            .expect("open snapshot");
        states.push(State {
            image: Arc::new(
                snapfs::image::rbd::RbdImage::new(opened, c.clone(), 0, false).expect("rbd image"),
            ),
            raw: read_file(&raw),
            touched,
        });
    }
    // RBD reports from where an object's data ended before (or the object's start) to the
    // end of a write: the over-report is bounded by the 4 MiB object.
    check_all_pairs("rbd", &states, "rbd diff", 4 << 20);
    // And the extents are exactly `rbd diff --from-snap`'s, merged.
    for j in 1..states.len() {
        for i in 0..j {
            let ch = changed_extents(states[j].image.as_ref(), Some(states[i].image.as_ref()))
                .expect("changed extents");
            let ours = merge_changes(&ch.extents);
            let out = rbd(
                &conf,
                &[
                    "diff",
                    "--format",
                    "json",
                    "--from-snap",
                    &format!("s{i}"),
                    &format!("{}@s{j}", img.spec),
                ],
            );
            let v: serde_json::Value = serde_json::from_str(&out).expect("rbd diff json");
            let mut theirs: Vec<(u64, u64)> = v
                .as_array()
                .expect("array")
                .iter()
                .map(|e| {
                    let o = e["offset"].as_u64().expect("offset");
                    (o, o + e["length"].as_u64().expect("length"))
                })
                .collect();
            theirs.sort();
            let theirs = merge_ranges(theirs);
            assert_eq!(ours, theirs, "s{i}..s{j} vs rbd diff --from-snap");
        }
    }
}

fn merge_ranges(v: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, e) in v {
        match out.last_mut() {
            Some(l) if l.1 >= s => l.1 = l.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

fn merge_changes(v: &[Change]) -> Vec<(u64, u64)> {
    merge_ranges(v.iter().map(|c| (c.offset, c.offset + c.length)).collect())
}

/// Parse `.extents.json`.
fn extents_json(p: &Path) -> Vec<Change> {
    let v: serde_json::Value = serde_json::from_slice(&read_file(p)).expect("extents json");
    v.as_array()
        .expect("array")
        .iter()
        .map(|e| Change {
            offset: e["offset"].as_u64().expect("offset"),
            length: e["length"].as_u64().expect("length"),
            zero: e["zero"].as_bool().expect("zero"),
        })
        .collect()
}

/// Through the mount: `since/` lists the older snapshots; the JSON, SEEK_DATA and st_blocks
/// agree; `cp --sparse=always` of `since/<older>/disk.raw` keeps the holes, and its data
/// applied to the older snapshot's disk.raw gives the newer one.
fn check_since_dir(snaps: &Path, older: &str, newer: &str, scratch: &Path) {
    use std::os::unix::fs::MetadataExt;
    let dir = snaps.join(newer).join("since").join(older);
    let raw = dir.join("disk.raw");
    let ext = extents_json(&dir.join("disk.extents.json"));
    let meta = std::fs::metadata(&raw).expect("stat since disk");
    let newer_disk = snaps.join(newer).join("disk.raw");
    assert_eq!(
        meta.len(),
        std::fs::metadata(&newer_disk).expect("stat").len()
    );
    let total: u64 = ext.iter().map(|c| c.length).sum();
    assert_eq!(
        meta.blocks() * 512,
        total.div_ceil(512) * 512,
        "st_blocks vs JSON"
    );
    // SEEK_DATA/SEEK_HOLE walk = the JSON's extents merged.
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for c in &ext {
        match merged.last_mut() {
            Some(l) if l.1 == c.offset => l.1 += c.length,
            _ => merged.push((c.offset, c.offset + c.length)),
        }
    }
    assert_eq!(common::seek_data_ranges(&raw), merged, "SEEK_DATA vs JSON");
    // cp --sparse=always keeps the holes and the data.
    let out = scratch.join(format!("{newer}-since-{older}.raw"));
    run(Command::new("cp")
        .arg("--sparse=always")
        .arg(&raw)
        .arg(&out));
    let om = std::fs::metadata(&out).expect("stat copy");
    assert_eq!(om.len(), meta.len());
    assert!(
        om.blocks() * 512 <= total + (1 << 20),
        "cp --sparse=always filled holes: {} allocated for {total} changed",
        om.blocks() * 512
    );
    let copy = read_file(&out);
    let mut applied = read_file(&snaps.join(older).join("disk.raw"));
    applied.resize(copy.len(), 0);
    for c in &ext {
        let (s, e) = (c.offset as usize, (c.offset + c.length) as usize);
        applied[s..e].copy_from_slice(&copy[s..e]);
    }
    assert!(
        applied == read_file(&newer_disk),
        "since/{older} applied to {older} is not {newer}"
    );
}

#[test]
fn since_dirs_through_the_mount_qcow2_internal() {
    let base = tempfile::tempdir().expect("tempdir");
    let images = base.path().join("issue15imgs");
    std::fs::create_dir(&images).expect("mkdir");
    let img = images.join("d.qcow2");
    let p = img.to_str().expect("utf8");
    run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", p, &SIZE.to_string()]));
    let mut seed = 0x1515_0004u64;
    for k in 0..3u64 {
        let (cmds, _) = random_ops(&mut seed, None);
        qemu_io("qcow2", p, &cmds);
        run(Command::new("qemu-img").args(["snapshot", "-c", &format!("s{k}"), p]));
    }
    let m = Mount::new(&images);
    let snaps = m.vol("d.qcow2").join(".snapshots");
    assert!(common::ls(&snaps.join("s0")).contains(&"since".to_string()));
    assert!(common::ls(&snaps.join("s0/since")).is_empty());
    assert_eq!(common::ls(&snaps.join("s2/since")), vec!["s0", "s1"]);
    assert_eq!(
        common::ls(&snaps.join("s2/since/s0")),
        vec!["disk.extents.json", "disk.raw", "disk.rbddiff"]
    );
    // A newer snapshot is not "since": ENOENT; writes are EROFS.
    assert_eq!(
        common::errno(std::fs::metadata(snaps.join("s0/since/s2"))),
        libc::ENOENT
    );
    assert_eq!(
        common::errno(std::fs::File::create(snaps.join("s2/since/s0/x"))),
        libc::EROFS
    );
    let scratch = tempfile::tempdir().expect("scratch");
    for (o, n) in [("s0", "s1"), ("s0", "s2"), ("s1", "s2")] {
        check_since_dir(&snaps, o, n, scratch.path());
    }
    assert!(m.log().contains("qcow2 tables"), "log: {}", m.log());
    let _ = BIN;

    // Cross-backend: the qcow2-sourced .rbddiff applied to an RBD image made from s0 gives s2.
    let Some(conf) = ceph() else { return };
    let copy = rbd_image(&conf, "issue-15-since-cross");
    let s0 = snaps.join("s0/disk.raw");
    rbd(&conf, &["rm", "--no-progress", &copy.spec]);
    rbd(
        &conf,
        &[
            "import",
            "--no-progress",
            s0.to_str().expect("utf8"),
            &copy.spec,
        ],
    );
    rbd(&conf, &["snap", "create", &format!("{}@s0", copy.spec)]);
    let diff = snaps.join("s2/since/s0/disk.rbddiff");
    rbd(
        &conf,
        &[
            "import-diff",
            "--no-progress",
            diff.to_str().expect("utf8"),
            &copy.spec,
        ],
    );
    let a = scratch.path().join("cross.raw");
    rbd(
        &conf,
        &[
            "export",
            "--no-progress",
            &format!("{}@s2", copy.spec),
            a.to_str().expect("utf8"),
        ],
    );
    assert!(
        read_file(&a) == read_file(&snaps.join("s2/disk.raw")),
        "qcow2 .rbddiff imported into RBD is not s2"
    );
}

#[test]
fn since_dirs_through_the_mount_rbd() {
    let Some(conf) = ceph() else { return };
    let name = "issue-15-since-mount";
    let img = rbd_image(&conf, name);
    let target = format!("rbd:{}:conf={}", img.spec, conf.display());
    let mut seed = 0x1515_0005u64;
    for k in 0..3u64 {
        let (cmds, _) = random_ops(&mut seed, None);
        qemu_io("raw", &target, &cmds);
        rbd(&conf, &["snap", "create", &format!("{}@s{k}", img.spec)]);
    }
    let m = Mount::with_providers(&["--ceph", conf.to_str().expect("utf8"), "--pool", POOL]);
    let snaps = m
        .mnt
        .join("volumes")
        .join(POOL)
        .join(name)
        .join(".snapshots");
    assert_eq!(common::ls(&snaps.join("s2/since")), vec!["s0", "s1"]);
    let scratch = tempfile::tempdir().expect("scratch");
    for (o, n) in [("s0", "s1"), ("s0", "s2"), ("s1", "s2")] {
        check_since_dir(&snaps, o, n, scratch.path());
    }
    assert!(m.log().contains("rbd diff"), "log: {}", m.log());

    // `rbd import-diff since/s0/disk.rbddiff` onto a copy of s0 gives s2.
    let copy = rbd_image(&conf, "issue-15-since-copy");
    let copy_s0 = scratch.path().join("s0.raw");
    rbd(
        &conf,
        &[
            "export",
            "--no-progress",
            &format!("{}@s0", img.spec),
            copy_s0.to_str().expect("utf8"),
        ],
    );
    rbd(&conf, &["rm", "--no-progress", &copy.spec]);
    rbd(
        &conf,
        &[
            "import",
            "--no-progress",
            copy_s0.to_str().expect("utf8"),
            &copy.spec,
        ],
    );
    rbd(&conf, &["snap", "create", &format!("{}@s0", copy.spec)]);
    let diff = snaps.join("s2/since/s0/disk.rbddiff");
    let size = std::fs::metadata(&diff).expect("stat rbddiff").len();
    assert_eq!(size, read_file(&diff).len() as u64, "stat size of .rbddiff");
    rbd(
        &conf,
        &[
            "import-diff",
            "--no-progress",
            diff.to_str().expect("utf8"),
            &copy.spec,
        ],
    );
    let (a, b) = (scratch.path().join("a.raw"), scratch.path().join("b.raw"));
    rbd(
        &conf,
        &[
            "export",
            "--no-progress",
            &format!("{}@s2", copy.spec),
            a.to_str().expect("utf8"),
        ],
    );
    rbd(
        &conf,
        &[
            "export",
            "--no-progress",
            &format!("{}@s2", img.spec),
            b.to_str().expect("utf8"),
        ],
    );
    assert!(
        read_file(&a) == read_file(&b),
        "import-diff of since/s0/disk.rbddiff is not s2"
    );
}

/// The backup tools people run on snapshot files (issue 15): `tar --sparse`, `rsync --sparse`,
/// restic and borg each copy a whole snapshot disk and a `since/` file out of the mount and back
/// exact, and the sparse-aware ones (all but Debian 12's restic 0.14) keep the `since/` file's holes (allocated bytes at most the
/// changed bytes plus 1 MiB, where a dense copy would take the whole 24 MiB disk).
#[test]
fn backup_tools_copy_a_snapshot_and_a_since_file_out_exact() {
    for tool in ["tar", "rsync", "restic", "borg"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(found, "{tool} missing: scripts/install-deps.sh installs it");
    }
    use std::os::unix::fs::MetadataExt;
    let base = tempfile::tempdir().expect("tempdir");
    let images = base.path().join("issue15tools");
    std::fs::create_dir(&images).expect("mkdir");
    let img = images.join("d.qcow2");
    let p = img.to_str().expect("utf8");
    run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", p, &SIZE.to_string()]));
    let mut seed = 0x1515_7001u64;
    for k in 0..2u64 {
        let (cmds, _) = random_ops(&mut seed, None);
        qemu_io("qcow2", p, &cmds);
        run(Command::new("qemu-img").args(["snapshot", "-c", &format!("s{k}"), p]));
    }
    // The reference for the whole disk is QEMU's own reading of the snapshot.
    let reference = base.path().join("s1.ref.raw");
    run(Command::new("qemu-img").args([
        "convert",
        "-l",
        "snapshot.name=s1",
        "-O",
        "raw",
        p,
        reference.to_str().expect("utf8"),
    ]));
    let m = Mount::new(&images);
    let snap = m.vol("d.qcow2").join(".snapshots/s1");
    let full = snap.join("disk.raw");
    let since = snap.join("since/s0/disk.raw");
    assert!(
        read_file(&full) == read_file(&reference),
        "disk.raw is not s1"
    );
    let since_bytes = read_file(&since);
    let changed: u64 = extents_json(&snap.join("since/s0/disk.extents.json"))
        .iter()
        .map(|c| c.length)
        .sum();
    assert!(changed < SIZE / 2, "the test wants a sparse since/ file");
    let rel = ["disk.raw", "since/s0/disk.raw"];

    // Each tool's restore lands in its own directory; `out` maps a path relative to the
    // snapshot directory to where the tool put it.
    let check = |tool: &str, out: &dyn Fn(&str) -> PathBuf, sparse: bool| {
        assert!(
            read_file(&out(rel[0])) == read_file(&reference),
            "{tool}: the restored disk.raw differs from s1"
        );
        let got = out(rel[1]);
        assert!(
            read_file(&got) == since_bytes,
            "{tool}: the restored since/s0/disk.raw differs"
        );
        let md = std::fs::metadata(&got).expect("stat restored since file");
        assert_eq!(md.len(), SIZE, "{tool}: apparent size");
        if sparse {
            assert!(
                md.blocks() * 512 <= changed + (1 << 20),
                "{tool} filled the holes: {} bytes allocated for {changed} changed",
                md.blocks() * 512
            );
        }
    };
    let work = tempfile::tempdir().expect("work");
    let w = work.path();
    let s = |p: &Path| p.to_str().expect("utf8").to_string();

    // tar --sparse (GNU tar finds the data with SEEK_DATA/SEEK_HOLE).
    let tar = w.join("a.tar");
    let tar_out = w.join("tar");
    std::fs::create_dir(&tar_out).expect("mkdir");
    run(Command::new("tar")
        .args(["--sparse", "-C", &s(&snap), "-cf", &s(&tar)])
        .args(rel));
    run(Command::new("tar").args(["-C", &s(&tar_out), "-xf", &s(&tar)]));
    check("tar --sparse", &|r| tar_out.join(r), true);

    // rsync --sparse, paths kept relative to the snapshot directory.
    let rsync_out = w.join("rsync");
    run(Command::new("rsync")
        .current_dir(&snap)
        .args(["-R", "--sparse"])
        .args(rel)
        .arg(format!("{}/", s(&rsync_out))));
    check("rsync --sparse", &|r| rsync_out.join(r), true);

    // restic (a repository without network, its cache in the work dir).
    let restic = |args: &[&str]| {
        run(Command::new("restic")
            .current_dir(&snap)
            .env("RESTIC_PASSWORD", "snapfs-test")
            .env("RESTIC_CACHE_DIR", w.join("restic-cache"))
            .args(["--quiet", "-r", &s(&w.join("restic-repo"))])
            .args(args))
    };
    restic(&["init"]);
    restic(&["backup", rel[0], rel[1]]);
    let restic_out = w.join("restic");
    // Debian 12's restic 0.14 has no `restore --sparse` (0.15 added it): contents only.
    restic(&["restore", "latest", "--target", &s(&restic_out)]);
    check("restic", &|r| restic_out.join(r), false);

    // borg (an unencrypted repository, its cache and keys in the work dir).
    let borg_repo = w.join("borg-repo");
    let borg = |dir: &Path, args: &[&str]| {
        run(Command::new("borg")
            .current_dir(dir)
            .env("BORG_BASE_DIR", w.join("borg-base"))
            .env("BORG_PASSPHRASE", "")
            .args(args))
    };
    borg(w, &["init", "-e", "none", &s(&borg_repo)]);
    let archive = format!("{}::s1", s(&borg_repo));
    // `--sparse` with the fixed chunker finds the holes with SEEK_DATA/SEEK_HOLE (borg's
    // default content-defined chunks of ~2 MiB would store data and zeros together).
    borg(
        &snap,
        &[
            "create",
            "--sparse",
            "--chunker-params",
            "fixed,65536",
            &archive,
            rel[0],
            rel[1],
        ],
    );
    let borg_out = w.join("borg");
    std::fs::create_dir(&borg_out).expect("mkdir");
    borg(&borg_out, &["extract", "--sparse", &archive]);
    check("borg extract --sparse", &|r| borg_out.join(r), true);
}

//! The core driven without FUSE, over the in-memory provider.

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::provider::memory::MemoryProvider;
use crate::provider::Owner;

fn core(p: Arc<MemoryProvider>) -> SnapFs {
    core_with(p, false)
}

fn core_with(p: Arc<MemoryProvider>, read_only: bool) -> SnapFs {
    let ns = Namespace::new(vec![p], "/mnt/snap".into(), Duration::from_secs(60));
    SnapFs::new(
        ns,
        FsOptions {
            uid: 0,
            gid: 0,
            read_only,
        },
    )
}

fn walk(fs: &SnapFs, path: &str) -> Result<Attr> {
    let mut ino = ROOT;
    let mut last = fs.getattr(ROOT)?;
    for c in path.split('/').filter(|c| !c.is_empty()) {
        last = fs.lookup(ino, c)?;
        ino = last.ino;
    }
    Ok(last)
}

fn names(fs: &SnapFs, path: &str) -> Vec<String> {
    let a = walk(fs, path).expect("walk");
    let fh = fs.opendir(a.ino).expect("opendir").fh;
    let v = fs
        .readdir(fh)
        .expect("readdir")
        .from(0)
        .map(|(_, e)| e.name)
        .filter(|n| n != "." && n != "..")
        .collect();
    fs.release(fh);
    v
}

fn read_all(fs: &SnapFs, path: &str) -> Vec<u8> {
    let a = walk(fs, path).expect("walk");
    let o = fs.open(a.ino, false).expect("open");
    let mut out = Vec::new();
    fs.read(o.fh, 0, 1 << 20, |d| out.extend_from_slice(d))
        .expect("read");
    fs.release(o.fh);
    out
}

fn provider() -> Arc<MemoryProvider> {
    let p = Arc::new(MemoryProvider::default());
    let mut disk = vec![0u8; 64 << 10];
    disk[8192..12288].fill(7);
    p.add_instance("web", &[("vda", disk.clone()), ("vdb", vec![1u8; 4096])]);
    p.add_volume("pool", "vol/with/slashes", disk);
    p
}

#[test]
fn snapshot_lifecycle_through_the_core() {
    let p = provider();
    let fs = core(p.clone());
    let snaps = walk(&fs, "instances/web/.snapshots").unwrap().ino;
    fs.mkdir(snaps, "s1").unwrap();
    assert_eq!(
        names(&fs, "instances/web/.snapshots/s1"),
        ["snapshot.json", "vda.raw", "vdb.raw", "files", "since"]
    );
    p.write_live(&Owner::Instance("web".into()), "vda", 8192, &[9; 16]);
    let bytes = read_all(&fs, "instances/web/.snapshots/s1/vda.raw");
    assert_eq!(bytes[8192], 7, "the snapshot does not see later writes");

    let a = walk(&fs, "instances/web/.snapshots/s1/vda.raw").unwrap();
    assert_eq!(a.stat.size, 64 << 10);
    assert_eq!(a.stat.allocated, 4096);
    let o = fs.open(a.ino, false).unwrap();
    assert_eq!(fs.lseek(o.fh, 0, Whence::Data).unwrap(), 8192);
    assert_eq!(fs.lseek(o.fh, 8192, Whence::Hole).unwrap(), 12288);
    assert_eq!(
        fs.lseek(o.fh, 12288, Whence::Data).unwrap_err().errno(),
        libc::ENXIO
    );
    assert_eq!(
        fs.lseek(o.fh, 64 << 10, Whence::Hole).unwrap_err().errno(),
        libc::ENXIO
    );
    assert_eq!(fs.open(a.ino, true).unwrap_err().errno(), libc::EROFS);

    assert_eq!(fs.mkdir(snaps, "s1").unwrap_err().errno(), libc::EEXIST);
    fs.rename(snaps, "s1", snaps, "s2").unwrap();
    assert_eq!(names(&fs, "instances/web/.snapshots"), ["s2"]);
    fs.rmdir(snaps, "s2").unwrap();
    assert!(names(&fs, "instances/web/.snapshots").is_empty());
    assert_eq!(fs.rmdir(snaps, "s2").unwrap_err().errno(), libc::ENOENT);
}

#[test]
fn backend_names_are_escaped_reversibly() {
    let p = provider();
    let fs = core(p);
    assert_eq!(names(&fs, "volumes/pool"), ["vol%2Fwith%2Fslashes"]);
    let snaps = walk(&fs, "volumes/pool/vol%2Fwith%2Fslashes/.snapshots")
        .unwrap()
        .ino;
    fs.mkdir(snaps, "a%2Fb").unwrap();
    assert_eq!(
        names(&fs, "volumes/pool/vol%2Fwith%2Fslashes/.snapshots"),
        ["a%2Fb"]
    );
    let json = read_all(
        &fs,
        "volumes/pool/vol%2Fwith%2Fslashes/.snapshots/a%2Fb/snapshot.json",
    );
    assert!(String::from_utf8_lossy(&json).contains("\"a/b\""));
}

#[test]
fn concurrent_snapshots_of_one_owner_are_ebusy() {
    let p = Arc::new(MemoryProvider::with_delay(Duration::from_millis(300)));
    p.add_instance("web", &[("vda", vec![0u8; 4096])]);
    p.add_instance("db", &[("vda", vec![0u8; 4096])]);
    let fs = Arc::new(core(p));
    let web = walk(&fs, "instances/web/.snapshots").unwrap().ino;
    let db = walk(&fs, "instances/db/.snapshots").unwrap().ino;
    let f2 = fs.clone();
    let t = std::thread::spawn(move || f2.mkdir(web, "a").map(|_| ()));
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(fs.mkdir(web, "b").unwrap_err().errno(), libc::EBUSY);
    let started = std::time::Instant::now();
    fs.mkdir(db, "c").expect("another instance is not blocked");
    assert!(started.elapsed() < Duration::from_millis(1000));
    t.join().unwrap().unwrap();
    fs.mkdir(web, "b").expect("free again afterwards");
}

/// CloudStack's rule: an instance's snapshot while one of its volumes is being snapshotted,
/// or the reverse, is EBUSY; the keys of [`Provider::storage_keys`] say which volume is under
/// which instance. A volume on other storage is not blocked.
#[test]
fn an_instance_and_its_volume_exclude_each_other() {
    let p = Arc::new(MemoryProvider::with_delay(Duration::from_millis(300)));
    p.add_instance("web", &[("vda", vec![0u8; 4096]), ("vdb", vec![0u8; 4096])]);
    p.add_volume("rbd", "web-vdb", vec![0u8; 4096]);
    p.add_volume("rbd", "other", vec![0u8; 4096]);
    let vol = |n: &str| Owner::Volume {
        pool: "rbd".into(),
        name: n.into(),
    };
    p.set_storage(
        &Owner::Instance("web".into()),
        &["rbd:rbd/web-vda", "rbd:rbd/web-vdb"],
    );
    p.set_storage(&vol("web-vdb"), &["rbd:rbd/web-vdb"]);
    p.set_storage(&vol("other"), &["rbd:rbd/other"]);
    let fs = Arc::new(core(p));
    let web = walk(&fs, "instances/web/.snapshots").unwrap().ino;
    let vdb = walk(&fs, "volumes/rbd/web-vdb/.snapshots").unwrap().ino;
    let other = walk(&fs, "volumes/rbd/other/.snapshots").unwrap().ino;
    for (first, second, n) in [(web, vdb, "1"), (vdb, web, "2")] {
        let f2 = fs.clone();
        let a = format!("a{n}");
        let t = std::thread::spawn(move || f2.mkdir(first, &a).map(|_| ()));
        std::thread::sleep(Duration::from_millis(100));
        let e = fs.mkdir(second, &format!("b{n}")).unwrap_err();
        assert_eq!(e.errno(), libc::EBUSY, "{e}");
        assert!(e.to_string().contains("rbd:rbd/web-vdb"), "{e}");
        fs.mkdir(other, &format!("c{n}"))
            .expect("other storage is not blocked");
        t.join().unwrap().unwrap();
        fs.mkdir(second, &format!("b{n}"))
            .expect("free again afterwards");
    }
}

#[test]
fn launch_by_symlink() {
    let p = provider();
    let fs = core(p);
    let snaps = walk(&fs, "instances/web/.snapshots").unwrap().ino;
    fs.mkdir(snaps, "s1").unwrap();
    let launch = walk(&fs, "launch").unwrap().ino;

    let bad = |t: &str| fs.symlink(launch, "copy", t).unwrap_err().errno();
    assert_eq!(bad("../instances/web/.snapshots/nope"), libc::EINVAL);
    assert_eq!(bad("../volumes/pool/x/.snapshots/s1"), libc::EINVAL);
    assert_eq!(bad("/elsewhere/instances/web/.snapshots/s1"), libc::EINVAL);
    assert_eq!(bad("../instances/web"), libc::EINVAL);

    let a = fs
        .symlink(launch, "copy", "/mnt/snap/instances/web/.snapshots/s1")
        .unwrap();
    assert_eq!(
        fs.readlink(a.ino).unwrap(),
        b"../instances/web/.snapshots/s1"
    );
    assert_eq!(names(&fs, "launch"), ["copy"]);
    assert!(names(&fs, "instances").contains(&"copy".to_string()));
    assert_eq!(
        fs.symlink(launch, "copy", "../instances/web/.snapshots/s1")
            .unwrap_err()
            .errno(),
        libc::EEXIST
    );
    assert_eq!(
        fs.symlink(launch, "web", "../instances/web/.snapshots/s1")
            .unwrap_err()
            .errno(),
        libc::EEXIST
    );
    assert_eq!(fs.rmdir(snaps, "s1").unwrap_err().errno(), libc::EBUSY);
    fs.unlink(launch, "copy").unwrap();
    assert_eq!(fs.unlink(launch, "copy").unwrap_err().errno(), libc::ENOENT);
    assert!(
        names(&fs, "instances").contains(&"copy".to_string()),
        "the instance stays"
    );
}

#[test]
fn a_read_only_mount_refuses_every_change_and_still_reads() {
    let p = provider();
    let rw = core(p.clone());
    rw.mkdir(walk(&rw, "instances/web/.snapshots").unwrap().ino, "s1")
        .unwrap();
    let fs = core_with(p, true);
    let snaps = walk(&fs, "instances/web/.snapshots").unwrap().ino;
    let launch = walk(&fs, "launch").unwrap().ino;
    let rofs = |r: Result<()>| r.unwrap_err().errno();
    assert_eq!(fs.mkdir(snaps, "s2").unwrap_err().errno(), libc::EROFS);
    assert_eq!(rofs(fs.rmdir(snaps, "s1")), libc::EROFS);
    assert_eq!(rofs(fs.rename(snaps, "s1", snaps, "s3")), libc::EROFS);
    assert_eq!(
        fs.symlink(launch, "copy", "../instances/web/.snapshots/s1")
            .unwrap_err()
            .errno(),
        libc::EROFS
    );
    assert_eq!(rofs(fs.unlink(launch, "copy")), libc::EROFS);
    assert_eq!(names(&fs, "instances/web/.snapshots"), ["s1"]);
    walk(&fs, "instances/web/.snapshots/s1/snapshot.json").unwrap();
}

#[test]
fn refusals() {
    let p = provider();
    let fs = core(p);
    let snaps = walk(&fs, "instances/web/.snapshots").unwrap().ino;
    fs.mkdir(snaps, "s1").unwrap();
    let s1 = walk(&fs, "instances/web/.snapshots/s1").unwrap().ino;
    assert_eq!(fs.mkdir(s1, "x").unwrap_err().errno(), libc::EROFS);
    assert_eq!(fs.refuse(s1, Some("new"), "create").errno(), libc::EROFS);
    assert_eq!(fs.refuse(ROOT, Some("new"), "create").errno(), libc::EPERM);
    assert_eq!(fs.mkdir(ROOT, "x").unwrap_err().errno(), libc::EPERM);
    assert_eq!(fs.mkdir(snaps, ".x").unwrap_err().errno(), libc::EINVAL);
    assert_eq!(
        fs.mkdir(snaps, &"n".repeat(256)).unwrap_err().errno(),
        libc::ENAMETOOLONG
    );
    let web = walk(&fs, "instances/web").unwrap().ino;
    assert_eq!(
        fs.rmdir(web, ".snapshots").unwrap_err().errno(),
        libc::EPERM
    );
    assert_eq!(fs.lookup(ROOT, "nope").unwrap_err().errno(), libc::ENOENT);
    let vsnaps = walk(&fs, "volumes/pool/vol%2Fwith%2Fslashes/.snapshots")
        .unwrap()
        .ino;
    assert_eq!(
        fs.rename(snaps, "s1", vsnaps, "s1").unwrap_err().errno(),
        libc::EXDEV
    );
}

#[test]
fn forgotten_inodes_are_dropped() {
    let p = provider();
    let fs = core(p);
    let a = walk(&fs, "instances/web/instance.json").unwrap();
    let before = lock(&fs.inodes).count();
    fs.forget(a.ino, 1);
    assert_eq!(lock(&fs.inodes).count(), before - 1);
}

#[test]
fn files_dir_is_root_only_and_lazy() {
    let p = provider();
    let fs = core(p);
    let snaps = walk(&fs, "instances/web/.snapshots").unwrap().ino;
    fs.mkdir(snaps, "s1").unwrap();
    let files = walk(&fs, "instances/web/.snapshots/s1/files").unwrap();
    assert_eq!(files.stat.perm, 0o700);
    assert_eq!(files.stat.owner, Some((0, 0)));
    assert_eq!(
        names(&fs, "instances/web/.snapshots/s1/files"),
        ["vda", "vdb"]
    );
    assert!(!names(&fs, "instances/web/.snapshots/s1/files/vda").is_empty());
    assert_eq!(fs.mkdir(files.ino, "x").unwrap_err().errno(), libc::EROFS);
    assert_eq!(
        walk(&fs, "instances/web/.snapshots/s1/files/vdz")
            .unwrap_err()
            .errno(),
        libc::ENOENT
    );
}

#[test]
fn readdirplus_counts_lookups_without_deadlock() {
    let p = provider();
    let fs = core(p);
    let a = walk(&fs, "instances/web").unwrap();
    let fh = fs.opendir(a.ino).unwrap().fh;
    let entries = fs.readdir(fh).unwrap();
    let (_, json) = entries
        .from(0)
        .find(|(_, e)| e.name == "instance.json")
        .unwrap();
    let json = &json;
    let before = lock(&fs.inodes).count();
    // Handed over twice (two readdirplus pages, say): one forget leaves it, the second frees.
    for _ in 0..2 {
        let attr = fs.listed_attr(&entries, json).unwrap();
        assert_eq!(attr.ino, json.ino);
    }
    fs.forget(json.ino, 1);
    assert_eq!(
        lock(&fs.inodes).count(),
        before,
        "one reference is still held"
    );
    fs.forget(json.ino, 1);
    assert_eq!(
        lock(&fs.inodes).count(),
        before - 1,
        "the counted reference was released"
    );
    fs.release(fh);
}

/// `current`, pending links, revert by rename, `before-revert-…`, parents, over the memory
/// provider (which keeps no lineage itself, like qcow2).
#[test]
fn current_link_and_revert_by_rename() {
    let p = provider();
    let fs = core(p.clone());
    let web = Owner::Instance("web".into());
    let dir = walk(&fs, "instances/web").unwrap().ino;
    let snaps = walk(&fs, "instances/web/.snapshots").unwrap().ino;
    assert!(!names(&fs, "instances/web").contains(&"current".to_string()));
    let marker = |b: u8| p.write_live(&web, "vda", 0, &[b]);
    marker(b'A');
    fs.mkdir(snaps, "s1").unwrap();
    marker(b'B');
    fs.mkdir(snaps, "s2").unwrap();
    let cur = walk(&fs, "instances/web/current").unwrap();
    assert_eq!(fs.readlink(cur.ino).unwrap(), b".snapshots/s2");
    let s2p = walk(&fs, "instances/web/.snapshots/s2/parent").unwrap();
    assert_eq!(fs.readlink(s2p.ino).unwrap(), b"../s1");
    assert!(walk(&fs, "instances/web/.snapshots/s1/parent").is_err());

    // Refusals: a foreign or missing target, removing current, renaming current away.
    let bad = |t: &str| fs.symlink(dir, "tmp", t).unwrap_err().errno();
    assert_eq!(bad(".snapshots/nope"), libc::EINVAL);
    assert_eq!(
        bad("../../volumes/pool/vol%2Fwith%2Fslashes/.snapshots/s1"),
        libc::EINVAL
    );
    assert_eq!(bad("instance.json"), libc::EINVAL);
    assert_eq!(fs.unlink(dir, "current").unwrap_err().errno(), libc::EPERM);
    assert_eq!(
        fs.rename(dir, "current", dir, "x").unwrap_err().errno(),
        libc::EPERM
    );
    assert_eq!(
        fs.symlink(dir, "current", ".snapshots/s1")
            .unwrap_err()
            .errno(),
        libc::EEXIST
    );

    // A pending link: listed, readable, removable; renamed onto current it reverts.
    marker(b'C');
    let l = fs.symlink(dir, "tmp", ".snapshots/s1").unwrap();
    assert_eq!(fs.readlink(l.ino).unwrap(), b".snapshots/s1");
    assert!(names(&fs, "instances/web").contains(&"tmp".to_string()));
    fs.rename(dir, "tmp", dir, "current").unwrap();
    assert_eq!(p.live(&web, "vda").unwrap()[0], b'A', "live state is s1's");
    assert!(!names(&fs, "instances/web").contains(&"tmp".to_string()));
    let cur = walk(&fs, "instances/web/current").unwrap();
    assert_eq!(fs.readlink(cur.ino).unwrap(), b".snapshots/s1");
    let kept: Vec<String> = names(&fs, "instances/web/.snapshots")
        .into_iter()
        .filter(|n| n.starts_with("before-revert-"))
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    // The kept state holds what was discarded, and descends from s2.
    let kept_parent = walk(&fs, &format!("instances/web/.snapshots/{}/parent", kept[0])).unwrap();
    assert_eq!(fs.readlink(kept_parent.ino).unwrap(), b"../s2");

    // The next snapshot descends from s1 (a tree); deleting s1 re-parents its children.
    fs.mkdir(snaps, "s3").unwrap();
    let s3p = walk(&fs, "instances/web/.snapshots/s3/parent").unwrap();
    assert_eq!(fs.readlink(s3p.ino).unwrap(), b"../s1");
    let json = |s: &str| -> serde_json::Value {
        let a = walk(&fs, &format!("instances/web/.snapshots/{s}/snapshot.json")).unwrap();
        let h = fs.open(a.ino, false).unwrap();
        let mut out = Vec::new();
        fs.read(h.fh, 0, 1 << 20, |b| out.extend_from_slice(b))
            .unwrap();
        serde_json::from_slice(&out).unwrap()
    };
    assert_eq!(json("s1")["children"], serde_json::json!(["s2", "s3"]));
    assert_eq!(json("s3")["parent"], "s1");
    fs.rmdir(snaps, "s1").unwrap();
    assert!(walk(&fs, "instances/web/.snapshots/s3/parent").is_err());
    assert!(walk(&fs, "instances/web/.snapshots/s2/parent").is_err());

    // Reverting back to the kept state brings C back.
    let kept_name = kept[0].clone();
    fs.symlink(
        dir,
        "tmp2",
        &format!("/mnt/snap/instances/web/.snapshots/{kept_name}"),
    )
    .unwrap();
    fs.rename(dir, "tmp2", dir, "current").unwrap();
    assert_eq!(p.live(&web, "vda").unwrap()[0], b'C');
    // A removed pending link is gone.
    fs.symlink(dir, "tmp3", ".snapshots/s2").unwrap();
    fs.unlink(dir, "tmp3").unwrap();
    assert_eq!(fs.unlink(dir, "tmp3").unwrap_err().errno(), libc::ENOENT);
}

#[test]
fn since_shows_what_changed_between_two_snapshots() {
    let p = provider();
    let fs = core(p.clone());
    let snaps = walk(&fs, "instances/web/.snapshots").unwrap().ino;
    fs.mkdir(snaps, "s1").unwrap();
    p.write_live(&Owner::Instance("web".into()), "vda", 30000, &[9; 16]);
    fs.mkdir(snaps, "s2").unwrap();
    assert!(names(&fs, "instances/web/.snapshots/s1/since").is_empty());
    assert_eq!(names(&fs, "instances/web/.snapshots/s2/since"), ["s1"]);
    assert_eq!(
        names(&fs, "instances/web/.snapshots/s2/since/s1"),
        [
            "vda.raw",
            "vda.extents.json",
            "vda.rbddiff",
            "vdb.raw",
            "vdb.extents.json",
            "vdb.rbddiff"
        ]
    );
    assert_eq!(
        walk(&fs, "instances/web/.snapshots/s1/since/s2")
            .unwrap_err()
            .errno(),
        libc::ENOENT
    );
    // vda changed in one 64 KiB comparison block: its bytes are s2's.
    let a = walk(&fs, "instances/web/.snapshots/s2/since/s1/vda.raw").unwrap();
    assert_eq!((a.stat.size, a.stat.allocated), (64 << 10, 64 << 10));
    let bytes = read_all(&fs, "instances/web/.snapshots/s2/since/s1/vda.raw");
    assert_eq!(bytes, read_all(&fs, "instances/web/.snapshots/s2/vda.raw"));
    let json = read_all(&fs, "instances/web/.snapshots/s2/since/s1/vda.extents.json");
    // One 64 KiB block, split where s2's map says zeros; the written bytes are data.
    let v: Vec<serde_json::Value> = serde_json::from_slice(&json).unwrap();
    let mut pos = 0;
    for e in &v {
        assert_eq!(e["offset"].as_u64(), Some(pos));
        let len = e["length"].as_u64().unwrap();
        if (pos..pos + len).contains(&30000) {
            assert_eq!(e["zero"], false);
        }
        pos += len;
    }
    assert_eq!(pos, 64 << 10);
    // vdb did not change: all hole, empty list.
    let b = walk(&fs, "instances/web/.snapshots/s2/since/s1/vdb.raw").unwrap();
    assert_eq!((b.stat.size, b.stat.allocated), (4096, 0));
    let o = fs.open(b.ino, false).unwrap();
    assert_eq!(
        fs.lseek(o.fh, 0, Whence::Data).unwrap_err().errno(),
        libc::ENXIO
    );
    assert_eq!(
        read_all(&fs, "instances/web/.snapshots/s2/since/s1/vdb.raw"),
        vec![0u8; 4096]
    );
    let json = read_all(&fs, "instances/web/.snapshots/s2/since/s1/vdb.extents.json");
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&json).unwrap(),
        serde_json::json!([])
    );
    // Deleting the older snapshot removes the directory.
    fs.rmdir(snaps, "s1").unwrap();
    assert!(names(&fs, "instances/web/.snapshots/s2/since").is_empty());
}

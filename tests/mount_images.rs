//! The `images` provider through a real FUSE mount: the operations table of SPEC.md,
//! driven with std::fs and shell tools, checked against qemu-img.

mod common;

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

/// A pool with a qcow2 (data at 0 and 4 MiB, one snapshot "s1"), a raw image and a non-image.
fn pool() -> (tempfile::TempDir, std::path::PathBuf) {
    let t = tempfile::tempdir().expect("tempdir");
    let dir = t.path().join("pool");
    fs::create_dir(&dir).expect("mkdir");
    let q = dir.join("web.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", q.to_str().unwrap(), "16M"]);
    qemu_io(&q, "write -P 0xab 0 1M");
    qemu_io(&q, "write -P 0xcd 4M 64k");
    qemu_img(&["snapshot", "-c", "s1", q.to_str().unwrap()]);
    qemu_io(&q, "write -P 0xee 0 64k");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        dir.join("db.qcow2").to_str().unwrap(),
        "8M",
    ]);
    fs::write(dir.join("notes.txt"), "not an image").unwrap();
    let raw = fs::File::create(dir.join("plain.raw")).unwrap();
    raw.set_len(4 << 20).unwrap();
    (t, dir)
}

fn snapshot_names(img: &Path) -> Vec<String> {
    let out = qemu_img(&["info", "-U", "--output=json", img.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["snapshots"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| s["name"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn tree_lists_volumes_and_snapshots() {
    let (_t, dir) = pool();
    let m = Mount::new(&dir);
    assert_eq!(ls(&m.mnt), ["instances", "launch", "volumes"]);
    assert_eq!(ls(&m.mnt.join("volumes")), ["pool"]);
    assert_eq!(ls(&m.vol("")), ["db.qcow2", "plain.raw", "web.qcow2"]);
    // current: the newest snapshot, as nothing recorded another.
    assert_eq!(
        ls(&m.vol("web.qcow2")),
        [".snapshots", "current", "volume.json"]
    );
    assert_eq!(
        fs::read_link(m.vol("web.qcow2").join("current")).unwrap(),
        Path::new(".snapshots/s1")
    );
    assert_eq!(ls(&m.vol("db.qcow2")), [".snapshots", "volume.json"]);
    assert_eq!(ls(&m.vol("web.qcow2").join(".snapshots")), ["s1"]);
    assert_eq!(
        ls(&m.snap("web.qcow2", "s1")),
        ["disk.raw", "files", "since", "snapshot.json"]
    );

    let v: serde_json::Value =
        serde_json::from_slice(&fs::read(m.vol("web.qcow2").join("volume.json")).unwrap()).unwrap();
    assert_eq!(v["format"], "qcow2");
    assert_eq!(v["virtual_size"], 16 << 20);
    assert_eq!(v["snapshots"], 1);

    let s: serde_json::Value =
        serde_json::from_slice(&fs::read(m.snap("web.qcow2", "s1").join("snapshot.json")).unwrap())
            .unwrap();
    assert_eq!(s["name"], "s1");
    assert!(s["created"].as_str().unwrap().ends_with('Z'));
    assert_eq!(s["memory"], false);

    let disk = m.snap("web.qcow2", "s1").join("disk.raw");
    let md = fs::metadata(&disk).unwrap();
    assert_eq!(md.len(), 16 << 20);
    assert_eq!(md.permissions().mode() & 0o777, 0o444);
    // 1 MiB + 64 KiB allocated: st_blocks follows allocation, not size.
    assert_eq!(md.blocks() * 512, (1 << 20) + (64 << 10));
    let snap_time = fs::metadata(m.snap("web.qcow2", "s1")).unwrap().mtime();
    assert_eq!(md.mtime(), snap_time, "file mtime is the snapshot time");

    // New and removed files show up without remounting.
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        dir.join("new.qcow2").to_str().unwrap(),
        "1M",
    ]);
    fs::remove_file(dir.join("db.qcow2")).unwrap();
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(ls(&m.vol("")), ["new.qcow2", "plain.raw", "web.qcow2"]);
}

#[test]
fn reads_snapshot_bytes_not_the_live_disk() {
    let (_t, dir) = pool();
    let m = Mount::new(&dir);
    let disk = m.snap("web.qcow2", "s1").join("disk.raw");
    let mut f = fs::File::open(&disk).unwrap();
    let mut buf = vec![0u8; 128 << 10];
    f.read_exact(&mut buf).unwrap();
    assert!(
        buf.iter().all(|&b| b == 0xab),
        "snapshot, not the later 0xee write"
    );
    f.seek(SeekFrom::Start(4 << 20)).unwrap();
    f.read_exact(&mut buf[..64 << 10]).unwrap();
    assert!(buf[..64 << 10].iter().all(|&b| b == 0xcd));
    assert_eq!(
        seek_data_ranges(&disk),
        [(0, 1 << 20), (4 << 20, (4 << 20) + (64 << 10))]
    );
    // SEEK_DATA at or past the end: ENXIO.
    use std::os::fd::AsRawFd;
    // SAFETY: f is open.
    let r = unsafe { libc::lseek(f.as_raw_fd(), 16 << 20, libc::SEEK_DATA) };
    assert_eq!(r, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::ENXIO)
    );
    // SAFETY: f is open.
    let r = unsafe { libc::lseek(f.as_raw_fd(), (8 << 20) + 5, libc::SEEK_DATA) };
    assert_eq!(r, -1, "no data after the last extent");

    let tmp = m.dir.path().join("copy.raw");
    let conv = m.dir.path().join("conv.raw");
    run(Command::new("cp")
        .arg("--sparse=always")
        .arg(&disk)
        .arg(&tmp));
    qemu_img(&[
        "convert",
        "-O",
        "raw",
        "-l",
        "snapshot.name=s1",
        dir.join("web.qcow2").to_str().unwrap(),
        conv.to_str().unwrap(),
    ]);
    assert_eq!(first_difference(&tmp, &conv), None);
}

#[test]
fn mkdir_and_rmdir_snapshots() {
    let (_t, dir) = pool();
    let img = dir.join("web.qcow2");
    let m = Mount::new(&dir);
    let snaps = m.vol("web.qcow2").join(".snapshots");

    fs::create_dir(snaps.join("before upgrade")).unwrap();
    assert_eq!(ls(&snaps), ["before upgrade", "s1"], "visible at once");
    assert!(
        snapshot_names(&img).iter().any(|n| n == "before upgrade"),
        "qemu-img sees it"
    );
    let disk = snaps.join("before upgrade/disk.raw");
    let mut b = [0u8; 4];
    fs::File::open(&disk).unwrap().read_exact(&mut b).unwrap();
    assert_eq!(b, [0xee; 4], "the new snapshot holds the live state");

    assert_eq!(errno(fs::create_dir(snaps.join("s1"))), libc::EEXIST);
    assert_eq!(errno(fs::create_dir(snaps.join(".hidden"))), libc::EINVAL);
    assert_eq!(
        errno(fs::create_dir(snaps.join("x".repeat(256)))),
        libc::ENAMETOOLONG
    );
    assert_eq!(
        errno(fs::create_dir(m.vol("plain.raw").join(".snapshots/s"))),
        libc::ENOTSUP,
        "raw images have no snapshots"
    );

    fs::remove_dir(snaps.join("before upgrade")).unwrap();
    assert_eq!(ls(&snaps), ["s1"], "gone at once");
    assert_eq!(snapshot_names(&img), ["s1"]);
    assert_eq!(
        errno(fs::remove_dir(snaps.join("before upgrade"))),
        libc::ENOENT
    );

    // A snapshot re-created under an old name shows the new state, not a cached old one.
    fs::create_dir(snaps.join("again")).unwrap();
    qemu_io(&img, "write -P 0x11 0 64k");
    fs::remove_dir(snaps.join("again")).unwrap();
    fs::create_dir(snaps.join("again")).unwrap();
    fs::File::open(snaps.join("again/disk.raw"))
        .unwrap()
        .read_exact(&mut b)
        .unwrap();
    assert_eq!(b, [0x11; 4]);
}

#[test]
fn snapshot_of_a_locked_image_is_ebusy() {
    let (_t, dir) = pool();
    let img = dir.join("db.qcow2");
    let m = Mount::new(&dir);
    // A QEMU process holding the image read-write, as a running VM would.
    let pidfile = m.dir.path().join("qsd.pid");
    let sock = m.dir.path().join("qsd.sock");
    run(Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=f,filename={}",
            img.display()
        ))
        .arg("--blockdev")
        .arg("driver=qcow2,node-name=q,file=f")
        .arg("--chardev")
        .arg(format!(
            "socket,id=c,path={},server=on,wait=off",
            sock.display()
        ))
        .arg("--monitor")
        .arg("chardev=c")
        .arg("--pidfile")
        .arg(&pidfile)
        .arg("--daemonize"));
    let pid: i32 = fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let r = fs::create_dir(m.vol("db.qcow2").join(".snapshots/while-running"));
    // SAFETY: plain kill of the daemon we started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    wait_gone(pid, Duration::from_secs(5));
    assert_eq!(errno(r), libc::EBUSY);
    assert!(snapshot_names(&img).is_empty());
    fs::create_dir(m.vol("db.qcow2").join(".snapshots/after")).unwrap();
}

#[test]
fn refusals_follow_the_spec() {
    let (_t, dir) = pool();
    let m = Mount::new(&dir);
    let snapdir = m.snap("web.qcow2", "s1");
    let disk = snapdir.join("disk.raw");

    // Inside a snapshot: EROFS for every kind of write.
    assert_eq!(
        errno(fs::OpenOptions::new().write(true).open(&disk)),
        libc::EROFS
    );
    assert_eq!(
        errno(fs::OpenOptions::new().append(true).open(&disk)),
        libc::EROFS
    );
    assert_eq!(errno(fs::File::create(snapdir.join("new"))), libc::EROFS);
    assert_eq!(errno(fs::remove_file(&disk)), libc::EROFS);
    assert_eq!(errno(fs::create_dir(snapdir.join("d"))), libc::EROFS);
    assert_eq!(
        errno(fs::set_permissions(
            &disk,
            fs::Permissions::from_mode(0o666)
        )),
        libc::EROFS
    );
    let out = Command::new("truncate")
        .args(["-s", "0"])
        .arg(&disk)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("Read-only file system"));
    assert_eq!(errno(fs::rename(&disk, snapdir.join("x.raw"))), libc::EROFS);
    assert_eq!(
        errno(std::os::unix::fs::symlink("x", snapdir.join("l"))),
        libc::EROFS
    );

    // Elsewhere: EPERM.
    assert_eq!(errno(fs::create_dir(m.mnt.join("x"))), libc::EPERM);
    assert_eq!(errno(fs::create_dir(m.vol("x"))), libc::EPERM);
    assert_eq!(
        errno(fs::File::create(m.mnt.join("volumes/f"))),
        libc::EPERM
    );
    assert_eq!(errno(fs::remove_dir(m.vol("web.qcow2"))), libc::EPERM);
    assert_eq!(
        errno(
            fs::OpenOptions::new()
                .write(true)
                .open(m.vol("web.qcow2").join("volume.json"))
        ),
        libc::EPERM
    );
    assert_eq!(
        errno(fs::remove_file(m.vol("web.qcow2").join("volume.json"))),
        libc::EPERM
    );

    // Renames: not supported by qcow2 internal snapshots; never across volumes.
    let snaps = m.vol("web.qcow2").join(".snapshots");
    assert_eq!(
        errno(fs::rename(snaps.join("s1"), snaps.join("s2"))),
        libc::ENOTSUP
    );
    assert_eq!(
        errno(fs::rename(
            snaps.join("s1"),
            m.vol("db.qcow2").join(".snapshots/s1")
        )),
        libc::EXDEV
    );
    assert_eq!(
        errno(fs::rename(snaps.join("nope"), snaps.join("s2"))),
        libc::ENOENT
    );

    // launch/: a volume snapshot is not an instance snapshot.
    let launch = m.mnt.join("launch");
    assert_eq!(
        errno(std::os::unix::fs::symlink(&snapdir, launch.join("copy"))),
        libc::EINVAL
    );
    assert_eq!(
        errno(std::os::unix::fs::symlink(
            "../instances/none/.snapshots/s",
            launch.join("copy")
        )),
        libc::EINVAL
    );
    assert_eq!(errno(fs::remove_file(launch.join("copy"))), libc::ENOENT);

    // Not found.
    assert_eq!(errno(fs::metadata(m.vol("nope.qcow2"))), libc::ENOENT);
    assert_eq!(errno(fs::metadata(snaps.join("nope"))), libc::ENOENT);
    assert_eq!(errno(fs::metadata(snapdir.join("vda.raw"))), libc::ENOENT);

    // xattrs: none, and none settable.
    let out = Command::new("getfattr").arg("-d").arg(&disk).output();
    if let Ok(out) = out {
        assert!(out.status.success());
    }
}

#[test]
fn corrupt_image_gives_eio_not_a_crash() {
    let (_t, dir) = pool();
    let img = dir.join("web.qcow2");
    // Point the snapshot's first L2 entry far past the end of the file.
    let mut f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    let be64 = |f: &mut fs::File, off: u64| {
        let mut b = [0u8; 8];
        f.seek(SeekFrom::Start(off)).unwrap();
        f.read_exact(&mut b).unwrap();
        u64::from_be_bytes(b)
    };
    let snap_table = be64(&mut f, 64);
    let l1 = be64(&mut f, snap_table);
    let l2 = be64(&mut f, l1) & 0x00ff_ffff_ffff_fe00;
    f.seek(SeekFrom::Start(l2)).unwrap();
    f.write_all(&(0x8000_7fff_ffff_0000u64).to_be_bytes())
        .unwrap();
    drop(f);

    let m = Mount::new(&dir);
    let disk = m.snap("web.qcow2", "s1").join("disk.raw");
    let mut f = fs::File::open(&disk).unwrap();
    let mut buf = vec![0u8; 4096];
    assert_eq!(errno(f.read_exact(&mut buf)), libc::EIO);
    // The rest of the disk, and the daemon, still work.
    f.seek(SeekFrom::Start(4 << 20)).unwrap();
    f.read_exact(&mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0xcd));
    assert_eq!(ls(&m.vol("")).len(), 3);
    assert!(m.log().contains("corrupt"), "the cause is logged");
}

#[test]
fn killed_daemon_leaves_a_mount_the_next_start_clears() {
    let (_t, dir) = pool();
    let m = Mount::new(&dir);
    let pid = m.daemon_pid().expect("daemon pid");
    // SAFETY: plain kill of our own daemon.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    assert!(wait_gone(pid, Duration::from_secs(5)));
    let e = errno(fs::metadata(&m.mnt));
    assert!(
        e == libc::ENOTCONN || e == libc::ECONNABORTED,
        "stale mount gave errno {e}"
    );
    m.mount(&[]);
    assert_eq!(ls(&m.mnt.join("volumes")), ["pool"]);
}

/// `snapfs mount --images DIR` at `m`'s mount point again, with a state directory of its own.
fn mount_again(dir: &Path, m: &Mount) -> std::process::Output {
    Command::new(BIN)
        .args(["mount", "--images"])
        .arg(dir)
        .arg("--state-dir")
        .arg(m.dir.path().join("state2"))
        .arg(&m.mnt)
        .output()
        .unwrap()
}

#[test]
fn sigterm_unmounts_and_exits() {
    let (_t, dir) = pool();
    let m = Mount::new(&dir);
    let pid = m.daemon_pid().expect("daemon pid");
    // A reader keeps a file open: the lazy unmount on SIGTERM must not wait for it.
    let _open = fs::File::open(m.snap("web.qcow2", "s1").join("disk.raw")).unwrap();
    // SAFETY: plain kill of our own daemon.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    assert!(
        wait_gone(pid, Duration::from_secs(10)),
        "daemon still running"
    );
    assert!(!m.is_mounted());
}

/// `umount -l` of a mount whose file is still open, a new daemon mounted at the same path,
/// then SIGTERM to the old daemon: it must end its own (detached) connection and leave the
/// new mount alone (unmounting by path would take the new daemon's mount down).
#[test]
fn sigterm_after_lazy_unmount_leaves_a_new_mount_at_the_path_alone() {
    let (_t, dir) = pool();
    let m = Mount::new(&dir);
    let old = m.daemon_pid().expect("daemon pid");
    let open = fs::File::open(m.snap("web.qcow2", "s1").join("disk.raw")).unwrap();
    run(Command::new("umount").arg("-l").arg(&m.mnt));
    assert!(!m.is_mounted());
    // The detached connection is alive (the open file): the old daemon still runs.
    assert!(
        !wait_gone(old, Duration::from_millis(500)),
        "old daemon exited"
    );
    let out = mount_again(&dir, &m);
    assert!(
        out.status.success(),
        "second mount: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let new = find_process(|args| {
        args.first().is_some_and(|a| a.ends_with("snapfs"))
            && args.iter().any(|a| a.ends_with("state2"))
    })
    .expect("new daemon pid");
    assert_ne!(old, new);
    // SAFETY: plain kill of our own daemon.
    unsafe { libc::kill(old, libc::SIGTERM) };
    assert!(
        wait_gone(old, Duration::from_secs(10)),
        "old daemon still running"
    );
    assert!(m.is_mounted(), "the new daemon's mount was taken down");
    assert_eq!(ls(&m.mnt.join("volumes")), ["pool"]);
    drop(open);
    // SAFETY: as above.
    unsafe { libc::kill(new, libc::SIGTERM) };
    assert!(
        wait_gone(new, Duration::from_secs(10)),
        "new daemon still running"
    );
    assert!(!m.is_mounted());
}

#[test]
fn mounting_twice_is_refused_and_unmount_works() {
    let (_t, dir) = pool();
    let m = Mount::new(&dir);
    let out = mount_again(&dir, &m);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already"));
    let pid = m.daemon_pid().expect("daemon pid");
    run(Command::new(BIN).arg("unmount").arg(&m.mnt));
    assert!(wait_gone(pid, Duration::from_secs(5)));
    assert!(!m.is_mounted());
}

#[test]
fn bad_arguments_fail_clearly() {
    let out = Command::new(BIN)
        .args(["mount", "--images", "/nonexistent/dir", "/tmp"])
        .arg("--state-dir")
        .arg(std::env::temp_dir().join("snapfs-bad-args"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/dir"), "{err}");
}

/// A ploop disk (Nova's ploop backend, Virtuozzo): a directory with DiskDescriptor.xml and a
/// chain of Parallels deltas is a volume; each shot but the live top is a snapshot that reads
/// as QEMU's parallels driver reads that delta over its backing chain. Creating or deleting
/// ploop snapshots needs Virtuozzo's tool: ENOTSUP.
#[test]
fn ploop_directory_is_a_volume_with_its_shots() {
    let t = tempfile::tempdir().unwrap();
    let pool = t.path().join("vz");
    let disk = pool.join("ct101");
    fs::create_dir_all(&disk).unwrap();
    let p = |f: &str| disk.join(f).to_str().unwrap().to_string();
    let (g1, g2, g3) = (
        "{5fbaabe3-6958-40ff-92a7-860e329aab41}",
        "{1c0e6b2e-3b8a-4d0e-9f7e-2a7d0c1d2e01}",
        "{1c0e6b2e-3b8a-4d0e-9f7e-2a7d0c1d2e02}",
    );
    for f in ["root.hds", "root.hds.1", "root.hds.2"] {
        qemu_img(&["create", "-q", "-f", "parallels", &p(f), "8M"]);
    }
    let io = |f: &str, cmd: &str| {
        run(Command::new("qemu-io")
            .args(["-f", "parallels", "-c", cmd])
            .arg(p(f)));
    };
    io("root.hds", "write -P 0x61 0 3M");
    io("root.hds.1", "write -P 0x62 1M 1M");
    io("root.hds.2", "write -P 0x63 2M 1M");
    let img = |guid: &str, file: &str| {
        format!("<Image><GUID>{guid}</GUID><Type>Compressed</Type><File>{file}</File></Image>")
    };
    let shot = |guid: &str, parent: &str| {
        format!("<Shot><GUID>{guid}</GUID><ParentGUID>{parent}</ParentGUID></Shot>")
    };
    let xml = format!(
        "<?xml version='1.0' encoding='UTF-8'?><Parallels_disk_image Version=\"1.0\">\
         <Disk_Parameters><Disk_size>16384</Disk_size></Disk_Parameters>\
         <StorageData><Storage><Start>0</Start><End>16384</End><Blocksize>2048</Blocksize>{}{}{}</Storage></StorageData>\
         <Snapshots><TopGUID>{g3}</TopGUID>{}{}{}</Snapshots></Parallels_disk_image>",
        img(g1, "root.hds"),
        img(g2, "root.hds.1"),
        img(g3, "root.hds.2"),
        shot(g1, "{00000000-0000-0000-0000-000000000000}"),
        shot(g2, g1),
        shot(g3, g2),
    );
    fs::write(disk.join("DiskDescriptor.xml"), xml).unwrap();

    let m = Mount::new(&pool);
    assert_eq!(ls(&m.mnt.join("volumes/vz")), ["ct101"]);
    let vol = m.vol("ct101");
    let info: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(vol.join("volume.json")).unwrap()).unwrap();
    assert_eq!(info["format"], "ploop");
    assert_eq!(info["snapshots"], 2);
    let names = ls(&vol.join(".snapshots"));
    assert_eq!(
        names,
        [
            "1c0e6b2e-3b8a-4d0e-9f7e-2a7d0c1d2e01",
            "5fbaabe3-6958-40ff-92a7-860e329aab41"
        ]
    );
    // Each snapshot equals QEMU's reading of its delta over its backing deltas.
    let chain = |top: &str, below: &str| {
        format!(
            r#"json:{{"driver":"parallels","file":{{"driver":"file","filename":"{}"}},"backing":{below}}}"#,
            p(top)
        )
    };
    let base = format!(
        r#"{{"driver":"parallels","file":{{"driver":"file","filename":"{}"}}}}"#,
        p("root.hds")
    );
    for (name, spec) in [
        (
            "5fbaabe3-6958-40ff-92a7-860e329aab41",
            format!("json:{base}"),
        ),
        (
            "1c0e6b2e-3b8a-4d0e-9f7e-2a7d0c1d2e01",
            chain("root.hds.1", &base),
        ),
    ] {
        let reference = t.path().join(format!("{name}.ref"));
        qemu_img(&["convert", "-O", "raw", &spec, reference.to_str().unwrap()]);
        let got = fs::read(vol.join(".snapshots").join(name).join("disk.raw")).unwrap();
        assert!(
            got == fs::read(&reference).unwrap(),
            "snapshot {name} differs from qemu"
        );
    }
    let snap: serde_json::Value = serde_json::from_str(
        &fs::read_to_string(
            vol.join(".snapshots/1c0e6b2e-3b8a-4d0e-9f7e-2a7d0c1d2e01/snapshot.json"),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(snap["parent"], "5fbaabe3-6958-40ff-92a7-860e329aab41");
    assert_eq!(
        errno(fs::create_dir(vol.join(".snapshots/new"))),
        libc::EOPNOTSUPP
    );
    assert_eq!(
        errno(fs::remove_dir(
            vol.join(".snapshots/5fbaabe3-6958-40ff-92a7-860e329aab41")
        )),
        libc::EOPNOTSUPP
    );
    assert!(
        m.log().contains("needs Virtuozzo's ploop tool"),
        "{}",
        m.log()
    );
}

/// Revert through `current` on a qcow2 image, with the shell's own tools: `ln -sfn`
/// (coreutils: a temporary link renamed over `current`), `ln -s` + `mv -T`, Python's
/// os.replace. The image after a revert equals `qemu-img snapshot -a` of a copy, byte for byte;
/// the discarded state is kept as `before-revert-…` and reverting to it brings it back.
#[test]
fn revert_through_current_equals_qemu_img_apply() {
    let t = tempfile::tempdir().unwrap();
    let pool = t.path().join("imgs");
    fs::create_dir(&pool).unwrap();
    let img = pool.join("vm.qcow2");
    let img_s = img.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", img_s, "8M"]);
    qemu_io(&img, "write -P 0x41 0 1M");
    let m = Mount::new(&pool);
    let vol = m.vol("vm.qcow2");
    fs::create_dir(vol.join(".snapshots/s1")).unwrap();
    qemu_io(&img, "write -P 0x42 0 1M");
    fs::create_dir(vol.join(".snapshots/s2")).unwrap();
    assert_eq!(
        fs::read_link(vol.join("current")).unwrap(),
        Path::new(".snapshots/s2")
    );
    assert_eq!(
        fs::read_link(vol.join(".snapshots/s2/parent")).unwrap(),
        Path::new("../s1")
    );
    qemu_io(&img, "write -P 0x43 0 1M");

    // The reference: qemu-img snapshot -a on a copy taken now.
    let copy = t.path().join("copy.qcow2");
    fs::copy(&img, &copy).unwrap();
    qemu_img(&["snapshot", "-a", "s1", copy.to_str().unwrap()]);
    let want = t.path().join("want.raw");
    qemu_img(&[
        "convert",
        "-O",
        "raw",
        copy.to_str().unwrap(),
        want.to_str().unwrap(),
    ]);

    run(Command::new("ln")
        .arg("-sfn")
        .arg(".snapshots/s1")
        .arg(vol.join("current")));
    assert_eq!(
        fs::read_link(vol.join("current")).unwrap(),
        Path::new(".snapshots/s1")
    );
    let got = t.path().join("got.raw");
    qemu_img(&["convert", "-O", "raw", img_s, got.to_str().unwrap()]);
    assert!(
        fs::read(&got).unwrap() == fs::read(&want).unwrap(),
        "revert differs from qemu-img snapshot -a"
    );
    let kept: Vec<String> = ls(&vol.join(".snapshots"))
        .into_iter()
        .filter(|n| n.starts_with("before-revert-"))
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    // The kept snapshot holds the discarded bytes (0x43).
    let kept_disk = fs::read(vol.join(".snapshots").join(&kept[0]).join("disk.raw")).unwrap();
    assert!(kept_disk[..1 << 20].iter().all(|b| *b == 0x43));

    // mv -T back to the kept state: 0x43 is live again.
    std::os::unix::fs::symlink(format!(".snapshots/{}", kept[0]), vol.join("back")).unwrap();
    assert!(ls(&vol).contains(&"back".to_string()));
    run(Command::new("mv")
        .arg("-T")
        .arg(vol.join("back"))
        .arg(vol.join("current")));
    qemu_img(&["convert", "-O", "raw", img_s, got.to_str().unwrap()]);
    assert!(fs::read(&got).unwrap()[..1 << 20]
        .iter()
        .all(|b| *b == 0x43));

    // Python's os.replace, with an absolute target inside the mount.
    let py = format!(
        "import os; os.symlink('{s2}', '{tmp}'); os.replace('{tmp}', '{cur}')",
        s2 = vol.join(".snapshots/s2").display(),
        tmp = vol.join("tmp-py").display(),
        cur = vol.join("current").display()
    );
    run(Command::new("python3").args(["-c", &py]));
    qemu_img(&["convert", "-O", "raw", img_s, got.to_str().unwrap()]);
    assert!(fs::read(&got).unwrap()[..1 << 20]
        .iter()
        .all(|b| *b == 0x42));
    assert_eq!(
        fs::read_link(vol.join("current")).unwrap(),
        Path::new(".snapshots/s2")
    );

    // Refusals.
    assert_eq!(errno(fs::remove_file(vol.join("current"))), libc::EPERM);
    assert_eq!(
        errno(std::os::unix::fs::symlink(
            "../web.qcow2/.snapshots/s1",
            vol.join("x")
        )),
        libc::EINVAL
    );
    assert_eq!(
        errno(std::os::unix::fs::symlink("/etc", vol.join("x"))),
        libc::EINVAL
    );
    let snap_json: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(vol.join(".snapshots/s1/snapshot.json")).unwrap())
            .unwrap();
    assert!(
        snap_json["children"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c == "s2"),
        "{snap_json}"
    );
}

/// kill -9 of the daemon in the middle of a revert, at the two points around the backend's
/// work (`SNAPFS_FAILPOINT` stops the daemon there): after a restart `current` tells the truth.
/// Killed before `qemu-img snapshot -a` ran, the image is untouched and `current` is the
/// `before-revert-…` snapshot of that state; killed after it, the image is s1's and `current`
/// is s1. `before-revert-…` exists in both cases.
#[test]
fn kill_during_a_revert_leaves_current_true() {
    for (point, reverted) in [
        ("revert-before-backend", false),
        ("revert-after-backend", true),
    ] {
        let t = tempfile::tempdir().unwrap();
        let pool = t.path().join("imgs");
        fs::create_dir(&pool).unwrap();
        let img = pool.join("vm.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "8M"]);
        qemu_io(&img, "write -P 0x41 0 1M");
        let m = Mount::with_env(&pool, &[], &[("SNAPFS_FAILPOINT", point)]);
        let vol = m.vol("vm.qcow2");
        fs::create_dir(vol.join(".snapshots/s1")).unwrap();
        qemu_io(&img, "write -P 0x42 0 1M");

        m.revert_killed_at_failpoint(&vol, "s1");
        m.mount(&[]);

        let kept: Vec<String> = ls(&vol.join(".snapshots"))
            .into_iter()
            .filter(|n| n.starts_with("before-revert-"))
            .collect();
        assert_eq!(kept.len(), 1, "{point}: {kept:?}");
        let want_current = if reverted {
            "s1".to_string()
        } else {
            kept[0].clone()
        };
        assert_eq!(
            fs::read_link(vol.join("current")).unwrap(),
            Path::new(".snapshots").join(&want_current),
            "{point}: {}",
            m.log()
        );
        let got = t.path().join("got.raw");
        qemu_img(&[
            "convert",
            "-O",
            "raw",
            img.to_str().unwrap(),
            got.to_str().unwrap(),
        ]);
        let want_byte = if reverted { 0x41 } else { 0x42 };
        assert!(
            fs::read(&got).unwrap()[..1 << 20]
                .iter()
                .all(|b| *b == want_byte),
            "{point}: image is not {want_byte:#x}"
        );
        let outcome = if reverted {
            "had happened: current is its snapshot"
        } else {
            "had not happened: current stays"
        };
        assert!(m.log().contains(outcome), "{point}: {}", m.log());
        // The kept state still holds what the revert would discard.
        let kept_disk = fs::read(vol.join(".snapshots").join(&kept[0]).join("disk.raw")).unwrap();
        assert!(kept_disk[..1 << 20].iter().all(|b| *b == 0x42));
    }
}

/// A VM holding the image (qemu's write lock): a revert is EBUSY and changes nothing.
#[test]
fn revert_of_a_locked_image_is_ebusy() {
    let t = tempfile::tempdir().unwrap();
    let pool = t.path().join("imgs");
    fs::create_dir(&pool).unwrap();
    let img = pool.join("vm.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "8M"]);
    qemu_img(&["snapshot", "-c", "s1", img.to_str().unwrap()]);
    let m = Mount::new(&pool);
    let vol = m.vol("vm.qcow2");
    let mut holder = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "sleep 20000"])
        .arg(&img)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    std::os::unix::fs::symlink(".snapshots/s1", vol.join("tmp")).unwrap();
    let r = fs::rename(vol.join("tmp"), vol.join("current"));
    let _ = holder.kill();
    let _ = holder.wait();
    assert_eq!(errno(r), libc::EBUSY);
    assert_eq!(
        ls(&vol.join(".snapshots")),
        ["s1"],
        "nothing was kept or changed"
    );
}

/// What snapfs does with one hostile image (issue 20; docs/image-readers.md, "Hostile images").
#[derive(Clone, Copy, Debug, PartialEq)]
enum Ours {
    /// `ls .snapshots` fails with EIO; volume.json's "error" names the field.
    Refused(&'static str),
    /// Snapshot s1 is served (its bytes are right) and volume.json's "damaged" names the field.
    Flagged(&'static str),
    /// Snapshot s1 is listed, reading it fails with EIO naming the field (QEMU's snapshot load
    /// fails too, or QEMU reads zeros where we refuse: see `Qemu`).
    ReadEio(&'static str),
    /// Served: this many snapshots listed (`MAX_LISTED` of a larger table, which volume.json
    /// says), s1 read right, nothing flagged.
    Served(usize),
}

/// What QEMU 10 does with the same image, checked by running it.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Qemu {
    /// `qemu-img info` refuses to open it; the message contains this.
    Refuses(&'static str),
    /// Opens; loading snapshot s1 (`qemu-img convert -l snapshot.name=s1`) fails with this.
    SnapshotFails(&'static str),
    /// Opens and reads zeros at offset 0 of s1, where the L2 entry points past the end of file.
    ReadsZeros,
    /// Opens, and reads s1.
    Opens,
}

const HOSTILE: &[(&str, Qemu, Ours)] = &[
    (
        "header-length-huge",
        Qemu::Refuses("exceeds cluster size"),
        Ours::Refused("header_length"),
    ),
    (
        "header-length-short",
        Qemu::Refuses("header too short"),
        Ours::Refused("header_length"),
    ),
    (
        "ext-huge-backing-offset",
        Qemu::Refuses("Invalid backing file offset"),
        Ours::Refused("backing_file_offset"),
    ),
    (
        "ext-huge",
        Qemu::Refuses("Header extension too large"),
        Ours::Refused("header extension"),
    ),
    (
        "ext-backing-format-long",
        Qemu::Refuses("ext_backing_format"),
        Ours::Refused("backing format extension"),
    ),
    (
        "backing-name-long",
        Qemu::Refuses("Backing file name too long"),
        Ours::Refused("backing_file_size"),
    ),
    (
        "backing-name-past-cluster",
        Qemu::Refuses("Backing file name too long"),
        Ours::Refused("backing_file_size"),
    ),
    (
        "refcount-clusters-huge",
        Qemu::Refuses("Reference count table too large"),
        Ours::Flagged("refcount table too large"),
    ),
    (
        "refcount-clusters-large",
        Qemu::Refuses("Reference count table too large"),
        Ours::Flagged("refcount table too large"),
    ),
    (
        "refcount-offset-unaligned",
        Qemu::Refuses("Reference count table offset invalid"),
        Ours::Flagged("refcount table offset invalid"),
    ),
    (
        "refcount-offset-huge",
        Qemu::Refuses("Reference count table offset invalid"),
        Ours::Flagged("refcount table offset invalid"),
    ),
    (
        "refcount-none",
        Qemu::Refuses("does not contain a reference count table"),
        Ours::Flagged("no refcount table"),
    ),
    (
        "snapshots-too-many",
        Qemu::Refuses("Snapshot table too large"),
        Ours::Refused("nb_snapshots"),
    ),
    (
        "snapshots-offset-huge",
        Qemu::Refuses("Snapshot table offset invalid"),
        Ours::Refused("snapshot table offset invalid"),
    ),
    (
        "snapshots-zero-garbage-offset",
        Qemu::Refuses("Snapshot table offset invalid"),
        Ours::Flagged("snapshot table offset invalid"),
    ),
    (
        "snapshot-extra-huge",
        Qemu::Refuses("Too much extra metadata"),
        Ours::Refused("extra_data_size"),
    ),
    (
        "snaptable-ff",
        Qemu::Refuses("Snapshot table is too big"),
        Ours::Refused("snapshot table larger than 64 MiB"),
    ),
    (
        "snaptable-zero",
        Qemu::Refuses("Snapshot table is too big"),
        Ours::Refused("snapshot table larger than 64 MiB"),
    ),
    (
        "snapshot-l1-offset-unaligned",
        Qemu::SnapshotFails("Snapshot L1 table offset invalid"),
        Ours::ReadEio("L1 table offset invalid"),
    ),
    (
        "snapshot-l1-size-huge",
        Qemu::SnapshotFails("Snapshot L1 table too large"),
        Ours::ReadEio("L1 table too large"),
    ),
    (
        "l1-size-huge",
        Qemu::Refuses("Active L1 table too large"),
        Ours::Flagged("active L1 table too large"),
    ),
    (
        "l1-size-large",
        Qemu::Refuses("Active L1 table too large"),
        Ours::Flagged("active L1 table too large"),
    ),
    (
        "l1-offset-huge",
        Qemu::Refuses("Active L1 table offset invalid"),
        Ours::Flagged("active L1 table offset invalid"),
    ),
    (
        "l1-offset-unaligned",
        Qemu::Refuses("Active L1 table offset invalid"),
        Ours::Flagged("active L1 table offset invalid"),
    ),
    (
        "l1-too-small",
        Qemu::Refuses("L1 table is too small"),
        Ours::Flagged("active L1 table too small"),
    ),
    ("snapshots-max", Qemu::Opens, Ours::Served(4096)),
    (
        "l2-reserved-past-eof",
        Qemu::ReadsZeros,
        Ours::ReadEio("past end of file"),
    ),
    (
        "data-at-32pib",
        Qemu::ReadsZeros,
        Ours::ReadEio("past end of file"),
    ),
];

/// QEMU's outcome for one case, by running qemu-img.
fn qemu_outcome(img: &Path, expect: Qemu) {
    let info = Command::new("qemu-img")
        .args(["info", "-U"])
        .arg(img)
        .output()
        .expect("qemu-img info");
    let err = String::from_utf8_lossy(&info.stderr);
    match expect {
        Qemu::Refuses(msg) => {
            assert!(!info.status.success(), "{}: QEMU opened it", img.display());
            assert!(err.contains(msg), "{}: QEMU said {err}", img.display());
        }
        Qemu::SnapshotFails(_) | Qemu::ReadsZeros | Qemu::Opens => {
            assert!(
                info.status.success(),
                "{}: QEMU refused: {err}",
                img.display()
            );
            let out = img.with_extension("qemu.raw");
            let conv = Command::new("qemu-img")
                .args(["convert", "-U", "-l", "snapshot.name=s1", "-O", "raw"])
                .arg(img)
                .arg(&out)
                .output()
                .expect("qemu-img convert");
            let cerr = String::from_utf8_lossy(&conv.stderr);
            if let Qemu::SnapshotFails(msg) = expect {
                assert!(
                    !conv.status.success() && cerr.contains(msg),
                    "{}: {cerr}",
                    img.display()
                );
            } else {
                assert!(conv.status.success(), "{}: {cerr}", img.display());
                let mut head = [1u8; 512];
                fs::File::open(&out).unwrap().read_exact(&mut head).unwrap();
                let want = if expect == Qemu::Opens { 0xab } else { 0 };
                assert!(
                    head.iter().all(|&b| b == want),
                    "{}: QEMU read",
                    img.display()
                );
            }
            let _ = fs::remove_file(&out);
        }
    }
}

/// Snapshot s1 of a hostile case reads as written: 1 MiB of 0xab.
fn assert_s1_is_ab(snaps: &Path, name: &str) {
    let mut buf = vec![0u8; 1 << 20];
    fs::File::open(snaps.join("s1/disk.raw"))
        .and_then(|mut f| f.read_exact(&mut buf))
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(buf.iter().all(|&b| b == 0xab), "{name}: snapshot bytes");
}

fn status_kib(pid: i32, key: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix(key)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// Every reproduced qemu-iotests case (080, 261 and the two issue-20 snapshot tables): QEMU's
/// outcome checked by running it, ours through the mount; the daemon's peak RSS stays under
/// `--cache-mb` + 64 MiB, its log small, and it stays alive.
#[test]
fn hostile_images_match_qemu_within_bounds() {
    let t = tempfile::tempdir().expect("tempdir");
    let dir = t.path().join("hostile");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/make-hostile-images.py");
    run(Command::new("python3").arg(&script).arg(&dir));
    let made = fs::read_dir(&dir).unwrap().count();
    assert_eq!(made, HOSTILE.len(), "one case a row");
    for (name, qemu, _) in HOSTILE {
        qemu_outcome(&dir.join(format!("{name}.qcow2")), *qemu);
    }

    let m = Mount::with_args(&dir, &["--cache-mb", "32"]);
    let pid = m.daemon_pid().expect("daemon pid");
    let mut agree = 0;
    let mut stricter = 0;
    let mut flagged = 0;
    for round in 0..3 {
        for (name, qemu, ours) in HOSTILE {
            let vol = m.vol(&format!("{name}.qcow2"));
            let snaps = vol.join(".snapshots");
            let v: serde_json::Value =
                serde_json::from_slice(&fs::read(vol.join("volume.json")).unwrap()).unwrap();
            match ours {
                Ours::Refused(field) => {
                    assert_eq!(errno(fs::read_dir(&snaps)), libc::EIO, "{name}");
                    let e = v["error"].as_str().unwrap_or_default();
                    assert!(e.contains(field), "{name}: volume.json error {e:?}");
                }
                Ours::Flagged(field) => {
                    let d = v["damaged"].to_string();
                    assert!(d.contains(field), "{name}: damaged {d}");
                    if *name == "snapshots-zero-garbage-offset" {
                        assert!(ls(&snaps).is_empty(), "{name}");
                    } else {
                        assert_eq!(ls(&snaps), ["s1"], "{name}");
                        assert_s1_is_ab(&snaps, name);
                    }
                }
                Ours::Served(count) => {
                    let names = ls(&snaps);
                    assert_eq!(names.len(), *count, "{name}");
                    assert!(v.get("damaged").is_none(), "{name}: {v}");
                    assert_eq!(v["snapshots"], 65536, "{name}");
                    assert_eq!(v["snapshots_listed"], *count, "{name}");
                    assert_s1_is_ab(&snaps, name);
                }
                Ours::ReadEio(field) => {
                    assert_eq!(ls(&snaps), ["s1"], "{name}");
                    let r = fs::File::open(snaps.join("s1/disk.raw"))
                        .and_then(|mut f| f.read_exact(&mut [0u8; 512]));
                    assert_eq!(errno(r), libc::EIO, "{name}");
                    assert!(v.get("damaged").is_none(), "{name}: {v}");
                    assert!(m.log().contains(field), "{name}: log names {field:?}");
                }
            }
            if round == 0 {
                match (qemu, ours) {
                    (Qemu::ReadsZeros, _) => stricter += 1,
                    (Qemu::Refuses(_), Ours::Flagged(_)) => flagged += 1,
                    _ => agree += 1,
                }
            }
        }
        std::thread::sleep(Duration::from_millis(300)); // past the listing TTL
    }
    assert_eq!(
        (agree, stricter, flagged),
        (15, 2, 11),
        "parity table counts"
    );

    assert!(pid_alive(pid), "daemon alive");
    let hwm_mib = status_kib(pid, "VmHWM:") / 1024;
    assert!(
        hwm_mib <= 32 + 64,
        "peak RSS {hwm_mib} MiB over --cache-mb + 64 MiB"
    );
    let log = m.log();
    assert!(log.len() < 256 << 10, "log of {} bytes", log.len());
    let longest = log.lines().map(str::len).max().unwrap_or(0);
    assert!(longest <= 2048, "a log line of {longest} bytes");
    // The damage of each flagged image is logged once, however often it is listed.
    let once = log
        .lines()
        .filter(|l| l.contains("l1-too-small.qcow2") && l.contains("QEMU would refuse"))
        .count();
    assert_eq!(once, 1, "damage logged {once} times:\n{log}");
    eprintln!(
        "hostile images: peak RSS {hwm_mib} MiB, log {} bytes",
        log.len()
    );
}

/// `--log-max-mb`: the background daemon's log and its one rotated copy stay under the cap
/// (debug logging of refused lookups makes the volume of lines here).
#[test]
fn log_file_is_capped_and_rotated() {
    let (_t, dir) = pool();
    let m = Mount::with_args(&dir, &["-vv", "--log-max-mb", "1"]);
    let log = m.state_dir().join("snapfs.log");
    let old = m.state_dir().join("snapfs.log.1");
    for i in 0..30_000 {
        let _ = fs::metadata(m.vol(&format!("missing-{i}.qcow2")));
    }
    let cur = fs::metadata(&log).map(|md| md.len()).unwrap_or(0);
    let prev = fs::metadata(&old).map(|md| md.len()).unwrap_or(0);
    assert!(prev > 0, "the log was rotated (current {cur} bytes)");
    assert!(
        cur + prev <= (1 << 20) + 4096,
        "{cur} + {prev} bytes over the 1 MiB cap"
    );
    assert!(m.daemon_pid().is_some_and(pid_alive), "daemon alive");
    // Still logging, into the current file.
    let before = fs::metadata(&log).unwrap().len();
    let _ = fs::metadata(m.vol("missing-again.qcow2"));
    std::thread::sleep(Duration::from_millis(100));
    assert!(m.log().contains("missing-again") || fs::metadata(&log).unwrap().len() < before);
}

/// Found by the chaos suite (tests/chaos.rs): a reader holding a qcow2 internal snapshot's
/// disk open while the snapshot is deleted and the image written again read the new writes
/// (the freed clusters were reused) as the snapshot's bytes. It gets the old bytes or EIO now.
#[test]
fn deleted_snapshot_read_through_an_open_file_is_old_bytes_or_eio() {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let t = tempfile::tempdir().expect("tempdir");
    let dir = t.path().join("pool");
    fs::create_dir(&dir).expect("mkdir");
    let q = dir.join("v.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", q.to_str().unwrap(), "16M"]);
    qemu_io(&q, "write -P 0xaa 0 4M");
    qemu_img(&["snapshot", "-c", "s1", q.to_str().unwrap()]);
    // The active layer gets its own clusters for 0..4M: only s1 holds the 0xaa ones.
    qemu_io(&q, "write -P 0xbb 0 4M");
    let m = Mount::new(&dir);
    let f = fs::File::open(m.snap("v.qcow2", "s1").join("disk.raw")).expect("open s1");
    let mut b = vec![0u8; 65536];
    f.read_exact_at(&mut b, 0).expect("read before");
    assert!(b.iter().all(|&x| x == 0xaa));
    // Another snapshot made meanwhile (the table moves, the file grows) changes nothing.
    qemu_io(&q, "write -P 0xdd 12M 1M");
    qemu_img(&["snapshot", "-c", "s2", q.to_str().unwrap()]);
    // SAFETY: fadvise on an fd we hold: the kernel forgets what it cached of the file.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    f.read_exact_at(&mut b, 1 << 20)
        .expect("read after another snapshot was made");
    assert!(b.iter().all(|&x| x == 0xaa));
    fs::remove_dir(m.snap("v.qcow2", "s1")).expect("rmdir s1");
    // New data lands in the freed clusters.
    qemu_io(&q, "write -P 0xcc 8M 4M");
    // SAFETY: fadvise on an fd we hold: the kernel forgets what it cached of the file.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    for off in (0..4u64 << 20).step_by(1 << 20) {
        match f.read_exact_at(&mut b, off) {
            Ok(()) => assert!(
                b.iter().all(|&x| x == 0xaa),
                "offset {off}: read {:#x}, not the snapshot's 0xaa",
                b[0]
            ),
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "offset {off}: {e}"),
        }
    }
}

//! snapfs as a system tool: the mount(8) helper form, systemd's readiness protocol, `umount`
//! ending the daemon, the unit file, the man pages and completions. Real mounts throughout;
//! mount(8) itself and the installed .deb are exercised in a pristine root by
//! scripts/check-fresh-install.sh (the helper must be in /sbin for mount(8) to find it).

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn images_dir(dir: &Path) -> PathBuf {
    let images = dir.join("pool1");
    std::fs::create_dir(&images).unwrap();
    let img = images.join("web.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "16M"]);
    qemu_io(&img, "write -P 0x5a 0 1M");
    qemu_img(&["snapshot", "-c", "nightly", img.to_str().unwrap()]);
    images
}

fn recv_until(sock: &UnixDatagram, want: &str, timeout: Duration) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            let done = msg.lines().any(|l| l == want);
            got.push(msg);
            if done {
                return got;
            }
        }
    }
    panic!("no {want} within {timeout:?}; got {got:?}");
}

fn is_mounted(mnt: &Path) -> bool {
    let want = mnt.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
}

/// `snapfs mount --foreground` under a Type=notify service manager: READY=1 once the mount
/// answers, and a plain `umount` (no signal) ends the daemon cleanly with STOPPING=1.
/// `snapfs mount --foreground` of a small pool in `dir`, with NOTIFY_SOCKET pointing at a
/// socket this test listens on: (daemon, socket, mountpoint).
fn notified_mount(dir: &Path) -> (std::process::Child, UnixDatagram, PathBuf) {
    let images = images_dir(dir);
    let mnt = dir.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let sock_path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let child = Command::new(BIN)
        .args(["mount", "--foreground", "--images"])
        .arg(&images)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg(&mnt)
        .env("NOTIFY_SOCKET", &sock_path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    (child, sock, mnt)
}

#[test]
fn notify_ready_then_umount_ends_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, sock, mnt) = notified_mount(dir.path());
    let got = recv_until(&sock, "READY=1", Duration::from_secs(30));
    assert!(got[0].contains("STATUS=mounted on"), "{got:?}");
    // READY means usable: the tree answers at once.
    assert_eq!(
        ls(&mnt.join("volumes/pool1/web.qcow2/.snapshots")),
        ["nightly"]
    );

    run(Command::new("umount").arg(&mnt));
    recv_until(&sock, "STOPPING=1", Duration::from_secs(10));
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "daemon still running after umount"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    use std::io::Read;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "daemon exit {status:?}: {err}");
    assert!(err.contains("unmounted; exiting"), "{err}");
    assert!(!is_mounted(&mnt));
}

/// SIGTERM (what `systemctl stop` sends) unmounts, reports STOPPING=1 and exits 0.
#[test]
fn sigterm_unmounts_and_reports_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, sock, mnt) = notified_mount(dir.path());
    recv_until(&sock, "READY=1", Duration::from_secs(30));
    // SAFETY: plain kill(2) of our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    recv_until(&sock, "STOPPING=1", Duration::from_secs(10));
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "daemon still running after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(child.wait().unwrap().success());
    assert!(!is_mounted(&mnt));
}

/// What mount(8) runs for `mount -t fuse.snapfs snapfs DIR -o …` and for an fstab line:
/// `/sbin/mount.fuse.snapfs snapfs DIR -o OPTIONS`. The standard options are ignored, `ro`
/// makes the tree read-only, and the call returns once mounted.
#[test]
fn mount_helper_mounts_with_fstab_options() {
    let dir = tempfile::tempdir().unwrap();
    let images = images_dir(dir.path());
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let helper = dir.path().join("mount.fuse.snapfs");
    std::os::unix::fs::symlink(BIN, &helper).unwrap();
    let opts = format!(
        "rw,nofail,_netdev,noauto,users,x-systemd.automount,defaults,images={},state_dir={},list_ttl_ms=100,ro",
        images.display(),
        dir.path().join("state").display()
    );
    run(Command::new(&helper)
        .arg("snapfs")
        .arg(&mnt)
        .args(["-o", &opts, "-n"]));
    assert!(is_mounted(&mnt));
    let snaps = mnt.join("volumes/pool1/web.qcow2/.snapshots");
    assert_eq!(ls(&snaps), ["nightly"]);
    assert_eq!(errno(std::fs::create_dir(snaps.join("s1"))), libc::EROFS);
    let disk = std::fs::read(snaps.join("nightly/disk.raw")).unwrap();
    assert!(disk[..1 << 20].iter().all(|b| *b == 0x5a));

    // `umount` ends the forked daemon too.
    let pid = daemon_of(&mnt).expect("daemon pid");
    run(Command::new("umount").arg(&mnt));
    assert!(
        wait_gone(pid, Duration::from_secs(10)),
        "daemon {pid} survived umount"
    );
    let log = std::fs::read_to_string(dir.path().join("state/snapfs.log")).unwrap();
    assert!(log.contains("unmounted; exiting"), "{log}");
}

#[test]
fn mount_helper_names_a_bad_option_and_mounts_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let helper = dir.path().join("mount.fuse.snapfs");
    std::os::unix::fs::symlink(BIN, &helper).unwrap();
    let out = Command::new(&helper)
        .arg("snapfs")
        .arg(&mnt)
        .args(["-o", "images=/tmp,no_such_option=1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown mount option `no_such_option`"),
        "{err}"
    );
    assert!(!is_mounted(&mnt));
}

/// The unit file passes systemd's own offline check (with ExecStart pointing at this build).
#[test]
fn systemd_unit_verifies() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/packaging/snapfs@.service"
    ))
    .unwrap();
    assert!(unit.contains("Type=notify"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("snapfs@mnt-snap.service");
    std::fs::write(&path, unit.replace("/usr/bin/snapfs", BIN)).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    // verify also loads the units ours names in After= (libvirtd.service, ...); what it says
    // about those is the distribution's business (Debian 12's systemd 252 does not know the
    // `Type=notify-reload` of a newer libvirt), so only lines about other units' files are
    // left out. Anything about our unit, or not tied to a file, still fails the test.
    let ours: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| !is_distribution_unit_line(l))
        .collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify: {text}"
    );
}

/// A diagnostic `systemd-analyze verify` printed about a unit file installed by a package
/// (`/lib/systemd/system/x.service:29: ...`), not about the unit under test.
fn is_distribution_unit_line(line: &str) -> bool {
    ["/lib/systemd/system/", "/usr/lib/systemd/system/"]
        .iter()
        .any(|dir| line.starts_with(dir))
}

/// `snapfs generate-assets` writes what the .deb ships: man pages that roff renders and
/// completions that mention every mount option.
#[test]
fn man_pages_and_completions_follow_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    run(Command::new(BIN).arg("generate-assets").arg(dir.path()));
    let bash = std::fs::read_to_string(dir.path().join("completions/snapfs.bash")).unwrap();
    for opt in [
        "--images",
        "--libvirt",
        "--connect",
        "--read-only",
        "--ceph",
        "--pool",
    ] {
        assert!(bash.contains(opt), "bash completion lacks {opt}");
    }
    let page = dir.path().join("man/snapfs-mount.1");
    let out = Command::new("man")
        .arg("-l")
        .arg("-P")
        .arg("cat")
        .arg(&page)
        .env("MANWIDTH", "100")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "man -l failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("--read-only") && text.contains("--freeze-timeout"),
        "{text}"
    );
}

/// The daemon behind `mnt` started as mount.fuse.snapfs (which forks it).
fn daemon_of(mnt: &Path) -> Option<i32> {
    find_process(|args| {
        args.first()
            .is_some_and(|a| a.ends_with("mount.fuse.snapfs"))
            && args.iter().any(|a| Path::new(a) == mnt)
    })
}

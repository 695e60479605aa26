//! RBD-backed instances (issue 4, scope 3–4) against the real test bed and the real Ceph
//! cluster: a TCG guest booted from an RBD disk (scripts/testbed/rbd-guest.sh), snapshotted,
//! read and launched by clone through the real mount.
//!
//! Needs both the libvirt test bed (scripts/testbed/up.sh) and the loopback Ceph
//! (scripts/ceph/start-ceph.sh). Without them the test prints a skip message and passes,
//! unless SNAPFS_REQUIRE_TESTBED=1 or SNAPFS_REQUIRE_CEPH=1 (CI), where it fails.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const URI: &str = TESTBED_URI;
const POOL: &str = "rbd";
/// At most one test guest (and its clone) runs at a time: TCG on a shared 2-core box.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Whether libvirt, the built guest and Ceph are all there; panics when required and missing.
fn ready() -> bool {
    let mut missing = Vec::new();
    let base = PathBuf::from("/var/lib/snapfs-testbed/guest/demo-disk.qcow2");
    if !base.exists() {
        missing.push(format!("{} missing", base.display()));
    }
    if !Command::new("virsh")
        .args(["-c", URI, "version"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        missing.push(format!("libvirt at {URI} not reachable"));
    }
    let conf = ceph_conf();
    if !ceph_answers(&conf, POOL) {
        missing.push(format!("Ceph cluster of {} not answering", conf.display()));
    }
    if missing.is_empty() {
        return true;
    }
    let why = missing.join("; ");
    let required = ["SNAPFS_REQUIRE_TESTBED", "SNAPFS_REQUIRE_CEPH"]
        .iter()
        .any(|v| std::env::var(v).as_deref() == Ok("1"));
    assert!(!required, "test bed and Ceph required but not ready: {why}");
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIP libvirt_rbd: {why}");
    false
}

fn rbd(args: &[&str]) -> String {
    run(Command::new("rbd").arg("-c").arg(ceph_conf()).args(args))
}

fn rbd_json(args: &[&str]) -> serde_json::Value {
    let mut a = args.to_vec();
    a.extend(["--format", "json"]);
    serde_json::from_str(&rbd(&a)).expect("rbd json")
}

fn state(dom: &str) -> String {
    String::from_utf8_lossy(&virsh(&["domstate", dom]).stdout)
        .trim()
        .to_string()
}

/// Remove an RBD image of the test pool with its snapshots; errors ignored.
fn remove_image(name: &str) {
    remove_rbd_image(&ceph_conf(), &format!("{POOL}/{name}"));
}

/// The guest `lvr-t<pid>` on RBD image `lvr-t<pid>-vda` and the clones launched from it;
/// all removed on drop (domains first, then clones, then the image).
struct RbdGuest {
    name: String,
    clones: Vec<String>,
    /// Further disk images attached by the test.
    extra: Vec<String>,
}

impl RbdGuest {
    fn start(tag: &str) -> RbdGuest {
        let g = RbdGuest {
            name: format!("lvr-t{}-{tag}", std::process::id()),
            clones: Vec::new(),
            extra: Vec::new(),
        };
        script_ok("rbd-guest.sh", &["--recreate", &g.name]);
        g
    }

    fn image(&self) -> String {
        format!("{}-vda", self.name)
    }

    fn status(&self, dom: &str) -> String {
        script_ok("guest-ctl.sh", &[dom, "status"])
    }

    fn remove_domain(dom: &str) {
        let _ = virsh(&["destroy", dom]);
        let _ = virsh(&["undefine", dom]);
        let _ = fs::remove_file(format!("/var/log/snapfs-testbed/{dom}.console.log"));
    }
}

impl Drop for RbdGuest {
    fn drop(&mut self) {
        let _ = script("guest-ctl.sh", &[&self.name, "agent-resume"]);
        for c in &self.clones {
            Self::remove_domain(c);
            remove_image(&format!("{c}-vda"));
        }
        Self::remove_domain(&self.name);
        remove_image(&self.image());
        for i in &self.extra {
            remove_image(i);
        }
    }
}

fn json(p: &Path) -> serde_json::Value {
    let b = fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
    serde_json::from_slice(&b).unwrap_or_else(|e| panic!("parse {}: {e}", p.display()))
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The whole life of an RBD-backed instance snapshot: quiesced mkdir, byte-exact reads and
/// guest files, the refusals, launch by clone (which boots), EBUSY while the clone depends
/// on it, `--flatten-on-launch`, and rmdir once flattened.
#[test]
fn rbd_backed_instance_snapshot_launch_and_flatten() {
    if !ready() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut g = RbdGuest::start("a");
    let conf = ceph_conf();
    let conf_s = conf.to_str().expect("utf-8 conf path");
    let libvirt = format!("--libvirt={URI}");
    let args = [
        libvirt.as_str(),
        "--ceph",
        conf_s,
        "--pool",
        POOL,
        "--quiesce",
        "require",
        "--freeze-timeout",
        "20",
    ];
    let m = Mount::with_providers(&args);
    let inst = m.mnt.join("instances").join(&g.name);
    let snaps = inst.join(".snapshots");
    let info = json(&inst.join("instance.json"));
    assert_eq!(info["disks"][0]["source"]["protocol"], "rbd", "{info}");
    assert_eq!(info["disks"][0]["size"], 64 << 20, "{info}");

    // mkdir: a quiesced RBD snapshot of the disk, recorded as one instance snapshot.
    fs::create_dir(snaps.join("q")).expect("mkdir q");
    assert!(g.status(&g.name).contains("frozen=0"), "guest left frozen");
    assert_eq!(ls(&snaps), ["q"]);
    let sj = json(&snaps.join("q/snapshot.json"));
    assert_eq!(sj["quiesced"], true, "{sj}");
    assert_eq!(sj["disks"][0]["source"], format!("{POOL}/{}@q", g.image()));
    let rbd_snaps = rbd_json(&["snap", "ls", &format!("{POOL}/{}", g.image())]);
    assert!(
        rbd_snaps
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["name"] == "q"),
        "{rbd_snaps}"
    );
    // The same snapshot under volumes/ (the RBD view of the image).
    let vol_snap = m
        .mnt
        .join("volumes")
        .join(POOL)
        .join(g.image())
        .join(".snapshots/q");
    assert!(vol_snap.join("disk.raw").exists());

    // Refusals: taken name (in the record, and as an RBD snapshot name), '@'.
    assert_eq!(errno(fs::create_dir(snaps.join("q"))), libc::EEXIST);
    rbd(&["snap", "create", &format!("{POOL}/{}@taken", g.image())]);
    assert_eq!(errno(fs::create_dir(snaps.join("taken"))), libc::EEXIST);
    rbd(&[
        "snap",
        "rm",
        "--no-progress",
        &format!("{POOL}/{}@taken", g.image()),
    ]);
    assert_eq!(errno(fs::create_dir(snaps.join("a@b"))), libc::EINVAL);

    // Bytes: vda.raw equals `rbd export` of the RBD snapshot.
    let export = m.dir.path().join("export.raw");
    rbd(&[
        "export",
        "--no-progress",
        &format!("{POOL}/{}@q", g.image()),
        export.to_str().unwrap(),
    ]);
    let raw = snaps.join("q/vda.raw");
    assert_eq!(
        fs::metadata(&raw).unwrap().len(),
        fs::metadata(&export).unwrap().len()
    );
    assert_eq!(
        first_difference(&raw, &export),
        None,
        "vda.raw != rbd export"
    );
    fs::remove_file(&export).unwrap();

    // Guest files of the quiesced snapshot: the writer's log ends with a whole line.
    let log = fs::read_to_string(snaps.join("q/files/vda/p1/writer.log")).expect("writer.log");
    assert!(!log.is_empty() && log.ends_with('\n'), "torn writer.log");
    let first_line = log.lines().next().unwrap().to_string();

    // Launch by clone: the clone boots and sees the snapshot's data.
    let clone1 = format!("{}-c1", g.name);
    g.clones.push(clone1.clone());
    std::os::unix::fs::symlink(
        format!("../instances/{}/.snapshots/q", g.name),
        m.mnt.join("launch").join(&clone1),
    )
    .expect("launch clone1");
    assert_eq!(state(&clone1), "running");
    let parent = rbd_json(&["info", &format!("{POOL}/{clone1}-vda")]);
    assert_eq!(parent["parent"]["snapshot"], "q", "{parent}");
    let sj = json(&snaps.join("q/snapshot.json"));
    assert_eq!(sj["disks"][0]["protected"], true, "{sj}");
    assert_eq!(sj["disks"][0]["children"], 1, "{sj}");
    script_ok("wait-agent.sh", &[&clone1, "120"]);
    let seen = script_ok(
        "guest-exec.sh",
        &[&clone1, "head -n 1 /data/writer.log", "20"],
    );
    assert_eq!(seen.trim(), first_line.trim());

    // rmdir while the clone depends on the snapshot: EBUSY, nothing removed.
    assert_eq!(errno(fs::remove_dir(snaps.join("q"))), libc::EBUSY);
    assert_eq!(ls(&snaps), ["q"]);

    // The clone gone, a second launch with --flatten-on-launch: once flattened, rmdir works
    // while that clone keeps running.
    RbdGuest::remove_domain(&clone1);
    remove_image(&format!("{clone1}-vda"));
    m.unmount();
    let mut flat_args = args.to_vec();
    flat_args.push("--flatten-on-launch");
    m.mount(&flat_args);
    let clone2 = format!("{}-c2", g.name);
    g.clones.push(clone2.clone());
    std::os::unix::fs::symlink(
        format!("../instances/{}/.snapshots/q", g.name),
        m.mnt.join("launch").join(&clone2),
    )
    .expect("launch clone2");
    assert_eq!(state(&clone2), "running");
    wait_for(
        "the clone to be flattened",
        Duration::from_secs(120),
        || {
            rbd_json(&["info", &format!("{POOL}/{clone2}-vda")])
                .get("parent")
                .is_none()
        },
    );
    fs::remove_dir(snaps.join("q")).expect("rmdir q after flatten");
    assert!(ls(&snaps).is_empty());
    let rbd_snaps = rbd_json(&["snap", "ls", &format!("{POOL}/{}", g.image())]);
    assert_eq!(rbd_snaps.as_array().map(Vec::len), Some(0), "{rbd_snaps}");
    assert_eq!(state(&clone2), "running");

    m.unmount();
}

/// Two RBD disks, no freeze: the guest is paused while both RBD snapshots are taken (one
/// crash-consistent point) and resumed; `mv` renames every disk's RBD snapshot and the record.
#[test]
fn rbd_two_disks_unfrozen_snapshot_and_rename() {
    if !ready() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut g = RbdGuest::start("b");
    let vdb = format!("{}-vdb", g.name);
    g.extra.push(vdb.clone());
    rbd(&["create", "--size", "16M", &format!("{POOL}/{vdb}")]);
    let conf = ceph_conf();
    let disk = format!(
        "<disk type='network' device='disk'><driver name='qemu' type='raw'/><source protocol='rbd' name='{POOL}/{vdb}'><config file='{}'/></source><target dev='vdb' bus='virtio'/></disk>",
        conf.display()
    );
    let xml = tempfile::NamedTempFile::new().unwrap();
    fs::write(xml.path(), disk).unwrap();
    let o = virsh(&[
        "attach-device",
        &g.name,
        xml.path().to_str().unwrap(),
        "--live",
        "--persistent",
    ]);
    assert!(
        o.status.success(),
        "attach vdb: {}",
        String::from_utf8_lossy(&o.stderr)
    );

    let libvirt = format!("--libvirt={URI}");
    let m = Mount::with_providers(&[
        libvirt.as_str(),
        "--ceph",
        conf.to_str().unwrap(),
        "--quiesce",
        "off",
    ]);
    let snaps = m.mnt.join("instances").join(&g.name).join(".snapshots");
    fs::create_dir(snaps.join("crash")).expect("mkdir crash");
    assert_eq!(state(&g.name), "running", "guest left paused");
    let sj = json(&snaps.join("crash/snapshot.json"));
    assert_eq!(sj["quiesced"], false, "{sj}");
    assert_eq!(sj["disks"].as_array().map(Vec::len), Some(2), "{sj}");
    assert!(
        m.log().contains("resumed"),
        "no pause around a two-disk unfrozen snapshot:\n{}",
        m.log()
    );
    assert!(!m
        .state_dir()
        .join("paused")
        .read_dir()
        .unwrap()
        .any(|_| true));
    let mut names = ls(&snaps.join("crash"));
    names.sort();
    assert_eq!(
        names,
        ["files", "since", "snapshot.json", "vda.raw", "vdb.raw"]
    );
    assert_eq!(
        fs::metadata(snaps.join("crash/vdb.raw")).unwrap().len(),
        16 << 20
    );

    // mv: both RBD snapshots and the record renamed; names that cannot be are refused.
    fs::rename(snaps.join("crash"), snaps.join("renamed")).expect("mv");
    assert_eq!(ls(&snaps), ["renamed"]);
    for img in [g.image(), vdb.clone()] {
        let v = rbd_json(&["snap", "ls", &format!("{POOL}/{img}")]);
        let names: Vec<&str> = v
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|s| s["name"].as_str())
            .collect();
        assert_eq!(names, ["renamed"], "{img}");
    }
    assert_eq!(
        errno(fs::rename(snaps.join("renamed"), snaps.join("x@y"))),
        libc::EINVAL
    );
    fs::remove_dir(snaps.join("renamed")).expect("rmdir");
    assert!(ls(&snaps).is_empty());
    m.unmount();

    // A daemon killed while the guest was paused: the next start resumes it.
    let uuid = String::from_utf8_lossy(&virsh(&["domuuid", &g.name]).stdout)
        .trim()
        .to_string();
    assert!(virsh(&["suspend", &g.name]).status.success());
    let records = m.state_dir().join("paused");
    fs::write(records.join(&uuid), &g.name).unwrap();
    assert_eq!(state(&g.name), "paused");
    m.mount(&[libvirt.as_str(), "--ceph", conf.to_str().unwrap()]);
    assert_eq!(state(&g.name), "running", "not resumed at start");
    assert!(!records.join(&uuid).exists(), "pause record kept");
    m.unmount();
}

/// sha256 of an RBD image or snapshot's bytes (`rbd export … -`).
fn export_sha(spec: &str) -> String {
    let out = Command::new("rbd")
        .arg("-c")
        .arg(ceph_conf())
        .args(["export", "--no-progress", spec, "-"])
        .output()
        .expect("rbd export");
    assert!(
        out.status.success(),
        "rbd export {spec}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    use sha2::Digest;
    format!("{:x}", sha2::Sha256::digest(&out.stdout))
}

/// A shut-off domain (never booted) on two RBD images made by the test; all removed on drop.
struct ShutOffRbd {
    name: String,
    images: Vec<String>,
}

impl ShutOffRbd {
    fn define(tag: &str) -> ShutOffRbd {
        let name = format!("issue-14r-t{}-{tag}", std::process::id());
        let images = vec![format!("{name}-vda"), format!("{name}-vdb")];
        let d = ShutOffRbd { name, images };
        let conf = ceph_conf();
        let mut disks = String::new();
        for (img, (dev, size)) in d.images.iter().zip([("vda", 16u64), ("vdb", 8)]) {
            // Distinct bytes in every MiB, imported as the image's first state.
            let t = tempfile::NamedTempFile::new().unwrap();
            let data: Vec<u8> = (0..size << 20)
                .map(|i| (i / 4096 % 251) as u8 ^ dev.as_bytes()[2])
                .collect();
            fs::write(t.path(), data).unwrap();
            remove_image(img);
            rbd(&[
                "import",
                "--no-progress",
                t.path().to_str().unwrap(),
                &format!("{POOL}/{img}"),
            ]);
            disks.push_str(&format!(
                "<disk type='network' device='disk'><driver name='qemu' type='raw'/><source protocol='rbd' name='{POOL}/{img}'><config file='{}'/></source><target dev='{dev}' bus='virtio'/></disk>",
                conf.display()
            ));
        }
        let xml = format!(
            "<domain type='qemu'><name>{}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu><os><type arch='x86_64'>hvm</type></os><devices>{disks}</devices></domain>",
            d.name
        );
        let f = tempfile::NamedTempFile::new().unwrap();
        fs::write(f.path(), xml).unwrap();
        let o = virsh(&["define", f.path().to_str().unwrap()]);
        assert!(
            o.status.success(),
            "define {}: {}",
            d.name,
            String::from_utf8_lossy(&o.stderr)
        );
        d
    }

    fn spec(&self, i: usize) -> String {
        format!("{POOL}/{}", self.images[i])
    }

    /// Overwrite 1 MiB of each image's head (`rbd bench`'s random writes).
    fn scribble(&self) {
        for i in 0..self.images.len() {
            rbd(&[
                "bench",
                "--io-type",
                "write",
                "--io-size",
                "64K",
                "--io-total",
                "1M",
                "--io-pattern",
                "rand",
                &self.spec(i),
            ]);
        }
    }

    fn heads(&self) -> Vec<String> {
        (0..self.images.len())
            .map(|i| export_sha(&self.spec(i)))
            .collect()
    }

    fn at(&self, snap: &str) -> Vec<String> {
        (0..self.images.len())
            .map(|i| export_sha(&format!("{}@{snap}", self.spec(i))))
            .collect()
    }
}

impl Drop for ShutOffRbd {
    fn drop(&mut self) {
        let _ = virsh(&["destroy", &self.name]);
        let _ = virsh(&["undefine", &self.name]);
        for i in &self.images {
            // The daemon's handle may keep a watch a little after the unmount: try again.
            for _ in 0..30 {
                remove_image(i);
                let gone = Command::new("rbd")
                    .arg("-c")
                    .arg(ceph_conf())
                    .args(["info", &format!("{POOL}/{i}")])
                    .output()
                    .is_ok_and(|o| !o.status.success());
                if gone {
                    break;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

/// Revert of a shut-off RBD-backed instance through `current`: `rbd_snap_rollback` of every
/// disk, so each head equals its snapshot byte for byte (`rbd export`); the discarded state is
/// kept as `before-revert-…` (RBD snapshots of both disks) and reverting to it brings it back.
/// EBUSY while another client watches a disk (changing nothing); EINVAL once the disk set
/// changed since the snapshot.
#[test]
fn rbd_backed_instance_revert_through_current() {
    if !ready() {
        return;
    }
    let d = ShutOffRbd::define("rev");
    let conf = ceph_conf();
    let libvirt = format!("--libvirt={URI}");
    let m = Mount::with_providers(&[libvirt.as_str(), "--ceph", conf.to_str().unwrap()]);
    let dir = m.mnt.join("instances").join(&d.name);
    fs::create_dir(dir.join(".snapshots/s1")).expect("mkdir s1");
    let s1 = d.at("s1");
    assert_eq!(d.heads(), s1);
    d.scribble();
    let scribbled = d.heads();
    assert_ne!(scribbled, s1, "rbd bench changed nothing");

    // Another client (a running VM, krbd) has vdb open: EBUSY, nothing made or changed.
    let mut watch = Command::new("rbd")
        .arg("-c")
        .arg(&conf)
        .args(["watch", &d.spec(1)])
        // It watches until a line arrives on its stdin: kept open until killed.
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("rbd watch");
    wait_for("the rbd watch", Duration::from_secs(60), || {
        rbd_json(&["status", &d.spec(1)])["watchers"]
            .as_array()
            .is_some_and(|w| !w.is_empty())
    });
    let busy = Command::new("ln")
        .args(["-sfn", ".snapshots/s1", "current"])
        .current_dir(&dir)
        .output()
        .unwrap();
    // A line on its stdin ends the watch cleanly (a killed watcher lingers until it times out).
    {
        use std::io::Write;
        let _ = watch.stdin.take().map(|mut i| i.write_all(b"\n"));
    }
    let _ = watch.wait();
    wait_for("the rbd watch to end", Duration::from_secs(90), || {
        rbd_json(&["status", &d.spec(1)])["watchers"]
            .as_array()
            .is_some_and(|w| w.is_empty())
    });
    assert!(!busy.status.success());
    assert!(
        String::from_utf8_lossy(&busy.stderr).contains("busy"),
        "{}",
        String::from_utf8_lossy(&busy.stderr)
    );
    assert_eq!(ls(&dir.join(".snapshots")), ["s1"]);
    assert_eq!(d.heads(), scribbled);

    run(Command::new("ln")
        .args(["-sfn", ".snapshots/s1", "current"])
        .current_dir(&dir));
    assert_eq!(d.heads(), s1, "heads differ from s1 after the revert");
    assert_eq!(
        fs::read_link(dir.join("current")).unwrap(),
        Path::new(".snapshots/s1")
    );
    assert_eq!(state(&d.name), "shut off");
    let kept: Vec<String> = ls(&dir.join(".snapshots"))
        .into_iter()
        .filter(|n| n.starts_with("before-revert-"))
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(
        d.at(&kept[0]),
        scribbled,
        "before-revert does not hold the discarded state"
    );
    assert!(m.log().contains("rbd rollback of a disk"), "{}", m.log());
    // The kept state's disk reads through the mount as `rbd export` has it.
    assert_eq!(
        sha256_file(&dir.join(".snapshots").join(&kept[0]).join("vdb.raw")),
        scribbled[1]
    );

    // Back to the kept state with mv -T.
    std::os::unix::fs::symlink(format!(".snapshots/{}", kept[0]), dir.join("back")).unwrap();
    run(Command::new("mv")
        .arg("-T")
        .arg(dir.join("back"))
        .arg(dir.join("current")));
    assert_eq!(d.heads(), scribbled);

    // A disk detached since s1: EINVAL, naming it.
    let o = virsh(&["detach-disk", &d.name, "vdb", "--config"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        errno(
            std::os::unix::fs::symlink(".snapshots/s1", dir.join("x"))
                .and_then(|()| { fs::rename(dir.join("x"), dir.join("current")) })
        ),
        libc::EINVAL
    );
    assert!(m.log().contains("disk set changed"), "{}", m.log());
    drop(m);
}

/// kill -9 of the daemon in a revert of an RBD-backed instance (`SNAPFS_FAILPOINT`): just
/// before the rollbacks (nothing rolled back), and between the two disks' rollbacks (vda rolled
/// back, vdb not: a half-reverted instance, its images still open by the dead daemon). An RBD
/// rollback runs in the daemon, so the next daemon does it again at start-up (waiting out the
/// dead daemon's watches). After the restart every disk equals s1 byte for byte, `current` is
/// s1, and `before-revert-…` holds the discarded state.
#[test]
fn kill_during_an_rbd_revert_is_finished_at_restart() {
    if !ready() {
        return;
    }
    for (point, tag) in [
        ("revert-before-backend", "kb"),
        ("revert-rbd-after-a-disk", "kd"),
    ] {
        let d = ShutOffRbd::define(tag);
        let conf = ceph_conf();
        let libvirt = format!("--libvirt={URI}");
        let args = [libvirt.as_str(), "--ceph", conf.to_str().unwrap()];
        let m = Mount::unmounted();
        m.mount_env(&args, &[("SNAPFS_FAILPOINT", point)]);
        let dir = m.mnt.join("instances").join(&d.name);
        fs::create_dir(dir.join(".snapshots/s1")).expect("mkdir s1");
        let s1 = d.at("s1");
        d.scribble();
        let scribbled = d.heads();
        assert!(
            scribbled.iter().zip(&s1).all(|(a, b)| a != b),
            "rbd bench left a disk unchanged"
        );

        m.revert_killed_at_failpoint(&dir, "s1");
        let heads = d.heads();
        if point == "revert-before-backend" {
            assert_eq!(heads, scribbled, "{point}: rolled back before the backend");
        } else {
            assert_eq!(
                (&heads[0], &heads[1]),
                (&s1[0], &scribbled[1]),
                "{point}: not half reverted"
            );
        }
        // Restarted at once: the dead daemon's watches may still be there.
        m.mount(&args);
        assert!(
            m.log()
                .contains("may have stopped part way: doing it again"),
            "{point}: {}",
            m.log()
        );
        eprintln!(
            "{point}: waited for the dead daemon's watches: {}",
            m.log().contains("waiting for the killed daemon's watches")
        );
        assert_eq!(
            d.heads(),
            s1,
            "{point}: heads differ from s1 after the restart"
        );
        assert_eq!(
            fs::read_link(dir.join("current")).unwrap(),
            Path::new(".snapshots/s1"),
            "{point}"
        );
        let kept: Vec<String> = ls(&dir.join(".snapshots"))
            .into_iter()
            .filter(|n| n.starts_with("before-revert-"))
            .collect();
        assert_eq!(kept.len(), 1, "{point}: {kept:?}");
        assert_eq!(d.at(&kept[0]), scribbled, "{point}");
        drop(m);
    }
}

/// A running RBD-backed instance is not reverted: its RBD snapshots hold no memory state, so
/// `EBUSY` (shut it off first), with nothing kept or changed. The domain has no OS (SeaBIOS
/// finds nothing to boot), but it is a TCG guest: run under the guest lock.
#[test]
fn running_rbd_backed_instance_revert_is_ebusy() {
    if !ready() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let d = ShutOffRbd::define("run");
    let conf = ceph_conf();
    let libvirt = format!("--libvirt={URI}");
    let m = Mount::with_providers(&[libvirt.as_str(), "--ceph", conf.to_str().unwrap()]);
    let dir = m.mnt.join("instances").join(&d.name);
    fs::create_dir(dir.join(".snapshots/s1")).expect("mkdir s1");
    d.scribble();
    let before = d.heads();
    let o = virsh(&["start", &d.name]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let busy = Command::new("ln")
        .args(["-sfn", ".snapshots/s1", "current"])
        .current_dir(&dir)
        .output()
        .unwrap();
    let st = state(&d.name);
    let _ = virsh(&["destroy", &d.name]);
    assert_eq!(st, "running");
    assert!(!busy.status.success());
    let err = String::from_utf8_lossy(&busy.stderr).into_owned();
    assert!(err.contains("busy"), "{err}\nlog:\n{}", m.log());
    assert_eq!(ls(&dir.join(".snapshots")), ["s1"]);
    assert_eq!(d.heads(), before);
    drop(m);
}

/// `setfattr -n user.snapfs.memory -v VALUE DIR` (the shell is the interface).
fn set_memory(dir: &Path, value: &str) {
    run(Command::new("setfattr")
        .args(["-n", "user.snapfs.memory", "-v", value])
        .arg(dir));
}

/// Issue 14: a memory snapshot of a running RBD-backed instance (`user.snapfs.memory=on`).
/// mkdir pauses the guest, has libvirt save its CPU and memory state into snapfs's store and
/// takes the RBD snapshot, then resumes it: disk and memory are one instant, and nothing is
/// left on the domain (no libvirt snapshot). `ln -sfn` back to it while the guest runs leaves
/// the guest running from that memory: a counter held only in its tmpfs is back near its
/// value at the snapshot. The discarded state is kept with its memory; a disk-only snapshot of
/// the running guest stays EBUSY; a gone state file is EINVAL; rmdir takes the state along.
#[test]
fn rbd_backed_memory_snapshot_revert_resumes_the_running_guest() {
    if !ready() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let g = RbdGuest::start("mem");
    let conf = ceph_conf();
    let libvirt = format!("--libvirt={URI}");
    let m = Mount::with_providers(&[libvirt.as_str(), "--ceph", conf.to_str().unwrap()]);
    let dir = m.mnt.join("instances").join(&g.name);
    let snaps = dir.join(".snapshots");
    let ln = |target: &str| {
        Command::new("ln")
            .args(["-sfn", target, "current"])
            .current_dir(&dir)
            .output()
            .expect("run ln")
    };
    start_guest_counter(&g.name);
    let before_mkdir = wait_guest_counter_past(&g.name, 0);
    set_memory(&dir, "on");

    let t = Instant::now();
    fs::create_dir(snaps.join("m1")).expect("mkdir m1");
    eprintln!("mkdir with memory (RBD): {} ms", t.elapsed().as_millis());
    assert_eq!(state(&g.name), "running");
    let after_mkdir = guest_counter(&g.name);
    let sj = json(&snaps.join("m1/snapshot.json"));
    assert_eq!(sj["memory"], true, "{sj}");
    assert_eq!(sj["method"], "rbd-snapshot", "{sj}");
    let state_file = PathBuf::from(sj["memory_file"].as_str().expect("memory_file"));
    assert!(
        state_file.starts_with(m.state_dir().join("store")),
        "{} is not in the store",
        state_file.display()
    );
    let size = sj["memory_size"].as_u64().expect("memory_size");
    assert_eq!(fs::metadata(&state_file).unwrap().len(), size, "{sj}");
    assert!(size > 1 << 20, "{sj}");
    let log = m.log();
    assert!(
        log.contains("memory state saved while the guest is paused"),
        "{log}"
    );
    assert!(log.contains("paused_ms"), "{log}");
    // Nothing of it on the domain but our record: no libvirt snapshot, no pause record.
    let listed = virsh(&["snapshot-list", &g.name, "--name"]);
    assert_eq!(String::from_utf8_lossy(&listed.stdout).trim(), "");
    assert_eq!(ls(&m.state_dir().join("paused")), Vec::<String>::new());
    assert_eq!(
        rbd_json(&["snap", "ls", &format!("{POOL}/{}", g.image())])
            .as_array()
            .map(|a| a.len()),
        Some(1)
    );
    // The snapshot's disk reads as `rbd export` of it.
    assert_eq!(
        sha256_file(&snaps.join("m1/vda.raw")),
        export_sha(&format!("{POOL}/{}@m1", g.image()))
    );

    // It counts on; then back to m1 while running.
    let before_revert = wait_guest_counter_past(&g.name, after_mkdir + 100);
    let t = Instant::now();
    let o = ln(".snapshots/m1");
    assert!(
        o.status.success(),
        "{}\nlog:\n{}",
        String::from_utf8_lossy(&o.stderr),
        m.log()
    );
    eprintln!(
        "revert of a running RBD-backed instance to memory: {} ms",
        t.elapsed().as_millis()
    );
    assert_eq!(state(&g.name), "running");
    let after_revert = guest_counter(&g.name);
    eprintln!("counter: {before_mkdir} before mkdir, {after_mkdir} after, {before_revert} before the revert, {after_revert} after");
    assert!(
        after_revert < before_revert && after_revert >= before_mkdir,
        "counter {after_revert} after the revert: not back near the snapshot's ({before_mkdir}..{after_mkdir}; {before_revert} before the revert)"
    );
    assert_eq!(
        fs::read_link(dir.join("current")).unwrap_or_else(|e| panic!(
            "readlink current: {e}\n{:?}\nlog:\n{}",
            ls(&dir),
            m.log()
        )),
        PathBuf::from(".snapshots/m1")
    );
    let kept = ls(&snaps)
        .into_iter()
        .find(|s| s.starts_with("before-revert-"))
        .unwrap_or_else(|| panic!("no before-revert snapshot: {:?}", ls(&snaps)));
    // The discarded state was running with memory=on: kept with its memory too.
    let kj = json(&snaps.join(&kept).join("snapshot.json"));
    assert_eq!(kj["memory"], true, "{kj}");
    let kept_state = PathBuf::from(kj["memory_file"].as_str().expect("memory_file"));
    assert!(kept_state.exists(), "{kj}");

    // A disk-only snapshot of the running guest cannot be reverted to: EBUSY, still running.
    set_memory(&dir, "off");
    fs::create_dir(snaps.join("d1")).expect("mkdir d1");
    assert_eq!(json(&snaps.join("d1/snapshot.json"))["memory"], false);
    let o = ln(".snapshots/d1");
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("busy"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(state(&g.name), "running");

    // A memory snapshot whose state file is gone: EINVAL, nothing kept first, still running.
    let aside = state_file.with_extension("aside");
    fs::rename(&state_file, &aside).expect("move m1's state aside");
    let before = ls(&snaps).len();
    let o = ln(".snapshots/m1");
    fs::rename(&aside, &state_file).expect("put m1's state back");
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("Invalid argument"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(ls(&snaps).len(), before);
    assert_eq!(state(&g.name), "running");

    // rmdir of a memory snapshot takes its state file along (and only its own).
    fs::remove_dir(snaps.join(&kept)).expect("rmdir before-revert");
    assert!(!kept_state.exists(), "{} left behind", kept_state.display());
    assert!(state_file.exists(), "m1's state file went too");
    for s in ["d1", "m1"] {
        fs::remove_dir(snaps.join(s)).unwrap_or_else(|e| panic!("rmdir {s}: {e}"));
    }
    assert!(!state_file.exists(), "{} left behind", state_file.display());
    let left = rbd_json(&["snap", "ls", &format!("{POOL}/{}", g.image())]);
    assert_eq!(left.as_array().map(|a| a.len()), Some(0), "{left}");
    drop(m);
}

/// The undo of a failed mkdir removes its RBD snapshots with removal records (commit 9f7a8b8):
/// mkdir made to fail after the RBD snapshots (`SNAPFS_FAILPOINT=rbd-mkdir-after-snapshots`),
/// the daemon killed inside the undo's first removal (after librbd moved that snapshot to the
/// trash), restarted: the next start finishes that removal (the snapshot and its trash entry
/// are gone, no record left). The second disk's snapshot, whose removal never began, stays
/// visible and removable, as docs/libvirt.md says of a daemon killed before the record.
#[test]
fn kill_in_the_undo_of_a_failed_rbd_mkdir_is_finished_at_restart() {
    if !ready() {
        return;
    }
    let d = ShutOffRbd::define("undo");
    let conf = ceph_conf();
    let libvirt = format!("--libvirt={URI}");
    let args = [libvirt.as_str(), "--ceph", conf.to_str().unwrap()];
    let m = Mount::unmounted();
    m.mount_env(
        &args,
        &[
            ("SNAPFS_FAILPOINT", "rbd-mkdir-after-snapshots"),
            ("SNAPFS_TEST_PAUSE_IN_RBD_SNAP_REMOVE_MS", "600000"),
        ],
    );
    let dir = m.mnt.join("instances").join(&d.name);
    let snap_dir = dir.join(".snapshots/s1");
    let mkdir = std::thread::spawn(move || fs::create_dir(snap_dir));
    let t0 = Instant::now();
    while !m.log().contains("pausing inside the removal") {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "the undo never reached the removal; log:\n{}",
            m.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Killed at once (the removal sleeps for minutes); what it left is checked after.
    let pid = m.daemon_pid().expect("daemon pid");
    // SAFETY: kill(2) of the daemon this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    assert!(wait_gone(pid, Duration::from_secs(10)));
    assert!(
        m.log().contains("failpoint reached: failing here"),
        "{}",
        m.log()
    );
    let trash = |i: usize| rbd_trash_names(&rbd_json(&["snap", "ls", "--all", &d.spec(i)]));
    let user_snaps = |i: usize| -> Vec<String> {
        rbd_json(&["snap", "ls", &d.spec(i)])
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|s| s["name"].as_str().unwrap_or("?").to_string())
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(trash(0), ["s1"], "vda's snapshot is not in the trash");
    let records = m.state_dir().join("rbd-removals");
    assert_eq!(
        ls(&records).len(),
        1,
        "no removal record left by the killed undo"
    );
    assert!(mkdir.join().expect("mkdir thread").is_err());
    m.unmount();
    // Killed inside the undo: vda's snapshot half removed, vdb's untouched.
    assert_eq!(trash(0), ["s1"]);
    assert_eq!(user_snaps(1), ["s1"]);

    m.mount(&args);
    let t0 = Instant::now();
    // Within the time the dead client's watch holds the image (~30 s), and more.
    while !trash(0).is_empty() || !ls(&records).is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(150),
            "the interrupted undo was not finished: trash {:?}, records {:?}; log:\n{}",
            trash(0),
            ls(&records),
            m.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(user_snaps(0), Vec::<String>::new());
    assert!(
        m.log().contains("interrupted removal finished"),
        "{}",
        m.log()
    );
    // No instance snapshot was recorded; vdb's RBD snapshot is the documented leftover.
    assert_eq!(ls(&dir.join(".snapshots")), Vec::<String>::new());
    assert_eq!(user_snaps(1), ["s1"]);
    drop(m);
}

/// CloudStack's rule through the real backends: while a mkdir of an RBD-backed instance is in
/// progress (held at `SNAPFS_FAILPOINT=mkdir-busy` while a file exists), a mkdir of one of its
/// disks as a volume (`volumes/rbd/<image>`) is `EBUSY` (two owners: only their shared storage
/// can refuse it), and the reverse;
/// each goes through once the other is done. Nothing is made by a refused mkdir.
#[test]
fn an_instance_and_its_rbd_volume_snapshots_exclude_each_other() {
    if !ready() {
        return;
    }
    let d = ShutOffRbd::define("bx");
    let conf = ceph_conf();
    let libvirt = format!("--libvirt={URI}");
    let args = [
        libvirt.as_str(),
        "--ceph",
        conf.to_str().unwrap(),
        "--pool",
        POOL,
    ];
    let hold = tempfile::NamedTempFile::new().unwrap();
    let hold_path = hold.path().to_str().unwrap().to_string();
    let m = Mount::unmounted();
    m.mount_env(
        &args,
        &[
            ("SNAPFS_FAILPOINT", "mkdir-busy"),
            ("SNAPFS_FAILPOINT_HOLD", hold_path.as_str()),
        ],
    );
    let inst = m.mnt.join("instances").join(&d.name).join(".snapshots");
    let vol = m
        .mnt
        .join("volumes")
        .join(POOL)
        .join(&d.images[1])
        .join(".snapshots");
    let held = |n: usize| {
        wait_for("a held mkdir", Duration::from_secs(60), || {
            m.log().matches("failpoint reached").count() >= n
        })
    };
    for (round, (first, second)) in [(&inst, &vol), (&vol, &inst)].into_iter().enumerate() {
        fs::write(&hold_path, b"hold").unwrap();
        let path = first.join(format!("a{round}"));
        let t = std::thread::spawn(move || fs::create_dir(&path));
        held(round + 1);
        // Refused at once, or (the bug) held at the failpoint too: then released after 60 s.
        let (tx, rx) = std::sync::mpsc::channel();
        let path = second.join(format!("b{round}"));
        let t2 = std::thread::spawn(move || tx.send(fs::create_dir(&path)));
        let refused = rx.recv_timeout(Duration::from_secs(60));
        fs::remove_file(&hold_path).unwrap();
        let _ = t2.join();
        let refused = refused.expect("the second mkdir was not refused: it waited");
        t.join().unwrap().expect("the held mkdir");
        assert_eq!(errno(refused), libc::EBUSY, "round {round}");
        assert!(!ls(second).contains(&format!("b{round}")), "round {round}");
        // Free again: the same mkdir goes through (the hold file is gone, no pause).
        fs::create_dir(second.join(format!("b{round}"))).expect("mkdir once free");
    }
    assert_eq!(
        rbd_json(&["snap", "ls", &d.spec(1)])
            .as_array()
            .map(|a| a.len()),
        Some(4),
        "vdb holds a0 and b1 (the instance's), b0 and a1 (the volume's)"
    );
    for n in ["a0", "b1"] {
        fs::remove_dir(inst.join(n)).expect("rmdir");
    }
    for n in ["b0", "a1"] {
        fs::remove_dir(vol.join(n)).expect("rmdir");
    }
    drop(m);
}

//! The `libvirt` provider against the real test bed (scripts/testbed, docs/testbed.md):
//! real TCG guests with a GPT + ext4 data disk and a writer loop, through the real mount.
//!
//! Without a reachable test bed the tests print a skip message and pass, unless
//! `SNAPFS_REQUIRE_TESTBED=1` (CI), where they fail. Tests take one lock: at most two
//! guests (a source and its clone) run at a time.

mod common;

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;

const URI: &str = "qemu:///system";
const LIBVIRT_ARG: &str = "--libvirt=qemu:///system";
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn base() -> PathBuf {
    PathBuf::from(
        std::env::var("SNAPFS_TESTBED_DIR").unwrap_or_else(|_| "/var/lib/snapfs-testbed".into()),
    )
}

/// Whether the test bed is there; panics when it is required and missing.
fn testbed_ready(test: &str) -> bool {
    let guest = base().join("guest");
    let mut missing = Vec::new();
    for f in ["vmlinuz", "initrd.img", "cmdline", "demo-disk.qcow2"] {
        if !guest.join(f).exists() {
            missing.push(format!("{} missing", guest.join(f).display()));
        }
    }
    if !testbed_scripts().join("define-guest.sh").exists() {
        missing.push("scripts/testbed missing".into());
    }
    let virsh = Command::new("virsh").args(["-c", URI, "version"]).output();
    if !virsh.is_ok_and(|o| o.status.success()) {
        missing.push(format!("libvirt at {URI} not reachable"));
    }
    if missing.is_empty() {
        return true;
    }
    let why = missing.join("; ");
    if std::env::var("SNAPFS_REQUIRE_TESTBED").as_deref() == Ok("1") {
        panic!("test bed required (SNAPFS_REQUIRE_TESTBED=1) but not ready: {why} (run scripts/testbed/up.sh)");
    }
    // Straight to the stderr stream: the harness captures eprintln! of passing tests.
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "SKIP {test}: test bed not ready: {why} (scripts/testbed/up.sh brings it up)"
    );
    false
}

/// Destroy and undefine a domain we made, with its snapshot metadata and files.
fn remove_domain(name: &str) {
    let _ = virsh(&["destroy", name]);
    let snaps = virsh(&["snapshot-list", name, "--name"]);
    for s in String::from_utf8_lossy(&snaps.stdout).lines() {
        if !s.trim().is_empty() {
            let _ = virsh(&["snapshot-delete", name, s.trim(), "--metadata"]);
        }
    }
    let _ = virsh(&["undefine", name, "--nvram"]);
    let _ = virsh(&["undefine", name]);
    let prefix = format!("{name}.");
    if let Ok(rd) = fs::read_dir(base().join("images")) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    let _ = fs::remove_file(base().join("run").join(format!("{name}.ctl")));
    let _ = fs::remove_file(format!("/var/log/snapfs-testbed/{name}.console.log"));
}

/// A test guest `lv-…` of our own, removed on drop.
struct Guest {
    name: String,
}

impl Guest {
    fn define(name: &str) -> Guest {
        remove_domain(name);
        let outdir = base().join("guest");
        script_ok("define-guest.sh", &[name, outdir.to_str().unwrap()]);
        Guest { name: name.into() }
    }

    fn start(&self) {
        script_ok(
            "define-guest.sh",
            &[
                "--start",
                &self.name,
                base().join("guest").to_str().unwrap(),
            ],
        );
        self.wait_ready();
    }

    fn wait_ready(&self) {
        script_ok("wait-agent.sh", &[&self.name, "120"]);
        // The writer loop runs once /data is mounted; wait until it has written.
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.writer_seq().is_none() {
            assert!(
                Instant::now() < deadline,
                "writer of {} never started",
                self.name
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn uuid(&self) -> String {
        let o = virsh(&["domuuid", &self.name]);
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    }

    /// The control port's status line (works without the agent).
    fn status(&self) -> String {
        script_ok("guest-ctl.sh", &[&self.name, "status"])
    }

    fn frozen(&self) -> bool {
        self.status().contains("frozen=1")
    }

    /// Last sequence number of the guest's writer loop.
    fn writer_seq(&self) -> Option<u64> {
        let st = script("guest-ctl.sh", &[&self.name, "status"]);
        let st = String::from_utf8_lossy(&st.stdout).into_owned();
        let w = st
            .split_whitespace()
            .find_map(|f| f.strip_prefix("writer="))?;
        w.split('/').next()?.parse().ok()
    }

    /// The writer keeps going: its sequence grows within `within`.
    fn assert_writes_go_on(&self, within: Duration) {
        let a = self.writer_seq().expect("writer seq");
        let deadline = Instant::now() + within;
        loop {
            std::thread::sleep(Duration::from_millis(200));
            if self.writer_seq().is_some_and(|b| b > a) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{}: guest writer stuck at {a}",
                self.name
            );
        }
    }

    fn exec(&self, cmd: &str) -> String {
        script_ok("guest-exec.sh", &[&self.name, cmd, "20"])
    }

    fn agent(&self, json: &str) -> String {
        let o = virsh(&["qemu-agent-command", &self.name, json, "--timeout", "10"]);
        assert!(
            o.status.success(),
            "agent {json}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn state(&self) -> String {
        String::from_utf8_lossy(&virsh(&["domstate", &self.name]).stdout)
            .trim()
            .to_string()
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        // Never leave a test guest frozen or paused agent behind, whatever happened.
        let _ = script("guest-ctl.sh", &[&self.name, "agent-resume"]);
        remove_domain(&self.name);
    }
}

fn guest_name(tag: &str) -> String {
    format!("lv-t{}-{tag}", std::process::id())
}

fn instance_dir(m: &Mount, name: &str) -> PathBuf {
    m.mnt.join("instances").join(name)
}

fn snap_dir(m: &Mount, name: &str, snap: &str) -> PathBuf {
    instance_dir(m, name).join(".snapshots").join(snap)
}

fn json(p: &Path) -> serde_json::Value {
    let b = fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
    serde_json::from_slice(&b).unwrap_or_else(|e| panic!("parse {}: {e}", p.display()))
}

/// Wait until `ls instances` shows (or stops showing) `name`.
fn wait_listed(m: &Mount, name: &str, listed: bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while ls(&m.mnt.join("instances")).iter().any(|n| n == name) != listed {
        assert!(
            Instant::now() < deadline,
            "instances/{name} listed={} expected",
            !listed
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn read_at(f: &mut fs::File, off: u64, buf: &mut [u8]) {
    use std::os::unix::fs::FileExt;
    f.read_exact_at(buf, off).expect("read_at");
}

/// The ext4 `needs_recovery` flag (incompat 0x4) of partition 1 of a GPT disk image file.
fn ext4_needs_recovery(disk: &Path) -> bool {
    let mut f = fs::File::open(disk).expect("open disk");
    let mut hdr = [0u8; 92];
    read_at(&mut f, 512, &mut hdr);
    assert_eq!(
        &hdr[..8],
        b"EFI PART",
        "no GPT header in {}",
        disk.display()
    );
    let entries_lba = u64::from_le_bytes(hdr[72..80].try_into().unwrap());
    let mut entry = [0u8; 128];
    read_at(&mut f, entries_lba * 512, &mut entry);
    let first_lba = u64::from_le_bytes(entry[32..40].try_into().unwrap());
    assert!(first_lba > 0, "partition 1 missing");
    let mut sb = [0u8; 1024];
    read_at(&mut f, first_lba * 512 + 1024, &mut sb);
    assert_eq!(
        u16::from_le_bytes([sb[56], sb[57]]),
        0xEF53,
        "no ext4 superblock"
    );
    let incompat = u32::from_le_bytes(sb[96..100].try_into().unwrap());
    incompat & 0x4 != 0
}

fn digest(p: &Path) -> u64 {
    use std::hash::Hasher;
    let mut f = fs::File::open(p).expect("open");
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        h.write(&buf[..n]);
    }
    h.finish()
}

fn lock() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn mkdir_quiesced_while_guest_writes_and_bytes_stay() {
    if !testbed_ready("mkdir_quiesced_while_guest_writes_and_bytes_stay") {
        return;
    }
    let _one = lock();
    let name = guest_name("q");
    let m = Mount::with_providers(&[LIBVIRT_ARG]);
    // A domain defined after the mount shows up (listing TTL 200 ms), running or not.
    let g = Guest::define(&name);
    wait_listed(&m, &name, true);
    let info = json(&instance_dir(&m, &name).join("instance.json"));
    assert_eq!(info["state"], "shut off");
    assert_eq!(info["agent"], "not running");
    // A shut-off domain: a disk-only snapshot without the agent; the guest then boots on
    // the overlay it created.
    fs::create_dir(snap_dir(&m, &name, "off")).expect("mkdir off (shut off)");
    let sj = json(&snap_dir(&m, &name, "off").join("snapshot.json"));
    assert_eq!(sj["quiesced"], false, "{sj}");
    assert!(!ext4_needs_recovery(
        &snap_dir(&m, &name, "off").join("vda.raw")
    ));
    // A name libvirt refuses ('/', written %2F in the tree) is EINVAL, not EIO.
    assert_eq!(
        errno(fs::create_dir(snap_dir(&m, &name, "a%2Fb"))),
        libc::EINVAL
    );
    g.start();
    let info = json(&instance_dir(&m, &name).join("instance.json"));
    assert_eq!(info["state"], "running", "{info}");
    assert_eq!(info["agent"], "reachable", "{info}");
    assert_eq!(info["disks"][0]["target"], "vda");
    assert_eq!(info["disks"][0]["format"], "qcow2");
    assert_eq!(info["disks"][0]["size"], 64 << 20);
    assert_eq!(info["uuid"], g.uuid().as_str());

    // Quiesced snapshot while the writer loop runs.
    std::thread::sleep(Duration::from_secs(1));
    let t = Instant::now();
    fs::create_dir(snap_dir(&m, &name, "s1")).expect("mkdir s1");
    eprintln!("mkdir s1 (quiesced): {} ms", t.elapsed().as_millis());
    assert!(!g.frozen(), "guest left frozen after mkdir");
    assert!(fs::read_dir(m.state_dir().join("frozen"))
        .unwrap()
        .next()
        .is_none());
    let sj = json(&snap_dir(&m, &name, "s1").join("snapshot.json"));
    assert_eq!(sj["quiesced"], true, "{sj}");
    assert_eq!(sj["memory"], false);
    assert_eq!(sj["disks"][0]["target"], "vda");
    // (main's restore layer adds files/ next to these)
    let entries = ls(&snap_dir(&m, &name, "s1"));
    assert!(
        entries.contains(&"snapshot.json".to_string()) && entries.contains(&"vda.raw".to_string()),
        "{entries:?}"
    );
    let vda = snap_dir(&m, &name, "s1").join("vda.raw");
    assert_eq!(fs::metadata(&vda).unwrap().len(), 64 << 20);
    assert!(
        !ext4_needs_recovery(&vda),
        "quiesced snapshot's ext4 needs recovery"
    );
    // The guest's own files, read natively from the snapshot (files/): the writer's log is
    // whole, line by line, in a quiesced snapshot.
    let p1 = snap_dir(&m, &name, "s1").join("files/vda/p1");
    assert_eq!(
        fs::read_to_string(p1.join("hello.txt")).unwrap(),
        "hello from the snapfs test guest\n"
    );
    let last = writer_log_seq(&p1.join("writer.log"), true);
    eprintln!("quiesced snapshot s1: files/vda/p1/writer.log ends at line {last}");
    // The fact survives in libvirt's own metadata.
    let desc = virsh(&["snapshot-dumpxml", &name, "s1"]);
    assert!(String::from_utf8_lossy(&desc.stdout).contains("snapfs: quiesced=true"));

    // The snapshot's bytes do not change while the guest keeps writing to its overlay.
    let before = digest(&vda);
    g.exec("dd if=/dev/urandom of=/data/more bs=64k count=16 2>/dev/null && sync");
    g.assert_writes_go_on(Duration::from_secs(5));
    assert_eq!(digest(&vda), before, "snapshot bytes changed (same mount)");
    m.unmount();
    m.mount(&[LIBVIRT_ARG]);
    assert_eq!(
        digest(&vda),
        before,
        "snapshot bytes changed (fresh mount, no page cache)"
    );

    // Crash-consistent (--quiesce off) for comparison: recorded as such; report the flag.
    m.unmount();
    m.mount(&[LIBVIRT_ARG, "--quiesce", "off"]);
    fs::create_dir(snap_dir(&m, &name, "c1")).expect("mkdir c1");
    let sj = json(&snap_dir(&m, &name, "c1").join("snapshot.json"));
    assert_eq!(sj["quiesced"], false);
    let dirty = ext4_needs_recovery(&snap_dir(&m, &name, "c1").join("vda.raw"));
    eprintln!("crash-consistent snapshot c1: ext4 needs_recovery = {dirty} (typically true)");
    // Its files still read (the journal is replayed in memory), up to a possibly torn last line.
    let c1 = snap_dir(&m, &name, "c1").join("files/vda/p1");
    let last_c1 = writer_log_seq(&c1.join("writer.log"), false);
    eprintln!("crash-consistent snapshot c1: files/vda/p1/writer.log ends at line {last_c1}");

    // Internal snapshots made by others (virsh without --disk-only) are listed and readable.
    let o = virsh(&["snapshot-create-as", &name, "i1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        ls(&instance_dir(&m, &name).join(".snapshots")),
        ["c1", "i1", "off", "s1"]
    );
    let sj = json(&snap_dir(&m, &name, "i1").join("snapshot.json"));
    assert_eq!(sj["disks"][0]["kind"], "internal", "{sj}");
    let img = sj["disks"][0]["source"].as_str().unwrap().to_string();
    let reference = m.dir.path().join("i1.raw");
    qemu_img(&[
        "convert",
        "-U",
        "-O",
        "raw",
        "-l",
        "snapshot.name=i1",
        &img,
        reference.to_str().unwrap(),
    ]);
    assert_eq!(
        first_difference(&snap_dir(&m, &name, "i1").join("vda.raw"), &reference),
        None
    );
    // Launch from the internal snapshot: the clone runs on a sparse raw copy, byte-equal.
    let clone = format!("{name}-i");
    remove_domain(&clone);
    std::os::unix::fs::symlink(
        format!("../instances/{name}/.snapshots/i1"),
        m.mnt.join("launch").join(&clone),
    )
    .expect("launch from an internal snapshot");
    let copy = base()
        .join("images")
        .join(format!("{clone}.launch.vda.raw"));
    let st = String::from_utf8_lossy(&virsh(&["domstate", &clone]).stdout).into_owned();
    let copy_len = fs::metadata(&copy).map(|md| md.len());
    remove_domain(&clone);
    assert_eq!(st.trim(), "running");
    assert_eq!(
        copy_len.ok(),
        Some(
            fs::metadata(snap_dir(&m, &name, "i1").join("vda.raw"))
                .unwrap()
                .len()
        )
    );
    fs::remove_file(&reference).unwrap();
    fs::remove_dir(snap_dir(&m, &name, "i1")).expect("rmdir i1");

    // rmdir (no dependents): gone at once; the guest still writes.
    fs::remove_dir(snap_dir(&m, &name, "c1")).expect("rmdir c1");
    fs::remove_dir(snap_dir(&m, &name, "s1")).expect("rmdir s1");
    fs::remove_dir(snap_dir(&m, &name, "off")).expect("rmdir off");
    assert!(ls(&instance_dir(&m, &name).join(".snapshots")).is_empty());
    g.assert_writes_go_on(Duration::from_secs(5));
    // Removed outside: gone from the tree.
    drop(g);
    wait_listed(&m, &name, false);
}

#[test]
fn agent_down_require_times_out_prefer_falls_back() {
    if !testbed_ready("agent_down_require_times_out_prefer_falls_back") {
        return;
    }
    let _one = lock();
    let name = guest_name("a");
    let g = Guest::define(&name);
    g.start();
    // A long listing TTL: once instance.json is read, a mkdir sends no guest-ping first (a
    // ping that times out on a hung agent makes libvirt resync, and then the sync, not the
    // freeze, is what times out: the late-freeze case would not be exercised).
    let m = Mount::with_providers(&[
        LIBVIRT_ARG,
        "--quiesce",
        "require",
        "--freeze-timeout",
        "3",
        "--list-ttl-ms",
        "60000",
    ]);
    let limit = Duration::from_millis(3000 + 1500);
    let frozen_dir = m.state_dir().join("frozen");

    // Agent killed in the guest.
    script_ok("guest-agent-kill.sh", &[&name, "600"]);
    let t = Instant::now();
    let e = errno(fs::create_dir(snap_dir(&m, &name, "k1")));
    let took = t.elapsed();
    eprintln!(
        "require + agent killed: errno {e} after {} ms",
        took.as_millis()
    );
    assert_eq!(e, libc::ETIMEDOUT);
    assert!(took < limit, "took {took:?}");
    assert!(!g.frozen());
    assert!(fs::read_dir(&frozen_dir).unwrap().next().is_none());
    g.assert_writes_go_on(Duration::from_secs(5));

    // Agent hung (SIGSTOP): the freeze does not answer. libvirt either blocks (its default)
    // or gives up after its own agent timeout with the freeze queued in the channel; either
    // way the guest freezes when the agent resumes ("late freeze"), and snapfs must thaw it.
    for (case, libvirt_timeout) in [
        ("hung agent, libvirt blocks", "-2"),
        ("hung agent, libvirt agent timeout 2 s", "2"),
    ] {
        let o = virsh(&["guest-agent-timeout", &name, "--timeout", libvirt_timeout]);
        assert!(o.status.success());
        script_ok("guest-agent-start.sh", &[&name, "30"]);
        let _ = json(&instance_dir(&m, &name).join("instance.json"));
        let late = |log: String| {
            log.matches("late freeze undone").count()
                + log
                    .matches("freeze returned after its deadline: guest thawed")
                    .count()
        };
        let late_before = late(m.log());
        script_ok("guest-agent-kill.sh", &["--hang", &name]);
        let t = Instant::now();
        let e = errno(fs::create_dir(snap_dir(&m, &name, "h1")));
        let took = t.elapsed();
        eprintln!("require + {case}: errno {e} after {} ms", took.as_millis());
        assert_eq!(e, libc::ETIMEDOUT, "{case}");
        assert!(took < limit, "{case}: took {took:?}");
        assert!(!g.frozen(), "{case}: frozen while the agent is stopped");
        g.assert_writes_go_on(Duration::from_secs(5));
        std::thread::sleep(Duration::from_secs(1));
        // The agent comes back: the guest ends thawed and the record goes.
        script_ok("guest-agent-start.sh", &[&name, "30"]);
        let deadline = Instant::now() + Duration::from_secs(30);
        while fs::read_dir(&frozen_dir).unwrap().next().is_some() {
            assert!(
                Instant::now() < deadline,
                "{case}: freeze record never resolved"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
        assert!(!g.frozen(), "{case}: guest left frozen");
        assert!(g
            .agent(r#"{"execute":"guest-fsfreeze-status"}"#)
            .contains("thawed"));
        g.assert_writes_go_on(Duration::from_secs(5));
        eprintln!(
            "{case}: late freezes seen and thawed by snapfs: {}",
            late(m.log()) - late_before
        );
    }
    let o = virsh(&["guest-agent-timeout", &name, "--timeout", "-2"]);
    assert!(o.status.success());
    assert!(ls(&instance_dir(&m, &name).join(".snapshots")).is_empty());

    // prefer: a crash-consistent snapshot that says so.
    m.unmount();
    m.mount(&[LIBVIRT_ARG, "--quiesce", "prefer", "--freeze-timeout", "3"]);
    script_ok("guest-agent-kill.sh", &[&name, "600"]);
    fs::create_dir(snap_dir(&m, &name, "p1")).expect("mkdir p1 with prefer");
    let sj = json(&snap_dir(&m, &name, "p1").join("snapshot.json"));
    assert_eq!(sj["quiesced"], false, "{sj}");
    assert!(!g.frozen());
    let desc = virsh(&["snapshot-dumpxml", &name, "p1"]);
    assert!(String::from_utf8_lossy(&desc.stdout).contains("snapfs: quiesced=false"));
}

#[test]
fn restart_thaws_a_guest_left_frozen() {
    if !testbed_ready("restart_thaws_a_guest_left_frozen") {
        return;
    }
    let _one = lock();
    let name = guest_name("r");
    let g = Guest::define(&name);
    g.start();
    // What a daemon killed with -9 between freeze and thaw leaves: a frozen guest and a record.
    let m = Mount::unmounted();
    let frozen_dir = m.state_dir().join("frozen");
    fs::create_dir_all(&frozen_dir).unwrap();
    let uuid = g.uuid();
    fs::write(
        frozen_dir.join(&uuid),
        format!(r#"{{"domain":"{name}","uuid":"{uuid}","pid":1,"since":"x"}}"#),
    )
    .unwrap();
    let o = virsh(&["domfsfreeze", &name]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(g.frozen());

    m.mount(&[LIBVIRT_ARG]);
    assert!(
        g.agent(r#"{"execute":"guest-fsfreeze-status"}"#)
            .contains("thawed"),
        "guest still frozen after restart; log:\n{}",
        m.log()
    );
    assert!(!frozen_dir.join(&uuid).exists(), "record kept");
    // A guest write completes.
    let out = g.exec("echo recovered > /data/after-restart && sync && cat /data/after-restart");
    assert_eq!(out.trim(), "recovered");
    g.assert_writes_go_on(Duration::from_secs(5));
    assert!(m.log().contains("guest left frozen by a previous daemon"));
}

/// SIGTERM while a mkdir waits on a hung agent: the daemon unmounts at once but exits only
/// after the operation in flight has finished, so the freeze that lands once the agent
/// resumes is thawed (and its record removed) before the process goes.
#[test]
fn sigterm_during_freeze_leaves_guest_thawed() {
    if !testbed_ready("sigterm_during_freeze_leaves_guest_thawed") {
        return;
    }
    let _one = lock();
    let name = guest_name("t");
    let g = Guest::define(&name);
    g.start();
    let m = Mount::with_providers(&[
        LIBVIRT_ARG,
        "--quiesce",
        "require",
        "--freeze-timeout",
        "8",
        "--list-ttl-ms",
        "60000",
    ]);
    let frozen_dir = m.state_dir().join("frozen");
    let _ = json(&instance_dir(&m, &name).join("instance.json"));
    let pid = m.daemon_pid().expect("daemon pid");
    script_ok("guest-agent-kill.sh", &["--hang", &name]);
    let dir = snap_dir(&m, &name, "term");
    let mk = std::thread::spawn(move || fs::create_dir(dir));
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        fs::read_dir(&frozen_dir).unwrap().next().is_some(),
        "no freeze in flight"
    );
    // SAFETY: plain kill(2) of the daemon we started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    std::thread::sleep(Duration::from_millis(1000));
    assert!(pid_alive(pid), "daemon exited with a freeze in flight");
    script_ok("guest-agent-start.sh", &[&name, "30"]);
    assert!(
        wait_gone(pid, Duration::from_secs(30)),
        "daemon did not exit after SIGTERM"
    );
    let _ = mk.join();
    assert!(!g.frozen(), "guest left frozen; log:\n{}", m.log());
    assert!(
        fs::read_dir(&frozen_dir).unwrap().next().is_none(),
        "freeze record left behind"
    );
    g.assert_writes_go_on(Duration::from_secs(5));
    assert!(!m.is_mounted());
}

#[test]
fn launch_boots_clone_and_rmdir_waits_for_it() {
    if !testbed_ready("launch_boots_clone_and_rmdir_waits_for_it") {
        return;
    }
    let _one = lock();
    let name = guest_name("l");
    let clone = format!("{name}-copy");
    remove_domain(&clone);
    let g = Guest::define(&name);
    g.start();
    let m = Mount::with_providers(&[LIBVIRT_ARG]);
    g.exec("echo before > /data/marker && sync");
    fs::create_dir(snap_dir(&m, &name, "s1")).expect("mkdir s1");
    g.exec("echo after > /data/marker && sync");

    let link = m.mnt.join("launch").join(&clone);
    let target = format!("../instances/{name}/.snapshots/s1");
    let t = Instant::now();
    std::os::unix::fs::symlink(&target, &link).expect("ln -s");
    eprintln!("launch (ln -s to running): {} ms", t.elapsed().as_millis());
    let c = Guest {
        name: clone.clone(),
    };
    assert_eq!(c.state(), "running");
    assert_eq!(fs::read_link(&link).unwrap(), PathBuf::from(&target));
    assert!(instance_dir(&m, &clone).join("instance.json").exists());
    let ci = json(&instance_dir(&m, &clone).join("instance.json"));
    assert_eq!(ci["launched_from"]["snapshot"], "s1");
    assert_ne!(ci["uuid"], g.uuid().as_str());
    // EEXIST for a taken name.
    assert_eq!(
        errno(std::os::unix::fs::symlink(&target, &link)),
        libc::EEXIST
    );

    // The clone boots and sees the data as of the snapshot.
    c.wait_ready();
    assert_eq!(c.exec("cat /data/marker").trim(), "before");
    assert_eq!(g.exec("cat /data/marker").trim(), "after");

    // The record lives in the domain: a new daemon lists it.
    m.unmount();
    m.mount(&[LIBVIRT_ARG]);
    assert_eq!(ls(&m.mnt.join("launch")), vec![clone.to_string()]);

    // rmdir is refused while the clone depends on the snapshot's image, running or shut off.
    assert_eq!(
        errno(fs::remove_dir(snap_dir(&m, &name, "s1"))),
        libc::EBUSY
    );
    let o = virsh(&["destroy", &clone]);
    assert!(o.status.success());
    assert_eq!(c.state(), "shut off");
    assert_eq!(
        errno(fs::remove_dir(snap_dir(&m, &name, "s1"))),
        libc::EBUSY
    );
    // Forgetting the launch keeps the domain and its disks: still refused.
    fs::remove_file(&link).expect("rm launch link");
    assert!(ls(&m.mnt.join("launch")).is_empty());
    assert_eq!(c.state(), "shut off");
    assert_eq!(
        errno(fs::remove_dir(snap_dir(&m, &name, "s1"))),
        libc::EBUSY
    );

    // Once the clone is gone, rmdir works and the source keeps writing.
    drop(c);
    wait_listed(&m, &clone, false);
    fs::remove_dir(snap_dir(&m, &name, "s1")).expect("rmdir s1");
    assert!(ls(&instance_dir(&m, &name).join(".snapshots")).is_empty());
    g.assert_writes_go_on(Duration::from_secs(5));
    assert_eq!(g.exec("cat /data/marker").trim(), "after");
}

/// A transient libvirt storage pool of our own, destroyed on drop.
struct Pool(String);

impl Drop for Pool {
    fn drop(&mut self) {
        let _ = virsh(&["pool-destroy", &self.0]);
    }
}

#[test]
fn storage_pool_volumes_behave_like_images() {
    if !testbed_ready("storage_pool_volumes_behave_like_images") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let vol = t.path().join("vol1.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", vol.to_str().unwrap(), "16M"]);
    qemu_io(&vol, "write -P 0xab 0 1M");
    let pool = Pool(format!("lv-tp{}", std::process::id()));
    let o = virsh(&[
        "pool-create-as",
        &pool.0,
        "dir",
        "--target",
        t.path().to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let m = Mount::with_providers(&[LIBVIRT_ARG]);
    assert!(ls(&m.mnt.join("volumes")).contains(&pool.0));
    let v = m.mnt.join("volumes").join(&pool.0).join("vol1.qcow2");
    assert_eq!(ls(&v), [".snapshots", "volume.json"]);
    fs::create_dir(v.join(".snapshots/v1")).expect("mkdir volume snapshot");
    qemu_io(&vol, "write -P 0xcd 0 64k");
    let disk = v.join(".snapshots/v1/disk.raw");
    let mut head = [0u8; 4];
    fs::File::open(&disk)
        .unwrap()
        .read_exact(&mut head)
        .unwrap();
    assert_eq!(
        head, [0xab; 4],
        "snapshot shows the bytes before the later write"
    );
    fs::remove_dir(v.join(".snapshots/v1")).expect("rmdir volume snapshot");
    assert!(ls(&v.join(".snapshots")).is_empty());
    drop(pool);
    let deadline = Instant::now() + Duration::from_secs(5);
    while ls(&m.mnt.join("volumes"))
        .iter()
        .any(|p| p.starts_with("lv-tp"))
    {
        assert!(Instant::now() < deadline, "destroyed pool still listed");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Issue 15 on the guest: 50 MiB the guest writes (and syncs) between two quiesced snapshots
/// all lie in `since/s1/vda.extents.json`; every 4 KiB block that differs between s1's and s2's
/// disks is inside a reported extent, applying the extents with `since/s1/vda.raw`'s bytes to s1
/// gives s2, and the over-report (reported / really changed bytes) is printed.
#[test]
fn since_covers_what_the_guest_wrote_between_two_snapshots() {
    if !testbed_ready("since_covers_what_the_guest_wrote_between_two_snapshots") {
        return;
    }
    let _one = lock();
    let name = guest_name("since");
    let m = Mount::with_providers(&[LIBVIRT_ARG]);
    let g = Guest::define(&name);
    g.start();
    wait_listed(&m, &name, true);
    fs::create_dir(snap_dir(&m, &name, "s1")).expect("mkdir s1");
    let out = script_ok(
        "guest-exec.sh",
        &[
            &name,
            "dd if=/dev/urandom of=/data/since50 bs=1M count=50 conv=fsync 2>&1; sync",
            "300",
        ],
    );
    assert!(out.contains("50+0 records out"), "guest dd: {out}");
    fs::create_dir(snap_dir(&m, &name, "s2")).expect("mkdir s2");
    let s2 = snap_dir(&m, &name, "s2");
    let since = s2.join("since/s1");
    let ext: Vec<serde_json::Value> =
        serde_json::from_slice(&fs::read(since.join("vda.extents.json")).expect("read json"))
            .expect("extents json");
    let extents: Vec<(u64, u64)> = ext
        .iter()
        .map(|e| {
            let off = e["offset"].as_u64().expect("offset");
            (off, off + e["length"].as_u64().expect("length"))
        })
        .collect();
    let old = fs::read(snap_dir(&m, &name, "s1").join("vda.raw")).expect("read s1");
    let new = fs::read(s2.join("vda.raw")).expect("read s2");
    let delta = fs::read(since.join("vda.raw")).expect("read since/s1");
    assert_eq!(new.len(), delta.len());
    let covered = |a: u64, b: u64| extents.iter().any(|&(s, e)| s <= a && b <= e);
    let mut changed = 0u64;
    for (i, (x, y)) in old.chunks(4096).zip(new.chunks(4096)).enumerate() {
        if x != y {
            let a = i as u64 * 4096;
            assert!(
                covered(a, a + x.len() as u64),
                "block at {a} changed but is in no extent"
            );
            changed += x.len() as u64;
        }
    }
    let reported: u64 = extents.iter().map(|(s, e)| e - s).sum();
    assert!(
        changed >= 50 << 20,
        "only {changed} bytes differ after the guest wrote 50 MiB"
    );
    let mut applied = old.clone();
    applied.resize(new.len(), 0);
    for &(s, e) in &extents {
        applied[s as usize..e as usize].copy_from_slice(&delta[s as usize..e as usize]);
    }
    assert!(applied == new, "s1 + since/s1 extents is not s2");
    eprintln!(
        "since/s1 after 50 MiB in the guest: {changed} bytes changed, {reported} reported, \
         over-report {:.2}x",
        reported as f64 / changed as f64
    );
}

#[test]
fn mkdir_on_two_instances_at_once() {
    if !testbed_ready("mkdir_on_two_instances_at_once") {
        return;
    }
    let _one = lock();
    let (a, b) = (guest_name("pa"), guest_name("pb"));
    let ga = Guest::define(&a);
    let gb = Guest::define(&b);
    ga.start();
    gb.start();
    let m = Mount::with_providers(&[LIBVIRT_ARG, "-vv"]);
    let barrier = std::sync::Barrier::new(2);
    let results: Vec<(String, std::io::Result<()>, Duration)> = std::thread::scope(|s| {
        let hs: Vec<_> = [&a, &b]
            .into_iter()
            .map(|n| {
                let (m, barrier) = (&m, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    let t = Instant::now();
                    let r = fs::create_dir(snap_dir(m, n, "s1"));
                    (n.clone(), r, t.elapsed())
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (n, r, took) in &results {
        eprintln!(
            "parallel mkdir {n}: {:?} in {} ms",
            r.as_ref().map_err(|e| e.to_string()),
            took.as_millis()
        );
        assert!(r.is_ok(), "{n}: {r:?}");
        assert_eq!(
            json(&snap_dir(&m, n, "s1").join("snapshot.json"))["quiesced"],
            true
        );
    }
    assert!(!ga.frozen() && !gb.frozen());
    // Whether both guests were frozen at the same time (the daemon has no global lock).
    let log = m.log();
    let events: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("guest frozen") || l.contains("guest thawed domain"))
        .collect();
    let overlapped = events.len() >= 2
        && events[0].contains("guest frozen")
        && events[1].contains("guest frozen");
    eprintln!("both guests frozen at once: {overlapped}");
}

/// The last sequence number of the guest writer's log (`<seq> <ms>` lines).
/// `whole`: every line must be complete; otherwise the last one may be torn.
fn writer_log_seq(path: &std::path::Path, whole: bool) -> u64 {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let lines: Vec<&str> = text.lines().collect();
    assert!(!lines.is_empty(), "{}: empty", path.display());
    let mut last = 0;
    for (i, l) in lines.iter().enumerate() {
        let parsed: Option<(u64, u64)> = l
            .split_once(' ')
            .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)));
        match parsed {
            // seq starts again at each guest boot: only the shape is checked.
            Some((seq, _)) => last = seq,
            None if !whole && i + 1 == lines.len() => {}
            None => panic!("{}: line {i} is not a writer line: {l:?}", path.display()),
        }
    }
    if whole {
        assert!(text.ends_with('\n'), "{}: last line torn", path.display());
    }
    last
}

/// Issue 14 on instances: `ln -sfn .snapshots/s1 current` reverts a shut-off instance (libvirt
/// gives it new overlays on s1's images), after keeping the state being discarded as
/// `before-revert-…`; a running instance with a disk-only snapshot is EBUSY; the revert is
/// itself undone through `mv -T`.
#[test]
fn revert_through_current_on_a_shut_off_instance() {
    if !testbed_ready("revert_through_current_on_a_shut_off_instance") {
        return;
    }
    let _one = lock();
    let name = guest_name("rv");
    let g = Guest::define(&name);
    g.start();
    let m = Mount::with_providers(&[LIBVIRT_ARG]);
    let dir = instance_dir(&m, &name);
    g.exec("echo A > /data/markA && sync");
    fs::create_dir(snap_dir(&m, &name, "s1")).expect("mkdir s1");
    assert_eq!(
        fs::read_link(dir.join("current")).expect("current after mkdir"),
        PathBuf::from(".snapshots/s1")
    );
    g.exec("echo B > /data/markB && sync");

    // Running, and s1 holds no memory: EBUSY, and nothing is kept.
    let ln = |target: &str| {
        Command::new("ln")
            .args(["-sfn", target, "current"])
            .current_dir(&dir)
            .output()
            .expect("run ln")
    };
    let o = ln(".snapshots/s1");
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("busy"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(ls(&dir.join(".snapshots")), vec!["s1".to_string()]);
    // A foreign target is EINVAL; `rm current` EPERM.
    assert_eq!(
        errno(std::os::unix::fs::symlink("/etc", dir.join("x"))),
        libc::EINVAL
    );
    assert_eq!(errno(fs::remove_file(dir.join("current"))), libc::EPERM);

    assert!(virsh(&["destroy", &name]).status.success());
    let t = Instant::now();
    let o = ln(".snapshots/s1");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    eprintln!(
        "revert of a shut-off instance: {} ms",
        t.elapsed().as_millis()
    );
    assert_eq!(
        fs::read_link(dir.join("current")).unwrap(),
        PathBuf::from(".snapshots/s1")
    );
    assert_eq!(g.state(), "shut off");
    let snaps = ls(&dir.join(".snapshots"));
    let kept = snaps
        .iter()
        .find(|s| s.starts_with("before-revert-"))
        .unwrap_or_else(|| panic!("no before-revert snapshot: {snaps:?}"))
        .clone();
    // The kept state has B; s1 has A only.
    let files = |s: &str| snap_dir(&m, &name, s).join("files/vda/p1");
    assert!(files(&kept).join("markB").exists());
    assert!(files("s1").join("markA").exists());
    assert!(!files("s1").join("markB").exists());
    let kj = json(&snap_dir(&m, &name, &kept).join("snapshot.json"));
    assert_eq!(
        fs::read_link(snap_dir(&m, &name, &kept).join("parent")).expect("parent link"),
        PathBuf::from("../s1"),
        "{kj}"
    );

    g.start();
    assert_eq!(g.exec("cat /data/markA").trim(), "A");
    assert_eq!(
        g.exec("test -e /data/markB && echo present || echo absent")
            .trim(),
        "absent"
    );

    // Undo the revert with mv -T (shut off again first).
    assert!(virsh(&["destroy", &name]).status.success());
    let tmp = dir.join("undo");
    std::os::unix::fs::symlink(format!(".snapshots/{kept}"), &tmp).expect("ln -s undo");
    let o = Command::new("mv")
        .args(["-T", "undo", "current"])
        .current_dir(&dir)
        .output()
        .expect("run mv");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        fs::read_link(dir.join("current")).unwrap(),
        PathBuf::from(format!(".snapshots/{kept}"))
    );
    g.start();
    assert_eq!(g.exec("cat /data/markB").trim(), "B");
    assert_eq!(g.exec("cat /data/markA").trim(), "A");
}

/// setxattr(2) through the mount, as `setfattr -n NAME -v VALUE DIR` calls it.
fn set_xattr(dir: &Path, name: &str, value: Option<&str>) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let p = std::ffi::CString::new(dir.as_os_str().as_bytes()).expect("path");
    let n = std::ffi::CString::new(name).expect("name");
    // SAFETY: NUL-terminated strings alive for the call; the value's pointer and length agree.
    let rc = unsafe {
        match value {
            Some(v) => libc::setxattr(p.as_ptr(), n.as_ptr(), v.as_ptr().cast(), v.len(), 0),
            None => libc::removexattr(p.as_ptr(), n.as_ptr()),
        }
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// getxattr(2) of `name` as a string.
fn get_xattr(dir: &Path, name: &str) -> std::io::Result<String> {
    use std::os::unix::ffi::OsStrExt;
    let p = std::ffi::CString::new(dir.as_os_str().as_bytes()).expect("path");
    let n = std::ffi::CString::new(name).expect("name");
    let mut buf = vec![0u8; 256];
    // SAFETY: NUL-terminated strings; the buffer's pointer and length agree.
    let rc = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    buf.truncate(rc as usize);
    Ok(String::from_utf8(buf).expect("utf-8 value"))
}

/// Issue 14's per-instance settings: `user.snapfs.quiesce` and `user.snapfs.memory` are
/// extended attributes of the instance directory, kept in the domain's metadata (a second
/// mount sees them), validated as setxattr(2) documents, and the quiesce override is what
/// mkdir then does.
#[test]
fn instance_settings_are_extended_attributes_kept_in_the_domain() {
    if !testbed_ready("instance_settings_are_extended_attributes_kept_in_the_domain") {
        return;
    }
    let _one = lock();
    let name = guest_name("set");
    let g = Guest::define(&name);
    g.start();
    let m = Mount::with_providers(&[LIBVIRT_ARG]);
    let dir = instance_dir(&m, &name);
    // Defaults: the mount's --quiesce (require unless given), memory off.
    assert_eq!(get_xattr(&dir, "user.snapfs.memory").unwrap(), "off");
    let default_q = get_xattr(&dir, "user.snapfs.quiesce").unwrap();
    assert!(
        ["require", "prefer"].contains(&default_q.as_str()),
        "{default_q}"
    );
    // Bad value EINVAL, unknown name ENOTSUP (EOPNOTSUPP).
    assert_eq!(
        errno(set_xattr(&dir, "user.snapfs.quiesce", Some("maybe"))),
        libc::EINVAL
    );
    assert_eq!(
        errno(set_xattr(&dir, "user.snapfs.colour", Some("red"))),
        libc::EOPNOTSUPP
    );
    assert_eq!(
        errno(set_xattr(&dir, "user.snapfs.memory", Some("yes"))),
        libc::EINVAL
    );
    // Nothing but settings can be set, and not on snapshot contents.
    assert!(set_xattr(&dir.join("instance.json"), "user.x", Some("1")).is_err());
    // quiesce=off: the next snapshot of the running guest is not quiesced.
    set_xattr(&dir, "user.snapfs.quiesce", Some("off")).expect("setxattr quiesce off");
    assert_eq!(get_xattr(&dir, "user.snapfs.quiesce").unwrap(), "off");
    let meta = virsh(&["metadata", &name, "https://snapfs.dev/xmlns/settings/1"]);
    assert!(
        String::from_utf8_lossy(&meta.stdout).contains("quiesce=\"off\"")
            || String::from_utf8_lossy(&meta.stdout).contains("quiesce='off'"),
        "{}",
        String::from_utf8_lossy(&meta.stdout)
    );
    fs::create_dir(snap_dir(&m, &name, "nq")).expect("mkdir nq");
    let sj = json(&snap_dir(&m, &name, "nq").join("snapshot.json"));
    assert_eq!(sj["quiesced"], false, "{sj}");
    // Another mount sees the same setting (it lives in the domain, not in the daemon).
    let m2 = Mount::with_providers(&[LIBVIRT_ARG]);
    assert_eq!(
        get_xattr(&instance_dir(&m2, &name), "user.snapfs.quiesce").unwrap(),
        "off"
    );
    drop(m2);
    // Removing it returns to the mount's default, and mkdir freezes again.
    set_xattr(&dir, "user.snapfs.quiesce", None).expect("removexattr");
    assert_eq!(get_xattr(&dir, "user.snapfs.quiesce").unwrap(), default_q);
    fs::create_dir(snap_dir(&m, &name, "q")).expect("mkdir q");
    let sj = json(&snap_dir(&m, &name, "q").join("snapshot.json"));
    assert_eq!(sj["quiesced"], true, "{sj}");
}

/// The guest's tmpfs counter (`/run/counter`), written by the loop [`start_counter`] starts.
fn guest_counter(g: &Guest) -> u64 {
    common::guest_counter(&g.name)
}

/// A shell loop in the guest counting into `/run/counter` ([`common::start_guest_counter`]).
fn start_counter(g: &Guest) {
    common::start_guest_counter(&g.name)
}

/// Wait until the guest's counter passes `n`.
fn wait_counter_past(g: &Guest, n: u64) -> u64 {
    common::wait_guest_counter_past(&g.name, n)
}

/// Issue 14's memory snapshots: with `user.snapfs.memory=on`, mkdir of a running instance also
/// saves its CPU and memory state (an external memory snapshot, the guest keeps running);
/// `ln -sfn` back to it leaves the guest running from that memory: a counter held only in the
/// guest's tmpfs is back near its snapshot value. The same from a shut-off domain; mkdir of a
/// shut-off one is disk-only; a disk-only snapshot of a running one stays EBUSY.
#[test]
fn memory_snapshot_revert_resumes_the_running_guest() {
    if !testbed_ready("memory_snapshot_revert_resumes_the_running_guest") {
        return;
    }
    let _one = lock();
    let name = guest_name("mem");
    let g = Guest::define(&name);
    g.start();
    let m = Mount::with_providers(&[LIBVIRT_ARG]);
    let dir = instance_dir(&m, &name);
    let ln = |target: &str| {
        Command::new("ln")
            .args(["-sfn", target, "current"])
            .current_dir(&dir)
            .output()
            .expect("run ln")
    };
    start_counter(&g);
    let before_mkdir = wait_counter_past(&g, 0);
    set_xattr(&dir, "user.snapfs.memory", Some("on")).expect("setxattr memory on");
    assert_eq!(get_xattr(&dir, "user.snapfs.memory").unwrap(), "on");

    let t = Instant::now();
    fs::create_dir(snap_dir(&m, &name, "m1")).expect("mkdir m1");
    eprintln!("mkdir with memory: {} ms", t.elapsed().as_millis());
    assert_eq!(g.state(), "running");
    let after_mkdir = guest_counter(&g);
    let sj = json(&snap_dir(&m, &name, "m1").join("snapshot.json"));
    assert_eq!(sj["memory"], true, "{sj}");
    let state_file = PathBuf::from(sj["memory_file"].as_str().expect("memory_file"));
    let size = sj["memory_size"].as_u64().expect("memory_size");
    assert_eq!(fs::metadata(&state_file).unwrap().len(), size, "{sj}");
    assert!(size > 1 << 20, "{sj}");
    assert!(m.log().contains("no quiesce needed"), "{}", m.log());
    // The snapshot's disk is readable as ever.
    assert!(snap_dir(&m, &name, "m1")
        .join("files/vda/p1/writer.log")
        .exists());

    // It counts on; then back to m1 while running.
    let before_revert = wait_counter_past(&g, after_mkdir + 100);
    let t = Instant::now();
    let o = ln(".snapshots/m1");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    eprintln!(
        "revert of a running instance to memory: {} ms",
        t.elapsed().as_millis()
    );
    assert_eq!(g.state(), "running");
    let after_revert = guest_counter(&g);
    eprintln!("counter: {before_mkdir} before mkdir, {after_mkdir} after, {before_revert} before the revert, {after_revert} after");
    assert!(
        after_revert < before_revert && after_revert >= before_mkdir,
        "counter {after_revert} after the revert: not back near the snapshot's ({before_mkdir}..{after_mkdir}; {before_revert} before the revert)"
    );
    assert_eq!(
        fs::read_link(dir.join("current")).unwrap(),
        PathBuf::from(".snapshots/m1")
    );
    let snaps = ls(&dir.join(".snapshots"));
    let kept = snaps
        .iter()
        .find(|s| s.starts_with("before-revert-"))
        .unwrap_or_else(|| panic!("no before-revert snapshot: {snaps:?}"))
        .clone();
    // The discarded state was running with memory=on: kept with its memory too.
    let kj = json(&snap_dir(&m, &name, &kept).join("snapshot.json"));
    assert_eq!(kj["memory"], true, "{kj}");

    // Shut off, memory=on: mkdir is disk-only.
    assert!(virsh(&["destroy", &name]).status.success());
    fs::create_dir(snap_dir(&m, &name, "off1")).expect("mkdir off1");
    let oj = json(&snap_dir(&m, &name, "off1").join("snapshot.json"));
    assert_eq!(oj["memory"], false, "{oj}");
    // Back to m1 from shut off: running again from m1's memory.
    let o = ln(".snapshots/m1");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(g.state(), "running");
    let c = guest_counter(&g);
    assert!(
        c >= before_mkdir && c < before_revert,
        "counter {c} after the revert of the shut-off domain ({before_mkdir}..{after_mkdir})"
    );

    // A disk-only snapshot of the running guest still cannot be reverted to: EBUSY.
    let o = ln(".snapshots/off1");
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("busy"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // The guest goes on counting: it was left running.
    wait_counter_past(&g, c);

    // A memory snapshot whose state file is gone: EINVAL, and nothing is kept first.
    let aside = state_file.with_extension("aside");
    fs::rename(&state_file, &aside).expect("move m1's state aside");
    let before = ls(&dir.join(".snapshots")).len();
    assert_eq!(
        errno(std::os::unix::fs::symlink(
            ".snapshots/m1",
            dir.join("current")
        )),
        libc::EEXIST
    );
    let o = ln(".snapshots/m1");
    fs::rename(&aside, &state_file).expect("put m1's state back");
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("Invalid argument"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(ls(&dir.join(".snapshots")).len(), before);
    assert_eq!(g.state(), "running");

    // rmdir of a memory snapshot takes its state file along.
    let kept_state = PathBuf::from(kj["memory_file"].as_str().expect("memory_file"));
    assert!(kept_state.exists(), "{kj}");
    fs::remove_dir(snap_dir(&m, &name, &kept)).expect("rmdir before-revert");
    assert!(!kept_state.exists(), "{} left behind", kept_state.display());
    assert!(state_file.exists(), "m1's state file went too");
}

/// Issue 14: kill -9 of the daemon in the middle of a revert to a memory snapshot (once the
/// state is kept as `before-revert-…`, while libvirt reverts): after a restart the
/// instance is running, either fully reverted (the tmpfs counter back near the snapshot's) or
/// untouched (counting on from where it was), never paused or half done, and `before-revert-…`
/// exists with its memory.
#[test]
fn kill_during_a_memory_revert_leaves_it_whole_or_untouched() {
    if !testbed_ready("kill_during_a_memory_revert_leaves_it_whole_or_untouched") {
        return;
    }
    let _one = lock();
    let name = guest_name("memk");
    let g = Guest::define(&name);
    g.start();
    let m = Mount::with_providers(&[LIBVIRT_ARG]);
    let dir = instance_dir(&m, &name);
    start_counter(&g);
    let before_mkdir = wait_counter_past(&g, 0);
    set_xattr(&dir, "user.snapfs.memory", Some("on")).expect("setxattr memory on");
    fs::create_dir(snap_dir(&m, &name, "m1")).expect("mkdir m1");
    let after_mkdir = guest_counter(&g);
    let before_revert = wait_counter_past(&g, after_mkdir + 100);

    let pid = m.daemon_pid().expect("daemon pid");
    let d = dir.clone();
    let ln = std::thread::spawn(move || {
        Command::new("ln")
            .args(["-sfn", ".snapshots/m1", "current"])
            .current_dir(&d)
            .output()
    });
    // Kill once the daemon has kept the state and asks libvirt to revert (which takes seconds).
    let deadline = Instant::now() + Duration::from_secs(180);
    while !m.log().contains("kept the state being reverted") {
        assert!(
            Instant::now() < deadline,
            "no before-revert snapshot: {}",
            m.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    let o = virsh(&["snapshot-list", &name, "--name"]);
    let list = String::from_utf8_lossy(&o.stdout).into_owned();
    let kept = list
        .lines()
        .find(|l| l.starts_with("before-revert-"))
        .unwrap_or_else(|| panic!("no before-revert snapshot in libvirt: {list}"))
        .trim()
        .to_string();
    // SAFETY: a plain kill(2) of the daemon this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    assert!(wait_gone(pid, Duration::from_secs(10)));
    let _ = ln.join();
    m.unmount();
    // Restarted at once, while libvirtd may still run the revert it was asked for: the next
    // daemon waits for the domain's job before it decides what `current` is.
    m.mount(&[LIBVIRT_ARG]);
    // libvirtd finishes what it was asked; the domain settles running.
    let deadline = Instant::now() + Duration::from_secs(120);
    while g.state() != "running" {
        assert!(
            Instant::now() < deadline,
            "{name} is {} after the kill",
            g.state()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!(
        "waited for libvirt's job at the restart: {}",
        m.log().contains("libvirt still runs a job")
    );
    let c = guest_counter(&g);
    let reverted = c < before_revert;
    eprintln!(
        "kill -9 during the revert: {} (counter {before_mkdir}..{after_mkdir} at m1, {before_revert} before, {c} after)",
        if reverted { "fully reverted" } else { "untouched" }
    );
    // `current` tells which: m1, or the kept state the guest still runs on (the next daemon
    // asked libvirt whether m1 became its current snapshot).
    let want = if reverted {
        assert!(c >= before_mkdir, "counter {c} below m1's");
        "m1"
    } else {
        kept.as_str()
    };
    assert_eq!(
        fs::read_link(dir.join("current")).unwrap(),
        PathBuf::from(".snapshots").join(want)
    );
    // The guest runs on, and the kept state is there with its memory.
    wait_counter_past(&g, c);
    let snaps = ls(&dir.join(".snapshots"));
    assert!(snaps.contains(&kept), "{snaps:?}");
    let kj = json(&snap_dir(&m, &name, &kept).join("snapshot.json"));
    assert_eq!(kj["memory"], true, "{kj}");
}

/// Removes a domain the test defined and its directory.
struct Gone(String, PathBuf);

impl Drop for Gone {
    fn drop(&mut self) {
        remove_domain(&self.0);
        let _ = fs::remove_dir_all(&self.1);
    }
}

/// A shut-off domain `issue-14r-t<pid>-<tag>` (never booted) on `/var/tmp/<name>/vda.qcow2`
/// (8 MiB, its first MiB 0x41).
fn shut_off_qcow2_domain(tag: &str) -> (String, PathBuf, Gone) {
    let name = format!("issue-14r-t{}-{tag}", std::process::id());
    let dir = PathBuf::from(format!("/var/tmp/{name}"));
    remove_domain(&name);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    let gone = Gone(name.clone(), dir.clone());
    let img = dir.join("vda.qcow2");
    let img_s = img.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", img_s, "8M"]);
    qemu_io(&img, "write -P 0x41 0 1M");
    let xml = dir.join("dom.xml");
    fs::write(
        &xml,
        format!(
            "<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu><os><type arch='x86_64'>hvm</type></os><devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{img_s}'/><target dev='vda' bus='virtio'/></disk></devices></domain>"
        ),
    )
    .unwrap();
    let o = virsh(&["define", xml.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    (name, dir, gone)
}

/// The image the domain's disk `vda` is now (an overlay after external snapshots).
fn vda_source(name: &str) -> PathBuf {
    let out = String::from_utf8_lossy(&virsh(&["domblklist", name]).stdout).into_owned();
    out.lines()
        .find_map(|l| l.trim().strip_prefix("vda"))
        .map(|p| PathBuf::from(p.trim()))
        .unwrap_or_else(|| panic!("no vda in {out}"))
}

/// kill -9 of the daemon in a revert of a shut-off instance (external disk-only snapshots) at
/// the two points around libvirt's revert (`SNAPFS_FAILPOINT`): after a restart `current` tells
/// the truth, as libvirt's current-snapshot mark says. Before: the disk still holds the new
/// data, `current` → `before-revert-…`; after: the disk is s1's, `current` → s1.
#[test]
fn kill_during_a_disk_only_revert_leaves_current_true() {
    if !testbed_ready("kill_during_a_disk_only_revert_leaves_current_true") {
        return;
    }
    for (point, reverted) in [
        ("revert-before-backend", false),
        ("revert-after-backend", true),
    ] {
        let (name, dir, _gone) = shut_off_qcow2_domain(if reverted { "ka" } else { "kb" });
        let m = Mount::unmounted();
        m.mount_env(&[LIBVIRT_ARG], &[("SNAPFS_FAILPOINT", point)]);
        let inst = instance_dir(&m, &name);
        fs::create_dir(inst.join(".snapshots/s1")).expect("mkdir s1");
        qemu_io(&vda_source(&name), "write -P 0x42 0 1M");
        m.revert_killed_at_failpoint(&inst, "s1");
        m.mount(&[LIBVIRT_ARG]);

        let kept: Vec<String> = ls(&inst.join(".snapshots"))
            .into_iter()
            .filter(|n| n.starts_with("before-revert-"))
            .collect();
        assert_eq!(kept.len(), 1, "{point}: {kept:?}");
        let want = if reverted { "s1" } else { kept[0].as_str() };
        assert_eq!(
            fs::read_link(inst.join("current")).unwrap(),
            Path::new(".snapshots").join(want),
            "{point}: {}",
            m.log()
        );
        let got = dir.join("got.raw");
        qemu_img(&[
            "convert",
            "-O",
            "raw",
            vda_source(&name).to_str().unwrap(),
            got.to_str().unwrap(),
        ]);
        let byte = if reverted { 0x41 } else { 0x42 };
        assert!(
            fs::read(&got).unwrap()[..1 << 20]
                .iter()
                .all(|b| *b == byte),
            "{point}: the disk is not {byte:#x}"
        );
        let st = String::from_utf8_lossy(&virsh(&["domstate", &name]).stdout).into_owned();
        assert_eq!(st.trim(), "shut off");
        drop(m);
    }
}

/// A shut-off domain (never booted: no guest lock) on a qcow2 file with an internal snapshot
/// made by `virsh snapshot-create-as` (libvirt's kind for an inactive qcow2 domain:
/// `qemu-img snapshot -c`). Revert through `current` equals `qemu-img snapshot -a` on a copy,
/// byte for byte; the state kept first is an internal snapshot too (the domain's disk stays the
/// same file, no overlay), readable, and reverting to it brings the discarded data back.
#[test]
fn revert_to_an_internal_snapshot_of_a_shut_off_instance() {
    if !testbed_ready("revert_to_an_internal_snapshot_of_a_shut_off_instance") {
        return;
    }
    let (name, dir, _gone) = shut_off_qcow2_domain("int");
    let img = dir.join("vda.qcow2");
    let img_s = img.to_str().unwrap();
    let o = virsh(&["snapshot-create-as", &name, "int1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(qemu_img(&["snapshot", "-l", img_s]).contains("int1"));
    qemu_io(&img, "write -P 0x42 0 1M");

    // The reference: qemu-img snapshot -a on a copy taken now.
    let copy = dir.join("copy.qcow2");
    fs::copy(&img, &copy).unwrap();
    qemu_img(&["snapshot", "-a", "int1", copy.to_str().unwrap()]);
    let want = dir.join("want.raw");
    qemu_img(&[
        "convert",
        "-O",
        "raw",
        copy.to_str().unwrap(),
        want.to_str().unwrap(),
    ]);

    let m = Mount::with_providers(&[LIBVIRT_ARG]);
    let inst = instance_dir(&m, &name);
    run(Command::new("ln")
        .args(["-sfn", ".snapshots/int1", "current"])
        .current_dir(&inst));
    let got = dir.join("got.raw");
    qemu_img(&["convert", "-O", "raw", img_s, got.to_str().unwrap()]);
    assert!(
        fs::read(&got).unwrap() == fs::read(&want).unwrap(),
        "revert differs from qemu-img snapshot -a"
    );
    assert_eq!(
        fs::read_link(inst.join("current")).unwrap(),
        Path::new(".snapshots/int1")
    );
    let blk = String::from_utf8_lossy(&virsh(&["domblklist", &name]).stdout).into_owned();
    assert!(blk.contains(img_s), "the disk moved to an overlay: {blk}");
    let kept: Vec<String> = ls(&inst.join(".snapshots"))
        .into_iter()
        .filter(|n| n.starts_with("before-revert-"))
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert!(
        qemu_img(&["snapshot", "-l", img_s]).contains(&kept[0]),
        "the kept state is not an internal snapshot"
    );
    let kept_disk = fs::read(snap_dir(&m, &name, &kept[0]).join("vda.raw")).unwrap();
    assert!(kept_disk[..1 << 20].iter().all(|b| *b == 0x42));

    // Back to the kept state with mv -T: 0x42 is live again.
    std::os::unix::fs::symlink(format!(".snapshots/{}", kept[0]), inst.join("back")).unwrap();
    run(Command::new("mv")
        .arg("-T")
        .arg(inst.join("back"))
        .arg(inst.join("current")));
    qemu_img(&["convert", "-O", "raw", img_s, got.to_str().unwrap()]);
    assert!(fs::read(&got).unwrap()[..1 << 20]
        .iter()
        .all(|b| *b == 0x42));
    drop(m);
}

/// Bytes of a pseudo-random generator (xorshift), so a disk's content is its own check.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Read `f` to its end with read(2) only (no fstat, no close: those could wait for a stopped
/// daemon).
fn read_all(f: &mut fs::File) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match f.read(&mut buf)? {
            0 => return Ok(out),
            n => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// FUSE passthrough (issue 15, copy-out speed): a shut-off domain (never booted: no guest
/// lock) on a raw file; after `mkdir s1` the domain writes an overlay and s1 reads the raw
/// file, which nothing writes any more: s1's disk is opened in passthrough, so the kernel reads
/// the host file itself. It reads exactly the file's bytes, through two handles at once, with
/// the daemon stopped (SIGSTOP): no read reaches it. s2's disk (the qcow2 overlay over the raw
/// file) is never passthrough and reads the overlay's bytes (`qemu-img convert`).
#[test]
fn raw_snapshot_disk_reads_in_passthrough() {
    if !testbed_ready("raw_snapshot_disk_reads_in_passthrough") {
        return;
    }
    let name = format!("issue-15c-t{}-pt", std::process::id());
    let dir = PathBuf::from(format!("/var/tmp/{name}"));
    remove_domain(&name);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    let _gone = Gone(name.clone(), dir.clone());
    let raw = dir.join("vda.raw");
    // 24 MiB: 8 of data, a hole of 8, 8 of data (the hole reads as zeros either way).
    let want = {
        let mut v = pattern(24 << 20, 0x15c);
        v[8 << 20..16 << 20].fill(0);
        v
    };
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = fs::File::create(&raw).unwrap();
        f.write_all(&want[..8 << 20]).unwrap();
        f.seek(SeekFrom::Start(16 << 20)).unwrap();
        f.write_all(&want[16 << 20..]).unwrap();
    }
    let xml = dir.join("dom.xml");
    fs::write(
        &xml,
        format!(
            "<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu><os><type arch='x86_64'>hvm</type></os><devices><disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{}'/><target dev='vda' bus='virtio'/></disk></devices></domain>",
            raw.display()
        ),
    )
    .unwrap();
    let o = virsh(&["define", xml.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let m = Mount::unmounted();
    m.mount_env(&[LIBVIRT_ARG], &[("RUST_LOG", "snapfs=debug")]);
    let inst = instance_dir(&m, &name);
    fs::create_dir(inst.join(".snapshots/s1")).expect("mkdir s1");
    let overlay = vda_source(&name);
    assert_ne!(overlay, raw, "the domain still writes the raw file");
    qemu_io(&overlay, "write -P 0x42 0 1M");
    fs::create_dir(inst.join(".snapshots/s2")).expect("mkdir s2");
    let passthrough_opens = || m.log().matches("opened in passthrough").count();
    assert!(
        m.log().contains("FUSE init passthrough=true"),
        "this kernel (6.18) negotiates passthrough: {}",
        m.log()
    );

    let s1 = snap_dir(&m, &name, "s1").join("vda.raw");
    let first = fs::File::open(&s1).unwrap();
    let second = fs::File::open(&s1).unwrap();
    assert_eq!(passthrough_opens(), 2, "{}", m.log());
    let pid = m.daemon_pid().expect("daemon pid");
    // SAFETY: plain kill(2) of the daemon this test's mount started.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let (mut first, mut second) = (first, second);
        let got = (read_all(&mut first), read_all(&mut second));
        // Closed by the test once the daemon runs again (close sends FLUSH to it).
        let _ = tx.send((got, first, second));
    });
    // A read that reached the stopped daemon would wait for it: never for two minutes.
    let got = rx.recv_timeout(Duration::from_secs(120));
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let ((a, b), first, second) =
        got.expect("reads waited for the stopped daemon: not passthrough");
    drop((first, second));
    let (a, b) = (a.expect("read s1 (1)"), b.expect("read s1 (2)"));
    assert!(
        a == want,
        "s1 through passthrough differs from the raw file"
    );
    assert!(b == want, "s1's second handle differs from the raw file");
    // Closed and opened again: a new backing id for the inode.
    assert!(fs::read(&s1).unwrap() == want);
    assert_eq!(passthrough_opens(), 3, "{}", m.log());

    let s2 = snap_dir(&m, &name, "s2").join("vda.raw");
    let conv = dir.join("s2.raw");
    qemu_img(&[
        "convert",
        "-U",
        "-O",
        "raw",
        overlay.to_str().unwrap(),
        conv.to_str().unwrap(),
    ]);
    let s2_want = fs::read(&conv).unwrap();
    assert!(s2_want[..1 << 20].iter().all(|b| *b == 0x42));
    assert!(
        fs::read(&s2).unwrap() == s2_want,
        "s2 differs from qemu-img convert"
    );
    assert_eq!(passthrough_opens(), 3, "a qcow2 disk opened in passthrough");
}

/// The storage rule of docs/tree.md ("An instance and its volumes exclude each other") keys a
/// file disk by its active file only: two instances cloned from one base image (Nova's
/// `_base`) share their backing file, and a mkdir of one while the other's is in progress is
/// not refused. Both mkdirs are held at `SNAPFS_FAILPOINT=mkdir-busy` (past the busy marks)
/// while a file exists: B reaching it while A is held is what shows B was not refused.
#[test]
fn instances_cloned_from_one_base_do_not_exclude_each_other() {
    if !testbed_ready("instances_cloned_from_one_base_do_not_exclude_each_other") {
        return;
    }
    let (a, dir_a, _ga) = shut_off_qcow2_domain("sba");
    let (b, dir_b, _gb) = shut_off_qcow2_domain("sbb");
    let base = dir_a.join("base.qcow2");
    let base_s = base.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", base_s, "8M"]);
    for d in [&dir_a, &dir_b] {
        let vda = d.join("vda.qcow2");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            base_s,
            "-F",
            "qcow2",
            vda.to_str().unwrap(),
        ]);
    }
    let hold = tempfile::NamedTempFile::new().unwrap();
    let hold_path = hold.path().to_str().unwrap().to_string();
    let m = Mount::unmounted();
    m.mount_env(
        &[LIBVIRT_ARG],
        &[
            ("SNAPFS_FAILPOINT", "mkdir-busy"),
            ("SNAPFS_FAILPOINT_HOLD", hold_path.as_str()),
        ],
    );
    let held = || m.log().matches("failpoint reached").count();
    let (sa, sb) = (snap_dir(&m, &a, "s1"), snap_dir(&m, &b, "s1"));
    let ta = std::thread::spawn(move || fs::create_dir(&sa));
    let deadline = Instant::now() + Duration::from_secs(60);
    while held() < 1 {
        assert!(
            Instant::now() < deadline,
            "A's mkdir never reached the failpoint"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let tb = std::thread::spawn(move || fs::create_dir(&sb));
    let deadline = Instant::now() + Duration::from_secs(60);
    while held() < 2 && !tb.is_finished() {
        assert!(Instant::now() < deadline, "B's mkdir neither held nor done");
        std::thread::sleep(Duration::from_millis(10));
    }
    let b_held = held() >= 2;
    fs::remove_file(&hold_path).unwrap();
    ta.join().unwrap().expect("A's mkdir");
    let rb = tb.join().unwrap();
    assert!(b_held, "B's mkdir was refused while A's held: {rb:?}");
    rb.expect("B's mkdir");
    drop(m);
}

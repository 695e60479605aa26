//! Cloud-managed domains (issue 13) against the real test bed: a Nova-like domain and a
//! CloudStack-like transient one, snapshotted by the copy method through the real mount,
//! then rebuilt from the cloud's own XML the way the cloud does it.
//!
//! Each guest is the test bed's TCG guest (kernel, initrd) on a disk laid out like the cloud
//! lays it out. Without the test bed the tests print SKIP and pass (unless
//! `SNAPFS_REQUIRE_TESTBED=1`).
//!
//! `SNAPFS_MANAGED_METHOD=external` runs the same tests with `--snapshot-method=external`
//! (what main did before the copy method): the checks are collected rather than stopping at
//! the first, so the run shows every invariant that breaks (the lost file among them).

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;

const LIBVIRT_ARG: &str = "--libvirt=qemu:///system";
/// One guest at a time: TCG on a shared 2-core box.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn lock() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

fn guest_dir() -> PathBuf {
    PathBuf::from(
        std::env::var("SNAPFS_TESTBED_DIR").unwrap_or_else(|_| "/var/lib/snapfs-testbed".into()),
    )
    .join("guest")
}

fn ready(test: &str) -> bool {
    let mut missing = Vec::new();
    for f in ["vmlinuz", "initrd.img", "cmdline", "demo-disk.qcow2"] {
        if !guest_dir().join(f).exists() {
            missing.push(format!("{f} missing"));
        }
    }
    if !virsh(&["version"]).status.success() {
        missing.push("libvirt not reachable".into());
    }
    if missing.is_empty() {
        return true;
    }
    let why = missing.join("; ");
    assert!(
        std::env::var("SNAPFS_REQUIRE_TESTBED").as_deref() != Ok("1"),
        "test bed required but not ready: {why}"
    );
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIP {test}: {why}");
    false
}

/// The method under test: `auto` (the product's default), or `external` to show what the
/// old path does to a managed domain.
fn method() -> String {
    std::env::var("SNAPFS_MANAGED_METHOD").unwrap_or_else(|_| "auto".into())
}

/// Checks collected, reported together at the end.
#[derive(Default)]
struct Checks(Vec<String>);

impl Checks {
    fn check(&mut self, ok: bool, what: impl Into<String>) {
        let what = what.into();
        eprintln!("{} {what}", if ok { "ok  " } else { "FAIL" });
        if !ok {
            self.0.push(what);
        }
    }

    fn done(self, log: &str) {
        assert!(
            self.0.is_empty(),
            "{} check(s) failed:\n  {}\ndaemon log:\n{log}",
            self.0.len(),
            self.0.join("\n  ")
        );
    }
}

fn out(o: std::process::Output) -> (bool, String) {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.success(), text.trim().to_string())
}

fn virsh_ok(args: &[&str]) -> String {
    let (ok, text) = out(virsh(args));
    assert!(ok, "virsh {args:?}: {text}");
    text
}

fn sha(p: &Path) -> String {
    sha256_file(p)
}

fn json(p: &Path) -> serde_json::Value {
    let b = fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
    serde_json::from_slice(&b).unwrap_or_else(|e| panic!("parse {}: {e}", p.display()))
}

/// A domain laid out like a cloud's: `<dir>/nova/instances/_base/<sha1>` (raw: the test
/// guest's disk, plus `extra_mib` of random data after it) under
/// `<dir>/nova/instances/<uuid>/disk` (qcow2), defined or created from `xml`.
struct CloudGuest {
    name: String,
    uuid: String,
    dir: PathBuf,
    xml: String,
    xml_path: PathBuf,
    /// The serial console's log (outside `dir`: define-guest.sh's place for it).
    console: PathBuf,
    transient: bool,
}

fn uuid_for(tag: u32) -> String {
    format!(
        "5d2f6a2e-8c5b-4b8e-{:04x}-{:012x}",
        tag & 0xffff,
        std::process::id()
    )
}

impl CloudGuest {
    fn new(name: &str, tag: u32, metadata: &str, sysinfo: &str, extra_mib: u64) -> CloudGuest {
        let uuid = uuid_for(tag);
        let dir = PathBuf::from(format!("/tmp/h13-{}-{tag}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let inst = dir.join("nova/instances");
        fs::create_dir_all(inst.join("_base")).unwrap();
        fs::create_dir_all(inst.join(&uuid)).unwrap();
        // Nova names the base file after the sha1 of the image id.
        let base = inst.join("_base/3f786850e387550fdab836ed7e6dc881de23001b");
        qemu_img(&[
            "convert",
            "-O",
            "raw",
            guest_dir().join("demo-disk.qcow2").to_str().unwrap(),
            base.to_str().unwrap(),
        ]);
        if extra_mib > 0 {
            run(Command::new("dd")
                .arg("if=/dev/urandom")
                .arg(format!("of={}", base.display()))
                .args(["bs=1M", "oflag=append", "conv=notrunc", "status=none"])
                .arg(format!("count={extra_mib}")));
        }
        let disk = inst.join(&uuid).join("disk");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            base.to_str().unwrap(),
            "-F",
            "raw",
            disk.to_str().unwrap(),
        ]);
        // The test bed's own domain (define-guest.sh) on this disk, then made the cloud's:
        // its name and UUID, its metadata and SMBIOS, as the cloud's XML would have them.
        let tmpl = format!("h13-tmpl-{}-{tag}", std::process::id());
        script_ok(
            "define-guest.sh",
            &[&tmpl, guest_dir().to_str().unwrap(), disk.to_str().unwrap()],
        );
        let x = virsh_ok(&["dumpxml", &tmpl, "--inactive"]);
        virsh_ok(&["undefine", &tmpl]);
        let console = PathBuf::from(format!("/var/log/snapfs-testbed/{tmpl}.console.log"));
        let _ = fs::remove_file(&console);
        let (head, rest) = x.split_once("</uuid>").expect("uuid in the XML");
        let head = head.split("<uuid>").next().unwrap_or_default();
        let mut xml = format!(
            "{}<uuid>{uuid}</uuid>\n  <metadata>\n{metadata}\n  </metadata>\n{sysinfo}{rest}",
            head.replace(
                &format!("<name>{tmpl}</name>"),
                &format!("<name>{name}</name>")
            )
        );
        if !sysinfo.is_empty() {
            xml = xml.replacen("</os>", "  <smbios mode='sysinfo'/>\n  </os>", 1);
        }
        let xml_path = dir.join("domain.xml");
        fs::write(&xml_path, &xml).unwrap();
        let _ = virsh(&["destroy", name]);
        let _ = virsh(&["undefine", name]);
        CloudGuest {
            name: name.into(),
            uuid,
            dir,
            xml,
            xml_path,
            console,
            transient: false,
        }
    }

    /// Define and start (persistent, Nova's way) or create (transient, CloudStack's way)
    /// from the cloud's XML; wait for the agent.
    fn boot(&self) {
        let x = self.xml_path.to_str().unwrap();
        if self.transient {
            virsh_ok(&["create", x]);
        } else {
            virsh_ok(&["define", x]);
            virsh_ok(&["start", &self.name]);
        }
        script_ok("wait-agent.sh", &[&self.name, "180"]);
    }

    fn exec(&self, cmd: &str) -> String {
        script_ok("guest-exec.sh", &[&self.name, cmd, "30"])
    }

    fn frozen(&self) -> bool {
        let (_, t) = out(virsh(&[
            "qemu-agent-command",
            &self.name,
            r#"{"execute":"guest-fsfreeze-status"}"#,
        ]));
        t.contains("frozen")
    }

    fn dumpxml(&self, inactive: bool) -> String {
        let mut a = vec!["dumpxml", self.name.as_str()];
        if inactive {
            a.push("--inactive");
        }
        normalise(&virsh_ok(&a))
    }
}

impl Drop for CloudGuest {
    fn drop(&mut self) {
        let _ = virsh(&["destroy", &self.name]);
        let snaps = virsh(&["snapshot-list", &self.name, "--name"]);
        for s in String::from_utf8_lossy(&snaps.stdout).lines() {
            if !s.trim().is_empty() {
                let _ = virsh(&["snapshot-delete", &self.name, s.trim(), "--metadata"]);
            }
        }
        let _ = virsh(&["undefine", &self.name]);
        let _ = fs::remove_dir_all(&self.dir);
        let _ = fs::remove_file(&self.console);
    }
}

/// Domain XML compared modulo what libvirt itself changes on every start (the domain id
/// and the ports and paths it picks); disk sources, chains and metadata are compared as
/// they are.
fn normalise(x: &str) -> String {
    x.lines()
        .filter(|l| !l.trim_start().starts_with("<domain ") || !l.contains(" id="))
        .map(str::trim_end)
        .collect::<Vec<_>>()
        .join("\n")
}

fn nova_metadata() -> &'static str {
    include_str!("data/nova-instance-1.1.xml")
}

const CLOUDSTACK_SYSINFO: &str = "  <sysinfo type='smbios'>
    <system>
      <entry name='manufacturer'>Apache Software Foundation</entry>
      <entry name='product'>CloudStack KVM Hypervisor</entry>
    </system>
  </sysinfo>";

fn mount() -> Mount {
    let m = Mount::unmounted();
    let method = format!("--snapshot-method={}", method());
    m.mount(&[LIBVIRT_ARG, &method]);
    m
}

/// Unmount, wait for the daemon to exit, mount again on the same state directory.
fn remount(m: &Mount) {
    let pid = m.daemon_pid();
    m.unmount();
    if let Some(pid) = pid {
        assert!(
            wait_gone(pid, Duration::from_secs(10)),
            "daemon did not exit"
        );
    }
    m.mount(&[LIBVIRT_ARG, &format!("--snapshot-method={}", method())]);
}

/// The domain XML compared line by line; the differing lines on failure.
fn xml_unchanged(c: &mut Checks, which: &str, before: &str, after: &str) {
    let same = before == after;
    let what = if same {
        format!("{which} XML unchanged")
    } else {
        let diff: Vec<String> = before
            .lines()
            .zip(after.lines())
            .filter(|(a, b)| a != b)
            .take(6)
            .map(|(a, b)| format!("- {a}\n+ {b}"))
            .collect();
        format!(
            "{which} XML unchanged ({} vs {} lines; first differences:\n{})",
            before.lines().count(),
            after.lines().count(),
            diff.join("\n")
        )
    };
    c.check(same, what);
}

/// No libvirt snapshot, no checkpoint, no job on the domain.
fn no_libvirt_traces(c: &mut Checks, g: &CloudGuest) {
    let (_, snaps) = out(virsh(&["snapshot-list", &g.name, "--name"]));
    c.check(
        snaps.is_empty(),
        format!("virsh snapshot-list empty (got {snaps:?})"),
    );
    let (_, cps) = out(virsh(&["checkpoint-list", &g.name, "--name"]));
    c.check(
        cps.is_empty(),
        format!("virsh checkpoint-list empty (got {cps:?})"),
    );
    let (_, job) = out(virsh(&["domjobinfo", &g.name]));
    c.check(
        job.lines().next().is_some_and(|l| l.contains("None")),
        format!("no job left on the domain (domjobinfo: {job:?})"),
    );
}

/// mkdir, XML unchanged, a write after the snapshot, the cloud rebuilds the domain from its
/// XML (`rebuild`), the write is still there and the snapshot still reads as before.
fn snapshot_then_cloud_rebuild(g: &CloudGuest, rebuild: impl Fn(&mut Checks)) {
    let m = mount();
    let inst = m.mnt.join("instances").join(&g.name);
    let snap = inst.join(".snapshots/s1");
    let mut c = Checks::default();
    let before_inactive = (!g.transient).then(|| g.dumpxml(true));
    let before_live = g.dumpxml(false);
    g.exec("echo before > /data/before-snap && sync");

    let t = Instant::now();
    fs::create_dir(&snap).expect("mkdir s1");
    eprintln!("mkdir s1: {} ms", t.elapsed().as_millis());
    c.check(!g.frozen(), "guest not frozen after mkdir");
    if let Some(b) = &before_inactive {
        xml_unchanged(&mut c, "inactive", b, &g.dumpxml(true));
    }
    xml_unchanged(&mut c, "live", &before_live, &g.dumpxml(false));
    no_libvirt_traces(&mut c, g);
    let sj = json(&snap.join("snapshot.json"));
    eprintln!("snapshot.json: {sj}");
    if method() == "auto" {
        c.check(sj["method"] == "copy", "snapshot.json method copy");
        c.check(sj["quiesced"] == true, "snapshot.json quiesced");
    }
    let h1 = sha(&snap.join("vda.raw"));
    let files = snap.join("files/vda/p1");
    c.check(
        fs::read_to_string(files.join("before-snap")).is_ok_and(|t| t == "before\n"),
        "files/ shows the file written before the snapshot",
    );

    // The guest writes and syncs after the snapshot.
    g.exec("echo after > /data/after-snap && sync");
    rebuild(&mut c);
    script_ok("wait-agent.sh", &[&g.name, "180"]);
    let (ok, text) = out(script(
        "guest-exec.sh",
        &[&g.name, "cat /data/after-snap", "30"],
    ));
    c.check(
        ok && text == "after",
        format!("the file written after the snapshot survives the rebuild (cat: {text:?})"),
    );

    // A fresh daemon (same state directory and store) reads the snapshot as before.
    remount(&m);
    let snap = m.mnt.join("instances").join(&g.name).join(".snapshots/s1");
    let h2 = snap
        .join("vda.raw")
        .exists()
        .then(|| sha(&snap.join("vda.raw")));
    c.check(
        h2.as_deref() == Some(h1.as_str()),
        format!("vda.raw hashes the same after the rebuild ({h1} vs {h2:?})"),
    );
    let files = snap.join("files/vda/p1");
    c.check(
        files.join("before-snap").exists() && !files.join("after-snap").exists(),
        "files/ shows the guest as of the snapshot",
    );
    if method() == "auto" {
        // rmdir leaves nothing in the store.
        fs::remove_dir(&snap).expect("rmdir s1");
        let store = m.state_dir().join("store").join(&g.uuid);
        let left = fs::read_dir(&store).map(|d| d.count()).unwrap_or(0);
        c.check(
            left == 0,
            format!("store of the domain empty after rmdir ({left} left)"),
        );
    }
    c.done(&m.log());
}

#[test]
fn nova_hard_reboot_keeps_the_guest_and_the_snapshot() {
    if !ready("nova_hard_reboot_keeps_the_guest_and_the_snapshot") {
        return;
    }
    let _one = lock();
    let g = CloudGuest::new("instance-0000002a", 0x2a, nova_metadata(), "", 0);
    g.boot();
    {
        // instance.json says who manages it.
        let m = mount();
        let info = json(&m.mnt.join("instances/instance-0000002a/instance.json"));
        let mb = &info["managed_by"];
        assert_eq!(mb["system"], "nova", "{info}");
        assert_eq!(mb["id"], g.uuid.as_str());
        assert_eq!(mb["name"], "web-1");
        assert_eq!(mb["project"]["name"], "web");
        assert_eq!(mb["user"]["uuid"], "0a1b2c3d4e5f60718293a4b5c6d7e8f9");
        assert_eq!(mb["flavor"]["name"], "m1.tiny");
    }
    snapshot_then_cloud_rebuild(&g, |c| {
        // Nova's hard reboot: destroy, undefine (no flags), define its own XML, start.
        virsh_ok(&["destroy", &g.name]);
        let (ok, text) = out(virsh(&["undefine", &g.name]));
        c.check(ok, format!("plain virsh undefine works ({text})"));
        if !ok {
            // To go on and show what the guest sees, drop the metadata as an admin would.
            virsh_ok(&["undefine", &g.name, "--snapshots-metadata"]);
        }
        virsh_ok(&["define", g.xml_path.to_str().unwrap()]);
        virsh_ok(&["start", &g.name]);
    });
}

#[test]
fn cloudstack_transient_stop_start_keeps_the_guest_and_the_snapshot() {
    if !ready("cloudstack_transient_stop_start_keeps_the_guest_and_the_snapshot") {
        return;
    }
    let _one = lock();
    let mut g = CloudGuest::new("i-2-42-VM", 0x42, "", CLOUDSTACK_SYSINFO, 0);
    g.transient = true;
    g.boot();
    {
        let m = mount();
        let info = json(&m.mnt.join("instances/i-2-42-VM/instance.json"));
        let mb = &info["managed_by"];
        assert_eq!(mb["system"], "cloudstack", "{info}");
        assert_eq!(mb["kind"], "user");
        assert_eq!(
            (mb["account_id"].as_u64(), mb["vm_id"].as_u64()),
            (Some(2), Some(42))
        );
    }
    snapshot_then_cloud_rebuild(&g, |_| {
        // CloudStack's stop/start: the transient domain goes, and comes back from its XML.
        virsh_ok(&["destroy", &g.name]);
        virsh_ok(&["create", g.xml_path.to_str().unwrap()]);
    });
    assert!(g.xml.contains("CloudStack"));
}

#[test]
fn launch_of_a_managed_snapshot_is_an_unmanaged_domain() {
    if !ready("launch_of_a_managed_snapshot_is_an_unmanaged_domain") || method() != "auto" {
        return;
    }
    let _one = lock();
    let g = CloudGuest::new("instance-0000002c", 0x2c, nova_metadata(), "", 0);
    // Shut off: the copy is made with our own reader.
    virsh_ok(&["define", g.xml_path.to_str().unwrap()]);
    let before = g.dumpxml(true);
    let m = mount();
    let inst = m.mnt.join("instances/instance-0000002c");
    fs::create_dir(inst.join(".snapshots/off")).expect("mkdir off");
    assert_eq!(g.dumpxml(true), before);
    let sj = json(&inst.join(".snapshots/off/snapshot.json"));
    assert_eq!(
        (sj["method"].as_str(), sj["via"].as_str()),
        (Some("copy"), Some("read")),
        "{sj}"
    );
    assert_eq!(
        sha(&inst.join(".snapshots/off/vda.raw")),
        sha(&g
            .dir
            .join("nova/instances/_base/3f786850e387550fdab836ed7e6dc881de23001b"))
    );
    assert_eq!(
        fs::read_to_string(inst.join(".snapshots/off/files/vda/p1/hello.txt")).unwrap(),
        "hello from the snapfs test guest\n"
    );
    let target = "../instances/instance-0000002c/.snapshots/off";
    for bad in ["instance-0000002d", "i-2-43-VM"] {
        assert_eq!(
            errno(std::os::unix::fs::symlink(
                target,
                m.mnt.join("launch").join(bad)
            )),
            libc::EINVAL,
            "{bad}"
        );
    }
    let new = format!("h13-t{}-copy", std::process::id());
    let _ = virsh(&["destroy", &new]);
    let _ = virsh(&["undefine", &new]);
    std::os::unix::fs::symlink(target, m.mnt.join("launch").join(&new)).expect("launch");
    let cleanup = || {
        let _ = virsh(&["destroy", &new]);
        let _ = virsh(&["undefine", &new]);
        remove_console_logs(&new);
    };
    let x = virsh_ok(&["dumpxml", &new, "--inactive"]);
    let info = json(&m.mnt.join("instances").join(&new).join("instance.json"));
    let busy = fs::remove_dir(inst.join(".snapshots/off"));
    cleanup();
    assert!(!x.contains("openstack.org"), "{x}");
    assert!(info["managed_by"].is_null(), "{info}");
    assert_eq!(errno(busy), libc::EBUSY);
    fs::remove_dir(inst.join(".snapshots/off")).expect("rmdir once the clone is gone");
    for e in fs::read_dir(m.state_dir().join("store/launch"))
        .unwrap()
        .flatten()
    {
        if e.file_name().to_string_lossy().starts_with(&new) {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// A mkdir of `snap` in its own thread, returned once the guest is thawed (the daemon logs
/// the job's start after the thaw) and libvirt shows the backup job running.
fn mkdir_until_the_copy_runs(
    m: &Mount,
    g: &CloudGuest,
    snap: &Path,
) -> std::thread::JoinHandle<std::io::Result<()>> {
    let mk = {
        let snap = snap.to_path_buf();
        std::thread::spawn(move || fs::create_dir(&snap))
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !m.log().contains("backup job started: copying")
        || !out(virsh(&["domjobinfo", &g.name])).1.contains("Backup")
    {
        assert!(Instant::now() < deadline, "backup job never seen");
        std::thread::sleep(Duration::from_millis(20));
    }
    mk
}

#[test]
fn kill_during_the_copy_leaves_no_job_no_freeze_no_half_snapshot() {
    if !ready("kill_during_the_copy_leaves_no_job_no_freeze_no_half_snapshot") || method() != "auto"
    {
        return;
    }
    let _one = lock();
    // 1 GiB of random data after the guest's disk: a copy that takes seconds.
    let g = CloudGuest::new("instance-0000002e", 0x2e, nova_metadata(), "", 1024);
    g.boot();
    let m = mount();
    let snap = m.mnt.join("instances/instance-0000002e/.snapshots/k");
    let store = m.state_dir().join("store").join(&g.uuid);
    let pid = m.daemon_pid().expect("daemon pid");
    // Kill once the backup job runs (the guest is thawed by then: the record-based
    // recovery is tested in tests/libvirt.rs).
    let mk = mkdir_until_the_copy_runs(&m, &g, &snap);
    // SAFETY: a plain kill(2) of the daemon this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    assert!(wait_gone(pid, Duration::from_secs(10)));
    let _ = mk.join();
    let parts: Vec<String> = fs::read_dir(&store)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    eprintln!("store after kill -9: {parts:?}");
    assert!(parts.iter().any(|p| p.starts_with(".part-")), "{parts:?}");
    m.unmount();
    let (_, job) = out(virsh(&["domjobinfo", &g.name]));
    let running = job.contains("Backup");
    eprintln!("backup job still running at restart: {running}");
    // Restart: the job is aborted (if still running), the half copy removed.
    m.mount(&[LIBVIRT_ARG]);
    let mut c = Checks::default();
    c.check(
        !running
            || m.log()
                .contains("backup job of a killed daemon still running: aborting it"),
        "the running backup job was aborted by the new daemon",
    );
    c.check(
        m.log()
            .contains("incomplete store snapshot of a previous daemon removed"),
        "the half copy was removed at start-up",
    );
    c.check(!g.frozen(), "guest thawed");
    no_libvirt_traces(&mut c, &g);
    let left = fs::read_dir(&store).map(|d| d.count()).unwrap_or(0);
    c.check(
        left == 0,
        format!("no half copy left in the store ({left})"),
    );
    let listed = ls(&m.mnt.join("instances/instance-0000002e/.snapshots"));
    c.check(
        listed.is_empty(),
        format!("no broken snapshot listed ({listed:?})"),
    );
    // The guest still writes.
    c.check(
        g.exec("echo ok > /data/after-kill && sync && cat /data/after-kill")
            .trim()
            == "ok",
        "guest writes after the restart",
    );
    // And a new snapshot works.
    fs::create_dir(&snap).expect("mkdir after restart");
    c.check(
        json(&snap.join("snapshot.json"))["method"] == "copy",
        "snapshot after restart",
    );
    c.done(&m.log());
}

/// Removes an RBD test guest and its image (rbd-guest.sh --remove) on drop.
struct RbdGuest(String);

impl Drop for RbdGuest {
    fn drop(&mut self) {
        let _ = script("rbd-guest.sh", &["--remove", &self.0]);
        remove_console_logs(&self.0);
    }
}

/// A fresh RBD-backed test guest `h13-t<pid>-<tag>` (scripts/testbed/rbd-guest.sh, removed
/// on drop): its name, its disk's image spec and its uuid.
struct RbdCase {
    name: String,
    image: String,
    uuid: String,
    _guest: RbdGuest,
}

impl RbdCase {
    fn new(tag: &str) -> RbdCase {
        let name = format!("h13-t{}-{tag}", std::process::id());
        script_ok("rbd-guest.sh", &["--recreate", &name]);
        let guest = RbdGuest(name.clone());
        let uuid = virsh_ok(&["domuuid", &name]).trim().to_string();
        RbdCase {
            image: format!("rbd/{name}-vda"),
            name,
            uuid,
            _guest: guest,
        }
    }

    /// The guest writes a marker file to its data disk and syncs; returns the marker.
    fn write_marker(&self) -> String {
        let marker = format!("marker-{}", std::process::id());
        script_ok(
            "guest-exec.sh",
            &[
                &self.name,
                &format!("echo {marker} > /data/marker && sync"),
                "30",
            ],
        );
        marker
    }
}

/// The serial console logs define-guest.sh (or a launch, renaming the source's) left for `name`.
fn remove_console_logs(name: &str) {
    if let Ok(rd) = fs::read_dir("/var/log/snapfs-testbed") {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(name) {
                let _ = fs::remove_file(e.path());
            }
        }
    }
}

#[test]
fn rbd_backed_managed_domain_keeps_no_rbd_snapshot() {
    if !ready("rbd_backed_managed_domain_keeps_no_rbd_snapshot") || method() != "auto" {
        return;
    }
    let conf = ceph_conf();
    if !ceph_answers(&conf, "rbd") {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIP rbd_backed_managed_domain_keeps_no_rbd_snapshot: Ceph not answering"
        );
        return;
    }
    let _one = lock();
    let name = format!("h13-t{}-rbd", std::process::id());
    let image = format!("rbd/{name}-vda");
    script_ok("rbd-guest.sh", &["--recreate", &name]);
    let _g = RbdGuest(name.clone());
    let before = normalise(&virsh_ok(&["dumpxml", &name]));
    let m = Mount::unmounted();
    let args = [
        LIBVIRT_ARG.to_string(),
        format!("--ceph={}", conf.display()),
        format!("--managed-match=^{name}$"),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    m.mount(&args);
    let snap = m.mnt.join("instances").join(&name).join(".snapshots/s1");
    fs::create_dir(&snap).expect("mkdir s1");
    let mut c = Checks::default();
    let sj = json(&snap.join("snapshot.json"));
    c.check(
        sj["method"] == "copy" && sj["managed_by"]["system"] == "custom",
        format!("copy snapshot of a --managed-match domain ({sj})"),
    );
    xml_unchanged(
        &mut c,
        "live",
        &before,
        &normalise(&virsh_ok(&["dumpxml", &name])),
    );
    let snaps = run(Command::new("rbd")
        .arg("-c")
        .arg(&conf)
        .args(["snap", "ls", "--format", "json", &image]));
    c.check(
        snaps.trim() == "[]",
        format!("no RBD snapshot on the source image ({snaps})"),
    );
    let h1 = sha(&snap.join("vda.raw"));
    c.check(
        fs::read_to_string(snap.join("files/vda/p1/hello.txt")).is_ok(),
        "files/ reads the copy",
    );
    // Nova's instance delete: the domain goes, then the image: nothing of ours blocks it.
    virsh_ok(&["destroy", &name]);
    virsh_ok(&["undefine", &name]);
    let (ok, text) = out(Command::new("rbd")
        .arg("-c")
        .arg(&conf)
        .args(["rm", "--no-progress", &image])
        .output()
        .expect("rbd rm"));
    c.check(ok, format!("rbd rm of the source image works ({text})"));
    c.done(&m.log());
    // The snapshot belongs to a domain that is gone: its copy is still in the store.
    let store = m.state_dir().join("store");
    let copy = fs::read_dir(&store)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name() != "launch")
        .flat_map(|d| fs::read_dir(d.path()).unwrap().flatten())
        .map(|e| e.path().join("vda.qcow2"))
        .next()
        .expect("the copy in the store");
    let raw = m.dir.path().join("copy.raw");
    qemu_img(&[
        "convert",
        "-O",
        "raw",
        copy.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    assert_eq!(sha(&raw), h1, "the store copy reads as vda.raw did");
}

#[test]
fn cloud_destroy_during_the_copy_fails_the_mkdir_cleanly() {
    if !ready("cloud_destroy_during_the_copy_fails_the_mkdir_cleanly") || method() != "auto" {
        return;
    }
    let _one = lock();
    let g = CloudGuest::new("instance-0000002f", 0x2f, nova_metadata(), "", 1024);
    g.boot();
    let m = mount();
    let snap = m.mnt.join("instances/instance-0000002f/.snapshots/d");
    let mk = mkdir_until_the_copy_runs(&m, &g, &snap);
    // Nova's hard reboot in the middle of the copy: nothing of ours is in its way.
    virsh_ok(&["destroy", &g.name]);
    let (ok, text) = out(virsh(&["undefine", &g.name]));
    let res = mk.join().expect("mkdir thread");
    virsh_ok(&["define", g.xml_path.to_str().unwrap()]);
    let mut c = Checks::default();
    c.check(
        ok,
        format!("plain virsh undefine during the copy works ({text})"),
    );
    // EIO (the job failed) or ENOENT (the domain was gone when the daemon looked).
    let errno = res.as_ref().err().and_then(|e| e.raw_os_error());
    c.check(
        errno == Some(libc::EIO) || errno == Some(libc::ENOENT),
        format!("the mkdir fails with EIO or ENOENT ({res:?})"),
    );
    let store = m.state_dir().join("store").join(&g.uuid);
    let left = fs::read_dir(&store).map(|d| d.count()).unwrap_or(0);
    c.check(left == 0, format!("no half copy left ({left})"));
    let listed = ls(&m.mnt.join("instances/instance-0000002f/.snapshots"));
    c.check(listed.is_empty(), format!("nothing listed ({listed:?})"));
    c.done(&m.log());
}

/// A loop device detached on drop.
struct Loop(String);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// Issue 16: a block-device disk (Nova's lvm backend, an attached Cinder LVM/iSCSI volume) of
/// an unmanaged domain is snapshotted by copy, never by moving the guest onto a file overlay:
/// the domain keeps its device, no libvirt snapshot metadata is left, the snapshot's bytes are
/// the device's, `files/` shows its filesystem, instance.json names the device and its size.
#[test]
fn block_device_disk_is_copied_and_reads_exact() {
    if !ready("block_device_disk_is_copied_and_reads_exact") {
        return;
    }
    let _one = lock();
    let g = CloudGuest::new(&format!("h16-blk-{}", std::process::id()), 0x16, "", "", 0);
    // A GPT disk with one ext4 partition holding a file, on a loop device.
    let img = g.dir.join("vdb.img");
    let src = g.dir.join("vdb-src");
    fs::create_dir_all(src.join("etc")).unwrap();
    fs::write(src.join("etc/hello.txt"), "from the block device\n").unwrap();
    run(Command::new("truncate").args(["-s", "64M"]).arg(&img));
    run(Command::new("sgdisk")
        .args(["-o", "-n", "1:2048:0"])
        .arg(&img));
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-E", "offset=1048576", "-d"])
        .arg(&src)
        .arg(&img)
        .arg("62M"));
    let dev = run(Command::new("losetup").args(["-f", "--show"]).arg(&img))
        .trim()
        .to_string();
    let _loop = Loop(dev.clone());
    let disk = format!(
        "    <disk type='block' device='disk'>\n      <driver name='qemu' type='raw'/>\n      <source dev='{dev}'/>\n      <target dev='vdb' bus='virtio'/>\n    </disk>\n  </devices>"
    );
    fs::write(&g.xml_path, g.xml.replacen("</devices>", &disk, 1)).unwrap();
    g.boot();
    let m = mount();
    let inst = m.mnt.join("instances").join(&g.name);
    let info = json(&inst.join("instance.json"));
    let vdb = info["disks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["target"] == "vdb")
        .cloned()
        .unwrap_or_default();
    assert_eq!(vdb["size"], 64 << 20, "{info}");
    assert_eq!(vdb["block_device"]["device"], dev.as_str(), "{info}");

    // The guest writes vdb while the snapshot is taken: one file per step, then a `seq` file
    // that names the step (renamed into place), each step synced.
    g.exec("mkdir -p /mnt/b && mount -t ext4 /dev/vdb1 /mnt/b && mkdir -p /mnt/b/w");
    g.exec(
        "( i=0; while [ ! -e /mnt/b/stop ]; do i=$((i+1)); echo step-$i > /mnt/b/w/$i; \
         echo $i > /mnt/b/seq.tmp; mv /mnt/b/seq.tmp /mnt/b/seq; sync; done ) \
         </dev/null >/dev/null 2>&1 &",
    );
    let steps = || -> u64 {
        g.exec("cat /mnt/b/seq 2>/dev/null || echo 0")
            .trim()
            .parse()
            .unwrap_or(0)
    };
    let t0 = std::time::Instant::now();
    while steps() < 3 && t0.elapsed() < std::time::Duration::from_secs(60) {
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    let before = steps();
    assert!(before >= 3, "the guest's vdb writer did not start");

    let live_before = g.dumpxml(false);
    let inactive_before = g.dumpxml(true);
    fs::create_dir(inst.join(".snapshots/s1")).expect("mkdir s1");
    assert!(!g.frozen(), "the guest was left frozen");
    assert_eq!(g.dumpxml(false), live_before, "the live domain changed");
    assert_eq!(
        g.dumpxml(true),
        inactive_before,
        "the domain definition changed"
    );
    let snaps = virsh_ok(&["snapshot-list", &g.name, "--name"]);
    assert!(
        snaps.trim().is_empty(),
        "libvirt snapshot metadata left: {snaps}"
    );
    let s1 = inst.join(".snapshots/s1");
    let sj = json(&s1.join("snapshot.json"));
    assert_eq!(sj["method"], "copy", "{sj}");
    // The snapshot is one instant of a frozen filesystem: `seq` names a step at or after the
    // one seen before the mkdir, and every step up to it is there with its own bytes.
    let p1 = s1.join("files/vdb/p1");
    let seq: u64 = fs::read_to_string(p1.join("seq"))
        .expect("seq in the snapshot")
        .trim()
        .parse()
        .expect("seq is a number");
    assert!(
        seq >= before,
        "snapshot's seq {seq} < {before} seen before the mkdir"
    );
    for k in 1..=seq {
        assert_eq!(
            fs::read_to_string(p1.join(format!("w/{k}")))
                .ok()
                .as_deref(),
            Some(format!("step-{k}\n").as_str()),
            "w/{k} in the snapshot (seq {seq})"
        );
    }
    assert!(
        !p1.join(format!("w/{}", seq + 2)).exists(),
        "a step two past seq {seq} is in the snapshot"
    );
    assert_eq!(
        fs::read_to_string(p1.join("etc/hello.txt")).unwrap(),
        "from the block device\n"
    );
    assert!(s1.join("vda.raw").exists());
    let after = steps();
    assert!(
        after > seq,
        "the guest's writer stopped (seq {seq}, now {after})"
    );

    // With the writer stopped and vdb unmounted in the guest, nothing changes the device:
    // a snapshot then equals it byte for byte.
    g.exec("touch /mnt/b/stop; sleep 1; sync; umount /mnt/b");
    fs::create_dir(inst.join(".snapshots/s2")).expect("mkdir s2");
    let s2 = inst.join(".snapshots/s2");
    assert_eq!(sha(&s2.join("vdb.raw")), sha(Path::new(&dev)));
    // s1 is unchanged by the later writes and the second snapshot.
    assert_eq!(
        fs::read_to_string(s1.join("files/vdb/p1/seq"))
            .unwrap()
            .trim(),
        seq.to_string()
    );
    drop(m);
}

/// `rbd <args>` against the test cluster; (ok, output).
fn rbd_cmd(conf: &Path, args: &[&str]) -> (bool, String) {
    out(Command::new("rbd")
        .arg("-c")
        .arg(conf)
        .args(args)
        .output()
        .expect("rbd"))
}

/// Every snapshot of an RBD image, trash namespace included (`rbd snap ls --all`).
fn rbd_all_snaps(conf: &Path, image: &str) -> String {
    rbd_cmd(conf, &["snap", "ls", "--all", "--format", "json", image]).1
}

/// `features` and `op_features` of an RBD image (what a clone v2 would leave behind).
fn rbd_features(conf: &Path, image: &str) -> String {
    let (_, t) = rbd_cmd(conf, &["info", "--format", "json", image]);
    let v: serde_json::Value = serde_json::from_str(&t).unwrap_or_default();
    format!("{} {}", v["features"], v["op_features"])
}

/// Images of the store pool's namespace whose name starts with `prefix` (a domain uuid).
fn store_images(conf: &Path, prefix: &str) -> Vec<String> {
    let (_, t) = rbd_cmd(conf, &["ls", "rbd/snapfs"]);
    t.lines()
        .filter(|l| l.starts_with(prefix))
        .map(str::to_string)
        .collect()
}

fn rbd_ready(test: &str) -> Option<PathBuf> {
    if !ready(test) || method() != "auto" {
        return None;
    }
    let conf = ceph_conf();
    if !ceph_answers(&conf, "rbd") {
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "SKIP {test}: Ceph not answering");
        return None;
    }
    Some(conf)
}

fn store_pool_args(conf: &Path, name: &str, extra: &[&str]) -> Vec<String> {
    let mut a = vec![
        LIBVIRT_ARG.to_string(),
        format!("--ceph={}", conf.display()),
        format!("--managed-match=^{name}$"),
        "--store-pool=rbd".to_string(),
    ];
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// `--store-pool`: a running RBD-backed managed domain is snapped, cloned into `rbd/snapfs`,
/// flattened, and the snapshot taken off the source image again: no snapshot (not even in
/// the trash namespace) and the same features on the cloud's image; Nova's delete (`rbd rm`)
/// works and the snapshot still reads exact, with the guest's marker and without what it
/// wrote afterwards; rmdir removes the store image.
#[test]
fn store_pool_copy_leaves_nothing_on_the_cloud_image() {
    let Some(conf) = rbd_ready("store_pool_copy_leaves_nothing_on_the_cloud_image") else {
        return;
    };
    let _one = lock();
    let g = RbdCase::new("sp");
    let (name, image, uuid) = (g.name.clone(), g.image.clone(), g.uuid.clone());
    let features = rbd_features(&conf, &image);
    let marker = g.write_marker();
    let before = normalise(&virsh_ok(&["dumpxml", &name]));
    let m = Mount::unmounted();
    let args = store_pool_args(&conf, &name, &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    m.mount(&args);
    let snap = m.mnt.join("instances").join(&name).join(".snapshots/s1");
    fs::create_dir(&snap).expect("mkdir s1");
    let mut c = Checks::default();
    let sj = json(&snap.join("snapshot.json"));
    eprintln!("snapshot.json: {sj}");
    c.check(
        sj["method"] == "copy" && sj["via"] == "rbd-clone" && sj["quiesced"] == true,
        "method copy via rbd-clone, quiesced",
    );
    let source = sj["disks"][0]["source"].as_str().unwrap_or("").to_string();
    c.check(
        source.starts_with(&format!("rbd/snapfs/{uuid}.")),
        format!("the disk is in the store pool's namespace ({source})"),
    );
    c.check(
        rbd_all_snaps(&conf, &image) == "[]",
        format!(
            "no snapshot left on the source image, trash included ({})",
            rbd_all_snaps(&conf, &image)
        ),
    );
    let after = rbd_features(&conf, &image);
    c.check(
        after == features,
        format!("source features unchanged ({features} -> {after})"),
    );
    xml_unchanged(
        &mut c,
        "live",
        &before,
        &normalise(&virsh_ok(&["dumpxml", &name])),
    );
    // The guest goes on writing; the snapshot does not change.
    script_ok(
        "guest-exec.sh",
        &[&name, "echo later > /data/after-snap && sync", "30"],
    );
    let h1 = sha(&snap.join("vda.raw"));
    let read_marker = fs::read_to_string(snap.join("files/vda/p1/marker")).unwrap_or_default();
    c.check(
        read_marker.trim() == marker,
        format!("files/ shows the marker ({read_marker:?})"),
    );
    c.check(
        !snap.join("files/vda/p1/after-snap").exists(),
        "files/ does not show a file written after the snapshot",
    );
    // Nova's instance delete: the domain, then the image.
    virsh_ok(&["destroy", &name]);
    virsh_ok(&["undefine", &name]);
    let (ok, text) = rbd_cmd(&conf, &["rm", "--no-progress", &image]);
    c.check(ok, format!("rbd rm of the source image works ({text})"));
    // The domain is gone, and with it its directory: the copy is compared through Ceph.
    let copy = source.clone();
    let exported = m.dir.path().join("copy.raw");
    let (ok, text) = rbd_cmd(
        &conf,
        &["export", "--no-progress", &copy, exported.to_str().unwrap()],
    );
    c.check(ok, format!("rbd export of the copy ({text})"));
    c.check(
        sha(&exported) == h1,
        "after rbd rm of the source, the copy exports as vda.raw read",
    );
    c.check(
        store_images(&conf, &uuid).len() == 1,
        "one store image for the snapshot",
    );
    c.done(&m.log());
    // The domain is gone, so no rmdir: the store image is removed as the test's cleanup.
    let base = copy.split('@').next().unwrap_or("").to_string();
    let _ = rbd_cmd(&conf, &["snap", "rm", "--no-progress", &copy]);
    let _ = rbd_cmd(&conf, &["rm", "--no-progress", &base]);
}

/// `--store-pool` on a shut-off domain (no freeze), rmdir, and a kill -9 of the daemon in
/// the middle of the flatten: after the restart the source image has no snapshot, the
/// half copy is gone from the store pool, the store has no `.part-` and nothing is listed;
/// a new mkdir works and rmdir removes its store image.
#[test]
fn store_pool_kill_during_the_flatten_leaves_nothing() {
    let Some(conf) = rbd_ready("store_pool_kill_during_the_flatten_leaves_nothing") else {
        return;
    };
    let _one = lock();
    let g = RbdCase::new("kf");
    let (name, image, uuid) = (g.name.clone(), g.image.clone(), g.uuid.clone());
    virsh_ok(&["destroy", &name]);
    // 1 GiB of data after the guest's disk: a flatten that takes seconds.
    let (ok, text) = rbd_cmd(
        &conf,
        &["resize", "--no-progress", "--size", "1152M", &image],
    );
    assert!(ok, "rbd resize: {text}");
    let (ok, text) = rbd_cmd(
        &conf,
        &[
            "bench",
            "--io-type",
            "write",
            "--io-size",
            "4M",
            "--io-total",
            "1024M",
            "--io-pattern",
            "seq",
            "--io-threads",
            "4",
            &image,
        ],
    );
    assert!(ok, "rbd bench: {text}");
    let features = rbd_features(&conf, &image);
    let m = Mount::unmounted();
    let args = store_pool_args(&conf, &name, &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    m.mount(&args);
    let snaps = m.mnt.join("instances").join(&name).join(".snapshots");
    let store = m.state_dir().join("store").join(&uuid);
    let pid = m.daemon_pid().expect("daemon pid");
    let mk = {
        let s = snaps.join("k");
        std::thread::spawn(move || fs::create_dir(&s))
    };
    // Kill once the copy exists in the store pool and is still a clone (flatten running).
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        assert!(Instant::now() < deadline, "the copy never appeared");
        if let Some(img) = store_images(&conf, &uuid).first() {
            let (_, info) = rbd_cmd(&conf, &["info", &format!("rbd/snapfs/{img}")]);
            if info.contains("parent:") {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: a plain kill(2) of the daemon this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    assert!(wait_gone(pid, Duration::from_secs(10)));
    let _ = mk.join();
    let mut c = Checks::default();
    let left_snaps = rbd_all_snaps(&conf, &image);
    eprintln!(
        "after kill -9: source snapshots {left_snaps}, store images {:?}",
        store_images(&conf, &uuid)
    );
    c.check(
        left_snaps != "[]",
        "the kill came while the source snapshot existed (the test's premise)",
    );
    m.unmount();
    m.mount(&args);
    // The leftovers go at start-up, or in the background once the dead client's watch on
    // the half copy has expired (the OSD's watch timeout, ~30 s).
    let deadline = Instant::now() + Duration::from_secs(240);
    while (rbd_all_snaps(&conf, &image) != "[]" || !store_images(&conf, &uuid).is_empty())
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_secs(1));
    }
    c.check(
        rbd_all_snaps(&conf, &image) == "[]",
        format!(
            "no snapshot on the source after the restart ({})",
            rbd_all_snaps(&conf, &image)
        ),
    );
    c.check(
        store_images(&conf, &uuid).is_empty(),
        format!(
            "no half copy in the store pool ({:?})",
            store_images(&conf, &uuid)
        ),
    );
    c.check(
        rbd_features(&conf, &image) == features,
        "source features unchanged",
    );
    let left = fs::read_dir(&store).map(|d| d.count()).unwrap_or(0);
    c.check(left == 0, format!("no .part- left in the store ({left})"));
    let listed = ls(&snaps);
    c.check(listed.is_empty(), format!("nothing listed ({listed:?})"));
    c.check(
        m.log()
            .contains("incomplete store snapshot of a previous daemon removed"),
        "the new daemon says it removed the half snapshot",
    );
    // A new mkdir of the shut-off domain works, reads as the source, and rmdir cleans up.
    fs::create_dir(snaps.join("k2")).expect("mkdir after the restart");
    let sj = json(&snaps.join("k2/snapshot.json"));
    c.check(
        sj["via"] == "rbd-clone" && sj["quiesced"] == false && sj["stall_ms"].is_null(),
        format!("shut-off copy, no freeze ({sj})"),
    );
    let exported = m.dir.path().join("src.raw");
    let (ok, _) = rbd_cmd(
        &conf,
        &[
            "export",
            "--no-progress",
            &image,
            exported.to_str().unwrap(),
        ],
    );
    c.check(
        ok && sha(&snaps.join("k2/vda.raw")) == sha(&exported),
        "vda.raw equals rbd export of the (unchanged, shut-off) source",
    );
    c.check(rbd_all_snaps(&conf, &image) == "[]", "no source snapshot");
    c.check(
        fs::remove_dir(snaps.join("k2")).is_ok(),
        "rmdir of the store-pool snapshot",
    );
    c.check(
        store_images(&conf, &uuid).is_empty(),
        "rmdir removed the store image",
    );
    c.done(&m.log());
}

/// `--managed-rbd=keep-snapshot` (opt-in, docs/libvirt.md): mkdir leaves the RBD snapshot
/// `snapfs.<id>` on the cloud's image and makes no copy; the snapshot reads as `rbd export` of
/// that RBD snapshot, shows the guest as of the snapshot, survives a daemon restart; what it
/// breaks is checked too (`rbd rm` of the image refused while it exists), and rmdir takes it
/// off again, after which `rbd rm` works.
#[test]
fn keep_snapshot_keeps_the_rbd_snapshot_on_the_cloud_image() {
    let Some(conf) = rbd_ready("keep_snapshot_keeps_the_rbd_snapshot_on_the_cloud_image") else {
        return;
    };
    let _one = lock();
    let g = RbdCase::new("ks");
    let (name, image, uuid) = (g.name.clone(), g.image.clone(), g.uuid.clone());
    let marker = g.write_marker();
    let before = normalise(&virsh_ok(&["dumpxml", &name]));
    let before_inactive = normalise(&virsh_ok(&["dumpxml", "--inactive", &name]));
    let m = Mount::unmounted();
    let args = [
        LIBVIRT_ARG.to_string(),
        format!("--ceph={}", conf.display()),
        format!("--managed-match=^{name}$"),
        "--managed-rbd=keep-snapshot".to_string(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    m.mount(&args);
    let snaps = m.mnt.join("instances").join(&name).join(".snapshots");
    let snap = snaps.join("s1");
    fs::create_dir(&snap).expect("mkdir s1");
    let mut c = Checks::default();
    let sj = json(&snap.join("snapshot.json"));
    eprintln!("snapshot.json: {sj}");
    c.check(
        sj["method"] == "rbd-snapshot" && sj["via"] == "keep-snapshot" && sj["quiesced"] == true,
        "method rbd-snapshot via keep-snapshot, quiesced",
    );
    c.check(sj["disks"][0]["kind"] == "rbd", "the disk's kind is rbd");
    let source = sj["disks"][0]["source"].as_str().unwrap_or("").to_string();
    let rbd_snap = source
        .strip_prefix(&format!("{image}@"))
        .unwrap_or("")
        .to_string();
    c.check(
        rbd_snap.starts_with("snapfs."),
        format!("the data is an RBD snapshot snapfs.<id> of the cloud's image ({source})"),
    );
    let listed: serde_json::Value =
        serde_json::from_str(&rbd_all_snaps(&conf, &image)).unwrap_or_default();
    let names: Vec<&str> = listed
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["name"].as_str())
        .collect();
    c.check(
        names == [rbd_snap.as_str()],
        format!("exactly that snapshot on the source image ({names:?})"),
    );
    c.check(
        store_images(&conf, &uuid).is_empty(),
        "no copy made in the store pool",
    );
    xml_unchanged(
        &mut c,
        "live",
        &before,
        &normalise(&virsh_ok(&["dumpxml", &name])),
    );
    xml_unchanged(
        &mut c,
        "inactive",
        &before_inactive,
        &normalise(&virsh_ok(&["dumpxml", "--inactive", &name])),
    );
    let (_, lsnaps) = out(virsh(&["snapshot-list", &name, "--name"]));
    c.check(lsnaps.is_empty(), "no libvirt snapshot metadata");
    // The guest goes on writing; the snapshot does not change.
    script_ok(
        "guest-exec.sh",
        &[&name, "echo later > /data/after-snap && sync", "30"],
    );
    let h1 = sha(&snap.join("vda.raw"));
    let exported = m.dir.path().join("snap.raw");
    let (ok, text) = rbd_cmd(
        &conf,
        &[
            "export",
            "--no-progress",
            &source,
            exported.to_str().unwrap(),
        ],
    );
    c.check(
        ok && sha(&exported) == h1,
        format!("vda.raw equals rbd export of {source} ({text})"),
    );
    let read_marker = fs::read_to_string(snap.join("files/vda/p1/marker")).unwrap_or_default();
    c.check(
        read_marker.trim() == marker,
        format!("files/ shows the marker ({read_marker:?})"),
    );
    c.check(
        !snap.join("files/vda/p1/after-snap").exists(),
        "files/ does not show a file written after the snapshot",
    );
    // The record is the store's: a new daemon lists the snapshot and reads the same bytes.
    remount_with(&m, &args);
    c.check(
        ls(&snaps) == ["s1"],
        format!("listed after a restart ({:?})", ls(&snaps)),
    );
    c.check(
        snap.join("vda.raw").exists() && sha(&snap.join("vda.raw")) == h1,
        "vda.raw hashes the same after a restart",
    );
    // What keep-snapshot breaks: with the domain gone, Nova's `rbd rm` of its image fails.
    virsh_ok(&["destroy", &name]);
    let (ok, text) = rbd_cmd(&conf, &["rm", "--no-progress", &image]);
    c.check(
        !ok && text.contains("snapshot"),
        format!("rbd rm of the source refused while the snapshot is kept ({text})"),
    );
    // rmdir takes the snapshot off the cloud's image: then the delete works.
    c.check(fs::remove_dir(&snap).is_ok(), "rmdir s1");
    c.check(
        rbd_all_snaps(&conf, &image) == "[]",
        format!(
            "no snapshot on the source after rmdir ({})",
            rbd_all_snaps(&conf, &image)
        ),
    );
    let (ok, text) = rbd_cmd(&conf, &["rm", "--no-progress", &image]);
    c.check(
        ok,
        format!("rbd rm of the source works after rmdir ({text})"),
    );
    c.done(&m.log());
}

/// Unmount, wait for the daemon to exit, mount again with `args`.
fn remount_with(m: &Mount, args: &[&str]) {
    let pid = m.daemon_pid();
    m.unmount();
    if let Some(pid) = pid {
        assert!(
            wait_gone(pid, Duration::from_secs(10)),
            "daemon did not exit"
        );
    }
    m.mount(args);
}

/// A launched domain and its RBD clone, removed on drop.
struct Launched {
    name: String,
    conf: PathBuf,
}

impl Drop for Launched {
    fn drop(&mut self) {
        let _ = virsh(&["destroy", &self.name]);
        let _ = virsh(&["undefine", &self.name]);
        remove_rbd_image(&self.conf, &format!("rbd/{}-vda", self.name));
        remove_console_logs(&self.name);
    }
}

/// Launch from a `--store-pool` copy: `ln -s …/.snapshots/s1 launch/<new>` boots a new,
/// unmanaged domain on an RBD clone of the store copy (not of the cloud's image), and the
/// managed domain's image gets no snapshot, no clone and no feature change; rmdir is EBUSY
/// while the clone exists, then removes the copy.
#[test]
fn store_pool_launch_boots_an_unmanaged_clone_of_the_copy() {
    let Some(conf) = rbd_ready("store_pool_launch_boots_an_unmanaged_clone_of_the_copy") else {
        return;
    };
    let _one = lock();
    let g = RbdCase::new("sl");
    let (name, image, uuid) = (g.name.clone(), g.image.clone(), g.uuid.clone());
    let features = rbd_features(&conf, &image);
    let m = Mount::unmounted();
    let args = store_pool_args(&conf, &name, &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    m.mount(&args);
    let snaps = m.mnt.join("instances").join(&name).join(".snapshots");
    fs::create_dir(snaps.join("s1")).expect("mkdir s1");
    let sj = json(&snaps.join("s1/snapshot.json"));
    assert_eq!(sj["via"], "rbd-clone", "{sj}");
    let copy = sj["disks"][0]["source"].as_str().unwrap_or("").to_string();
    let before = normalise(&virsh_ok(&["dumpxml", &name]));
    let before_inactive = normalise(&virsh_ok(&["dumpxml", "--inactive", &name]));

    let new = format!("h13-t{}-sl-new", std::process::id());
    let launched = Launched {
        name: new.clone(),
        conf: conf.clone(),
    };
    let _ = virsh(&["destroy", &new]);
    let _ = virsh(&["undefine", &new]);
    std::os::unix::fs::symlink(
        format!("../instances/{name}/.snapshots/s1"),
        m.mnt.join("launch").join(&new),
    )
    .expect("launch from the store-pool copy");
    let mut c = Checks::default();
    let (_, state) = out(virsh(&["domstate", &new]));
    c.check(state == "running", format!("the new domain runs ({state})"));
    let x = virsh_ok(&["dumpxml", &new]);
    c.check(
        x.contains(&format!("name='rbd/{new}-vda'")) && !x.contains(&format!("{name}-vda")),
        "the new domain's disk is its own clone, not the cloud's image",
    );
    let info: serde_json::Value = serde_json::from_str(
        &rbd_cmd(
            &conf,
            &["info", "--format", "json", &format!("rbd/{new}-vda")],
        )
        .1,
    )
    .unwrap_or_default();
    let parent = &info["parent"];
    c.check(
        parent["pool"] == "rbd"
            && parent["pool_namespace"] == "snapfs"
            && copy
                == format!(
                    "rbd/snapfs/{}@{}",
                    parent["image"].as_str().unwrap_or("?"),
                    parent["snapshot"].as_str().unwrap_or("?")
                ),
        format!("the clone's parent is the store copy {copy} ({parent})"),
    );
    let ni = json(&m.mnt.join("instances").join(&new).join("instance.json"));
    c.check(
        ni["managed_by"].is_null(),
        format!("the new domain is unmanaged ({})", ni["managed_by"]),
    );
    c.check(
        ls(&m.mnt.join("launch")).contains(&new),
        "launch/ lists the new domain",
    );
    // The managed domain and its image: untouched.
    c.check(
        rbd_all_snaps(&conf, &image) == "[]",
        format!(
            "no snapshot on the cloud's image ({})",
            rbd_all_snaps(&conf, &image)
        ),
    );
    c.check(
        rbd_features(&conf, &image) == features,
        "the cloud's image keeps its features",
    );
    let (_, children) = rbd_cmd(&conf, &["children", "--all", &image]);
    c.check(
        children.is_empty(),
        format!("no clone of the cloud's image ({children})"),
    );
    xml_unchanged(
        &mut c,
        "live",
        &before,
        &normalise(&virsh_ok(&["dumpxml", &name])),
    );
    xml_unchanged(
        &mut c,
        "inactive",
        &before_inactive,
        &normalise(&virsh_ok(&["dumpxml", "--inactive", &name])),
    );
    let (_, st) = out(virsh(&["domstate", &name]));
    c.check(
        st == "running",
        format!("the managed domain still runs ({st})"),
    );
    // rmdir: EBUSY while the clone depends on the copy; once it is gone, the copy goes.
    c.check(
        errno(fs::remove_dir(snaps.join("s1"))) == libc::EBUSY,
        "rmdir EBUSY while the launched clone exists",
    );
    drop(launched);
    c.check(
        fs::remove_dir(snaps.join("s1")).is_ok(),
        "rmdir once the clone is gone",
    );
    c.check(
        store_images(&conf, &uuid).is_empty(),
        format!("the store copy removed ({:?})", store_images(&conf, &uuid)),
    );
    c.done(&m.log());
    for i in store_images(&conf, &uuid) {
        remove_rbd_image(&conf, &format!("rbd/snapfs/{i}"));
    }
}

/// Whether device-mapper and the LVM tools work here; the reason when not.
fn lvm_missing() -> Option<String> {
    let probe = |cmd: &str, args: &[&str]| -> Option<String> {
        match Command::new(cmd).args(args).output() {
            Ok(o) if o.status.success() => None,
            Ok(o) => Some(format!(
                "`{cmd} {}` failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => Some(format!("`{cmd}`: {e}")),
        }
    };
    probe("dmsetup", &["version"]).or_else(|| probe("lvm", &["version"]))
}

/// A volume group on a loop device, removed with its LVs on drop.
struct TestVg {
    vg: String,
    dev: String,
    file: PathBuf,
}

impl TestVg {
    fn lvm(args: &[&str]) -> String {
        run(Command::new("lvm").args(args))
    }
}

impl Drop for TestVg {
    fn drop(&mut self) {
        let _ = Command::new("vgremove").args(["-f", &self.vg]).output();
        let _ = Command::new("pvremove").args(["-f", &self.dev]).output();
        let _ = Command::new("losetup").args(["-d", &self.dev]).output();
        let _ = fs::remove_file(&self.file);
    }
}

/// Issue 16, `--lvm-snapshots`: a guest whose every disk is an LV (vda a thick LV holding the
/// test disk, vdb a thin LV with GPT + ext4): mkdir takes an LVM snapshot of each (quiesced,
/// `method` `lvm-snapshot`), the domain unchanged, `files/` shows the guest as of the
/// snapshot, `vdb.raw` is the thin LV's bytes; rmdir removes the LV snapshots; a thick LV
/// without `--lvm-cow-size` is EINVAL with no LV made and the guest not left frozen.
/// Needs device-mapper: where `dmsetup version` fails (the machines this was written on) it
/// prints SKIP with the reason.
#[test]
fn lvm_snapshots_of_a_thick_and_a_thin_lv() {
    if !ready("lvm_snapshots_of_a_thick_and_a_thin_lv") || method() != "auto" {
        return;
    }
    if let Some(why) = lvm_missing() {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIP lvm_snapshots_of_a_thick_and_a_thin_lv: no device-mapper/LVM here ({why})"
        );
        return;
    }
    let _one = lock();
    let pid = std::process::id();
    let file = PathBuf::from(format!("/var/tmp/h16-lvm-{pid}.img"));
    run(Command::new("truncate").args(["-s", "512M"]).arg(&file));
    let dev = run(Command::new("losetup").args(["-f", "--show"]).arg(&file))
        .trim()
        .to_string();
    let vg = format!("h16lvm{pid}");
    let tvg = TestVg {
        vg: vg.clone(),
        dev: dev.clone(),
        file,
    };
    TestVg::lvm(&["pvcreate", "-q", &dev]);
    TestVg::lvm(&["vgcreate", "-q", &vg, &dev]);
    TestVg::lvm(&["lvcreate", "-q", "-y", "-L", "64M", "-n", "root", &vg]);
    TestVg::lvm(&[
        "lvcreate",
        "-q",
        "-y",
        "-L",
        "160M",
        "-T",
        &format!("{vg}/pool"),
    ]);
    TestVg::lvm(&[
        "lvcreate",
        "-q",
        "-y",
        "-V",
        "64M",
        "-T",
        &format!("{vg}/pool"),
        "-n",
        "thin",
    ]);
    let root = format!("/dev/{vg}/root");
    let thin = format!("/dev/{vg}/thin");
    let g = CloudGuest::new(&format!("h16-lvm-{pid}"), 0x1616, "", "", 0);
    qemu_img(&[
        "convert",
        "-n",
        "-O",
        "raw",
        guest_dir().join("demo-disk.qcow2").to_str().unwrap(),
        &root,
    ]);
    let src = g.dir.join("vdb-src");
    fs::create_dir_all(src.join("etc")).unwrap();
    fs::write(src.join("etc/hello.txt"), "from the thin LV\n").unwrap();
    run(Command::new("sgdisk").args(["-o", "-n", "1:2048:0", &thin]));
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-E", "offset=1048576", "-d"])
        .arg(&src)
        .arg(&thin)
        .arg("62M"));
    // vda: the thick LV instead of the qcow2 file; vdb: the thin LV.
    let disk = g.dir.join(format!("nova/instances/{}/disk", g.uuid));
    let mut xml = g.xml.clone();
    for (from, to) in [
        (
            "<disk type='file' device='disk'>".to_string(),
            "<disk type='block' device='disk'>".to_string(),
        ),
        ("type='qcow2'/>".to_string(), "type='raw'/>".to_string()),
        (
            format!("<source file='{}'/>", disk.display()),
            format!("<source dev='{root}'/>"),
        ),
        (
            "</devices>".to_string(),
            format!("    <disk type='block' device='disk'>\n      <driver name='qemu' type='raw'/>\n      <source dev='{thin}'/>\n      <target dev='vdb' bus='virtio'/>\n    </disk>\n  </devices>"),
        ),
    ] {
        assert!(xml.contains(&from), "{from} not in the guest's XML:\n{xml}");
        xml = xml.replacen(&from, &to, 1);
    }
    fs::write(&g.xml_path, &xml).unwrap();
    g.boot();
    g.exec("echo before > /data/before-snap && sync");
    let lv_snaps = || -> Vec<String> {
        TestVg::lvm(&["lvs", "--noheadings", "-o", "lv_name", &vg])
            .lines()
            .map(str::trim)
            .filter(|l| l.contains(".snapfs."))
            .map(str::to_string)
            .collect()
    };

    // A thick LV without --lvm-cow-size: refused before any freeze, nothing made.
    let m = Mount::unmounted();
    m.mount(&[LIBVIRT_ARG, "--lvm-snapshots"]);
    let inst = m.mnt.join("instances").join(&g.name);
    assert_eq!(
        errno(fs::create_dir(inst.join(".snapshots/nocow"))),
        libc::EINVAL
    );
    assert!(lv_snaps().is_empty(), "{:?}", lv_snaps());
    assert!(!g.frozen());
    m.unmount();

    m.mount(&[LIBVIRT_ARG, "--lvm-snapshots", "--lvm-cow-size=32M"]);
    let live = g.dumpxml(false);
    let inactive = g.dumpxml(true);
    let s1 = inst.join(".snapshots/s1");
    fs::create_dir(&s1).expect("mkdir s1");
    let mut c = Checks::default();
    c.check(!g.frozen(), "guest not frozen after mkdir");
    let sj = json(&s1.join("snapshot.json"));
    eprintln!("snapshot.json: {sj}");
    c.check(
        sj["method"] == "lvm-snapshot" && sj["quiesced"] == true,
        "method lvm-snapshot, quiesced",
    );
    let snaps = lv_snaps();
    c.check(
        snaps.len() == 2
            && snaps.iter().any(|s| s.starts_with("root.snapfs."))
            && snaps.iter().any(|s| s.starts_with("thin.snapfs.")),
        format!("an LV snapshot of each LV ({snaps:?})"),
    );
    xml_unchanged(&mut c, "live", &live, &g.dumpxml(false));
    xml_unchanged(&mut c, "inactive", &inactive, &g.dumpxml(true));
    no_libvirt_traces(&mut c, &g);
    g.exec("echo after > /data/after-snap && sync");
    let p1 = s1.join("files/vda/p1");
    c.check(
        p1.join("before-snap").exists() && !p1.join("after-snap").exists(),
        "files/ shows the guest as of the snapshot",
    );
    c.check(
        fs::read_to_string(s1.join("files/vdb/p1/etc/hello.txt"))
            .is_ok_and(|t| t == "from the thin LV\n"),
        "files/vdb shows the thin LV's filesystem",
    );
    // vdb is never mounted in the guest: the snapshot is the LV's bytes.
    c.check(
        sha(&s1.join("vdb.raw")) == sha(Path::new(&thin)),
        "vdb.raw hashes as the thin LV",
    );
    c.check(fs::remove_dir(&s1).is_ok(), "rmdir s1");
    c.check(
        lv_snaps().is_empty(),
        format!("rmdir removed the LV snapshots ({:?})", lv_snaps()),
    );
    let log = m.log();
    m.unmount();
    drop(g);
    drop(tvg);
    c.done(&log);
}

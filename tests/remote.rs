//! Several libvirt hosts in one mount, against a real second libvirtd: the one of
//! scripts/testbed/remote-up.sh (its own network and mount namespaces, qemu+tcp on a veth
//! pair, a shut-off domain `remote1` whose disk is a qcow2 overlay on a qcow2 base in a
//! directory pool; docs/testbed.md).
//!
//! Without the second host the tests print a skip message and pass, unless
//! `SNAPFS_REQUIRE_TESTBED=1` (CI), where they fail. The tests that cut the veth link run
//! one at a time and put the link back up whatever happens.

mod common;

use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;

const LOCAL: &str = "qemu:///system";
const REMOTE: &str = "qemu+tcp://10.213.0.2/system";
const REMOTE_HOST: &str = "10.213.0.2";
const HOST_IF: &str = "snapfs-rem0";
const POOL: &str = "snapfs-remote";
static LINK: Mutex<()> = Mutex::new(());

fn virsh_at(uri: &str, args: &[&str]) -> std::process::Output {
    Command::new("virsh")
        .args(["-q", "-c", uri])
        .args(args)
        .output()
        .expect("run virsh")
}

fn virsh_ok(uri: &str, args: &[&str]) -> String {
    let o = virsh_at(uri, args);
    assert!(
        o.status.success(),
        "virsh -c {uri} {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Whether both hosts answer; panics when they are required and one does not.
fn hosts_ready(test: &str) -> bool {
    let mut missing = Vec::new();
    for uri in [LOCAL, REMOTE] {
        if !virsh_at(uri, &["version"]).status.success() {
            missing.push(format!("libvirt at {uri} not reachable"));
        }
    }
    if missing.is_empty() && !virsh_at(REMOTE, &["dominfo", "remote1"]).status.success() {
        missing.push("domain remote1 missing on the second host".into());
    }
    if missing.is_empty() {
        return true;
    }
    let why = missing.join("; ");
    if std::env::var("SNAPFS_REQUIRE_TESTBED").as_deref() == Ok("1") {
        panic!(
            "second host required (SNAPFS_REQUIRE_TESTBED=1) but not ready: {why} \
             (run scripts/testbed/up.sh and scripts/testbed/remote-up.sh)"
        );
    }
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "SKIP {test}: {why} (scripts/testbed/remote-up.sh brings the second host up)"
    );
    false
}

fn mount_two_hosts() -> Mount {
    Mount::with_providers(&["-c", LOCAL, "-c", REMOTE])
}

fn instance(m: &Mount, name: &str) -> PathBuf {
    m.mnt.join("instances").join(name)
}

/// The veth link down until dropped (then up again, even when the test fails).
struct LinkCut;

impl LinkCut {
    fn new() -> LinkCut {
        run(Command::new("ip").args(["link", "set", HOST_IF, "down"]));
        LinkCut
    }
}

impl Drop for LinkCut {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "set", HOST_IF, "up"])
            .status();
    }
}

/// Poll `f` until it holds or `limit` passes (a bound against hanging, not a speed check).
fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    while t.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    f()
}

#[test]
fn two_hosts_list_as_domain_at_host() {
    // One at a time, the readiness check included: another test may have the link cut.
    let _one = LINK.lock().unwrap_or_else(|e| e.into_inner());
    if !hosts_ready("two_hosts_list_as_domain_at_host") {
        return;
    }
    let m = mount_two_hosts();
    let listed = ls(&m.mnt.join("instances"));
    let mut want: Vec<String> = virsh_ok(LOCAL, &["list", "--all", "--name"])
        .lines()
        .filter(|l| !l.is_empty())
        .map(|d| format!("{d}@local"))
        .collect();
    want.extend(
        virsh_ok(REMOTE, &["list", "--all", "--name"])
            .lines()
            .filter(|l| !l.is_empty())
            .map(|d| format!("{d}@{REMOTE_HOST}")),
    );
    want.sort();
    // Local domains may come and go while other tests run: compare the remote ones exactly
    // and require every local name listed to be a local domain with the suffix.
    let remote_listed: Vec<&String> = listed
        .iter()
        .filter(|n| n.ends_with(&format!("@{REMOTE_HOST}")))
        .collect();
    let remote_want: Vec<&String> = want
        .iter()
        .filter(|n| n.ends_with(&format!("@{REMOTE_HOST}")))
        .collect();
    assert_eq!(remote_listed, remote_want, "{listed:?}");
    assert!(
        listed.contains(&format!("remote1@{REMOTE_HOST}")),
        "{listed:?}"
    );
    for n in &listed {
        assert!(
            n.ends_with("@local") || n.ends_with(&format!("@{REMOTE_HOST}")),
            "{n} has no host part"
        );
    }
    assert!(
        listed.iter().any(|n| n.ends_with("@local")),
        "no local instance listed: {listed:?}"
    );

    let j: serde_json::Value = serde_json::from_str(
        &fs::read_to_string(instance(&m, &format!("remote1@{REMOTE_HOST}")).join("instance.json"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(j["name"], "remote1");
    assert_eq!(j["host"], REMOTE_HOST);
    assert_eq!(j["uri"], REMOTE);
    assert_eq!(j["state"], "shut off");
    let uuid = virsh_ok(REMOTE, &["domuuid", "remote1"]);
    assert_eq!(j["uuid"], uuid.trim());

    // The same domain name without the host part is no instance.
    assert_eq!(errno(fs::metadata(instance(&m, "remote1"))), libc::ENOENT);
    assert_eq!(
        errno(fs::metadata(instance(&m, "remote1@elsewhere"))),
        libc::ENOENT
    );
}

#[test]
fn one_uri_keeps_plain_names_and_one_host_twice_is_refused() {
    // One at a time, the readiness check included: another test may have the link cut.
    let _one = LINK.lock().unwrap_or_else(|e| e.into_inner());
    if !hosts_ready("one_uri_keeps_plain_names_and_one_host_twice_is_refused") {
        return;
    }
    let m = Mount::with_providers(&["-c", REMOTE]);
    let listed = ls(&m.mnt.join("instances"));
    assert!(listed.contains(&"remote1".to_string()), "{listed:?}");
    assert!(!listed.iter().any(|n| n.contains('@')), "{listed:?}");
    drop(m);

    let m = Mount::unmounted();
    let out = Command::new(BIN)
        .args(["mount", "--foreground", "--state-dir"])
        .arg(m.state_dir())
        .args(["-c", REMOTE, "-c", "qemu+ssh://root@10.213.0.2:22/system"])
        .arg(&m.mnt)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("same host \"10.213.0.2\""), "{err}");
    assert!(!m.is_mounted());
}

#[test]
fn a_host_that_does_not_answer_is_eio_and_comes_back() {
    // One at a time, the readiness check included: another test may have the link cut.
    let _one = LINK.lock().unwrap_or_else(|e| e.into_inner());
    if !hosts_ready("a_host_that_does_not_answer_is_eio_and_comes_back") {
        return;
    }
    let m = mount_two_hosts();
    let remote1 = instance(&m, &format!("remote1@{REMOTE_HOST}"));
    assert!(remote1.join("instance.json").exists());
    // A connection is open now; cut the link under it.
    {
        let _cut = LinkCut::new();
        // Past the mount's listing cache (--list-ttl-ms 200): the next accesses ask libvirt.
        std::thread::sleep(Duration::from_millis(400));
        let json = fs::read_to_string(remote1.join("instance.json"));
        assert_eq!(
            errno(json),
            libc::EIO,
            "instance.json with the host cut off"
        );
        assert_eq!(
            errno(fs::read_dir(remote1.join(".snapshots"))),
            libc::EIO,
            ".snapshots with the host cut off"
        );
        // The rest of the mount keeps working; the host's instances are not listed.
        let listed = ls(&m.mnt.join("instances"));
        assert!(
            listed.iter().any(|n| n.ends_with("@local")),
            "local instances must still list: {listed:?}"
        );
        assert!(
            !listed
                .iter()
                .any(|n| n.ends_with(&format!("@{REMOTE_HOST}"))),
            "{listed:?}"
        );
        let demo = m.mnt.join("instances/demo@local/instance.json");
        if virsh_at(LOCAL, &["dominfo", "demo"]).status.success() {
            assert!(fs::read_to_string(&demo).is_ok(), "local demo unreadable");
        }
    }
    // Link up: it comes back by itself on a later access.
    let back = eventually(Duration::from_secs(90), || {
        ls(&m.mnt.join("instances")).contains(&format!("remote1@{REMOTE_HOST}"))
    });
    assert!(
        back,
        "remote1 not listed again after the link came back:\n{}",
        m.log()
    );
    assert!(fs::read_to_string(remote1.join("instance.json")).is_ok());
    let log = m.log();
    assert_eq!(
        log.matches("libvirt host does not answer").count(),
        1,
        "one warning per outage:\n{log}"
    );
    assert!(log.contains("libvirt host answers again"), "{log}");
}

/// The guest bytes of remote volume `vol` (and its backing chain), made here from
/// `virsh vol-download` of each volume: the reference for what the mount reads.
fn reference_raw(dir: &std::path::Path, vol: &str, internal: Option<&str>) -> PathBuf {
    let mut chain: Vec<PathBuf> = Vec::new();
    let mut name = vol.to_string();
    for _ in 0..8 {
        let local = dir.join(format!("{}.img", chain.len()));
        virsh_ok(
            REMOTE,
            &[
                "vol-download",
                "--pool",
                POOL,
                &name,
                local.to_str().unwrap(),
            ],
        );
        chain.push(local.clone());
        let info: serde_json::Value = serde_json::from_str(&qemu_img(&[
            "info",
            "--output=json",
            local.to_str().unwrap(),
        ]))
        .unwrap();
        match info["backing-filename"].as_str() {
            Some(b) => name = b.rsplit('/').next().unwrap().to_string(),
            None => break,
        }
    }
    // Point each downloaded layer at the downloaded one below it.
    for w in chain.windows(2) {
        let fmt = serde_json::from_str::<serde_json::Value>(&qemu_img(&[
            "info",
            "--output=json",
            w[1].to_str().unwrap(),
        ]))
        .unwrap()["format"]
            .as_str()
            .unwrap()
            .to_string();
        qemu_img(&[
            "rebase",
            "-u",
            "-b",
            w[1].to_str().unwrap(),
            "-F",
            &fmt,
            w[0].to_str().unwrap(),
        ]);
    }
    let raw = dir.join("reference.raw");
    let mut args = vec!["convert".to_string(), "-O".into(), "raw".into()];
    if let Some(s) = internal {
        args.extend(["-l".into(), format!("snapshot.name={s}")]);
    }
    args.extend([
        chain[0].to_str().unwrap().to_string(),
        raw.to_str().unwrap().to_string(),
    ]);
    qemu_img(&args.iter().map(String::as_str).collect::<Vec<_>>());
    raw
}

/// Deletes the snapshot through the remote libvirtd unless the test did (a failed test leaves
/// remote1 on its own disk).
struct SnapCleanup(String);

impl Drop for SnapCleanup {
    fn drop(&mut self) {
        let _ = virsh_at(REMOTE, &["snapshot-delete", "remote1", &self.0]);
    }
}

#[test]
fn remote_snapshot_mkdir_read_rmdir() {
    // One at a time, the readiness check included: another test may have the link cut.
    let _one = LINK.lock().unwrap_or_else(|e| e.into_inner());
    if !hosts_ready("remote_snapshot_mkdir_read_rmdir") {
        return;
    }
    let m = mount_two_hosts();
    let remote1 = instance(&m, &format!("remote1@{REMOTE_HOST}"));
    let disk_before = virsh_ok(REMOTE, &["domblklist", "remote1"]);
    let name = format!("issue17h-{}", std::process::id());
    let snap = remote1.join(".snapshots").join(&name);

    // mkdir: an external disk-only snapshot of the shut-off domain, made by its libvirtd.
    fs::create_dir(&snap).unwrap();
    let _cleanup = SnapCleanup(name.clone());
    let names = virsh_ok(REMOTE, &["snapshot-list", "remote1", "--name"]);
    assert!(names.lines().any(|l| l == name), "{names}");
    let j: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(snap.join("snapshot.json")).unwrap()).unwrap();
    let source = j["disks"][0]["source"].as_str().unwrap().to_string();
    assert!(
        !std::path::Path::new(&source).exists(),
        "{source} exists here: the test would not prove remote reads"
    );
    let vol = source.rsplit('/').next().unwrap().to_string();

    // The snapshot's disk through the mount = the volumes downloaded by virsh, converted here.
    let tmp = tempfile::tempdir().unwrap();
    let reference = reference_raw(tmp.path(), &vol, None);
    let disk = snap.join("vda.raw");
    assert_eq!(
        fs::metadata(&disk).unwrap().len(),
        fs::metadata(&reference).unwrap().len()
    );
    run(Command::new("cmp").arg(&disk).arg(&reference));
    // Random reads too (not only the sequential read-ahead path).
    let want = fs::read(&reference).unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = fs::File::open(&disk).unwrap();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..64 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = 1 + (seed % 300_000) as usize;
            let off = (seed >> 20) % (want.len() - len) as u64;
            let mut buf = vec![0u8; len];
            f.read_exact_at(&mut buf, off).unwrap();
            assert!(
                buf == want[off as usize..off as usize + len],
                "bytes differ at {off:#x}+{len}"
            );
        }
    }

    // rmdir: deleted by the remote libvirtd, the domain back on its disk.
    fs::remove_dir(&snap).unwrap();
    let names = virsh_ok(REMOTE, &["snapshot-list", "remote1", "--name"]);
    assert!(!names.lines().any(|l| l == name), "{names}");
    assert_eq!(virsh_ok(REMOTE, &["domblklist", "remote1"]), disk_before);
}

#[test]
fn a_host_down_at_mount_time_comes_back_and_its_freeze_records_are_handled() {
    // One at a time, the readiness check included: another test may have the link cut.
    let _one = LINK.lock().unwrap_or_else(|e| e.into_inner());
    if !hosts_ready("a_host_down_at_mount_time_comes_back_and_its_freeze_records_are_handled") {
        return;
    }
    let m = Mount::unmounted();
    // A record a dead daemon left for remote1 (shut off: recovery removes it), kept in the
    // host's own state directory.
    let uuid = virsh_ok(REMOTE, &["domuuid", "remote1"]).trim().to_string();
    let frozen = m.state_dir().join("hosts").join(REMOTE_HOST).join("frozen");
    fs::create_dir_all(&frozen).unwrap();
    let record = frozen.join(&uuid);
    fs::write(&record, br#"{"domain":"remote1"}"#).unwrap();
    {
        let _cut = LinkCut::new();
        m.mount(&["-c", LOCAL, "-c", REMOTE]);
        let listed = ls(&m.mnt.join("instances"));
        assert!(
            !listed
                .iter()
                .any(|n| n.ends_with(&format!("@{REMOTE_HOST}"))),
            "{listed:?}"
        );
        assert!(listed.iter().any(|n| n.ends_with("@local")), "{listed:?}");
        assert_eq!(
            errno(fs::metadata(instance(
                &m,
                &format!("remote1@{REMOTE_HOST}")
            ))),
            libc::EIO
        );
        assert!(record.exists(), "the record waits for its host");
    }
    let back = eventually(Duration::from_secs(90), || {
        ls(&m.mnt.join("instances")).contains(&format!("remote1@{REMOTE_HOST}"))
    });
    assert!(
        back,
        "remote1 not listed after the link came back:\n{}",
        m.log()
    );
    assert!(!record.exists(), "freeze record not handled:\n{}", m.log());
    assert!(
        m.log()
            .contains("freeze record of a domain that is not running: removed"),
        "{}",
        m.log()
    );
}

/// Removes a launched domain and its overlay volumes from the second host (also when the
/// test fails).
struct RemoteLaunch(String);

impl RemoteLaunch {
    /// Volumes of the remote pool made for this launch (`<new>.launch.<target>.qcow2`).
    fn volumes(&self) -> Vec<String> {
        let o = virsh_at(REMOTE, &["vol-list", POOL, "--details"]);
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| n.starts_with(&format!("{}.", self.0)))
            .map(String::from)
            .collect()
    }
}

impl Drop for RemoteLaunch {
    fn drop(&mut self) {
        let _ = virsh_at(REMOTE, &["destroy", &self.0]);
        let _ = virsh_at(REMOTE, &["undefine", &self.0]);
        for v in self.volumes() {
            let _ = virsh_at(REMOTE, &["vol-delete", "--pool", POOL, &v]);
        }
    }
}

/// `ln -s` of a snapshot of a remote instance launches on the host that holds it: the
/// overlay is made there by its storage API (no file on this machine), the domain defined
/// and started through the remote connection, and it lists as `instances/<new>@<host>`.
/// Two TCG guests do not fit this machine, so the new domain is destroyed once seen
/// running (its disk, the test bed's, boots nothing anyway).
#[test]
fn launch_on_the_remote_host_that_holds_the_snapshot() {
    let _one = LINK.lock().unwrap_or_else(|e| e.into_inner());
    if !hosts_ready("launch_on_the_remote_host_that_holds_the_snapshot") {
        return;
    }
    let m = mount_two_hosts();
    let remote1 = instance(&m, &format!("remote1@{REMOTE_HOST}"));
    let name = format!("issue17f-{}", std::process::id());
    let new = format!("issue17f-l{}", std::process::id());
    let snap = remote1.join(".snapshots").join(&name);
    fs::create_dir(&snap).unwrap();
    let _cleanup = SnapCleanup(name.clone());
    let launched = RemoteLaunch(new.clone());
    let j: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(snap.join("snapshot.json")).unwrap()).unwrap();
    let source = j["disks"][0]["source"].as_str().unwrap().to_string();

    let target = format!("../instances/remote1@{REMOTE_HOST}/.snapshots/{name}");
    let link = m.mnt.join("launch").join(&new);
    if let Err(e) = std::os::unix::fs::symlink(&target, &link) {
        panic!(
            "ln -s {target} on a remote snapshot: {e}; log:\n{}",
            m.log()
        );
    }
    assert_eq!(fs::read_link(&link).unwrap(), PathBuf::from(&target));
    let state = virsh_ok(REMOTE, &["domstate", &new]);
    assert_eq!(state.trim(), "running", "new domain on the remote host");
    assert!(
        !virsh_at(LOCAL, &["dominfo", &new]).status.success(),
        "{new} was defined on this machine"
    );
    // Its disk: an overlay made on the remote host, on the snapshot's image.
    let blk = virsh_ok(REMOTE, &["domblklist", &new, "--details"]);
    let disk = blk
        .lines()
        .find(|l| l.split_whitespace().nth(2) == Some("vda"))
        .and_then(|l| l.split_whitespace().nth(3))
        .unwrap_or_else(|| panic!("no vda in {blk}"))
        .to_string();
    assert!(disk.contains(&new), "{disk}");
    assert!(
        !std::path::Path::new(&disk).exists(),
        "{disk} exists on this machine"
    );
    assert_eq!(launched.volumes().len(), 1, "{:?}", launched.volumes());
    let vol = virsh_ok(REMOTE, &["vol-dumpxml", &disk]);
    assert!(
        vol.contains(&format!("<path>{source}</path>")),
        "overlay {disk} is not backed by the snapshot's image {source}: {vol}"
    );
    // Listed with its host, and as a launch of the remote snapshot.
    assert!(
        ls(&m.mnt.join("instances")).contains(&format!("{new}@{REMOTE_HOST}")),
        "{:?}",
        ls(&m.mnt.join("instances"))
    );
    assert!(
        ls(&m.mnt.join("launch")).contains(&format!("{new}@{REMOTE_HOST}")),
        "{:?}",
        ls(&m.mnt.join("launch"))
    );
    // A taken name is EEXIST there too.
    assert_eq!(
        errno(std::os::unix::fs::symlink(&target, &link)),
        libc::EEXIST
    );
    // The snapshot's image backs the new domain's disk: rmdir is refused, running or not.
    assert_eq!(
        errno(fs::remove_dir(&snap)),
        libc::EBUSY,
        "rmdir while launched"
    );
    // Two TCG guests do not fit: stop it, then everything goes.
    virsh_ok(REMOTE, &["destroy", &new]);
    assert_eq!(
        errno(fs::remove_dir(&snap)),
        libc::EBUSY,
        "rmdir while defined"
    );
    drop(launched);
    fs::remove_dir(&snap).unwrap();
}

/// The launched domain `new` on the remote host: seen running, then destroyed (two TCG
/// guests do not fit this machine); its vda is one raw volume of the remote pool, not a file
/// of this machine, equal to `reference` and sparse there. Returns the volume's path.
fn check_uploaded_launch(launched: &RemoteLaunch, reference: &std::path::Path) -> String {
    let new = &launched.0;
    assert_eq!(
        virsh_ok(REMOTE, &["domstate", new]).trim(),
        "running",
        "new domain on the remote host"
    );
    virsh_ok(REMOTE, &["destroy", new]);
    let blk = virsh_ok(REMOTE, &["domblklist", new, "--details"]);
    let disk = blk
        .lines()
        .find(|l| l.split_whitespace().nth(2) == Some("vda"))
        .and_then(|l| l.split_whitespace().nth(3))
        .unwrap_or_else(|| panic!("no vda in {blk}"))
        .to_string();
    assert!(
        disk.ends_with(".raw") && disk.contains(new.as_str()),
        "{disk}"
    );
    assert!(
        !std::path::Path::new(&disk).exists(),
        "{disk} exists on this machine"
    );
    assert_eq!(launched.volumes().len(), 1, "{:?}", launched.volumes());
    let tmp = tempfile::tempdir().unwrap();
    let copy = tmp.path().join("copy.raw");
    let vol = disk.rsplit('/').next().unwrap().to_string();
    virsh_ok(
        REMOTE,
        &["vol-download", "--pool", POOL, &vol, copy.to_str().unwrap()],
    );
    assert_eq!(
        fs::metadata(&copy).unwrap().len(),
        fs::metadata(reference).unwrap().len(),
        "size of the uploaded copy"
    );
    assert_eq!(
        first_difference(&copy, reference),
        None,
        "uploaded copy differs from the snapshot"
    );
    // Sparse on the remote host: holes and zeros were not sent.
    let a = fs::read(&copy).unwrap();
    let data = a.chunks(4096).filter(|c| c.iter().any(|&x| x != 0)).count() as u64 * 4096;
    assert!(data > 0, "the snapshot holds no data: nothing was checked");
    let info = virsh_ok(REMOTE, &["vol-info", "--bytes", &disk]);
    let alloc: u64 = info
        .lines()
        .find(|l| l.starts_with("Allocation:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no allocation in {info}"));
    assert!(
        alloc < data + (8 << 20),
        "copy allocates {alloc} bytes for {data} bytes of data"
    );
    disk
}

/// `ln -s` of `snap` (a snapshot of remote1, as a path relative to the mount's `launch/`)
/// as `launch/<new>`.
fn launch_remote(m: &Mount, target: &str, new: &str) {
    let link = m.mnt.join("launch").join(new);
    if let Err(e) = std::os::unix::fs::symlink(target, &link) {
        panic!("ln -s {target}: {e}; log:\n{}", m.log());
    }
}

/// A snapshot no overlay can be backed by (an internal qcow2 snapshot, made by the remote
/// libvirtd in remote1's shut-off qcow2 disk) launches on its host too: a sparse raw copy is
/// made there through its storage API (volume created empty, data uploaded with
/// `virStorageVolUpload`, read from the snapshot through `virStorageVolDownload`), nothing on
/// this machine; the copy equals `qemu-img convert -l snapshot.name=` of the downloaded chain.
#[test]
fn launch_of_an_internal_snapshot_on_a_remote_host_uploads_a_copy() {
    let _one = LINK.lock().unwrap_or_else(|e| e.into_inner());
    if !hosts_ready("launch_of_an_internal_snapshot_on_a_remote_host_uploads_a_copy") {
        return;
    }
    let name = format!("lead-int-{}", std::process::id());
    let new = format!("lead-intl-{}", std::process::id());
    virsh_ok(REMOTE, &["snapshot-create-as", "remote1", &name]);
    let _cleanup = SnapCleanup(name.clone());
    let x = virsh_ok(REMOTE, &["snapshot-dumpxml", "remote1", &name]);
    assert!(x.contains("snapshot='internal'"), "not internal: {x}");
    let m = mount_two_hosts();
    let remote1 = instance(&m, &format!("remote1@{REMOTE_HOST}"));
    assert!(
        remote1.join(".snapshots").join(&name).is_dir(),
        "{:?}",
        ls(&remote1.join(".snapshots"))
    );
    let launched = RemoteLaunch(new.clone());
    launch_remote(
        &m,
        &format!("../instances/remote1@{REMOTE_HOST}/.snapshots/{name}"),
        &new,
    );
    let tmp = tempfile::tempdir().unwrap();
    let reference = reference_raw(tmp.path(), "remote1.qcow2", Some(&name));
    check_uploaded_launch(&launched, &reference);
}

/// A copy snapshot of a remote instance (`--snapshot-method copy`: its bytes downloaded into
/// this machine's store) launches on the instance's host: the copy is uploaded there, beside
/// the instance's own disk. Once launched, rmdir of the snapshot still works (the new domain
/// has its own copy).
#[test]
fn launch_of_a_store_copy_on_a_remote_host_uploads_it() {
    let _one = LINK.lock().unwrap_or_else(|e| e.into_inner());
    if !hosts_ready("launch_of_a_store_copy_on_a_remote_host_uploads_it") {
        return;
    }
    let name = format!("lead-copy-{}", std::process::id());
    let new = format!("lead-copyl-{}", std::process::id());
    let m = Mount::with_providers(&["-c", LOCAL, "-c", REMOTE, "--snapshot-method", "copy"]);
    let remote1 = instance(&m, &format!("remote1@{REMOTE_HOST}"));
    let snap = remote1.join(".snapshots").join(&name);
    if let Err(e) = fs::create_dir(&snap) {
        panic!("mkdir {}: {e}; log:\n{}", snap.display(), m.log());
    }
    let j: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(snap.join("snapshot.json")).unwrap()).unwrap();
    assert_eq!(j["method"], "copy", "{j}");
    let launched = RemoteLaunch(new.clone());
    launch_remote(
        &m,
        &format!("../instances/remote1@{REMOTE_HOST}/.snapshots/{name}"),
        &new,
    );
    // remote1 is shut off: its disk now is the snapshot's state.
    let tmp = tempfile::tempdir().unwrap();
    let reference = reference_raw(tmp.path(), "remote1.qcow2", None);
    let disk = check_uploaded_launch(&launched, &reference);
    assert!(
        disk.starts_with("/var/lib/libvirt/images/snapfs-remote/"),
        "copy not beside remote1's disk: {disk}"
    );
    // The new domain owns a full copy: the snapshot goes while it exists.
    if let Err(e) = fs::remove_dir(&snap) {
        panic!(
            "rmdir with the launched domain defined: {e}; log:\n{}",
            m.log()
        );
    }
    drop(launched);
}

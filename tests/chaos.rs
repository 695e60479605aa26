//! Chaos and load suite (issue 17, part 2; docs/testing.md "Chaos suite").
//!
//! One real snapfs mount serves three owners at once: a qcow2 volume of an image directory
//! (internal snapshots), an RBD image on the test Ceph, and (when the guest lock allows) a TCG
//! guest of the libvirt test bed whose writer keeps writing. Reader threads stream snapshot
//! disks and walk `files/` of volume snapshots, checking every byte, while the main loop
//! creates, renames and deletes snapshots, writes to the volumes, and injects faults at random
//! points: `kill -9` of the daemon (during an operation) and a restart on the same state
//! directory, ENOSPC on the state directory (a small tmpfs), the guest agent stopped, libvirtd
//! stopped and started, the Ceph OSD stopped and started (long form).
//!
//! After every step the invariants are checked (see [`Chaos::check`]); the report at the end
//! counts operations, faults, checks and violations, and the test fails on any violation.
//!
//! Short form (part of `cargo test`): `SNAPFS_CHAOS_SECONDS` defaults to 120. Long form:
//! `scripts/chaos.sh` (same code, longer, every fault kind). `SNAPFS_CHAOS_SEED` replays a run;
//! the seed is printed first.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{find_process, wait_gone, BIN};

/// A hang detector, not a speed goal: every mkdir/rmdir/rename must return within this.
const OP_BOUND: Duration = Duration::from_secs(120);
/// Bounds of the daemon's resident memory and open descriptors (generous; leaks grow past).
const RSS_BOUND_KB: u64 = 1536 * 1024;
const FD_BOUND: usize = 512;
const CHUNK: usize = 1 << 20;
/// The ext4 filesystem fills the first 32 MiB of each volume; writes go above it.
const FS_BYTES: u64 = 32 << 20;
const VOL_BYTES: u64 = 48 << 20;
const MAX_SNAPS: usize = 4;
const GUEST_LOCK: &str = "/tmp/snapfs-guest.lock";
const TESTBED: &str = "/var/lib/snapfs-testbed";
const CEPH_DIR: &str = "/var/lib/snapfs-ceph";
const POOL: &str = "rbd";

/// Seeded xorshift64*: the whole run follows from the seed (threads get derived seeds).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn say(s: &str) {
    // Straight to stderr: the test harness captures eprintln! of passing tests.
    let _ = writeln!(std::io::stderr(), "{s}");
}

fn sha(b: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(b).into()
}

fn errno_name(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EIO) => "EIO".into(),
        Some(libc::ENOENT) => "ENOENT".into(),
        Some(libc::ENOTCONN) => "ENOTCONN".into(),
        Some(libc::ECONNABORTED) => "ECONNABORTED".into(),
        Some(libc::ENOSPC) => "ENOSPC".into(),
        Some(libc::EBUSY) => "EBUSY".into(),
        Some(libc::ETIMEDOUT) => "ETIMEDOUT".into(),
        Some(libc::ENOTSUP) => "ENOTSUP".into(),
        Some(libc::EEXIST) => "EEXIST".into(),
        Some(libc::ESTALE) => "ESTALE".into(),
        Some(libc::EINVAL) => "EINVAL".into(),
        Some(libc::EPERM) => "EPERM".into(),
        Some(n) => format!("errno {n}"),
        None => format!("{e}"),
    }
}

/// Errors a reader may see: the daemon killed (ENOTCONN/ECONNABORTED), a backend down (EIO),
/// the snapshot deleted meanwhile (ENOENT, ESTALE).
fn reader_may_fail_with(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EIO | libc::ENOENT | libc::ENOTCONN | libc::ECONNABORTED | libc::ESTALE)
    )
}

/// Run a tool, bounded by `timeout(1)`; (success, stdout, stderr).
fn tool(secs: u32, prog: &str, args: &[&str]) -> (bool, String, String) {
    match Command::new("timeout")
        .arg(secs.to_string())
        .arg(prog)
        .args(args)
        .output()
    {
        Ok(o) => (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        ),
        Err(e) => (false, String::new(), format!("cannot run {prog}: {e}")),
    }
}

fn tool_ok(secs: u32, prog: &str, args: &[&str]) -> String {
    let (ok, out, err) = tool(secs, prog, args);
    assert!(ok, "{prog} {args:?} failed: {out}{err}");
    out
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Image,
    Rbd,
    Guest,
}

/// One snapshot owner in the mount.
struct Owner {
    kind: Kind,
    /// `…/.snapshots` in the mount.
    snaps: PathBuf,
    /// The disk file inside a snapshot directory.
    disk: &'static str,
    /// Backend name: the image file, the RBD spec, the domain.
    backend: String,
}

/// What a snapshot's disk held when it was taken: SHA-256 of each 1 MiB chunk.
#[derive(Clone)]
struct Snap {
    owner: usize,
    name: String,
    chunks: Arc<Vec<[u8; 32]>>,
    size: u64,
}

#[derive(Default)]
struct Stats {
    ops: Mutex<BTreeMap<String, u64>>,
    faults: Mutex<BTreeMap<String, u64>>,
    checks: AtomicU64,
    violations: Mutex<Vec<String>>,
    reader_bytes: AtomicU64,
    reader_chunks: AtomicU64,
    reader_files: AtomicU64,
    reader_errors: Mutex<BTreeMap<String, u64>>,
    max_op_ms: Mutex<BTreeMap<String, u64>>,
}

impl Stats {
    fn op(&self, what: &str) {
        *self.ops.lock().unwrap().entry(what.into()).or_default() += 1;
    }
    fn fault(&self, what: &str) {
        *self.faults.lock().unwrap().entry(what.into()).or_default() += 1;
    }
    fn check(&self) {
        self.checks.fetch_add(1, Ordering::Relaxed);
    }
    fn violation(&self, what: String) {
        say(&format!("VIOLATION: {what}"));
        self.violations.lock().unwrap().push(what);
    }
    fn reader_error(&self, what: String) {
        *self.reader_errors.lock().unwrap().entry(what).or_default() += 1;
    }
    fn took(&self, op: &str, d: Duration) {
        let mut m = self.max_op_ms.lock().unwrap();
        let e = m.entry(op.into()).or_default();
        *e = (*e).max(d.as_millis() as u64);
    }
}

/// Faults that last a few steps.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Down {
    Enospc,
    Agent,
    Libvirtd,
    Osd,
}

struct Setup {
    base: PathBuf,
    mnt: PathBuf,
    state: PathBuf,
    tmpfs: bool,
    mount_args: Vec<String>,
    guest: Option<String>,
    rbd: Option<(PathBuf, String)>,
    libvirtd_stopped: AtomicBool,
    osd_stopped: AtomicBool,
    lock_fd: Option<std::fs::File>,
}

impl Setup {
    fn daemon_pid(&self) -> Option<i32> {
        find_process(|a| {
            a.first().is_some_and(|x| x.ends_with("snapfs"))
                && a.get(1).is_some_and(|x| x == "mount")
                && a.iter().any(|x| Path::new(x) == self.mnt)
        })
    }

    /// `snapfs mount` with the same arguments and state directory; Err with its stderr.
    fn mount(&self) -> Result<(), String> {
        let out = Command::new(BIN)
            .args(&self.mount_args)
            .output()
            .map_err(|e| format!("run snapfs: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        // Whatever happened: services back, guest thawed and removed, mount and tmpfs gone.
        if self.osd_stopped.load(Ordering::SeqCst) {
            let _ = tool(300, "bash", &[&repo("scripts/ceph/start-ceph.sh")]);
        }
        if self.libvirtd_stopped.load(Ordering::SeqCst) {
            let _ = tool(120, "bash", &[&repo("scripts/testbed/start-libvirt.sh")]);
        }
        let pid = self.daemon_pid();
        let _ = Command::new(BIN)
            .args(["unmount", "--lazy"])
            .arg(&self.mnt)
            .output();
        if let Some(pid) = pid {
            if !wait_gone(pid, Duration::from_secs(10)) {
                // SAFETY: kill(2) of the daemon this test started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        if let Some(g) = &self.guest {
            let _ = tool(
                20,
                &repo("scripts/testbed/guest-ctl.sh"),
                &[g, "agent-resume"],
            );
            let _ = tool(
                30,
                &repo("scripts/testbed/guest-agent-start.sh"),
                &[g, "20"],
            );
            remove_domain(g);
        }
        if let Some((conf, spec)) = &self.rbd {
            common::remove_rbd_image(conf, spec);
        }
        if self.tmpfs {
            let _ = Command::new("umount").arg("-l").arg(&self.state).output();
        }
        // The daemon's log outlives the run, for a post-mortem.
        let _ = std::fs::copy(
            self.base.join("snapfs.log"),
            "/var/tmp/chaos17-last-snapfs.log",
        );
        let _ = std::fs::remove_dir_all(&self.base);
        drop(self.lock_fd.take());
    }
}

fn repo(rel: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(rel)
        .to_string_lossy()
        .into_owned()
}

fn virsh(args: &[&str]) -> (bool, String, String) {
    let mut a = vec!["-q", "-c", "qemu:///system"];
    a.extend_from_slice(args);
    tool(60, "virsh", &a)
}

/// Destroy and undefine our guest with its snapshot metadata and files.
fn remove_domain(name: &str) {
    let _ = virsh(&["destroy", name]);
    let (_, snaps, _) = virsh(&["snapshot-list", name, "--name"]);
    for s in snaps.lines().map(str::trim).filter(|s| !s.is_empty()) {
        let _ = virsh(&["snapshot-delete", name, s, "--metadata"]);
    }
    let _ = virsh(&["undefine", name]);
    let prefix = format!("{name}.");
    if let Ok(rd) = std::fs::read_dir(Path::new(TESTBED).join("images")) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let _ = std::fs::remove_file(format!("/var/log/snapfs-testbed/{name}.console.log"));
}

/// Whether an ancestor of this process holds the flock on `path` (the suite run as
/// `flock /tmp/snapfs-guest.lock cargo test …`).
fn ancestor_holds_lock(path: &str) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(md) = std::fs::metadata(path) else {
        return false;
    };
    let ino = md.ino().to_string();
    let locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
    let holders: Vec<i32> = locks
        .lines()
        .filter(|l| l.contains("FLOCK") && !l.contains("->"))
        .filter(|l| {
            l.split_whitespace()
                .nth(5)
                .is_some_and(|d| d.rsplit(':').next() == Some(ino.as_str()))
        })
        .filter_map(|l| l.split_whitespace().nth(4)?.parse().ok())
        .collect();
    let mut pid = std::process::id() as i32;
    for _ in 0..64 {
        if holders.contains(&pid) {
            return true;
        }
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let Some(after) = stat.rsplit(')').next() else {
            return false;
        };
        match after.split_whitespace().nth(1).and_then(|p| p.parse().ok()) {
            Some(pp) if pp > 1 => pid = pp,
            _ => return false,
        }
    }
    false
}

/// Guest lock: held by an ancestor (fine), taken here (held until the end), or busy (None).
fn guest_lock() -> Option<Option<std::fs::File>> {
    if ancestor_holds_lock(GUEST_LOCK) {
        return Some(None);
    }
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(GUEST_LOCK)
        .ok()?;
    use std::os::fd::AsRawFd;
    // SAFETY: flock(2) on a descriptor we own.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    (r == 0).then_some(Some(f))
}

fn testbed_ready() -> bool {
    let g = Path::new(TESTBED).join("guest");
    ["vmlinuz", "initrd.img", "cmdline", "demo-disk.qcow2"]
        .iter()
        .all(|f| g.join(f).exists())
        && virsh(&["version"]).0
}

/// The ext4 tree of both volumes: relative path -> SHA-256 of its content.
fn make_tree(src: &Path, rng: &mut Rng) -> BTreeMap<String, [u8; 32]> {
    let mut map = BTreeMap::new();
    for i in 0..24u64 {
        let rel = format!("d{}/sub{}/f{i}.bin", i % 3, i % 2);
        let len = 1 + rng.below(if i % 5 == 0 { 600_000 } else { 40_000 }) as usize;
        let data = rng.bytes(len);
        let p = src.join(&rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, &data).unwrap();
        map.insert(rel, sha(&data));
    }
    let hello = b"hello from chaos17\n".to_vec();
    std::fs::write(src.join("hello.txt"), &hello).unwrap();
    map.insert("hello.txt".into(), sha(&hello));
    map
}

/// Chunk hashes of a snapshot disk read through the mount.
fn hash_disk(path: &Path) -> std::io::Result<(Vec<[u8; 32]>, u64)> {
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; CHUNK];
    let mut out = Vec::new();
    let mut size = 0u64;
    loop {
        let n = read_full(&mut f, &mut buf)?;
        if n == 0 {
            break;
        }
        out.push(sha(&buf[..n]));
        size += n as u64;
        if n < CHUNK {
            break;
        }
    }
    Ok((out, size))
}

fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Shared state of the run.
struct Chaos {
    setup: Setup,
    owners: Vec<Owner>,
    snaps: Mutex<Vec<Snap>>,
    tree: BTreeMap<String, [u8; 32]>,
    stats: Stats,
    stop: AtomicBool,
    /// Names whose fate is unknown (an operation interrupted by a fault): owner, name.
    uncertain: Mutex<BTreeSet<(usize, String)>>,
    restarts: AtomicU64,
    /// RBD snapshots found in the trash namespace (an interrupted removal left them).
    rbd_trash: Mutex<BTreeSet<String>>,
    /// Snapshots an `rmdir` is deleting right now (owner, name).
    deleting: Mutex<BTreeSet<(usize, String)>>,
}

impl Chaos {
    fn snap_dir(&self, s: &Snap) -> PathBuf {
        self.owners[s.owner].snaps.join(&s.name)
    }

    /// A reader: stream random spans of snapshot disks (chunk by chunk against the hashes
    /// taken at mkdir) or walk `files/` of a volume snapshot (against the source tree).
    fn reader(&self, mut rng: Rng) {
        let mut buf = vec![0u8; CHUNK];
        while !self.stop.load(Ordering::Relaxed) {
            let pick = {
                let s = self.snaps.lock().unwrap();
                if s.is_empty() {
                    None
                } else {
                    Some(s[rng.below(s.len() as u64) as usize].clone())
                }
            };
            let Some(snap) = pick else {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            };
            let kind = self.owners[snap.owner].kind;
            if kind != Kind::Guest && rng.chance(30) {
                self.walk_files(&snap);
                continue;
            }
            let path = self.snap_dir(&snap).join(self.owners[snap.owner].disk);
            let n = snap.chunks.len() as u64;
            let first = rng.below(n);
            let count = 1 + rng.below(8.min(n - first));
            let r = (|| -> std::io::Result<()> {
                let mut f = std::fs::File::open(&path)?;
                f.seek(SeekFrom::Start(first * CHUNK as u64))?;
                for c in first..first + count {
                    let got = read_full(&mut f, &mut buf)?;
                    let want = (snap.size - c * CHUNK as u64).min(CHUNK as u64) as usize;
                    self.stats
                        .reader_bytes
                        .fetch_add(got as u64, Ordering::Relaxed);
                    if got != want || sha(&buf[..got]) != snap.chunks[c as usize] {
                        // RBD included: a snapshot deleted under an open file reads EIO
                        // (finding F5, fixed), never other bytes.
                        self.stats.violation(format!(
                            "reader got wrong bytes: {} chunk {c} ({got} bytes read, {want} expected)",
                            path.display()
                        ));
                        return Ok(());
                    }
                    self.stats.reader_chunks.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            })();
            if let Err(e) = r {
                self.reader_failed(&path, &e);
            }
        }
    }

    fn reader_failed(&self, path: &Path, e: &std::io::Error) {
        if reader_may_fail_with(e) {
            if std::env::var_os("SNAPFS_CHAOS_DEBUG").is_some() {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default();
                say(&format!(
                    "reader {}.{:03}: {} {}",
                    now.as_secs() % 3600,
                    now.subsec_millis(),
                    path.display(),
                    errno_name(e)
                ));
            }
            self.stats.reader_error(errno_name(e));
            // Errors come fast: do not spin on a dead mount.
            std::thread::sleep(Duration::from_millis(20));
        } else {
            self.stats.violation(format!(
                "reader: {} failed with {} ({e})",
                path.display(),
                errno_name(e)
            ));
        }
    }

    fn walk_files(&self, snap: &Snap) {
        let root = self.snap_dir(snap).join("files/whole");
        let mut seen = 0usize;
        let mut stack = vec![root.clone()];
        while let Some(dir) = stack.pop() {
            let rd = match std::fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e) => return self.reader_failed(&dir, &e),
            };
            for e in rd {
                let e = match e {
                    Ok(e) => e,
                    Err(e) => return self.reader_failed(&dir, &e),
                };
                let p = e.path();
                let ft = match e.file_type() {
                    Ok(t) => t,
                    Err(err) => return self.reader_failed(&p, &err),
                };
                if ft.is_dir() {
                    stack.push(p);
                } else if ft.is_file() {
                    let rel = p
                        .strip_prefix(&root)
                        .unwrap_or(&p)
                        .to_string_lossy()
                        .into_owned();
                    match std::fs::read(&p) {
                        Ok(b) => {
                            self.stats
                                .reader_bytes
                                .fetch_add(b.len() as u64, Ordering::Relaxed);
                            if self.tree.get(&rel) != Some(&sha(&b)) {
                                self.stats.violation(format!(
                                    "files/ walk: {} has wrong content ({} bytes)",
                                    p.display(),
                                    b.len()
                                ));
                            } else {
                                seen += 1;
                                self.stats.reader_files.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(e) => return self.reader_failed(&p, &e),
                    }
                } else if !ft.is_symlink() && !ft.is_fifo() {
                    self.stats
                        .violation(format!("files/ walk: unexpected entry {}", p.display()));
                }
            }
        }
        if seen != self.tree.len() {
            self.stats.violation(format!(
                "files/ walk of {} saw {seen} of {} files",
                root.display(),
                self.tree.len()
            ));
        }
    }
}

/// Run `f` in its own thread, bounded by [`OP_BOUND`] (a hang detector).
fn bounded<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<(T, Duration), Duration> {
    let (tx, rx) = std::sync::mpsc::channel();
    let t = Instant::now();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(OP_BOUND) {
        Ok(v) => Ok((v, t.elapsed())),
        Err(_) => Err(t.elapsed()),
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

#[test]
fn chaos_load_with_faults_keeps_invariants() {
    let seconds = env_u64("SNAPFS_CHAOS_SECONDS").unwrap_or(120);
    let seed = env_u64("SNAPFS_CHAOS_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(17)
    });
    let long = std::env::var("SNAPFS_CHAOS_LONG").is_ok_and(|v| v == "1") || seconds > 300;
    let readers = env_u64("SNAPFS_CHAOS_READERS").unwrap_or(3) as usize;
    say(&format!(
        "chaos17: SNAPFS_CHAOS_SEED={seed} SNAPFS_CHAOS_SECONDS={seconds} ({} form), {readers} readers",
        if long { "long" } else { "short" }
    ));
    let mut rng = Rng::new(seed);

    // --- the machine-wide pieces --------------------------------------------------------
    let id = format!("chaos17-{}", std::process::id());
    let base = PathBuf::from("/var/tmp").join(&id);
    let _ = std::fs::remove_dir_all(&base);
    let mnt = base.join("mnt");
    let state = base.join("state");
    let pool_dir = base.join(format!("{id}-img"));
    for d in [&mnt, &state, &pool_dir, &base.join("src")] {
        std::fs::create_dir_all(d).expect("mkdir");
    }
    let mut setup = Setup {
        base: base.clone(),
        mnt: mnt.clone(),
        state: state.clone(),
        tmpfs: false,
        mount_args: Vec::new(),
        guest: None,
        rbd: None,
        libvirtd_stopped: AtomicBool::new(false),
        osd_stopped: AtomicBool::new(false),
        lock_fd: None,
    };
    setup.tmpfs = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16m,mode=0700"])
        .arg(format!("{id}-state"))
        .arg(&state)
        .status()
        .is_ok_and(|s| s.success());
    if !setup.tmpfs {
        say("chaos17: cannot mount a tmpfs state directory (not root?): no ENOSPC faults");
    }

    // Both volumes hold the same ext4 (first 32 MiB) so files/ walks have a reference.
    let tree = make_tree(&base.join("src"), &mut Rng::new(seed ^ 0xF11E5));
    let raw = base.join("fs.raw");
    tool_ok(
        60,
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-b",
            "4096",
            "-d",
            base.join("src").to_str().unwrap(),
            raw.to_str().unwrap(),
            "32M",
        ],
    );
    std::fs::OpenOptions::new()
        .write(true)
        .open(&raw)
        .and_then(|f| f.set_len(VOL_BYTES))
        .expect("grow fs.raw");
    let image = pool_dir.join("vol.qcow2");
    tool_ok(
        60,
        "qemu-img",
        &[
            "convert",
            "-O",
            "qcow2",
            raw.to_str().unwrap(),
            image.to_str().unwrap(),
        ],
    );

    let conf = common::ceph_conf();
    if common::ceph_answers(&conf, POOL) {
        let spec = format!("{POOL}/{id}-rbd");
        common::remove_rbd_image(&conf, &spec);
        tool_ok(
            120,
            "rbd",
            &[
                "-c",
                conf.to_str().unwrap(),
                "import",
                "--no-progress",
                raw.to_str().unwrap(),
                &spec,
            ],
        );
        setup.rbd = Some((conf.clone(), spec));
    } else {
        assert!(
            std::env::var("SNAPFS_REQUIRE_CEPH").as_deref() != Ok("1"),
            "SNAPFS_REQUIRE_CEPH=1 but Ceph does not answer"
        );
        say("chaos17: no Ceph cluster: the RBD volume is left out");
    }

    let want_guest = std::env::var("SNAPFS_CHAOS_GUEST").as_deref() != Ok("0");
    let mut have_lock = false;
    if want_guest && testbed_ready() {
        match guest_lock() {
            Some(fd) => {
                have_lock = true;
                setup.lock_fd = fd;
                let name = id.clone();
                remove_domain(&name);
                setup.guest = Some(name.clone());
                let outdir = format!("{TESTBED}/guest");
                tool_ok(
                    180,
                    &repo("scripts/testbed/define-guest.sh"),
                    &["--recreate", "--start", &name, &outdir],
                );
                tool_ok(180, &repo("scripts/testbed/wait-agent.sh"), &[&name, "150"]);
            }
            None => say(&format!(
                "chaos17: {GUEST_LOCK} is held by someone else: the guest part is left out \
                 (run under `flock {GUEST_LOCK} cargo test …` to include it)"
            )),
        }
    } else if want_guest {
        assert!(
            std::env::var("SNAPFS_REQUIRE_TESTBED").as_deref() != Ok("1"),
            "SNAPFS_REQUIRE_TESTBED=1 but the test bed is not ready"
        );
        say("chaos17: test bed not ready: the guest part is left out");
    }

    let mut args: Vec<String> = vec![
        "mount".into(),
        "--list-ttl-ms".into(),
        "200".into(),
        "--state-dir".into(),
        state.to_string_lossy().into(),
        "--log-file".into(),
        base.join("snapfs.log").to_string_lossy().into(),
        "--log-max-mb".into(),
        "16".into(),
        "--images".into(),
        pool_dir.to_string_lossy().into(),
    ];
    if let Some((conf, _)) = &setup.rbd {
        args.extend(
            [
                "--ceph",
                conf.to_str().unwrap(),
                "--pool",
                POOL,
                "--ceph-timeout",
                "5",
            ]
            .map(String::from),
        );
    }
    if setup.guest.is_some() {
        args.extend(["--libvirt=qemu:///system", "--freeze-timeout", "10"].map(String::from));
    }
    args.push(mnt.to_string_lossy().into());
    setup.mount_args = args;
    if let Err(e) = setup.mount() {
        panic!("snapfs mount failed: {e}");
    }

    let mut owners = vec![Owner {
        kind: Kind::Image,
        snaps: mnt.join(format!("volumes/{id}-img/vol.qcow2/.snapshots")),
        disk: "disk.raw",
        backend: image.to_string_lossy().into(),
    }];
    if let Some((_, spec)) = &setup.rbd {
        owners.push(Owner {
            kind: Kind::Rbd,
            snaps: mnt.join(format!("volumes/{POOL}/{id}-rbd/.snapshots")),
            disk: "disk.raw",
            backend: spec.clone(),
        });
    }
    if let Some(g) = &setup.guest {
        owners.push(Owner {
            kind: Kind::Guest,
            snaps: mnt.join(format!("instances/{g}/.snapshots")),
            disk: "vda.raw",
            backend: g.clone(),
        });
        let t = Instant::now();
        while !owners.last().unwrap().snaps.is_dir() {
            assert!(t.elapsed() < Duration::from_secs(20), "guest not listed");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    let chaos = Arc::new(Chaos {
        setup,
        owners,
        snaps: Mutex::new(Vec::new()),
        tree,
        stats: Stats::default(),
        stop: AtomicBool::new(false),
        uncertain: Mutex::new(BTreeSet::new()),
        restarts: AtomicU64::new(0),
        rbd_trash: Mutex::new(BTreeSet::new()),
        deleting: Mutex::new(BTreeSet::new()),
    });
    let start_res = daemon_res(&chaos).expect("daemon running");

    // --- load -------------------------------------------------------------------------
    let handles: Vec<_> = (0..readers)
        .map(|i| {
            let c = chaos.clone();
            let r = Rng::new(seed ^ (0xBEEF + i as u64));
            std::thread::spawn(move || c.reader(r))
        })
        .collect();

    let mut kinds = Vec::new();
    if chaos.setup.tmpfs {
        kinds.push(Down::Enospc);
    }
    if chaos.setup.guest.is_some() {
        kinds.push(Down::Agent);
        if have_lock {
            kinds.push(Down::Libvirtd);
        }
    }
    // The OSD is shared by every session on the machine: stopped only in the long form, and
    // only while this run holds the guest lock (as scripts/chaos.sh does).
    if long
        && have_lock
        && std::env::var("SNAPFS_CHAOS_OSD").as_deref() != Ok("0")
        && chaos.setup.rbd.is_some()
        && Path::new(CEPH_DIR).join("run/osd.0.pid").exists()
    {
        kinds.push(Down::Osd);
    }

    let started = Instant::now();
    let mut step = 0u64;
    let mut down: Option<(Down, u64)> = None;
    let mut quiet_after = 0u64;
    let mut max_res = start_res;
    while started.elapsed() < Duration::from_secs(seconds) {
        step += 1;
        let quiet = down.is_none() && step > quiet_after;
        // A fault that lasts ends after its steps.
        if let Some((d, until)) = down {
            if step >= until {
                end_fault(&chaos, d);
                down = None;
                quiet_after = step + 2;
            }
        }
        let roll = rng.below(100);
        if roll < 8 && down.is_none() {
            // kill -9 at a random point of an operation, then restart.
            chaos.stats.fault("kill-9 daemon");
            let delay = rng.below(400);
            let pid = chaos.setup.daemon_pid();
            let killer = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(delay));
                if let Some(pid) = pid {
                    // SAFETY: kill(2) of the daemon this test started.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            });
            random_op(&chaos, &mut rng, step, false);
            let _ = killer.join();
            if let Some(pid) = pid {
                wait_gone(pid, Duration::from_secs(10));
            }
            restart(&chaos);
            quiet_after = step + 1;
        } else if roll < 14 && down.is_none() && !kinds.is_empty() {
            let d = kinds[rng.below(kinds.len() as u64) as usize];
            begin_fault(&chaos, d);
            down = Some((d, step + 1 + rng.below(3)));
        } else if roll < 30 {
            write_volume(&chaos, &mut rng);
        } else {
            random_op(&chaos, &mut rng, step, quiet);
        }
        let res = check(&chaos, &mut rng, down.map(|d| d.0), quiet, false);
        if let Some(r) = res {
            max_res = (max_res.0.max(r.0), max_res.1.max(r.1));
        }
    }
    if let Some((d, _)) = down {
        end_fault(&chaos, d);
    }
    say(&format!(
        "chaos17: {step} steps in {} s; final checks",
        started.elapsed().as_secs()
    ));
    // Everything back: the full check (every snapshot re-read), then everything removed
    // through the mount, which must leave nothing behind in any backend.
    std::thread::sleep(Duration::from_secs(2));
    check(&chaos, &mut rng, None, true, true);
    chaos.stop.store(true, Ordering::SeqCst);
    for h in handles {
        let _ = h.join();
    }
    let end_res = daemon_res(&chaos).unwrap_or((0, 0));
    remove_all(&chaos);
    check(&chaos, &mut rng, None, true, true);
    let trash_left = trash_left_after_recovery(&chaos);

    // --- report -----------------------------------------------------------------------
    let s = &chaos.stats;
    let ops = s.ops.lock().unwrap().clone();
    let faults = s.faults.lock().unwrap().clone();
    let violations = s.violations.lock().unwrap().clone();
    let fmt = |m: &BTreeMap<String, u64>| {
        m.iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let report = format!(
        "==== chaos17 report ====\n\
         seed {seed}, {} s ({} form), {} steps, owners: {}\n\
         operations: {} ({})\n\
         faults: {} ({})\n\
         invariant checks: {}\n\
         readers: {readers} threads, {} MiB read, {} disk chunks and {} files/ files verified; errors: {}\n\
         max latency ms: {}\n\
         daemon: restarts {}, RSS start {} MiB end {} MiB max {} MiB, fds start {} end {} max {}\n\
         orphans: RBD trash snapshots seen after a kill -9 inside rbd_snap_remove (finding F2, finished by the next start): {}; left at the end: {}\n\
         violations: {}\n{}",
        started.elapsed().as_secs(),
        if long { "long" } else { "short" },
        step,
        chaos
            .owners
            .iter()
            .map(|o| format!("{:?}", o.kind))
            .collect::<Vec<_>>()
            .join("+"),
        ops.values().sum::<u64>(),
        fmt(&ops),
        faults.values().sum::<u64>(),
        fmt(&faults),
        s.checks.load(Ordering::Relaxed),
        s.reader_bytes.load(Ordering::Relaxed) >> 20,
        s.reader_chunks.load(Ordering::Relaxed),
        s.reader_files.load(Ordering::Relaxed),
        fmt(&s.reader_errors.lock().unwrap()),
        fmt(&s.max_op_ms.lock().unwrap()),
        chaos.restarts.load(Ordering::Relaxed),
        start_res.0 >> 10,
        end_res.0 >> 10,
        max_res.0 >> 10,
        start_res.1,
        end_res.1,
        max_res.1,
        {
            let t = chaos.rbd_trash.lock().unwrap();
            format!("{} {:?}", t.len(), *t)
        },
        trash_left,
        violations.len(),
        violations
            .iter()
            .map(|v| format!("  - {v}\n"))
            .collect::<String>(),
    );
    say(&report);
    if let Ok(path) = std::env::var("SNAPFS_CHAOS_REPORT") {
        let _ = std::fs::write(path, &report);
    }
    if !violations.is_empty() {
        let log = std::fs::read_to_string(base.join("snapfs.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        say(&format!(
            "daemon log (last 60 lines):\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        ));
    }
    assert!(
        violations.is_empty(),
        "{} invariant violations (seed {seed})",
        violations.len()
    );
}

/// VmRSS (KiB) and open descriptors of the daemon.
fn daemon_res(c: &Chaos) -> Option<(u64, u64)> {
    let pid = c.setup.daemon_pid()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    Some((rss, fds))
}

fn restart(c: &Chaos) {
    c.restarts.fetch_add(1, Ordering::Relaxed);
    for attempt in 0..5 {
        match c.setup.mount() {
            Ok(()) => return,
            Err(e) => {
                say(&format!("chaos17: restart attempt {attempt} failed: {e}"));
                std::thread::sleep(Duration::from_secs(2));
            }
        }
    }
    c.stats
        .violation("the daemon could not be started again after kill -9".into());
}

fn begin_fault(c: &Chaos, d: Down) {
    c.stats.fault(match d {
        Down::Enospc => "ENOSPC state dir",
        Down::Agent => "guest agent stopped",
        Down::Libvirtd => "libvirtd restarted",
        Down::Osd => "Ceph OSD restarted",
    });
    match d {
        Down::Enospc => {
            let mut f = match std::fs::File::create(c.setup.state.join("chaos-filler")) {
                Ok(f) => f,
                Err(_) => return,
            };
            let buf = vec![0xA5u8; 1 << 16];
            while f.write_all(&buf).is_ok() {}
        }
        Down::Agent => {
            let g = c.setup.guest.as_deref().unwrap_or_default();
            let (ok, _, err) = tool(
                60,
                &repo("scripts/testbed/guest-agent-kill.sh"),
                &[g, "600"],
            );
            if !ok {
                say(&format!("chaos17: guest-agent-kill failed: {err}"));
            }
        }
        Down::Libvirtd => {
            c.setup.libvirtd_stopped.store(true, Ordering::SeqCst);
            let pid = std::fs::read_to_string("/run/libvirtd.pid")
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok());
            if let Some(pid) = pid {
                // SAFETY: systemctl-style stop of the test bed's libvirtd (started again below).
                unsafe { libc::kill(pid, libc::SIGTERM) };
                wait_gone(pid, Duration::from_secs(30));
            }
        }
        Down::Osd => {
            c.setup.osd_stopped.store(true, Ordering::SeqCst);
            let pid = std::fs::read_to_string(Path::new(CEPH_DIR).join("run/osd.0.pid"))
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok());
            if let Some(pid) = pid {
                // SAFETY: stop of the test cluster's OSD (start-ceph.sh starts it again).
                unsafe { libc::kill(pid, libc::SIGTERM) };
                wait_gone(pid, Duration::from_secs(30));
            }
        }
    }
}

fn end_fault(c: &Chaos, d: Down) {
    match d {
        Down::Enospc => {
            let _ = std::fs::remove_file(c.setup.state.join("chaos-filler"));
        }
        Down::Agent => {
            let g = c.setup.guest.as_deref().unwrap_or_default();
            let (ok, _, err) = tool(
                90,
                &repo("scripts/testbed/guest-agent-start.sh"),
                &[g, "60"],
            );
            if !ok {
                c.stats
                    .violation(format!("guest agent did not come back: {err}"));
            }
        }
        Down::Libvirtd => {
            let (ok, _, err) = tool(120, "bash", &[&repo("scripts/testbed/start-libvirt.sh")]);
            assert!(ok, "libvirtd did not start again: {err}");
            c.setup.libvirtd_stopped.store(false, Ordering::SeqCst);
        }
        Down::Osd => {
            let (ok, _, err) = tool(300, "bash", &[&repo("scripts/ceph/start-ceph.sh")]);
            assert!(ok, "Ceph did not start again: {err}");
            c.setup.osd_stopped.store(false, Ordering::SeqCst);
            // Placement groups peer again, and the daemon's fail-fast period after a timeout
            // (5 s) ends: until the mount lists the RBD snapshots again, EIO is expected.
            let t = Instant::now();
            let rbd = c.owners.iter().find(|o| o.kind == Kind::Rbd);
            while let Some(o) = rbd {
                if std::fs::read_dir(&o.snaps).is_ok() {
                    break;
                }
                if t.elapsed() > Duration::from_secs(90) {
                    c.stats
                        .violation("RBD volume not back 90 s after the OSD restarted".into());
                    break;
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
}

/// Write a pattern above the filesystem of a volume (the guest writes by itself).
fn write_volume(c: &Chaos, rng: &mut Rng) {
    let vols: Vec<usize> = (0..c.owners.len())
        .filter(|&i| c.owners[i].kind != Kind::Guest)
        .collect();
    let o = &c.owners[vols[rng.below(vols.len() as u64) as usize]];
    let off = FS_BYTES + (rng.below((VOL_BYTES - FS_BYTES) >> 16) << 16);
    let len = ((1 + rng.below(16)) << 16).min(VOL_BYTES - off);
    let ok = match o.kind {
        Kind::Image => {
            let cmd = format!("write -P {} {off} {len}", rng.below(255) + 1);
            tool(
                60,
                "qemu-io",
                &["-f", "qcow2", "-c", &cmd, o.backend.as_str()],
            )
            .0
        }
        Kind::Rbd => rbd_write(c, &o.backend, off, &rng.bytes(len as usize)),
        Kind::Guest => true,
    };
    c.stats.op(if ok {
        "write volume"
    } else {
        "write volume failed"
    });
}

/// Write `data` at `off` of an RBD image through `rbd import-diff` (no krbd here).
fn rbd_write(c: &Chaos, spec: &str, off: u64, data: &[u8]) -> bool {
    let Some((conf, _)) = &c.setup.rbd else {
        return false;
    };
    let diff = common::rbd_diff_v1_write(VOL_BYTES, off, data);
    let Ok(mut child) = Command::new("timeout")
        .args(["60", "rbd", "--rados_osd_op_timeout=10", "-c"])
        .arg(conf)
        .args(["import-diff", "--no-progress", "-", spec])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
    else {
        return false;
    };
    let wrote = child
        .stdin
        .take()
        .is_some_and(|mut i| i.write_all(&diff).is_ok());
    child.wait().is_ok_and(|s| s.success()) && wrote
}

/// One snapshot operation on a random owner: mkdir, rmdir or rename.
fn random_op(c: &Arc<Chaos>, rng: &mut Rng, step: u64, quiet: bool) {
    let oi = rng.below(c.owners.len() as u64) as usize;
    let owner = &c.owners[oi];
    let mine: Vec<Snap> = c
        .snaps
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.owner == oi)
        .cloned()
        .collect();
    let max = if owner.kind == Kind::Guest {
        2
    } else {
        MAX_SNAPS
    };
    let roll = rng.below(100);
    let (what, name, path, to) = if mine.len() < max && (mine.is_empty() || roll < 50) {
        let name = format!("c{step}");
        ("mkdir", name.clone(), owner.snaps.join(&name), None)
    } else if roll < 75 || mine.is_empty() {
        let s = &mine[rng.below(mine.len() as u64) as usize];
        ("rmdir", s.name.clone(), owner.snaps.join(&s.name), None)
    } else {
        let s = &mine[rng.below(mine.len() as u64) as usize];
        let to = format!("r{step}");
        (
            "rename",
            s.name.clone(),
            owner.snaps.join(&s.name),
            Some(owner.snaps.join(&to)),
        )
    };
    if what != "mkdir" {
        c.deleting.lock().unwrap().insert((oi, name.clone()));
    }
    let p2 = path.clone();
    let t2 = to.clone();
    let res = bounded(move || match what {
        "mkdir" => std::fs::create_dir(&p2),
        "rmdir" => std::fs::remove_dir(&p2),
        _ => std::fs::rename(&p2, t2.as_ref().unwrap()),
    });
    let label = format!("{what} {:?}", owner.kind);
    let (r, took) = match res {
        Ok(v) => v,
        Err(after) => {
            c.stats.violation(format!(
                "{label} {} did not return within {} s",
                path.display(),
                after.as_secs()
            ));
            panic!("hang: {label} {}", path.display());
        }
    };
    c.stats.took(what, took);
    let _unmark = Unmark(c.clone(), oi, name.clone());
    match r {
        Ok(()) => {
            c.stats.op(&format!("{label} ok"));
            match what {
                "mkdir" => {
                    record(c, oi, &name);
                }
                "rmdir" => c
                    .snaps
                    .lock()
                    .unwrap()
                    .retain(|s| !(s.owner == oi && s.name == name)),
                _ => {
                    let to = to.unwrap();
                    let to_name = to.file_name().unwrap().to_string_lossy().into_owned();
                    for s in c.snaps.lock().unwrap().iter_mut() {
                        if s.owner == oi && s.name == name {
                            s.name = to_name.clone();
                        }
                    }
                }
            }
        }
        Err(e) => {
            c.stats.op(&format!("{label} {}", errno_name(&e)));
            let expected_refusal = what == "rename"
                && owner.kind != Kind::Rbd
                && e.raw_os_error() == Some(libc::ENOTSUP);
            if !expected_refusal {
                // Its fate is for the next check to find out (adopted or gone).
                c.uncertain.lock().unwrap().insert((oi, name.clone()));
                if let Some(to) = &to {
                    let to_name = to.file_name().unwrap().to_string_lossy().into_owned();
                    c.uncertain.lock().unwrap().insert((oi, to_name));
                }
                if quiet {
                    c.stats.violation(format!(
                        "{label} {} failed with {} while no fault was active: {e}",
                        path.display(),
                        errno_name(&e)
                    ));
                }
            }
        }
    }
}

/// Ends the "being deleted" mark of a snapshot once the model is updated.
struct Unmark(Arc<Chaos>, usize, String);

impl Drop for Unmark {
    fn drop(&mut self) {
        self.0
            .deleting
            .lock()
            .unwrap()
            .remove(&(self.1, self.2.clone()));
    }
}

/// Record the chunk hashes of a new (or adopted) snapshot, read through the mount.
fn record(c: &Chaos, oi: usize, name: &str) -> bool {
    let path = c.owners[oi].snaps.join(name).join(c.owners[oi].disk);
    match hash_disk(&path) {
        Ok((chunks, size)) => {
            c.snaps.lock().unwrap().push(Snap {
                owner: oi,
                name: name.to_string(),
                chunks: Arc::new(chunks),
                size,
            });
            true
        }
        Err(e) => {
            // Not readable right now (a fault): the next check adopts it.
            c.uncertain.lock().unwrap().insert((oi, name.to_string()));
            say(&format!(
                "chaos17: cannot hash {} yet: {}",
                path.display(),
                errno_name(&e)
            ));
            false
        }
    }
}

/// RBD trash snapshots of our image still there once the restarts' recovery had its time
/// (finding F2: a removal a kill -9 cut short is finished by the next start, after the dead
/// client's watch expires, ~30 s); each one left is a violation.
fn trash_left_after_recovery(c: &Chaos) -> usize {
    let Some((conf, spec)) = c.setup.rbd.as_ref() else {
        return 0;
    };
    let Some(conf) = conf.to_str() else {
        return 0;
    };
    let started = Instant::now();
    loop {
        let (ok, out, err) = tool(
            30,
            "rbd",
            &[
                "-c",
                conf,
                "snap",
                "ls",
                "--all",
                "--format",
                "json",
                spec.as_str(),
            ],
        );
        let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        let trash: Vec<String> = v
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["namespace"]["type"] == "trash")
            .map(|s| format!("{} (id {})", s["namespace"]["original_name"], s["id"]))
            .collect();
        if ok && trash.is_empty() {
            return 0;
        }
        if started.elapsed() > Duration::from_secs(150) {
            if ok {
                c.stats.violation(format!(
                    "RBD trash snapshots left 150 s after the last restart (F2): {trash:?}"
                ));
            } else {
                c.stats
                    .violation(format!("rbd snap ls --all {spec} failed at the end: {err}"));
            }
            return trash.len();
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// Snapshot names the backend itself has for an owner (None: backend not reachable).
fn backend_snaps(c: &Chaos, o: &Owner) -> Option<BTreeSet<String>> {
    match o.kind {
        Kind::Image => {
            let (ok, out, _) = tool(
                30,
                "qemu-img",
                &["snapshot", "-U", "-l", o.backend.as_str()],
            );
            // "ID TAG VM_SIZE DATE VM_CLOCK ICOUNT" table; our names have no spaces.
            ok.then(|| {
                out.lines()
                    .skip(2)
                    .filter_map(|l| l.split_whitespace().nth(1).map(String::from))
                    .collect()
            })
        }
        Kind::Rbd => {
            let (conf, _) = c.setup.rbd.as_ref()?;
            let (ok, out, _) = tool(
                30,
                "rbd",
                &[
                    "--rados_osd_op_timeout=10",
                    "--rados_mon_op_timeout=10",
                    "-c",
                    conf.to_str()?,
                    "snap",
                    "ls",
                    "--all",
                    "--format",
                    "json",
                    o.backend.as_str(),
                ],
            );
            let v: serde_json::Value = serde_json::from_str(&out).ok()?;
            if !ok {
                return None;
            }
            let mut user = BTreeSet::new();
            for s in v.as_array().into_iter().flatten() {
                let name = s["name"].as_str().unwrap_or_default().to_string();
                match s["namespace"]["type"].as_str() {
                    None | Some("user") => {
                        user.insert(name);
                    }
                    Some("trash") => {
                        // Left by a kill -9 inside rbd_snap_remove (docs/testing.md, F2).
                        let orig = s["namespace"]["original_name"].as_str().unwrap_or("?");
                        c.rbd_trash
                            .lock()
                            .unwrap()
                            .insert(format!("{orig} (id {})", s["id"]));
                    }
                    Some(other) => c.stats.violation(format!(
                        "RBD snapshot {name} in namespace {other} on our image"
                    )),
                }
            }
            Some(user)
        }
        Kind::Guest => {
            let (ok, out, _) = virsh(&["snapshot-list", o.backend.as_str(), "--name"]);
            ok.then(|| {
                out.lines()
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect()
            })
        }
    }
}

/// Files `images/<guest>.*` that are not in the running disk's backing chain (orphan
/// overlays), and the chain's length.
fn guest_orphans(g: &str) -> Option<(Vec<String>, usize)> {
    let (ok, out, _) = virsh(&["domblklist", g, "--details"]);
    if !ok {
        return None;
    }
    let active = out
        .lines()
        .find(|l| l.split_whitespace().nth(2) == Some("vda"))?
        .split_whitespace()
        .nth(3)?
        .to_string();
    let (ok, out, _) = tool(
        30,
        "qemu-img",
        &["info", "-U", "--backing-chain", "--output=json", &active],
    );
    if !ok {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&out).ok()?;
    let chain: BTreeSet<String> = v
        .as_array()?
        .iter()
        .filter_map(|e| e["filename"].as_str().map(String::from))
        .collect();
    let prefix = format!("{g}.");
    let mut orphans = Vec::new();
    for e in std::fs::read_dir(Path::new(TESTBED).join("images"))
        .ok()?
        .flatten()
    {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.starts_with(&prefix) && !chain.contains(e.path().to_string_lossy().as_ref()) {
            orphans.push(n);
        }
    }
    Some((orphans, chain.len()))
}

/// The guest's freeze state: Some(true) frozen; through the agent, or the control port
/// when the agent is down.
fn guest_frozen(g: &str) -> Option<bool> {
    let (ok, out, _) = virsh(&[
        "qemu-agent-command",
        g,
        r#"{"execute":"guest-fsfreeze-status"}"#,
        "--timeout",
        "5",
    ]);
    if ok {
        return Some(out.contains("frozen"));
    }
    let (ok, out, _) = tool(20, &repo("scripts/testbed/guest-ctl.sh"), &[g, "status"]);
    ok.then(|| out.contains("frozen=1"))
}

/// The invariants, after every step. `full`: every snapshot re-read (else one at random).
/// Returns the daemon's (RSS KiB, fds).
fn check(
    c: &Chaos,
    rng: &mut Rng,
    down: Option<Down>,
    quiet: bool,
    full: bool,
) -> Option<(u64, u64)> {
    let st = &c.stats;
    // The daemon lives (a panic or abort would end it).
    st.check();
    if c.setup.daemon_pid().is_none() {
        st.violation("the daemon is gone (not killed by the suite)".into());
        restart(c);
    }
    // No guest left frozen (a restart after kill -9 thaws through its freeze record; the
    // recovery may retry in the background: allow it 30 s).
    if let Some(g) = &c.setup.guest {
        if down != Some(Down::Libvirtd) {
            st.check();
            let t = Instant::now();
            loop {
                match guest_frozen(g) {
                    Some(false) => break,
                    Some(true) if t.elapsed() < Duration::from_secs(30) => {}
                    Some(true) => {
                        st.violation(format!("guest {g} left frozen"));
                        break;
                    }
                    None if t.elapsed() < Duration::from_secs(30) => {}
                    None => {
                        st.violation(format!("guest {g}: freeze state unknown for 30 s"));
                        break;
                    }
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
    // Listings: mount = backend (no orphan, nothing hidden); model reconciled.
    for (oi, o) in c.owners.iter().enumerate() {
        let reachable = match o.kind {
            Kind::Rbd => down != Some(Down::Osd),
            Kind::Guest => down != Some(Down::Libvirtd),
            Kind::Image => true,
        };
        if !reachable {
            continue;
        }
        st.check();
        let mut agreed = None;
        for _ in 0..6 {
            let listed: Option<BTreeSet<String>> = std::fs::read_dir(&o.snaps).ok().map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            });
            let backend = backend_snaps(c, o);
            match (listed, backend) {
                (Some(l), Some(b)) if l == b => {
                    agreed = Some(l);
                    break;
                }
                (l, b) => {
                    agreed = None;
                    if quiet && l.is_some() && b.is_some() {
                        // Past the listing TTL they must agree.
                        std::thread::sleep(Duration::from_millis(300));
                    } else {
                        std::thread::sleep(Duration::from_millis(500));
                    }
                    let _ = (l, b);
                }
            }
        }
        let Some(listed) = agreed else {
            if quiet {
                let l: Option<Vec<String>> = std::fs::read_dir(&o.snaps).ok().map(|rd| {
                    rd.flatten()
                        .map(|e| e.file_name().to_string_lossy().into())
                        .collect()
                });
                st.violation(format!(
                    "{:?}: mount lists {l:?}, backend has {:?}",
                    o.kind,
                    backend_snaps(c, o)
                ));
            }
            continue;
        };
        // Reconcile the model: adopt what an interrupted mkdir left; drop what an
        // interrupted rmdir removed; anything else missing is a lost snapshot.
        let known: BTreeSet<String> = c
            .snaps
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.owner == oi)
            .map(|s| s.name.clone())
            .collect();
        for gone in known.difference(&listed) {
            let was_uncertain = c.uncertain.lock().unwrap().remove(&(oi, gone.clone()));
            if !was_uncertain {
                st.violation(format!(
                    "{:?}: snapshot {gone} vanished without an rmdir",
                    o.kind
                ));
            }
            c.snaps
                .lock()
                .unwrap()
                .retain(|s| !(s.owner == oi && &s.name == gone));
        }
        {
            let mut u = c.uncertain.lock().unwrap();
            for both in listed.intersection(&known) {
                u.remove(&(oi, both.clone()));
            }
        }
        for new in listed.difference(&known) {
            let made_here = c.uncertain.lock().unwrap().contains(&(oi, new.clone()));
            if made_here {
                if record(c, oi, new) {
                    st.op(&format!("adopted {:?} after a fault", o.kind));
                    c.uncertain.lock().unwrap().remove(&(oi, new.clone()));
                }
            } else {
                st.violation(format!(
                    "{:?}: snapshot {new} appeared that nobody made",
                    o.kind
                ));
            }
        }
        if o.kind == Kind::Guest {
            st.check();
            match guest_orphans(&o.backend) {
                Some((orphans, chain)) => {
                    if !orphans.is_empty() {
                        st.violation(format!(
                            "guest overlays not in the disk's chain: {orphans:?}"
                        ));
                    }
                    if chain != listed.len() + 1 {
                        st.violation(format!(
                            "guest disk chain has {chain} images for {} snapshots",
                            listed.len()
                        ));
                    }
                }
                None if quiet => st.violation("guest disk chain unreadable".into()),
                None => {}
            }
        }
    }
    // No store objects: this mount takes no copy snapshots, so the store holds nothing.
    st.check();
    let store = c.setup.state.join("store");
    if let Ok(rd) = std::fs::read_dir(&store) {
        let left: Vec<String> = rd
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        if !left.is_empty() {
            st.violation(format!("store objects without a snapshot: {left:?}"));
        }
    }
    // Snapshots read as when taken: one at random after each step, all in a full check.
    let snaps: Vec<Snap> = c.snaps.lock().unwrap().clone();
    let pick: Vec<Snap> = if full {
        snaps
    } else if snaps.is_empty() {
        Vec::new()
    } else {
        vec![snaps[rng.below(snaps.len() as u64) as usize].clone()]
    };
    for s in pick {
        st.check();
        let o = &c.owners[s.owner];
        let reachable = match o.kind {
            Kind::Rbd => down != Some(Down::Osd),
            Kind::Guest => down != Some(Down::Libvirtd),
            Kind::Image => true,
        };
        let path = c.snap_dir(&s).join(o.disk);
        match hash_disk(&path) {
            Ok((chunks, size)) => {
                if size != s.size || chunks != *s.chunks {
                    let first = chunks.iter().zip(s.chunks.iter()).position(|(a, b)| a != b);
                    st.violation(format!(
                        "{} reads differently than when taken (size {size} vs {}, first different MiB {first:?})",
                        path.display(),
                        s.size
                    ));
                }
            }
            Err(e) if !quiet || !reachable => {
                st.reader_error(format!("check {}", errno_name(&e)));
            }
            Err(e) => st.violation(format!(
                "{} unreadable while no fault was active: {}",
                path.display(),
                errno_name(&e)
            )),
        }
    }
    // Daemon resources bounded.
    st.check();
    let res = daemon_res(c);
    if let Some((rss, fds)) = res {
        if rss > RSS_BOUND_KB || fds as usize > FD_BOUND {
            st.violation(format!(
                "daemon RSS {} MiB / {fds} fds past the bound",
                rss >> 10
            ));
        }
    }
    res
}

/// Remove every snapshot through the mount (the final orphan check then expects none).
fn remove_all(c: &Arc<Chaos>) {
    let snaps: Vec<Snap> = c.snaps.lock().unwrap().clone();
    for s in snaps {
        let p = c.snap_dir(&s);
        let label = format!("rmdir {:?}", c.owners[s.owner].kind);
        let p2 = p.clone();
        match bounded(move || std::fs::remove_dir(&p2)) {
            Ok((Ok(()), took)) => {
                c.stats.took("rmdir", took);
                c.stats.op(&format!("{label} ok"));
                c.snaps
                    .lock()
                    .unwrap()
                    .retain(|x| !(x.owner == s.owner && x.name == s.name));
            }
            Ok((Err(e), _)) => c.stats.violation(format!(
                "final {label} {} failed: {}",
                p.display(),
                errno_name(&e)
            )),
            Err(_) => {
                c.stats
                    .violation(format!("final {label} {} hung", p.display()));
                panic!("hang in final rmdir");
            }
        }
    }
}

//! Shared harness: a real snapfs mount of a directory of images, torn down on drop.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_snapfs");

pub struct Mount {
    pub dir: tempfile::TempDir,
    pub mnt: PathBuf,
    pub images: PathBuf,
    pub pool: String,
}

/// Run a command, panicking with its output when it fails.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn qemu_img(args: &[&str]) -> String {
    run(Command::new("qemu-img").args(args))
}

pub fn qemu_io(img: &Path, cmd: &str) {
    run(Command::new("qemu-io")
        .arg("-f")
        .arg("qcow2")
        .arg("-c")
        .arg(cmd)
        .arg(img));
}

impl Mount {
    /// Mount `images` (a directory) with a short listing TTL.
    pub fn new(images: &Path) -> Mount {
        Self::with_args(images, &[])
    }

    pub fn with_args(images: &Path, extra: &[&str]) -> Mount {
        Self::with_env(images, extra, &[])
    }

    /// Mount `images` with `env` added to the daemon's environment (e.g. `SNAPFS_FAILPOINT`).
    pub fn with_env(images: &Path, extra: &[&str], env: &[(&str, &str)]) -> Mount {
        let dir = tempfile::Builder::new()
            .prefix("snapfs-mnt")
            .tempdir()
            .expect("tempdir");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).expect("mkdir mnt");
        let m = Mount {
            mnt,
            images: images.to_path_buf(),
            pool: images
                .file_name()
                .expect("pool name")
                .to_string_lossy()
                .into_owned(),
            dir,
        };
        m.mount_env(extra, env);
        m
    }

    /// A mount without `--images`: the providers come from the arguments given to
    /// [`Mount::mount`] (e.g. `--libvirt`). Not mounted yet, so a test can prepare the state
    /// directory first.
    pub fn unmounted() -> Mount {
        let dir = tempfile::Builder::new()
            .prefix("snapfs-mnt")
            .tempdir()
            .expect("tempdir");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).expect("mkdir mnt");
        std::fs::create_dir(dir.path().join("state")).expect("mkdir state");
        Mount {
            mnt,
            images: PathBuf::new(),
            pool: String::new(),
            dir,
        }
    }

    /// A mount whose providers come only from `extra`.
    pub fn with_providers(extra: &[&str]) -> Mount {
        let m = Self::unmounted();
        m.mount(extra);
        m
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn mount(&self, extra: &[&str]) {
        self.mount_env(extra, &[])
    }

    pub fn mount_env(&self, extra: &[&str], env: &[(&str, &str)]) {
        let state = self.dir.path().join("state");
        let mut cmd = Command::new(BIN);
        cmd.envs(env.iter().copied());
        cmd.arg("mount");
        if !extra.contains(&"--list-ttl-ms") {
            cmd.args(["--list-ttl-ms", "200"]);
        }
        if !self.images.as_os_str().is_empty() {
            cmd.arg("--images").arg(&self.images);
        }
        let out = cmd
            .arg("--state-dir")
            .arg(&state)
            .args(extra)
            .arg(&self.mnt)
            .output()
            .expect("run snapfs mount");
        assert!(
            out.status.success(),
            "snapfs mount failed: {}\nlog:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("state/snapfs.log")).unwrap_or_default()
    }

    pub fn vol(&self, name: &str) -> PathBuf {
        self.mnt.join("volumes").join(&self.pool).join(name)
    }

    pub fn snap(&self, vol: &str, snap: &str) -> PathBuf {
        self.vol(vol).join(".snapshots").join(snap)
    }

    /// The daemon's pid, found through the mount's log-free way: the process holding our args.
    /// `snapfs mount … MNT`: once mounted, only the daemon runs with these args (it is forked
    /// from the command, or re-executed with --foreground).
    pub fn daemon_pid(&self) -> Option<i32> {
        find_process(|args| {
            args.first().is_some_and(|a| a.ends_with("snapfs"))
                && args.get(1).is_some_and(|a| a == "mount")
                && args.iter().any(|a| Path::new(a) == self.mnt)
        })
    }

    /// A revert cut by kill -9: `ln -sfn .snapshots/<snap> current` in `dir` runs in the
    /// background while the daemon is killed at its `SNAPFS_FAILPOINT`
    /// ([`Self::kill_at_failpoint`]); then what is left of the mount is unmounted.
    pub fn revert_killed_at_failpoint(&self, dir: &Path, snap: &str) {
        let (dir, target) = (dir.to_path_buf(), format!(".snapshots/{snap}"));
        let ln = std::thread::spawn(move || {
            Command::new("ln")
                .args(["-sfn", &target, "current"])
                .current_dir(dir)
                .output()
        });
        self.kill_at_failpoint();
        let _ = ln.join();
        self.unmount();
    }

    /// Kill the daemon (SIGKILL) once it logs that it reached its `SNAPFS_FAILPOINT`, at most
    /// two minutes from now, and wait until it is gone.
    pub fn kill_at_failpoint(&self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !self.log().contains("failpoint reached") {
            assert!(
                Instant::now() < deadline,
                "failpoint not reached: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let pid = self.daemon_pid().expect("daemon pid");
        // SAFETY: a plain kill(2) of the daemon this mount started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        assert!(
            wait_gone(pid, Duration::from_secs(10)),
            "daemon {pid} outlived SIGKILL"
        );
    }

    pub fn is_mounted(&self) -> bool {
        let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let want = self.mnt.to_string_lossy().into_owned();
        mi.lines()
            .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
    }

    pub fn unmount(&self) {
        let _ = Command::new(BIN)
            .args(["unmount", "--lazy"])
            .arg(&self.mnt)
            .output();
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let pid = self.daemon_pid();
        self.unmount();
        if let Some(pid) = pid {
            wait_gone(pid, Duration::from_secs(5));
        }
    }
}

/// The first process whose command line (argv) satisfies `pred`.
pub fn find_process(pred: impl Fn(&[String]) -> bool) -> Option<i32> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmd
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if pred(&args) {
            return Some(pid);
        }
    }
    None
}

pub fn pid_alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

pub fn wait_gone(pid: i32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if !pid_alive(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// The errno of an io::Result, for asserting refusals.
pub fn errno<T: std::fmt::Debug>(r: std::io::Result<T>) -> i32 {
    match r {
        Ok(v) => panic!("expected an error, got Ok({v:?})"),
        Err(e) => e
            .raw_os_error()
            .unwrap_or_else(|| panic!("no errno in {e}")),
    }
}

/// Names in a directory, sorted.
pub fn ls(p: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(p)
        .unwrap_or_else(|e| panic!("ls {}: {e}", p.display()))
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Data ranges of a file by SEEK_DATA/SEEK_HOLE, as [start, end) pairs.
pub fn seek_data_ranges(path: &Path) -> Vec<(u64, u64)> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).expect("open for seek");
    let size = f.metadata().expect("stat").len();
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut pos: i64 = 0;
    loop {
        // SAFETY: fd is open for the duration of this loop.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            assert_eq!(e.raw_os_error(), Some(libc::ENXIO), "SEEK_DATA: {e}");
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        assert!(hole > data, "SEEK_HOLE {hole} after data at {data}");
        out.push((data as u64, hole as u64));
        if hole as u64 >= size {
            break;
        }
        pos = hole;
    }
    out
}

/// Data ranges of an image according to `qemu-img map --output=json`, merged.
pub fn qemu_data_ranges(img: &Path) -> Vec<(u64, u64)> {
    let out = run(Command::new("qemu-img")
        .args(["map", "--output=json"])
        .arg(img));
    let v: serde_json::Value = serde_json::from_str(&out).expect("qemu-img map json");
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for e in v.as_array().expect("array") {
        if e["data"].as_bool() != Some(true) {
            continue;
        }
        let start = e["start"].as_u64().expect("start");
        let end = start + e["length"].as_u64().expect("length");
        match ranges.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => ranges.push((start, end)),
        }
    }
    ranges
}

/// Byte-compare two files; the first differing offset on mismatch.
pub fn first_difference(a: &Path, b: &Path) -> Option<u64> {
    use std::io::Read;
    let mut fa = std::fs::File::open(a).expect("open a");
    let mut fb = std::fs::File::open(b).expect("open b");
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    let mut off = 0u64;
    loop {
        let na = read_full(&mut fa, &mut ba);
        let nb = read_full(&mut fb, &mut bb);
        if na != nb || ba[..na] != bb[..nb] {
            let i = ba[..na.min(nb)]
                .iter()
                .zip(&bb[..na.min(nb)])
                .position(|(x, y)| x != y)
                .unwrap_or(na.min(nb));
            return Some(off + i as u64);
        }
        if na == 0 {
            return None;
        }
        off += na as u64;
    }

    fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> usize {
        let mut n = 0;
        while n < buf.len() {
            match f.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) => panic!("read: {e}"),
            }
        }
        n
    }
}

/// The SHA-256 of a file, in hex.
pub fn sha256_file(p: &Path) -> String {
    use sha2::Digest;
    use std::io::Read;
    let mut f = std::fs::File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    format!("{:x}", h.finalize())
}

/// libvirt URI of the test bed (scripts/testbed).
pub const TESTBED_URI: &str = "qemu:///system";

/// The test cluster's ceph.conf (`SNAPFS_CEPH_CONF` overrides it).
pub fn ceph_conf() -> PathBuf {
    std::env::var_os("SNAPFS_CEPH_CONF")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/snapfs-ceph/ceph.conf"))
}

/// Whether the cluster of `conf` answers a listing of `pool` within 15 s.
pub fn ceph_answers(conf: &Path, pool: &str) -> bool {
    conf.is_file()
        && Command::new("timeout")
            .args(["15", "rados", "--rados_osd_op_timeout=10", "-c"])
            .arg(conf)
            .args(["-p", pool, "ls"])
            .output()
            .is_ok_and(|o| o.status.success())
}

/// Remove RBD image `spec` (`pool/image`) of the cluster of `conf` with all its snapshots,
/// protected ones too; errors are ignored (cleanup after a test).
/// A one-record `rbd diff v1` stream (what `rbd import-diff` reads) that writes `data` at
/// `offset` of an image of `image_size` bytes: how tests write RBD images here, with no kernel
/// RBD or rbd-nbd.
pub fn rbd_diff_v1_write(image_size: u64, offset: u64, data: &[u8]) -> Vec<u8> {
    let mut diff = b"rbd diff v1\n".to_vec();
    diff.push(b's');
    diff.extend_from_slice(&image_size.to_le_bytes());
    diff.push(b'w');
    diff.extend_from_slice(&offset.to_le_bytes());
    diff.extend_from_slice(&(data.len() as u64).to_le_bytes());
    diff.extend_from_slice(data);
    diff.push(b'e');
    diff
}

/// Original names of the trash-namespace snapshots listed by `rbd snap ls --all --format json`
/// (RBD keeps a removed snapshot there while clones use it, or when a removal was cut short).
pub fn rbd_trash_names(ls_all: &serde_json::Value) -> Vec<String> {
    ls_all
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|s| s["namespace"]["type"] == "trash")
                .map(|s| {
                    s["namespace"]["original_name"]
                        .as_str()
                        .unwrap_or("?")
                        .to_string()
                })
                .collect()
        })
        .unwrap_or_default()
}

pub fn remove_rbd_image(conf: &Path, spec: &str) {
    let quiet = |args: &[&str]| {
        let _ = Command::new("rbd").arg("-c").arg(conf).args(args).output();
    };
    if let Ok(o) = Command::new("rbd")
        .arg("-c")
        .arg(conf)
        .args(["snap", "ls", "--format", "json", spec])
        .output()
    {
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        for s in v.as_array().into_iter().flatten() {
            if s["protected"].as_str() == Some("true") {
                if let Some(n) = s["name"].as_str() {
                    quiet(&["snap", "unprotect", &format!("{spec}@{n}")]);
                }
            }
        }
    }
    quiet(&["snap", "purge", "--no-progress", spec]);
    quiet(&["rm", "--no-progress", spec]);
}

pub fn testbed_scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/testbed")
}

pub fn virsh(args: &[&str]) -> std::process::Output {
    Command::new("virsh")
        .args(["-q", "-c", TESTBED_URI])
        .args(args)
        .output()
        .expect("run virsh")
}

/// Run a test bed script (scripts/testbed/NAME) against the test bed and the test cluster.
pub fn script(name: &str, args: &[&str]) -> std::process::Output {
    Command::new(testbed_scripts().join(name))
        .args(args)
        .env("LIBVIRT_DEFAULT_URI", TESTBED_URI)
        .env("CEPH_CONF", ceph_conf())
        .output()
        .unwrap_or_else(|e| panic!("run {name}: {e}"))
}

/// [`script`], which must succeed; its stdout.
pub fn script_ok(name: &str, args: &[&str]) -> String {
    let o = script(name, args);
    assert!(
        o.status.success(),
        "{name} {args:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The images of scripts/make-fs-images.sh in `dir`, built (again) unless `dir/.done` holds the
/// sha256 of the script as it is now.
pub fn fs_images_in(dir: &Path) -> PathBuf {
    use sha2::Digest;
    // Tests of one binary run in parallel: one build at a time.
    static BUILD: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/make-fs-images.sh");
    let want = format!(
        "{:x}",
        sha2::Sha256::digest(std::fs::read(&script).expect("read make-fs-images.sh"))
    );
    let done = std::fs::read_to_string(dir.join(".done")).unwrap_or_default();
    if done.trim() != want {
        run(Command::new("bash").arg(&script).arg(dir));
    }
    dir.to_path_buf()
}

/// The tmpfs counter (`/run/counter`) of guest `name`, written by the loop
/// [`start_guest_counter`] starts.
pub fn guest_counter(name: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // The loop truncates and rewrites the file: a read can fall in between.
        let o = script("guest-exec.sh", &[name, "cat /run/counter", "20"]);
        if let Ok(n) = String::from_utf8_lossy(&o.stdout).trim().parse() {
            return n;
        }
        assert!(
            Instant::now() < deadline,
            "{name}: no counter in /run/counter: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A shell loop in guest `name` counting into `/run/counter` (tmpfs: memory only), about ten
/// a second, without forks (they are slow under TCG).
pub fn start_guest_counter(name: &str) {
    script_ok(
        "guest-exec.sh",
        &[
            name,
            "mkfifo /run/counter-tick; setsid sh -c 'exec 4<>/run/counter-tick; i=0; \
             while :; do i=$((i+1)); echo $i > /run/counter; read -t 0.1 _ <&4; done' \
             </dev/null >/dev/null 2>&1 &",
            "20",
        ],
    );
}

/// Wait until the counter of guest `name` passes `n`.
pub fn wait_guest_counter_past(name: &str, n: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let c = guest_counter(name);
        if c > n {
            return c;
        }
        assert!(Instant::now() < deadline, "{name}: counter stuck at {c}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The live restore workers the daemon `daemon` started.
pub fn restore_workers(daemon: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        // Field 4 (after the parenthesised name) is the parent pid.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, r)| r.split_whitespace().nth(1))
            .and_then(|x| x.parse::<i32>().ok());
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if ppid == Some(daemon)
            && cmd
                .split(|b| *b == 0)
                .nth(1)
                .is_some_and(|a| a == b"__restore-worker")
            && pid_alive(pid)
        {
            out.push(pid);
        }
    }
    out.sort();
    out
}

/// The system call `pid` is blocked in (first field of /proc/PID/syscall).
pub fn in_syscall(pid: i32) -> Option<i64> {
    std::fs::read_to_string(format!("/proc/{pid}/syscall"))
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

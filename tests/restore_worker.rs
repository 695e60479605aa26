//! Guest filesystems read by the sandboxed restore worker (issue 20, item 4), through the real
//! mount: the worker's view equals the kernel's and the in-daemon reader's, the worker runs
//! unprivileged under seccomp, and a worker that is killed, breaks its memory limit or makes a
//! system call outside the filter costs an EIO on its volume, never the mount.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// The images of scripts/make-fs-images.sh. Only gpt, whole, mbr and lvm are used here: when a
/// later step of the script (the crash images, which need loop mounts of XFS) fails on a host,
/// the ones made before it are used as they are.
fn fs_images() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fs-images");
    if [
        "gpt.raw",
        "whole.raw",
        "mbr.raw",
        "lvm.raw",
        "src/hello.txt",
    ]
    .iter()
    .all(|f| dir.join(f).exists())
    {
        return dir;
    }
    fs_images_in(&dir)
}

/// `raw` converted to the qcow2 `img`, with an internal snapshot `s`.
fn qcow2_with_snapshot(raw: &Path, img: &Path) {
    let (raw, img) = (raw.to_str().unwrap(), img.to_str().unwrap());
    qemu_img(&["convert", "-O", "qcow2", raw, img]);
    qemu_img(&["snapshot", "-c", "s", img]);
}

fn pool(t: &tempfile::TempDir, disks: &[&str]) -> PathBuf {
    let imgs = fs_images();
    let pool = t.path().join("guests");
    fs::create_dir(&pool).unwrap();
    for disk in disks {
        qcow2_with_snapshot(
            &imgs.join(format!("{disk}.raw")),
            &pool.join(format!("{disk}.qcow2")),
        );
    }
    pool
}

/// Every entry below `root`: relative path → (kind, size, mode, uid, gid, mtime, nlink,
/// link target, content digest).
type Entry = (
    char,
    u64,
    u32,
    u32,
    u32,
    i64,
    u64,
    Option<PathBuf>,
    Option<String>,
);

fn walk(root: &Path) -> BTreeMap<PathBuf, Entry> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let p = e.unwrap().path();
            let md = fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            let ft = md.file_type();
            let kind = if ft.is_dir() {
                stack.push(p.clone());
                'd'
            } else if ft.is_symlink() {
                'l'
            } else if ft.is_file() {
                'f'
            } else {
                'o'
            };
            let link = ft.is_symlink().then(|| fs::read_link(&p).unwrap());
            let digest = ft.is_file().then(|| sha256_file(&p));
            let rel = p.strip_prefix(root).unwrap().to_path_buf();
            out.insert(
                rel,
                (
                    kind,
                    if ft.is_dir() { 0 } else { md.len() },
                    md.mode() & 0o7777,
                    md.uid(),
                    md.gid(),
                    md.mtime(),
                    if ft.is_dir() { 0 } else { md.nlink() },
                    link,
                    digest,
                ),
            );
        }
    }
    out
}

fn status_field(pid: i32, field: &str) -> String {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

/// A read-only loop mount by the kernel, undone on drop.
struct KernelMount(PathBuf);

impl KernelMount {
    fn new(image: &Path, at: &Path, opts: &str) -> KernelMount {
        fs::create_dir_all(at).unwrap();
        run(Command::new("mount")
            .args(["-o", &format!("ro,loop,{opts}")])
            .arg(image)
            .arg(at));
        KernelMount(at.to_path_buf())
    }
}

impl Drop for KernelMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn worker_reads_like_the_kernel_and_the_daemon_unprivileged_and_sandboxed() {
    let t = tempfile::Builder::new()
        .prefix("snapfs-worker")
        .tempdir()
        .unwrap();
    let pool = pool(&t, &["gpt", "whole", "mbr", "lvm"]);
    let on = Mount::with_args(&pool, &["--restore-worker=on"]);
    let off = Mount::with_args(&pool, &["--restore-worker=off"]);
    let files = |m: &Mount, disk: &str| m.snap(&format!("{disk}.qcow2"), "s").join("files");

    // The kernel's view of the ext4 image without a partition table.
    let kernel = KernelMount::new(
        &fs_images().join("whole.raw"),
        &t.path().join("kernel-whole"),
        "noload",
    );
    let want = walk(&kernel.0);
    let got = walk(&files(&on, "whole").join("whole"));
    let extra: Vec<_> = got.keys().filter(|k| !want.contains_key(*k)).collect();
    assert!(extra.is_empty(), "only through the worker: {extra:?}");
    for (rel, w) in &want {
        assert_eq!(got.get(rel), Some(w), "whole/{}", rel.display());
    }
    println!("whole: {} entries equal to the kernel's", want.len());

    // ext4, FAT32, XFS, NTFS, ext3 in a logical partition, ext4 in an LVM LV: equal to the in-daemon reader.
    for (disk, part) in [
        ("gpt", "p1"),
        ("gpt", "p2"),
        ("gpt", "p3"),
        ("gpt", "p4"),
        ("mbr", "p5"),
        ("lvm", "p1/lvm/snapfsvg/root"),
    ] {
        let a = walk(&files(&on, disk).join(part));
        let b = walk(&files(&off, disk).join(part));
        assert!(a.len() > 10, "{disk}/{part}: {} entries", a.len());
        assert_eq!(a, b, "{disk}/{part}: worker and daemon differ");
        println!(
            "{disk}/{part}: {} entries equal with and without the worker",
            a.len()
        );
    }
    // A README holder (not a filesystem) needs no worker left running.
    assert!(!fs::read_to_string(files(&on, "gpt").join("p5/README"))
        .unwrap()
        .is_empty());

    let daemon = on.daemon_pid().expect("daemon pid");
    let pids = restore_workers(daemon);
    assert_eq!(pids.len(), 7, "one worker per open filesystem: {pids:?}");
    assert!(restore_workers(off.daemon_pid().unwrap()).is_empty());
    for pid in pids {
        let uids: Vec<String> = status_field(pid, "Uid")
            .split_whitespace()
            .map(String::from)
            .collect();
        assert_eq!(uids, ["65534"; 4], "worker {pid} uids");
        assert_eq!(
            status_field(pid, "Gid").split_whitespace().next(),
            Some("65534")
        );
        assert_eq!(status_field(pid, "Groups"), "");
        assert_eq!(status_field(pid, "NoNewPrivs"), "1");
        assert_eq!(
            status_field(pid, "Seccomp"),
            "2",
            "worker {pid}: filter mode"
        );
        assert_eq!(status_field(pid, "CapEff"), "0000000000000000");
        assert_eq!(fs::read(format!("/proc/{pid}/environ")).unwrap(), b"");
        let mut fds: Vec<String> = fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        fds.sort();
        // The walker's socket and the read-ahead socket (its second thread's).
        assert_eq!(fds, ["0", "1", "2", "3", "5"], "worker {pid}: descriptors");
        assert_eq!(status_field(pid, "Threads"), "2", "worker {pid}: threads");
        // The filter, the uid and no_new_privs hold on both threads.
        for task in fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
            let st = fs::read_to_string(task.unwrap().path().join("status")).unwrap();
            for want in [
                "Seccomp:\t2",
                "NoNewPrivs:\t1",
                "Uid:\t65534\t65534\t65534\t65534",
            ] {
                assert!(
                    st.lines().any(|l| l == want),
                    "worker {pid} thread: no {want:?}"
                );
            }
        }
        let limits = fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
        let as_line = limits
            .lines()
            .find(|l| l.starts_with("Max address space"))
            .unwrap();
        assert!(!as_line.contains("unlimited"), "{as_line}");
        let rss = status_field(pid, "VmHWM");
        println!("worker {pid}: peak RSS {rss}");
    }
    println!(
        "daemon peak RSS {} (with workers), {} (without)",
        status_field(daemon, "VmHWM"),
        status_field(off.daemon_pid().unwrap(), "VmHWM")
    );
}

/// Poll `cond` (a state of another process, not a time) for at most a minute.
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_killed_worker_costs_an_eio_and_the_next_access_works() {
    let t = tempfile::Builder::new()
        .prefix("snapfs-worker-kill")
        .tempdir()
        .unwrap();
    let pool = pool(&t, &["gpt"]);
    let m = Mount::with_args(
        &pool,
        &["--restore-worker=on", "--restore-worker-test-hooks"],
    );
    let p1 = m.snap("gpt.qcow2", "s").join("files/p1");
    let want = walk(&p1);
    let daemon = m.daemon_pid().unwrap();
    let first = restore_workers(daemon);
    assert_eq!(first.len(), 1);

    // Killed while it serves a request: that request fails with EIO.
    let hang = p1.join(".snapfs-worker-hang");
    let waiter = std::thread::spawn(move || fs::metadata(hang).map_err(|e| e.raw_os_error()));
    wait_for(
        "worker asleep in the hang hook",
        || matches!(in_syscall(first[0]), Some(n) if n == libc::SYS_clock_nanosleep || n == libc::SYS_nanosleep),
    );
    let killed = Instant::now();
    run(Command::new("kill").args(["-9", &first[0].to_string()]));
    assert_eq!(waiter.join().unwrap().unwrap_err(), Some(libc::EIO));
    // The next access that needs the worker (a name never looked up: attributes and pages
    // already read may be cached in the daemon and the kernel) starts a new one and answers.
    let absent = fs::symlink_metadata(p1.join("no-such-name-after-the-kill")).unwrap_err();
    assert_eq!(
        absent.raw_os_error(),
        Some(libc::ENOENT),
        "after the kill: {absent}"
    );
    println!(
        "volume answered again {} ms after kill -9 of its worker",
        killed.elapsed().as_millis()
    );
    let second = restore_workers(daemon);
    assert_eq!(second.len(), 1);
    assert_ne!(second, first);
    assert!(m.log().contains("signal 9"), "log:\n{}", m.log());

    // Killed during a walk: the walk may meet EIO, then everything reads again.
    let root = p1.clone();
    let walker = std::thread::spawn(move || {
        let mut errors = 0;
        for _ in 0..20 {
            let mut stack = vec![root.clone()];
            while let Some(d) = stack.pop() {
                let Ok(rd) = fs::read_dir(&d) else {
                    errors += 1;
                    continue;
                };
                for e in rd.flatten() {
                    match fs::symlink_metadata(e.path()) {
                        Ok(md) if md.is_dir() => stack.push(e.path()),
                        Ok(md) if md.is_file() => {
                            if fs::read(e.path()).is_err() {
                                errors += 1;
                            }
                        }
                        Ok(_) => {}
                        Err(_) => errors += 1,
                    }
                }
            }
        }
        errors
    });
    std::thread::sleep(Duration::from_millis(50));
    for pid in restore_workers(daemon) {
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    }
    let errors = walker.join().unwrap();
    println!("walk during kill -9: {errors} failed operations");
    assert_eq!(walk(&p1), want, "after the kills");
    assert!(m.is_mounted());
}

#[test]
fn a_system_call_outside_the_filter_kills_only_the_worker() {
    let t = tempfile::Builder::new()
        .prefix("snapfs-worker-seccomp")
        .tempdir()
        .unwrap();
    let pool = pool(&t, &["gpt"]);
    let m = Mount::with_args(
        &pool,
        &["--restore-worker=on", "--restore-worker-test-hooks"],
    );
    let files = m.snap("gpt.qcow2", "s").join("files");
    let before = ls(&files.join("p1"));
    let daemon = m.daemon_pid().unwrap();
    let first = restore_workers(daemon);
    assert_eq!(first.len(), 1);
    let err = fs::metadata(files.join("p1/.snapfs-worker-try-open")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(wait_gone(first[0], Duration::from_secs(10)));
    let log = m.log();
    assert!(
        log.contains("killed by signal 31 (SIGSYS"),
        "the filter, not something else, ended it:\n{log}"
    );
    assert!(!log.contains("open(2) was allowed"));
    // The mount, the other volumes and the same volume answer.
    assert_eq!(ls(&files.join("p1")), before);
    assert!(!ls(&files.join("p3")).is_empty());
    assert!(!ls(&m.mnt).is_empty());
    assert_eq!(daemon, m.daemon_pid().unwrap());
}

#[test]
fn a_filesystem_over_the_worker_memory_limit_is_eio_and_the_mount_answers() {
    let t = tempfile::Builder::new()
        .prefix("snapfs-worker-mem")
        .tempdir()
        .unwrap();
    let pool = pool(&t, &["gpt"]);
    // FAT32 with 512-byte clusters on 6 GiB: a FAT of ~48 MiB, which the reader loads whole.
    let raw = t.path().join("bigfat.raw");
    run(Command::new("truncate").args(["-s", "6G"]).arg(&raw));
    run(Command::new("mkfs.fat")
        .args([
            "-F", "32", "-s", "1", "-S", "512", "-f", "1", "-n", "BIGFAT",
        ])
        .arg(&raw));
    qcow2_with_snapshot(&raw, &pool.join("bigfat.qcow2"));
    fs::remove_file(&raw).unwrap();
    fs::set_permissions(&pool, fs::Permissions::from_mode(0o755)).unwrap();

    let m = Mount::with_args(
        &pool,
        &["--restore-worker=on", "--restore-worker-mem-mb", "24"],
    );
    let files = |disk: &str| m.snap(&format!("{disk}.qcow2"), "s").join("files");
    let err = fs::read_dir(files("bigfat").join("whole")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    let log = m.log();
    assert!(log.contains("SIGABRT"), "ended by its memory limit:\n{log}");
    // Again: a new worker, the same limit, the same answer.
    let err = fs::read_dir(files("bigfat").join("whole")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    // The mount and a normal volume answer under the same limit.
    assert!(ls(&files("gpt").join("p1")).contains(&"hello.txt".to_string()));
    assert!(m.is_mounted());
    let daemon = m.daemon_pid().unwrap();
    println!("daemon peak RSS {}", status_field(daemon, "VmHWM"));

    // The image is sound: with a larger budget (and in the daemon) it reads.
    let big = Mount::with_args(
        &pool,
        &["--restore-worker=on", "--restore-worker-mem-mb", "256"],
    );
    let snap = big.snap("bigfat.qcow2", "s").join("files/whole");
    assert!(fs::read_dir(&snap).is_ok(), "bigfat with 256 MiB");
}

/// Bytes `pid` moves through the system calls in `calls` (strace's `trace=` list) while `f`
/// runs, counted by strace attached to it: the worker's socket traffic, which /proc/PID/io
/// does not count.
fn bytes_through(calls: &str, pid: i32, dir: &Path, f: impl FnOnce()) -> u64 {
    let out = dir.join(format!("strace-{pid}-{}.txt", calls.replace(',', "-")));
    let mut st = Command::new("strace")
        .args([
            "-qq",
            // Both threads of the worker (its two sockets).
            "-f",
            "-e",
            &format!("trace={calls}"),
            "-e",
            "signal=none",
            "-o",
        ])
        .arg(&out)
        .args(["-p", &pid.to_string()])
        .spawn()
        .expect("strace (package strace) is needed to count the worker's socket bytes");
    wait_for("strace attached", || status_field(pid, "TracerPid") != "0");
    f();
    // SAFETY: a signal to the child we started.
    unsafe { libc::kill(st.id() as i32, libc::SIGINT) };
    st.wait().unwrap();
    fs::read_to_string(&out)
        .unwrap()
        .lines()
        .filter_map(|l| l.rsplit_once("= ")?.1.trim().parse::<u64>().ok())
        .sum()
}

/// Bytes `pid` sends (`sendto`, `write`, `writev`: how the worker writes to its socket).
fn bytes_sent_during(pid: i32, dir: &Path, f: impl FnOnce()) -> u64 {
    bytes_through("sendto,write,writev", pid, dir, f)
}

/// File bytes do not cross the worker's socket: the worker says where they lie (`MAP`) and the
/// daemon reads them from the snapshot. A 24 MiB file, a sparse one and a small one read equal
/// to their source while the worker writes far less than the file to its socket (before `MAP`
/// every byte went through it); the worker's map of a file is checked by the daemon.
#[test]
fn file_bytes_are_read_by_the_daemon_from_the_worker_map() {
    let t = tempfile::Builder::new()
        .prefix("snapfs-worker-map")
        .tempdir()
        .unwrap();
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let big: Vec<u8> = (0..24 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    fs::write(src.join("big.bin"), &big).unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = fs::File::create(src.join("sparse.bin")).unwrap();
        f.write_all_at(&big[..1 << 20], 0).unwrap();
        f.write_all_at(&big[1 << 20..(2 << 20) + 123], 9 << 20)
            .unwrap();
        f.set_len(14 << 20).unwrap();
    }
    fs::write(src.join("small.txt"), b"a small file\n").unwrap();
    let pool = t.path().join("guests");
    fs::create_dir(&pool).unwrap();
    let raw = t.path().join("map.raw");
    run(Command::new("truncate").args(["-s", "96M"]).arg(&raw));
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&src)
        .arg(&raw));
    qcow2_with_snapshot(&raw, &pool.join("map.qcow2"));
    let m = Mount::with_args(&pool, &["--restore-worker=on"]);
    let root = m.snap("map.qcow2", "s").join("files/whole");
    // Open the volume (its worker starts), then count what the worker writes while reading.
    assert_eq!(fs::read(root.join("small.txt")).unwrap(), b"a small file\n");
    let daemon = m.daemon_pid().expect("daemon pid");
    let pids = restore_workers(daemon);
    assert_eq!(pids.len(), 1, "{pids:?}");
    let mut read = 0;
    let written = bytes_sent_during(pids[0], t.path(), || {
        for name in ["big.bin", "sparse.bin"] {
            let got = fs::read(root.join(name)).unwrap();
            assert!(got == fs::read(src.join(name)).unwrap(), "{name} differs");
            read += got.len();
        }
    });
    println!("read {read} bytes of files; the worker sent {written} bytes to the daemon");
    assert!(read >= 38 << 20);
    // Its answers (where the bytes lie) are counted: the count sees the socket.
    assert!(written > 0, "no traffic seen");
    assert!(
        written < 1 << 20,
        "file bytes went through the worker: {written} bytes sent for {read} read"
    );
    assert_eq!(
        restore_workers(daemon),
        pids,
        "the worker still serves the volume"
    );
}

/// `pid`'s peak resident set (VmHWM), in KiB.
fn peak_kib(pid: i32) -> u64 {
    status_field(pid, "VmHWM")
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap()
}

/// An ext4 image in `dir` (`many.raw`) of `dirs` directories of `per_dir` empty files with
/// 200-byte names (500 a directory keeps `mkfs.ext4 -d` fast).
fn many_names(dir: &Path, dirs: usize, per_dir: usize) -> PathBuf {
    let src = dir.join("src");
    for d in 0..dirs {
        let sub = src.join(format!("d{d}"));
        fs::create_dir_all(&sub).unwrap();
        for i in 0..per_dir {
            let name = format!("{i:05}-{}", "n".repeat(194));
            fs::File::create(sub.join(name)).unwrap();
        }
    }
    let raw = dir.join("many.raw");
    run(Command::new("truncate").args(["-s", "128M"]).arg(&raw));
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-N", "50000", "-d"])
        .arg(&src)
        .arg(&raw));
    raw
}

/// What the daemon keeps of its workers' answers is one budget for all volumes
/// (`--restore-worker-cache-mb`), not a budget per volume: six snapshots of an ext4 with
/// 40,000 entries of 200-byte names each, walked with `find` (every listing kept in the
/// daemon). After the first walk (one volume's listings kept, the allocator's arenas grown to
/// a walk's transient buffers), the five others take the daemon's peak RSS up by less than
/// the budget; with caches per volume they took it up by ~10 MiB each. Every walk still sees
/// the whole tree.
#[test]
fn daemon_caches_of_all_volumes_share_one_budget() {
    const DIRS: usize = 80;
    const PER_DIR: usize = 500;
    const SNAPSHOTS: usize = 6;
    const BUDGET_MB: u64 = 16;
    let t = tempfile::Builder::new()
        .prefix("snapfs-worker-budget")
        .tempdir()
        .unwrap();
    let raw = many_names(t.path(), DIRS, PER_DIR);
    let pool = t.path().join("guests");
    fs::create_dir(&pool).unwrap();
    let img = pool.join("many.qcow2");
    qemu_img(&[
        "convert",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    for s in 0..SNAPSHOTS {
        qemu_img(&["snapshot", "-c", &format!("s{s}"), img.to_str().unwrap()]);
    }
    let budget = BUDGET_MB.to_string();
    let m = Mount::with_args(
        &pool,
        &[
            "--restore-worker=on",
            "--restore-worker-cache-mb",
            &budget,
            "--cache-mb",
            "4",
        ],
    );
    let root = |s: usize| m.snap("many.qcow2", &format!("s{s}")).join("files/whole");
    let walk = |s: usize| {
        let out = run(Command::new("find").arg(root(s)));
        assert_eq!(
            out.lines().count(),
            1 + DIRS * (1 + PER_DIR) + 1,
            "the whole tree of s{s}"
        );
    };
    assert_eq!(
        ls(&root(0)).len(),
        DIRS + 1,
        "the directories and lost+found"
    );
    let daemon = m.daemon_pid().expect("daemon pid");
    let opened = peak_kib(daemon);
    walk(0);
    let base = peak_kib(daemon);
    for s in 1..SNAPSHOTS {
        walk(s);
    }
    let peak = peak_kib(daemon);
    let grown_mb = (peak - base) as f64 / 1024.0;
    println!(
        "daemon peak RSS {opened} kB with one volume open, {base} kB after its walk, {peak} kB after {} more walks of {} entries: +{grown_mb:.1} MiB (budget {BUDGET_MB} MiB)",
        SNAPSHOTS - 1,
        DIRS * PER_DIR
    );
    assert!(
        grown_mb < BUDGET_MB as f64,
        "the daemon grew by {grown_mb:.1} MiB with more volumes walked, past the budget of {BUDGET_MB} MiB"
    );
    // Entries dropped for the budget are asked for again: a second walk is whole too.
    let out = run(Command::new("find").arg(root(0)));
    assert_eq!(out.lines().count(), 1 + DIRS * (1 + PER_DIR) + 1);
    assert_eq!(
        restore_workers(daemon).len(),
        SNAPSHOTS,
        "one worker per volume"
    );
}

/// Bytes `pid` reads from its socket (`read`, `readv`, `recvfrom`).
fn bytes_received_during(pid: i32, dir: &Path, f: impl FnOnce()) -> u64 {
    bytes_through("read,readv,recvfrom", pid, dir, f)
}

/// Disk bytes the worker asks for reach it through the shared window, not the socket: a cold
/// `find` of 40,000 entries with 200-byte names (about 9 MB of directory blocks read by the
/// worker's ext4 reader) has the worker read less than 1 MiB from its socket (the requests,
/// listings' acknowledgements and the window descriptors); before the window every block
/// crossed it. The walk is whole.
#[test]
fn block_reads_reach_the_worker_through_shared_memory() {
    const DIRS: usize = 80;
    const PER_DIR: usize = 500;
    let t = tempfile::Builder::new()
        .prefix("snapfs-worker-window")
        .tempdir()
        .unwrap();
    let raw = many_names(t.path(), DIRS, PER_DIR);
    let pool = t.path().join("guests");
    fs::create_dir(&pool).unwrap();
    qcow2_with_snapshot(&raw, &pool.join("many.qcow2"));
    let m = Mount::with_args(&pool, &["--restore-worker=on"]);
    let root = m.snap("many.qcow2", "s").join("files/whole");
    assert_eq!(ls(&root).len(), DIRS + 1, "the directories and lost+found");
    let daemon = m.daemon_pid().expect("daemon pid");
    let pids = restore_workers(daemon);
    assert_eq!(pids.len(), 1, "{pids:?}");
    let mut entries = 0;
    let received = bytes_received_during(pids[0], t.path(), || {
        entries = run(Command::new("find").arg(&root)).lines().count();
    });
    println!("cold find of {entries} entries: the worker read {received} bytes from its socket");
    assert_eq!(entries, 1 + DIRS * (1 + PER_DIR) + 1, "the whole tree");
    assert!(received > 0, "no traffic seen");
    assert!(
        received < 1 << 20,
        "block bytes went through the socket: {received} bytes read by the worker"
    );
    assert_eq!(
        restore_workers(daemon),
        pids,
        "the worker still serves the volume"
    );
}

/// Messages the worker `pid` sends while `f` runs (both threads, counted by strace): (replies
/// to the daemon's requests on its main socket (fd 3), replies on its read-ahead socket (fd
/// 5), block reads it asks the daemon for), told apart by the socket and the frame's tag (its
/// fifth byte: `OK` 0 or `ERR` 1, `BLOCK_READ` 2).
fn messages_sent_during(pid: i32, dir: &Path, f: impl FnOnce()) -> (usize, usize, usize) {
    let out = dir.join(format!("strace-messages-{pid}.txt"));
    let mut st = Command::new("strace")
        .args(["-qq", "-f", "-xx", "-s", "5", "-e", "trace=sendto,write"])
        .args(["-e", "signal=none", "-o"])
        .arg(&out)
        .args(["-p", &pid.to_string()])
        .spawn()
        .expect("strace (package strace) is needed to count the worker's messages");
    wait_for("strace attached", || status_field(pid, "TracerPid") != "0");
    f();
    // SAFETY: a signal to the child we started.
    unsafe { libc::kill(st.id() as i32, libc::SIGINT) };
    st.wait().unwrap();
    let (mut replies, mut ahead, mut reads) = (0, 0, 0);
    for l in fs::read_to_string(&out).unwrap().lines() {
        // `sendto(3, "\x0d\x00\x00\x00\x02"..., 17, ...` (`-xx`: every byte in hex).
        let Some(tag) = l.split_once('"').and_then(|(_, r)| r.get(16..20)) else {
            continue;
        };
        match tag {
            "\\x00" | "\\x01" if l.contains("sendto(3,") => replies += 1,
            "\\x00" | "\\x01" => ahead += 1,
            "\\x02" => reads += 1,
            _ => {}
        }
    }
    (replies, ahead, reads)
}

/// `find` of a directory of 20,000 subdirectories (names of 60 bytes: a paged directory, over
/// 1 MiB) made by the kernel on XFS and on ext4, worker on (issue 19). GNU `find` (gnulib's
/// `fts`) lists a directory of more than 10,000 entries and enters the subdirectories sorted
/// by inode number, an order no listing has: each lookup was one `LOOKUP` round trip to the
/// worker and each subdirectory's listing one `READDIR_PAGE`, so the walker's socket carried
/// about two requests per subdirectory (main: 38,000+ here). With lookups in inode order
/// batched (`LOOKUPS_BY_INO`, with the subdirectories' listings) it carries fewer than one
/// for every ten subdirectories, the walk prints the kernel's paths, and a second walk with
/// `-printf` the kernel's attributes. (The read-ahead
/// socket's requests, the directory read-ahead's listings and the batches read in the
/// background, and the worker's block reads, each a round trip to the daemon, are printed,
/// not bounded: they depend on timing, and ext4 reads each subdirectory's block cold.)
#[test]
fn find_in_inode_order_asks_the_worker_in_batches() {
    const N: usize = 20_000;
    let t = tempfile::Builder::new()
        .prefix("snapfs-issue-19x-ino")
        .tempdir()
        .unwrap();
    let pool = t.path().join("guests");
    fs::create_dir(&pool).unwrap();
    let kmnt = t.path().join("kmnt");
    fs::create_dir(&kmnt).unwrap();
    let name = |k: usize| format!("subdirectory-{k:06}-of-a-huge-directory-walked-by-inode");
    let mount = |raw: &Path, opts: &str| {
        run(Command::new("mount").args(["-o", opts]).arg(raw).arg(&kmnt));
    };
    let umount = || run(Command::new("umount").arg(&kmnt));
    // Paths, or with `printf` each entry's attributes as `find -printf` shows them.
    let find_with = |root: &Path, printf: Option<&str>| -> Vec<String> {
        let mut cmd = Command::new("find");
        cmd.arg(root);
        if let Some(f) = printf {
            cmd.args(["-printf", f]);
        }
        let out = run(&mut cmd);
        let mut v: Vec<String> = out
            .lines()
            .map(|l| {
                l.strip_prefix(root.to_str().unwrap())
                    .unwrap_or(l)
                    .to_string()
            })
            .collect();
        v.sort();
        v
    };
    let find = |root: &Path| find_with(root, None);
    let attrs = "%P %y %m %U %G %n %s %T@ %C@\n";
    for (fs_name, mkfs, ro) in [
        ("xfs", vec!["mkfs.xfs", "-q", "-f"], "ro,loop,norecovery"),
        (
            "ext4",
            vec!["mkfs.ext4", "-q", "-F", "-N", "30000"],
            "ro,loop,noload",
        ),
    ] {
        let raw = t.path().join(format!("{fs_name}.raw"));
        run(Command::new("truncate").args(["-s", "400M"]).arg(&raw));
        run(Command::new(mkfs[0]).args(&mkfs[1..]).arg(&raw));
        mount(&raw, "loop");
        let big = kmnt.join("big");
        fs::create_dir(&big).unwrap();
        for i in 0..N {
            // A fixed shuffle: creation order is neither name nor hash order.
            fs::create_dir(big.join(name(i * 7_919 % N))).unwrap();
        }
        umount();
        mount(&raw, ro);
        let want = find(&big);
        let want_attrs = find_with(&big, Some(attrs));
        umount();
        assert_eq!(want.len(), N + 1, "{fs_name}: the kernel's walk");
        let img = format!("{fs_name}.qcow2");
        qcow2_with_snapshot(&raw, &pool.join(&img));
        let m = Mount::with_args(&pool, &["--restore-worker=on"]);
        let root = m.snap(&img, "s").join("files/whole/big");
        assert!(fs::metadata(&root).unwrap().is_dir(), "{fs_name}");
        let pids = restore_workers(m.daemon_pid().expect("daemon pid"));
        assert_eq!(pids.len(), 1, "{fs_name}: {pids:?}");
        let mut got = Vec::new();
        let (replies, ahead, reads) = messages_sent_during(pids[0], t.path(), || {
            got = find(&root);
        });
        eprintln!(
            "{fs_name}: find of {N} subdirectories: the worker answered {replies} requests \
             of the walker and {ahead} of the read-ahead, and asked for {reads} block reads"
        );
        assert!(got == want, "{fs_name}: find differs from the kernel's");
        // The attributes the batches brought (kept by the kernel since): the kernel's.
        let got_attrs = find_with(&root, Some(attrs));
        let diff: Vec<_> = got_attrs
            .iter()
            .zip(&want_attrs)
            .filter(|(a, b)| a != b)
            .take(3)
            .collect();
        assert!(
            got_attrs.len() == want_attrs.len() && diff.is_empty(),
            "{fs_name}: attributes differ from the kernel's: {diff:?}"
        );
        assert!(
            replies < N / 10,
            "{fs_name}: the worker answered {replies} requests for {N} subdirectories"
        );
        drop(m);
        fs::remove_file(&raw).unwrap();
    }
}

//! One hostile volume cannot starve the others (issue 20, item 2), through the real mount: a
//! volume whose requests are all blocked holds at most `--threads` - 1 FUSE threads, and the
//! requests of another volume complete meanwhile (src/fairness.rs).

mod common;

use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// The images of scripts/make-fs-images.sh (only gpt.raw is used here).
fn fs_images() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fs-images");
    if dir.join("gpt.raw").exists() {
        return dir;
    }
    fs_images_in(&dir)
}

/// Wait for `cond`; the deadline only turns a hang into a failure (nothing is timed).
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !cond() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Requests of the FUSE connection of `mnt` the kernel has sent and not had answered.
fn waiting(mnt: &Path) -> u64 {
    let dev = fs::metadata(mnt).unwrap().dev();
    let minor = libc::minor(dev);
    fs::read_to_string(format!("/sys/fs/fuse/connections/{minor}/waiting"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// 4 MiB of bytes that differ in every 4 KiB block.
fn pattern() -> Vec<u8> {
    (0..4u32 << 20)
        .map(|i| (i / 4096 * 7 + i % 251) as u8)
        .collect()
}

#[test]
fn a_blocked_volume_leaves_threads_to_another() {
    let t = tempfile::Builder::new()
        .prefix("snapfs-neighbour")
        .tempdir()
        .unwrap();
    let pool = t.path().join("n");
    fs::create_dir(&pool).unwrap();
    // B: a guest filesystem, read through the restore worker (whose hang hook blocks it).
    let b = pool.join("b.qcow2");
    qemu_img(&[
        "convert",
        "-O",
        "qcow2",
        fs_images().join("gpt.raw").to_str().unwrap(),
        b.to_str().unwrap(),
    ]);
    qemu_img(&["snapshot", "-c", "s", b.to_str().unwrap()]);
    // A: a plain disk of known bytes.
    let raw = t.path().join("a.raw");
    let want = pattern();
    fs::write(&raw, &want).unwrap();
    let a = pool.join("a.qcow2");
    qemu_img(&[
        "convert",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        a.to_str().unwrap(),
    ]);
    qemu_img(&["snapshot", "-c", "s", a.to_str().unwrap()]);

    let m = Mount::with_args(
        &pool,
        &[
            "--restore-worker=on",
            "--restore-worker-test-hooks",
            "--threads",
            "4",
        ],
    );
    let daemon = m.daemon_pid().unwrap();
    let p1 = m.snap("b.qcow2", "s").join("files/p1");
    assert!(fs::metadata(&p1).unwrap().is_dir());
    let worker = restore_workers(daemon);
    assert_eq!(worker.len(), 1, "one worker for B");

    // B: one request asleep in the worker, six more behind it, each needing the worker (the
    // hook's name is sent to it without a look at any cache), in directories of their own (the
    // kernel sends one lookup of a name in a directory at a time).
    let dirs = ["", "big-dir", "bin", "dir", "dir/nested", "many", "private"];
    for d in dirs {
        assert!(fs::metadata(p1.join(d)).unwrap().is_dir(), "{d}");
    }
    let before = waiting(&m.mnt);
    let hang = p1.join(".snapfs-worker-hang");
    let mut blocked = vec![std::thread::spawn(move || fs::metadata(hang).map(|_| ()))];
    wait_for(
        "B's worker asleep in the hang hook",
        || matches!(in_syscall(worker[0]), Some(n) if n == libc::SYS_clock_nanosleep || n == libc::SYS_nanosleep),
    );
    for d in &dirs[1..] {
        let p = p1.join(d).join(".snapfs-worker-hang");
        blocked.push(std::thread::spawn(move || fs::metadata(p).map(|_| ())));
    }
    wait_for("B's seven requests sent to the daemon", || {
        waiting(&m.mnt) >= before + 7
    });

    // A: lookups, an open and O_DIRECT reads (each one a request to the daemon) complete
    // while all of B's are still blocked. Without the gate, B's first four requests hold the
    // four threads and A's wait in the kernel's queue until B's worker is killed below.
    let disk = m.snap("a.qcow2", "s").join("disk.raw");
    let reader = std::thread::spawn(move || -> std::io::Result<usize> {
        let mut f = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&disk)?;
        let layout = std::alloc::Layout::from_size_align(1 << 20, 4096).unwrap();
        // SAFETY: a non-zero size; freed below with the same layout.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        // SAFETY: ptr is valid for 1 MiB and aligned for O_DIRECT.
        let buf = unsafe { std::slice::from_raw_parts_mut(ptr, 1 << 20) };
        let mut got = Vec::new();
        let res = loop {
            match f.read(buf) {
                Ok(0) => break Ok(got),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => break Err(e),
            }
        };
        // SAFETY: allocated above with this layout.
        unsafe { std::alloc::dealloc(ptr, layout) };
        let got = res?;
        assert!(got == pattern(), "A's bytes differ");
        Ok(got.len())
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    while !reader.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let a_done = reader.is_finished();
    let b_still_blocked = blocked.iter().filter(|h| !h.is_finished()).count();
    // Let B go: each blocked request reaches the hook in a new worker, so workers are killed
    // until all of them have failed (EIO).
    while blocked.iter().any(|h| !h.is_finished()) {
        for w in restore_workers(daemon) {
            let _ = Command::new("kill").args(["-9", &w.to_string()]).status();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for h in blocked {
        assert!(h.join().unwrap().is_err());
    }
    assert!(
        a_done,
        "A's reads did not complete while B's requests held the daemon"
    );
    assert_eq!(reader.join().unwrap().unwrap(), want.len());
    assert_eq!(
        b_still_blocked, 7,
        "B's requests were not all blocked meanwhile"
    );
    // B answers again (a new worker), the mount is alive.
    assert!(fs::metadata(&p1).unwrap().is_dir());
    assert!(fs::read_dir(&p1).unwrap().count() > 0);
}

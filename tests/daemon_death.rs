//! How a daemon can end without a word, and what now prevents or reports it (the daemon death
//! seen once in `running_rbd_backed_instance_revert_is_ebusy`: ENOTCONN, no log line, no core):
//!
//! - `snapfs unmount` aborts a FUSE connection that outlives its unmount (a copy of the mount
//!   held elsewhere), found by the mount's device minor under `/sys/fs/fuse/connections`. The
//!   kernel gives that minor to the next mount as soon as the old one is gone, so the abort
//!   must never hit the new mount that now has the name.
//! - A fatal signal (a crash or abort() in a C library) leaves a line in the log.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

/// The device minor of the mount at `mnt`, from /proc/self/mountinfo.
fn minor_of(mnt: &Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = mnt.to_string_lossy().into_owned();
    info.lines()
        .rev()
        .find(|l| l.split(' ').nth(4) == Some(want.as_str()))
        .and_then(|l| l.split(' ').nth(2))
        .and_then(|d| d.split(':').nth(1))
        .map(str::to_string)
}

/// Mount A is unmounted lazily while a directory handle keeps it busy, so `snapfs unmount`
/// waits for its connection. The unmount is stopped there (SIGSTOP: what a starved process on
/// a loaded machine looks like), the handle is closed (A's connection ends, its minor is free)
/// and mount B is made, which takes A's minor; then the unmount runs on past its wait. B must
/// still be mounted and served: the connection under that name is B's, not A's. (Before the
/// fix the unmount aborted B: B's daemon logged only "unmounted; exiting", and a caller inside
/// B got ENOTCONN/ECONNABORTED.) Tried until B gets A's minor (other mounts on the machine may
/// take it first).
#[test]
fn unmount_never_aborts_the_next_mount_that_reuses_the_minor() {
    let images = tempfile::tempdir().expect("tempdir");
    let pool = images.path().join("pool");
    std::fs::create_dir(&pool).expect("mkdir pool");
    for attempt in 1..=10 {
        let a = Mount::new(&pool);
        let minor_a = minor_of(&a.mnt).expect("A's minor");
        let busy = std::fs::File::open(&a.mnt).expect("open A's root");
        let mut unmount = Command::new(BIN)
            .args(["unmount", "--lazy"])
            .arg(&a.mnt)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("snapfs unmount");
        let pid = unmount.id() as i32;
        // The unmount detaches A and waits for its connection, which the handle keeps.
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            unmount.try_wait().expect("try_wait").is_none(),
            "the unmount did not wait for A's connection"
        );
        // SAFETY: kill(2) of the child this test started.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        drop(busy);
        let b = Mount::new(&pool);
        let minor_b = minor_of(&b.mnt).expect("B's minor");
        // Past the unmount's own wait (2 s), then it runs on.
        std::thread::sleep(Duration::from_millis(2500));
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGCONT) };
        let out = unmount.wait_with_output().expect("unmount");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        if minor_b != minor_a {
            eprintln!("attempt {attempt}: B got minor {minor_b}, not A's {minor_a}: again");
            continue;
        }
        // Time for an aborted daemon to notice and leave.
        std::thread::sleep(Duration::from_millis(500));
        let log = b.log();
        assert!(
            b.is_mounted() && b.daemon_pid().is_some(),
            "B (minor {minor_b}, A's) was aborted by A's unmount; unmount said: {}\nB's log:\n{log}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(std::fs::read_dir(&b.mnt).is_ok(), "{log}");
        assert!(!log.contains("unmounted; exiting"), "{log}");
        return;
    }
    panic!("B never got A's minor in 10 attempts: nothing was tested");
}

/// A daemon that dies of a fatal signal says so in its log (core dumps are usually off, and
/// the log is the daemon's stderr); a SIGSEGV sent with kill(2) ends it as the default action
/// would.
#[test]
fn a_fatal_signal_leaves_a_line_in_the_log() {
    let images = tempfile::tempdir().expect("tempdir");
    let pool = images.path().join("pool");
    std::fs::create_dir(&pool).expect("mkdir pool");
    for (sig, name) in [(libc::SIGSEGV, "SIGSEGV"), (libc::SIGABRT, "SIGABRT")] {
        let m = Mount::new(&pool);
        let pid = m.daemon_pid().expect("daemon pid");
        // SAFETY: kill(2) of the daemon this test started.
        unsafe { libc::kill(pid, sig) };
        assert!(
            wait_gone(pid, Duration::from_secs(10)),
            "the daemon outlived {name}"
        );
        let log = m.log();
        assert!(
            log.contains(&format!("snapfs: the daemon dies of {name} in thread")),
            "{log}"
        );
        // ECONNABORTED when a request was pending as the connection went (as in
        // mount_images::killed_daemon_leaves_a_mount_the_next_start_clears).
        let e = errno(std::fs::read_dir(&m.mnt));
        assert!(
            e == libc::ENOTCONN || e == libc::ECONNABORTED,
            "a dead daemon's mount gave errno {e}"
        );
    }
}

/// The unmount a daemon does on SIGTERM, when its own mount is gone and another daemon's
/// mount at the same path has its device minor: daemon A is stopped (SIGSTOP), its mount
/// detached (`umount -l`: not busy, so its connection ends and its minor is free), daemon B
/// mounted at the same path (taking the minor when nothing else took it first), then A gets
/// SIGTERM and runs on. A must leave B alone: B's mount is at A's path with A's device
/// number, but A's connection (its fusectl abort file, by inode) is gone. Before, A took the
/// mount for its own and unmounted B (when its signal thread ran before its session noticed
/// the end: not every run can tell).
#[test]
fn sigterm_leaves_a_new_mount_at_our_path_with_our_minor_alone() {
    let images = tempfile::tempdir().expect("tempdir");
    let pool = images.path().join("pool");
    std::fs::create_dir(&pool).expect("mkdir pool");
    for attempt in 1..=10 {
        let a = Mount::new(&pool);
        let minor_a = minor_of(&a.mnt).expect("A's minor");
        let pid_a = a.daemon_pid().expect("A's pid");
        // SAFETY: kill(2) of the daemon this test started.
        unsafe { libc::kill(pid_a, libc::SIGSTOP) };
        let c = std::ffi::CString::new(a.mnt.to_string_lossy().as_bytes()).unwrap();
        // SAFETY: c is a valid NUL-terminated path.
        let rc = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        assert_eq!(rc, 0, "umount -l {}", a.mnt.display());
        let state_b = a.dir.path().join("state-b");
        let out = Command::new(BIN)
            .args(["mount", "--images"])
            .arg(&pool)
            .arg("--state-dir")
            .arg(&state_b)
            .arg(&a.mnt)
            .output()
            .expect("snapfs mount B");
        let unmount_b = || {
            let _ = Command::new(BIN)
                .args(["unmount", "--lazy"])
                .arg(&a.mnt)
                .output();
        };
        if !out.status.success() {
            // SAFETY: as above.
            unsafe { libc::kill(pid_a, libc::SIGCONT) };
            panic!("mount B: {}", String::from_utf8_lossy(&out.stderr));
        }
        let minor_b = minor_of(&a.mnt).expect("B's minor");
        let pid_b = find_process(|args| {
            args.get(1).is_some_and(|x| x == "mount")
                && args.iter().any(|x| Path::new(x) == a.mnt)
                && args.iter().any(|x| Path::new(x) == state_b)
        })
        .expect("B's pid");
        // SAFETY: as above.
        unsafe {
            libc::kill(pid_a, libc::SIGTERM);
            libc::kill(pid_a, libc::SIGCONT);
        }
        assert!(
            wait_gone(pid_a, Duration::from_secs(10)),
            "A outlived SIGTERM"
        );
        if minor_b != minor_a {
            eprintln!("attempt {attempt}: B got minor {minor_b}, not A's {minor_a}: again");
            unmount_b();
            wait_gone(pid_b, Duration::from_secs(10));
            continue;
        }
        let log_b = std::fs::read_to_string(state_b.join("snapfs.log")).unwrap_or_default();
        let here = minor_of(&a.mnt);
        let served = std::fs::read_dir(&a.mnt).is_ok();
        unmount_b();
        wait_gone(pid_b, Duration::from_secs(10));
        assert_eq!(
            here.as_deref(),
            Some(minor_b.as_str()),
            "B (A's minor {minor_a}, at A's path) was unmounted by A's SIGTERM; A's log:\n{}\nB's log:\n{log_b}",
            a.log()
        );
        assert!(served, "B does not answer; B's log:\n{log_b}");
        assert!(!log_b.contains("unmounted; exiting"), "{log_b}");
        return;
    }
    panic!("B never got A's minor in 10 attempts: nothing was tested");
}

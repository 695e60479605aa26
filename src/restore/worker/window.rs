//! The shared-memory window through which the daemon hands a worker the disk bytes it asks for
//! (`BLOCK_READ`): a `memfd` the daemon makes, maps read-write and seals, passed to the worker
//! once at its start as fd [`WINDOW_FD`], mapped read-only there before the sandbox is set up.
//! Only a small descriptor (`IN_WINDOW len`) then crosses the socket for each read.
//!
//! The daemon does not trust the worker with it: it writes only `[0, len)` of its own mapping,
//! `len` checked against the window's size, and only while it serves the worker's read (the
//! worker waits for the answer); the memfd is sealed against shrinking (a shrunk file would
//! make the daemon's write fault: SIGBUS) and growing, and against new writable mappings
//! (`F_SEAL_FUTURE_WRITE`: the worker's read-only mapping cannot be made writable, and what it
//! could write would only be its own input anyway: the daemon never reads the window). The
//! window dies with the worker's connection.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;

/// The descriptor the window has in the worker (the socket is 3).
pub const WINDOW_FD: i32 = 4;
/// The descriptor of the read-ahead socket's window (that socket is 5).
pub const AHEAD_WINDOW_FD: i32 = 6;

/// Bytes of the window: one of the worker's 64 KiB chunks four times over. Pages are touched
/// only when written, so a worker that reads little costs little (shared pages count in the
/// RSS of both processes).
pub const WINDOW_BYTES: usize = 256 << 10;

/// The daemon's side: its read-write mapping (and the memfd until the worker has it).
pub struct Window {
    ptr: NonNull<u8>,
    len: usize,
    fd: Option<OwnedFd>,
}

// SAFETY: the mapping is owned by this value; it is written only through `&mut self`.
unsafe impl Send for Window {}

impl Window {
    pub fn new(len: usize) -> std::io::Result<Window> {
        let err = std::io::Error::last_os_error;
        // SAFETY: plain system calls; every result is checked before use.
        unsafe {
            let fd = libc::memfd_create(
                c"snapfs-worker-window".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            );
            if fd < 0 {
                return Err(err());
            }
            let fd = OwnedFd::from_raw_fd(fd);
            if libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) != 0 {
                return Err(err());
            }
            let p = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            );
            if p == libc::MAP_FAILED {
                return Err(err());
            }
            let w = Window {
                ptr: NonNull::new(p.cast()).ok_or_else(err)?,
                len,
                fd: Some(fd),
            };
            let seals = libc::F_SEAL_SHRINK
                | libc::F_SEAL_GROW
                | libc::F_SEAL_FUTURE_WRITE
                | libc::F_SEAL_SEAL;
            if libc::fcntl(w.raw_fd(), libc::F_ADD_SEALS, seals) != 0 {
                return Err(err());
            }
            Ok(w)
        }
    }

    /// The memfd, to pass to the worker; -1 once [`Window::close_fd`] ran.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_ref().map_or(-1, |f| f.as_raw_fd())
    }

    /// The worker has its copy: the daemon needs only the mapping.
    pub fn close_fd(&mut self) {
        self.fd = None;
    }

    pub fn bytes(&self) -> usize {
        self.len
    }

    /// The first `n` bytes, for the daemon to write (`None` if `n` is past the window).
    pub fn first_mut(&mut self, n: usize) -> Option<&mut [u8]> {
        // SAFETY: `[ptr, ptr + len)` is our live mapping; only the daemon writes it, and
        // `&mut self` makes this the only reference the daemon has.
        (n <= self.len).then(|| unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), n) })
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping; no reference to it outlives `self`.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// The worker's read-only mapping of the window (set once, before the sandbox).
pub struct Mapped {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: read-only mapping that lives as long as the process.
unsafe impl Send for Mapped {}
unsafe impl Sync for Mapped {}

impl Mapped {
    /// Map `fd` ([`WINDOW_FD`] or [`AHEAD_WINDOW_FD`]) read-only (`len` bytes) and close it.
    pub fn map(fd: RawFd, len: usize) -> Option<Mapped> {
        // SAFETY: mapping a descriptor the daemon passed us for this; checked before use.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd,
                0,
            );
            libc::close(fd);
            if p == libc::MAP_FAILED {
                return None;
            }
            Some(Mapped {
                ptr: NonNull::new(p.cast())?,
                len,
            })
        }
    }

    pub fn bytes(&self) -> usize {
        self.len
    }

    /// Copy the first `dst.len()` bytes out (false if past the window).
    pub fn copy_to(&self, dst: &mut [u8]) -> bool {
        if dst.len() > self.len {
            return false;
        }
        // SAFETY: `[ptr, ptr + len)` is mapped for the life of the process; the daemon
        // writes it only before it answers a read, and this runs after that answer.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.as_ptr(), dst.as_mut_ptr(), dst.len()) };
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The daemon writes only inside its window, and what the worker gets of the memfd can
    /// neither shrink it under the daemon (SIGBUS) nor be mapped writable.
    #[test]
    fn the_window_is_bounded_and_sealed() {
        let mut w = Window::new(WINDOW_BYTES).unwrap();
        assert!(w.first_mut(WINDOW_BYTES + 1).is_none());
        w.first_mut(WINDOW_BYTES).unwrap().fill(7);
        let fd = w.raw_fd();
        // SAFETY: system calls on our own memfd; results checked, no mapping kept.
        unsafe {
            let seals = libc::fcntl(fd, libc::F_GET_SEALS);
            for s in [
                libc::F_SEAL_SHRINK,
                libc::F_SEAL_GROW,
                libc::F_SEAL_FUTURE_WRITE,
                libc::F_SEAL_SEAL,
            ] {
                assert_ne!(seals & s, 0, "seal {s:#x} missing");
            }
            assert_ne!(libc::ftruncate(fd, 4096), 0, "shrunk");
            let p = libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            );
            assert_eq!(p, libc::MAP_FAILED, "mapped writable");
            // Read-only, as the worker maps it; and it cannot be made writable.
            let p = libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd,
                0,
            );
            assert_ne!(p, libc::MAP_FAILED);
            assert_eq!(*(p as *const u8), 7);
            assert_ne!(
                libc::mprotect(p, 4096, libc::PROT_READ | libc::PROT_WRITE),
                0
            );
            libc::munmap(p, 4096);
        }
        w.close_fd();
        assert_eq!(w.raw_fd(), -1);
    }
}

//! FUSE passthrough bookkeeping: which open files the kernel reads from a host file itself.
//!
//! A disk whose bytes are a host file's (a raw snapshot disk, see
//! [`crate::image::BlockImage::passthrough_file`]) is opened with `FOPEN_PASSTHROUGH`: its reads
//! never reach the daemon. The kernel wants one backing id per FUSE inode for as long as any
//! file of that inode is open in passthrough (another id for the same inode, or a cached open
//! beside it, makes the open fail), so the ids are kept here per inode and counted per open;
//! the last release closes the id. Generic over the id so the counting is tested without a
//! kernel.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::namespace::registry::lock;

/// What identifies a host file: (device, inode).
pub type FileId = (u64, u64);

struct Backing<T> {
    id: T,
    file: FileId,
    opens: usize,
}

/// Why a passthrough open was not made.
#[derive(Debug)]
pub enum Refused {
    /// The inode is open in passthrough on another host file (a snapshot deleted and made
    /// again under the same name while the old one is still open): the kernel refuses two.
    OtherFile,
    /// Registering the file failed (no CAP_SYS_ADMIN, passthrough off in the kernel, a file on
    /// a stacked filesystem): serve this open through the daemon.
    Kernel(std::io::Error),
}

pub struct Backings<T> {
    /// Negotiated at init and still working (off after the kernel refused for the session).
    enabled: AtomicBool,
    by_ino: Mutex<HashMap<u64, Backing<T>>>,
    /// Open handles in passthrough → their inode.
    by_fh: Mutex<HashMap<u64, u64>>,
}

impl<T> Default for Backings<T> {
    fn default() -> Self {
        Backings {
            enabled: AtomicBool::new(false),
            by_ino: Mutex::new(HashMap::new()),
            by_fh: Mutex::new(HashMap::new()),
        }
    }
}

impl<T> Backings<T> {
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Relaxed);
    }

    /// Open handle `fh` of inode `ino` on host file `file` in passthrough: `send` gets the
    /// reply and the inode's id, made by `register` (with the reply, which can register) when
    /// the inode has none. On refusal the reply comes back, to be answered otherwise.
    pub fn open<R>(
        &self,
        ino: u64,
        fh: u64,
        file: FileId,
        reply: R,
        register: impl FnOnce(&R) -> std::io::Result<T>,
        send: impl FnOnce(R, &T),
    ) -> Result<(), (Refused, R)> {
        let mut by_ino = lock(&self.by_ino);
        let b = match by_ino.get_mut(&ino) {
            Some(b) if b.file != file => return Err((Refused::OtherFile, reply)),
            Some(b) => b,
            None => {
                let id = match register(&reply) {
                    Ok(id) => id,
                    Err(e) => {
                        // Refusals that hold for every file: stop asking.
                        if matches!(
                            e.raw_os_error(),
                            Some(libc::EPERM | libc::ENOTTY | libc::EOPNOTSUPP | libc::EINVAL)
                        ) {
                            self.set_enabled(false);
                        }
                        return Err((Refused::Kernel(e), reply));
                    }
                };
                by_ino.entry(ino).or_insert(Backing { id, file, opens: 0 })
            }
        };
        b.opens += 1;
        lock(&self.by_fh).insert(fh, ino);
        send(reply, &b.id);
        Ok(())
    }

    /// Handle `fh` was released: the last one of an inode gives its id back (dropped).
    pub fn release(&self, fh: u64) -> Option<T> {
        let ino = lock(&self.by_fh).remove(&fh)?;
        let mut by_ino = lock(&self.by_ino);
        let b = by_ino.get_mut(&ino)?;
        b.opens = b.opens.saturating_sub(1);
        if b.opens == 0 {
            return by_ino.remove(&ino).map(|b| b.id);
        }
        None
    }

    /// Inodes with a backing id (open in passthrough).
    pub fn len(&self) -> usize {
        lock(&self.by_ino).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(n: u32) -> impl FnOnce(&()) -> std::io::Result<u32> {
        move |_| Ok(n)
    }

    /// Open through `b` and return the id sent.
    fn open(
        b: &Backings<u32>,
        ino: u64,
        fh: u64,
        file: FileId,
        register: impl FnOnce(&()) -> std::io::Result<u32>,
    ) -> Result<u32, Refused> {
        let mut sent = None;
        b.open(ino, fh, file, (), register, |_, id| sent = Some(*id))
            .map_err(|(r, _)| r)?;
        Ok(sent.expect("sent"))
    }

    #[test]
    fn one_id_per_inode_until_its_last_release() {
        let b = Backings::default();
        b.set_enabled(true);
        assert_eq!(open(&b, 7, 1, (1, 2), ok(10)).unwrap(), 10);
        // A second open reuses the id: `register` is not called.
        let again = open(&b, 7, 2, (1, 2), |_| panic!("registered twice"));
        assert_eq!(again.unwrap(), 10);
        assert_eq!(open(&b, 8, 3, (1, 3), ok(11)).unwrap(), 11);
        assert_eq!(b.len(), 2);
        assert_eq!(b.release(1), None);
        assert_eq!(b.release(2), Some(10));
        assert_eq!(b.release(2), None, "a handle is released once");
        assert_eq!(b.release(99), None, "not a passthrough handle");
        assert_eq!(b.release(3), Some(11));
        assert!(b.is_empty());
    }

    #[test]
    fn another_file_on_an_open_inode_is_refused() {
        let b = Backings::default();
        open(&b, 7, 1, (1, 2), ok(10)).unwrap();
        let r = open(&b, 7, 2, (1, 9), ok(12));
        assert!(matches!(r, Err(Refused::OtherFile)));
        assert_eq!(b.release(1), Some(10));
        // Once closed, the inode may pass through to the other file.
        assert_eq!(open(&b, 7, 3, (1, 9), ok(12)).unwrap(), 12);
    }

    #[test]
    fn kernel_refusal_for_every_file_turns_passthrough_off() {
        let b: Backings<u32> = Backings::default();
        b.set_enabled(true);
        let stacked = open(&b, 7, 1, (1, 2), |_| {
            Err(std::io::Error::from_raw_os_error(libc::ELOOP))
        });
        assert!(matches!(stacked, Err(Refused::Kernel(_))));
        assert!(b.enabled(), "ELOOP is about one file");
        let perm = open(&b, 7, 1, (1, 2), |_| {
            Err(std::io::Error::from_raw_os_error(libc::EPERM))
        });
        assert!(matches!(perm, Err(Refused::Kernel(_))));
        assert!(!b.enabled());
        assert!(b.is_empty());
        assert_eq!(b.release(1), None);
    }
}

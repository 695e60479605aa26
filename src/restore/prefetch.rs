//! Directory read-ahead for guest trees. A walk (`find`, `cp -r`, `rsync`) asks for one
//! directory at a time and waits for each: on a cold image every directory costs a few disk
//! reads (its inode, its blocks) done one after the other. When a directory is listed, its
//! subdirectories are very likely next, so a background thread reads them ahead (through the
//! filesystem's own caches and the host's page cache) while the walker is still busy with the
//! kernel round trips of the current one.
//!
//! Bounded on every side: one thread, a queue of at most [`MAX_QUEUED`] directories (the oldest
//! are dropped: the walker has moved on), only what lies at most [`LEVELS`] below a directory
//! that was actually listed (never a crawl of its own), the first [`MAX_PER_LISTING`]
//! subdirectories of a listing, and a filesystem that was closed is skipped (the queue holds
//! only weak references).

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, Weak};

use super::GuestFs;

/// Directories waiting to be read ahead, at most.
const MAX_QUEUED: usize = 4096;
/// Subdirectories of one listing read ahead, at most: as many as the readers' listing cache
/// holds ([`super::DIR_CACHE`]); more would be dropped from it before the walker gets there.
const MAX_PER_LISTING: usize = super::DIR_CACHE;
/// How many levels below a listed directory are read ahead. One is not enough for a
/// depth-first walker: it enters the first subdirectory at once, before that one was read.
const LEVELS: u8 = 2;

struct Job {
    fs: Weak<dyn GuestFs>,
    dir: u64,
    /// Levels of subdirectories still to read below `dir`.
    below: u8,
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    stop: bool,
}

#[derive(Default)]
struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
}

/// One background thread that reads guest directories ahead. Dropping it stops the thread.
pub struct Prefetcher {
    shared: Arc<Shared>,
    started: Mutex<bool>,
}

impl Default for Prefetcher {
    fn default() -> Self {
        Prefetcher::new()
    }
}

impl Prefetcher {
    /// The thread starts with the first directory queued.
    pub fn new() -> Prefetcher {
        Prefetcher {
            shared: Arc::default(),
            started: Mutex::new(false),
        }
    }

    /// Read `dirs` of `fs` ahead, the first of them first, before anything queued earlier
    /// (a depth-first walker enters the newest listing's subdirectories next), and their
    /// subdirectories down to [`LEVELS`] below the listing, depth first.
    pub fn dirs(&self, fs: &Arc<dyn GuestFs>, dirs: &[u64]) {
        if self.enqueue(fs, dirs) {
            self.start();
            self.shared.wake.notify_one();
        }
    }

    /// Queue without waking the thread; false if nothing was queued.
    fn enqueue(&self, fs: &Arc<dyn GuestFs>, dirs: &[u64]) -> bool {
        let Ok(mut q) = self.shared.queue.lock() else {
            return false;
        };
        push(&mut q, &Arc::downgrade(fs), dirs, LEVELS - 1)
    }

    fn start(&self) {
        let Ok(mut started) = self.started.lock() else {
            return;
        };
        if *started {
            return;
        }
        let shared = self.shared.clone();
        match std::thread::Builder::new()
            .name("prefetch".into())
            .spawn(move || run(&shared))
        {
            Ok(_) => *started = true,
            // Read-ahead is an optimisation: without the thread, reads just happen on demand.
            Err(e) => tracing::warn!(error = %e, "no directory read-ahead thread"),
        }
    }

    /// Directories still waiting (for tests).
    pub fn queued(&self) -> usize {
        self.shared.queue.lock().map(|q| q.jobs.len()).unwrap_or(0)
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        if let Ok(mut q) = self.shared.queue.lock() {
            q.stop = true;
            q.jobs.clear();
        }
        self.shared.wake.notify_all();
    }
}

/// Queue the first [`MAX_PER_LISTING`] of `dirs` ahead of everything queued, in their order;
/// false if there were none.
fn push(q: &mut Queue, fs: &Weak<dyn GuestFs>, dirs: &[u64], below: u8) -> bool {
    for &dir in dirs.iter().take(MAX_PER_LISTING).rev() {
        q.jobs.push_front(Job {
            fs: fs.clone(),
            dir,
            below,
        });
    }
    q.jobs.truncate(MAX_QUEUED);
    !dirs.is_empty()
}

fn run(shared: &Shared) {
    loop {
        let job = {
            let Ok(mut q) = shared.queue.lock() else {
                return;
            };
            loop {
                if q.stop {
                    return;
                }
                if let Some(j) = q.jobs.pop_front() {
                    break j;
                }
                q = match shared.wake.wait(q) {
                    Ok(q) => q,
                    Err(_) => return,
                };
            }
        };
        let Some(fs) = job.fs.upgrade() else {
            continue;
        };
        // Errors are the reader's to see when it gets there.
        let subdirs = fs.prefetch_dir(job.dir);
        if job.below > 0 && !subdirs.is_empty() {
            if let Ok(mut q) = shared.queue.lock() {
                push(&mut q, &job.fs, &subdirs, job.below - 1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{Error, Result};
    use crate::restore::{DirList, FileStat};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Counts its listings in a counter that outlives it.
    struct Counting(Arc<AtomicUsize>);

    impl GuestFs for Counting {
        fn root(&self) -> u64 {
            1
        }
        fn stat(&self, _ino: u64) -> Result<FileStat> {
            Err(Error::NotFound("x".into()))
        }
        fn lookup(&self, _dir: u64, _name: &[u8]) -> Result<FileStat> {
            Err(Error::NotFound("x".into()))
        }
        fn readdir(&self, _dir: u64) -> Result<DirList> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(DirList::default())
        }
        fn read(&self, _ino: u64, _offset: u64, _buf: &mut [u8]) -> Result<usize> {
            Ok(0)
        }
        fn readlink(&self, _ino: u64) -> Result<Vec<u8>> {
            Ok(Vec::new())
        }
        fn xattrs(&self, _ino: u64) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
            Ok(Vec::new())
        }
        fn describe(&self) -> String {
            "counting".into()
        }
    }

    fn counting() -> (Arc<dyn GuestFs>, Arc<AtomicUsize>) {
        let n = Arc::new(AtomicUsize::new(0));
        (Arc::new(Counting(n.clone())), n)
    }

    /// Until the queue is empty and `n` reached `want` (bounded: 10 s).
    fn settle(p: &Prefetcher, n: &AtomicUsize, want: usize) {
        for _ in 0..1000 {
            if p.queued() == 0 && n.load(Ordering::SeqCst) >= want {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    #[test]
    fn newest_listing_first_in_its_order_and_bounded() {
        let (fs, _) = counting();
        let p = Prefetcher::new();
        assert!(p.enqueue(&fs, &[1, 2]));
        assert!(p.enqueue(&fs, &[7, 8, 9]));
        assert!(!p.enqueue(&fs, &[]));
        let order: Vec<u64> = match p.shared.queue.lock() {
            Ok(q) => q.jobs.iter().map(|j| j.dir).collect(),
            Err(_) => panic!("queue lock poisoned"),
        };
        assert_eq!(order, vec![7, 8, 9, 1, 2]);
        let many: Vec<u64> = (100..100 + 2 * MAX_PER_LISTING as u64).collect();
        assert!(p.enqueue(&fs, &many));
        assert_eq!(
            p.queued(),
            5 + MAX_PER_LISTING,
            "a listing's first subdirectories only"
        );
        for _ in 0..MAX_QUEUED / MAX_PER_LISTING {
            assert!(p.enqueue(&fs, &many));
        }
        assert_eq!(p.queued(), MAX_QUEUED);
        let front = p
            .shared
            .queue
            .lock()
            .ok()
            .and_then(|q| q.jobs.front().map(|j| j.dir));
        assert_eq!(front, Some(100), "the oldest jobs are the ones dropped");
    }

    #[test]
    fn reads_in_the_background_and_skips_closed_filesystems() {
        let p = Prefetcher::new();
        let (closed, closed_n) = counting();
        assert!(p.enqueue(&closed, &(0..50).collect::<Vec<u64>>()));
        drop(closed);
        let (open, open_n) = counting();
        p.dirs(&open, &[10, 11, 12]);
        settle(&p, &open_n, 3);
        assert_eq!(open_n.load(Ordering::SeqCst), 3);
        assert_eq!(p.queued(), 0);
        assert_eq!(closed_n.load(Ordering::SeqCst), 0);
    }
}

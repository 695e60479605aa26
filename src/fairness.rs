//! Fair use of the FUSE worker threads between volumes (issue 20, item 2).
//!
//! The FUSE session has a fixed pool of `--threads` threads, each reading a request and
//! serving it to the end. A volume whose requests are slow (a hostile image whose every read
//! misses the cache, a guest filesystem walked through a hung worker) would otherwise hold
//! every thread, and the requests of all other volumes would wait in the kernel's queue.
//!
//! So each request that belongs to a volume (an instance or a volume of a pool, its
//! snapshots, disks and guest files) passes a [`Gate`] first. It runs at once on the thread
//! that read it when
//! - its volume has no request running (every volume gets a thread when one is free), or
//! - its volume has fewer than `threads - 1` running and, with it, at least one thread stays
//!   free of volume work (for the next volume to come).
//!
//! Otherwise it waits in its volume's queue (first in, first out), and the thread goes back
//! to reading requests. A thread that finishes a request of a volume takes the next waiting
//! one of the same volume before it returns to the pool, so a volume never holds more
//! threads than it had when its queue began, and a waiting request always has a thread of
//! its own volume that will come for it (no deadlock: a request never waits for another
//! volume's). A queue holds at most [`QUEUE_MAX`] requests; a thread that would add more
//! waits until one leaves (the kernel then queues, as without the gate). Requests outside any
//! volume (the root, `instances/`, `volumes/`, `launch/`) run at once.
//!
//! Images opened while a request runs join its volume's group in the block cache
//! ([`crate::image::BlockCache::with_group`]), so the cache's fair shares are per volume too.

use std::collections::{HashMap, VecDeque};
use std::sync::{Condvar, Mutex, MutexGuard};

use crate::image::BlockCache;

/// Most requests waiting per volume.
pub const QUEUE_MAX: usize = 1024;

/// A request's work, with its reply inside: dropping it unrun replies EIO.
pub type Job = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct State {
    /// Requests running, per volume key (volumes with none are absent).
    running: HashMap<u64, usize>,
    /// All requests of volumes running.
    total: usize,
    queues: HashMap<u64, VecDeque<Job>>,
}

pub struct Gate {
    threads: usize,
    state: Mutex<State>,
    /// Signalled when a queue gets room.
    room: Condvar,
}

/// What the gate did with a request (for tests).
#[derive(Debug, PartialEq, Eq)]
pub enum Admitted {
    Ran,
    Queued,
}

impl Gate {
    /// For a session of `threads` FUSE threads.
    pub fn new(threads: usize) -> Gate {
        Gate {
            threads: threads.max(1),
            state: Mutex::new(State::default()),
            room: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Jobs run outside the lock; a panic inside it cannot leave the counts half-changed.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Most requests one volume may run at once.
    fn cap(&self) -> usize {
        self.threads.saturating_sub(1).max(1)
    }

    /// Run `job` for volume `vol` now on this thread, or queue it (see the module's rules).
    pub fn run(&self, vol: Option<u64>, job: Job) -> Admitted {
        let Some(vol) = vol else {
            job();
            return Admitted::Ran;
        };
        let mut st = self.lock();
        loop {
            let running = st.running.get(&vol).copied().unwrap_or(0);
            if running == 0 || (running < self.cap() && st.total + 1 < self.threads) {
                *st.running.entry(vol).or_insert(0) += 1;
                st.total += 1;
                break;
            }
            let q = st.queues.entry(vol).or_default();
            if q.len() < QUEUE_MAX {
                q.push_back(job);
                return Admitted::Queued;
            }
            st = self.room.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        drop(st);
        self.serve(vol, job);
        Admitted::Ran
    }

    /// Run `job`, then the volume's waiting requests, then give the thread back.
    fn serve(&self, vol: u64, mut job: Job) {
        loop {
            let group = (vol >> 32) as u32 ^ vol as u32;
            // A panic inside a request drops its reply (EIO) and must not lose the count.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                BlockCache::with_group(group, job)
            }));
            let mut st = self.lock();
            let next = st.queues.get_mut(&vol).and_then(VecDeque::pop_front);
            if st.queues.get(&vol).is_some_and(VecDeque::is_empty) {
                st.queues.remove(&vol);
            }
            match next {
                Some(j) => {
                    drop(st);
                    self.room.notify_all();
                    job = j;
                }
                None => {
                    if let Some(n) = st.running.get_mut(&vol) {
                        *n -= 1;
                        if *n == 0 {
                            st.running.remove(&vol);
                        }
                    }
                    st.total = st.total.saturating_sub(1);
                    return;
                }
            }
        }
    }

    /// Drop every waiting request (each replies EIO as it drops), at the session's end: the
    /// queued requests hold the filesystem, which must be dropped then (its workers end).
    pub fn drain(&self) {
        let queues = std::mem::take(&mut self.lock().queues);
        drop(queues);
        self.room.notify_all();
    }

    /// (requests running, requests waiting) of volume `vol`.
    pub fn load(&self, vol: u64) -> (usize, usize) {
        let st = self.lock();
        (
            st.running.get(&vol).copied().unwrap_or(0),
            st.queues.get(&vol).map_or(0, VecDeque::len),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::sync::Arc;

    /// A job that blocks until `release` says so and then reports `done`.
    fn blocking(
        release: &Arc<(Mutex<bool>, Condvar)>,
        started: &mpsc::Sender<()>,
        done: &mpsc::Sender<u32>,
        tag: u32,
    ) -> Job {
        let (release, started, done) = (release.clone(), started.clone(), done.clone());
        Box::new(move || {
            let _ = started.send(());
            let (m, cv) = &*release;
            let mut go = m.lock().unwrap();
            while !*go {
                go = cv.wait(go).unwrap();
            }
            let _ = done.send(tag);
        })
    }

    /// With four threads, a volume whose requests never finish holds three; the fourth
    /// thread serves another volume, whose requests all complete while the first volume's
    /// are blocked. Fails on a pool without the gate (all four threads blocked).
    #[test]
    fn a_blocked_volume_leaves_a_thread_to_the_others() {
        let gate = Arc::new(Gate::new(4));
        let release = Arc::new((Mutex::new(false), Condvar::new()));
        let (started_tx, started_rx) = mpsc::channel();
        let (done_tx, done_rx) = mpsc::channel();
        // Four "FUSE threads", each reading the next request of one shared stream.
        let (req_tx, req_rx) = mpsc::channel::<(Option<u64>, Job)>();
        let req_rx = Arc::new(Mutex::new(req_rx));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (gate, rx) = (gate.clone(), req_rx.clone());
                std::thread::spawn(move || loop {
                    let next = rx.lock().unwrap().recv();
                    match next {
                        Ok((vol, job)) => {
                            gate.run(vol, job);
                        }
                        Err(_) => return,
                    }
                })
            })
            .collect();
        // Volume 1: ten requests that block.
        for i in 0..10 {
            req_tx
                .send((Some(1), blocking(&release, &started_tx, &done_tx, i)))
                .unwrap();
        }
        for _ in 0..3 {
            started_rx.recv().unwrap();
        }
        // Volume 2 and requests outside any volume: they complete while volume 1 is blocked.
        for i in 0..20 {
            let done = done_tx.clone();
            let vol = if i % 2 == 0 { Some(2) } else { None };
            req_tx
                .send((vol, Box::new(move || done.send(100 + i).unwrap())))
                .unwrap();
        }
        let mut others: Vec<u32> = (0..20).map(|_| done_rx.recv().unwrap()).collect();
        others.sort();
        assert_eq!(others, (100..120).collect::<Vec<_>>());
        assert_eq!(gate.load(1), (3, 7));
        assert!(
            started_rx.try_recv().is_err(),
            "a fourth blocked request started"
        );
        // Released: the queued requests of volume 1 run on its own threads, in order.
        *release.0.lock().unwrap() = true;
        release.1.notify_all();
        let mut first: Vec<u32> = (0..10).map(|_| done_rx.recv().unwrap()).collect();
        first.sort();
        assert_eq!(first, (0..10).collect::<Vec<_>>());
        drop(req_tx);
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(gate.load(1), (0, 0));
        assert_eq!(gate.lock().total, 0);
    }

    #[test]
    fn drain_drops_the_waiting_requests() {
        let gate = Arc::new(Gate::new(2));
        let release = Arc::new((Mutex::new(false), Condvar::new()));
        let (started_tx, started_rx) = mpsc::channel();
        let (done_tx, done_rx) = mpsc::channel();
        let first = blocking(&release, &started_tx, &done_tx, 0);
        let g = gate.clone();
        let t = std::thread::spawn(move || g.run(Some(3), first));
        started_rx.recv().unwrap();
        let held = Arc::new(());
        let h = held.clone();
        assert_eq!(
            gate.run(Some(3), Box::new(move || drop(h))),
            Admitted::Queued
        );
        assert_eq!(Arc::strong_count(&held), 2);
        gate.drain();
        assert_eq!(
            Arc::strong_count(&held),
            1,
            "the waiting request was not dropped"
        );
        *release.0.lock().unwrap() = true;
        release.1.notify_all();
        assert_eq!(done_rx.recv().unwrap(), 0);
        assert_eq!(t.join().unwrap(), Admitted::Ran);
        assert_eq!(gate.load(3), (0, 0));
    }

    #[test]
    fn one_thread_runs_everything_in_turn() {
        let gate = Gate::new(1);
        let (tx, rx) = mpsc::channel();
        for i in 0..3 {
            let tx = tx.clone();
            assert_eq!(
                gate.run(Some(5), Box::new(move || tx.send(i).unwrap())),
                Admitted::Ran
            );
        }
        assert_eq!(rx.try_iter().collect::<Vec<_>>(), vec![0, 1, 2]);
    }

    #[test]
    fn a_panicking_request_gives_its_thread_back() {
        let gate = Gate::new(2);
        gate.run(Some(9), Box::new(|| panic!("test panic inside a request")));
        assert_eq!(gate.load(9), (0, 0));
        assert_eq!(gate.lock().total, 0);
    }
}

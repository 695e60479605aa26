//! RBD images read through librbd, opened read-only at one snapshot.
//!
//! A snapshot never changes, so its allocation map is asked of librbd once
//! (`rbd_diff_iterate2`) and kept for the life of the opened image.
//!
//! Sequential readers get read-ahead: one synchronous `rbd_read2` per FUSE request leaves
//! the cluster idle between requests (about 60% of `rbd export`, which keeps 10 reads in
//! flight), so once a reader is seen to continue where it stopped, the next few object-sized
//! chunks are read with `rbd_aio_read2` and parked in the shared [`BlockCache`] until used.
//!
//! A snapshot can be deleted while it is open (an `rmdir`, `rbd snap rm`), and the OSD then
//! answers reads of its id from a newer clone or the head: other bytes, not an error. So after
//! every read from the cluster (one per synchronous read, one per read-ahead chunk) the
//! image header is asked whether the snapshot is still a user snapshot: librbd moves it to
//! the trash namespace before it releases the snap id, so "still a user snapshot after the
//! read" proves the bytes were the snapshot's. Otherwise the read, and every later one, is
//! EIO (chaos finding F5, docs/testing.md).

use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::CString;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::cache::{CacheKey, CacheKind};
use super::raw::push_extent;
use super::{BlockCache, BlockImage, Extent, ExtentKind, SharedBytes};
use crate::ceph::{self, AioRead};
use crate::error::{Error, Result};
use crate::namespace::registry::lock;

/// Chunk size bounds; the chunk is the image's object size within them.
const MIN_CHUNK: u64 = 1 << 20;
const MAX_CHUNK: u64 = 8 << 20;
/// A finished read-ahead chunk not claimed for this long belongs to a reader that stopped
/// (or is slower than this per read-ahead window); when the budget is full, such reads are
/// dropped to make room (see [`Account::reap`]).
const STALE: Duration = Duration::from_secs(10);

/// The RBD read-ahead's one budget (docs/restore.md, "The daemon's memory"): over every
/// opened snapshot, the bytes of reads in flight or finished but not claimed, the chunks
/// kept in the read-ahead cache, and the spare buffers together stay within that cache's
/// budget (4 × `--ceph-read-ahead-mb`, at least 64 MiB). Every change of these figures, and
/// every move of a chunk between them (claimed into the cache, served whole into the spares),
/// happens under this one lock, so the check in [`RbdImage::start_chunks`] and the memory
/// report see them at one moment. Nobody waits for room: past the budget a reader's bytes
/// come from a synchronous read.
static ACCOUNT: Mutex<Account> = Mutex::new(Account {
    unclaimed: 0,
    reads: 0,
    spare: 0,
    spares: Vec::new(),
    started: VecDeque::new(),
});
/// The read-ahead caches of the daemon's providers, for the memory report.
static CACHES: Mutex<Vec<std::sync::Weak<BlockCache>>> = Mutex::new(Vec::new());

struct Account {
    /// Bytes and reads in flight or finished but not claimed.
    unclaimed: u64,
    reads: u64,
    /// Bytes (capacity) of [`Self::spares`].
    spare: u64,
    /// Buffers of chunks served whole, shared by every opened snapshot: a new read takes one
    /// that no reply holds any more instead of faulting in fresh pages. At most a quarter of
    /// the budget.
    spares: Vec<Arc<Vec<u8>>>,
    /// Reads started, oldest first (a claimed read's entry is dead), for [`Self::reap`].
    started: VecDeque<(std::sync::Weak<Mutex<Option<AioRead>>>, Instant)>,
}

impl Account {
    fn claim(&mut self, len: usize) {
        self.unclaimed = self.unclaimed.saturating_sub(len as u64);
        self.reads = self.reads.saturating_sub(1);
    }

    /// A spare buffer no reply holds any more (its bytes leave the spares' count).
    fn take_spare(&mut self) -> Option<Vec<u8>> {
        let i = self.spares.iter().position(|b| Arc::strong_count(b) == 1)?;
        let b = self.spares.swap_remove(i);
        self.spare = self.spare.saturating_sub(b.capacity() as u64);
        Arc::try_unwrap(b).ok()
    }

    /// Keep `buf` for reuse if the spares stay within a quarter of `budget` (else free it).
    fn keep_spare(&mut self, buf: Arc<Vec<u8>>, budget: u64) {
        let len = buf.capacity() as u64;
        if self.spare + len <= budget / 4 {
            self.spare += len;
            self.spares.push(buf);
        }
    }

    /// Drop finished reads nobody claimed for [`STALE`] (a reader that stopped: its snapshot
    /// stays open, and its reads would hold the budget until it is closed), oldest first,
    /// until `want` bytes are free or none is left. Their snapshot finds the slot empty and
    /// reads that chunk directly if it ever gets there.
    fn reap(&mut self, want: u64, budget: u64, cached: u64) {
        let now = Instant::now();
        let mut i = 0;
        while i < self.started.len() && self.unclaimed + self.spare + cached + want > budget {
            let (slot, at) = &self.started[i];
            if now.duration_since(*at) < STALE {
                break;
            }
            let Some(slot) = slot.upgrade() else {
                self.started.remove(i);
                continue;
            };
            // try_lock: a slot held is being claimed (or checked) right now.
            let taken = match slot.try_lock() {
                Ok(mut s) if s.as_ref().is_some_and(|r| r.is_complete()) => s.take(),
                _ => None,
            };
            match taken {
                Some(read) => {
                    tracing::debug!(
                        offset = read.offset,
                        len = read.len(),
                        "stale read-ahead chunk dropped"
                    );
                    self.claim(read.len());
                    self.started.remove(i);
                }
                None => i += 1,
            }
        }
    }

    /// Remember a read started now; forget the claimed ones at the front.
    fn started(&mut self, slot: &Pending) {
        while self
            .started
            .front()
            .is_some_and(|(w, _)| w.strong_count() == 0)
        {
            self.started.pop_front();
        }
        if self.started.len() > 1024 {
            self.started.retain(|(w, _)| w.strong_count() > 0);
        }
        self.started
            .push_back((Arc::downgrade(slot), Instant::now()));
    }
}

/// Once no read-ahead is in flight (a stream ended), give the allocator's free pages back:
/// a thread of its own trims within a second of the last such moment, at most once a second.
/// While streaming, the 4 MiB chunks and librados's 4 MiB reply buffers are served from
/// glibc's arenas (its mmap threshold rises past them after the first free), which keep what
/// was freed: reusing it is what keeps streaming fast (mmapping every such block,
/// `M_MMAP_THRESHOLD` 1 MiB, cost the daemon 40% more CPU per byte: page faults), and this
/// hands it back afterwards (docs/restore.md, "The daemon's memory").
fn trim_when_idle() {
    static WANTED: (Mutex<bool>, std::sync::Condvar) =
        (Mutex::new(false), std::sync::Condvar::new());
    static TRIMMER: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    TRIMMER.get_or_init(|| {
        let spawned = std::thread::Builder::new()
            .name("malloc-trim".into())
            .spawn(|| loop {
                {
                    let mut wanted = lock(&WANTED.0);
                    while !*wanted {
                        wanted = WANTED.1.wait(wanted).unwrap_or_else(|e| e.into_inner());
                    }
                    *wanted = false;
                }
                #[cfg(all(target_os = "linux", target_env = "gnu"))]
                // SAFETY: malloc_trim only returns free pages of the arenas to the kernel.
                unsafe {
                    libc::malloc_trim(0);
                }
                std::thread::sleep(Duration::from_secs(1));
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "no allocator trimming thread: freed read-ahead memory stays in the arenas");
        }
    });
    *lock(&WANTED.0) = true;
    WANTED.1.notify_one();
}

/// Count `cache` as a read-ahead cache in [`memory`].
pub fn register_cache(cache: &Arc<BlockCache>) {
    let mut v = lock(&CACHES);
    v.retain(|w| w.strong_count() > 0);
    v.push(Arc::downgrade(cache));
}

/// What the RBD read-ahead holds, for the memory report (docs/restore.md): the chunks read
/// ahead and kept (its LRU), the reads in flight or finished but not claimed, the buffers of
/// chunks served whole kept for reuse; all at one moment.
pub fn memory() -> Vec<crate::memreport::Held> {
    use crate::memreport::Held;
    let acc = lock(&ACCOUNT);
    let (mut n, mut b) = (0, 0);
    for c in lock(&CACHES).iter().filter_map(|w| w.upgrade()) {
        n += c.len();
        b += c.used();
    }
    let u = |a: u64| usize::try_from(a).unwrap_or(usize::MAX);
    vec![
        Held::new("rbd_ahead", n, b),
        Held::new("rbd_in_flight", u(acc.reads), u(acc.unclaimed)),
        Held::new("rbd_spare", acc.spares.len(), u(acc.spare)),
    ]
}

/// Partially served chunks remembered at most; beyond that the count starts over.
const MAX_SERVED_ENTRIES: usize = 4096;
/// End offsets of recent reads remembered to recognise a sequential reader.
const RECENT_READS: usize = 16;

/// Most extents one `map` call returns; callers loop.
const MAX_EXTENTS: usize = 4096;

/// Data extents `(offset, length)` of a whole snapshot, sorted and merged.
type Allocation = Arc<Vec<(u64, u64)>>;

pub struct RbdImage {
    /// Declared before `image`: reads in flight are waited for before the image closes.
    ahead: ReadAhead,
    image: ceph::Image,
    size: u64,
    obj_size: u64,
    features: u64,
    /// Opened with `FOPEN_DIRECT_IO` (see [`BlockImage::direct_io`]).
    direct_io: bool,
    /// Data extents of the whole snapshot, sorted and merged; None until first asked.
    allocation: Mutex<Option<Allocation>>,
    /// The image header and the snapshot's id, to check that the snapshot still exists
    /// after each read (None: opened at the head).
    snap: Option<(CString, u64)>,
    /// The snapshot was found deleted: every read fails.
    gone: AtomicBool,
}

/// Read-ahead state of one opened snapshot.
struct ReadAhead {
    chunk: u64,
    /// Chunks kept in flight ahead of a sequential reader; 0 turns read-ahead off.
    depth: u64,
    cache: Arc<BlockCache>,
    /// Cache identity of this opened snapshot.
    id: u64,
    state: Mutex<AheadState>,
}

/// A chunk being read: whoever needs it first waits for it and parks it in the cache.
type Pending = Arc<Mutex<Option<AioRead>>>;

#[derive(Default)]
struct AheadState {
    /// Chunk index → read in flight.
    pending: HashMap<u64, Pending>,
    /// Chunk index → bytes of it handed to readers; a chunk served whole is dropped.
    served: HashMap<u64, u64>,
    recent: VecDeque<u64>,
    /// Chunks in flight whose read had finished before a check that the snapshot still
    /// exists was started (and passed): they need no check of their own.
    covered: HashSet<u64>,
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        let st = lock(&self.state);
        let mut acc = lock(&ACCOUNT);
        for p in st.pending.values() {
            if let Some(read) = lock(p).as_ref() {
                acc.claim(read.len());
            }
        }
    }
}

impl RbdImage {
    /// `read_ahead`: bytes to keep in flight ahead of a sequential reader (0: none);
    /// `direct_io`: FUSE bypasses the page cache for this disk.
    pub fn new(
        image: ceph::Image,
        cache: Arc<BlockCache>,
        read_ahead: u64,
        direct_io: bool,
    ) -> Result<Self> {
        let st = image.stat()?;
        let features = image.features()?;
        let chunk = st.obj_size.clamp(MIN_CHUNK, MAX_CHUNK);
        let snap = match image.spec().2 {
            Some(name) => match (image.header_oid(), image.snap_id(name)) {
                (Ok(header), Ok(id)) => Some((header, id)),
                // Format-1 images (no image id, no `snapshot_get`; Ceph stopped making them
                // in Nautilus) are read without the check.
                (Err(e), _) | (_, Err(e)) => {
                    tracing::warn!(image = %image.label, error = %e, "snapshot deletion while open cannot be detected on this image");
                    None
                }
            },
            None => None,
        };
        Ok(RbdImage {
            ahead: ReadAhead {
                chunk,
                depth: read_ahead.div_ceil(chunk),
                cache,
                id: BlockCache::new_image_id(),
                state: Mutex::new(AheadState::default()),
            },
            image,
            size: st.size,
            obj_size: st.obj_size,
            features,
            direct_io,
            allocation: Mutex::new(None),
            snap,
            gone: AtomicBool::new(false),
        })
    }

    /// EIO once the snapshot was found deleted.
    fn check_gone(&self) -> Result<()> {
        if self.gone.load(Ordering::Relaxed) {
            return Err(self.gone_error("was"));
        }
        Ok(())
    }

    fn gone_error(&self, how: &str) -> Error {
        Error::Backend(format!(
            "snapshot {} {how} deleted while open: its bytes are no longer readable",
            self.image.label
        ))
    }

    /// After bytes came from the cluster: Ok only if the snapshot is still a user snapshot
    /// now (so it was when the OSD answered).
    fn verify(&self) -> Result<()> {
        let Some((header, id)) = &self.snap else {
            return Ok(());
        };
        match self.image.snap_state(header, *id)? {
            ceph::SnapState::User => Ok(()),
            state => {
                if !self.gone.swap(true, Ordering::Relaxed) {
                    tracing::info!(image = %self.image.label, ?state, "open snapshot deleted: its reads fail with EIO from now on");
                }
                Err(self.gone_error("is being or was"))
            }
        }
    }

    /// [`Self::verify`], which also covers every read-ahead chunk already finished now: a
    /// reader slower than the cluster pays one check per window, not one per chunk.
    fn verify_with_finished(&self) -> Result<()> {
        let finished: Vec<(u64, Pending)> = {
            let st = lock(&self.ahead.state);
            st.pending
                .iter()
                // try_lock: a slot held by a reader waiting on it is not finished anyway, and
                // slots are locked before the state elsewhere.
                .filter(|(_, p)| {
                    p.try_lock()
                        .is_ok_and(|r| r.as_ref().is_some_and(|r| r.is_complete()))
                })
                .map(|(c, p)| (*c, p.clone()))
                .collect()
        };
        self.verify()?;
        let mut st = lock(&self.ahead.state);
        for (c, p) in finished {
            // Only while that same read is still in flight (a chunk read again later is new).
            if st.pending.get(&c).is_some_and(|q| Arc::ptr_eq(q, &p)) {
                st.covered.insert(c);
            }
        }
        Ok(())
    }

    /// A synchronous read from the cluster, verified.
    fn read_verified(&self, buf: &mut [u8], offset: u64, sequential: bool) -> Result<()> {
        self.image.read(buf, offset, sequential)?;
        self.verify()
    }

    fn key(&self, chunk: u64) -> CacheKey {
        CacheKey {
            image: self.ahead.id,
            kind: CacheKind::ReadAhead,
            offset: chunk,
        }
    }

    /// Whether `[offset, end)` continues a sequential reader (and remember where it ends).
    fn is_sequential(&self, offset: u64, end: u64) -> bool {
        let c = offset / self.ahead.chunk;
        let mut st = lock(&self.ahead.state);
        let seq = st.recent.contains(&offset)
            || st.pending.contains_key(&c)
            || self.ahead.cache.get(&self.key(c)).is_some();
        if st.recent.len() >= RECENT_READS {
            st.recent.pop_front();
        }
        if st.recent.back() != Some(&end) {
            st.recent.push_back(end);
        }
        seq
    }

    /// Start reads of chunks `from..=to` that are neither cached nor already in flight.
    fn start_chunks(&self, from: u64, to: u64) {
        let chunk = self.ahead.chunk;
        let mut st = lock(&self.ahead.state);
        for c in from..=to {
            let start = c * chunk;
            if start >= self.size {
                break;
            }
            if st.pending.contains_key(&c) || self.ahead.cache.get(&self.key(c)).is_some() {
                continue;
            }
            let len = chunk.min(self.size - start) as usize;
            // Room is made by dropping the least recently used chunks (those a reader that
            // stopped left first) down to a quarter of the budget (the chunks being served),
            // then the finished reads nobody claimed for a while; past that no read-ahead
            // starts. The bytes are counted before the read starts.
            let buf = {
                let mut acc = lock(&ACCOUNT);
                let buf = acc.take_spare().unwrap_or_default();
                let budget = self.ahead.cache.budget as u64;
                let want = buf.capacity().max(len) as u64;
                let room = budget.saturating_sub(acc.unclaimed + acc.spare + want);
                if (self.ahead.cache.used() as u64) > room {
                    self.ahead.cache.shrink_to(room.max(budget / 4) as usize);
                }
                acc.reap(want, budget, self.ahead.cache.used() as u64);
                if acc.unclaimed + acc.spare + want + self.ahead.cache.used() as u64 > budget {
                    if buf.capacity() > 0 {
                        acc.keep_spare(Arc::new(buf), budget);
                    }
                    break;
                }
                acc.unclaimed += want;
                acc.reads += 1;
                buf
            };
            let want = buf.capacity().max(len);
            match self.image.aio_read(start, len, buf) {
                Ok(r) => {
                    let slot = Arc::new(Mutex::new(Some(r)));
                    let mut acc = lock(&ACCOUNT);
                    // Counted from now on as the read's length (what is claimed later).
                    acc.unclaimed = acc.unclaimed.saturating_sub((want - len) as u64);
                    acc.started(&slot);
                    drop(acc);
                    st.covered.remove(&c);
                    st.pending.insert(c, slot);
                }
                // Read-ahead is best effort: the reader's own read reports the error.
                Err(e) => {
                    lock(&ACCOUNT).claim(want);
                    tracing::debug!(image = %self.image.label, chunk = c, error = %e, "read-ahead not started");
                    break;
                }
            }
        }
    }

    /// Chunk `c` from the cache or from its read in flight; None when neither has it.
    fn chunk(&self, c: u64) -> Result<Option<Arc<Vec<u8>>>> {
        if let Some(v) = self.ahead.cache.get(&self.key(c)) {
            return Ok(Some(v));
        }
        let Some(pending) = lock(&self.ahead.state).pending.get(&c).cloned() else {
            return Ok(None);
        };
        let mut slot = lock(&pending);
        if let Some(read) = slot.take() {
            // Still counted in the budget while waited for and checked: counted in the cache
            // instead once there, or no more once dropped.
            let len = read.len();
            let t = Instant::now();
            let res = read.wait();
            tracing::trace!(
                chunk = c,
                us = t.elapsed().as_micros() as u64,
                "read-ahead wait"
            );
            let covered = {
                let mut st = lock(&self.ahead.state);
                st.pending.remove(&c);
                st.covered.remove(&c)
            };
            // Cached only once known to be the snapshot's bytes.
            let checked = res.and_then(|d| {
                if !covered {
                    self.verify_with_finished()?;
                }
                Ok(Arc::new(d))
            });
            let mut acc = lock(&ACCOUNT);
            if let Ok(data) = &checked {
                self.ahead.cache.insert(self.key(c), data.clone());
            }
            acc.claim(len);
            return checked.map(Some);
        }
        drop(slot);
        if let Some(v) = self.ahead.cache.get(&self.key(c)) {
            return Ok(Some(v));
        }
        // Dropped as stale (or its read failed for another reader): read ahead again later.
        let mut st = lock(&self.ahead.state);
        if st.pending.get(&c).is_some_and(|q| Arc::ptr_eq(q, &pending)) {
            st.pending.remove(&c);
        }
        Ok(None)
    }

    /// A sequential read: served from read-ahead chunks, keeping the next ones in flight, up
    /// to the chunk holding `limit - 1` (the reader reads nothing past `limit`).
    fn read_ahead(&self, buf: &mut [u8], offset: u64, limit: u64) -> Result<()> {
        let chunk = self.ahead.chunk;
        let end = offset + buf.len() as u64;
        let (first, last) = (offset / chunk, (end - 1) / chunk);
        let stop = (limit.max(end) - 1) / chunk;
        self.start_chunks(first, (last + self.ahead.depth).min(stop));
        for c in first..=last {
            let (cs, ce) = (c * chunk, ((c + 1) * chunk).min(self.size));
            let (s, e) = (offset.max(cs), end.min(ce));
            let dst = &mut buf[(s - offset) as usize..(e - offset) as usize];
            match self.chunk(c)? {
                Some(data) => {
                    let from = (s - cs) as usize;
                    let src = data.get(from..from + dst.len()).ok_or_else(|| {
                        crate::error::Error::Backend(format!(
                            "read-ahead chunk {c} of {} is short",
                            self.image.label
                        ))
                    })?;
                    dst.copy_from_slice(src);
                }
                None => {
                    tracing::trace!(offset = s, len = dst.len(), "read-ahead miss");
                    self.read_verified(dst, s, true)?
                }
            }
            self.served(c, e - s, ce - cs);
        }
        Ok(())
    }

    /// `n` more bytes of chunk `c` (of `len`) went to a reader. Readers (several FUSE threads,
    /// out of order) that have had all of it make room: it leaves the cache for the spares.
    fn served(&self, c: u64, n: u64, len: u64) {
        let mut st = lock(&self.ahead.state);
        if st.served.len() >= MAX_SERVED_ENTRIES {
            // Chunks read only in part (random readers) would pile up here; the LRU ages them out.
            st.served.clear();
        }
        let total = st.served.entry(c).or_insert(0);
        *total += n;
        if *total < len {
            return;
        }
        st.served.remove(&c);
        drop(st);
        let mut acc = lock(&ACCOUNT);
        if let Some(buf) = self.ahead.cache.remove(&self.key(c)) {
            acc.keep_spare(buf, self.ahead.cache.budget as u64);
        }
        let idle = acc.reads == 0;
        drop(acc);
        if idle {
            trim_when_idle();
        }
    }

    /// With fast-diff the object map answers at object granularity without touching the
    /// objects; without it librbd lists every object, so ask for exact extents instead.
    fn whole_object(&self) -> bool {
        self.features & ceph::FEATURE_FAST_DIFF != 0
    }

    /// Where this snapshot differs from `older` in `[0, limit)`, from librbd's own diff
    /// (`rbd_diff_iterate2` from the older snapshot, exact extents): true when both are
    /// snapshots of one image, false (nothing pushed) otherwise.
    pub fn changes_since(
        &self,
        older: &RbdImage,
        limit: u64,
        col: &mut super::changes::Collector,
    ) -> Result<bool> {
        let (pool, name, snap) = self.image.spec();
        let (opool, oname, osnap) = older.image.spec();
        let (Some(_), Some(from)) = (snap, osnap) else {
            return Ok(false);
        };
        if pool != opool || name != oname || self.image.id()? != older.image.id()? {
            return Ok(false);
        }
        let started = std::time::Instant::now();
        let mut n = 0u64;
        self.image
            .diff_iterate(Some(from), 0, limit, false, &mut |o, l, _exists| {
                n += 1;
                col.push(o, l);
            })?;
        tracing::debug!(image = %self.image.label, from, extents = n, ms = started.elapsed().as_millis() as u64, "rbd changed extents");
        Ok(true)
    }

    fn allocation(&self) -> Result<Allocation> {
        let mut slot = crate::namespace::registry::lock(&self.allocation);
        if let Some(a) = slot.as_ref() {
            return Ok(a.clone());
        }
        let raw = self
            .image
            .allocated_extents(0, self.size, self.whole_object())?;
        let a = Arc::new(merge(raw, self.size));
        *slot = Some(a.clone());
        Ok(a)
    }
}

impl BlockImage for RbdImage {
    fn diff_source(&self) -> super::changes::DiffSource<'_> {
        super::changes::DiffSource::Rbd(self)
    }

    fn size(&self) -> u64 {
        self.size
    }

    /// A sequential request inside one read-ahead chunk is answered with the chunk itself;
    /// read-ahead goes no further than the chunk holding `limit - 1`.
    fn read_shared_within(
        &self,
        offset: u64,
        len: usize,
        limit: u64,
    ) -> Result<Option<SharedBytes>> {
        let chunk = self.ahead.chunk;
        let end = offset.saturating_add(len as u64);
        let c = offset / chunk;
        let (cs, ce) = (c * chunk, ((c + 1) * chunk).min(self.size));
        self.check_gone()?;
        if self.ahead.depth == 0 || len == 0 || end > ce || !self.is_sequential(offset, end) {
            return Ok(None);
        }
        let stop = (limit.min(self.size).max(end) - 1) / chunk;
        self.start_chunks(c, (c + self.ahead.depth).min(stop));
        let Some(data) = self.chunk(c)? else {
            return Ok(None);
        };
        let start = (offset - cs) as usize;
        if data.len() < start + len {
            return Ok(None);
        }
        self.served(c, len as u64, ce - cs);
        Ok(Some(SharedBytes {
            buf: data,
            start,
            len,
        }))
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.read_within(buf, offset, self.size)
    }

    fn read_within(&self, buf: &mut [u8], offset: u64, limit: u64) -> Result<()> {
        // librbd refuses reads past the end (-EINVAL): clamp, and the rest reads as zeros.
        let avail = self.size.saturating_sub(offset);
        let n = usize::try_from(avail).unwrap_or(usize::MAX).min(buf.len());
        let (head, tail) = buf.split_at_mut(n);
        tail.fill(0);
        self.check_gone()?;
        if head.is_empty() {
            return Ok(());
        }
        let end = offset + n as u64;
        if self.ahead.depth > 0 && self.is_sequential(offset, end) {
            self.read_ahead(head, offset, limit.min(self.size))
        } else {
            self.read_verified(head, offset, false)
        }
    }

    fn map(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        let end = offset.saturating_add(length).min(self.size);
        if offset >= end {
            return Ok(Vec::new());
        }
        Ok(cover(&self.allocation()?, offset, end))
    }

    /// The page cache costs a second copy and its bookkeeping on every byte (a quarter of
    /// the client's CPU for `cat`), and our own read-ahead already keeps the cluster busy.
    fn direct_io(&self) -> bool {
        self.direct_io
    }

    fn describe(&self) -> String {
        format!(
            "rbd {} ({} KiB objects, {})",
            self.image.label,
            self.obj_size >> 10,
            ceph::feature_names(self.features).join(",")
        )
    }
}

/// librbd's extents (any order, maybe overlapping or past the end) as sorted, disjoint,
/// non-touching `(offset, length)` pairs within `size`.
fn merge(mut raw: Vec<(u64, u64)>, size: u64) -> Vec<(u64, u64)> {
    raw.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(raw.len());
    for (off, len) in raw {
        let end = off.saturating_add(len).min(size);
        if end <= off {
            continue;
        }
        match merged.last_mut() {
            Some((s, l)) if *s + *l >= off => *l = (*s + *l).max(end) - *s,
            _ => merged.push((off, end - off)),
        }
    }
    merged
}

/// The cover of `[offset, end)` by Data/Zero extents from a merged allocation list, at most
/// `MAX_EXTENTS` long (callers loop).
fn cover(alloc: &[(u64, u64)], offset: u64, end: u64) -> Vec<Extent> {
    let mut out = Vec::new();
    // First data extent that ends after `offset`.
    let first = alloc.partition_point(|(s, l)| s + l <= offset);
    let mut pos = offset;
    for &(s, l) in &alloc[first..] {
        if pos >= end || out.len() >= MAX_EXTENTS {
            break;
        }
        let (s, e) = (s.max(pos), (s + l).min(end));
        push_extent(&mut out, pos, s.min(end), ExtentKind::Zero);
        push_extent(&mut out, s, e, ExtentKind::Data);
        pos = e.max(pos);
    }
    if pos < end && out.len() < MAX_EXTENTS {
        push_extent(&mut out, pos, end, ExtentKind::Zero);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(offset: u64, length: u64, data: bool) -> Extent {
        Extent {
            offset,
            length,
            kind: if data {
                ExtentKind::Data
            } else {
                ExtentKind::Zero
            },
        }
    }

    #[test]
    fn spares_stay_within_a_quarter_and_only_free_ones_are_reused() {
        let mut acc = Account {
            unclaimed: 0,
            reads: 0,
            spare: 0,
            spares: Vec::new(),
            started: VecDeque::new(),
        };
        let budget = 16 << 20;
        let held = Arc::new(Vec::<u8>::with_capacity(2 << 20));
        acc.keep_spare(held.clone(), budget);
        acc.keep_spare(Arc::new(Vec::with_capacity(2 << 20)), budget);
        // A third would pass a quarter of the budget (4 MiB): freed instead.
        acc.keep_spare(Arc::new(Vec::with_capacity(1 << 20)), budget);
        assert_eq!((acc.spares.len(), acc.spare), (2, 4 << 20));
        // The one a reply still holds is not handed out.
        let b = acc.take_spare().expect("a free spare");
        assert!(b.capacity() >= 2 << 20);
        assert!(acc.take_spare().is_none());
        assert_eq!(acc.spare, 2 << 20);
        drop(held);
        assert!(acc.take_spare().is_some());
        assert_eq!((acc.spares.len(), acc.spare), (0, 0));
        acc.claim(5);
        assert_eq!((acc.unclaimed, acc.reads), (0, 0));
    }

    #[test]
    fn merge_sorts_joins_and_clips() {
        let raw = vec![
            (100, 50),
            (0, 10),
            (10, 5),
            (120, 100),
            (1000, 10),
            (990, 5),
        ];
        assert_eq!(merge(raw, 995), vec![(0, 15), (100, 120), (990, 5)]);
        assert_eq!(merge(vec![(5, 0), (2000, 1)], 1000), vec![]);
    }

    #[test]
    fn cover_fills_gaps_and_clips_to_the_range() {
        let alloc = [(10, 10), (40, 20)];
        assert_eq!(
            cover(&alloc, 0, 100),
            vec![
                ext(0, 10, false),
                ext(10, 10, true),
                ext(20, 20, false),
                ext(40, 20, true),
                ext(60, 40, false)
            ]
        );
        // Starting inside a data extent and ending inside another.
        assert_eq!(
            cover(&alloc, 15, 45),
            vec![ext(15, 5, true), ext(20, 20, false), ext(40, 5, true)]
        );
        assert_eq!(cover(&alloc, 60, 100), vec![ext(60, 40, false)]);
        assert_eq!(cover(&[], 0, 7), vec![ext(0, 7, false)]);
        assert!(cover(&alloc, 50, 50).is_empty());
    }

    #[test]
    fn cover_stops_at_the_extent_limit_without_gaps() {
        let alloc: Vec<(u64, u64)> = (0..10_000u64).map(|i| (i * 10, 5)).collect();
        let out = cover(&alloc, 0, 100_000);
        assert!(out.len() <= MAX_EXTENTS + 1);
        let mut pos = 0;
        for e in &out {
            assert_eq!(e.offset, pos);
            pos += e.length;
        }
    }
}

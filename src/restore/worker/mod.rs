//! Guest filesystem readers confined in an unprivileged worker process (issue 20, item 4).
//!
//! Each opened guest volume gets a worker: this binary re-executed as
//! `snapfs __restore-worker UID MEM_MB WINDOW AHEAD_WINDOW` with an empty environment, stdio on
//! /dev/null, signals unblocked, `no_new_privs`, `RLIMIT_CPU`, one end of a `socketpair` as fd 3
//! and one of a second as fd 5 (with their shared windows as fds 4 and 6). Before reading
//! its first request the worker closes every other descriptor, caps its address space
//! (`RLIMIT_AS`: what it started with plus `MEM_MB`), drops to `UID` (no groups), asks for
//! SIGKILL when the daemon dies and installs a seccomp filter ([`child::filter`]) that kills it
//! on any system call reading does not need (no `open`, no sockets, no `execve`, no `clone`).
//!
//! The daemon keeps FUSE, libvirt, Ceph and the images: the worker holds no descriptor to any
//! of them. It asks for disk bytes over the socket (`BLOCK_READ offset len`, answered from the
//! snapshot's [`BlockImage`] by the daemon thread that made the request), and answers the
//! [`GuestFs`] calls the daemon forwards through [`WorkerFs`]. It has two sockets, each served
//! by a thread of its own sharing the reader: the walker's requests on one, the directory
//! read-ahead's on the other, so neither queues behind the other. A worker that dies, breaks a
//! limit or the protocol costs an EIO for the request it was serving; the next request on the
//! volume starts a new one (the volume is opened again: inode numbers are the filesystem's own,
//! so they stay valid).

mod cache;
mod child;
mod window;
pub mod wire;

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::image::BlockImage;
use crate::restore::{
    self, DirList, DirPage, FileKind, FileMap, FileStat, GuestFs, MapRun, Partition, Place, Volume,
};

use wire::{R, W};

/// The hidden subcommand (argv[1]) that runs a worker.
pub const SUBCOMMAND: &str = "__restore-worker";

/// How guest filesystems are read; set once by the daemon ([`configure`]).
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// Readers in workers (`--restore-worker=on`), else in the daemon.
    pub enabled: bool,
    /// The worker's uid (and gid).
    pub uid: u32,
    /// Address space a worker may add to what it starts with, in MiB.
    pub mem_mb: u64,
    /// CPU seconds a worker may use in its life (`RLIMIT_CPU`).
    pub cpu_secs: u64,
    /// Test hooks: lookups of [`HOOK_OPEN`] / [`HOOK_HANG`] in a guest directory.
    pub test_hooks: bool,
    /// Bytes the daemon keeps of all workers' answers together ([`cache`]).
    pub cache_bytes: usize,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            enabled: false,
            uid: 65534,
            mem_mb: 512,
            cpu_secs: 3600,
            test_hooks: false,
            cache_bytes: 16 << 20,
        }
    }
}

/// With test hooks on, a lookup of this name makes the worker call `open(2)`.
pub const HOOK_OPEN: &[u8] = b".snapfs-worker-try-open";
/// With test hooks on, a lookup of this name makes the worker sleep until it is killed.
pub const HOOK_HANG: &[u8] = b".snapfs-worker-hang";

static CONFIG: OnceLock<WorkerConfig> = OnceLock::new();

/// Set how guest filesystems are read (once, before the first volume is opened).
pub fn configure(cfg: WorkerConfig) {
    let _ = CONFIG.set(cfg);
}

fn config() -> WorkerConfig {
    CONFIG.get().cloned().unwrap_or_default()
}

/// If this process was started as a worker (`argv[1]` is [`SUBCOMMAND`]), run it; never
/// returns then. Call first thing in `main`.
pub fn run_if_worker() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(SUBCOMMAND) {
        child::main(&args[2..]);
    }
}

/// How long the daemon waits for one message of a worker before it ends it as hung.
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(120);

/// [`restore::open_volume`], with the filesystem read in a worker when workers are on. An LVM2
/// physical volume is parsed in the daemon (its logical volumes' filesystems then go through
/// this again, each in its own worker).
pub fn open_volume(disk: Arc<dyn BlockImage>, part: &Partition) -> Result<Volume> {
    let cfg = config();
    if !cfg.enabled {
        return restore::open_volume(disk, part);
    }
    let fs = Arc::new_cyclic(|me| WorkerFs {
        disk,
        part: part.clone(),
        cfg,
        conn: Mutex::new(None),
        ahead: Mutex::new(None),
        root: AtomicU64::new(0),
        describe: Mutex::new(String::new()),
        restarts: AtomicU64::new(0),
        id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        walks: Mutex::new(InoWalks::default()),
        me: me.clone(),
        ino_ahead: Default::default(),
    });
    let mut guard = lock(&fs.conn);
    match fs.start()? {
        (conn, Opened::Fs) => {
            *guard = Some(conn);
            drop(guard);
            Ok(Volume::Fs(fs))
        }
        (mut conn, Opened::Readme(readme)) => {
            conn.end();
            Ok(Volume::Unsupported { readme })
        }
        (mut conn, Opened::Lvm) => {
            conn.end();
            drop(guard);
            restore::open_volume(fs.disk.clone(), &fs.part)
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

enum Opened {
    Fs,
    Readme(String),
    Lvm,
}

/// A live worker and its main socket (the read-ahead one is [`WorkerFs::ahead`]).
struct Conn {
    child: Child,
    main: Chan,
    started: Instant,
}

/// One of a worker's two sockets.
struct Chan {
    sock: UnixStream,
    /// Where its block reads are answered ([`window`]); without one, in the reply frames.
    window: Option<window::Window>,
    /// The worker it belongs to (numbers are never reused in a volume).
    gen: u64,
}

/// Numbers of workers ([`Chan::gen`]).
static NEXT_GEN: AtomicU64 = AtomicU64::new(1);

impl Conn {
    /// End the worker (if still running) and reap it; its exit status for the log.
    fn end(&mut self) -> String {
        let _ = self.child.kill();
        match self.child.wait() {
            Ok(s) => match (s.code(), s.signal()) {
                (_, Some(sig)) => format!("killed by signal {sig} ({})", signal_name(sig)),
                (Some(c), _) => format!("exited with status {c}"),
                _ => "ended".into(),
            },
            Err(e) => format!("not reaped: {e}"),
        }
    }

    fn exchange(&mut self, req: &[u8], disk: &dyn BlockImage) -> std::io::Result<Vec<u8>> {
        self.main.exchange(req, disk)
    }
}

impl Chan {
    /// Send `req` and wait for its reply, serving the worker's block reads meanwhile. An `Err`
    /// means the worker is broken (dead, hung, or off-protocol); a reply may itself be an error.
    fn exchange(&mut self, req: &[u8], disk: &dyn BlockImage) -> std::io::Result<Vec<u8>> {
        (&self.sock).write_all(req)?;
        let mut buf = Vec::new();
        let mut data = Vec::new();
        loop {
            if !wire::read_frame(&mut &self.sock, &mut buf)? {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            if buf[0] != wire::BLOCK_READ {
                return Ok(buf);
            }
            let mut r = R::new(&buf[1..]);
            let (off, len) = match (r.u64(), r.u32()) {
                (Ok(o), Ok(l)) => (o, l),
                _ => return Err(bad("block read without offset and length")),
            };
            if len > wire::MAX_BLOCK_READ
                || off
                    .checked_add(u64::from(len))
                    .is_none_or(|e| e > disk.size())
            {
                return Err(bad("block read outside the disk"));
            }
            // Into the window when it fits: only [0, len) of it, len checked here.
            if let Some(dst) = self.window.as_mut().and_then(|w| w.first_mut(len as usize)) {
                match disk.read_at(dst, off) {
                    Ok(()) => (&self.sock).write_all(&W::new(wire::IN_WINDOW).u32(len).done())?,
                    Err(e) => (&self.sock).write_all(&W::new(wire::ERR).error(&e).done())?,
                }
                continue;
            }
            data.clear();
            data.resize(len as usize, 0);
            match disk.read_at(&mut data, off) {
                Ok(()) => wire::write_payload(&mut &self.sock, wire::OK, &data)?,
                Err(e) => (&self.sock).write_all(&W::new(wire::ERR).error(&e).done())?,
            }
        }
    }
}

fn bad(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string())
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGKILL => "SIGKILL",
        libc::SIGSYS => "SIGSYS: a system call outside the filter",
        libc::SIGABRT => "SIGABRT: out of memory (RLIMIT_AS) or a failed check",
        libc::SIGXCPU => "SIGXCPU: RLIMIT_CPU",
        libc::SIGSEGV => "SIGSEGV",
        _ => "signal",
    }
}

/// A guest filesystem read by a worker; `GuestFs` calls are forwarded one at a time on its main
/// socket, `prefetch_dir` one at a time on its read-ahead socket.
pub struct WorkerFs {
    disk: Arc<dyn BlockImage>,
    part: Partition,
    cfg: WorkerConfig,
    conn: Mutex<Option<Conn>>,
    /// The worker's read-ahead socket (`prefetch_dir`), served by its second thread. Locked
    /// after `conn` when both are (a worker's start), never the other way round.
    ahead: Mutex<Option<Chan>>,
    root: AtomicU64,
    describe: Mutex<String>,
    restarts: AtomicU64,
    /// This volume's number in the daemon's one cache of workers' answers ([`cache`]), where
    /// it keeps (a snapshot does not change):
    /// - attributes (`stat` of a file just looked up, or listed with attributes, needs no
    ///   round trip), each with whether the file may be opened without asking (`CHECK_OPEN`);
    /// - where files' bytes lie on the disk (a window of each recently read file), so that
    ///   their reads are served here from the disk, not through the worker's socket;
    /// - recent listings with each name's position: a lookup of one name asks the worker for
    ///   the names after it too (`find`, `ls -l` and copies look names up in listing order),
    ///   and the directory read-ahead's listings (`prefetch_dir`) serve the walker's
    ///   `readdir` without a round trip;
    /// - lookups answered ahead of the kernel's request: (dir, name) → attributes, openable;
    /// - small extended attribute lists that came with lookups read ahead.
    id: u64,
    /// Directories listed lately and the lookups in them since: a walk in inode order is
    /// answered by batches ([`wire::LOOKUPS_BY_INO`]).
    walks: Mutex<InoWalks>,
    /// Itself, for the thread that reads a batch ahead ([`Self::lookups_by_ino_behind`]).
    me: std::sync::Weak<WorkerFs>,
    /// A batch is being read ahead.
    ino_ahead: std::sync::atomic::AtomicBool,
}

/// A walk in inode order (GNU `find`, `du`: gnulib's `fts` reads a directory of more than
/// 10,000 entries, at most 100,000 at a time, and visits them sorted by inode number, so its
/// lookups come in no listing's order and the page window cannot read them ahead): what was
/// listed of one directory since the last lookup in it, and the lookups since.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct InoWalk {
    /// The cookie the listing (READDIRs with no lookup in between) started from.
    from: u64,
    /// The cookie after the last entry listed; `u64::MAX` when the listing reached the end.
    to: u64,
    /// Entries listed from `from` on.
    listed: u64,
    /// A lookup came after the listing: the next READDIR starts a new one.
    looked: bool,
    /// The inode number the last lookup in the directory found.
    last_ino: u64,
    /// Lookups in a row, up to the last one, that found a larger inode number than the one
    /// before.
    rising: u32,
    /// When it was last used (for [`InoWalks`]' eviction).
    tick: u64,
    /// Batches asked for since the listing.
    batches: u32,
    /// Lookups answered without a round trip since the last batch.
    hits: u32,
    /// The largest inode number the last batch brought; 0 before one (or when it was the
    /// listing's last): no batch is read ahead then.
    batch_end: u64,
}

/// What a lookup in a walk in inode order asks for next ([`InoWalks::looked`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum InoNext {
    /// Nothing.
    Nothing,
    /// A batch now, of the names after `after` listed between the cookies `from` and `to`.
    Now { after: u64, from: u64, to: u64 },
    /// The next batch in the background (the walk is halfway through the last one).
    Ahead { after: u64, from: u64, to: u64 },
}

/// Walks kept, at most [`INO_WALKS`]; the least recently used dropped.
#[derive(Default)]
pub(super) struct InoWalks {
    dirs: std::collections::HashMap<u64, InoWalk>,
    tick: u64,
}

/// Directories whose walk is followed at once, at most.
const INO_WALKS: usize = 64;
/// A walk is taken for one in inode order after this many rising lookups in a row ...
const INO_RISING: u32 = 3;
/// ... in a directory whose listing (since its last lookup) held at least this many entries:
/// gnulib's `fts` sorts by inode number above 10,000.
const INO_LISTED: u64 = 10_000;
/// A batch counts as used when at least this many lookups came from the cache after it.
const INO_USED: u32 = 16;
/// Names one `LOOKUPS_BY_INO` asks for.
const INO_BATCH: usize = wire::MAX_INO_BATCH;

impl InoWalks {
    fn entry(&mut self, dir: u64) -> &mut InoWalk {
        self.tick += 1;
        if !self.dirs.contains_key(&dir) && self.dirs.len() >= INO_WALKS {
            if let Some(old) = self
                .dirs
                .iter()
                .min_by_key(|(_, w)| w.tick)
                .map(|(d, _)| *d)
            {
                self.dirs.remove(&old);
            }
        }
        let tick = self.tick;
        let w = self.dirs.entry(dir).or_insert(InoWalk {
            looked: true,
            ..InoWalk::default()
        });
        w.tick = tick;
        w
    }

    /// A page of `dir` listed from `cookie`.
    pub(super) fn listed(&mut self, dir: u64, cookie: u64, page: &DirPage) {
        let w = self.entry(dir);
        if w.looked {
            *w = InoWalk {
                from: cookie,
                tick: w.tick,
                ..InoWalk::default()
            };
        }
        w.listed += page.entries.len() as u64;
        if page.end {
            w.to = u64::MAX;
        } else if let Some(e) = page.entries.last() {
            w.to = e.3;
        }
    }

    /// A lookup in `dir` found `ino` (asked of the worker alone when `alone`): the batch to
    /// ask for, when the walk is one in inode order.
    pub(super) fn looked(&mut self, dir: u64, ino: u64, alone: bool) -> InoNext {
        self.tick += 1;
        let tick = self.tick;
        let Some(w) = self.dirs.get_mut(&dir) else {
            return InoNext::Nothing;
        };
        w.tick = tick;
        w.looked = true;
        w.rising = if ino > w.last_ino {
            w.rising.saturating_add(1)
        } else {
            0
        };
        w.last_ino = ino;
        if !alone {
            w.hits = w.hits.saturating_add(1);
            if w.batch_end > 0 && w.hits as usize == INO_BATCH / 2 {
                return InoNext::Ahead {
                    after: std::mem::take(&mut w.batch_end),
                    from: w.from,
                    to: w.to,
                };
            }
            return InoNext::Nothing;
        }
        // A batch whose names were not asked for (lookups that only looked rising) is not
        // asked for again until the directory is listed again.
        if w.rising < INO_RISING || w.listed < INO_LISTED || (w.batches > 0 && w.hits < INO_USED) {
            return InoNext::Nothing;
        }
        w.batches += 1;
        w.hits = 0;
        w.batch_end = 0;
        InoNext::Now {
            after: ino,
            from: w.from,
            to: w.to,
        }
    }

    /// A batch of `dir` arrived: `end` the largest inode number in it, `full` when it held
    /// all the names it could (there may be more after it); one read ahead in the background
    /// starts the count of lookups answered from it.
    pub(super) fn batched(&mut self, dir: u64, end: u64, full: bool, behind: bool) {
        if let Some(w) = self.dirs.get_mut(&dir) {
            w.batch_end = if full { end } else { 0 };
            if behind {
                w.hits = 0;
            }
        }
    }
}

/// Numbers of volumes in the cache: never reused, so a closed volume's entries are never
/// another's.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A file's attributes and whether it may be opened without asking (`CHECK_OPEN`).
type Attrs = (FileStat, bool);

/// Extended attributes: (name as Linux shows it, value).
type XattrList = Vec<(Vec<u8>, Vec<u8>)>;

/// A listing and where each name is in it.
struct Listing {
    list: DirList,
    /// Built on the first lookup in the listing.
    pos: OnceLock<std::collections::HashMap<Vec<u8>, u32>>,
    /// The position after the last name looked up: a lookup there (or of the first name)
    /// reads ahead; one elsewhere (a single `stat`, `find` entering subdirectories only)
    /// goes alone.
    next: AtomicU64,
}

/// The last page(s) the worker sent of a directory whose cookies are not listing positions
/// (a paged, large directory), kept whole: the kernel's READDIRs (4 KiB each) that fall inside
/// need no round trip, and lookups of its names in page order (`ls -l`, copies) are read
/// ahead in batches as in a kept listing. One per directory, at most two worker pages
/// ([`wire::PAGED_PAGE_BUDGET`] of FUSE entries each: the page asked last and what was not
/// yet looked up of the one before), in the daemon's byte-budgeted cache.
pub(super) struct PageWindow {
    /// The cookie before the first entry.
    start: u64,
    /// (name, inode, kind, cookie after it); cookies all different and none `start`.
    entries: Vec<(Vec<u8>, u64, FileKind, u64)>,
    /// The directory ends after the last entry.
    end: bool,
    /// Built on the first lookup in the window.
    pos: OnceLock<std::collections::HashMap<Vec<u8>, u32>>,
    /// As [`Listing::next`].
    next: AtomicU64,
}

impl PageWindow {
    /// The index a page from `cookie` starts at, when the window holds it.
    fn from(&self, cookie: u64) -> Option<usize> {
        if cookie == self.start {
            return Some(0);
        }
        self.entries
            .iter()
            .position(|e| e.3 == cookie)
            .map(|i| i + 1)
    }

    /// The page from `cookie`, at most `budget` bytes of FUSE entries (one at least); `None`
    /// when the window does not hold its first entry (nor the directory's end there).
    fn page(&self, cookie: u64, budget: usize) -> Option<DirPage> {
        let from = self.from(cookie)?;
        if from >= self.entries.len() && !self.end {
            return None;
        }
        let mut used = 0;
        let entries: Vec<_> = self.entries[from..]
            .iter()
            .enumerate()
            .take_while(|(i, e)| {
                used += restore::dirent_cost(e.0.len());
                *i == 0 || used <= budget
            })
            .map(|(_, e)| e.clone())
            .collect();
        let end = self.end && from + entries.len() == self.entries.len();
        Some(DirPage { entries, end })
    }
}

/// The largest listing kept (a bigger directory is asked for each time, and its lookups go
/// one by one: its index would cost more than it saves).
const LISTING_MAX: usize = 16 << 10;
/// What a directory's first `READDIR_PAGE` asks for: all of a small directory (whose listing
/// is then kept, [`LISTING_MAX`] entries at most), the start of a large one.
const FIRST_PAGE_BUDGET: usize = 2 << 20;
/// How much of a file one `MAP` request asks about.
const MAP_WINDOW: u64 = 256 << 20;

/// What the worker said about where a file's bytes lie.
enum Mapped {
    /// Only its reader can give them (`READ`).
    No,
    /// Checked runs from `start` (see [`FileMap`]).
    Window { start: u64, map: FileMap },
}

impl Drop for WorkerFs {
    fn drop(&mut self) {
        if let Some(mut c) = lock(&self.conn).take() {
            c.end();
        }
        lock(&self.ahead).take();
        cache::global().forget_volume(self.id);
    }
}

/// The daemon cache's entries (`Entry`) and bytes charged, for tests and figures.
pub fn cache_usage() -> (usize, usize) {
    cache::global().usage()
}

impl WorkerFs {
    /// Start a worker and open the volume in it; its read-ahead socket goes to `self.ahead`
    /// once it opened a filesystem.
    fn start(&self) -> Result<(Conn, Opened)> {
        let pair = || {
            UnixStream::pair().map_err(|e| Error::Io {
                context: "restore worker: socketpair".into(),
                source: e,
            })
        };
        let window = || match window::Window::new(window::WINDOW_BYTES) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::debug!(error = %e, "restore worker: no shared window, block reads through the socket");
                None
            }
        };
        let ((ours, theirs), (ahead_ours, ahead_theirs)) = (pair()?, pair()?);
        let (mut win, mut ahead_win) = (window(), window());
        let raw = |w: &Option<window::Window>| w.as_ref().map_or(-1, |w| w.raw_fd());
        // Handed over as fds 3, 4, 5, 6 (child::HANDED_FDS); -1: none.
        let fds = [
            theirs.as_raw_fd(),
            raw(&win),
            ahead_theirs.as_raw_fd(),
            raw(&ahead_win),
        ];
        let bytes = |w: &Option<window::Window>| w.as_ref().map_or(0, |w| w.bytes()).to_string();
        let cpu = self.cfg.cpu_secs.max(1);
        let mut cmd = Command::new("/proc/self/exe");
        cmd.arg(SUBCOMMAND)
            .arg(self.cfg.uid.to_string())
            .arg(self.cfg.mem_mb.to_string())
            .arg(bytes(&win))
            .arg(bytes(&ahead_win))
            .env_clear()
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: only async-signal-safe system calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // Each descriptor first to a free one above (close-on-exec), then into its
                // place: no dup2 overwrites a descriptor still to be moved.
                let mut high = [-1; 4];
                for (h, &fd) in high.iter_mut().zip(fds.iter()) {
                    if fd >= 0 {
                        *h = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 16);
                        if *h < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                }
                for (&h, &to) in high.iter().zip(child::HANDED_FDS.iter()) {
                    if h >= 0 && libc::dup2(h, to) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                // The daemon blocks its termination signals for its signal thread.
                let mut none: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut none);
                libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
                let cpu = libc::rlimit {
                    rlim_cur: cpu,
                    rlim_max: cpu + 5,
                };
                if libc::setrlimit(libc::RLIMIT_CPU, &cpu) != 0
                    || libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1 as libc::c_ulong, 0, 0, 0) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| Error::Io {
            context: "restore worker: start".into(),
            source: e,
        })?;
        drop((theirs, ahead_theirs));
        for w in [win.as_mut(), ahead_win.as_mut()].into_iter().flatten() {
            w.close_fd();
        }
        let _ = ours.set_read_timeout(Some(MESSAGE_TIMEOUT));
        let _ = ahead_ours.set_read_timeout(Some(MESSAGE_TIMEOUT));
        let gen = NEXT_GEN.fetch_add(1, Ordering::Relaxed);
        let mut conn = Conn {
            child,
            main: Chan {
                sock: ours,
                window: win,
                gen,
            },
            started: Instant::now(),
        };
        let ahead = Chan {
            sock: ahead_ours,
            window: ahead_win,
            gen,
        };
        let req = W::new(wire::OPEN)
            .u64(self.disk.size())
            .u64(self.part.offset)
            .u64(self.part.length)
            .bytes(self.part.name.as_bytes())
            .bytes(self.part.type_desc.as_bytes())
            .done();
        let reply = match conn.exchange(&req, self.disk.as_ref()) {
            Ok(r) => r,
            Err(e) => return Err(self.died(&mut conn, "opening the volume", &e)),
        };
        let mut r = R::new(&reply);
        let parsed = (|| -> Result<Result<Opened>> {
            if r.u8()? != wire::OK {
                return Ok(Err(r.error()?));
            }
            Ok(Ok(match r.u8()? {
                wire::OPENED_FS => {
                    let root = r.u64()?;
                    let describe = r.string()?;
                    self.root.store(root, Ordering::Relaxed);
                    *lock(&self.describe) = describe;
                    Opened::Fs
                }
                wire::OPENED_README => Opened::Readme(r.string()?),
                wire::OPENED_LVM => Opened::Lvm,
                _ => return Err(Error::Backend("restore worker: bad open reply".into())),
            }))
        })();
        match parsed {
            Ok(Ok(o)) => {
                tracing::debug!(part = %self.part.name, pid = conn.child.id(), "restore worker started");
                if matches!(o, Opened::Fs) {
                    *lock(&self.ahead) = Some(ahead);
                }
                Ok((conn, o))
            }
            Ok(Err(e)) => {
                conn.end();
                Err(e)
            }
            Err(e) => Err(self.died(&mut conn, "opening the volume", &bad(&e.to_string()))),
        }
    }

    /// End a broken worker, log why, and give the EIO its request gets.
    fn died(&self, conn: &mut Conn, doing: &str, e: &std::io::Error) -> Error {
        let status = conn.end();
        self.restarts.fetch_add(1, Ordering::Relaxed);
        crate::input_warn!(
            &self.part.name,
            "restore worker for {} failed while {doing} ({e}), {status} after {} ms; a new one starts on next access",
            self.part.name,
            conn.started.elapsed().as_millis()
        );
        Error::Io {
            context: format!("restore worker for {} {status}", self.part.name),
            source: std::io::Error::from_raw_os_error(libc::EIO),
        }
    }

    /// Forward one request; the reply's body after its `OK` tag.
    fn call(&self, req: Vec<u8>) -> Result<Vec<u8>> {
        self.call_with(&mut lock(&self.conn), req)
    }

    /// [`Self::call`] with the connection's lock already held.
    fn call_with(
        &self,
        guard: &mut std::sync::MutexGuard<'_, Option<Conn>>,
        req: Vec<u8>,
    ) -> Result<Vec<u8>> {
        // A worker that died while idle (most reads, lookups read ahead and listings are
        // served here without it) is replaced before this request, which it was not serving.
        if let Some(mut c) = guard.take_if(|c| matches!(c.child.try_wait(), Ok(Some(_)))) {
            let _ = self.died(&mut c, "idle", &std::io::ErrorKind::BrokenPipe.into());
        }
        if guard.is_none() {
            let (mut conn, opened) = self.start()?;
            if !matches!(opened, Opened::Fs) {
                conn.end();
                return Err(Error::Io {
                    context: format!(
                        "restore worker for {}: volume changed on restart",
                        self.part.name
                    ),
                    source: std::io::Error::from_raw_os_error(libc::EIO),
                });
            }
            tracing::info!(part = %self.part.name, pid = conn.child.id(), "restore worker restarted");
            **guard = Some(conn);
        }
        let Some(conn) = guard.as_mut() else {
            return Err(Error::Backend("restore worker: no connection".into()));
        };
        match conn.exchange(&req, self.disk.as_ref()) {
            Ok(mut reply) => {
                if reply[0] == wire::OK {
                    reply.remove(0);
                    Ok(reply)
                } else {
                    let mut r = R::new(&reply[1..]);
                    Err(r.error().unwrap_or_else(|e| e))
                }
            }
            Err(e) => {
                let err = self.died(conn, "serving a request", &e);
                **guard = None;
                Err(err)
            }
        }
    }

    /// Forward one read-ahead request on the worker's second socket; the reply's body after
    /// its `OK` tag. `None` when there is no worker running (read-ahead starts none), the
    /// reader failed (the walker meets that error itself), or the worker broke: then it is
    /// ended, and the next request of the walker starts a new one.
    fn call_ahead(&self, req: Vec<u8>) -> Option<Vec<u8>> {
        let (gen, e) = {
            let mut guard = lock(&self.ahead);
            let chan = guard.as_mut()?;
            match chan.exchange(&req, self.disk.as_ref()) {
                Ok(mut reply) => {
                    if reply[0] != wire::OK {
                        return None;
                    }
                    reply.remove(0);
                    return Some(reply);
                }
                Err(e) => {
                    let gen = chan.gen;
                    *guard = None;
                    (gen, e)
                }
            }
        };
        // Not holding `ahead` here: `conn` is always locked first.
        let mut guard = lock(&self.conn);
        if let Some(mut c) = guard.take_if(|c| c.main.gen == gen) {
            let _ = self.died(&mut c, "reading ahead", &e);
        }
        None
    }

    /// Decode a reply, ending the worker if it is malformed.
    fn decode<T>(&self, reply: &[u8], f: impl FnOnce(&mut R) -> Result<T>) -> Result<T> {
        match f(&mut R::new(reply)) {
            Ok(v) => Ok(v),
            Err(e) => {
                let mut guard = lock(&self.conn);
                if let Some(mut c) = guard.take() {
                    return Err(self.died(&mut c, "replying", &bad(&e.to_string())));
                }
                Err(e)
            }
        }
    }

    /// The worker's pid, for tests and figures.
    pub fn pid(&self) -> Option<u32> {
        lock(&self.conn).as_ref().map(|c| c.child.id())
    }
}

impl GuestFs for WorkerFs {
    fn root(&self) -> u64 {
        self.root.load(Ordering::Relaxed)
    }

    fn stat(&self, ino: u64) -> Result<FileStat> {
        if let Some((s, _)) = self.cached_attrs(ino) {
            return Ok(s);
        }
        let reply = self.call(W::new(wire::STAT).u64(ino).done())?;
        let (s, openable) = self.decode(&reply, |r| Ok((r.stat()?, r.u8()? != 0)))?;
        self.keep(
            cache::Key::Stat(self.id, ino),
            cache::Entry::Attrs((s.clone(), openable)),
        );
        Ok(s)
    }

    fn check_open(&self, ino: u64) -> Result<()> {
        if self.cached_attrs(ino).is_some_and(|(_, ok)| ok) {
            return Ok(());
        }
        self.call(W::new(wire::CHECK_OPEN).u64(ino).done())
            .map(|_| ())
    }

    fn lookup(&self, dir: u64, name: &[u8]) -> Result<FileStat> {
        if self.cfg.test_hooks && (name == HOOK_OPEN || name == HOOK_HANG) {
            let tag = if name == HOOK_OPEN {
                wire::TEST_OPEN
            } else {
                wire::TEST_HANG
            };
            self.call(W::new(tag).done())?;
            return Err(Error::NotFound(String::from_utf8_lossy(name).into_owned()));
        }
        let ahead = match cache::global().pop(&cache::Key::Looked(self.id, dir, name.to_vec())) {
            Some(cache::Entry::Attrs(a)) => Some(a),
            _ => None,
        };
        let mut alone = false;
        let (s, openable) = match ahead {
            Some(v) => v,
            None => match self.lookup_ahead(dir, name)? {
                Some(r) => r?,
                None => {
                    alone = true;
                    let reply = self.call(W::new(wire::LOOKUP).u64(dir).bytes(name).done())?;
                    self.decode(&reply, |r| Ok((r.stat()?, r.u8()? != 0)))?
                }
            },
        };
        self.keep(
            cache::Key::Stat(self.id, s.ino),
            cache::Entry::Attrs((s.clone(), openable)),
        );
        let next = lock(&self.walks).looked(dir, s.ino, alone);
        match next {
            InoNext::Nothing => {}
            // A failure is the later lookups' to meet, one by one.
            InoNext::Now { after, from, to } => {
                if let Err(e) = self.lookups_by_ino(false, dir, after, from, to) {
                    tracing::debug!(error = %e, dir, "lookups in inode order not read ahead");
                }
            }
            InoNext::Ahead { after, from, to } => self.lookups_by_ino_behind(dir, after, from, to),
        }
        Ok(s)
    }

    fn readdir(&self, dir: u64) -> Result<DirList> {
        if let Some(l) = self.cached_listing(dir) {
            return Ok(l.list.clone());
        }
        let reply = self.call(W::new(wire::READDIR).u64(dir).done())?;
        let list = self.decode_listing(&reply)?;
        self.keep_listing(dir, &list);
        Ok(list)
    }

    /// From the listing kept here when there is one (a small directory, read ahead: its
    /// cookies are listing positions, which the reader honours too), else from the worker.
    fn readdir_page(&self, dir: u64, cookie: u64, budget: usize) -> Result<DirPage> {
        let page = self.readdir_page_from(dir, cookie, budget)?;
        lock(&self.walks).listed(dir, cookie, &page);
        Ok(page)
    }

    fn read(&self, ino: u64, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let end = offset.saturating_add(buf.len() as u64);
        let mut pos = offset;
        while pos < end {
            let at = (pos - offset) as usize;
            let Some(mapped) = self.mapped(ino, pos)? else {
                return Ok(at + self.read_remote(ino, pos, &mut buf[at..])?);
            };
            let Mapped::Window { map, .. } = mapped.as_ref() else {
                return Ok(at + self.read_remote(ino, pos, &mut buf[at..])?);
            };
            let i = map.runs.partition_point(|r| r.offset + r.len <= pos);
            let Some(run) = map.runs.get(i) else {
                break; // at or past the end of the file
            };
            let n = (run.offset + run.len - pos).min(end - pos) as usize;
            let dst = &mut buf[at..at + n];
            match run.place {
                Place::Zero => dst.fill(0),
                Place::Disk(d) => self
                    .disk
                    .read_at(dst, self.part.offset + d + (pos - run.offset))?,
                Place::Reader => {
                    let k = self.read_remote(ino, pos, dst)?;
                    if k < n {
                        return Ok(at + k);
                    }
                }
            }
            pos += n as u64;
        }
        Ok((pos - offset) as usize)
    }

    fn readlink(&self, ino: u64) -> Result<Vec<u8>> {
        self.call(W::new(wire::READLINK).u64(ino).done())
    }

    fn xattrs(&self, ino: u64) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        if let Some(cache::Entry::Xattrs(x)) =
            cache::global().get(&cache::Key::Xattrs(self.id, ino))
        {
            return Ok(x.as_ref().clone());
        }
        let reply = self.call(W::new(wire::XATTRS).u64(ino).done())?;
        let x = self.decode(&reply, |r| read_xattrs(r, reply.len()))?;
        // `ls -l` asks twice per name (ACLs, security label): small lists are kept, as the
        // ones read ahead with lookups are.
        if x.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>() <= wire::AHEAD_XATTR_BYTES {
            self.keep(
                cache::Key::Xattrs(self.id, ino),
                cache::Entry::Xattrs(Arc::new(x.clone())),
            );
        }
        Ok(x)
    }

    /// The listing read into the worker's caches and brought here: the walker's `readdir`
    /// then needs no round trip. Asked on the worker's read-ahead socket, served by its second
    /// thread: neither the walker's requests nor this one wait for the other.
    fn prefetch_dir(&self, dir: u64) -> Vec<u64> {
        if let Some(l) = self.cached_listing(dir) {
            return restore::subdirs(&l.list);
        }
        // The first page: all of a small directory (kept), the start of a large one.
        let req = W::new(wire::READDIR_PAGE)
            .u64(dir)
            .u64(0)
            .u32(FIRST_PAGE_BUDGET as u32)
            .done();
        let Some(reply) = self.call_ahead(req) else {
            return Vec::new();
        };
        match self.decode_page(&reply, dir, 0) {
            Ok((page, whole)) => {
                let subdirs = page.subdirs();
                if !whole {
                    let _ = self.keep_window(dir, 0, page);
                }
                subdirs
            }
            Err(_) => Vec::new(),
        }
    }

    fn data_ranges(&self, ino: u64) -> Result<Option<Vec<(u64, u64)>>> {
        let reply = self.call(W::new(wire::DATA_RANGES).u64(ino).done())?;
        self.decode(&reply, |r| {
            if r.u8()? == 0 {
                return Ok(None);
            }
            let n = r.u32()? as usize;
            let mut v = Vec::with_capacity(n.min(reply.len() / 16));
            for _ in 0..n {
                v.push((r.u64()?, r.u64()?));
            }
            Ok(Some(v))
        })
    }

    fn describe(&self) -> String {
        lock(&self.describe).clone()
    }
}

impl WorkerFs {
    /// [`GuestFs::readdir_page`]'s answer.
    fn readdir_page_from(&self, dir: u64, cookie: u64, budget: usize) -> Result<DirPage> {
        if cookie == 0 || cookie & restore::INDEX_COOKIE != 0 {
            if let Some(l) = self.cached_listing(dir) {
                return Ok(restore::page_of_list(&l.list, cookie, budget));
            }
        }
        if let Some(p) = self.cached_window(dir).and_then(|w| w.page(cookie, budget)) {
            return Ok(p);
        }
        // A first page asks for enough to hold a small directory whole (then kept here); a
        // later one for a worker's page of a paged directory (kept here as its window).
        let ask = if cookie == 0 {
            budget.max(FIRST_PAGE_BUDGET)
        } else {
            budget.max(wire::PAGED_PAGE_BUDGET)
        };
        let ask = u32::try_from(ask)
            .unwrap_or(u32::MAX)
            .min(wire::MAX_PAGE_BUDGET);
        let req = W::new(wire::READDIR_PAGE)
            .u64(dir)
            .u64(cookie)
            .u32(ask)
            .done();
        let reply = self.call(req)?;
        let (mut page, whole) = self.decode_page(&reply, dir, cookie)?;
        if !whole {
            match self.keep_window(dir, cookie, page) {
                Ok(w) => {
                    if let Some(p) = w.page(cookie, budget) {
                        return Ok(p);
                    }
                    return Err(Error::Backend(
                        "restore worker: listing page not kept".into(),
                    ));
                }
                Err(p) => page = p,
            }
        }
        // What the caller asked for: past its budget, the page goes on from there.
        let mut used = 0;
        let keep = page
            .entries
            .iter()
            .enumerate()
            .take_while(|(i, e)| {
                used += restore::dirent_cost(e.0.len());
                *i == 0 || used <= budget
            })
            .count();
        if keep < page.entries.len() {
            page.entries.truncate(keep);
            page.end = false;
        }
        Ok(page)
    }

    /// `name` in `dir` with the names after it in a listing or page window seen lately, in one
    /// request; the others' attributes are kept for their lookups. `None` when `dir` was not
    /// listed lately, or `name` is not the one after the last looked up there.
    fn lookup_ahead(&self, dir: u64, name: &[u8]) -> Result<Option<Result<Attrs>>> {
        let hooks = self.cfg.test_hooks;
        if let Some(l) = self.cached_listing(dir) {
            let names = ahead_names(&l.pos, &l.next, l.list.len(), |i| &l.list[i].0, name, hooks);
            return match names {
                Some(names) => self.lookups(dir, &names).map(Some),
                None => Ok(None),
            };
        }
        if let Some(w) = self.cached_window(dir) {
            let names = ahead_names(
                &w.pos,
                &w.next,
                w.entries.len(),
                |i| &w.entries[i].0,
                name,
                hooks,
            );
            if let Some(names) = names {
                return self.lookups(dir, &names).map(Some);
            }
        }
        Ok(None)
    }

    /// `names` (the one the kernel asked for first) looked up in `dir` in one `LOOKUPS`; the
    /// others' attributes, small xattr lists and maps are kept for their own requests.
    fn lookups(&self, dir: u64, names: &[&[u8]]) -> Result<Result<Attrs>> {
        let vol = self.volume_len();
        let mut w = W::new(wire::LOOKUPS).u64(dir).u32(names.len() as u32);
        for n in names {
            w = w.bytes(n);
        }
        let reply = self.call(w.done())?;
        let results = self.decode(&reply, |r| {
            if r.u32()? as usize != names.len() {
                return Err(Error::Backend(
                    "restore worker: lookups answered in part".into(),
                ));
            }
            let mut v = Vec::with_capacity(names.len());
            for _ in 0..names.len() {
                v.push(self.read_lookup(r, vol)?);
            }
            Ok(v)
        })?;
        let mut results = results.into_iter();
        let first = results
            .next()
            .ok_or_else(|| Error::Backend("restore worker: no lookup result".into()))?;
        for (n, res) in names[1..].iter().zip(results) {
            // Errors are not kept: the kernel's own lookup asks again and meets them there.
            if let Ok(v) = res {
                self.keep(
                    cache::Key::Looked(self.id, dir, n.to_vec()),
                    cache::Entry::Attrs(v),
                );
            }
        }
        Ok(first)
    }

    /// One name's answer in a `LOOKUPS` (or `LOOKUPS_BY_INO`) reply; its small xattr list
    /// and map are kept for their own requests.
    fn read_lookup(&self, r: &mut R, vol: u64) -> Result<Result<Attrs>> {
        if r.u8()? != 0 {
            return Ok(Err(r.error()?));
        }
        let (st, openable) = (r.stat()?, r.u8()? != 0);
        if r.u8()? != 0 {
            let x = read_xattrs(r, wire::AHEAD_XATTR_BYTES)?;
            self.keep(
                cache::Key::Xattrs(self.id, st.ino),
                cache::Entry::Xattrs(Arc::new(x)),
            );
        }
        let map = match r.u8()? {
            0 => None,
            1 => Some(Mapped::No),
            _ => Some(decode_map_body(r, 0, vol)?),
        };
        if let Some(m) = map {
            self.keep(
                cache::Key::Map(self.id, st.ino),
                cache::Entry::Map(Arc::new(m)),
            );
        }
        Ok(Ok((st, openable)))
    }

    /// The lookups a walk in inode order of `dir` makes next, after the one that found
    /// `after`, in one `LOOKUPS_BY_INO` over the entries listed from cookie `from` to `to`:
    /// kept for the kernel's own lookups, with the listings of the subdirectories among them
    /// (the walk enters each next).
    /// [`Self::lookups_by_ino`] on the worker's read-ahead socket from a thread of its own,
    /// one at a time per volume: the walk does not wait for it.
    fn lookups_by_ino_behind(&self, dir: u64, after: u64, from: u64, to: u64) {
        let Some(me) = self.me.upgrade() else {
            return;
        };
        if self.ino_ahead.swap(true, Ordering::AcqRel) {
            return;
        }
        let spawned = std::thread::Builder::new()
            .name("ino-ahead".into())
            .spawn(move || {
                if let Err(e) = me.lookups_by_ino(true, dir, after, from, to) {
                    tracing::debug!(error = %e, dir, "lookups in inode order not read ahead");
                }
                me.ino_ahead.store(false, Ordering::Release);
            });
        if spawned.is_err() {
            self.ino_ahead.store(false, Ordering::Release);
        }
    }

    /// On the read-ahead socket when `behind` (an error when no worker runs: read-ahead
    /// starts none).
    fn lookups_by_ino(&self, behind: bool, dir: u64, after: u64, from: u64, to: u64) -> Result<()> {
        let vol = self.volume_len();
        let req = W::new(wire::LOOKUPS_BY_INO)
            .u64(dir)
            .u64(after)
            .u64(from)
            .u64(to)
            .u32(INO_BATCH as u32)
            .done();
        let reply = if behind {
            self.call_ahead(req)
                .ok_or_else(|| Error::Backend("restore worker: no read-ahead".into()))?
        } else {
            self.call(req)?
        };
        let (found, ahead) = self.decode(&reply, |r| {
            let n = r.u32()? as usize;
            if n > INO_BATCH {
                return Err(Error::Backend(
                    "restore worker: too many lookups in inode order".into(),
                ));
            }
            let mut found = Vec::with_capacity(n.min(reply.len() / 16));
            let mut dirs = std::collections::HashSet::new();
            for _ in 0..n {
                let name = r.bytes()?;
                if name.is_empty()
                    || name.len() > 255
                    || name.contains(&b'/')
                    || name.contains(&0)
                    || name == b"."
                    || name == b".."
                {
                    return Err(Error::Backend(
                        "restore worker: bad name in lookups in inode order".into(),
                    ));
                }
                let name = name.to_vec();
                let res = self.read_lookup(r, vol)?;
                if let Ok((st, _)) = &res {
                    if st.kind == FileKind::Dir {
                        dirs.insert(st.ino);
                    }
                }
                found.push((name, res));
            }
            let ahead = read_ahead(r, reply.len(), INO_BATCH, |d| dirs.contains(&d))?;
            Ok((found, ahead))
        })?;
        let full = found.len() == INO_BATCH;
        let mut end = 0;
        for (name, res) in found {
            // Errors are not kept: the kernel's own lookup asks again and meets them there.
            if let Ok(v) = res {
                end = end.max(v.0.ino);
                self.keep(
                    cache::Key::Looked(self.id, dir, name),
                    cache::Entry::Attrs(v),
                );
            }
        }
        for (d, l) in ahead {
            self.keep_listing(d, &l);
        }
        lock(&self.walks).batched(dir, end, full, behind);
        Ok(())
    }

    /// Keep `list` for later `readdir`s and lookup read-ahead.
    fn keep_listing(&self, dir: u64, list: &DirList) {
        if list.len() <= LISTING_MAX {
            let l = Arc::new(Listing {
                list: list.clone(),
                pos: OnceLock::new(),
                next: AtomicU64::new(u64::MAX),
            });
            self.keep(cache::Key::Listing(self.id, dir), cache::Entry::Listing(l));
        }
    }

    /// A `READDIR_PAGE` answer to a request from `cookie`: the page; the subdirectories'
    /// listings that came with it are kept, and so is the directory's own listing when the
    /// page holds all of it in listing positions (a small directory's first page).
    fn decode_page(&self, reply: &[u8], dir: u64, cookie: u64) -> Result<(DirPage, bool)> {
        let (page, ahead) = self.decode(reply, |r| {
            let page = read_page(r, reply.len(), cookie)?;
            let ahead = read_ahead(r, reply.len(), wire::AHEAD_LISTINGS, |d| {
                page.entries
                    .iter()
                    .any(|e| e.1 == d && e.2 == FileKind::Dir)
            })?;
            Ok((page, ahead))
        })?;
        for (d, l) in ahead {
            self.keep_listing(d, &l);
        }
        let whole = cookie == 0
            && page.end
            && page
                .entries
                .iter()
                .enumerate()
                .all(|(i, e)| e.3 == restore::INDEX_COOKIE | (i as u64 + 1));
        if whole {
            let list: DirList = Arc::new(
                page.entries
                    .iter()
                    .map(|(n, ino, k, _)| (n.clone(), *ino, *k))
                    .collect(),
            );
            self.keep_listing(dir, &list);
        }
        Ok((page, whole))
    }

    /// Keep a page the worker sent from `cookie` as `dir`'s window, after what was not yet
    /// looked up of the window it continues (bounded: a worker's page of FUSE entries of it);
    /// the page back when its cookies repeat (a window must never list a name twice).
    fn keep_window(
        &self,
        dir: u64,
        cookie: u64,
        page: DirPage,
    ) -> std::result::Result<Arc<PageWindow>, DirPage> {
        let mut entries = Vec::new();
        let mut start = cookie;
        let mut next = u64::MAX;
        if let Some(old) = self.cached_window(dir) {
            if old.from(cookie) == Some(old.entries.len()) {
                // The tail to keep: from the next name to be looked up, at most a page's bytes.
                let mut first = old.entries.len();
                let mut used = 0;
                while first > 0 {
                    used += restore::dirent_cost(old.entries[first - 1].0.len());
                    if used > wire::PAGED_PAGE_BUDGET {
                        break;
                    }
                    first -= 1;
                }
                let looked = old.next.load(Ordering::Relaxed);
                if looked != u64::MAX {
                    first = first.max(
                        usize::try_from(looked)
                            .unwrap_or(usize::MAX)
                            .min(old.entries.len()),
                    );
                }
                if first < old.entries.len() {
                    start = if first == 0 {
                        old.start
                    } else {
                        old.entries[first - 1].3
                    };
                    entries.extend_from_slice(&old.entries[first..]);
                    if looked != u64::MAX {
                        next = looked.saturating_sub(first as u64);
                    }
                }
            }
        }
        let mut seen =
            std::collections::HashSet::with_capacity(entries.len() + page.entries.len() + 1);
        seen.insert(start);
        if !entries
            .iter()
            .chain(&page.entries)
            .all(|e| seen.insert(e.3))
        {
            return Err(page);
        }
        entries.extend(page.entries);
        let w = Arc::new(PageWindow {
            start,
            entries,
            end: page.end,
            pos: OnceLock::new(),
            next: AtomicU64::new(next),
        });
        self.keep(
            cache::Key::Window(self.id, dir),
            cache::Entry::Window(w.clone()),
        );
        Ok(w)
    }

    /// A `READDIR` answer: the listing; the subdirectories' listings that came with it are
    /// kept (only for directories it lists as subdirectories).
    fn decode_listing(&self, reply: &[u8]) -> Result<DirList> {
        let (list, ahead) = self.decode(reply, |r| {
            let list = read_listing(r, reply.len())?;
            let ahead = read_ahead(r, reply.len(), wire::AHEAD_LISTINGS, |dir| {
                list.iter()
                    .any(|(_, ino, k)| *ino == dir && *k == FileKind::Dir)
            })?;
            Ok((list, ahead))
        })?;
        for (dir, l) in ahead {
            self.keep_listing(dir, &l);
        }
        Ok(list)
    }

    /// The map of `ino` that covers `pos` (from the cache, else asked of the worker and
    /// checked). `None` when the worker's reader failed to map it: `READ` then gives that
    /// reader's error, or the bytes (a file damaged past the window may read fine before it).
    fn mapped(&self, ino: u64, pos: u64) -> Result<Option<Arc<Mapped>>> {
        if let Some(cache::Entry::Map(m)) = cache::global().get(&cache::Key::Map(self.id, ino)) {
            match m.as_ref() {
                Mapped::No => return Ok(Some(m.clone())),
                Mapped::Window { start, map }
                    if (*start <= pos && pos < map.end(*start)) || pos >= map.size =>
                {
                    return Ok(Some(m.clone()))
                }
                _ => {}
            }
        }
        let restarts = self.restarts.load(Ordering::Relaxed);
        let req = W::new(wire::MAP).u64(ino).u64(pos).u64(MAP_WINDOW).done();
        let reply = match self.call(req) {
            Ok(r) => r,
            // The worker broke: that is this request's EIO.
            Err(e) if self.restarts.load(Ordering::Relaxed) != restarts => return Err(e),
            Err(_) => return Ok(None),
        };
        let vol = self.volume_len();
        let m = Arc::new(self.decode(&reply, |r| decode_map(r, pos, vol))?);
        self.keep(cache::Key::Map(self.id, ino), cache::Entry::Map(m.clone()));
        Ok(Some(m))
    }

    fn keep(&self, key: cache::Key, entry: cache::Entry) {
        cache::global().put(key, entry);
    }

    fn cached_attrs(&self, ino: u64) -> Option<Attrs> {
        match cache::global().get(&cache::Key::Stat(self.id, ino)) {
            Some(cache::Entry::Attrs(a)) => Some(a),
            _ => None,
        }
    }

    fn cached_window(&self, dir: u64) -> Option<Arc<PageWindow>> {
        match cache::global().get(&cache::Key::Window(self.id, dir)) {
            Some(cache::Entry::Window(w)) => Some(w),
            _ => None,
        }
    }

    fn cached_listing(&self, dir: u64) -> Option<Arc<Listing>> {
        match cache::global().get(&cache::Key::Listing(self.id, dir)) {
            Some(cache::Entry::Listing(l)) => Some(l),
            _ => None,
        }
    }

    /// The volume's length on the disk: where disk runs must end.
    fn volume_len(&self) -> u64 {
        self.part
            .length
            .min(self.disk.size().saturating_sub(self.part.offset))
    }

    /// Bytes of `ino` read by the worker's reader (one round trip; the bytes cross the socket).
    fn read_remote(&self, ino: u64, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let len = buf.len().min(wire::MAX_FRAME / 2) as u32;
        let reply = self.call(W::new(wire::READ).u64(ino).u64(offset).u32(len).done())?;
        if reply.len() > buf.len() {
            return self.decode(&reply, |_| {
                Err(Error::Backend("restore worker: read reply too long".into()))
            });
        }
        buf[..reply.len()].copy_from_slice(&reply);
        Ok(reply.len())
    }
}

/// The names to look up together when the kernel asks for `name` in a kept listing or window
/// of `len` names (`at(i)` the i-th; `pos` its index, built here on first use): `name` and up
/// to [`wire::MAX_LOOKUPS`] - 1 after it, when it is the first name there or comes right
/// after the last name looked up there (a walk in listing order); `None` for a lookup elsewhere (a single `stat`, `find`
/// entering subdirectories), which goes alone. Test hooks' names are never read ahead.
fn ahead_names<'a>(
    pos: &OnceLock<std::collections::HashMap<Vec<u8>, u32>>,
    next: &AtomicU64,
    len: usize,
    at: impl Fn(usize) -> &'a Vec<u8>,
    name: &[u8],
    hooks: bool,
) -> Option<Vec<&'a [u8]>> {
    let pos = pos.get_or_init(|| (0..len).map(|i| (at(i).clone(), i as u32)).collect());
    let &i = pos.get(name)?;
    let prev = next.swap(u64::from(i) + 1, Ordering::Relaxed);
    if u64::from(i) != prev && !(i == 0 && prev == u64::MAX) {
        return None;
    }
    let names: Vec<&[u8]> = (i as usize..len.min(i as usize + wire::MAX_LOOKUPS))
        .map(|k| at(k).as_slice())
        .filter(|n| !(hooks && (*n == HOOK_OPEN || *n == HOOK_HANG)))
        .collect();
    if names.first() != Some(&name) {
        return None;
    }
    next.store(u64::from(i) + names.len() as u64, Ordering::Relaxed);
    Some(names)
}

/// A `MAP` reply, checked: the worker is not trusted, so runs must start at `pos`, follow
/// each other without gaps or overlaps, stay inside the file's size and the window asked for,
/// and put disk runs inside the volume (`vol` bytes). Anything else ends the worker.
fn decode_map(r: &mut R, pos: u64, vol: u64) -> Result<Mapped> {
    if r.u8()? == 0 {
        return Ok(Mapped::No);
    }
    decode_map_body(r, pos, vol)
}

/// An xattr list of at most `max` bytes of names and values (the frame's length for a reply of
/// its own): a count the worker chose sizes no allocation.
fn read_xattrs(r: &mut R, max: usize) -> Result<XattrList> {
    let n = r.u32()? as usize;
    let mut v = Vec::with_capacity(n.min(max / 8));
    let mut total = 0usize;
    for _ in 0..n {
        let (k, val) = (r.bytes()?.to_vec(), r.bytes()?.to_vec());
        total += k.len() + val.len();
        if total > max {
            return Err(Error::Backend(
                "restore worker: extended attributes too large".into(),
            ));
        }
        v.push((k, val));
    }
    Ok(v)
}

/// A file map after its flag: see [`decode_map`].
fn decode_map_body(r: &mut R, pos: u64, vol: u64) -> Result<Mapped> {
    let nonsense = |what: &str| Error::Backend(format!("restore worker: bad file map: {what}"));
    let size = r.u64()?;
    let n = r.u32()? as usize;
    if n > restore::MAX_MAP_RUNS {
        return Err(nonsense("too many runs"));
    }
    if (pos < size) != (n > 0) {
        return Err(nonsense("runs and file size disagree"));
    }
    let limit = size.min(pos.saturating_add(MAP_WINDOW));
    let mut runs = Vec::with_capacity(n);
    let mut at = pos;
    for _ in 0..n {
        let offset = r.u64()?;
        let len = r.u64()?;
        let place = match r.u8()? {
            wire::PLACE_ZERO => Place::Zero,
            wire::PLACE_DISK => Place::Disk(r.u64()?),
            wire::PLACE_READER => Place::Reader,
            _ => return Err(nonsense("unknown place")),
        };
        if offset != at || len == 0 || offset.checked_add(len).is_none_or(|e| e > limit) {
            return Err(nonsense("runs out of order or past the end"));
        }
        if let Place::Disk(d) = place {
            if d.checked_add(len).is_none_or(|e| e > vol) {
                return Err(nonsense("run outside the volume"));
            }
        }
        runs.push(MapRun { offset, len, place });
        at += len;
    }
    Ok(Mapped::Window {
        start: pos,
        map: FileMap { size, runs },
    })
}

/// The listings ahead after a `READDIR` or `READDIR_PAGE` answer, each of a directory
/// `listed` says the answer lists as a subdirectory.
fn read_ahead(
    r: &mut R,
    frame: usize,
    max: usize,
    listed: impl Fn(u64) -> bool,
) -> Result<Vec<(u64, DirList)>> {
    let m = r.u32()? as usize;
    if m > max {
        return Err(Error::Backend(
            "restore worker: too many listings ahead".into(),
        ));
    }
    let mut ahead = Vec::with_capacity(m);
    for _ in 0..m {
        let dir = r.u64()?;
        if !listed(dir) {
            return Err(Error::Backend(
                "restore worker: listing ahead of a directory not listed".into(),
            ));
        }
        ahead.push((dir, read_listing(r, frame)?));
    }
    Ok(ahead)
}

/// A `READDIR_PAGE` answer's page (after the OK tag); the listings ahead follow it.
fn read_page(r: &mut R, frame: usize, cookie: u64) -> Result<DirPage> {
    let end = r.u8()? != 0;
    let n = r.u32()? as usize;
    // Each entry takes at least 21 bytes of the frame: no allocation the worker chose.
    let mut entries = Vec::with_capacity(n.min(frame / 21));
    for _ in 0..n {
        let name = r.bytes()?.to_vec();
        let ino = r.u64()?;
        let kind = r.kind()?;
        let next = r.u64()?;
        // A cookie that goes nowhere would make the kernel list the same names forever.
        if next == cookie || next >= (1 << 63) - 2 {
            return Err(Error::Backend("restore worker: bad listing cookie".into()));
        }
        entries.push((name, ino, kind, next));
    }
    if !end && entries.is_empty() {
        return Err(Error::Backend(
            "restore worker: empty listing page before its end".into(),
        ));
    }
    Ok(DirPage { entries, end })
}

/// One listing: count, then (name, inode, kind) each; `frame` bounds the allocation.
fn read_listing(r: &mut R, frame: usize) -> Result<DirList> {
    let n = r.u32()? as usize;
    // Each entry takes at least 13 bytes of the frame: no allocation the worker chose.
    let mut v = Vec::with_capacity(n.min(frame / 13));
    for _ in 0..n {
        let name = r.bytes()?.to_vec();
        let ino = r.u64()?;
        v.push((name, ino, r.kind()?));
    }
    Ok(Arc::new(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A MAP reply as a worker would send it (after the OK tag).
    fn reply(size: u64, runs: &[(u64, u64, u8, u64)]) -> Vec<u8> {
        let mut w = W::new(wire::OK).u8(1).u64(size).u32(runs.len() as u32);
        for &(o, l, p, d) in runs {
            w = w.u64(o).u64(l).u8(p);
            if p == wire::PLACE_DISK {
                w = w.u64(d);
            }
        }
        w.done()[5..].to_vec()
    }

    fn decode(b: &[u8], pos: u64, vol: u64) -> Result<Mapped> {
        decode_map(&mut R::new(b), pos, vol)
    }

    /// A READDIR_PAGE answer's page as a worker would send it (after the OK tag).
    fn page_reply(end: bool, entries: &[(&str, u64)]) -> Vec<u8> {
        let mut w = W::new(wire::OK).u8(u8::from(end)).u32(entries.len() as u32);
        for &(n, next) in entries {
            w = wire::write_kind(w.bytes(n.as_bytes()).u64(7), FileKind::File).u64(next);
        }
        w.done()[5..].to_vec()
    }

    /// Requests a fake worker was sent, by tag.
    type Counts = Arc<Mutex<std::collections::HashMap<u8, usize>>>;

    /// A worker played by a thread: one paged directory (inode 2) of `n` files named
    /// `f<6 digits>` whose cookies are 16 × (position + 1), answered as the child does; it
    /// counts the requests by tag. The `WorkerFs` talks to it through a real socket pair.
    fn fake_worker(n: usize) -> (WorkerFs, Counts, std::thread::JoinHandle<()>) {
        fake_worker_with(n, |i| i, FileKind::File)
    }

    /// [`fake_worker`] with the i-th name's inode number 100 + `perm(i)` (a permutation of
    /// 0..n) and entries of `kind`; every other directory is empty.
    fn fake_worker_with(
        n: usize,
        perm: fn(usize) -> usize,
        kind: FileKind,
    ) -> (WorkerFs, Counts, std::thread::JoinHandle<()>) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let counts = Arc::new(Mutex::new(std::collections::HashMap::new()));
        let seen = counts.clone();
        let name = |i: usize| format!("f{i:06}").into_bytes();
        let st = move |ino: u64| FileStat {
            ino,
            kind,
            perm: 0o644,
            uid: 0,
            gid: 0,
            size: 0,
            allocated: 0,
            nlink: 1,
            rdev: 0,
            atime: std::time::UNIX_EPOCH,
            mtime: std::time::UNIX_EPOCH,
            ctime: std::time::UNIX_EPOCH,
            btime: None,
        };
        let ino_of = move |nm: &[u8]| -> Option<u64> {
            let i: usize = std::str::from_utf8(nm.get(1..)?).ok()?.parse().ok()?;
            (i < n).then_some(100 + perm(i) as u64)
        };
        let thread = std::thread::spawn(move || {
            let mut buf = Vec::new();
            while let Ok(true) = wire::read_frame(&mut &theirs, &mut buf) {
                *lock(&seen).entry(buf[0]).or_default() += 1;
                let mut r = R::new(&buf[1..]);
                let reply = match buf[0] {
                    wire::READDIR_PAGE => {
                        let (dir, cookie, budget) =
                            (r.u64().unwrap(), r.u64().unwrap(), r.u32().unwrap());
                        if dir != 2 {
                            (&theirs)
                                .write_all(&W::new(wire::OK).u8(1).u32(0).u32(0).done())
                                .unwrap();
                            continue;
                        }
                        let budget = (budget as usize).min(wire::PAGED_PAGE_BUDGET);
                        let mut i = (cookie / 16) as usize;
                        let (mut used, mut entries) = (0, Vec::new());
                        while i < n && (entries.is_empty() || used + 32 <= budget) {
                            used += restore::dirent_cost(name(i).len());
                            entries.push(i);
                            i += 1;
                        }
                        let mut w = W::new(wire::OK)
                            .u8(u8::from(i == n))
                            .u32(entries.len() as u32);
                        for k in entries {
                            w = wire::write_kind(w.bytes(&name(k)).u64(100 + perm(k) as u64), kind)
                                .u64(16 * (k as u64 + 1));
                        }
                        w.u32(0).done()
                    }
                    wire::LOOKUP => {
                        let _dir = r.u64().unwrap();
                        match ino_of(r.bytes().unwrap()) {
                            Some(ino) => W::new(wire::OK).stat(&st(ino)).u8(1).done(),
                            None => W::new(wire::ERR).error(&Error::NotFound("x".into())).done(),
                        }
                    }
                    wire::LOOKUPS => {
                        let _dir = r.u64().unwrap();
                        let k = r.u32().unwrap() as usize;
                        assert!(k <= wire::MAX_LOOKUPS);
                        let mut w = W::new(wire::OK).u32(k as u32);
                        for _ in 0..k {
                            w = match ino_of(r.bytes().unwrap()) {
                                // No xattrs, no map.
                                Some(ino) => w.u8(0).stat(&st(ino)).u8(1).u8(0).u8(0),
                                None => w.u8(1).error(&Error::NotFound("x".into())),
                            };
                        }
                        w.done()
                    }
                    wire::LOOKUPS_BY_INO => {
                        let (_dir, after, from, to, max) = (
                            r.u64().unwrap(),
                            r.u64().unwrap(),
                            r.u64().unwrap(),
                            r.u64().unwrap(),
                            r.u32().unwrap() as usize,
                        );
                        let mut picked = Vec::new();
                        for k in (from / 16) as usize..n {
                            if 100 + perm(k) as u64 > after {
                                picked.push(k);
                            }
                            if 16 * (k as u64 + 1) == to {
                                break;
                            }
                        }
                        picked.sort_by_key(|&k| perm(k));
                        picked.truncate(max.min(wire::MAX_INO_BATCH));
                        let mut w = W::new(wire::OK).u32(picked.len() as u32);
                        for &k in &picked {
                            w = w.bytes(&name(k)).u8(0).stat(&st(100 + perm(k) as u64));
                            w = w.u8(1).u8(0).u8(0);
                        }
                        let dirs: Vec<usize> = if kind == FileKind::Dir {
                            picked
                        } else {
                            Vec::new()
                        };
                        w = w.u32(dirs.len() as u32);
                        for k in dirs {
                            // Each subdirectory is empty.
                            w = w.u64(100 + perm(k) as u64).u32(0);
                        }
                        w.done()
                    }
                    t => panic!("fake worker: request {t}"),
                };
                (&theirs).write_all(&reply).unwrap();
            }
        });
        // A process for the connection to own and end: the fake's thread is the worker.
        let child = Command::new("sleep").arg("600").spawn().unwrap();
        let fs = WorkerFs {
            disk: Arc::new(crate::provider::memory::MemImage(vec![0; 4096])),
            part: Partition {
                name: "whole".into(),
                offset: 0,
                length: 4096,
                type_desc: String::new(),
            },
            cfg: WorkerConfig {
                enabled: true,
                ..WorkerConfig::default()
            },
            conn: Mutex::new(Some(Conn {
                child,
                main: Chan {
                    sock: ours,
                    window: None,
                    gen: NEXT_GEN.fetch_add(1, Ordering::Relaxed),
                },
                started: Instant::now(),
            })),
            ahead: Mutex::new(None),
            root: AtomicU64::new(2),
            describe: Mutex::new(String::new()),
            restarts: AtomicU64::new(0),
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            walks: Mutex::new(InoWalks::default()),
            me: std::sync::Weak::new(),
            ino_ahead: Default::default(),
        };
        (fs, counts, thread)
    }

    /// `ls -l` of a paged directory: READDIRs of 4 KiB, each followed by a lookup of every
    /// name it gave, in order. Every name comes once and is found; the worker is asked for a
    /// page of 64 KiB once per ~2,000 names, not per READDIR, and for the lookups in batches
    /// (`LOOKUPS`), not one round trip per name (as before the page window: 4,000 `LOOKUP`s
    /// and ~32 `READDIR_PAGE`s here).
    #[test]
    fn a_paged_directory_walk_asks_for_pages_and_lookups_in_batches() {
        const N: usize = 4_000;
        let (fs, counts, thread) = fake_worker(N);
        let (mut cookie, mut names) = (0, Vec::new());
        loop {
            let page = fs.readdir_page(2, cookie, 4096).unwrap();
            assert!(!page.entries.is_empty() || page.end);
            for (name, ino, _, next) in &page.entries {
                assert_eq!(fs.lookup(2, name).unwrap().ino, *ino);
                names.push(name.clone());
                cookie = *next;
            }
            if page.end {
                break;
            }
        }
        // A name elsewhere still goes alone, and a missing one is missing.
        assert_eq!(fs.lookup(2, b"f000007").unwrap().ino, 107);
        assert!(fs.lookup(2, b"f999999").is_err());
        let want: Vec<Vec<u8>> = (0..N).map(|i| format!("f{i:06}").into_bytes()).collect();
        assert_eq!(names, want);
        let c = lock(&counts).clone();
        let get = |t: u8| c.get(&t).copied().unwrap_or(0);
        let (pages, single, batched) = (
            get(wire::READDIR_PAGE),
            get(wire::LOOKUP),
            get(wire::LOOKUPS),
        );
        eprintln!("READDIR_PAGE {pages}, LOOKUP {single}, LOOKUPS {batched}");
        assert!(pages <= 4, "{pages} READDIR_PAGE requests for {N} names");
        assert!(batched >= N / wire::MAX_LOOKUPS, "{batched} LOOKUPS");
        assert!(
            single <= 2 * pages + 4,
            "{single} single LOOKUPs for {N} names"
        );
        drop(fs);
        thread.join().unwrap();
    }

    /// `find` (gnulib's `fts`) of a directory of 12,000 subdirectories: it lists it whole
    /// (READDIRs of 4 KiB), then enters each subdirectory in inode order, which is not the
    /// listing's: a lookup and a READDIR of the (empty) subdirectory each. Every name is
    /// found with its inode; the worker is asked for the lookups in batches
    /// (`LOOKUPS_BY_INO`, 2,048 names, with the subdirectories' listings), not for a `LOOKUP`
    /// and a `READDIR_PAGE` per subdirectory (as before: 12,000 of each here).
    #[test]
    fn a_walk_in_inode_order_asks_for_lookups_and_listings_in_batches() {
        const N: usize = 12_000;
        // 7,919 is prime and no factor of N: i -> 7,919 i mod N is a permutation.
        let (fs, counts, thread) = fake_worker_with(N, |i| i * 7919 % N, FileKind::Dir);
        let (mut cookie, mut listed) = (0, Vec::new());
        loop {
            let page = fs.readdir_page(2, cookie, 4096).unwrap();
            for (name, ino, _, next) in &page.entries {
                listed.push((*ino, name.clone()));
                cookie = *next;
            }
            if page.end {
                break;
            }
        }
        assert_eq!(listed.len(), N);
        listed.sort();
        for (ino, name) in &listed {
            let st = fs.lookup(2, name).unwrap();
            assert_eq!((st.ino, st.kind), (*ino, FileKind::Dir));
            let sub = fs.readdir_page(*ino, 0, 4096).unwrap();
            assert!(sub.entries.is_empty() && sub.end);
        }
        let c = lock(&counts).clone();
        let get = |t: u8| c.get(&t).copied().unwrap_or(0);
        let (pages, single, by_ino) = (
            get(wire::READDIR_PAGE),
            get(wire::LOOKUP),
            get(wire::LOOKUPS_BY_INO),
        );
        eprintln!("READDIR_PAGE {pages}, LOOKUP {single}, LOOKUPS_BY_INO {by_ino}");
        let batches = N.div_ceil(wire::MAX_INO_BATCH);
        assert!(
            by_ino <= batches + 1,
            "{by_ino} LOOKUPS_BY_INO for {N} names"
        );
        assert!(
            single <= INO_RISING as usize + 1 + by_ino,
            "{single} single LOOKUPs for {N} names"
        );
        // The directory's own pages (~2,000 names each) and the subdirectories before the
        // first batch.
        assert!(pages <= 16, "{pages} READDIR_PAGE requests");
        // A lookup out of the walk's order still goes alone and is found.
        assert_eq!(
            fs.lookup(2, b"f000007").unwrap().ino,
            100 + 7 * 7919 % N as u64
        );
        drop(fs);
        thread.join().unwrap();
    }

    /// A whole listing of `INO_LISTED` names, the `i`-th with inode number `i + 1`.
    fn listed_page() -> DirPage {
        DirPage {
            entries: (0..INO_LISTED)
                .map(|i| (b"x".to_vec(), i, FileKind::File, i + 1))
                .collect(),
            end: true,
        }
    }

    /// Lookups in a listed directory that only look like a walk in inode order (rising three
    /// times, then not asking for what the batch brought) cost one batch, not one per rise.
    #[test]
    fn an_unused_batch_is_not_asked_for_again() {
        let mut w = InoWalks::default();
        let page = listed_page();
        w.listed(2, 0, &page);
        let mut batches = 0;
        for round in 0..100u64 {
            for k in 0..=u64::from(INO_RISING) {
                if w.looked(2, 1000 * round + k + 1, true) != InoNext::Nothing {
                    batches += 1;
                }
            }
            // Falling: a new rise must start.
            w.looked(2, 0, true);
        }
        assert_eq!(batches, 1);
        // Listed again (a new listing after lookups): armed again; a small listing never.
        w.listed(2, 0, &page);
        assert_eq!(
            (1..=4)
                .filter(|&i| w.looked(2, i, true) != InoNext::Nothing)
                .count(),
            1
        );
        let small = DirPage {
            entries: page.entries[..100].to_vec(),
            end: true,
        };
        w.listed(3, 0, &small);
        assert!((1..=10).all(|i| w.looked(3, i, true) == InoNext::Nothing));
    }

    /// Halfway through a full batch the walk asks for the next one in the background, from
    /// the batch's last inode number, once; after a batch that was not full (the listing's
    /// end) it does not.
    #[test]
    fn the_next_batch_is_read_ahead_halfway_through() {
        let mut w = InoWalks::default();
        let page = listed_page();
        w.listed(2, 0, &page);
        let mut next = InoNext::Nothing;
        for i in 1..=u64::from(INO_RISING) {
            next = w.looked(2, i, true);
        }
        assert_eq!(
            next,
            InoNext::Now {
                after: u64::from(INO_RISING),
                from: 0,
                to: u64::MAX
            }
        );
        w.batched(2, 5000, true, false);
        let asked: Vec<_> = (0..INO_BATCH as u64)
            .map(|i| w.looked(2, 10 + i, false))
            .enumerate()
            .filter(|(_, n)| *n != InoNext::Nothing)
            .collect();
        let ahead = InoNext::Ahead {
            after: 5000,
            from: 0,
            to: u64::MAX,
        };
        assert_eq!(asked, vec![(INO_BATCH / 2 - 1, ahead)]);
        w.batched(2, 9000, false, true);
        assert!((0..INO_BATCH as u64).all(|i| w.looked(2, 6000 + i, false) == InoNext::Nothing));
    }

    /// A worker's page whose cookies repeat is never kept as a window (it would list names
    /// forever): it is passed on as it came, cut to the budget.
    #[test]
    fn a_window_never_holds_a_cookie_twice() {
        let (fs, _counts, thread) = fake_worker(10);
        let page = DirPage {
            entries: vec![
                (b"a".to_vec(), 1, FileKind::File, 32),
                (b"b".to_vec(), 2, FileKind::File, 48),
                (b"c".to_vec(), 3, FileKind::File, 32),
            ],
            end: false,
        };
        assert!(fs.keep_window(2, 16, page.clone()).is_err());
        let w = fs
            .keep_window(
                2,
                16,
                DirPage {
                    entries: page.entries[..2].to_vec(),
                    end: false,
                },
            )
            .unwrap();
        assert_eq!(w.page(32, 4096).unwrap().entries.len(), 1);
        assert!(w.page(48, 4096).is_none());
        assert!(w.page(999, 4096).is_none());
        // Continued from its last cookie: the window keeps its tail, still without repeats.
        let more = DirPage {
            entries: vec![(b"c".to_vec(), 3, FileKind::File, 16)],
            end: true,
        };
        assert!(fs.keep_window(2, 48, more).is_err());
        drop(fs);
        thread.join().unwrap();
    }

    #[test]
    fn a_page_whose_cookies_go_nowhere_is_refused() {
        let b = page_reply(false, &[("a", 10), ("b", 20)]);
        let p = read_page(&mut R::new(&b), b.len(), 0).unwrap();
        assert_eq!((p.entries.len(), p.end, p.entries[1].3), (2, false, 20));
        // The cookie asked for again: the kernel would list the same names forever.
        let b = page_reply(false, &[("a", 10)]);
        assert!(read_page(&mut R::new(&b), b.len(), 10).is_err());
        // An empty page before the end, a cookie the READDIR offset cannot carry.
        let b = page_reply(false, &[]);
        assert!(read_page(&mut R::new(&b), b.len(), 0).is_err());
        let b = page_reply(true, &[("a", u64::MAX)]);
        assert!(read_page(&mut R::new(&b), b.len(), 0).is_err());
        // A count the frame cannot hold.
        let mut b = page_reply(true, &[]);
        b[1..5].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(read_page(&mut R::new(&b), b.len(), 0).is_err());
    }

    #[test]
    fn a_sound_map_is_kept() {
        let b = reply(
            10_000,
            &[
                (100, 3996, wire::PLACE_DISK, 8192),
                (4096, 4096, wire::PLACE_ZERO, 0),
                (8192, 1808, wire::PLACE_READER, 0),
            ],
        );
        let Mapped::Window { start, map } = decode(&b, 100, 1 << 20).unwrap() else {
            panic!("not a window");
        };
        assert_eq!((start, map.size, map.end(start)), (100, 10_000, 10_000));
        assert_eq!(map.runs[0].place, Place::Disk(8192));
        // At the end of the file: no runs.
        assert!(decode(&reply(10_000, &[]), 10_000, 1 << 20).is_ok());
        assert!(matches!(decode(&[0], 0, 1 << 20).unwrap(), Mapped::No));
    }

    #[test]
    fn a_lying_map_is_refused() {
        let vol = 1 << 20;
        let bad = [
            // Outside the volume, or overflowing.
            reply(8192, &[(0, 8192, wire::PLACE_DISK, vol - 4096)]),
            reply(8192, &[(0, 8192, wire::PLACE_DISK, u64::MAX - 10)]),
            // Not starting where asked, a gap, an overlap, an empty run.
            reply(8192, &[(1, 8191, wire::PLACE_ZERO, 0)]),
            reply(
                8192,
                &[
                    (0, 100, wire::PLACE_ZERO, 0),
                    (200, 100, wire::PLACE_ZERO, 0),
                ],
            ),
            reply(
                8192,
                &[
                    (0, 100, wire::PLACE_ZERO, 0),
                    (50, 100, wire::PLACE_ZERO, 0),
                ],
            ),
            reply(8192, &[(0, 0, wire::PLACE_ZERO, 0)]),
            // Past the file's size; runs for an offset past the end; none before it.
            reply(8192, &[(0, 8193, wire::PLACE_ZERO, 0)]),
            reply(0, &[(0, 1, wire::PLACE_ZERO, 0)]),
            reply(8192, &[]),
            // An unknown place; a count larger than the runs sent or than allowed.
            reply(8192, &[(0, 8192, 7, 0)]),
            W::new(wire::OK)
                .u8(1)
                .u64(8192)
                .u32(2)
                .u64(0)
                .u64(10)
                .u8(0)
                .done()[5..]
                .to_vec(),
            W::new(wire::OK).u8(1).u64(u64::MAX).u32(u32::MAX).done()[5..].to_vec(),
        ];
        for (i, b) in bad.iter().enumerate() {
            assert!(decode(b, 0, vol).is_err(), "case {i} accepted");
        }
    }
}

//! The worker's side: `snapfs __restore-worker UID MEM_MB WINDOW AHEAD_WINDOW`, started by the
//! daemon with its two sockets on fds 3 and 5 (and their shared windows on 4 and 6). It starts
//! its second thread, drops to `UID`, limits its address space, installs the seccomp filter on
//! both threads and only then reads its first request: no untrusted byte is parsed before the
//! sandbox is whole.
//!
//! Two threads, one per socket, share the volume's reader and the chunk cache: the main one
//! serves the walker's requests (FUSE lookups, listings, reads), the second one the directory
//! read-ahead (`prefetch_dir` in the daemon), so that read-ahead never queues behind the walker
//! nor the walker behind it. Each thread asks for its disk bytes on its own socket, through
//! its own window.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::io::Write;
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{mpsc, Arc, Mutex, OnceLock};

use crate::error::{Error, Result};
use crate::image::{BlockImage, Extent, ExtentKind};
use crate::restore::{self, ChunkCache, GuestFs, Partition, Place, Volume};

use super::window::{self, AHEAD_WINDOW_FD, WINDOW_FD};
use super::wire::{self, R, W};

/// The descriptor of the walker's socket the daemon hands over.
pub const SOCKET_FD: i32 = 3;
/// The descriptor of the read-ahead socket.
pub const AHEAD_SOCKET_FD: i32 = 5;
/// The descriptors the daemon hands over, in order: main socket, its window, read-ahead
/// socket, its window. Everything above is closed before the sandbox is set up.
pub const HANDED_FDS: [i32; 4] = [SOCKET_FD, WINDOW_FD, AHEAD_SOCKET_FD, AHEAD_WINDOW_FD];

/// One of the two sockets to the daemon and the shared window its block reads come through
/// (when the daemon gave one).
struct Channel {
    sock: UnixStream,
    window: Option<window::Mapped>,
}

static MAIN: OnceLock<Channel> = OnceLock::new();
static AHEAD: OnceLock<Channel> = OnceLock::new();

thread_local! {
    /// The channel of the thread running: where its reader's block reads are asked.
    static CHANNEL: Cell<Option<&'static Channel>> = const { Cell::new(None) };
}

/// The volume's reader, opened by the main thread (`OPEN`), shared with the read-ahead one.
static FS: Mutex<Option<Arc<dyn GuestFs>>> = Mutex::new(None);

/// Entry point of the hidden subcommand; never returns.
pub fn main(args: &[String]) -> ! {
    // A reader's panic message must not go anywhere (stderr is /dev/null anyway).
    std::panic::set_hook(Box::new(|_| {}));
    let code = match sandbox(args) {
        Ok(go) => {
            // The read-ahead thread starts serving only now, inside the sandbox.
            let _ = go.send(true);
            match MAIN.get() {
                Some(ch) => {
                    CHANNEL.with(|c| c.set(Some(ch)));
                    serve(ch, true)
                }
                None => 2,
            }
        }
        Err(_) => 2,
    };
    std::process::exit(code)
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize) -> std::result::Result<T, ()> {
    args.get(i).and_then(|a| a.parse().ok()).ok_or(())
}

/// Set up the sandbox around both threads; the sender starts the read-ahead thread.
fn sandbox(args: &[String]) -> std::result::Result<mpsc::Sender<bool>, ()> {
    let uid: u32 = arg(args, 0)?;
    let mem_mb: u64 = arg(args, 1)?;
    // The daemon's windows for block reads, mapped read-only (fds 4 and 6 are then closed).
    let windows: [usize; 2] = [arg(args, 2).unwrap_or(0), arg(args, 3).unwrap_or(0)];
    let mut mapped = [None, None];
    for (i, (&bytes, fd)) in windows.iter().zip([WINDOW_FD, AHEAD_WINDOW_FD]).enumerate() {
        if bytes > 0 {
            mapped[i] = Some(window::Mapped::map(fd, bytes).ok_or(())?);
        }
    }
    let [main_window, ahead_window] = mapped;
    // SAFETY: the daemon passed fds 3 and 5 for this process's exclusive use.
    let (main_sock, ahead_sock) = unsafe {
        (
            UnixStream::from_raw_fd(SOCKET_FD),
            UnixStream::from_raw_fd(AHEAD_SOCKET_FD),
        )
    };
    let chan = |sock, window| Channel { sock, window };
    MAIN.set(chan(main_sock, main_window)).map_err(|_| ())?;
    AHEAD.set(chan(ahead_sock, ahead_window)).map_err(|_| ())?;
    // SAFETY: plain system calls on this process's own state.
    unsafe {
        // Whatever the daemon had open (FUSE, libvirt, Ceph sockets) that was not close-on-exec.
        let first = AHEAD_WINDOW_FD + 1;
        if libc::syscall(libc::SYS_close_range, first as u32, u32::MAX, 0u32) != 0 {
            for fd in first..4096 {
                libc::close(fd);
            }
        }
        // One malloc arena for both threads: a second arena would reserve 64 MiB of address
        // space at the read-ahead thread's first allocation, out of the RLIMIT_AS budget.
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
    // The read-ahead thread, started before the address space is measured (its stack counts
    // in what the worker starts with) and before the filter (thread creation needs `clone`,
    // `set_robust_list`, `rseq`, which the filter refuses); it waits until the sandbox is whole.
    let go = spawn_ahead()?;
    // SAFETY: plain system calls on this process's own state.
    unsafe {
        // The address space we start with (the binary, libraries, stack) plus the budget.
        let base = vm_size().ok_or(())?;
        let limit = base.saturating_add(mem_mb << 20);
        let rl = |v: u64| libc::rlimit {
            rlim_cur: v,
            rlim_max: v,
        };
        if libc::setrlimit(libc::RLIMIT_AS, &rl(limit)) != 0
            || libc::setrlimit(libc::RLIMIT_CORE, &rl(0)) != 0
            || libc::setrlimit(libc::RLIMIT_NOFILE, &rl(8)) != 0
        {
            return Err(());
        }
        if (libc::geteuid() == 0 || libc::getegid() == 0)
            && (libc::setgroups(0, std::ptr::null()) != 0
                || libc::setresgid(uid, uid, uid) != 0
                || libc::setresuid(uid, uid, uid) != 0)
        {
            return Err(());
        }
        // Really unprivileged: root cannot be had back.
        if libc::getuid() == 0 || libc::geteuid() == 0 || libc::setuid(0) == 0 {
            return Err(());
        }
        // Changing credentials cleared the parent-death signal: set it now.
        if libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        ) != 0
            || libc::getppid() == 1
            || libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1 as libc::c_ulong, 0, 0, 0) != 0
        {
            return Err(());
        }
    }
    // Seed the hash keys now (getrandom) rather than on the first listing.
    let _ = std::collections::HashMap::<u8, u8>::new();
    let prog = filter().map_err(|_| ())?;
    // On both threads at once (TSYNC): the read-ahead thread is already running.
    seccompiler::apply_filter_all_threads(&prog).map_err(|_| ())?;
    Ok(go)
}

/// Start the read-ahead thread and wait until it runs (its start-up system calls are done);
/// it serves the read-ahead socket once it gets `true`.
fn spawn_ahead() -> std::result::Result<mpsc::Sender<bool>, ()> {
    let (ready_tx, ready_rx) = mpsc::sync_channel::<()>(1);
    let (go_tx, go_rx) = mpsc::channel::<bool>();
    std::thread::Builder::new()
        .spawn(move || {
            let _ = ready_tx.send(());
            if go_rx.recv() == Ok(true) {
                if let Some(ch) = AHEAD.get() {
                    CHANNEL.with(|c| c.set(Some(ch)));
                    serve(ch, false);
                }
            }
            // The daemon closed this socket or broke the protocol on it: it ends the worker;
            // a thread's exit is left out of what the filter must allow.
            loop {
                std::thread::park();
            }
        })
        .map_err(|_| ())?;
    ready_rx.recv().map_err(|_| ())?;
    Ok(go_tx)
}

/// VmSize of this process in bytes.
fn vm_size() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmSize:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb << 10)
}

/// The system calls reading needs; any other kills the process (`SECCOMP_RET_KILL_PROCESS`).
/// Listed in docs/restore.md: keep both in step.
pub fn filter() -> std::result::Result<seccompiler::BpfProgram, seccompiler::Error> {
    use seccompiler::{
        SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
    };
    let no_exec = |arg: u8| -> std::result::Result<Vec<SeccompRule>, seccompiler::Error> {
        Ok(vec![SeccompRule::new(vec![SeccompCondition::new(
            arg,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64),
            0,
        )?])?])
    };
    // SAFETY: getpid has no preconditions.
    let me = unsafe { libc::getpid() } as u64;
    let own_pid = vec![SeccompRule::new(vec![SeccompCondition::new(
        0,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        me,
    )?])?];
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for nr in [
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_readv,
        libc::SYS_writev,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_close,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_brk,
        libc::SYS_madvise,
        libc::SYS_futex,
        libc::SYS_exit,
        libc::SYS_exit_group,
        libc::SYS_rt_sigreturn,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigaction,
        libc::SYS_sigaltstack,
        libc::SYS_clock_gettime,
        libc::SYS_clock_nanosleep,
        libc::SYS_nanosleep,
        libc::SYS_getrandom,
        libc::SYS_sched_yield,
        libc::SYS_getpid,
        libc::SYS_gettid,
    ] {
        rules.insert(nr, vec![]);
    }
    rules.insert(libc::SYS_mmap, no_exec(2)?);
    rules.insert(libc::SYS_mprotect, no_exec(2)?);
    // abort(3) raises SIGABRT at itself: an allocation over RLIMIT_AS ends that way.
    rules.insert(libc::SYS_tgkill, own_pid);
    let arch = std::env::consts::ARCH.try_into().map_err(|_| {
        seccompiler::Error::Backend(seccompiler::BackendError::InvalidTargetArch(
            std::env::consts::ARCH.into(),
        ))
    })?;
    let f = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        arch,
    )?;
    f.try_into().map_err(seccompiler::Error::Backend)
}

/// The disk as the worker sees it: bytes asked of the daemon over the socket of the thread that
/// reads (each thread has its own, [`CHANNEL`]), reads inside one
/// 64 KiB chunk through a read-around cache of such chunks (probes and the readers' metadata
/// reads would otherwise each be a round trip; the readers' own chunk caches are smaller, a
/// round trip costs more than a function call, and file bytes do not come this way: `MAP`).
/// The read-around adapts as [`ChunkCache`] does: a chunk is read whole once it is read in
/// sequence, a scattered miss reads only its 4 KiB.
struct RemoteImage {
    size: u64,
    chunks: ChunkCache,
}

const CHUNK: u64 = 64 << 10;
const CHUNKS: usize = 128;

impl RemoteImage {
    fn fetch(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let io = |e: std::io::Error| Error::Io {
            context: "restore worker: block read".into(),
            source: e,
        };
        let ch = CHANNEL
            .with(Cell::get)
            .ok_or_else(|| Error::Backend("restore worker: block read outside a channel".into()))?;
        let mut s = &ch.sock;
        // Pieces that fit the window, when there is one.
        let most = ch
            .window
            .as_ref()
            .map_or(wire::MAX_BLOCK_READ as usize, |w| {
                w.bytes().min(wire::MAX_BLOCK_READ as usize)
            })
            .max(1);
        for (i, piece) in buf.chunks_mut(most).enumerate() {
            let off = offset + (i as u64) * most as u64;
            let req = W::new(wire::BLOCK_READ)
                .u64(off)
                .u32(piece.len() as u32)
                .done();
            wire::write_frame(&mut s, &req).map_err(io)?;
            let mut reply = Vec::new();
            if !wire::read_frame(&mut s, &mut reply).map_err(io)? {
                return Err(io(std::io::ErrorKind::UnexpectedEof.into()));
            }
            let mut r = R::new(&reply);
            match r.u8()? {
                wire::OK => {
                    let data = r.rest();
                    if data.len() != piece.len() {
                        return Err(Error::Backend("restore worker: short block read".into()));
                    }
                    piece.copy_from_slice(data);
                }
                wire::IN_WINDOW => {
                    let fits = r.u32()? as usize == piece.len()
                        && ch.window.as_ref().is_some_and(|w| w.copy_to(piece));
                    if !fits {
                        return Err(Error::Backend("restore worker: bad window answer".into()));
                    }
                }
                _ => return Err(r.error()?),
            }
        }
        Ok(())
    }
}

impl BlockImage for RemoteImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.chunks
            .read_from(self.size, offset, buf, &|o, b| self.fetch(b, o))
    }

    fn map(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        let end = offset.saturating_add(length).min(self.size);
        Ok(if offset < end {
            vec![Extent {
                offset,
                length: end - offset,
                kind: ExtentKind::Data,
            }]
        } else {
            Vec::new()
        })
    }

    fn describe(&self) -> String {
        "disk served by the snapfs daemon".into()
    }
}

/// Answer the requests of one socket until it closes; only the main one may `OPEN`.
fn serve(ch: &Channel, main: bool) -> i32 {
    let sock = &ch.sock;
    let mut buf = Vec::new();
    loop {
        match wire::read_frame(&mut &*sock, &mut buf) {
            Ok(true) => {}
            Ok(false) => return 0,
            Err(_) => return 3,
        }
        let out = handle(&buf, main);
        let frame = match out {
            Ok(Reply::Frame(f)) => f,
            Ok(Reply::Payload(data)) => {
                if wire::write_payload(&mut &*sock, wire::OK, &data).is_err() {
                    return 3;
                }
                continue;
            }
            Err(e) => W::new(wire::ERR).error(&e).done(),
        };
        if (&*sock).write_all(&frame).is_err() {
            return 3;
        }
    }
}

enum Reply {
    Frame(Vec<u8>),
    Payload(Vec<u8>),
}

fn handle(req: &[u8], main: bool) -> Result<Reply> {
    let mut r = R::new(req);
    let tag = r.u8()?;
    if tag == wire::OPEN {
        if !main {
            return Err(Error::Backend(
                "restore worker: open on the read-ahead socket".into(),
            ));
        }
        let size = r.u64()?;
        let part = Partition {
            offset: r.u64()?,
            length: r.u64()?,
            name: r.string()?,
            type_desc: r.string()?,
        };
        let disk: Arc<dyn BlockImage> = Arc::new(RemoteImage {
            size,
            chunks: ChunkCache::new(CHUNK, CHUNKS),
        });
        let w = W::new(wire::OK);
        return Ok(Reply::Frame(match restore::open_volume(disk, &part)? {
            Volume::Fs(f) => {
                let w = w
                    .u8(wire::OPENED_FS)
                    .u64(f.root())
                    .bytes(f.describe().as_bytes());
                *FS.lock().unwrap_or_else(|p| p.into_inner()) = Some(f);
                w.done()
            }
            Volume::Unsupported { readme } => {
                w.u8(wire::OPENED_README).bytes(readme.as_bytes()).done()
            }
            Volume::Lvm(_) => w.u8(wire::OPENED_LVM).done(),
        }));
    }
    match tag {
        wire::TEST_OPEN => {
            // The filter kills us here; should it not, say so.
            // SAFETY: a constant NUL-terminated path.
            let fd = unsafe { libc::open(c"/etc/hostname".as_ptr(), libc::O_RDONLY) };
            return Err(Error::Backend(format!(
                "restore worker: open(2) was allowed (fd {fd}): the seccomp filter is missing"
            )));
        }
        wire::TEST_HANG => loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        },
        _ => {}
    }
    let fs = FS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .ok_or_else(|| Error::Backend("restore worker: no volume opened".into()))?;
    let ok = || W::new(wire::OK);
    Ok(Reply::Frame(match tag {
        wire::STAT => stat_reply(fs.as_ref(), fs.stat(r.u64()?)?),
        wire::LOOKUP => {
            let dir = r.u64()?;
            stat_reply(fs.as_ref(), fs.lookup(dir, r.bytes()?)?)
        }
        wire::LOOKUPS => {
            let dir = r.u64()?;
            let n = r.u32()? as usize;
            if n > wire::MAX_LOOKUPS {
                return Err(Error::Backend("restore worker: too many lookups".into()));
            }
            let mut w = ok().u32(n as u32);
            for _ in 0..n {
                w = write_lookup(fs.as_ref(), w, dir, r.bytes()?);
            }
            w.done()
        }
        wire::LOOKUPS_BY_INO => {
            let dir = r.u64()?;
            let after = r.u64()?;
            let from = r.u64()?;
            let to = r.u64()?;
            let max = (r.u32()? as usize).min(wire::MAX_INO_BATCH);
            let picked = smallest_above(fs.as_ref(), dir, after, from, to, max)?;
            let mut w = ok().u32(picked.len() as u32);
            for (_, name, _) in &picked {
                w = write_lookup(fs.as_ref(), w.bytes(name), dir, name);
            }
            let subdirs = picked.iter().filter(|e| e.2).map(|e| e.0);
            write_ahead(
                fs.as_ref(),
                w,
                subdirs,
                wire::MAX_INO_BATCH,
                wire::INO_BATCH_LISTING_BYTES,
            )
            .done()
        }
        wire::READDIR => {
            let list = fs.readdir(r.u64()?)?;
            let w = write_listing(ok(), &list);
            let subdirs = list
                .iter()
                .filter(|e| e.2 == restore::FileKind::Dir)
                .map(|e| e.1);
            write_ahead(
                fs.as_ref(),
                w,
                subdirs,
                wire::AHEAD_LISTINGS,
                wire::AHEAD_LISTING_BYTES,
            )
            .done()
        }
        wire::READDIR_PAGE => {
            let dir = r.u64()?;
            let cookie = r.u64()?;
            let budget = r.u32()?.min(wire::MAX_PAGE_BUDGET) as usize;
            // A large budget is there to bring a small directory whole (its listing is kept
            // on the daemon's side); a paged directory's page is cut to what READDIRs use,
            // so that neither side decodes megabytes of entries for one 4 KiB READDIR.
            let mut page = fs.readdir_page(dir, cookie, budget.min(wire::PAGED_PAGE_BUDGET))?;
            let whole = page
                .entries
                .first()
                .is_some_and(|e| e.3 & restore::INDEX_COOKIE != 0);
            if whole && !page.end && budget > wire::PAGED_PAGE_BUDGET {
                page = fs.readdir_page(dir, cookie, budget)?;
            }
            let mut w = ok().u8(u8::from(page.end)).u32(page.entries.len() as u32);
            for (name, ino, kind, next) in &page.entries {
                w = wire::write_kind(w.bytes(name).u64(*ino), *kind).u64(*next);
            }
            write_ahead(
                fs.as_ref(),
                w,
                page.subdirs().into_iter(),
                wire::AHEAD_LISTINGS,
                wire::AHEAD_LISTING_BYTES,
            )
            .done()
        }
        wire::READ => {
            let ino = r.u64()?;
            let off = r.u64()?;
            let len = (r.u32()? as usize).min(wire::MAX_FRAME - 16);
            let mut data = vec![0u8; len];
            let n = fs.read(ino, off, &mut data)?;
            data.truncate(n);
            return Ok(Reply::Payload(data));
        }
        wire::READLINK => {
            let t = fs.readlink(r.u64()?)?;
            return Ok(Reply::Payload(t));
        }
        wire::XATTRS => write_xattrs(ok(), &fs.xattrs(r.u64()?)?).done(),
        wire::PREFETCH_DIR => {
            let subs = fs.prefetch_dir(r.u64()?);
            let mut w = ok().u32(subs.len() as u32);
            for s in subs {
                w = w.u64(s);
            }
            w.done()
        }
        wire::MAP => {
            let ino = r.u64()?;
            let off = r.u64()?;
            match fs.map(ino, off, r.u64()?)? {
                None => ok().u8(0).done(),
                Some(m) => write_map(ok().u8(1), &m).done(),
            }
        }
        wire::CHECK_OPEN => {
            fs.check_open(r.u64()?)?;
            ok().done()
        }
        wire::DATA_RANGES => match fs.data_ranges(r.u64()?)? {
            None => ok().u8(0).done(),
            Some(v) => {
                let mut w = ok().u8(1).u32(v.len() as u32);
                for (o, l) in v {
                    w = w.u64(o).u64(l);
                }
                w.done()
            }
        },
        _ => {
            return Err(Error::Backend(format!(
                "restore worker: unknown request {tag}"
            )))
        }
    }))
}

/// One name's `LOOKUPS` answer: 0 and its attributes, whether it may be opened, its extended
/// attributes when small and the map of a small file; or 1 and the error.
fn write_lookup(fs: &dyn GuestFs, w: W, dir: u64, name: &[u8]) -> W {
    match fs.lookup(dir, name) {
        Ok(st) => {
            let openable = st.kind != restore::FileKind::File || fs.check_open(st.ino).is_ok();
            let w = w.u8(0).stat(&st).u8(u8::from(openable));
            let w = match fs.xattrs(st.ino) {
                Ok(x)
                    if x.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
                        <= wire::AHEAD_XATTR_BYTES =>
                {
                    write_xattrs(w.u8(1), &x)
                }
                _ => w.u8(0),
            };
            if st.kind != restore::FileKind::File || st.size > wire::AHEAD_MAP_SIZE {
                w.u8(0)
            } else {
                match fs.map(st.ino, 0, st.size) {
                    Ok(None) => w.u8(1),
                    Ok(Some(m)) if m.runs.len() <= wire::AHEAD_MAP_RUNS => write_map(w.u8(2), &m),
                    _ => w.u8(0),
                }
            }
        }
        Err(e) => w.u8(1).error(&e),
    }
}

/// `dir`'s entries listed from cookie `from` up to the one whose cookie is `to` (to the end
/// when none is): the `max` whose inode numbers are the smallest above `after`, ascending (see
/// [`wire::LOOKUPS_BY_INO`]). Memory: `max` names and one page; time: the entries in the range
/// (at most [`wire::MAX_INO_SCAN`]).
fn smallest_above(
    fs: &dyn GuestFs,
    dir: u64,
    after: u64,
    from: u64,
    to: u64,
    max: usize,
) -> Result<Vec<(u64, Vec<u8>, bool)>> {
    // (inode, name, is a directory); the largest inode on top, dropped first.
    let mut best: std::collections::BinaryHeap<(u64, Vec<u8>, bool)> =
        std::collections::BinaryHeap::with_capacity(max + 1);
    let mut cookie = from;
    let mut seen = 0usize;
    'pages: while max > 0 && seen < wire::MAX_INO_SCAN {
        let page = fs.readdir_page(dir, cookie, wire::PAGED_PAGE_BUDGET)?;
        if page.entries.is_empty() {
            break;
        }
        for (name, ino, kind, next) in page.entries {
            seen += 1;
            let dot = name == b"." || name == b"..";
            if !dot && ino > after && (best.len() < max || best.peek().is_some_and(|t| ino < t.0)) {
                best.push((ino, name, kind == restore::FileKind::Dir));
                if best.len() > max {
                    best.pop();
                }
            }
            if next == to {
                break 'pages;
            }
            cookie = next;
        }
        if page.end {
            break;
        }
    }
    Ok(best.into_sorted_vec())
}

/// A stat reply: the attributes, then whether a regular file may be opened (1) or `open`
/// must ask (0: `CHECK_OPEN` gives the error), so most opens need no round trip.
fn stat_reply(fs: &dyn GuestFs, st: restore::FileStat) -> Vec<u8> {
    let openable = st.kind != restore::FileKind::File || fs.check_open(st.ino).is_ok();
    W::new(wire::OK).stat(&st).u8(u8::from(openable)).done()
}

fn write_xattrs(mut w: W, x: &[(Vec<u8>, Vec<u8>)]) -> W {
    w = w.u32(x.len() as u32);
    for (k, v) in x {
        w = w.bytes(k).bytes(v);
    }
    w
}

/// A file map: size, run count, runs (offset, length, place[, disk offset]).
fn write_map(mut w: W, m: &restore::FileMap) -> W {
    w = w.u64(m.size).u32(m.runs.len() as u32);
    for run in &m.runs {
        w = w.u64(run.offset).u64(run.len);
        w = match run.place {
            Place::Zero => w.u8(wire::PLACE_ZERO),
            Place::Disk(d) => w.u8(wire::PLACE_DISK).u64(d),
            Place::Reader => w.u8(wire::PLACE_READER),
        };
    }
    w
}

/// After a listing or a page: the listings of its first subdirectories, which a walk wants
/// next (a subdirectory that cannot be listed, or a large one, is left for the daemon to ask
/// about: it meets the error then). Small directories only: a large one is listed by pages.
/// At most `max` listings, while the answer stays under `max_bytes`.
fn write_ahead(
    fs: &dyn GuestFs,
    mut w: W,
    subdirs: impl Iterator<Item = u64>,
    max: usize,
    max_bytes: usize,
) -> W {
    let mut ahead = Vec::new();
    let start = w.0.len();
    let mut bytes = start;
    let max_bytes = start.saturating_add(max_bytes);
    for ino in subdirs {
        if ahead.len() >= max || bytes >= max_bytes {
            break;
        }
        // A small directory's cookies are listing positions; a paged one's are not.
        let small = fs.readdir_page(ino, 0, 0).is_ok_and(|p| {
            p.entries
                .first()
                .is_none_or(|e| e.3 & restore::INDEX_COOKIE != 0)
        });
        if !small {
            continue;
        }
        if let Ok(sub) = fs.readdir(ino) {
            let size: usize = sub.iter().map(|(n, _, _)| n.len() + 13).sum();
            if bytes + size > max_bytes {
                break;
            }
            bytes += size + 12;
            ahead.push((ino, sub));
        }
    }
    w = w.u32(ahead.len() as u32);
    for (ino, sub) in &ahead {
        w = write_listing(w.u64(*ino), sub);
    }
    w
}

fn write_listing(mut w: W, list: &restore::DirList) -> W {
    w = w.u32(list.len() as u32);
    for (name, ino, kind) in list.iter() {
        w = wire::write_kind(w.bytes(name).u64(*ino), *kind);
    }
    w
}

//! Glue from fuser's callbacks to [`SnapFs`]: each callback calls one core method and
//! replies with its result. Errors go through [`reply_err!`], the one place that logs them
//! and turns them into an errno. Keep logic out of this file, so the core stays testable
//! without a kernel.

use std::ffi::OsStr;
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, BsdFileFlags, Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use std::collections::HashMap;
use std::ffi::OsString;
use std::sync::{Arc, Mutex, MutexGuard};

use tracing::debug;

use crate::error::Error;
use crate::fairness::Gate;
use crate::fs::{Attr, SnapFs, Whence};
use crate::namespace::{names, Kind};
use crate::passthrough::{Backings, Refused};

/// How long the kernel may trust names and attributes. Snapshots do not change, but the
/// lists of instances, volumes and snapshots can change behind our back.
const TTL: Duration = Duration::from_secs(1);
/// The same for guest files ([`crate::namespace::Stat::fixed`]): a walk repeated within it
/// needs no lookup. Reaching them still goes through the snapshot's own (short-lived) entry,
/// so a deleted snapshot's files are gone as soon as it is.
const GUEST_TTL: Duration = Duration::from_secs(3600);

/// Validity of `a`'s attributes and, found in directory `parent`, of its name. A guest file
/// is cached long only below a guest directory: the name of a filesystem's root (a partition
/// of a snapshot's disk, looked up in our own directory) must be asked again soon, since a
/// snapshot taken again under the same name gives it another inode.
fn ttl(parent: Option<u64>, a: &Attr) -> Duration {
    let parent_fixed = parent.is_none_or(crate::namespace::files::is_guest_node);
    if a.stat.fixed() && parent_fixed {
        GUEST_TTL
    } else {
        TTL
    }
}

/// Log an error at the level its kind deserves and reply with its errno.
macro_rules! reply_err {
    ($reply:expr, $op:expr, $err:expr) => {{
        let e: Error = $err;
        if e.is_refusal() {
            debug!(op = $op, error = %e, "refused");
        } else {
            $crate::log_limit::warn_error($op, &e);
        }
        $reply.error(Errno::from_i32(e.errno()))
    }};
}

/// Cheap to clone: a request waiting in its volume's queue ([`crate::fairness`]) holds one.
#[derive(Clone)]
pub struct Fuse {
    fs: Arc<SnapFs>,
    readdirplus: bool,
    /// Raw snapshot disks opened in FUSE passthrough (see [`crate::passthrough`]).
    backings: Arc<Backings<fuser::BackingId>>,
    /// Which volume's requests may take a thread now.
    gate: Arc<Gate>,
    /// The volume key of each open handle (open and opendir put it, release takes it).
    handle_vols: Arc<Mutex<HashMap<u64, u64>>>,
}

impl Fuse {
    /// `readdirplus`: offer READDIRPLUS in its adaptive mode (the kernel asks for attributes
    /// with the first page of a listing, and with later ones once names of it were looked up).
    /// `threads`: the session's FUSE threads, shared fairly between volumes.
    pub fn new(fs: Arc<SnapFs>, readdirplus: bool, threads: usize) -> Self {
        Fuse {
            fs,
            readdirplus,
            backings: Arc::default(),
            gate: Arc::new(Gate::new(threads)),
            handle_vols: Arc::default(),
        }
    }

    /// Run `job` (a request of node `ino`) when its volume may take a thread.
    fn gated(&self, ino: u64, job: impl FnOnce(Fuse) + Send + 'static) {
        let me = self.clone();
        self.gate
            .run(self.fs.volume_key(ino), Box::new(move || job(me)));
    }

    /// The same for a request on open handle `fh`.
    fn gated_fh(&self, fh: u64, job: impl FnOnce(Fuse) + Send + 'static) {
        let vol = lock(&self.handle_vols).get(&fh).copied();
        let me = self.clone();
        self.gate.run(vol, Box::new(move || job(me)));
    }

    fn opened_handle(&self, ino: u64, fh: u64) {
        if let Some(v) = self.fs.volume_key(ino) {
            lock(&self.handle_vols).insert(fh, v);
        }
    }

    /// Reply to an open of a disk whose bytes are a host file's in passthrough, when the
    /// connection has it; `reply` back when this open goes through the daemon.
    fn open_passthrough(&self, ino: u64, fh: u64, reply: ReplyOpen) -> Option<ReplyOpen> {
        if !self.backings.enabled() {
            return Some(reply);
        }
        let Some((file, id)) = self.fs.passthrough_file(fh) else {
            return Some(reply);
        };
        let res = self.backings.open(
            ino,
            fh,
            id,
            reply,
            |r| r.open_backing(&file),
            |r, b| {
                // Before the reply: once open(2) returns, the line is in the log.
                debug!(ino, fh, "opened in passthrough");
                r.opened_passthrough(FileHandle(fh), FopenFlags::empty(), b)
            },
        );
        match res {
            Ok(()) => None,
            Err((Refused::OtherFile, reply)) => {
                let e = Error::Busy(format!(
                    "an earlier open of this name reads another file (inode {ino}); close it first"
                ));
                self.fs.release(fh);
                reply_err!(reply, "open", e);
                None
            }
            Err((Refused::Kernel(e), reply)) => {
                crate::log_limit::warn_error(
                    "passthrough",
                    &Error::io("FUSE passthrough refused: read through the daemon", e),
                );
                Some(reply)
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A name from the kernel as the tree's string (bytes that are not UTF-8 are mapped
/// reversibly, see [`names::from_bytes`]; guest files may have such names).
fn name_str(name: &OsStr) -> std::borrow::Cow<'_, str> {
    use std::os::unix::ffi::OsStrExt;
    names::from_bytes(name.as_bytes())
}

/// A name of the tree as the bytes the kernel gets.
fn name_os(name: &str) -> std::borrow::Cow<'_, OsStr> {
    use std::os::unix::ffi::OsStrExt;
    match names::to_bytes(name) {
        std::borrow::Cow::Borrowed(b) => std::borrow::Cow::Borrowed(OsStr::from_bytes(b)),
        std::borrow::Cow::Owned(b) => {
            std::borrow::Cow::Owned(std::os::unix::ffi::OsStringExt::from_vec(b))
        }
    }
}

fn file_type(k: Kind) -> FileType {
    match k {
        Kind::Dir => FileType::Directory,
        Kind::File => FileType::RegularFile,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
        Kind::CharDev => FileType::CharDevice,
        Kind::BlockDev => FileType::BlockDevice,
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    let s = &a.stat;
    let (uid, gid) = s.owner.unwrap_or((a.uid, a.gid));
    FileAttr {
        ino: INodeNo(a.ino),
        size: s.size,
        blocks: s.allocated.div_ceil(512),
        atime: s.atime.unwrap_or(s.mtime),
        mtime: s.mtime,
        ctime: s.ctime.unwrap_or(s.mtime),
        crtime: s.mtime,
        kind: file_type(s.kind),
        perm: s.perm,
        nlink: s.nlink.unwrap_or(if s.kind == Kind::Dir { 2 } else { 1 }),
        uid,
        gid,
        rdev: s.rdev,
        blksize: a.blksize,
        flags: 0,
    }
}

/// The requests that pass the gate, run when their volume may take a thread.
impl Fuse {
    fn do_lookup(&self, parent: INodeNo, name: OsString, reply: ReplyEntry) {
        match self.fs.lookup(parent.0, &name_str(&name)) {
            Ok(a) => reply.entry(&ttl(Some(parent.0), &a), &file_attr(&a), Generation(0)),
            Err(e @ Error::NotFound(_)) => {
                debug!(op = "lookup", error = %e);
                reply.error(Errno::ENOENT)
            }
            Err(e) => reply_err!(reply, "lookup", e),
        }
    }

    fn do_getattr(&self, ino: INodeNo, reply: ReplyAttr) {
        match self.fs.getattr(ino.0) {
            Ok(a) => reply.attr(&ttl(None, &a), &file_attr(&a)),
            Err(e) => reply_err!(reply, "getattr", e),
        }
    }

    fn do_readlink(&self, ino: INodeNo, reply: ReplyData) {
        match self.fs.readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply_err!(reply, "readlink", e),
        }
    }

    fn do_open(&self, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let write = flags.acc_mode() != OpenAccMode::O_RDONLY
            || flags.0 & (libc::O_TRUNC | libc::O_APPEND) != 0;
        match self.fs.open(ino.0, write) {
            Ok(o) => {
                self.opened_handle(ino.0, o.fh);
                let Some(reply) = self.open_passthrough(ino.0, o.fh, reply) else {
                    return;
                };
                let mut f = FopenFlags::empty();
                if o.keep_cache {
                    f |= FopenFlags::FOPEN_KEEP_CACHE;
                }
                if o.direct_io {
                    f |= FopenFlags::FOPEN_DIRECT_IO;
                }
                reply.opened(FileHandle(o.fh), f)
            }
            Err(e) => reply_err!(reply, "open", e),
        }
    }

    fn do_read(&self, fh: FileHandle, offset: u64, size: u32, reply: ReplyData) {
        let mut reply = Some(reply);
        let res = self.fs.read(fh.0, offset, size, |data| {
            if let Some(r) = reply.take() {
                r.data(data)
            }
        });
        if let (Err(e), Some(r)) = (res, reply.take()) {
            crate::log_limit::warn_error("read", &e);
            debug!(op = "read", fh = fh.0, offset, size, "read failed");
            r.error(Errno::from_i32(e.errno()))
        }
    }

    fn do_opendir(&self, ino: INodeNo, reply: ReplyOpen) {
        let res = self.fs.opendir(ino.0);
        if let Ok(o) = &res {
            self.opened_handle(ino.0, o.fh);
        }
        match res {
            // A fixed listing stays in the kernel's cache: later opens read it from there.
            Ok(o) if o.keep_cache => reply.opened(
                FileHandle(o.fh),
                FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE,
            ),
            Ok(o) => reply.opened(FileHandle(o.fh), FopenFlags::empty()),
            Err(e) => reply_err!(reply, "opendir", e),
        }
    }

    fn do_readdir(&self, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let dir = match self.fs.readdir(fh.0) {
            Ok(e) => e,
            Err(e) => return reply_err!(reply, "readdir", e),
        };
        let page = match self
            .fs
            .dir_page(&dir, offset, crate::restore::READDIR_BUDGET)
        {
            Ok(p) => p,
            Err(e) => return reply_err!(reply, "readdir", e),
        };
        for (next, e) in page {
            if reply.add(INodeNo(e.ino), next, file_type(e.kind), name_os(&e.name)) {
                break;
            }
        }
        reply.ok()
    }

    fn do_readdirplus(
        &self,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let dir = match self.fs.readdir(fh.0) {
            Ok(e) => e,
            Err(e) => return reply_err!(reply, "readdirplus", e),
        };
        // An entry with attributes takes about four times the bytes of a bare one.
        let budget = crate::restore::READDIR_BUDGET / 4;
        let page = match self.fs.dir_page(&dir, offset, budget) {
            Ok(p) => p,
            Err(e) => return reply_err!(reply, "readdirplus", e),
        };
        for (next, e) in page {
            let dot = e.name == "." || e.name == "..";
            let (attr, ttl) = match self.fs.listed_attr(&dir, &e) {
                Ok(a) => (a, ttl(Some(ino.0), &a)),
                Err(err) if dot => {
                    debug!(op = "readdirplus", name = %e.name, error = %err, "entry skipped");
                    continue;
                }
                // Unreadable (a corrupt inode) or gone since opendir: listed as readdir would,
                // and the error comes from the path itself.
                Err(err) => {
                    debug!(op = "readdirplus", name = %e.name, error = %err, "entry without attributes");
                    (self.fs.placeholder_attr(&dir, &e), Duration::ZERO)
                }
            };
            if reply.add(
                INodeNo(attr.ino),
                next,
                name_os(&e.name),
                &ttl,
                &file_attr(&attr),
                Generation(0),
            ) {
                // Not sent: the kernel does not hold this lookup.
                if !dot {
                    self.fs.forget(attr.ino, 1);
                }
                break;
            }
        }
        reply.ok()
    }

    fn do_getxattr(&self, ino: INodeNo, name: OsString, size: u32, reply: ReplyXattr) {
        use std::os::unix::ffi::OsStrExt;
        match self.fs.getxattr(ino.0, name.as_bytes()) {
            Ok(v) if size == 0 => reply.size(v.len() as u32),
            Ok(v) if v.len() > size as usize => reply.error(Errno::from_i32(libc::ERANGE)),
            Ok(v) => reply.data(&v),
            Err(e) => reply_err!(reply, "getxattr", e),
        }
    }

    fn do_listxattr(&self, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self.fs.listxattr(ino.0) {
            Ok(v) if size == 0 => reply.size(v.len() as u32),
            Ok(v) if v.len() > size as usize => reply.error(Errno::from_i32(libc::ERANGE)),
            Ok(v) => reply.data(&v),
            Err(e) => reply_err!(reply, "listxattr", e),
        }
    }

    fn do_lseek(&self, fh: FileHandle, offset: i64, whence: i32, reply: ReplyLseek) {
        let whence = match whence {
            libc::SEEK_DATA => Whence::Data,
            libc::SEEK_HOLE => Whence::Hole,
            _ => return reply.error(Errno::EINVAL),
        };
        let Ok(offset) = u64::try_from(offset) else {
            return reply.error(Errno::ENXIO);
        };
        match self.fs.lseek(fh.0, offset, whence) {
            Ok(o) => reply.offset(i64::try_from(o).unwrap_or(i64::MAX)),
            Err(e) => reply_err!(reply, "lseek", e),
        }
    }
}

impl fuser::Filesystem for Fuse {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Ask for the largest read-ahead the kernel allows; the mount raises read_ahead_kb after.
        let _ = config
            .set_max_readahead(u32::MAX)
            .or_else(|max| config.set_max_readahead(max));
        // Direct-I/O files (generated files, RBD disks) can still be mmap'ed (kernel >= 6.6).
        let _ = config.add_capabilities(InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP);
        // Passthrough for raw snapshot disks: the kernel reads their host file itself. Depth
        // 1: the host files must not be on a stacked filesystem, and an overlayfs may still
        // stack on this mount.
        let passthrough = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(1).is_ok();
        self.backings.set_enabled(passthrough);
        debug!(passthrough, "FUSE init");
        if self.readdirplus {
            let _ = config.add_capabilities(
                InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_READDIRPLUS_AUTO,
            );
        }
        Ok(())
    }

    fn destroy(&mut self) {
        self.gate.drain();
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let name = name.to_os_string();
        self.gated(parent.0, move |me| me.do_lookup(parent, name, reply));
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.gated(ino.0, move |me| me.do_getattr(ino, reply));
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply_err!(reply, "setattr", self.fs.refuse(ino.0, None, "setattr"))
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.gated(ino.0, move |me| me.do_readlink(ino, reply));
    }

    fn mknod(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        let e = self.fs.refuse(parent.0, Some(&name_str(name)), "mknod");
        reply_err!(reply, "mknod", e)
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        match self.fs.mkdir(parent.0, &name_str(name)) {
            Ok(a) => reply.entry(&TTL, &file_attr(&a), Generation(0)),
            Err(e) => reply_err!(reply, "mkdir", e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.fs.unlink(parent.0, &name_str(name)) {
            Ok(()) => reply.ok(),
            Err(e) => reply_err!(reply, "unlink", e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.fs.rmdir(parent.0, &name_str(name)) {
            Ok(()) => reply.ok(),
            Err(e) => reply_err!(reply, "rmdir", e),
        }
    }

    fn symlink(
        &self,
        _req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &std::path::Path,
        reply: ReplyEntry,
    ) {
        // A launch target is a path into our own tree: UTF-8 only.
        let res = target
            .to_str()
            .ok_or_else(|| Error::Invalid(format!("{target:?} is not UTF-8")))
            .and_then(|t| self.fs.symlink(parent.0, &name_str(link_name), t));
        match res {
            Ok(a) => reply.entry(&TTL, &file_attr(&a), Generation(0)),
            Err(e) => reply_err!(reply, "symlink", e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if flags.contains(RenameFlags::RENAME_EXCHANGE) {
            let e = Error::Invalid("RENAME_EXCHANGE is not supported".into());
            return reply_err!(reply, "rename", e);
        }
        match self
            .fs
            .rename(parent.0, &name_str(name), newparent.0, &name_str(newname))
        {
            Ok(()) => reply.ok(),
            Err(e) => reply_err!(reply, "rename", e),
        }
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let e = self
            .fs
            .refuse(newparent.0, Some(&name_str(newname)), "link");
        reply_err!(reply, "link", e)
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.gated(ino.0, move |me| me.do_open(ino, flags, reply));
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.gated_fh(fh.0, move |me| me.do_read(fh, offset, size, reply));
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        reply_err!(reply, "write", self.fs.refuse(ino.0, None, "write"))
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Nothing is ever written, so close has nothing to flush: ENOSYS tells the kernel to
        // stop sending FLUSH on every close (one round trip less per file a copy opens).
        reply.error(Errno::ENOSYS);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.fs.release(fh.0);
        lock(&self.handle_vols).remove(&fh.0);
        // The last passthrough handle of an inode closes its backing id (dropped here).
        drop(self.backings.release(fh.0));
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.gated(ino.0, move |me| me.do_opendir(ino, reply));
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectory,
    ) {
        self.gated_fh(fh.0, move |me| me.do_readdir(fh, offset, reply));
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectoryPlus,
    ) {
        self.gated_fh(fh.0, move |me| me.do_readdirplus(ino, fh, offset, reply));
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.fs.release(fh.0);
        lock(&self.handle_vols).remove(&fh.0);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(0, 0, 0, 0, 0, 4096, 255, 4096);
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        use std::os::unix::ffi::OsStrExt;
        match self.fs.setxattr(ino.0, name.as_bytes(), Some(value)) {
            Ok(()) => reply.ok(),
            Err(e) => reply_err!(reply, "setxattr", e),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let name = name.to_os_string();
        self.gated(ino.0, move |me| me.do_getxattr(ino, name, size, reply));
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        self.gated(ino.0, move |me| me.do_listxattr(ino, size, reply));
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        use std::os::unix::ffi::OsStrExt;
        match self.fs.setxattr(ino.0, name.as_bytes(), None) {
            Ok(()) => reply.ok(),
            Err(e) => reply_err!(reply, "removexattr", e),
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        match self.fs.check(ino.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply_err!(reply, "access", e),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let e = self.fs.refuse(parent.0, Some(&name_str(name)), "create");
        reply_err!(reply, "create", e)
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _length: u64,
        _mode: i32,
        reply: ReplyEmpty,
    ) {
        reply_err!(reply, "fallocate", self.fs.refuse(ino.0, None, "fallocate"))
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        self.gated_fh(fh.0, move |me| me.do_lseek(fh, offset, whence, reply));
    }
}

//! The mount's life: clear a stale mount, mount, tell the waiting parent we are ready,
//! serve until unmounted or signalled, and leave nothing mounted behind.

use std::ffi::CString;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use tracing::{info, warn};

use crate::fs::{FsOptions, SnapFs};
use crate::fuse::Fuse;
use crate::image::BlockCache;
use crate::namespace::Namespace;
use crate::provider::images::ImagesProvider;
use crate::provider::libvirt::{LibvirtOptions, LibvirtProvider, Quiesce};
use crate::provider::Provider;

#[derive(Clone, Debug)]
pub struct MountConfig {
    pub mountpoint: PathBuf,
    pub images: Vec<PathBuf>,
    pub allow_other: bool,
    /// Refuse every change with EROFS (`--read-only`, fstab `ro`).
    pub read_only: bool,
    /// Keep `before-revert-…` before a revert.
    pub revert_keep: bool,
    pub state_dir: PathBuf,
    pub threads: usize,
    pub cache_bytes: usize,
    pub ttl: Duration,
    pub read_ahead_kb: u32,
    /// Offer READDIRPLUS (adaptive) to the kernel.
    pub readdirplus: bool,
    /// libvirt URI of the instances provider (None: no libvirt, or several hosts).
    pub libvirt: Option<String>,
    /// Several libvirt hosts (more than one `-c`): instances are `<domain>@<host>`.
    pub libvirt_hosts: Vec<String>,
    pub quiesce: Quiesce,
    pub freeze_timeout: Duration,
    /// Ceph RBD pools to serve (`--ceph`), if any.
    pub rbd: Option<crate::provider::rbd::RbdConfig>,
    /// Flatten the RBD clones of a launch in the background (Nova's behaviour).
    pub flatten_on_launch: bool,
    /// Which domains are cloud-managed.
    pub managed: crate::provider::libvirt::managed::ManagedPolicy,
    pub snapshot_method: crate::provider::libvirt::SnapshotMethod,
    /// The store of copy snapshots (None: `<state-dir>/store`).
    pub store: Option<PathBuf>,
    /// The pool of copies of RBD disks (`--store-pool`).
    pub store_pool: Option<String>,
    pub managed_rbd: crate::provider::libvirt::ManagedRbd,
    /// `--lvm-snapshots`, `--lvm-cow-size` (bytes).
    pub lvm_snapshots: bool,
    pub lvm_cow_size: Option<u64>,
}

/// Mount and serve in this process until unmounted. `ready` is told "READY" (or the error)
/// once the mount can be used.
pub fn serve(cfg: MountConfig, mut ready: Option<OwnedFd>) -> anyhow::Result<()> {
    let result = mount_and_serve(&cfg, &mut ready);
    if let (Err(e), Some(fd)) = (&result, ready.take()) {
        let mut f = std::fs::File::from(fd);
        let _ = writeln!(f, "ERROR {e:#}");
    }
    result
}

fn mount_and_serve(cfg: &MountConfig, ready: &mut Option<OwnedFd>) -> anyhow::Result<()> {
    // Signals are taken by one thread with sigwait; block them before any thread exists.
    let sigs = signal_set();
    block_signals(&sigs);
    fatal::report_in_log();

    let mountpoint = std::path::absolute(&cfg.mountpoint)
        .with_context(|| format!("mountpoint {}", cfg.mountpoint.display()))?;
    clear_stale_mount(&mountpoint)?;
    let mountpoint = mountpoint
        .canonicalize()
        .with_context(|| format!("mountpoint {}", mountpoint.display()))?;
    if !mountpoint.is_dir() {
        bail!("mountpoint {} is not a directory", mountpoint.display());
    }
    if let Some((_, fstype)) = mount_entry(&mountpoint) {
        if fstype.starts_with("fuse") {
            bail!(
                "{} is already a {fstype} mount; unmount it first (snapfs unmount {})",
                mountpoint.display(),
                mountpoint.display()
            );
        }
    }
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("state directory {}", cfg.state_dir.display()))?;

    let cache = Arc::new(BlockCache::new(cfg.cache_bytes));
    let mut providers: Vec<Arc<dyn Provider>> = Vec::new();
    if !cfg.images.is_empty() {
        providers.push(Arc::new(
            ImagesProvider::new(&cfg.images, cache.clone()).context("images provider")?,
        ));
    }
    let opts_for = |uri: &str| LibvirtOptions {
        uri: uri.to_string(),
        quiesce: cfg.quiesce,
        freeze_timeout: cfg.freeze_timeout,
        state_dir: cfg.state_dir.clone(),
        flatten_on_launch: cfg.flatten_on_launch,
        managed: cfg.managed.clone(),
        method: cfg.snapshot_method,
        store: cfg.store.clone(),
        store_pool: cfg.store_pool.clone(),
        managed_rbd: cfg.managed_rbd,
        lvm_snapshots: cfg.lvm_snapshots,
        lvm_cow_size: cfg.lvm_cow_size,
        dial: None,
    };
    // (host, provider): one without a host for a single URI.
    let mut libvirt: Vec<(Option<(String, String)>, LibvirtProvider)> = Vec::new();
    if let Some(uri) = &cfg.libvirt {
        let lv = LibvirtProvider::new(opts_for(uri), cache.clone()).context("libvirt provider")?;
        // Before the mount exists (and before Ceph, which may take its timeout to answer):
        // a guest a dead daemon left frozen is thawed first.
        lv.recover_frozen().context("thawing guests left frozen")?;
        libvirt.push((None, lv));
    } else if !cfg.libvirt_hosts.is_empty() {
        let hosts =
            crate::provider::hosts::hosts_of(&cfg.libvirt_hosts).map_err(|e| anyhow!("{e}"))?;
        // Keepalive needs libvirt's event loop running before the first connection.
        crate::libvirt::start_event_loop().map_err(|e| anyhow!("libvirt event loop: {e}"))?;
        for (host, uri) in hosts {
            let mut opts = opts_for(&uri);
            opts.dial = Some(crate::provider::hosts::DialLimits::default());
            if host != "local" {
                // Freeze records, pause records and copies of each remote host apart.
                opts.state_dir = cfg.state_dir.join("hosts").join(&host);
                opts.store = cfg.store.as_ref().map(|s| s.join("hosts").join(&host));
            }
            // Its freeze records are handled at its first connection (in new(), or when a
            // host that does not answer now comes back).
            let lv = LibvirtProvider::new(opts, cache.clone())
                .with_context(|| format!("libvirt provider of {uri}"))?;
            libvirt.push((Some((host, uri)), lv));
        }
    }
    if let Some(rbd) = &cfg.rbd {
        if rbd.pools.is_empty() && libvirt.is_empty() {
            bail!("--ceph needs at least one --pool (or --libvirt, for domains with RBD disks)");
        }
        let rbd = crate::provider::rbd::RbdProvider::new(rbd).context("rbd provider")?;
        // RBD snapshot removals a killed daemon left half done (chaos finding F2).
        rbd.recover_removals(&cfg.state_dir);
        for (_, lv) in libvirt.iter_mut() {
            lv.attach_rbd(rbd.access());
        }
        providers.push(Arc::new(rbd));
    }
    for (_, lv) in &libvirt {
        // After --ceph is attached: the store pool checked, Ceph leftovers of a killed
        // daemon removed (the file-store ones went in recover_frozen).
        lv.prepare_rbd_store().context("--store-pool")?;
    }
    let at = usize::from(!cfg.images.is_empty());
    for (i, (host, lv)) in libvirt.into_iter().enumerate() {
        let p: Arc<dyn Provider> = match host {
            None => Arc::new(lv),
            Some((host, uri)) => {
                let lv = Arc::new(lv);
                // A remote host's image files are read through its storage API.
                let files: Option<crate::provider::hosts::FilesOf> = (host != "local").then(|| {
                    let lv = lv.clone();
                    Arc::new(move || lv.remote_files()) as crate::provider::hosts::FilesOf
                });
                Arc::new(crate::provider::hosts::HostProvider::new(
                    &host, &uri, lv, files,
                ))
            }
        };
        providers.insert(at + i, p);
    }
    if providers.is_empty() {
        warn!("no provider configured (--images DIR, --libvirt): the tree will be empty");
    }
    let ns = Namespace::new(providers, mountpoint.clone(), cfg.ttl)
        .with_state(&cfg.state_dir, cfg.revert_keep);
    // Before the mount serves: a revert a killed daemon began is resolved, so `current`
    // names the state the instance or volume is in.
    let resolved = ns.recover_reverts();
    if resolved > 0 {
        info!(resolved, "reverts a previous daemon was killed in resolved");
    }
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let fs = Arc::new(SnapFs::new(
        ns,
        FsOptions {
            uid,
            gid,
            read_only: cfg.read_only,
        },
    ));

    let acl = if cfg.allow_other {
        // Other users are admitted only through the kernel's mode checks.
        fuser::SessionACL::All
    } else {
        fuser::SessionACL::Owner
    };
    let mut config = fuser::Config::default();
    config.acl = acl;
    config.n_threads = Some(cfg.threads.max(1));
    config.clone_fd = true;

    // We mount, not fuser: its session unmounts the mountpoint's *path* when it ends, after
    // the filesystem is torn down (seconds with Ceph), and by then another daemon may be
    // mounted there (`umount` then `mount` again): fuser would take that one down.
    let dev_fuse = kernel_mount(&mountpoint, cfg.allow_other)?;
    // Weak: the session's end still drops the tree (and its workers) as before.
    let fs_weak = Arc::downgrade(&fs);
    let session = fuser::Session::from_fd(
        Fuse::new(fs, cfg.readdirplus, cfg.threads.max(1)),
        dev_fuse,
        acl,
        config,
    )
    .with_context(|| format!("starting the FUSE session on {}", mountpoint.display()));
    let session = match session {
        Ok(s) => s,
        Err(e) => {
            let _ = unmount_path(&mountpoint, true);
            return Err(e);
        }
    };
    let ours = mount_entry(&mountpoint).map(|(dev, _)| Ours::of(dev));
    match &ours {
        Some(o) => raise_read_ahead(&o.dev, cfg.read_ahead_kb),
        None => warn!("our mount is missing from /proc/self/mountinfo"),
    }
    info!(mountpoint = %mountpoint.display(), threads = cfg.threads, "mounted");

    let (mp, dev) = (mountpoint.clone(), ours.clone());
    let (fs, cache) = (fs_weak, cache.clone());
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut sig = wait_signal(&sigs);
            while sig == libc::SIGUSR1 {
                // What holds the memory, holder by holder (docs/restore.md).
                let mut held = fs.upgrade().map(|fs| fs.memory()).unwrap_or_default();
                held.push(crate::memreport::Held::new(
                    "block_cache",
                    cache.len(),
                    cache.used(),
                ));
                let (n, b) = crate::restore::worker::cache_usage();
                held.push(crate::memreport::Held::new("worker_answers", n, b));
                held.extend(crate::image::rbd::memory());
                let (n, b) = crate::provider::libvirt::remote::cache_usage();
                held.push(crate::memreport::Held::new("remote_blocks", n, b));
                let line = crate::memreport::line(&crate::memreport::process(), &held);
                info!("memory: {line}");
                sig = wait_signal(&sigs);
            }
            info!(signal = sig, "signal received: unmounting");
            crate::notify::notify("STOPPING=1");
            if let Err(e) = unmount_ours(&mp, dev.as_ref()) {
                warn!(error = %e, "unmount on signal failed");
            }
        })
        .context("starting the signal thread")?;

    if let Some(fd) = ready.take() {
        let mut f = std::fs::File::from(fd);
        let _ = writeln!(f, "READY");
    }
    // Under a systemd Type=notify unit: the mount answers from now on.
    crate::notify::notify(&format!(
        "READY=1\nSTATUS=mounted on {}",
        mountpoint.display()
    ));
    let served = session.run().context("FUSE session");
    // `umount` (no signal) ends the session too: the service manager hears it either way.
    crate::notify::notify("STOPPING=1");
    if served.is_err() {
        // Ended by an error of its own while still mounted: take our mount down (only ours).
        let _ = unmount_ours(&mountpoint, ours.as_ref());
    }
    served?;
    info!(mountpoint = %mountpoint.display(), "unmounted; exiting");
    Ok(())
}

fn signal_set() -> libc::sigset_t {
    // SAFETY: sigset manipulation on a local, initialised by sigemptyset.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGUSR1] {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

fn block_signals(set: &libc::sigset_t) {
    // SAFETY: set is a valid sigset; a null old-set pointer is allowed.
    unsafe {
        libc::pthread_sigmask(libc::SIG_BLOCK, set, std::ptr::null_mut());
    }
}

fn wait_signal(set: &libc::sigset_t) -> i32 {
    let mut sig = 0;
    // SAFETY: set is valid and the signals are blocked in every thread (inherited mask).
    unsafe {
        libc::sigwait(set, &mut sig);
    }
    sig
}

fn cpath(p: &Path) -> anyhow::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).context("path contains NUL")
}

/// The device ("major:minor") and filesystem type mounted exactly at `p`, from
/// /proc/self/mountinfo (never a stat, which on our own mount would wait for ourselves).
fn mount_entry(p: &Path) -> Option<(String, String)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = p.to_string_lossy().replace(' ', "\\040");
    info.lines().rev().find_map(|l| {
        let fields: Vec<&str> = l.split(' ').collect();
        let sep = fields.iter().position(|f| *f == "-")?;
        if fields.get(4) != Some(&want.as_str()) {
            return None;
        }
        Some((fields.get(2)?.to_string(), fields.get(sep + 1)?.to_string()))
    })
}

/// A daemon killed with -9 leaves "Transport endpoint is not connected": detach that mount.
fn clear_stale_mount(mp: &Path) -> anyhow::Result<()> {
    match std::fs::metadata(mp) {
        // ENOTCONN after the daemon died; ECONNABORTED when the connection was aborted.
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTCONN | libc::ECONNABORTED)) => {
            warn!(mountpoint = %mp.display(), "clearing a stale FUSE mount left by a dead daemon");
            let c = cpath(mp)?;
            // SAFETY: c is a valid NUL-terminated path.
            if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("clearing stale mount {}", mp.display()));
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// FUSE reads arrive in read_ahead_kb-sized requests; the default 128 KiB halves throughput.
fn raise_read_ahead(dev: &str, kb: u32) {
    let path = format!("/sys/class/bdi/{dev}/read_ahead_kb");
    if let Err(e) = std::fs::write(&path, kb.to_string()) {
        warn!(%path, error = %e, "cannot raise read-ahead");
    }
}

/// Mount a FUSE filesystem at `mp` (we are root: `mount(2)` directly, as fusermount would):
/// source `snapfs`, type `fuse.snapfs`, nodev and nosuid, `allow_other` with
/// `default_permissions` when asked. The kernel's INIT then waits on the returned
/// `/dev/fuse` descriptor.
fn kernel_mount(mp: &Path, allow_other: bool) -> anyhow::Result<OwnedFd> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let root_mode = std::fs::metadata(mp)
        .with_context(|| format!("mount point {}", mp.display()))?
        .mode();
    let dev: OwnedFd = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/fuse")
        .context("opening /dev/fuse (modprobe fuse?)")?
        .into();
    // SAFETY: plain getters.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let mut data = format!(
        "fd={},rootmode={root_mode:o},user_id={uid},group_id={gid}",
        dev.as_raw_fd()
    );
    if allow_other {
        data.push_str(",allow_other,default_permissions");
    }
    let (source, fstype, target, data) = (
        CString::new("snapfs")?,
        CString::new("fuse.snapfs")?,
        cpath(mp)?,
        CString::new(data)?,
    );
    // SAFETY: valid NUL-terminated strings; the data is the fuse option string.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            libc::MS_NODEV | libc::MS_NOSUID,
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("mounting on {}", mp.display()));
    }
    Ok(dev)
}

/// Our FUSE connection: the mount's device ("major:minor") and, taken right after mounting
/// while it is certainly ours, its fusectl `abort` file with that file's inode. The minor
/// alone does not name it for long: the kernel gives it to the next mount as soon as ours is
/// gone, and that mount may even be at our path (F6's reasoning, for the unmount on a signal).
#[derive(Clone)]
struct Ours {
    dev: String,
    conn: Option<(PathBuf, u64)>,
}

impl Ours {
    fn of(dev: String) -> Ours {
        use std::os::unix::fs::MetadataExt;
        let conn = dev.split(':').nth(1).and_then(|minor| {
            let abort = fusectl()?.join(minor).join("abort");
            let ino = std::fs::metadata(&abort).ok()?.ino();
            Some((abort, ino))
        });
        Ours { dev, conn }
    }

    /// Whether our connection still exists (None: no fusectl to tell).
    fn alive(&self) -> Option<bool> {
        use std::os::unix::fs::MetadataExt;
        let (abort, ino) = self.conn.as_ref()?;
        Some(std::fs::metadata(abort).is_ok_and(|m| m.ino() == *ino))
    }
}

/// On a signal: unmount our own mount, which is at `mp` unless it was detached (`umount -l`)
/// meanwhile. Then whatever is mounted at `mp` now (another daemon's mount, made after the
/// detach) is not ours to unmount: our connection is aborted instead, which ends our session.
/// A mount at `mp` with our device number is ours only while our connection still exists:
/// once it is gone, that number may be the next mount's.
fn unmount_ours(mp: &Path, ours: Option<&Ours>) -> anyhow::Result<()> {
    let at_mp = mount_entry(mp).map(|(d, _)| d);
    let Some(ours) = ours else {
        return unmount_path(mp, true);
    };
    if at_mp.as_deref() == Some(ours.dev.as_str()) {
        if ours.alive() == Some(false) {
            warn!(mountpoint = %mp.display(), dev = %ours.dev, "our FUSE connection is gone and a new mount at our path has its device number: left alone");
            return Ok(());
        }
        return unmount_path(mp, true);
    }
    warn!(mountpoint = %mp.display(), ours = %ours.dev, now = ?at_mp, "our mount was detached and something else is mounted there: aborting our connection, leaving that mount alone");
    match &ours.conn {
        Some((abort, ino)) => {
            abort_if_same(abort, *ino);
            Ok(())
        }
        None => anyhow::bail!("no fusectl to abort our FUSE connection"),
    }
}

/// Unmount `mp`; `lazy` detaches it even when busy. If the FUSE connection survives (QEMU
/// keeps a copy of the mount in its own mount namespace), abort it so the daemon can exit.
///
/// The connection is named by the mount's device minor, which the kernel hands to the next
/// mount as soon as this one is gone: after the wait it may be another daemon's connection
/// under the same name. So the abort file is identified by its inode (fusectl numbers every
/// file it makes afresh), taken before the unmount, and a connection that is not the same
/// one is never aborted.
pub fn unmount_path(mp: &Path, lazy: bool) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let dev = mount_entry(mp).and_then(|(d, _)| d.split(':').nth(1).map(str::to_string));
    // (abort file, its inode) of our connection, before anything can reuse the name.
    let conn = dev.and_then(|dev| {
        let abort = fusectl()?.join(dev).join("abort");
        let ino = std::fs::metadata(&abort).ok()?.ino();
        Some((abort, ino))
    });
    let c = cpath(mp)?;
    // SAFETY: c is a valid NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), 0) } != 0 {
        let err = std::io::Error::last_os_error();
        let stale = matches!(
            err.raw_os_error(),
            Some(libc::ENOTCONN | libc::ECONNABORTED)
        );
        if !(lazy || stale) {
            return Err(err).with_context(|| format!("unmounting {}", mp.display()));
        }
        // SAFETY: as above.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("detaching {}", mp.display()));
        }
    }
    if let Some((abort, ino)) = conn {
        let ours = || std::fs::metadata(&abort).is_ok_and(|m| m.ino() == ino);
        let deadline = Instant::now() + Duration::from_secs(2);
        while ours() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if std::fs::metadata(&abort).is_ok_and(|m| m.ino() != ino) {
            info!(connection = %abort.display(), "our FUSE connection is gone and its name belongs to a new mount now: left alone");
        }
        abort_if_same(&abort, ino);
    }
    Ok(())
}

/// Abort the FUSE connection whose abort file is `abort`, only if that file is still inode
/// `ino` (checked on the opened file, so a connection made meanwhile under the same name is
/// not the one written to).
fn abort_if_same(abort: &Path, ino: u64) {
    use std::os::unix::fs::MetadataExt;
    let Ok(mut f) = std::fs::OpenOptions::new().write(true).open(abort) else {
        return;
    };
    if f.metadata().is_ok_and(|m| m.ino() == ino) {
        warn!(connection = %abort.display(), "FUSE connection still open after unmount (held by another mount namespace?): aborting it");
        let _ = f.write_all(b"1");
    }
}

/// Where the fusectl filesystem (`/sys/fs/fuse/connections`, one directory per FUSE
/// connection, with its `abort` file) is mounted; mounted there first if nothing mounted it (a
/// machine without systemd does not), since without it a connection held by an open file or
/// another mount namespace could not be aborted and the daemon would not exit.
fn fusectl() -> Option<PathBuf> {
    const DIR: &str = "/sys/fs/fuse/connections";
    let mounted = |info: &str| {
        info.lines()
            .find(|l| l.split(' ').nth(2) == Some("fusectl"))
            .and_then(|l| l.split(' ').nth(1))
            .map(PathBuf::from)
    };
    if let Some(p) = std::fs::read_to_string("/proc/self/mounts")
        .ok()
        .as_deref()
        .and_then(mounted)
    {
        return Some(p);
    }
    let dir = CString::new(DIR).ok()?;
    let fstype = CString::new("fusectl").ok()?;
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            dir.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        warn!(error = %std::io::Error::last_os_error(), "cannot mount fusectl on {DIR}: a FUSE connection that outlives the unmount cannot be aborted");
        return None;
    }
    info!("mounted fusectl on {DIR}");
    Some(PathBuf::from(DIR))
}

/// Where [`fork_daemon`] returns.
pub enum Forked {
    /// In the parent, once the daemon reported READY.
    Parent,
    /// In the detached child: serve, and report readiness on this descriptor.
    Child(OwnedFd),
}

/// Detach a daemon without running the program a second time: fork (when this process has a
/// single thread, as it has before anything is started), the child moves to a new session
/// with its output in `log_file`, the parent waits for READY. Loading our shared libraries
/// again in a re-executed child was most of the time `snapfs mount` took. With more than one
/// thread, fork is unsafe: `args` are re-executed as before ([`spawn_daemon`]).
pub fn fork_daemon(args: Vec<std::ffi::OsString>, log_file: &Path) -> anyhow::Result<Forked> {
    if thread_count() != Some(1) {
        spawn_daemon(args, log_file)?;
        return Ok(Forked::Parent);
    }
    let (rd, wr) = ready_pipe()?;
    let log = open_log(log_file)?;
    let null = std::fs::File::open("/dev/null").context("/dev/null")?;
    // SAFETY: this process has one thread, so the child may run any code after fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error()).context("fork");
    }
    if pid == 0 {
        drop(rd);
        // SAFETY: plain syscalls on descriptors we own; failures are reported below.
        let ok = unsafe {
            libc::setsid() >= 0
                && libc::dup2(null.as_raw_fd(), 0) >= 0
                && libc::dup2(log.as_raw_fd(), 1) >= 0
                && libc::dup2(log.as_raw_fd(), 2) >= 0
        };
        if !ok {
            let e = std::io::Error::last_os_error();
            let mut f = std::fs::File::from(wr);
            let _ = writeln!(f, "ERROR detaching the daemon: {e}");
            std::process::exit(1);
        }
        return Ok(Forked::Child(wr));
    }
    drop(wr);
    wait_ready(rd, log_file, || {
        let mut status = 0;
        // SAFETY: pid is our child; WNOHANG never blocks.
        unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    })?;
    Ok(Forked::Parent)
}

/// Threads of this process, from /proc (None if unknown).
fn thread_count() -> Option<usize> {
    Some(std::fs::read_dir("/proc/self/task").ok()?.count())
}

fn ready_pipe() -> anyhow::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid array of two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("pipe");
    }
    // SAFETY: pipe2 just returned these two fresh descriptors; each is owned once.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn open_log(log_file: &Path) -> anyhow::Result<std::fs::File> {
    if let Some(dir) = log_file.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("log directory {}", dir.display()))?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_file)
        .with_context(|| format!("log file {}", log_file.display()))
}

/// Read the daemon's answer: READY, or ERROR and why; `reap` collects a child that died.
fn wait_ready(rd: OwnedFd, log_file: &Path, reap: impl FnOnce()) -> anyhow::Result<()> {
    let mut answer = String::new();
    let mut f = std::fs::File::from(rd);
    use std::io::Read;
    let _ = f.read_to_string(&mut answer);
    let answer = answer.trim();
    if answer == "READY" {
        return Ok(());
    }
    reap();
    if let Some(msg) = answer.strip_prefix("ERROR ") {
        bail!("{msg} (log: {})", log_file.display());
    }
    bail!(
        "the daemon exited before the mount was ready (log: {})",
        log_file.display()
    )
}

/// Start `serve` in a detached child and wait until it is mounted or has failed.
pub fn spawn_daemon(args: Vec<std::ffi::OsString>, log_file: &Path) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    let (rd, wr) = ready_pipe()?;
    let log = open_log(log_file)?;
    let exe = std::env::current_exe().context("finding our own executable")?;
    let wr_raw = std::os::fd::AsRawFd::as_raw_fd(&wr);
    let mut cmd = std::process::Command::new(exe);
    cmd.args(&args)
        .arg("--foreground")
        .arg("--ready-fd")
        .arg("3")
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().context("log file")?)
        .stderr(log);
    // SAFETY: only async-signal-safe calls (setsid, dup2) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            if libc::dup2(wr_raw, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting the daemon")?;
    drop(wr);
    wait_ready(rd, log_file, || {
        let _ = child.try_wait();
    })
}

/// A line in the log when the daemon dies of a fatal signal or calls exit() from somewhere
/// unexpected. Core dumps are off on most machines (`ulimit -c 0`), and a crash in a C library
/// (librbd, librados, libvirt) or its abort() would otherwise leave nothing behind: stderr is
/// the log, so the line lands there. Only SIGKILL stays silent.
mod fatal {
    use std::sync::OnceLock;

    const SIGNALS: [(libc::c_int, &str); 5] = [
        (libc::SIGSEGV, "SIGSEGV"),
        (libc::SIGBUS, "SIGBUS"),
        (libc::SIGILL, "SIGILL"),
        (libc::SIGFPE, "SIGFPE"),
        (libc::SIGABRT, "SIGABRT"),
    ];

    /// The handlers that were there before ours (Rust's stack-overflow report on SIGSEGV and
    /// SIGBUS), called after our line.
    struct Previous([libc::sigaction; SIGNALS.len()]);
    // SAFETY: written once before any handler can run, then only read.
    unsafe impl Sync for Previous {}
    unsafe impl Send for Previous {}
    static PREVIOUS: OnceLock<Previous> = OnceLock::new();

    pub fn report_in_log() {
        // SAFETY: sigaction on a zeroed struct; only reads the old actions here.
        let previous = unsafe {
            let mut old: [libc::sigaction; SIGNALS.len()] = std::mem::zeroed();
            for (i, (sig, _)) in SIGNALS.iter().enumerate() {
                libc::sigaction(*sig, std::ptr::null(), &mut old[i]);
            }
            Previous(old)
        };
        if PREVIOUS.set(previous).is_err() {
            return;
        }
        // SAFETY: installs an async-signal-safe handler (write, prctl, sigaction, raise).
        unsafe {
            for (sig, _) in SIGNALS {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = on_fatal as *const () as usize;
                sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
                libc::sigemptyset(&mut sa.sa_mask);
                libc::sigaction(sig, &sa, std::ptr::null_mut());
            }
            libc::atexit(on_exit);
        }
    }

    /// write(2) of `parts` to stderr, without allocating.
    fn say(parts: &[&[u8]]) {
        let mut buf = [0u8; 256];
        let mut n = 0;
        for p in parts {
            let k = p.len().min(buf.len() - n);
            buf[n..n + k].copy_from_slice(&p[..k]);
            n += k;
        }
        // SAFETY: a valid buffer of n bytes; write is async-signal-safe.
        unsafe { libc::write(2, buf.as_ptr().cast(), n) };
    }

    extern "C" fn on_exit() {
        say(&[b"snapfs: the daemon process exits (exit() called)\n"]);
    }

    extern "C" fn on_fatal(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
        let at = SIGNALS.iter().position(|(s, _)| *s == sig);
        let name = at.map_or("a fatal signal", |i| SIGNALS[i].1);
        let mut comm = [0u8; 17];
        // SAFETY: PR_GET_NAME writes at most 16 bytes and a NUL.
        unsafe { libc::prctl(libc::PR_GET_NAME, comm.as_mut_ptr()) };
        let len = comm.iter().position(|b| *b == 0).unwrap_or(16);
        say(&[
            b"snapfs: the daemon dies of ",
            name.as_bytes(),
            b" in thread ",
            &comm[..len],
            b"\n",
        ]);
        let old = at.and_then(|i| PREVIOUS.get().map(|p| p.0[i]));
        // SAFETY: the previous handler is called as it was registered; otherwise the default
        // action is restored and the signal raised again (it is delivered when we return).
        unsafe {
            if let Some(old) = old {
                let h = old.sa_sigaction;
                if h != libc::SIG_DFL && h != libc::SIG_IGN {
                    if old.sa_flags & libc::SA_SIGINFO != 0 {
                        let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                            std::mem::transmute(h);
                        f(sig, info, ctx);
                    } else {
                        let f: extern "C" fn(libc::c_int) = std::mem::transmute(h);
                        f(sig);
                    }
                    // Sent by kill(2), not a fault: returning would carry on; die as the
                    // default action would.
                    if (*info).si_code <= 0 {
                        libc::signal(sig, libc::SIG_DFL);
                        libc::raise(sig);
                    }
                    return;
                }
            }
            libc::signal(sig, libc::SIG_DFL);
            libc::raise(sig);
        }
    }
}

//! A small, safe wrapper over librados/librbd: a cluster connection, a pool, an RBD image.
//!
//! Our own FFI rather than a crate: the `ceph` crate has librados only, the RBD crates are
//! unmaintained, and snapfs needs about forty C functions, loaded at the first connection
//! rather than linked (see `ffi`). Each is wrapped once, here; every
//! negative return becomes a [`crate::error::Error`] through [`check`], with the call and the
//! object named. Handles close in the right order because an image holds its pool and a
//! pool holds its cluster.

mod ffi;

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::{debug, info};

use crate::error::{Error, Result};

/// RBD feature bits (`rbd/features.h`) and their names, for `volume.json`.
pub const FEATURES: [(u64, &str); 12] = [
    (1 << 0, "layering"),
    (1 << 1, "striping"),
    (1 << 2, "exclusive-lock"),
    (1 << 3, "object-map"),
    (1 << 4, "fast-diff"),
    (1 << 5, "deep-flatten"),
    (1 << 6, "journaling"),
    (1 << 7, "data-pool"),
    (1 << 8, "operations"),
    (1 << 9, "migrating"),
    (1 << 10, "non-primary"),
    (1 << 11, "dirty-cache"),
];
pub const FEATURE_FAST_DIFF: u64 = 1 << 4;

/// Names of the bits set in `features`.
pub fn feature_names(features: u64) -> Vec<&'static str> {
    FEATURES
        .iter()
        .filter(|(bit, _)| features & bit != 0)
        .map(|(_, n)| *n)
        .collect()
}

/// A negative librados/librbd return code as our error; `what` names the call and object.
/// Timeouts become I/O errors (EIO to a reader) that say so: SPEC.md wants EIO for a dead
/// cluster, and the log must still tell a timeout from a refusal.
pub fn errno_error(rc: c_int, what: String) -> Error {
    let e = -rc;
    match e {
        libc::ENOENT => Error::NotFound(what),
        libc::EEXIST => Error::Exists(what),
        libc::EBUSY => Error::Busy(what),
        libc::ENOSPC | libc::EDQUOT => Error::NoSpace(what),
        libc::EINVAL => Error::Invalid(what),
        libc::EROFS => Error::ReadOnly(what),
        libc::EOPNOTSUPP => Error::NotSupported(what),
        _ => Error::io(what, std::io::Error::from_raw_os_error(e)),
    }
}

/// `Ok(rc)` for `rc >= 0`, else the mapped error.
fn check(rc: c_int, what: impl FnOnce() -> String) -> Result<c_int> {
    if rc >= 0 {
        Ok(rc)
    } else {
        Err(errno_error(rc, what()))
    }
}

fn cstring(s: &str, what: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::Invalid(format!("{what} {s:?} contains NUL")))
}

/// An owned copy of a C string that librbd returned; NULL is "".
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string alive for this call.
unsafe fn from_c(p: *const c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        // SAFETY: guaranteed by the caller.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

fn system_time(ts: &libc::timespec) -> SystemTime {
    if ts.tv_sec <= 0 {
        return UNIX_EPOCH;
    }
    UNIX_EPOCH + Duration::new(ts.tv_sec as u64, ts.tv_nsec.clamp(0, 999_999_999) as u32)
}

/// How long a cluster call may take before it fails (mon and OSD operations, connecting).
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub op: Duration,
    pub connect: Duration,
}

/// A connected librados client (`rados_t`).
pub struct Cluster {
    handle: ffi::rados_t,
    pub conf: String,
    pub client: String,
    breaker: Breaker,
}

/// After an operation times out, further calls fail at once for one timeout period instead
/// of each waiting the full timeout again (the kernel retries a failed read, and `ls` of a
/// pool would queue behind a dead OSD). Any call that succeeds closes it again.
struct Breaker {
    window: Duration,
    tripped: std::sync::Mutex<Option<std::time::Instant>>,
}

impl Breaker {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<std::time::Instant>> {
        self.tripped.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Err while a recent timeout is fresh.
    fn admit(&self, what: &dyn Fn() -> String) -> Result<()> {
        let t = *self.lock();
        match t {
            Some(at) if at.elapsed() < self.window => Err(Error::io(
                format!(
                    "{}: not tried, the cluster timed out {} ms ago",
                    what(),
                    at.elapsed().as_millis()
                ),
                std::io::Error::from_raw_os_error(libc::ETIMEDOUT),
            )),
            _ => Ok(()),
        }
    }

    fn record(&self, rc: i64) {
        if rc == -i64::from(libc::ETIMEDOUT) {
            let mut t = self.lock();
            if t.is_none_or(|at| at.elapsed() >= self.window) {
                tracing::warn!(
                    window_ms = self.window.as_millis() as u64,
                    "Ceph operation timed out: failing fast for one timeout period"
                );
                *t = Some(std::time::Instant::now());
            }
        } else if rc >= 0 {
            let mut t = self.lock();
            if t.take().is_some() {
                info!("Ceph answers again");
            }
        }
    }

    /// Run one cluster call under the breaker; `f` returns librados' rc.
    fn call<T: Into<i64> + Copy>(
        &self,
        what: &dyn Fn() -> String,
        f: impl FnOnce() -> T,
    ) -> Result<T> {
        self.admit(what)?;
        let rc = f();
        self.record(rc.into());
        Ok(rc)
    }
}

// SAFETY: librados handles are documented thread-safe; we never mutate the configuration
// after connecting.
unsafe impl Send for Cluster {}
// SAFETY: as above.
unsafe impl Sync for Cluster {}

impl Cluster {
    /// Read `conf`, apply our timeouts, connect as `client.<id>` (or `id` if it has a dot).
    /// Fails within about `timeouts.connect` when no monitor answers.
    pub fn connect(conf: &Path, id: &str, timeouts: Timeouts) -> Result<Arc<Cluster>> {
        let name = if id.contains('.') {
            id.to_string()
        } else {
            format!("client.{id}")
        };
        ffi::load().map_err(|e| {
            Error::Backend(format!(
                "cannot load the Ceph client libraries ({e}); install librados2 and librbd1 to use --ceph"
            ))
        })?;
        let conf_s = conf.to_string_lossy().into_owned();
        let c_conf = cstring(&conf_s, "ceph.conf path")?;
        let c_name = cstring(&name, "client name")?;
        let c_cluster = cstring("ceph", "cluster name")?;
        let mut handle: ffi::rados_t = std::ptr::null_mut();
        // SAFETY: out-pointer to a local; strings are NUL-terminated and outlive the call.
        let rc = unsafe { ffi::rados_create2(&mut handle, c_cluster.as_ptr(), c_name.as_ptr(), 0) };
        check(rc, || format!("rados_create2 as {name}"))?;
        // From here on `cluster` owns the handle and shuts it down on every error path.
        let cluster = Cluster {
            handle,
            conf: conf_s.clone(),
            client: name.clone(),
            breaker: Breaker {
                window: timeouts.op,
                tripped: std::sync::Mutex::new(None),
            },
        };
        // SAFETY: valid handle, NUL-terminated path.
        let rc = unsafe { ffi::rados_conf_read_file(cluster.handle, c_conf.as_ptr()) };
        check(rc, || format!("reading {conf_s}"))?;
        let op = timeouts.op.as_secs_f64().max(1.0).to_string();
        let connect = timeouts.connect.as_secs_f64().max(1.0).to_string();
        for (k, v) in [
            ("rados_osd_op_timeout", op.as_str()),
            ("rados_mon_op_timeout", op.as_str()),
            ("client_mount_timeout", connect.as_str()),
            // Several snapfs processes (and tests) share a host: no admin socket clashes.
            ("admin_socket", ""),
        ] {
            cluster.set(k, v)?;
        }
        let started = std::time::Instant::now();
        // SAFETY: valid, configured handle.
        let rc = unsafe { ffi::rados_connect(cluster.handle) };
        if rc == -libc::ETIMEDOUT {
            return Err(Error::Backend(format!(
                "no Ceph monitor of {conf_s} answered within {:.0} s (connecting as {name}; is the cluster up and `mon host` right?)",
                started.elapsed().as_secs_f64()
            )));
        }
        check(rc, || {
            format!("connecting to the Ceph cluster of {conf_s} as {name}")
        })?;
        info!(conf = %conf_s, client = %name, ms = started.elapsed().as_millis() as u64, "connected to Ceph");
        Ok(Arc::new(cluster))
    }

    fn set(&self, key: &str, value: &str) -> Result<()> {
        let k = cstring(key, "option")?;
        let v = cstring(value, "option value")?;
        // SAFETY: valid handle, NUL-terminated strings.
        let rc = unsafe { ffi::rados_conf_set(self.handle, k.as_ptr(), v.as_ptr()) };
        check(rc, || format!("rados_conf_set {key}={value}")).map(|_| ())
    }

    /// An I/O context on `pool`; `NotFound` when the pool does not exist.
    pub fn pool(self: &Arc<Self>, pool: &str) -> Result<Arc<Pool>> {
        let c = cstring(pool, "pool name")?;
        let mut io: ffi::rados_ioctx_t = std::ptr::null_mut();
        // SAFETY: connected handle, NUL-terminated name, out-pointer to a local.
        let rc = unsafe { ffi::rados_ioctx_create(self.handle, c.as_ptr(), &mut io) };
        check(rc, || format!("opening pool {pool}"))?;
        Ok(Arc::new(Pool {
            io,
            name: pool.to_string(),
            namespace: String::new(),
            cluster: self.clone(),
        }))
    }

    /// An I/O context on RBD namespace `ns` of `pool` (its own ioctx: a shared one never
    /// changes namespace). The namespace must exist ([`Pool::ensure_namespace`]).
    pub fn pool_ns(self: &Arc<Self>, pool: &str, ns: &str) -> Result<Arc<Pool>> {
        let c = cstring(ns, "namespace name")?;
        let p = self.pool(pool)?;
        // SAFETY: valid ioctx, not yet shared with anyone; NUL-terminated name (librados
        // copies it).
        unsafe { ffi::rados_ioctx_set_namespace(p.io, c.as_ptr()) };
        let mut p = Arc::try_unwrap(p).map_err(|_| Error::Backend("pool ioctx shared".into()))?;
        p.namespace = ns.to_string();
        Ok(Arc::new(p))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SAFETY: the handle came from rados_create2 and every pool using it is gone (they
        // hold an Arc to us).
        unsafe { ffi::rados_shutdown(self.handle) };
    }
}

/// An I/O context on one pool (`rados_ioctx_t`).
pub struct Pool {
    io: ffi::rados_ioctx_t,
    pub name: String,
    /// RBD namespace of this ioctx ("" = the pool's default one).
    pub namespace: String,
    cluster: Arc<Cluster>,
}

// SAFETY: an ioctx is safe to share for I/O; we never change its namespace or snap context.
unsafe impl Send for Pool {}
// SAFETY: as above.
unsafe impl Sync for Pool {}

impl Drop for Pool {
    fn drop(&mut self) {
        // SAFETY: created by rados_ioctx_create; every image opened on it holds an Arc to us.
        unsafe { ffi::rados_ioctx_destroy(self.io) };
    }
}

/// One clone (child) of a snapshot, or the parent of an image.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct LinkedImage {
    pub pool: String,
    pub namespace: String,
    pub image: String,
    pub trash: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Parent {
    pub pool: String,
    pub namespace: String,
    pub image: String,
    pub snapshot: String,
}

#[derive(Clone, Debug)]
pub struct SnapEntry {
    pub id: u64,
    pub size: u64,
    pub name: String,
}

/// Where a snapshot stands in its image's header ([`Image::snap_state`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapState {
    /// A user snapshot: its data is intact.
    User,
    /// In another namespace (2: trash, a removal started; 1: group, 3: mirror).
    Other(u32),
    /// Not in the header any more.
    Gone,
}

/// The snapshot id and namespace type of a `cls::rbd::SnapshotInfo` encoding (what the `rbd`
/// class's `snapshot_get` returns): `ENCODE_START` (version, compat, u32 length), the id
/// (u64), then the namespace, itself `ENCODE_START` + its type (u32); all little-endian.
fn parse_snapshot_info(b: &[u8], want: u64) -> std::result::Result<SnapState, String> {
    let u32_at = |o: usize| {
        b.get(o..o + 4)
            .map(|x| u32::from_le_bytes([x[0], x[1], x[2], x[3]]))
    };
    let (Some(&v), Some(&compat), Some(len)) = (b.first(), b.get(1), u32_at(2)) else {
        return Err(format!("{} byte answer is too short", b.len()));
    };
    if v < 1 || compat > 1 || (len as usize) + 6 > b.len() {
        return Err(format!(
            "unknown SnapshotInfo encoding (version {v}, compat {compat}, length {len})"
        ));
    }
    let id = b
        .get(6..14)
        .map(|x| u64::from_le_bytes(x.try_into().unwrap_or_default()))
        .ok_or("no snapshot id")?;
    if id != want {
        return Err(format!("answer is about snapshot {id}, not {want}"));
    }
    let (Some(&nv), Some(&ncompat), Some(ty)) = (b.get(14), b.get(15), u32_at(20)) else {
        return Err("no snapshot namespace".into());
    };
    if nv < 1 || ncompat > 1 {
        return Err(format!(
            "unknown namespace encoding (version {nv}, compat {ncompat})"
        ));
    }
    Ok(if ty == ffi::RBD_SNAP_NAMESPACE_TYPE_USER as u32 {
        SnapState::User
    } else {
        SnapState::Other(ty)
    })
}

#[derive(Clone, Copy, Debug)]
pub struct ImageStat {
    pub size: u64,
    pub obj_size: u64,
    pub order: i32,
}

impl Pool {
    /// `pool` or `pool/namespace`, as the rbd CLI spells it.
    pub fn label(&self) -> String {
        if self.namespace.is_empty() {
            self.name.clone()
        } else {
            format!("{}/{}", self.name, self.namespace)
        }
    }

    /// Create RBD namespace `ns` of this pool unless it exists.
    pub fn ensure_namespace(&self, ns: &str) -> Result<()> {
        let c = cstring(ns, "namespace name")?;
        let mut exists = false;
        // SAFETY: valid ioctx, NUL-terminated name, out-pointer to a local.
        let rc = unsafe { ffi::rbd_namespace_exists(self.io, c.as_ptr(), &mut exists) };
        check(rc, || {
            format!("looking up RBD namespace {}/{ns}", self.name)
        })?;
        if exists {
            return Ok(());
        }
        // SAFETY: as above.
        let rc = unsafe { ffi::rbd_namespace_create(self.io, c.as_ptr()) };
        if rc == -libc::EEXIST {
            return Ok(());
        }
        check(rc, || format!("creating RBD namespace {}/{ns}", self.name))?;
        info!(pool = %self.name, namespace = ns, "RBD namespace created");
        Ok(())
    }
    pub fn images(&self) -> Result<Vec<String>> {
        let mut cap: usize = 64;
        loop {
            let mut specs: Vec<ffi::rbd_image_spec_t> = Vec::with_capacity(cap);
            let mut n = cap;
            let what = || format!("listing RBD images of pool {}", self.name);
            let rc = self.cluster.breaker.call(&what, || {
                // SAFETY: specs has room for `n` entries; librbd writes at most `n`, sets `n`.
                unsafe { ffi::rbd_list2(self.io, specs.as_mut_ptr(), &mut n) }
            })?;
            if rc == -libc::ERANGE {
                cap = n.max(cap * 2);
                continue;
            }
            check(rc, what)?;
            let n = n.min(cap);
            // SAFETY: librbd initialised the first n entries.
            unsafe { specs.set_len(n) };
            let names = specs
                .iter()
                // SAFETY: names are NUL-terminated strings owned by specs until cleanup.
                .map(|s| unsafe { from_c(s.name) })
                .collect();
            // SAFETY: frees the strings of exactly the n entries librbd filled.
            unsafe { ffi::rbd_image_spec_list_cleanup(specs.as_mut_ptr(), n) };
            return Ok(names);
        }
    }

    /// Clone `image@snap` of this pool into `child` of `into` (`rbd_clone3`, the parent's
    /// features). Protecting the snapshot first is the caller's choice (clone v1 needs it).
    pub fn clone_snapshot(&self, image: &str, snap: &str, into: &Pool, child: &str) -> Result<()> {
        self.clone_with(image, snap, into, child, None)
    }

    /// [`Self::clone_snapshot`] as a clone v2: the parent snapshot need not be protected
    /// and the child may be in another namespace. The parent image carries the
    /// `clone-parent` op feature only while the child depends on it (flatten or removal of
    /// the child clears it).
    pub fn clone_snapshot_v2(
        &self,
        image: &str,
        snap: &str,
        into: &Pool,
        child: &str,
    ) -> Result<()> {
        self.clone_with(image, snap, into, child, Some(2))
    }

    fn clone_with(
        &self,
        image: &str,
        snap: &str,
        into: &Pool,
        child: &str,
        format: Option<u64>,
    ) -> Result<()> {
        let p = cstring(image, "image name")?;
        let s = cstring(snap, "snapshot name")?;
        let c = cstring(child, "image name")?;
        let what = || {
            format!(
                "cloning {}/{image}@{snap} to {}/{child}",
                self.label(),
                into.label()
            )
        };
        let mut opts: ffi::rbd_image_options_t = std::ptr::null_mut();
        // SAFETY: out-pointer to a local; destroyed below exactly once.
        unsafe { ffi::rbd_image_options_create(&mut opts) };
        let mut rc = 0;
        if let Some(f) = format {
            // SAFETY: options created above; a known integer option.
            rc = unsafe {
                ffi::rbd_image_options_set_uint64(opts, ffi::RBD_IMAGE_OPTION_CLONE_FORMAT, f)
            };
        }
        if rc >= 0 {
            // SAFETY: valid ioctxs, NUL-terminated names, options created above.
            rc = unsafe {
                ffi::rbd_clone3(self.io, p.as_ptr(), s.as_ptr(), into.io, c.as_ptr(), opts)
            };
        }
        // SAFETY: created above, not used after this.
        unsafe { ffi::rbd_image_options_destroy(opts) };
        check(rc, what).map(|_| ())
    }

    /// Remove image `name` (it must have no snapshots).
    pub fn remove_image(&self, name: &str) -> Result<()> {
        let c = cstring(name, "image name")?;
        // SAFETY: valid ioctx, NUL-terminated name.
        let rc = unsafe { ffi::rbd_remove(self.io, c.as_ptr()) };
        check(rc, || format!("removing RBD image {}/{name}", self.label())).map(|_| ())
    }

    /// Open `image` at `snap` (None: the head). `writable` is needed for snapshot changes.
    pub fn open(
        self: &Arc<Self>,
        image: &str,
        snap: Option<&str>,
        writable: bool,
    ) -> Result<Image> {
        let c_name = cstring(image, "image name")?;
        let c_snap = snap.map(|s| cstring(s, "snapshot name")).transpose()?;
        let snap_ptr = c_snap.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
        let mut h: ffi::rbd_image_t = std::ptr::null_mut();
        let started = std::time::Instant::now();
        let at = snap.map(|s| format!("@{s}")).unwrap_or_default();
        let what = || format!("opening RBD image {}/{image}{at}", self.label());
        let rc = self.cluster.breaker.call(&what, || {
            // SAFETY: valid ioctx, NUL-terminated strings (or NULL snap), out-pointer to a local.
            unsafe {
                if writable {
                    ffi::rbd_open(self.io, c_name.as_ptr(), &mut h, snap_ptr)
                } else {
                    ffi::rbd_open_read_only(self.io, c_name.as_ptr(), &mut h, snap_ptr)
                }
            }
        })?;
        check(rc, what)?;
        debug!(pool = %self.name, image, snap, writable, ms = started.elapsed().as_millis() as u64, "rbd open");
        Ok(Image {
            h,
            label: format!("{}/{image}{at}", self.label()),
            name: image.to_string(),
            snap: snap.map(str::to_string),
            pool: self.clone(),
        })
    }
}

/// An open RBD image (`rbd_image_t`), at its head or at a snapshot.
pub struct Image {
    h: ffi::rbd_image_t,
    /// `pool/image[@snap]`, for error messages.
    pub label: String,
    name: String,
    snap: Option<String>,
    pool: Arc<Pool>,
}

// SAFETY: librbd image handles serialise their own state; concurrent reads are supported.
unsafe impl Send for Image {}
// SAFETY: as above.
unsafe impl Sync for Image {}

impl Drop for Image {
    fn drop(&mut self) {
        // SAFETY: opened by rbd_open*, closed exactly once.
        let rc = unsafe { ffi::rbd_close(self.h) };
        if rc < 0 {
            debug!(image = %self.label, rc, "rbd_close failed");
        }
    }
}

/// A read in flight (`rbd_aio_read2`). It owns its buffer, so the buffer lives until librbd
/// is done with it: dropping an unfinished read waits for it first.
pub struct AioRead {
    comp: ffi::rbd_completion_t,
    /// Capacity >= len, length 0 until librbd has filled it.
    buf: Vec<u8>,
    len: usize,
    pub offset: u64,
    what: String,
    cluster: Arc<Cluster>,
    finished: bool,
}

// SAFETY: the completion is only waited on and released by whoever owns the AioRead; librbd
// completions may be waited on from any thread.
unsafe impl Send for AioRead {}

impl AioRead {
    /// Bytes being read (and held).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the read has finished (the OSD answered), without waiting.
    pub fn is_complete(&self) -> bool {
        // SAFETY: comp is a live completion of a submitted read (released only by wait/drop,
        // which take the AioRead).
        unsafe { ffi::rbd_aio_is_complete(self.comp) == 1 }
    }

    /// Wait for the read; the bytes, or the error (a timeout after the op timeout).
    pub fn wait(mut self) -> Result<Vec<u8>> {
        // SAFETY: comp is a live completion of a submitted read.
        let rv = unsafe {
            ffi::rbd_aio_wait_for_complete(self.comp);
            ffi::rbd_aio_get_return_value(self.comp)
        };
        self.finished = true;
        // SAFETY: complete; released exactly once (Drop skips it now that finished is set).
        unsafe { ffi::rbd_aio_release(self.comp) };
        self.cluster.breaker.record(rv as i64);
        if rv < 0 {
            return Err(errno_error(
                c_int::try_from(rv).unwrap_or(-libc::EIO),
                std::mem::take(&mut self.what),
            ));
        }
        if rv as usize != self.len {
            return Err(Error::io(
                format!("{}: short read of {rv} bytes", self.what),
                std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
            ));
        }
        // SAFETY: librbd reported writing exactly `len` bytes into the first `len` bytes of
        // the allocation (capacity >= len), so they are initialised.
        unsafe { self.buf.set_len(self.len) };
        Ok(std::mem::take(&mut self.buf))
    }
}

impl Drop for AioRead {
    fn drop(&mut self) {
        if !self.finished {
            // SAFETY: the buffer must outlive the read: wait, then release the completion once.
            unsafe {
                ffi::rbd_aio_wait_for_complete(self.comp);
                ffi::rbd_aio_release(self.comp);
            }
        }
    }
}

/// Receives `rbd_diff_iterate2` extents `(offset, length, exists)`; the callback must not
/// unwind into C.
struct DiffAcc<'a> {
    each: &'a mut dyn FnMut(u64, u64, bool),
}

extern "C" fn diff_cb(offset: u64, len: usize, exists: c_int, arg: *mut c_void) -> c_int {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // SAFETY: arg is the &mut DiffAcc passed to rbd_diff_iterate2, alive for its duration
        // and used by no one else while it runs.
        let acc = unsafe { &mut *(arg as *mut DiffAcc) };
        if len > 0 {
            (acc.each)(offset, len as u64, exists != 0);
        }
    }));
    if r.is_ok() {
        0
    } else {
        -libc::EIO
    }
}

impl Image {
    fn what(&self, call: &str) -> String {
        format!("{call} on {}", self.label)
    }

    pub fn stat(&self) -> Result<ImageStat> {
        // SAFETY: all-zero is a valid rbd_image_info_t (integers and char arrays).
        let mut info: ffi::rbd_image_info_t = unsafe { std::mem::zeroed() };
        // SAFETY: valid handle; info is a properly sized out-struct.
        let rc = unsafe {
            ffi::rbd_stat(
                self.h,
                &mut info,
                std::mem::size_of::<ffi::rbd_image_info_t>(),
            )
        };
        check(rc, || self.what("rbd_stat"))?;
        Ok(ImageStat {
            size: info.size,
            obj_size: info.obj_size,
            order: info.order,
        })
    }

    pub fn features(&self) -> Result<u64> {
        let mut f = 0u64;
        // SAFETY: valid handle, out-pointer to a local.
        let rc = unsafe { ffi::rbd_get_features(self.h, &mut f) };
        check(rc, || self.what("rbd_get_features"))?;
        Ok(f)
    }

    pub fn id(&self) -> Result<String> {
        let mut buf = [0 as c_char; 64];
        // SAFETY: buf has the length we pass; librbd NUL-terminates within it on success.
        let rc = unsafe { ffi::rbd_get_id(self.h, buf.as_mut_ptr(), buf.len()) };
        check(rc, || self.what("rbd_get_id"))?;
        // SAFETY: NUL-terminated within buf on success.
        Ok(unsafe { from_c(buf.as_ptr()) })
    }

    pub fn create_time(&self) -> Result<SystemTime> {
        // SAFETY: all-zero timespec is valid.
        let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
        // SAFETY: valid handle, out-pointer to a local.
        let rc = unsafe { ffi::rbd_get_create_timestamp(self.h, &mut ts) };
        check(rc, || self.what("rbd_get_create_timestamp"))?;
        Ok(system_time(&ts))
    }

    pub fn modify_time(&self) -> Result<SystemTime> {
        // SAFETY: all-zero timespec is valid.
        let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
        // SAFETY: valid handle, out-pointer to a local.
        let rc = unsafe { ffi::rbd_get_modify_timestamp(self.h, &mut ts) };
        check(rc, || self.what("rbd_get_modify_timestamp"))?;
        Ok(system_time(&ts))
    }

    /// The parent of a clone (at the snapshot the handle is set to), None for a plain image.
    pub fn parent(&self) -> Result<Option<Parent>> {
        // SAFETY: all-zero (NULL pointers, zero ids) is what librbd expects to fill in.
        let mut img: ffi::rbd_linked_image_spec_t = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut snap: ffi::rbd_snap_spec_t = unsafe { std::mem::zeroed() };
        // SAFETY: valid handle, out-structs owned by us.
        let rc = unsafe { ffi::rbd_get_parent(self.h, &mut img, &mut snap) };
        if rc == -libc::ENOENT {
            return Ok(None);
        }
        check(rc, || self.what("rbd_get_parent"))?;
        // SAFETY: on success librbd filled both structs with NUL-terminated strings.
        let p = unsafe {
            Parent {
                pool: from_c(img.pool_name),
                namespace: from_c(img.pool_namespace),
                image: from_c(img.image_name),
                snapshot: from_c(snap.name),
            }
        };
        // SAFETY: frees what rbd_get_parent allocated, once.
        unsafe {
            ffi::rbd_linked_image_spec_cleanup(&mut img);
            ffi::rbd_snap_spec_cleanup(&mut snap);
        }
        Ok(Some(p))
    }

    /// Clones made from the snapshot the handle is set to (including ones in the trash).
    pub fn children(&self) -> Result<Vec<LinkedImage>> {
        let mut cap: usize = 16;
        loop {
            let mut specs: Vec<ffi::rbd_linked_image_spec_t> = Vec::with_capacity(cap);
            let mut n = cap;
            // SAFETY: specs has room for n entries; librbd writes at most n and sets n.
            let rc = unsafe { ffi::rbd_list_children3(self.h, specs.as_mut_ptr(), &mut n) };
            if rc == -libc::ERANGE {
                cap = n.max(cap * 2);
                continue;
            }
            check(rc, || self.what("rbd_list_children3"))?;
            let n = n.min(cap);
            // SAFETY: librbd initialised the first n entries.
            unsafe { specs.set_len(n) };
            let out = specs
                .iter()
                .map(|s| LinkedImage {
                    // SAFETY: NUL-terminated strings owned by specs until cleanup.
                    pool: unsafe { from_c(s.pool_name) },
                    // SAFETY: as above.
                    namespace: unsafe { from_c(s.pool_namespace) },
                    // SAFETY: as above.
                    image: unsafe { from_c(s.image_name) },
                    trash: s.trash,
                })
                .collect();
            // SAFETY: frees the n entries librbd filled, once.
            unsafe { ffi::rbd_linked_image_spec_list_cleanup(specs.as_mut_ptr(), n) };
            return Ok(out);
        }
    }

    /// The image's user snapshots, oldest first.
    pub fn snapshots(&self) -> Result<Vec<SnapEntry>> {
        let mut cap: c_int = 16;
        loop {
            // librbd writes n entries plus a terminating one: room for n + 1 or -ERANGE.
            let len = usize::try_from(cap).unwrap_or(16) + 1;
            let mut buf: Vec<ffi::rbd_snap_info_t> = Vec::with_capacity(len);
            let mut max = cap + 1;
            // SAFETY: buf has room for `max` entries.
            let rc = unsafe { ffi::rbd_snap_list(self.h, buf.as_mut_ptr(), &mut max) };
            if rc == -libc::ERANGE {
                cap = max.max(cap.saturating_mul(2));
                continue;
            }
            let n = check(rc, || self.what("rbd_snap_list"))?;
            let n = usize::try_from(n).unwrap_or(0).min(len);
            // SAFETY: librbd initialised the first n entries (the terminator is not read).
            unsafe { buf.set_len(n) };
            let out = buf
                .iter()
                .map(|s| SnapEntry {
                    id: s.id,
                    size: s.size,
                    // SAFETY: NUL-terminated, owned by buf until rbd_snap_list_end.
                    name: unsafe { from_c(s.name) },
                })
                .collect();
            // SAFETY: frees the names of the list librbd just filled, once.
            unsafe { ffi::rbd_snap_list_end(buf.as_mut_ptr()) };
            return self.user_snapshots(out);
        }
    }

    /// Only the user snapshots of `all`: `rbd_snap_list` also returns snapshots in the trash
    /// namespace (a deleted snapshot that clone-v2 children still use, or one whose removal
    /// was interrupted), named by a UUID, which no call taking a snapshot name reaches.
    /// A snapshot removed since the list was taken is left out too.
    fn user_snapshots(&self, all: Vec<SnapEntry>) -> Result<Vec<SnapEntry>> {
        let mut out = Vec::with_capacity(all.len());
        for s in all {
            let mut t: c_int = -1;
            // SAFETY: valid handle, out-pointer to a local.
            let rc = unsafe { ffi::rbd_snap_get_namespace_type(self.h, s.id, &mut t) };
            if rc == -libc::ENOENT {
                continue;
            }
            check(rc, || {
                self.what(&format!("rbd_snap_get_namespace_type {}", s.name))
            })?;
            if t == ffi::RBD_SNAP_NAMESPACE_TYPE_USER {
                out.push(s);
            } else {
                tracing::debug!(image = %self.label, snap = %s.name, namespace = t, "snapshot outside the user namespace left out");
            }
        }
        Ok(out)
    }

    /// The id of snapshot `name`, as this handle knows it (from its open or last refresh).
    pub fn snap_id(&self, name: &str) -> Result<u64> {
        let c = cstring(name, "snapshot name")?;
        let mut id = 0u64;
        // SAFETY: valid handle, NUL-terminated name, out-pointer to a local.
        let rc = unsafe { ffi::rbd_snap_get_id(self.h, c.as_ptr(), &mut id) };
        check(rc, || self.what(&format!("rbd_snap_get_id {name}")))?;
        Ok(id)
    }

    /// The image's header object (`rbd_header.<id>`), for [`Image::snap_state`].
    pub fn header_oid(&self) -> Result<CString> {
        cstring(&format!("rbd_header.{}", self.id()?), "header object")
    }

    /// Call `method` of the `rbd` object class on the image header `header` with `input`;
    /// its output. One OSD operation, bounded by the op timeout.
    fn header_exec(&self, header: &CStr, method: &CStr, input: &[u8]) -> Result<Vec<u8>> {
        let what = || {
            format!(
                "{} on the header of {}",
                method.to_string_lossy(),
                self.label
            )
        };
        let mut out = vec![0u8; 1024];
        loop {
            let rc = self.pool.cluster.breaker.call(&what, || {
                // SAFETY: valid ioctx; NUL-terminated names; `input` and `out` are buffers
                // of the lengths passed, alive for the call.
                unsafe {
                    ffi::rados_exec(
                        self.pool.io,
                        header.as_ptr(),
                        c"rbd".as_ptr(),
                        method.as_ptr(),
                        input.as_ptr().cast(),
                        input.len(),
                        out.as_mut_ptr().cast(),
                        out.len(),
                    )
                }
            })?;
            if rc == -libc::ERANGE && out.len() < (1 << 20) {
                out.resize(out.len() * 16, 0);
                continue;
            }
            let n = check(rc, what)?;
            out.truncate(usize::try_from(n).unwrap_or(0));
            return Ok(out);
        }
    }

    /// Where snapshot `id` stands now, asked of the OSD that holds the image header (the
    /// `rbd` object class's `snapshot_get`), not of librbd's view of it: a handle opened
    /// read-only has no watch, so librbd never learns of another client's changes. One small
    /// OSD operation. `header` is [`Image::header_oid`].
    pub fn snap_state(&self, header: &CStr, id: u64) -> Result<SnapState> {
        match self.header_exec(header, c"snapshot_get", &id.to_le_bytes()) {
            Ok(out) => parse_snapshot_info(&out, id)
                .map_err(|e| Error::Backend(format!("snapshot_get {id} on {}: {e}", self.label))),
            Err(Error::NotFound(_)) => Ok(SnapState::Gone),
            Err(e) => Err(e),
        }
    }

    /// Move snapshot `id` to the trash namespace (`snapshot_trash_add`), which is the first
    /// step of librbd's own removal. Only for the fault-injection hook of the tests: the
    /// state a removal killed right after that step leaves.
    pub fn snap_trash_add(&self, id: u64) -> Result<()> {
        let header = self.header_oid()?;
        self.header_exec(&header, c"snapshot_trash_add", &id.to_le_bytes())
            .map(|_| ())
    }

    /// Remove snapshot `id` whatever its namespace (`rbd_snap_remove_by_id`): finishes a
    /// removal that was cut short and left the snapshot in the trash namespace.
    pub fn snap_remove_by_id(&self, id: u64) -> Result<()> {
        let started = std::time::Instant::now();
        // SAFETY: valid handle.
        let rc = unsafe { ffi::rbd_snap_remove_by_id(self.h, id) };
        debug!(image = %self.label, snap_id = id, rc, ms = started.elapsed().as_millis() as u64, "rbd_snap_remove_by_id");
        check(rc, || self.what(&format!("rbd_snap_remove_by_id {id}"))).map(|_| ())
    }

    pub fn snap_timestamp(&self, id: u64) -> Result<SystemTime> {
        // SAFETY: all-zero timespec is valid.
        let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
        // SAFETY: valid handle, out-pointer to a local.
        let rc = unsafe { ffi::rbd_snap_get_timestamp(self.h, id, &mut ts) };
        check(rc, || self.what("rbd_snap_get_timestamp"))?;
        Ok(system_time(&ts))
    }

    pub fn snap_is_protected(&self, name: &str) -> Result<bool> {
        let c = cstring(name, "snapshot name")?;
        let mut p: c_int = 0;
        // SAFETY: valid handle, NUL-terminated name, out-pointer to a local.
        let rc = unsafe { ffi::rbd_snap_is_protected(self.h, c.as_ptr(), &mut p) };
        check(rc, || self.what(&format!("rbd_snap_is_protected {name}")))?;
        Ok(p != 0)
    }

    /// Point the handle at snapshot `name` (None: the head) for `parent`/`children`.
    pub fn snap_set(&self, name: Option<&str>) -> Result<()> {
        let c = name.map(|n| cstring(n, "snapshot name")).transpose()?;
        let p = c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
        // SAFETY: valid handle, NUL-terminated name or NULL.
        let rc = unsafe { ffi::rbd_snap_set(self.h, p) };
        check(rc, || self.what(&format!("rbd_snap_set {name:?}"))).map(|_| ())
    }

    /// One of the snapshot calls that take a single name.
    fn snap_op(
        &self,
        call: &str,
        f: unsafe fn(ffi::rbd_image_t, *const c_char) -> c_int,
        name: &str,
    ) -> Result<()> {
        let c = cstring(name, "snapshot name")?;
        let started = std::time::Instant::now();
        // SAFETY: f is one of the librbd snapshot calls declared with exactly this signature;
        // valid handle and NUL-terminated name.
        let rc = unsafe { f(self.h, c.as_ptr()) };
        debug!(image = %self.label, call, snap = name, rc, ms = started.elapsed().as_millis() as u64, "rbd snapshot op");
        check(rc, || self.what(&format!("{call} {name}"))).map(|_| ())
    }

    pub fn snap_create(&self, name: &str) -> Result<()> {
        self.snap_op("rbd_snap_create", ffi::rbd_snap_create, name)
    }
    pub fn snap_remove(&self, name: &str) -> Result<()> {
        self.snap_op("rbd_snap_remove", ffi::rbd_snap_remove, name)
    }
    pub fn snap_protect(&self, name: &str) -> Result<()> {
        self.snap_op("rbd_snap_protect", ffi::rbd_snap_protect, name)
    }
    pub fn snap_unprotect(&self, name: &str) -> Result<()> {
        self.snap_op("rbd_snap_unprotect", ffi::rbd_snap_unprotect, name)
    }

    /// Write snapshot `name`'s data over the head (`rbd_snap_rollback`: O(image size)).
    pub fn snap_rollback(&self, name: &str) -> Result<()> {
        self.snap_op("rbd_snap_rollback", ffi::rbd_snap_rollback, name)
    }

    /// How many clients watch the image (a writable open of our own counts as one).
    pub fn watchers(&self) -> Result<usize> {
        let mut max: usize = 0;
        // SAFETY: valid handle; with max 0 librbd only reports the count (-ERANGE).
        let rc = unsafe { ffi::rbd_watchers_list(self.h, std::ptr::null_mut(), &mut max) };
        if rc == 0 {
            return Ok(0);
        }
        if rc != -libc::ERANGE {
            check(rc, || self.what("rbd_watchers_list"))?;
        }
        // Room for a few more: a watcher may register between the two calls.
        let mut room = max + 4;
        let mut list: Vec<ffi::rbd_image_watcher_t> = (0..room)
            .map(|_| ffi::rbd_image_watcher_t {
                addr: std::ptr::null_mut(),
                id: 0,
                cookie: 0,
            })
            .collect();
        // SAFETY: `list` has room for `room` entries; librbd fills at most that many.
        let rc = unsafe { ffi::rbd_watchers_list(self.h, list.as_mut_ptr(), &mut room) };
        check(rc, || self.what("rbd_watchers_list"))?;
        let n = room.min(list.len());
        // SAFETY: the first n entries were filled by librbd and are released once here.
        unsafe { ffi::rbd_watchers_list_cleanup(list.as_mut_ptr(), n) };
        Ok(n)
    }

    pub fn snap_rename(&self, from: &str, to: &str) -> Result<()> {
        let a = cstring(from, "snapshot name")?;
        let b = cstring(to, "snapshot name")?;
        // SAFETY: valid handle, NUL-terminated names.
        let rc = unsafe { ffi::rbd_snap_rename(self.h, a.as_ptr(), b.as_ptr()) };
        check(rc, || self.what(&format!("rbd_snap_rename {from} -> {to}"))).map(|_| ())
    }

    /// Copy the parent's data into this clone and detach it (`rbd_flatten`; needs a
    /// writable open of the head). Afterwards the parent snapshot has one child fewer.
    pub fn flatten(&self) -> Result<()> {
        let started = std::time::Instant::now();
        // SAFETY: valid handle.
        let rc = unsafe { ffi::rbd_flatten(self.h) };
        debug!(image = %self.label, rc, ms = started.elapsed().as_millis() as u64, "rbd flatten");
        check(rc, || self.what("rbd_flatten")).map(|_| ())
    }

    /// Fill `buf` from `offset`. The caller keeps `offset + buf.len()` within the image size
    /// (librbd answers -EINVAL past the end).
    pub fn read(&self, buf: &mut [u8], offset: u64, sequential: bool) -> Result<()> {
        let flags = if sequential {
            ffi::LIBRADOS_OP_FLAG_FADVISE_SEQUENTIAL
        } else {
            0
        };
        let mut done = 0usize;
        while done < buf.len() {
            let rest = &mut buf[done..];
            let off = offset + done as u64;
            let len = rest.len();
            let ptr = rest.as_mut_ptr();
            let what = || format!("reading {len} bytes at {off:#x} of {}", self.label);
            let n = self.pool.cluster.breaker.call(&what, || {
                // SAFETY: ptr/len describe `rest`, a writable buffer alive for the whole call.
                unsafe { ffi::rbd_read2(self.h, off, len, ptr.cast(), flags) as i64 }
            })?;
            if n < 0 {
                let rc = c_int::try_from(n).unwrap_or(-libc::EIO);
                return Err(errno_error(rc, what()));
            }
            if n == 0 {
                return Err(Error::io(
                    format!("reading at {off:#x} of {}", self.label),
                    std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
                ));
            }
            done += n as usize;
        }
        Ok(())
    }

    /// Start reading `len` bytes at `offset` (within the image size) without waiting, into
    /// `buf` (cleared; reusing a buffer saves the page faults of a fresh 4 MiB allocation).
    pub fn aio_read(&self, offset: u64, len: usize, mut buf: Vec<u8>) -> Result<AioRead> {
        let what = format!("reading {len} bytes at {offset:#x} of {}", self.label);
        let cluster = self.pool.cluster.clone();
        cluster.breaker.admit(&|| what.clone())?;
        let mut comp: ffi::rbd_completion_t = std::ptr::null_mut();
        // SAFETY: out-pointer to a local; no callback, so no argument is ever dereferenced.
        let rc = unsafe { ffi::rbd_aio_create_completion(std::ptr::null_mut(), None, &mut comp) };
        check(rc, || format!("{what}: rbd_aio_create_completion"))?;
        // librbd writes the bytes; the Vec's length is set only once it has (in `wait`).
        buf.clear();
        buf.reserve_exact(len);
        let mut read = AioRead {
            comp,
            buf,
            len,
            offset,
            what,
            cluster,
            finished: false,
        };
        // SAFETY: the buffer (capacity >= len) is owned by `read`, whose Drop waits for
        // completion before it is freed; a Vec's heap storage does not move with the AioRead.
        let rc = unsafe {
            ffi::rbd_aio_read2(
                self.h,
                offset,
                len,
                read.buf.as_mut_ptr().cast(),
                read.comp,
                // As `rbd export`: the OSD need not cache what it streams to us.
                ffi::LIBRADOS_OP_FLAG_FADVISE_SEQUENTIAL | ffi::LIBRADOS_OP_FLAG_FADVISE_NOCACHE,
            )
        };
        if rc < 0 {
            // Not submitted: release the completion here, nothing to wait for.
            read.finished = true;
            // SAFETY: created above, never submitted, released once.
            unsafe { ffi::rbd_aio_release(read.comp) };
            return Err(errno_error(rc, std::mem::take(&mut read.what)));
        }
        Ok(read)
    }

    /// Allocated extents `(offset, length)` in `[offset, offset + len)` of the opened
    /// snapshot, parent data included. `whole_object` reports whole objects (fast with the
    /// fast-diff object map; librbd falls back to listing objects otherwise).
    pub fn allocated_extents(
        &self,
        offset: u64,
        len: u64,
        whole_object: bool,
    ) -> Result<Vec<(u64, u64)>> {
        let mut extents = Vec::new();
        self.diff_iterate(None, offset, len, whole_object, &mut |o, l, exists| {
            if exists {
                extents.push((o, l));
            }
        })?;
        Ok(extents)
    }

    /// `rbd_diff_iterate2` over `[offset, offset + len)` of the opened snapshot: with
    /// `from_snap`, the extents changed since that (older) snapshot of the same image, `exists`
    /// false where they were discarded or zeroed; without, the allocated extents (parent
    /// included).
    pub fn diff_iterate(
        &self,
        from_snap: Option<&str>,
        offset: u64,
        len: u64,
        whole_object: bool,
        each: &mut dyn FnMut(u64, u64, bool),
    ) -> Result<()> {
        let c_from = from_snap.map(|s| cstring(s, "snapshot name")).transpose()?;
        let from_ptr = c_from.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
        let mut acc = DiffAcc { each };
        let started = std::time::Instant::now();
        let what = || self.what("rbd_diff_iterate2");
        let acc_ptr: *mut DiffAcc = &mut acc;
        let rc = self.pool.cluster.breaker.call(&what, || {
            // SAFETY: valid handle; the callback only touches `acc` (through acc_ptr), which
            // outlives the call; from_ptr is NULL ("everything allocated") or a C string that
            // outlives the call.
            unsafe {
                ffi::rbd_diff_iterate2(
                    self.h,
                    from_ptr,
                    offset,
                    len,
                    1,
                    u8::from(whole_object),
                    diff_cb,
                    acc_ptr.cast(),
                )
            }
        })?;
        check(rc, what)?;
        debug!(image = %self.label, from = from_snap, whole_object, ms = started.elapsed().as_millis() as u64, "rbd diff");
        Ok(())
    }

    /// The pool's name, the image's name and the snapshot it was opened at.
    pub fn spec(&self) -> (&str, &str, Option<&str>) {
        (&self.pool.name, &self.name, self.snap.as_deref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_mapping() {
        assert_eq!(errno_error(-libc::ENOENT, "x".into()).errno(), libc::ENOENT);
        assert_eq!(errno_error(-libc::EEXIST, "x".into()).errno(), libc::EEXIST);
        assert_eq!(errno_error(-libc::EBUSY, "x".into()).errno(), libc::EBUSY);
        assert_eq!(errno_error(-libc::EDQUOT, "x".into()).errno(), libc::ENOSPC);
        // A dead cluster is EIO to readers, but still says "timed out" in the log.
        let t = errno_error(-libc::ETIMEDOUT, "read".into());
        assert_eq!(t.errno(), libc::EIO);
        assert!(t.to_string().contains("timed out"), "{t}");
        assert_eq!(errno_error(-libc::EACCES, "x".into()).errno(), libc::EIO);
    }

    #[test]
    fn snapshot_info_encoding() {
        // Bytes as snapshot_get encodes a user snapshot 7 named "a" (header, id, namespace).
        let mut b = vec![1u8, 1, 0, 0, 0, 0];
        b.extend_from_slice(&7u64.to_le_bytes());
        b.extend_from_slice(&[1, 1, 4, 0, 0, 0, 0, 0, 0, 0]);
        b.extend_from_slice(&[1, 0, 0, 0, b'a']);
        b.extend_from_slice(&[0u8; 8 + 8 + 8]);
        let len = (b.len() - 6) as u32;
        b[2..6].copy_from_slice(&len.to_le_bytes());
        assert_eq!(parse_snapshot_info(&b, 7), Ok(SnapState::User));
        let mut t = b.clone();
        t[20] = 2;
        assert_eq!(parse_snapshot_info(&t, 7), Ok(SnapState::Other(2)));
        assert!(parse_snapshot_info(&b, 8).is_err());
        assert!(parse_snapshot_info(&b[..10], 7).is_err());
        let mut future = b.clone();
        future[1] = 2;
        assert!(parse_snapshot_info(&future, 7).is_err());
    }

    #[test]
    fn feature_names_in_bit_order() {
        assert_eq!(
            feature_names(1 | 4 | 8 | 16 | 32),
            [
                "layering",
                "exclusive-lock",
                "object-map",
                "fast-diff",
                "deep-flatten"
            ]
        );
    }

    #[test]
    fn info_struct_matches_the_c_layout() {
        // Sizes printed by a C program including rbd/librbd.h (Ceph 16, x86_64).
        assert_eq!(std::mem::size_of::<ffi::rbd_image_info_t>(), 160);
        assert_eq!(std::mem::size_of::<ffi::rbd_linked_image_spec_t>(), 48);
        assert_eq!(std::mem::size_of::<ffi::rbd_snap_spec_t>(), 24);
        assert_eq!(std::mem::size_of::<ffi::rbd_snap_info_t>(), 24);
    }
}

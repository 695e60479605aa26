//! A small, safe wrapper over the libvirt C API: a connection, domains, their snapshots,
//! storage pools, the guest agent and FS freeze. Method names follow the `virt` crate, which
//! this replaces: `virt` links libvirt into the binary, so every start of snapfs (an
//! images-only mount too) loaded libvirt.so and ~50 libraries behind it, and a host without
//! libvirt could not run snapfs at all. Here the library is loaded by the first
//! [`Connect::open`] (see [`ffi`]); docs/libvirt.md has the measurements.
//!
//! Every call that fails returns libvirt's last error of this thread ([`Error`]), read right
//! after the call. Strings libvirt allocates are copied and freed here; objects are freed on
//! drop, connections closed on the last drop.

mod ffi;

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::ptr::null_mut;

/// Flag and enum values of the libvirt headers that snapfs passes.
pub mod sys {
    pub const VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE: u32 = 2;
    pub const VIR_DOMAIN_XML_SECURE: u32 = 1;
    pub const VIR_DOMAIN_XML_INACTIVE: u32 = 2;
    pub const VIR_DOMAIN_METADATA_ELEMENT: u32 = 2;
    pub const VIR_DOMAIN_AFFECT_LIVE: u32 = 1;
    pub const VIR_DOMAIN_AFFECT_CONFIG: u32 = 2;
    pub const VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY: u32 = 16;
    pub const VIR_DOMAIN_SNAPSHOT_CREATE_QUIESCE: u32 = 64;
    pub const VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC: u32 = 128;
    /// Save the memory state while the guest runs (external memory snapshots).
    pub const VIR_DOMAIN_SNAPSHOT_CREATE_LIVE: u32 = 256;
    /// Create the snapshot's files but keep no libvirt snapshot object (metadata) of it.
    pub const VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA: u32 = 4;
    /// `virDomainRestoreFlags`: the restored domain runs, whatever the saved state says.
    pub const VIR_DOMAIN_SAVE_RUNNING: u32 = 2;
    /// `virDomainRevertToSnapshot`: run the domain after the revert.
    pub const VIR_DOMAIN_SNAPSHOT_REVERT_RUNNING: u32 = 1;
    /// `virDomainBackupBegin`: the push targets exist already (made by the caller).
    pub const VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL: u32 = 1;
    /// `virDomainGetJobStats`: the last completed job instead of the current one.
    pub const VIR_DOMAIN_JOB_STATS_COMPLETED: u32 = 1;
}

/// `virDomainJobType`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobType {
    None,
    Bounded,
    Unbounded,
    Completed,
    Failed,
    Cancelled,
    Other(i32),
}

impl JobType {
    fn from_raw(t: c_int) -> JobType {
        match t {
            0 => JobType::None,
            1 => JobType::Bounded,
            2 => JobType::Unbounded,
            3 => JobType::Completed,
            4 => JobType::Failed,
            5 => JobType::Cancelled,
            o => JobType::Other(o),
        }
    }
}

/// `VIR_DOMAIN_JOB_OPERATION_BACKUP`: the `operation` of a backup job.
pub const JOB_OPERATION_BACKUP: i64 = 9;

/// One typed parameter's value.
#[derive(Clone, Debug, PartialEq)]
pub enum TypedValue {
    Int(i64),
    UInt(u64),
    Double(f64),
    Bool(bool),
    String(String),
}

/// What `virDomainGetJobStats` says: the job type and its parameters.
#[derive(Clone, Debug)]
pub struct JobStats {
    pub job_type: JobType,
    pub params: Vec<(String, TypedValue)>,
}

impl JobStats {
    pub fn get(&self, field: &str) -> Option<&TypedValue> {
        self.params.iter().find(|(f, _)| f == field).map(|(_, v)| v)
    }

    pub fn int(&self, field: &str) -> Option<i64> {
        match self.get(field)? {
            TypedValue::Int(i) => Some(*i),
            TypedValue::UInt(u) => i64::try_from(*u).ok(),
            _ => None,
        }
    }

    pub fn uint(&self, field: &str) -> Option<u64> {
        match self.get(field)? {
            TypedValue::UInt(u) => Some(*u),
            TypedValue::Int(i) => u64::try_from(*i).ok(),
            _ => None,
        }
    }

    pub fn string(&self, field: &str) -> Option<&str> {
        match self.get(field)? {
            TypedValue::String(s) => Some(s),
            _ => None,
        }
    }
}

/// The `virErrorNumber` values snapfs tells apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorNumber {
    NoSupport,
    NoDomain,
    ConfigUnsupported,
    OperationTimeout,
    NoDomainSnapshot,
    ArgumentUnsupported,
    NoDomainMetadata,
    OperationUnsupported,
    AgentCommandTimeout,
}

/// A `virErrorNumber` as libvirt gave it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ErrorCode(pub i32);

impl ErrorCode {
    pub fn known(self) -> Option<ErrorNumber> {
        use ErrorNumber::*;
        Some(match self.0 {
            3 => NoSupport,
            42 => NoDomain,
            67 => ConfigUnsupported,
            68 => OperationTimeout,
            72 => NoDomainSnapshot,
            74 => ArgumentUnsupported,
            80 => NoDomainMetadata,
            84 => OperationUnsupported,
            112 => AgentCommandTimeout,
            _ => return None,
        })
    }
}

/// A libvirt error: its number and message.
#[derive(Clone, Debug)]
pub struct Error {
    code: ErrorCode,
    message: String,
}

impl Error {
    /// The last error libvirt recorded for this thread.
    pub fn last_error() -> Error {
        // SAFETY: virGetLastError returns NULL or a pointer to this thread's error, valid
        // until the next libvirt call on this thread; it is copied before returning.
        unsafe {
            let e = ffi::virGetLastError();
            if e.is_null() {
                return Error::new(-1, "an unknown libvirt error occurred");
            }
            let message = if (*e).message.is_null() {
                String::from("(no message)")
            } else {
                CStr::from_ptr((*e).message).to_string_lossy().into_owned()
            };
            Error {
                code: ErrorCode((*e).code),
                message,
            }
        }
    }

    fn new(code: i32, message: impl Into<String>) -> Error {
        Error {
            code: ErrorCode(code),
            message: message.into(),
        }
    }

    pub fn code(&self) -> ErrorCode {
        self.code
    }

    pub fn message(&self) -> &str {
        &self.message
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

type Result<T> = std::result::Result<T, Error>;

fn cstring(s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::new(-1, format!("{s:?} contains a NUL byte")))
}

fn opt_cstring(s: Option<&str>) -> Result<Option<CString>> {
    s.map(cstring).transpose()
}

fn opt_ptr(s: &Option<CString>) -> *const c_char {
    s.as_ref().map_or(std::ptr::null(), |c| c.as_ptr())
}

/// A negative return is an error.
fn check(rc: c_int) -> Result<c_int> {
    if rc < 0 {
        Err(Error::last_error())
    } else {
        Ok(rc)
    }
}

/// A string libvirt allocated: copied, then freed. NULL is an error.
///
/// # Safety
/// `p` is NULL or a NUL-terminated string from malloc that nothing else frees.
unsafe fn owned_string(p: *mut c_char) -> Result<String> {
    if p.is_null() {
        return Err(Error::last_error());
    }
    let s = CStr::from_ptr(p).to_string_lossy().into_owned();
    libc::free(p.cast::<c_void>());
    Ok(s)
}

/// A string owned by a libvirt object: copied. NULL is an error.
///
/// # Safety
/// `p` is NULL or a NUL-terminated string valid for this call.
unsafe fn borrowed_string(p: *const c_char) -> Result<String> {
    if p.is_null() {
        return Err(Error::last_error());
    }
    Ok(CStr::from_ptr(p).to_string_lossy().into_owned())
}

/// An array of `n` objects libvirt allocated: each wrapped (ours to free), the array freed.
///
/// # Safety
/// `arr` holds `n` valid object pointers and comes from malloc.
unsafe fn take_array<T>(
    arr: *mut *mut c_void,
    n: c_int,
    wrap: impl Fn(*mut c_void) -> T,
) -> Vec<T> {
    let mut v = Vec::with_capacity(n.max(0) as usize);
    if !arr.is_null() {
        for i in 0..n.max(0) as usize {
            v.push(wrap(*arr.add(i)));
        }
        libc::free(arr.cast::<c_void>());
    }
    v
}

/// libvirt's default error handler prints every error on stderr; errors are returned (and
/// logged by the caller) instead.
unsafe extern "C" fn ignore_error(_: *mut c_void, _: *mut ffi::virError) {}

/// A connection (`virConnectPtr`); clones share it, the last drop closes it.
pub struct Connect {
    ptr: ffi::virConnectPtr,
}

// SAFETY: libvirt connections may be used from any thread (libvirt is thread-safe since 0.6).
unsafe impl Send for Connect {}
unsafe impl Sync for Connect {}

impl Connect {
    /// Load libvirt (first call) and open `uri` (None: libvirt's default).
    pub fn open(uri: Option<&str>) -> Result<Connect> {
        ffi::load().map_err(|e| {
            Error::new(
                -1,
                format!("cannot load libvirt ({e}); install libvirt0 to use --libvirt"),
            )
        })?;
        // SAFETY: a no-op handler with no user data, set before any connection exists.
        unsafe { ffi::virSetErrorFunc(null_mut(), Some(ignore_error)) };
        let c = opt_cstring(uri)?;
        // SAFETY: NULL or a NUL-terminated URI.
        let ptr = unsafe { ffi::virConnectOpen(opt_ptr(&c)) };
        if ptr.is_null() {
            return Err(Error::last_error());
        }
        Ok(Connect { ptr })
    }

    pub fn is_alive(&self) -> Result<bool> {
        // SAFETY: valid connection.
        check(unsafe { ffi::virConnectIsAlive(self.ptr) }).map(|r| r == 1)
    }

    /// The hypervisor driver's name (`QEMU`, `Test`).
    pub fn driver_type(&self) -> Result<String> {
        // SAFETY: valid connection; the string is static in libvirt.
        unsafe { borrowed_string(ffi::virConnectGetType(self.ptr)) }
    }

    pub fn list_all_domains(&self, flags: u32) -> Result<Vec<Domain>> {
        let mut arr: *mut ffi::virDomainPtr = null_mut();
        // SAFETY: valid connection, out-pointer to a local.
        let n = check(unsafe { ffi::virConnectListAllDomains(self.ptr, &mut arr, flags) })?;
        // SAFETY: libvirt returned n domain references in a malloc'ed array.
        Ok(unsafe { take_array(arr, n, |ptr| Domain { ptr }) })
    }

    pub fn list_all_storage_pools(&self, flags: u32) -> Result<Vec<StoragePool>> {
        let mut arr: *mut ffi::virStoragePoolPtr = null_mut();
        // SAFETY: valid connection, out-pointer to a local.
        let n = check(unsafe { ffi::virConnectListAllStoragePools(self.ptr, &mut arr, flags) })?;
        // SAFETY: libvirt returned n pool references in a malloc'ed array.
        Ok(unsafe { take_array(arr, n, |ptr| StoragePool { ptr }) })
    }

    pub fn lookup_domain_by_name(&self, name: &str) -> Result<Domain> {
        let c = cstring(name)?;
        // SAFETY: valid connection and string.
        Domain::wrap(unsafe { ffi::virDomainLookupByName(self.ptr, c.as_ptr()) })
    }

    pub fn lookup_domain_by_uuid_string(&self, uuid: &str) -> Result<Domain> {
        let c = cstring(uuid)?;
        // SAFETY: valid connection and string.
        Domain::wrap(unsafe { ffi::virDomainLookupByUUIDString(self.ptr, c.as_ptr()) })
    }

    /// The storage volume whose target is `path` on the connection's host.
    pub fn storage_vol_lookup_by_path(&self, path: &str) -> Result<StorageVol> {
        let c = cstring(path)?;
        // SAFETY: valid connection and string.
        let ptr = unsafe { ffi::virStorageVolLookupByPath(self.ptr, c.as_ptr()) };
        if ptr.is_null() {
            return Err(Error::last_error());
        }
        Ok(StorageVol {
            ptr,
            conn: self.clone(),
        })
    }

    /// Start a domain from a save image (`virsh restore`): libvirt's external memory
    /// snapshot files are save images too.
    pub fn restore_flags(&self, from: &std::path::Path, flags: u32) -> Result<()> {
        let c = cstring(
            from.to_str()
                .ok_or_else(|| Error::new(-1, format!("{}: not UTF-8", from.display())))?,
        )?;
        // SAFETY: valid connection and string; a null dxml keeps the saved definition.
        check(unsafe { ffi::virDomainRestoreFlags(self.ptr, c.as_ptr(), std::ptr::null(), flags) })
            .map(drop)
    }

    pub fn define_domain_xml(&self, xml: &str) -> Result<Domain> {
        let c = cstring(xml)?;
        // SAFETY: valid connection and string.
        Domain::wrap(unsafe { ffi::virDomainDefineXML(self.ptr, c.as_ptr()) })
    }
}

/// Run libvirt's default event loop on a thread of its own, once per process. Needed before
/// the first [`Connect::open`] for keepalive ([`Connect::set_keep_alive`]) to work: without
/// an event loop a remote connection whose peer went silent blocks its callers until TCP
/// gives up (minutes).
pub fn start_event_loop() -> Result<()> {
    static STARTED: std::sync::OnceLock<std::result::Result<(), String>> =
        std::sync::OnceLock::new();
    STARTED
        .get_or_init(|| {
            ffi::load().map_err(|e| format!("cannot load libvirt ({e})"))?;
            // SAFETY: registers libvirt's own poll-based implementation; no arguments.
            if unsafe { ffi::virEventRegisterDefaultImpl() } < 0 {
                return Err(Error::last_error().message().to_string());
            }
            std::thread::Builder::new()
                .name("libvirt-events".into())
                .spawn(|| loop {
                    // SAFETY: runs one iteration of the registered default loop.
                    if unsafe { ffi::virEventRunDefaultImpl() } < 0 {
                        std::thread::sleep(std::time::Duration::from_millis(100));
                    }
                })
                .map(drop)
                .map_err(|e| format!("starting the libvirt event thread: {e}"))
        })
        .clone()
        .map_err(|m| Error::new(-1, m))
}

impl Connect {
    /// `virConnectSetKeepAlive`: the connection is closed (its calls fail) after `count`
    /// unanswered probes sent every `interval` seconds. `Ok(false)`: the driver has none
    /// (a local, in-process driver), which needs none.
    pub fn set_keep_alive(&self, interval: i32, count: u32) -> Result<bool> {
        // SAFETY: valid connection.
        check(unsafe { ffi::virConnectSetKeepAlive(self.ptr, interval, count) }).map(|r| r == 0)
    }
}

impl Clone for Connect {
    fn clone(&self) -> Connect {
        // SAFETY: valid connection; the reference taken here is dropped by the clone.
        unsafe { ffi::virConnectRef(self.ptr) };
        Connect { ptr: self.ptr }
    }
}

impl Drop for Connect {
    fn drop(&mut self) {
        // SAFETY: drops the reference this value holds.
        unsafe { ffi::virConnectClose(self.ptr) };
    }
}

/// The `state` of `virDomainInfo`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DomainState {
    NoState,
    Running,
    Blocked,
    Paused,
    Shutdown,
    Shutoff,
    Crashed,
    PMSuspended,
}

/// A domain state as libvirt gave it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateCode(pub u8);

impl StateCode {
    pub fn known(self) -> Option<DomainState> {
        use DomainState::*;
        Some(match self.0 {
            0 => NoState,
            1 => Running,
            2 => Blocked,
            3 => Paused,
            4 => Shutdown,
            5 => Shutoff,
            6 => Crashed,
            7 => PMSuspended,
            _ => return None,
        })
    }
}

/// What `virDomainGetInfo` says.
#[derive(Clone, Copy, Debug)]
pub struct DomainInfo {
    pub state: StateCode,
    /// KiB.
    pub max_mem: u64,
    pub nr_virt_cpu: u32,
}

/// A domain (`virDomainPtr`); clones share it, each drop frees one reference.
pub struct Domain {
    ptr: ffi::virDomainPtr,
}

// SAFETY: as for Connect.
unsafe impl Send for Domain {}
unsafe impl Sync for Domain {}

impl Domain {
    fn wrap(ptr: ffi::virDomainPtr) -> Result<Domain> {
        if ptr.is_null() {
            Err(Error::last_error())
        } else {
            Ok(Domain { ptr })
        }
    }

    pub fn name(&self) -> Result<String> {
        // SAFETY: valid domain; the name lives as long as it.
        unsafe { borrowed_string(ffi::virDomainGetName(self.ptr)) }
    }

    pub fn uuid_string(&self) -> Result<String> {
        // VIR_UUID_STRING_BUFLEN
        let mut buf = [0 as c_char; 37];
        // SAFETY: valid domain, buffer of the size the header asks for.
        check(unsafe { ffi::virDomainGetUUIDString(self.ptr, buf.as_mut_ptr()) })?;
        // SAFETY: libvirt wrote a NUL-terminated string into buf.
        Ok(unsafe { CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned())
    }

    pub fn xml_desc(&self, flags: u32) -> Result<String> {
        // SAFETY: valid domain; the string is ours to free.
        unsafe { owned_string(ffi::virDomainGetXMLDesc(self.ptr, flags)) }
    }

    pub fn info(&self) -> Result<DomainInfo> {
        let mut i = ffi::virDomainInfo::default();
        // SAFETY: valid domain, out-pointer to a local of the C layout.
        check(unsafe { ffi::virDomainGetInfo(self.ptr, &mut i) })?;
        Ok(DomainInfo {
            state: StateCode(i.state),
            // c_ulong: 64 bits here, 32 on some targets.
            #[allow(clippy::unnecessary_cast, clippy::useless_conversion)]
            max_mem: i.maxMem as u64,
            nr_virt_cpu: u32::from(i.nrVirtCpu),
        })
    }

    /// Whether libvirt runs a job on the domain now (`virDomainGetJobInfo`'s type is not
    /// `VIR_DOMAIN_JOB_NONE`), e.g. a snapshot revert it was asked for.
    pub fn has_job(&self) -> Result<bool> {
        let mut j = ffi::virDomainJobInfo::default();
        // SAFETY: valid domain, out-pointer to a local of the C layout.
        check(unsafe { ffi::virDomainGetJobInfo(self.ptr, &mut j) })?;
        Ok(j.type_ != 0)
    }

    /// Start the (defined) domain.
    pub fn create(&self) -> Result<()> {
        // SAFETY: valid domain.
        check(unsafe { ffi::virDomainCreate(self.ptr) }).map(drop)
    }

    pub fn destroy(&self) -> Result<()> {
        // SAFETY: valid domain.
        check(unsafe { ffi::virDomainDestroy(self.ptr) }).map(drop)
    }

    pub fn undefine(&self) -> Result<()> {
        // SAFETY: valid domain.
        check(unsafe { ffi::virDomainUndefine(self.ptr) }).map(drop)
    }

    pub fn suspend(&self) -> Result<()> {
        // SAFETY: valid domain.
        check(unsafe { ffi::virDomainSuspend(self.ptr) }).map(drop)
    }

    pub fn resume(&self) -> Result<()> {
        // SAFETY: valid domain.
        check(unsafe { ffi::virDomainResume(self.ptr) }).map(drop)
    }

    pub fn is_active(&self) -> Result<bool> {
        // SAFETY: valid domain.
        check(unsafe { ffi::virDomainIsActive(self.ptr) }).map(|r| r == 1)
    }

    pub fn is_persistent(&self) -> Result<bool> {
        // SAFETY: valid domain.
        check(unsafe { ffi::virDomainIsPersistent(self.ptr) }).map(|r| r == 1)
    }

    pub fn metadata(&self, kind: i32, uri: Option<&str>, flags: u32) -> Result<String> {
        let uri = opt_cstring(uri)?;
        // SAFETY: valid domain, NULL or NUL-terminated URI; the string is ours to free.
        unsafe {
            owned_string(ffi::virDomainGetMetadata(
                self.ptr,
                kind,
                opt_ptr(&uri),
                flags,
            ))
        }
    }

    pub fn set_metadata(
        &self,
        kind: i32,
        metadata: Option<&str>,
        key: Option<&str>,
        uri: Option<&str>,
        flags: u32,
    ) -> Result<()> {
        let (m, k, u) = (opt_cstring(metadata)?, opt_cstring(key)?, opt_cstring(uri)?);
        // SAFETY: valid domain; each string NULL or NUL-terminated and alive for the call.
        check(unsafe {
            ffi::virDomainSetMetadata(self.ptr, kind, opt_ptr(&m), opt_ptr(&k), opt_ptr(&u), flags)
        })
        .map(drop)
    }

    /// `virDomainFSFreeze` of every guest filesystem; the number frozen.
    pub fn fs_freeze(&self) -> Result<u32> {
        // SAFETY: valid domain; a NULL list with count 0 means all filesystems.
        check(unsafe { ffi::virDomainFSFreeze(self.ptr, null_mut(), 0, 0) }).map(|n| n as u32)
    }

    /// `virDomainFSThaw` of every guest filesystem; the number thawed.
    pub fn fs_thaw(&self) -> Result<u32> {
        // SAFETY: as in fs_freeze.
        check(unsafe { ffi::virDomainFSThaw(self.ptr, null_mut(), 0, 0) }).map(|n| n as u32)
    }

    /// One guest agent command (JSON) and its reply; `timeout` in seconds.
    pub fn qemu_agent_command(&self, cmd: &str, timeout: i32, flags: u32) -> Result<String> {
        let c = cstring(cmd)?;
        // SAFETY: valid domain and string; the reply is ours to free.
        unsafe {
            owned_string(ffi::virDomainQemuAgentCommand(
                self.ptr,
                c.as_ptr(),
                timeout,
                flags,
            ))
        }
    }

    /// `virDomainBackupBegin`: start a backup job (push mode when the XML says so).
    pub fn backup_begin(&self, backup_xml: &str, flags: u32) -> Result<()> {
        let c = cstring(backup_xml)?;
        // SAFETY: valid domain and string; no checkpoint XML.
        check(unsafe { ffi::virDomainBackupBegin(self.ptr, c.as_ptr(), std::ptr::null(), flags) })
            .map(drop)
    }

    /// `virDomainBackupGetXMLDesc`: the running backup job's description.
    pub fn backup_xml_desc(&self) -> Result<String> {
        // SAFETY: valid domain; the string is ours to free.
        unsafe { owned_string(ffi::virDomainBackupGetXMLDesc(self.ptr, 0)) }
    }

    /// `virDomainAbortJob`: abort the domain's current job.
    pub fn abort_job(&self) -> Result<()> {
        // SAFETY: valid domain.
        check(unsafe { ffi::virDomainAbortJob(self.ptr) }).map(drop)
    }

    /// `virDomainGetJobStats`: the current job (flags 0) or the last completed one
    /// ([`sys::VIR_DOMAIN_JOB_STATS_COMPLETED`]).
    pub fn job_stats(&self, flags: u32) -> Result<JobStats> {
        let mut t: c_int = 0;
        let mut params: ffi::virTypedParameterPtr = null_mut();
        let mut n: c_int = 0;
        // SAFETY: valid domain, out-pointers to locals.
        check(unsafe { ffi::virDomainGetJobStats(self.ptr, &mut t, &mut params, &mut n, flags) })?;
        let mut out = Vec::with_capacity(n.max(0) as usize);
        if !params.is_null() {
            for i in 0..n.max(0) as usize {
                // SAFETY: libvirt returned n parameters; each field is NUL-terminated and a
                // string value is a valid C string owned by the array.
                unsafe {
                    let p = &*params.add(i);
                    let field = CStr::from_ptr(p.field.as_ptr())
                        .to_string_lossy()
                        .into_owned();
                    let v = match p.type_ {
                        1 => TypedValue::Int(i64::from(p.value.i)),
                        2 => TypedValue::UInt(u64::from(p.value.ui)),
                        3 => TypedValue::Int(p.value.l),
                        4 => TypedValue::UInt(p.value.ul),
                        5 => TypedValue::Double(p.value.d),
                        6 => TypedValue::Bool(p.value.b != 0),
                        7 => {
                            let s = p.value.s;
                            if s.is_null() {
                                continue;
                            }
                            TypedValue::String(CStr::from_ptr(s).to_string_lossy().into_owned())
                        }
                        _ => continue,
                    };
                    out.push((field, v));
                }
            }
            // SAFETY: the array (and its strings) came from this call.
            unsafe { ffi::virTypedParamsFree(params, n) };
        }
        Ok(JobStats {
            job_type: JobType::from_raw(t),
            params: out,
        })
    }

    pub fn list_all_snapshots(&self, flags: u32) -> Result<Vec<DomainSnapshot>> {
        let mut arr: *mut ffi::virDomainSnapshotPtr = null_mut();
        // SAFETY: valid domain, out-pointer to a local.
        let n = check(unsafe { ffi::virDomainListAllSnapshots(self.ptr, &mut arr, flags) })?;
        // SAFETY: libvirt returned n snapshot references in a malloc'ed array.
        Ok(unsafe { take_array(arr, n, |ptr| DomainSnapshot { ptr }) })
    }

    pub fn lookup_snapshot_by_name(dom: &Domain, name: &str, flags: u32) -> Result<DomainSnapshot> {
        let c = cstring(name)?;
        // SAFETY: valid domain and string.
        DomainSnapshot::wrap(unsafe {
            ffi::virDomainSnapshotLookupByName(dom.ptr, c.as_ptr(), flags)
        })
    }

    pub fn create_snapshot_xml(&self, xml: &str, flags: u32) -> Result<DomainSnapshot> {
        let c = cstring(xml)?;
        // SAFETY: valid domain and string.
        DomainSnapshot::wrap(unsafe {
            ffi::virDomainSnapshotCreateXML(self.ptr, c.as_ptr(), flags)
        })
    }
}

impl Clone for Domain {
    fn clone(&self) -> Domain {
        // SAFETY: valid domain; the reference taken here is freed by the clone.
        unsafe { ffi::virDomainRef(self.ptr) };
        Domain { ptr: self.ptr }
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        // SAFETY: frees the reference this value holds.
        unsafe { ffi::virDomainFree(self.ptr) };
    }
}

/// A domain snapshot (`virDomainSnapshotPtr`), freed on drop.
pub struct DomainSnapshot {
    ptr: ffi::virDomainSnapshotPtr,
}

// SAFETY: as for Connect.
unsafe impl Send for DomainSnapshot {}
unsafe impl Sync for DomainSnapshot {}

impl DomainSnapshot {
    fn wrap(ptr: ffi::virDomainSnapshotPtr) -> Result<DomainSnapshot> {
        if ptr.is_null() {
            Err(Error::last_error())
        } else {
            Ok(DomainSnapshot { ptr })
        }
    }

    pub fn name(&self) -> Result<String> {
        // SAFETY: valid snapshot; the name lives as long as it.
        unsafe { borrowed_string(ffi::virDomainSnapshotGetName(self.ptr)) }
    }

    pub fn xml_desc(&self, flags: u32) -> Result<String> {
        // SAFETY: valid snapshot; the string is ours to free.
        unsafe { owned_string(ffi::virDomainSnapshotGetXMLDesc(self.ptr, flags)) }
    }

    pub fn delete(&self, flags: u32) -> Result<()> {
        // SAFETY: valid snapshot.
        check(unsafe { ffi::virDomainSnapshotDelete(self.ptr, flags) }).map(drop)
    }

    /// `virDomainRevertToSnapshot`: the domain's disks (and, for a snapshot with memory, its
    /// running state) return to this snapshot.
    pub fn revert(&self, flags: u32) -> Result<()> {
        // SAFETY: valid snapshot.
        check(unsafe { ffi::virDomainRevertToSnapshot(self.ptr, flags) }).map(drop)
    }

    /// `virDomainSnapshotIsCurrent`: whether this is the domain's current snapshot (the one
    /// last taken or reverted to).
    pub fn is_current(&self) -> Result<bool> {
        // SAFETY: valid snapshot.
        check(unsafe { ffi::virDomainSnapshotIsCurrent(self.ptr, 0) }).map(|r| r == 1)
    }
}

impl Drop for DomainSnapshot {
    fn drop(&mut self) {
        // SAFETY: frees the reference this value holds.
        unsafe { ffi::virDomainSnapshotFree(self.ptr) };
    }
}

/// A storage pool (`virStoragePoolPtr`), freed on drop.
pub struct StoragePool {
    ptr: ffi::virStoragePoolPtr,
}

// SAFETY: as for Connect.
unsafe impl Send for StoragePool {}
unsafe impl Sync for StoragePool {}

impl StoragePool {
    pub fn name(&self) -> Result<String> {
        // SAFETY: valid pool; the name lives as long as it.
        unsafe { borrowed_string(ffi::virStoragePoolGetName(self.ptr)) }
    }

    /// Rescan the pool's volumes (files made by others, e.g. snapshot overlays, appear).
    pub fn refresh(&self) -> Result<()> {
        // SAFETY: valid pool.
        check(unsafe { ffi::virStoragePoolRefresh(self.ptr, 0) }).map(drop)
    }

    pub fn xml_desc(&self, flags: u32) -> Result<String> {
        // SAFETY: valid pool; the string is ours to free.
        unsafe { owned_string(ffi::virStoragePoolGetXMLDesc(self.ptr, flags)) }
    }

    /// A new volume of this pool, as `xml` (`<volume>`) describes it, made by the pool's
    /// host (a qcow2 with a `<backingStore>` is an overlay there). `conn` is the pool's.
    pub fn create_volume(&self, conn: &Connect, xml: &str) -> Result<StorageVol> {
        let c = cstring(xml)?;
        // SAFETY: valid pool and string.
        let ptr = unsafe { ffi::virStorageVolCreateXML(self.ptr, c.as_ptr(), 0) };
        if ptr.is_null() {
            return Err(Error::last_error());
        }
        Ok(StorageVol {
            ptr,
            conn: conn.clone(),
        })
    }
}

impl Drop for StoragePool {
    fn drop(&mut self) {
        // SAFETY: frees the reference this value holds.
        unsafe { ffi::virStoragePoolFree(self.ptr) };
    }
}

/// A storage volume (`virStorageVolPtr`), freed on drop; keeps its connection for streams.
pub struct StorageVol {
    ptr: ffi::virStorageVolPtr,
    conn: Connect,
}

// SAFETY: as for Connect.
unsafe impl Send for StorageVol {}
unsafe impl Sync for StorageVol {}

/// `VIR_STORAGE_VOL_GET_PHYSICAL`: `allocation` is the host file's size.
const VIR_STORAGE_VOL_GET_PHYSICAL: u32 = 1;

impl StorageVol {
    /// (capacity: the guest-visible size, physical: the bytes of the host file).
    pub fn capacity_and_physical(&self) -> Result<(u64, u64)> {
        let mut i = ffi::virStorageVolInfo::default();
        // SAFETY: valid volume, out-pointer to a local of the C layout.
        check(unsafe {
            ffi::virStorageVolGetInfoFlags(self.ptr, &mut i, VIR_STORAGE_VOL_GET_PHYSICAL)
        })?;
        Ok((i.capacity, i.allocation))
    }

    pub fn xml_desc(&self) -> Result<String> {
        // SAFETY: valid volume; the string is ours to free.
        unsafe { owned_string(ffi::virStorageVolGetXMLDesc(self.ptr, 0)) }
    }

    /// The pool that holds this volume.
    pub fn pool(&self) -> Result<StoragePool> {
        // SAFETY: valid volume.
        let ptr = unsafe { ffi::virStoragePoolLookupByVolume(self.ptr) };
        if ptr.is_null() {
            return Err(Error::last_error());
        }
        Ok(StoragePool { ptr })
    }

    /// The volume's path on its host.
    pub fn path(&self) -> Result<String> {
        // SAFETY: valid volume; the string is ours to free.
        unsafe { owned_string(ffi::virStorageVolGetPath(self.ptr)) }
    }

    /// Delete the volume (its file on the pool's host).
    pub fn delete(&self) -> Result<()> {
        // SAFETY: valid volume.
        check(unsafe { ffi::virStorageVolDelete(self.ptr, 0) }).map(drop)
    }

    /// `virStorageVolDownload` of `[offset, offset + buf.len())` of the volume's host file
    /// into `buf`, through one stream; the number of bytes received (less only at its end).
    pub fn download(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        let mut stream = Stream::new(&self.conn)?;
        let st = stream.0;
        // SAFETY: valid volume and stream.
        check(unsafe { ffi::virStorageVolDownload(self.ptr, st, offset, buf.len() as u64, 0) })?;
        let mut done = 0;
        while done < buf.len() {
            let want = (buf.len() - done).min(1 << 20);
            // SAFETY: `want` bytes of `buf` from `done` are ours to write.
            let n =
                unsafe { ffi::virStreamRecv(st, buf[done..].as_mut_ptr().cast::<c_char>(), want) };
            match n {
                0 => break,
                n if n > 0 => done += n as usize,
                _ => return Err(Error::last_error()),
            }
        }
        if done == buf.len() {
            // The server may still have an end-of-stream marker to send: drain it.
            let mut tail = [0u8; 1];
            // SAFETY: one byte of a local buffer.
            let n = unsafe { ffi::virStreamRecv(st, tail.as_mut_ptr().cast::<c_char>(), 1) };
            if n < 0 {
                return Err(Error::last_error());
            }
        }
        stream.finish()?;
        Ok(done)
    }

    /// `virStorageVolUpload` of `length` bytes at `offset` of the volume's host file: the
    /// bytes are given to [`Upload::send`], then [`Upload::finish`] commits them. Dropped
    /// unfinished, the upload is aborted.
    pub fn upload(&self, offset: u64, length: u64) -> Result<Upload> {
        let stream = Stream::new(&self.conn)?;
        // SAFETY: valid volume and stream.
        check(unsafe { ffi::virStorageVolUpload(self.ptr, stream.0, offset, length, 0) })?;
        Ok(Upload(stream))
    }
}

/// A blocking `virStream` of one call: aborted unless finished, then freed.
struct Stream(ffi::virStreamPtr, bool);

impl Stream {
    fn new(conn: &Connect) -> Result<Stream> {
        // SAFETY: valid connection; a blocking stream (flags 0).
        let st = unsafe { ffi::virStreamNew(conn.ptr, 0) };
        if st.is_null() {
            return Err(Error::last_error());
        }
        Ok(Stream(st, false))
    }

    fn finish(&mut self) -> Result<()> {
        // SAFETY: valid stream, all data sent or received.
        check(unsafe { ffi::virStreamFinish(self.0) })?;
        self.1 = true;
        Ok(())
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        // SAFETY: the stream of this call; aborted unless finished, then freed.
        unsafe {
            if !self.1 {
                ffi::virStreamAbort(self.0);
            }
            ffi::virStreamFree(self.0);
        }
    }
}

/// An upload into a volume under way ([`StorageVol::upload`]).
pub struct Upload(Stream);

impl Upload {
    /// Send all of `data`, the next bytes of the upload.
    pub fn send(&mut self, mut data: &[u8]) -> Result<()> {
        while !data.is_empty() {
            let n = data.len().min(1 << 20);
            // SAFETY: `n` readable bytes of `data`.
            let sent = unsafe { ffi::virStreamSend(self.0 .0, data.as_ptr().cast::<c_char>(), n) };
            if sent <= 0 {
                return Err(Error::last_error());
            }
            data = &data[sent as usize..];
        }
        Ok(())
    }

    /// Every byte sent: the remote side commits the upload.
    pub fn finish(mut self) -> Result<()> {
        self.0.finish()
    }
}

impl Drop for StorageVol {
    fn drop(&mut self) {
        // SAFETY: frees the reference this value holds.
        unsafe { ffi::virStorageVolFree(self.ptr) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_numbers_are_the_headers() {
        assert_eq!(ErrorCode(42).known(), Some(ErrorNumber::NoDomain));
        assert_eq!(ErrorCode(80).known(), Some(ErrorNumber::NoDomainMetadata));
        assert_eq!(
            ErrorCode(112).known(),
            Some(ErrorNumber::AgentCommandTimeout)
        );
        assert_eq!(ErrorCode(1).known(), None);
        assert_eq!(StateCode(3).known(), Some(DomainState::Paused));
        assert_eq!(StateCode(9).known(), None);
    }

    #[test]
    fn the_test_driver_through_the_loaded_library() {
        // libvirt's in-process test driver: one running domain "test", no daemon needed.
        let c = match Connect::open(Some("test:///default")) {
            Ok(c) => c,
            Err(e) => panic!("libvirt must load and open test:///default: {e}"),
        };
        assert_eq!(c.driver_type().unwrap(), "TEST");
        assert!(c.is_alive().unwrap());
        let d = c.lookup_domain_by_name("test").unwrap();
        assert_eq!(d.name().unwrap(), "test");
        assert_eq!(d.uuid_string().unwrap().len(), 36);
        assert!(d.xml_desc(0).unwrap().contains("<name>test</name>"));
        assert_eq!(d.info().unwrap().state.known(), Some(DomainState::Running));
        let names: Vec<String> = c
            .list_all_domains(0)
            .unwrap()
            .iter()
            .map(|d| d.name().unwrap())
            .collect();
        assert!(names.contains(&"test".to_string()), "{names:?}");
        let e = c.lookup_domain_by_name("no-such-domain").err().unwrap();
        assert_eq!(e.code().known(), Some(ErrorNumber::NoDomain), "{e}");
        let e = d
            .metadata(
                sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
                Some("https://snapfs.dev/t"),
                0,
            )
            .err()
            .unwrap();
        assert_eq!(e.code().known(), Some(ErrorNumber::NoDomainMetadata), "{e}");
        d.set_metadata(
            sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
            Some("<x/>"),
            Some("t"),
            Some("https://snapfs.dev/t"),
            sys::VIR_DOMAIN_AFFECT_LIVE,
        )
        .unwrap();
        assert!(d
            .metadata(
                sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
                Some("https://snapfs.dev/t"),
                0
            )
            .unwrap()
            .contains("x"));
        let c2 = c.clone();
        drop(c);
        assert!(c2.is_alive().unwrap());
    }
}

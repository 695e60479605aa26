//! The libvirt C functions snapfs calls (`libvirt/libvirt.h`, `libvirt/libvirt-qemu.h`, all
//! present since libvirt 6.0: the backup calls are the newest). Only `super` calls these; nothing else may.
//!
//! Loaded with `dlopen` by [`load`] when the first connection is opened, not linked: a daemon
//! without `--libvirt` neither needs libvirt installed nor loads libvirt.so and the ~50 shared
//! objects behind it (60–90 ms of a cold start here). Before a successful [`load`] every
//! wrapper fails (`-1`/NULL) without calling anything.

#![allow(non_camel_case_types, non_snake_case)]

use std::ffi::{c_char, c_int, c_uchar, c_uint, c_ulong, c_ulonglong, c_ushort, c_void};
use std::ptr::{null, null_mut};

pub type virConnectPtr = *mut c_void;
pub type virDomainPtr = *mut c_void;
pub type virDomainSnapshotPtr = *mut c_void;
pub type virStoragePoolPtr = *mut c_void;
pub type virStorageVolPtr = *mut c_void;
pub type virStreamPtr = *mut c_void;

/// `struct _virStorageVolInfo`.
#[repr(C)]
#[derive(Default)]
pub struct virStorageVolInfo {
    pub type_: c_int,
    pub capacity: c_ulonglong,
    pub allocation: c_ulonglong,
}
pub type virErrorFunc = Option<unsafe extern "C" fn(*mut c_void, *mut virError)>;

/// The leading fields of `struct _virError` (the rest is not read).
#[repr(C)]
pub struct virError {
    pub code: c_int,
    pub domain: c_int,
    pub message: *mut c_char,
}

/// The value union of `struct _virTypedParameter`.
#[repr(C)]
#[derive(Clone, Copy)]
pub union virTypedParameterValue {
    pub i: c_int,
    pub ui: c_uint,
    pub l: i64,
    pub ul: u64,
    pub d: f64,
    pub b: c_char,
    pub s: *mut c_char,
}

/// `struct _virTypedParameter`: a name, a type tag and a value.
#[repr(C)]
pub struct virTypedParameter {
    pub field: [c_char; 80],
    pub type_: c_int,
    pub value: virTypedParameterValue,
}
pub type virTypedParameterPtr = *mut virTypedParameter;

/// `struct _virDomainInfo`.
#[repr(C)]
#[derive(Default)]
pub struct virDomainInfo {
    pub state: c_uchar,
    pub maxMem: c_ulong,
    pub memory: c_ulong,
    pub nrVirtCpu: c_ushort,
    pub cpuTime: c_ulonglong,
}

/// `virDomainJobInfo` (libvirt-domain.h): the job's type and eleven counters.
#[repr(C)]
#[derive(Default)]
pub struct virDomainJobInfo {
    pub type_: c_int,
    pub counters: [c_ulonglong; 11],
}

const LIBVIRT: &str = "libvirt.so.0";
const LIBVIRT_QEMU: &str = "libvirt-qemu.so.0";

crate::dl::dl_api! {
    LIBVIRT => {
        fn virConnectOpen(name: *const c_char) -> virConnectPtr = null_mut();
        fn virConnectClose(conn: virConnectPtr) -> c_int = -1;
        fn virConnectRef(conn: virConnectPtr) -> c_int = -1;
        fn virConnectIsAlive(conn: virConnectPtr) -> c_int = -1;
        fn virConnectGetType(conn: virConnectPtr) -> *const c_char = null();
        fn virConnectSetKeepAlive(conn: virConnectPtr, interval: c_int, count: c_uint) -> c_int = -1;
        fn virEventRegisterDefaultImpl() -> c_int = -1;
        fn virEventRunDefaultImpl() -> c_int = -1;
        fn virConnectListAllDomains(conn: virConnectPtr, domains: *mut *mut virDomainPtr, flags: c_uint) -> c_int = -1;
        fn virConnectListAllStoragePools(conn: virConnectPtr, pools: *mut *mut virStoragePoolPtr, flags: c_uint) -> c_int = -1;
        fn virDomainLookupByName(conn: virConnectPtr, name: *const c_char) -> virDomainPtr = null_mut();
        fn virDomainLookupByUUIDString(conn: virConnectPtr, uuid: *const c_char) -> virDomainPtr = null_mut();
        fn virDomainDefineXML(conn: virConnectPtr, xml: *const c_char) -> virDomainPtr = null_mut();
        fn virDomainFree(dom: virDomainPtr) -> c_int = -1;
        fn virDomainRef(dom: virDomainPtr) -> c_int = -1;
        fn virDomainGetName(dom: virDomainPtr) -> *const c_char = null();
        fn virDomainGetUUIDString(dom: virDomainPtr, buf: *mut c_char) -> c_int = -1;
        fn virDomainGetXMLDesc(dom: virDomainPtr, flags: c_uint) -> *mut c_char = null_mut();
        fn virDomainGetInfo(dom: virDomainPtr, info: *mut virDomainInfo) -> c_int = -1;
        fn virDomainGetJobInfo(dom: virDomainPtr, info: *mut virDomainJobInfo) -> c_int = -1;
        fn virDomainCreate(dom: virDomainPtr) -> c_int = -1;
        fn virDomainRestoreFlags(conn: virConnectPtr, from: *const c_char, dxml: *const c_char, flags: c_uint) -> c_int = -1;
        fn virDomainDestroy(dom: virDomainPtr) -> c_int = -1;
        fn virDomainUndefine(dom: virDomainPtr) -> c_int = -1;
        fn virDomainSuspend(dom: virDomainPtr) -> c_int = -1;
        fn virDomainResume(dom: virDomainPtr) -> c_int = -1;
        fn virDomainIsActive(dom: virDomainPtr) -> c_int = -1;
        fn virDomainIsPersistent(dom: virDomainPtr) -> c_int = -1;
        fn virDomainGetMetadata(dom: virDomainPtr, kind: c_int, uri: *const c_char, flags: c_uint) -> *mut c_char = null_mut();
        fn virDomainSetMetadata(dom: virDomainPtr, kind: c_int, metadata: *const c_char, key: *const c_char, uri: *const c_char, flags: c_uint) -> c_int = -1;
        fn virDomainFSFreeze(dom: virDomainPtr, mountpoints: *mut *const c_char, nmountpoints: c_uint, flags: c_uint) -> c_int = -1;
        fn virDomainFSThaw(dom: virDomainPtr, mountpoints: *mut *const c_char, nmountpoints: c_uint, flags: c_uint) -> c_int = -1;
        fn virDomainBackupBegin(dom: virDomainPtr, backup_xml: *const c_char, checkpoint_xml: *const c_char, flags: c_uint) -> c_int = -1;
        fn virDomainBackupGetXMLDesc(dom: virDomainPtr, flags: c_uint) -> *mut c_char = null_mut();
        fn virDomainAbortJob(dom: virDomainPtr) -> c_int = -1;
        fn virDomainGetJobStats(dom: virDomainPtr, type_: *mut c_int, params: *mut virTypedParameterPtr, nparams: *mut c_int, flags: c_uint) -> c_int = -1;
        fn virTypedParamsFree(params: virTypedParameterPtr, nparams: c_int);
        fn virDomainListAllSnapshots(dom: virDomainPtr, snaps: *mut *mut virDomainSnapshotPtr, flags: c_uint) -> c_int = -1;
        fn virDomainSnapshotLookupByName(dom: virDomainPtr, name: *const c_char, flags: c_uint) -> virDomainSnapshotPtr = null_mut();
        fn virDomainSnapshotCreateXML(dom: virDomainPtr, xml: *const c_char, flags: c_uint) -> virDomainSnapshotPtr = null_mut();
        fn virDomainSnapshotGetName(snap: virDomainSnapshotPtr) -> *const c_char = null();
        fn virDomainSnapshotGetXMLDesc(snap: virDomainSnapshotPtr, flags: c_uint) -> *mut c_char = null_mut();
        fn virDomainSnapshotDelete(snap: virDomainSnapshotPtr, flags: c_uint) -> c_int = -1;
        fn virDomainRevertToSnapshot(snap: virDomainSnapshotPtr, flags: c_uint) -> c_int = -1;
        fn virDomainSnapshotIsCurrent(snap: virDomainSnapshotPtr, flags: c_uint) -> c_int = -1;
        fn virDomainSnapshotFree(snap: virDomainSnapshotPtr) -> c_int = -1;
        fn virStoragePoolGetName(pool: virStoragePoolPtr) -> *const c_char = null();
        fn virStoragePoolGetXMLDesc(pool: virStoragePoolPtr, flags: c_uint) -> *mut c_char = null_mut();
        fn virStoragePoolFree(pool: virStoragePoolPtr) -> c_int = -1;
        fn virStoragePoolRefresh(pool: virStoragePoolPtr, flags: c_uint) -> c_int = -1;
        fn virStorageVolLookupByPath(conn: virConnectPtr, path: *const c_char) -> virStorageVolPtr = null_mut();
        fn virStorageVolGetInfoFlags(vol: virStorageVolPtr, info: *mut virStorageVolInfo, flags: c_uint) -> c_int = -1;
        fn virStorageVolGetXMLDesc(vol: virStorageVolPtr, flags: c_uint) -> *mut c_char = null_mut();
        fn virStorageVolDownload(vol: virStorageVolPtr, stream: virStreamPtr, offset: c_ulonglong, length: c_ulonglong, flags: c_uint) -> c_int = -1;
        fn virStorageVolUpload(vol: virStorageVolPtr, stream: virStreamPtr, offset: c_ulonglong, length: c_ulonglong, flags: c_uint) -> c_int = -1;
        fn virStorageVolFree(vol: virStorageVolPtr) -> c_int = -1;
        fn virStoragePoolLookupByVolume(vol: virStorageVolPtr) -> virStoragePoolPtr = null_mut();
        fn virStorageVolCreateXML(pool: virStoragePoolPtr, xml: *const c_char, flags: c_uint) -> virStorageVolPtr = null_mut();
        fn virStorageVolDelete(vol: virStorageVolPtr, flags: c_uint) -> c_int = -1;
        fn virStorageVolGetPath(vol: virStorageVolPtr) -> *mut c_char = null_mut();
        fn virStreamNew(conn: virConnectPtr, flags: c_uint) -> virStreamPtr = null_mut();
        fn virStreamRecv(stream: virStreamPtr, data: *mut c_char, nbytes: usize) -> c_int = -1;
        fn virStreamSend(stream: virStreamPtr, data: *const c_char, nbytes: usize) -> c_int = -1;
        fn virStreamFinish(stream: virStreamPtr) -> c_int = -1;
        fn virStreamAbort(stream: virStreamPtr) -> c_int = -1;
        fn virStreamFree(stream: virStreamPtr) -> c_int = -1;
        fn virGetLastError() -> *mut virError = null_mut();
        fn virSetErrorFunc(user_data: *mut c_void, handler: virErrorFunc);
    }
    LIBVIRT_QEMU => {
        fn virDomainQemuAgentCommand(dom: virDomainPtr, cmd: *const c_char, timeout: c_int, flags: c_uint) -> *mut c_char = null_mut();
    }
}

//! The few librados/librbd C functions snapfs calls (Ceph 16 headers, `rados/librados.h` and
//! `rbd/librbd.h`). Only `super` calls these; nothing else may.
//!
//! The libraries are loaded with `dlopen` by [`load`] when the first cluster is connected,
//! not linked: a daemon without `--ceph` neither needs the Ceph packages installed nor pays
//! for loading them (librados, librbd and their ~30 dependencies: 40-70 ms of a cold start).
//! Each function below is a wrapper that calls through the loaded table; before a successful
//! [`load`] (which `Cluster::connect` does first) it returns `-ENOSYS` and does nothing.

#![allow(non_camel_case_types)]

use std::ffi::{c_char, c_int, c_void};

pub type rados_t = *mut c_void;
pub type rados_ioctx_t = *mut c_void;
pub type rbd_image_t = *mut c_void;
pub type rbd_completion_t = *mut c_void;
pub type rbd_image_options_t = *mut c_void;
pub type rbd_callback_t = extern "C" fn(rbd_completion_t, *mut c_void);

/// `int (*cb)(uint64_t offset, size_t len, int exists, void *arg)` of `rbd_diff_iterate2`.
pub type diff_cb = extern "C" fn(u64, usize, c_int, *mut c_void) -> c_int;

pub const RBD_MAX_IMAGE_NAME_SIZE: usize = 96;
pub const RBD_MAX_BLOCK_NAME_SIZE: usize = 24;

/// `RBD_IMAGE_OPTION_CLONE_FORMAT` of `rbd/librbd.h` (1: protected parent snapshot, same
/// namespace; 2: no protection, any namespace).
pub const RBD_IMAGE_OPTION_CLONE_FORMAT: c_int = 12;

/// `RBD_SNAP_NAMESPACE_TYPE_USER` of `rbd_snap_namespace_type_t`: a snapshot someone made
/// (the others: group, trash, mirror).
pub const RBD_SNAP_NAMESPACE_TYPE_USER: c_int = 0;

pub const LIBRADOS_OP_FLAG_FADVISE_SEQUENTIAL: c_int = 0x8;
pub const LIBRADOS_OP_FLAG_FADVISE_NOCACHE: c_int = 0x40;

#[repr(C)]
pub struct rbd_image_info_t {
    pub size: u64,
    pub obj_size: u64,
    pub num_objs: u64,
    pub order: c_int,
    pub block_name_prefix: [c_char; RBD_MAX_BLOCK_NAME_SIZE],
    pub parent_pool: i64,
    pub parent_name: [c_char; RBD_MAX_IMAGE_NAME_SIZE],
}

#[repr(C)]
pub struct rbd_image_spec_t {
    pub id: *mut c_char,
    pub name: *mut c_char,
}

/// One client watching an image (`rbd_watchers_list`).
#[repr(C)]
pub struct rbd_image_watcher_t {
    pub addr: *mut c_char,
    pub id: i64,
    pub cookie: u64,
}

#[repr(C)]
pub struct rbd_linked_image_spec_t {
    pub pool_id: i64,
    pub pool_name: *mut c_char,
    pub pool_namespace: *mut c_char,
    pub image_id: *mut c_char,
    pub image_name: *mut c_char,
    pub trash: bool,
}

#[repr(C)]
pub struct rbd_snap_spec_t {
    pub id: u64,
    /// `rbd_snap_namespace_type_t`, a C enum.
    pub namespace_type: c_int,
    pub name: *mut c_char,
}

#[repr(C)]
pub struct rbd_snap_info_t {
    pub id: u64,
    pub size: u64,
    pub name: *const c_char,
}

const ENOSYS: c_int = -libc::ENOSYS;

/// Where each library comes from: the soname Debian's librados2/librbd1 install.
const RADOS: &str = "librados.so.2";
const RBD: &str = "librbd.so.1";

crate::dl::dl_api! {
    RADOS => {
        fn rados_create2(cluster: *mut rados_t, clustername: *const c_char, name: *const c_char, flags: u64) -> c_int = ENOSYS;
        fn rados_conf_read_file(cluster: rados_t, path: *const c_char) -> c_int = ENOSYS;
        fn rados_conf_set(cluster: rados_t, option: *const c_char, value: *const c_char) -> c_int = ENOSYS;
        fn rados_connect(cluster: rados_t) -> c_int = ENOSYS;
        fn rados_shutdown(cluster: rados_t);
        fn rados_ioctx_create(cluster: rados_t, pool_name: *const c_char, ioctx: *mut rados_ioctx_t) -> c_int = ENOSYS;
        fn rados_ioctx_destroy(io: rados_ioctx_t);
        fn rados_ioctx_set_namespace(io: rados_ioctx_t, nspace: *const c_char);
        fn rados_exec(io: rados_ioctx_t, oid: *const c_char, cls: *const c_char, method: *const c_char, in_buf: *const c_char, in_len: usize, buf: *mut c_char, out_len: usize) -> c_int = ENOSYS;
    }
    RBD => {
        fn rbd_list2(io: rados_ioctx_t, images: *mut rbd_image_spec_t, max: *mut usize) -> c_int = ENOSYS;
        fn rbd_image_spec_list_cleanup(images: *mut rbd_image_spec_t, n: usize);
        fn rbd_image_options_create(opts: *mut rbd_image_options_t);
        fn rbd_image_options_destroy(opts: rbd_image_options_t);
        fn rbd_image_options_set_uint64(opts: rbd_image_options_t, optname: c_int, optval: u64) -> c_int = ENOSYS;
        fn rbd_namespace_create(io: rados_ioctx_t, namespace_name: *const c_char) -> c_int = ENOSYS;
        fn rbd_namespace_exists(io: rados_ioctx_t, namespace_name: *const c_char, exists: *mut bool) -> c_int = ENOSYS;
        fn rbd_clone3(p_ioctx: rados_ioctx_t, p_name: *const c_char, p_snapname: *const c_char, c_ioctx: rados_ioctx_t, c_name: *const c_char, c_opts: rbd_image_options_t) -> c_int = ENOSYS;
        fn rbd_remove(io: rados_ioctx_t, name: *const c_char) -> c_int = ENOSYS;
        fn rbd_flatten(image: rbd_image_t) -> c_int = ENOSYS;
        fn rbd_open(io: rados_ioctx_t, name: *const c_char, image: *mut rbd_image_t, snap_name: *const c_char) -> c_int = ENOSYS;
        fn rbd_open_read_only(io: rados_ioctx_t, name: *const c_char, image: *mut rbd_image_t, snap_name: *const c_char) -> c_int = ENOSYS;
        fn rbd_close(image: rbd_image_t) -> c_int = ENOSYS;
        fn rbd_stat(image: rbd_image_t, info: *mut rbd_image_info_t, infosize: usize) -> c_int = ENOSYS;
        fn rbd_get_features(image: rbd_image_t, features: *mut u64) -> c_int = ENOSYS;
        fn rbd_get_id(image: rbd_image_t, id: *mut c_char, id_len: usize) -> c_int = ENOSYS;
        fn rbd_get_create_timestamp(image: rbd_image_t, ts: *mut libc::timespec) -> c_int = ENOSYS;
        fn rbd_get_modify_timestamp(image: rbd_image_t, ts: *mut libc::timespec) -> c_int = ENOSYS;
        fn rbd_get_parent(image: rbd_image_t, parent_image: *mut rbd_linked_image_spec_t, parent_snap: *mut rbd_snap_spec_t) -> c_int = ENOSYS;
        fn rbd_linked_image_spec_cleanup(image: *mut rbd_linked_image_spec_t);
        fn rbd_linked_image_spec_list_cleanup(images: *mut rbd_linked_image_spec_t, n: usize);
        fn rbd_snap_spec_cleanup(snap: *mut rbd_snap_spec_t);
        fn rbd_list_children3(image: rbd_image_t, images: *mut rbd_linked_image_spec_t, max: *mut usize) -> c_int = ENOSYS;
        fn rbd_snap_list(image: rbd_image_t, snaps: *mut rbd_snap_info_t, max: *mut c_int) -> c_int = ENOSYS;
        fn rbd_snap_list_end(snaps: *mut rbd_snap_info_t);
        fn rbd_snap_create(image: rbd_image_t, name: *const c_char) -> c_int = ENOSYS;
        fn rbd_snap_remove(image: rbd_image_t, name: *const c_char) -> c_int = ENOSYS;
        fn rbd_snap_remove_by_id(image: rbd_image_t, snap_id: u64) -> c_int = ENOSYS;
        fn rbd_snap_get_id(image: rbd_image_t, snapname: *const c_char, snap_id: *mut u64) -> c_int = ENOSYS;
        fn rbd_snap_rename(image: rbd_image_t, from: *const c_char, to: *const c_char) -> c_int = ENOSYS;
        fn rbd_snap_rollback(image: rbd_image_t, name: *const c_char) -> c_int = ENOSYS;
        fn rbd_watchers_list(image: rbd_image_t, watchers: *mut rbd_image_watcher_t, max: *mut usize) -> c_int = ENOSYS;
        fn rbd_watchers_list_cleanup(watchers: *mut rbd_image_watcher_t, n: usize);
        fn rbd_snap_protect(image: rbd_image_t, name: *const c_char) -> c_int = ENOSYS;
        fn rbd_snap_unprotect(image: rbd_image_t, name: *const c_char) -> c_int = ENOSYS;
        fn rbd_snap_is_protected(image: rbd_image_t, name: *const c_char, is_protected: *mut c_int) -> c_int = ENOSYS;
        fn rbd_snap_get_namespace_type(image: rbd_image_t, snap_id: u64, namespace_type: *mut c_int) -> c_int = ENOSYS;
        fn rbd_snap_get_timestamp(image: rbd_image_t, id: u64, ts: *mut libc::timespec) -> c_int = ENOSYS;
        fn rbd_snap_set(image: rbd_image_t, name: *const c_char) -> c_int = ENOSYS;
        fn rbd_read2(image: rbd_image_t, ofs: u64, len: usize, buf: *mut c_char, op_flags: c_int) -> isize = ENOSYS as isize;
        fn rbd_aio_create_completion(cb_arg: *mut c_void, complete_cb: Option<rbd_callback_t>, c: *mut rbd_completion_t) -> c_int = ENOSYS;
        fn rbd_aio_read2(image: rbd_image_t, off: u64, len: usize, buf: *mut c_char, c: rbd_completion_t, op_flags: c_int) -> c_int = ENOSYS;
        fn rbd_aio_wait_for_complete(c: rbd_completion_t) -> c_int = ENOSYS;
        fn rbd_aio_is_complete(c: rbd_completion_t) -> c_int = 0;
        fn rbd_aio_get_return_value(c: rbd_completion_t) -> isize = ENOSYS as isize;
        fn rbd_aio_release(c: rbd_completion_t);
        fn rbd_diff_iterate2(image: rbd_image_t, fromsnapname: *const c_char, ofs: u64, len: u64, include_parent: u8, whole_object: u8, cb: diff_cb, arg: *mut c_void) -> c_int = ENOSYS;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_library_is_an_error_naming_it() {
        // SAFETY: dlopen of a name that does not exist loads nothing.
        let e = unsafe { crate::dl::open_library("libsnapfs-no-such-library.so.0") }.unwrap_err();
        assert!(e.contains("libsnapfs-no-such-library.so.0"), "{e}");
    }

    #[test]
    fn wrappers_refuse_before_loading() {
        // Unloaded (the table is only filled by `load`, which this test does not call when
        // the table is empty): the wrapper returns -ENOSYS instead of jumping anywhere.
        if API.get().is_none() {
            // SAFETY: a null image is never dereferenced by the unloaded wrapper.
            let rc = unsafe { rbd_snap_create(std::ptr::null_mut(), std::ptr::null()) };
            assert_eq!(rc, -libc::ENOSYS);
        }
    }
}

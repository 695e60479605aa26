//! Loading C libraries when they are first needed rather than linking them: the Ceph and
//! libvirt client libraries (with ~30 and ~50 shared objects behind them) are then read from
//! disk only by a daemon that is asked to use them, and a host without them can still run
//! snapfs for what does not need them.
//!
//! [`dl_api!`] declares the entry points once and makes, from that list: a table of function
//! pointers resolved with `dlopen`/`dlsym`, a `load()` that fills it once, and one
//! `pub unsafe fn` wrapper per entry point with the C signature. `fn f(..) -> T = D;` makes a
//! wrapper that returns `D` when the table is not loaded (void functions do nothing then), so
//! nothing ever jumps through an unresolved pointer.

use std::ffi::{c_void, CStr, CString};

/// See the module documentation. Used as
/// `dl_api! { "libfoo.so.1" => { fn foo(a: c_int) -> c_int = -1; fn bar(p: *mut c_void); } … }`
/// (the library names may be constants).
macro_rules! dl_api {
    ($( $lib:expr => { $( fn $name:ident ( $($arg:ident : $ty:ty),* ) $(-> $ret:ty = $def:expr)? ; )* } )*) => {
        struct Api {
            $($( $name: unsafe extern "C" fn($($ty),*) $(-> $ret)?, )*)*
        }

        impl Api {
            /// SAFETY: the signatures must match the C headers; the libraries stay loaded for
            /// the life of the process (never `dlclose`d).
            unsafe fn resolve() -> std::result::Result<Api, String> {
                $(
                    let lib = $crate::dl::open_library($lib)?;
                    $(
                        let $name = std::mem::transmute::<*mut std::ffi::c_void, unsafe extern "C" fn($($ty),*) $(-> $ret)?>(
                            $crate::dl::symbol(lib, stringify!($name))?,
                        );
                    )*
                )*
                Ok(Api { $($( $name, )*)* })
            }
        }

        static API: std::sync::OnceLock<std::result::Result<Api, String>> = std::sync::OnceLock::new();

        /// Load the libraries (once; later calls return the first outcome). The error names
        /// the library or symbol and says what the dynamic loader said.
        pub fn load() -> std::result::Result<(), String> {
            // SAFETY: see Api::resolve.
            match API.get_or_init(|| unsafe { Api::resolve() }) {
                Ok(_) => Ok(()),
                Err(e) => Err(e.clone()),
            }
        }

        $($(
            #[allow(clippy::too_many_arguments)]
            pub unsafe fn $name($($arg: $ty),*) $(-> $ret)? {
                match API.get() {
                    Some(Ok(api)) => (api.$name)($($arg),*),
                    _ => { $( return $def; )? }
                }
            }
        )*)*
    };
}
pub(crate) use dl_api;

/// `dlopen` a library by soname.
///
/// # Safety
/// Loading a library runs its initialisers.
pub unsafe fn open_library(name: &str) -> Result<*mut c_void, String> {
    let c = CString::new(name).map_err(|_| format!("{name}: NUL in name"))?;
    let h = libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
    if h.is_null() {
        return Err(dl_error(name));
    }
    Ok(h)
}

/// # Safety
/// `lib` must come from [`open_library`].
pub unsafe fn symbol(lib: *mut c_void, name: &str) -> Result<*mut c_void, String> {
    let c = CString::new(name).map_err(|_| format!("{name}: NUL in name"))?;
    let f = libc::dlsym(lib, c.as_ptr());
    if f.is_null() {
        return Err(dl_error(name));
    }
    Ok(f)
}

unsafe fn dl_error(what: &str) -> String {
    let e = libc::dlerror();
    if e.is_null() {
        format!("{what}: not found")
    } else {
        CStr::from_ptr(e).to_string_lossy().into_owned()
    }
}

//! One error type for the whole daemon, and the one place that maps it to an errno.

use std::io;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("not found: {0}")]
    NotFound(String),
    #[error("already exists: {0}")]
    Exists(String),
    #[error("invalid: {0}")]
    Invalid(String),
    #[error("name too long: {0} bytes (limit 255)")]
    NameTooLong(usize),
    #[error("read-only: {0}")]
    ReadOnly(String),
    #[error("not permitted: {0}")]
    NotPermitted(String),
    #[error("busy: {0}")]
    Busy(String),
    #[error("not supported: {0}")]
    NotSupported(String),
    #[error("timed out: {0}")]
    TimedOut(String),
    #[error("no space: {0}")]
    NoSpace(String),
    #[error("cross-device rename: {0}")]
    CrossDevice(String),
    #[error("not a directory: {0}")]
    NotDir(String),
    #[error("is a directory: {0}")]
    IsDir(String),
    /// Encrypted content without its key (fscrypt: ENOKEY, as Linux answers).
    #[error("key not available: {0}")]
    NoKey(String),
    #[error("no such attribute")]
    NoAttr,
    #[error("buffer too small")]
    Range,
    /// SEEK_DATA/SEEK_HOLE past the end, or no data after the offset.
    #[error("no such offset")]
    NoSuchOffset,
    /// The image (or guest filesystem) on disk is not what its format says it should be.
    #[error("corrupt image {path}: {what} (at offset {offset:#x})")]
    Corrupt {
        path: String,
        offset: u64,
        what: String,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// A control plane (libvirt, Ceph, qemu-img) failed for a reason none of the above names.
    #[error("backend: {0}")]
    Backend(String),
}

impl Error {
    /// The errno a filesystem caller sees for this error; the only such mapping in the crate.
    pub fn errno(&self) -> i32 {
        match self {
            Error::NotFound(_) => libc::ENOENT,
            Error::Exists(_) => libc::EEXIST,
            Error::Invalid(_) => libc::EINVAL,
            Error::NameTooLong(_) => libc::ENAMETOOLONG,
            Error::ReadOnly(_) => libc::EROFS,
            Error::NotPermitted(_) => libc::EPERM,
            Error::Busy(_) => libc::EBUSY,
            Error::NotSupported(_) => libc::ENOTSUP,
            Error::TimedOut(_) => libc::ETIMEDOUT,
            Error::NoSpace(_) => libc::ENOSPC,
            Error::CrossDevice(_) => libc::EXDEV,
            Error::NotDir(_) => libc::ENOTDIR,
            Error::IsDir(_) => libc::EISDIR,
            Error::NoKey(_) => libc::ENOKEY,
            Error::NoAttr => libc::ENODATA,
            Error::Range => libc::ERANGE,
            Error::NoSuchOffset => libc::ENXIO,
            Error::Corrupt { .. } | Error::Backend(_) => libc::EIO,
            Error::Io { source, .. } => match source.raw_os_error() {
                Some(e) if e == libc::ENOSPC || e == libc::EDQUOT => libc::ENOSPC,
                _ => libc::EIO,
            },
        }
    }

    /// Whether this error is an expected refusal (logged at debug) rather than a failure (warn).
    pub fn is_refusal(&self) -> bool {
        !matches!(
            self,
            Error::Corrupt { .. } | Error::Io { .. } | Error::Backend(_) | Error::TimedOut(_)
        )
    }

    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    pub fn corrupt(path: impl Into<String>, offset: u64, what: impl Into<String>) -> Self {
        Error::Corrupt {
            path: path.into(),
            offset,
            what: what.into(),
        }
    }
}

/// `result.ctx("reading header of x")` turns an io::Error into `Error::Io` with that context.
pub trait IoContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::result::Result<T, io::Error> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(context(), e))
    }
}

//! The background daemon's log file, capped and rotated (`--log-max-mb`).
//!
//! A detached daemon has its stdout and stderr on the log file, and tracing writes to stderr
//! through [`LogWriter`]. Once [`rotate_at`] has named the file and its cap, each write first
//! checks the size: when the file would pass half the cap it is renamed to `FILE.1` (replacing
//! the previous one), a new `FILE` is opened and put on descriptors 1 and 2 (so a panic message
//! lands in the current file too). The two files together stay under the cap.
//! A daemon in the foreground logs to its stderr as it is, uncapped (its caller owns it).

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

struct Rotation {
    path: PathBuf,
    /// Rotate when the current file would pass this many bytes.
    half: u64,
    size: u64,
}

static ROTATION: Mutex<Option<Rotation>> = Mutex::new(None);

/// Cap the log file `path` (already on descriptors 1 and 2) at `max_bytes` in all, `path` and
/// `path.1` together.
pub fn rotate_at(path: &Path, max_bytes: u64) {
    let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let mut g = ROTATION.lock().unwrap_or_else(|e| e.into_inner());
    *g = Some(Rotation {
        path: path.to_path_buf(),
        half: (max_bytes / 2).max(4096),
        size,
    });
}

fn rotated_name(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".1");
    PathBuf::from(s)
}

impl Rotation {
    fn rotate(&mut self) -> std::io::Result<()> {
        std::fs::rename(&self.path, rotated_name(&self.path))?;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        // SAFETY: dup2 onto our own standard descriptors; `f` stays valid for the call.
        let ok = unsafe { libc::dup2(f.as_raw_fd(), 1) >= 0 && libc::dup2(f.as_raw_fd(), 2) >= 0 };
        if !ok {
            return Err(std::io::Error::last_os_error());
        }
        self.size = 0;
        Ok(())
    }
}

/// tracing's writer: stderr, with the size check of [`rotate_at`].
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut g = ROTATION.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = g.as_mut() {
            if r.size + buf.len() as u64 > r.half {
                if let Err(e) = r.rotate() {
                    // Keep writing where we are rather than lose the line; say why once.
                    let _ = writeln!(std::io::stderr(), "log rotation failed: {e}");
                    r.half = u64::MAX;
                }
            }
            r.size += buf.len() as u64;
        }
        // Under the lock, so a rotation never splits a line.
        std::io::stderr().write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotated_name_appends_one() {
        assert_eq!(
            rotated_name(Path::new("/x/snapfs.log")),
            Path::new("/x/snapfs.log.1")
        );
    }
}

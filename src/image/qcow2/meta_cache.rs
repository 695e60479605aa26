//! A qcow2 file's header and snapshot table, parsed once per file generation.
//!
//! Listing `.snapshots`, `volume.json` and every open of a snapshot all need them; an image's
//! metadata changes only when its file does, so the parse is keyed by the file's generation
//! (device, inode, size, mtime, ctime, from `fstat` of the descriptor that is read) and by the
//! header's first 128 bytes (one pread per lookup: file times are only as fine as the kernel's
//! clock tick, and every change of the snapshot table or the L1 table rewrites a field there:
//! `nb_snapshots`, `snapshots_offset`, `l1_table_offset`, `l1_size`). Refusals
//! (`Corrupt`, `NotSupported`) are kept as well, so a hostile table is walked once, not once per
//! listing. Bounded: at most [`MAX_ENTRIES`] files and about [`MAX_BYTES`] of parsed tables
//! (least recently used first out); a parse larger than that is used and not kept.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tracing::debug;

use super::super::hostfile::{Generation, HostFile};
use super::header::Header;
use super::snapshot::{self, Snapshot};
use crate::error::{Error, Result};

pub const MAX_ENTRIES: usize = 256;
pub const MAX_BYTES: usize = 32 << 20;

pub struct Parsed {
    pub header: Header,
    pub snapshots: Vec<Snapshot>,
}

impl Parsed {
    /// Approximate heap bytes held.
    fn bytes(&self) -> usize {
        let per = std::mem::size_of::<Snapshot>();
        self.snapshots
            .iter()
            .map(|s| per + s.entry.id.len() + s.entry.name.len())
            .sum::<usize>()
            + std::mem::size_of::<Header>()
            + self.header.damage.iter().map(String::len).sum::<usize>()
    }
}

/// A refusal as kept: rebuilt into an `Error` on each hit.
#[derive(Clone)]
enum Refusal {
    Corrupt {
        path: String,
        offset: u64,
        what: String,
    },
    NotSupported(String),
}

impl Refusal {
    fn of(e: &Error) -> Option<Refusal> {
        match e {
            Error::Corrupt { path, offset, what } => Some(Refusal::Corrupt {
                path: path.clone(),
                offset: *offset,
                what: what.clone(),
            }),
            Error::NotSupported(m) => Some(Refusal::NotSupported(m.clone())),
            _ => None,
        }
    }

    fn error(&self) -> Error {
        match self.clone() {
            Refusal::Corrupt { path, offset, what } => Error::Corrupt { path, offset, what },
            Refusal::NotSupported(m) => Error::NotSupported(m),
        }
    }
}

struct Slot {
    used: Instant,
    bytes: usize,
    value: std::result::Result<Arc<Parsed>, Refusal>,
}

/// Bytes of the header that are part of the key.
const KEY_HEADER: usize = 128;

type Key = (Generation, [u8; KEY_HEADER]);

static CACHE: Mutex<Option<HashMap<Key, Slot>>> = Mutex::new(None);

/// Attempts at a parse that the file's header does not change under.
const ATTEMPTS: u32 = 5;

#[cfg(test)]
thread_local! {
    /// Run once between reading the header and reading the snapshot table (a test's writer).
    static BETWEEN: std::cell::RefCell<Option<Box<dyn FnOnce()>>> =
        const { std::cell::RefCell::new(None) };
}

fn parse(f: &HostFile) -> Result<Parsed> {
    let header = Header::read(f)?;
    #[cfg(test)]
    if let Some(hook) = BETWEEN.with(|h| h.borrow_mut().take()) {
        hook();
    }
    let snapshots = snapshot::read_table(f, &header)?;
    if !header.damage.is_empty() {
        // Once per generation (this parse is kept), and rate-limited per image as any input.
        crate::input_warn!(
            &f.path().display().to_string(),
            "qcow2 image QEMU would refuse to open; its snapshots are served, flagged in \
             volume.json: {}",
            header.damage.join("; ")
        );
    }
    Ok(Parsed { header, snapshots })
}

fn read_head(f: &HostFile) -> Result<[u8; KEY_HEADER]> {
    let mut head = [0u8; KEY_HEADER];
    let n = (KEY_HEADER as u64).min(f.len()) as usize;
    f.read_meta(&mut head[..n], 0, "header")?;
    Ok(head)
}

/// The parsed metadata of `f` (as of the generation `f` was opened at).
pub fn get(f: &HostFile) -> Result<Arc<Parsed>> {
    // After a change, a new descriptor: the file has grown since `f` was opened (the new
    // table is often at its end) and `f` reads only as far as its length then.
    let mut fresh: Option<HostFile> = None;
    let mut head = read_head(f)?;
    for attempt in 1..=ATTEMPTS {
        let cur = fresh.as_ref().unwrap_or(f);
        let key = (cur.generation(), head);
        {
            let mut g = CACHE.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(slot) = g.get_or_insert_with(HashMap::new).get_mut(&key) {
                slot.used = Instant::now();
                return slot.value.clone().map_err(|r| r.error());
            }
        }
        // Parsed without the lock: two threads may both parse a new generation; one result stays.
        let res = parse(cur).map(Arc::new);
        if read_head(cur)? == head {
            return keep(key, res);
        }
        debug!(path = %f.path().display(), attempt, "qcow2 header changed while its tables were read; reading again");
        // Another host's file is not opened again here (its path means nothing on this
        // machine): a change there is an error for this read.
        if f.file().is_none() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10 * u64::from(attempt)));
        let next = HostFile::open(f.path())?;
        if next.file_id() != f.file_id() {
            return Err(Error::Backend(format!(
                "{} was replaced while its snapshot table was read",
                f.path().display()
            )));
        }
        head = read_head(&next)?;
        fresh = Some(next);
    }
    Err(Error::Backend(format!(
        "{}: the qcow2 header kept changing while its snapshot table was read",
        f.path().display()
    )))
}

/// Keep a parse (or a refusal) made while the header read `key.1`.
fn keep(key: Key, res: Result<Arc<Parsed>>) -> Result<Arc<Parsed>> {
    let value = match &res {
        Ok(p) => Ok(p.clone()),
        Err(e) => match Refusal::of(e) {
            Some(r) => Err(r),
            // I/O errors are not the file's content: not kept.
            None => return res,
        },
    };
    let bytes = match &value {
        Ok(p) => p.bytes(),
        Err(_) => 512,
    };
    if bytes <= MAX_BYTES {
        let mut g = CACHE.lock().unwrap_or_else(|e| e.into_inner());
        let map = g.get_or_insert_with(HashMap::new);
        let mut total: usize = map.values().map(|s| s.bytes).sum::<usize>() + bytes;
        while !map.is_empty() && (map.len() >= MAX_ENTRIES || total > MAX_BYTES) {
            let Some(oldest) = map.iter().min_by_key(|(_, s)| s.used).map(|(k, _)| *k) else {
                break;
            };
            if let Some(s) = map.remove(&oldest) {
                total -= s.bytes;
            }
        }
        map.insert(
            key,
            Slot {
                used: Instant::now(),
                bytes,
                value,
            },
        );
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::process::Command;

    fn qemu_img(args: &[&str], path: &Path) {
        let out = Command::new("qemu-img")
            .args(args)
            .arg(path)
            .output()
            .expect("running qemu-img");
        assert!(
            out.status.success(),
            "qemu-img {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// F8: `qemu-img snapshot -c` between our read of the header and our read of the snapshot
    /// table (the old table is punched out once the header points at the new one). The parse
    /// must be one state of the file, before or after, never the old count of the new zeros.
    #[test]
    fn a_table_rewritten_during_the_parse_is_read_again() {
        let dir = std::env::temp_dir().join(format!("snapfs-meta-cache-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("torn.qcow2");
        let out = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&path)
            .arg("64M")
            .output()
            .expect("running qemu-img");
        assert!(out.status.success());
        for s in ["a", "b"] {
            qemu_img(&["snapshot", "-c", s], &path);
        }
        let f = HostFile::open(&path).unwrap();
        let p2 = path.clone();
        BETWEEN.with(|h| {
            *h.borrow_mut() = Some(Box::new(move || qemu_img(&["snapshot", "-c", "c7"], &p2)))
        });
        let parsed = get(&f);
        let _ = std::fs::remove_dir_all(&dir);
        let names: Vec<String> = parsed
            .unwrap()
            .snapshots
            .iter()
            .map(|s| s.entry.name.clone())
            .collect();
        assert_eq!(names, ["a", "b", "c7"], "a parse that mixes two states");
    }
}

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

fn parse(f: &HostFile) -> Result<Parsed> {
    let header = Header::read(f)?;
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

/// The parsed metadata of `f` (as of the generation `f` was opened at).
pub fn get(f: &HostFile) -> Result<Arc<Parsed>> {
    let mut head = [0u8; KEY_HEADER];
    let n = (KEY_HEADER as u64).min(f.len()) as usize;
    f.read_meta(&mut head[..n], 0, "header")?;
    let key = (f.generation(), head);
    {
        let mut g = CACHE.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = g.get_or_insert_with(HashMap::new).get_mut(&key) {
            slot.used = Instant::now();
            return slot.value.clone().map_err(|r| r.error());
        }
    }
    // Parsed without the lock: two threads may both parse a new generation; one result stays.
    let res = parse(f).map(Arc::new);
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

//! Files of a remote libvirt host, read through its storage API: `virStorageVolDownload` of
//! a byte range into a stream, never a whole volume. The image readers (qcow2, raw, backing
//! chains) run unchanged on top ([`crate::image::hostfile::with_opener`]); a backing file
//! is found by its path among the remote host's pool volumes.
//!
//! Bytes go through the daemon's [`BlockCache`] in blocks of [`BLOCK`]; a reader that goes on
//! where the last download ended gets a growing read-ahead window (up to [`MAX_WINDOW`]
//! blocks in one download), a random reader gets one block.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::image::cache::{CacheKey, CacheKind};
use crate::image::hostfile::{Opener, RemoteFile, RemoteOpen};
use crate::image::BlockCache;
use crate::libvirt::{Connect, StorageVol};

use super::lv_err;

/// Bytes of one cached block.
pub const BLOCK: u64 = 1 << 20;
/// Most blocks one download fetches (read-ahead of a sequential reader).
pub const MAX_WINDOW: u64 = 16;

/// The opener of files on the host behind `conn` (named `uri` in errors).
pub fn opener(conn: Connect, uri: &str, cache: Arc<BlockCache>) -> Opener {
    let uri = uri.to_string();
    Arc::new(move |path: &Path| open(&conn, &uri, &cache, path))
}

fn open(conn: &Connect, uri: &str, cache: &Arc<BlockCache>, path: &Path) -> Result<RemoteOpen> {
    let p = path
        .to_str()
        .ok_or_else(|| Error::Invalid(format!("{}: not a UTF-8 path", path.display())))?;
    let vol = match conn.storage_vol_lookup_by_path(p) {
        Ok(v) => v,
        Err(_) => {
            // Files made since the pools were last scanned (a snapshot's overlay made by
            // libvirt) are no volumes until a refresh: rescan the active pools once.
            if let Ok(pools) = conn
                .list_all_storage_pools(crate::libvirt::sys::VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE)
            {
                for pool in pools {
                    let _ = pool.refresh();
                }
            }
            conn.storage_vol_lookup_by_path(p).map_err(|e| {
                // A path no pool holds cannot be read from here: not found, as a missing file.
                match lv_err(format!("volume {p} on {uri}"), e) {
                    Error::Backend(w) if w.contains("no storage vol") => Error::NotFound(w),
                    other => other,
                }
            })?
        }
    };
    let (_, len) = vol
        .capacity_and_physical()
        .map_err(|e| lv_err(format!("size of volume {p} on {uri}"), e))?;
    let xml = vol
        .xml_desc()
        .map_err(|e| lv_err(format!("volume {p} on {uri}"), e))?;
    let version = (timestamp(&xml, "mtime"), timestamp(&xml, "ctime"));
    let mut h = DefaultHasher::new();
    (uri, p).hash(&mut h);
    let id = h.finish();
    // Cache blocks of this version only: a changed file gets new keys.
    let mut hv = DefaultHasher::new();
    (id, version, len).hash(&mut hv);
    let file = VolFile {
        vol,
        len,
        // Top bit set: apart from BlockCache::new_image_id's counter.
        image: hv.finish() | (1 << 63),
        cache: cache.clone(),
        next: AtomicU64::new(u64::MAX),
        window: AtomicU64::new(1),
        name: format!("{p} on {uri}"),
    };
    Ok(RemoteOpen {
        file: Arc::new(file),
        len,
        id,
        mtime: version.0,
        ctime: version.1,
    })
}

/// `<timestamps><NAME>SECONDS.NANOS</NAME>` of a volume's XML, as (seconds, nanoseconds).
fn timestamp(xml: &str, name: &str) -> (i64, i64) {
    let open = format!("<{name}>");
    let Some(start) = xml.find(&open).map(|i| i + open.len()) else {
        return (0, 0);
    };
    let Some(len) = xml[start..].find('<') else {
        return (0, 0);
    };
    let v = xml[start..start + len].trim();
    let (s, n) = v.split_once('.').unwrap_or((v, "0"));
    (s.parse().unwrap_or(0), n.parse().unwrap_or(0))
}

struct VolFile {
    vol: StorageVol,
    len: u64,
    image: u64,
    cache: Arc<BlockCache>,
    /// The block after the last download: a miss there is a sequential reader.
    next: AtomicU64,
    window: AtomicU64,
    name: String,
}

impl VolFile {
    fn key(&self, block: u64) -> CacheKey {
        CacheKey {
            image: self.image,
            kind: CacheKind::Remote,
            offset: block * BLOCK,
        }
    }

    /// Block `b`, from the cache or downloaded (with the blocks read ahead after it).
    fn block(&self, b: u64) -> Result<Arc<Vec<u8>>> {
        if let Some(v) = self.cache.get(&self.key(b)) {
            return Ok(v);
        }
        let blocks = self.len.div_ceil(BLOCK);
        let window = if self.next.load(Ordering::Relaxed) == b {
            (self.window.load(Ordering::Relaxed) * 2).min(MAX_WINDOW)
        } else {
            1
        };
        let n = window.min(blocks.saturating_sub(b)).max(1);
        self.window.store(n.max(1), Ordering::Relaxed);
        self.next.store(b + n, Ordering::Relaxed);
        let start = b * BLOCK;
        let end = ((b + n) * BLOCK).min(self.len);
        let mut buf = vec![0u8; (end - start) as usize];
        let got = self
            .vol
            .download(&mut buf, start)
            .map_err(|e| lv_err(format!("downloading {} at {start:#x}", self.name), e))?;
        if got < buf.len() {
            return Err(Error::Backend(format!(
                "{}: {got} of {} bytes at {start:#x} received (the volume shrank?)",
                self.name,
                buf.len()
            )));
        }
        let mut first = None;
        for (i, chunk) in buf.chunks(BLOCK as usize).enumerate() {
            let v = Arc::new(chunk.to_vec());
            if i == 0 {
                first = Some(v.clone());
            }
            self.cache.insert(self.key(b + i as u64), v);
        }
        first.ok_or_else(|| Error::Backend(format!("{}: empty download", self.name)))
    }
}

impl RemoteFile for VolFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let b = pos / BLOCK;
            let data = self.block(b)?;
            let in_block = (pos - b * BLOCK) as usize;
            let avail = data.get(in_block..).unwrap_or(&[]);
            if avail.is_empty() {
                return Err(Error::Backend(format!(
                    "{}: no bytes at {pos:#x} (length {})",
                    self.name, self.len
                )));
            }
            let n = avail.len().min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&avail[..n]);
            done += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_timestamps() {
        let x = "<volume><target><timestamps><atime>1.5</atime>\
                 <mtime>1733500000.123456789</mtime><ctime>1733500001</ctime>\
                 </timestamps></target></volume>";
        assert_eq!(timestamp(x, "mtime"), (1733500000, 123456789));
        assert_eq!(timestamp(x, "ctime"), (1733500001, 0));
        assert_eq!(timestamp(x, "btime"), (0, 0));
        assert_eq!(timestamp("<mtime>x.y</mtime>", "mtime"), (0, 0));
    }
}

//! Files of a remote libvirt host, read through its storage API: `virStorageVolDownload` of
//! a byte range into a stream, never a whole volume. The image readers (qcow2, raw, backing
//! chains) run unchanged on top ([`crate::image::hostfile::with_opener`]); a backing file
//! is found by its path among the remote host's pool volumes.
//!
//! Bytes go through a [`BlockCache`] of their own ([`CACHE_BYTES`]) in blocks of [`BLOCK`]; a
//! reader that goes on where the last download ended gets a growing window (up to
//! [`MAX_WINDOW`] blocks in one download) and the next window downloading in the background
//! while it reads this one; a random reader gets one block per miss.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};

use tracing::warn;

use crate::error::{Error, Result};
use crate::image::cache::{CacheKey, CacheKind};
use crate::image::hostfile::{Opener, RemoteFile, RemoteOpen};
use crate::image::{self, BlockCache, BlockImage};
use crate::libvirt::{Connect, StorageVol};
use crate::namespace::registry::lock;

use super::lv_err;

/// Bytes of one cached block.
pub const BLOCK: u64 = 1 << 20;
/// Most blocks one download fetches (read-ahead of a sequential reader).
pub const MAX_WINDOW: u64 = 16;
/// Budget of the cache of downloaded blocks, shared by every remote file of the daemon (apart
/// from the metadata cache, which read-ahead would otherwise flush).
pub const CACHE_BYTES: usize = 64 << 20;

static CACHE: std::sync::OnceLock<Arc<BlockCache>> = std::sync::OnceLock::new();

/// The cache of downloaded blocks of all remote files.
fn block_cache() -> Arc<BlockCache> {
    CACHE
        .get_or_init(|| Arc::new(BlockCache::new(CACHE_BYTES)))
        .clone()
}

/// What the remote blocks' cache holds, for the memory report: (blocks, bytes).
pub fn cache_usage() -> (usize, usize) {
    CACHE.get().map_or((0, 0), |c| (c.len(), c.used()))
}

/// The opener of files on the host behind `conn` (named `uri` in errors).
pub fn opener(conn: Connect, uri: &str) -> Opener {
    let uri = uri.to_string();
    let cache = block_cache();
    Arc::new(move |path: &Path| open(&conn, &uri, &cache, path))
}

fn open(conn: &Connect, uri: &str, cache: &Arc<BlockCache>, path: &Path) -> Result<RemoteOpen> {
    let p = path
        .to_str()
        .ok_or_else(|| Error::Invalid(format!("{}: not a UTF-8 path", path.display())))?;
    let vol = lookup(conn, uri, p)?;
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
    let file = VolFile::new(Source {
        vol: Box::new(vol),
        len,
        image: hv.finish(),
        cache: cache.clone(),
        name: format!("{p} on {uri}"),
    });
    Ok(RemoteOpen {
        file: Arc::new(file),
        len,
        id,
        mtime: version.0,
        ctime: version.1,
    })
}

/// The volume at `p` on the host behind `conn`.
fn lookup(conn: &Connect, uri: &str, p: &str) -> Result<StorageVol> {
    match conn.storage_vol_lookup_by_path(p) {
        Ok(v) => Ok(v),
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
            })
        }
    }
}

fn utf8<'a>(path: &'a Path, uri: &str) -> Result<&'a str> {
    path.to_str()
        .ok_or_else(|| Error::Invalid(format!("{} on {uri}: not a UTF-8 path", path.display())))
}

/// A qcow2 overlay `overlay` of `size` bytes on `backing` (format `format`), made by the
/// storage driver of the host behind `conn` (named `uri`) in the pool that holds `backing`:
/// a launch on a remote host writes nothing on this machine. `overlay` must be in
/// `backing`'s directory (a directory pool's volumes are the files directly in it).
pub fn create_overlay(
    conn: &Connect,
    uri: &str,
    overlay: &Path,
    backing: &Path,
    format: &str,
    size: u64,
) -> Result<()> {
    let b = utf8(backing, uri)?;
    let body = format!(
        "<capacity unit='bytes'>{size}</capacity><target><format type='qcow2'/></target>\
         <backingStore><path>{}</path><format type='{format}'/></backingStore>",
        super::xml::escape(b)?,
    );
    create_volume(conn, uri, overlay, backing, "overlay", &body).map(drop)
}

/// A sparse raw copy of `img` made as the new file `dest` on the host behind `conn` (named
/// `uri`), in the pool that holds `near` (a volume in `dest`'s directory): the volume is made
/// empty by that host's storage driver, then each chunk of `img` that holds data is sent with
/// `virStorageVolUpload` (consecutive chunks share one upload, up to [`UPLOAD_RUN`] bytes), so
/// holes and zeros never cross the network. `img` is read wherever it lives (a store copy on
/// this machine, or a snapshot of that host read through its storage API). A failed copy
/// deletes the volume.
pub fn upload_copy(
    conn: &Connect,
    uri: &str,
    dest: &Path,
    near: &Path,
    img: &dyn BlockImage,
) -> Result<()> {
    let size = img.size();
    let body = format!(
        "<capacity unit='bytes'>{size}</capacity><allocation unit='bytes'>0</allocation>\
         <target><format type='raw'/></target>"
    );
    let vol = create_volume(conn, uri, dest, near, "copy", &body)?;
    let d = dest.display();
    let sent = (|| {
        let mut run: Option<(u64, u64, Vec<u8>)> = None;
        let flush = |run: &mut Option<(u64, u64, Vec<u8>)>| -> Result<()> {
            if let Some((at, len, bytes)) = run.take() {
                let mut up = vol
                    .upload(at, len)
                    .map_err(|e| lv_err("virStorageVolUpload", e))?;
                up.send(&bytes)
                    .and_then(|()| up.finish())
                    .map_err(|e| lv_err(format!("sending {len} bytes at {at}"), e))?;
            }
            Ok(())
        };
        image::for_each_data(img, |at, bytes| {
            let joins = matches!(&run, Some((start, len, _)) if start + len == at
                && len + bytes.len() as u64 <= UPLOAD_RUN);
            if !joins {
                flush(&mut run)?;
                run = Some((at, 0, Vec::with_capacity(bytes.len())));
            }
            if let Some((_, len, buf)) = run.as_mut() {
                buf.extend_from_slice(bytes);
                *len += bytes.len() as u64;
            }
            Ok(())
        })?;
        flush(&mut run)
    })()
    .map_err(|e| Error::Backend(format!("uploading {} to {d} on {uri}: {e}", img.describe())));
    if sent.is_err() {
        if let Err(e) = vol.delete() {
            warn!(file = %d, error = %e, "cannot delete the volume of a failed upload");
        }
    }
    sent
}

/// Most bytes one `virStorageVolUpload` carries (a run of consecutive data chunks).
pub const UPLOAD_RUN: u64 = 32 << 20;

/// The volume `path` (`what`, for messages) made from the volume XML `body` (what follows
/// its name) by the storage driver of the host behind `conn`, in the pool that holds `near`.
/// `path` must be in `near`'s directory (a directory pool's volumes are the files directly in
/// it); made anywhere else, it is deleted again and refused.
fn create_volume(
    conn: &Connect,
    uri: &str,
    path: &Path,
    near: &Path,
    what: &str,
    body: &str,
) -> Result<StorageVol> {
    let n = utf8(near, uri)?;
    let p = utf8(path, uri)?;
    let vol = lookup(conn, uri, n)?;
    let dir = Path::new(n).parent();
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|_| path.parent() == dir)
        .ok_or_else(|| {
            Error::Invalid(format!(
                "{what} {p} on {uri} is not in the directory of {n}"
            ))
        })?;
    let pool = vol
        .pool()
        .map_err(|e| lv_err(format!("the storage pool of {n} on {uri}"), e))?;
    let xml = format!(
        "<volume type='file'><name>{}</name>{body}</volume>",
        super::xml::escape(name)?
    );
    let made = pool.create_volume(conn, &xml).map_err(|e| {
        match lv_err(format!("creating {what} {p} on {uri}"), e) {
            Error::Backend(w) if w.to_ascii_lowercase().contains("no space") => Error::NoSpace(w),
            other => other,
        }
    })?;
    let at = made.path().unwrap_or_default();
    if at != p {
        // Not where the domain will look for it: take it back.
        let _ = made.delete();
        return Err(Error::Backend(format!(
            "{what} for {p} on {uri} was made as {at:?}"
        )));
    }
    Ok(made)
}

/// Delete the file at `path` on the host behind `conn` through its storage API.
pub fn delete_file(conn: &Connect, uri: &str, path: &Path) -> Result<()> {
    let p = utf8(path, uri)?;
    lookup(conn, uri, p)?
        .delete()
        .map_err(|e| lv_err(format!("deleting {p} on {uri}"), e))
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

/// Where a remote file's bytes come from: one ranged download per call.
trait Download: Send + Sync {
    /// Fill `buf` from `offset`; the bytes received.
    fn download(&self, buf: &mut [u8], offset: u64) -> Result<usize>;
}

impl Download for StorageVol {
    fn download(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        StorageVol::download(self, buf, offset).map_err(|e| lv_err("virStorageVolDownload", e))
    }
}

/// One remote file's bytes and the cache they go through.
struct Source {
    vol: Box<dyn Download>,
    len: u64,
    image: u64,
    cache: Arc<BlockCache>,
    name: String,
}

impl Source {
    fn key(&self, block: u64) -> CacheKey {
        CacheKey {
            image: self.image,
            kind: CacheKind::Remote,
            offset: block * BLOCK,
        }
    }

    fn blocks(&self) -> u64 {
        self.len.div_ceil(BLOCK)
    }

    /// Download blocks `[b, b + n)` (clipped to the file) in one stream into the cache.
    fn fetch(&self, b: u64, n: u64) -> Result<Option<Arc<Vec<u8>>>> {
        let n = n.min(self.blocks().saturating_sub(b));
        if n == 0 {
            return Ok(None);
        }
        let start = b * BLOCK;
        let end = ((b + n) * BLOCK).min(self.len);
        let mut buf = vec![0u8; (end - start) as usize];
        let got = self
            .vol
            .download(&mut buf, start)
            .map_err(|e| Error::Backend(format!("downloading {} at {start:#x}: {e}", self.name)))?;
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
        Ok(first)
    }
}

/// A file's sequential-reader state.
#[derive(Default)]
struct Seq {
    /// The block after the last download (sync or background): a miss there, or a reader
    /// reaching `from`, is a sequential reader.
    next: Option<u64>,
    /// Where the last background window starts: a reader there asks for the next window.
    from: u64,
    window: u64,
    /// The background download in flight: its blocks `[start, end)`.
    in_flight: Option<(u64, u64)>,
}

struct Ahead {
    seq: Mutex<Seq>,
    done: Condvar,
}

struct VolFile {
    src: Arc<Source>,
    ahead: Arc<Ahead>,
}

impl VolFile {
    fn new(src: Source) -> VolFile {
        VolFile {
            src: Arc::new(src),
            ahead: Arc::new(Ahead {
                seq: Mutex::new(Seq::default()),
                done: Condvar::new(),
            }),
        }
    }

    /// Start downloading `[b, b + n)` in the background (the caller checked none is in flight).
    fn spawn_ahead(&self, seq: &mut Seq, b: u64, n: u64) {
        let n = n.min(self.src.blocks().saturating_sub(b));
        if n == 0 {
            return;
        }
        seq.in_flight = Some((b, b + n));
        seq.from = b;
        seq.next = Some(b + n);
        let (src, ahead) = (self.src.clone(), self.ahead.clone());
        let spawned = std::thread::Builder::new()
            .name("remote-ahead".into())
            .spawn(move || {
                if let Err(e) = src.fetch(b, n) {
                    // The reader downloads the block itself and gets the error then.
                    tracing::debug!(error = %e, "read-ahead failed");
                }
                lock(&ahead.seq).in_flight = None;
                ahead.done.notify_all();
            });
        if spawned.is_err() {
            seq.in_flight = None;
        }
    }

    /// Block `b`, from the cache or downloaded; a sequential reader keeps one window of
    /// blocks downloading ahead of it.
    fn block(&self, b: u64) -> Result<Arc<Vec<u8>>> {
        let hit = self.src.cache.get(&self.src.key(b));
        let mut seq = lock(&self.ahead.seq);
        let v = match hit {
            Some(v) => v,
            None => {
                while matches!(seq.in_flight, Some((s, e)) if (s..e).contains(&b)) {
                    seq = self.ahead.done.wait(seq).unwrap_or_else(|e| e.into_inner());
                }
                match self.src.cache.get(&self.src.key(b)) {
                    Some(v) => v,
                    None => {
                        let sequential = seq.next == Some(b);
                        let n = if sequential {
                            (seq.window * 2).clamp(1, MAX_WINDOW)
                        } else {
                            1
                        };
                        seq.window = n;
                        drop(seq);
                        let v = self.src.fetch(b, n)?.ok_or_else(|| {
                            Error::Backend(format!("{}: no block {b}", self.src.name))
                        })?;
                        seq = lock(&self.ahead.seq);
                        seq.next = Some(b + n);
                        // A random reader (n = 1) does not reach `from`; a sequential one
                        // asks for the next window as it enters the second half of this one.
                        seq.from = b + n / 2 + n % 2;
                        v
                    }
                }
            }
        };
        if let Some(next) = seq.next {
            if seq.in_flight.is_none() && b >= seq.from && b < next {
                let n = (seq.window * 2).clamp(1, MAX_WINDOW);
                seq.window = n;
                self.spawn_ahead(&mut seq, next, n);
            }
        }
        Ok(v)
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
                    self.src.name, self.src.len
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

    /// A file in memory that counts its downloads.
    struct Fake {
        bytes: Vec<u8>,
        calls: Mutex<Vec<(u64, usize)>>,
    }

    impl Download for Arc<Fake> {
        fn download(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
            lock(&self.calls).push((offset, buf.len()));
            let from = &self.bytes[offset as usize..];
            let n = from.len().min(buf.len());
            buf[..n].copy_from_slice(&from[..n]);
            Ok(n)
        }
    }

    fn fake(len: usize) -> (Arc<Fake>, VolFile) {
        let bytes: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4096) as u8).collect();
        let f = Arc::new(Fake {
            bytes,
            calls: Mutex::new(Vec::new()),
        });
        let v = VolFile::new(Source {
            vol: Box::new(f.clone()),
            len: len as u64,
            image: 1,
            cache: Arc::new(BlockCache::new(CACHE_BYTES)),
            name: "fake".into(),
        });
        (f, v)
    }

    #[test]
    fn a_sequential_reader_gets_windows_never_the_whole_file() {
        let len = 60 * BLOCK as usize + 12345;
        let (f, v) = fake(len);
        let mut off = 0;
        while off < len {
            let n = (128 << 10).min(len - off);
            let mut buf = vec![0u8; n];
            v.read_at(&mut buf, off as u64).unwrap();
            assert!(buf == f.bytes[off..off + n], "bytes differ at {off}");
            off += n;
        }
        // Let a last background window finish before counting.
        while lock(&v.ahead.seq).in_flight.is_some() {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let calls = lock(&f.calls).clone();
        let most = calls.iter().map(|c| c.1).max().unwrap();
        let total: usize = calls.iter().map(|c| c.1).sum();
        assert!(most as u64 <= MAX_WINDOW * BLOCK, "{most}");
        assert!(
            most as u64 == MAX_WINDOW * BLOCK,
            "the window grows to its maximum"
        );
        assert_eq!(total, len, "every byte downloaded once: {calls:?}");
        assert!(calls.len() < 20, "{} downloads", calls.len());
    }

    #[test]
    fn a_random_reader_gets_single_blocks() {
        let len = 64 * BLOCK as usize;
        let (f, v) = fake(len);
        for (i, b) in [40u64, 3, 17, 58, 9].iter().enumerate() {
            let off = b * BLOCK + 1000 + i as u64;
            let mut buf = vec![0u8; 5000];
            v.read_at(&mut buf, off).unwrap();
            assert!(buf == f.bytes[off as usize..off as usize + 5000]);
        }
        let calls = lock(&f.calls).clone();
        assert_eq!(calls.len(), 5, "{calls:?}");
        assert!(calls.iter().all(|c| c.1 as u64 == BLOCK), "{calls:?}");
        // A read across a block boundary and the file's end.
        let mut buf = vec![0u8; 3000];
        let off = len as u64 - 3000;
        v.read_at(&mut buf, off).unwrap();
        assert!(buf == f.bytes[off as usize..]);
    }

    #[test]
    fn a_short_download_is_an_error_not_zeros() {
        struct Short;
        impl Download for Short {
            fn download(&self, buf: &mut [u8], _: u64) -> Result<usize> {
                Ok(buf.len() / 2)
            }
        }
        let v = VolFile::new(Source {
            vol: Box::new(Short),
            len: 4 * BLOCK,
            image: 2,
            cache: Arc::new(BlockCache::new(CACHE_BYTES)),
            name: "short".into(),
        });
        let mut buf = vec![0u8; 100];
        let e = v.read_at(&mut buf, 0).unwrap_err();
        assert_eq!(e.errno(), libc::EIO, "{e}");
    }

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

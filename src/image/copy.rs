//! Writing a snapshot's bytes out to a new sparse raw file with our own readers (a launch
//! from an internal qcow2 snapshot, which no overlay can use as its backing image).

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::{BlockImage, ExtentKind};
use crate::error::{Error, IoContext, Result};

/// Bytes read and written per step.
const CHUNK: u64 = 4 << 20;

/// Copy every byte of `img` into the new file `dest` (created exclusively, never
/// overwritten): holes and all-zero chunks are left unwritten, so the copy stays sparse. A
/// failed copy removes `dest`.
pub fn copy_sparse(img: &dyn BlockImage, dest: &Path) -> Result<()> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dest)
        .ctx(|| format!("creating {}", dest.display()))?;
    let res = (|| {
        let size = img.size();
        file.set_len(size)
            .ctx(|| format!("sizing {} to {size} bytes", dest.display()))?;
        for_each_data(img, |at, bytes| {
            file.write_all_at(bytes, at)
                .ctx(|| format!("writing {}", dest.display()))
        })?;
        (&file)
            .flush()
            .and_then(|()| file.sync_all())
            .ctx(|| format!("syncing {}", dest.display()))
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(dest);
    }
    res
}

/// Call `f(offset, bytes)` for each chunk (at most 4 MiB) of `img` that holds data, in
/// increasing order: holes from the image's allocation map and chunks that read as zeros
/// are skipped.
pub fn for_each_data(
    img: &dyn BlockImage,
    mut f: impl FnMut(u64, &[u8]) -> Result<()>,
) -> Result<()> {
    let size = img.size();
    let mut buf = vec![0u8; CHUNK as usize];
    let mut off = 0;
    while off < size {
        let extents = img.map(off, size - off)?;
        let Some(last) = extents.last() else {
            return Err(Error::Backend(format!(
                "allocation map of {} stopped at {off}",
                img.describe()
            )));
        };
        let next = last.offset + last.length;
        for e in extents.iter().filter(|e| e.kind == ExtentKind::Data) {
            let mut at = e.offset;
            let end = e.offset + e.length;
            while at < end {
                let n = (end - at).min(CHUNK) as usize;
                img.read_at(&mut buf[..n], at)?;
                if buf[..n].iter().any(|&b| b != 0) {
                    f(at, &buf[..n])?;
                }
                at += n as u64;
            }
        }
        if next <= off {
            return Err(Error::Backend(format!(
                "allocation map of {} made no progress at {off}",
                img.describe()
            )));
        }
        off = next;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::raw::RawImage;

    #[test]
    fn copy_is_equal_and_sparse() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src.raw");
        let f = std::fs::File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(&[7u8; 4096], 1 << 20).unwrap();
        f.write_all_at(&[9u8; 100], (40 << 20) + 5).unwrap();
        drop(f);
        let img = RawImage::open(&src).unwrap();
        let dest = t.path().join("copy.raw");
        copy_sparse(&img, &dest).unwrap();
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dest).unwrap());
        use std::os::unix::fs::MetadataExt;
        assert!(std::fs::metadata(&dest).unwrap().blocks() * 512 < 16 << 20);
        // Never overwrites.
        assert!(copy_sparse(&img, &dest).is_err());
        assert!(dest.exists());
    }
}

//! ploop disks (Virtuozzo/OpenVZ, Nova's `ploop` image backend): a directory with
//! `DiskDescriptor.xml` naming a chain of Parallels-format deltas and the snapshots over them.
//!
//! ```text
//! <Parallels_disk_image>
//!   <Disk_Parameters><Disk_size>SECTORS</Disk_size>…</Disk_Parameters>
//!   <StorageData><Storage>…<Image><GUID>{g}</GUID><File>root.hds</File></Image>…</Storage></StorageData>
//!   <Snapshots><TopGUID>{top}</TopGUID><Shot><GUID>{g}</GUID><ParentGUID>{p}</ParentGUID></Shot>…</Snapshots>
//! </Parallels_disk_image>
//! ```
//! Each `Shot` is one delta: its GUID names the `Image` that holds what was written while it was
//! the top, and its parent is the delta below. The disk as of shot S reads through S's delta,
//! then its parent's, down to the base (ParentGUID all zeros). `TopGUID` is the live disk, the
//! others are snapshots. Delta files must be plain names inside the directory: a descriptor
//! cannot make the daemon read a file elsewhere.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::parallels::ParallelsImage;
use super::BlockImage;
use crate::error::{Error, IoContext, Result};

pub const DESCRIPTOR: &str = "DiskDescriptor.xml";
/// A descriptor larger than this is refused (a real one is a few KiB).
const MAX_DESCRIPTOR: u64 = 1 << 20;
/// Deltas deeper than this are refused (also a loop guard).
const MAX_CHAIN: usize = 256;
const NO_PARENT: &str = "{00000000-0000-0000-0000-000000000000}";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delta {
    pub guid: String,
    pub file: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shot {
    pub guid: String,
    /// None for the base delta.
    pub parent: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Descriptor {
    /// Virtual size in bytes.
    pub size: u64,
    pub deltas: Vec<Delta>,
    pub shots: Vec<Shot>,
    pub top: String,
}

/// Whether `dir` holds a ploop disk.
pub fn is_ploop_dir(dir: &Path) -> bool {
    dir.join(DESCRIPTOR).is_file()
}

/// The GUID as a snapshot name: without braces, lower case.
pub fn snapshot_name(guid: &str) -> String {
    guid.trim_matches(|c| c == '{' || c == '}')
        .to_ascii_lowercase()
}

impl Descriptor {
    pub fn read(dir: &Path) -> Result<Descriptor> {
        let path = dir.join(DESCRIPTOR);
        let meta = std::fs::metadata(&path).ctx(|| format!("stat {}", path.display()))?;
        if meta.len() > MAX_DESCRIPTOR {
            return Err(Error::corrupt(
                path.display().to_string(),
                0,
                format!("{} bytes: larger than any ploop descriptor", meta.len()),
            ));
        }
        let text = std::fs::read_to_string(&path).ctx(|| format!("reading {}", path.display()))?;
        Self::parse(&text, &path.display().to_string())
    }

    pub fn parse(text: &str, name: &str) -> Result<Descriptor> {
        let bad = |what: String| Error::corrupt(name.to_string(), 0, what);
        let doc = roxmltree::Document::parse(text).map_err(|e| bad(format!("XML: {e}")))?;
        let root = doc.root_element();
        let sectors: u64 = child(root, "Disk_Parameters")
            .and_then(|p| text_of(p, "Disk_size"))
            .ok_or_else(|| bad("no Disk_Parameters/Disk_size".into()))?
            .parse()
            .map_err(|e| bad(format!("Disk_size: {e}")))?;
        let size = sectors
            .checked_mul(512)
            .ok_or_else(|| bad(format!("Disk_size {sectors} overflows")))?;
        let mut deltas = Vec::new();
        let storage = child(root, "StorageData").ok_or_else(|| bad("no StorageData".into()))?;
        for st in storage.children().filter(|c| c.has_tag_name("Storage")) {
            for img in st.children().filter(|c| c.has_tag_name("Image")) {
                let guid =
                    text_of(img, "GUID").ok_or_else(|| bad("an Image without GUID".into()))?;
                let file = text_of(img, "File")
                    .ok_or_else(|| bad(format!("Image {guid} without File")))?;
                if file.is_empty() || file.contains('/') || file == "." || file == ".." {
                    return Err(bad(format!(
                        "Image {guid}: file {file:?} is not a plain name in the disk's directory"
                    )));
                }
                deltas.push(Delta { guid, file });
            }
        }
        let snaps = child(root, "Snapshots").ok_or_else(|| bad("no Snapshots".into()))?;
        let top = text_of(snaps, "TopGUID").ok_or_else(|| bad("no Snapshots/TopGUID".into()))?;
        let mut shots = Vec::new();
        for s in snaps.children().filter(|c| c.has_tag_name("Shot")) {
            let guid = text_of(s, "GUID").ok_or_else(|| bad("a Shot without GUID".into()))?;
            let parent = text_of(s, "ParentGUID").filter(|p| p != NO_PARENT && !p.is_empty());
            shots.push(Shot { guid, parent });
        }
        let d = Descriptor {
            size,
            deltas,
            shots,
            top,
        };
        // The live disk must resolve; a broken snapshot only fails when it is read.
        d.chain(&d.top)
            .map_err(|e| bad(format!("top {}: {e}", d.top)))?;
        Ok(d)
    }

    /// The snapshots: every shot but the live top, in descriptor order.
    pub fn snapshots(&self) -> impl Iterator<Item = &Shot> {
        self.shots.iter().filter(move |s| s.guid != self.top)
    }

    /// Delta files of the disk as of `guid`, base first.
    pub fn chain(&self, guid: &str) -> Result<Vec<&Delta>> {
        let mut out = Vec::new();
        let mut cur = Some(guid.to_string());
        while let Some(g) = cur {
            if out.len() >= MAX_CHAIN {
                return Err(Error::Invalid(format!(
                    "snapshot chain of {guid} deeper than {MAX_CHAIN} (a loop?)"
                )));
            }
            let delta = self
                .deltas
                .iter()
                .find(|d| d.guid.eq_ignore_ascii_case(&g))
                .ok_or_else(|| Error::Invalid(format!("no Image with GUID {g}")))?;
            out.push(delta);
            cur = self
                .shots
                .iter()
                .find(|s| s.guid.eq_ignore_ascii_case(&g))
                .ok_or_else(|| Error::Invalid(format!("no Shot with GUID {g}")))?
                .parent
                .clone();
        }
        out.reverse();
        Ok(out)
    }

    /// The snapshot named `name` (its GUID, braces optional, any case).
    pub fn find(&self, name: &str) -> Option<&Shot> {
        self.snapshots()
            .find(|s| snapshot_name(&s.guid) == snapshot_name(name))
    }
}

/// The disk of `dir` as of snapshot `guid`: its deltas stacked, base at the bottom.
pub fn open(dir: &Path, desc: &Descriptor, guid: &str) -> Result<Arc<dyn BlockImage>> {
    let mut lower: Option<Arc<dyn BlockImage>> = None;
    for delta in desc.chain(guid)? {
        let path: PathBuf = dir.join(&delta.file);
        lower = Some(Arc::new(ParallelsImage::open(&path, lower)?));
    }
    lower.ok_or_else(|| Error::Invalid(format!("empty chain for {guid}")))
}

fn child<'a, 'i>(n: roxmltree::Node<'a, 'i>, tag: &str) -> Option<roxmltree::Node<'a, 'i>> {
    n.children().find(|c| c.is_element() && c.has_tag_name(tag))
}

fn text_of(n: roxmltree::Node<'_, '_>, tag: &str) -> Option<String> {
    child(n, tag)
        .and_then(|c| c.text())
        .map(|t| t.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DESC: &str = r#"<?xml version='1.0' encoding='UTF-8'?>
<Parallels_disk_image Version="1.0">
  <Disk_Parameters><Disk_size>16384</Disk_size><Cylinders>16</Cylinders><Heads>16</Heads><Sectors>64</Sectors><Padding>0</Padding></Disk_Parameters>
  <StorageData><Storage><Start>0</Start><End>16384</End><Blocksize>2048</Blocksize>
    <Image><GUID>{5fbaabe3-6958-40ff-92a7-860e329aab41}</GUID><Type>Compressed</Type><File>root.hds</File></Image>
    <Image><GUID>{A1B2C3D4-0000-0000-0000-000000000001}</GUID><Type>Compressed</Type><File>root.hds.1</File></Image>
    <Image><GUID>{a1b2c3d4-0000-0000-0000-000000000002}</GUID><Type>Compressed</Type><File>root.hds.2</File></Image>
  </Storage></StorageData>
  <Snapshots><TopGUID>{a1b2c3d4-0000-0000-0000-000000000002}</TopGUID>
    <Shot><GUID>{5fbaabe3-6958-40ff-92a7-860e329aab41}</GUID><ParentGUID>{00000000-0000-0000-0000-000000000000}</ParentGUID></Shot>
    <Shot><GUID>{A1B2C3D4-0000-0000-0000-000000000001}</GUID><ParentGUID>{5fbaabe3-6958-40ff-92a7-860e329aab41}</ParentGUID></Shot>
    <Shot><GUID>{a1b2c3d4-0000-0000-0000-000000000002}</GUID><ParentGUID>{A1B2C3D4-0000-0000-0000-000000000001}</ParentGUID></Shot>
  </Snapshots>
</Parallels_disk_image>"#;

    #[test]
    fn chains_and_snapshots_from_a_descriptor() {
        let d = Descriptor::parse(DESC, "t").unwrap();
        assert_eq!(d.size, 8 << 20);
        let snaps: Vec<String> = d.snapshots().map(|s| snapshot_name(&s.guid)).collect();
        assert_eq!(
            snaps,
            [
                "5fbaabe3-6958-40ff-92a7-860e329aab41",
                "a1b2c3d4-0000-0000-0000-000000000001"
            ]
        );
        let files = |g: &str| -> Vec<String> {
            d.chain(g).unwrap().iter().map(|x| x.file.clone()).collect()
        };
        assert_eq!(files(&d.top), ["root.hds", "root.hds.1", "root.hds.2"]);
        let s1 = d.find("A1B2C3D4-0000-0000-0000-000000000001").unwrap();
        assert_eq!(files(&s1.guid), ["root.hds", "root.hds.1"]);
        assert!(
            d.find("{a1b2c3d4-0000-0000-0000-000000000002}").is_none(),
            "the top is live, not a snapshot"
        );
    }

    #[test]
    fn hostile_descriptors_are_refused() {
        let err = |t: &str| Descriptor::parse(t, "t").unwrap_err().to_string();
        assert!(err(&DESC.replace(">root.hds.1<", ">../../etc/x<")).contains("plain name"));
        assert!(err(&DESC.replace(">root.hds.1<", ">/abs/x<")).contains("plain name"));
        // A parent loop.
        let looped = DESC.replace(
            "<ParentGUID>{00000000-0000-0000-0000-000000000000}</ParentGUID>",
            "<ParentGUID>{a1b2c3d4-0000-0000-0000-000000000002}</ParentGUID>",
        );
        assert!(err(&looped).contains("deeper than"));
        assert!(
            err(&DESC.replace("<Disk_size>16384", "<Disk_size>99999999999999999999"))
                .contains("Disk_size")
        );
        assert!(err("<a>").contains("XML"));
        assert!(
            err(r#"<!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]><x>&e;</x>"#)
                .contains("XML")
        );
        let missing = DESC.replace("<File>root.hds.2</File>", "");
        assert!(err(&missing).contains("without File"));
    }
}

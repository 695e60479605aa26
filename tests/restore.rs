//! File-level restore: every filesystem of the images made by `scripts/make-fs-images.sh`, walked
//! through `GuestFs` and compared with the source tree the images were filled from.
//!
//! The images are built once per test run into `$SNAPFS_FS_IMAGES` (default: a directory under
//! cargo's target tmpdir); building needs root and loop devices (~10 s).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use snapfs::image::raw::RawImage;
use snapfs::image::BlockImage;
use snapfs::restore::{open_volume, partitions, FileKind, GuestFs, Partition, Volume};

fn images() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::var_os("SNAPFS_FS_IMAGES")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fs-images"));
        common::fs_images_in(&dir)
    })
}

fn disk(name: &str) -> Arc<dyn BlockImage> {
    Arc::new(RawImage::open(&images().join(name)).expect("open image"))
}

fn open_fs(disk_name: &str, part: &str) -> Arc<dyn GuestFs> {
    let d = disk(disk_name);
    let parts = partitions(d.as_ref()).expect("partitions");
    let p = parts
        .iter()
        .find(|p| p.name == part)
        .unwrap_or_else(|| panic!("{disk_name}: no {part} in {parts:?}"));
    match open_volume(d.clone(), p).expect("open_volume") {
        Volume::Fs(fs) => fs,
        Volume::Unsupported { readme } => panic!("{disk_name} {part}: unsupported: {readme}"),
        Volume::Lvm(_) => panic!("{disk_name} {part}: LVM, not a filesystem"),
    }
}

/// What a filesystem keeps of the source tree.
#[derive(Clone, Copy)]
struct Profile {
    /// The source tree to compare against: `src`, `src-plain` (regular files and dirs only) or
    /// `src-ntfs` (src-plain plus compressed files).
    tree: &'static str,
    perms: bool,
    owners: bool,
    hardlinks: bool,
    xattrs: bool,
    /// mtime granularity (FAT: 2 s).
    mtime_slack: Duration,
    /// Names the filesystem adds at its root (lost+found).
    extra_root: &'static [&'static str],
}

const POSIX: Profile = Profile {
    tree: "src",
    perms: true,
    owners: true,
    hardlinks: true,
    xattrs: true,
    mtime_slack: Duration::ZERO,
    extra_root: &["lost+found"],
};

#[derive(Debug, Clone, PartialEq)]
struct Node {
    kind: FileKind,
    perm: u16,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: SystemTime,
    content: Option<String>,
    target: Option<Vec<u8>>,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    ino: u64,
    nlink: u32,
}

fn sha(b: &[u8]) -> String {
    format!("{:x}", Sha256::digest(b))
}

fn walk_source(root: &Path) -> BTreeMap<Vec<u8>, Node> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let p = rel.join(e.file_name());
            let full = root.join(&p);
            let m = std::fs::symlink_metadata(&full).unwrap();
            let ft = m.file_type();
            let kind = if ft.is_dir() {
                FileKind::Dir
            } else if ft.is_symlink() {
                FileKind::Symlink
            } else if ft.is_fifo() {
                FileKind::Fifo
            } else if ft.is_file() {
                FileKind::File
            } else {
                panic!("unexpected type {full:?}")
            };
            let mut xattrs = BTreeMap::new();
            if kind != FileKind::Symlink {
                for n in xattr_list(&full) {
                    if n.starts_with(b"user.") || n.starts_with(b"system.posix_acl_") {
                        let v = xattr_get(&full, &n);
                        xattrs.insert(n, v);
                    }
                }
            }
            let node = Node {
                kind,
                perm: (m.mode() & 0o7777) as u16,
                uid: m.uid(),
                gid: m.gid(),
                size: if kind == FileKind::File { m.len() } else { 0 },
                mtime: m.modified().unwrap(),
                content: (kind == FileKind::File).then(|| sha(&std::fs::read(&full).unwrap())),
                target: (kind == FileKind::Symlink).then(|| {
                    use std::os::unix::ffi::OsStrExt;
                    std::fs::read_link(&full)
                        .unwrap()
                        .as_os_str()
                        .as_bytes()
                        .to_vec()
                }),
                xattrs,
                ino: m.ino(),
                nlink: m.nlink() as u32,
            };
            use std::os::unix::ffi::OsStrExt;
            out.insert(p.as_os_str().as_bytes().to_vec(), node);
            if kind == FileKind::Dir {
                stack.push(p);
            }
        }
    }
    out
}

fn xattr_list(p: &Path) -> Vec<Vec<u8>> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    let mut buf = vec![0u8; 4096];
    // SAFETY: valid C string and buffer of the given length.
    let n = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n <= 0 {
        return Vec::new();
    }
    buf.truncate(n as usize);
    buf.split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| s.to_vec())
        .collect()
}

fn xattr_get(p: &Path, name: &[u8]) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    let mut buf = vec![0u8; 65536];
    // SAFETY: valid C strings and buffer of the given length.
    let r = unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(r >= 0, "getxattr {p:?}");
    buf.truncate(r as usize);
    buf
}

fn read_all(fs: &dyn GuestFs, ino: u64, size: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(size as usize);
    let mut buf = vec![0u8; 200_000]; // not a multiple of any block size
    loop {
        let n = fs.read(ino, out.len() as u64, &mut buf).expect("read");
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        assert!(out.len() as u64 <= size, "read past size");
    }
    out
}

fn walk_guest(fs: &dyn GuestFs) -> BTreeMap<Vec<u8>, Node> {
    let mut out = BTreeMap::new();
    let mut stack = vec![(Vec::<u8>::new(), fs.root())];
    while let Some((rel, dir)) = stack.pop() {
        for (name, ino, kind) in fs.readdir(dir).expect("readdir").iter().cloned() {
            let mut p = rel.clone();
            if !p.is_empty() {
                p.push(b'/');
            }
            p.extend_from_slice(&name);
            let st = fs.lookup(dir, &name).expect("lookup");
            assert_eq!(
                st.ino,
                ino,
                "lookup/readdir ino of {}",
                String::from_utf8_lossy(&p)
            );
            assert_eq!(
                st.kind,
                kind,
                "lookup/readdir kind of {}",
                String::from_utf8_lossy(&p)
            );
            assert_eq!(fs.stat(ino).expect("stat"), st);
            let content = (kind == FileKind::File).then(|| {
                let data = read_all(fs, ino, st.size);
                assert_eq!(
                    data.len() as u64,
                    st.size,
                    "{}",
                    String::from_utf8_lossy(&p)
                );
                sha(&data)
            });
            let target = (kind == FileKind::Symlink).then(|| fs.readlink(ino).expect("readlink"));
            let xattrs = fs.xattrs(ino).expect("xattrs").into_iter().collect();
            out.insert(
                p.clone(),
                Node {
                    kind,
                    perm: st.perm,
                    uid: st.uid,
                    gid: st.gid,
                    size: if kind == FileKind::File { st.size } else { 0 },
                    mtime: st.mtime,
                    content,
                    target,
                    xattrs,
                    ino,
                    nlink: st.nlink,
                },
            );
            if kind == FileKind::Dir {
                stack.push((p, ino));
            }
        }
    }
    out
}

/// Walk `fs`, compare with the source tree under `profile`; the number of entries checked.
fn check_tree(label: &str, fs: &dyn GuestFs, profile: Profile) -> usize {
    let src_dir = images().join(profile.tree);
    let src = walk_source(&src_dir);
    let mut guest = walk_guest(fs);
    for extra in profile.extra_root {
        guest.remove(extra.as_bytes());
        let prefix = format!("{extra}/");
        guest.retain(|k, _| !k.starts_with(prefix.as_bytes()));
    }
    let names = |m: &BTreeMap<Vec<u8>, Node>| {
        m.keys()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(names(&guest), names(&src), "{label}: names differ");
    let mut src_links: HashMap<u64, Vec<&Vec<u8>>> = HashMap::new();
    let mut guest_links: HashMap<u64, Vec<&Vec<u8>>> = HashMap::new();
    for (path, s) in &src {
        let g = &guest[path];
        let p = String::from_utf8_lossy(path);
        assert_eq!(g.kind, s.kind, "{label} {p}: kind");
        assert_eq!(g.content, s.content, "{label} {p}: content");
        assert_eq!(g.size, s.size, "{label} {p}: size");
        assert_eq!(g.target, s.target, "{label} {p}: symlink target");
        let dt = match g.mtime.duration_since(s.mtime) {
            Ok(d) => d,
            Err(e) => e.duration(),
        };
        assert!(
            dt <= profile.mtime_slack,
            "{label} {p}: mtime {:?} vs {:?}",
            g.mtime,
            s.mtime
        );
        if profile.perms {
            assert_eq!(g.perm, s.perm, "{label} {p}: mode");
        }
        if profile.owners {
            assert_eq!((g.uid, g.gid), (s.uid, s.gid), "{label} {p}: owner");
        }
        if profile.xattrs {
            let user: BTreeMap<_, _> = g
                .xattrs
                .iter()
                .filter(|(k, _)| k.starts_with(b"user.") || k.starts_with(b"system.posix_acl_"))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let show = |m: &BTreeMap<Vec<u8>, Vec<u8>>| {
                m.iter()
                    .map(|(k, v)| format!("{}={}", String::from_utf8_lossy(k), sha(v)))
                    .collect::<Vec<_>>()
            };
            assert_eq!(show(&user), show(&s.xattrs), "{label} {p}: xattrs");
        }
        if profile.hardlinks && s.kind != FileKind::Dir {
            assert_eq!(g.nlink, s.nlink, "{label} {p}: link count");
            src_links.entry(s.ino).or_default().push(path);
            guest_links.entry(g.ino).or_default().push(path);
        }
    }
    if profile.hardlinks {
        fn groups(m: HashMap<u64, Vec<&Vec<u8>>>) -> Vec<Vec<Vec<u8>>> {
            let mut v: Vec<Vec<Vec<u8>>> = m
                .into_values()
                .map(|g| g.into_iter().cloned().collect::<Vec<_>>())
                .map(|mut g| {
                    g.sort();
                    g
                })
                .collect();
            v.sort();
            v
        }
        assert_eq!(
            groups(guest_links),
            groups(src_links),
            "{label}: hard link groups"
        );
    }
    eprintln!("{label}: {} entries checked ({})", src.len(), fs.describe());
    src.len()
}

#[test]
fn partitions_gpt() {
    let d = disk("gpt.raw");
    let parts = partitions(d.as_ref()).unwrap();
    let got: Vec<(&str, u64, u64)> = parts
        .iter()
        .map(|p| (p.name.as_str(), p.offset >> 20, p.length >> 20))
        .collect();
    assert_eq!(
        got,
        [
            ("p1", 1, 32),
            ("p2", 33, 40),
            ("p3", 73, 300),
            ("p4", 373, 16),
            ("p5", 389, 4),
            ("p6", 393, 8),
            ("p7", 401, 1)
        ]
    );
    assert!(parts[1].type_desc.contains("EFI system"), "{:?}", parts[1]);
}

#[test]
fn partitions_mbr_logical() {
    let d = disk("mbr.raw");
    let parts = partitions(d.as_ref()).unwrap();
    let got: Vec<(&str, u64, u64)> = parts
        .iter()
        .map(|p| (p.name.as_str(), p.offset / 512, p.length / 512))
        .collect();
    assert_eq!(
        got,
        [
            ("p1", 2048, 49152),
            ("p5", 55296, 49152),
            ("p6", 106496, 32768)
        ]
    );
}

#[test]
fn partitions_none_is_whole() {
    let d = disk("whole.raw");
    let parts = partitions(d.as_ref()).unwrap();
    assert_eq!(parts.len(), 1);
    assert_eq!(parts[0].name, "whole");
    assert_eq!(parts[0].length, d.size());
}

/// A GPT whose primary header is destroyed is read from the backup header.
#[test]
fn partitions_gpt_backup_header() {
    let src = images().join("gpt.raw");
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("gpt-broken.raw");
    // Only the first MiB and the last MiB matter: copy them into a sparse file of the same size.
    let data = std::fs::read(&src).unwrap();
    let mut f = std::fs::File::create(&copy).unwrap();
    use std::io::{Seek, SeekFrom, Write};
    f.write_all(&data[..1 << 20]).unwrap();
    f.seek(SeekFrom::Start(data.len() as u64 - (1 << 20)))
        .unwrap();
    f.write_all(&data[data.len() - (1 << 20)..]).unwrap();
    f.seek(SeekFrom::Start(512 + 20)).unwrap();
    f.write_all(b"garbage!").unwrap();
    drop(f);
    let d = RawImage::open(&copy).unwrap();
    let parts = partitions(&d).unwrap();
    assert_eq!(parts.len(), 7, "{parts:?}");
    assert_eq!(parts[2].offset, 73 << 20);
}

#[test]
fn ext4_gpt_p1() {
    let fs = open_fs("gpt.raw", "p1");
    assert!(fs.describe().starts_with("ext4"), "{}", fs.describe());
    assert!(check_tree("ext4 gpt p1", fs.as_ref(), POSIX) > 150);
    // The sparse file's holes are visible.
    let st = fs.lookup(fs.root(), b"sparse.bin").unwrap();
    let ranges = fs.data_ranges(st.ino).unwrap().unwrap();
    assert_eq!(ranges.len(), 3, "{ranges:?}");
    assert!(st.allocated < 64 * 1024);
}

#[test]
fn ext2_mbr_p1() {
    let fs = open_fs("mbr.raw", "p1");
    assert!(fs.describe().starts_with("ext2"), "{}", fs.describe());
    check_tree("ext2 mbr p1", fs.as_ref(), POSIX);
}

#[test]
fn ext3_mbr_logical_p5() {
    let fs = open_fs("mbr.raw", "p5");
    assert!(fs.describe().starts_with("ext3"), "{}", fs.describe());
    check_tree("ext3 mbr p5", fs.as_ref(), POSIX);
}

#[test]
fn ext4_whole_inline_data() {
    let fs = open_fs("whole.raw", "whole");
    check_tree("ext4 whole (inline_data)", fs.as_ref(), POSIX);
}

#[test]
fn ext4_crash_consistent_replays_journal() {
    for (img, label) in [
        ("crash-ext4.raw", "ext4 crash (jbd2 csum v3)"),
        ("crash-ext3.raw", "ext3 crash (jbd2 no csum)"),
    ] {
        let fs = open_fs(img, "whole");
        assert!(
            fs.describe().contains("journal replayed"),
            "{}",
            fs.describe()
        );
        check_tree(label, fs.as_ref(), POSIX);
    }
}

/// A journal inode that is cleared (or otherwise unusable) gives way to the superblock's copy of
/// its block map or extent root (`s_jnl_blocks`), as e2fsck does: the crash images still replay
/// in full.
#[test]
fn ext4_journal_replays_from_the_superblock_backup() {
    let t = tempfile::Builder::new()
        .prefix("snapfs-jnl")
        .tempdir()
        .expect("tempdir");
    for (img, label) in [
        ("crash-ext3.raw", "ext3 crash, journal inode cleared"),
        ("crash-ext4.raw", "ext4 crash, journal inode cleared"),
    ] {
        let copy = t.path().join(img);
        std::fs::copy(images().join(img), &copy).expect("copy");
        let out = std::process::Command::new("debugfs")
            .args(["-w", "-R", "clri <8>"])
            .arg(&copy)
            .output()
            .expect("debugfs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let d: Arc<dyn BlockImage> = Arc::new(RawImage::open(&copy).expect("open"));
        let whole = Partition::whole(d.size(), "test");
        let fs = match open_volume(d, &whole).expect("open_volume") {
            Volume::Fs(fs) => fs,
            _ => panic!("{img}: not a filesystem"),
        };
        assert!(
            fs.describe().contains("journal replayed")
                && fs.describe().contains("superblock's copy"),
            "{}",
            fs.describe()
        );
        check_tree(label, fs.as_ref(), POSIX);
    }
}

#[test]
fn unsupported_partitions_have_a_readme() {
    let d = disk("gpt.raw");
    let parts = partitions(d.as_ref()).unwrap();
    let readme = |name: &str| -> String {
        let p: &Partition = parts.iter().find(|p| p.name == name).unwrap();
        match open_volume(d.clone(), p).unwrap() {
            Volume::Unsupported { readme } => readme,
            Volume::Fs(fs) => panic!("{name}: expected a README, got {}", fs.describe()),
            Volume::Lvm(_) => panic!("{name}: expected a README, got LVM"),
        }
    };
    assert!(readme("p5").contains("swap"));
    assert!(readme("p6").contains("LUKS"));
    assert!(readme("p7").contains("no data"));
}

// ---------------------------------------------------------------------------------------------
// Corrupt images: errors on the affected path only, never a panic or a hang.

/// A disk in memory that tests can damage between opens.
struct MutImage(std::sync::RwLock<Vec<u8>>);

impl BlockImage for MutImage {
    fn size(&self) -> u64 {
        self.0.read().unwrap().len() as u64
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> snapfs::error::Result<()> {
        let d = self.0.read().unwrap();
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn map(&self, offset: u64, length: u64) -> snapfs::error::Result<Vec<snapfs::image::Extent>> {
        Ok(vec![snapfs::image::Extent {
            offset,
            length: length.min(self.size() - offset),
            kind: snapfs::image::ExtentKind::Data,
        }])
    }
    fn describe(&self) -> String {
        "memory".into()
    }
}

/// Bytes `[off, off+len)` of an image file.
fn image_bytes(name: &str, off: u64, len: u64) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(images().join(name)).unwrap();
    f.seek(SeekFrom::Start(off)).unwrap();
    let mut v = vec![0u8; len as usize];
    f.read_exact(&mut v).unwrap();
    v
}

fn whole_part(len: u64) -> Partition {
    Partition {
        name: "whole".into(),
        offset: 0,
        length: len,
        type_desc: "test".into(),
    }
}

fn open_mem(img: &Arc<MutImage>) -> snapfs::error::Result<Volume> {
    let d: Arc<dyn BlockImage> = img.clone();
    open_volume(d, &whole_part(img.size()))
}

fn fs_of(v: snapfs::error::Result<Volume>) -> Arc<dyn GuestFs> {
    match v.expect("open") {
        Volume::Fs(fs) => fs,
        Volume::Unsupported { readme } => panic!("unsupported: {readme}"),
        Volume::Lvm(_) => panic!("LVM, not a filesystem"),
    }
}

/// The ext4 partition of gpt.raw in memory.
fn ext4_mem() -> Arc<MutImage> {
    Arc::new(MutImage(std::sync::RwLock::new(image_bytes(
        "gpt.raw",
        1 << 20,
        32 << 20,
    ))))
}

/// Offset of the directory entry `name` (type dir or file) that points at `ino`.
fn find_dirent(data: &[u8], ino: u64, name: &[u8]) -> usize {
    let pat = (ino as u32).to_le_bytes();
    let hits: Vec<usize> = data
        .windows(8 + name.len())
        .enumerate()
        .filter(|(_, w)| w[..4] == pat[..] && w[6] as usize == name.len() && &w[8..] == name)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(hits.len(), 1, "dirent {}", String::from_utf8_lossy(name));
    hits[0]
}

#[test]
fn ext4_corrupt_superblocks() {
    let img = ext4_mem();
    // Bad magic: no longer ext4, and nothing else either.
    let saved = img.0.read().unwrap()[1024 + 56];
    img.0.write().unwrap()[1024 + 56] = 0;
    assert!(matches!(
        open_mem(&img).unwrap(),
        Volume::Unsupported { .. }
    ));
    img.0.write().unwrap()[1024 + 56] = saved;
    // Impossible block size, inode size, group sizes, inode count: Err, not a panic.
    for (off, val) in [
        (24usize, 30u32),
        (88, 3),
        (32, 0),
        (40, 0),
        (0, u32::MAX),
        (4, 1),
    ] {
        let at = 1024 + off;
        let saved: Vec<u8> = img.0.read().unwrap()[at..at + 4].to_vec();
        {
            let mut d = img.0.write().unwrap();
            if off == 88 {
                d[at..at + 2].copy_from_slice(&(val as u16).to_le_bytes());
            } else {
                d[at..at + 4].copy_from_slice(&val.to_le_bytes());
            }
        }
        match open_mem(&img) {
            Err(e) => assert_eq!(e.errno(), libc::EIO, "field {off}: {e}"),
            Ok(Volume::Fs(fs)) => {
                snapfs::restore::exercise(fs.as_ref(), 500);
            }
            Ok(Volume::Unsupported { .. } | Volume::Lvm(_)) => {}
        }
        img.0.write().unwrap()[at..at + 4].copy_from_slice(&saved);
    }
    fs_of(open_mem(&img));
}

#[test]
fn ext4_directory_loops() {
    let img = ext4_mem();
    let fs = fs_of(open_mem(&img));
    let dir = fs.lookup(fs.root(), b"dir").unwrap().ino;
    let nested = fs.lookup(dir, b"nested").unwrap().ino;
    let deep = fs.lookup(nested, b"deep").unwrap().ino;
    let at = find_dirent(&img.0.read().unwrap(), deep, b"deep");
    // dir/nested/deep -> dir: a cycle. The lookup fails, the rest of the tree reads.
    img.0.write().unwrap()[at..at + 4].copy_from_slice(&(dir as u32).to_le_bytes());
    let fs = fs_of(open_mem(&img));
    let e = fs.lookup(nested, b"deep").unwrap_err();
    assert_eq!(e.errno(), libc::EIO, "{e}");
    assert!(fs.lookup(fs.root(), b"hello.txt").is_ok());
    assert!(snapfs::restore::exercise(fs.as_ref(), 100_000) > 100);
    // dir/nested/deep -> nested itself: hidden from the listing.
    img.0.write().unwrap()[at..at + 4].copy_from_slice(&(nested as u32).to_le_bytes());
    let fs = fs_of(open_mem(&img));
    assert!(fs
        .readdir(nested)
        .unwrap()
        .iter()
        .all(|(n, _, _)| n != b"deep"));
    assert!(fs.lookup(nested, b"deep").is_err());
}

#[test]
fn ext4_extent_past_the_end() {
    let img = ext4_mem();
    let fs = fs_of(open_mem(&img));
    let big = fs.lookup(fs.root(), b"big.bin").unwrap().ino;
    // Where is the inode? Ask debugfs on a copy of the partition.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("p1.img");
    std::fs::write(&p, &*img.0.read().unwrap()).unwrap();
    let out = std::process::Command::new("debugfs")
        .args(["-R", &format!("imap <{big}>")])
        .arg(&p)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    // "Inode 14 is part of block group 0\n\tlocated at block 1059, offset 0x0d00"
    let block: usize = text
        .split("located at block ")
        .nth(1)
        .unwrap()
        .split(',')
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let offset = usize::from_str_radix(text.split("offset 0x").nth(1).unwrap().trim(), 16).unwrap();
    let inode = block * 4096 + offset;
    let first_extent = inode + 0x28 + 12;
    {
        let mut d = img.0.write().unwrap();
        assert_eq!(
            &d[inode + 0x28..inode + 0x2a],
            &[0x0a, 0xf3],
            "extent header"
        );
        d[first_extent + 8..first_extent + 12].copy_from_slice(&0xffff_ff00u32.to_le_bytes());
    }
    let fs = fs_of(open_mem(&img));
    let mut buf = vec![0u8; 4096];
    let e = fs.read(big, 0, &mut buf).unwrap_err();
    assert_eq!(e.errno(), libc::EIO, "{e}");
    assert!(fs.data_ranges(big).is_err());
    // Only that file: its neighbours read.
    let hello = fs.lookup(fs.root(), b"hello.txt").unwrap().ino;
    assert!(fs.read(hello, 0, &mut buf).unwrap() > 0);
}

/// `SNAPFS_MUTATIONS=N[,SEED]` runs longer (or other) mutation loops than CI's default.
fn scale(iterations: u32, seed: u64) -> (u32, u64) {
    match std::env::var("SNAPFS_MUTATIONS") {
        Ok(v) => {
            let mut it = v.split(',');
            let n = it.next().and_then(|s| s.parse().ok()).unwrap_or(iterations);
            let s = it.next().and_then(|s| s.parse().ok()).unwrap_or(seed);
            (n, s)
        }
        Err(_) => (iterations, seed),
    }
}

/// Deterministic xorshift, so every run mutates the same bytes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Damage a few bytes of the metadata a clean walk reads, open and walk; `iterations` times.
fn mutation_loop(
    label: &str,
    img: &Arc<MutImage>,
    regions: &[(usize, usize)],
    iterations: u32,
    seed: u64,
) {
    let (iterations, seed) = scale(iterations, seed);
    let mut rng = Rng(seed);
    let start = std::time::Instant::now();
    let mut opened = 0;
    for _ in 0..iterations {
        let mut saved = Vec::new();
        {
            let mut d = img.0.write().unwrap();
            for _ in 0..1 + rng.below(4) {
                let (s, len) = regions[rng.below(regions.len() as u64) as usize];
                let at = s + rng.below(len as u64) as usize;
                saved.push((at, d[at]));
                d[at] = match rng.below(4) {
                    0 => 0,
                    1 => 0xff,
                    2 => d[at] ^ (1 << rng.below(8)),
                    _ => rng.next() as u8,
                };
            }
        }
        let t = std::time::Instant::now();
        if let Ok(Volume::Fs(fs)) = open_mem(img) {
            opened += 1;
            snapfs::restore::exercise(fs.as_ref(), 60);
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{label}: one iteration took {:?}",
            t.elapsed()
        );
        let mut d = img.0.write().unwrap();
        for (at, b) in saved.into_iter().rev() {
            d[at] = b;
        }
    }
    eprintln!(
        "{label}: {iterations} mutations, {opened} opened, {:?}",
        start.elapsed()
    );
}

#[test]
fn ext4_mutation_loop() {
    let img = ext4_mem();
    // The metadata: superblock and group descriptors, the inode table of group 0, and the
    // directory blocks (found as the blocks holding dirents of the root and `many/`).
    let data = img.0.read().unwrap().clone();
    let fs = fs_of(open_mem(&img));
    let many = fs.lookup(fs.root(), b"many").unwrap().ino;
    let dirent = find_dirent(
        &data,
        fs.lookup(many, b"entry-with-a-long-name-to-fill-blocks-001")
            .unwrap()
            .ino,
        b"entry-with-a-long-name-to-fill-blocks-001",
    );
    let root_dirent = find_dirent(
        &data,
        fs.lookup(fs.root(), b"hello.txt").unwrap().ino,
        b"hello.txt",
    );
    let mut regions = vec![
        (1024, 1024),
        (4096, 4096),
        (dirent / 4096 * 4096, 4096),
        (root_dirent / 4096 * 4096, 4096),
    ];
    // Inode table of group 0: the block of inode 2 (read from the descriptor).
    let itable = u32::from_le_bytes(data[4096 + 8..4096 + 12].try_into().unwrap()) as usize;
    regions.push((itable * 4096, 64 * 4096));
    drop(fs);
    mutation_loop("ext4", &img, &regions, 2000, 0x005e_ede4);
}

#[test]
fn partitions_mutation_loop() {
    for (name, len) in [("gpt.raw", 34 * 512), ("mbr.raw", 512)] {
        // The first MiB only: EBR links past it end the chain, the GPT backup is absent.
        let img = MutImage(std::sync::RwLock::new(image_bytes(name, 0, 1 << 20)));
        let mut rng = Rng(0x5eed_0001);
        let start = std::time::Instant::now();
        for _ in 0..3000 {
            let mut saved = Vec::new();
            {
                let mut d = img.0.write().unwrap();
                for _ in 0..1 + rng.below(4) {
                    let at = rng.below(len as u64) as usize;
                    saved.push((at, d[at]));
                    d[at] = rng.next() as u8;
                }
            }
            let _ = partitions(&img);
            let mut d = img.0.write().unwrap();
            for (at, b) in saved.into_iter().rev() {
                d[at] = b;
            }
        }
        eprintln!("partitions {name}: 3000 mutations, {:?}", start.elapsed());
    }
}

const FAT: Profile = Profile {
    tree: "src-plain",
    perms: false,
    owners: false,
    hardlinks: false,
    xattrs: false,
    mtime_slack: Duration::from_secs(2),
    extra_root: &[],
};

#[test]
fn fat32_gpt_p2() {
    let fs = open_fs("gpt.raw", "p2");
    assert!(fs.describe().starts_with("FAT32"), "{}", fs.describe());
    check_tree("FAT32 gpt p2", fs.as_ref(), FAT);
    // Case-insensitive lookup like Linux vfat.
    assert!(fs.lookup(fs.root(), b"HELLO.TXT").is_ok());
}

#[test]
fn fat16_mbr_logical_p6() {
    let fs = open_fs("mbr.raw", "p6");
    assert!(fs.describe().starts_with("FAT16"), "{}", fs.describe());
    check_tree("FAT16 mbr p6", fs.as_ref(), FAT);
}

#[test]
fn fat_mutation_loop() {
    let img = Arc::new(MutImage(std::sync::RwLock::new(image_bytes(
        "mbr.raw",
        106496 * 512,
        16 << 20,
    ))));
    let fs = fs_of(open_mem(&img));
    drop(fs);
    // Boot sector, the FATs and the root directory (FAT16: fixed region after the FATs).
    let data = img.0.read().unwrap().clone();
    let bps = u16::from_le_bytes([data[11], data[12]]) as usize;
    let reserved = u16::from_le_bytes([data[14], data[15]]) as usize * bps;
    let fat = u16::from_le_bytes([data[22], data[23]]) as usize * bps;
    let regions = [(0, 512), (reserved, 2048), (reserved + 2 * fat, 16384)];
    mutation_loop("FAT16", &img, &regions, 2000, 0x005e_edfa);
}

const XFS: Profile = Profile {
    extra_root: &[],
    ..POSIX
};

#[test]
fn xfs_gpt_p3() {
    let fs = open_fs("gpt.raw", "p3");
    assert!(fs.describe().starts_with("XFS v5"), "{}", fs.describe());
    check_tree("XFS gpt p3", fs.as_ref(), XFS);
    let st = fs.lookup(fs.root(), b"sparse.bin").unwrap();
    let ranges = fs.data_ranges(st.ino).unwrap().unwrap();
    assert_eq!(ranges.len(), 3, "{ranges:?}");
}

/// The crash-consistent XFS image (copied while mounted, the whole tree only in the log): the
/// in-memory log replay must give the source tree.
/// crash-xfs-churn.raw has most of the tree in place and deletes (cancelled buffers, freed
/// inode chunks, reused blocks) in the log.
#[test]
fn xfs_crash_consistent_replays_log() {
    for img in ["crash-xfs.raw", "crash-xfs-churn.raw"] {
        let fs = open_fs(img, "whole");
        let d = fs.describe();
        assert!(d.contains("log replayed in memory"), "{img}: {d}");
        assert!(!d.contains("damaged"), "{img}: {d}");
        check_tree(&format!("XFS {img} (log replayed)"), fs.as_ref(), XFS);
    }
}

/// The kernel as the oracle: a copy of the crash image mounted by Linux (which recovers the log)
/// must show exactly the tree our replay shows, inode numbers and link counts included.
#[test]
fn xfs_crash_replay_matches_the_kernel() {
    for img in ["crash-xfs.raw", "crash-xfs-churn.raw"] {
        replay_matches_the_kernel(img);
    }
}

fn replay_matches_the_kernel(img: &str) {
    use std::process::Command;
    let t = tempfile::Builder::new()
        .prefix("snapfs-xfs-oracle")
        .tempdir()
        .unwrap();
    let copy = t.path().join(img);
    let mnt = t.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let ok = Command::new("cp")
        .arg("--sparse=always")
        .arg(images().join(img))
        .arg(&copy)
        .status()
        .unwrap();
    assert!(ok.success());
    let ok = Command::new("mount")
        // nouuid: another test process may have a copy of the same image mounted.
        .args(["-t", "xfs", "-o", "loop,nouuid"])
        .arg(&copy)
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(ok.success(), "mount the {img} copy");
    struct Umount<'a>(&'a Path);
    impl Drop for Umount<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(self.0).status();
        }
    }
    let _u = Umount(&mnt);
    let kernel = walk_source(&mnt);
    let fs = open_fs(img, "whole");
    let mut ours = walk_guest(fs.as_ref());
    for n in ours.values_mut() {
        n.xattrs
            .retain(|k, _| k.starts_with(b"user.") || k.starts_with(b"system.posix_acl_"));
    }
    let only = |a: &BTreeMap<Vec<u8>, Node>, b: &BTreeMap<Vec<u8>, Node>| {
        a.keys()
            .filter(|k| !b.contains_key(*k))
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .take(10)
            .collect::<Vec<_>>()
    };
    assert!(
        ours.len() == kernel.len() && only(&kernel, &ours).is_empty(),
        "{img}: {} entries vs the kernel's {}; only the kernel has {:?}, only we have {:?}",
        ours.len(),
        kernel.len(),
        only(&kernel, &ours),
        only(&ours, &kernel)
    );
    for (path, k) in &kernel {
        assert_eq!(
            &ours[path],
            k,
            "{img}: {} differs",
            String::from_utf8_lossy(path)
        );
    }
    eprintln!(
        "XFS {img}: {} entries identical to the kernel's recovery ({})",
        kernel.len(),
        fs.describe()
    );
}

/// A disk image with a few bytes patched over it, recording which 4 KiB blocks are read: for
/// mutation loops over images too large to copy.
struct PatchImage {
    base: Arc<dyn BlockImage>,
    offset: u64,
    len: u64,
    patches: std::sync::RwLock<BTreeMap<u64, u8>>,
    read_blocks: std::sync::Mutex<std::collections::BTreeSet<u64>>,
}

impl BlockImage for PatchImage {
    fn size(&self) -> u64 {
        self.len
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> snapfs::error::Result<()> {
        self.base.read_at(buf, self.offset + offset)?;
        let end = offset + buf.len() as u64;
        {
            let mut r = self.read_blocks.lock().unwrap();
            if r.len() < 4096 {
                for b in offset / 4096..end.div_ceil(4096) {
                    r.insert(b);
                }
            }
        }
        for (&at, &v) in self.patches.read().unwrap().range(offset..end) {
            buf[(at - offset) as usize] = v;
        }
        Ok(())
    }
    fn map(&self, offset: u64, length: u64) -> snapfs::error::Result<Vec<snapfs::image::Extent>> {
        Ok(vec![snapfs::image::Extent {
            offset,
            length: length.min(self.len - offset),
            kind: snapfs::image::ExtentKind::Data,
        }])
    }
    fn describe(&self) -> String {
        "patched".into()
    }
}

/// Open partition `part` of `disk_name` through a `PatchImage`, walk it once to learn which
/// blocks hold metadata (the first read of each file is data too: fine), then mutate those.
fn patch_mutation_loop(label: &str, disk_name: &str, part: &str, iterations: u32, seed: u64) {
    patch_mutation_loop_in(label, disk_name, part, iterations, seed, None)
}

/// `patch_mutation_loop`, damaging only read blocks (4 KiB) in `only` when given.
fn patch_mutation_loop_in(
    label: &str,
    disk_name: &str,
    part: &str,
    iterations: u32,
    seed: u64,
    only: Option<std::ops::Range<u64>>,
) {
    let d = disk(disk_name);
    let parts = partitions(d.as_ref()).unwrap();
    let p = parts.iter().find(|p| p.name == part).unwrap();
    let img = Arc::new(PatchImage {
        base: d.clone(),
        offset: p.offset,
        len: p.length,
        patches: Default::default(),
        read_blocks: Default::default(),
    });
    let open = |img: &Arc<PatchImage>| {
        let dd: Arc<dyn BlockImage> = img.clone();
        open_volume(dd, &whole_part(img.len))
    };
    snapfs::restore::exercise(fs_of(open(&img)).as_ref(), 300);
    let blocks: Vec<u64> = img
        .read_blocks
        .lock()
        .unwrap()
        .iter()
        .copied()
        .filter(|b| only.as_ref().is_none_or(|r| r.contains(b)))
        .collect();
    assert!(!blocks.is_empty(), "{label}: no blocks to damage");
    let (iterations, seed) = scale(iterations, seed);
    let mut rng = Rng(seed);
    let start = std::time::Instant::now();
    let mut opened = 0;
    for _ in 0..iterations {
        {
            let mut pt = img.patches.write().unwrap();
            pt.clear();
            for _ in 0..1 + rng.below(4) {
                let b = blocks[rng.below(blocks.len() as u64) as usize];
                let at = b * 4096 + rng.below(4096);
                let v = match rng.below(3) {
                    0 => 0,
                    1 => 0xff,
                    _ => rng.next() as u8,
                };
                pt.insert(at, v);
            }
        }
        let t = std::time::Instant::now();
        if let Ok(Volume::Fs(fs)) = open(&img) {
            opened += 1;
            snapfs::restore::exercise(fs.as_ref(), 60);
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{label}: one iteration took {:?}",
            t.elapsed()
        );
    }
    eprintln!(
        "{label}: {iterations} mutations over {} blocks, {opened} opened, {:?}",
        blocks.len(),
        start.elapsed()
    );
}

#[test]
fn xfs_mutation_loop() {
    patch_mutation_loop("XFS", "gpt.raw", "p3", 2000, 0x005e_edf5);
}

/// Byte offset and length of the internal log of an XFS image (no partition table).
fn xfs_log_area(img: &str) -> (u64, u64) {
    let sb = image_bytes(img, 0, 512);
    let be32 = |o: usize| u32::from_be_bytes(sb[o..o + 4].try_into().unwrap()) as u64;
    let bs = be32(4);
    let logstart = u64::from_be_bytes(sb[48..56].try_into().unwrap());
    let agblocks = be32(84);
    let agblklog = sb[124] as u32;
    let fsb = (logstart >> agblklog) * agblocks + (logstart & ((1 << agblklog) - 1));
    (fsb * bs, be32(96) * bs)
}

/// Damaged log blocks of the crash images (the blocks the replay reads, and only those): the
/// replay notices, or ends early at what looks like a torn write, never panics or hangs, and the
/// filesystem opens and reads (data or EIO).
#[test]
fn xfs_log_mutation_loop() {
    for (img, seed) in [
        ("crash-xfs.raw", 0x005e_ed10),
        ("crash-xfs-churn.raw", 0x005e_ed11),
    ] {
        let (off, len) = xfs_log_area(img);
        let blocks = off / 4096..(off + len).div_ceil(4096);
        patch_mutation_loop_in(
            &format!("XFS log of {img}"),
            img,
            "whole",
            1000,
            seed,
            Some(blocks),
        );
    }
}

/// Targeted damage to the log of crash-xfs.raw: the filesystem is read without replay (as the
/// last checkpoint left it in place) and describe() says why.
#[test]
fn xfs_damaged_log_reads_without_replay() {
    let img_name = "crash-xfs.raw";
    let d = disk(img_name);
    let len = d.size();
    let img = Arc::new(PatchImage {
        base: d.clone(),
        offset: 0,
        len,
        patches: Default::default(),
        read_blocks: Default::default(),
    });
    let open = || {
        let dd: Arc<dyn BlockImage> = img.clone();
        fs_of(open_volume(dd, &whole_part(len)))
    };
    let (log_off, _) = xfs_log_area(img_name);
    let log = image_bytes(img_name, log_off, 1 << 20);
    let headers: Vec<u64> = (0..log.len() / 512)
        .filter(|i| log[i * 512..i * 512 + 4] == [0xFE, 0xED, 0xBA, 0xBE])
        .map(|i| log_off + i as u64 * 512)
        .collect();
    // mkfs's unmount record, then the tail record of the crash.
    assert!(headers.len() > 2, "{headers:?}");
    let tail = headers[1];
    let fs = open();
    assert!(fs.describe().contains("log replayed"), "{}", fs.describe());
    let whole = fs.readdir(fs.root()).unwrap().len();
    for (what, at, v) in [
        ("tail record magic", tail, 0u8),
        ("tail record version", tail + 11, 7),
        ("length of the first operation", tail + 512 + 4, 0xff),
        ("client of the first operation", tail + 512 + 8, 0x11),
        ("record length", tail + 12, 0xff),
    ] {
        img.patches.write().unwrap().clear();
        img.patches.write().unwrap().insert(at, v);
        let fs = open();
        let desc = fs.describe();
        assert!(desc.contains("log not replayed"), "{what}: {desc}");
        // As mkfs left it: an empty root.
        let n = fs.readdir(fs.root()).unwrap().len();
        assert!(n < whole, "{what}: {n} entries");
        snapfs::restore::exercise(fs.as_ref(), 200);
        eprintln!("{what} damaged: {desc}");
    }
    // A torn last record (its data blocks of an older cycle) ends the log before it: what was
    // committed earlier is still replayed, like the kernel does.
    let last = *headers.last().unwrap();
    img.patches.write().unwrap().clear();
    img.patches.write().unwrap().insert(last + 512 + 3, 0);
    let fs = open();
    assert!(fs.describe().contains("log replayed"), "{}", fs.describe());
    eprintln!("torn last record: {}", fs.describe());
    snapfs::restore::exercise(fs.as_ref(), 200);
}

const NTFS: Profile = Profile {
    tree: "src-ntfs",
    mtime_slack: Duration::ZERO,
    ..FAT
};

#[test]
fn ntfs_gpt_p4() {
    let fs = open_fs("gpt.raw", "p4");
    assert!(fs.describe().starts_with("NTFS"), "{}", fs.describe());
    check_tree("NTFS gpt p4", fs.as_ref(), NTFS);
    // fragmented.bin spans several MFT records (attribute list) and has sparse runs.
    let st = fs.lookup(fs.root(), b"fragmented.bin").unwrap();
    let ranges = fs.data_ranges(st.ino).unwrap().unwrap();
    assert!(ranges.len() > 100, "{}", ranges.len());
    // compressed/ (LZNT1, compared byte for byte above): an all-sparse compression unit is a
    // hole, any other unit data. sparse-2m.bin has data only at 1,000,000..1,070,000: units
    // 15 and 16 of 64 KiB; zeros-300k.bin was written as holes only.
    let dir = fs.lookup(fs.root(), b"compressed").unwrap().ino;
    let sparse = fs.lookup(dir, b"sparse-2m.bin").unwrap().ino;
    assert_eq!(
        fs.data_ranges(sparse).unwrap().unwrap(),
        vec![(15 * 65536, 2 * 65536)]
    );
    let zeros = fs.lookup(dir, b"zeros-300k.bin").unwrap().ino;
    assert_eq!(fs.data_ranges(zeros).unwrap().unwrap(), vec![]);
    let mixed = fs.lookup(dir, b"mixed-3m.txt").unwrap();
    assert_eq!(
        fs.data_ranges(mixed.ino).unwrap().unwrap(),
        vec![(0, mixed.size)]
    );
    // Reads at odd offsets across unit boundaries agree with the source.
    let src = std::fs::read(images().join("src-ntfs/compressed/mixed-3m.txt")).unwrap();
    let mut buf = vec![0u8; 70_000];
    for off in [0u64, 65535, 65536, 131_071, 1_000_001, 2_999_000] {
        let n = fs.read(mixed.ino, off, &mut buf).unwrap();
        let want = &src[off as usize..(off as usize + buf.len()).min(src.len())];
        assert_eq!(&buf[..n], want, "mixed-3m.txt at {off}");
    }
}

#[test]
fn ntfs_512_byte_clusters_whole() {
    // 512-byte clusters: 8 KiB compression units (2 LZNT1 chunks each), ~3,000 runs for the
    // 12 MiB log (an attribute list with several $DATA pieces).
    let fs = open_fs("ntfs512.raw", "whole");
    check_tree("NTFS 512-byte clusters", fs.as_ref(), NTFS);
    let dir = fs.lookup(fs.root(), b"compressed").unwrap().ino;
    let sparse = fs.lookup(dir, b"sparse-2m.bin").unwrap().ino;
    // Data at 1,000,000..1,070,000: units 122..=130 of 8 KiB.
    assert_eq!(
        fs.data_ranges(sparse).unwrap().unwrap(),
        vec![(122 * 8192, 9 * 8192)]
    );
}

#[test]
fn ntfs_mutation_loop() {
    patch_mutation_loop("NTFS", "gpt.raw", "p4", 300, 0x005e_ed27);
}

#[test]
fn lvm_linear_volumes() {
    let d = disk("lvm.raw");
    let parts = partitions(d.as_ref()).unwrap();
    assert_eq!(parts.len(), 1);
    let Volume::Lvm(lvs) = open_volume(d.clone(), &parts[0]).unwrap() else {
        panic!("expected LVM");
    };
    let readme = snapfs::restore::lvm::summary(&lvs);
    assert!(
        readme.contains("snapfsvg/root: 25165824 bytes, linear"),
        "{readme}"
    );
    let names: Vec<String> = lvs.iter().map(|l| format!("{}/{}", l.vg, l.lv)).collect();
    assert_eq!(names, ["snapfsvg/data", "snapfsvg/root"]);
    let open_lv = |name: &str| -> Arc<dyn GuestFs> {
        let lv = lvs.iter().find(|l| l.lv == name).unwrap();
        let img = lv
            .image
            .clone()
            .unwrap_or_else(|| panic!("{name}: {}", lv.note));
        fs_of(open_volume(
            img.clone(),
            &Partition::whole(img.size(), "LV"),
        ))
    };
    // root spans two segments (PV extents 0-3 and 8-9): the whole tree must read.
    let root = open_lv("root");
    assert!(
        root.describe().contains("label lvm-root"),
        "{}",
        root.describe()
    );
    check_tree("ext4 on LVM (2 segments)", root.as_ref(), POSIX);
    let data = open_lv("data");
    let hello = data.lookup(data.root(), b"hello.txt").unwrap();
    let mut buf = vec![0u8; 64];
    let n = data.read(hello.ino, 0, &mut buf).unwrap();
    assert_eq!(
        &buf[..n],
        std::fs::read(images().join("src/hello.txt")).unwrap()
    );
}

#[test]
fn lvm_mutation_loop() {
    // The PV's label and metadata area (text included) are in its first 16 KiB.
    let img = MutImage(std::sync::RwLock::new(image_bytes(
        "lvm.raw",
        1 << 20,
        1 << 20,
    )));
    let d: Arc<dyn BlockImage> = Arc::new(MutImage(std::sync::RwLock::new(
        img.0.read().unwrap().clone(),
    )));
    assert!(matches!(
        open_volume(d, &whole_part(1 << 20)).unwrap(),
        Volume::Lvm(_)
    ));
    let (iterations, seed) = scale(3000, 0x005e_ed1f);
    let mut rng = Rng(seed);
    for _ in 0..iterations {
        let mut data = img.0.read().unwrap().clone();
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(16384) as usize;
            data[at] = match rng.below(3) {
                0 => 0,
                1 => rng.next() as u8,
                _ => b"{}[]\"=,#0 "[rng.below(10) as usize],
            };
        }
        let d: Arc<dyn BlockImage> = Arc::new(MutImage(std::sync::RwLock::new(data)));
        if let Ok(Volume::Lvm(lvs)) = open_volume(d, &whole_part(1 << 20)) {
            for lv in lvs {
                if let Some(img) = lv.image {
                    if let Ok(Volume::Fs(fs)) =
                        open_volume(img.clone(), &Partition::whole(img.size(), "LV"))
                    {
                        snapfs::restore::exercise(fs.as_ref(), 20);
                    }
                }
            }
        }
    }
}

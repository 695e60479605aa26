//! File-level restore: every filesystem of the images made by `scripts/make-fs-images.sh`, walked
//! through `GuestFs` and compared with the source tree the images were filled from.
//!
//! The images are built once per test run into `$SNAPFS_FS_IMAGES` (default: a directory under
//! cargo's target tmpdir); building needs root and loop devices (~10 s).

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
        if !dir.join(".done").exists() {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/make-fs-images.sh");
            let st = std::process::Command::new("bash")
                .arg(&script)
                .arg(&dir)
                .status()
                .expect("run make-fs-images.sh");
            assert!(st.success(), "make-fs-images.sh failed");
        }
        dir
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
    }
}

/// What a filesystem keeps of the source tree.
#[derive(Clone, Copy)]
struct Profile {
    /// Compare against `src-plain/` (regular files and dirs only) instead of `src/`.
    plain: bool,
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
    plain: false,
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
                    if n.starts_with(b"user.") {
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
        for (name, ino, kind) in fs.readdir(dir).expect("readdir") {
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
    let src_dir = images().join(if profile.plain { "src-plain" } else { "src" });
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
                .filter(|(k, _)| k.starts_with(b"user."))
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

#[test]
fn unsupported_partitions_have_a_readme() {
    let d = disk("gpt.raw");
    let parts = partitions(d.as_ref()).unwrap();
    let readme = |name: &str| -> String {
        let p: &Partition = parts.iter().find(|p| p.name == name).unwrap();
        match open_volume(d.clone(), p).unwrap() {
            Volume::Unsupported { readme } => readme,
            Volume::Fs(fs) => panic!("{name}: expected a README, got {}", fs.describe()),
        }
    };
    assert!(readme("p5").contains("swap"));
    assert!(readme("p6").contains("LUKS"));
    assert!(readme("p7").contains("no data"));
}

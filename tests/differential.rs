//! The differential suite (issue 19): images made by the standard tools (mke2fs, mkfs.xfs,
//! mkfs.fat, mkntfs), filled from a seeded generator through the kernel's own driver (a loop
//! mount; ntfs-3g for NTFS; mtools for FAT, which this kernel does not have), then read through
//! a real snapfs mount and through the reference (the kernel's read-only loop mount with
//! `noload`/`norecovery`, ntfs-3g read-only, the generated tree for FAT) and compared on every
//! attribute snapfs shows: type, mode, uid, gid, atime/mtime/ctime, size, contents, link target,
//! xattrs, nlink, rdev and (where the reference shows the on-disk one) the inode number.
//!
//! A difference fails unless `docs/restore.md` lists it in its table of decided exceptions
//! (section "Differential suite"), which this test reads.
//!
//! `cargo test --test differential` runs the fast subset; the full matrix is
//! `scripts/check-differential.sh` (`-- --ignored`). `SNAPFS_DIFF_SEED=N` changes the seed,
//! `SNAPFS_DIFF_ONLY=word` keeps only the images whose name contains it.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// How an image is filled and what its reference is.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Via {
    /// Filled through a kernel loop mount, compared with the kernel's read-only mount.
    Kernel,
    /// Filled and compared through ntfs-3g.
    Ntfs3g,
    /// Filled with mtools from the generated tree, compared with that tree.
    Mtools,
}

/// What the generator may create on a filesystem.
#[derive(Clone, Copy, Default, Debug)]
struct Caps {
    /// Owners, permission bits, symlinks, device nodes, fifos.
    posix: bool,
    hardlinks: bool,
    xattrs: bool,
    /// Times before 1970 and after 2038.
    wide_times: bool,
    /// One regular file of this many MiB (larger than one extent on 1 KiB blocks: 32 MiB).
    big_mib: u64,
    /// An fscrypt (v1, e4crypt) directory, filled with the key and compared without it.
    encrypt: bool,
    /// Directories of this many entries (ext4 htree with two levels, XFS node form).
    huge: usize,
    /// The reference shows the on-disk inode numbers.
    ino: bool,
    /// Regular files of at most 64 KiB (FAT12's few megabytes).
    small: bool,
    /// Reflinked copies (`cp --reflink=always`: shared extents on XFS).
    reflink: bool,
}

struct Case {
    name: String,
    size: &'static str,
    mkfs: Vec<&'static str>,
    via: Via,
    /// Mount options of the reference (Kernel: plus `loop`), and of the fill mount.
    ro: &'static str,
    rw: &'static str,
    caps: Caps,
}

fn ext(name: &str, mkfs: &[&'static str], caps: Caps) -> Case {
    let ext2 = mkfs.first() == Some(&"mkfs.ext2");
    Case {
        name: name.to_string(),
        size: if caps.big_mib > 0 { "160M" } else { "96M" },
        mkfs: [mkfs, &["-q", "-F"]].concat(),
        via: Via::Kernel,
        ro: if ext2 { "ro,loop" } else { "ro,loop,noload" },
        rw: "loop",
        caps: Caps {
            posix: true,
            hardlinks: true,
            xattrs: true,
            ino: true,
            ..caps
        },
    }
}

fn xfs(name: &str, opts: &[&'static str], caps: Caps) -> Case {
    Case {
        name: name.to_string(),
        size: "320M",
        mkfs: [&["mkfs.xfs", "-q", "-f"], opts].concat(),
        via: Via::Kernel,
        ro: "ro,loop,norecovery",
        rw: "loop",
        caps: Caps {
            posix: true,
            hardlinks: true,
            xattrs: true,
            ino: true,
            ..caps
        },
    }
}

fn fat(bits: &'static str, size: &'static str, small: bool) -> Case {
    Case {
        name: format!("fat{bits}"),
        size,
        mkfs: vec!["mkfs.fat", "-F", bits],
        via: Via::Mtools,
        ro: "",
        rw: "",
        caps: Caps {
            small,
            ..Caps::default()
        },
    }
}

fn ntfs() -> Case {
    Case {
        name: "ntfs".into(),
        size: "96M",
        mkfs: vec!["mkntfs", "-q", "-F", "-f"],
        via: Via::Ntfs3g,
        ro: "ro,umask=0022,fmask=0133",
        rw: "",
        caps: Caps {
            hardlinks: true,
            ino: true,
            ..Caps::default()
        },
    }
}

/// The fast subset: one image of each reader, the ext4 features most guests have plus the ones
/// that were wrong (64bit + bigalloc + 128-byte inodes, inline_data, encryption).
fn fast_cases() -> Vec<Case> {
    let c = Caps::default();
    vec![
        ext(
            "ext4",
            &["mkfs.ext4"],
            Caps {
                wide_times: true,
                ..c
            },
        ),
        ext(
            "ext2-1k-128",
            &["mkfs.ext2", "-b", "1024", "-I", "128"],
            Caps { big_mib: 33, ..c },
        ),
        ext(
            "ext4-64bit-bigalloc-128",
            &[
                "mkfs.ext4",
                "-b",
                "1024",
                "-I",
                "128",
                "-O",
                "64bit,bigalloc",
            ],
            c,
        ),
        ext(
            "ext4-inline-encrypt",
            &["mkfs.ext4", "-O", "inline_data,encrypt"],
            Caps {
                encrypt: true,
                wide_times: true,
                ..c
            },
        ),
        xfs(
            "xfs-v5",
            &[],
            Caps {
                wide_times: true,
                ..c
            },
        ),
        fat("32", "64M", false),
        ntfs(),
    ]
}

/// The full matrix.
fn full_cases() -> Vec<Case> {
    let c = Caps::default();
    let wide = Caps {
        wide_times: true,
        ..c
    };
    let mut v = Vec::new();
    for fs in ["ext2", "ext3", "ext4"] {
        for b in ["1024", "4096"] {
            for i in ["128", "256"] {
                let mkfs: &'static str = match fs {
                    "ext2" => "mkfs.ext2",
                    "ext3" => "mkfs.ext3",
                    _ => "mkfs.ext4",
                };
                let caps = if i == "256" { wide } else { c };
                let caps = Caps {
                    big_mib: if b == "1024" && i == "256" { 33 } else { 0 },
                    ..caps
                };
                v.push(ext(
                    &format!("{fs}-{b}-{i}"),
                    &[mkfs, "-b", b, "-I", i],
                    caps,
                ));
            }
        }
    }
    let features: [(&str, &[&'static str], Caps); 9] = [
        (
            "ext4-64bit-bigalloc-128",
            &["-b", "1024", "-I", "128", "-O", "64bit,bigalloc"],
            c,
        ),
        ("ext4-bigalloc-4k", &["-O", "bigalloc", "-C", "65536"], wide),
        ("ext4-no64bit", &["-O", "^64bit,^metadata_csum"], wide),
        ("ext4-inline", &["-O", "inline_data"], wide),
        ("ext4-inline-1k", &["-b", "1024", "-O", "inline_data"], wide),
        ("ext4-nocsum", &["-O", "^metadata_csum"], wide),
        (
            "ext4-encrypt",
            &["-O", "encrypt"],
            Caps {
                encrypt: true,
                ..wide
            },
        ),
        (
            "ext4-encrypt-1k",
            &["-b", "1024", "-O", "encrypt"],
            Caps {
                encrypt: true,
                ..wide
            },
        ),
        (
            "ext4-huge-1k",
            &["-b", "1024", "-N", "40000"],
            Caps {
                huge: 20_000,
                ..wide
            },
        ),
    ];
    for (name, opts, caps) in features {
        v.push(ext(name, &[&["mkfs.ext4"], opts].concat(), caps));
    }
    v.push(ext(
        "ext2-huge",
        &["mkfs.ext2", "-N", "40000"],
        Caps { huge: 20_000, ..c },
    ));
    v.push(xfs("xfs-v5", &[], wide));
    v.push(xfs("xfs-v5-nobigtime", &["-m", "bigtime=0"], c));
    v.push(xfs(
        "xfs-v5-reflink",
        &["-m", "reflink=1"],
        Caps {
            reflink: true,
            ..wide
        },
    ));
    v.push(xfs(
        "xfs-v5-noreflink",
        &["-m", "reflink=0,bigtime=1"],
        wide,
    ));
    v.push(xfs(
        "xfs-v5-512",
        &["-i", "size=512", "-b", "size=1024"],
        wide,
    ));
    v.push(xfs(
        "xfs-v5-huge",
        &[],
        Caps {
            huge: 20_000,
            ..wide
        },
    ));
    // XFS v4 (with and without ftype): this kernel refuses to mount it (no
    // CONFIG_XFS_SUPPORT_V4), so there is no reference; see the exceptions in docs/restore.md.
    v.push(fat("12", "16M", true));
    v.push(fat("16", "64M", false));
    v.push(fat("32", "96M", false));
    v.push(ntfs());
    v
}

/// xorshift64*: the whole tree follows from the seed.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(n);
        v
    }
    /// A file name for entry `i`, unique by its prefix (also case-insensitively).
    fn name(&mut self, i: usize, fat: bool) -> String {
        let base = format!("{i:04}");
        match self.below(10) {
            // mtools drops characters outside the BMP.
            0 if fat => format!("{base}-é日本-ü"),
            0 => format!("{base}-é日本-ü🙂"),
            1 => {
                // 255 bytes (FAT: 255 UTF-16 units, the same here: ASCII).
                let mut s = format!("{base}-long-");
                while s.len() < 255 {
                    s.push(if fat { 'l' } else { 'x' });
                }
                s
            }
            2 if !fat => {
                // 255 bytes of two-byte characters (and one ASCII to make it odd).
                let mut s = format!("{base}-");
                while s.len() + 2 <= 255 {
                    s.push('ß');
                }
                while s.len() < 255 {
                    s.push('s');
                }
                s
            }
            3 => format!("{base} with spaces.txt"),
            4 => format!("{base}.Mixed.Case.TXT"),
            _ => format!("{base}-f{}", self.below(1000)),
        }
    }
}

fn seed() -> u64 {
    std::env::var("SNAPFS_DIFF_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(19)
}

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("no NUL in paths")
}

fn set_times(p: &Path, a: (i64, i64), m: (i64, i64)) {
    let ts = [
        libc::timespec {
            tv_sec: a.0,
            tv_nsec: a.1,
        },
        libc::timespec {
            tv_sec: m.0,
            tv_nsec: m.1,
        },
    ];
    let c = cstr(p);
    // SAFETY: c is a valid NUL-terminated path and ts two timespecs, as utimensat requires.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(
        r,
        0,
        "utimensat {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
}

fn lsetxattr(p: &Path, name: &str, value: &[u8]) -> bool {
    let (c, n) = (cstr(p), CString::new(name).unwrap());
    // SAFETY: valid C strings and a buffer of value.len() bytes.
    unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        ) == 0
    }
}

fn mknod(p: &Path, mode: u32, dev: u64) {
    let c = cstr(p);
    // SAFETY: a valid path.
    let r = unsafe { libc::mknod(c.as_ptr(), mode, dev) };
    assert_eq!(
        r,
        0,
        "mknod {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
}

fn lchown(p: &Path, uid: u32, gid: u32) {
    let c = cstr(p);
    // SAFETY: a valid path.
    let r = unsafe { libc::lchown(c.as_ptr(), uid, gid) };
    assert_eq!(
        r,
        0,
        "lchown {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
}

/// An access ACL granting user 1000 rw- (the kernel's xattr form).
const ACL: &str =
    "0200000001000600ffffffff02000600e803000004000400ffffffff10000600ffffffff20000400ffffffff";

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

const SIZES: [usize; 14] = [
    0, 1, 59, 60, 61, 150, 1023, 1024, 4095, 4096, 4097, 65_549, 300_001, 1_500_000,
];

/// Fill `root` (a fresh filesystem, mounted or a plain directory) with `n` generated entries.
/// Returns the number of entries made.
fn fill(root: &Path, g: &mut Gen, caps: Caps, n: usize, fat: bool) -> usize {
    let mut dirs = vec![root.to_path_buf()];
    let mut files: Vec<PathBuf> = Vec::new();
    let mut made: Vec<PathBuf> = Vec::new();
    // A deep path.
    let mut deep = root.join("deep");
    for i in 0..24 {
        deep = deep.join(format!("level-{i:02}"));
    }
    fs::create_dir_all(&deep).unwrap();
    fs::write(deep.join("bottom.txt"), b"at the bottom\n").unwrap();
    let mut d = deep.clone();
    while d != root {
        made.push(d.clone());
        d = d.parent().unwrap().to_path_buf();
    }
    made.reverse();
    made.push(deep.join("bottom.txt"));
    for sub in ["a", "a/b", "c"] {
        fs::create_dir(root.join(sub)).unwrap();
        dirs.push(root.join(sub));
        made.push(root.join(sub));
    }
    if caps.big_mib > 0 {
        let p = root.join("big.bin");
        let mut f = fs::File::create(&p).unwrap();
        let chunk = g.bytes(1 << 20);
        for i in 0..caps.big_mib {
            let mut c = chunk.clone();
            c[..8].copy_from_slice(&i.to_le_bytes());
            f.write_all(&c).unwrap();
        }
        made.push(p);
    }
    for i in 0..n {
        let parent = dirs[g.below(dirs.len())].clone();
        let mut name = g.name(i, fat);
        // mtools refuses paths over 255 characters (Windows' MAX_PATH is 260).
        if fat && parent.strip_prefix(root).unwrap().as_os_str().len() + name.len() > 230 {
            name = format!("{i:04}-short");
        }
        let p = parent.join(name);
        let roll = g.below(100);
        match roll {
            0..=14 => {
                fs::create_dir(&p).unwrap();
                dirs.push(p.clone());
            }
            15..=59 => {
                let mut size = SIZES[g.below(SIZES.len())];
                if caps.small {
                    size %= 65_550;
                }
                fs::write(&p, g.bytes(size)).unwrap();
                files.push(p.clone());
            }
            60..=66 if !fat => {
                // Sparse: data at a few offsets, holes between and possibly at the end.
                let mut f = fs::File::create(&p).unwrap();
                for _ in 0..1 + g.below(4) {
                    let off = (g.below(64) as u64) << 16;
                    f.seek(SeekFrom::Start(off)).unwrap();
                    let len = 1 + g.below(9000);
                    f.write_all(&g.bytes(len)).unwrap();
                }
                if g.below(2) == 0 {
                    f.set_len((g.below(80) as u64 + 1) << 16).unwrap();
                }
                files.push(p.clone());
            }
            67..=74 if caps.hardlinks && !files.is_empty() => {
                let src = files[g.below(files.len())].clone();
                fs::hard_link(&src, &p).unwrap();
                continue;
            }
            75..=84 if caps.posix => {
                let len = [1, 10, 59, 60, 61, 200, 1000][g.below(7)];
                let mut t = String::from("../target-");
                while t.len() < len + 10 {
                    t.push(char::from(b'a' + g.below(26) as u8));
                }
                std::os::unix::fs::symlink(&t[..len], &p).unwrap();
            }
            85..=88 if caps.posix => {
                let c = cstr(&p);
                // SAFETY: a valid path.
                assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
            }
            89..=90 if caps.posix => mknod(&p, libc::S_IFCHR | 0o640, libc::makedev(1, 3)),
            91 if caps.posix => mknod(&p, libc::S_IFBLK | 0o660, libc::makedev(259, 70_000)),
            _ => {
                fs::write(&p, format!("entry {i}\n")).unwrap();
                files.push(p.clone());
            }
        }
        made.push(p);
    }
    if caps.reflink {
        for (k, src) in files.iter().take(8).enumerate() {
            let dst = root.join(format!("reflinked-{k}"));
            run(Command::new("cp")
                .arg("--reflink=always")
                .arg(src)
                .arg(&dst));
            made.push(dst);
        }
    }
    if caps.huge > 0 {
        let h = root.join("huge");
        fs::create_dir(&h).unwrap();
        for i in 0..caps.huge {
            let k = (i * 7_919) % caps.huge;
            let p = h.join(format!("h{k:06}-{}", "é".repeat(k % 7)));
            if k.is_multiple_of(3) {
                fs::create_dir(&p).unwrap();
            } else {
                fs::write(&p, b"").unwrap();
            }
        }
        made.push(h);
    }
    // Attributes, children before their parents (reverse creation order), times last.
    for p in made.iter().rev() {
        let md = fs::symlink_metadata(p).unwrap();
        let link = md.file_type().is_symlink();
        if caps.posix {
            let uid = [0, 0, 1000, 65_534, 123_456][g.below(5)];
            let gid = [0, 0, 1000, 100, 654_321][g.below(5)];
            lchown(p, uid, gid);
            if !link {
                let mut mode = [0o644, 0o755, 0o600, 0o777, 0o000, 0o640][g.below(6)];
                if g.below(8) == 0 {
                    mode |= [0o4000, 0o2000, 0o1000][g.below(3)];
                }
                if md.is_dir() {
                    // The walk must be able to enter every directory.
                    mode |= 0o700;
                }
                fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
            }
        }
        if caps.xattrs && !link && g.below(3) == 0 {
            let _ = lsetxattr(p, "user.small", format!("v{}", g.below(100)).as_bytes());
            if g.below(3) == 0 {
                let len = 200 + g.below(700);
                let _ = lsetxattr(p, "user.big", &g.bytes(len));
            }
            if g.below(3) == 0 {
                let _ = lsetxattr(p, "trusted.t", b"trusted value");
            }
            if g.below(2) == 0 {
                let _ = lsetxattr(p, "system.posix_acl_access", &unhex(ACL));
            }
            if md.is_dir() && g.below(2) == 0 {
                let _ = lsetxattr(p, "system.posix_acl_default", &unhex(ACL));
            }
        }
        let t = |g: &mut Gen| -> (i64, i64) {
            let sec = if caps.wide_times && g.below(6) == 0 {
                [-1_000_000_000i64, -1, 2_200_000_000, 4_000_000_000][g.below(4)]
            } else {
                1_500_000_000 + g.below(300_000_000) as i64
            };
            (
                sec,
                if fat {
                    0
                } else {
                    g.below(1_000_000_000) as i64
                },
            )
        };
        let (a, m) = (t(g), t(g));
        set_times(p, a, m);
    }
    made.len()
}

/// The encrypted part: a directory under an fscrypt v1 policy (e4crypt), filled by a child in
/// its own session keyring, so neither this process nor the reference mount has the key.
fn fill_encrypted(root: &Path) {
    let script = r#"
set -e
d="$1/enc"
mkdir "$d"
echo snapfs-diff-pass | e4crypt add_key -S 0x5eed5eed5eed5eed "$d" >/dev/null
mkdir "$d/sub" "$d/many"
printf 'secret\n' > "$d/sub/file.txt"
head -c 70000 /dev/zero | tr '\0' 'x' > "$d/big"
: > "$d/empty"
ln -s short "$d/link-short"
ln -s "$(printf 'long-target-%.0s' $(seq 1 20))" "$d/link-long"
mkfifo "$d/fifo"
for i in $(seq 1 300); do : > "$d/many/name-$i"; done
n=$(printf 'n%.0s' $(seq 1 200))
: > "$d/many/$n"
mkdir "$d/sub/inner"
: > "$d/sub/inner/x"
"#;
    let mut cmd = Command::new("bash");
    cmd.args(["-c", script, "fill-enc"]).arg(root);
    // SAFETY: keyctl(KEYCTL_JOIN_SESSION_KEYRING, NULL) in the child before exec: a new,
    // anonymous session keyring, so the key e4crypt adds leaves with the child.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            if libc::syscall(libc::SYS_keyctl, 1, 0usize) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    run(&mut cmd);
}

/// A kernel (or ntfs-3g) mount, unmounted on drop.
struct Mnt {
    dir: tempfile::TempDir,
}

impl Mnt {
    fn new(cmd: &mut Command) -> Mnt {
        let dir = tempfile::Builder::new()
            .prefix("snapfs-diffmnt")
            .tempdir()
            .expect("tempdir");
        run(cmd.arg(dir.path()));
        Mnt { dir }
    }
    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Mnt {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// What one path shows.
#[derive(Debug, PartialEq)]
struct Entry {
    kind: &'static str,
    attrs: BTreeMap<&'static str, String>,
}

fn kind_of(ft: &fs::FileType) -> &'static str {
    if ft.is_dir() {
        "dir"
    } else if ft.is_symlink() {
        "symlink"
    } else if ft.is_fifo() {
        "fifo"
    } else if ft.is_char_device() {
        "chr"
    } else if ft.is_block_device() {
        "blk"
    } else if ft.is_socket() {
        "socket"
    } else {
        "file"
    }
}

fn xattrs(p: &Path) -> Result<BTreeMap<String, String>, i32> {
    let c = cstr(p);
    let mut names = vec![0u8; 65_536];
    // SAFETY: the buffer's length is given.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if n < 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
    }
    names.truncate(n as usize);
    let mut out = BTreeMap::new();
    for name in names.split(|&b| b == 0).filter(|s| !s.is_empty()) {
        let cn = CString::new(name).unwrap();
        let mut v = vec![0u8; 65_536];
        // SAFETY: as above.
        let k = unsafe { libc::lgetxattr(c.as_ptr(), cn.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
        let val = if k < 0 {
            format!(
                "errno {}",
                std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
            )
        } else {
            v.truncate(k as usize);
            hex(&v)
        };
        out.insert(String::from_utf8_lossy(name).into_owned(), val);
    }
    Ok(out)
}

fn hex(v: &[u8]) -> String {
    v.iter().map(|b| format!("{b:02x}")).collect()
}

fn digest(p: &Path) -> String {
    match fs::read(p) {
        Ok(v) => {
            use sha2::Digest;
            format!(
                "{} bytes sha256 {}",
                v.len(),
                hex(&sha2::Sha256::digest(&v)[..12])
            )
        }
        Err(e) => format!("errno {}", e.raw_os_error().unwrap_or(0)),
    }
}

/// Every entry below `root` with what it shows. `ino`: record inode numbers (low 44 bits).
fn snapshot(
    root: &Path,
    ino: bool,
    what: Option<&BTreeSet<&'static str>>,
) -> BTreeMap<PathBuf, Entry> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    let want = |a: &str| what.is_none_or(|w| w.contains(a));
    while let Some(d) = stack.pop() {
        let rd = match fs::read_dir(&d) {
            Ok(rd) => rd,
            Err(e) => {
                let rel = d.strip_prefix(root).unwrap().to_path_buf();
                if let Some(en) = out.get_mut(&rel) {
                    let en: &mut Entry = en;
                    en.attrs.insert(
                        "listing",
                        format!("errno {}", e.raw_os_error().unwrap_or(0)),
                    );
                }
                continue;
            }
        };
        for e in rd {
            let e = e.expect("directory entry");
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_path_buf();
            let md = match fs::symlink_metadata(&p) {
                Ok(md) => md,
                Err(err) => {
                    out.insert(
                        rel,
                        Entry {
                            kind: "unstat-able",
                            attrs: [("stat", format!("errno {}", err.raw_os_error().unwrap_or(0)))]
                                .into(),
                        },
                    );
                    continue;
                }
            };
            let ft = md.file_type();
            let kind = kind_of(&ft);
            let mut a: BTreeMap<&'static str, String> = BTreeMap::new();
            let mut put = |k: &'static str, v: String| {
                if want(k) {
                    a.insert(k, v);
                }
            };
            put("mode", format!("{:o}", md.mode() & 0o7777));
            put("uid", md.uid().to_string());
            put("gid", md.gid().to_string());
            put("atime", format!("{}.{:09}", md.atime(), md.atime_nsec()));
            put("mtime", format!("{}.{:09}", md.mtime(), md.mtime_nsec()));
            put("ctime", format!("{}.{:09}", md.ctime(), md.ctime_nsec()));
            put("nlink", md.nlink().to_string());
            if ino {
                put("ino", (md.ino() & ((1 << 44) - 1)).to_string());
            }
            if kind != "dir" {
                put("size", md.len().to_string());
            }
            if kind == "chr" || kind == "blk" {
                put("rdev", format!("{:x}", md.rdev()));
            }
            if kind == "file" && want("content") {
                put("content", digest(&p));
            }
            if kind == "symlink" {
                put(
                    "target",
                    match fs::read_link(&p) {
                        Ok(t) => hex(t.as_os_str().as_bytes()),
                        Err(e) => format!("errno {}", e.raw_os_error().unwrap_or(0)),
                    },
                );
            }
            if want("xattrs") {
                put(
                    "xattrs",
                    match xattrs(&p) {
                        Ok(x) => format!("{x:?}"),
                        Err(e) => format!("errno {e}"),
                    },
                );
            }
            if ft.is_dir() {
                stack.push(p);
            }
            out.insert(rel, Entry { kind, attrs: a });
        }
    }
    out
}

/// One decided exception: (image name prefix or `*`, attribute, entry kind or `*`).
#[derive(Debug)]
struct Exception {
    image: String,
    attr: String,
    kind: String,
}

/// The table under "Differential suite: decided exceptions" in docs/restore.md: rows
/// `| images | attribute | kind | why |`.
fn exceptions() -> Vec<Exception> {
    let doc = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/restore.md"))
        .expect("docs/restore.md");
    let start = doc
        .find("Differential suite: decided exceptions")
        .expect("docs/restore.md has the differential suite's exceptions");
    let mut out = Vec::new();
    for line in doc[start..].lines().skip(1) {
        if line.starts_with('#') {
            break;
        }
        let cells: Vec<&str> = line
            .split('|')
            .map(|c| c.trim().trim_matches('`'))
            .collect();
        if cells.len() < 5 || cells[1] == "images" || cells[1].starts_with("---") {
            continue;
        }
        for image in cells[1].split(',') {
            out.push(Exception {
                image: image.trim().trim_matches('`').to_string(),
                attr: cells[2].to_string(),
                kind: cells[3].to_string(),
            });
        }
    }
    out
}

fn excepted(ex: &[Exception], image: &str, attr: &str, kind: &str) -> bool {
    ex.iter().any(|e| {
        (e.image == "*" || image.starts_with(&e.image))
            && e.attr == attr
            && (e.kind == "*" || e.kind == kind)
    })
}

fn only() -> Option<String> {
    std::env::var("SNAPFS_DIFF_ONLY")
        .ok()
        .filter(|s| !s.is_empty())
}

fn run_matrix(cases: Vec<Case>, entries: usize) {
    let started = std::time::Instant::now();
    let t = tempfile::Builder::new()
        .prefix("snapfs-diff")
        .tempdir_in(std::env::var("SNAPFS_DIFF_TMP").unwrap_or_else(|_| "/var/tmp".into()))
        .expect("tempdir");
    let images = t.path().join("images");
    fs::create_dir(&images).unwrap();
    let ex = exceptions();
    let cases: Vec<Case> = cases
        .into_iter()
        .filter(|c| only().is_none_or(|o| c.name.contains(&o)))
        .collect();
    let mut made = Vec::new();
    for (k, c) in cases.iter().enumerate() {
        let raw = t.path().join(format!("{}.raw", c.name));
        run(Command::new("truncate").args(["-s", c.size]).arg(&raw));
        run(Command::new(c.mkfs[0]).args(&c.mkfs[1..]).arg(&raw));
        let mut g = Gen(seed().wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (k as u64 + 1) << 32 | 1);
        let src = t.path().join(format!("{}.src", c.name));
        let n = match c.via {
            Via::Kernel => {
                let m = Mnt::new(Command::new("mount").args(["-o", c.rw]).arg(&raw));
                let n = fill(m.path(), &mut g, c.caps, entries, false);
                if c.caps.encrypt {
                    fill_encrypted(m.path());
                }
                n
            }
            Via::Ntfs3g => {
                let m = Mnt::new(Command::new("ntfs-3g").arg(&raw));
                fill(m.path(), &mut g, c.caps, entries, false)
            }
            Via::Mtools => {
                fs::create_dir(&src).unwrap();
                let n = fill(&src, &mut g, c.caps, entries, true);
                let mut cmd = Command::new("mcopy");
                cmd.args(["-s", "-p", "-m", "-Q", "-i"]).arg(&raw);
                for e in fs::read_dir(&src).unwrap() {
                    cmd.arg(e.unwrap().path());
                }
                if std::env::var_os("SNAPFS_DIFF_KEEP").is_some() {
                    println!("kept: {}", t.keep().display());
                    return;
                }
                run(cmd.arg("::/"));
                n
            }
        };
        let img = images.join(format!("{}.qcow2", c.name));
        let (r, i) = (raw.to_str().unwrap(), img.to_str().unwrap());
        qemu_img(&["convert", "-O", "qcow2", r, i]);
        qemu_img(&["snapshot", "-c", "s", i]);
        println!("{}: {n} entries generated", c.name);
        made.push((c, raw, src));
    }
    if std::env::var_os("SNAPFS_DIFF_KEEP").is_some() {
        println!("kept: {}", t.keep().display());
        return;
    }
    let mut failures: BTreeMap<(String, String, &'static str), (usize, Vec<String>)> =
        BTreeMap::new();
    let (mut paths, mut diffs, mut allowed) = (0usize, 0usize, 0usize);
    let mut summary: BTreeMap<(String, String, &'static str), usize> = BTreeMap::new();
    // Both ways the readers run: in the daemon and in the confined worker (issue 20); an
    // image name in a report says which ("ext4-4k (worker)"). SNAPFS_DIFF_WORKER=on|off runs
    // one of them only.
    let modes: Vec<&str> = match std::env::var("SNAPFS_DIFF_WORKER").as_deref() {
        Ok("on") => vec!["on"],
        Ok("off") => vec!["off"],
        _ => vec!["off", "on"],
    };
    for mode in modes {
        let m = Mount::with_args(&images, &[&format!("--restore-worker={mode}")]);
        let suffix = if mode == "on" { " (worker)" } else { "" };
        for (c, raw, src) in &made {
            let label = format!("{}{suffix}", c.name);
            let (_reference, rpath): (Option<Mnt>, PathBuf) = match c.via {
                Via::Kernel => {
                    let k = Mnt::new(Command::new("mount").args(["-o", c.ro]).arg(raw));
                    let p = k.path().to_path_buf();
                    (Some(k), p)
                }
                Via::Ntfs3g => {
                    let k = Mnt::new(Command::new("ntfs-3g").args(["-o", c.ro]).arg(raw));
                    let p = k.path().to_path_buf();
                    (Some(k), p)
                }
                Via::Mtools => (None, src.clone()),
            };
            // FAT through mtools: what the generated tree and FAT both hold.
            let fat_attrs: BTreeSet<&'static str> = ["size", "content", "mtime"].into();
            let what = (c.via == Via::Mtools).then_some(&fat_attrs);
            let want = snapshot(&rpath, c.caps.ino, what);
            let got = snapshot(
                &m.snap(&format!("{}.qcow2", c.name), "s")
                    .join("files/whole"),
                c.caps.ino,
                what,
            );
            let mut note = |attr: &str, kind: &'static str, msg: String| {
                diffs += 1;
                if excepted(&ex, &c.name, attr, kind) {
                    allowed += 1;
                    *summary
                        .entry((label.clone(), attr.to_string(), kind))
                        .or_default() += 1;
                } else {
                    let f: &mut (usize, Vec<String>) = failures
                        .entry((label.clone(), attr.to_string(), kind))
                        .or_default();
                    f.0 += 1;
                    if f.1.len() < 3 {
                        f.1.push(msg);
                    }
                }
            };
            for (p, w) in &want {
                paths += 1;
                let Some(g) = got.get(p) else {
                    note(
                        "missing",
                        w.kind,
                        format!("{}: missing in snapfs", p.display()),
                    );
                    continue;
                };
                if g.kind != w.kind {
                    note(
                        "type",
                        w.kind,
                        format!(
                            "{}: {} in snapfs, {} in the reference",
                            p.display(),
                            g.kind,
                            w.kind
                        ),
                    );
                    continue;
                }
                for (attr, wv) in &w.attrs {
                    let gv = g.attrs.get(attr).cloned().unwrap_or_default();
                    if &gv != wv {
                        // FAT stores modification times in 2 s: mtools rounds, the source does not.
                        if c.via == Via::Mtools && *attr == "mtime" {
                            let (ws, gs) = (
                                wv.split('.').next().unwrap_or(""),
                                gv.split('.').next().unwrap_or(""),
                            );
                            let (ws, gs): (i64, i64) =
                                (ws.parse().unwrap_or(0), gs.parse().unwrap_or(1));
                            if w.kind == "dir" || (ws - gs).abs() <= 1 {
                                continue;
                            }
                        }
                        let (gv, wv) = if *attr == "xattrs" {
                            // Only the names whose values differ.
                            let split = |s: &str| -> BTreeSet<String> {
                                s.split(", ").map(str::to_string).collect()
                            };
                            let (a, b) = (split(&gv), split(wv));
                            (
                                a.difference(&b).cloned().collect::<Vec<_>>().join(", "),
                                b.difference(&a).cloned().collect::<Vec<_>>().join(", "),
                            )
                        } else {
                            (gv, wv.clone())
                        };
                        note(
                            attr,
                            w.kind,
                            format!(
                                "{}: {attr}: snapfs {gv:.200}, reference {wv:.200}",
                                p.display()
                            ),
                        );
                    }
                }
            }
            for (p, g) in &got {
                if !want.contains_key(p) {
                    note("extra", g.kind, format!("{}: only in snapfs", p.display()));
                }
            }
        }
    }
    for ((image, attr, kind), n) in &summary {
        println!("excepted: {image}: {attr} of {n} {kind} entries");
    }
    println!(
        "differential: {} images, {paths} paths compared, {diffs} differences ({allowed} decided exceptions), {:.1} s",
        made.len(),
        started.elapsed().as_secs_f64()
    );
    let report: Vec<String> = failures
        .iter()
        .map(|((image, attr, kind), (n, eg))| {
            format!(
                "{image}: {attr} of {n} {kind} entries, e.g.\n    {}",
                eg.join("\n    ")
            )
        })
        .collect();
    assert!(
        failures.is_empty(),
        "differences from the reference:\n{}",
        report.join("\n")
    );
}

#[test]
fn differential_fast_subset() {
    run_matrix(fast_cases(), 150);
}

#[test]
#[ignore = "the full matrix: scripts/check-differential.sh"]
fn differential_full_matrix() {
    run_matrix(full_cases(), 400);
}

/// Casefolded ext4 directories (`mkfs.ext4 -O casefold`, `+F`): names are found in any case as
/// Linux's `utf8_casefold` matches them (full case folding: ß = ss; canonical equivalence:
/// precomposed É = E + U+0301), listed as stored; a directory without the flag stays exact.
/// This kernel has no CONFIG_UNICODE (it refuses to mount such a filesystem), so the image is
/// made with debugfs, which hashes and links names as e2fsprogs' casefold support does, and
/// the expectation is Linux's documented rule rather than a kernel mount.
#[test]
fn casefold_directories_look_names_up_caselessly() {
    let t = tempfile::Builder::new()
        .prefix("snapfs-casefold")
        .tempdir()
        .expect("tempdir");
    let images = t.path().join("images");
    fs::create_dir(&images).unwrap();
    let raw = t.path().join("cf.raw");
    let content = t.path().join("content");
    fs::write(&content, b"hi\n").unwrap();
    run(Command::new("truncate").args(["-s", "32M"]).arg(&raw));
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-O", "casefold"])
        .arg(&raw));
    let debugfs = |req: &str| {
        run(Command::new("debugfs").args(["-w", "-R", req]).arg(&raw));
    };
    debugfs("mkdir ci");
    debugfs("mkdir exact");
    // EXT4_CASEFOLD_FL | EXT4_EXTENTS_FL on the empty directory (what chattr +F sets).
    debugfs("set_inode_field ci flags 0x40080000");
    let c = content.to_str().unwrap();
    for n in ["Foo.txt", "Straße", "ÉCOLE", "sub"] {
        debugfs(&format!("write {c} ci/{n}"));
    }
    debugfs(&format!("write {c} exact/Foo.txt"));
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(&raw)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    let img = images.join("cf.qcow2");
    let (r, i) = (raw.to_str().unwrap(), img.to_str().unwrap());
    qemu_img(&["convert", "-O", "qcow2", r, i]);
    qemu_img(&["snapshot", "-c", "s", i]);
    let m = Mount::new(&images);
    let root = m.snap("cf.qcow2", "s").join("files/whole");
    let ci = root.join("ci");
    assert_eq!(ls(&ci), ["Foo.txt", "Straße", "sub", "ÉCOLE"]);
    let ino = |p: PathBuf| fs::symlink_metadata(&p).map(|m| m.ino());
    let foo = ino(ci.join("Foo.txt")).unwrap();
    for other in ["FOO.TXT", "foo.txt", "fOo.TxT"] {
        assert_eq!(ino(ci.join(other)).ok(), Some(foo), "{other}");
    }
    let strasse = ino(ci.join("Straße")).unwrap();
    for other in ["STRASSE", "strasse", "STRAẞE"] {
        assert_eq!(ino(ci.join(other)).ok(), Some(strasse), "{other}");
    }
    let ecole = ino(ci.join("ÉCOLE")).unwrap();
    for other in ["école", "e\u{301}cole", "E\u{301}COLE"] {
        assert_eq!(ino(ci.join(other)).ok(), Some(ecole), "{other}");
    }
    assert_ne!(foo, strasse);
    for absent in ["FOO.TX", "ecole", "strase"] {
        assert_eq!(
            errno(fs::symlink_metadata(ci.join(absent))),
            libc::ENOENT,
            "{absent}"
        );
    }
    assert_eq!(fs::read(ci.join("FOO.TXT")).unwrap(), b"hi\n");
    // Without the flag, names stay exact.
    let exact = root.join("exact");
    assert!(fs::symlink_metadata(exact.join("Foo.txt")).is_ok());
    assert_eq!(
        errno(fs::symlink_metadata(exact.join("FOO.TXT"))),
        libc::ENOENT
    );
}

/// A directory both casefolded and encrypted (`mkfs.ext4 -O casefold,encrypt`; issue 19
/// item 3): each entry stores the hash of its casefolded plaintext name after the name (which
/// needs the key to compute), and Linux lists it without the key as the no-key name of that
/// stored hash, minor hash and ciphertext (`ext4_hash_in_dirent`; `IS_CASEFOLDED` in the
/// linear `ext4_readdir`), looked up exactly (base64url has case: no caseless match). This
/// kernel has no CONFIG_UNICODE and cannot mount it, and neither debugfs nor the kernel here
/// can write such entries, so the directory block is written by hand (two entries, hashes
/// stored) and the expectation is the format of `fs/crypto/fname.c` (`struct
/// fscrypt_nokey_name`: hash and minor hash little-endian, then the ciphertext, base64url
/// without padding).
#[test]
fn casefolded_encrypted_directories_list_no_key_names_of_stored_hashes() {
    use base64::Engine;
    let t = tempfile::Builder::new()
        .prefix("snapfs-cfenc")
        .tempdir()
        .expect("tempdir");
    let images = t.path().join("images");
    fs::create_dir(&images).unwrap();
    let raw = t.path().join("cfe.raw");
    let content = t.path().join("content");
    fs::write(&content, b"hi\n").unwrap();
    run(Command::new("truncate").args(["-s", "32M"]).arg(&raw));
    // No metadata_csum: the hand-written directory block carries no checksum tail.
    run(Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-b",
            "1024",
            "-O",
            "casefold,encrypt,^metadata_csum",
        ])
        .arg(&raw));
    let debugfs = |req: &str| run(Command::new("debugfs").args(["-w", "-R", req]).arg(&raw));
    debugfs("mkdir ed");
    // EXT4_CASEFOLD_FL | EXT4_EXTENTS_FL | EXT4_ENCRYPT_FL.
    debugfs("set_inode_field ed flags 0x40080800");
    let c = content.to_str().unwrap();
    let names: [&[u8]; 2] = [b"0123456789abcdefXY", b"ABCDEFGHIJKLMNOPQRSTUV"];
    for n in names {
        debugfs(&format!("write {c} ed/{}", String::from_utf8_lossy(n)));
    }
    let inos: Vec<u32> = run(Command::new("debugfs").args(["-R", "ls -l ed"]).arg(&raw))
        .lines()
        .filter(|l| l.contains("<encrypted"))
        .map(|l| l.split_whitespace().next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(inos.len(), 2);
    for i in &inos {
        // EXT4_EXTENTS_FL | EXT4_ENCRYPT_FL: the files are encrypted too, as under a policy.
        debugfs(&format!("set_inode_field <{i}> flags 0x80800"));
    }
    let block: u64 = run(Command::new("debugfs").args(["-R", "blocks ed"]).arg(&raw))
        .trim()
        .parse()
        .expect("one directory block");
    let dotdot = 2u32;
    let hashes = [(0x1234_5678u32, 0x9abc_def0u32), (0x0fed_cba8, 0x7654_3210)];
    // ".", "..", then each name with its (hash, minor hash) after the name rounded to 4.
    let mut b = vec![0u8; 1024];
    let mut at = 0usize;
    let mut put = |ino: u32, name: &[u8], ftype: u8, hash: Option<(u32, u32)>, last: bool| {
        let base = (8 + name.len() + 3) & !3;
        let len = if last {
            1024 - at
        } else {
            base + if hash.is_some() { 8 } else { 0 }
        };
        b[at..at + 4].copy_from_slice(&ino.to_le_bytes());
        b[at + 4..at + 6].copy_from_slice(&(len as u16).to_le_bytes());
        b[at + 6] = name.len() as u8;
        b[at + 7] = ftype;
        b[at + 8..at + 8 + name.len()].copy_from_slice(name);
        if let Some((h, m)) = hash {
            b[at + base..at + base + 4].copy_from_slice(&h.to_le_bytes());
            b[at + base + 4..at + base + 8].copy_from_slice(&m.to_le_bytes());
        }
        at += len;
    };
    let ed_ino = run(Command::new("debugfs").args(["-R", "stat ed"]).arg(&raw));
    let ed_ino: u32 = ed_ino
        .split("Inode: ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .expect("inode of ed");
    put(ed_ino, b".", 2, None, false);
    put(dotdot, b"..", 2, None, false);
    put(inos[0], names[0], 1, Some(hashes[0]), false);
    put(inos[1], names[1], 1, Some(hashes[1]), true);
    {
        let mut f = fs::OpenOptions::new().write(true).open(&raw).unwrap();
        f.seek(SeekFrom::Start(block * 1024)).unwrap();
        f.write_all(&b).unwrap();
    }
    let nokey = |(h, m): (u32, u32), ct: &[u8]| {
        let mut v = h.to_le_bytes().to_vec();
        v.extend_from_slice(&m.to_le_bytes());
        v.extend_from_slice(ct);
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v)
    };
    let mut want: Vec<String> = (0..2).map(|i| nokey(hashes[i], names[i])).collect();
    want.sort();
    let img = images.join("cfe.qcow2");
    let (r, i) = (raw.to_str().unwrap(), img.to_str().unwrap());
    qemu_img(&["convert", "-O", "qcow2", r, i]);
    qemu_img(&["snapshot", "-c", "s", i]);
    let m = Mount::new(&images);
    let ed = m.snap("cfe.qcow2", "s").join("files/whole/ed");
    assert_eq!(ls(&ed), want);
    for n in &want {
        let md = fs::symlink_metadata(ed.join(n)).unwrap();
        assert!(md.is_file(), "{n}");
        assert_eq!(md.len(), 3, "{n}");
        // Contents need the key: ENOKEY, as Linux.
        assert_eq!(errno(fs::read(ed.join(n))), libc::ENOKEY, "{n}");
        // No caseless match of a no-key name.
        let other: String = n
            .chars()
            .map(|c| {
                if c.is_ascii_lowercase() {
                    c.to_ascii_uppercase()
                } else {
                    c.to_ascii_lowercase()
                }
            })
            .collect();
        assert_eq!(
            errno(fs::symlink_metadata(ed.join(&other))),
            libc::ENOENT,
            "{other}"
        );
    }
}

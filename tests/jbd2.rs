//! jbd2 replay exactly as Linux and e2fsck do it (issue 19 item 2).
//!
//! Every case is a dirty ext3/ext4 image made at test time: a filesystem is filled through the
//! kernel's loop mount, then more is written and fsynced (committed to the journal, not yet
//! written in place), and the device is copied while still mounted, as a crash or a
//! crash-consistent snapshot leaves it. Some cases then damage one journal field with a byte
//! flip. The reference is a copy replayed by `e2fsck -E journal_only -y` and then read by the
//! kernel (`ro,noload` loop mount); snapfs reads the *unreplayed* image (its own in-memory
//! replay) and must show exactly the same tree: names, types, modes, owners, sizes, mtimes,
//! link counts, inode numbers, contents and link targets.
//!
//! Needs root, loop devices, mke2fs/e2fsck/debugfs (e2fsprogs 1.47). Mounts are serialised (the
//! machine has 8 loop devices, shared).

use std::collections::BTreeMap;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};
use snapfs::image::raw::RawImage;
use snapfs::image::BlockImage;
use snapfs::restore::{open_volume, FileKind, GuestFs, Partition, Volume};

/// One loop mount at a time from this test binary.
static MOUNTS: Mutex<()> = Mutex::new(());

thread_local! {
    static WORK: std::cell::RefCell<Option<tempfile::TempDir>> = const { std::cell::RefCell::new(None) };
}

/// This test's scratch directory under /var/tmp (made on first use, removed by [`Scratch`]).
fn work() -> PathBuf {
    WORK.with(|w| {
        w.borrow_mut()
            .get_or_insert_with(|| {
                tempfile::Builder::new()
                    .prefix("issue-19j-jbd2")
                    .tempdir_in("/var/tmp")
                    .expect("tempdir")
            })
            .path()
            .to_path_buf()
    })
}

/// Held by each test: removes its scratch directory (images and copies) when it ends.
struct Scratch;

impl Drop for Scratch {
    fn drop(&mut self) {
        WORK.with(|w| drop(w.borrow_mut().take()));
    }
}

fn sh(script: &str) -> String {
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", script])
        .output()
        .expect("bash");
    assert!(
        out.status.success(),
        "{script}\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What both sides show of one path.
#[derive(Debug, Clone, PartialEq)]
struct Node {
    kind: FileKind,
    perm: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: (i64, i64),
    nlink: u64,
    ino: u64,
    content: Option<String>,
    target: Option<Vec<u8>>,
}

/// Every path; `None` where the reader fails on it (stat, or the listing of a directory,
/// recorded as `dir/*`): damage the journal cannot repair must fail on both sides alike.
type Tree = BTreeMap<String, Option<Node>>;

/// The visible journal of an ext3 made by `tune2fs -j` on a mounted filesystem: e2fsck moves
/// it to the hidden inode 8 (not part of replay: Linux's own recovery keeps it), so it is not
/// compared.
const VISIBLE_JOURNAL: &str = "/.journal";

fn walk_kernel(root: &Path) -> Tree {
    use std::os::unix::ffi::OsStrExt;
    let mut out = Tree::new();
    let mut stack = vec![String::new()];
    while let Some(rel) = stack.pop() {
        let Ok(list) = std::fs::read_dir(root.join(rel.trim_start_matches('/'))) else {
            out.insert(format!("{rel}/*"), None);
            continue;
        };
        for e in list {
            let Ok(e) = e else {
                out.insert(format!("{rel}/*"), None);
                break;
            };
            let path = format!("{rel}/{}", e.file_name().to_string_lossy());
            if path == VISIBLE_JOURNAL {
                continue;
            }
            let full = e.path();
            let Ok(m) = std::fs::symlink_metadata(&full) else {
                out.insert(path, None);
                continue;
            };
            let ft = m.file_type();
            let kind = if ft.is_dir() {
                stack.push(path.clone());
                FileKind::Dir
            } else if ft.is_symlink() {
                FileKind::Symlink
            } else if ft.is_file() {
                FileKind::File
            } else {
                FileKind::Fifo
            };
            let content = (kind == FileKind::File).then(|| match std::fs::read(&full) {
                Ok(b) => format!("{:x}", Sha256::digest(b)),
                Err(_) => "unreadable".into(),
            });
            let target = (kind == FileKind::Symlink).then(|| {
                std::fs::read_link(&full)
                    .map(|t| t.as_os_str().as_bytes().to_vec())
                    .unwrap_or_default()
            });
            out.insert(
                path,
                Some(Node {
                    kind,
                    perm: m.mode() & 0o7777,
                    uid: m.uid(),
                    gid: m.gid(),
                    size: m.size(),
                    mtime: (m.mtime(), m.mtime_nsec()),
                    nlink: m.nlink(),
                    ino: m.ino(),
                    content,
                    target,
                }),
            );
        }
    }
    out
}

fn walk_snapfs(fs: &dyn GuestFs) -> Tree {
    let mut out = Tree::new();
    let mut stack = vec![(String::new(), fs.root())];
    while let Some((rel, dir)) = stack.pop() {
        let Ok(list) = fs.readdir(dir) else {
            out.insert(format!("{rel}/*"), None);
            continue;
        };
        for (name, ino, _) in list.iter() {
            let path = format!("{rel}/{}", String::from_utf8_lossy(name));
            if path == VISIBLE_JOURNAL {
                continue;
            }
            let st = match fs.lookup(dir, name) {
                Ok(st) => st,
                Err(e) => {
                    eprintln!("snapfs: {path}: {e}");
                    out.insert(path, None);
                    continue;
                }
            };
            assert_eq!(st.ino, *ino, "{path}: lookup and readdir disagree");
            if st.kind == FileKind::Dir {
                stack.push((path.clone(), st.ino));
            }
            let content = (st.kind == FileKind::File).then(|| {
                let mut buf = vec![0u8; st.size.min(1 << 30) as usize];
                let mut off = 0usize;
                while off < buf.len() {
                    match fs.read(st.ino, off as u64, &mut buf[off..]) {
                        Ok(n) if n > 0 => off += n,
                        _ => return "unreadable".to_string(),
                    }
                }
                format!("{:x}", Sha256::digest(&buf))
            });
            let target =
                (st.kind == FileKind::Symlink).then(|| fs.readlink(st.ino).unwrap_or_default());
            let mtime = st
                .mtime
                .duration_since(std::time::UNIX_EPOCH)
                .expect("mtime after 1970");
            out.insert(
                path,
                Some(Node {
                    kind: st.kind,
                    perm: u32::from(st.perm),
                    uid: st.uid,
                    gid: st.gid,
                    size: st.size,
                    mtime: (mtime.as_secs() as i64, i64::from(mtime.subsec_nanos())),
                    nlink: u64::from(st.nlink),
                    ino: st.ino,
                    content,
                    target,
                }),
            );
        }
    }
    out
}

fn open_snapfs(img: &Path) -> Arc<dyn GuestFs> {
    let d: Arc<dyn BlockImage> = Arc::new(RawImage::open(img).expect("open image"));
    let whole = Partition::whole(d.size(), "test");
    match open_volume(d, &whole).expect("open_volume") {
        Volume::Fs(fs) => fs,
        _ => panic!("{}: not a filesystem", img.display()),
    }
}

/// The kernel's view of `img` as it is (`noload`: no journal replay).
fn kernel_view(img: &Path) -> Tree {
    let _g = MOUNTS.lock().unwrap_or_else(|e| e.into_inner());
    let mnt = img.with_extension("mnt");
    std::fs::create_dir_all(&mnt).expect("mountpoint");
    sh(&format!(
        "mount -o ro,loop,noload '{}' '{}'",
        img.display(),
        mnt.display()
    ));
    struct Umount(PathBuf);
    impl Drop for Umount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _u = Umount(mnt.clone());
    walk_kernel(&mnt)
}

/// A copy of `img` replayed by e2fsck, then read by the kernel; and what e2fsck printed.
fn reference(img: &Path, case: &str) -> (Tree, String) {
    let copy = work().join(format!("{case}.ref.img"));
    sh(&format!(
        "cp --sparse=always '{}' '{}'",
        img.display(),
        copy.display()
    ));
    let out = Command::new("e2fsck")
        .args(["-E", "journal_only", "-y"])
        .arg(&copy)
        .output()
        .expect("e2fsck");
    // 0: clean, 1: corrected; 4 and up would mean e2fsck itself failed.
    assert!(
        matches!(out.status.code(), Some(0..=3)),
        "{case}: e2fsck failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (kernel_view(&copy), said)
}

/// How a base image is made: mkfs options, mount options, and whether the journal is made
/// visible by `tune2fs -j` on the mounted filesystem.
struct Recipe {
    name: &'static str,
    mkfs: &'static str,
    mount: &'static str,
    visible_journal: bool,
    /// What `dumpe2fs -h` must say of the copy (the journal format the case is about).
    shows: &'static str,
    /// More to do (with `$mnt`) after the common transactions, before the copy.
    extra: &'static str,
}

const V3: Recipe = Recipe {
    name: "ext4-csum-v3",
    mkfs: "mkfs.ext4 -q -F -b 1024",
    mount: "",
    visible_journal: false,
    shows: "journal_checksum_v3",
    extra: "",
};
const EXT3: Recipe = Recipe {
    name: "ext3-no-csum",
    mkfs: "mkfs.ext4 -q -F -t ext3 -b 1024",
    mount: "",
    visible_journal: false,
    shows: "Journal features:         (none)",
    extra: "",
};
const V1: Recipe = Recipe {
    name: "ext4-csum-v1",
    mkfs: "mkfs.ext4 -q -F -b 1024 -O ^metadata_csum,^64bit",
    mount: "journal_checksum",
    visible_journal: false,
    shows: "Journal features:         journal_checksum\n",
    extra: "",
};
const ASYNC: Recipe = Recipe {
    name: "ext4-async-commit",
    mkfs: "mkfs.ext4 -q -F -b 4096",
    // The kernel refuses async commit in data=ordered mode.
    mount: "journal_async_commit,data=writeback",
    visible_journal: false,
    shows: "journal_async_commit",
    extra: "",
};
const VISIBLE: Recipe = Recipe {
    name: "ext3-journal-in-inode-12",
    mkfs: "mkfs.ext2 -q -F -b 1024",
    mount: "",
    visible_journal: true,
    shows: "Journal inode:            12",
    extra: "",
};

/// Fast commits (`mke2fs -O fast_commit`): after the full commits, files created, appended
/// to, truncated, hard-linked and removed, each fsynced (a fast commit each).
const FAST: Recipe = Recipe {
    name: "ext4-fast-commit",
    mkfs: "mkfs.ext4 -q -F -b 1024 -O fast_commit",
    mount: "",
    visible_journal: false,
    shows: "fast_commit",
    extra: r#"
        for i in 1 2 3; do head -c $((i * 3000)) /dev/urandom > "$mnt/a/fc$i"; sync "$mnt/a/fc$i"; done
        head -c 2000 /dev/urandom >> "$mnt/a/keep"; sync "$mnt/a/keep"
        truncate -s 1000 "$mnt/a/f4"; sync "$mnt/a/f4"
        ln "$mnt/a/f6" "$mnt/a/hard"; sync "$mnt/a/f6"
        rm "$mnt/a/f7"; sync "$mnt/a/f8"
        mkdir "$mnt/a/fcdir"; echo x > "$mnt/a/fcdir/x"; sync "$mnt/a/fcdir/x"
    "#,
};

/// A dirty image of `r`: a tree in place, then several transactions only in the journal:
/// new files and directories, appended data, a directory removed (revoke records for its
/// blocks, in a later transaction than the one that wrote them), renames and a symlink.
fn dirty(r: &Recipe) -> PathBuf {
    let img = work().join(format!("{}.img", r.name));
    if img.exists() {
        return img;
    }
    let _g = MOUNTS.lock().unwrap_or_else(|e| e.into_inner());
    let mnt = work().join(format!("{}.mnt", r.name));
    std::fs::create_dir_all(&mnt).expect("mountpoint");
    let tmp = work().join(format!("{}.building", r.name));
    let opts = if r.mount.is_empty() {
        "loop".to_string()
    } else {
        format!("loop,{}", r.mount)
    };
    let fstype = if r.visible_journal { "ext3" } else { "ext4" };
    sh(&format!(
        r#"
        img='{img}'; mnt='{mnt}'
        rm -f "$img"; truncate -s 48M "$img"
        {mkfs} "$img"
        if {visible}; then
          mount -t ext2 -o loop "$img" "$mnt"
          tune2fs -j "$(findmnt -n -o SOURCE "$mnt")" >/dev/null
          umount "$mnt"
        fi
        mount -t {fstype} -o {opts} "$img" "$mnt"
        trap 'umount "$mnt" 2>/dev/null || true' EXIT
        mkdir "$mnt/a" "$mnt/c"
        for i in $(seq 1 40); do head -c $((i * 997)) /dev/urandom > "$mnt/a/f$i"; done
        for i in $(seq 1 60); do echo "c$i" > "$mnt/c/entry-with-a-long-name-$i"; done
        echo base > "$mnt/a/keep"
        sync -f "$mnt"
        # Transaction: new files in a new directory.
        mkdir "$mnt/b"
        for i in $(seq 1 30); do head -c $((i * 301)) /dev/urandom > "$mnt/b/n$i"; done
        sync "$mnt"/b/* "$mnt/b"
        # Transaction: a directory (and its blocks) removed: revoke records.
        rm -rf "$mnt/c"
        sync "$mnt/a" "$mnt"
        # Transactions: appends, a rename, a symlink, a chmod, a new directory tree.
        for i in 1 5 9; do head -c 5000 /dev/urandom >> "$mnt/a/f$i"; sync "$mnt/a/f$i"; done
        mv "$mnt/a/f2" "$mnt/b/moved"; sync "$mnt/b" "$mnt/a"
        ln -s ../a/keep "$mnt/b/link"; chmod 0640 "$mnt/a/keep"; sync "$mnt/b" "$mnt/a/keep"
        mkdir -p "$mnt/d/e/f"; echo deep > "$mnt/d/e/f/g"; sync "$mnt/d/e/f/g" "$mnt/d/e/f" "$mnt/d/e" "$mnt/d" "$mnt"
        {extra}
        cp --sparse=always "$img" '{tmp}'
        "#,
        extra = r.extra,
        img = img.display(),
        mnt = mnt.display(),
        tmp = tmp.display(),
        mkfs = r.mkfs,
        visible = r.visible_journal,
    ));
    let dumped = sh(&format!("dumpe2fs -h '{}' 2>/dev/null", tmp.display()));
    assert!(
        dumped.contains("needs_recovery") && dumped.contains(r.shows),
        "{}: the copy needs no recovery or lacks {:?}:\n{dumped}",
        r.name,
        r.shows
    );
    std::fs::rename(&tmp, &img).expect("rename");
    img
}

/// Journal blocks by what logdump found: (journal block, block type, sequence).
fn log_blocks(img: &Path) -> Vec<(u64, u32, u32)> {
    let out = sh(&format!(
        "debugfs -R logdump '{}' 2>/dev/null",
        img.display()
    ));
    out.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("Found expected sequence ")?;
            let (seq, rest) = rest.split_once(", type ")?;
            let (ty, rest) = rest.split_once(' ')?;
            let block = rest.rsplit_once("at block ")?.1;
            Some((
                block.trim().parse().ok()?,
                ty.parse().ok()?,
                seq.parse().ok()?,
            ))
        })
        .collect()
}

/// The data blocks logged by the descriptor at journal block `desc`.
fn logged_by(img: &Path, desc: u64) -> Vec<u64> {
    let out = sh(&format!(
        "debugfs -R 'logdump -a' '{}' 2>/dev/null",
        img.display()
    ));
    let mut inside = false;
    let mut v = Vec::new();
    for l in out.lines() {
        if l.starts_with("Dumping descriptor block") {
            inside = l.ends_with(&format!("at block {desc}:"));
        } else if inside {
            if let Some(j) = l.trim().split("logged at journal block ").nth(1) {
                if let Some(n) = j.split_whitespace().next().and_then(|n| n.parse().ok()) {
                    v.push(n);
                }
            }
        }
    }
    v
}

/// The filesystem block holding the inode of `path` (per debugfs on `img`).
fn inode_block(img: &Path, path: &str) -> u64 {
    let out = sh(&format!(
        "debugfs -R 'imap {path}' '{}' 2>/dev/null",
        img.display()
    ));
    out.split("located at block ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("imap {path}: {out}"))
}

/// The journal block of the last logged copy of filesystem block `fs_block`.
fn last_copy_of(img: &Path, fs_block: u64) -> u64 {
    let out = sh(&format!(
        "debugfs -R 'logdump -a' '{}' 2>/dev/null",
        img.display()
    ));
    out.lines()
        .filter_map(|l| {
            let r = l.trim().strip_prefix("FS block ")?;
            let (fsb, j) = r.split_once(" logged at journal block ")?;
            (fsb.parse::<u64>().ok()? == fs_block)
                .then(|| j.split_whitespace().next()?.parse().ok())
                .flatten()
        })
        .next_back()
        .unwrap_or_else(|| panic!("block {fs_block} is not in the journal"))
}

fn block_size(img: &Path) -> u64 {
    let out = sh(&format!("dumpe2fs -h '{}' 2>/dev/null", img.display()));
    out.lines()
        .find_map(|l| l.strip_prefix("Block size:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("block size")
}

/// Byte offset in the image of byte `off` of journal block `jblock`.
fn journal_offset(img: &Path, jblock: u64, off: u64) -> u64 {
    let out = sh(&format!("dumpe2fs -h '{}' 2>/dev/null", img.display()));
    let ino: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("Journal inode:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("journal inode");
    let phys: u64 = sh(&format!(
        "debugfs -R 'bmap <{ino}> {jblock}' '{}' 2>/dev/null",
        img.display()
    ))
    .trim()
    .parse()
    .expect("bmap");
    phys * block_size(img) + off
}

/// A copy of `base` with the byte at `at` inverted.
fn damaged(base: &Path, case: &str, at: u64) -> PathBuf {
    let copy = work().join(format!("{case}.img"));
    sh(&format!(
        "cp --sparse=always '{}' '{}'",
        base.display(),
        copy.display()
    ));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&copy)
        .expect("open copy");
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).expect("read byte");
    b[0] ^= 0xFF;
    f.write_all_at(&b, at).expect("write byte");
    copy
}

fn diff(a: &Tree, b: &Tree) -> Vec<String> {
    let mut v = Vec::new();
    for (p, n) in a {
        match b.get(p) {
            None => v.push(format!("only snapfs has {p}")),
            Some(m) if m != n => v.push(format!("{p}: snapfs {n:?}\n   kernel {m:?}")),
            _ => {}
        }
    }
    for p in b.keys().filter(|p| !a.contains_key(*p)) {
        v.push(format!("only the kernel has {p}"));
    }
    v
}

/// How a case's reference relates to the undamaged image: all of the journal replayed, none
/// of it, or something in between.
#[derive(Debug, PartialEq)]
enum Expect {
    Full,
    None,
    Partial,
}

/// snapfs on the unreplayed `img` equals the kernel on e2fsck's replay of a copy; and the
/// reference is what the case expects of e2fsck (so the test fails if damage has no effect).
fn check(case: &str, img: &Path, full: &Tree, none: &Tree, expect: Expect, says: &[&str]) {
    let (want, e2fsck_said) = reference(img, case);
    let fs = open_snapfs(img);
    let ours = walk_snapfs(fs.as_ref());
    let d = diff(&ours, &want);
    assert!(
        d.is_empty(),
        "{case}: snapfs ({}) differs from e2fsck + the kernel ({} entries; e2fsck said {e2fsck_said}):\n{}",
        fs.describe(),
        want.len(),
        d.join("\n")
    );
    let got = if &want == full {
        Expect::Full
    } else if &want == none {
        Expect::None
    } else {
        Expect::Partial
    };
    assert_eq!(
        got, expect,
        "{case}: e2fsck's outcome; it said {e2fsck_said}"
    );
    let desc = fs.describe();
    for s in says {
        assert!(desc.contains(s), "{case}: describe() lacks {s:?}: {desc}");
    }
    eprintln!(
        "jbd2 case {case}: {} entries equal to e2fsck -E journal_only + the kernel ({got:?}); {desc}",
        want.len()
    );
}

/// The undamaged dirty image of a recipe: full replay, and the views to classify damage by.
fn base_case(r: &Recipe) -> (PathBuf, Tree, Tree) {
    // On a busy machine the kernel may write the metadata in place before the copy is made
    // (then the journal changes nothing and the case tests nothing): make it again, twice.
    let mut attempt = 0;
    let (img, full, none) = loop {
        let img = dirty(r);
        let none = kernel_view(&img);
        let (full, _) = reference(&img, &format!("{}-full", r.name));
        if full != none {
            break (img, full, none);
        }
        attempt += 1;
        assert!(attempt < 3, "{}: the journal changes nothing", r.name);
        eprintln!("{}: already in place when copied; making it again", r.name);
        std::fs::remove_file(&img).expect("remove");
    };
    check(
        r.name,
        &img,
        &full,
        &none,
        Expect::Full,
        &["journal replayed in memory"],
    );
    (img, full, none)
}

/// Clean dirty images of every journal format: replayed in full, like e2fsck.
#[test]
fn jbd2_replays_each_journal_format_like_e2fsck() {
    let _scratch = Scratch;
    for r in [&V3, &EXT3, &V1, &ASYNC, &VISIBLE] {
        base_case(r);
    }
}

/// The fast-commit area replayed after the full commits, as e2fsck does.
#[test]
fn jbd2_fast_commit_like_e2fsck() {
    let _scratch = Scratch;
    let (img, full, none) = base_case(&FAST);
    let fs = open_snapfs(&img);
    // The new directory's block is not in the journal (fast commits log no directory blocks),
    // so linking a file into it fails in e2fsck ("EXT2 directory corrupted"), which stops the
    // replay there: the same tag stops ours, and says so.
    assert!(
        fs.describe().contains("fast-commit tags") && fs.describe().contains("not applied"),
        "{}",
        fs.describe()
    );
    let sb = sh(&format!("dumpe2fs -h '{}' 2>/dev/null", img.display()));
    let blocks: u64 = sb
        .lines()
        .find_map(|l| l.strip_prefix("Total journal blocks:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("journal blocks");
    let fc_len: u64 = sb
        .lines()
        .find_map(|l| l.strip_prefix("Fast commit length:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("fast commit length");
    // Byte 20 of the first fast-commit block (j_fc_first = j_last + 1): inside the first tag
    // after the 12-byte head, so the first tail's crc32c no longer matches and e2fsck refuses
    // the whole replay.
    let at = journal_offset(&img, blocks - fc_len + 1, 20);
    check(
        "fast-commit-tag-damaged",
        &damaged(&img, "fast-commit-tag-damaged", at),
        &full,
        &none,
        Expect::None,
        &["journal not replayed"],
    );
}

/// Damage to checksummed journals (csum v3), one field per case.
#[test]
fn jbd2_checksum_v3_damage_like_e2fsck() {
    let _scratch = Scratch;
    let (img, full, none) = base_case(&V3);
    let blocks = log_blocks(&img);
    let commits: Vec<_> = blocks.iter().filter(|b| b.1 == 2).collect();
    let descs: Vec<_> = blocks.iter().filter(|b| b.1 == 1).collect();
    assert!(commits.len() >= 6, "{blocks:?}");
    let mid = commits.len() / 2;
    // The commit block's checksum (h_chksum[0] at byte 16): the log ends before it.
    let at = journal_offset(&img, commits[mid].0, 16);
    check(
        "v3-commit-checksum",
        &damaged(&img, "v3-commit-checksum", at),
        &full,
        &none,
        Expect::Partial,
        &["bad commit checksum"],
    );
    // A descriptor block's tail checksum: e2fsck and Linux refuse the whole replay.
    let bs = block_size(&img);
    let at = journal_offset(&img, descs[mid].0, bs - 2);
    check(
        "v3-descriptor-checksum",
        &damaged(&img, "v3-descriptor-checksum", at),
        &full,
        &none,
        Expect::None,
        &["journal not replayed"],
    );
    // One data block: the last journal copy of the inode-table block holding /d/e/f/g (made
    // in the last transaction): skipped, the rest replayed.
    let full_copy = work().join(format!("{}-full.ref.img", V3.name));
    let at = journal_offset(
        &img,
        last_copy_of(&img, inode_block(&full_copy, "/d/e/f/g")),
        100,
    );
    check(
        "v3-data-block-checksum",
        &damaged(&img, "v3-data-block-checksum", at),
        &full,
        &none,
        Expect::Partial,
        &["fails its checksum"],
    );
    // The journal superblock's checksum: no replay at all.
    let at = journal_offset(&img, 0, 0xFC);
    check(
        "v3-superblock-checksum",
        &damaged(&img, "v3-superblock-checksum", at),
        &full,
        &none,
        Expect::None,
        &["journal superblock checksum"],
    );
    // A revoke block's tail checksum.
    if let Some(rv) = blocks.iter().find(|b| b.1 == 5) {
        let at = journal_offset(&img, rv.0, bs - 2);
        check(
            "v3-revoke-checksum",
            &damaged(&img, "v3-revoke-checksum", at),
            &full,
            &none,
            Expect::None,
            &["journal not replayed"],
        );
    } else {
        panic!("no revoke block in the v3 image: {blocks:?}");
    }
}

/// Checksum v1 (crc32 of the transaction in its commit block) and async_commit.
#[test]
fn jbd2_checksum_v1_and_async_commit_damage_like_e2fsck() {
    let _scratch = Scratch;
    let (img, full, none) = base_case(&V1);
    let blocks = log_blocks(&img);
    let commits: Vec<_> = blocks.iter().filter(|b| b.1 == 2).collect();
    let descs: Vec<_> = blocks.iter().filter(|b| b.1 == 1).collect();
    let mid = commits.len() / 2;
    // A data block of a middle transaction: its commit's crc32 fails, the log ends there.
    let data = logged_by(&img, descs[mid].0);
    let at = journal_offset(&img, data[0], 100);
    check(
        "v1-data-block-crc32",
        &damaged(&img, "v1-data-block-crc32", at),
        &full,
        &none,
        Expect::Partial,
        &["bad commit checksum"],
    );
    let (img, full, none) = base_case(&ASYNC);
    let blocks = log_blocks(&img);
    let commits: Vec<_> = blocks.iter().filter(|b| b.1 == 2).collect();
    let mid = commits.len() / 2;
    let at = journal_offset(&img, commits[mid].0, 16);
    check(
        "async-commit-checksum",
        &damaged(&img, "async-commit-checksum", at),
        &full,
        &none,
        Expect::Partial,
        &["bad commit checksum"],
    );
}

/// Images made elsewhere (e.g. e2fsprogs' own `tests/j_*` images, kept outside this repo):
/// every `*.img` in `$SNAPFS_JBD2_CORPUS` that needs recovery is read by snapfs unreplayed and
/// compared with the kernel's view of a copy replayed by e2fsck. Run with
/// `SNAPFS_JBD2_CORPUS=DIR cargo test --test jbd2 -- --ignored`.
#[test]
#[ignore = "needs SNAPFS_JBD2_CORPUS, a directory of dirty ext3/ext4 images"]
fn jbd2_outside_images_like_e2fsck() {
    let _scratch = Scratch;
    let dir = std::env::var_os("SNAPFS_JBD2_CORPUS").expect("SNAPFS_JBD2_CORPUS");
    let mut imgs: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("corpus")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "img"))
        .collect();
    imgs.sort();
    assert!(!imgs.is_empty(), "no *.img in the corpus");
    let mut failed = Vec::new();
    for img in &imgs {
        let case = img
            .file_stem()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        let (want, said) = reference(img, &case);
        let fs = open_snapfs(img);
        let d = diff(&walk_snapfs(fs.as_ref()), &want);
        eprintln!(
            "outside image {case}: {} entries, {} differences; snapfs: {}",
            want.len(),
            d.len(),
            fs.describe()
        );
        if !d.is_empty() {
            failed.push(format!("{case} (e2fsck said {said}):\n{}", d.join("\n")));
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n\n"));
}

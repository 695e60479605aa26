//! File-level restore through the real mount: a snapshot's `files/` must reproduce the
//! guest filesystem's tree as it was built (scripts/make-test-images.sh, ext4 partition 1).

mod common;

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

fn build_corpus() -> (tempfile::TempDir, PathBuf) {
    let t = tempfile::Builder::new()
        .prefix("snapfs-restore")
        .tempdir()
        .expect("tempdir");
    let out = t.path().join("corpus");
    run(Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/make-test-images.sh"))
        .arg(&out));
    (t, out)
}

/// Relative path → metadata, for every entry below `root`.
fn tree(root: &Path) -> HashMap<PathBuf, fs::Metadata> {
    let mut out = HashMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let e = e.expect("entry");
            let md = fs::symlink_metadata(e.path()).expect("lstat");
            if md.is_dir() {
                stack.push(e.path());
            }
            out.insert(e.path().strip_prefix(root).unwrap().to_path_buf(), md);
        }
    }
    out
}

#[test]
fn ext4_partition_matches_its_source_tree() {
    let (_t, dir) = build_corpus();
    let src = dir.with_file_name("corpus-ext4-src");
    let m = Mount::new(&dir);
    for vol in ["disk-gpt-ext4.qcow2"] {
        let snaps = m.vol(vol).join(".snapshots");
        fs::create_dir(snaps.join("restore")).expect("snapshot");
        let files = snaps.join("restore/files");
        assert_eq!(fs::metadata(&files).unwrap().mode() & 0o7777, 0o700);
        let parts = ls(&files);
        assert_eq!(parts, ["p1", "p2"], "{vol}");
        let readme = fs::read_to_string(files.join("p2/README")).expect("README for p2");
        assert!(!readme.is_empty());

        let guest = files.join("p1");
        let want = tree(&src);
        let got = tree(&guest);
        let mut checked = 0;
        let mut inodes: HashMap<u64, u64> = HashMap::new();
        for (rel, s) in &want {
            let g = got
                .get(rel)
                .unwrap_or_else(|| panic!("{vol}: {} missing in files/p1", rel.display()));
            let what = format!("{vol}: {}", rel.display());
            assert_eq!(
                g.file_type().is_dir(),
                s.file_type().is_dir(),
                "{what}: type"
            );
            assert_eq!(
                g.file_type().is_symlink(),
                s.file_type().is_symlink(),
                "{what}: type"
            );
            assert_eq!(
                g.file_type().is_fifo(),
                s.file_type().is_fifo(),
                "{what}: type"
            );
            assert_eq!(g.mode() & 0o7777, s.mode() & 0o7777, "{what}: mode");
            assert_eq!((g.uid(), g.gid()), (s.uid(), s.gid()), "{what}: owner");
            if !s.is_dir() {
                assert_eq!(g.mtime(), s.mtime(), "{what}: mtime");
                assert_eq!(g.nlink(), s.nlink(), "{what}: link count");
                assert_eq!(g.len(), s.len(), "{what}: size");
            }
            if s.file_type().is_symlink() {
                assert_eq!(
                    fs::read_link(guest.join(rel)).unwrap(),
                    fs::read_link(src.join(rel)).unwrap(),
                    "{what}: symlink target"
                );
            }
            if s.is_file() {
                assert!(
                    first_difference(&guest.join(rel), &src.join(rel)).is_none(),
                    "{what}: content"
                );
                // Hard links: one guest inode, one st_ino.
                if let Some(prev) = inodes.insert(s.ino(), g.ino()) {
                    assert_eq!(prev, g.ino(), "{what}: hard link has another inode");
                }
            }
            checked += 1;
        }
        // lost+found is the only thing mkfs adds.
        let extra: Vec<_> = got
            .keys()
            .filter(|k| !want.contains_key(*k) && !k.starts_with("lost+found"))
            .collect();
        assert!(extra.is_empty(), "{vol}: extra entries {extra:?}");
        println!("{vol}: {checked} entries checked byte- and metadata-exact");

        // cp -a of the whole tree reproduces it (symlinks, hard links, owners, modes).
        let copy = m.dir.path().join("copy");
        run(Command::new("cp").arg("-a").arg(&guest).arg(&copy));
        let copied = tree(&copy);
        for (rel, s) in &want {
            let c = &copied[rel];
            assert_eq!(c.mode(), s.mode(), "cp -a {}: mode", rel.display());
            assert_eq!(
                (c.uid(), c.gid()),
                (s.uid(), s.gid()),
                "cp -a {}",
                rel.display()
            );
        }
        // Writes are refused.
        assert_eq!(errno(fs::File::create(guest.join("new"))), libc::EROFS);
        assert_eq!(errno(fs::remove_file(guest.join("hello.txt"))), libc::EROFS);
    }
}

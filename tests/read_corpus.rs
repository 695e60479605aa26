//! Every snapshot of every image of the test corpus, read through the real mount, must be
//! byte-identical to `qemu-img convert` and have QEMU's allocation map (scripts/check-image.sh).

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::*;

const CHECK_SNAPSHOT: &str = "snapfs-check";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The corpus, built once per test binary by scripts/make-test-images.sh.
fn corpus() -> &'static (tempfile::TempDir, PathBuf) {
    static CORPUS: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    CORPUS.get_or_init(|| {
        let t = tempfile::Builder::new()
            .prefix("snapfs-corpus")
            .tempdir()
            .expect("tempdir");
        let out = t.path().join("corpus");
        run(Command::new("bash")
            .arg(repo().join("scripts/make-test-images.sh"))
            .arg(&out));
        (t, out)
    })
}

fn json(p: &Path) -> serde_json::Value {
    serde_json::from_slice(&fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn every_snapshot_matches_qemu() {
    let (_t, dir) = corpus();
    let m = Mount::new(dir);
    let mut checked = 0;
    let mut failures = Vec::new();
    let mut no_snapshots = Vec::new();
    for vol in ls(&m.vol("")) {
        let info = json(&m.vol(&vol).join("volume.json"));
        assert!(info.get("error").is_none(), "{vol}: {info}");
        let img = dir.join(&vol);
        if info["format"] != "qcow2" {
            assert_eq!(
                errno(fs::create_dir(
                    m.vol(&vol).join(".snapshots").join(CHECK_SNAPSHOT)
                )),
                libc::ENOTSUP,
                "{vol}: raw volumes have no snapshots"
            );
            no_snapshots.push(vol);
            continue;
        }
        // A snapshot of the current state, taken through snapfs, so every image has one.
        match fs::create_dir(m.vol(&vol).join(".snapshots").join(CHECK_SNAPSHOT)) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => no_snapshots.push(vol.clone()),
            Err(e) => panic!("{vol}: mkdir snapshot: {e}\n{}", m.log()),
        }
        for entry in ls(&m.vol(&vol).join(".snapshots")) {
            let sdir = m.vol(&vol).join(".snapshots").join(&entry);
            let name = json(&sdir.join("snapshot.json"))["name"]
                .as_str()
                .expect("name")
                .to_string();
            let out = Command::new("bash")
                .arg(repo().join("scripts/check-image.sh"))
                .arg("-q")
                .arg(&img)
                .arg(sdir.join("disk.raw"))
                .arg(&name)
                .output()
                .expect("check-image.sh");
            checked += 1;
            if !out.status.success() {
                failures.push(format!(
                    "{vol} @ {name}: {}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
        }
    }
    println!(
        "byte-exact and map-exact: {checked} snapshots checked; without snapshots: {no_snapshots:?}"
    );
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(checked >= 40, "only {checked} snapshots checked");
}

#[test]
fn awkward_snapshot_names_are_escaped() {
    let (_t, dir) = corpus();
    let m = Mount::new(dir);
    let names = ls(&m.vol("snapnames.qcow2").join(".snapshots"));
    for want in ["has%2Fslash", "ünïcødé", ".leading-dot"] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }
    let s = json(
        &m.snap("snapnames.qcow2", "has%2Fslash")
            .join("snapshot.json"),
    );
    assert_eq!(s["name"], "has/slash");
}

#[test]
fn refused_images_give_clear_errors_and_the_daemon_survives() {
    let (_t, dir) = corpus();
    let refused = dir.with_file_name("corpus-refused");
    let m = Mount::new(&refused);
    for vol in ls(&m.vol("")) {
        let info = json(&m.vol(&vol).join("volume.json"));
        let snaps = fs::read_dir(m.vol(&vol).join(".snapshots"));
        // Either the header is refused outright, or its snapshots cannot be made or read.
        if let Some(err) = info.get("error") {
            println!("{vol}: {err}");
            continue;
        }
        let r = fs::create_dir(m.vol(&vol).join(".snapshots/x"));
        if r.is_ok() {
            let mut buf = [0u8; 512];
            let read = fs::File::open(m.snap(&vol, "x").join("disk.raw"))
                .and_then(|mut f| std::io::Read::read(&mut f, &mut buf));
            assert!(read.is_err(), "{vol}: an image we must refuse was read");
        }
        drop(snaps);
    }
    assert_eq!(
        ls(&m.mnt),
        ["instances", "launch", "volumes"],
        "daemon alive"
    );
}

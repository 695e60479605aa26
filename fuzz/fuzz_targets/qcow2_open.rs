//! Feed arbitrary bytes to the qcow2 reader as an image file: open, read and map must return
//! values (errors included), never panic or hang.
#![no_main]

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;

#[path = "exercise.rs"]
mod exercise;
use snapfs::image::{self, BlockCache, Format};

fn image_path() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    // One file per fuzzing process, rewritten for each input.
    P.get_or_init(|| std::env::temp_dir().join(format!("snapfs-fuzz-{}.qcow2", std::process::id())))
}

fuzz_target!(|data: &[u8]| {
    let path = image_path();
    if std::fs::write(path, data).is_err() {
        return;
    }
    let cache = Arc::new(BlockCache::new(4 << 20));
    let mut snapshots = vec![None];
    if let Ok(info) = image::qcow2::inspect(path) {
        snapshots.extend(info.snapshots.iter().take(2).map(|s| Some(s.name.clone())));
    }
    for snap in snapshots {
        if let Ok(img) = image::open(path, Some(Format::Qcow2), snap.as_deref(), &cache) {
            exercise::exercise(img.as_ref());
        }
    }
});

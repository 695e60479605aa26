//! Feed arbitrary bytes to the Parallels reader as an image file: open, read and map must
//! return values (errors included), never panic or hang; and to the ploop descriptor parser.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use snapfs::image::{parallels::ParallelsImage, ploop::Descriptor};

#[path = "exercise.rs"]
mod exercise;

fn image_path() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| std::env::temp_dir().join(format!("snapfs-fuzz-{}.hds", std::process::id())))
}

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(d) = Descriptor::parse(text, "fuzz") {
            let _ = d.chain(&d.top);
            for s in d.snapshots() {
                let _ = d.chain(&s.guid);
            }
        }
    }
    let path = image_path();
    if std::fs::write(path, data).is_err() {
        return;
    }
    if let Ok(img) = ParallelsImage::open(path, None) {
        exercise::exercise(&img);
    }
});

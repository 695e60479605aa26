//! Feed arbitrary bytes to the partition-table reader as a disk, then probe every partition it
//! finds (and open what the probe recognises). A panic or a hang is a bug.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use snapfs::image::BlockImage;
use snapfs::restore::{self, Volume};

fuzz_target!(|data: &[u8]| {
    let disk: Arc<dyn BlockImage> = Arc::new(restore::MemDisk(data.to_vec()));
    let Ok(parts) = restore::partitions(disk.as_ref()) else {
        return;
    };
    for p in parts.iter().take(16) {
        if let Ok(Volume::Fs(fs)) = restore::open_volume(disk.clone(), p) {
            restore::exercise(fs.as_ref(), 200);
        }
    }
});

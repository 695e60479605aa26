//! Feed arbitrary bytes to the ext4 reader as a partition: open, then walk every operation
//! (bounded) through `GuestFs`. Errors are fine; a panic or a hang is a bug.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use snapfs::image::BlockImage;
use snapfs::restore::{self, Dev};

fuzz_target!(|data: &[u8]| {
    let disk: Arc<dyn BlockImage> = Arc::new(restore::MemDisk(data.to_vec()));
    let Ok(dev) = Dev::new(disk, 0, data.len() as u64, "fuzz") else {
        return;
    };
    if let Ok(fs) = restore::ext4::Ext4Fs::open(dev) {
        restore::exercise(&fs, 2000);
    }
});

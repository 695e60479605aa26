//! Feed arbitrary bytes to the NTFS reader as a partition: open, then walk every operation
//! (bounded) through `GuestFs`. Errors are fine; a panic in our code or a hang is a bug.
//!
//! The `ntfs` crate panics on some corrupt input; `NtfsFs` catches those (`catch_unwind`) and
//! reports `Error::Corrupt`. libfuzzer-sys installs a panic hook that aborts even for caught
//! panics, so this target puts the default hook back: a panic that escapes to the harness still
//! aborts (the harness checks), one caught by `NtfsFs` does not.
#![no_main]

use std::sync::{Arc, Once};

use libfuzzer_sys::fuzz_target;
use snapfs::image::BlockImage;
use snapfs::restore::{self, Dev};

fuzz_target!(|data: &[u8]| {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let _ = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
    });
    let disk: Arc<dyn BlockImage> = Arc::new(restore::MemDisk(data.to_vec()));
    let Ok(dev) = Dev::new(disk, 0, data.len() as u64, "fuzz") else {
        return;
    };
    if let Ok(fs) = restore::ntfs::NtfsFs::open(dev) {
        restore::exercise(&fs, 2000);
    }
});

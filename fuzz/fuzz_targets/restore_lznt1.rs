//! Feed arbitrary bytes to the LZNT1 decompressor: the first byte picks the output size (0 to 16
//! chunks of 4 KiB), the rest is the compressed stream. Errors are fine; a panic or a hang is a
//! bug. The output must be fully written either way on success.
#![no_main]

use libfuzzer_sys::fuzz_target;
use snapfs::restore::lznt1;

fuzz_target!(|data: &[u8]| {
    let Some((&n, input)) = data.split_first() else {
        return;
    };
    let mut out = vec![0xa5u8; usize::from(n % 17) * lznt1::CHUNK];
    if lznt1::decompress(input, &mut out).is_ok() && !input.contains(&0xa5) {
        assert!(!out.contains(&0xa5), "output not fully written");
    }
});

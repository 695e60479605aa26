//! Feed arbitrary bytes to the jbd2 replay as a journal (first byte: block size 1, 2 or 4 KiB;
//! the rest: journal blocks from the superblock on), then to the fast-commit scan. Descriptor
//! tags, revoke records, commit blocks and fast-commit tags are all parsed from fuzzed bytes.
//! Errors and refusals are fine; a panic or a hang is a bug.
#![no_main]

use libfuzzer_sys::fuzz_target;
use snapfs::error::{Error, Result};
use snapfs::restore::ext4::journal::{self, JournalBlocks};

struct Mem<'a> {
    data: &'a [u8],
    bs: usize,
}

impl JournalBlocks for Mem<'_> {
    fn block_size(&self) -> usize {
        self.bs
    }
    fn physical(&self, n: u64) -> Result<u64> {
        let end = (n as usize).checked_add(1).and_then(|x| x.checked_mul(self.bs));
        match end {
            Some(e) if e <= self.data.len() => Ok(n + 100),
            _ => Err(Error::Invalid(format!("block {n} past the end"))),
        }
    }
    fn read(&self, n: u64) -> Result<Vec<u8>> {
        self.physical(n)?;
        let s = n as usize * self.bs;
        Ok(self.data[s..s + self.bs].to_vec())
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let bs = 1024usize << (first % 3);
    let j = Mem { data: rest, bs };
    // The journal inode's length: any, so that seeds cut from a longer journal still replay
    // (reads past the bytes fail, as reads of an unmapped journal block do).
    if let Ok(journal::Outcome::Replay(r)) = journal::replay(&j, u64::from(u32::MAX)) {
        assert!(r.map.len() <= rest.len());
    }
    let blocks = rest.len() / bs + 1;
    let _ = journal::scan_fast_commit(
        &mut |i| {
            let i = usize::try_from(i).ok()?;
            (i < blocks).then(|| rest.get(i * bs..(i + 1) * bs).map(|s| s.to_vec()))?
        },
        u32::from(first),
    );
});

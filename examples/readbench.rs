//! Read a whole image sequentially with a given block size and print MB/s.
//!
//! `cargo run --release --example readbench -- IMAGE [BLOCK_SIZE] [CACHE_MIB] [PASSES]`
//! e.g. `readbench disk.qcow2 4k`. The first pass warms the page cache; the best pass is printed.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use snapfs::image::{self, BlockCache};

fn parse_size(s: &str) -> Option<usize> {
    let (num, mul) = match s.chars().last()? {
        'k' | 'K' => (&s[..s.len() - 1], 1 << 10),
        'm' | 'M' => (&s[..s.len() - 1], 1 << 20),
        _ => (s, 1),
    };
    num.parse::<usize>().ok().map(|n| n * mul)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let Some(path) = args.get(1).map(PathBuf::from) else {
        anyhow::bail!("usage: readbench IMAGE [BLOCK_SIZE] [CACHE_MIB] [PASSES]");
    };
    let bs = args.get(2).and_then(|s| parse_size(s)).unwrap_or(1 << 20);
    let cache_mib = args
        .get(3)
        .and_then(|s| s.parse::<usize>().ok())
        .unwrap_or(64);
    let passes = args
        .get(4)
        .and_then(|s| s.parse::<usize>().ok())
        .unwrap_or(3);
    let cache = Arc::new(BlockCache::new(cache_mib << 20));
    let img = image::open(&path, None, None, &cache)?;
    let size = img.size();
    let mut buf = vec![0u8; bs];
    let mut best = 0f64;
    for pass in 0..passes {
        let t = Instant::now();
        let mut off = 0u64;
        let mut sum = 0u64;
        while off < size {
            let n = (size - off).min(bs as u64) as usize;
            img.read_at(&mut buf[..n], off)?;
            sum = sum.wrapping_add(u64::from(buf[0]));
            off += n as u64;
        }
        let secs = t.elapsed().as_secs_f64();
        let mbs = size as f64 / secs / 1e6;
        println!(
            "pass {pass}: {:.0} MB/s ({:.3} s, checksum {sum})",
            mbs, secs
        );
        best = best.max(mbs);
    }
    println!(
        "{}: {} bytes, block {bs}, best {best:.0} MB/s [{}]",
        path.display(),
        size,
        img.describe()
    );
    Ok(())
}

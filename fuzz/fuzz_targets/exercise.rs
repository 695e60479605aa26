//! What every image fuzz target does with an image that opened: reads and maps at a few
//! places (start, unaligned, middle, end), a whole-disk map and the description. Each must
//! return a value, never panic or hang.

use snapfs::image::BlockImage;

pub fn exercise(img: &dyn BlockImage) {
    let size = img.size();
    let mut buf = vec![0u8; 256 << 10];
    for off in [0, 512, 65_536 + 100, size / 2, size.saturating_sub(4096)] {
        if off >= size {
            continue;
        }
        let n = (size - off).min(buf.len() as u64) as usize;
        let _ = img.read_at(&mut buf[..n], off);
        let _ = img.map(off, 1 << 24);
    }
    let _ = img.map(0, size);
    let _ = img.describe();
}

//! Read-ahead into the host page cache for image readers that map guest ranges to host ranges
//! (qcow2, Parallels). One sequential reader (`cp`, `dd`, a FUSE request at a time) keeps one
//! `pread` in flight, and a cold image file then reads at the device's single-request rate:
//! `qemu-img convert` keeps 8 requests in flight. So a sequential reader asks the kernel to
//! start reading the host ranges of the next [`WINDOW`] of the disk (`POSIX_FADV_WILLNEED`
//! queues the reads and returns), and the next requests find their bytes in the page cache.
//! Advice only: errors are left to the reads. See docs/image-readers.md ("Read-ahead").

/// How far ahead of a sequential read the host ranges are asked for.
pub const WINDOW: u64 = 16 << 20;
/// Most mapping lookups one step makes (small clusters: the tables stay cheap to walk).
pub const MAX_LOOKUPS: u64 = 1024;

/// Sequential-read detection (guest offsets) for one open image.
#[derive(Debug, Default)]
pub struct ReadAhead {
    /// Where the last read ended.
    last_end: u64,
    /// Read-ahead was asked for up to here.
    advised_to: u64,
}

impl ReadAhead {
    /// A read of `[offset, end)` of a disk of `size` bytes: the guest range to read ahead
    /// now, if any. A read near where the last one ended (within the window: the kernel's
    /// read-ahead requests reach several FUSE threads, slightly out of order) is sequential;
    /// ahead of it the window is topped up once a quarter of it was used, so the advice
    /// goes out in batches. Any other read stops the read-ahead until reads are sequential
    /// again.
    pub fn next(&mut self, offset: u64, end: u64, size: u64, window: u64) -> Option<(u64, u64)> {
        let sequential = offset.abs_diff(self.last_end) <= window;
        self.last_end = end;
        if !sequential {
            self.advised_to = end;
            return None;
        }
        let from = self.advised_to.max(end);
        let to = end.saturating_add(window).min(size);
        if from >= to || (to - from < window / 4 && to < size) {
            return None;
        }
        self.advised_to = to;
        Some((from, to))
    }
}

/// Host ranges `(offset, length)` in guest order (None: a piece with no host bytes in this
/// file: a hole, zeros, a backing layer's), merged where one continues the previous one on
/// the host, so contiguous clusters go out as one advice.
pub fn merge_ranges(pieces: impl IntoIterator<Item = Option<(u64, u64)>>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (off, len) in pieces.into_iter().flatten() {
        match out.last_mut() {
            _ if len == 0 => {}
            Some((s, l)) if *s + *l == off => *l += len,
            _ => out.push((off, len)),
        }
    }
    out
}

/// `posix_fadvise(POSIX_FADV_WILLNEED)` of each range of `file`, clipped to `file_len`.
pub fn will_need(file: &std::fs::File, file_len: u64, ranges: &[(u64, u64)]) {
    use std::os::fd::AsRawFd;
    for &(offset, len) in ranges {
        let len = offset
            .saturating_add(len)
            .min(file_len)
            .saturating_sub(offset);
        if len == 0 {
            continue;
        }
        let (Ok(off), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            continue;
        };
        // SAFETY: a valid open descriptor; fadvise reads no memory of ours.
        let rc =
            unsafe { libc::posix_fadvise(file.as_raw_fd(), off, len, libc::POSIX_FADV_WILLNEED) };
        if rc != 0 {
            tracing::trace!(rc, offset, len, "posix_fadvise WILLNEED refused");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_ahead_follows_sequential_reads_only() {
        const W: u64 = 16 << 20;
        const M: u64 = 1 << 20;
        let size = 1 << 30;
        let mut a = ReadAhead::default();
        // The first read from 0 is sequential: the window ahead of it.
        assert_eq!(a.next(0, M, size, W), Some((M, M + W)));
        // The next reads are inside what was asked: nothing until a quarter was used.
        for i in 1..4 {
            assert_eq!(a.next(i * M, (i + 1) * M, size, W), None, "read {i}");
        }
        assert_eq!(a.next(4 * M, 5 * M, size, W), Some((M + W, 5 * M + W)));
        // Slightly out of order (another FUSE thread's request) still counts.
        assert_eq!(a.next(3 * M, 4 * M, size, W), None);
        // A jump far away stops it; reads going on from there start it again.
        assert_eq!(a.next(500 * M, 501 * M, size, W), None);
        assert_eq!(
            a.next(501 * M, 502 * M, size, W),
            Some((502 * M, 502 * M + W))
        );
        // Never past the end of the disk.
        assert_eq!(
            a.next(size - 2 * M, size - M, size, W),
            None,
            "a jump to the tail"
        );
        assert_eq!(a.next(size - M, size, size, W), None, "nothing left ahead");
    }

    #[test]
    fn a_random_reader_advises_nothing() {
        const W: u64 = 16 << 20;
        let size = 64u64 << 30;
        let mut a = ReadAhead::default();
        // Seeded jumps, each farther than the window from where the last read ended.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut last_end = 0u64;
        let mut asked = 0;
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let off = (x % (size - (1 << 20))) & !4095;
            if off.abs_diff(last_end) <= W {
                continue;
            }
            asked += 1;
            assert_eq!(a.next(off, off + 65536, size, W), None, "read at {off}");
            last_end = off + 65536;
        }
        assert!(asked > 9000, "{asked} random reads");
    }

    #[test]
    fn ranges_merge_only_when_contiguous() {
        const C: u64 = 65536;
        let pieces = [
            Some((10 * C, C)),
            Some((11 * C, C)), // continues
            Some((12 * C, 0)), // empty: ignored
            None,              // a guest hole: the host bytes still continue
            Some((12 * C, C)),
            Some((40 * C, C)), // host jump
            Some((39 * C, C)), // backwards: not merged
        ];
        assert_eq!(
            merge_ranges(pieces),
            vec![(10 * C, 3 * C), (40 * C, C), (39 * C, C)]
        );
        assert!(merge_ranges([None, None]).is_empty());
    }
}

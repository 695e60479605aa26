//! Read-ahead into the host page cache for image readers that map guest ranges to host ranges
//! (qcow2, Parallels). One sequential reader (`cp`, `dd`, a FUSE request at a time) keeps one
//! `pread` in flight, and a cold image file then reads at the device's single-request rate:
//! `qemu-img convert` keeps 8 requests in flight. So a sequential reader asks the kernel to
//! start reading the host ranges of the next [`WINDOW`] of the disk (`POSIX_FADV_WILLNEED`
//! queues the reads and returns), and the next requests find their bytes in the page cache.
//! Advice only: errors are left to the reads. See docs/image-readers.md ("Read-ahead").

/// How far ahead of a sequential read the host ranges are asked for.
pub const WINDOW: u64 = 16 << 20;
/// Most mapping lookups one step makes in one layer (a lookup covers at most one allocated
/// cluster, so small clusters shrink the window: see [`window_for`]).
pub const MAX_LOOKUPS: u64 = 1024;
/// Sequential readers of one image followed at once (two `cp` of one disk, a copy beside a
/// `files/` walk); a read that continues none of them replaces the one idle longest.
pub const STREAMS: usize = 4;

/// The window for an image of `cluster_size` bytes clusters: [`WINDOW`], or less where
/// [`MAX_LOOKUPS`] clusters do not reach that far (the window is then fully looked up, so
/// what is marked as advised was advised).
pub fn window_for(cluster_size: u64) -> u64 {
    WINDOW.min(cluster_size.max(1).saturating_mul(MAX_LOOKUPS))
}

/// `(offset, length)` byte ranges, sorted.
pub type Ranges = Vec<(u64, u64)>;

/// One sequential reader (guest offsets).
#[derive(Debug, Clone, Copy)]
struct Stream {
    /// Where its last read ended.
    last_end: u64,
    /// Read-ahead was asked for up to here.
    advised_to: u64,
    /// When it last read (a count of reads of the image), to replace the idlest.
    used: u64,
}

/// Sequential-read detection (guest offsets) for one open image: up to [`STREAMS`] readers.
#[derive(Debug, Default)]
pub struct ReadAhead {
    streams: [Option<Stream>; STREAMS],
    reads: u64,
}

impl ReadAhead {
    /// A read of `[offset, end)` of a disk of `size` bytes, by a caller that reads nothing at
    /// or past `limit` next: the guest range to read ahead now, if any. A read near where one
    /// of the followed readers' last read ended (within the window: the kernel's read-ahead
    /// requests reach several FUSE threads, slightly out of order) continues that reader;
    /// ahead of it the window is topped up once a quarter of it was used, so the advice goes
    /// out in batches. A read that continues no reader starts a new one and advises nothing
    /// (a random reader never gets advice), and the window never passes `size` nor `limit`.
    pub fn next(
        &mut self,
        offset: u64,
        end: u64,
        size: u64,
        limit: u64,
        window: u64,
    ) -> Option<(u64, u64)> {
        self.reads += 1;
        let reads = self.reads;
        let near = self
            .streams
            .iter_mut()
            .flatten()
            .filter(|s| offset.abs_diff(s.last_end) <= window)
            .min_by_key(|s| offset.abs_diff(s.last_end));
        let Some(s) = near else {
            let fresh = Stream {
                last_end: end,
                advised_to: end,
                used: reads,
            };
            let slot = self
                .streams
                .iter_mut()
                .min_by_key(|s| s.map_or(0, |s| s.used));
            if let Some(slot) = slot {
                *slot = Some(fresh);
            }
            return None;
        };
        s.last_end = end;
        s.used = reads;
        let stop = size.min(limit);
        let from = s.advised_to.max(end);
        let to = end.saturating_add(window).min(stop);
        if from >= to || (to - from < window / 4 && to < stop) {
            return None;
        }
        s.advised_to = to;
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

/// `ranges` clipped to a file of `file_len` bytes: a damaged map's clusters past the end of the
/// file, and empty ranges, ask for nothing.
pub fn clip(ranges: &[(u64, u64)], file_len: u64) -> Ranges {
    ranges
        .iter()
        .filter_map(|&(offset, len)| {
            let len = offset
                .saturating_add(len)
                .min(file_len)
                .saturating_sub(offset);
            (len > 0).then_some((offset, len))
        })
        .collect()
}

/// `posix_fadvise(POSIX_FADV_WILLNEED)` of each range of `file`, clipped to `file_len`.
pub fn will_need(file: &std::fs::File, file_len: u64, ranges: &[(u64, u64)]) {
    use std::os::fd::AsRawFd;
    for (offset, len) in clip(ranges, file_len) {
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

    const W: u64 = 16 << 20;
    const M: u64 = 1 << 20;

    #[test]
    fn read_ahead_follows_sequential_reads_only() {
        let size = 1 << 30;
        let mut a = ReadAhead::default();
        // A first read is no reader yet; the read that continues it gets the window ahead.
        assert_eq!(a.next(0, M, size, size, W), None);
        assert_eq!(a.next(M, 2 * M, size, size, W), Some((2 * M, 2 * M + W)));
        // The next reads are inside what was asked: nothing until a quarter was used.
        for i in 2..5 {
            assert_eq!(a.next(i * M, (i + 1) * M, size, size, W), None, "read {i}");
        }
        assert_eq!(
            a.next(5 * M, 6 * M, size, size, W),
            Some((2 * M + W, 6 * M + W))
        );
        // Slightly out of order (another FUSE thread's request) still counts.
        assert_eq!(a.next(3 * M, 4 * M, size, size, W), None);
        // A jump far away advises nothing; reads going on from there do.
        assert_eq!(a.next(500 * M, 501 * M, size, size, W), None);
        assert_eq!(
            a.next(501 * M, 502 * M, size, size, W),
            Some((502 * M, 502 * M + W))
        );
        // Never past the end of the disk.
        assert_eq!(a.next(size - 3 * M, size - 2 * M, size, size, W), None);
        assert_eq!(
            a.next(size - 2 * M, size - M, size, size, W),
            Some((size - M, size)),
            "the tail only"
        );
        assert_eq!(a.next(size - M, size, size, size, W), None, "nothing left");
    }

    #[test]
    fn read_ahead_stops_at_the_limit() {
        let size = 1 << 30;
        let mut a = ReadAhead::default();
        assert_eq!(a.next(0, M, size, 3 * M, W), None);
        // A `since/` file's extent ends at 3 MiB: the hole after it is not fetched.
        assert_eq!(a.next(M, 2 * M, size, 3 * M, W), Some((2 * M, 3 * M)));
        assert_eq!(a.next(2 * M, 3 * M, size, 3 * M, W), None);
    }

    #[test]
    fn several_sequential_readers_each_get_their_window() {
        let size = 1 << 30;
        let mut a = ReadAhead::default();
        // Two copies of one disk, their reads interleaved, far apart.
        let (x, y) = (0, 512 * M);
        assert_eq!(a.next(x, x + M, size, size, W), None);
        assert_eq!(a.next(y, y + M, size, size, W), None);
        assert_eq!(
            a.next(x + M, x + 2 * M, size, size, W),
            Some((x + 2 * M, x + 2 * M + W))
        );
        assert_eq!(
            a.next(y + M, y + 2 * M, size, size, W),
            Some((y + 2 * M, y + 2 * M + W))
        );
        // A random reader beside them (fewer than STREAMS readers in all) stops neither.
        assert_eq!(a.next(900 * M, 901 * M, size, size, W), None);
        assert_eq!(
            a.next(x + 5 * M, x + 6 * M, size, size, W),
            Some((x + 2 * M + W, x + 6 * M + W))
        );
        assert_eq!(
            a.next(y + 5 * M, y + 6 * M, size, size, W),
            Some((y + 2 * M + W, y + 6 * M + W))
        );
    }

    #[test]
    fn a_random_reader_advises_nothing() {
        let size = 64u64 << 30;
        let mut a = ReadAhead::default();
        // Seeded jumps, each farther than the window from where the last STREAMS reads ended.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut ends = std::collections::VecDeque::new();
        let mut asked = 0;
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let off = (x % (size - M)) & !4095;
            if ends.iter().any(|e: &u64| off.abs_diff(*e) <= W) {
                continue;
            }
            asked += 1;
            assert_eq!(
                a.next(off, off + 65536, size, size, W),
                None,
                "read at {off}"
            );
            ends.push_back(off + 65536);
            if ends.len() > STREAMS {
                ends.pop_front();
            }
        }
        assert!(asked > 9000, "{asked} random reads");
    }

    #[test]
    fn small_clusters_shrink_the_window() {
        assert_eq!(window_for(65536), W);
        assert_eq!(window_for(2 << 20), W);
        assert_eq!(window_for(512), 512 * MAX_LOOKUPS);
        assert_eq!(window_for(0), MAX_LOOKUPS);
    }

    #[test]
    fn nothing_is_advised_past_the_end_of_the_file() {
        const C: u64 = 65536;
        let len = 10 * C + 100;
        let ranges = [
            (0, C),
            (9 * C, 2 * C),       // crosses the end: cut there
            (10 * C + 100, C),    // starts at the end: nothing
            (u64::MAX - 10, 100), // a damaged map's offset: nothing, no overflow
            (3 * C, 0),           // empty
        ];
        assert_eq!(clip(&ranges, len), vec![(0, C), (9 * C, C + 100)]);
        assert!(clip(&ranges, 0).is_empty());
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

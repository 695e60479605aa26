//! What holds the daemon's memory: each cache and table reports its entries and bytes, and
//! `kill -USR1 <daemon>` writes them to the log as one line, next to the process's own
//! figures (VmRSS, VmHWM, the allocator's arenas). See docs/restore.md, "The daemon's memory,
//! holder by holder".

use std::fmt::Write as _;

/// One holder of memory: a cache or a table.
#[derive(Clone, Debug)]
pub struct Held {
    pub name: &'static str,
    pub entries: usize,
    /// Bytes charged against its budget, or estimated from its lengths where it has none.
    pub bytes: usize,
}

impl Held {
    pub fn new(name: &'static str, entries: usize, bytes: usize) -> Held {
        Held {
            name,
            entries,
            bytes,
        }
    }
}

/// The process's own figures, in bytes.
#[derive(Clone, Debug, Default)]
pub struct Process {
    pub rss: u64,
    pub hwm: u64,
    /// Bytes the allocator handed out and did not get back (`mallinfo2().uordblks` +
    /// `hblkhd`: small allocations and mmapped ones).
    pub malloc_used: u64,
    /// Bytes the allocator holds free in its arenas (`fordblks`).
    pub malloc_free: u64,
    /// Arenas (`malloc_info`'s `<heap>` elements): one per thread that allocated at once,
    /// up to `M_ARENA_MAX`.
    pub arenas: usize,
}

fn status_kib(status: &str, field: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|r| r.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
}

/// This process's figures now.
pub fn process() -> Process {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let mut p = Process {
        rss: status_kib(&status, "VmRSS:") * 1024,
        hwm: status_kib(&status, "VmHWM:") * 1024,
        ..Process::default()
    };
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 only reads the allocator's counters.
        let mi = unsafe { libc::mallinfo2() };
        p.malloc_used = (mi.uordblks + mi.hblkhd) as u64;
        p.malloc_free = mi.fordblks as u64;
        p.arenas = malloc_arenas();
    }
    p
}

/// The number of arenas, from `malloc_info`'s XML (one `<heap nr=` per arena).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn malloc_arenas() -> usize {
    let mut buf: *mut libc::c_char = std::ptr::null_mut();
    let mut len: libc::size_t = 0;
    // SAFETY: open_memstream gets valid out-pointers; the stream is closed before the buffer
    // is read, and the buffer (malloc'd by libc) is freed once copied.
    unsafe {
        let f = libc::open_memstream(&mut buf, &mut len);
        if f.is_null() {
            return 0;
        }
        libc::malloc_info(0, f);
        libc::fclose(f);
        if buf.is_null() {
            return 0;
        }
        let xml = std::slice::from_raw_parts(buf as *const u8, len);
        let n = xml.windows(9).filter(|w| w == b"<heap nr=").count();
        libc::free(buf as *mut libc::c_void);
        n
    }
}

/// One line: the process's figures, then each holder (`name=entries/KiB`), then their sum.
pub fn line(p: &Process, held: &[Held]) -> String {
    let kib = |b: u64| b / 1024;
    let mut s = format!(
        "rss_kib={} hwm_kib={} malloc_used_kib={} malloc_free_kib={} arenas={}",
        kib(p.rss),
        kib(p.hwm),
        kib(p.malloc_used),
        kib(p.malloc_free),
        p.arenas
    );
    let mut sum = 0u64;
    for h in held {
        sum += h.bytes as u64;
        let _ = write!(s, " {}={}/{}", h.name, h.entries, kib(h.bytes as u64));
    }
    let _ = write!(s, " held_kib={}", kib(sum));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memreport_reads_this_process() {
        let p = process();
        assert!(p.rss > 0 && p.hwm >= p.rss, "{p:?}");
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        assert!(p.arenas >= 1 && p.malloc_used > 0, "{p:?}");
        let l = line(&p, &[Held::new("a", 3, 4096), Held::new("b", 1, 2048)]);
        assert!(l.contains(" a=3/4 b=1/2 held_kib=6"), "{l}");
    }
}

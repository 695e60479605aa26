//! Changed extents between two images of one disk: what `<snap>/since/<older>/` shows.
//!
//! Where the backend's metadata relates the two images the extents come from it alone
//! (O(metadata)): RBD snapshots of one image (`rbd_diff_iterate2` from the older snapshot),
//! qcow2 internal snapshots of one file (their L1/L2 tables compared), and qcow2 external
//! chains (the allocation of the overlays between the two points). Anything else (raw files,
//! full copies in the store, unrelated files) is compared byte for byte, O(disk); see
//! docs/incremental.md.
//!
//! Never miss a change: every byte that differs lies in a reported extent. Unchanged bytes may
//! be reported at the source's granularity, and more when the list would pass
//! [`MAX_CHANGES`] (neighbours are then merged, so memory stays bounded).

use std::sync::Arc;

use super::qcow2::Qcow2Image;
use super::raw::RawImage;
use super::rbd::RbdImage;
use super::{BlockImage, Extent, ExtentKind};
use crate::error::Result;

/// Most extents kept for one pair; past it neighbours are merged (an over-report, never a miss).
pub const MAX_CHANGES: usize = 1 << 20;
/// Granularity of the byte-for-byte comparison.
pub const COMPARE_BLOCK: u64 = 64 << 10;
/// Bytes read per comparison step (per image).
const COMPARE_CHUNK: u64 = 4 << 20;

/// What a reader can tell about where it comes from, so two images of one disk can be related.
pub enum DiffSource<'a> {
    /// No relation known: compare content.
    None,
    Raw(&'a RawImage),
    Qcow2(&'a Qcow2Image),
    Rbd(&'a RbdImage),
}

/// One changed stretch: `zero` when the newer image reads as zeros there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Change {
    pub offset: u64,
    pub length: u64,
    pub zero: bool,
}

/// The changes from an older image to a newer one.
#[derive(Debug)]
pub struct Changes {
    /// Sorted, merged (adjacent extents differ in `zero`), within the newer image's size.
    pub extents: Vec<Change>,
    /// Where they came from: "rbd diff", "qcow2 tables", "qcow2 chain", "content", "absent".
    pub method: &'static str,
    /// Unchanged bytes may be reported up to this granularity.
    pub granularity: u64,
}

impl Changes {
    /// Bytes inside reported extents.
    pub fn bytes(&self) -> u64 {
        self.extents.iter().map(|c| c.length).sum()
    }

    /// The `.extents.json` text: `[{"offset":N,"length":N,"zero":bool}, …]`, one per line.
    pub fn json(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.extents.len() * 48 + 4);
        out.extend_from_slice(b"[");
        for (i, c) in self.extents.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(b"\n  ");
            out.extend_from_slice(
                format!(
                    "{{\"offset\":{},\"length\":{},\"zero\":{}}}",
                    c.offset, c.length, c.zero
                )
                .as_bytes(),
            );
        }
        out.extend_from_slice(if self.extents.is_empty() {
            b"]\n"
        } else {
            b"\n]\n"
        });
        out
    }
}

/// Sorted changed ranges as they are found; merges neighbours and keeps its length bounded.
pub struct Collector {
    ranges: Vec<(u64, u64)>,
    /// Ranges closer than this are merged (grows when the list passes its bound).
    gap: u64,
    limit: usize,
}

impl Default for Collector {
    fn default() -> Self {
        Collector::with_limit(MAX_CHANGES)
    }
}

impl Collector {
    pub fn with_limit(limit: usize) -> Self {
        Collector {
            ranges: Vec::new(),
            gap: 0,
            limit: limit.max(2),
        }
    }

    /// Add `[offset, offset + length)`; offsets should come in ascending order (any order is
    /// still correct, only less compact until [`finish`](Self::finish) sorts).
    pub fn push(&mut self, offset: u64, length: u64) {
        if length == 0 {
            return;
        }
        let end = offset.saturating_add(length);
        if let Some(last) = self.ranges.last_mut() {
            if offset >= last.0 && offset <= last.1.saturating_add(self.gap) {
                last.1 = last.1.max(end);
                return;
            }
        }
        self.ranges.push((offset, end));
        if self.ranges.len() > self.limit.saturating_mul(2) {
            self.coarsen();
        }
    }

    /// Merge ranges whose gap is below a growing threshold until at most `limit` remain.
    fn coarsen(&mut self) {
        self.ranges.sort_unstable();
        loop {
            self.merge();
            if self.ranges.len() <= self.limit {
                break;
            }
            self.gap = (self.gap.max(COMPARE_BLOCK / 2)).saturating_mul(2);
        }
        tracing::debug!(
            gap = self.gap,
            ranges = self.ranges.len(),
            "changed extents coarsened"
        );
    }

    fn merge(&mut self) {
        let mut out: Vec<(u64, u64)> = Vec::with_capacity(self.ranges.len());
        for &(s, e) in &self.ranges {
            match out.last_mut() {
                Some(last) if s <= last.1.saturating_add(self.gap) => last.1 = last.1.max(e),
                _ => out.push((s, e)),
            }
        }
        self.ranges = out;
    }

    /// Sorted, merged `(start, end)` ranges.
    pub fn finish(mut self) -> Vec<(u64, u64)> {
        self.coarsen();
        self.ranges
    }
}

/// The changes from `older` (None: the disk did not exist then) to `newer`.
pub fn changed_extents(newer: &dyn BlockImage, older: Option<&dyn BlockImage>) -> Result<Changes> {
    let size = newer.size();
    let mut col = Collector::default();
    let (method, granularity) = match older {
        None => {
            col.push(0, size);
            ("absent", 1)
        }
        Some(older) => {
            let common = size.min(older.size());
            let found = match metadata_changes(newer, older, common, &mut col)? {
                Some(m) => m,
                None => {
                    compare_content(newer, older, common, &mut col)?;
                    ("content", COMPARE_BLOCK)
                }
            };
            // A disk that grew: its new tail is data.
            if size > common {
                col.push(common, size - common);
            }
            found
        }
    };
    let ranges = col.finish();
    let mut extents = with_zero_flags(newer, &ranges)?;
    if method == "qcow2 chain" {
        // The overlays allocate zero clusters over areas that already read as zeros (a
        // zero-write or discard there): both points read zeros, so nothing changed.
        if let Some(kept) = drop_zeros_over_zeros(older, &extents)? {
            extents = kept;
        }
    }
    Ok(Changes {
        extents,
        method,
        granularity,
    })
}

/// Changes from the backends' metadata, within `[0, common)`; None: no relation known.
fn metadata_changes(
    newer: &dyn BlockImage,
    older: &dyn BlockImage,
    common: u64,
    col: &mut Collector,
) -> Result<Option<(&'static str, u64)>> {
    match (newer.diff_source(), older.diff_source()) {
        (DiffSource::Rbd(n), DiffSource::Rbd(o)) => {
            if n.changes_since(o, common, col)? {
                return Ok(Some(("rbd diff", 512)));
            }
            Ok(None)
        }
        (DiffSource::Qcow2(n), o) => {
            if let DiffSource::Qcow2(o) = o {
                if n.file_id() == o.file_id() {
                    n.table_changes(o, common, col)?;
                    return Ok(Some(("qcow2 tables", n.cluster_size())));
                }
            }
            let older_id = match o {
                DiffSource::Qcow2(o) if o.is_active_layer() => o.file_id(),
                DiffSource::Raw(r) => r.file_id(),
                _ => return Ok(None),
            };
            // Walk the chain down to the older image's file; the layers above hold the changes.
            let mut layers = vec![n];
            let mut granularity = n.cluster_size();
            loop {
                let Some(below) = layers.last().and_then(|l| l.backing()) else {
                    return Ok(None);
                };
                match below.diff_source() {
                    DiffSource::Qcow2(q) if q.file_id() == older_id => break,
                    DiffSource::Raw(r) if r.file_id() == older_id => break,
                    DiffSource::Qcow2(q) => {
                        granularity = granularity.max(q.cluster_size());
                        layers.push(q);
                    }
                    _ => return Ok(None),
                }
                if layers.len() > super::qcow2::MAX_CHAIN_DEPTH {
                    return Ok(None);
                }
            }
            // Each layer's allocation is sorted; the union is merged by the collector.
            for l in layers {
                l.own_allocation(common, col)?;
            }
            Ok(Some(("qcow2 chain", granularity)))
        }
        _ => Ok(None),
    }
}

/// Compare `[0, common)` byte for byte in [`COMPARE_BLOCK`] units, skipping what both images
/// map as zeros; spread over the available cores.
fn compare_content(
    newer: &dyn BlockImage,
    older: &dyn BlockImage,
    common: u64,
    col: &mut Collector,
) -> Result<()> {
    let started = std::time::Instant::now();
    // Regions where both read as zeros by their maps need no reading.
    let skip_n = zero_ranges(newer, common)?;
    let skip_o = zero_ranges(older, common)?;
    let chunks = common.div_ceil(COMPARE_CHUNK);
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 4) as u64;
    let results: Vec<Result<Vec<(u64, u64)>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                let (skip_n, skip_o) = (&skip_n, &skip_o);
                s.spawn(move || -> Result<Vec<(u64, u64)>> {
                    let mut out = Collector::with_limit(MAX_CHANGES / workers as usize);
                    let mut a = vec![0u8; COMPARE_CHUNK as usize];
                    let mut b = vec![0u8; COMPARE_CHUNK as usize];
                    let mut c = w;
                    while c < chunks {
                        let start = c * COMPARE_CHUNK;
                        let len = COMPARE_CHUNK.min(common - start);
                        c += workers;
                        if covered(skip_n, start, start + len)
                            && covered(skip_o, start, start + len)
                        {
                            continue;
                        }
                        let (a, b) = (&mut a[..len as usize], &mut b[..len as usize]);
                        newer.read_at(a, start)?;
                        older.read_at(b, start)?;
                        for (i, (x, y)) in a
                            .chunks(COMPARE_BLOCK as usize)
                            .zip(b.chunks(COMPARE_BLOCK as usize))
                            .enumerate()
                        {
                            if x != y {
                                out.push(start + i as u64 * COMPARE_BLOCK, x.len() as u64);
                            }
                        }
                    }
                    Ok(out.finish())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(crate::error::Error::Invalid(
                        "content comparison worker panicked".into(),
                    ))
                })
            })
            .collect()
    });
    for r in results {
        for (s, e) in r? {
            col.push(s, e - s);
        }
    }
    tracing::info!(
        bytes = common,
        ms = started.elapsed().as_millis() as u64,
        "changed extents by content comparison"
    );
    Ok(())
}

/// `[start, end)` ranges that `img` maps as zeros within `[0, limit)`.
fn zero_ranges(img: &dyn BlockImage, limit: u64) -> Result<Vec<(u64, u64)>> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut pos = 0;
    while pos < limit {
        let ext = img.map(pos, limit - pos)?;
        let Some(last) = ext.last() else { break };
        let next = last.offset + last.length;
        for e in ext {
            if e.kind == ExtentKind::Zero {
                match out.last_mut() {
                    Some(l) if l.1 == e.offset => l.1 = e.offset + e.length,
                    _ => out.push((e.offset, e.offset + e.length)),
                }
            }
        }
        if next <= pos {
            break;
        }
        pos = next;
        // A map this fragmented is not worth keeping: compare the rest.
        if out.len() > MAX_CHANGES {
            break;
        }
    }
    Ok(out)
}

/// Whether sorted disjoint `ranges` cover `[start, end)` whole.
fn covered(ranges: &[(u64, u64)], start: u64, end: u64) -> bool {
    let i = ranges.partition_point(|r| r.1 <= start);
    ranges.get(i).is_some_and(|r| r.0 <= start && r.1 >= end)
}

/// `[offset, end)` appended to `out`, merged into the last change when it continues it with
/// the same zero flag; empty ranges are left out.
fn push_change(out: &mut Vec<Change>, offset: u64, end: u64, zero: bool) {
    if end <= offset {
        return;
    }
    if let Some(l) = out.last_mut() {
        if l.zero == zero && l.offset + l.length == offset {
            l.length = end - l.offset;
            return;
        }
    }
    out.push(Change {
        offset,
        length: end - offset,
        zero,
    });
}

/// Split changed ranges where `newer` maps zeros from where it maps data.
fn with_zero_flags(newer: &dyn BlockImage, ranges: &[(u64, u64)]) -> Result<Vec<Change>> {
    let size = newer.size();
    let mut out: Vec<Change> = Vec::with_capacity(ranges.len());
    for &(s, e) in ranges {
        let e = e.min(size);
        let mut pos = s;
        while pos < e {
            let ext = newer.map(pos, e - pos)?;
            let Some(last) = ext.last() else { break };
            let next = last.offset + last.length;
            for x in ext {
                push_change(
                    &mut out,
                    x.offset.max(pos),
                    (x.offset + x.length).min(e),
                    x.kind == ExtentKind::Zero,
                );
            }
            if next <= pos {
                // A map that does not advance: the rest counts as data.
                push_change(&mut out, pos, e, false);
                break;
            }
            pos = next;
        }
        // A long list of alternating pieces: join them as data (never claims zeros wrongly).
        if out.len() > MAX_CHANGES * 2 {
            out = join_as_data(out);
        }
    }
    if out.len() > MAX_CHANGES {
        out = join_as_data(out);
    }
    Ok(out)
}

/// `extents` without the parts of its `zero: true` extents where `older` too reads as zeros by
/// its own map (unallocated or zero all the way down its chain): there both images read zeros,
/// so those bytes did not change. Data extents are kept whole, so no change is ever dropped on
/// the strength of content that was not read. None: keep `extents` as they are (no older
/// image, or the result would pass [`MAX_CHANGES`]).
fn drop_zeros_over_zeros(
    older: Option<&dyn BlockImage>,
    extents: &[Change],
) -> Result<Option<Vec<Change>>> {
    let Some(older) = older else {
        return Ok(None);
    };
    let osize = older.size();
    let mut out: Vec<Change> = Vec::with_capacity(extents.len());
    for c in extents {
        let end = c.offset + c.length;
        if !c.zero || c.offset >= osize {
            push_change(&mut out, c.offset, end, c.zero);
            continue;
        }
        // Inside the older image's size: keep what it maps as data (it may hold non-zeros).
        let inside = end.min(osize);
        let mut pos = c.offset;
        while pos < inside {
            let ext = older.map(pos, inside - pos)?;
            let Some(last) = ext.last() else { break };
            let next = last.offset + last.length;
            for x in ext {
                if x.kind != ExtentKind::Zero {
                    push_change(
                        &mut out,
                        x.offset.max(pos),
                        (x.offset + x.length).min(inside),
                        true,
                    );
                }
            }
            if next <= pos {
                break;
            }
            pos = next;
        }
        // A map that stopped short: the rest stays reported.
        push_change(&mut out, pos.min(inside), inside, true);
        // A disk that grew: the new tail stays reported.
        push_change(&mut out, inside, end, true);
        if out.len() > MAX_CHANGES {
            return Ok(None);
        }
    }
    Ok(Some(out))
}

/// Merge touching extents regardless of `zero` (the joint piece is data).
fn join_as_data(v: Vec<Change>) -> Vec<Change> {
    let mut out: Vec<Change> = Vec::with_capacity(v.len() / 2 + 1);
    for c in v {
        match out.last_mut() {
            Some(l) if l.offset + l.length == c.offset => {
                l.length += c.length;
                l.zero &= c.zero;
            }
            _ => out.push(c),
        }
    }
    out
}

/// `<snap>/since/<older>/<target>.raw`: the newer image's bytes where it changed, holes
/// (zeros) elsewhere.
pub struct SinceImage {
    newer: Arc<dyn BlockImage>,
    changes: Arc<Changes>,
}

impl SinceImage {
    pub fn new(newer: Arc<dyn BlockImage>, changes: Arc<Changes>) -> Self {
        SinceImage { newer, changes }
    }

    pub fn changes(&self) -> &Arc<Changes> {
        &self.changes
    }

    /// Index of the first change ending after `offset`.
    fn first_after(&self, offset: u64) -> usize {
        self.changes
            .extents
            .partition_point(|c| c.offset + c.length <= offset)
    }
}

impl BlockImage for SinceImage {
    fn size(&self) -> u64 {
        self.newer.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        buf.fill(0);
        let end = offset + buf.len() as u64;
        for c in &self.changes.extents[self.first_after(offset)..] {
            if c.offset >= end {
                break;
            }
            if c.zero {
                continue;
            }
            let s = c.offset.max(offset);
            let e = (c.offset + c.length).min(end);
            let Some(dst) = buf.get_mut((s - offset) as usize..(e - offset) as usize) else {
                break;
            };
            // Read-ahead of the newer disk stops at the extent's end: a hole follows.
            self.newer.read_within(dst, s, c.offset + c.length)?;
        }
        Ok(())
    }

    fn map(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        let end = offset.saturating_add(length).min(self.size());
        let mut out = Vec::new();
        let mut pos = offset;
        for c in &self.changes.extents[self.first_after(offset)..] {
            if pos >= end || out.len() >= 4096 {
                break;
            }
            let s = c.offset.max(pos).min(end);
            let e = (c.offset + c.length).min(end);
            super::raw::push_extent(&mut out, pos, s, ExtentKind::Zero);
            super::raw::push_extent(&mut out, s, e, ExtentKind::Data);
            pos = e.max(pos);
        }
        if out.len() < 4096 {
            super::raw::push_extent(&mut out, pos, end, ExtentKind::Zero);
        }
        Ok(out)
    }

    /// Inside one changed data extent the newer image's own shared buffers (RBD read-ahead)
    /// serve the read as they would for the snapshot's disk.raw.
    fn read_shared(&self, offset: u64, len: usize) -> Result<Option<super::SharedBytes>> {
        let end = offset.saturating_add(len as u64);
        match self.changes.extents.get(self.first_after(offset)) {
            Some(c) if !c.zero && c.offset <= offset && end <= c.offset + c.length => self
                .newer
                .read_shared_within(offset, len, c.offset + c.length),
            _ => Ok(None),
        }
    }

    fn direct_io(&self) -> bool {
        self.newer.direct_io()
    }

    fn describe(&self) -> String {
        format!(
            "changes ({}, {} extents) of {}",
            self.changes.method,
            self.changes.extents.len(),
            self.newer.describe()
        )
    }
}

/// `<snap>/since/<older>/<target>.rbddiff`: an `rbd export-diff` (format v1) stream from
/// `<older>` to `<snap>`, made on the fly from the changes: header `rbd diff v1\n`, `f`/`t`
/// snapshot names, `s` size, a `w` (data) or `z` (zeros) record per extent, `e`. Its size is
/// known from the extents alone.
pub struct RbdDiffStream {
    newer: Arc<dyn BlockImage>,
    changes: Arc<Changes>,
    head: Vec<u8>,
    /// Stream offset of each extent's record.
    starts: Vec<u64>,
    size: u64,
}

const RECORD_HEAD: u64 = 17;

impl RbdDiffStream {
    /// `from`: the older snapshot's name (None: the disk is new, a full diff); `to`: the newer's.
    pub fn new(
        newer: Arc<dyn BlockImage>,
        changes: Arc<Changes>,
        from: Option<&str>,
        to: &str,
    ) -> Self {
        let mut head = b"rbd diff v1\n".to_vec();
        for (tag, name) in [(b'f', from), (b't', Some(to))] {
            if let Some(n) = name {
                head.push(tag);
                head.extend_from_slice(&(n.len() as u32).to_le_bytes());
                head.extend_from_slice(n.as_bytes());
            }
        }
        head.push(b's');
        head.extend_from_slice(&newer.size().to_le_bytes());
        let mut pos = head.len() as u64;
        let mut starts = Vec::with_capacity(changes.extents.len());
        for c in &changes.extents {
            starts.push(pos);
            pos += RECORD_HEAD + if c.zero { 0 } else { c.length };
        }
        RbdDiffStream {
            newer,
            changes,
            head,
            starts,
            size: pos + 1,
        }
    }
}

impl BlockImage for RbdDiffStream {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        buf.fill(0);
        let end = offset + buf.len() as u64;
        // Copy `src` (placed at stream offset `at`) where it overlaps the request.
        let place = |buf: &mut [u8], at: u64, src: &[u8]| {
            let s = at.max(offset);
            let e = (at + src.len() as u64).min(end);
            if s < e {
                buf[(s - offset) as usize..(e - offset) as usize]
                    .copy_from_slice(&src[(s - at) as usize..(e - at) as usize]);
            }
        };
        place(buf, 0, &self.head);
        let first = self
            .starts
            .partition_point(|&st| st <= offset)
            .saturating_sub(1);
        for (i, c) in self.changes.extents.iter().enumerate().skip(first) {
            let Some(&at) = self.starts.get(i) else { break };
            if at >= end {
                break;
            }
            let mut rec = [0u8; RECORD_HEAD as usize];
            rec[0] = if c.zero { b'z' } else { b'w' };
            rec[1..9].copy_from_slice(&c.offset.to_le_bytes());
            rec[9..17].copy_from_slice(&c.length.to_le_bytes());
            place(buf, at, &rec);
            if !c.zero {
                let ds = at + RECORD_HEAD;
                let s = ds.max(offset);
                let e = (ds + c.length).min(end);
                if s < e {
                    let dst = &mut buf[(s - offset) as usize..(e - offset) as usize];
                    self.newer.read_at(dst, c.offset + (s - ds))?;
                }
            }
        }
        place(buf, self.size - 1, b"e");
        Ok(())
    }

    fn map(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        let end = offset.saturating_add(length).min(self.size);
        let mut out = Vec::new();
        super::raw::push_extent(&mut out, offset, end, ExtentKind::Data);
        Ok(out)
    }

    fn describe(&self) -> String {
        format!("rbd diff v1 stream of {}", self.newer.describe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An in-memory disk with an explicit zero map, for the generic paths.
    struct Mem(Vec<u8>);

    impl BlockImage for Mem {
        fn size(&self) -> u64 {
            self.0.len() as u64
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            let o = offset as usize;
            buf.copy_from_slice(&self.0[o..o + buf.len()]);
            Ok(())
        }
        fn map(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
            // 4 KiB blocks of zeros are holes.
            let end = (offset + length).min(self.size());
            let mut out = Vec::new();
            let mut pos = offset;
            while pos < end {
                let b = pos / 4096 * 4096;
                let e = (b + 4096).min(end);
                let zero = self.0[b as usize..(b + 4096).min(self.size()) as usize]
                    .iter()
                    .all(|&x| x == 0);
                let kind = if zero {
                    ExtentKind::Zero
                } else {
                    ExtentKind::Data
                };
                super::super::raw::push_extent(&mut out, pos, e, kind);
                pos = e;
            }
            Ok(out)
        }
        fn describe(&self) -> String {
            "mem".into()
        }
    }

    /// A tiny seeded generator, so failures repeat.
    fn rng(seed: &mut u64) -> u64 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed
    }

    #[test]
    fn collector_merges_and_stays_bounded() {
        let mut c = Collector::with_limit(4);
        for i in 0..100u64 {
            c.push(i * 10_000_000, 1);
        }
        let r = c.finish();
        assert!(r.len() <= 4, "{r:?}");
        // Everything pushed is still covered.
        for i in 0..100u64 {
            let o = i * 10_000_000;
            assert!(r.iter().any(|&(s, e)| s <= o && o < e), "{o} lost");
        }
    }

    #[test]
    fn content_comparison_applied_to_older_gives_newer() {
        let mut seed = 0x5eed_1234_u64;
        for round in 0..20u64 {
            let size = (1 + rng(&mut seed) % 12) * COMPARE_CHUNK / 2 + rng(&mut seed) % 5000;
            let mut old = vec![0u8; size as usize];
            for _ in 0..8 {
                let o = (rng(&mut seed) % size) as usize;
                let l = (rng(&mut seed) % 300_000) as usize;
                let e = (o + l).min(old.len());
                old[o..e].fill((rng(&mut seed) | 1) as u8);
            }
            let mut new = old.clone();
            let grow = if round.is_multiple_of(3) { 100_000 } else { 0 };
            new.resize(new.len() + grow, 7);
            for _ in 0..6 {
                let o = (rng(&mut seed) % size) as usize;
                let l = (rng(&mut seed) % 200_000) as usize;
                let e = (o + l).min(new.len());
                let v = if rng(&mut seed).is_multiple_of(2) {
                    0
                } else {
                    rng(&mut seed) as u8
                };
                new[o..e].fill(v);
            }
            let (n, o) = (Mem(new.clone()), Mem(old.clone()));
            let ch = changed_extents(&n, Some(&o)).expect("changes");
            assert_eq!(ch.method, "content");
            let since = SinceImage::new(Arc::new(Mem(new.clone())), Arc::new(ch));
            let mut applied = old.clone();
            applied.resize(new.len(), 0);
            for c in &since.changes.extents {
                let mut buf = vec![0u8; c.length as usize];
                since.read_at(&mut buf, c.offset).expect("read");
                if c.zero {
                    assert!(buf.iter().all(|&b| b == 0), "zero extent with data");
                }
                applied[c.offset as usize..(c.offset + c.length) as usize].copy_from_slice(&buf);
            }
            assert!(
                applied == new,
                "round {round}: applying changes does not give newer"
            );
            // Over-report bounded by the block: every reported block holds a real difference.
            for c in &since.changes.extents {
                let mut b = c.offset / COMPARE_BLOCK * COMPARE_BLOCK;
                while b < c.offset + c.length {
                    let e = (b + COMPARE_BLOCK).min(new.len() as u64);
                    let differs = (b..e).any(|i| {
                        old.get(i as usize).copied().unwrap_or(0xaa) != new[i as usize]
                            || i >= old.len() as u64
                    });
                    assert!(differs, "round {round}: block {b} reported but unchanged");
                    b = e;
                }
            }
        }
    }

    #[test]
    fn since_map_covers_without_gaps_and_reads_holes_as_zeros() {
        let new = vec![9u8; 1 << 20];
        let ch = Changes {
            extents: vec![
                Change {
                    offset: 4096,
                    length: 4096,
                    zero: false,
                },
                Change {
                    offset: 65536,
                    length: 8192,
                    zero: true,
                },
            ],
            method: "test",
            granularity: 1,
        };
        let s = SinceImage::new(Arc::new(Mem(new)), Arc::new(ch));
        let m = s.map(0, 1 << 20).expect("map");
        assert_eq!(m.first().map(|e| e.offset), Some(0));
        let mut pos = 0;
        for e in &m {
            assert_eq!(e.offset, pos);
            pos += e.length;
        }
        assert_eq!(pos, 1 << 20);
        assert_eq!(
            super::super::allocated_bytes(&s).expect("alloc"),
            4096 + 8192
        );
        let mut buf = vec![1u8; 12288];
        s.read_at(&mut buf, 0).expect("read");
        assert!(buf[..4096].iter().all(|&b| b == 0));
        assert!(buf[4096..8192].iter().all(|&b| b == 9));
        assert!(buf[8192..].iter().all(|&b| b == 0));
        assert!(s.changes().json().starts_with(b"[\n  {\"offset\":4096,"));
    }

    #[test]
    fn rbddiff_stream_reads_alike_in_any_pieces() {
        let mut new = vec![0u8; 1 << 20];
        new[4096..8192].fill(3);
        new[100_000..100_123].fill(4);
        let ch = Arc::new(Changes {
            extents: vec![
                Change {
                    offset: 4096,
                    length: 4096,
                    zero: false,
                },
                Change {
                    offset: 65536,
                    length: 4096,
                    zero: true,
                },
                Change {
                    offset: 99_999,
                    length: 200,
                    zero: false,
                },
            ],
            method: "test",
            granularity: 1,
        });
        let st = RbdDiffStream::new(Arc::new(Mem(new.clone())), ch, Some("s1"), "s2");
        let size = st.size();
        let expect_len = 12 + 7 + 7 + 9 + (17 + 4096) + 17 + (17 + 200) + 1;
        assert_eq!(size, expect_len);
        let mut whole = vec![0u8; size as usize];
        st.read_at(&mut whole, 0).expect("read");
        assert!(whole.starts_with(b"rbd diff v1\nf\x02\0\0\0s1t\x02\0\0\0s2s"));
        assert_eq!(whole.last(), Some(&b'e'));
        let w = 12 + 7 + 7 + 9;
        assert_eq!(whole[w], b'w');
        assert_eq!(&whole[w + 17..w + 17 + 4096], &new[4096..8192]);
        assert_eq!(whole[w + 17 + 4096], b'z');
        let mut seed = 77u64;
        for _ in 0..200 {
            let o = rng(&mut seed) % size;
            let l = (rng(&mut seed) % 5000).min(size - o) as usize;
            let mut piece = vec![0xaau8; l];
            st.read_at(&mut piece, o).expect("read piece");
            assert_eq!(&piece[..], &whole[o as usize..o as usize + l], "at {o}+{l}");
        }
    }
}

//! RBD images read through librbd, opened read-only at one snapshot.
//!
//! A snapshot never changes, so its allocation map is asked of librbd once
//! (`rbd_diff_iterate2`) and kept for the life of the opened image.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::raw::push_extent;
use super::{BlockImage, Extent, ExtentKind};
use crate::ceph;
use crate::error::Result;

/// Most extents one `map` call returns; callers loop.
const MAX_EXTENTS: usize = 4096;

/// Data extents `(offset, length)` of a whole snapshot, sorted and merged.
type Allocation = Arc<Vec<(u64, u64)>>;

pub struct RbdImage {
    image: ceph::Image,
    size: u64,
    obj_size: u64,
    features: u64,
    /// Data extents of the whole snapshot, sorted and merged; None until first asked.
    allocation: Mutex<Option<Allocation>>,
    /// Where the previous read ended: a read starting there is sequential.
    last_end: AtomicU64,
}

impl RbdImage {
    pub fn new(image: ceph::Image) -> Result<Self> {
        let st = image.stat()?;
        let features = image.features()?;
        Ok(RbdImage {
            image,
            size: st.size,
            obj_size: st.obj_size,
            features,
            allocation: Mutex::new(None),
            last_end: AtomicU64::new(u64::MAX),
        })
    }

    /// With fast-diff the object map answers at object granularity without touching the
    /// objects; without it librbd lists every object, so ask for exact extents instead.
    fn whole_object(&self) -> bool {
        self.features & ceph::FEATURE_FAST_DIFF != 0
    }

    fn allocation(&self) -> Result<Allocation> {
        let mut slot = crate::namespace::registry::lock(&self.allocation);
        if let Some(a) = slot.as_ref() {
            return Ok(a.clone());
        }
        let mut raw = self
            .image
            .allocated_extents(0, self.size, self.whole_object())?;
        raw.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(raw.len());
        for (off, len) in raw {
            let end = off.saturating_add(len).min(self.size);
            if end <= off {
                continue;
            }
            match merged.last_mut() {
                Some((s, l)) if *s + *l >= off => *l = (*s + *l).max(end) - *s,
                _ => merged.push((off, end - off)),
            }
        }
        let a = Arc::new(merged);
        *slot = Some(a.clone());
        Ok(a)
    }
}

impl BlockImage for RbdImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        // librbd refuses reads past the end (-EINVAL): clamp, and the rest reads as zeros.
        let avail = self.size.saturating_sub(offset);
        let n = usize::try_from(avail).unwrap_or(usize::MAX).min(buf.len());
        let (head, tail) = buf.split_at_mut(n);
        tail.fill(0);
        if head.is_empty() {
            return Ok(());
        }
        let sequential = self.last_end.swap(offset + n as u64, Ordering::Relaxed) == offset;
        self.image.read(head, offset, sequential)
    }

    fn map(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        let end = offset.saturating_add(length).min(self.size);
        let mut out = Vec::new();
        if offset >= end {
            return Ok(out);
        }
        let alloc = self.allocation()?;
        // First data extent that ends after `offset`.
        let first = alloc.partition_point(|(s, l)| s + l <= offset);
        let mut pos = offset;
        for &(s, l) in &alloc[first..] {
            if pos >= end || out.len() >= MAX_EXTENTS {
                break;
            }
            let (s, e) = (s.max(pos), (s + l).min(end));
            push_extent(&mut out, pos, s.min(end), ExtentKind::Zero);
            push_extent(&mut out, s, e, ExtentKind::Data);
            pos = e.max(pos);
        }
        if pos < end && out.len() < MAX_EXTENTS {
            push_extent(&mut out, pos, end, ExtentKind::Zero);
        }
        Ok(out)
    }

    fn describe(&self) -> String {
        format!(
            "rbd {} ({} KiB objects, {})",
            self.image.label,
            self.obj_size >> 10,
            ceph::feature_names(self.features).join(",")
        )
    }
}

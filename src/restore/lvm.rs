//! LVM2 physical volumes: the label, the current text metadata, and linear logical volumes
//! (segments of type `striped` with one stripe on this PV) presented as block images, so each LV
//! is probed and opened like a partition. Thin, RAID, mirror, multi-stripe, cache and snapshot
//! LVs, and LVs with extents on another PV, are listed with a note instead.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::bytes::{le32, le64, sub};
use super::Dev;
use crate::error::{Error, Result};
use crate::image::{BlockImage, Extent};

const MDA_MAGIC: &[u8] = b" LVM2 x[5A%r0N*>";
/// Largest metadata text we read.
const MAX_TEXT: u64 = 4 << 20;
const MAX_SEGMENTS: usize = 10_000;
/// Deepest nesting in the metadata text (VG > logical_volumes > lv > segment > …).
const MAX_DEPTH: usize = 16;

/// One logical volume found on the PV.
pub struct LogicalVolume {
    pub vg: String,
    pub lv: String,
    /// The LV's bytes, when it is linear on this PV; `None` with `note` saying why not.
    pub image: Option<Arc<dyn BlockImage>>,
    pub note: String,
}

/// A README listing the logical volumes of a PV.
pub fn summary(lvs: &[LogicalVolume]) -> String {
    let mut s = String::from("This partition is an LVM2 physical volume. Logical volumes:\n");
    for lv in lvs {
        match &lv.image {
            Some(img) => s.push_str(&format!(
                "  {}/{}: {} bytes, linear\n",
                lv.vg,
                lv.lv,
                img.size()
            )),
            None => s.push_str(&format!(
                "  {}/{}: not readable here: {}\n",
                lv.vg, lv.lv, lv.note
            )),
        }
    }
    if lvs.is_empty() {
        s.push_str("  (none)\n");
    }
    s
}

/// A value of LVM's metadata text format.
#[derive(Debug, Clone, PartialEq)]
enum Value {
    Str(String),
    Num(i64),
    List(Vec<Value>),
    Section(BTreeMap<String, Value>),
}

impl Value {
    fn get(&self, k: &str) -> Option<&Value> {
        match self {
            Value::Section(m) => m.get(k),
            _ => None,
        }
    }
    fn num(&self, k: &str) -> Option<u64> {
        match self.get(k) {
            Some(Value::Num(n)) => u64::try_from(*n).ok(),
            _ => None,
        }
    }
    fn str(&self, k: &str) -> Option<&str> {
        match self.get(k) {
            Some(Value::Str(s)) => Some(s),
            _ => None,
        }
    }
    fn sections(&self) -> Vec<(&String, &Value)> {
        match self {
            Value::Section(m) => m
                .iter()
                .filter(|(_, v)| matches!(v, Value::Section(_)))
                .collect(),
            _ => Vec::new(),
        }
    }
}

struct Parser<'a> {
    s: &'a [u8],
    pos: usize,
}

impl Parser<'_> {
    fn skip_ws(&mut self) {
        while let Some(&c) = self.s.get(self.pos) {
            if c == b'#' {
                while self.s.get(self.pos).is_some_and(|&c| c != b'\n') {
                    self.pos += 1;
                }
            } else if c.is_ascii_whitespace() {
                self.pos += 1;
            } else {
                break;
            }
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.skip_ws();
        self.s.get(self.pos).copied()
    }

    fn ident(&mut self) -> Option<String> {
        self.skip_ws();
        let start = self.pos;
        while self
            .s
            .get(self.pos)
            .is_some_and(|&c| c.is_ascii_alphanumeric() || b"_.-+".contains(&c))
        {
            self.pos += 1;
        }
        (self.pos > start).then(|| String::from_utf8_lossy(&self.s[start..self.pos]).into_owned())
    }

    /// Items until `}` (or the end at depth 0).
    fn items(&mut self, depth: usize) -> Option<BTreeMap<String, Value>> {
        if depth > MAX_DEPTH {
            return None;
        }
        let mut m = BTreeMap::new();
        loop {
            match self.peek() {
                None if depth == 0 => return Some(m),
                None => return None,
                Some(b'}') if depth > 0 => {
                    self.pos += 1;
                    return Some(m);
                }
                _ => {}
            }
            let name = self.ident()?;
            match self.peek()? {
                b'{' => {
                    self.pos += 1;
                    let v = self.items(depth + 1)?;
                    m.insert(name, Value::Section(v));
                }
                b'=' => {
                    self.pos += 1;
                    let v = self.value(depth)?;
                    m.insert(name, v);
                }
                _ => return None,
            }
        }
    }

    fn value(&mut self, depth: usize) -> Option<Value> {
        match self.peek()? {
            b'"' => {
                self.pos += 1;
                let mut out = Vec::new();
                loop {
                    let c = *self.s.get(self.pos)?;
                    self.pos += 1;
                    match c {
                        b'"' => break,
                        b'\\' => {
                            out.push(*self.s.get(self.pos)?);
                            self.pos += 1;
                        }
                        _ => out.push(c),
                    }
                }
                Some(Value::Str(String::from_utf8_lossy(&out).into_owned()))
            }
            b'[' => {
                if depth > MAX_DEPTH {
                    return None;
                }
                self.pos += 1;
                let mut v = Vec::new();
                loop {
                    match self.peek()? {
                        b']' => {
                            self.pos += 1;
                            return Some(Value::List(v));
                        }
                        b',' => self.pos += 1,
                        _ => v.push(self.value(depth + 1)?),
                    }
                }
            }
            _ => {
                let t = self.ident()?;
                t.parse::<i64>()
                    .ok()
                    .map(Value::Num)
                    .or(Some(Value::Str(t)))
            }
        }
    }
}

fn parse_text(text: &[u8]) -> Option<BTreeMap<String, Value>> {
    Parser { s: text, pos: 0 }.items(0)
}

/// The PV's UUID (32 characters, no dashes) and the current metadata text.
fn read_pv(dev: &Dev) -> Result<(String, Vec<u8>)> {
    let mut head = vec![0u8; 4 * 512];
    dev.read_lenient(0, &mut head)?;
    let s = (0..4)
        .find(|&s| {
            sub(&head, s * 512, 8) == b"LABELONE" && sub(&head, s * 512 + 24, 8) == b"LVM2 001"
        })
        .ok_or_else(|| dev.corrupt(0, "no LVM2 label"))?;
    let label = sub(&head, s * 512, 512);
    let pvh = le32(label, 20) as usize;
    let pv = label.get(pvh..).unwrap_or(&[]);
    let uuid = String::from_utf8_lossy(sub(pv, 0, 32)).into_owned();
    // Data area list, then metadata area list, each ended by a zero entry.
    let mut off = 40;
    let mut lists = [Vec::new(), Vec::new()];
    for list in lists.iter_mut() {
        loop {
            let (o, n) = (le64(pv, off), le64(pv, off + 8));
            off += 16;
            if (o == 0 && n == 0) || off > pv.len() {
                break;
            }
            list.push((o, n));
        }
    }
    let &(mda, mda_size) = lists[1]
        .first()
        .ok_or_else(|| dev.corrupt(s as u64 * 512, "LVM2 PV without a metadata area"))?;
    let h = dev.read_vec(mda, 512)?;
    if sub(&h, 4, 16) != MDA_MAGIC {
        return Err(dev.corrupt(mda, "LVM2 metadata area header has a bad magic"));
    }
    let (toff, tsize) = (le64(&h, 40), le64(&h, 48));
    if tsize == 0 || tsize > MAX_TEXT || toff >= mda_size || toff < 512 {
        return Err(dev.corrupt(mda, "LVM2 metadata location out of range"));
    }
    // The metadata area is a ring after its 512-byte header.
    let first = tsize.min(mda_size - toff);
    let mut text = dev.read_vec(mda + toff, first as usize)?;
    if first < tsize {
        text.extend(dev.read_vec(mda + 512, (tsize - first) as usize)?);
    }
    if let Some(z) = text.iter().position(|&b| b == 0) {
        text.truncate(z);
    }
    Ok((uuid, text))
}

/// The logical volumes of the PV in `dev`, which lies at `base` on `disk`.
pub fn logical_volumes(
    disk: Arc<dyn BlockImage>,
    dev: &Dev,
    base: u64,
) -> Result<Vec<LogicalVolume>> {
    let (uuid, text) = read_pv(dev)?;
    let top =
        parse_text(&text).ok_or_else(|| dev.corrupt(0, "LVM2 metadata text does not parse"))?;
    let (vg_name, vg) = top
        .iter()
        .find(|(_, v)| v.get("physical_volumes").is_some())
        .ok_or_else(|| dev.corrupt(0, "LVM2 metadata without a volume group"))?;
    let extent = vg
        .num("extent_size")
        .filter(|&e| e > 0)
        .and_then(|e| e.checked_mul(512))
        .ok_or_else(|| dev.corrupt(0, "LVM2 extent size"))?;
    let pvs = vg
        .get("physical_volumes")
        .map(Value::sections)
        .unwrap_or_default();
    let ours = pvs
        .iter()
        .find(|(_, pv)| pv.str("id").is_some_and(|id| id.replace('-', "") == uuid))
        .ok_or_else(|| dev.corrupt(0, "LVM2 metadata does not list this PV"))?;
    let pv_name = ours.0.as_str();
    let pe_start = ours
        .1
        .num("pe_start")
        .and_then(|p| p.checked_mul(512))
        .ok_or_else(|| dev.corrupt(0, "LVM2 pe_start"))?;
    let mut out = Vec::new();
    for (lv_name, lv) in vg
        .get("logical_volumes")
        .map(Value::sections)
        .unwrap_or_default()
    {
        let visible = matches!(lv.get("status"), Some(Value::List(l)) if l.contains(&Value::Str("VISIBLE".into())));
        if !visible {
            continue;
        }
        let mut segs = Vec::new();
        let mut note = String::new();
        for (_, seg) in lv.sections().into_iter().take(MAX_SEGMENTS) {
            let ty = seg.str("type").unwrap_or("?");
            let stripes = seg.num("stripe_count").unwrap_or(0);
            let (Some(start), Some(count)) = (seg.num("start_extent"), seg.num("extent_count"))
            else {
                note = "segment without start/count".into();
                break;
            };
            let target = match seg.get("stripes") {
                Some(Value::List(l)) if l.len() == 2 => match (&l[0], &l[1]) {
                    (Value::Str(p), Value::Num(pe)) => Some((p.clone(), u64::try_from(*pe).ok())),
                    _ => None,
                },
                _ => None,
            };
            match (ty, stripes, target) {
                ("striped", 1, Some((p, Some(pe)))) if p == pv_name => {
                    let seg_bytes = count.checked_mul(extent);
                    let lv_off = start.checked_mul(extent);
                    let pv_off = pe.checked_mul(extent).and_then(|x| x.checked_add(pe_start));
                    match (lv_off, pv_off, seg_bytes) {
                        (Some(l), Some(p), Some(n))
                            if p.checked_add(n).is_some_and(|e| e <= dev.len()) =>
                        {
                            segs.push((l, p, n))
                        }
                        _ => {
                            note = "a segment lies outside the physical volume".into();
                            break;
                        }
                    }
                }
                ("striped", 1, Some((p, _))) => {
                    note = format!("extents on physical volume {p}, which is not this partition");
                    break;
                }
                (t, n, _) => {
                    note = format!("segment type {t} with {n} stripes (only linear LVs are read)");
                    break;
                }
            }
        }
        segs.sort_by_key(|s| s.0);
        let contiguous = segs
            .iter()
            .try_fold(0u64, |at, s| (s.0 == at).then_some(at + s.2));
        let image: Option<Arc<dyn BlockImage>> = match (note.is_empty(), contiguous) {
            (true, Some(size)) if size > 0 => Some(Arc::new(LvImage {
                disk: disk.clone(),
                segs: segs.iter().map(|&(l, p, n)| (l, base + p, n)).collect(),
                size,
                name: format!("{vg_name}/{lv_name}"),
            })),
            (true, _) => {
                note = "segments leave gaps in the volume".into();
                None
            }
            _ => None,
        };
        out.push(LogicalVolume {
            vg: vg_name.clone(),
            lv: lv_name.clone(),
            image,
            note,
        });
    }
    Ok(out)
}

/// A linear LV: its segments (LV offset, disk offset, length) mapped onto the disk.
struct LvImage {
    disk: Arc<dyn BlockImage>,
    segs: Vec<(u64, u64, u64)>,
    size: u64,
    name: String,
}

impl LvImage {
    fn seg(&self, off: u64) -> Result<(u64, u64)> {
        self.segs
            .iter()
            .find(|s| off >= s.0 && off < s.0 + s.2)
            .map(|s| (s.1 + (off - s.0), s.0 + s.2 - off))
            .ok_or_else(|| Error::corrupt(&self.name, off, "LV offset not mapped"))
    }
}

impl BlockImage for LvImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let (disk_off, left) = self.seg(offset + done as u64)?;
            let n = (left.min((buf.len() - done) as u64)) as usize;
            self.disk.read_at(&mut buf[done..done + n], disk_off)?;
            done += n;
        }
        Ok(())
    }

    fn map(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        if offset >= self.size {
            return Ok(Vec::new());
        }
        let (disk_off, left) = self.seg(offset)?;
        let len = length.min(left).min(self.size - offset);
        let mut out = self.disk.map(disk_off, len)?;
        for e in out.iter_mut() {
            e.offset = e.offset - disk_off + offset;
        }
        Ok(out)
    }

    fn describe(&self) -> String {
        format!(
            "LVM2 logical volume {} ({} segments)",
            self.name,
            self.segs.len()
        )
    }
}

//! NTFS through the `ntfs` crate (0.4): files, directories, times, hard links. Inode numbers are
//! MFT record numbers (root = 5). The crate takes `&mut` reader per call, so one `Slice` sits
//! behind a mutex; crate panics on corrupt input are caught and reported as `Error::Corrupt`.
//! File data is read from the $DATA runs (all pieces of an attribute list, in VCN order), so
//! sparse runs are holes for SEEK_HOLE. Not read: compressed and encrypted files, reparse points as symlinks (shown as what their
//! record says: a file or a directory), alternate data streams, security descriptors.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};

use ntfs::attribute_value::NtfsAttributeValue;
use ntfs::structured_values::{
    NtfsAttributeList, NtfsFileAttributeFlags, NtfsFileName, NtfsFileNamespace,
};
use ntfs::{NtfsAttributeFlags, NtfsAttributeType, NtfsFile, NtfsReadSeek, NtfsTime};

use super::{human_size, unix_time, Dev, FileKind, FileStat, GuestFs, Slice};
use crate::error::{Error, Result};

const ROOT: u64 = 5;
/// MFT records below this are metafiles ($MFT, $LogFile, …) or reserved: never listed.
const FIRST_USER_RECORD: u64 = 24;
/// Most entries read from one directory index (a corrupt index must not run forever).
const MAX_DIR_ENTRIES: usize = 1 << 20;
const CACHE: usize = 256;

type DirList = Arc<Vec<(Vec<u8>, u64, FileKind)>>;

/// Where a file's unnamed $DATA lives.
enum FileData {
    Resident(Vec<u8>),
    /// Runs in VCN order: (bytes, byte offset on the volume or None when sparse).
    Runs {
        size: u64,
        runs: Vec<(u64, Option<u64>)>,
    },
}

pub struct NtfsFs {
    ntfs: ntfs::Ntfs,
    reader: Mutex<Slice>,
    dev: Dev,
    label: String,
    dirs: Mutex<HashMap<u64, DirList>>,
    data: Mutex<HashMap<u64, Arc<FileData>>>,
}

fn nt_time(t: NtfsTime) -> std::time::SystemTime {
    // 100 ns intervals since 1601-01-01.
    let ts = t.nt_timestamp();
    let secs = (ts / 10_000_000) as i64 - 11_644_473_600;
    unix_time(secs, ((ts % 10_000_000) * 100) as u32)
}

impl NtfsFs {
    pub fn open(dev: Dev) -> Result<NtfsFs> {
        let name = dev.name().to_string();
        // The crate's boot sector parse panics instead of failing on a short read.
        if dev.len() < 8192 {
            return Err(Error::corrupt(
                &name,
                0,
                "NTFS: volume smaller than its boot area",
            ));
        }
        let mut slice = Slice::new(dev.clone());
        let opened = catch_unwind(AssertUnwindSafe(|| -> std::result::Result<_, String> {
            let mut n = ntfs::Ntfs::new(&mut slice).map_err(|e| e.to_string())?;
            n.read_upcase_table(&mut slice).map_err(|e| e.to_string())?;
            let label = match n.volume_name(&mut slice) {
                Some(Ok(v)) => v.name().to_string_lossy(),
                _ => String::new(),
            };
            let root = n.root_directory(&mut slice).map_err(|e| e.to_string())?;
            if !root.is_directory() {
                return Err("root record is not a directory".into());
            }
            Ok((n, label))
        }));
        let (ntfs, label) = match opened {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => return Err(Error::corrupt(&name, 0, format!("NTFS: {e}"))),
            Err(_) => {
                return Err(Error::corrupt(
                    &name,
                    0,
                    "NTFS: reader panicked on the volume header",
                ))
            }
        };
        Ok(NtfsFs {
            ntfs,
            reader: Mutex::new(slice),
            dev,
            label,
            dirs: Mutex::new(HashMap::new()),
            data: Mutex::new(HashMap::new()),
        })
    }

    /// Run `f` with the reader; crate errors and panics become `Error::Corrupt`.
    fn with<R>(
        &self,
        what: &str,
        f: impl FnOnce(&ntfs::Ntfs, &mut Slice) -> ntfs::Result<R>,
    ) -> Result<R> {
        let mut g = self
            .reader
            .lock()
            .map_err(|_| self.dev.corrupt(0, "NTFS reader lock poisoned"))?;
        match catch_unwind(AssertUnwindSafe(|| f(&self.ntfs, &mut g))) {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.dev.corrupt(0, format!("NTFS {what}: {e}"))),
            Err(_) => Err(self.dev.corrupt(0, format!("NTFS {what}: reader panicked"))),
        }
    }

    fn file<'n>(ntfs: &'n ntfs::Ntfs, fs: &mut Slice, ino: u64) -> ntfs::Result<NtfsFile<'n>> {
        ntfs.file(fs, ino)
    }

    /// The runs of a file's unnamed $DATA, read piece by piece when an attribute list splits it
    /// over several records (the crate's own reader stops at the first piece boundary there).
    fn file_data(&self, ino: u64) -> Result<Arc<FileData>> {
        if let Ok(c) = self.data.lock() {
            if let Some(d) = c.get(&ino) {
                return Ok(d.clone());
            }
        }
        let cluster = u64::from(self.ntfs.cluster_size());
        let r = self.with("read", |ntfs, fs| {
            let file = Self::file(ntfs, fs, ino)?;
            if file.is_directory() {
                return Ok(Err(Error::IsDir(format!("NTFS record {ino}"))));
            }
            let mut list = None;
            let mut base_data = None;
            let mut raw = file.attributes_raw();
            for a in raw.by_ref() {
                let a = a?;
                match a.ty()? {
                    NtfsAttributeType::AttributeList => {
                        list = Some(a.structured_value::<_, NtfsAttributeList>(fs)?)
                    }
                    NtfsAttributeType::Data if a.name_length() == 0 && base_data.is_none() => {
                        base_data = Some(a)
                    }
                    _ => {}
                }
            }
            let mut pieces = Vec::new();
            let mut files = Vec::new();
            if let Some(list) = list {
                let mut entries = list.entries();
                while let Some(e) = entries.next(fs) {
                    let e = e?;
                    if e.ty()? == NtfsAttributeType::Data && e.name_length() == 0 {
                        // A negative VCN is corrupt: sorts last and fails the overlap check below.
                        let vcn = u64::try_from(e.lowest_vcn().value()).unwrap_or(u64::MAX);
                        files.push((vcn, e.to_file(ntfs, fs)?, e));
                    }
                }
                files.sort_by_key(|(vcn, _, _)| *vcn);
            }
            for (vcn, f, e) in &files {
                pieces.push((*vcn, e.to_attribute(f)?));
            }
            if pieces.is_empty() {
                match base_data {
                    Some(a) => pieces.push((0, a)),
                    None => return Ok(Ok(FileData::Resident(Vec::new()))),
                }
            }
            let mut runs = Vec::new();
            let mut size = 0;
            let mut total = 0u64;
            for (vcn, a) in &pieces {
                if a.flags()
                    .intersects(NtfsAttributeFlags::COMPRESSED | NtfsAttributeFlags::ENCRYPTED)
                {
                    return Ok(Err(Error::NotSupported(format!(
                        "NTFS record {ino} is compressed or encrypted"
                    ))));
                }
                if *vcn == 0 {
                    size = a.value_length();
                }
                if a.is_resident() {
                    if pieces.len() != 1 {
                        return Ok(Err(self.dev.corrupt(
                            0,
                            format!("NTFS record {ino}: resident piece in a list"),
                        )));
                    }
                    let mut v = a.value(fs)?;
                    let mut out = vec![0u8; v.len() as usize];
                    v.read_exact(fs, &mut out)?;
                    return Ok(Ok(FileData::Resident(out)));
                }
                let start = vcn.saturating_mul(cluster);
                if start < total || start == u64::MAX {
                    return Ok(Err(self.dev.corrupt(
                        0,
                        format!("NTFS record {ino}: overlapping $DATA pieces"),
                    )));
                }
                if start > total {
                    runs.push((start - total, None));
                    total = start;
                }
                let NtfsAttributeValue::NonResident(nr) = a.value(fs)? else {
                    return Ok(Err(self
                        .dev
                        .corrupt(0, format!("NTFS record {ino}: unexpected $DATA form"))));
                };
                for run in nr.data_runs() {
                    let run = run?;
                    let len = run.allocated_size();
                    let disk = run.data_position().value().map(|p| p.get());
                    if let Some(d) = disk {
                        if d.checked_add(len).is_none_or(|e| e > self.dev.len()) {
                            return Ok(Err(self
                                .dev
                                .corrupt(d, format!("NTFS record {ino}: data run past the end"))));
                        }
                    }
                    runs.push((len, disk));
                    total = total.saturating_add(len);
                    if runs.len() > 1 << 22 {
                        return Ok(Err(self
                            .dev
                            .corrupt(0, format!("NTFS record {ino}: too many data runs"))));
                    }
                }
            }
            Ok(Ok(FileData::Runs {
                size: size.min(total),
                runs,
            }))
        })??;
        let r = Arc::new(r);
        if let Ok(mut c) = self.data.lock() {
            if c.len() >= CACHE {
                c.clear();
            }
            c.insert(ino, r.clone());
        }
        Ok(r)
    }

    fn dir_entries(&self, dir: u64) -> Result<DirList> {
        if let Ok(c) = self.dirs.lock() {
            if let Some(d) = c.get(&dir) {
                return Ok(d.clone());
            }
        }
        let list = self.with("directory", |ntfs, fs| {
            let file = Self::file(ntfs, fs, dir)?;
            let index = file.directory_index(fs)?;
            let mut entries = index.entries();
            let mut out = Vec::new();
            let mut n = 0;
            while let Some(e) = entries.next(fs) {
                n += 1;
                if n > MAX_DIR_ENTRIES {
                    break;
                }
                let e = e?;
                let Some(key) = e.key() else { continue };
                let key = key?;
                if key.namespace() == NtfsFileNamespace::Dos {
                    continue;
                }
                let rec = e.file_reference().file_record_number();
                if rec < FIRST_USER_RECORD || rec == dir {
                    continue;
                }
                let name = key.name().to_string_lossy().into_bytes();
                let kind = if key.is_directory() {
                    FileKind::Dir
                } else {
                    FileKind::File
                };
                out.push((name, rec, kind));
            }
            Ok(out)
        })?;
        let list = Arc::new(list);
        if let Ok(mut c) = self.dirs.lock() {
            if c.len() >= CACHE {
                c.clear();
            }
            c.insert(dir, list.clone());
        }
        Ok(list)
    }
}

impl GuestFs for NtfsFs {
    fn root(&self) -> u64 {
        ROOT
    }

    fn stat(&self, ino: u64) -> Result<FileStat> {
        let cluster = u64::from(self.ntfs.cluster_size());
        self.with("stat", |ntfs, fs| {
            let file = Self::file(ntfs, fs, ino)?;
            let info = file.info()?;
            let dir = file.is_directory();
            // Hard links: every $FILE_NAME but the DOS 8.3 alias of a long name.
            let mut nlink = 0u32;
            let mut size = 0u64;
            let mut attrs = file.attributes();
            while let Some(item) = attrs.next(fs) {
                let item = item?;
                let a = item.to_attribute()?;
                match a.ty()? {
                    NtfsAttributeType::FileName => {
                        let n = a.structured_value::<_, NtfsFileName>(fs)?;
                        if n.namespace() != NtfsFileNamespace::Dos {
                            nlink += 1;
                        }
                    }
                    NtfsAttributeType::Data if !dir && a.name_length() == 0 => {
                        size = a.value_length()
                    }
                    _ => {}
                }
            }
            let mut perm = if dir { 0o755 } else { 0o644 };
            if info
                .file_attributes()
                .contains(NtfsFileAttributeFlags::READ_ONLY)
            {
                perm &= !0o222;
            }
            let mtime = nt_time(info.modification_time());
            Ok(FileStat {
                ino,
                kind: if dir { FileKind::Dir } else { FileKind::File },
                perm,
                uid: 0,
                gid: 0,
                size,
                allocated: size.div_ceil(cluster).saturating_mul(cluster),
                nlink: nlink.max(1),
                rdev: 0,
                atime: nt_time(info.access_time()),
                mtime,
                ctime: nt_time(info.mft_record_modification_time()),
                btime: Some(nt_time(info.creation_time())),
            })
        })
    }

    fn lookup(&self, dir: u64, name: &[u8]) -> Result<FileStat> {
        let list = self.dir_entries(dir)?;
        let ino = super::entry_ino(&list, name)?;
        let st = self.stat(ino)?;
        if st.kind == FileKind::Dir {
            // A directory has one parent: one of its names must point back at `dir`.
            let ok = self.with("lookup", |ntfs, fs| {
                let f = Self::file(ntfs, fs, ino)?;
                Ok(f.name(fs, None, Some(dir)).is_some())
            })?;
            if !ok {
                return Err(self
                    .dev
                    .corrupt(0, format!("NTFS record {ino}: no name in parent {dir}")));
            }
        }
        Ok(st)
    }

    fn readdir(&self, dir: u64) -> Result<Vec<(Vec<u8>, u64, FileKind)>> {
        Ok(self.dir_entries(dir)?.as_ref().clone())
    }

    fn read(&self, ino: u64, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let data = self.file_data(ino)?;
        match data.as_ref() {
            FileData::Resident(v) => {
                let Some(rest) = usize::try_from(offset).ok().and_then(|o| v.get(o..)) else {
                    return Ok(0);
                };
                let n = rest.len().min(buf.len());
                buf[..n].copy_from_slice(&rest[..n]);
                Ok(n)
            }
            FileData::Runs { size, runs } => {
                if offset >= *size {
                    return Ok(0);
                }
                let want = (buf.len() as u64).min(size - offset) as usize;
                let buf = &mut buf[..want];
                buf.fill(0);
                let end = offset + want as u64;
                let mut pos = 0u64;
                for &(len, disk) in runs.iter() {
                    let (s, e) = (pos.max(offset), pos.saturating_add(len).min(end));
                    if let (Some(d), true) = (disk, s < e) {
                        self.dev.read_exact_at(
                            d + (s - pos),
                            &mut buf[(s - offset) as usize..(e - offset) as usize],
                        )?;
                    }
                    pos = pos.saturating_add(len);
                    if pos >= end {
                        break;
                    }
                }
                Ok(want)
            }
        }
    }

    fn data_ranges(&self, ino: u64) -> Result<Option<Vec<(u64, u64)>>> {
        if self.stat(ino)?.kind != FileKind::File {
            return Ok(None);
        }
        let data = self.file_data(ino)?;
        let FileData::Runs { size, runs } = data.as_ref() else {
            return Ok(None);
        };
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut pos = 0u64;
        for &(len, disk) in runs.iter() {
            let e = pos.saturating_add(len).min(*size);
            if disk.is_some() && e > pos {
                match out.last_mut() {
                    Some(l) if l.0 + l.1 == pos => l.1 += e - pos,
                    _ => out.push((pos, e - pos)),
                }
            }
            pos = pos.saturating_add(len);
        }
        Ok(Some(out))
    }

    fn readlink(&self, ino: u64) -> Result<Vec<u8>> {
        Err(Error::Invalid(format!(
            "NTFS record {ino} is not a symlink"
        )))
    }

    fn xattrs(&self, _ino: u64) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        Ok(Vec::new())
    }

    fn describe(&self) -> String {
        let mut s = format!("NTFS, {}", human_size(self.ntfs.size()));
        if !self.label.is_empty() {
            s.push_str(&format!(", label {}", self.label));
        }
        s
    }
}

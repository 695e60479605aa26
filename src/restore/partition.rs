//! Partition tables: GPT (primary header, falling back to the backup header), MBR with
//! extended/logical partitions (numbered p5… like Linux), or none (one `whole` range).

use super::bytes::{le16, le32, le64, sub, u8at};
use super::Partition;
use crate::error::Result;
use crate::image::BlockImage;

const SECTOR: u64 = 512;
/// Most GPT entries we read (the spec's default is 128; 4096 bounds a corrupt count).
const MAX_GPT_ENTRIES: u32 = 4096;
/// Most logical partitions followed in an extended partition's EBR chain.
const MAX_LOGICAL: usize = 256;

/// The partition table of a disk. Unreadable tables fall back (GPT backup, then `whole`).
pub fn partitions(disk: &dyn BlockImage) -> Result<Vec<Partition>> {
    let size = disk.size();
    let mut mbr = [0u8; 512];
    if size < SECTOR {
        return Ok(whole(size));
    }
    disk.read_at(&mut mbr, 0)?;
    let has_mbr_sig = mbr[510] == 0x55 && mbr[511] == 0xAA;
    let protective = has_mbr_sig && (0..4).any(|i| u8at(&mbr, 446 + i * 16 + 4) == 0xEE);

    // GPT: try the primary header, then the backup at the last sector.
    if let Some(parts) = read_gpt(disk, SECTOR)? {
        return Ok(parts);
    }
    if size >= 2 * SECTOR {
        if let Some(parts) = read_gpt(disk, size / SECTOR * SECTOR - SECTOR)? {
            crate::input_warn!(
                "partitions",
                "primary GPT header unusable, using the backup header"
            );
            return Ok(parts);
        }
    }
    if protective {
        crate::input_warn!(
            "partitions",
            "protective MBR but no valid GPT header: treating the disk as whole"
        );
        return Ok(whole(size));
    }
    if has_mbr_sig && !looks_like_boot_sector(&mbr) {
        let parts = read_mbr(disk, &mbr)?;
        if !parts.is_empty() {
            return Ok(parts);
        }
    }
    Ok(whole(size))
}

fn whole(size: u64) -> Vec<Partition> {
    vec![Partition {
        name: "whole".into(),
        offset: 0,
        length: size,
        type_desc: "no partition table".into(),
    }]
}

/// A FAT/NTFS boot sector also ends in 55 AA: do not read its code as partition entries.
fn looks_like_boot_sector(s: &[u8]) -> bool {
    let oem = sub(s, 3, 8);
    let fat_sig =
        sub(s, 54, 5) == b"FAT12" || sub(s, 54, 5) == b"FAT16" || sub(s, 82, 5) == b"FAT32";
    oem == b"NTFS    " || oem == b"EXFAT   " || fat_sig
}

/// Parse a GPT header at byte `at`; `None` if it is absent or fails its checks.
fn read_gpt(disk: &dyn BlockImage, at: u64) -> Result<Option<Vec<Partition>>> {
    let size = disk.size();
    let mut h = [0u8; 512];
    if at.saturating_add(SECTOR) > size {
        return Ok(None);
    }
    disk.read_at(&mut h, at)?;
    if &h[0..8] != b"EFI PART" {
        return Ok(None);
    }
    let hsize = le32(&h, 12) as usize;
    if !(92..=512).contains(&hsize) {
        return Ok(None);
    }
    let mut hc = h[..hsize].to_vec();
    hc[16..20].fill(0);
    if crc32fast::hash(&hc) != le32(&h, 16) {
        crate::input_warn!("partitions", "GPT header checksum mismatch at {at:#x}");
        return Ok(None);
    }
    let entries_lba = le64(&h, 72);
    let count = le32(&h, 80);
    let esize = le32(&h, 84);
    if count > MAX_GPT_ENTRIES || !(128..=4096).contains(&esize) || !esize.is_multiple_of(8) {
        return Ok(None);
    }
    let total = u64::from(count) * u64::from(esize);
    let Some(start) = entries_lba.checked_mul(SECTOR) else {
        return Ok(None);
    };
    if start.checked_add(total).is_none_or(|e| e > size) {
        return Ok(None);
    }
    let mut table = vec![0u8; total as usize];
    disk.read_at(&mut table, start)?;
    if crc32fast::hash(&table) != le32(&h, 88) {
        crate::input_warn!(
            "partitions",
            "GPT entry array checksum mismatch (header at {at:#x})"
        );
        return Ok(None);
    }
    let mut out = Vec::new();
    for i in 0..count as usize {
        let e = sub(&table, i * esize as usize, esize as usize);
        let ty = sub(e, 0, 16);
        if ty.iter().all(|&b| b == 0) {
            continue;
        }
        let first = le64(e, 32);
        let last = le64(e, 40);
        let (Some(off), Some(end)) = (
            first.checked_mul(SECTOR),
            last.checked_add(1).and_then(|l| l.checked_mul(SECTOR)),
        ) else {
            continue;
        };
        if end <= off || off >= size {
            crate::input_warn!(
                "partitions",
                "GPT entry {} with an impossible range, skipped",
                i + 1
            );
            continue;
        }
        let name: Vec<u16> = (0..36)
            .map(|k| le16(e, 56 + 2 * k))
            .take_while(|&c| c != 0)
            .collect();
        let name = String::from_utf16_lossy(&name);
        let mut desc = gpt_type_name(ty);
        if !name.is_empty() {
            desc = format!("{desc} \"{name}\"");
        }
        out.push(Partition {
            name: format!("p{}", i + 1),
            offset: off,
            length: end.min(size) - off,
            type_desc: format!("GPT {desc}"),
        });
    }
    Ok(Some(out))
}

/// The GUID as text (first three fields little-endian, as GPT stores them).
fn guid_string(g: &[u8]) -> String {
    format!(
        "{:08X}-{:04X}-{:04X}-{:02X}{:02X}-{}",
        le32(g, 0),
        le16(g, 4),
        le16(g, 6),
        u8at(g, 8),
        u8at(g, 9),
        sub(g, 10, 6)
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<String>()
    )
}

fn gpt_type_name(ty: &[u8]) -> String {
    let g = guid_string(ty);
    let name = match g.as_str() {
        "C12A7328-F81F-11D2-BA4B-00A0C93EC93B" => "EFI system partition",
        "21686148-6449-6E6F-744E-656564454649" => "BIOS boot",
        "0FC63DAF-8483-4772-8E79-3D69D8477DE4" => "Linux filesystem",
        "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709" => "Linux root (x86-64)",
        "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F" => "Linux swap",
        "E6D6D379-F507-44C2-A23C-238F2A3DF928" => "Linux LVM",
        "A19D880F-05FC-4D3B-A006-743F0F84911E" => "Linux RAID",
        "CA7D7CCB-63ED-4C53-861C-1742536059CC" => "Linux LUKS",
        "BC13C2FF-59E6-4262-A352-B275FD6F7172" => "Linux /boot (XBOOTLDR)",
        "933AC7E1-2EB4-4F13-B844-0E14E2AEF915" => "Linux /home",
        "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7" => "Microsoft basic data",
        "E3C9E316-0B5C-4DB8-817D-F92DF00215AE" => "Microsoft reserved",
        "DE94BBA4-06D1-4D40-A16A-BFD50179D6AC" => "Windows recovery",
        "6A898CC3-1DD2-11B2-99A6-080020736631" => "ZFS (Solaris /usr)",
        _ => return format!("type {g}"),
    };
    name.to_string()
}

fn mbr_type_name(t: u8) -> String {
    let name = match t {
        0x01 => "FAT12",
        0x04 | 0x06 | 0x0E => "FAT16",
        0x0B | 0x0C => "FAT32",
        0x07 => "NTFS/exFAT/HPFS",
        0x82 => "Linux swap",
        0x83 => "Linux",
        0x8E => "Linux LVM",
        0xFD => "Linux RAID",
        0xEF => "EFI system partition",
        0xA5 => "FreeBSD",
        _ => return format!("MBR type {t:#04x}"),
    };
    format!("MBR {name} ({t:#04x})")
}

fn is_extended(t: u8) -> bool {
    matches!(t, 0x05 | 0x0F | 0x85)
}

fn read_mbr(disk: &dyn BlockImage, mbr: &[u8]) -> Result<Vec<Partition>> {
    let size = disk.size();
    let mut out = Vec::new();
    let mut extended = None;
    for i in 0..4 {
        let e = sub(mbr, 446 + i * 16, 16);
        let ty = u8at(e, 4);
        let lba = u64::from(le32(e, 8));
        let n = u64::from(le32(e, 12));
        if ty == 0 || n == 0 {
            continue;
        }
        let off = lba * SECTOR;
        if off >= size {
            crate::input_warn!(
                "partitions",
                "MBR entry {} starts past the end of the disk, skipped",
                i + 1
            );
            continue;
        }
        if is_extended(ty) {
            if extended.is_none() {
                extended = Some((lba, n));
            }
            continue;
        }
        out.push(Partition {
            name: format!("p{}", i + 1),
            offset: off,
            length: (n * SECTOR).min(size - off),
            type_desc: mbr_type_name(ty),
        });
    }
    if let Some((ext_lba, ext_len)) = extended {
        read_logical(disk, ext_lba, ext_len, &mut out)?;
    }
    Ok(out)
}

/// Follow the EBR chain of an extended partition; each EBR's second entry links to the next,
/// relative to the extended partition's start. Loops and out-of-range links end the chain.
fn read_logical(
    disk: &dyn BlockImage,
    ext_lba: u64,
    ext_len: u64,
    out: &mut Vec<Partition>,
) -> Result<()> {
    let size = disk.size();
    let mut ebr_lba = ext_lba;
    let mut seen = std::collections::HashSet::new();
    for number in 5..5 + MAX_LOGICAL {
        if !seen.insert(ebr_lba) {
            crate::input_warn!("partitions", "EBR chain loops at LBA {ebr_lba}, stopped");
            break;
        }
        let at = ebr_lba * SECTOR;
        if at + SECTOR > size {
            break;
        }
        let mut ebr = [0u8; 512];
        disk.read_at(&mut ebr, at)?;
        if ebr[510] != 0x55 || ebr[511] != 0xAA {
            break;
        }
        let e1 = sub(&ebr, 446, 16);
        let ty = u8at(e1, 4);
        let n = u64::from(le32(e1, 12));
        if ty != 0 && n != 0 {
            let off = (ebr_lba + u64::from(le32(e1, 8))) * SECTOR;
            if off < size {
                out.push(Partition {
                    name: format!("p{number}"),
                    offset: off,
                    length: (n * SECTOR).min(size - off),
                    type_desc: mbr_type_name(ty),
                });
            }
        }
        let e2 = sub(&ebr, 462, 16);
        let next = u64::from(le32(e2, 8));
        if u8at(e2, 4) == 0 || next == 0 || next >= ext_len {
            break;
        }
        ebr_lba = ext_lba + next;
    }
    Ok(())
}

//! What a partition holds, by magic number, and the README shown for what we do not read.

use super::bytes::{le16, le32, sub, u8at};
use super::{human_size, Dev, Partition};
use crate::error::Result;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Found {
    Ext4,
    Fat,
    Xfs,
    Ntfs,
    Lvm2,
    Btrfs,
    Swap,
    Luks,
    Zfs,
    Bcachefs,
    Squashfs,
    Exfat,
    Iso9660,
    MdRaid,
    Empty,
    Unknown,
}

/// Identify the contents of `dev` from its first 68 KiB and a few well-known offsets.
pub fn probe(dev: &Dev) -> Result<Found> {
    let mut head = vec![0u8; 68 * 1024];
    dev.read_lenient(0, &mut head)?;
    if sub(&head, 0, 6) == b"LUKS\xba\xbe" || sub(&head, 0, 6) == b"SKUL\xba\xbe" {
        return Ok(Found::Luks);
    }
    if sub(&head, 0, 4) == b"XFSB" {
        return Ok(Found::Xfs);
    }
    if sub(&head, 0, 4) == b"hsqs" {
        return Ok(Found::Squashfs);
    }
    if sub(&head, 3, 8) == b"NTFS    " {
        return Ok(Found::Ntfs);
    }
    if sub(&head, 3, 8) == b"EXFAT   " {
        return Ok(Found::Exfat);
    }
    if le16(&head, 1024 + 56) == 0xEF53 {
        return Ok(Found::Ext4);
    }
    for s in 0..4 {
        let l = sub(&head, s * 512, 32);
        if sub(l, 0, 8) == b"LABELONE" && sub(l, 24, 8) == b"LVM2 001" {
            return Ok(Found::Lvm2);
        }
    }
    if sub(&head, 65536 + 64, 8) == b"_BHRfS_M" {
        return Ok(Found::Btrfs);
    }
    let swap = sub(&head, 4096 - 10, 10);
    if swap == b"SWAPSPACE2" || swap == b"SWAP-SPACE" {
        return Ok(Found::Swap);
    }
    const BCH_MAGIC: [u8; 16] = [
        0xc6, 0x85, 0x73, 0xf6, 0x4e, 0x1a, 0x45, 0xca, 0x82, 0x65, 0xf5, 0x7f, 0x48, 0xba, 0x6d,
        0x81,
    ];
    if sub(&head, 4096 + 24, 16) == BCH_MAGIC {
        return Ok(Found::Bcachefs);
    }
    if le32(&head, 4096) == 0xa92b_4efc {
        return Ok(Found::MdRaid);
    }
    if is_fat(&head) {
        return Ok(Found::Fat);
    }
    // ZFS: uberblocks (magic 0x00bab10c, either byte order) from 128 KiB into the first label.
    let mut ub = vec![0u8; 8];
    for i in 0..4u64 {
        dev.read_lenient(128 * 1024 + i * 1024, &mut ub)?;
        let le = u64::from_le_bytes([ub[0], ub[1], ub[2], ub[3], ub[4], ub[5], ub[6], ub[7]]);
        if le == 0x00ba_b10c || le.swap_bytes() == 0x00ba_b10c {
            return Ok(Found::Zfs);
        }
    }
    let mut cd = [0u8; 5];
    dev.read_lenient(32769, &mut cd)?;
    if &cd == b"CD001" {
        return Ok(Found::Iso9660);
    }
    if head.iter().all(|&b| b == 0) {
        return Ok(Found::Empty);
    }
    Ok(Found::Unknown)
}

/// A FAT boot sector: jump instruction and a sane BIOS parameter block.
pub(crate) fn is_fat(b: &[u8]) -> bool {
    let jump = u8at(b, 0) == 0xEB || u8at(b, 0) == 0xE9;
    let bps = le16(b, 11);
    let spc = u8at(b, 13);
    let reserved = le16(b, 14);
    let fats = u8at(b, 16);
    jump && matches!(bps, 512 | 1024 | 2048 | 4096)
        && spc != 0
        && spc.is_power_of_two()
        && reserved != 0
        && (1..=2).contains(&fats)
        && u8at(b, 510) == 0x55
        && u8at(b, 511) == 0xAA
}

/// The text of `files/<part>/README` for a partition we do not read.
pub fn readme(found: &Found, part: &Partition) -> String {
    let (what, tool) = match found {
        Found::Xfs => ("an XFS filesystem", "xfs_db, or mount it on Linux"),
        Found::Ntfs => ("an NTFS filesystem", "ntfs-3g (ntfsls, ntfscp) or Windows"),
        Found::Lvm2 => (
            "an LVM2 physical volume",
            "lvm2 (pvscan, vgchange -ay) on a host that can attach the disk",
        ),
        Found::Btrfs => (
            "a btrfs filesystem",
            "btrfs-progs (btrfs restore) or a Linux mount",
        ),
        Found::Swap => (
            "a Linux swap area (no files)",
            "nothing: swap holds no files",
        ),
        Found::Luks => (
            "a LUKS encrypted volume",
            "cryptsetup open with the passphrase, then read the filesystem inside",
        ),
        Found::Zfs => ("a ZFS pool member", "zfs (zpool import -o readonly=on)"),
        Found::Bcachefs => ("a bcachefs filesystem", "bcachefs-tools or a Linux mount"),
        Found::Squashfs => ("a squashfs image", "unsquashfs (squashfs-tools)"),
        Found::Exfat => (
            "an exFAT filesystem",
            "exfatprogs / fuse-exfat or a Linux mount",
        ),
        Found::Iso9660 => ("an ISO 9660 filesystem", "7z, bsdtar, or a Linux mount"),
        Found::MdRaid => ("a Linux MD RAID member", "mdadm --assemble --readonly"),
        Found::Empty => (
            "no data in the first 68 KiB (unformatted or wiped)",
            "nothing: there is no filesystem to read",
        ),
        Found::Unknown => (
            "no filesystem signature snapfs recognises",
            "blkid or file -s on the raw disk to identify it",
        ),
        Found::Ext4 | Found::Fat => ("a filesystem snapfs could not open", "see the daemon log"),
    };
    format!(
        "Partition {} ({}, {} at byte offset {}) holds {what}.\n\
         snapfs does not show its files. To read it: {tool}.\n\
         The raw bytes are in the disk's .raw file at that offset.\n",
        part.name,
        part.type_desc,
        human_size(part.length),
        part.offset,
    )
}

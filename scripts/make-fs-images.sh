#!/usr/bin/env bash
# make-fs-images.sh OUTDIR: disk images with guest filesystems, for file-level restore tests.
#
#   OUTDIR/src/           the source tree every filesystem is filled from (compare against it)
#   OUTDIR/src-plain/     its regular files and directories only: what FAT gets
#   OUTDIR/src-ntfs/      src-plain plus compressed/ and links/: what NTFS gets (compressed/ is
#                         an NTFS compressed folder: its files are stored LZNT1-compressed;
#                         links/ holds symlink and junction reparse points)
#   OUTDIR/ntfs512.raw    NTFS with 512-byte clusters (8 KiB compression units), no partition table
#   OUTDIR/gpt.raw        GPT: p1 ext4, p2 FAT32, p3 XFS, p4 NTFS, p5 swap, p6 LUKS2 header, p7 nothing
#   OUTDIR/mbr.raw        MBR: p1 ext2 (no journal), p2 extended with p5 ext3 and p6 FAT16
#   OUTDIR/whole.raw      ext4 without a partition table, inline_data, no metadata_csum
#   OUTDIR/lvm.raw        GPT p1 = LVM2 PV of VG snapfsvg: LV root (ext4, two segments), LV data (FAT16)
#   OUTDIR/crash-ext4.raw ext4 copied while mounted: many/ committed to the journal, not yet in place
#   OUTDIR/crash-ext3.raw the same with ext3 (jbd2 journal without checksum v3: ext4-view refuses it)
#   OUTDIR/crash-xfs.raw  XFS v5 copied while mounted: the whole tree is in the log only
#   OUTDIR/crash-xfs-churn.raw  XFS v5, most of the tree in place, then deletes (cancelled
#                         buffers, freed inode chunks) and many/ in the log only (256 KiB iclogs)
#   OUTDIR/fuzz-seeds/restore_*/  small seed inputs for the cargo fuzz targets
#
# Standard tools only: mkfs.ext4 -d, mkfs.fat + mcopy, mkfs.xfs, mkntfs + ntfs-3g, mkswap,
# cryptsetup, sgdisk, sfdisk, python3. XFS, NTFS and the crash images are filled through a loop
# (or FUSE) mount, so hard links, owners, times and xattrs land as a guest would write them.
# Needs root. ~20 s.
set -euo pipefail

OUT=${1:?usage: make-fs-images.sh OUTDIR}
for cmd in mkfs.ext4 mkfs.fat mcopy mkfs.xfs fsfreeze mkntfs ntfs-3g mkswap sgdisk sfdisk setfattr python3 losetup pvcreate; do
  command -v "$cmd" >/dev/null || {
    echo "make-fs-images: $cmd missing (apt-get install e2fsprogs dosfstools mtools xfsprogs ntfs-3g util-linux gdisk fdisk attr python3 lvm2)" >&2
    exit 1
  }
done
(( EUID == 0 )) || { echo "make-fs-images: needs root (loop mounts, chown)" >&2; exit 1; }

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
rm -rf "${OUT:?}/src" "$OUT/src-plain" "$OUT"/*.raw "$OUT/.done" "$OUT/work"
WORK="$OUT/work"
MNT="$WORK/mnt"
mkdir -p "$WORK" "$MNT"
SRC="$OUT/src"
T='2024-01-02 03:04:05 UTC'

LOOP=
cleanup() {
  if mountpoint -q "$MNT"; then umount "$MNT" || true; fi
  if [[ -n $LOOP ]]; then losetup -d "$LOOP" 2>/dev/null || true; fi
}
trap cleanup EXIT

# Deterministic bytes: `gen SEED SIZE FILE`.
gen() {
  python3 - "$@" <<'EOF'
import random, sys
seed, size, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
r = random.Random(seed)
with open(path, "wb") as f:
    f.write(r.randbytes(size))
EOF
}

# ---------------------------------------------------------------------------------------------
# The source tree
mkdir -p "$SRC/dir/nested/deep" "$SRC/private" "$SRC/bin" "$SRC/many" "$SRC/shared"
printf 'Hello from snapfs restore tests\n' > "$SRC/hello.txt"
printf 'deep file\n' > "$SRC/dir/nested/deep/file.txt"
printf 'top secret\n' > "$SRC/private/secret.txt"
printf '#!/bin/sh\necho tool\n' > "$SRC/bin/tool.sh"
printf 'setuid\n' > "$SRC/bin/suid"
printf 'spaces\n' > "$SRC/name with spaces.txt"
printf 'unicode\n' > "$SRC/ünïcødé — ✓.txt"
: > "$SRC/empty"
for n in 1 4095 4096 4097 70000; do gen "$n" "$n" "$SRC/size-$n.bin"; done
gen 7 1500000 "$SRC/big.bin"
truncate -s 8M "$SRC/sparse.bin"
printf 'start' | dd of="$SRC/sparse.bin" conv=notrunc status=none
printf 'middle' | dd of="$SRC/sparse.bin" bs=1 seek=4194304 conv=notrunc status=none
printf 'end' | dd of="$SRC/sparse.bin" bs=1 seek=8388605 conv=notrunc status=none
for i in $(seq -w 1 150); do printf '%s\n' "$i" > "$SRC/many/entry-with-a-long-name-to-fill-blocks-$i"; done
# 1000 entries: XFS node-form and ext4 multi-level htree directories. 200 data runs with holes
# between them: an XFS B+tree extent map and an ext4 extent tree of depth 1.
python3 - "$SRC" <<'EOF2'
import os, sys
src = sys.argv[1]
os.mkdir(os.path.join(src, "big-dir"))
for i in range(1000):
    with open(os.path.join(src, "big-dir", f"file-number-{i:04d}-with-a-longish-name"), "w") as f:
        f.write(f"{i}\n")
with open(os.path.join(src, "fragmented.bin"), "wb") as f:
    for i in range(200):
        f.seek(i * 8192)
        f.write(bytes([i % 251 + 1]) * 4096)
EOF2
ln -s hello.txt "$SRC/link-fast"
ln -s dir/nested/deep/../deep/file.txt/and/a/target/that/is/longer/than/sixty/bytes/for/a/slow/symlink "$SRC/link-slow"
ln -s dir/nested "$SRC/link-to-dir"
ln "$SRC/hello.txt" "$SRC/dir/hello-hardlink.txt"
mkfifo "$SRC/fifo"
chmod 0644 "$SRC/hello.txt" "$SRC/name with spaces.txt" "$SRC/ünïcødé — ✓.txt"
chmod 0700 "$SRC/private"; chmod 0600 "$SRC/private/secret.txt"
chmod 0755 "$SRC/bin/tool.sh"; chmod 4755 "$SRC/bin/suid"; chmod 1777 "$SRC/dir/nested"
chmod 2775 "$SRC/shared"
chown 1000:1000 "$SRC/dir/nested/deep/file.txt" "$SRC/size-4097.bin" "$SRC/shared"
chown 0:100 "$SRC/bin/tool.sh"
setfattr -n user.comment -v 'restore me' "$SRC/hello.txt"
setfattr -n user.big -v "0x$(printf 'ab%.0s' $(seq 1 300))" "$SRC/size-4096.bin"
setfattr -n user.dir -v here "$SRC/dir"
# POSIX ACLs (as the kernel's xattr form, so the acl package is not needed): user 1000 rw on a
# file, a default ACL with group 1000 rwx on a directory.
setfattr -n system.posix_acl_access \
  -v 0x0200000001000600ffffffff02000600e803000004000400ffffffff10000600ffffffff20000400ffffffff \
  "$SRC/size-1.bin"
setfattr -n system.posix_acl_default \
  -v 0x0200000001000700ffffffff04000500ffffffff08000700e803000010000700ffffffff20000500ffffffff \
  "$SRC/shared"
find "$SRC" -exec touch -h -d "$T" {} +

# A FAT-friendly copy: regular files and directories only (FAT has no links, fifos or owners).
FATSRC="$OUT/src-plain"
mkdir -p "$FATSRC"
(cd "$SRC" && find . -type d -printf '%P\0' | xargs -0 -I{} mkdir -p "$FATSRC/{}")
(cd "$SRC" && find . -type f -links 1 -printf '%P\0' | xargs -0 -I{} cp -p {} "$FATSRC/{}")
cp -p "$SRC/hello.txt" "$FATSRC/hello.txt"
find "$FATSRC" -exec touch -h -d "$T" {} +

# The NTFS copy: src-plain plus compressed/, whose files land LZNT1-compressed (ntfs-3g's
# `compression` option, its default, compresses new files in a folder with attribute 0x800):
# one byte (resident), exactly one 64 KiB compression unit, a partial last unit, text with
# incompressible random stretches (stored units between compressed ones), random data (all
# units stored), zeros and a sparse file (units written as holes), and a 12 MiB log whose ~400
# runs need an attribute list.
NTFSSRC="$OUT/src-ntfs"
rm -rf "$NTFSSRC"
cp -a "$FATSRC" "$NTFSSRC"
mkdir -p "$NTFSSRC/compressed/sub"
python3 - "$NTFSSRC/compressed" <<'EOF2'
import os, random, sys
d = sys.argv[1]
r = random.Random(5)
def put(name, data):
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)
words = b"the quick brown fox jumps over a lazy dog while snapshots restore files".split()
def text(n):
    out = bytearray()
    while len(out) < n:
        out += b" ".join(r.choice(words) for _ in range(r.randrange(3, 12))) + b"\n"
    return bytes(out[:n])
put("one-byte.txt", b"x")
put("unit-64k.txt", text(65536))
put("partial-5000.txt", text(5000))
mixed = bytearray()
while len(mixed) < 3_000_000:
    mixed += text(r.randrange(20_000, 300_000))
    mixed += r.randbytes(r.randrange(1, 150_000))
put("mixed-3m.txt", bytes(mixed[:3_000_000]))
put("random-200k.bin", r.randbytes(200_000))
put("zeros-300k.bin", bytes(300_000))
put("sub/log-12m.txt", b"".join(b"%08d INFO request %d served in %d ms\n" % (i, i * 7 % 1000, i % 97)
                                for i in range(300_000))[:12 << 20])
with open(os.path.join(d, "sparse-2m.bin"), "wb") as f:
    f.truncate(2 << 20)
    f.seek(1_000_000)
    f.write(text(70_000))
EOF2
# links/: NTFS reparse points, shown as symlinks to their print name with \ turned into /.
# fill() makes them with ntfs-3g's system.ntfs_reparse_data (cp would make Interix symlinks).
# NAME KIND(symlink|junction) DIR(0|1) TARGET
NTFS_LINKS=(
  "file-rel symlink 0 ../hello.txt"
  "dir-rel symlink 1 ../dir/nested"
  "abs symlink 0 C:/Windows/System32/drivers/etc/hosts"
  "junction junction 1 C:/Users/Public"
)
mkdir -p "$NTFSSRC/links"
for l in "${NTFS_LINKS[@]}"; do
  read -r name _ _ target <<<"$l"
  ln -s "$target" "$NTFSSRC/links/$name"
done
find "$NTFSSRC" -exec touch -h -d "$T" {} +

# `reparse_hex KIND TARGET`: a symlink (relative unless TARGET has a drive letter) or junction
# reparse buffer, as the hex value setfattr takes.
reparse_hex() {
  python3 - "$@" <<'EOF2'
import struct, sys
kind, target = sys.argv[1], sys.argv[2]
win = target.replace("/", "\\")
absolute = len(win) > 1 and win[1] == ":"
subst = ("\\??\\" + win if absolute else win).encode("utf-16-le")
prnt = win.encode("utf-16-le")
if kind == "symlink":
    body = struct.pack("<HHHHI", 0, len(subst), len(subst), len(prnt), 0 if absolute else 1) + subst + prnt
    tag = 0xA000000C
else:
    body = struct.pack("<HHHH", 0, len(subst), len(subst) + 2, len(prnt)) + subst + b"\0\0" + prnt + b"\0\0"
    tag = 0xA0000003
print("0x" + (struct.pack("<IHH", tag, len(body), 0) + body).hex())
EOF2
}

# `fill FSIMG TYPE [MOUNTOPTS]`: loop-mount a filesystem image and copy the source tree in.
fill() {
  local img=$1 type=$2 opts=${3:-}
  if [[ $type == ntfs ]]; then
    ntfs-3g -o "loop${opts:+,$opts}" "$img" "$MNT"
  else
    mount -t "$type" -o "loop${opts:+,$opts}" "$img" "$MNT"
  fi
  if [[ $type == ntfs ]]; then
    mkdir "$MNT/compressed" "$MNT/links"
    setfattr -h -v 0x00000810 -n system.ntfs_attrib_be "$MNT/compressed"
    find "$NTFSSRC" -mindepth 1 -maxdepth 1 ! -name links -exec cp -r --preserve=timestamps {} "$MNT/" \;
    local l name kind isdir target
    for l in "${NTFS_LINKS[@]}"; do
      read -r name kind isdir target <<<"$l"
      if (( isdir )); then mkdir "$MNT/links/$name"; else : > "$MNT/links/$name"; fi
      # Times first: ntfs-3g cannot set them on a junction afterwards (EIO).
      touch -d "$T" "$MNT/links/$name"
      setfattr -h -n system.ntfs_reparse_data -v "$(reparse_hex "$kind" "$target")" "$MNT/links/$name"
    done
    find "$MNT" -mindepth 1 ! -path "$MNT/links/*" -exec touch -h -d "$T" {} +
    # Every file under compressed/ must really be compressed (attribute 0x800).
    local f a
    while IFS= read -r -d '' f; do
      a=$(getfattr -h -e hex -n system.ntfs_attrib_be --only-values "$f" 2>/dev/null | od -An -tx1 | tr -d ' \n')
      (( (0x${a:-0} & 0x800) != 0 )) || { echo "make-fs-images: $f not compressed (attrib 0x$a)" >&2; exit 1; }
    done < <(find "$MNT/compressed" -type f -print0)
  else
    cp -a "$SRC/." "$MNT/"
    touch -h -d "$T" "$MNT"
  fi
}

# ---------------------------------------------------------------------------------------------
# Filesystems, each in its own file, then assembled into disks.
export E2FSPROGS_FAKE_TIME=1704164645
mkfs.ext4 -q -F -b 4096 -L restore-ext4 -U 5eed0000-0000-4000-8000-0000000000e4 -d "$SRC" "$WORK/ext4.img" 32M
mkfs.ext4 -q -F -t ext2 -b 1024 -L restore-ext2 -d "$SRC" "$WORK/ext2.img" 24M
mkfs.ext4 -q -F -t ext3 -b 2048 -L restore-ext3 -d "$SRC" "$WORK/ext3.img" 24M
mkfs.ext4 -q -F -O inline_data,^metadata_csum,^64bit -I 256 -L restore-whole -d "$SRC" "$WORK/whole.img" 24M
for f in ext4 ext2 ext3 whole; do
  e2fsck -fn "$WORK/$f.img" >/dev/null 2>&1 || { echo "make-fs-images: $f.img not clean" >&2; exit 1; }
done

truncate -s 40M "$WORK/fat32.img"
mkfs.fat -F 32 -n RESTOREFAT -i 5eed0032 "$WORK/fat32.img" >/dev/null
truncate -s 16M "$WORK/fat16.img"
mkfs.fat -F 16 -n RESTORE16 -i 5eed0016 "$WORK/fat16.img" >/dev/null
for f in fat32 fat16; do
  MTOOLS_SKIP_CHECK=1 mcopy -s -m -Q -i "$WORK/$f.img" "$FATSRC"/* ::/
done

truncate -s 300M "$WORK/xfs.img"
mkfs.xfs -q -f -L restorexfs -m uuid=5eed0000-0000-4000-8000-0000000000f5 "$WORK/xfs.img"
fill "$WORK/xfs.img" xfs
umount "$MNT"

truncate -s 16M "$WORK/ntfs.img"
mkntfs -q -F -Q -L restorentfs "$WORK/ntfs.img" >/dev/null 2>&1
fill "$WORK/ntfs.img" ntfs
umount "$MNT"
truncate -s 32M "$OUT/ntfs512.raw"
mkntfs -q -F -Q -c 512 -L ntfs512 "$OUT/ntfs512.raw" >/dev/null 2>&1
fill "$OUT/ntfs512.raw" ntfs
umount "$MNT"

truncate -s 4M "$WORK/swap.img"
mkswap -q -L restoreswap -U 5eed0000-0000-4000-8000-0000000000a5 "$WORK/swap.img" >/dev/null
truncate -s 16M "$WORK/luks.img"
if command -v cryptsetup >/dev/null \
  && printf 'pw' | cryptsetup luksFormat -q --type luks2 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 \
       "$WORK/luks.img" - >/dev/null 2>&1; then :
else
  printf 'LUKS\xba\xbe\x00\x02' | dd of="$WORK/luks.img" conv=notrunc status=none
fi

# `put DISK IMG MIB`: copy a filesystem image into the disk at MIB MiB, keeping holes.
put() { dd if="$2" of="$1" bs=1M seek="$3" conv=notrunc,sparse status=none; }

# GPT disk (sizes in MiB; partition N starts where N-1 ends, from 1 MiB).
truncate -s 404M "$OUT/gpt.raw"
sgdisk -o -U 5eed0000-0000-4000-8000-000000000001 \
  -n 1:1M:+32M -t 1:8300 -c 1:rootfs \
  -n 2:33M:+40M -t 2:ef00 -c 2:"EFI system" \
  -n 3:73M:+300M -t 3:8300 -c 3:xfs \
  -n 4:373M:+16M -t 4:0700 -c 4:windows \
  -n 5:389M:+4M -t 5:8200 -c 5:swap \
  -n 6:393M:+8M -t 6:8309 -c 6:luks \
  -n 7:401M:+1M -t 7:8300 -c 7:empty \
  "$OUT/gpt.raw" >/dev/null
put "$OUT/gpt.raw" "$WORK/ext4.img" 1
put "$OUT/gpt.raw" "$WORK/fat32.img" 33
put "$OUT/gpt.raw" "$WORK/xfs.img" 73
put "$OUT/gpt.raw" "$WORK/ntfs.img" 373
put "$OUT/gpt.raw" "$WORK/swap.img" 389
dd if="$WORK/luks.img" of="$OUT/gpt.raw" bs=1M seek=393 count=8 conv=notrunc,sparse status=none
[[ $(sgdisk -v "$OUT/gpt.raw") == *'No problems found'* ]] || { echo "make-fs-images: bad GPT" >&2; exit 1; }

# MBR disk: p1 primary ext2 (1-25 MiB), p2 extended (26-70 MiB) with p5 ext3 and p6 FAT16.
truncate -s 72M "$OUT/mbr.raw"
sfdisk -q "$OUT/mbr.raw" <<'EOF'
label: dos
label-id: 0x5eed0001
start=2048, size=49152, type=83
start=53248, size=90112, type=5
start=55296, size=49152, type=83
start=106496, size=32768, type=6
EOF
put "$OUT/mbr.raw" "$WORK/ext2.img" 1
put "$OUT/mbr.raw" "$WORK/ext3.img" 27
put "$OUT/mbr.raw" "$WORK/fat16.img" 52

cp --sparse=always "$WORK/whole.img" "$OUT/whole.raw"

# LVM2: no device-mapper here, so LVs cannot be activated or written through. The PV and VG are
# made with pvcreate/vgcreate on a loop device, the LVs added to a vgcfgbackup and written back
# with vgcfgrestore, and the filesystems copied to where the LV segments lie on the PV.
# Extents are 4 MiB, pe_start 1 MiB: root = PV extents 0-3 + 8-9 (24 MiB), data = extents 4-5.
export LVM_SUPPRESS_FD_WARNINGS=1
truncate -s 64M "$WORK/pv.img"
LOOP=$(losetup -f --show "$WORK/pv.img")
lvm_done() { losetup -d "$LOOP" 2>/dev/null || true; LOOP=; }
pvcreate -q -y --dataalignment 1m "$LOOP" >/dev/null
vgcreate -q -s 4m snapfsvg "$LOOP" >/dev/null
vgcfgbackup -q -f "$WORK/vg.txt" snapfsvg >/dev/null
python3 - "$WORK/vg.txt" <<'EOF2'
import sys
p = sys.argv[1]
s = open(p).read()
def seg(n, start, count, pe):
    return f"""
			segment{n} {{
				start_extent = {start}
				extent_count = {count}
				type = "striped"
				stripe_count = 1
				stripes = [
					"pv0", {pe}
				]
			}}"""
def lv(name, n, segs):
    return f"""
		{name} {{
			id = "5eed00-0000-0000-0000-0000-0000-00000{n}"
			status = ["READ", "WRITE", "VISIBLE"]
			flags = []
			segment_count = {len(segs)}
{"".join(segs)}
		}}"""
lvs = "\n\tlogical_volumes {\n" + lv("root", 1, [seg(1, 0, 4, 0), seg(2, 4, 2, 8)]) + lv("data", 2, [seg(1, 0, 2, 4)]) + "\n\t}\n"
i = s.rindex("}")
open(p, "w").write(s[:i] + lvs + s[i:])
EOF2
vgcfgrestore -q -f "$WORK/vg.txt" snapfsvg >/dev/null 2>&1 || { lvm_done; echo "make-fs-images: vgcfgrestore failed" >&2; exit 1; }
pe_start=$(pvs --noheadings --units b --nosuffix -o pe_start "$LOOP" | tr -d ' ')
vgchange -q -an snapfsvg >/dev/null 2>&1 || true
lvm_done
[[ $pe_start == 1048576 ]] || { echo "make-fs-images: unexpected pe_start $pe_start" >&2; exit 1; }
mkfs.ext4 -q -F -b 4096 -L lvm-root -d "$SRC" "$WORK/lvroot.img" 24M
dd if="$WORK/lvroot.img" of="$WORK/pv.img" bs=1M count=16 seek=1 conv=notrunc,sparse status=none
dd if="$WORK/lvroot.img" of="$WORK/pv.img" bs=1M skip=16 count=8 seek=33 conv=notrunc,sparse status=none
truncate -s 8M "$WORK/lvdata.img"
mkfs.fat -F 16 -s 1 -n LVMDATA -i 5eed0088 "$WORK/lvdata.img" >/dev/null
MTOOLS_SKIP_CHECK=1 mcopy -s -m -Q -i "$WORK/lvdata.img" "$FATSRC"/hello.txt "$FATSRC"/dir ::/
dd if="$WORK/lvdata.img" of="$WORK/pv.img" bs=1M seek=17 conv=notrunc,sparse status=none
truncate -s 67M "$OUT/lvm.raw"
sgdisk -o -n 1:1M:+64M -t 1:8e00 -c 1:lvm "$OUT/lvm.raw" >/dev/null
put "$OUT/lvm.raw" "$WORK/pv.img" 1

# Crash-consistent images: fill and sync the filesystem, then add many/, fsync it so jbd2 commits
# it, and copy the image before the kernel writes those metadata blocks in place (that
# takes the 30 s dirty expiry). The copy has needs_recovery, and many/ exists only in the journal.
crash() {
  local name=$1 type=$2
  rm -f "$WORK/crash.img"
  mkfs.ext4 -q -F -t "$type" -L "crash-$type" "$WORK/crash.img" 32M
  mount -t ext4 -o loop,commit=1 "$WORK/crash.img" "$MNT"
  local items=()
  local e
  for e in "$SRC"/* "$SRC"/.[!.]*; do
    [[ -e $e || -L $e ]] || continue
    [[ $(basename "$e") == many ]] || items+=("$e")
  done
  cp -a "${items[@]}" "$MNT/"
  sync -f "$MNT"
  cp -a "$SRC/many" "$MNT/"
  touch -h -d "$T" "$MNT"
  # fsync each new file (delayed allocation: without it the journal holds them empty, which is
  # what a crash would leave); unlike sync -f this does not write the metadata in place.
  sync "$MNT/many"/* "$MNT/many" "$MNT"
  sleep 2
  cp --sparse=always "$WORK/crash.img" "$OUT/$name"
  umount "$MNT"
  if ! dumpe2fs -h "$OUT/$name" 2>/dev/null | grep -q needs_recovery; then
    echo "make-fs-images: warning: $name does not need recovery" >&2
  fi
  if debugfs -R "ls /many" "$OUT/$name" 2>/dev/null | grep -q entry-with; then
    echo "make-fs-images: warning: $name has many/ in place already (replay not exercised)" >&2
  fi
}
crash crash-ext4.raw ext4
crash crash-ext3.raw ext3

# The same for XFS: after the fsyncs every change sits in the log (each fsync forces it), and XFS
# writes metadata in place only when its AIL is pushed: by log space pressure or by the log worker
# every fs.xfs.xfssyncd_centisecs (30 s). The worker's first run is queued at mount with the value
# of that moment, so the sysctl is raised around the mount only (and put back right after it, or
# by cleanup on a failure). Nothing is synced before many/ either: the whole tree lives in the
# log, so the replay rebuilds the root directory, big-dir/ and every inode chunk (icreate) too.
SYNCD=/proc/sys/fs/xfs/xfssyncd_centisecs
SYNCD_OLD=
restore_syncd() {
  if [[ -n $SYNCD_OLD ]]; then echo "$SYNCD_OLD" > "$SYNCD" || true; SYNCD_OLD=; fi
}
trap 'restore_syncd; cleanup' EXIT
crash_xfs() {
  local name=$1 churn=$2
  rm -f "$WORK/crash.img"
  truncate -s 300M "$WORK/crash.img"
  mkfs.xfs -q -f -L crash-xfs -m uuid=5eed0000-0000-4000-8000-0000000000c5 "$WORK/crash.img"
  if [[ -w $SYNCD ]]; then SYNCD_OLD=$(cat "$SYNCD"); echo 360000 > "$SYNCD"; fi
  # The churn image uses 256 KiB iclogs: records with extended headers.
  # nouuid: the UUID is fixed (seeds and expectations name it), and XFS refuses a second mount
  # of one UUID, e.g. when two checkouts build their images at the same time.
  mount -t xfs -o "loop,nouuid$( (( churn )) && echo ,logbsize=256k)" "$WORK/crash.img" "$MNT"
  restore_syncd
  if (( churn )); then
    # Churn: a directory written in place (a freeze writes back everything and cleans the
    # log), then removed in the log; another created, synced and removed in the log only (its
    # buffers are logged, then cancelled, and its blocks free for many/ to reuse).
    local items=() e i
    for e in "$SRC"/* "$SRC"/.[!.]*; do
      [[ -e $e || -L $e ]] || continue
      [[ $(basename "$e") == many ]] || items+=("$e")
    done
    cp -a "${items[@]}" "$MNT/"
    mkdir "$MNT/junk" "$MNT/junk2"
    for i in $(seq 1 300); do echo "junk $i" > "$MNT/junk/file-with-a-long-name-$i"; done
    fsfreeze -f "$MNT"
    fsfreeze -u "$MNT"
    rm -rf "$MNT/junk"
    for i in $(seq 1 300); do gen "$i" 5000 "$MNT/junk2/other-file-with-a-long-name-$i"; done
    sync -f "$MNT"
    rm -rf "$MNT/junk2"
    sync -f "$MNT"
    cp -a "$SRC/many" "$MNT/"
  else
    cp -a "$SRC/." "$MNT/"
  fi
  touch -h -d "$T" "$MNT"
  # syncfs writes the file data and forces the log; the metadata stays in the log only.
  sync -f "$MNT"
  sleep 1
  cp --sparse=always "$WORK/crash.img" "$OUT/$name"
  umount "$MNT"
  if xfs_db -r -c 'ls /many' "$OUT/$name" 2>/dev/null | grep -q entry-with; then
    echo "make-fs-images: warning: $name has many/ in place already (replay not exercised)" >&2
  fi
  if xfs_logprint -t "$OUT/$name" 2>/dev/null | grep -q 'state: <CLEAN>'; then
    echo "make-fs-images: warning: $name has a clean log (replay not exercised)" >&2
  fi
}
crash_xfs crash-xfs.raw 0
crash_xfs crash-xfs-churn.raw 1

# Small seeds for the cargo fuzz targets (fuzz/fuzz_targets/restore_*.rs): tiny filesystems,
# and the metadata-bearing heads of the big ones.
SEEDS="$OUT/fuzz-seeds"
rm -rf "$SEEDS"
mkdir -p "$SEEDS"/restore_{partitions,ext4,fat,xfs,ntfs} "$WORK/tiny/d"
printf 'tiny\n' > "$WORK/tiny/f"
ln -s f "$WORK/tiny/l"
ln "$WORK/tiny/f" "$WORK/tiny/d/h"
setfattr -n user.x -v y "$WORK/tiny/f"
mkfs.ext4 -q -F -b 1024 -N 16 -O ^has_journal,^resize_inode -d "$WORK/tiny" "$SEEDS/restore_ext4/plain" 128K
mkfs.ext4 -q -F -b 1024 -N 16 -I 256 -O ^has_journal,^resize_inode,inline_data,^metadata_csum \
  -d "$WORK/tiny" "$SEEDS/restore_ext4/inline" 128K
truncate -s 64K "$SEEDS/restore_fat/fat12"
mkfs.fat -F 12 -i 5eed0012 "$SEEDS/restore_fat/fat12" >/dev/null
MTOOLS_SKIP_CHECK=1 mcopy -s -m -Q -i "$SEEDS/restore_fat/fat12" "$WORK/tiny/f" "$WORK/tiny/d" ::/
dd if="$OUT/gpt.raw" of="$SEEDS/restore_xfs/head" bs=1K skip=$((73 * 1024)) count=96 status=none
# The head of crash-xfs.raw with the first 512 KiB of its dirty log moved right behind it
# (sb_logstart 24, sb_logblocks 128): the log parser's seed (its items point past the seed).
python3 - "$OUT/crash-xfs.raw" "$SEEDS/restore_xfs/crash-log" <<'EOF2'
import struct, sys
src, dst = sys.argv[1], sys.argv[2]
with open(src, "rb") as f:
    head = bytearray(f.read(96 * 1024))
    bs, = struct.unpack(">I", head[4:8])
    logstart, = struct.unpack(">Q", head[48:56])
    agblocks, = struct.unpack(">I", head[84:88])
    agblklog = head[124]
    f.seek(((logstart >> agblklog) * agblocks + (logstart & ((1 << agblklog) - 1))) * bs)
    log = f.read(128 * bs)
head[48:56] = struct.pack(">Q", 24)
head[96:100] = struct.pack(">I", 128)
with open(dst, "wb") as f:
    f.write(bytes(head) + log)
EOF2
truncate -s 2M "$SEEDS/restore_ntfs/small"
mkntfs -q -F -Q -L s "$SEEDS/restore_ntfs/small" >/dev/null 2>&1
ntfs-3g -o loop "$SEEDS/restore_ntfs/small" "$MNT"
cp -r "$WORK/tiny/f" "$WORK/tiny/d" "$MNT/"
mkdir "$MNT/c"
setfattr -h -v 0x00000810 -n system.ntfs_attrib_be "$MNT/c"
cp "$NTFSSRC/compressed/partial-5000.txt" "$MNT/c/"
: > "$MNT/l"
setfattr -h -n system.ntfs_reparse_data -v "$(reparse_hex symlink ../f)" "$MNT/l"
umount "$MNT"
# The jbd2 target's seeds: a block-size byte (0: 1 KiB), then the first 64 blocks of the crash
# images' journals (csum v3 and no checksums), superblock first.
mkdir -p "$SEEDS/restore_jbd2"
for c in ext4 ext3; do
  img="$OUT/crash-$c.raw"
  bs=$(dumpe2fs -h "$img" 2>/dev/null | awk -F: '/^Block size/ {print $2 + 0}')
  jstart=$(debugfs -R 'bmap <8> 0' "$img" 2>/dev/null)
  n=$(( bs == 1024 ? 0 : bs == 2048 ? 1 : 2 ))
  { printf "\\$(printf %03o "$n")"
    dd if="$img" bs="$bs" skip="$jstart" count=64 status=none; } > "$SEEDS/restore_jbd2/crash-$c"
done
dd if="$OUT/gpt.raw" of="$SEEDS/restore_partitions/gpt" bs=512 count=34 status=none
truncate -s 1M "$SEEDS/restore_partitions/mbr"
sfdisk -q "$SEEDS/restore_partitions/mbr" <<'EOF2'
label: dos
start=64, size=256, type=83
start=512, size=1024, type=5
start=576, size=128, type=6
start=768, size=128, type=83
EOF2
dd if="$SEEDS/restore_ext4/plain" of="$SEEDS/restore_partitions/mbr" bs=512 seek=64 conv=notrunc status=none

rm -rf "$WORK"
# The tests rebuild when this script changes: .done holds its sha256.
sha256sum "$0" | cut -d' ' -f1 > "$OUT/.done"
echo "make-fs-images: built $(cd "$OUT" && printf '%s ' *.raw)in $OUT"

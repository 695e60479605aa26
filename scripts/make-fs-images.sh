#!/usr/bin/env bash
# make-fs-images.sh OUTDIR: disk images with guest filesystems, for file-level restore tests.
#
#   OUTDIR/src/           the source tree every filesystem is filled from (compare against it)
#   OUTDIR/src-plain/     its regular files and directories only: what FAT and NTFS get
#   OUTDIR/gpt.raw        GPT: p1 ext4, p2 FAT32, p3 XFS, p4 NTFS, p5 swap, p6 LUKS2 header, p7 nothing
#   OUTDIR/mbr.raw        MBR: p1 ext2 (no journal), p2 extended with p5 ext3 and p6 FAT16
#   OUTDIR/whole.raw      ext4 without a partition table, inline_data, no metadata_csum
#   OUTDIR/crash-ext4.raw ext4 copied while mounted after a sync: committed journal not checkpointed
#   OUTDIR/crash-ext3.raw the same with ext3 (jbd2 journal without checksum v3: ext4-view refuses it)
#
# Standard tools only: mkfs.ext4 -d, mkfs.fat + mcopy, mkfs.xfs, mkntfs + ntfs-3g, mkswap,
# cryptsetup, sgdisk, sfdisk, python3. XFS, NTFS and the crash images are filled through a loop
# (or FUSE) mount, so hard links, owners, times and xattrs land as a guest would write them.
# Needs root. ~20 s.
set -euo pipefail

OUT=${1:?usage: make-fs-images.sh OUTDIR}
for cmd in mkfs.ext4 mkfs.fat mcopy mkfs.xfs mkntfs ntfs-3g mkswap sgdisk sfdisk setfattr python3 losetup; do
  command -v "$cmd" >/dev/null || {
    echo "make-fs-images: $cmd missing (apt-get install e2fsprogs dosfstools mtools xfsprogs ntfs-3g util-linux gdisk fdisk attr python3)" >&2
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

cleanup() {
  mountpoint -q "$MNT" && umount "$MNT" || true
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
find "$SRC" -exec touch -h -d "$T" {} +

# A FAT-friendly copy: regular files and directories only (FAT has no links, fifos or owners).
FATSRC="$OUT/src-plain"
mkdir -p "$FATSRC"
(cd "$SRC" && find . -type d -printf '%P\0' | xargs -0 -I{} mkdir -p "$FATSRC/{}")
(cd "$SRC" && find . -type f -links 1 -printf '%P\0' | xargs -0 -I{} cp -p {} "$FATSRC/{}")
cp -p "$SRC/hello.txt" "$FATSRC/hello.txt"
find "$FATSRC" -exec touch -h -d "$T" {} +

# `fill FSIMG TYPE [MOUNTOPTS]`: loop-mount a filesystem image and copy the source tree in.
fill() {
  local img=$1 type=$2 opts=${3:-}
  if [[ $type == ntfs ]]; then
    ntfs-3g -o "loop${opts:+,$opts}" "$img" "$MNT"
  else
    mount -t "$type" -o "loop${opts:+,$opts}" "$img" "$MNT"
  fi
  if [[ $type == ntfs ]]; then
    cp -r --preserve=timestamps "$FATSRC/." "$MNT/"
    find "$MNT" -mindepth 1 -exec touch -h -d "$T" {} +
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

# Crash-consistent images: copy the image while it is mounted, after a sync (journal committed,
# metadata not yet written back in place). `needs_recovery` must be set in the copy.
crash() {
  local name=$1 type=$2
  rm -f "$WORK/crash.img"
  mkfs.ext4 -q -F -t "$type" -L "crash-$type" "$WORK/crash.img" 32M
  mount -t ext4 -o loop,commit=300 "$WORK/crash.img" "$MNT"
  cp -a "$SRC/." "$MNT/"
  touch -h -d "$T" "$MNT"
  sync -f "$MNT"
  cp --sparse=always "$WORK/crash.img" "$OUT/$name"
  umount "$MNT"
  if ! dumpe2fs -h "$OUT/$name" 2>/dev/null | grep -q needs_recovery; then
    echo "make-fs-images: warning: $name was checkpointed before the copy (no replay needed)" >&2
  fi
}
crash crash-ext4.raw ext4
crash crash-ext3.raw ext3

rm -rf "$WORK"
touch "$OUT/.done"
echo "make-fs-images: $(cd "$OUT" && ls ./*.raw | tr '\n' ' ')"

#!/usr/bin/env bash
# Build the snapfs test-image corpus.
#
# Usage: scripts/make-test-images.sh OUTDIR
#
# Creates (after rm -rf of any previous corpus at these paths):
#   OUTDIR/             the images (*.qcow2, *.raw, *.img) served as volumes of pool
#                       `basename OUTDIR`, plus what they need: external data files
#                       (*.data) and the backing/ subdirectory (relative backing path test).
#   OUTDIR-refused/     images snapfs must refuse to open (LUKS, legacy AES, unknown
#                       incompatible feature bit, qcow version 1).
#   OUTDIR-ext4-src/    the source tree of the ext4 filesystem in disk-gpt-ext4.{raw,qcow2}
#                       partition 1 (for file-level comparisons).
# All content is deterministic (fixed patterns, seeded pseudo-random data, fixed GUIDs/UUIDs,
# fixed ext4 timestamps); only qcow2 snapshot dates and LUKS salts differ between builds.
# Tools: qemu-img, qemu-io, sgdisk, mkfs.ext4, python3 (data generation and two header edits
# that qemu-img cannot do). See docs/testing.md for the table of images and features.
set -euo pipefail

if [[ $# -ne 1 || $1 == -h || $1 == --help ]]; then
  sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0" >&2
  exit 2
fi

for cmd in qemu-img qemu-io sgdisk mkfs.ext4 debugfs e2fsck python3; do
  command -v "$cmd" >/dev/null || { echo "make-test-images: $cmd not found (run scripts/install-deps.sh)" >&2; exit 1; }
done

OUT=$(realpath -m -- "$1")
REFUSED="$OUT-refused"
SRC="$OUT-ext4-src"
MARK=.snapfs-test-corpus
START=$(date +%s.%N)

case "$OUT" in
  /|/bin|/boot|/dev|/etc|/home|/lib|/proc|/root|/sys|/tmp|/usr|/var|/work)
    echo "make-test-images: refusing to use $OUT as OUTDIR" >&2; exit 1 ;;
esac
# Only ever delete a directory we made ourselves (it carries the marker) or an empty one.
for d in "$OUT" "$REFUSED" "$SRC"; do
  if [[ -e $d ]]; then
    if [[ -f $d/$MARK ]] || [[ -d $d && -z $(ls -A "$d") ]]; then
      rm -rf -- "$d"
    else
      echo "make-test-images: $d exists and was not made by this script; not deleting it" >&2
      exit 1
    fi
  fi
  mkdir -p -- "$d"
  touch -- "$d/$MARK"
done

cd "$OUT"   # relative backing and data-file names are resolved from the image's directory

# ---------------------------------------------------------------------------------------------
# helpers

SUMMARY=()      # "name|description"
note() { SUMMARY+=("$1|$2"); }

# io FMT IMG CMD...: run qemu-io commands on an image (output of successful writes discarded)
io() {
  local fmt=$1 img=$2; shift 2
  local args=() c
  for c in "$@"; do args+=(-c "$c"); done
  qemu-io -f "$fmt" "${args[@]}" "$img" >/dev/null
}
mk() { qemu-img create -q "$@"; }
snap() { qemu-img snapshot -c "$2" "$1"; }

# Python helper for deterministic data and header edits qemu-img has no option for.
py() {
  python3 - "$@" <<'PY'
import random, struct, sys

cmd = sys.argv[1]
if cmd == "rand":                       # rand SEED NBYTES OUT: seeded incompressible bytes
    seed, n, out = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    with open(out, "wb") as f:
        f.write(random.Random(seed).randbytes(n))
elif cmd == "text":                     # text SEED NBYTES OUT: compressible but not trivial
    seed, n, out = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    r = random.Random(seed)
    words = [w.encode() for w in (
        "qcow2 cluster snapshot backing overlay refcount table entry offset zstd zlib "
        "deflate subcluster bitmap header extension feature guest block device sector "
        "virtual disk image file system inode extent journal").split()]
    buf = bytearray()
    line = 0
    while len(buf) < n:
        buf += b"%08d " % line + b" ".join(r.choice(words) for _ in range(r.randint(4, 12))) + b"\n"
        line += 1
    with open(out, "wb") as f:
        f.write(bytes(buf[:n]))
elif cmd == "drop-ext":                 # drop-ext IMG TYPE_HEX: remove a qcow2 header extension
    img, typ = sys.argv[2], int(sys.argv[3], 16)
    with open(img, "r+b") as f:
        hdr = f.read(4096)
        version = struct.unpack(">I", hdr[4:8])[0]
        hlen = 72 if version == 2 else struct.unpack(">I", hdr[100:104])[0]
        boff = struct.unpack(">Q", hdr[8:16])[0]
        end = boff if boff else 4096
        exts, pos = [], hlen
        while True:
            t, l = struct.unpack(">II", hdr[pos:pos + 8])
            if t == 0:
                break
            exts.append((t, hdr[pos + 8:pos + 8 + l]))
            pos += 8 + ((l + 7) & ~7)
        area = b"".join(struct.pack(">II", t, len(d)) + d + b"\0" * (-len(d) % 8)
                        for t, d in exts if t != typ)
        area += b"\0" * 8
        f.seek(hlen)
        f.write(area + b"\0" * (end - hlen - len(area)))
elif cmd == "set-incompat":             # set-incompat IMG BIT: set an incompatible feature bit
    img, bit = sys.argv[2], int(sys.argv[3])
    with open(img, "r+b") as f:
        f.seek(72)
        v = struct.unpack(">Q", f.read(8))[0] | (1 << bit)
        f.seek(72)
        f.write(struct.pack(">Q", v))
elif cmd == "ext4-wtime":               # ext4-wtime IMG OFFSET EPOCH: pin s_wtime and s_lastcheck
    img, off, t = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    def crc32c_raw(data, crc):          # ext4's crc32c_le without the final inversion
        for b in data:
            crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
        return crc
    with open(img, "r+b") as f:
        f.seek(off + 1024)
        sb = bytearray(f.read(1024))
        assert struct.unpack("<H", sb[0x38:0x3A])[0] == 0xEF53, "no ext4 superblock"
        sb[0x30:0x34] = struct.pack("<I", t & 0xFFFFFFFF)
        sb[0x274] = t >> 32
        sb[0x40:0x44] = struct.pack("<I", t & 0xFFFFFFFF)   # s_lastcheck (set by e2fsck)
        sb[0x275] = t >> 32
        if struct.unpack("<I", sb[0x64:0x68])[0] & 0x400:     # RO_COMPAT_METADATA_CSUM
            sb[0x3FC:0x400] = struct.pack("<I", crc32c_raw(sb[:0x3FC], 0xFFFFFFFF))
        f.seek(off + 1024)
        f.write(sb)
else:
    sys.exit("unknown helper command " + cmd)
PY
}

# Same write script for every cluster size: aligned, unaligned and cluster-crossing writes,
# a zero write over data (zero clusters in v3, COW'd zeros where a cluster is only partly
# covered), a discard, and data in the very last cluster.
common_writes() {
  io qcow2 "$1" \
    'write -P 0x41 0 4k' \
    'write -P 0x42 5000 3000' \
    'write -P 0x43 1M 1M' \
    'write -P 0x45 2M 512' \
    'write -z 1200k 128k' \
    'discard 1900k 64k' \
    'write -P 0x44 4092k 4k'
}

# ---------------------------------------------------------------------------------------------
# raw

truncate -s 8M raw-sparse.raw
io raw raw-sparse.raw \
  'write -P 0x11 0 64k' \
  'write -P 0x12 1M 1M' \
  'write -P 0x00 3M 64k' \
  'write -P 0x13 4M 4k' \
  'write -P 0x14 8188k 4k' \
  'write -z -u 1536k 128k'
note raw-sparse.raw "raw, 8 MiB sparse: holes, data, explicitly written zeros (data), punched hole"

truncate -s 1000007 raw-unaligned.img
io raw raw-unaligned.img 'write -P 0x15 999000 1007'
note raw-unaligned.img "raw with .img extension, size 1000007 (not a multiple of 512)"

: > empty.raw
note empty.raw "raw, 0 bytes"

# ---------------------------------------------------------------------------------------------
# qcow2 versions and cluster sizes

mk -f qcow2 -o compat=0.10,cluster_size=64k v2-c64k.qcow2 4M
common_writes v2-c64k.qcow2
note v2-c64k.qcow2 "qcow2 v2 (compat=0.10), 64 KiB clusters; zero writes deallocate"

for cs in 512 4k 64k 2M; do
  name=v3-c${cs,,}.qcow2
  mk -f qcow2 -o compat=1.1,cluster_size=$cs "$name" 4M
  common_writes "$name"
  note "$name" "qcow2 v3, $cs clusters, zero clusters, discard, unaligned writes"
done

mk -f qcow2 -o cluster_size=64k v3-odd-size.qcow2 3146240
io qcow2 v3-odd-size.qcow2 'write -P 0x46 0 64k' 'write -P 0x47 3145728 512'
note v3-odd-size.qcow2 "qcow2 v3, virtual size 3 MiB + 512 (last cluster partial)"

mk -f qcow2 sparse-1g.qcow2 1G
io qcow2 sparse-1g.qcow2 \
  'write -P 0x48 0 64k' \
  'write -P 0x49 524256k 64k' \
  'write -P 0x4a 1048512k 64k'
note sparse-1g.qcow2 "qcow2 v3, 1 GiB virtual, data at start, across the 512 MiB L2 boundary, at end"

mk -f qcow2 -o cluster_size=64k zero-clusters.qcow2 4M
io qcow2 zero-clusters.qcow2 \
  'write -P 0x51 0 1M' \
  'write -z 0 128k' \
  'write -z -u 256k 128k' \
  'write -z 1M 128k' \
  'discard 512k 64k' \
  'write -P 0x00 2M 64k'
note zero-clusters.qcow2 "qcow2 v3: zero flag on allocated clusters, zero unallocated, zero never-written, discard, data that is zeros"

mk -f qcow2 empty.qcow2 0
note empty.qcow2 "qcow2 v3, virtual size 0"

mk -f qcow2 -o cluster_size=64k qcow2-named.img 2M
io qcow2 qcow2-named.img 'write -P 0x4b 64k 64k'
note qcow2-named.img "qcow2 content with .img extension (format must be probed)"

mk -f qcow2 -o preallocation=metadata prealloc-metadata.qcow2 4M
io qcow2 prealloc-metadata.qcow2 'write -P 0x4c 1M 64k'
note prealloc-metadata.qcow2 "qcow2 v3, preallocation=metadata (L2 entries point at never-written host clusters)"

mk -f qcow2 -o preallocation=falloc prealloc-falloc.qcow2 4M
io qcow2 prealloc-falloc.qcow2 'write -P 0x4d 2M 64k'
note prealloc-falloc.qcow2 "qcow2 v3, preallocation=falloc"

# ---------------------------------------------------------------------------------------------
# extended L2 (subclusters)

mk -f qcow2 -o extended_l2=on,cluster_size=64k extl2.qcow2 4M
io qcow2 extl2.qcow2 \
  'write -P 0x61 0 2k' \
  'write -P 0x62 6k 1k' \
  'write -P 0x63 128k 64k' \
  'write -z 130k 4k' \
  'write -z 200k 6k' \
  'discard 140k 2k' \
  'write -c -P 0x64 256k 64k' \
  'write -P 0x65 1M 100k'
note extl2.qcow2 "extended_l2=on, 64 KiB clusters (2 KiB subclusters): partial subcluster writes, zero and discarded subclusters, a compressed cluster"

mk -f qcow2 -o extended_l2=on,cluster_size=16k extl2-c16k.qcow2 4M
io qcow2 extl2-c16k.qcow2 'write -P 0x66 0 512' 'write -P 0x67 1536 1k' 'write -z 8k 512' 'write -P 0x68 1M 33k'
note extl2-c16k.qcow2 "extended_l2=on, 16 KiB clusters (512 B subclusters)"

mk -f qcow2 -o extended_l2=on,cluster_size=2M extl2-c2m.qcow2 8M
io qcow2 extl2-c2m.qcow2 'write -P 0x69 0 64k' 'write -P 0x6a 2112k 100k' 'write -z 4M 64k'
note extl2-c2m.qcow2 "extended_l2=on, 2 MiB clusters (64 KiB subclusters)"

# ---------------------------------------------------------------------------------------------
# compression

py text 1 2097152 comp-text.bin
py rand 2 1048576 comp-rand.bin
truncate -s 4M comp-src.raw
io raw comp-src.raw \
  'write -s comp-text.bin 0 2M' \
  'write -s comp-rand.bin 2M 1M' \
  'write -s comp-text.bin 3584k 512k'
# 3M..3.5M stays a hole (unallocated after convert)
rm -f comp-text.bin comp-rand.bin
for c in zlib zstd; do
  qemu-img convert -q -c -O qcow2 -o compression_type=$c comp-src.raw $c.qcow2
  note $c.qcow2 "compressed ($c), 64 KiB clusters; text (compressed) + random (stored uncompressed) + hole"
done
qemu-img convert -q -c -O qcow2 -o compression_type=zlib,cluster_size=512 comp-src.raw zlib-c512.qcow2
note zlib-c512.qcow2 "compressed (zlib), 512 B clusters (compressed descriptor with cluster_bits=9)"
qemu-img convert -q -c -O qcow2 -o compression_type=zstd,cluster_size=2M comp-src.raw zstd-c2m.qcow2
note zstd-c2m.qcow2 "compressed (zstd), 2 MiB clusters"
qemu-img convert -q -c -O qcow2 -o compat=0.10 comp-src.raw zlib-v2.qcow2
note zlib-v2.qcow2 "compressed (zlib) in a v2 image"

qemu-img convert -q -c -O qcow2 -o compression_type=zstd comp-src.raw zstd-snap.qcow2
snap zstd-snap.qcow2 "compressed"
io qcow2 zstd-snap.qcow2 'write -P 0x71 100k 8k' 'write -z 1M 64k'
snap zstd-snap.qcow2 "after overwrite"
io qcow2 zstd-snap.qcow2 'write -c -P 0x72 3M 128k' 'write -P 0x73 0 4k'
note zstd-snap.qcow2 "zstd compressed with 2 snapshots; compressed clusters shared with snapshots, partial overwrites, compressed writes in the active layer"
rm -f comp-src.raw

# ---------------------------------------------------------------------------------------------
# backing chains (relative backing paths, recorded backing formats)

truncate -s 8M chain-base.raw
io raw chain-base.raw 'write -P 0x10 0 1M' 'write -P 0x11 2M 1M' 'write -P 0x12 7M 1M'
note chain-base.raw "raw base of the chain (8 MiB, data at 0-1M, 2-3M, 7-8M)"

mk -f qcow2 -o cluster_size=64k -b chain-base.raw -F raw chain-mid.qcow2 8M
io qcow2 chain-mid.qcow2 'write -P 0x20 512k 1M' 'write -z 2M 64k' 'discard 7M 128k' 'write -P 0x21 5M 10000'
note chain-mid.qcow2 "qcow2 over raw base (-F raw): partial overwrite, zero cluster hiding base data, discard"

mk -f qcow2 -o cluster_size=4k -b chain-mid.qcow2 -F qcow2 chain-top.qcow2 8M
io qcow2 chain-top.qcow2 'write -P 0x30 600k 8k'
snap chain-top.qcow2 "top before"
io qcow2 chain-top.qcow2 'write -P 0x31 2080k 4k' 'write -P 0x32 7340132 1000' 'write -z 0 4k'
note chain-top.qcow2 "3-deep chain top (4 KiB clusters over 64 KiB over raw), one snapshot"

mk -f qcow2 -b chain-mid.qcow2 -F qcow2 chain-nofmt.qcow2 8M
io qcow2 chain-nofmt.qcow2 'write -P 0x33 3M 64k'
py drop-ext chain-nofmt.qcow2 e2792aca
note chain-nofmt.qcow2 "overlay of chain-mid.qcow2 with no backing format recorded (must be probed)"

mk -f qcow2 -b chain-base.raw -F raw overlay-bigger.qcow2 16M
io qcow2 overlay-bigger.qcow2 'write -P 0x34 7680k 1M' 'write -P 0x35 12M 64k'
note overlay-bigger.qcow2 "16 MiB overlay over the 8 MiB raw base (reads past the backing end are zeros)"

mk -f qcow2 -b chain-base.raw -F raw overlay-smaller.qcow2 4M
io qcow2 overlay-smaller.qcow2 'write -P 0x36 1M 64k'
note overlay-smaller.qcow2 "4 MiB overlay over the 8 MiB raw base"

mkdir backing
mk -f qcow2 backing/sub-base.qcow2 4M
io qcow2 backing/sub-base.qcow2 'write -P 0x37 0 2M'
mk -f qcow2 -b backing/sub-base.qcow2 -F qcow2 overlay-subdir.qcow2 4M
io qcow2 overlay-subdir.qcow2 'write -P 0x38 1M 64k'
note overlay-subdir.qcow2 "backing file in a subdirectory (backing/sub-base.qcow2, relative path)"

mk -f qcow2 -o extended_l2=on,cluster_size=64k -b chain-base.raw -F raw extl2-overlay.qcow2 8M
io qcow2 extl2-overlay.qcow2 'write -P 0x39 4k 2k' 'write -P 0x3a 2M 3k' 'write -z 2100k 4k' 'write -P 0x3b 7M 64k'
note extl2-overlay.qcow2 "extended_l2 overlay over the raw base: unallocated subclusters read through"

# ---------------------------------------------------------------------------------------------
# internal snapshots

mk -f qcow2 -o cluster_size=64k snapshots.qcow2 4M
io qcow2 snapshots.qcow2 'write -P 0xa1 0 1M'
snap snapshots.qcow2 "first"
io qcow2 snapshots.qcow2 'write -P 0xa2 512k 1M' 'write -z 0 64k'
snap snapshots.qcow2 "second snap"
io qcow2 snapshots.qcow2 'discard 1M 256k' 'write -P 0xa3 3M 1M'
snap snapshots.qcow2 "before resize"
qemu-img resize -q snapshots.qcow2 8M
io qcow2 snapshots.qcow2 'write -P 0xa4 6M 1M'
snap snapshots.qcow2 "after resize 8M"
io qcow2 snapshots.qcow2 'write -P 0xa5 100k 4k'
note snapshots.qcow2 "4 snapshots with writes between; 3 taken at 4 MiB before a resize to 8 MiB; names with spaces"

mk -f qcow2 -o compat=0.10 snapshots-v2.qcow2 4M
io qcow2 snapshots-v2.qcow2 'write -P 0xb1 0 64k'
snap snapshots-v2.qcow2 "v2 one"
io qcow2 snapshots-v2.qcow2 'write -P 0xb2 0 32k' 'write -P 0xb3 2M 64k'
snap snapshots-v2.qcow2 "v2 two"
io qcow2 snapshots-v2.qcow2 'write -z 2M 64k'
note snapshots-v2.qcow2 "qcow2 v2 with 2 snapshots"

mk -f qcow2 snapnames.qcow2 1M
io qcow2 snapnames.qcow2 'write -P 0xc1 0 64k'
snap snapnames.qcow2 "has/slash"
snap snapnames.qcow2 "ünïcødé"
snap snapnames.qcow2 ".leading-dot"
snap snapnames.qcow2 "$(printf 'L%.0s' {1..300})"
io qcow2 snapnames.qcow2 'write -P 0xc2 0 64k'
note snapnames.qcow2 "awkward snapshot names: '/', UTF-8, leading dot, 300 bytes (longer than NAME_MAX)"

# ---------------------------------------------------------------------------------------------
# external data files (file names must not end in .qcow2/.raw/.img)

mk -f qcow2 -o data_file=datafile.qcow2.data datafile.qcow2 4M
io qcow2 datafile.qcow2 'write -P 0xd1 0 1M' 'write -P 0xd2 2M 64k' 'write -z 512k 64k' 'discard 768k 64k'
note datafile.qcow2 "external data file datafile.qcow2.data (data_file_raw=off)"

mk -f qcow2 -o data_file=datafile-raw.qcow2.data,data_file_raw=on datafile-raw.qcow2 4M
io qcow2 datafile-raw.qcow2 'write -P 0xd3 0 1M' 'write -P 0xd4 3M 64k' 'write -z 512k 64k'
note datafile-raw.qcow2 "external data file with data_file_raw=on"

# ---------------------------------------------------------------------------------------------
# dirty bit: lazy refcounts, L2 tables flushed, process aborted before refcounts are written

mk -f qcow2 -o lazy_refcounts=on dirty.qcow2 4M
set +e
( ulimit -c 0; qemu-io -f qcow2 -c 'write -P 0xe1 0 64k' -c 'write -P 0xe2 1M 64k' -c flush -c abort dirty.qcow2; true ) >/dev/null 2>&1
set -e
if ! qemu-img info -U --output=json dirty.qcow2 | grep -q '"dirty-flag": true'; then
  echo "make-test-images: dirty.qcow2 did not get the dirty bit" >&2; exit 1
fi
note dirty.qcow2 "dirty bit set (lazy_refcounts, writer aborted): refcounts stale, data and L2 valid"

# ---------------------------------------------------------------------------------------------
# GPT disk with an ext4 partition (for file-level restore)

mk_src_tree() {
  local s=$1
  mkdir -p "$s/dir/nested/deep" "$s/private" "$s/bin" "$s/many"
  printf 'Hello from the snapfs test corpus\n' > "$s/hello.txt"
  printf 'deep file\n' > "$s/dir/nested/deep/file.txt"
  printf 'top secret\n' > "$s/private/secret.txt"
  printf '#!/bin/sh\necho tool\n' > "$s/bin/tool.sh"
  printf 'setuid\n' > "$s/bin/suid"
  printf 'read only\n' > "$s/readonly.txt"
  printf 'spaces\n' > "$s/name with spaces.txt"
  printf 'unicode\n' > "$s/ünïcødé.txt"
  : > "$s/empty"
  ln -s hello.txt "$s/link-to-hello"
  ln -s dir/nested "$s/link-to-dir"
  ln -s /etc/does-not-exist/in/the/guest/so/this/is/dangling/and/longer/than/sixty/bytes "$s/long-dangling-link"
  ln "$s/hello.txt" "$s/dir/hello-hardlink.txt"
  truncate -s 8M "$s/sparse.bin"
  printf 'start' | dd of="$s/sparse.bin" conv=notrunc status=none
  printf 'middle' | dd of="$s/sparse.bin" bs=1 seek=4194304 conv=notrunc status=none
  printf 'end' | dd of="$s/sparse.bin" bs=1 seek=8388605 conv=notrunc status=none
  py text 3 1048576 "$s/big.txt"
  py rand 4 300000 "$s/random.bin"
  local i
  for i in $(seq -w 1 200); do printf '%s\n' "$i" > "$s/many/entry-with-a-long-name-to-fill-directory-blocks-$i"; done
  mkfifo "$s/fifo"
  chmod 0644 "$s/hello.txt" "$s/name with spaces.txt" "$s/ünïcødé.txt" "$s/big.txt" "$s/random.bin"
  chmod 0700 "$s/private"; chmod 0600 "$s/private/secret.txt"
  chmod 0755 "$s/bin/tool.sh"; chmod 4755 "$s/bin/suid"; chmod 0444 "$s/readonly.txt"
  chmod 1777 "$s/dir/nested"
  if (( EUID == 0 )); then
    chown 1000:1000 "$s/dir/nested/deep/file.txt"
    chown 0:100 "$s/bin/tool.sh"
  fi
  # (the empty marker file .snapfs-test-corpus is part of the tree and of the filesystem)
  find "$s" -exec touch -h -d '2024-01-02 03:04:05 UTC' {} +
}
mk_src_tree "$SRC"

DISK=disk-gpt-ext4.raw
truncate -s 40M "$DISK"
E2FSPROGS_FAKE_TIME=1704164645 mkfs.ext4 -q -F -b 4096 -I 256 -L snapfs-p1 \
  -U 5eed0000-0000-4000-8000-0000000000e4 \
  -E offset=1048576,nodiscard,hash_seed=5eed0000-0000-4000-8000-0000000000a5 \
  -d "$SRC" "$DISK" 24M # mke2fs wipes partition-table signatures: GPT after
# mkfs -d copies each source inode's ctime (= when this script ran): pin it for determinism.
( cd "$SRC" && find . -mindepth 1 -printf 'sif "/%P" ctime 20240102030405\n'
  echo 'sif / ctime 20240102030405'; echo 'sif /lost+found ctime 20240102030405' ) > "$OUT/.debugfs.cmd"
E2FSPROGS_FAKE_TIME=1704164645 debugfs -w -f "$OUT/.debugfs.cmd" "$DISK?offset=1048576" >/dev/null 2>"$OUT/.debugfs.err" \
  || { cat "$OUT/.debugfs.err" >&2; exit 1; }
if grep -v '^debugfs ' "$OUT/.debugfs.err" | grep -q .; then cat "$OUT/.debugfs.err" >&2; exit 1; fi
rm -f "$OUT/.debugfs.cmd" "$OUT/.debugfs.err"
# mkfs -d writes multi-block directories unindexed; e2fsck -D builds their htree indexes.
rc=0; E2FSPROGS_FAKE_TIME=1704164645 e2fsck -fyD "$DISK?offset=1048576" >/dev/null 2>&1 || rc=$?
(( rc <= 1 )) || { echo "make-test-images: e2fsck -fyD failed ($rc)" >&2; exit 1; }
py ext4-wtime "$DISK" 1048576 1704164645   # debugfs/e2fsck stamp the real time in s_wtime/s_lastcheck
e2fsck -fn "$DISK?offset=1048576" >/dev/null 2>&1 \
  || { echo "make-test-images: ext4 in $DISK is not clean" >&2; exit 1; }
sgdisk -o -U 5eed0000-0000-4000-8000-000000000001 \
  -n 1:2048:+24M -t 1:8300 -c 1:rootfs -u 1:5eed0000-0000-4000-8000-000000000011 \
  -n 2:0:+8M -t 2:0700 -c 2:"data unformatted" -u 2:5eed0000-0000-4000-8000-000000000012 \
  "$DISK" >/dev/null
[[ $(sgdisk -v "$DISK") == *'No problems found'* ]] || { echo "make-test-images: bad GPT" >&2; exit 1; }
io raw "$DISK" 'write -P 0x5c 26M 64k'    # something in partition 2 (no filesystem)
qemu-img convert -q -O qcow2 "$DISK" disk-gpt-ext4.qcow2
note "$DISK" "GPT, p1 ext4 (4 KiB blocks, from $(basename "$SRC")/: dirs, symlinks, hard link, sparse file, fifo, modes, owners, htree dir), p2 no filesystem"
note disk-gpt-ext4.qcow2 "qcow2 copy of disk-gpt-ext4.raw"

# ---------------------------------------------------------------------------------------------
# images snapfs must refuse (separate directory, not a pool of valid volumes)

(
  cd "$REFUSED"
  mk -f qcow2 --object secret,id=sec0,data=snapfs-test -o encrypt.format=luks,encrypt.key-secret=sec0 luks.qcow2 4M
  qemu-io --object secret,id=sec0,data=snapfs-test \
    --image-opts "driver=qcow2,file.filename=luks.qcow2,encrypt.key-secret=sec0" \
    -c 'write -P 0xf1 0 64k' >/dev/null
  mk -f qcow2 --object secret,id=sec0,data=snapfs-test -o encrypt.format=aes,encrypt.key-secret=sec0 aes.qcow2 4M
  mk -f qcow2 unknown-incompat.qcow2 4M
  io qcow2 unknown-incompat.qcow2 'write -P 0xf2 0 64k'
  py set-incompat unknown-incompat.qcow2 63
  mk -f qcow qcow1.img 4M
)
note "../$(basename "$REFUSED")/luks.qcow2" "REFUSED: LUKS-encrypted qcow2 (secret: snapfs-test)"
note "../$(basename "$REFUSED")/aes.qcow2" "REFUSED: legacy AES-encrypted qcow2"
note "../$(basename "$REFUSED")/unknown-incompat.qcow2" "REFUSED: unknown incompatible feature bit 63"
note "../$(basename "$REFUSED")/qcow1.img" "REFUSED: QEMU qcow version 1"

# ---------------------------------------------------------------------------------------------
# sanity check and summary

for f in *.qcow2 backing/*.qcow2; do
  [[ $f == dirty.qcow2 ]] && continue
  qemu-img check -q "$f" || { echo "make-test-images: qemu-img check failed on $f" >&2; exit 1; }
done

field() { sed -n "s/^    \"$1\": \"\{0,1\}\([^\",]*\)\"\{0,1\},\{0,1\}$/\1/p" | head -1; }
for entry in "${SUMMARY[@]}"; do
  name=${entry%%|*}; desc=${entry#*|}
  if info=$(qemu-img info -U --output=json "$name" 2>/dev/null); then
    fmt=$(field format <<<"$info"); vsize=$(field virtual-size <<<"$info")
    nsnap=$(grep -c '"vm-clock-nsec"' <<<"$info" || true)
  else
    fmt='?'; vsize='?'; nsnap=0
  fi
  printf '%-40s %-6s virt=%-10s file=%-9s snaps=%s  %s\n' "$name" "$fmt" "$vsize" \
    "$(stat -c %s "$name")" "$nsnap" "$desc"
done
END=$(date +%s.%N)
printf 'corpus: %s images in %s (+%s refused), %s on disk, built in %.1f s\n' \
  "$(find . -maxdepth 1 -type f \( -name '*.qcow2' -o -name '*.raw' -o -name '*.img' \) | wc -l)" \
  "$OUT" "$(find "$REFUSED" -maxdepth 1 -type f ! -name "$MARK" | wc -l)" \
  "$(du -sh --apparent-size . | cut -f1) apparent / $(du -sh . | cut -f1)" \
  "$(awk "BEGIN{print $END - $START}")"

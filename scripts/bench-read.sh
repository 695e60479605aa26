#!/usr/bin/env bash
# Read benchmark (issue 2, section 7). Not a test: it prints numbers, it does not judge them.
#
# Usage: scripts/bench-read.sh [--snapfs BIN] [--size SIZE] [--csize SIZE] [--only LIST]
#                              [--rebuild] [--no-cold] [WORKDIR]
#   --snapfs BIN   snapfs binary (default: target/release/snapfs of this repository). If it is
#                  missing or fails to mount, the snapfs column shows "-" and the rest still runs.
#   --size SIZE    virtual size of the dense (uncompressed) qcow2, default 4G
#   --csize SIZE   size of the zlib and zstd qcow2 images, default 1G (4 GiB of zlib takes ~2 min
#                  to create on 2 cores)
#   --direct SIZE  bytes read by the O_DIRECT rows (default 128M; 4 KiB direct reads are slow)
#   --only LIST    comma-separated subset of dense,zlib,zstd
#   --rebuild      recreate the images even if WORKDIR already has them
#   --no-cold      skip the cold-cache row (it needs /proc/sys/vm/drop_caches, i.e. root)
#   WORKDIR        default /var/tmp/snapfs-bench; images go in WORKDIR/bench (pool "bench")
#
# For each image (each has an internal snapshot "bench" equal to its active layer):
#   (a) snapfs: MNT/volumes/bench/IMG/.snapshots/bench/disk.raw
#   (b) QEMU peer: qemu-storage-daemon --export type=fuse of the same image, as a raw file
#   dd bs=1M and bs=4k, 1 reader and 2 parallel readers (each reads one half); dd bs=1M and
#   bs=4k with iflag=direct over the first --direct bytes (one FUSE request per dd block);
#   (c) copy-out to tmpfs: qemu-img convert -O raw IMG /dev/shm/… vs cp from snapfs (and qsd);
#   peak RSS (VmHWM) of the snapfs daemon and of qemu-storage-daemon per image.
# "warm" rows: the image file is in the host page cache, and the FUSE file's own page cache is
# dropped (posix_fadvise DONTNEED via dd iflag=nocache) before every run, so the reader is
# measured, not the page cache. "cold" row: echo 3 > /proc/sys/vm/drop_caches before the run.
# MB/s = 10^6 bytes per second; ratio = snapfs / qsd (or cp-from-snapfs / qemu-img convert).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
SNAPFS=$REPO/target/release/snapfs
SIZE=4G
CSIZE=1G
DIRECT=128M
ONLY=dense,zlib,zstd
REBUILD=0
COLD=1
WORK=/var/tmp/snapfs-bench
while [[ $# -gt 0 ]]; do
  case $1 in
    --snapfs) SNAPFS=$2; shift 2 ;;
    --size) SIZE=$2; shift 2 ;;
    --csize) CSIZE=$2; shift 2 ;;
    --direct) DIRECT=$2; shift 2 ;;
    --only) ONLY=$2; shift 2 ;;
    --rebuild) REBUILD=1; shift ;;
    --no-cold) COLD=0; shift ;;
    -h|--help) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
    -*) echo "bench-read: unknown option $1" >&2; exit 2 ;;
    *) WORK=$1; shift ;;
  esac
done

for cmd in qemu-img qemu-io qemu-storage-daemon python3 dd fusermount3; do
  command -v "$cmd" >/dev/null || { echo "bench-read: $cmd not found (scripts/install-deps.sh)" >&2; exit 1; }
done

T0=$(date +%s)
mkdir -p "$WORK"
WORK=$(realpath -- "$WORK")
POOL=bench
IMGDIR=$WORK/$POOL
MNT=$WORK/mnt
SHM=/dev/shm/snapfs-bench.$$
mkdir -p "$IMGDIR" "$MNT" "$SHM"

SNAPFS_PID=
SNAPFS_MOUNTED=0
QSD_PIDS=()
cleanup() {
  set +e
  if (( SNAPFS_MOUNTED )); then
    timeout 60 "$SNAPFS" unmount "$MNT" >/dev/null 2>&1 || fusermount3 -u "$MNT" 2>/dev/null
  fi
  local p
  for p in "${QSD_PIDS[@]}"; do kill "$p" 2>/dev/null; done
  rm -rf -- "$SHM"
}
trap cleanup EXIT

bytes_of() { numfmt --from=iec "${1^^}"; }
human() { numfmt --to=iec-i --suffix=B "$1"; }
now_ns() { date +%s%N; }

# ---------------------------------------------------------------------------------------------
# images

gen_chunks() {   # 64 MiB of random bytes and 64 MiB of text that compresses ~3x, in $WORK
  [[ -s $WORK/rand64.bin && -s $WORK/text64.bin ]] && return 0
  python3 - "$WORK" <<'PY'
import random, sys
d = sys.argv[1]
r = random.Random(20261126)
n = 64 << 20
with open(f"{d}/rand64.bin", "wb") as f:
    f.write(r.randbytes(n))
words = [w.encode() for w in (
    "qcow2 cluster snapshot backing overlay refcount table entry offset zstd zlib deflate "
    "subcluster bitmap header extension feature guest block device sector virtual disk image "
    "file system inode extent journal kernel module service daemon socket request response "
    "error warning info debug trace").split()]
parts, total, line = [], 0, 0
while total < n:
    toks = r.choices(words, k=24)
    chunk = b"%08d %016x " % (line, r.getrandbits(64)) + b" ".join(toks) + b" %d\n" % r.getrandbits(20)
    parts.append(chunk); total += len(chunk); line += 1
with open(f"{d}/text64.bin", "wb") as f:
    f.write(b"".join(parts)[:n])
PY
}

fill() {   # fill FMT IMG SIZE CHUNKFILE: write CHUNKFILE (64 MiB) over the whole image
  local fmt=$1 img=$2 size=$3 chunk=$4 off=0 cmds=()
  local step=$((64 << 20))
  while (( off < size )); do
    cmds+=(-c "write -q -s $chunk $off $(( size - off < step ? size - off : step ))")
    off=$((off + step))
  done
  qemu-io -f "$fmt" "${cmds[@]}" "$img" >/dev/null
}

build_images() {
  local size csize
  size=$(bytes_of "$SIZE"); csize=$(bytes_of "$CSIZE")
  (( size % (64 << 20) == 0 && csize % (64 << 20) == 0 )) || { echo "bench-read: sizes must be multiples of 64M" >&2; exit 2; }
  local stamp="$IMGDIR/.built-$size-$csize"
  if (( ! REBUILD )) && [[ -f $stamp ]]; then
    echo "# images: reusing $IMGDIR (--rebuild to recreate)"
    return 0
  fi
  rm -f "$IMGDIR"/*.qcow2 "$IMGDIR"/.built-*
  gen_chunks
  local t
  if [[ ,$ONLY, == *,dense,* ]]; then
    t=$(now_ns)
    qemu-img create -q -f qcow2 "$IMGDIR/dense.qcow2" "$size"
    fill qcow2 "$IMGDIR/dense.qcow2" "$size" "$WORK/rand64.bin"
    qemu-img snapshot -c bench "$IMGDIR/dense.qcow2"
    echo "# built dense.qcow2: $(human "$size") of random data, 64 KiB clusters, in $(( ($(now_ns) - t) / 1000000 )) ms"
  fi
  local c
  for c in zlib zstd; do
    [[ ,$ONLY, == *,$c,* ]] || continue
    if [[ ! -f $WORK/text-src.raw ]] || (( $(stat -c %s "$WORK/text-src.raw") != csize )); then
      rm -f "$WORK/text-src.raw"
      truncate -s "$csize" "$WORK/text-src.raw"
      fill raw "$WORK/text-src.raw" "$csize" "$WORK/text64.bin"
    fi
    t=$(now_ns)
    qemu-img convert -c -O qcow2 -o compression_type=$c "$WORK/text-src.raw" "$IMGDIR/$c.qcow2"
    qemu-img snapshot -c bench "$IMGDIR/$c.qcow2"
    echo "# built $c.qcow2: $(human "$csize") of text, file $(human "$(stat -c %s "$IMGDIR/$c.qcow2")"), in $(( ($(now_ns) - t) / 1000000 )) ms"
  done
  rm -f "$WORK/text-src.raw"
  touch "$stamp"
}

# ---------------------------------------------------------------------------------------------
# measurement helpers

DROP_OK=0
if (( COLD )) && { echo 3 > /proc/sys/vm/drop_caches; } 2>/dev/null; then DROP_OK=1; fi

drop_file_cache() { dd if="$1" iflag=nocache count=0 status=none 2>/dev/null || true; }

# run_dd FILE BS READERS [LIMIT [IFLAGS]] -> MB/s on stdout (empty on failure)
#   reads the first LIMIT bytes (default: all), split in READERS parallel dd's
run_dd() {
  local f=$1 bs=$2 n=$3 limit=${4:-} flags=${5:-} size half t0 t1 pids=() p ok=1
  size=$(stat -L -c %s "$f")
  [[ -n $limit ]] && (( limit < size )) && size=$limit
  t0=$(now_ns)
  if (( n == 1 )); then
    dd if="$f" of=/dev/null bs="$bs" iflag=count_bytes${flags:+,$flags} count="$size" status=none 2>/dev/null || ok=0
  else
    half=$((size / n))
    for ((p = 0; p < n; p++)); do
      local len=$half
      (( p == n - 1 )) && len=$((size - p * half))
      dd if="$f" of=/dev/null bs="$bs" iflag=skip_bytes,count_bytes${flags:+,$flags} skip=$((p * half)) count="$len" status=none 2>/dev/null &
      pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p" || ok=0; done
  fi
  t1=$(now_ns)
  (( ok )) || { echo ""; return 0; }
  awk -v b="$size" -v ns="$((t1 - t0))" 'BEGIN { printf "%.0f", b / (ns / 1e9) / 1e6 }'
}

# run_cp SRC DST (raw copy to tmpfs) -> MB/s
run_cp() {
  local size t0 t1
  size=$(stat -L -c %s "$1")
  t0=$(now_ns)
  cp -- "$1" "$2" || { rm -f -- "$2"; echo ""; return 0; }
  t1=$(now_ns)
  rm -f -- "$2"
  awk -v b="$size" -v ns="$((t1 - t0))" 'BEGIN { printf "%.0f", b / (ns / 1e9) / 1e6 }'
}
run_convert() {
  local size t0 t1
  size=$(qemu-img info -U --output=json "$1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])')
  t0=$(now_ns)
  qemu-img convert -U -O raw "$1" "$2"
  t1=$(now_ns)
  rm -f -- "$2"
  awk -v b="$size" -v ns="$((t1 - t0))" 'BEGIN { printf "%.0f", b / (ns / 1e9) / 1e6 }'
}

ratio() { if [[ -n $1 && -n $2 && $2 != 0 ]]; then awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2fx", a / b }'; else echo "-"; fi; }
row() {   # row IMAGE TEST A B [RATIO_LABEL]
  printf '%-12s %-34s %12s %12s %8s\n' "$1" "$2" "${3:--}" "${4:--}" "$(ratio "${3:-}" "${4:-}")"
}

readahead_of() {   # read_ahead_kb of the FUSE connection behind a path
  local dev
  dev=$(python3 -c 'import os,sys; s=os.stat(sys.argv[1]); print(f"{os.major(s.st_dev)}:{os.minor(s.st_dev)}")' "$1")
  cat "/sys/class/bdi/$dev/read_ahead_kb" 2>/dev/null || echo "?"
}
hwm_kb() { local v; v=$(sed -n 's/^VmHWM:[[:space:]]*\([0-9]*\) kB/\1/p' "/proc/$1/status" 2>/dev/null || true); echo "${v:-0}"; }
reset_hwm() { echo 5 > "/proc/$1/clear_refs" 2>/dev/null || true; }

# ---------------------------------------------------------------------------------------------

echo "# bench-read $(date -u +%FT%TZ) on $(uname -r), $(nproc) CPUs, $(free -g | awk '/Mem:/ {print $2}') GiB RAM"
echo "# $(qemu-img --version | head -1)"
build_images

SNAPFS_NOTE=
if [[ ! -x $SNAPFS ]]; then
  SNAPFS_NOTE="snapfs binary $SNAPFS not found: snapfs column skipped"
else
  if mountpoint -q "$MNT"; then fusermount3 -u "$MNT" 2>/dev/null || true; fi
  if timeout 120 "$SNAPFS" mount --images "$IMGDIR" "$MNT"; then
    SNAPFS_MOUNTED=1
    SNAPFS_PID=$(pgrep -n -f "snapfs mount.*$MNT" || true)
    echo "# snapfs: $("$SNAPFS" --version 2>/dev/null | head -1), daemon pid ${SNAPFS_PID:-?}"
  else
    SNAPFS_NOTE="snapfs mount failed: snapfs column skipped"
  fi
fi
[[ -n $SNAPFS_NOTE ]] && echo "# $SNAPFS_NOTE"
if (( DROP_OK )); then echo "# cold row: page cache dropped (echo 3 > /proc/sys/vm/drop_caches) before each run"
else echo "# cold row skipped (--no-cold, or drop_caches not writable here)"; fi
echo
printf '%-12s %-34s %12s %12s %8s\n' image test "snapfs MB/s" "qsd MB/s" ratio

IFS=, read -r -a IMAGES <<<"$ONLY"
for name in "${IMAGES[@]}"; do
  img=$IMGDIR/$name.qcow2
  [[ -f $img ]] || { echo "bench-read: $img missing (run with --rebuild)" >&2; continue; }

  # QEMU peer: qemu-storage-daemon FUSE export of the same image (read-only)
  qf=$WORK/qsd-$name.raw
  if mountpoint -q "$qf" 2>/dev/null; then fusermount3 -u "$qf" 2>/dev/null || true; fi
  : > "$qf"
  qemu-storage-daemon \
    --blockdev "driver=file,node-name=file0,filename=$img,read-only=on,locking=off" \
    --blockdev "driver=qcow2,node-name=fmt0,file=file0,read-only=on" \
    --export "type=fuse,id=exp0,node-name=fmt0,mountpoint=$qf,writable=off" \
    --pidfile "$WORK/qsd-$name.pid" --daemonize
  qsd_pid=$(cat "$WORK/qsd-$name.pid")
  QSD_PIDS+=("$qsd_pid")

  sf=
  if (( SNAPFS_MOUNTED )); then
    sf=$MNT/volumes/$POOL/$name.qcow2/.snapshots/bench/disk.raw
    if [[ ! -f $sf ]]; then
      echo "# $name: $sf not found; snapfs column skipped for this image"
      sf=
    fi
  fi
  vsize=$(stat -L -c %s "$qf")
  echo "# $name.qcow2: virtual $(human "$vsize"), file $(human "$(stat -c %s "$img")"); read_ahead_kb qsd=$(readahead_of "$qf")${sf:+ snapfs=$(readahead_of "$sf")}"

  # warm the host page cache with the image file, and each peer once
  cat "$img" > /dev/null
  [[ -n $sf ]] && { reset_hwm "$SNAPFS_PID"; run_dd "$sf" 1M 1 >/dev/null; }
  reset_hwm "$qsd_pid"; run_dd "$qf" 1M 1 >/dev/null

  for spec in "1M 1" "1M 2" "4k 1" "4k 2"; do
    read -r bs n <<<"$spec"
    a=
    if [[ -n $sf ]]; then drop_file_cache "$sf"; a=$(run_dd "$sf" "$bs" "$n"); fi
    drop_file_cache "$qf"; b=$(run_dd "$qf" "$bs" "$n")
    row "$name" "dd bs=$bs, $n reader(s), warm" "$a" "$b"
  done
  # O_DIRECT: every dd block becomes one FUSE read request (no page cache, no read-ahead):
  # this is what exercises a reader's L2 / decompressed-cluster caches with 4 KiB requests.
  for bs in 1M 4k; do
    a=
    [[ -n $sf ]] && a=$(run_dd "$sf" "$bs" 1 "$(bytes_of "$DIRECT")" direct)
    b=$(run_dd "$qf" "$bs" 1 "$(bytes_of "$DIRECT")" direct)
    row "$name" "dd bs=$bs O_DIRECT, first $DIRECT" "$a" "$b"
  done
  if (( DROP_OK )); then
    a=
    if [[ -n $sf ]]; then echo 3 > /proc/sys/vm/drop_caches; a=$(run_dd "$sf" 1M 1); fi
    echo 3 > /proc/sys/vm/drop_caches; b=$(run_dd "$qf" 1M 1)
    row "$name" "dd bs=1M, 1 reader, cold" "$a" "$b"
    cat "$img" > /dev/null
  fi

  # copy-out to tmpfs
  conv=$(run_convert "$img" "$SHM/x")
  a=
  [[ -n $sf ]] && { drop_file_cache "$sf"; a=$(run_cp "$sf" "$SHM/y"); }
  drop_file_cache "$qf"; b=$(run_cp "$qf" "$SHM/z")
  row "$name" "cp disk.raw to tmpfs, warm" "$a" "$b"
  printf '%-12s %-34s %12s %12s %8s\n' "$name" "qemu-img convert -O raw to tmpfs" "" "$conv" ""
  printf '%-12s %-34s %12s %12s %8s\n' "$name" "  cp from snapfs / qemu-img convert" "" "" "$(ratio "$a" "$conv")"
  printf '%-12s %-34s %12s %12s %8s\n' "$name" "  cp from qsd / qemu-img convert" "" "" "$(ratio "$b" "$conv")"

  # peak RSS while reading this image
  sr=-
  [[ -n $sf && -n $SNAPFS_PID ]] && sr="$(( $(hwm_kb "$SNAPFS_PID") / 1024 )) MiB"
  printf '%-12s %-34s %12s %12s\n' "$name" "peak RSS (VmHWM) while reading" "$sr" "$(( $(hwm_kb "$qsd_pid") / 1024 )) MiB"

  kill "$qsd_pid" 2>/dev/null || true
done
echo
echo "# total $(( $(date +%s) - T0 )) s"

#!/usr/bin/env bash
# Copy-out benchmark of every backup tool (issue 15, "Copy-out speed"): the tools backups use, reading a snapshot's
# disk.raw through snapfs, against `qemu-img convert -O raw` of the same snapshot in the same
# run. Not a test: it prints numbers, it does not judge them.
#
# Usage: scripts/bench-copyout-tools.sh [--snapfs BIN] [--size SIZE] [--runs N] [--tools LIST] [WORKDIR]
#   --snapfs BIN   snapfs binary (default: target/release/snapfs of this repository)
#   --size SIZE    virtual size of the dense qcow2 (random data, every cluster allocated), 2G
#   --runs N       runs of each row; the median is printed (default 3)
#   --tools LIST   comma-separated subset of cp,dd,cat,tar,rsync,restic,borg (default: all that
#                  are installed; scripts/install-deps.sh installs them with the test group)
#   WORKDIR        default /var/tmp/snapfs-bench-copyout-tools (the image is kept for the next run)
#
# Each row copies the whole disk to tmpfs (/dev/shm), twice per run: from snapfs
# (MNT/volumes/copyout/dense.qcow2/.snapshots/bench/disk.raw) and from a raw file on tmpfs with the
# same bytes (what the tool itself can do: its ceiling). Before each snapfs run the FUSE file's
# page cache is dropped (dd iflag=nocache), the image file stays in the host page cache
# ("warm"): the reader is measured, not a cache. qemu-img convert -O raw of the image's
# internal snapshot to tmpfs is the peer. MB/s = 10^6 bytes per second of disk size.
#   cp      cp disk.raw DST                    dd      dd bs=1M of=DST
#   cat     cat disk.raw > DST                 tar     tar --sparse -cf DST disk.raw
#   rsync   rsync --sparse disk.raw DST        restic  restic backup --stdin (new repo in tmpfs)
#   borg    borg create (new repo in tmpfs, --compression none, fixed 4 MiB chunks)
# Last: the daemon's peak RSS (VmHWM) over all rows.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
SNAPFS=$REPO/target/release/snapfs
SIZE=2G
RUNS=3
TOOLS=cp,dd,cat,tar,rsync,restic,borg
WORK=/var/tmp/snapfs-bench-copyout-tools
while [[ $# -gt 0 ]]; do
  case $1 in
    --snapfs) SNAPFS=$2; shift 2 ;;
    --size) SIZE=$2; shift 2 ;;
    --runs) RUNS=$2; shift 2 ;;
    --tools) TOOLS=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
    -*) echo "bench-copyout-tools: unknown option $1" >&2; exit 2 ;;
    *) WORK=$1; shift ;;
  esac
done
for cmd in qemu-img qemu-io python3 dd fusermount3; do
  command -v "$cmd" >/dev/null || { echo "bench-copyout-tools: $cmd not found (scripts/install-deps.sh)" >&2; exit 1; }
done
[[ -x $SNAPFS ]] || { echo "bench-copyout-tools: $SNAPFS not found (cargo build --release)" >&2; exit 1; }

mkdir -p "$WORK/copyout" "$WORK/mnt"
WORK=$(realpath -- "$WORK")
IMG=$WORK/copyout/dense.qcow2
MNT=$WORK/mnt
SHM=/dev/shm/snapfs-bench-copyout.$$
mkdir -p "$SHM"
MOUNTED=0
cleanup() {
  set +e
  (( MOUNTED )) && { timeout 60 "$SNAPFS" unmount "$MNT" >/dev/null 2>&1 || fusermount3 -u "$MNT"; }
  rm -rf -- "$SHM"
}
trap cleanup EXIT

now_ns() { date +%s%N; }
median() { sort -n | awk '{a[NR]=$1} END {if (!NR) exit; print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
hwm_mib() { sed -n 's/^VmHWM:[[:space:]]*\([0-9]*\) kB/\1/p' "/proc/$1/status" 2>/dev/null | awk '{printf "%d", $1 / 1024}'; }

if [[ ! -f $IMG ]] || [[ $(qemu-img info -U --output=json "$IMG" | python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])') != $(numfmt --from=iec "$SIZE") ]]; then
  echo "# making $IMG ($SIZE of random data, dense, internal snapshot bench)"
  rm -f -- "$IMG"
  head -c "$(numfmt --from=iec "$SIZE")" /dev/urandom > "$SHM/src.raw"
  qemu-img convert -O qcow2 "$SHM/src.raw" "$IMG"
  qemu-img snapshot -c bench "$IMG"
  rm -f -- "$SHM/src.raw"
fi
BYTES=$(qemu-img info -U --output=json "$IMG" | python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])')
cat "$IMG" > /dev/null   # the image in the host page cache: "warm"

mountpoint -q "$MNT" && fusermount3 -u "$MNT"
timeout 120 "$SNAPFS" mount --images "$WORK/copyout" "$MNT"
MOUNTED=1
PID=$(pgrep -n -f "snapfs mount.*$MNT")
SRC=$MNT/volumes/copyout/dense.qcow2/.snapshots/bench/disk.raw
[[ -f $SRC ]] || { echo "bench-copyout-tools: $SRC missing" >&2; exit 1; }
# The same bytes as a plain file on tmpfs: each tool's own ceiling.
qemu-img convert -U -O raw -l snapshot.name=bench "$IMG" "$SHM/plain.raw"
echo 5 > "/proc/$PID/clear_refs" 2>/dev/null || true

# copy TOOL SRC: one copy of SRC to tmpfs with TOOL; prints MB/s (empty on failure)
copy() {
  local tool=$1 src=$2 out=$SHM/out t0 t1 ok=1
  rm -rf -- "$out"; mkdir -p "$out"
  [[ $src == "$SRC" ]] && dd if="$src" iflag=nocache count=0 status=none 2>/dev/null
  t0=$(now_ns)
  case $tool in
    cp) cp -- "$src" "$out/disk.raw" || ok=0 ;;
    dd) dd if="$src" of="$out/disk.raw" bs=1M status=none || ok=0 ;;
    cat) cat -- "$src" > "$out/disk.raw" || ok=0 ;;
    tar) tar --sparse -C "$(dirname "$src")" -cf "$out/disk.tar" "$(basename "$src")" || ok=0 ;;
    rsync) rsync --sparse -- "$src" "$out/disk.raw" || ok=0 ;;
    restic)
      RESTIC_PASSWORD=bench restic -q -r "$out/repo" init >/dev/null &&
        RESTIC_PASSWORD=bench restic -q -r "$out/repo" backup --stdin --stdin-filename disk.raw < "$src" >/dev/null || ok=0 ;;
    borg)
      BORG_PASSPHRASE='' borg init -e none "$out/repo" &&
        BORG_PASSPHRASE='' borg create --compression none --chunker-params fixed,4194304 \
          "$out/repo::a" "$src" || ok=0 ;;
  esac
  t1=$(now_ns)
  rm -rf -- "$out"
  (( ok )) || { echo ""; return 0; }
  awk -v b="$BYTES" -v ns="$((t1 - t0))" 'BEGIN { printf "%.0f", b / (ns / 1e9) / 1e6 }'
}
convert() {
  local t0 t1
  t0=$(now_ns)
  qemu-img convert -U -O raw -l snapshot.name=bench "$IMG" "$SHM/conv.raw"
  t1=$(now_ns)
  rm -f -- "$SHM/conv.raw"
  awk -v b="$BYTES" -v ns="$((t1 - t0))" 'BEGIN { printf "%.0f", b / (ns / 1e9) / 1e6 }'
}

echo "# bench-copyout-tools $(date -u +%FT%TZ) on $(uname -r), $(nproc) CPUs; $("$SNAPFS" --version | head -1); load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# $(basename "$IMG"): $BYTES bytes of random data, dense qcow2; $RUNS runs per row, medians"
conv=$(for _ in $(seq "$RUNS"); do convert; done | median)
printf '%-8s %14s %14s %10s %14s\n' tool "snapfs MB/s" "tmpfs MB/s" "/convert" "/own ceiling"
IFS=, read -ra want <<< "$TOOLS"
for tool in "${want[@]}"; do
  if ! command -v "$tool" >/dev/null; then echo "$tool: not installed, skipped"; continue; fi
  s=$(for _ in $(seq "$RUNS"); do copy "$tool" "$SRC"; done | median)
  p=$(for _ in $(seq "$RUNS"); do copy "$tool" "$SHM/plain.raw"; done | median)
  awk -v t="$tool" -v s="${s:-0}" -v p="${p:-0}" -v c="$conv" 'BEGIN {
    printf "%-8s %14s %14s %10s %14s\n", t, (s ? s : "-"), (p ? p : "-"),
      (s && c ? sprintf("%.2fx", s / c) : "-"), (s && p ? sprintf("%.2fx", s / p) : "-") }'
done
printf '%-8s %14s\n' convert "$conv"
echo "# daemon peak RSS (VmHWM) over all rows: $(hwm_mib "$PID") MiB; load at the end $(cut -d' ' -f1-3 /proc/loadavg)"

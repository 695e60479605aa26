#!/usr/bin/env bash
# Huge NTFS directory benchmark (issue 19, $I30 pages). Not a test: it prints numbers.
#
# Usage: scripts/bench-ntfs-bigdir.sh [--snapfs "BIN ..."] [--entries N] [WORKDIR]
#   --snapfs LIST  snapfs binaries to compare (default: target/release/snapfs)
#   --entries N    files in the directory (default 100000)
#   WORKDIR        default /var/tmp/snapfs-bench-ntfs-bigdir
#
# One image (cached in WORKDIR): mkntfs, then N empty files with 40-byte names created in one
# directory `big/` through ntfs-3g (as restore_mount::huge_ntfs_directory_listing_is_paged),
# converted to qcow2 with an internal snapshot "s". Timed, after `echo 3 > drop_caches`:
# `ls -f big | wc -l` (a listing: READDIRs only) and `find big | wc -l`, on ntfs-3g's read-only
# mount and through each snapfs binary (a new mount each time, worker on and off). Printed:
# seconds, and the peak RSS (VmHWM) of the daemon and of its restore worker after the walk.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
BINS=$REPO/target/release/snapfs
N=100000
WORK=/var/tmp/snapfs-bench-ntfs-bigdir
while [[ $# -gt 0 ]]; do
  case $1 in
    --snapfs) BINS=$2; shift 2 ;;
    --entries) N=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "bench-ntfs-bigdir: unknown option $1" >&2; exit 2 ;;
    *) WORK=$1; shift ;;
  esac
done
[[ $(id -u) == 0 ]] || { echo "bench-ntfs-bigdir: needs root" >&2; exit 2; }
for t in qemu-img python3 mkntfs ntfs-3g; do
  command -v $t >/dev/null || { echo "bench-ntfs-bigdir: $t missing" >&2; exit 2; }
done
mkdir -p "$WORK/pool" "$WORK/state" "$WORK/mnt" "$WORK/kmnt"
WORK=$(realpath -- "$WORK")
POOL=$WORK/pool MNT=$WORK/mnt KMNT=$WORK/kmnt
RAW=$WORK/ntfs-$N.raw Q=$POOL/ntfs-$N.qcow2
SNAPFS=

cleanup() {
  if mountpoint -q "$MNT"; then timeout 60 "$SNAPFS" unmount "$MNT" >/dev/null 2>&1 || umount -l "$MNT" || true; fi
  if mountpoint -q "$KMNT"; then umount "$KMNT" || umount -l "$KMNT" || true; fi
}
trap cleanup EXIT

if [[ ! -f $Q ]] || ! qemu-img snapshot -l "$Q" 2>/dev/null | grep -qw ' s '; then
  rm -f "$RAW" "$Q"
  truncate -s 400M "$RAW"
  mkntfs -q -F -f "$RAW" 2>/dev/null
  ntfs-3g "$RAW" "$KMNT"
  t0=$(date +%s.%N)
  python3 - "$KMNT" "$N" <<'EOF'
import os, sys
root, n = sys.argv[1], int(sys.argv[2])
os.mkdir(os.path.join(root, "big"))
for i in range(n):
    name = "paged-%07d-entry-of-a-huge-directory-x" % ((i * 7919) % n)
    os.close(os.open(os.path.join(root, "big", name), os.O_CREAT | os.O_WRONLY, 0o644))
EOF
  umount "$KMNT"
  echo "made $N files through ntfs-3g in $(echo "$(date +%s.%N) - $t0" | bc -l | xargs printf '%.1f') s" >&2
  qemu-img convert -O qcow2 "$RAW" "$Q"
  qemu-img snapshot -c s "$Q"
fi

walk() {
  local tool=$1 dir=$2 s e
  sync; echo 3 > /proc/sys/vm/drop_caches
  s=$(date +%s.%N)
  case $tool in
    ls) ls -f "$dir" | wc -l >/dev/null ;;
    find) find "$dir" | wc -l >/dev/null ;;
  esac
  e=$(date +%s.%N)
  echo "$e - $s" | bc -l | xargs printf '%.3f'
}
hwm() { sed -n 's/^VmHWM:[[:space:]]*\([0-9]*\) kB/\1/p' "/proc/$1/status" 2>/dev/null || echo 0; }

printf '%-40s %-6s %-5s %8s %12s %12s\n' reader worker tool seconds daemon_KiB worker_KiB
for tool in ls find; do
  ntfs-3g -o ro "$RAW" "$KMNT"
  printf '%-40s %-6s %-5s %8s %12s %12s\n' ntfs-3g - $tool "$(walk $tool "$KMNT/big")" - -
  umount "$KMNT"
done
for SNAPFS in $BINS; do
  for worker in on off; do
    for tool in ls find; do
      "$SNAPFS" mount --images "$POOL" --state-dir "$WORK/state" --restore-worker=$worker "$MNT"
      pid=$(pgrep -n -f "mount --images $POOL --state-dir $WORK/state")
      d=$MNT/volumes/pool/ntfs-$N.qcow2/.snapshots/s/files/whole/big
      stat "$d" >/dev/null
      secs=$(walk $tool "$d")
      kids=$(cat /proc/$pid/task/*/children 2>/dev/null | xargs)
      w=0; for k in $kids; do w=$(( w + $(hwm "$k") )); done
      printf '%-40s %-6s %-5s %8s %12s %12s\n' "$SNAPFS" $worker $tool "$secs" "$(hwm "$pid")" "$w"
      timeout 60 "$SNAPFS" unmount "$MNT"
    done
  done
done
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"

#!/usr/bin/env bash
# CPU per subdirectory of a cold `find` through snapfs (issue 19). Not a test: it prints numbers.
#
# Usage: scripts/profile-bigdir.sh [--snapfs BIN] [--worker on|off] [--secs N] [--image NAME]
#                                  [WORKDIR]
#   WORKDIR  the work dir of scripts/bench-bigdir.sh, whose images it reuses
#            (default /var/tmp/snapfs-bench-bigdir; run bench-bigdir.sh once first)
#   --image  the qcow2 in WORKDIR/pool (default ext4-100000.qcow2)
#   --secs   how long to sample (default 12)
#
# Mounts the pool on a new mount, drops the caches, starts `find` over the image's `dirs/`, and
# after 2 s records the daemon (and its restore worker) with `perf record -g -F 2000` and
# `find` with `perf stat` for N seconds. Printed: directories reached, CPU microseconds per
# directory of daemon + worker (perf samples / 2000 Hz) and of `find`, and the perf data files
# (WORKDIR/profile-*.data) for `perf report`. CPU per directory, unlike wall time, hardly
# moves with the machine's load; compare it with the kernel's: `perf stat -e task-clock find`
# over the same directory on a `ro,noload` loop mount of WORKDIR/<image>.raw, caches dropped.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
SNAPFS=$REPO/target/release/snapfs
WK=on
SECS=12
IMG=ext4-100000.qcow2
WORK=/var/tmp/snapfs-bench-bigdir
while [[ $# -gt 0 ]]; do
  case $1 in
    --snapfs) SNAPFS=$2; shift 2 ;;
    --worker) WK=$2; shift 2 ;;
    --secs) SECS=$2; shift 2 ;;
    --image) IMG=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "profile-bigdir: unknown option $1" >&2; exit 2 ;;
    *) WORK=$1; shift ;;
  esac
done
[[ $(id -u) == 0 ]] || { echo "profile-bigdir: needs root (drop_caches, perf -p)" >&2; exit 2; }
command -v perf >/dev/null || { echo "profile-bigdir: perf missing" >&2; exit 2; }
WORK=$(realpath -- "$WORK")
[[ -f $WORK/pool/$IMG ]] || { echo "profile-bigdir: no $WORK/pool/$IMG (run scripts/bench-bigdir.sh)" >&2; exit 2; }
MNT=$WORK/profile-mnt
STATE=$WORK/profile-state
mkdir -p "$MNT" "$STATE"
tag=$(basename "$SNAPFS")-$WK
fpid=
cleanup() {
  if [[ -n $fpid ]]; then kill "$fpid" 2>/dev/null || true; fi
  if mountpoint -q "$MNT"; then timeout 60 "$SNAPFS" unmount "$MNT" >/dev/null 2>&1 || umount -l "$MNT" || true; fi
}
trap cleanup EXIT

"$SNAPFS" mount --images "$WORK/pool" --state-dir "$STATE" --restore-worker="$WK" "$MNT"
d=$(pgrep -n -f "mount --images $WORK/pool --state-dir $STATE")
D=$MNT/volumes/pool/$IMG/.snapshots/s/files/whole/dirs
stat "$D" >/dev/null
sync; echo 3 > /proc/sys/vm/drop_caches
find "$D" > "$WORK/profile-find.out" &
fpid=$!
sleep 2
w=$(pgrep -P "$d" -f __restore-worker | head -1 || true)
l0=$(wc -l < "$WORK/profile-find.out")
perf record -F 2000 -g -o "$WORK/profile-$tag-daemon.data" -p "$d" -- sleep "$SECS" >/dev/null 2>&1 &
pids=$!
if [[ -n $w ]]; then
  perf record -F 2000 -g -o "$WORK/profile-$tag-worker.data" -p "$w" -- sleep "$SECS" >/dev/null 2>&1 &
  pids="$pids $!"
fi
perf stat -e task-clock -o "$WORK/profile-$tag-find.txt" -p "$fpid" -- sleep "$SECS" >/dev/null 2>&1 &
pids="$pids $!"
# shellcheck disable=SC2086
wait $pids
l1=$(wc -l < "$WORK/profile-find.out")
n=$(( l1 - l0 ))
(( n > 0 )) || { echo "profile-bigdir: find reached no directory in ${SECS}s" >&2; exit 1; }
samples=$(perf script -i "$WORK/profile-$tag-daemon.data" -F period 2>/dev/null | wc -l)
if [[ -n $w ]]; then
  samples=$(( samples + $(perf script -i "$WORK/profile-$tag-worker.data" -F period 2>/dev/null | wc -l) ))
fi
fms=$(awk '/task-clock/ {print $1}' "$WORK/profile-$tag-find.txt")
echo "worker=$WK: $n directories in ${SECS}s; CPU per directory: daemon+worker $(( samples * 500 / n )) us, find $(echo "$fms * 1000 / $n" | bc) us; load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "profiles: $WORK/profile-$tag-daemon.data${w:+ $WORK/profile-$tag-worker.data}"

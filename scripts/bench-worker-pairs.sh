#!/usr/bin/env bash
# Restore worker on/off in interleaved pairs (issue 20 item 4): for each round and mode, a new
# mount, the first byte read, the host page cache dropped, then one row timed: wall seconds and
# the CPU seconds (user+sys) of the daemon and its restore workers. On a loaded host single runs
# of scripts/bench-restore.sh swing by more than the difference; pairs taken minutes apart
# share the load. Not a test: it prints numbers, take the medians.
#
# Usage: scripts/bench-worker-pairs.sh [--snapfs BIN] [--rounds N] [--rows "find finda big small"] [WORKDIR]
#   WORKDIR  a scripts/bench-restore.sh work directory holding pool/bench.qcow2 (build it with
#            that script first; default /var/tmp/snapfs-bench-restore)
# Rows: find (find ROOT), finda (find ROOT -printf '%y %s %T@ %p\n'), big (cp of bench/big.bin,
# 200 MB, to /dev/shm), small (cp -a of bench/small, 2,000 files, to /dev/shm).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
BIN=$REPO/target/release/snapfs
ROUNDS=3
ROWS="find finda big small"
WORK=/var/tmp/snapfs-bench-restore
while [[ $# -gt 0 ]]; do
  case $1 in
    --snapfs) BIN=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --rows) ROWS=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "bench-worker-pairs: unknown option $1" >&2; exit 2 ;;
    *) WORK=$1; shift ;;
  esac
done
[[ $(id -u) == 0 ]] || { echo "bench-worker-pairs: needs root (drop_caches, mounts)" >&2; exit 2; }
POOL=$WORK/pool
[[ -f $POOL/bench.qcow2 ]] || { echo "bench-worker-pairs: no $POOL/bench.qcow2 (run scripts/bench-restore.sh first)" >&2; exit 2; }
P=$WORK/pairs
SHM=/dev/shm/snapfs-bench-pairs.$$
mkdir -p "$SHM"
TCK=$(getconf CLK_TCK)
mnt() { mkdir -p "$P/mnt-$1"; rm -rf "$P/state-$1"; mkdir -p "$P/state-$1"
  timeout 120 "$BIN" mount --restore-worker="$1" --images "$POOL" --state-dir "$P/state-$1" "$P/mnt-$1" >"$P/mount-$1.log" 2>&1; }
umnt() { if mountpoint -q "$P/mnt-$1"; then timeout 60 "$BIN" unmount "$P/mnt-$1" || true; fi; }
cleanup() { set +e; umnt off; umnt on; rm -rf -- "$SHM"; }
trap cleanup EXIT
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
# clock ticks used by a process and its children still running
cpu() { local s=0 p; for p in "$@" $(pgrep -P "$1" || true); do
  s=$(( s + $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0) )); done; echo "$s"; }
echo "# bench-worker-pairs $(date -u +%FT%TZ), $BIN, load $(cut -d' ' -f1-3 /proc/loadavg)"
for (( round = 1; round <= ROUNDS; round++ )); do
  for mode in off on; do
    for row in $ROWS; do
      umnt "$mode"
      mnt "$mode" || { echo "$round $mode $row: mount failed: $(tail -2 "$P/mount-$mode.log")"; continue; }
      r=$P/mnt-$mode/volumes/pool/bench.qcow2/.snapshots/bench/files/p1
      head -c1 "$r/etc/debian_version" >/dev/null
      d=$(pgrep -n -f "^$BIN mount.*$P/mnt-$mode" || true)
      [[ -n $d ]] || { echo "$round $mode $row: daemon not found"; continue; }
      drop; c0=$(cpu "$d"); a=$(date +%s.%N)
      case $row in
        find) find "$r" >/dev/null ;;
        finda) find "$r" -printf '%y %s %T@ %p\n' >/dev/null ;;
        big) cp -- "$r/bench/big.bin" "$SHM/big.bin"; rm -f -- "$SHM/big.bin" ;;
        small) cp -a -- "$r/bench/small" "$SHM/small"; rm -rf -- "$SHM/small" ;;
        *) echo "bench-worker-pairs: unknown row $row" >&2; exit 2 ;;
      esac
      b=$(date +%s.%N); c1=$(cpu "$d")
      awk -v n="$round" -v m="$mode" -v r="$row" -v a="$a" -v b="$b" -v c=$(( c1 - c0 )) -v t="$TCK" \
        -v l="$(cut -d' ' -f1 /proc/loadavg)" \
        'BEGIN { printf "%s %-3s %-5s wall %.3f s  cpu %.2f s  load %s\n", n, m, r, b - a, c / t, l }'
    done
    umnt "$mode"
  done
done

#!/usr/bin/env bash
# The neighbour of a volume whose requests block (issue 20, item 2): how long a 16 MiB
# O_DIRECT read of volume A takes while seven lookups of volume B's guest filesystem are stuck
# behind its hung restore worker (the hidden test hook `.snapfs-worker-hang`). Not a test
# (tests/neighbour.rs checks it); it prints, per binary: the time of A's read, or "stuck" when
# it did not finish within --limit seconds.
#
# Usage: scripts/bench-neighbour-hung.sh [--snapfs BIN] [--peer BIN] [--limit S] --gpt RAW [WORKDIR]
#   --gpt RAW      gpt.raw of scripts/make-fs-images.sh (e.g. target/tmp/fs-images/gpt.raw)
#   --limit S      how long A's read may take before it counts as stuck (default 20)
#   WORKDIR        default /var/tmp/snapfs-neighbour-hung
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
SNAPFS=$REPO/target/release/snapfs
PEER=
GPT=
LIMIT=20
WORK=/var/tmp/snapfs-neighbour-hung
while [[ $# -gt 0 ]]; do
  case $1 in
    --snapfs) SNAPFS=$(realpath "$2"); shift 2 ;;
    --peer) PEER=$(realpath "$2"); shift 2 ;;
    --gpt) GPT=$(realpath "$2"); shift 2 ;;
    --limit) LIMIT=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
    *) WORK=$1; shift ;;
  esac
done
[[ -n $GPT ]] || { echo "--gpt RAW is needed" >&2; exit 2; }
mkdir -p "$WORK/pool/hb"
WORK=$(realpath "$WORK")
POOL=$WORK/pool/hb
if [[ ! -f $POOL/b.qcow2 ]]; then
  qemu-img convert -O qcow2 "$GPT" "$WORK/b.tmp.qcow2"
  qemu-img snapshot -c s "$WORK/b.tmp.qcow2"
  mv "$WORK/b.tmp.qcow2" "$POOL/b.qcow2"
  head -c $((64 << 20)) /dev/urandom >"$WORK/a.raw"
  qemu-img convert -O qcow2 "$WORK/a.raw" "$WORK/a.tmp.qcow2"
  qemu-img snapshot -c s "$WORK/a.tmp.qcow2"
  mv "$WORK/a.tmp.qcow2" "$POOL/a.qcow2"
  rm -f "$WORK/a.raw"
fi

# shellcheck source=scripts/lib/daemon.sh
source "$REPO/scripts/lib/daemon.sh"

MNT=$WORK/mnt
bins=("$SNAPFS")
[[ -n $PEER ]] && bins+=("$PEER")
printf 'binary\tb_waiting\ta_read_16mib\n'
for bin in "${bins[@]}"; do
  mkdir -p "$MNT"
  "$bin" mount --images "$POOL" --state-dir "$WORK/state" --log-file "$WORK/log" --threads 4 \
    --restore-worker=on --restore-worker-test-hooks "$MNT"
  pid=$(daemon_pid "$MNT")
  p1=$MNT/volumes/hb/b.qcow2/.snapshots/s/files/p1
  dirs=("" big-dir bin dir dir/nested many private)
  for d in "${dirs[@]}"; do stat "$p1/$d" >/dev/null; done
  hung=()
  for d in "${dirs[@]}"; do
    stat "$p1/$d/.snapfs-worker-hang" >/dev/null 2>&1 &
    hung+=($!)
    sleep 0.2
  done
  # Requests sent to the daemon and not answered (B's, stuck): wait for all seven.
  conn=/sys/fs/fuse/connections/$(stat -c %d "$MNT")/waiting
  for _ in $(seq 300); do
    waiting=$(cat "$conn" 2>/dev/null || echo 0)
    ((waiting >= 7)) && break
    sleep 0.1
  done
  t0=$(date +%s.%N)
  if timeout -k 2 "$LIMIT" dd if="$MNT/volumes/hb/a.qcow2/.snapshots/s/disk.raw" of=/dev/null \
      bs=1M count=16 iflag=direct status=none; then
    t1=$(date +%s.%N)
    res=$(python3 -c "print(f'{($t1 - $t0) * 1000:.0f} ms')")
  else
    res="stuck (> $LIMIT s)"
  fi
  printf '%s\t%s\t%s\n' "$bin" "$waiting" "$res"
  # Let B go: kill its workers until the stuck lookups have all failed.
  for _ in $(seq 600); do
    alive=0
    for h in "${hung[@]}"; do kill -0 "$h" 2>/dev/null && alive=1; done
    ((alive)) || break
    for w in $(pgrep -P "$pid" || true); do kill -9 "$w" 2>/dev/null || true; done
    sleep 0.1
  done
  wait "${hung[@]}" 2>/dev/null || true
  "$bin" unmount "$MNT" >/dev/null 2>&1 || "$bin" unmount --lazy "$MNT" >/dev/null 2>&1 || true
  for _ in $(seq 100); do [[ -d /proc/$pid ]] || break; sleep 0.1; done
done

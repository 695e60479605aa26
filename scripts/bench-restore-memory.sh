#!/usr/bin/env bash
# Daemon memory with many snapshots' files/ opened (issue 5). Not a test: prints numbers.
#
# Usage: scripts/bench-restore-memory.sh [--snapfs BIN] [--snapshots N] [WORKDIR]
#   --snapfs BIN      snapfs binary (default: target/release/snapfs; built if missing)
#   --snapshots N     how many snapshots to open (default 20)
#   WORKDIR           default /var/tmp/snapfs-bench-restore (needs the image that
#                     scripts/bench-restore.sh builds there; it is built first if missing)
#
# A copy of the bench image (a Debian root, 8,800 entries, in an ext4 partition of a qcow2) gets
# N internal snapshots. One daemon is mounted on it; for each snapshot in turn, its
# files/p1/ is walked whole (`find -printf` with sizes: every directory listed, every inode
# read) and three files are read (etc/debian_version, usr/bin/ls, bench/small/f1). Each
# snapshot is its own opened filesystem in the daemon (its own volume cache entry). Printed:
# the daemon's RSS after each 5 snapshots and its peak (VmHWM) at the end, in MiB, with the
# cache budget (--cache-mb, default 48: 32 MiB of it for blocks) for reference.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
SNAPFS=$REPO/target/release/snapfs
N=20
WORK=/var/tmp/snapfs-bench-restore
while [[ $# -gt 0 ]]; do
  case $1 in
    --snapfs) SNAPFS=$2; shift 2 ;;
    --snapshots) N=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "bench-restore-memory: unknown option $1" >&2; exit 2 ;;
    *) WORK=$1; shift ;;
  esac
done
[[ $(id -u) == 0 ]] || { echo "bench-restore-memory: needs root (FUSE mount of files/)" >&2; exit 2; }
[[ $N =~ ^[0-9]+$ ]] && (( N > 0 )) || { echo "bench-restore-memory: --snapshots wants a positive number" >&2; exit 2; }

SRC=$WORK/pool/bench.qcow2
if [[ ! -f $SRC ]]; then
  echo "# building the bench image first (scripts/bench-restore.sh --no-guestmount --no-7zip)"
  "$REPO/scripts/bench-restore.sh" --no-guestmount --no-7zip "$WORK" >/dev/null
fi
if [[ ! -x $SNAPFS ]]; then (cd "$REPO" && cargo build --release -q); fi

T=$(mktemp -d /var/tmp/snapfs-bench-memory.XXXXXX)
MNT=$T/mnt
cleanup() {
  set +e
  mountpoint -q "$MNT" && { timeout 60 "$SNAPFS" unmount "$MNT" || fusermount3 -u "$MNT"; }
  rm -rf -- "$T"
}
trap cleanup EXIT
mkdir -p "$T/pool" "$MNT" "$T/state"
IMG=$T/pool/many.qcow2
cp --sparse=always -- "$SRC" "$IMG"
for (( i = 1; i <= N; i++ )); do qemu-img snapshot -c "s$i" "$IMG"; done

"$SNAPFS" mount --images "$T/pool" --state-dir "$T/state" "$MNT"
pid=$(pgrep -n -f "snapfs mount.*$MNT")
rss() { awk -v k="$1:" '$1 == k { printf "%.0f", $2 / 1024 }' "/proc/$pid/status"; }
echo "# bench-restore-memory $(date -u +%FT%TZ): $("$SNAPFS" --version | head -1), $N snapshots of $(basename "$SRC")"
echo "snapshots opened   entries walked   daemon RSS (MiB)"
printf '%16d %16s %18s\n' 0 - "$(rss VmRSS)"
for (( i = 1; i <= N; i++ )); do
  r=$MNT/volumes/pool/many.qcow2/.snapshots/s$i/files/p1
  n=$(find "$r" -printf '%y %s %p\n' | wc -l)
  cat "$r/etc/debian_version" "$r/usr/bin/ls" "$r/bench/small/f1" >/dev/null
  if (( i % 5 == 0 || i == N )); then printf '%16d %16d %18s\n' "$i" "$n" "$(rss VmRSS)"; fi
done
echo "peak RSS (VmHWM): $(rss VmHWM) MiB (metadata and decompressed-cluster cache budget: 32 MiB, two thirds of --cache-mb)"

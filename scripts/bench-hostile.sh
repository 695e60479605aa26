#!/usr/bin/env bash
# Hostile-image figures (issue 20): peak RSS and log bytes of the daemon per hostile qcow2.
# Not a test: it prints numbers (tests/mount_images.rs checks the bounds).
#
# Usage: scripts/bench-hostile.sh [--snapfs BIN] [--cases DIR] [--only LIST] [WORKDIR]
#   --snapfs BIN   snapfs binary (default: target/release/snapfs of this repository)
#   --cases DIR    images made by scripts/make-hostile-images.py (default: made in WORKDIR/cases)
#   --only LIST    comma-separated case names (default: all of DIR)
#   --mnt PREFIX   mountpoints are PREFIX-CASE (default WORKDIR/mnt)
#   WORKDIR        default /tmp/snapfs-hostile
#
# Per case, one fresh daemon (background, --cache-mb 32, its own log file) serves a pool holding
# only that image; then: `ls .snapshots` three times a second apart (the issue-20 measurement:
# peak RSS and log bytes taken here), then `cat volume.json` and a 64 KiB read of the first listed
# snapshot's disk.raw (figures taken again). Printed per case (tab-separated):
#   case, ls (entries, or the error), read (ok/error/none), after the three listings: VmHWM MiB
#   and log bytes; after everything: VmHWM MiB, VmRSS MiB, log bytes; daemon alive (yes/no)
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
SNAPFS=$REPO/target/release/snapfs
CASES=
ONLY=
MNT=
WORK=/tmp/snapfs-hostile
while [[ $# -gt 0 ]]; do
  case $1 in
    --snapfs) SNAPFS=$(realpath "$2"); shift 2 ;;
    --cases) CASES=$(realpath "$2"); shift 2 ;;
    --only) ONLY=$2; shift 2 ;;
    --mnt) MNT=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
    *) WORK=$1; shift ;;
  esac
done
mkdir -p "$WORK"
WORK=$(realpath "$WORK")
MNT=${MNT:-$WORK/mnt}
if [[ -z $CASES ]]; then
  CASES=$WORK/cases
  python3 "$REPO/scripts/make-hostile-images.py" "$CASES"
fi

# shellcheck source=scripts/lib/daemon.sh
source "$REPO/scripts/lib/daemon.sh"

status_kib() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }

printf 'case\tls\tread\tls3_peak_mib\tls3_log_bytes\tpeak_mib\trss_mib\tlog_bytes\talive\n'
for img in "$CASES"/*.qcow2; do
  name=$(basename "$img" .qcow2)
  if [[ -n $ONLY && ",$ONLY," != *",$name,"* ]]; then continue; fi
  pool=$WORK/pool-$name/h
  mnt=$MNT-$name
  log=$WORK/log-$name.log
  rm -rf "$WORK/pool-$name" "$log"*
  mkdir -p "$pool" "$mnt"
  ln "$img" "$pool/$name.qcow2" 2>/dev/null || cp --reflink=auto "$img" "$pool/$name.qcow2"
  "$SNAPFS" mount --images "$pool" --state-dir "$WORK/state-$name" --log-file "$log" \
    --cache-mb 32 "$mnt"
  pid=$(daemon_pid "$mnt")
  snaps=$mnt/volumes/h/$name.qcow2/.snapshots
  res=
  for i in 1 2 3; do
    if out=$(ls -f "$snaps" 2>&1); then
      res=$(( $(printf '%s\n' "$out" | wc -l) - 2 ))
    else
      res=$(printf '%s' "$out" | sed 's/.*: //' | head -1)
    fi
    sleep 1
  done
  hwm3=$(status_kib "$pid" VmHWM)
  log3=$(cat "$log"* 2>/dev/null | wc -c)
  cat "$mnt/volumes/h/$name.qcow2/volume.json" >/dev/null 2>&1 || true
  read=none
  first=$(ls "$snaps" 2>/dev/null | head -1 || true)
  if [[ -n $first ]]; then
    if dd if="$snaps/$first/disk.raw" of=/dev/null bs=64k count=1 status=none 2>/dev/null; then
      read=ok
    else
      read=error
    fi
  fi
  hwm=$(status_kib "$pid" VmHWM)
  rss=$(status_kib "$pid" VmRSS)
  alive=no
  [[ -d /proc/$pid ]] && alive=yes
  logb=$(cat "$log"* 2>/dev/null | wc -c)
  printf '%s\t%s\t%s\t%d\t%d\t%d\t%d\t%d\t%s\n' "$name" "$res" "$read" $((hwm3 / 1024)) \
    "$log3" $((hwm / 1024)) $((rss / 1024)) "$logb" "$alive"
  "$SNAPFS" unmount "$mnt" >/dev/null 2>&1 || "$SNAPFS" unmount --lazy "$mnt" >/dev/null 2>&1 || true
  for _ in $(seq 50); do [[ -d /proc/$pid ]] || break; sleep 0.1; done
  rm -rf "$WORK/pool-$name"
done

#!/usr/bin/env bash
# Sequential read of one RBD snapshot through snapfs vs `rbd export` vs rbd-fuse, and
# snapshot mkdir/rmdir latency vs `rbd snap create/rm`, all in one run on the same cluster.
#
# Usage (as root):  scripts/bench-rbd.sh [SIZE_GIB]      (default 4)
#
# Starts the test cluster (scripts/ceph/start-ceph.sh), creates image rbd/snapfs-bench of
# SIZE_GIB filled by `rbd bench --io-type write` with snapshot `b1` (kept for later runs),
# builds snapfs --release, and reads:
#   - `rbd export rbd/snapfs-bench@b1 - > /dev/null`             (librbd, 10 parallel ops)
#   - snapfs  volumes/rbd/snapfs-bench/.snapshots/b1/disk.raw     (cat; dd bs=1M, 128K; 1 and 2 readers;
#             dd bs=4K of the first SMALL_MIB; RBD disks are opened with direct I/O)
#   - snapfs --ceph-page-cache (a second mount: the kernel page cache in between): cat, dd bs=4K
#   - rbd-fuse (image head only: rbd-fuse has no snapshots; the head holds the same bytes)
# The page cache is dropped before every read (echo 3 > /proc/sys/vm/drop_caches); 2 readers
# read one half each, concurrently. MiB/s are of the bytes read; ratios are against export.
#
# SNAPFS_BIN=path: read with that binary instead of building one. SNAPFS_BASE_BIN=path: also
# mount an older build (e.g. main's, from a `git worktree`) and read with it in the same run
# ("base …" lines, interleaved with ours), and report both daemons' peak RSS over 4 concurrent
# readers (one quarter each; VmHWM reset before via /proc/PID/clear_refs).
set -euo pipefail
cd "$(dirname "$0")/.."

SIZE_GIB=${1:-4}
IMG=snapfs-bench
POOL=rbd
SNAP=b1
WORK=${SNAPFS_BENCH_DIR:-/var/tmp/snapfs-bench-rbd}
LAT_N=${LAT_N:-10}
# 4 KiB readers read only this much (a 4 KiB reader with direct I/O is slow by design).
SMALL_MIB=${SMALL_MIB:-512}
# REPS=3: every read is run three times (interleaved) and the median is reported; the shared
# 2-core machine's load makes single runs vary by ±20%.
REPS=${REPS:-1}

bash scripts/ceph/start-ceph.sh
export CEPH_CONF=${SNAPFS_CEPH_DIR:-/var/lib/snapfs-ceph}/ceph.conf
unset CEPH_ARGS

now() { date +%s.%N; }
mibs() { # bytes seconds
  awk -v b="$1" -v s="$2" 'BEGIN { printf "%.0f", b / 1048576 / s }'
}
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }

size=$((SIZE_GIB << 30))
# Reuse the image when it is already there at the right size with its snapshot.
if ! rbd info "$POOL/$IMG@$SNAP" --format json 2>/dev/null | grep -q "\"size\":$size"; then
  echo "== creating $POOL/$IMG ($SIZE_GIB GiB, rbd bench --io-type write)" >&2
  rbd snap purge --no-progress "$POOL/$IMG" 2>/dev/null || true
  rbd rm --no-progress "$POOL/$IMG" 2>/dev/null || true
  rbd create --size "${SIZE_GIB}G" "$POOL/$IMG"
  t0=$(now)
  rbd bench --io-type write --io-size 4M --io-threads 4 --io-total "${SIZE_GIB}G" \
    --io-pattern seq "$POOL/$IMG" >/dev/null
  echo "   filled in $(awk -v a="$t0" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}') s" >&2
  rbd snap create "$POOL/$IMG@$SNAP" >/dev/null 2>&1
fi

if [[ -n ${SNAPFS_BIN:-} ]]; then
  BIN=$(realpath "$SNAPFS_BIN")
else
  echo "== building snapfs (release)" >&2
  cargo build --release --quiet
  BIN=$PWD/target/release/snapfs
fi
BASE_BIN=${SNAPFS_BASE_BIN:+$(realpath "$SNAPFS_BASE_BIN")}

mkdir -p "$WORK/snapfs" "$WORK/snapfs-pc" "$WORK/rbdfuse" "$WORK/snapfs-base"
cleanup() {
  "$BIN" unmount --lazy "$WORK/snapfs" 2>/dev/null || true
  "$BIN" unmount --lazy "$WORK/snapfs-base" 2>/dev/null || true
  "$BIN" unmount --lazy "$WORK/snapfs-pc" 2>/dev/null || true
  umount -l "$WORK/rbdfuse" 2>/dev/null || true
}
trap cleanup EXIT
cleanup
timeout 60 "$BIN" mount --ceph "$CEPH_CONF" --pool "$POOL" --state-dir "$WORK/state" "$WORK/snapfs"
timeout 60 "$BIN" mount --ceph "$CEPH_CONF" --pool "$POOL" --state-dir "$WORK/state-pc" \
  --ceph-page-cache "$WORK/snapfs-pc"
timeout 60 rbd-fuse -c "$CEPH_CONF" -p "$POOL" "$WORK/rbdfuse"
if [[ -n $BASE_BIN ]]; then
  timeout 60 "$BASE_BIN" mount --ceph "$CEPH_CONF" --pool "$POOL" --state-dir "$WORK/state-base" \
    "$WORK/snapfs-base"
fi
BASE_FILE=$WORK/snapfs-base/volumes/$POOL/$IMG/.snapshots/$SNAP/disk.raw
SNAPFS_FILE=$WORK/snapfs/volumes/$POOL/$IMG/.snapshots/$SNAP/disk.raw
PC_FILE=$WORK/snapfs-pc/volumes/$POOL/$IMG/.snapshots/$SNAP/disk.raw
RBDFUSE_FILE=$WORK/rbdfuse/$IMG

declare -A RESULT ALL
# run NAME CMD...: time one read of the whole image (BYTES=n: of n bytes) after dropping caches.
run() {
  local name=$1; shift
  drop_caches
  local t0 t1
  t0=$(now)
  "$@" || return 1
  t1=$(now)
  local v
  v=$(mibs "${BYTES:-$size}" "$(awk -v a="$t0" -v b="$t1" 'BEGIN{print b-a}')")
  ALL[$name]="${ALL[$name]:-} $v"
  # The median of the runs so far.
  RESULT[$name]=$(tr ' ' '\n' <<<"${ALL[$name]}" | grep . | sort -n |
    awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
  printf '%-34s %6s MiB/s\n' "$name" "$v" >&2
}
# Two concurrent readers, one half each.
two() { # file bs
  local half=$((size / 2)) bs=$2
  local n=$((half / bs))
  local rc=0
  dd if="$1" of=/dev/null bs="$bs" count="$n" status=none &
  local p=$!
  dd if="$1" of=/dev/null bs="$bs" skip="$n" count="$n" status=none || rc=1
  wait "$p" || rc=1
  return "$rc"
}

# Four concurrent readers, one quarter each.
four() { # file bs
  local q=$((size / 4)) bs=$2 i rc=0 pids=()
  local n=$((q / bs))
  for i in 1 2 3; do
    dd if="$1" of=/dev/null bs="$bs" skip=$((i * n)) count="$n" status=none &
    pids+=($!)
  done
  dd if="$1" of=/dev/null bs="$bs" count="$n" status=none || rc=1
  for i in "${pids[@]}"; do wait "$i" || rc=1; done
  return "$rc"
}
# The daemon serving mount point $1.
# shellcheck source=scripts/lib/daemon.sh
source scripts/lib/daemon.sh
kib() { awk -v f="$2:" '$1 == f {print $2}' "/proc/$1/status"; }
declare -A PEAK
# peak NAME MOUNTPOINT FILE: 4 readers; the daemon's RSS before, its peak during, RSS after.
peak() {
  local pid
  pid=$(daemon_pid "$2" || true)
  [[ -n $pid ]] || return 0
  local before
  before=$(kib "$pid" VmRSS)
  echo 5 >"/proc/$pid/clear_refs"
  run "$1 4 readers bs=1M" four "$3" $((1 << 20))
  PEAK[$1]="${PEAK[$1]:-} $((before >> 10))/$(($(kib "$pid" VmHWM) >> 10))/$(($(kib "$pid" VmRSS) >> 10))"
}

for ((rep = 1; rep <= REPS; rep++)); do
  echo "== sequential read of $SIZE_GIB GiB ($POOL/$IMG@$SNAP), page cache dropped before each (run $rep/$REPS)" >&2
  run "rbd export @snap" sh -c "rbd export --no-progress $POOL/$IMG@$SNAP - >/dev/null"
  run "snapfs cat" cat "$SNAPFS_FILE" >/dev/null
  run "snapfs dd bs=1M" dd if="$SNAPFS_FILE" of=/dev/null bs=1M status=none
  run "snapfs dd bs=128K" dd if="$SNAPFS_FILE" of=/dev/null bs=128K status=none
  run "snapfs 2 readers bs=1M" two "$SNAPFS_FILE" $((1 << 20))
  run "snapfs 2 readers bs=128K" two "$SNAPFS_FILE" $((128 << 10))
  peak snapfs "$WORK/snapfs" "$SNAPFS_FILE"
  if [[ -n $BASE_BIN ]]; then
    run "base cat" cat "$BASE_FILE" >/dev/null
    run "base dd bs=1M" dd if="$BASE_FILE" of=/dev/null bs=1M status=none
    run "base 2 readers bs=1M" two "$BASE_FILE" $((1 << 20))
    peak base "$WORK/snapfs-base" "$BASE_FILE"
  fi
  BYTES=$((SMALL_MIB << 20)) run "snapfs dd bs=4K" \
    dd if="$SNAPFS_FILE" of=/dev/null bs=4K count=$((SMALL_MIB << 8)) status=none
  run "snapfs --ceph-page-cache cat" cat "$PC_FILE" >/dev/null
  BYTES=$((SMALL_MIB << 20)) run "snapfs --ceph-page-cache dd bs=4K" \
    dd if="$PC_FILE" of=/dev/null bs=4K count=$((SMALL_MIB << 8)) status=none
  run "rbd-fuse (head) dd bs=1M" dd if="$RBDFUSE_FILE" of=/dev/null bs=1M status=none
  run "rbd-fuse (head) dd bs=128K" dd if="$RBDFUSE_FILE" of=/dev/null bs=128K status=none
  # rbd-fuse's parallel opens fail intermittently (ENVIRONMENT.md): record that, go on.
  if ! run "rbd-fuse (head) 2 readers bs=1M" two "$RBDFUSE_FILE" $((1 << 20)); then
    FUSE_FAILS=$((${FUSE_FAILS:-0} + 1))
    RESULT["rbd-fuse (head) 2 readers bs=1M"]=${RESULT["rbd-fuse (head) 2 readers bs=1M"]:-failed}
    echo "rbd-fuse (head) 2 readers bs=1M: failed" >&2
  fi
done

echo "== snapshot latency, mean of $LAT_N (ms)" >&2
lat() { # command...: mean ms over LAT_N runs of "$@ i"
  local t0 total=0 i
  for ((i = 0; i < LAT_N; i++)); do
    t0=$(now)
    "$@" "$i"
    total=$(awk -v t="$total" -v a="$t0" -v b="$(now)" 'BEGIN{print t + (b-a)*1000}')
  done
  awk -v t="$total" -v n="$LAT_N" 'BEGIN{printf "%.0f", t/n}'
}
SNAPDIR=$WORK/snapfs/volumes/$POOL/$IMG/.snapshots
cli_create() { rbd snap create "$POOL/$IMG@lat-cli-$1" >/dev/null 2>&1; }
cli_rm() { rbd snap rm "$POOL/$IMG@lat-cli-$1" >/dev/null 2>&1; }
fs_mkdir() { mkdir "$SNAPDIR/lat-fs-$1"; }
fs_rmdir() { rmdir "$SNAPDIR/lat-fs-$1"; }
c_create=$(lat cli_create); c_rm=$(lat cli_rm)
f_mkdir=$(lat fs_mkdir); f_rmdir=$(lat fs_rmdir)

ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b+0 > 0 && a+0 > 0) printf "%.2f", a/b; else print "-" }'; }
exp=${RESULT["rbd export @snap"]}
echo
echo "| read ($SIZE_GIB GiB, cold page cache) | MiB/s (median of $REPS) | vs rbd export | vs rbd-fuse same bs | all runs |"
echo "| --- | ---: | ---: | ---: | --- |"
for k in "rbd export @snap" "snapfs cat" "snapfs dd bs=1M" "snapfs dd bs=128K" \
         "snapfs 2 readers bs=1M" "snapfs 2 readers bs=128K" "snapfs 4 readers bs=1M" \
         "base cat" "base dd bs=1M" "base 2 readers bs=1M" "base 4 readers bs=1M" "snapfs dd bs=4K" \
         "snapfs --ceph-page-cache cat" "snapfs --ceph-page-cache dd bs=4K" \
         "rbd-fuse (head) dd bs=1M" "rbd-fuse (head) dd bs=128K" "rbd-fuse (head) 2 readers bs=1M"; do
  v=${RESULT[$k]:-}
  [[ $k == base* && -z $v ]] && continue
  case $k in
    "snapfs dd bs=1M") peer=${RESULT["rbd-fuse (head) dd bs=1M"]} ;;
    "snapfs 2 readers bs=1M") peer=${RESULT["rbd-fuse (head) 2 readers bs=1M"]} ;;
    "snapfs dd bs=128K"|"snapfs cat"|"snapfs 2 readers bs=128K"|"snapfs --ceph-page-cache cat") peer=${RESULT["rbd-fuse (head) dd bs=128K"]} ;;
    *) peer="" ;;
  esac
  echo "| $k | $v | $(ratio "$v" "$exp") | $( [[ -n $peer ]] && ratio "$v" "$peer" || echo -) |${ALL[$k]:-} |"
done
echo
echo "bs=4K lines read the first $SMALL_MIB MiB only."
if [[ ${#PEAK[@]} -gt 0 ]]; then
  echo
  echo "| daemon, 4 readers bs=1M | RSS before / peak (VmHWM) / after, MiB, each run |"
  echo "| --- | --- |"
  for k in snapfs base; do
    [[ -n ${PEAK[$k]:-} ]] && echo "| $k | ${PEAK[$k]} |"
  done
fi
if [[ -n ${FUSE_FAILS:-} ]]; then
  echo
  echo "rbd-fuse with 2 readers failed in $FUSE_FAILS of $REPS runs (open: No such file or directory)."
fi
echo
echo "| snapshot op (mean of $LAT_N) | ms |"
echo "| --- | ---: |"
echo "| rbd snap create (CLI) | $c_create |"
echo "| mkdir .snapshots/x (snapfs) | $f_mkdir |"
echo "| rbd snap rm (CLI) | $c_rm |"
echo "| rmdir .snapshots/x (snapfs) | $f_rmdir |"

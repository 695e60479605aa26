#!/usr/bin/env bash
# Parallels/ploop read benchmark: a 2 GiB dense Parallels delta read through snapfs (a ploop
# snapshot's disk.raw, 1 MiB reads) against `qemu-img convert -f parallels -O raw` of the same
# file, both to tmpfs, page cache dropped before every run; median of REPS runs.
#
# Usage (as root): scripts/bench-parallels.sh [--size-gib N] [--reps N] [--snapfs BIN]
#                  [--before BIN] [WORKDIR]
#   --snapfs BIN  the snapfs binary (default target/release/snapfs, built)
#   --before BIN  a second binary (e.g. main's), mounted beside it and measured in the same
#                 rounds ("before dd …" rows)
#   WORKDIR   where the image is built (default /var/tmp/snapfs-bench-parallels; kept between
#             runs, rebuilt when the size changes)
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SIZE_GIB=2
REPS=3
WORK=/var/tmp/snapfs-bench-parallels
SNAPFS=
BEFORE=
while (($#)); do
  case $1 in
    --snapfs) SNAPFS=$2; shift 2 ;;
    --before) BEFORE=$2; shift 2 ;;
    --size-gib) SIZE_GIB=$2; shift 2 ;;
    --reps) REPS=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
    *) WORK=$1; shift ;;
  esac
done
(( EUID == 0 )) || { echo "bench-parallels: needs root (mount, drop_caches)" >&2; exit 2; }

if [[ -z $SNAPFS ]]; then
  cargo build --release --quiet --bin snapfs --manifest-path "$REPO/Cargo.toml"
  SNAPFS=$REPO/target/release/snapfs
fi
POOL=$WORK/pool
DISK=$POOL/bench
MNT=$WORK/mnt
MNT_BEFORE=$WORK/mnt-before
SHM=$(mktemp -d /dev/shm/snapfs-bench-parallels.XXXXXX)
cleanup() {
  set +e
  mountpoint -q "$MNT" && "$SNAPFS" unmount "$MNT"
  [[ -n $BEFORE ]] && mountpoint -q "$MNT_BEFORE" && "$BEFORE" unmount "$MNT_BEFORE"
  rm -rf -- "$SHM"
}
trap cleanup EXIT

BASE_GUID="{5fbaabe3-6958-40ff-92a7-860e329aab41}"
TOP_GUID="{1c0e6b2e-3b8a-4d0e-9f7e-2a7d0c1d2e02}"
if [[ ! -f $DISK/.size-$SIZE_GIB ]]; then
  echo "# building a dense ${SIZE_GIB} GiB Parallels delta (1 MiB clusters) and a ploop descriptor"
  rm -rf "$DISK"; mkdir -p "$DISK" "$MNT"
  qemu-img create -q -f parallels "$DISK/root.hds" "${SIZE_GIB}G"
  # Incompressible-looking data everywhere (qemu-io -P writes one byte value per request).
  writes=()
  for ((i = 0; i < SIZE_GIB * 16; i++)); do
    writes+=(-c "write -P $((i % 251 + 1)) $((i * 64))M 64M")
  done
  qemu-io -f parallels "${writes[@]}" "$DISK/root.hds" >/dev/null
  qemu-img create -q -f parallels "$DISK/root.hds.top" "${SIZE_GIB}G"
  cat > "$DISK/DiskDescriptor.xml" <<EOF
<?xml version='1.0' encoding='UTF-8'?>
<Parallels_disk_image Version="1.0">
  <Disk_Parameters><Disk_size>$((SIZE_GIB * 2097152))</Disk_size></Disk_Parameters>
  <StorageData><Storage><Start>0</Start><End>$((SIZE_GIB * 2097152))</End><Blocksize>2048</Blocksize>
    <Image><GUID>$BASE_GUID</GUID><Type>Compressed</Type><File>root.hds</File></Image>
    <Image><GUID>$TOP_GUID</GUID><Type>Compressed</Type><File>root.hds.top</File></Image>
  </Storage></StorageData>
  <Snapshots><TopGUID>$TOP_GUID</TopGUID>
    <Shot><GUID>$BASE_GUID</GUID><ParentGUID>{00000000-0000-0000-0000-000000000000}</ParentGUID></Shot>
    <Shot><GUID>$TOP_GUID</GUID><ParentGUID>$BASE_GUID</ParentGUID></Shot>
  </Snapshots>
</Parallels_disk_image>
EOF
  touch "$DISK/.size-$SIZE_GIB"
fi
mkdir -p "$MNT"
"$SNAPFS" mount --images "$POOL" --state-dir "$WORK/state" "$MNT"
SNAPFILE=$MNT/volumes/pool/bench/.snapshots/5fbaabe3-6958-40ff-92a7-860e329aab41/disk.raw
if [[ -n $BEFORE ]]; then
  mkdir -p "$MNT_BEFORE"
  "$BEFORE" mount --images "$POOL" --state-dir "$WORK/state-before" "$MNT_BEFORE"
fi
SNAPFILE_BEFORE=$MNT_BEFORE/volumes/pool/bench/.snapshots/5fbaabe3-6958-40ff-92a7-860e329aab41/disk.raw
BYTES=$(stat -c %s "$SNAPFILE")

declare -A RUNS
time_run() { # label command...
  local label=$1 t0 t1; shift
  sync; echo 3 > /proc/sys/vm/drop_caches
  t0=$(date +%s.%N); "$@"; t1=$(date +%s.%N)
  rm -f "$SHM/out.raw"
  RUNS[$label]+="$(awk -v b="$BYTES" -v a="$t0" -v c="$t1" 'BEGIN { printf "%.0f ", b / (c - a) / 1048576 }')"
}
for ((r = 0; r < REPS; r++)); do
  time_run "snapfs dd bs=1M to tmpfs" dd if="$SNAPFILE" of="$SHM/out.raw" bs=1M status=none
  time_run "qemu-img convert -f parallels to tmpfs" qemu-img convert -f parallels -O raw "$DISK/root.hds" "$SHM/out.raw"
  time_run "snapfs dd bs=1M to /dev/null" dd if="$SNAPFILE" of=/dev/null bs=1M status=none
  if [[ -n $BEFORE ]]; then
    time_run "before dd bs=1M to tmpfs" dd if="$SNAPFILE_BEFORE" of="$SHM/out.raw" bs=1M status=none
    time_run "before dd bs=1M to /dev/null" dd if="$SNAPFILE_BEFORE" of=/dev/null bs=1M status=none
  fi
done
LABELS=("snapfs dd bs=1M to tmpfs" "qemu-img convert -f parallels to tmpfs" "snapfs dd bs=1M to /dev/null")
[[ -n $BEFORE ]] && LABELS+=("before dd bs=1M to tmpfs" "before dd bs=1M to /dev/null")
median() { tr ' ' '\n' | grep . | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
echo "| read of a ${SIZE_GIB} GiB dense Parallels image (cold page cache) | MiB/s (median of $REPS) | runs |"
echo "| --- | --- | --- |"
for label in "${LABELS[@]}"; do
  echo "| $label | $(echo "${RUNS[$label]}" | median) | ${RUNS[$label]}|"
done
echo "# $(date -u +%FT%TZ), $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg), $(qemu-img --version | head -1)"

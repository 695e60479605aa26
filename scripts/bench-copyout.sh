#!/usr/bin/env bash
# Copy-out benchmark (issue 15): `cp` of a snapshot's disk file from the mount to tmpfs against
# `qemu-img convert -O raw` of the same image to tmpfs, in the same run, interleaved ROUNDS
# times (the machine is shared: each figure is the median of its rounds). Not a test: it prints
# numbers, it does not judge them.
#
# Usage: scripts/bench-copyout.sh [--snapfs BIN] [--before BIN] [--size SIZE] [--rounds N]
#                                 [--no-raw] [--cold] [--prefix NAME] [WORKDIR]
#   --snapfs BIN  snapfs binary (default: target/release/snapfs of this repository)
#   --before BIN  a second binary (an older build) mounted beside it: its qcow2 cp is a row of
#                 its own, interleaved with the others in every round
#   --cold        drop the image files from the host page cache before every copy (also for
#                 convert): the disk's own speed and I/O depth count, not only the copies
#   --size SIZE   disk size (default 2G, a multiple of 64M), random data, dense
#   --rounds N    interleaved rounds (default 3)
#   --no-raw      skip the raw case (it needs libvirt at qemu:///system)
#   --prefix NAME the libvirt domain is NAME-copyout-PID (default snapfs)
#   WORKDIR       default /var/tmp/snapfs-copyout
#
# Cases:
#   qcow2  an internal snapshot of a dense qcow2 (64 KiB clusters), through `--images`:
#          every read goes through the daemon's qcow2 reader.
#   raw    a shut-off libvirt domain (defined here, never started) on a raw file; `mkdir s1`
#          makes libvirt write an overlay from then on, and s1's disk is the raw file, opened
#          in FUSE passthrough (the kernel reads the file itself). Peers: `qemu-img convert -f
#          raw` and `cp` of the raw file itself.
# MB/s = 10^6 bytes per second; the page cache holds the image file (warm), and the FUSE
# file's own page cache is dropped before each cp.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
SNAPFS=$REPO/target/release/snapfs
SIZE=2G
ROUNDS=3
RAW=1
COLD=0
BEFORE=
PREFIX=snapfs
WORK=/var/tmp/snapfs-copyout
while [[ $# -gt 0 ]]; do
  case $1 in
    --snapfs) SNAPFS=$2; shift 2 ;;
    --size) SIZE=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --no-raw) RAW=0; shift ;;
    --cold) COLD=1; shift ;;
    --before) BEFORE=$2; shift 2 ;;
    --prefix) PREFIX=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
    -*) echo "bench-copyout: unknown option $1" >&2; exit 2 ;;
    *) WORK=$1; shift ;;
  esac
done
for cmd in qemu-img qemu-io python3 fusermount3; do
  command -v "$cmd" >/dev/null || { echo "bench-copyout: $cmd not found" >&2; exit 1; }
done

mkdir -p "$WORK"
WORK=$(realpath -- "$WORK")
POOL=$WORK/copyout
MNT=$WORK/mnt
STATE=$WORK/state
SHM=/dev/shm/snapfs-copyout.$$
DOM=$PREFIX-copyout-$$
mkdir -p "$POOL" "$MNT" "$STATE" "$SHM"
MOUNTED=0
BMOUNTED=0
cleanup() {
  set +e
  (( MOUNTED )) && { timeout 60 "$SNAPFS" unmount "$MNT" >/dev/null 2>&1 || fusermount3 -u "$MNT"; }
  (( BMOUNTED )) && { timeout 60 "$BEFORE" unmount "$MNT.before" >/dev/null 2>&1 || fusermount3 -u "$MNT.before"; }
  if virsh -c qemu:///system dominfo "$DOM" >/dev/null 2>&1; then
    for s in $(virsh -c qemu:///system snapshot-list "$DOM" --name 2>/dev/null); do
      virsh -c qemu:///system snapshot-delete "$DOM" "$s" --metadata >/dev/null 2>&1
    done
    virsh -c qemu:///system undefine "$DOM" >/dev/null 2>&1
  fi
  rm -f "$WORK"/raw/"$DOM".* "$WORK"/dom.xml
  rm -rf -- "$SHM"
}
trap cleanup EXIT

bytes=$(numfmt --from=iec "${SIZE^^}")
(( bytes % (64 << 20) == 0 )) || { echo "bench-copyout: --size must be a multiple of 64M" >&2; exit 2; }
now_ns() { date +%s%N; }
rate() { awk -v b="$bytes" -v ns="$1" 'BEGIN { printf "%.0f", b / (ns / 1e9) / 1e6 }'; }
median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2fx", a / b }'; }
timed() {   # timed CMD...: run it, print its rate
  local t0 t1
  t0=$(now_ns); "$@"; t1=$(now_ns)
  rate $((t1 - t0))
}
drop_cache() { dd if="$1" iflag=nocache count=0 status=none 2>/dev/null || true; }
cold() { (( COLD )) || return 0; drop_cache "$img"; (( RAW )) && drop_cache "$raw"; return 0; }
cp_out() { drop_cache "$1"; cold; cp -- "$1" "$SHM/out"; rm -f "$SHM/out"; }
convert_out() { cold; qemu-img convert -U -f "$1" -O raw "$2" "$SHM/out"; rm -f "$SHM/out"; }

# images: one chunk of random data written over the whole disk
if [[ ! -s $WORK/rand64.bin ]]; then head -c $((64 << 20)) /dev/urandom > "$WORK/rand64.bin"; fi
img=$POOL/dense.qcow2
if [[ ! -f $img ]] || [[ $(qemu-img info -U --output=json "$img" | python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])') != "$bytes" ]]; then
  rm -f "$img"
  qemu-img create -q -f qcow2 "$img" "$bytes"
  cmds=()
  for ((off = 0; off < bytes; off += 64 << 20)); do cmds+=(-c "write -q -s $WORK/rand64.bin $off $((64 << 20))"); done
  qemu-io -f qcow2 "${cmds[@]}" "$img" >/dev/null
  qemu-img snapshot -c s1 "$img"
fi
mkdir -p "$WORK/raw"
raw=$WORK/raw/$DOM.vda.raw
if (( RAW )); then
  qemu-img convert -U -O raw "$img" "$raw"
  cat > "$WORK/dom.xml" <<EOF
<domain type='qemu'><name>$DOM</name><memory unit='MiB'>64</memory><vcpu>1</vcpu><os><type arch='x86_64'>hvm</type></os><devices><disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='$raw'/><target dev='vda' bus='virtio'/></disk></devices></domain>
EOF
  virsh -c qemu:///system define "$WORK/dom.xml" >/dev/null
fi

args=(--images "$POOL" --state-dir "$STATE")
(( RAW )) && args+=(--libvirt=qemu:///system)
"$SNAPFS" mount "${args[@]}" "$MNT"
MOUNTED=1
qsnap=$MNT/volumes/copyout/dense.qcow2/.snapshots/s1/disk.raw
if [[ -n $BEFORE ]]; then
  mkdir -p "$MNT.before" "$STATE.before"
  "$BEFORE" mount --images "$POOL" --state-dir "$STATE.before" "$MNT.before"
  BMOUNTED=1
  bsnap=$MNT.before/volumes/copyout/dense.qcow2/.snapshots/s1/disk.raw
fi
if (( RAW )); then
  mkdir "$MNT/instances/$DOM/.snapshots/s1"
  rsnap=$MNT/instances/$DOM/.snapshots/s1/vda.raw
fi

echo "# bench-copyout $(date -u +%FT%TZ) on $(uname -r), $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# $("$SNAPFS" --version | head -1); $(qemu-img --version | head -1); $SIZE, $ROUNDS rounds (median)$( (( COLD )) && echo ', cold (image files dropped from the page cache before each copy)' || echo ', warm')"
cat "$img" > /dev/null
(( RAW )) && cat "$raw" > /dev/null
declare -A R
for ((r = 0; r < ROUNDS; r++)); do
  R[qcp]+=" $(timed cp_out "$qsnap")"
  [[ -n $BEFORE ]] && R[qbcp]+=" $(timed cp_out "$bsnap")"
  R[qconv]+=" $(timed convert_out qcow2 "$img")"
  if (( RAW )); then
    R[rcp]+=" $(timed cp_out "$rsnap")"
    R[rconv]+=" $(timed convert_out raw "$raw")"
    R[rhost]+=" $(timed cp_out "$raw")"
  fi
done
printf '%-8s %-44s %10s  %s\n' case test "MB/s" "rounds"
med() { echo "${R[$1]}" | median; }
row() { printf '%-8s %-44s %10s  %s\n' "$1" "$2" "$(med "$3")" "${R[$3]# }"; }
row qcow2 "cp of the snapshot's disk.raw to tmpfs" qcp
row qcow2 "qemu-img convert -O raw to tmpfs" qconv
printf '%-8s %-44s %10s\n' qcow2 "  cp / convert" "$(ratio "$(med qcp)" "$(med qconv)")"
if [[ -n $BEFORE ]]; then
  row qcow2 "cp of disk.raw, --before binary" qbcp
  printf '%-8s %-44s %10s\n' qcow2 "  cp (--before) / convert" "$(ratio "$(med qbcp)" "$(med qconv)")"
fi
if (( RAW )); then
  row raw "cp of s1/vda.raw (passthrough) to tmpfs" rcp
  row raw "qemu-img convert -f raw -O raw to tmpfs" rconv
  row raw "cp of the raw host file to tmpfs" rhost
  printf '%-8s %-44s %10s\n' raw "  cp / convert" "$(ratio "$(med rcp)" "$(med rconv)")"
  printf '%-8s %-44s %10s\n' raw "  cp / cp of the host file" "$(ratio "$(med rcp)" "$(med rhost)")"
fi
echo "# load after: $(cut -d' ' -f1-3 /proc/loadavg)"

#!/usr/bin/env bash
# Incremental (since/) benchmark, issue 15. Not a test: it prints numbers, it does not judge them.
#
# Usage: scripts/bench-incremental.sh [--snapfs BIN] [--size-gib N] [--changed-pct P] [WORKDIR]
#   --snapfs BIN     snapfs binary (default target/release/snapfs; built if missing)
#   --size-gib N     disk size (default 16)
#   --changed-pct P  percent of 4 MiB blocks rewritten between s1 and s2 (default 1)
#   --prefix NAME    prefix of the RBD image and the domain (default issue-15-bench)
#   --only CASE      run one case: rbd, internal or chain (default all three)
#   WORKDIR          default /var/tmp/issue-15-bench-incremental (removed at the end)
#
# Two disks of N GiB, each with 64 random 4 MiB blocks written before s1 and P % of all 4 MiB
# blocks rewritten before s2 (half of them with data, a quarter zero-written, a quarter
# discarded; qemu-io):
#   RBD  image rbd/issue-15-bench (CEPH_CONF or /var/lib/snapfs-ceph/ceph.conf), snapshots s1, s2
#   qcow2 internal snapshots s1, s2 of WORKDIR/pool/d.qcow2 (64 KiB clusters)
#   qcow2 external chain: libvirt disk-only snapshots s1, s2 of a shut-off domain
#         issue-15-bench-chain on qemu:///system (skipped when libvirt does not answer): the
#         writes before s2 go into the overlay libvirt made at s1
# Timed, each on a fresh mount (nothing cached):
#   list: `cat since/s1/disk.extents.json` vs `rbd diff --from-snap s1` / `qemu-img map` of the
#         image (qemu-img compare cannot open internal snapshots, so map is its peer)
#   copy: `cp --sparse=always since/s1/disk.raw` vs `rbd export-diff --from-snap s1`
# and the over-report: reported bytes / bytes really rewritten.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
SNAPFS=$REPO/target/release/snapfs
SIZE_GIB=16
PCT=1
WORK=/var/tmp/issue-15-bench-incremental
PREFIX=issue-15-bench
ONLY=all
while [[ $# -gt 0 ]]; do
  case $1 in
    --snapfs) SNAPFS=$2; shift 2 ;;
    --size-gib) SIZE_GIB=$2; shift 2 ;;
    --changed-pct) PCT=$2; shift 2 ;;
    --prefix) PREFIX=$2; shift 2 ;;
    --only) ONLY=$2; shift 2 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) WORK=$1; shift ;;
  esac
done
[[ -x $SNAPFS ]] || (cd "$REPO" && cargo build --release --bin snapfs)
CONF=${CEPH_CONF:-/var/lib/snapfs-ceph/ceph.conf}
IMG=rbd/$PREFIX
DOM=$PREFIX-chain
MNT=$WORK/mnt
mkdir -p "$WORK/pool" "$MNT"

cleanup() {
  "$SNAPFS" unmount --lazy "$MNT" >/dev/null 2>&1 || true
  if [[ $ONLY == all || $ONLY == rbd ]]; then
    rbd -c "$CONF" snap purge --no-progress "$IMG" >/dev/null 2>&1 || true
    rbd -c "$CONF" rm --no-progress "$IMG" >/dev/null 2>&1 || true
  fi
  for s in s2 s1; do virsh -q snapshot-delete "$DOM" "$s" --metadata >/dev/null 2>&1 || true; done
  virsh -q undefine "$DOM" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

now() { date +%s.%N; }
secs() { echo "$2 - $1" | bc -l | xargs printf '%.3f'; }
mount_snapfs() {
  "$SNAPFS" unmount --lazy "$MNT" >/dev/null 2>&1 || true
  rm -rf "$WORK/state"
  "$SNAPFS" mount --state-dir "$WORK/state" "$@" "$MNT"
}

BLOCK=$((4 << 20))
NBLOCKS=$((SIZE_GIB * 256))
NCHANGED=$(( NBLOCKS * PCT / 100 )); (( NCHANGED > 0 )) || NCHANGED=1
# The same pseudo-random block choice for both backends.
first=$(python3 -c "import random; r=random.Random(15); print(' '.join(str(b) for b in r.sample(range($NBLOCKS), 64)))")
second=$(python3 -c "import random; r=random.Random(16); print(' '.join(str(b) for b in r.sample(range($NBLOCKS), $NCHANGED)))")
ops() {  # ops LIST MODE: qemu-io -c arguments, one 4 MiB block each
  local i=0 b
  for b in $1; do
    local off=$((b * BLOCK))
    if [[ $2 == first ]]; then echo "-c"; echo "write -P 7 $off $BLOCK"
    else case $((i % 4)) in
      0|1) echo "-c"; echo "write -P 9 $off $BLOCK" ;;
      2) echo "-c"; echo "write -z $off $BLOCK" ;;
      3) echo "-c"; echo "discard $off $BLOCK" ;;
    esac; fi
    i=$((i + 1))
  done
}
mapfile -t OPS1 < <(ops "$first" first)
mapfile -t OPS2 < <(ops "$second" second)
# Really changed: blocks rewritten with data, and zeroed/discarded blocks that held data.
CHANGED_BYTES=$(python3 -c "
f=set('$first'.split()); s='$second'.split()
print(sum(1 for i,b in enumerate(s) if i%4<2 or b in f) * $BLOCK)")
echo "disk ${SIZE_GIB} GiB, $NCHANGED of $NBLOCKS 4 MiB blocks rewritten, $CHANGED_BYTES bytes really changed; load: $(cut -d' ' -f1-3 /proc/loadavg)"

report() {  # report NAME OURS_S PEER_S PEER_NAME
  printf '%-34s snapfs %8ss   %-28s %8ss   ratio(peer/snapfs) %s\n' "$1" "$2" "$4" "$3" \
    "$(echo "$3 / ($2 + 0.0005)" | bc -l | xargs printf '%.2f')"
}
overreport() {  # overreport JSON
  python3 -c "import json,sys; e=json.load(open(sys.argv[1])); t=sum(x['length'] for x in e); print(f'{len(e)} extents, {t} bytes, over-report {t/$CHANGED_BYTES:.2f}x')" "$1"
}

# --- RBD ---
if [[ $ONLY == all || $ONLY == rbd ]]; then
rbd -c "$CONF" snap purge --no-progress "$IMG" >/dev/null 2>&1 || true
rbd -c "$CONF" rm --no-progress "$IMG" >/dev/null 2>&1 || true
rbd -c "$CONF" create --size "${SIZE_GIB}G" "$IMG"
R="rbd:$IMG:conf=$CONF"
qemu-io -f raw "${OPS1[@]}" "$R" >/dev/null
rbd -c "$CONF" snap create --no-progress "$IMG@s1"
qemu-io -f raw "${OPS2[@]}" "$R" >/dev/null
rbd -c "$CONF" snap create --no-progress "$IMG@s2"

mount_snapfs --ceph "$CONF" --pool rbd
D=$MNT/volumes/rbd/$PREFIX/.snapshots/s2/since/s1
t0=$(now); cat "$D/disk.extents.json" > "$WORK/rbd.json"; t1=$(now)
p0=$(now); rbd -c "$CONF" diff --from-snap s1 "$IMG@s2" > /dev/null; p1=$(now)
report "rbd: list extents" "$(secs "$t0" "$t1")" "$(secs "$p0" "$p1")" "rbd diff --from-snap"
mount_snapfs --ceph "$CONF" --pool rbd
t0=$(now); cp --sparse=always "$D/disk.raw" "$WORK/rbd-since.raw"; t1=$(now)
p0=$(now); rbd -c "$CONF" export-diff --no-progress --from-snap s1 "$IMG@s2" "$WORK/rbd.diff"; p1=$(now)
report "rbd: copy since/ out" "$(secs "$t0" "$t1")" "$(secs "$p0" "$p1")" "rbd export-diff --from-snap"
echo "rbd: $(overreport "$WORK/rbd.json"); daemon VmHWM $(grep VmHWM /proc/$(pgrep -nf "snapfs mount --state-dir $WORK/state")/status 2>/dev/null | awk '{print $2, $3}')"
rm -f "$WORK/rbd-since.raw" "$WORK/rbd.diff"
fi

# --- qcow2 internal snapshots ---
if [[ $ONLY == all || $ONLY == internal ]]; then
Q=$WORK/pool/d.qcow2
qemu-img create -q -f qcow2 "$Q" "${SIZE_GIB}G"
qemu-io -f qcow2 "${OPS1[@]}" "$Q" >/dev/null
qemu-img snapshot -c s1 "$Q"
qemu-io -f qcow2 "${OPS2[@]}" "$Q" >/dev/null
qemu-img snapshot -c s2 "$Q"
mount_snapfs --images "$WORK/pool"
D=$MNT/volumes/pool/d.qcow2/.snapshots/s2/since/s1
if [[ ! -e $D ]]; then
  echo "no $D:"; qemu-img snapshot -l "$Q"; ls -la "$MNT/volumes/pool/d.qcow2/.snapshots/s2/since" || true
  tail -5 "$WORK/state/snapfs.log"; exit 1
fi
t0=$(now); cat "$D/disk.extents.json" > "$WORK/q.json"; t1=$(now)
p0=$(now); qemu-img map --output=json "$Q" > /dev/null; p1=$(now)
report "qcow2 internal: list extents" "$(secs "$t0" "$t1")" "$(secs "$p0" "$p1")" "qemu-img map (active)"
mount_snapfs --images "$WORK/pool"
t0=$(now); cp --sparse=always "$D/disk.raw" "$WORK/q-since.raw"; t1=$(now)
report "qcow2 internal: copy since/ out" "$(secs "$t0" "$t1")" "0" "(no qemu peer)"
echo "qcow2 internal: $(overreport "$WORK/q.json")"
fi

# --- qcow2 external chain (libvirt disk-only snapshots of a shut-off domain) ---
[[ $ONLY == all || $ONLY == chain ]] || exit 0
if ! virsh -q version >/dev/null 2>&1; then
  echo "qcow2 chain: skipped (libvirt at qemu:///system does not answer)"
  exit 0
fi
C=$WORK/pool/chain.qcow2
qemu-img create -q -f qcow2 "$C" "${SIZE_GIB}G"
qemu-io -f qcow2 "${OPS1[@]}" "$C" >/dev/null
virsh -q undefine "$DOM" >/dev/null 2>&1 || true
cat > "$WORK/chain.xml" <<XML
<domain type='qemu'><name>$DOM</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>
<os><type arch='x86_64'>hvm</type></os>
<devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
<source file='$C'/><target dev='vda' bus='virtio'/></disk></devices></domain>
XML
virsh -q define "$WORK/chain.xml" >/dev/null
virsh -q snapshot-create-as "$DOM" s1 --disk-only --atomic >/dev/null
OVL=$(virsh -q domblklist "$DOM" --details | awk '$3 == "vda" {print $4}')
qemu-io -f qcow2 "${OPS2[@]}" "$OVL" >/dev/null
virsh -q snapshot-create-as "$DOM" s2 --disk-only --atomic >/dev/null
mount_snapfs --libvirt
D=$MNT/instances/$DOM/.snapshots/s2/since/s1
if [[ ! -e $D ]]; then
  echo "no $D:"; ls -la "$MNT/instances/$DOM/.snapshots/s2/since" || true
  tail -5 "$WORK/state/snapfs.log"; exit 1
fi
t0=$(now); cat "$D/vda.extents.json" > "$WORK/c.json"; t1=$(now)
p0=$(now); qemu-img map -U --output=json "$OVL" > /dev/null; p1=$(now)
report "qcow2 chain: list extents" "$(secs "$t0" "$t1")" "$(secs "$p0" "$p1")" "qemu-img map (s1's overlay)"
mount_snapfs --libvirt
t0=$(now); cp --sparse=always "$D/vda.raw" "$WORK/c-since.raw"; t1=$(now)
p0=$(now); qemu-img convert -U -O qcow2 "$OVL" -B "$C" -F qcow2 "$WORK/c-peer.qcow2"; p1=$(now)
report "qcow2 chain: copy since/ out" "$(secs "$t0" "$t1")" "$(secs "$p0" "$p1")" "qemu-img convert -B (overlay only)"
echo "qcow2 chain: $(overreport "$WORK/c.json")"

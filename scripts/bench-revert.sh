#!/usr/bin/env bash
# Revert benchmark: `ln -sfn .snapshots/s1 current` through snapfs against the backend's own
# tool on the same data, same run: a qcow2 volume (vs `qemu-img snapshot -a`), an RBD image
# on the loopback cluster (vs `rbd snap rollback`) and a shut-off RBD-backed libvirt instance
# (one RBD disk, never booted; vs `rbd snap rollback` of its disk), each with SIZE_GIB of data
# rewritten after the snapshot; and a shut-off libvirt instance on a SIZE_GIB qcow2 file disk
# (never booted) reverted disk-only to an external snapshot made through snapfs, vs `virsh
# snapshot-revert` of the same snapshot (both make a new overlay: 64 MiB written between). snapfs's time includes its before-revert snapshot
# (--revert-keep=yes, the default) unless --no-keep. Median of REPS runs. --parts picks which
# (comma-separated: qcow2, rbd, vm, file; all by default; vm and file need libvirt at
# qemu:///system).
#
# Usage (as root): scripts/bench-revert.sh [--size-gib N] [--reps N] [--no-keep]
#                  [--parts qcow2,rbd,vm,file] [WORKDIR]
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SIZE_GIB=1
REPS=3
KEEP=yes
WORK=/var/tmp/snapfs-bench-revert
PARTS=qcow2,rbd,vm,file
while (($#)); do
  case $1 in
    --parts) PARTS=$2; shift 2 ;;
    --size-gib) SIZE_GIB=$2; shift 2 ;;
    --reps) REPS=$2; shift 2 ;;
    --no-keep) KEEP=no; shift ;;
    -h|--help) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
    *) WORK=$1; shift ;;
  esac
done
(( EUID == 0 )) || { echo "bench-revert: needs root" >&2; exit 2; }
export CEPH_CONF=${CEPH_CONF:-/var/lib/snapfs-ceph/ceph.conf}
cargo build --release --quiet --bin snapfs --manifest-path "$REPO/Cargo.toml"
SNAPFS=$REPO/target/release/snapfs
mkdir -p "$WORK/imgs" "$WORK/mnt"
IMG=$WORK/imgs/vm.qcow2
RBD_IMG=rbd/snapfs-bench-revert
VM=snapfs-bench-revert-vm
VM_IMG=rbd/$VM-vda
VMF=snapfs-bench-revert-file
URI=qemu:///system
has() { [[ ,$PARTS, == *,$1,* ]]; }
cleanup() {
  set +e
  mountpoint -q "$WORK/mnt" && "$SNAPFS" unmount "$WORK/mnt"
  rbd snap purge --no-progress "$RBD_IMG" >/dev/null 2>&1
  rbd rm --no-progress "$RBD_IMG" >/dev/null 2>&1
  if has vm; then
    virsh -q -c "$URI" undefine "$VM" >/dev/null 2>&1
    sleep 2
    rbd snap purge --no-progress "$VM_IMG" >/dev/null 2>&1
    rbd rm --no-progress "$VM_IMG" >/dev/null 2>&1
  fi
  if has file; then
    virsh -q -c "$URI" undefine "$VMF" --snapshots-metadata >/dev/null 2>&1
    rm -rf "$WORK/vmf"
  fi
}
trap cleanup EXIT

MB=$((SIZE_GIB * 1024))
fill_qcow2() { qemu-io -f qcow2 -c "write -P $1 0 ${MB}M" "$IMG" >/dev/null; }
fill_rbd() { rbd bench --io-type write --io-size 4M --io-pattern seq --io-total "${MB}M" "${1:-$RBD_IMG}" >/dev/null; }
now() { date +%s.%N; }
declare -A RUNS
note() { RUNS[$1]+="$(awk -v a="$2" -v b="$3" 'BEGIN { printf "%.2f ", b - a }')"; }

rm -f "$IMG"
qemu-img create -q -f qcow2 "$IMG" "${SIZE_GIB}G"
rbd rm --no-progress "$RBD_IMG" >/dev/null 2>&1 || true
rbd create --size "${SIZE_GIB}G" "$RBD_IMG"
LIBVIRT=()
if has vm; then
  rbd rm --no-progress "$VM_IMG" >/dev/null 2>&1 || true
  rbd create --size "${SIZE_GIB}G" "$VM_IMG"
  cat >"$WORK/vm.xml" <<XML
<domain type='qemu'><name>$VM</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>
<os><type arch='x86_64'>hvm</type></os><devices>
<disk type='network' device='disk'><driver name='qemu' type='raw'/>
<source protocol='rbd' name='$VM_IMG'><config file='$CEPH_CONF'/></source>
<target dev='vda' bus='virtio'/></disk></devices></domain>
XML
  virsh -q -c "$URI" define "$WORK/vm.xml" >/dev/null
  LIBVIRT=("--libvirt=$URI")
fi
if has file; then
  virsh -q -c "$URI" undefine "$VMF" --snapshots-metadata >/dev/null 2>&1 || true
  rm -rf "$WORK/vmf"; mkdir -p "$WORK/vmf"
  qemu-img create -q -f qcow2 "$WORK/vmf/vda.qcow2" "${SIZE_GIB}G"
  for ((o = 0; o < MB; o += 512)); do
    qemu-io -f qcow2 -c "write -P 1 ${o}M 512M" "$WORK/vmf/vda.qcow2" >/dev/null
  done
  cat >"$WORK/vmf.xml" <<XML
<domain type='qemu'><name>$VMF</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>
<os><type arch='x86_64'>hvm</type></os><devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
<source file='$WORK/vmf/vda.qcow2'/><target dev='vda' bus='virtio'/></disk></devices></domain>
XML
  virsh -q -c "$URI" define "$WORK/vmf.xml" >/dev/null
  LIBVIRT=("--libvirt=$URI")
fi
"$SNAPFS" mount --images "$WORK/imgs" --ceph "$CEPH_CONF" --pool rbd --revert-keep "$KEEP" \
  "${LIBVIRT[@]}" --state-dir "$WORK/state" "$WORK/mnt"
QV=$WORK/mnt/volumes/imgs/vm.qcow2
RV=$WORK/mnt/volumes/rbd/snapfs-bench-revert
IV=$WORK/mnt/instances/$VM
FV=$WORK/mnt/instances/$VMF
# The file instance's active image (its newest overlay), written between reverts.
vmf_top() { virsh -q -c "$URI" domblklist "$VMF" | awk '$1 == "vda" { print $2 }'; }
scribble_vmf() { qemu-io -f qcow2 -c "write -P $1 0 64M" "$(vmf_top)" >/dev/null; }

for ((r = 0; r < REPS; r++)); do
  if has qcow2; then
    # qcow2: snapshot s1 of data A, rewrite all with B, revert.
    fill_qcow2 $((r + 1)); qemu-img snapshot -c "q$r" "$IMG"; fill_qcow2 $((r + 100))
    t0=$(now); qemu-img snapshot -a "q$r" "$IMG"; t1=$(now); note "qemu-img snapshot -a" "$t0" "$t1"
    fill_qcow2 $((r + 100))
    t0=$(now); ln -sfn ".snapshots/q$r" "$QV/current"; t1=$(now); note "snapfs qcow2 (ln -sfn current)" "$t0" "$t1"
  fi
  if has rbd; then
    # RBD: the same with rbd snap rollback.
    fill_rbd; rbd snap create "$RBD_IMG@r$r"; fill_rbd
    t0=$(now); rbd snap rollback --no-progress "$RBD_IMG@r$r"; t1=$(now); note "rbd snap rollback" "$t0" "$t1"
    fill_rbd
    t0=$(now); ln -sfn ".snapshots/r$r" "$RV/current"; t1=$(now); note "snapfs rbd (ln -sfn current)" "$t0" "$t1"
  fi
  if has vm; then
    # RBD-backed instance (shut off): snapfs's mkdir (an RBD snapshot and the record), rewrite,
    # the CLI's rollback of the disk; rewrite, snapfs's revert. Then the rep's snapshots go.
    fill_rbd "$VM_IMG"; mkdir "$IV/.snapshots/v$r"; fill_rbd "$VM_IMG"
    t0=$(now); rbd snap rollback --no-progress "$VM_IMG@v$r"; t1=$(now); note "rbd snap rollback (instance disk)" "$t0" "$t1"
    fill_rbd "$VM_IMG"
    t0=$(now); ln -sfn ".snapshots/v$r" "$IV/current"; t1=$(now); note "snapfs RBD-backed instance (ln -sfn current)" "$t0" "$t1"
    for s in "$IV"/.snapshots/*; do rmdir "$s"; done
  fi
  if has file; then
    # File-disk instance (shut off): snapfs's mkdir (a libvirt external snapshot), write, the
    # peer's revert of that snapshot; write, snapfs's revert of it.
    # (libvirt names a revert's new overlay <image>.<seconds since the epoch>: one a second.)
    mkdir "$FV/.snapshots/f$r"; scribble_vmf $((r + 10)); sleep 1.1
    t0=$(now); virsh -q -c "$URI" snapshot-revert "$VMF" "f$r" >/dev/null; t1=$(now); note "virsh snapshot-revert (file instance, disk-only)" "$t0" "$t1"
    scribble_vmf $((r + 20)); sleep 1.1
    t0=$(now); ln -sfn ".snapshots/f$r" "$FV/current"; t1=$(now); note "snapfs file instance (ln -sfn current)" "$t0" "$t1"
    sleep 1.1
  fi
done
median() { tr ' ' '\n' | grep . | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
echo "| revert of ${SIZE_GIB} GiB rewritten since the snapshot (before-revert kept: $KEEP) | seconds (median of $REPS) | MiB/s | runs |"
echo "| --- | --- | --- | --- |"
for label in "qemu-img snapshot -a" "snapfs qcow2 (ln -sfn current)" "rbd snap rollback" "snapfs rbd (ln -sfn current)" \
  "rbd snap rollback (instance disk)" "snapfs RBD-backed instance (ln -sfn current)" \
  "virsh snapshot-revert (file instance, disk-only)" "snapfs file instance (ln -sfn current)"; do
  [[ -n ${RUNS[$label]:-} ]] || continue
  m=$(echo "${RUNS[$label]}" | median)
  echo "| $label | $m | $(awk -v m="$m" -v s="$MB" 'BEGIN { printf "%.0f", s / m }') | ${RUNS[$label]}|"
done
echo "# $(date -u +%FT%TZ), $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"

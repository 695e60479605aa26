#!/bin/bash
# bench-remote.sh: read rate of a remote host's qcow2 snapshot disk through the mount
# (virStorageVolDownload ranges under our qcow2 reader) vs `virsh vol-download` of the same
# volume, vs the same image read through the mount from the local host; and mkdir latency,
# local vs remote. Needs scripts/testbed/up.sh and remote-up.sh; run as root.
#
# Usage: scripts/bench-remote.sh [SIZE_MIB=512]
# Makes (and removes) domain issue-17h-bench on both hosts, files under /var/tmp/issue-17h-bench.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${1:-512}
LOCAL=qemu:///system
REMOTE=qemu+tcp://10.213.0.2/system
RBASE=${SNAPFS_REMOTE_DIR:-/var/lib/snapfs-remote}
POOL=snapfs-remote
NAME=issue-17h-bench
W=/var/tmp/issue-17h-bench
BIN=${SNAPFS_BIN:-target/release/snapfs}
[[ -n ${SNAPFS_BIN:-} ]] || cargo build --release --bin snapfs 2>/dev/null
log() { echo "bench-remote: $*" >&2; }
now() { date +%s.%N; }
rate() { awk -v b="$1" -v t0="$2" -v t1="$3" 'BEGIN {printf "%7.1f MiB/s (%.2f s)", b / 1048576 / (t1 - t0), t1 - t0}'; }

cleanup() {
    set +e
    mountpoint -q "$W/mnt" && umount "$W/mnt"
    for uri in "$LOCAL" "$REMOTE"; do
        for s in $(virsh -q -c "$uri" snapshot-list "$NAME" --name 2>/dev/null); do
            virsh -q -c "$uri" snapshot-delete "$NAME" "$s" >/dev/null 2>&1 ||
                virsh -q -c "$uri" snapshot-delete "$NAME" "$s" --metadata >/dev/null 2>&1
        done
        virsh -q -c "$uri" undefine "$NAME" >/dev/null 2>&1
    done
    rm -f "$RBASE/lib/images/$POOL/$NAME".*
    virsh -q -c "$REMOTE" pool-refresh "$POOL" >/dev/null 2>&1
    rm -rf "$W"
}
trap cleanup EXIT
cleanup
mkdir -p "$W/mnt" "$W/state"

log "image: $SIZE MiB of random data as qcow2 (local copy and remote copy)"
head -c $((SIZE << 20)) /dev/urandom > "$W/data.raw"
qemu-img convert -q -f raw -O qcow2 "$W/data.raw" "$W/$NAME.qcow2"
rm -f "$W/data.raw"
cp "$W/$NAME.qcow2" "$RBASE/lib/images/$POOL/$NAME.qcow2"   # setup only: the remote's own dir
virsh -q -c "$REMOTE" pool-refresh "$POOL" >/dev/null
define() {  # define URI DISK
    local x=$W/dom.xml
    cat > "$x" <<EOF
<domain type='qemu'><name>$NAME</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='pc'>hvm</type></os>
<devices><emulator>/usr/bin/qemu-system-x86_64</emulator>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='$2'/>
<target dev='vda' bus='virtio'/></disk><memballoon model='none'/></devices></domain>
EOF
    virsh -q -c "$1" define "$x" >/dev/null
}
define "$LOCAL" "$W/$NAME.qcow2"
define "$REMOTE" "/var/lib/libvirt/images/$POOL/$NAME.qcow2"

"$BIN" mount -c "$LOCAL" -c "$REMOTE" --state-dir "$W/state" "$W/mnt"
L=$W/mnt/instances/$NAME@local/.snapshots
R=$W/mnt/instances/$NAME@10.213.0.2/.snapshots
t0=$(now); mkdir "$L/b1"; t1=$(now); mkdir "$R/b1"; t2=$(now)
awk -v a="$t0" -v b="$t1" -v c="$t2" 'BEGIN {printf "mkdir (shut-off, external disk-only): local %.0f ms, remote %.0f ms\n", (b-a)*1000, (c-b)*1000}'

bytes=$((SIZE << 20))
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
drop; t0=$(now); dd if="$L/b1/vda.raw" of=/dev/null bs=1M status=none; t1=$(now)
echo "local  through the mount:           $(rate $bytes "$t0" "$t1")"
drop; t0=$(now); dd if="$R/b1/vda.raw" of=/dev/null bs=1M status=none; t1=$(now)
echo "remote through the mount:           $(rate $bytes "$t0" "$t1")"
drop; t0=$(now)
virsh -q -c "$REMOTE" vol-download --pool "$POOL" "$NAME.qcow2" "$W/dl.qcow2"
t1=$(now)
echo "remote virsh vol-download (qcow2):  $(rate "$(stat -c %s "$W/dl.qcow2")" "$t0" "$t1")"
cmp "$R/b1/vda.raw" "$L/b1/vda.raw" && echo "remote and local bytes equal"
echo "load: $(cut -d' ' -f1-3 /proc/loadavg), $(nproc) cores"
rmdir "$L/b1" "$R/b1"

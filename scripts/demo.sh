#!/usr/bin/env bash
# The main job on a fresh Debian 12 machine, as root: install, build, make demo images,
# bring up the libvirt + QEMU test bed (a tiny guest, `demo`, running qemu-guest-agent and
# writing to its ext4 disk), mount snapfs on both and take a short tour: a quiesced snapshot
# of the running guest, its bytes and files, a copy booted from it. The mount stays up.
#
# Usage: scripts/demo.sh [MOUNTPOINT]   (default /mnt/snapfs)
set -euo pipefail
cd "$(dirname "$0")/.."
MNT=${1:-/mnt/snapfs}
DEMO=/var/lib/snapfs-demo
IMAGES=$DEMO/images

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }
show() { step "$*"; eval "$*"; }

echo "== installing dependencies"
bash scripts/install-deps.sh
# snapfs links neither libvirt nor Ceph: it loads them when --libvirt/--ceph asks for them.
echo "== the libvirt + QEMU test bed (guest 'demo')"
bash scripts/testbed/up.sh
echo "== a single-node Ceph cluster on loopback"
bash scripts/ceph/start-ceph.sh
export CEPH_CONF=/var/lib/snapfs-ceph/ceph.conf
echo "== the test guest booted from an RBD disk (guest 'demo-rbd', Nova's rbd image backend)"
bash scripts/testbed/rbd-guest.sh demo-rbd
echo "== building snapfs (release)"
cargo build --release --quiet
BIN=$PWD/target/release/snapfs

echo "== demo images in $IMAGES"
if [[ ! -f $IMAGES/web.qcow2 ]]; then
  mkdir -p "$IMAGES"
  qemu-img create -q -f qcow2 "$IMAGES/web.qcow2" 256M
  qemu-io -f qcow2 -c 'write -P 0x61 0 16M' -c 'write -P 0x62 128M 4M' "$IMAGES/web.qcow2" >/dev/null
  qemu-img snapshot -c nightly "$IMAGES/web.qcow2"
  qemu-io -f qcow2 -c 'write -P 0x63 0 1M' "$IMAGES/web.qcow2" >/dev/null
  qemu-img convert -c -O qcow2 -o compression_type=zstd "$IMAGES/web.qcow2" "$IMAGES/db.qcow2"
  truncate -s 64M "$IMAGES/scratch.raw"
fi
if ! rbd info rbd/demo-vol >/dev/null 2>&1; then
  rbd create --size 256M rbd/demo-vol
  rbd bench --io-type write --io-size 4M --io-total 32M rbd/demo-vol >/dev/null
fi


if grep -qs " $MNT fuse" /proc/mounts; then "$BIN" unmount --lazy "$MNT" || true; fi
mkdir -p "$MNT"
show "$BIN mount --images $IMAGES --libvirt --ceph $CEPH_CONF --pool rbd --flatten-on-launch $MNT"
show "ls $MNT $MNT/volumes/images"
show "cat $MNT/volumes/images/web.qcow2/volume.json"
show "ls $MNT/volumes/images/web.qcow2/.snapshots/"
show "mkdir $MNT/volumes/images/web.qcow2/.snapshots/before-upgrade"
show "ls -ls $MNT/volumes/images/web.qcow2/.snapshots/before-upgrade/"
show "cat $MNT/volumes/images/web.qcow2/.snapshots/before-upgrade/snapshot.json"
show "cp --sparse=always $MNT/volumes/images/web.qcow2/.snapshots/nightly/disk.raw /tmp/web-nightly.raw && du -h --apparent-size /tmp/web-nightly.raw && du -h /tmp/web-nightly.raw"
show "qemu-img convert -O raw -l snapshot.name=nightly $IMAGES/web.qcow2 /tmp/web-nightly.qemu.raw && cmp /tmp/web-nightly.raw /tmp/web-nightly.qemu.raw && echo identical to qemu-img convert"
show "rmdir $MNT/volumes/images/web.qcow2/.snapshots/before-upgrade"
show "ls $MNT/volumes/images/web.qcow2/.snapshots/"
show "touch $MNT/volumes/images/web.qcow2/.snapshots/nightly/x || true"
show "ls -l $MNT/volumes/images/web.qcow2/    # current -> the snapshot the live image descends from"
show "ln -sfn .snapshots/nightly $MNT/volumes/images/web.qcow2/current    # revert the image to nightly"
show "ls $MNT/volumes/images/web.qcow2/.snapshots/ && readlink $MNT/volumes/images/web.qcow2/current    # before-revert-… keeps what was discarded"
show "rmdir $MNT/volumes/images/web.qcow2/.snapshots/before-revert-*"
rm -f /tmp/web-nightly.raw /tmp/web-nightly.qemu.raw

RSNAP=tour-$(date +%H%M%S)
show "ls $MNT/volumes/ $MNT/volumes/rbd/"
show "mkdir $MNT/volumes/rbd/demo-vol/.snapshots/$RSNAP && rbd snap ls rbd/demo-vol"
show "ls -ls $MNT/volumes/rbd/demo-vol/.snapshots/$RSNAP/"
show "cmp $MNT/volumes/rbd/demo-vol/.snapshots/$RSNAP/disk.raw <(rbd export rbd/demo-vol@$RSNAP - 2>/dev/null) && echo identical to rbd export"
show "rmdir $MNT/volumes/rbd/demo-vol/.snapshots/$RSNAP"

RISNAP=tour-$(date +%H%M%S)
RCOPY=demo-rbd-copy-$(date +%H%M%S)
show "cat $MNT/instances/demo-rbd/instance.json | grep -A3 '\"source\"'"
show "time mkdir $MNT/instances/demo-rbd/.snapshots/$RISNAP    # freeze, RBD snapshot of every disk, thaw"
show "rbd snap ls rbd/demo-rbd-vda && grep -E 'quiesced|source' $MNT/instances/demo-rbd/.snapshots/$RISNAP/snapshot.json"
show "cmp $MNT/instances/demo-rbd/.snapshots/$RISNAP/vda.raw <(rbd export rbd/demo-rbd-vda@$RISNAP - 2>/dev/null) && echo identical to rbd export"
show "tail -n 1 $MNT/instances/demo-rbd/.snapshots/$RISNAP/files/vda/p1/writer.log"
show "time ln -s ../instances/demo-rbd/.snapshots/$RISNAP $MNT/launch/$RCOPY    # protect, rbd clone, define + start"
show "rbd ls -l rbd | grep -E 'NAME|demo-rbd'"
for _ in $(seq 120); do rbd info "rbd/$RCOPY-vda" --format json | jq -e '.parent' >/dev/null || break; sleep 0.5; done
show "rbd info rbd/$RCOPY-vda | grep parent || echo 'no parent any more: flattened in the background (--flatten-on-launch)'"
show "rmdir $MNT/instances/demo-rbd/.snapshots/$RISNAP && rbd snap ls rbd/demo-rbd-vda | wc -l    # deletable once no clone depends on it"
virsh -q -c qemu:///system destroy "$RCOPY" >/dev/null 2>&1 || true
virsh -q -c qemu:///system undefine "$RCOPY" >/dev/null 2>&1 || true
rbd rm --no-progress "rbd/$RCOPY-vda" >/dev/null 2>&1 || true

SNAP=tour-$(date +%H%M%S)
COPY=demo-copy-$(date +%H%M%S)
show "ls $MNT/instances/"
show "cat $MNT/instances/demo/instance.json"
show "time mkdir $MNT/instances/demo/.snapshots/$SNAP    # freeze (guest agent), snapshot every disk, thaw"
show "cat $MNT/instances/demo/.snapshots/$SNAP/snapshot.json"
show "ls -ls $MNT/instances/demo/.snapshots/$SNAP/"
show "ls -la $MNT/instances/demo/.snapshots/$SNAP/files/vda/p1/"
show "cat $MNT/instances/demo/.snapshots/$SNAP/files/vda/p1/hello.txt"
show "tail -n 2 $MNT/instances/demo/.snapshots/$SNAP/files/vda/p1/writer.log    # the guest's log, frozen at the snapshot"
show "time ln -s ../instances/demo/.snapshots/$SNAP $MNT/launch/$COPY    # boot a copy from the snapshot"
show "ls -l $MNT/launch/ && virsh -c qemu:///system list"
printf '\nThe copy %s keeps running; remove it with: rm %s/launch/%s; virsh destroy %s; virsh undefine %s\n' \
  "$COPY" "$MNT" "$COPY" "$COPY" "$COPY"
printf '\nsnapfs is mounted on %s (log: /var/lib/snapfs/snapfs.log). Unmount with: %s unmount %s\n' "$MNT" "$BIN" "$MNT"

#!/bin/bash
# define-guest.sh [--start] [--recreate] [--rbd POOL/IMAGE --ceph-conf CONF] NAME OUTDIR [DISK]
#
# Defines libvirt domain NAME (TCG, 1 vcpu, 288 MiB, direct kernel boot from OUTDIR as built by
# build-guest.sh) with:
#   vda   DISK (default /var/lib/snapfs-testbed/images/NAME.qcow2); created as a full copy of
#         OUTDIR/demo-disk.qcow2 when it does not exist, used as it is when it does
#   channel org.qemu.guest_agent.0 (unix socket chosen by libvirt)
#   channel org.snapfs.ctl (unix socket chosen by libvirt, see guest-ctl.sh; no fixed path, so a
#           clone defined from this XML gets its own)
#   serial console          -> /var/log/snapfs-testbed/NAME.console.log
# --rbd POOL/IMAGE  vda is that RBD image instead (a network disk, like Nova's rbd image backend;
#              QEMU reads CONF, given with --ceph-conf, for the monitors and the keyring); the image
#              must exist (see rbd-guest.sh) and is never removed by --recreate
# --start      start the domain if it is not running
# --recreate   destroy + undefine an existing NAME (and its snapshot metadata) and recreate its
#              disk from demo-disk.qcow2 (files of its disk chain named IMAGES/NAME.* are removed:
#              its disk and external snapshot overlays; a DISK elsewhere is kept and reused)
# Idempotent: an existing domain is left alone (unless --recreate).
set -euo pipefail

START=0 RECREATE=0 RBD='' CEPH_CONF_FILE=''
while [[ ${1:-} == --* ]]; do
    case $1 in
        --start) START=1 ;;
        --recreate) RECREATE=1 ;;
        --rbd) RBD=${2:?--rbd POOL/IMAGE}; shift ;;
        --ceph-conf) CEPH_CONF_FILE=${2:?--ceph-conf CONF}; shift ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
NAME=${1:?usage: define-guest.sh [--start] [--recreate] NAME OUTDIR [DISK]}
OUTDIR=$(cd "${2:?usage: define-guest.sh [--start] [--recreate] NAME OUTDIR [DISK]}" && pwd)
BASE=${SNAPFS_TESTBED_DIR:-/var/lib/snapfs-testbed}
IMAGES=$BASE/images
DISK=${3:-$IMAGES/$NAME.qcow2}
LOGDIR=/var/log/snapfs-testbed
MEM_MIB=${SNAPFS_GUEST_MEM_MIB:-288}
export LIBVIRT_DEFAULT_URI=${LIBVIRT_DEFAULT_URI:-qemu:///system}
log() { echo "define-guest: $*" >&2; }

for f in vmlinuz initrd.img cmdline demo-disk.qcow2; do
    [[ -s $OUTDIR/$f ]] || { log "ERROR: $OUTDIR/$f missing (run build-guest.sh $OUTDIR)"; exit 1; }
done
mkdir -p "$IMAGES" "$LOGDIR"

exists() { virsh -q dominfo "$NAME" >/dev/null 2>&1; }
state() { virsh -q domstate "$NAME" 2>/dev/null | head -1; }

if [[ $RECREATE == 1 ]] && exists; then
    log "recreating $NAME"
    [[ $(state) == "shut off" ]] || virsh -q destroy "$NAME" >/dev/null 2>&1 || true
    # snapshot metadata only: the files are removed below
    for s in $(virsh -q snapshot-list "$NAME" --name 2>/dev/null); do
        virsh -q snapshot-delete "$NAME" "$s" --metadata >/dev/null
    done
    # files of the current vda chain that live in IMAGES and are named after this domain
    top=$(virsh -q domblklist "$NAME" --details | awk '$3 == "vda" {print $4}')
    chain=()
    if [[ -n $top && -e $top ]]; then
        mapfile -t chain < <(qemu-img info -U --backing-chain "$top" | sed -n 's/^image: //p')
    fi
    virsh -q undefine "$NAME" --nvram >/dev/null 2>&1 || virsh -q undefine "$NAME" >/dev/null
    for f in "${chain[@]}"; do
        if [[ $f == "$IMAGES/$NAME".* ]]; then rm -f "$f"; fi
    done
    # a DISK given on the command line outside IMAGES/NAME.* is the caller's: keep it
    if [[ $DISK == "$IMAGES/$NAME".* ]]; then rm -f "$DISK"; fi
fi

if [[ -n $RBD && -z $CEPH_CONF_FILE ]]; then log "ERROR: --rbd needs --ceph-conf"; exit 2; fi

if ! exists && [[ -n $RBD ]]; then
    DISK_XML="    <disk type='network' device='disk'>
      <driver name='qemu' type='raw' cache='writeback'/>
      <source protocol='rbd' name='$RBD'>
        <config file='$CEPH_CONF_FILE'/>
      </source>
      <target dev='vda' bus='virtio'/>
    </disk>"
    DISK="rbd:$RBD"
    FMT=raw
elif ! exists; then
    if [[ ! -e $DISK ]]; then
        cp --sparse=always "$OUTDIR/demo-disk.qcow2" "$DISK.tmp"
        mv "$DISK.tmp" "$DISK"
        log "disk $DISK (copy of demo-disk.qcow2)"
    fi
    FMT=$(qemu-img info -U "$DISK" | awk '/^file format:/ {print $3; exit}')
    DISK_XML="    <disk type='file' device='disk'>
      <driver name='qemu' type='$FMT'/>
      <source file='$DISK'/>
      <target dev='vda' bus='virtio'/>
    </disk>"
fi

if ! exists; then
    XML=$(mktemp /tmp/snapfs-domain.XXXXXX.xml)
    trap 'rm -f "$XML"' EXIT
    cat > "$XML" <<EOF
<domain type='qemu'>
  <name>$NAME</name>
  <title>snapfs test guest</title>
  <memory unit='MiB'>$MEM_MIB</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>$OUTDIR/vmlinuz</kernel>
    <initrd>$OUTDIR/initrd.img</initrd>
    <cmdline>$(cat "$OUTDIR/cmdline")</cmdline>
  </os>
  <features><acpi/></features>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
$DISK_XML
    <channel type='unix'>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <channel type='unix'>
      <target type='virtio' name='org.snapfs.ctl'/>
    </channel>
    <serial type='file'>
      <source path='$LOGDIR/$NAME.console.log' append='off'/>
      <target port='0'/>
    </serial>
    <console type='file'>
      <source path='$LOGDIR/$NAME.console.log' append='off'/>
      <target type='serial' port='0'/>
    </console>
    <memballoon model='none'/>
  </devices>
</domain>
EOF
    virsh -q define "$XML" >/dev/null
    log "defined $NAME (disk $DISK, $FMT)"
else
    log "$NAME already defined"
fi

if [[ $START == 1 ]]; then
    if [[ $(state) == running ]]; then
        log "$NAME already running"
    else
        virsh -q start "$NAME" >/dev/null
        log "started $NAME"
    fi
fi

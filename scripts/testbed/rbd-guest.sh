#!/bin/bash
# rbd-guest.sh [--recreate|--remove] [NAME]: the test guest booted from an RBD disk (Nova's rbd image
# backend): imports the guest disk (OUTDIR/demo-disk.qcow2 of build-guest.sh) into RBD image
# rbd/NAME-vda when it does not exist, defines domain NAME (default demo-rbd) with that network
# disk, starts it and waits for its guest agent. Needs the test bed (up.sh) and the loopback
# Ceph (scripts/ceph/start-ceph.sh). Idempotent.
# --recreate   destroy + undefine NAME, remove its image with its snapshots (and images cloned
#              from them), then build it again
# --remove     the same removal, without building it again
# Env: CEPH_CONF (default /var/lib/snapfs-ceph/ceph.conf), RBD_POOL (default rbd).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BASE=${SNAPFS_TESTBED_DIR:-/var/lib/snapfs-testbed}
RECREATE=0 REMOVE=0
case ${1:-} in
    --recreate) RECREATE=1; shift ;;
    --remove) RECREATE=1 REMOVE=1; shift ;;
esac
NAME=${1:-demo-rbd}
POOL=${RBD_POOL:-rbd}
IMG=$NAME-vda
export CEPH_CONF=${CEPH_CONF:-/var/lib/snapfs-ceph/ceph.conf}
export LIBVIRT_DEFAULT_URI=${LIBVIRT_DEFAULT_URI:-qemu:///system}
log() { echo "rbd-guest: $*" >&2; }

timeout 30 rbd -p "$POOL" ls >/dev/null || { log "ERROR: Ceph pool $POOL unreachable: run scripts/ceph/start-ceph.sh"; exit 1; }

# remove an image with all its snapshots (unprotecting them; clones must be gone or flattened)
rm_image() {
    local s
    for s in $(rbd snap ls "$POOL/$1" --format json | jq -r '.[] | select(.protected == "true") | .name'); do
        rbd snap unprotect "$POOL/$1@$s"
    done
    rbd snap purge "$POOL/$1" --no-progress >/dev/null 2>&1 || true
    rbd rm "$POOL/$1" --no-progress >/dev/null
}

if [[ $RECREATE == 1 ]]; then
    if virsh -q dominfo "$NAME" >/dev/null 2>&1; then
        virsh -q destroy "$NAME" >/dev/null 2>&1 || true
        virsh -q undefine "$NAME" >/dev/null
    fi
    if rbd info "$POOL/$IMG" >/dev/null 2>&1; then
        # clones of its snapshots first (launch leftovers of earlier runs)
        for c in $(rbd ls "$POOL"); do
            [[ $c == "$IMG" ]] && continue
            if rbd info "$POOL/$c" --format json | jq -e --arg p "$IMG" '.parent.image == $p' >/dev/null 2>&1; then
                log "removing clone $POOL/$c"
                rm_image "$c"
            fi
        done
        rm_image "$IMG"
    fi
fi
if [[ $REMOVE == 1 ]]; then exit 0; fi
[[ -s $BASE/guest/demo-disk.qcow2 ]] || { log "ERROR: no guest disk: run scripts/testbed/up.sh first"; exit 1; }

if ! rbd info "$POOL/$IMG" >/dev/null 2>&1; then
    raw=$(mktemp /var/tmp/snapfs-rbd-guest.XXXXXX.raw)
    trap 'rm -f "$raw"' EXIT
    qemu-img convert -O raw "$BASE/guest/demo-disk.qcow2" "$raw"
    rbd import --no-progress "$raw" "$POOL/$IMG" >/dev/null
    log "imported the guest disk as $POOL/$IMG ($(rbd info "$POOL/$IMG" --format json | jq -r '.features | join(",")'))"
fi

"$HERE/define-guest.sh" --start --rbd "$POOL/$IMG" --ceph-conf "$CEPH_CONF" "$NAME" "$BASE/guest"
"$HERE/wait-agent.sh" "$NAME" 120

#!/bin/bash
# remote-down.sh: stop the second libvirt host of remote-up.sh and remove its namespace and veth.
# --purge also removes its directory (pool, domain definition, images).
set -euo pipefail
NS=${SNAPFS_REMOTE_NS:-snapfs-remote}
BASE=${SNAPFS_REMOTE_DIR:-/var/lib/snapfs-remote}
DAEMON=libvirtd-remote
log() { echo "remote-down: $*" >&2; }

if [[ -s $BASE/libvirtd.pid ]]; then
    pid=$(tr -d '\n ' < "$BASE/libvirtd.pid")
    if [[ -d /proc/$pid && $(cat "/proc/$pid/comm" 2>/dev/null) == "$DAEMON" ]]; then
        log "stopping $DAEMON ($pid)"
        kill -TERM "$pid"
        for _ in $(seq 100); do [[ -d /proc/$pid ]] || break; sleep 0.1; done
        [[ -d /proc/$pid ]] && kill -KILL "$pid"
    fi
    rm -f "$BASE/libvirtd.pid"
fi
ip link del snapfs-rem0 2>/dev/null || true
ip route del unreachable 10.213.0.0/30 metric 4242 2>/dev/null || true
if ip netns list | grep -q "^$NS\b"; then
    log "deleting network namespace $NS"
    ip netns del "$NS"
fi
if [[ ${1:-} == --purge ]]; then
    log "removing $BASE"
    rm -rf "$BASE"
fi

#!/bin/bash
# Stop libvirtd and virtlogd started by start-libvirt.sh. Running domains keep running (QEMU is
# not a child that dies with libvirtd); pass --destroy-all to destroy running domains first.
set -euo pipefail
log() { echo "stop-libvirt: $*" >&2; }

if [[ ${1:-} == --destroy-all ]] && virsh -q -c qemu:///system version >/dev/null 2>&1; then
    for d in $(virsh -c qemu:///system list --name); do
        log "destroying $d"; virsh -c qemu:///system destroy "$d" >/dev/null
    done
fi

stop() {  # stop NAME: TERM the pid in /run/NAME.pid (or found by exact name), wait up to 10 s
    local pids
    pids=$( { [[ -s /run/$1.pid ]] && cat "/run/$1.pid" && echo; pgrep -x "$1"; } 2>/dev/null | sort -u || true)
    [[ -n $pids ]] || return 0
    local p
    for p in $pids; do
        [[ $(cat "/proc/$p/comm" 2>/dev/null) == "$1" ]] || continue
        log "stopping $1 ($p)"
        kill -TERM "$p" 2>/dev/null || true
        for _ in $(seq 100); do [[ -d /proc/$p ]] || break; sleep 0.1; done
        if [[ -d /proc/$p ]]; then log "$1 ($p) still alive, KILL"; kill -KILL "$p" 2>/dev/null || true; fi
    done
}
stop libvirtd
stop virtlogd

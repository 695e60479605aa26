#!/bin/bash
# Start virtlogd and libvirtd as daemons (no systemd here) and wait until qemu:///system answers.
# Idempotent: does nothing but the readiness check when both already run.
set -euo pipefail

TIMEOUT=${LIBVIRT_START_TIMEOUT:-60}
URI=qemu:///system
log() { echo "start-libvirt: $*" >&2; }

running() {  # running NAME: a live process whose pidfile /run/NAME.pid matches, or one by exact name
    local pid
    if [[ -s /run/$1.pid ]]; then
        pid=$(tr -d "\n " < "/run/$1.pid")
        [[ -d /proc/$pid ]] && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$1" ]] && return 0
    fi
    pgrep -x "$1" >/dev/null
}

mkdir -p /run/libvirt /var/log/libvirt/qemu /var/lib/libvirt/qemu

if ! running virtlogd; then
    log "starting virtlogd"
    virtlogd -d
fi
if ! running libvirtd; then
    log "starting libvirtd"
    # libvirtd logs to stderr by default; keep a file for post-mortems.
    LIBVIRT_LOG_OUTPUTS="3:file:/var/log/libvirt/libvirtd.log" libvirtd -d
fi

deadline=$((SECONDS + TIMEOUT))
until virsh -q -c "$URI" version >/dev/null 2>&1; do
    if (( SECONDS >= deadline )); then
        log "ERROR: $URI did not answer within ${TIMEOUT}s (see /var/log/libvirt/libvirtd.log)"
        exit 1
    fi
    running libvirtd || { log "ERROR: libvirtd exited (see /var/log/libvirt/libvirtd.log)"; exit 1; }
    sleep 0.2
done
log "ok: $(virsh -c "$URI" version 2>/dev/null | grep -E 'hypervisor' | sed 's/^ *//')"

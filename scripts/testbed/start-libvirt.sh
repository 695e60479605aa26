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
restarts=0
until virsh -q -c "$URI" version >/dev/null 2>&1; do
    if (( SECONDS >= deadline )); then
        log "ERROR: $URI did not answer within ${TIMEOUT}s (see /var/log/libvirt/libvirtd.log)"
        exit 1
    fi
    if ! running libvirtd; then
        # A libvirtd that was killed a moment ago may still have held its pid file when we
        # looked; start it again (a few times at most) rather than give up.
        (( ++restarts <= 3 )) || { log "ERROR: libvirtd keeps exiting (see /var/log/libvirt/libvirtd.log)"; exit 1; }
        log "libvirtd not running: starting it (attempt $restarts)"
        running virtlogd || virtlogd -d || true
        LIBVIRT_LOG_OUTPUTS="3:file:/var/log/libvirt/libvirtd.log" libvirtd -d || true
        sleep 0.5
    fi
    sleep 0.2
done
log "ok: $(virsh -c "$URI" version 2>/dev/null | grep -E 'hypervisor' | sed 's/^ *//')"

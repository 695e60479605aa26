#!/bin/bash
# Install libvirt 11 + QEMU 10 (bookworm-backports) and the tools the tiny guest build needs
# (group `testbed` of scripts/deps.tsv), then configure /etc/libvirt/qemu.conf for this machine (root, no private namespaces).
# Idempotent: when everything is installed and configured it returns in well under a second.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/lib/deps.sh
. "$HERE/../lib/deps.sh"

log() { echo "install-libvirt: $*" >&2; }

# ---- 1+2. packages: group `testbed` of scripts/deps.tsv ---------------------------------------
# libvirt 11 and QEMU 10 come from bookworm-backports (matching the qemu-utils 10 the tests use;
# qemu-block-extra is QEMU's rbd driver, for guests booted from RBD disks); the tools the tiny
# guest's build needs (busybox-static, cpio, ...) from bookworm. The table's `min` column refuses
# a QEMU 7.2 system emulator next to qemu-utils 10.
deps_install testbed run || { log "ERROR: packages missing (see above)"; exit 1; }

# ---- 3. qemu.conf --------------------------------------------------------------------------
CONF=/etc/libvirt/qemu.conf
[[ -f $CONF ]] || { log "ERROR: $CONF missing (libvirt-daemon-driver-qemu not installed?)"; exit 1; }

# set_conf KEY VALUE: replace an active or commented '#KEY = ...' line, or append.
set_conf() {
    local key=$1 val=$2
    if grep -Eq "^[[:space:]]*${key}[[:space:]]*=[[:space:]]*${val//[/\\[}[[:space:]]*$" "$CONF"; then
        return 0
    fi
    cp -n "$CONF" "$CONF.snapfs-orig" 2>/dev/null || true
    if grep -Eq "^[[:space:]]*${key}[[:space:]]*=" "$CONF"; then
        sed -i -E "s|^[[:space:]]*${key}[[:space:]]*=.*|${key} = ${val}|" "$CONF"
    else
        printf '%s = %s\n' "$key" "$val" >> "$CONF"
    fi
    log "qemu.conf: ${key} = ${val}"
    touch /run/snapfs-testbed-qemuconf-changed
}

# Run QEMU as root: /dev/kvm is root-only here and, with the default libvirt-qemu user, libvirt
# re-probes capabilities on each define (~50 s).
set_conf user '"root"'
set_conf group '"root"'
# No private mount namespace for QEMU: otherwise every VM started while a FUSE filesystem is
# mounted gets a copy of that mount, which pins the FUSE connection after the host unmounts it.
set_conf namespaces '[]'

# libvirtd reads qemu.conf only at start: tell the operator if it is already running.
if [[ -e /run/snapfs-testbed-qemuconf-changed ]] && pgrep -x libvirtd >/dev/null; then
    log "note: qemu.conf changed while libvirtd runs; run stop-libvirt.sh && start-libvirt.sh"
fi
rm -f /run/snapfs-testbed-qemuconf-changed
log "ok: qemu-system-x86 $(dpkg-query -W -f='${Version}' qemu-system-x86), libvirt $(dpkg-query -W -f='${Version}' libvirt-daemon)"

#!/bin/bash
# Install libvirt 11 + QEMU 10 (bookworm-backports) and the tools the tiny guest build needs,
# then configure /etc/libvirt/qemu.conf for this machine (root, no private namespaces).
# Idempotent: when everything is installed and configured it returns in well under a second.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
# keep an existing (e.g. our edited) qemu.conf on reinstall, never prompt
DPKG_OPTS=(-o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)

# Packages taken from bookworm-backports (must match the qemu-utils 10.0 already on the image;
# qemu-block-extra is QEMU's rbd driver, for guests booted from RBD disks).
BP_PKGS=(qemu-system-x86 qemu-system-common qemu-system-data qemu-guest-agent qemu-utils seabios
         libvirt-daemon libvirt-daemon-driver-qemu libvirt-daemon-driver-storage
         libvirt-daemon-log libvirt-clients qemu-block-extra)
# Plain bookworm tools used by build-guest.sh and the checks in docs/testbed.md.
TOOLS=(busybox-static cpio gzip gdisk e2fsprogs fuse3 pkg-config socat jq bindfs)

log() { echo "install-libvirt: $*" >&2; }

have_all() {
    local p st
    for p in "$@"; do
        st=$(dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null || true)
        [[ $st == ii* ]] || return 1
    done
}

qemu_major() {
    dpkg-query -W -f='${Version}' "$1" 2>/dev/null | sed -E 's/^[0-9]+://; s/\..*//'
}

# ---- 1. apt source for bookworm-backports ----------------------------------------------------
added_source=0
if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null; then
    log "adding bookworm-backports to apt sources"
    cat > /etc/apt/sources.list.d/bookworm-backports.sources <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    added_source=1
fi

# ---- 2. packages ---------------------------------------------------------------------------
need_install=0
have_all "${BP_PKGS[@]}" "${TOOLS[@]}" || need_install=1
# A QEMU 7.2 (bookworm) system emulator would not match qemu-utils 10: treat as missing.
if [[ $need_install == 0 && $(qemu_major qemu-system-x86) -lt 10 ]]; then need_install=1; fi

if [[ $need_install == 1 ]]; then
    if [[ $added_source == 1 ]] || ! apt-cache policy qemu-system-x86 2>/dev/null | grep 'bookworm-backports' >/dev/null; then
        log "apt-get update"
        apt-get update -qq
    fi
    log "installing ${BP_PKGS[*]} (bookworm-backports) ${TOOLS[*]}"
    # -t bookworm-backports takes these from backports (and their dependencies where backports
    # has them), so qemu-utils 10.0 is kept, never downgraded to bookworm's 7.2. The plain tools
    # come from bookworm in a second call (e2fsprogs from backports would change mkfs defaults).
    {
        apt-get install -y -q --no-install-recommends "${DPKG_OPTS[@]}" -t bookworm-backports "${BP_PKGS[@]}" &&
        apt-get install -y -q --no-install-recommends "${DPKG_OPTS[@]}" "${TOOLS[@]}"
    } >/tmp/snapfs-testbed-apt.log 2>&1 || { tail -30 /tmp/snapfs-testbed-apt.log >&2; exit 1; }
fi

for p in qemu-system-x86 qemu-utils; do
    m=$(qemu_major "$p")
    if [[ -z $m || $m -lt 10 ]]; then
        log "ERROR: $p is $(dpkg-query -W -f='${Version}' "$p" 2>/dev/null || echo missing), want >= 10"
        exit 1
    fi
done

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

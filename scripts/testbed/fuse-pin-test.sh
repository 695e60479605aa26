#!/bin/bash
# fuse-pin-test.sh NAME: does starting a libvirt domain pin a host FUSE mount?
# Mounts a FUSE filesystem (bindfs in the foreground: a libfuse daemon that exits when its FUSE
# session ends), starts the shut-off domain NAME, unmounts the FUSE mount on the host and reports
# whether any process still sees the mount and whether the FUSE daemon survived; then destroys
# NAME and checks again.
# With qemu.conf namespaces = [] QEMU shares the host mount namespace and nothing is pinned; with
# the default namespaces = [ "mount" ] QEMU's private namespace holds a copy of the mount.
set -euo pipefail
NAME=${1:?usage: fuse-pin-test.sh NAME (a shut-off domain)}
export LIBVIRT_DEFAULT_URI=${LIBVIRT_DEFAULT_URI:-qemu:///system}
command -v bindfs >/dev/null || { echo "fuse-pin-test: needs bindfs (apt-get install bindfs)" >&2; exit 2; }
D=$(mktemp -d /tmp/snapfs-fusepin.XXXXXX)
FD=
cleanup() {
    [[ -n $FD ]] && kill "$FD" 2>/dev/null || true
    umount "$D/mnt" 2>/dev/null || true
    rm -rf "$D"
}
trap cleanup EXIT

[[ $(virsh -q domstate "$NAME") == "shut off" ]] || { echo "fuse-pin-test: $NAME must be shut off" >&2; exit 2; }
echo "qemu.conf: $(grep -E '^[[:space:]]*namespaces' /etc/libvirt/qemu.conf || echo 'namespaces not set (default [ "mount" ])')"

mkdir -p "$D/src" "$D/mnt"
echo hi > "$D/src/f"
bindfs -f "$D/src" "$D/mnt" >/dev/null 2>&1 &
FD=$!
for _ in $(seq 50); do grep -q " $D/mnt fuse" /proc/mounts && break; sleep 0.1; done
grep -q " $D/mnt fuse" /proc/mounts || { echo "fuse-pin-test: FUSE mount failed" >&2; exit 1; }
echo "FUSE (bindfs) mounted on $D/mnt, daemon pid $FD"

seen_by() {  # processes, in any mount namespace we can read, that still see the mount
    local p out=
    for p in /proc/[0-9]*; do
        grep -qs " $D/mnt " "$p/mountinfo" && out+="${p#/proc/}($(cat "$p/comm" 2>/dev/null)) "
    done
    echo "${out:-none}"
}
alive() { kill -0 "$FD" 2>/dev/null && echo yes || echo no; }

virsh -q start "$NAME" >/dev/null
QPID=$(cat "/run/libvirt/qemu/$NAME.pid")
same_ns=no
[[ "$(readlink "/proc/$QPID/ns/mnt")" == "$(readlink /proc/self/ns/mnt)" ]] && same_ns=yes
echo "domain $NAME started, qemu pid $QPID, in the host mount namespace: $same_ns"

umount "$D/mnt"
sleep 1
echo "after host umount:   mount still seen by: $(seen_by); FUSE daemon alive: $(alive)"
virsh -q destroy "$NAME" >/dev/null
sleep 1
echo "after virsh destroy: mount still seen by: $(seen_by); FUSE daemon alive: $(alive)"

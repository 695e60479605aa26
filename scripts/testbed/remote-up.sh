#!/bin/bash
# remote-up.sh: a second libvirt host on this machine, for tests of several hosts in one mount.
#
# A libvirtd in its own network namespace (reached over a veth pair whose two addresses exist
# only on that pair) and its own mount namespace (private /run/libvirt, /var/lib/libvirt,
# /etc/libvirt, /var/cache/libvirt, /var/log/libvirt bound in from $BASE), listening on
# qemu+tcp (auth none) on the veth address only. It holds a directory storage pool
# `snapfs-remote` and a shut-off domain `remote1` whose disk is a small qcow2 overlay on a
# qcow2 base in that pool (no QEMU runs there: two TCG guests do not fit two cores).
# The image files exist only inside that mount namespace's /var/lib/libvirt; from the host
# they are reachable only through the remote libvirtd (or $BASE, which tests must not use).
#
# Idempotent: what already exists is kept. Prints the URI on stdout.
# Env: SNAPFS_REMOTE_DIR (default /var/lib/snapfs-remote), SNAPFS_REMOTE_NS (snapfs-remote).
set -euo pipefail
NS=${SNAPFS_REMOTE_NS:-snapfs-remote}
BASE=${SNAPFS_REMOTE_DIR:-/var/lib/snapfs-remote}
HOST_IF=snapfs-rem0       # host side of the veth pair
NS_IF=snapfs-rem1         # namespace side
HOST_IP=10.213.0.1
REMOTE_IP=10.213.0.2
URI=qemu+tcp://$REMOTE_IP/system
POOL=snapfs-remote
POOL_DIR=/var/lib/libvirt/images/$POOL     # as the remote host sees it
DAEMON=libvirtd-remote                     # comm of the remote daemon (pgrep -x libvirtd misses it)
TIMEOUT=${LIBVIRT_START_TIMEOUT:-90}
log() { echo "remote-up: $*" >&2; }

# 1. Network: the namespace and the veth pair, addresses on the pair only.
if ! ip netns list | grep -qx "$NS\( .*\)\?"; then
    log "network namespace $NS"
    ip netns add "$NS"
fi
if ! ip link show "$HOST_IF" >/dev/null 2>&1; then
    log "veth $HOST_IF <-> $NS_IF ($HOST_IP <-> $REMOTE_IP)"
    ip link add "$HOST_IF" type veth peer name "$NS_IF" netns "$NS"
    ip addr add "$HOST_IP/30" dev "$HOST_IF"
    ip netns exec "$NS" ip addr add "$REMOTE_IP/30" dev "$NS_IF"
fi
ip link set "$HOST_IF" up
# With the link down (tests cut it) the pair's connected route goes away: without this the
# packets for the remote would leave by the default route. Unreachable instead: they stay here.
ip route replace unreachable "${REMOTE_IP%.*}.0/30" metric 4242
ip netns exec "$NS" ip link set lo up
ip netns exec "$NS" ip link set "$NS_IF" up

# 2. The remote host's own directories.
mkdir -p "$BASE"/{bin,etc/qemu,run,lib/images,lib/qemu,cache,log/qemu}
ln -sfn "$(command -v libvirtd)" "$BASE/bin/$DAEMON"
cat > "$BASE/etc/libvirtd.conf" <<EOF
# snapfs test bed: the second host (scripts/testbed/remote-up.sh)
listen_tls = 0
listen_tcp = 1
listen_addr = "$REMOTE_IP"
auth_tcp = "none"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
EOF
# stdio_handler file: no virtlogd on this host (deleting an external snapshot of a shut-off
# domain runs a paused QEMU for the commit).
printf 'user = "root"\ngroup = "root"\nnamespaces = []\nstdio_handler = "file"\n' > "$BASE/etc/qemu.conf"
cp -n /etc/libvirt/libvirt.conf "$BASE/etc/" 2>/dev/null || true
if [[ ! -d $BASE/cache/qemu && -d /var/cache/libvirt/qemu ]]; then
    # Same binaries as the local host: its QEMU capability cache saves a re-probe.
    cp -a /var/cache/libvirt/qemu "$BASE/cache/"
fi

running() {
    local pid
    [[ -s $BASE/libvirtd.pid ]] || return 1
    pid=$(tr -d '\n ' < "$BASE/libvirtd.pid")
    [[ -d /proc/$pid && $(cat "/proc/$pid/comm" 2>/dev/null) == "$DAEMON" ]]
}

# 3. The daemon, in the namespace, with the private directories bound in.
if ! running; then
    log "starting $DAEMON in $NS"
    ip netns exec "$NS" unshare -m --propagation private bash -c '
        set -e
        B=$1
        mount --bind "$B/run" /run/libvirt
        mount --bind "$B/lib" /var/lib/libvirt
        mount --bind "$B/etc" /etc/libvirt
        mount --bind "$B/cache" /var/cache/libvirt
        mount --bind "$B/log" /var/log/libvirt
        exec "$B/bin/'"$DAEMON"'" -d -l -f /etc/libvirt/libvirtd.conf -p "$B/libvirtd.pid"
    ' remote-up "$BASE"
fi
deadline=$((SECONDS + TIMEOUT))
until virsh -q -c "$URI" version >/dev/null 2>&1; do
    if (( SECONDS >= deadline )); then
        log "ERROR: $URI did not answer within ${TIMEOUT}s (see $BASE/log/libvirtd.log)"
        exit 1
    fi
    sleep 0.3
done
V="virsh -q -c $URI"

# 4. The storage pool and remote1's disk: a qcow2 overlay on a qcow2 base, both in the pool.
if ! $V pool-info "$POOL" >/dev/null 2>&1; then
    log "pool $POOL ($POOL_DIR)"
    mkdir -p "$BASE/lib/images/$POOL"
    $V pool-define-as "$POOL" dir --target "$POOL_DIR" >/dev/null
    $V pool-autostart "$POOL" >/dev/null
fi
$V pool-start "$POOL" >/dev/null 2>&1 || true
D=$BASE/lib/images/$POOL   # the same directory, as seen from here (setup only)
if [[ ! -e $D/remote1.qcow2 ]]; then
    log "volumes remote1-base.qcow2 and remote1.qcow2"
    tmp=$(mktemp -d /tmp/snapfs-remote.XXXXXX)
    # Base: 48 MiB, every MiB stamped with its number, some random MiBs, a hole.
    python3 - "$tmp/base.raw" <<'PY'
import os, sys
with open(sys.argv[1], "wb") as f:
    for mib in range(48):
        if mib in (20, 21):
            f.seek(1 << 20, 1)
            continue
        if mib % 7 == 3:
            f.write(os.urandom(1 << 20))
        else:
            f.write((b"remote1 base MiB %04d " % mib).ljust(4096, b".") * 256)
    f.truncate(48 << 20)
PY
    qemu-img convert -q -f raw -O qcow2 "$tmp/base.raw" "$D/remote1-base.qcow2"
    # Overlay: a few MiB of its own, then backed by the base by the path the remote host sees.
    qemu-img create -q -f qcow2 -b "$D/remote1-base.qcow2" -F qcow2 "$D/remote1.qcow2.tmp" 48M
    qemu-io -f qcow2 -c "write -P 0x5a 4M 1M" -c "write -P 0xa5 30M 2M" \
        "$D/remote1.qcow2.tmp" >/dev/null
    qemu-img rebase -q -u -b "$POOL_DIR/remote1-base.qcow2" -F qcow2 "$D/remote1.qcow2.tmp"
    rm -rf "$tmp"
    mv "$D/remote1.qcow2.tmp" "$D/remote1.qcow2"
    $V pool-refresh "$POOL" >/dev/null
fi

# 5. The shut-off domain remote1.
if ! $V dominfo remote1 >/dev/null 2>&1; then
    log "domain remote1 (shut off)"
    xml=$(mktemp /tmp/snapfs-remote1.XXXXXX.xml)
    cat > "$xml" <<EOF
<domain type='qemu'>
  <name>remote1</name>
  <title>snapfs second-host test domain (never started)</title>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='$POOL_DIR/remote1.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <memballoon model='none'/>
  </devices>
</domain>
EOF
    $V define "$xml" >/dev/null
    rm -f "$xml"
fi
log "ready: $URI (domain remote1 shut off, pool $POOL)"
echo "$URI"

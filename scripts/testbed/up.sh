#!/bin/bash
# up.sh: the whole test bed in one command: install libvirt/QEMU (if needed), start libvirtd,
# build the tiny guest (if needed), define + start domain demo, wait for its guest agent.
# Env: SNAPFS_TESTBED_DIR (default /var/lib/snapfs-testbed), TESTBED_DOMAIN (default demo).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BASE=${SNAPFS_TESTBED_DIR:-/var/lib/snapfs-testbed}
NAME=${TESTBED_DOMAIN:-demo}
t0=$(date +%s.%N)
step() {
    local t=$(date +%s.%N)
    "$@"
    awk -v a="$(date +%s.%N)" -v b="$t" -v s="$(basename "$1")" 'BEGIN {printf "up: %-20s %6.1f s\n", s, a - b}' >&2
}
step "$HERE/install-libvirt.sh"
step "$HERE/start-libvirt.sh"
step "$HERE/build-guest.sh" "$BASE/guest"
step "$HERE/define-guest.sh" --start "$NAME" "$BASE/guest"
step "$HERE/wait-agent.sh" "$NAME" 120
awk -v a="$(date +%s.%N)" -v b="$t0" -v n="$NAME" \
    'BEGIN {printf "up: test bed ready in %.1f s: domain %s running, guest agent answering\n", a - b, n}' >&2

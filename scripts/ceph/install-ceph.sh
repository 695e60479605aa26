#!/usr/bin/env bash
# Install the Ceph packages of the loopback test cluster (group `ceph` of scripts/deps.tsv:
# ceph-mon, ceph-osd, ceph-mgr, ceph-common, uuid-runtime, rbd-fuse) and check them.
# Idempotent; start-ceph.sh calls it. snapfs itself loads librados.so.2/librbd.so.1 at run
# time (ceph-common brings librados2 and librbd1).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/lib/deps.sh
. "$HERE/../lib/deps.sh"
deps_install ceph || { echo "install-ceph: failed (see above)" >&2; exit 1; }

#!/usr/bin/env bash
# The chaos and load suite, long form (tests/chaos.rs; docs/testing.md "Chaos suite").
#
# Usage (as root): scripts/chaos.sh [SECONDS] [SEED]
#   SECONDS   how long the chaos loop runs (default 900; SNAPFS_CHAOS_SECONDS)
#   SEED      replay a run: the seed it printed first (default: from the clock; SNAPFS_CHAOS_SEED)
# Environment: SNAPFS_CHAOS_READERS (default 4 here), SNAPFS_CHAOS_GUEST=0 (leave the guest out),
# SNAPFS_CHAOS_REPORT=FILE (the report is also written there).
#
# The same test as the short form in `cargo test`, run longer and with every fault kind
# (the Ceph OSD stopped and started too). It takes the machine-wide guest lock for its whole run,
# since it boots a TCG guest and restarts libvirtd; other sessions' guest tests wait meanwhile.
# Prints the seed first and the report last; exits non-zero on any invariant violation.
set -euo pipefail
cd "$(dirname "$0")/.."

export SNAPFS_CHAOS_SECONDS=${1:-${SNAPFS_CHAOS_SECONDS:-900}}
if [[ -n ${2:-} ]]; then export SNAPFS_CHAOS_SEED=$2; fi
export SNAPFS_CHAOS_READERS=${SNAPFS_CHAOS_READERS:-4}
export SNAPFS_CHAOS_LONG=1

bash scripts/testbed/up.sh >/dev/null
bash scripts/ceph/start-ceph.sh >/dev/null 2>&1
export CEPH_CONF=${CEPH_CONF:-/var/lib/snapfs-ceph/ceph.conf}

echo "chaos: ${SNAPFS_CHAOS_SECONDS} s, waiting for /tmp/snapfs-guest.lock" >&2
exec flock -o /tmp/snapfs-guest.lock \
  cargo test --release --test chaos -- --nocapture --test-threads=1

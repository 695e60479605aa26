#!/usr/bin/env bash
# The whole test suite on a fresh Debian 12 machine, as root: install what the tests need,
# start the services they talk to, run every test. `.ci/run` calls exactly this.
#
# Usage: scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)

echo "== installing dependencies"
bash scripts/install-deps.sh
if [[ -x scripts/testbed/up.sh ]]; then
  echo "== bringing up the libvirt + QEMU test bed"
  bash scripts/testbed/up.sh
  export SNAPFS_REQUIRE_TESTBED=1
fi

echo "== starting the single-node Ceph cluster (loopback)"
bash scripts/ceph/start-ceph.sh
export SNAPFS_REQUIRE_CEPH=1

echo "== formatting"
cargo fmt --all -- --check

echo "== tests"
cargo test --all-targets "$@"

echo "== suite wall time: $(( $(date +%s) - started )) s"

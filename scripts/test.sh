#!/usr/bin/env bash
# The whole test suite on a fresh Debian 12 machine, as root: install what the tests need,
# start the services they talk to, run every test. `.ci/run` calls exactly this.
#
# Usage: scripts/test.sh [extra cargo test args]
#
# Last, the pristine-root check (scripts/check-fresh-install.sh): the .deb is built and every
# install step above is run again in a bare Debian root, where each command the repo calls must
# then be found. SNAPFS_FRESH_CHECK=0 skips it (for quick runs by hand; CI always runs it).
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
if [[ -x scripts/testbed/remote-up.sh ]]; then
  echo "== bringing up the second libvirt host (network namespace snapfs-remote)"
  bash scripts/testbed/remote-up.sh
fi

echo "== starting the single-node Ceph cluster (loopback)"
bash scripts/ceph/start-ceph.sh
export SNAPFS_REQUIRE_CEPH=1

echo "== formatting"
cargo fmt --all -- --check

echo "== tests"
# --no-fail-fast: one CI run names every failing target, not only the first.
cargo test --all-targets --no-fail-fast "$@"

if [[ ${SNAPFS_FRESH_CHECK:-1} != 0 || ${CI:-} == true ]]; then
  echo "== the Debian package"
  deb=$(bash scripts/build-deb.sh | tail -n 1 | cut -d' ' -f1)
  echo "$deb ($(du -k "$deb" | cut -f1) KiB)"
  echo "== pristine-root install check"
  fresh_started=$(date +%s)
  bash scripts/check-fresh-install.sh --deb "$deb"
  echo "== pristine-root check: $(( $(date +%s) - fresh_started )) s"
fi

echo "== suite wall time: $(( $(date +%s) - started )) s"

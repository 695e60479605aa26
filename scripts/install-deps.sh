#!/usr/bin/env bash
# Install the host packages snapfs needs for building, running and testing it.
#
# Usage (as root, on Debian 12 "bookworm"):  scripts/install-deps.sh [--peers]
#
#   --peers   also the optional benchmark peers (7-Zip, guestmount)
#
# What is installed comes from the one table scripts/deps.tsv (groups build, run, test; the
# test bed's and Ceph's groups are installed by scripts/testbed/install-libvirt.sh and
# scripts/ceph/install-ceph.sh from the same table), and every row is checked afterwards.
# Idempotent: when every row is satisfied it returns at once without calling apt.
#
# QEMU: the tests need qemu-img/qemu-io/qemu-storage-daemon >= 8 (zstd, extended_l2,
# data_file_raw, FUSE export). On bookworm those come from bookworm-backports (QEMU 10, whose
# qemu-utils also ships qemu-storage-daemon); the suite is added to apt's sources if absent.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/lib/deps.sh
. "$HERE/lib/deps.sh"

groups=(build run test)
for arg in "$@"; do
  case $arg in
    --peers) groups+=(peers) ;;
    -h|--help) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
    *) echo "install-deps.sh: unknown argument: $arg" >&2; exit 2 ;;
  esac
done

if ! deps_install "${groups[@]}"; then
  echo "install-deps: failed (see above)" >&2
  exit 1
fi
echo "install-deps: ok ($(qemu-img --version | head -1), $(fusermount3 --version 2>&1 | head -1))"

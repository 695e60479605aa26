#!/usr/bin/env bash
# Install the host packages snapfs needs for building, testing and benchmarking.
#
# Usage (as root, on Debian 12 "bookworm"):  scripts/install-deps.sh [--force]
#
# Idempotent: when every needed command/header is already present it returns at once
# without touching apt (use --force to run apt anyway). Otherwise it runs `apt-get update`
# once and installs everything in one `apt-get install`.
#
# QEMU: snapfs tests need qemu-img/qemu-io/qemu-storage-daemon >= 8 (zstd, extended_l2,
# data_file_raw, FUSE export). On bookworm those come from bookworm-backports (qemu 10.0,
# whose qemu-utils package also ships qemu-storage-daemon); the suite is added to apt's
# sources if absent. An already-installed newer qemu-utils is never downgraded.
set -euo pipefail

FORCE=0
case "${1:-}" in
  --force) FORCE=1 ;;
  -h|--help) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
  "") ;;
  *) echo "install-deps.sh: unknown argument: $1" >&2; exit 2 ;;
esac

# command -> Debian package that provides it
declare -A CMD_PKG=(
  [fusermount3]=fuse3
  [pkg-config]=pkg-config
  [qemu-img]=qemu-utils
  [qemu-io]=qemu-utils
  [qemu-storage-daemon]=qemu-utils
  [sgdisk]=gdisk
  [sfdisk]=fdisk
  [mkfs.ext4]=e2fsprogs
  [debugfs]=e2fsprogs
  [xxd]=xxd
  [python3]=python3
  [cmp]=diffutils
  [pgrep]=procps
  [cc]=build-essential
  [shellcheck]=shellcheck
  # guest filesystems for the file-level restore tests (scripts/make-fs-images.sh)
  [mkfs.fat]=dosfstools
  [mcopy]=mtools
  [mkfs.xfs]=xfsprogs
  [mkntfs]=ntfs-3g
  [setfattr]=attr
  [pvcreate]=lvm2
  [cryptsetup]=cryptsetup
  [mkswap]=util-linux
)
MIN_QEMU_MAJOR=8

qemu_major() {
  local v
  v=$(qemu-img --version 2>/dev/null | sed -n '1s/^qemu-img version \([0-9]*\)\..*/\1/p')
  echo "${v:-0}"
}

missing=()
for cmd in "${!CMD_PKG[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${CMD_PKG[$cmd]}")
done
[[ -e /usr/include/zstd.h ]] || missing+=(libzstd-dev)
need_new_qemu=0
if command -v qemu-img >/dev/null 2>&1 && (( $(qemu_major) < MIN_QEMU_MAJOR )); then
  need_new_qemu=1
fi

if (( ${#missing[@]} == 0 && need_new_qemu == 0 && FORCE == 0 )); then
  echo "install-deps: all dependencies present (qemu-img $(qemu_major).x); nothing to do"
  exit 0
fi

if (( EUID != 0 )); then
  echo "install-deps: must run as root (missing: ${missing[*]:-newer qemu-utils})" >&2
  exit 1
fi

# shellcheck disable=SC1091
. /etc/os-release
codename=${VERSION_CODENAME:-}
qemu_target=()
if [[ $codename == bookworm ]]; then
  if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    echo "install-deps: adding bookworm-backports to apt sources"
    cat > /etc/apt/sources.list.d/bookworm-backports.sources <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  fi
  qemu_target=(-t bookworm-backports)
fi

export DEBIAN_FRONTEND=noninteractive
apt-get -o DPkg::Lock::Timeout=600 update

# Everything except qemu from the default suite, in one go.
base_pkgs=(fuse3 pkg-config gdisk fdisk e2fsprogs xxd python3 diffutils procps build-essential
           libzstd-dev shellcheck)
apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends "${base_pkgs[@]}"

# qemu-utils: from backports on bookworm unless a new enough one is already installed
# (apt never downgrades an installed package without an explicit version).
if ! command -v qemu-storage-daemon >/dev/null 2>&1 || (( $(qemu_major) < MIN_QEMU_MAJOR )); then
  apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends "${qemu_target[@]}" qemu-utils
fi

for cmd in "${!CMD_PKG[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || { echo "install-deps: $cmd still missing" >&2; exit 1; }
done
if (( $(qemu_major) < MIN_QEMU_MAJOR )); then
  echo "install-deps: qemu-img $(qemu_major).x is older than $MIN_QEMU_MAJOR" >&2
  exit 1
fi
echo "install-deps: done (qemu-img $(qemu_major).x, $(fusermount3 --version 2>&1 | head -1))"

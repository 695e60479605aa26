#!/usr/bin/env bash
# The pristine-root check: do the README's install steps work on a machine where nothing was
# installed before? A warm machine hides a missing install step; a fresh Debian root does not.
#
# Usage (as root): scripts/check-fresh-install.sh [--deb FILE] [--keep]
#
#   --deb FILE   also install this snapfs .deb (dpkg -i, then apt-get -f install) and check
#                `snapfs --version`, `man -w snapfs`, `ldd /usr/bin/snapfs` inside the root
#   --keep       leave the root in place (its path is printed) instead of removing it
#
# Steps: 1. a minimal Debian 12 root (debootstrap --variant=minbase) in a temporary directory
# under /var/tmp; 2. inside it (chroot, /proc /sys /dev bound, the Rust toolchain bound
# read-only) every install script that scripts/test.sh and scripts/demo.sh reach (found by
# following their calls, not listed by hand); 3. every command that the repo's scripts, tests
# and daemon call (scripts/lib/commands-used.py) must be found there, except the optional
# benchmark peers (group `peers` of scripts/deps.tsv, which the scripts skip with a note).
#
# .debs are kept between runs in $SNAPFS_FRESH_CACHE (default /var/cache/snapfs-fresh-root):
# cold, the run downloads the whole dependency set; warm, it only unpacks.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${SNAPFS_FRESH_CACHE:-/var/cache/snapfs-fresh-root}
SUITE=bookworm
MIRROR=http://deb.debian.org/debian
DEB=
KEEP=0
while (($#)); do
  case $1 in
    --deb) DEB=$(realpath -e "$2"); shift 2 ;;
    --keep) KEEP=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
    *) echo "check-fresh-install: unknown argument: $1" >&2; exit 2 ;;
  esac
done
(( EUID == 0 )) || { echo "check-fresh-install: needs root (debootstrap, chroot)" >&2; exit 2; }
for c in debootstrap shfmt python3 git; do
  command -v "$c" >/dev/null || { echo "check-fresh-install: $c missing (scripts/install-deps.sh)" >&2; exit 2; }
done

t0=$SECONDS
say() { printf 'check-fresh-install: [%4d s] %s\n' $((SECONDS - t0)) "$*" >&2; }
mkdir -p "$CACHE/debootstrap" "$CACHE/archives/partial"
ROOT=$(mktemp -d /var/tmp/snapfs-fresh-root.XXXXXX)
chmod 0755 "$ROOT"   # a root directory others (apt's _apt user) can enter

# Every bind mount goes through here, so cleanup knows all of them.
MOUNTS=()
bind() { # SRC DST [ro]
  mkdir -p "$2"
  mount --bind "$1" "$2"
  MOUNTS+=("$2")
  if [[ ${3:-} == ro ]]; then mount -o remount,bind,ro "$2"; fi
}
cleanup() {
  local rc=$? i
  set +e
  # Whatever a step left mounted inside the root (a snapfs mount of the checks below) first,
  # deepest first, then our own binds.
  grep " $ROOT/" /proc/mounts | cut -d' ' -f2 | grep -vxF -f <(printf '%s\n' "${MOUNTS[@]}") |
    sort -r | while read -r m; do umount -l "$m"; done
  for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do
    umount "${MOUNTS[i]}" 2>/dev/null || umount -l "${MOUNTS[i]}"
  done
  # Never delete through a mount: if anything is still mounted below the root, keep it.
  if grep -q " $ROOT/" /proc/mounts; then
    echo "check-fresh-install: mounts left below $ROOT; not removing it" >&2
  elif (( KEEP )); then
    echo "check-fresh-install: root kept in $ROOT" >&2
  else
    rm -rf --one-file-system -- "$ROOT"
  fi
  exit "$rc"
}
trap cleanup EXIT

# ---- 1. a minimal Debian root ----------------------------------------------------------------
say "debootstrap --variant=minbase $SUITE into $ROOT"
if ! debootstrap --variant=minbase --cache-dir="$CACHE/debootstrap" "$SUITE" "$ROOT" "$MIRROR" \
    >"$ROOT.debootstrap.log" 2>&1; then
  tail -n 20 "$ROOT.debootstrap.log" >&2
  rm -f "$ROOT.debootstrap.log"
  exit 1
fi
rm -f "$ROOT.debootstrap.log"
# What a freshly installed Debian 12 has in its sources: the release, its updates, security.
rm -f "$ROOT/etc/apt/sources.list"
cat > "$ROOT/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
# The host's own apt network settings (a proxy, a mirror's date checks), nothing else.
for f in /etc/apt/apt.conf.d/*; do
  if [[ -f $f ]] && grep -q '^[[:space:]]*Acquire::' "$f"; then cp "$f" "$ROOT/etc/apt/apt.conf.d/"; fi
done
cp /etc/resolv.conf "$ROOT/etc/resolv.conf" 2>/dev/null || true
# No service starts inside the root; dpkg without fsync (a throw-away root).
printf '#!/bin/sh\nexit 101\n' > "$ROOT/usr/sbin/policy-rc.d"
chmod +x "$ROOT/usr/sbin/policy-rc.d"
echo force-unsafe-io > "$ROOT/etc/dpkg/dpkg.cfg.d/snapfs-check-unsafe-io"
ROOT_SIZE=$(du -sh "$ROOT" | cut -f1)
bind "$CACHE/archives" "$ROOT/var/cache/apt/archives"
bind /proc "$ROOT/proc"
bind /sys "$ROOT/sys"
bind /dev "$ROOT/dev"
bind /dev/pts "$ROOT/dev/pts"
# The Rust toolchain (rustup's, not a Debian package: the machine image brings it), read-only.
CARGO_BIN=$(dirname "$(command -v cargo 2>/dev/null || echo /root/.cargo/bin/cargo)")
TOOLCHAIN_PATH=
if [[ -x $CARGO_BIN/cargo ]]; then
  CARGO_HOME_DIR=$(dirname "$CARGO_BIN")
  bind "$CARGO_HOME_DIR" "$ROOT$CARGO_HOME_DIR" ro
  RUSTUP_DIR=${RUSTUP_HOME:-$(dirname "$CARGO_HOME_DIR")/.rustup}
  [[ -d $RUSTUP_DIR ]] && bind "$RUSTUP_DIR" "$ROOT$RUSTUP_DIR" ro
  TOOLCHAIN_PATH=$CARGO_BIN:
fi
# The repo as it is in this work tree (tracked and untracked, not ignored).
mkdir -p "$ROOT/snapfs"
(cd "$REPO" && git ls-files -z -co --exclude-standard | tar --null -T - -cf - 2>/dev/null) | tar -xf - -C "$ROOT/snapfs"
inroot() { chroot "$ROOT" /usr/bin/env -i HOME=/root LANG=C.UTF-8 \
  PATH="${TOOLCHAIN_PATH}/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" "$@"; }
say "root ready ($ROOT_SIZE)"

# ---- 2. the .deb, on the bare root: its Depends must be enough ------------------------------------
if [[ -n $DEB ]]; then
  cp "$DEB" "$ROOT/tmp/snapfs.deb"
  say "dpkg -i $(basename "$DEB") + apt-get -f install"
  inroot apt-get -qq update
  inroot dpkg -i /tmp/snapfs.deb >/dev/null 2>&1 || true
  inroot env DEBIAN_FRONTEND=noninteractive apt-get -y -q -f --no-install-recommends install >/dev/null
  # shellcheck disable=SC2016
  inroot dpkg-query -W -f='${Status}' snapfs | grep -q 'install ok installed' || { say "FAIL: snapfs .deb not installed"; exit 1; }
  inroot snapfs --version
  inroot ldd /usr/bin/snapfs
fi

# ---- 3. every install step the README's two commands reach ---------------------------------------
mapfile -t STEPS < <(python3 "$REPO/scripts/lib/commands-used.py" --reach "$REPO" scripts/test.sh scripts/demo.sh |
                     grep -E '(^|/)install[^/]*\.sh$')
(( ${#STEPS[@]} )) || { say "FAIL: found no install step reached from test.sh/demo.sh"; exit 1; }
for step in "${STEPS[@]}"; do
  say "running $step"
  if ! inroot bash "/snapfs/$step"; then
    say "FAIL: $step failed in a fresh root"
    exit 1
  fi
done
if [[ -n $DEB ]]; then
  say "the installed package: man pages, unit, mount -t fuse.snapfs, an fstab line"
  inroot man -w snapfs >/dev/null || { say "FAIL: man -w snapfs finds no page"; exit 1; }
  inroot man -w snapfs-mount >/dev/null || { say "FAIL: man -w snapfs-mount finds no page"; exit 1; }
  inroot systemd-analyze verify /lib/systemd/system/snapfs@.service ||
    { say "FAIL: systemd-analyze verify snapfs@.service"; exit 1; }
  # shellcheck disable=SC2016  # the script runs in the root, its $ are its own
  if ! inroot bash -euo pipefail -c '
      mkdir -p /tmp/imgs /mnt/t1 /mnt/t2
      qemu-img create -q -f qcow2 /tmp/imgs/web.qcow2 16M
      qemu-img snapshot -c nightly /tmp/imgs/web.qcow2
      mount -t fuse.snapfs snapfs /mnt/t1 -o images=/tmp/imgs,allow_other,nofail,_netdev
      [ "$(ls /mnt/t1/volumes/imgs/web.qcow2/.snapshots)" = nightly ]
      umount /mnt/t1
      echo "snapfs /mnt/t2 fuse.snapfs images=/tmp/imgs,libvirt=test:///default,noauto,x-systemd.automount 0 0" > /tmp/fstab
      mount -T /tmp/fstab /mnt/t2
      [ "$(ls /mnt/t2/volumes/imgs)" = web.qcow2 ]
      umount /mnt/t2
      for _ in $(seq 100); do pgrep -f "[m]ount.fuse.snapfs snapfs /mnt/t" >/dev/null || exit 0; sleep 0.1; done
      echo "a snapfs daemon survived umount" >&2; exit 1'; then
    say "FAIL: mounting through mount(8) with the installed helper"
    exit 1
  fi
fi

# ---- 4. every command the scripts, tests and daemon call is there --------------------------------
mapfile -t SOURCES < <(cd "$REPO" && git ls-files -co --exclude-standard -- .ci/run 'scripts/*' 'tests/*.rs' 'tests/**/*.rs' 'src/*.rs' 'src/**/*.rs' |
                       grep -vE '\.(py|tsv|md)$')
PEERS=$(awk '!/^[[:space:]]*#/ && $5 == "peers" { print $1 }' "$REPO/scripts/deps.tsv")
missing=()
checked=0
while IFS=$'\t' read -r name kind where; do
  if grep -qxF "$name" <<< "$PEERS"; then continue; fi
  if [[ $kind == guarded ]] && ! awk -v n="$name" '$1 == n { f = 1 } END { exit !f }' "$REPO/scripts/deps.tsv"; then
    missing+=("$name (optional at $where, but no row of scripts/deps.tsv installs it)")
    continue
  fi
  checked=$((checked + 1))
  inroot sh -c "command -v '$name'" >/dev/null || missing+=("$name (called at $where)")
done < <(cd "$REPO" && python3 scripts/lib/commands-used.py "${SOURCES[@]}")
if (( ${#missing[@]} )); then
  say "FAIL: after the install steps, ${#missing[@]} of the commands the repo calls are missing:"
  printf '  %s\n' "${missing[@]}" >&2
  exit 1
fi
say "ok: ${#STEPS[@]} install steps (${STEPS[*]}), $checked commands present, in $((SECONDS - t0)) s"

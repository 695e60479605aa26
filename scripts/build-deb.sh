#!/usr/bin/env bash
# Build the Debian package of snapfs: target/debian/snapfs_<version>_<arch>.deb
#
# Usage: scripts/build-deb.sh [--no-build]   (--no-build: package target/release/snapfs as it is)
#
# Contents: /usr/bin/snapfs (stripped), /usr/sbin/mount.fuse.snapfs (mount -t fuse.snapfs and
# fstab lines run it), /lib/systemd/system/snapfs@.service, /etc/snapfs/README, man pages
# snapfs(1), snapfs-mount(1), snapfs-unmount(1) and bash/zsh/fish completions (generated from
# the CLI's own definitions by `snapfs generate-assets`, so they never drift from the code).
# Depends: fuse3 only: libvirt and the Ceph libraries are loaded when --libvirt/--ceph ask for
# them, so they are Suggests. Needs dpkg-deb and strip (binutils); nothing from crates.io.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
BUILD=1
case ${1:-} in
  --no-build) BUILD=0 ;;
  "") ;;
  -h|--help) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
  *) echo "build-deb: unknown argument: $1" >&2; exit 2 ;;
esac

if (( BUILD )); then
  cargo build --release --locked --quiet --bin snapfs
fi
BIN=$REPO/target/release/snapfs
[[ -x $BIN ]] || { echo "build-deb: $BIN missing (run without --no-build)" >&2; exit 1; }

VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
ARCH=$(dpkg --print-architecture)
OUT=$REPO/target/debian
STAGE=$(mktemp -d "$REPO/target/deb-stage.XXXXXX")
chmod 0755 "$STAGE"
trap 'rm -rf -- "$STAGE"' EXIT

install -D -m 0755 "$BIN" "$STAGE/usr/bin/snapfs"
strip --strip-unneeded "$STAGE/usr/bin/snapfs"
mkdir -p "$STAGE/usr/sbin"
ln -s ../bin/snapfs "$STAGE/usr/sbin/mount.fuse.snapfs"
install -D -m 0644 packaging/snapfs@.service "$STAGE/lib/systemd/system/snapfs@.service"
install -D -m 0644 packaging/etc-README "$STAGE/etc/snapfs/README"

"$STAGE/usr/bin/snapfs" generate-assets "$STAGE/assets"
mkdir -p "$STAGE/usr/share/man/man1"
# shellcheck disable=SC2094  # reads assets/man/X.1, writes usr/share/man/man1/X.1.gz
for page in "$STAGE"/assets/man/*.1; do
  gzip -9n < "$page" > "$STAGE/usr/share/man/man1/$(basename "$page").gz"
done
install -D -m 0644 "$STAGE/assets/completions/snapfs.bash" "$STAGE/usr/share/bash-completion/completions/snapfs"
install -D -m 0644 "$STAGE/assets/completions/_snapfs" "$STAGE/usr/share/zsh/vendor-completions/_snapfs"
install -D -m 0644 "$STAGE/assets/completions/snapfs.fish" "$STAGE/usr/share/fish/vendor_completions.d/snapfs.fish"
rm -rf "$STAGE/assets"
install -D -m 0644 README.md "$STAGE/usr/share/doc/snapfs/README.md"
gzip -9n "$STAGE/usr/share/doc/snapfs/README.md"
cat > "$STAGE/usr/share/doc/snapfs/copyright" <<'EOF'
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: snapfs
License: Apache-2.0
 On Debian systems the full text is in /usr/share/common-licenses/Apache-2.0.
EOF

mkdir -p "$STAGE/DEBIAN"
echo /etc/snapfs/README > "$STAGE/DEBIAN/conffiles"
cat > "$STAGE/DEBIAN/control" <<EOF
Package: snapfs
Version: $VERSION
Architecture: $ARCH
Maintainer: snapfs developers <snapfs@localhost>
Section: admin
Priority: optional
Depends: fuse3
Recommends: qemu-utils
Suggests: libvirt0, librbd1, librados2, qemu-guest-agent
Installed-Size: $(du -sk --exclude=DEBIAN "$STAGE" | cut -f1)
Description: VM snapshots as plain files and directories (FUSE)
 snapfs mounts libvirt/QEMU instances, Ceph RBD volumes and qcow2 image
 directories as a tree in which taking a snapshot is mkdir, deleting one is
 rmdir, reading a disk as it was is cp, restoring a guest file is cp from
 files/, and booting a copy is ln -s. Instance snapshots are quiesced through
 qemu-guest-agent. libvirt and the Ceph client libraries are loaded only when
 --libvirt or --ceph asks for them.
EOF

mkdir -p "$OUT"
DEB=$OUT/snapfs_${VERSION}_${ARCH}.deb
dpkg-deb --root-owner-group -Zxz --build "$STAGE" "$DEB" >/dev/null
echo "$DEB ($(du -k "$DEB" | cut -f1) KiB)"

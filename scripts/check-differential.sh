#!/usr/bin/env bash
# The differential suite's full matrix (issue 19): snapfs's view of guest filesystems against
# the kernel's own drivers. Not part of scripts/test.sh (which runs the fast subset through
# `cargo test --test differential`); needs root, loop devices, e2fsprogs (incl. e4crypt),
# xfsprogs, dosfstools, mtools, ntfs-3g, qemu-img.
#
# Usage: scripts/check-differential.sh [--seed N] [--only WORD]
#   --seed N     the generator's seed (default 19): every seed makes other trees
#   --only WORD  only the images whose name contains WORD (e.g. ext4-encrypt, xfs, fat)
#
# Images (tests/differential.rs, full_cases): ext2/ext3/ext4 x 1 KiB/4 KiB blocks x 128/256-byte
# inodes; ext4 64bit+bigalloc with 128-byte inodes on 1 KiB blocks, bigalloc with 64 KiB
# clusters, without 64bit, inline_data (4 KiB and 1 KiB blocks), without metadata_csum,
# encrypt (4 KiB and 1 KiB blocks), a 20,000-entry htree directory (ext4 1 KiB, ext2 4 KiB);
# XFS v5 with and without bigtime, with and without reflink, 1 KiB blocks with 512-byte inodes,
# a 20,000-entry node-form directory; FAT12/16/32; NTFS. Each holds ~400 generated entries
# (sizes from empty to 33 MiB, sparse files, hard links, short and long symlinks, xattrs and
# ACLs, device nodes, fifos, unicode and 255-byte names, a 24-level path, times before 1970
# and after 2038). Differences the docs accept are listed in docs/restore.md ("Differential
# suite: decided exceptions"); any other fails. Takes a few minutes; images in /var/tmp.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
while [ $# -gt 0 ]; do
	case "$1" in
	--seed)
		export SNAPFS_DIFF_SEED="$2"
		shift 2
		;;
	--only)
		export SNAPFS_DIFF_ONLY="$2"
		shift 2
		;;
	-h | --help)
		sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'
		exit 0
		;;
	*)
		echo "check-differential: unknown argument $1" >&2
		exit 2
		;;
	esac
done
if [ "$(id -u)" != 0 ]; then
	echo "check-differential: needs root (loop mounts)" >&2
	exit 2
fi
cd "$REPO"
exec cargo test --test differential -- --ignored --nocapture differential_full_matrix

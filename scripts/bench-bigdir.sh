#!/usr/bin/env bash
# Huge-directory benchmark (issue 19). Not a test: it prints numbers, it does not judge them.
#
# Usage: scripts/bench-bigdir.sh [--snapfs BIN] [--sizes "1000 10000 100000"] [--fs "ext4 xfs"]
#                                [--tools "find ls du"] [--rebuild] [WORKDIR]
#   --snapfs BIN   snapfs binary (default: target/release/snapfs; built if missing)
#   --sizes LIST   entries per directory (default "1000 10000 100000"; add 1000000 for the
#                  full matrix: ~2 min and ~3 GB of sparse images per filesystem)
#   --fs LIST      filesystems (default "ext4 xfs")
#   --tools LIST   walks timed (default "find ls du")
#   --rebuild      recreate the images even if WORKDIR has them
#   WORKDIR        default /var/tmp/snapfs-bench-bigdir
#
# Per filesystem and size, one image (cached in WORKDIR) made by the kernel's own driver through
# a loop mount, so ext4 directories get their htree and XFS its node-form directories as a
# guest would have them: `files/` holds N empty files, `dirs/` N empty subdirectories (names
# e<7 digits>, created in a random order by one Python process). ext4: mkfs.ext4 defaults
# (4 KiB blocks, dir_index) with enough inodes; XFS: mkfs.xfs defaults (v5). The raw image is
# converted to qcow2 with an internal snapshot "s" (pool directory WORKDIR/pool).
#
# Each walk (`find D | wc -l`, `ls -l D | wc -l`, `du -s D`) runs once on the kernel's read-only
# loop mount (ext4 `ro,noload`, XFS `ro,norecovery`) and once through snapfs
# (MNT/volumes/pool/IMG/.snapshots/s/files/whole/D), both after `echo 3 > drop_caches`, snapfs
# on a new mount each time (nothing parsed). Printed: seconds, microseconds per entry, the
# snapfs/kernel ratio, and the daemon's peak RSS (VmHWM) after the walk. Last, the FUSE round
# trip of this machine at that moment: the mean time of 20,000 `stat`s of absent names at the
# mount's root (each one LOOKUP answered from the tree's own names, no guest filesystem read);
# `find` needs four per subdirectory (LOOKUP, OPENDIR, READDIR, READDIR at the end), which is
# the floor under its time per subdirectory through FUSE.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
SNAPFS=$REPO/target/release/snapfs
SIZES="1000 10000 100000"
FSES="ext4 xfs"
TOOLS="find ls du"
REBUILD=0
WORK=/var/tmp/snapfs-bench-bigdir
while [[ $# -gt 0 ]]; do
  case $1 in
    --snapfs) SNAPFS=$2; shift 2 ;;
    --sizes) SIZES=$2; shift 2 ;;
    --fs) FSES=$2; shift 2 ;;
    --tools) TOOLS=$2; shift 2 ;;
    --rebuild) REBUILD=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "bench-bigdir: unknown option $1" >&2; exit 2 ;;
    *) WORK=$1; shift ;;
  esac
done
[[ $(id -u) == 0 ]] || { echo "bench-bigdir: needs root (loop mounts, drop_caches)" >&2; exit 2; }
for t in qemu-img python3 mkfs.ext4 mkfs.xfs losetup; do
  command -v $t >/dev/null || { echo "bench-bigdir: $t missing (scripts/install-deps.sh)" >&2; exit 2; }
done
if [[ ! -x $SNAPFS ]]; then (cd "$REPO" && cargo build --release); fi

mkdir -p "$WORK/pool" "$WORK/state"
WORK=$(realpath -- "$WORK")
POOL=$WORK/pool
MNT=$WORK/mnt
KMNT=$WORK/kmnt
mkdir -p "$MNT" "$KMNT"

log() { echo "[bench-bigdir $(date +%T)] $*" >&2; }

cleanup() {
  if mountpoint -q "$MNT"; then timeout 60 "$SNAPFS" unmount "$MNT" >/dev/null 2>&1 || umount -l "$MNT" || true; fi
  if mountpoint -q "$KMNT"; then umount "$KMNT" || umount -l "$KMNT" || true; fi
}
trap cleanup EXIT

# make_image FS N: WORK/FS-N.raw and POOL/FS-N.qcow2 with snapshot s.
make_image() {
  local fs=$1 n=$2 raw=$WORK/$1-$2.raw q=$POOL/$1-$2.qcow2
  if [[ -f $q && -f $raw ]] && (( ! REBUILD )) && qemu-img snapshot -l "$q" 2>/dev/null | grep -qw ' s '; then
    return
  fi
  rm -f "$raw" "$q"
  # Room for 2N inodes and, on ext4, a block per subdirectory (XFS needs 300 MB at least).
  local mb=$(( 320 + n * 2 * 5 / 1024 ))
  truncate -s ${mb}M "$raw"
  case $fs in
    ext4) mkfs.ext4 -q -F -N $(( 2 * n + 1024 )) "$raw" ;;
    xfs) mkfs.xfs -q -f "$raw" ;;
  esac
  mount -o loop "$raw" "$KMNT"
  local t0=$SECONDS
  python3 - "$KMNT" "$n" <<'EOF'
import os, random, sys
root, n = sys.argv[1], int(sys.argv[2])
os.mkdir(os.path.join(root, "files")); os.mkdir(os.path.join(root, "dirs"))
order = list(range(n)); random.Random(19).shuffle(order)
for i in order:
    name = "e%07d" % i
    os.close(os.open(os.path.join(root, "files", name), os.O_CREAT | os.O_WRONLY, 0o644))
    os.mkdir(os.path.join(root, "dirs", name))
EOF
  umount "$KMNT"
  qemu-img convert -O qcow2 "$raw" "$q"
  qemu-img snapshot -c s "$q"
  log "$fs with 2 x $n entries: $(( SECONDS - t0 ))s to fill, $(du -h "$q" | cut -f1) qcow2"
}

# walk TOOL DIR -> "seconds" on stdout (output lines counted, to be sure it ran)
walk() {
  local tool=$1 dir=$2 s e
  sync; echo 3 > /proc/sys/vm/drop_caches
  s=$(date +%s.%N)
  case $tool in
    find) find "$dir" | wc -l >/dev/null ;;
    ls) ls -l "$dir" | wc -l >/dev/null ;;
    du) du -s "$dir" >/dev/null ;;
  esac
  e=$(date +%s.%N)
  echo "$e - $s" | bc -l
}

snapfs_pid() { pgrep -n -f "mount --images $POOL --state-dir $WORK/state" || true; }

printf '%-5s %-5s %8s %-4s %9s %9s %7s %9s %9s %8s\n' fs kind entries tool kernel_s snapfs_s ratio k_us/ent s_us/ent rss_MiB
for fs in $FSES; do
  for n in $SIZES; do
    make_image "$fs" "$n"
    for kind in dirs files; do
      for tool in $TOOLS; do
        case $fs in ext4) opt=ro,loop,noload ;; xfs) opt=ro,loop,norecovery ;; esac
        mount -o $opt "$WORK/$fs-$n.raw" "$KMNT"
        k=$(walk "$tool" "$KMNT/$kind")
        umount "$KMNT"
        "$SNAPFS" mount --images "$POOL" --state-dir "$WORK/state" "$MNT"
        pid=$(snapfs_pid)
        d=$MNT/volumes/pool/$fs-$n.qcow2/.snapshots/s/files/whole/$kind
        stat "$d" >/dev/null
        sv=$(walk "$tool" "$d")
        rss=$(( $(sed -n 's/^VmHWM:[[:space:]]*\([0-9]*\) kB/\1/p' "/proc/$pid/status" 2>/dev/null || echo 0) / 1024 ))
        timeout 60 "$SNAPFS" unmount "$MNT"
        printf '%-5s %-5s %8d %-4s %9.3f %9.3f %7.2f %9.2f %9.2f %8d\n' "$fs" "$kind" "$n" "$tool" "$k" "$sv" \
          "$(echo "$sv / $k" | bc -l)" "$(echo "$k * 1000000 / $n" | bc -l)" "$(echo "$sv * 1000000 / $n" | bc -l)" "$rss"
      done
    done
  done
done

"$SNAPFS" mount --images "$POOL" --state-dir "$WORK/state" "$MNT"
rt=$(python3 - "$MNT" <<'EOF'
import os, sys, time
n = 20000
t = time.time()
for i in range(n):
    try:
        os.stat(os.path.join(sys.argv[1], "absent-%d" % i))
    except FileNotFoundError:
        pass
print("%.1f" % ((time.time() - t) / n * 1e6))
EOF
)
timeout 60 "$SNAPFS" unmount "$MNT"
echo "FUSE round trip: $rt us (find's floor: 4 per subdirectory = $(echo "4 * $rt" | bc -l | xargs printf '%.0f') us); load average: $(cut -d' ' -f1-3 /proc/loadavg)"

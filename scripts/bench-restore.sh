#!/usr/bin/env bash
# File-level restore benchmark (issue 5, section 7). Not a test: it prints numbers, it does not
# judge them.
#
# Usage: scripts/bench-restore.sh [--snapfs BIN] [--rebuild] [--no-guestmount] [--no-7zip] [WORKDIR]
#   --snapfs BIN       snapfs binary (default: target/release/snapfs; built if missing)
#   --rebuild          recreate the image even if WORKDIR already has it
#   --no-guestmount    skip the guestmount column ("n/a")
#   --no-7zip          skip the 7-Zip column ("n/a")
#   --worker-compare   snapfs only, twice in the same run: --restore-worker=off, then =on
#                      (issue 20: the sandboxed reader may cost at most 10%); adds the workers'
#                      peak RSS. Implies --no-guestmount --no-7zip.
#   WORKDIR            default /var/tmp/snapfs-bench-restore (image, Debian root, mounts, copies)
#
# Image (cached in WORKDIR, built once): a minimal Debian root (`debootstrap --variant=minbase
# bookworm`; if that fails, a copy of the host's /etc and /usr/share, and the output says so)
# plus bench/big.bin (200 MB of random data) and bench/small/ (2,000 small files, plus 20
# symlinks, 20 hard links and 40 files owned by uid 1000/65534), put with `mkfs.ext4 -d` into
# partition 1 of a GPT disk (sgdisk, like scripts/make-test-images.sh), converted to qcow2 with
# an internal snapshot "bench" (equal to the active layer).
#
# Columns, all on the same image:
#   snapfs      MNT/volumes/pool/bench.qcow2/.snapshots/bench/files/p1/   (snapshot "bench")
#   guestmount  guestmount --ro -a bench.qcow2 -m /dev/sda1 (LIBGUESTFS_BACKEND=direct, TCG;
#               it reads the active layer, which equals the snapshot)
#   7-Zip       7zz with -text.gpt.qcow (qcow2 -> GPT -> ext), reading the qcow2 file itself
# Rows:
#   first byte   echo 3 > drop_caches, then mount + `head -c1 etc/debian_version` (7zz: one
#                `7zz e -so` of that file); for the mounts this includes the mount itself.
#                Twice: with every cache dropped (programs and their libraries are read from
#                disk too), and with only the image dropped from the page cache (`dd
#                iflag=nocache count=0`), the programs cached as on a host that runs them daily;
#                both on a new mount with nothing parsed (guestmount: the first only, its
#                appliance boot is the same either way). snapfs and 7-Zip: median of 3 runs
#                for this and the two listing rows (guestmount: 1 run)
#   list root    `find ROOT | wc -l` (7zz: `7zz l`), entry counts printed alongside
#   list + attrs `find ROOT -printf '%y %s %T@ %p\n' | wc -l`: type, size and mtime of every
#                entry, which is what `7zz l` prints (so its column repeats the row above)
#   copy 200 MB  cp bench/big.bin to /dev/shm (7zz: e -so > /dev/shm), MB/s (10^6 B/s), median
#                of 3 runs, each after drop_caches (guestmount: 1 run, since the appliance's
#                kernel would serve later copies from its own cache)
#   copy 2,000   cp -a bench/small to /dev/shm (7zz: x 'bench/small'), seconds
#   metadata     cp -a of etc, usr and bench/small (7zz: x -snl -snh of the same), then symlinks,
#                hard-linked files (nlink > 1) and files not owned by root counted, against the
#                source tree, and a full comparison of (path, type, mode, owner, link target)
# snapfs is mounted anew for each first-byte row and for the listing with attributes;
# guestmount stays up from the first-byte row to the end (its listing with attributes then
# starts with the appliance warm). Before every row the host page cache
# is dropped (so the image file is read from disk), but each reader's own caches (snapfs's
# cache, the libguestfs appliance's kernel) keep what earlier rows read.
# Ratios: "x" = how many times faster snapfs is than the peer (peer time / snapfs time, or
# snapfs MB/s / peer MB/s); below 1 means the peer is faster.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
SNAPFS=$REPO/target/release/snapfs
REBUILD=0
WORKER_CMP=0
SNAPFS_ARGS=()
DO_GM=1
DO_7Z=1
WORK=/var/tmp/snapfs-bench-restore
while [[ $# -gt 0 ]]; do
  case $1 in
    --snapfs) SNAPFS=$2; shift 2 ;;
    --rebuild) REBUILD=1; shift ;;
    --no-guestmount) DO_GM=0; shift ;;
    --no-7zip) DO_7Z=0; shift ;;
    --worker-compare) WORKER_CMP=1; DO_GM=0; DO_7Z=0; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "bench-restore: unknown option $1" >&2; exit 2 ;;
    *) WORK=$1; shift ;;
  esac
done
[[ $(id -u) == 0 ]] || { echo "bench-restore: needs root (drop_caches, mkfs -d owners, guestmount)" >&2; exit 2; }

mkdir -p "$WORK"
WORK=$(realpath -- "$WORK")
POOLDIR=$WORK/pool
IMG=$POOLDIR/bench.qcow2
ROOT=$WORK/root
MNT=$WORK/mnt
MNT2=$WORK/mnt-guestmount
STATE=$WORK/state
SHM=/dev/shm/snapfs-bench-restore.$$
SMALL_FILE=etc/debian_version
mkdir -p "$POOLDIR" "$MNT" "$MNT2" "$STATE" "$SHM"

SNAPFS_MOUNTED=0
GM_MOUNTED=0
cleanup() {
  set +e
  if (( SNAPFS_MOUNTED )) || mountpoint -q "$MNT"; then
    timeout 60 "$SNAPFS" unmount "$MNT" >/dev/null 2>&1 || fusermount3 -u "$MNT" 2>/dev/null || umount -l "$MNT" 2>/dev/null
  fi
  if (( GM_MOUNTED )) || mountpoint -q "$MNT2"; then
    timeout 60 guestunmount "$MNT2" >/dev/null 2>&1 || fusermount3 -u "$MNT2" 2>/dev/null || umount -l "$MNT2" 2>/dev/null
  fi
  rm -rf -- "$SHM"
}
trap cleanup EXIT

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
evict() { dd if="$1" iflag=nocache count=0 status=none; }   # drop one file's cached pages
log() { echo "# $*"; }

# --------------------------------------------------------------------------------------------
# image

build_root() {
  ROOT_NOTE="debootstrap --variant=minbase bookworm"
  if [[ -f $ROOT/.bench-root-done ]] && (( ! REBUILD )); then
    ROOT_NOTE=$(cat "$ROOT/.bench-root-done"); return
  fi
  rm -rf -- "$ROOT" "$ROOT.tmp"
  if command -v debootstrap >/dev/null \
      && timeout 1500 debootstrap --variant=minbase bookworm "$ROOT.tmp" >"$WORK/debootstrap.log" 2>&1; then
    mv -- "$ROOT.tmp" "$ROOT"
  else
    log "debootstrap failed (see $WORK/debootstrap.log): FALLBACK, the root is a copy of the host's /etc and /usr/share"
    ROOT_NOTE="FALLBACK: copy of host /etc and /usr/share (debootstrap failed)"
    rm -rf -- "$ROOT.tmp"; mkdir -p "$ROOT/usr"
    cp -a /etc "$ROOT/etc"; cp -a /usr/share "$ROOT/usr/share"
  fi
  # the bench payload
  mkdir -p "$ROOT/bench/small"
  head -c 200M /dev/urandom > "$ROOT/bench/big.bin"
  local i
  for (( i = 0; i < 2000; i++ )); do
    head -c $(( 100 + (i * 37) % 8000 )) /dev/urandom > "$ROOT/bench/small/f$i"
  done
  for (( i = 0; i < 20; i++ )); do
    ln -s "f$i" "$ROOT/bench/small/sym$i"
    ln "$ROOT/bench/small/f$(( i + 100 ))" "$ROOT/bench/small/hard$i"
    chown 1000:1000 "$ROOT/bench/small/f$(( i + 200 ))"
    chown 65534:65534 "$ROOT/bench/small/f$(( i + 300 ))"
  done
  echo "$ROOT_NOTE" > "$ROOT/.bench-root-done"
}

build_image() {
  if [[ -f $IMG ]] && (( ! REBUILD )) && qemu-img snapshot -l "$IMG" 2>/dev/null | grep -qw bench; then
    return
  fi
  local raw=$WORK/bench.raw kb fsmb
  kb=$(du -sk "$ROOT" | cut -f1)
  fsmb=$(( kb * 3 / 2048 + 256 ))      # 50 % + 256 MiB headroom for metadata/journal
  rm -f -- "$raw" "$IMG"
  truncate -s $(( fsmb + 2 ))M "$raw"
  mkfs.ext4 -q -F -b 4096 -L bench-root -E offset=1048576,nodiscard -d "$ROOT" "$raw" "${fsmb}M"
  e2fsck -fn "$raw?offset=1048576" >/dev/null 2>&1 || { echo "bench-restore: ext4 not clean" >&2; exit 1; }
  # mke2fs wipes partition-table signatures: GPT after (as in make-test-images.sh)
  sgdisk -o -n "1:2048:+${fsmb}M" -t 1:8300 -c 1:rootfs "$raw" >/dev/null
  [[ $(sgdisk -v "$raw") == *'No problems found'* ]] || { echo "bench-restore: bad GPT" >&2; exit 1; }
  qemu-img convert -O qcow2 "$raw" "$IMG"
  qemu-img snapshot -c bench "$IMG"
  rm -f -- "$raw"
}

echo "# bench-restore $(date -u +%FT%TZ) on $(uname -r), $(nproc) CPUs, $(free -g | awk '/Mem:/ {print $2}') GiB RAM"
build_root
build_image
log "root: $ROOT_NOTE; image $IMG ($(du -h "$IMG" | cut -f1) on disk), snapshot bench"
SRC_ENTRIES=$(find "$ROOT" | wc -l)
log "source tree: $SRC_ENTRIES entries (find | wc -l, incl. the root itself; the image adds lost+found)"

if [[ ! -x $SNAPFS ]]; then
  log "building snapfs (cargo build --release)"
  (cd "$REPO" && cargo build --release -q)
fi

# metadata summary of a tree: symlinks, hard-linked regular files, non-root-owned entries
meta_counts() {
  local d=$1
  printf '%s/%s/%s' "$(find "$d" -type l | wc -l)" "$(find "$d" -type f -links +1 | wc -l)" \
    "$(find "$d" ! -user root | wc -l)"
}
# (path, type, mode, uid:gid, link target, link count; the count of directories is left out)
meta_list() {
  (cd "$1" && find . -mindepth 1 -printf '%P|%y|%m|%U:%G|%l|%n\n' \
    | awk -F'|' -v OFS='|' '$2 == "d" { $6 = "" } { print }' | sort)
}
META_DIRS=(etc usr bench/small)
SRC_META=$(for d in "${META_DIRS[@]}"; do meta_counts "$ROOT/$d"; echo; done | awk -F/ '{a+=$1; b+=$2; c+=$3} END {print a "/" b "/" c}')
# (path, type, mode, owner, target) of META_DIRS under a root, paths relative to that root
meta_list_dirs() { local r=$1 d; for d in "${META_DIRS[@]}"; do meta_list "$r" | grep -E "^${d}(/|\|)"; done || true; }
meta_list_dirs "$ROOT" > "$SHM/src.meta"
log "metadata source (etc, usr, bench/small): symlinks/hard-linked files/non-root-owned = $SRC_META, $(wc -l < "$SHM/src.meta") entries"

# results: R[col.row]
declare -A R
for c in snapfs gm 7z; do for r in ttfb ttfbw list lista nlist mbs small meta metadiff rss wrss; do R[$c.$r]=n/a; done; done

median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
mbs() { awk -v s="$1" -v t="$2" 'BEGIN { printf "%.1f\n", s / t / 1e6 }'; }
BIG_RUNS=3
RUNS=3        # the timed rows of snapfs and 7-Zip: median of this many cold runs
copy_big() {  # SRC DST RUNS -> MB/s, median of RUNS cold copies (the rates are noisy here)
  local t0 t1 sz i
  for (( i = 0; i < $3; i++ )); do
    drop; t0=$(now)
    timeout 600 cp -- "$1" "$2"
    t1=$(now); sz=$(stat -c %s "$2"); rm -f -- "$2"
    mbs "$sz" "$(elapsed "$t0" "$t1")"
  done | median
}
copy_small() {  # SRC DST -> seconds
  local t0 t1
  drop; t0=$(now)
  timeout 600 cp -a -- "$1" "$2"
  t1=$(now); elapsed "$t0" "$t1"
}
# number of paths whose line differs (or that exist on one side only) against the source;
# the diff itself is kept in WORKDIR/last-COL.diff
meta_diff() {
  diff "$SHM/src.meta" "$1" > "$WORK/last-$(basename "$1" .meta).diff" || true
  sed -n 's/^[<>] \([^|]*\)|.*/\1/p' "$WORK/last-$(basename "$1" .meta).diff" | sort -u | wc -l
}
meta_check() {  # COL ROOT
  local col=$1 r=$2 d
  rm -rf -- "$SHM/meta"; mkdir -p "$SHM/meta"
  for d in "${META_DIRS[@]}"; do mkdir -p "$SHM/meta/$(dirname "$d")"; timeout 900 cp -a -- "$r/$d" "$SHM/meta/$d" 2>>"$SHM/$col.cp.err" || true; done
  R[$col.meta]=$(for d in "${META_DIRS[@]}"; do meta_counts "$SHM/meta/$d"; echo; done | awk -F/ '{a+=$1; b+=$2; c+=$3} END {print a "/" b "/" c}')
  meta_list_dirs "$SHM/meta" > "$SHM/$col.meta"
  R[$col.metadiff]=$(meta_diff "$SHM/$col.meta")
  rm -rf -- "$SHM/meta"
}

# --------------------------------------------------------------------------------------------
# snapfs
snapfs_unmount() {
  if mountpoint -q "$MNT"; then timeout 60 "$SNAPFS" unmount "$MNT" || true; fi
  SNAPFS_MOUNTED=0
  rm -rf -- "$STATE"; mkdir -p "$STATE"
}
snapfs_mount() {
  timeout 120 "$SNAPFS" mount "${SNAPFS_ARGS[@]}" --images "$POOLDIR" --state-dir "$STATE" "$MNT" >"$SHM/snapfs.mount.log" 2>&1 \
    || { log "snapfs mount failed: $(tail -3 "$SHM/snapfs.mount.log")" >&2; return 1; }
  SNAPFS_MOUNTED=1
}
# One cold start of snapfs: unmount, prepare the caches with "$1" (drop: everything; evict:
# the image only), then time mount + first byte -> seconds. Leaves it mounted.
snapfs_first_byte() {
  local t0 t1 r=$1
  snapfs_unmount
  if [[ $2 == drop ]]; then drop; else sync; evict "$IMG"; fi
  t0=$(now)
  snapfs_mount || return 1
  timeout 60 head -c1 "$r/$SMALL_FILE" >/dev/null
  t1=$(now); elapsed "$t0" "$t1"
}
# One cold listing on a new mount (the first byte read first, as above): ARGS to find.
snapfs_list() {
  local t0 t1 r=$1; shift
  snapfs_unmount; snapfs_mount || return 1
  timeout 60 head -c1 "$r/$SMALL_FILE" >/dev/null
  drop; t0=$(now); timeout 600 find "$r" "$@" | wc -l >/dev/null; t1=$(now); elapsed "$t0" "$t1"
}
run_snapfs() {
  local r pid i
  r=$MNT/volumes/pool/bench.qcow2/.snapshots/bench/files/p1
  R[snapfs.ttfb]=$(for (( i = 0; i < RUNS; i++ )); do snapfs_first_byte "$r" drop; echo; done | median)
  R[snapfs.ttfbw]=$(for (( i = 0; i < RUNS; i++ )); do snapfs_first_byte "$r" evict; echo; done | median)
  mountpoint -q "$MNT" || { log "snapfs mount failed: $(tail -3 "$SHM/snapfs.mount.log")"; return; }
  log "snapfs: $("$SNAPFS" --version 2>/dev/null | head -1)"
  R[snapfs.nlist]=$(find "$r" | wc -l)
  R[snapfs.list]=$(for (( i = 0; i < RUNS; i++ )); do snapfs_list "$r"; echo; done | median)
  R[snapfs.lista]=$(for (( i = 0; i < RUNS; i++ )); do snapfs_list "$r" -printf '%y %s %T@ %p\n'; echo; done | median)
  # once mounted, the daemon is the only process left with these arguments
  pid=$(pgrep -n -f "^$SNAPFS mount.*$MNT" || true)
  R[snapfs.mbs]=$(copy_big "$r/bench/big.bin" "$SHM/big.bin" "$BIG_RUNS")
  R[snapfs.small]=$(copy_small "$r/bench/small" "$SHM/small"); rm -rf -- "$SHM/small"
  meta_check snapfs "$r"
  if [[ -n $pid ]]; then
    R[snapfs.rss]=$(( $(sed -n 's/^VmHWM:[[:space:]]*\([0-9]*\) kB/\1/p' "/proc/$pid/status") / 1024 ))
    # restore workers (children running __restore-worker): the largest peak RSS
    R[snapfs.wrss]=$(for w in $(pgrep -P "$pid" -f __restore-worker || true); do
        sed -n 's/^VmHWM:[[:space:]]*\([0-9]*\) kB/\1/p' "/proc/$w/status"; done | sort -n | tail -1)
    [[ -n ${R[snapfs.wrss]} ]] && R[snapfs.wrss]=$(( R[snapfs.wrss] / 1024 )) || R[snapfs.wrss]=-
  fi
  snapfs_unmount
}

# --------------------------------------------------------------------------------------------
# guestmount
run_guestmount() {
  local t0 t1
  if ! command -v guestmount >/dev/null; then
    GM_NOTE="guestmount not installed (apt-get install libguestfs-tools)"; return
  fi
  export LIBGUESTFS_BACKEND=direct LIBGUESTFS_BACKEND_SETTINGS=force_tcg
  drop; t0=$(now)
  if ! timeout 600 guestmount --ro --format=qcow2 -a "$IMG" -m /dev/sda1 "$MNT2" >"$SHM/gm.log" 2>&1; then
    GM_NOTE="guestmount failed: $(tail -5 "$SHM/gm.log" | tr '\n' ' ')"
    return
  fi
  GM_MOUNTED=1
  timeout 120 head -c1 "$MNT2/$SMALL_FILE" >/dev/null
  t1=$(now); R[gm.ttfb]=$(elapsed "$t0" "$t1")
  GM_NOTE="guestmount: $(guestmount --version 2>/dev/null | head -1)"
  drop; t0=$(now); R[gm.nlist]=$(timeout 900 find "$MNT2" | wc -l); t1=$(now); R[gm.list]=$(elapsed "$t0" "$t1")
  drop; t0=$(now); timeout 900 find "$MNT2" -printf '%y %s %T@ %p\n' | wc -l >/dev/null; t1=$(now); R[gm.lista]=$(elapsed "$t0" "$t1")
  # one copy only: the appliance's own page cache (not dropped by the host) would serve the next
  R[gm.mbs]=$(copy_big "$MNT2/bench/big.bin" "$SHM/big.bin" 1)
  R[gm.small]=$(copy_small "$MNT2/bench/small" "$SHM/small"); rm -rf -- "$SHM/small"
  meta_check gm "$MNT2"
  timeout 60 guestunmount "$MNT2" && GM_MOUNTED=0
}

# --------------------------------------------------------------------------------------------
# 7-Zip
run_7z() {
  local t0 t1 out sz i
  if ! command -v 7zz >/dev/null; then Z_NOTE="7zz not installed (apt-get install 7zip)"; return; fi
  local T=-text.gpt.qcow    # qcow2 -> GPT -> ext (one partition)
  z_first_byte() {  # drop|evict -> seconds
    if [[ $1 == drop ]]; then drop; else sync; evict "$IMG"; fi
    t0=$(now)
    timeout 120 7zz e -so "$T" "$IMG" "$SMALL_FILE" 2>/dev/null | head -c1 >/dev/null
    t1=$(now); elapsed "$t0" "$t1"
  }
  R[7z.ttfb]=$(for (( i = 0; i < RUNS; i++ )); do z_first_byte drop; echo; done | median)
  R[7z.ttfbw]=$(for (( i = 0; i < RUNS; i++ )); do z_first_byte evict; echo; done | median)
  Z_NOTE="7zz: $(7zz 2>/dev/null | grep -m1 '7-Zip')"
  R[7z.list]=$(for (( i = 0; i < RUNS; i++ )); do
      drop; t0=$(now); timeout 600 7zz l "$T" "$IMG" >/dev/null; t1=$(now); elapsed "$t0" "$t1"; echo
    done | median)
  out=$(timeout 600 7zz l "$T" "$IMG")
  # summary line: "... N files, M folders"
  R[7z.lista]=${R[7z.list]}
  R[7z.nlist]=$(tail -n 5 <<<"$out" | sed -n 's/.* \([0-9]*\) files, \([0-9]*\) folders.*/\1 \2/p' | awk '{print $1 + $2}')
  R[7z.mbs]=$(for (( i = 0; i < BIG_RUNS; i++ )); do
      drop; t0=$(now)
      timeout 600 7zz e -so "$T" "$IMG" bench/big.bin > "$SHM/big.bin" 2>/dev/null
      t1=$(now); sz=$(stat -c %s "$SHM/big.bin"); rm -f -- "$SHM/big.bin"
      mbs "$sz" "$(elapsed "$t0" "$t1")"
    done | median)
  drop; t0=$(now)
  timeout 600 7zz x -snl -snh -y "$T" "-o$SHM/small7" "$IMG" bench/small >/dev/null 2>"$SHM/7z.small.err" || true
  t1=$(now); R[7z.small]=$(elapsed "$t0" "$t1")
  log "7zz x bench/small: $(find "$SHM/small7/bench/small" -type f | wc -l) files extracted"
  rm -rf -- "$SHM/small7"
  # metadata: extract etc, usr, bench/small with symlinks and hard links as links
  rm -rf -- "$SHM/meta"; mkdir -p "$SHM/meta"
  timeout 900 7zz x -snl -snh -y "$T" "-o$SHM/meta" "$IMG" "${META_DIRS[@]}" >/dev/null 2>"$SHM/7z.meta.err" || true
  R[7z.meta]=$(for d in "${META_DIRS[@]}"; do meta_counts "$SHM/meta/$d"; echo; done | awk -F/ '{a+=$1; b+=$2; c+=$3} END {print a "/" b "/" c}')
  meta_list_dirs "$SHM/meta" > "$SHM/7z.meta"
  R[7z.metadiff]=$(meta_diff "$SHM/7z.meta")
  rm -rf -- "$SHM/meta"
}

GM_NOTE="guestmount skipped (--no-guestmount)"
Z_NOTE="7-Zip skipped (--no-7zip)"
if (( WORKER_CMP )); then
  # The same rows twice, same image, same run: readers in the daemon, then in workers.
  SNAPFS_ARGS=(--restore-worker=off); run_snapfs
  declare -A OFF=()
  for k in "${!R[@]}"; do [[ $k == snapfs.* ]] && OFF[${k#snapfs.}]=${R[$k]}; done
  SNAPFS_ARGS=(--restore-worker=on); run_snapfs
  pct() { awk -v k="$1" -v a="$2" -v b="$3" 'BEGIN {
    if (a !~ /^[0-9.]+$/ || b !~ /^[0-9.]+$/ || a + 0 == 0) { print "-"; exit }
    c = (k == "time") ? (b - a) / a : (a - b) / a; printf "%+.1f%%\n", c * 100 }'; }
  wrow() { printf '%-36s %11s %11s %11s\n' "$1" "${OFF[$3]}" "${R[snapfs.$3]}" "$(pct "$2" "${OFF[$3]}" "${R[snapfs.$3]}")"; }
  echo
  printf '%-36s %11s %11s %11s\n' "" "in daemon" "in worker" "cost"
  wrow "first byte, all caches cold (s)" time ttfb
  wrow "first byte, image cold (s)" time ttfbw
  wrow "list whole root (s)" time list
  wrow "list root with size and mtime (s)" time lista
  wrow "copy 200 MB file (MB/s)" rate mbs
  wrow "copy 2,000-file folder (s)" time small
  printf '%-36s %11s %11s\n' "entries differing from source" "${OFF[metadiff]}" "${R[snapfs.metadiff]}"
  printf '%-36s %11s %11s\n' "daemon peak RSS (MiB)" "${OFF[rss]}" "${R[snapfs.rss]}"
  printf '%-36s %11s %11s\n' "largest worker peak RSS (MiB)" "-" "${R[snapfs.wrss]}"
  echo "# cost: how much slower with the worker (time rows: more seconds; MB/s: fewer), in %"
  exit 0
fi
run_snapfs
(( DO_7Z )) && run_7z
(( DO_GM )) && run_guestmount
log "$GM_NOTE"
log "$Z_NOTE"

# --------------------------------------------------------------------------------------------
# table
ratio() {  # KIND(time|rate) SNAPFS PEER
  awk -v k="$1" -v s="$2" -v p="$3" 'BEGIN {
    if (s !~ /^[0-9.]+$/ || p !~ /^[0-9.]+$/ || s + 0 == 0 || p + 0 == 0) { print "-"; exit }
    r = (k == "time") ? p / s : s / p
    printf (r >= 10 ? "%.0fx" : "%.2fx"), r }'
}
row() {  # LABEL KIND KEY
  printf '%-36s %11s %11s %11s %11s %11s\n' "$1" "${R[snapfs.$3]}" "${R[gm.$3]}" "${R[7z.$3]}" \
    "$(ratio "$2" "${R[snapfs.$3]}" "${R[gm.$3]}")" "$(ratio "$2" "${R[snapfs.$3]}" "${R[7z.$3]}")"
}
echo
printf '%-36s %11s %11s %11s %11s %11s\n' "" snapfs guestmount 7-Zip "vs guestmnt" "vs 7-Zip"
row "first byte, all caches cold (s)" time ttfb
row "first byte, image cold (s)" time ttfbw
row "list whole root (s)" time list
row "list root with size and mtime (s)" time lista
printf '%-36s %11s %11s %11s\n' "  entries listed (source: $SRC_ENTRIES)" "${R[snapfs.nlist]}" "${R[gm.nlist]}" "${R[7z.nlist]}"
row "copy 200 MB file (MB/s)" rate mbs
row "copy 2,000-file folder (s)" time small
printf '%-36s %11s %11s %11s\n' "symlinks/hardlinked/non-root" "${R[snapfs.meta]}" "${R[gm.meta]}" "${R[7z.meta]}"
printf '%-36s %11s %11s %11s\n' "  (source: $SRC_META)" "" "" ""
printf '%-36s %11s %11s %11s\n' "  entries differing from source" "${R[snapfs.metadiff]}" "${R[gm.metadiff]}" "${R[7z.metadiff]}"
printf '%-36s %11s %11s %11s\n' "snapfs daemon peak RSS (MiB)" "${R[snapfs.rss]}" "" ""
echo "# metadata rows: over etc, usr, bench/small ($(wc -l < "$SHM/src.meta") entries); differing = paths whose"
echo "#   (type, mode, uid:gid, symlink target, nlink of non-dirs) differ or that are missing/extra;"
echo "#   diffs in $WORK/last-{snapfs,gm,7z}.diff"
echo "# ratios: times faster than the peer (peer s / snapfs s; snapfs MB/s / peer MB/s)"

#!/usr/bin/env bash
# Compare a file that claims to be the raw content of a disk image (normally the snapfs
# `disk.raw`) against QEMU's view of the same image.
#
# Usage: scripts/check-image.sh [--seek=bounded|strict|off] [-q] IMG FILE [SNAPNAME]
#
#  1. bytes: FILE must equal `qemu-img convert -O raw [-l snapshot.name=SNAPNAME] IMG`
#     (cmp). One QEMU quirk is tolerated: for a raw IMG whose size is not a multiple of 512,
#     QEMU rounds the virtual size up to 512 and pads with zeros; FILE may have either size.
#  2. allocation: the SEEK_DATA/SEEK_HOLE walk of FILE is compared with
#     `qemu-img map --output=json` of IMG. For SNAPNAME, qemu-img map has no snapshot option,
#     so the map is taken of a temporary copy of IMG on which the snapshot was applied
#     (`qemu-img snapshot -a`): that gives the snapshot's own L1/L2 tables, allocation and
#     virtual size, unlike a `convert -l` copy, whose zero detection changes allocation.
#     From the map: MUST = ranges with "data": true and "zero": false (data stored in a file);
#     MAY = ranges with "data": true (includes allocated clusters over a host-file hole, e.g.
#     preallocation=metadata/falloc, reported "data": true, "zero": true).
#       --seek=bounded (default): MUST ⊆ walk ⊆ MAY
#       --seek=strict:            walk == MUST
#       --seek=off:               skip the walk
#     Unallocated ranges (read from nowhere) and zero clusters are always holes; data read
#     through from a backing file counts as data (the map is of the whole chain).
# Exit status: 0 match, 1 mismatch (message on stderr), 2 usage or tool error.
set -euo pipefail

SEEK=bounded
QUIET=0
while [[ $# -gt 0 && $1 == -* ]]; do
  case $1 in
    --seek=bounded|--seek=strict|--seek=off) SEEK=${1#--seek=} ;;
    -q) QUIET=1 ;;
    -h|--help) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
    *) echo "check-image: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
if [[ $# -lt 2 || $# -gt 3 ]]; then
  sed -n '5p' "$0" >&2
  exit 2
fi
IMG=$1 FILE=$2 SNAP=${3:-}
[[ -f $IMG ]] || { echo "check-image: $IMG: no such image" >&2; exit 2; }
[[ -e $FILE ]] || { echo "check-image: $FILE: no such file" >&2; exit 2; }

TMP=$(mktemp -d "${TMPDIR:-/tmp}/check-image.XXXXXX")
trap 'rm -rf -- "$TMP"' EXIT
fail() { echo "check-image: MISMATCH $IMG${SNAP:+ @ snapshot \"$SNAP\"} vs $FILE: $*" >&2; exit 1; }
say() { (( QUIET )) || echo "check-image: $*"; }

info_json=$(qemu-img info -U --output=json "$IMG") || { echo "check-image: qemu-img info $IMG failed" >&2; exit 2; }
jget() { python3 -c 'import json,sys; d=json.load(sys.stdin); v=d.get(sys.argv[1]); print("" if v is None else v)' "$1"; }
FMT=$(jget format <<<"$info_json")

# Snapshot: a private copy with the snapshot applied gives its virtual size and its map.
map_img=$IMG
map_fmt=$FMT
if [[ -n $SNAP ]]; then
  # Apply the snapshot on a private copy; re-point a relative backing file at its absolute path.
  map_img=$TMP/snap.qcow2
  cp --sparse=always -- "$IMG" "$map_img"
  backing=$(jget full-backing-filename <<<"$info_json")
  if [[ -n $backing ]]; then
    bfmt=$(jget backing-filename-format <<<"$info_json")
    [[ -n $bfmt ]] || bfmt=$(qemu-img info -U --output=json "$backing" | jget format)
    qemu-img rebase -U -u -b "$(realpath -- "$backing")" -F "$bfmt" "$map_img"
  fi
  qemu-img snapshot -a "$SNAP" "$map_img" || { echo "check-image: cannot apply snapshot '$SNAP'" >&2; exit 2; }
fi
snap_size=
if [[ -n $SNAP ]]; then
  snap_size=$(qemu-img info -U --output=json "$map_img" | jget virtual-size)
fi

# ---- 1. bytes -------------------------------------------------------------------------------
ref=$TMP/ref.raw
convert_args=(-U -O raw)
[[ -n $SNAP ]] && convert_args+=(-l "snapshot.name=${SNAP//,/,,}")
qemu-img convert "${convert_args[@]}" "$IMG" "$ref" || { echo "check-image: qemu-img convert failed" >&2; exit 2; }
ref_size=$(stat -c %s "$ref")
file_size=$(stat -L -c %s "$FILE")
cmp_len=$ref_size
if [[ -n $snap_size ]] && (( ref_size > snap_size )); then
  # QEMU quirk: `convert -l snapshot.name=` keeps the active layer's (larger) virtual size and
  # pads with zeros; the snapshot's own size is what snapfs must show.
  if ! cmp -s -n $((ref_size - snap_size)) -i "$snap_size:0" "$ref" /dev/zero; then
    fail "qemu-img convert -l gives non-zero data past the snapshot's virtual size $snap_size"
  fi
  say "note: snapshot virtual size $snap_size < current $ref_size; qemu-img convert -l pads with zeros (ignored)"
  ref_size=$snap_size
  cmp_len=$snap_size
fi
if (( file_size != ref_size )); then
  img_size=$(stat -c %s "$IMG")
  if [[ $FMT == raw && -z $SNAP ]] && (( file_size == img_size && ref_size - file_size < 512 && ref_size > file_size )); then
    if ! cmp -s -n $((ref_size - file_size)) -i "$file_size:0" "$ref" /dev/zero; then
      echo "check-image: qemu padding is not zero?" >&2; exit 2
    fi
    say "note: raw image size $file_size is not a multiple of 512; qemu pads to $ref_size (tolerated)"
    cmp_len=$file_size
  else
    fail "size $file_size, qemu-img convert gives $ref_size"
  fi
fi
if ! out=$(cmp -n "$cmp_len" "$ref" "$FILE" 2>&1); then
  fail "content differs: ${out#"$ref" } (first arg = qemu-img convert)"
fi
say "bytes ok: $cmp_len bytes${SNAP:+ (snapshot \"$SNAP\")}"

[[ $SEEK == off ]] && exit 0

# ---- 2. allocation (SEEK_DATA/SEEK_HOLE vs qemu-img map) ------------------------------------
qemu-img map -U -f "$map_fmt" --output=json "$map_img" > "$TMP/map.json" \
  || { echo "check-image: qemu-img map failed" >&2; exit 2; }

CHECK_IMAGE_QUIET=$QUIET CHECK_IMAGE_WHAT="$IMG${SNAP:+ @ snapshot \"$SNAP\"}" \
  python3 - "$SEEK" "$FILE" "$TMP/map.json" "$cmp_len" <<'PY' || exit $?
import errno, json, os, sys

mode, path, map_path, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

def merge(ranges):
    out = []
    for s, e in sorted(ranges):
        if s >= e:
            continue
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [tuple(r) for r in out]

def walk(path):
    """Data ranges of a file from SEEK_DATA/SEEK_HOLE, as (start, end) pairs."""
    fd = os.open(path, os.O_RDONLY)
    try:
        end = os.fstat(fd).st_size
        ranges, off = [], 0
        while off < end:
            try:
                d = os.lseek(fd, off, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break
                raise
            h = os.lseek(fd, d, os.SEEK_HOLE)
            if h <= d:
                sys.exit(f"check-image: SEEK_HOLE({d}) returned {h}: walk does not advance")
            ranges.append((d, min(h, end)))
            off = h
        return merge(ranges)
    finally:
        os.close(fd)

def clip(ranges, limit):
    return [(s, min(e, limit)) for s, e in ranges if s < limit]

def subtract(a, b):
    """Parts of ranges a not covered by ranges b (both merged, sorted)."""
    out = []
    for s, e in a:
        cur = s
        for bs, be in b:
            if be <= cur or bs >= e:
                continue
            if bs > cur:
                out.append((cur, bs))
            cur = max(cur, be)
            if cur >= e:
                break
        if cur < e:
            out.append((cur, e))
    return out

entries = json.load(open(map_path))
must = clip(merge((x["start"], x["start"] + x["length"]) for x in entries
                  if x.get("data") and not x.get("zero")), size)
may = clip(merge((x["start"], x["start"] + x["length"]) for x in entries if x.get("data")), size)
got = clip(walk(path), size)

def fmt(rs, n=5):
    s = ", ".join(f"[{a}, {b})" for a, b in rs[:n])
    return s + (f" … ({len(rs)} ranges)" if len(rs) > n else "")

problems = []
if mode == "strict":
    if got != must:
        problems.append(f"walk {fmt(got)} != qemu-img map data {fmt(must)}")
else:
    missing = subtract(must, got)
    if missing:
        problems.append(f"qemu-img map has data where the walk has holes: {fmt(missing)}")
    extra = subtract(got, may)
    if extra:
        problems.append(f"the walk has data where qemu-img map says unallocated/zero: {fmt(extra)}")
if problems:
    for p in problems:
        what = os.environ.get("CHECK_IMAGE_WHAT", "")
        print(f"check-image: MISMATCH (SEEK_DATA/SEEK_HOLE, {mode}) {what} vs {path}: {p}", file=sys.stderr)
    print("check-image: walk: " + fmt(got, 20), file=sys.stderr)
    sys.exit(1)
if os.environ.get("CHECK_IMAGE_QUIET") != "1":
    data = sum(e - s for s, e in got)
    print(f"check-image: seek ok ({mode}): {len(got)} data ranges, {data} data bytes")
PY

#!/usr/bin/env bash
# Self-test of the corpus and of check-image.sh, without snapfs: every image in DIR, and every
# internal snapshot of it, is exported as a raw file by qemu-storage-daemon's FUSE export (the
# QEMU peer) and compared with scripts/check-image.sh. A snapshot is exported from a temporary
# copy of the image on which the snapshot was applied (`qemu-img snapshot -a`), since
# qemu-storage-daemon cannot open an internal snapshot read-only.
#
# Usage: scripts/check-corpus-qsd.sh [--seek=bounded|strict|off] DIR
# Exit status: 0 all match, 1 some mismatch, 2 usage/tool error.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
SEEK=--seek=bounded
if [[ ${1:-} == --seek=* ]]; then SEEK=$1; shift; fi
[[ $# -eq 1 && -d $1 ]] || { sed -n '8p' "$0" >&2; exit 2; }
DIR=$(realpath -- "$1")

TMP=$(mktemp -d "${TMPDIR:-/tmp}/check-corpus.XXXXXX")
QSD_PID=
cleanup() {
  qsd_stop
  qsd_reap
  rm -rf -- "$TMP"
}
trap cleanup EXIT

# qsd_start IMG MOUNTFILE: export IMG (any format qemu knows, read-only) as a raw file.
qsd_start() {
  local img=$1 mp=$2 fmt
  fmt=$(qemu-img info -U --output=json "$img" | python3 -c 'import json,sys; print(json.load(sys.stdin)["format"])')
  : > "$mp"
  qemu-storage-daemon \
    --blockdev "driver=file,node-name=file0,filename=${img//,/,,},read-only=on,locking=off" \
    --blockdev "driver=$fmt,node-name=fmt0,file=file0,read-only=on" \
    --export "type=fuse,id=exp0,node-name=fmt0,mountpoint=${mp//,/,,},writable=off" \
    --pidfile "$TMP/qsd.pid" --daemonize
  QSD_PID=$(cat "$TMP/qsd.pid")
}
STOPPED=()
qsd_stop() {   # qemu-storage-daemon takes ~1.5 s to exit: do not wait here (see qsd_reap)
  [[ -n $QSD_PID ]] || return 0
  kill "$QSD_PID" 2>/dev/null || true
  STOPPED+=("$QSD_PID")
  QSD_PID=
}
qsd_reap() {
  local pid _
  for pid in "${STOPPED[@]}"; do
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  done
}

snapshots() {   # NUL-separated snapshot names of a qcow2 image
  qemu-img info -U --output=json "$1" | python3 -c '
import json, sys
for s in json.load(sys.stdin).get("snapshots", []):
    sys.stdout.write(s["name"] + "\0")'
}

n_ok=0 n_bad=0
failed=()
check() {   # check IMG EXPORTED_FILE [SNAP]
  local label=$1${3:+ @ \"$3\"}
  if out=$("$HERE/check-image.sh" "$SEEK" "$@" 2>&1); then
    n_ok=$((n_ok + 1))
    printf 'ok    %s\n' "$label"
  else
    n_bad=$((n_bad + 1)); failed+=("$label")
    printf 'FAIL  %s\n%s\n' "$label" "$out"
  fi
}

cd "$DIR"
n=0
for img in *.qcow2 *.raw *.img; do
  [[ -f $img ]] || continue
  n=$((n + 1)); mp=$TMP/export-$n.raw
  qsd_start "$DIR/$img" "$mp"
  check "$img" "$mp"
  qsd_stop
  while IFS= read -r -d '' snap; do
    n=$((n + 1)); mp=$TMP/export-$n.raw; copy=$TMP/snapcopy-$n.qcow2
    cp --sparse=always -- "$img" "$copy"
    backing=$(qemu-img info -U --output=json "$img" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d.get("full-backing-filename",""), d.get("backing-filename-format",""), sep="\n")')
    bfile=$(sed -n 1p <<<"$backing"); bfmt=$(sed -n 2p <<<"$backing")
    if [[ -n $bfile ]]; then
      [[ -n $bfmt ]] || bfmt=$(qemu-img info -U --output=json "$bfile" | python3 -c 'import json,sys; print(json.load(sys.stdin)["format"])')
      qemu-img rebase -u -b "$(realpath -- "$bfile")" -F "$bfmt" "$copy"
    fi
    qemu-img snapshot -a "$snap" "$copy"
    qsd_start "$copy" "$mp"
    check "$img" "$mp" "$snap"
    qsd_stop
  done < <(snapshots "$img")
done
echo "check-corpus-qsd: $n_ok ok, $n_bad failed (image or image@snapshot checks, $SEEK)"
if (( n_bad )); then printf '  failed: %s\n' "${failed[@]}"; exit 1; fi

#!/usr/bin/env bash
# Stress for F8 (docs/testing.md): qcow2 internal snapshots made and deleted through a real
# mount, one after another on one image, while other processes list its .snapshots, read its
# volume.json and open its snapshot disks, as the chaos suite does. Counts every mkdir/rmdir
# that failed, every mkdir whose snapshot a listing right after did not show, and every listing
# that held a name snapfs never made (a snapshot table parsed half old, half new).
#
# Usage (as root): scripts/stress-image-snapshots.sh [SECONDS] [SNAPFS_BINARY]
#   SECONDS        how long the loop runs (default 120)
#   SNAPFS_BINARY  default target/debug/snapfs (build it first: cargo build)
# Environment: STRESS_LISTERS (default 3), STRESS_TTL_MS (the mount's --list-ttl-ms, default 20:
# short, so listings reach the image often). Exits non-zero on any failure counted.
set -euo pipefail
cd "$(dirname "$0")/.."

secs=${1:-120}
bin=$(realpath "${2:-target/debug/snapfs}")
listers=${STRESS_LISTERS:-3}
ttl=${STRESS_TTL_MS:-20}
base=/var/tmp/stress-image-snapshots-$$
pool=$base/pool
mnt=$base/mnt
mkdir -p "$pool" "$mnt"
qemu-img create -q -f qcow2 "$pool/vol.qcow2" 64M
qemu-io -c "write -P 0x5a 0 4M" "$pool/vol.qcow2" >/dev/null

cleanup() {
  for p in "${pids[@]:-}"; do [[ -n $p ]] && kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  "$bin" unmount "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null || true
  rm -rf "$base"
}
pids=()
trap cleanup EXIT

"$bin" mount --images "$pool" --list-ttl-ms "$ttl" --state-dir "$base/state" --log-file "$base/log" "$mnt"
snaps=$mnt/volumes/pool/vol.qcow2/.snapshots
stop=$base/stop

lister() {
  local bad=0 n=0
  while [[ ! -e $stop ]]; do
    # Names snapfs made are c<N>; anything else is a table read half old, half new.
    if names=$(ls "$snaps" 2>/dev/null); then
      while read -r name; do
        [[ -z $name || $name =~ ^c[0-9]+$ ]] || { echo "stress: listed a name never made: '$name'" >&2; bad=$((bad + 1)); }
      done <<<"$names"
    fi
    cat "$mnt/volumes/pool/vol.qcow2/volume.json" >/dev/null 2>&1 || true
    first=$(head -n1 <<<"$names")
    [[ -n $first ]] && head -c 65536 "$snaps/$first/disk.raw" >/dev/null 2>&1 || true
    n=$((n + 1))
  done
  echo "$bad $n" >"$base/lister.$BASHPID"
}
for _ in $(seq "$listers"); do
  lister &
  pids+=($!)
done

end=$((SECONDS + secs))
i=0 made=0 deleted=0 failed=0 unseen=0
live=()
while ((SECONDS < end)); do
  i=$((i + 1))
  if ((${#live[@]} < 3)); then
    if err=$(mkdir "$snaps/c$i" 2>&1); then
      made=$((made + 1))
      live+=("c$i")
      ls "$snaps" | grep -qx "c$i" || { echo "stress: c$i made but not listed right after" >&2; unseen=$((unseen + 1)); }
    else
      echo "stress: mkdir c$i: $err" >&2
      failed=$((failed + 1))
    fi
  else
    victim=${live[0]}
    if err=$(rmdir "$snaps/$victim" 2>&1); then
      deleted=$((deleted + 1))
    else
      echo "stress: rmdir $victim: $err" >&2
      failed=$((failed + 1))
    fi
    live=("${live[@]:1}")
  fi
done
touch "$stop"
wait "${pids[@]}"
pids=()
bad=0 lists=0
for f in "$base"/lister.*; do
  read -r b n <"$f"
  bad=$((bad + b))
  lists=$((lists + n))
done
hidden=$(grep -c "hidden behind an earlier one" "$base/log" || true)
echo "stress: ${secs} s: mkdir ok $made, rmdir ok $deleted, failed $failed, made but unlisted $unseen, lister rounds $lists, names never made $bad, duplicate-name warnings $hidden"
((failed + unseen + bad + hidden == 0))

#!/usr/bin/env bash
# Copy method for RBD disks (issue 13, --store-pool): figures. Not a test: it prints numbers.
#
# Usage: scripts/bench-store-pool.sh [--snapfs BIN] [--runs N] [--data-mib N] [NAME]
#   --snapfs BIN    snapfs binary (default: target/release/snapfs, built if missing)
#   --runs N        snapshots per method (default 3)
#   --data-mib N    random data after the guest's 64 MiB disk in its RBD image (default 1024;
#                   the guest's partitions stay as they were, so its writer loop runs)
#   NAME            throw-away RBD guest (default h13-bench-sp), removed at the end
# Needs the test bed (scripts/testbed/up.sh) and the loopback Ceph (scripts/ceph/start-ceph.sh).
#
# One RBD-backed guest (scripts/testbed/rbd-guest.sh) whose image holds the guest's disk plus
# N MiB written by `rbd bench`, with its writer loop. Two mounts of the same libvirtd, both
# treating the guest as managed: one with --store-pool=rbd (snap, clone v2 into rbd/snapfs,
# flatten, source snapshot removed), one without (libvirt push backup into the file store).
# Alternately, N times each: mkdir wall time, stall_ms (freeze sent -> thaw returned), the
# guest's longest synced-write gap around the mkdir, the flatten time and rate (daemon log),
# and whether the source image is left with a snapshot. rmdir after each.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
TB=$REPO/scripts/testbed
SNAPFS=$REPO/target/release/snapfs
RUNS=3
DATA_MIB=1024
while [[ $# -gt 0 ]]; do
    case $1 in
        --snapfs) SNAPFS=$2; shift 2 ;;
        --runs) RUNS=$2; shift 2 ;;
        --data-mib) DATA_MIB=$2; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) echo "unknown option $1" >&2; exit 2 ;;
        *) break ;;
    esac
done
NAME=${1:-h13-bench-sp}
IMG=rbd/$NAME-vda
export LIBVIRT_DEFAULT_URI=qemu:///system
export CEPH_CONF=${CEPH_CONF:-/var/lib/snapfs-ceph/ceph.conf}
WORK=$(mktemp -d /tmp/h13-bench-store-pool.XXXXXX)
PM=$WORK/pool FM=$WORK/file
mkdir -p "$PM" "$FM" "$WORK/sp" "$WORK/sf"
[[ -x $SNAPFS ]] || (cd "$REPO" && cargo build --release -q)

cleanup() {
    "$SNAPFS" unmount --lazy "$PM" >/dev/null 2>&1 || true
    "$SNAPFS" unmount --lazy "$FM" >/dev/null 2>&1 || true
    "$TB/rbd-guest.sh" --remove "$NAME" >/dev/null 2>&1 || true
    rm -f "/var/log/snapfs-testbed/$NAME.console.log"
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'echo "bench-store-pool: failed at line $LINENO: $BASH_COMMAND" >&2' ERR

source "$REPO/scripts/bench-guest-lib.sh"

echo "== RBD guest $NAME: the guest's disk + $DATA_MIB MiB written"
"$TB/rbd-guest.sh" --recreate "$NAME" >/dev/null
if (( DATA_MIB > 0 )); then
    # The data goes *after* the guest's disk (its GPT and filesystem stay as they are: an
    # `rbd bench` write starts at offset 0 and overwrote them, so the guest's writer loop
    # never started). The image is rewritten as the guest's bytes + N MiB of random data,
    # the way scripts/bench-managed.sh grows its raw base; the guest ignores the tail.
    virsh -q destroy "$NAME" >/dev/null
    { rbd export --no-progress "$IMG" -; head -c "$(( DATA_MIB << 20 ))" /dev/urandom; } |
        rbd import --no-progress - "$IMG.grown"
    rbd rm --no-progress "$IMG"
    rbd mv "$IMG.grown" "$IMG"
    virsh -q start "$NAME" >/dev/null
    "$TB/wait-agent.sh" "$NAME" 180
fi
ALLOC=$(rbd du --format json "$IMG" | jq '.images[0].used_size')
echo "  used (rbd du): $ALLOC bytes"
for _ in $(seq 1 50); do [[ -n $(guest_ms 2>/dev/null) ]] && break; sleep 0.2; done
sleep 2
common=(--libvirt --ceph="$CEPH_CONF" --list-ttl-ms 200 --managed-match "^$NAME\$")
"$SNAPFS" mount "${common[@]}" --state-dir "$WORK/sp" --store-pool rbd "$PM"
"$SNAPFS" mount "${common[@]}" --state-dir "$WORK/sf" "$FM"

declare -a T_POOL T_FILE W_POOL W_FILE S_POOL S_FILE
left_snaps=0 left_frozen=0
for i in $(seq 1 "$RUNS"); do
    for kind in pool file; do
        mnt=$PM; [[ $kind == file ]] && mnt=$FM
        a=$(guest_ms 2>/dev/null || echo 0); t0=$(now_ms)
        mkdir "$mnt/instances/$NAME/.snapshots/$kind$i"
        t=$(( $(now_ms) - t0 ))
        left_frozen=$(( left_frozen + $(frozen) ))
        sleep 0.3; w="$a:$(guest_ms 2>/dev/null || echo 0)"
        s=$(jq -r .stall_ms "$mnt/instances/$NAME/.snapshots/$kind$i/snapshot.json")
        [[ $(rbd snap ls --all --format json "$IMG") == "[]" ]] || left_snaps=$(( left_snaps + 1 ))
        if [[ $kind == pool ]]; then T_POOL+=("$t"); W_POOL+=("$w"); S_POOL+=("$s")
        else T_FILE+=("$t"); W_FILE+=("$w"); S_FILE+=("$s"); fi
        rmdir "$mnt/instances/$NAME/.snapshots/$kind$i"
        sleep 0.3
    done
done

"$TB/guest-cat.sh" "$NAME" /data/writer.log > "$WORK/writer.log" 2>/dev/null || : > "$WORK/writer.log"
row() { printf '  %-56s %7s %7s %7s\n' "$1" $(printf '%s\n' "${@:2}" | stats); }
echo
echo "== $RUNS runs each, alternating (ms: median min max); load: $(cut -d' ' -f1-3 /proc/loadavg)"
row "store-pool: mkdir wall (snap, clone, flatten, snap rm)" "${T_POOL[@]}"
row "file store: mkdir wall (push backup of the RBD disk)" "${T_FILE[@]}"
row "store-pool: stall_ms (freeze sent -> thaw returned)" "${S_POOL[@]}"
row "file store: stall_ms" "${S_FILE[@]}"
row "store-pool: longest writer.log gap around the mkdir" $(for w in "${W_POOL[@]}"; do gap "$w"; done)
row "file store: longest writer.log gap around the mkdir" $(for w in "${W_FILE[@]}"; do gap "$w"; done)
row "store-pool: flatten, ms" $(sed -n 's/.*copied into the store pool.* flatten_ms=\([0-9]*\).*/\1/p' "$WORK/sp/snapfs.log")
fl=$(sed -n 's/.*copied into the store pool.* bytes=\([0-9]*\) flatten_ms=\([0-9]*\).*/\1 \2/p' "$WORK/sp/snapfs.log" | sort -k2n | awk '{a[NR]=$0} END {print a[int((NR+1)/2)]}')
awk -v u="$ALLOC" -v f="$fl" 'BEGIN { split(f, x, " "); printf "  flatten rate (median run): %d MiB used of %d MiB virtual in %d ms: %.0f MiB/s of data\n", u / 1048576, x[1] / 1048576, x[2], u / 1048576 / (x[2] / 1000) }'
echo "  source image left with a snapshot after mkdir: $left_snaps of $(( 2 * RUNS )); guests left frozen: $left_frozen"

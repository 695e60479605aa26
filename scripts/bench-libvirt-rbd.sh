#!/usr/bin/env bash
# RBD-backed instance snapshot benchmark (issue 4, scope 3-4). Not a test: it prints numbers.
#
# Usage: scripts/bench-libvirt-rbd.sh [--snapfs BIN] [--runs N] [NAME]
#   NAME   throw-away guest booted from RBD image rbd/NAME-vda (default lvr-bench), removed at
#          the end with its snapshots and clones
# Needs the test bed (scripts/testbed/up.sh) and the loopback Ceph (scripts/ceph/start-ceph.sh).
#
# Alternately, N times each, on the running guest:
#   snapfs mkdir  MNT/instances/NAME/.snapshots/sK   (agent freeze, rbd_snap_create, thaw, record)
#   CLI           virsh domfsfreeze; rbd snap create NAME-vda@cK; virsh domfsthaw  (what Nova's
#                 direct snapshot does, by hand)
# then removes them (snapfs rmdir vs rbd snap rm), and prints median/min/max of each and the
# ratios; then one launch: `ln -s` until the clone runs, and until --flatten-on-launch has
# flattened its 64 MiB disk.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
SNAPFS=$REPO/target/release/snapfs
RUNS=10
while [[ $# -gt 0 ]]; do
    case $1 in
        --snapfs) SNAPFS=$2; shift 2 ;;
        --runs) RUNS=$2; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) echo "unknown option $1" >&2; exit 2 ;;
        *) break ;;
    esac
done
NAME=${1:-lvr-bench}
export LIBVIRT_DEFAULT_URI=qemu:///system
export CEPH_CONF=${CEPH_CONF:-/var/lib/snapfs-ceph/ceph.conf}
WORK=$(mktemp -d /tmp/snapfs-bench-lvrbd.XXXXXX)
MNT=$WORK/mnt
mkdir -p "$MNT"
[[ -x $SNAPFS ]] || (cd "$REPO" && cargo build --release -q)

COPY=$NAME-copy
cleanup() {
    set +e
    "$SNAPFS" unmount --lazy "$MNT" >/dev/null 2>&1
    virsh -q destroy "$COPY" >/dev/null 2>&1; virsh -q undefine "$COPY" >/dev/null 2>&1
    rbd rm --no-progress "rbd/$COPY-vda" >/dev/null 2>&1
    "$REPO/scripts/testbed/rbd-guest.sh" --remove "$NAME" >/dev/null 2>&1
    rm -rf "$WORK"
}
trap cleanup EXIT

"$REPO/scripts/testbed/rbd-guest.sh" --recreate "$NAME" 2>&1 | tail -1
"$SNAPFS" mount --libvirt --ceph "$CEPH_CONF" --quiesce require --flatten-on-launch \
    --state-dir "$WORK/state" "$MNT"
S=$MNT/instances/$NAME/.snapshots

now() { date +%s.%N; }
ms() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.1f", (b - a) * 1000}'; }
declare -a MK_S MK_C RM_S RM_C
for i in $(seq "$RUNS"); do
    t0=$(now); mkdir "$S/s$i"; t1=$(now); MK_S+=("$(ms "$t0" "$t1")")
    t0=$(now)
    virsh -q domfsfreeze "$NAME" >/dev/null
    rbd snap create --no-progress "rbd/$NAME-vda@c$i" >/dev/null || { virsh -q domfsthaw "$NAME"; exit 1; }
    virsh -q domfsthaw "$NAME" >/dev/null
    t1=$(now); MK_C+=("$(ms "$t0" "$t1")")
done
jq -e '.quiesced == true' "$S/s1/snapshot.json" >/dev/null || { echo "snapshot s1 not quiesced" >&2; exit 1; }
for i in $(seq "$RUNS"); do
    t0=$(now); rmdir "$S/s$i"; t1=$(now); RM_S+=("$(ms "$t0" "$t1")")
    t0=$(now); rbd snap rm --no-progress "rbd/$NAME-vda@c$i" >/dev/null; t1=$(now); RM_C+=("$(ms "$t0" "$t1")")
done

stats() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {m = (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2; printf "%8.1f %8.1f %8.1f", m, a[1], a[NR]}'; }
med() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
printf '\n%-44s %8s %8s %8s\n' "ms, $RUNS runs each (alternating)" median min max
printf '%-44s %s\n' "snapfs mkdir (quiesced, record)" "$(stats "${MK_S[@]}")"
printf '%-44s %s\n' "virsh domfsfreeze + rbd snap create + thaw" "$(stats "${MK_C[@]}")"
printf '%-44s %s\n' "snapfs rmdir" "$(stats "${RM_S[@]}")"
printf '%-44s %s\n' "rbd snap rm" "$(stats "${RM_C[@]}")"
awk -v a="$(med "${MK_S[@]}")" -v b="$(med "${MK_C[@]}")" -v c="$(med "${RM_S[@]}")" -v d="$(med "${RM_C[@]}")" \
    'BEGIN {printf "ratios (snapfs / CLI, medians): mkdir %.2f, rmdir %.2f\n", a / b, c / d}'

mkdir "$S/l"
t0=$(now); ln -s "../instances/$NAME/.snapshots/l" "$MNT/launch/$COPY"; t1=$(now)
while rbd info "rbd/$COPY-vda" --format json | jq -e '.parent' >/dev/null; do sleep 0.05; done
t2=$(now)
printf 'launch: ln -s -> clone running %s ms; -> clone flattened %s ms (64 MiB disk)\n' "$(ms "$t0" "$t1")" "$(ms "$t0" "$t2")"

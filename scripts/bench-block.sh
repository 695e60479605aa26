#!/usr/bin/env bash
# Block-device disk benchmark (issue 16, "Figures"). Not a test: it prints numbers.
#
# Usage: scripts/bench-block.sh [--snapfs BIN] [--runs N] [--size-mib N] [NAME]
#   --snapfs BIN    snapfs binary (default: target/release/snapfs, built if missing)
#   --runs N        snapshots (default 3)
#   --size-mib N    size of the loop device given to the guest as vdb (default 1024), filled
#                   with random data so every byte is copied
#   NAME            throw-away guest (default h16-bench), removed at the end
# Needs the test bed (scripts/testbed/up.sh) and a free loop device.
#
# One guest with the test guest's disk as vda and a loop device over a file of N MiB of random
# data as vdb (`<disk type='block'>`, as Nova's lvm backend or an attached Cinder volume gives
# it). Its writer loop appends "<seq> <guest ms>" to /data/writer.log every ~20 ms with sync.
# A block disk is always snapshotted by the copy method (push backup into the store: the active
# device is never switched), so:
#   snapfs:  mkdir .snapshots/bN: freeze, backup start, thaw, wait for the copy of vda and vdb
#   peer:    virsh domfsfreeze; dd of the device (bs=4M) to a file in the same directory as the
#            store; virsh domfsthaw: the guest is frozen for the whole copy
# and prints wall time, the guest's stall (snapshot.json stall_ms, and the longest gap of the
# guest's writer around each mkdir), the copy rate of each.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
TB=$REPO/scripts/testbed
SNAPFS=$REPO/target/release/snapfs
RUNS=3
SIZE_MIB=1024
while [[ $# -gt 0 ]]; do
    case $1 in
        --snapfs) SNAPFS=$2; shift 2 ;;
        --runs) RUNS=$2; shift 2 ;;
        --size-mib) SIZE_MIB=$2; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) echo "unknown option $1" >&2; exit 2 ;;
        *) break ;;
    esac
done
NAME=${1:-h16-bench}
BASE=${SNAPFS_TESTBED_DIR:-/var/lib/snapfs-testbed}
export LIBVIRT_DEFAULT_URI=qemu:///system
WORK=$(mktemp -d /var/tmp/h16-bench-block.XXXXXX)
MNT=$WORK/mnt
mkdir -p "$MNT" "$WORK/state"
[[ -x $SNAPFS ]] || (cd "$REPO" && cargo build --release -q)
DEV=''

remove_domain() {
    virsh -q destroy "$1" >/dev/null 2>&1 || true
    virsh -q undefine "$1" >/dev/null 2>&1 || true
    rm -f "/var/log/snapfs-testbed/$1.console.log"
}
cleanup() {
    "$SNAPFS" unmount --lazy "$MNT" >/dev/null 2>&1 || true
    remove_domain "$NAME"
    [[ -n $DEV ]] && losetup -d "$DEV" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'echo "bench-block: failed at line $LINENO: $BASH_COMMAND" >&2' ERR

source "$REPO/scripts/bench-guest-lib.sh"

echo "== guest $NAME: vda the test disk, vdb a loop device of $SIZE_MIB MiB random data"
remove_domain "$NAME"
qemu-img convert -O qcow2 "$BASE/guest/demo-disk.qcow2" "$WORK/vda.qcow2"
dd if=/dev/urandom of="$WORK/vdb.img" bs=1M count="$SIZE_MIB" status=none
DEV=$(losetup -f --show "$WORK/vdb.img")
echo "  vdb: $DEV"
"$TB/define-guest.sh" "$NAME" "$BASE/guest" "$WORK/vda.qcow2" >/dev/null
virsh -q attach-disk "$NAME" "$DEV" vdb --config --sourcetype block --targetbus virtio \
    --driver qemu --subdriver raw >/dev/null
virsh -q start "$NAME" >/dev/null
"$TB/wait-agent.sh" "$NAME" 180
until [[ -n $(guest_ms) ]]; do sleep 0.2; done
sleep 2
"$SNAPFS" mount --libvirt --state-dir "$WORK/state" --list-ttl-ms 200 "$MNT"
INST=$MNT/instances/$NAME
jq -c '.disks[] | {target, size, block_device}' "$INST/instance.json"

declare -a T_SNAP W_SNAP STALL RATE
left_frozen=0
idle_a=$(guest_ms); sleep 2; idle_b=$(guest_ms)
for i in $(seq 1 "$RUNS"); do
    a=$(guest_ms); t0=$(now_ms)
    mkdir "$INST/.snapshots/b$i"
    T_SNAP+=($(( $(now_ms) - t0 )))
    left_frozen=$(( left_frozen + $(frozen) ))
    sleep 0.3; W_SNAP+=("$a:$(guest_ms)")
    sj=$INST/.snapshots/b$i/snapshot.json
    STALL+=("$(jq -r .stall_ms "$sj")")
    [[ $(jq -r .method "$sj") == copy ]] || { echo "b$i: method $(jq -r .method "$sj"), not copy" >&2; exit 1; }
    rmdir "$INST/.snapshots/b$i"
    sleep 0.5
done

# The peer: the guest frozen for a dd of the device.
a=$(guest_ms)
t0=$(now_ms)
virsh -q domfsfreeze "$NAME" >/dev/null
t1=$(now_ms)
dd if="$DEV" of="$WORK/peer.raw" bs=4M status=none
t2=$(now_ms)
virsh -q domfsthaw "$NAME" >/dev/null
t3=$(now_ms)
sleep 0.3
W_PEER="$a:$(guest_ms)"

"$TB/guest-cat.sh" "$NAME" /data/writer.log > "$WORK/writer.log"
row() { printf '  %-54s %7s %7s %7s\n' "$1" $(printf '%s\n' "${@:2}" | stats); }
echo
echo "== $RUNS snapshots (ms: median min max); load: $(cut -d' ' -f1-3 /proc/loadavg)"
row "snapfs mkdir wall time (vda + ${SIZE_MIB} MiB vdb copied)" "${T_SNAP[@]}"
row "snapfs stall_ms (freeze sent -> thaw returned)" "${STALL[@]}"
# The stall's parts, from the daemon's log: the freeze (agent round trip), libvirt's
# virDomainBackupBegin, and the thaw.
FRZ=($(sed -n 's/.*backup job started.* freeze_ms=\([0-9]*\).*/\1/p' "$WORK/state/snapfs.log"))
BEG=($(sed -n 's/.*backup job started.* begin_ms=\([0-9]*\).*/\1/p' "$WORK/state/snapfs.log"))
THAW=($(sed -n 's/.*backup job started.* thaw_ms=\([0-9]*\).*/\1/p' "$WORK/state/snapfs.log"))
row "  of which freeze (guest agent), ms" "${FRZ[@]}"
row "  of which virDomainBackupBegin, ms" "${BEG[@]}"
row "  of which thaw (guest agent), ms" "${THAW[@]}"
row "snapfs: longest writer.log gap around the mkdir" $(for w in "${W_SNAP[@]}"; do gap "$w"; done)
printf '  %-54s %7s\n' "idle: longest gap in 2 s without snapshots" "$(gap "$idle_a:$idle_b")"
echo "  guests left frozen after a snapshot: $left_frozen of $RUNS"
read -r tm _ _ < <(printf '%s\n' "${T_SNAP[@]}" | stats)
awk -v mib="$SIZE_MIB" -v ms="$tm" 'BEGIN { printf "  snapfs copy rate (vdb only counted): %.0f MiB/s\n", mib / (ms / 1000) }'
echo
echo "== peer: virsh domfsfreeze; dd bs=4M of $DEV; virsh domfsthaw"
awk -v mib="$SIZE_MIB" -v f=$((t1 - t0)) -v d=$((t2 - t1)) -v th=$((t3 - t2)) \
    'BEGIN { printf "  freeze %d ms, dd %d ms (%.0f MiB/s), thaw %d ms: guest frozen %d ms\n", f, d, mib / (d / 1000), th, f + d + th }'
printf '  %-54s %7s\n' "peer: longest writer.log gap" "$(gap "$W_PEER")"

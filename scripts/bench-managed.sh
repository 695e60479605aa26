#!/usr/bin/env bash
# Copy-method benchmark (issue 13, "Figures"). Not a test: it prints numbers.
#
# Usage: scripts/bench-managed.sh [--snapfs BIN] [--runs N] [--data-mib N] [NAME]
#   --snapfs BIN    snapfs binary (default: target/release/snapfs, built if missing)
#   --runs N        snapshots per method (default 5)
#   --data-mib N    random data appended after the guest's 64 MiB disk (default 1024: the
#                   guest's disk itself holds only ~1 MiB of data)
#   NAME            throw-away guest (default h13-bench), removed at the end
# Needs the test bed (scripts/testbed/up.sh).
#
# One guest whose vda is a 2 GiB qcow2 over a raw base (the test guest's disk + N MiB of random
# data: 1 GiB allocated), its writer loop appending "<seq> <guest ms>" to /data/writer.log
# every ~20 ms with sync. Two snapfs mounts of the same libvirtd: one where the guest is managed
# (--managed-match) and one where it is not (--managed=never). Alternately, N times each:
#   copy:     mkdir in the managed mount (freeze, push backup start, thaw, wait for the copy)
#   external: mkdir in the unmanaged mount (freeze, external disk-only snapshot, thaw)
#   virsh:    virsh snapshot-create-as --disk-only --atomic --quiesce
# and prints wall times, the guest's longest write gap around each snapshot, the copy method's
# own stall (snapshot.json stall_ms: freeze sent -> thaw returned), the copy rate, the store
# space against the allocated bytes, and the peer: `qemu-img convert -U -O qcow2` of the disk
# while the guest is frozen (freeze, convert, thaw: the stall is the whole copy).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
TB=$REPO/scripts/testbed
SNAPFS=$REPO/target/release/snapfs
RUNS=5
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
NAME=${1:-h13-bench}
BASE=${SNAPFS_TESTBED_DIR:-/var/lib/snapfs-testbed}
export LIBVIRT_DEFAULT_URI=qemu:///system
WORK=$(mktemp -d /tmp/h13-bench-managed.XXXXXX)
MM=$WORK/managed UM=$WORK/unmanaged
mkdir -p "$MM" "$UM" "$WORK/sm" "$WORK/su"
[[ -x $SNAPFS ]] || (cd "$REPO" && cargo build --release -q)

remove_domain() {
    virsh -q destroy "$1" >/dev/null 2>&1 || true
    for s in $(virsh -q snapshot-list "$1" --name 2>/dev/null); do
        virsh -q snapshot-delete "$1" "$s" --metadata >/dev/null 2>&1 || true
    done
    virsh -q undefine "$1" >/dev/null 2>&1 || true
    rm -f "/var/log/snapfs-testbed/$1.console.log"
}
cleanup() {
    "$SNAPFS" unmount --lazy "$MM" >/dev/null 2>&1 || true
    "$SNAPFS" unmount --lazy "$UM" >/dev/null 2>&1 || true
    remove_domain "$NAME"
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'echo "bench-managed: failed at line $LINENO: $BASH_COMMAND" >&2' ERR

source "$REPO/scripts/bench-guest-lib.sh"

echo "== guest $NAME: 2 GiB qcow2 over a raw base with $(( 64 + DATA_MIB )) MiB of data"
remove_domain "$NAME"
qemu-img convert -O raw "$BASE/guest/demo-disk.qcow2" "$WORK/base.raw"
dd if=/dev/urandom of="$WORK/base.raw" bs=1M count="$DATA_MIB" oflag=append conv=notrunc status=none
qemu-img create -q -f qcow2 -b "$WORK/base.raw" -F raw "$WORK/disk.qcow2" 2G
ALLOC=$(qemu-img map --output=json "$WORK/disk.qcow2" | jq '[.[] | select(.data) | .length] | add')
echo "  allocated (qemu-img map, data): $ALLOC bytes"
"$TB/define-guest.sh" --start "$NAME" "$BASE/guest" "$WORK/disk.qcow2" >/dev/null
"$TB/wait-agent.sh" "$NAME" 180
until [[ -n $(guest_ms) ]]; do sleep 0.2; done
sleep 2
"$SNAPFS" mount --libvirt --state-dir "$WORK/sm" --list-ttl-ms 200 --managed-match "^$NAME\$" "$MM"
"$SNAPFS" mount --libvirt --state-dir "$WORK/su" --list-ttl-ms 200 --managed=never "$UM"

declare -a T_COPY T_EXT T_VIRSH W_COPY W_EXT W_VIRSH STALL STORE
left_frozen=0
idle_a=$(guest_ms); sleep 2; idle_b=$(guest_ms)
for i in $(seq 1 "$RUNS"); do
    a=$(guest_ms); t0=$(now_ms)
    mkdir "$MM/instances/$NAME/.snapshots/c$i"
    T_COPY+=($(( $(now_ms) - t0 )))
    left_frozen=$(( left_frozen + $(frozen) ))
    sleep 0.3; W_COPY+=("$a:$(guest_ms)")
    STALL+=("$(jq -r .stall_ms "$MM/instances/$NAME/.snapshots/c$i/snapshot.json")")
    STORE+=("$(du -sB1 "$WORK/sm/store" | cut -f1)")
    rmdir "$MM/instances/$NAME/.snapshots/c$i"
    sleep 0.3
    a=$(guest_ms); t0=$(now_ms)
    mkdir "$UM/instances/$NAME/.snapshots/e$i"
    T_EXT+=($(( $(now_ms) - t0 )))
    left_frozen=$(( left_frozen + $(frozen) ))
    sleep 0.3; W_EXT+=("$a:$(guest_ms)")
    sleep 0.3
    a=$(guest_ms); t0=$(now_ms)
    virsh -q snapshot-create-as "$NAME" "v$i" --disk-only --atomic --quiesce >/dev/null
    T_VIRSH+=($(( $(now_ms) - t0 )))
    left_frozen=$(( left_frozen + $(frozen) ))
    sleep 0.3; W_VIRSH+=("$a:$(guest_ms)")
    sleep 0.3
done

"$TB/guest-cat.sh" "$NAME" /data/writer.log > "$WORK/writer.log"
row() { printf '  %-52s %7s %7s %7s\n' "$1" $(printf '%s\n' "${@:2}" | stats); }
echo
echo "== snapshot wall time, $RUNS runs each, alternating (ms: median min max); load: $(cut -d' ' -f1-3 /proc/loadavg)"
row "copy: mkdir, managed (push backup, $(( ALLOC >> 20 )) MiB copied)" "${T_COPY[@]}"
row "external: mkdir, unmanaged" "${T_EXT[@]}"
row "virsh snapshot-create-as --disk-only --quiesce" "${T_VIRSH[@]}"
echo "  raw ms copy: ${T_COPY[*]}"
echo
echo "== guest stall"
row "copy: stall_ms (freeze sent -> thaw returned)" "${STALL[@]}"
row "copy: of which freeze (agent), ms" $(sed -n 's/.*backup job started.* freeze_ms=\([0-9]*\).*/\1/p' "$WORK/sm/snapfs.log")
row "copy: of which virDomainBackupBegin, ms" $(sed -n 's/.*backup job started.* begin_ms=\([0-9]*\).*/\1/p' "$WORK/sm/snapfs.log")
row "copy: of which thaw (agent), ms" $(sed -n 's/.*backup job started.* thaw_ms=\([0-9]*\).*/\1/p' "$WORK/sm/snapfs.log")
row "copy: longest writer.log gap around the mkdir" $(for w in "${W_COPY[@]}"; do gap "$w"; done)
row "external: longest writer.log gap" $(for w in "${W_EXT[@]}"; do gap "$w"; done)
row "virsh --quiesce: longest writer.log gap" $(for w in "${W_VIRSH[@]}"; do gap "$w"; done)
printf '  %-52s %7s\n' "idle: longest gap in 2 s without snapshots" "$(gap "$idle_a:$idle_b")"
echo "  guests left frozen after a snapshot: $left_frozen of $(( 3 * RUNS ))"
echo
read -r cm _ _ < <(printf '%s\n' "${T_COPY[@]}" | stats)
echo "== copy rate and space"
awk -v b="$ALLOC" -v ms="$cm" 'BEGIN { printf "  copy method: %d MiB allocated in %d ms (median): %.0f MiB/s\n", b / 1048576, ms, b / 1048576 / (ms / 1000) }'
echo "  store bytes (du) after each mkdir: ${STORE[*]} (allocated: $ALLOC)"
# The peer: a copy of the disk while the guest stays frozen.
virsh -q domfsfreeze "$NAME" >/dev/null
t0=$(now_ms)
qemu-img convert -U -O qcow2 "$(virsh -q domblklist "$NAME" --details | awk '$3 == "vda" {print $4}')" "$WORK/peer.qcow2"
t_peer=$(( $(now_ms) - t0 ))
virsh -q domfsthaw "$NAME" >/dev/null
t_stall=$(( $(now_ms) - t0 ))
awk -v b="$ALLOC" -v ms="$t_peer" -v st="$t_stall" 'BEGIN { printf "  peer: freeze; qemu-img convert -U -O qcow2: %d ms (%.0f MiB/s); guest frozen %d ms\n", ms, b / 1048576 / (ms / 1000), st }'
echo "  peer output: $(du -sB1 "$WORK/peer.qcow2" | cut -f1) bytes"

#!/usr/bin/env bash
# Instance snapshot benchmark (issue 3, "Figures"). Not a test: it prints numbers.
#
# Usage: scripts/bench-libvirt.sh [--snapfs BIN] [--runs N] [--launches N] [NAME]
#   --snapfs BIN   snapfs binary (default: target/release/snapfs, built if missing)
#   --runs N       snapshots per method (default 10)
#   --launches N   launches to time (default 2)
#   NAME           throw-away guest (default lv-bench); it and its clones are removed at the end
# Needs the test bed (scripts/testbed/up.sh: libvirtd running, guest built).
#
# On one fresh guest whose writer loop appends "<seq> <guest monotonic ms>" to /data/writer.log
# every ~20 ms (with sync), alternately, N times each:
#   snapfs: mkdir MNT/instances/NAME/.snapshots/sK     (quiesce prefer: agent freeze, external
#           disk-only atomic snapshot, thaw)
#   virsh:  virsh snapshot-create-as NAME vK --disk-only --atomic --quiesce
# and prints the median / min / max wall time of each, their ratio (snapfs / virsh), the longest
# gap between two writer.log lines around each snapshot (guest write stall; median and max over
# the runs, next to the longest gap of an idle stretch), whether any snapshot left the guest
# frozen, then the time from `ln -s` (launch) to the clone running (the symlink call returns
# once libvirt reports it running) and to its guest agent answering.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
TB=$REPO/scripts/testbed
SNAPFS=$REPO/target/release/snapfs
RUNS=10
LAUNCHES=2
while [[ $# -gt 0 ]]; do
    case $1 in
        --snapfs) SNAPFS=$2; shift 2 ;;
        --runs) RUNS=$2; shift 2 ;;
        --launches) LAUNCHES=$2; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) echo "unknown option $1" >&2; exit 2 ;;
        *) break ;;
    esac
done
NAME=${1:-lv-bench}
BASE=${SNAPFS_TESTBED_DIR:-/var/lib/snapfs-testbed}
export LIBVIRT_DEFAULT_URI=qemu:///system
WORK=$(mktemp -d /tmp/snapfs-bench-libvirt.XXXXXX)
MNT=$WORK/mnt
mkdir -p "$MNT" "$WORK/state"

if [[ ! -x $SNAPFS ]]; then
    (cd "$REPO" && cargo build --release -q)
fi

remove_domain() {
    local n=$1
    virsh -q destroy "$n" >/dev/null 2>&1 || true
    for s in $(virsh -q snapshot-list "$n" --name 2>/dev/null); do
        virsh -q snapshot-delete "$n" "$s" --metadata >/dev/null 2>&1 || true
    done
    virsh -q undefine "$n" --nvram >/dev/null 2>&1 || virsh -q undefine "$n" >/dev/null 2>&1 || true
    rm -f "$BASE/images/$n".* "$BASE/run/$n.ctl" "/var/log/snapfs-testbed/$n.console.log"
}
CLONES=()
cleanup() {
    "$SNAPFS" unmount --lazy "$MNT" >/dev/null 2>&1 || true
    for c in "${CLONES[@]}"; do remove_domain "$c"; done
    remove_domain "$NAME"
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'echo "bench-libvirt: failed at line $LINENO: $BASH_COMMAND" >&2' ERR

source "$REPO/scripts/bench-guest-lib.sh"

echo "== guest $NAME (fresh), snapfs $SNAPFS"
remove_domain "$NAME"
"$TB/define-guest.sh" --start "$NAME" "$BASE/guest" >/dev/null
"$TB/wait-agent.sh" "$NAME" 120
until [[ -n $(guest_ms) ]]; do sleep 0.2; done
sleep 2
"$SNAPFS" mount --libvirt --state-dir "$WORK/state" --list-ttl-ms 200 "$MNT"

declare -a T_SNAPFS T_VIRSH WIN_SNAPFS WIN_VIRSH
left_frozen=0
idle_a=$(guest_ms); sleep 2; idle_b=$(guest_ms)
for i in $(seq 1 "$RUNS"); do
    a=$(guest_ms); t0=$(now_ms)
    mkdir "$MNT/instances/$NAME/.snapshots/s$i"
    T_SNAPFS+=($(( $(now_ms) - t0 )))
    left_frozen=$(( left_frozen + $(frozen) ))
    sleep 0.3; WIN_SNAPFS+=("$a:$(guest_ms)")
    sleep 0.3
    a=$(guest_ms); t0=$(now_ms)
    virsh -q snapshot-create-as "$NAME" "v$i" --disk-only --atomic --quiesce >/dev/null
    T_VIRSH+=($(( $(now_ms) - t0 )))
    left_frozen=$(( left_frozen + $(frozen) ))
    sleep 0.3; WIN_VIRSH+=("$a:$(guest_ms)")
    sleep 0.3
done

"$TB/guest-cat.sh" "$NAME" /data/writer.log > "$WORK/writer.log"
read -r sm smin smax < <(printf '%s\n' "${T_SNAPFS[@]}" | stats)
read -r vm vmin vmax < <(printf '%s\n' "${T_VIRSH[@]}" | stats)
read -r gsm _ gsmax < <(for w in "${WIN_SNAPFS[@]}"; do gap "$w"; done | stats)
read -r gvm _ gvmax < <(for w in "${WIN_VIRSH[@]}"; do gap "$w"; done | stats)
idle=$(gap "$idle_a:$idle_b")

echo
echo "== quiesced snapshot latency, $RUNS runs each, alternating (ms: median min max)"
printf '  %-58s %6s %6s %6s\n' "snapfs mkdir .snapshots/sK" "$sm" "$smin" "$smax"
printf '  %-58s %6s %6s %6s\n' "virsh snapshot-create-as --disk-only --atomic --quiesce" "$vm" "$vmin" "$vmax"
awk -v s="$sm" -v v="$vm" 'BEGIN { printf "  ratio snapfs / virsh (medians): %.2f\n", s / v }'
echo "  raw ms snapfs: ${T_SNAPFS[*]}"
echo "  raw ms virsh:  ${T_VIRSH[*]}"
echo
echo "== guest write stall: longest gap between writer.log lines around a snapshot (ms)"
printf '  %-10s median %5s  max %5s\n' snapfs "$gsm" "$gsmax" virsh "$gvm" "$gvmax"
printf '  %-10s %5s (2 s without snapshots)\n' idle "$idle"
echo "  guests left frozen after a snapshot: $left_frozen of $(( 2 * RUNS ))"

echo
echo "== launch: ln -s .snapshots/s1 launch/<new> (ms)"
for j in $(seq 1 "$LAUNCHES"); do
    c="$NAME-l$j"
    remove_domain "$c"
    CLONES+=("$c")
    t0=$(now_ms)
    ln -s "../instances/$NAME/.snapshots/s1" "$MNT/launch/$c"
    t_ln=$(( $(now_ms) - t0 ))
    st=$(virsh -q domstate "$c" | head -1)
    "$TB/wait-agent.sh" "$c" 120 2>/dev/null
    t_agent=$(( $(now_ms) - t0 ))
    echo "  $c: ln -s returned after $t_ln ms (state then: $st); guest agent answering after $t_agent ms"
    remove_domain "$c"
done

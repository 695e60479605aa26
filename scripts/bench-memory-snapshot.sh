#!/usr/bin/env bash
# Memory snapshot benchmark (issue 14, "Figures"). Not a test: it prints numbers.
#
# Usage (as root): scripts/bench-memory-snapshot.sh [--snapfs BIN] [--runs N] [--rbd] [NAME]
#   --snapfs BIN   snapfs binary (default: target/release/snapfs, built if missing)
#   --runs N       snapshots and reverts per method (default 3)
#   --rbd          the guest boots from RBD (rbd-guest.sh; needs the loopback Ceph). snapfs
#                  pauses it, has libvirt save the memory, takes the RBD snapshot, resumes it;
#                  the peer does the same by hand: virsh suspend, virsh snapshot-create
#                  --no-metadata (memory only, vda snapshot='no'), rbd snap create, virsh
#                  resume; its revert: virsh destroy, rbd snap rollback, virsh restore --running
#   NAME           throw-away guest (default issue-14m-bench); removed at the end
# Needs the test bed (scripts/testbed/up.sh). Hold /tmp/snapfs-guest.lock while it runs.
#
# On one fresh TCG guest (RAM size printed) whose writer loop appends "<seq> <guest monotonic
# ms>" to /data/writer.log every ~20 ms, alternately, N times each:
#   snapfs: mkdir MNT/instances/NAME/.snapshots/mK   (user.snapfs.memory=on: live external
#           memory snapshot, no quiesce)
#   virsh:  virsh snapshot-create-as NAME vK --memspec FILE,snapshot=external
#           --diskspec vda,snapshot=external,file=... --live --atomic
# printing the wall time of each and the guest stall (longest gap between two writer.log lines
# around the snapshot, next to an idle stretch's); then, the guest running, the revert to such a
# snapshot: `ln -sfn .snapshots/mK current` (a mount with --revert-keep=no, so both sides do
# the same work; one more with the default keep, which first takes a before-revert memory
# snapshot) vs `virsh snapshot-revert NAME vK --running`.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
TB=$REPO/scripts/testbed
SNAPFS=$REPO/target/release/snapfs
RUNS=3
RBD=0
while [[ $# -gt 0 ]]; do
    case $1 in
        --snapfs) SNAPFS=$2; shift 2 ;;
        --runs) RUNS=$2; shift 2 ;;
        --rbd) RBD=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) echo "unknown option $1" >&2; exit 2 ;;
        *) break ;;
    esac
done
NAME=${1:-issue-14m-bench}
BASE=${SNAPFS_TESTBED_DIR:-/var/lib/snapfs-testbed}
export LIBVIRT_DEFAULT_URI=qemu:///system
WORK=$(mktemp -d /tmp/snapfs-bench-memsnap.XXXXXX)
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
export CEPH_CONF=${CEPH_CONF:-/var/lib/snapfs-ceph/ceph.conf}
cleanup() {
    "$SNAPFS" unmount --lazy "$MNT" >/dev/null 2>&1 || true
    remove_domain "$NAME"
    if [[ $RBD == 1 ]]; then
        "$TB/rbd-guest.sh" --remove "$NAME" >/dev/null 2>&1 || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'echo "bench-memory-snapshot: failed at line $LINENO: $BASH_COMMAND" >&2' ERR

source "$REPO/scripts/bench-guest-lib.sh"

CEPH_ARGS=()
[[ $RBD == 1 ]] && CEPH_ARGS=(--ceph "$CEPH_CONF")
mount_snapfs() {  # mount_snapfs [EXTRA ARGS]: (re)mount MNT
    "$SNAPFS" unmount "$MNT" >/dev/null 2>&1 || true
    "$SNAPFS" mount --libvirt "${CEPH_ARGS[@]}" --state-dir "$WORK/state" --list-ttl-ms 200 "$@" "$MNT"
}
# The peer's memory snapshot vK and its revert.
virsh_snapshot() {  # virsh_snapshot K
    if [[ $RBD == 1 ]]; then
        local p0; p0=$(now_ms)
        virsh -q suspend "$NAME" >/dev/null
        printf '%s' "<domainsnapshot><name>v$1</name><memory snapshot='external' file='$WORK/v$1.mem'/><disks><disk name='vda' snapshot='no'/></disks></domainsnapshot>" > "$WORK/v$1.xml"
        virsh -q snapshot-create "$NAME" "$WORK/v$1.xml" --no-metadata >/dev/null
        rbd snap create --no-progress "rbd/$NAME-vda@v$1"
        virsh -q resume "$NAME" >/dev/null
        echo $(( $(now_ms) - p0 )) >> "$WORK/peer-paused"
    else
        virsh -q snapshot-create-as "$NAME" "v$1" \
            --memspec "file=$BASE/images/$NAME.v$1.mem,snapshot=external" \
            --diskspec "vda,snapshot=external,file=$BASE/images/$NAME.v$1.vda.qcow2" \
            --live --atomic >/dev/null
    fi
}
virsh_mem_file() { if [[ $RBD == 1 ]]; then echo "$WORK/v$1.mem"; else echo "$BASE/images/$NAME.v$1.mem"; fi; }
virsh_revert() {  # virsh_revert K
    if [[ $RBD == 1 ]]; then
        local p0 p1 p2
        p0=$(now_ms)
        virsh -q destroy "$NAME" >/dev/null
        p1=$(now_ms)
        rbd snap rollback --no-progress "rbd/$NAME-vda@v$1"
        p2=$(now_ms)
        virsh -q restore "$WORK/v$1.mem" --running >/dev/null
        echo "v$1 destroy=$((p1 - p0)) rollback=$((p2 - p1)) restore=$(( $(now_ms) - p2 ))" >> "$WORK/peer-steps"
    else
        virsh -q snapshot-revert "$NAME" "v$1" --running >/dev/null
    fi
}
running() { [[ $(virsh -q domstate "$NAME" | head -1) == running ]]; }

echo "== guest $NAME (fresh), snapfs $SNAPFS, host load $(cut -d' ' -f1-3 /proc/loadavg)"
remove_domain "$NAME"
if [[ $RBD == 1 ]]; then
    "$TB/rbd-guest.sh" --recreate "$NAME" >/dev/null
else
    "$TB/define-guest.sh" --start "$NAME" "$BASE/guest" >/dev/null
fi
"$TB/wait-agent.sh" "$NAME" 120
until [[ -n $(guest_ms) ]]; do sleep 0.2; done
sleep 2
echo "  guest RAM: $(virsh -q dominfo "$NAME" | awk '/^Max memory/ {print $3 / 1024 " MiB"}'), 1 vcpu, TCG"
mount_snapfs
DIR=$MNT/instances/$NAME
setfattr -n user.snapfs.memory -v on "$DIR"

declare -a T_SNAPFS T_VIRSH WIN_SNAPFS WIN_VIRSH SZ_SNAPFS SZ_VIRSH
idle_a=$(guest_ms); sleep 2; idle_b=$(guest_ms)
for i in $(seq 1 "$RUNS"); do
    a=$(guest_ms); t0=$(now_ms)
    mkdir "$DIR/.snapshots/m$i"
    T_SNAPFS+=($(( $(now_ms) - t0 )))
    sleep 0.5; WIN_SNAPFS+=("$a:$(guest_ms)")
    SZ_SNAPFS+=($(jq .memory_size "$DIR/.snapshots/m$i/snapshot.json"))
    running || { echo "guest not running after mkdir m$i" >&2; exit 1; }
    sleep 0.5
    a=$(guest_ms); t0=$(now_ms)
    virsh_snapshot "$i"
    T_VIRSH+=($(( $(now_ms) - t0 )))
    sleep 0.5; WIN_VIRSH+=("$a:$(guest_ms)")
    SZ_VIRSH+=($(stat -c %s "$(virsh_mem_file "$i")"))
    sleep 0.5
done
"$TB/guest-cat.sh" "$NAME" /data/writer.log > "$WORK/writer.log"

read -r sm smin smax < <(printf '%s\n' "${T_SNAPFS[@]}" | stats)
read -r vm vmin vmax < <(printf '%s\n' "${T_VIRSH[@]}" | stats)
read -r gsm _ gsmax < <(for w in "${WIN_SNAPFS[@]}"; do gap "$w"; done | stats)
read -r gvm _ gvmax < <(for w in "${WIN_VIRSH[@]}"; do gap "$w"; done | stats)
idle=$(gap "$idle_a:$idle_b")
echo
echo "== memory snapshot of the running guest, $RUNS runs each, alternating (ms: median min max)"
printf '  %-70s %6s %6s %6s\n' "snapfs mkdir .snapshots/mK (memory=on)" "$sm" "$smin" "$smax"
if [[ $RBD == 1 ]]; then PEER="virsh suspend; snapshot-create --no-metadata (memory); rbd snap create; resume"; else PEER="virsh snapshot-create-as --memspec --diskspec --live --atomic"; fi
printf '  %-70s %6s %6s %6s\n' "$PEER" "$vm" "$vmin" "$vmax"
awk -v s="$sm" -v v="$vm" 'BEGIN { printf "  ratio snapfs / virsh (medians): %.2f\n", s / v }'
echo "  raw ms snapfs: ${T_SNAPFS[*]}; memory state bytes: ${SZ_SNAPFS[*]}"
echo "  raw ms virsh:  ${T_VIRSH[*]}; memory state bytes: ${SZ_VIRSH[*]}"
echo "== guest stall: longest gap between writer.log lines around a snapshot (ms)"
printf '  %-10s median %5s  max %5s\n' snapfs "$gsm" "$gsmax" virsh "$gvm" "$gvmax"
printf '  %-10s %5s (2 s without snapshots)\n' idle "$idle"
if [[ $RBD == 1 ]]; then
    # The guest's clock stands still while its vCPUs are paused, so writer.log shows no gap:
    # the stall is the pause, as the host sees it.
    echo "== guest stall of the RBD method: vCPUs paused (host side, ms)"
    echo "  snapfs (paused_ms in its log): $(grep -o 'paused_ms=[0-9]*' "$WORK/state/snapfs.log" | cut -d= -f2 | tr '\n' ' ')"
    echo "  peer (virsh suspend .. virsh resume returned): $(tr '\n' ' ' < "$WORK/peer-paused")"
fi

# Reverts of the running guest, alternating: snapfs without a before-revert snapshot (the same
# work as virsh), then virsh.
mount_snapfs --revert-keep=no
declare -a R_SNAPFS R_VIRSH
for i in $(seq 1 "$RUNS"); do
    t0=$(now_ms)
    ln -sfn ".snapshots/m$i" "$DIR/current"
    R_SNAPFS+=($(( $(now_ms) - t0 )))
    running || { echo "guest not running after the revert to m$i" >&2; exit 1; }
    sleep 1
    t0=$(now_ms)
    virsh_revert "$i"
    R_VIRSH+=($(( $(now_ms) - t0 )))
    running || { echo "guest not running after virsh's revert to v$i" >&2; exit 1; }
    sleep 1
done
mount_snapfs
setfattr -n user.snapfs.memory -v on "$DIR"
t0=$(now_ms)
ln -sfn .snapshots/m1 "$DIR/current"
r_keep=$(( $(now_ms) - t0 ))
read -r rsm rsmin rsmax < <(printf '%s\n' "${R_SNAPFS[@]}" | stats)
read -r rvm rvmin rvmax < <(printf '%s\n' "${R_VIRSH[@]}" | stats)
echo
echo "== revert of the running guest to a memory snapshot, $RUNS runs each (ms: median min max)"
printf '  %-70s %6s %6s %6s\n' "snapfs ln -sfn .snapshots/mK current (--revert-keep=no)" "$rsm" "$rsmin" "$rsmax"
if [[ $RBD == 1 ]]; then RPEER="virsh destroy; rbd snap rollback; virsh restore --running"; else RPEER="virsh snapshot-revert vK --running"; fi
printf '  %-70s %6s %6s %6s\n' "$RPEER" "$rvm" "$rvmin" "$rvmax"
awk -v s="$rsm" -v v="$rvm" 'BEGIN { printf "  ratio snapfs / virsh (medians): %.2f\n", s / v }'
echo "  raw ms snapfs: ${R_SNAPFS[*]}"
echo "  raw ms virsh:  ${R_VIRSH[*]}"
echo "  snapfs with the default --revert-keep=yes (a before-revert memory snapshot first): $r_keep ms"
# Where snapfs's revert time goes: its steps as the daemon logged them (RBD), and the whole
# revert (check_ms + ms) against the ln -sfn's wall time above.
echo "  snapfs steps (daemon log, ms):"
grep -E 'rbd revert steps|reverted' "$WORK/state/snapfs.log" | sed -E 's/^.*(snapshot=|snap=)/    \1/' || true
if [[ -f $WORK/peer-steps ]]; then
    echo "  peer steps (ms):"
    sed 's/^/    /' "$WORK/peer-steps"
fi
[[ -n ${KEEP_LOG:-} ]] && cp "$WORK/state/snapfs.log" "$KEEP_LOG"
echo "  host load after: $(cut -d' ' -f1-3 /proc/loadavg)"

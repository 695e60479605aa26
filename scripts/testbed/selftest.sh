#!/bin/bash
# selftest.sh [--keep] [NAME=tb-selftest]: check the test bed end to end on a throw-away domain
# and print the numbers: boot to agent, freeze/thaw, quiesced and crash-consistent external
# snapshots (ext4 state of each snapshot's image, guest write stall), agent kill/restart, snapshot
# delete. The domain is destroyed and undefined at the end unless --keep.
# Needs libvirtd running and the guest built (up.sh does both).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
KEEP=0
[[ ${1:-} == --keep ]] && { KEEP=1; shift; }
NAME=${1:-tb-selftest}
BASE=${SNAPFS_TESTBED_DIR:-/var/lib/snapfs-testbed}
export LIBVIRT_DEFAULT_URI=${LIBVIRT_DEFAULT_URI:-qemu:///system}
WORK=$(mktemp -d /tmp/snapfs-selftest.XXXXXX)
PASS=0 FAIL=0
cleanup() {
    rm -rf "$WORK"
    if [[ $KEEP == 0 ]]; then
        virsh -q destroy "$NAME" >/dev/null 2>&1 || true
        "$HERE/define-guest.sh" --recreate "$NAME" "$BASE/guest" >/dev/null 2>&1 || true
        virsh -q undefine "$NAME" >/dev/null 2>&1 || true
        rm -f "$BASE/images/$NAME.qcow2"
    fi
}
trap cleanup EXIT

now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
ok()   { PASS=$((PASS + 1)); echo "  ok   $*"; }
bad()  { FAIL=$((FAIL + 1)); echo "  FAIL $*"; }
ga()   { virsh -q qemu-agent-command "$NAME" "$1" --timeout "${2:-10}"; }
timed() {  # timed VAR CMD...: run CMD, store elapsed ms in VAR, return CMD's status
    local __v=$1; shift
    local t0 rc=0
    t0=$(now_ms)
    "$@" >"$WORK/out" 2>&1 || rc=$?
    printf -v "$__v" '%d' $(( $(now_ms) - t0 ))
    return $rc
}
guest_last_ms() { "$HERE/guest-exec.sh" "$NAME" 'tail -n 1 /data/writer.log' | awk '{print $2}'; }
max_gap() {  # max_gap FROM_MS TO_MS: longest gap between consecutive writer.log lines in window
    "$HERE/guest-cat.sh" "$NAME" /data/writer.log |
        awk -v a="$1" -v b="$2" '$2 >= a && $2 <= b { if (p && $2 - p > m) m = $2 - p; p = $2; n++ }
                                 END { printf "%d ms max gap over %d lines", m, n }'
}
ext4_state() {  # ext4_state IMAGE: features of partition 1 (whole chain read with qemu-img)
    local raw=$WORK/img.raw first
    qemu-img convert -U -O raw "$1" "$raw"
    first=$(sgdisk -i 1 "$raw" | awk '/First sector/ {print $3}')
    dd if="$raw" of="$WORK/p1" bs=512 skip="$first" status=none
    if dumpe2fs -h "$WORK/p1" 2>/dev/null | grep -q '^Filesystem features:.*needs_recovery'; then
        echo needs_recovery
    else
        echo clean
    fi
    rm -f "$raw" "$WORK/p1"
}
top_image() { virsh -q domblklist "$NAME" | awk '$1 == "vda" {print $2}'; }

echo "== boot"
virsh -q destroy "$NAME" >/dev/null 2>&1 || true
"$HERE/define-guest.sh" --recreate "$NAME" "$BASE/guest" 2>/dev/null
t0=$(now_ms)
virsh -q start "$NAME" >/dev/null
if "$HERE/wait-agent.sh" "$NAME" 120 2>/dev/null; then ok "virsh start -> agent ready: $(( $(now_ms) - t0 )) ms"
else bad "agent not ready after 120 s"; exit 1; fi
sleep 3    # let the writer run

echo "== freeze / thaw (virsh qemu-agent-command, includes virsh start-up)"
for i in 1 2 3; do
    timed tf ga '{"execute":"guest-fsfreeze-freeze"}'; n=$(jq -r .return "$WORK/out")
    st=$(ga '{"execute":"guest-fsfreeze-status"}' | jq -r .return)
    timed tt ga '{"execute":"guest-fsfreeze-thaw"}'
    st2=$(ga '{"execute":"guest-fsfreeze-status"}' | jq -r .return)
    if [[ $n -ge 1 && $st == frozen && $st2 == thawed ]]; then
        ok "freeze $n fs in $tf ms (status $st), thaw in $tt ms (status $st2)"
    else bad "freeze returned $n, status $st / $st2"; fi
done

echo "== baseline writer gaps (no snapshot, 2 s)"
a=$(guest_last_ms); sleep 2; b=$(guest_last_ms)
echo "  $(max_gap "$a" "$b")"

echo "== quiesced external snapshot q1 while the writer runs"
base=$(top_image)
a=$(guest_last_ms)
if timed tq virsh snapshot-create-as "$NAME" q1 --disk-only --atomic --quiesce; then
    ok "snapshot-create-as q1 --disk-only --atomic --quiesce: $tq ms"
else bad "quiesced snapshot: $(cat "$WORK/out")"; fi
sleep 1; b=$(guest_last_ms)
echo "  writer during q1: $(max_gap "$a" "$b")"
echo "  chain: $(qemu-img info -U --backing-chain "$(top_image)" | sed -n 's/^image: //p' | tr '\n' ' ')"
s=$(ext4_state "$base")
[[ $s == clean ]] && ok "q1 image $base: ext4 $s" || bad "q1 image $base: ext4 $s (want clean)"

echo "== crash-consistent external snapshot c1 (no --quiesce) while the writer runs"
base=$(top_image)
a=$(guest_last_ms)
if timed tc virsh snapshot-create-as "$NAME" c1 --disk-only --atomic; then
    ok "snapshot-create-as c1 --disk-only --atomic: $tc ms"
else bad "crash-consistent snapshot: $(cat "$WORK/out")"; fi
sleep 1; b=$(guest_last_ms)
echo "  writer during c1: $(max_gap "$a" "$b")"
s=$(ext4_state "$base")
[[ $s == needs_recovery ]] && ok "c1 image $base: ext4 $s (as expected unquiesced)" ||
    echo "  note c1 image $base: ext4 $s (unquiesced but clean: no write in flight)"
virsh domblklist "$NAME" | sed 's/^/  /'

echo "== agent killed in the guest"
"$HERE/guest-agent-kill.sh" "$NAME" 600 2>/dev/null
if timed tk ga '{"execute":"guest-fsfreeze-status"}' 5; then bad "agent still answers"
else ok "guest-fsfreeze-status fails in $tk ms: $(head -1 "$WORK/out")"; fi
if timed tk virsh snapshot-create-as "$NAME" k1 --disk-only --atomic --quiesce; then
    bad "quiesced snapshot succeeded without agent"
else ok "quiesced snapshot without agent fails in $tk ms: $(grep -m1 error "$WORK/out")"; fi
timed tr "$HERE/guest-agent-start.sh" "$NAME" 30 && ok "agent restarted via control port in $tr ms" ||
    bad "agent restart"
st=$(ga '{"execute":"guest-fsfreeze-status"}' | jq -r .return)
[[ $st == thawed ]] && ok "guest thawed after all that" || bad "guest left $st"

echo "== agent hung (SIGSTOP) with libvirt agent timeout 5 s"
virsh -q guest-agent-timeout "$NAME" --timeout 5
"$HERE/guest-agent-kill.sh" --hang "$NAME" 2>/dev/null
if timed th timeout 60 virsh domfsfreeze "$NAME"; then bad "freeze succeeded with a hung agent"
else ok "domfsfreeze with hung agent fails in $th ms: $(grep -m1 error "$WORK/out")"; fi
"$HERE/guest-agent-start.sh" "$NAME" 30 2>/dev/null
sleep 1
st=$("$HERE/guest-ctl.sh" "$NAME" status)
case $st in
    *frozen=1*) echo "  note: guest FROZEN after the timed-out freeze once the agent resumed (late freeze): $st"
                virsh -q domfsthaw "$NAME" >/dev/null && echo "  thawed it" ;;
    *)          echo "  guest not frozen after resume: $st" ;;
esac
virsh -q guest-agent-timeout "$NAME" --timeout -2
a=$(guest_last_ms); sleep 1; b=$(guest_last_ms)
(( b > a )) && ok "guest writes go on after thaw (writer ms $a -> $b)" || bad "writer stuck at $a"

echo "== snapshot delete (external, libvirt block commit)"
for s in c1 q1; do
    if timed td virsh snapshot-delete "$NAME" "$s"; then ok "snapshot-delete $s: $td ms"
    else bad "snapshot-delete $s: $(cat "$WORK/out")"; fi
done
echo "  vda now $(top_image)"
echo "$PASS passed, $FAIL failed"
[[ $FAIL == 0 ]]

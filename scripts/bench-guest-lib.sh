# Shared by scripts/bench-libvirt.sh and scripts/bench-managed.sh (sourced, not run): timing
# the test bed guest's writer loop. Expects $TB (scripts/testbed), $NAME (the guest) and $WORK
# (where writer.log is fetched to).

now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
guest_ms() {  # the guest writer's last monotonic ms, through the control port (no agent)
    local v i
    for i in 1 2 3 4 5; do  # the port may miss a reply on a loaded host: ask again
        v=$("$TB/guest-ctl.sh" "$NAME" status 2>/dev/null | sed -n 's/.*writer=[0-9]*\/\([0-9]*\).*/\1/p') || true
        [[ -n $v ]] && { echo "$v"; return 0; }
        sleep 0.2
    done
    echo "guest-ctl.sh $NAME status: no answer ($i tries)" >&2
    return 1
}
frozen() { "$TB/guest-ctl.sh" "$NAME" status 2>/dev/null | grep -c 'frozen=1' || true; }
stats() {  # stats < numbers: "median min max"
    sort -n | awk '{a[NR]=$1} END {if (NR == 0) {print "- - -"; exit}
        m = (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2; printf "%g %g %g\n", m, a[1], a[NR]}'
}
gap() {  # gap FROM:TO: longest gap between consecutive writer.log lines in [FROM, TO] (guest ms)
    awk -v a="${1%%:*}" -v b="${1##*:}" '$2 >= a && $2 <= b { if (p && $2 - p > m) m = $2 - p; p = $2 }
        END { print m + 0 }' "$WORK/writer.log"
}

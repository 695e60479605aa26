#!/bin/bash
# guest-agent-kill.sh [--via-agent|--hang] NAME [HOLD_SECONDS=86400]
# Kill qemu-ga inside guest NAME and keep it down for HOLD_SECONDS (guest uptime), for fault
# tests. Default path: the guest's control port (guest-ctl.sh NAME agent-stop), which does not
# need the agent. --via-agent: the agent kills itself through guest-exec (sets the same hold).
# --hang: do not kill, SIGSTOP qemu-ga instead: the channel stays connected and requests hang
# (libvirt then waits for its agent timeout, forever by default). HOLD is ignored.
# Bring it back with guest-agent-start.sh NAME (SIGCONT + start, then waits for guest-ping).
# Returns once libvirt reports the agent as gone (bounded, 10 s).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VIA=ctl
case ${1:-} in --via-agent) VIA=agent; shift ;; --hang) VIA=hang; shift ;; esac
NAME=${1:?usage: guest-agent-kill.sh [--via-agent] NAME [HOLD_SECONDS]}
HOLD=${2:-86400}
export LIBVIRT_DEFAULT_URI=${LIBVIRT_DEFAULT_URI:-qemu:///system}
if [[ $VIA == hang ]]; then
    "$HERE/guest-ctl.sh" "$NAME" agent-pause >/dev/null
    echo "guest-agent-kill: agent of $NAME stopped (SIGSTOP); guest-agent-start.sh $NAME to resume" >&2
    exit 0
elif [[ $VIA == ctl ]]; then
    "$HERE/guest-ctl.sh" "$NAME" agent-stop "$HOLD" >/dev/null
else
    req=$(jq -cn --arg h "$HOLD" '{execute:"guest-exec",arguments:{path:"/bin/sh",arg:["-c",
        "echo $(( $(cut -d. -f1 /proc/uptime) + " + $h + " )) > /run/qga-hold; (sleep 0.2; killall qemu-ga) >/dev/null 2>&1 &"]}}')
    virsh -q qemu-agent-command "$NAME" "$req" --timeout 10 >/dev/null
fi
deadline=$((SECONDS + 10))
while virsh -q qemu-agent-command "$NAME" '{"execute":"guest-ping"}' --timeout 1 >/dev/null 2>&1; do
    (( SECONDS < deadline )) || { echo "guest-agent-kill: agent of $NAME still answers" >&2; exit 1; }
    sleep 0.1
done
echo "guest-agent-kill: agent of $NAME is down for ${HOLD}s (guest-agent-start.sh $NAME to restart)" >&2

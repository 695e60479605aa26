#!/bin/bash
# guest-exec.sh NAME 'SHELL COMMAND' [TIMEOUT=30]: run a command in the guest through the agent
# (guest-exec + guest-exec-status), print its stdout/stderr, exit with its exit code.
set -euo pipefail
NAME=${1:?usage: guest-exec.sh NAME 'COMMAND' [TIMEOUT]}
CMD=${2:?usage: guest-exec.sh NAME 'COMMAND' [TIMEOUT]}
TIMEOUT=${3:-30}
export LIBVIRT_DEFAULT_URI=${LIBVIRT_DEFAULT_URI:-qemu:///system}
req=$(jq -cn --arg c "$CMD" '{execute:"guest-exec",arguments:{path:"/bin/sh",arg:["-c",$c],"capture-output":true}}')
pid=$(virsh -q qemu-agent-command "$NAME" "$req" --timeout 10 | jq -r '.return.pid')
deadline=$((SECONDS + TIMEOUT))
while :; do
    st=$(virsh -q qemu-agent-command "$NAME" "{\"execute\":\"guest-exec-status\",\"arguments\":{\"pid\":$pid}}" --timeout 10)
    if [[ $(jq -r '.return.exited' <<<"$st") == true ]]; then
        jq -r '.return["out-data"] // empty' <<<"$st" | base64 -d
        jq -r '.return["err-data"] // empty' <<<"$st" | base64 -d >&2
        exit "$(jq -r '.return.exitcode // 1' <<<"$st")"
    fi
    (( SECONDS < deadline )) || { echo "guest-exec: timeout after ${TIMEOUT}s (guest pid $pid)" >&2; exit 124; }
    sleep 0.1
done

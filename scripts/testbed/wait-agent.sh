#!/bin/bash
# wait-agent.sh NAME [TIMEOUT_SECONDS=60]: poll guest-ping until the guest agent of NAME answers.
# Prints the seconds waited; exits 1 on timeout.
set -euo pipefail
NAME=${1:?usage: wait-agent.sh NAME [TIMEOUT]}
TIMEOUT=${2:-60}
export LIBVIRT_DEFAULT_URI=${LIBVIRT_DEFAULT_URI:-qemu:///system}
start=$(date +%s.%N)
deadline=$((SECONDS + TIMEOUT))
while :; do
    if virsh -q qemu-agent-command "$NAME" '{"execute":"guest-ping"}' --timeout 2 >/dev/null 2>&1; then
        echo "wait-agent: $NAME agent ready after $(
              awk -v a="$(date +%s.%N)" -v b="$start" 'BEGIN {printf "%.1f", a - b}') s" >&2
        exit 0
    fi
    if (( SECONDS >= deadline )); then
        echo "wait-agent: $NAME agent not answering after ${TIMEOUT}s" >&2
        exit 1
    fi
    sleep 0.2
done

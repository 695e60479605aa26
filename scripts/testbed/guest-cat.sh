#!/bin/bash
# guest-cat.sh NAME PATH: print a guest file to stdout through the agent
# (guest-file-open / guest-file-read in 1 MiB base64 chunks / guest-file-close). Binary-safe.
set -euo pipefail
NAME=${1:?usage: guest-cat.sh NAME PATH}
GPATH=${2:?usage: guest-cat.sh NAME PATH}
export LIBVIRT_DEFAULT_URI=${LIBVIRT_DEFAULT_URI:-qemu:///system}
ga() { virsh -q qemu-agent-command "$NAME" "$1" --timeout 30; }
h=$(ga "$(jq -cn --arg p "$GPATH" '{execute:"guest-file-open",arguments:{path:$p,mode:"r"}}')" | jq -r .return)
trap 'ga "{\"execute\":\"guest-file-close\",\"arguments\":{\"handle\":$h}}" >/dev/null 2>&1 || true' EXIT
while :; do
    r=$(ga "{\"execute\":\"guest-file-read\",\"arguments\":{\"handle\":$h,\"count\":1048576}}")
    jq -r '.return["buf-b64"]' <<<"$r" | base64 -d
    [[ $(jq -r '.return.eof' <<<"$r") == true ]] && break
    [[ $(jq -r '.return.count' <<<"$r") == 0 ]] && break
done

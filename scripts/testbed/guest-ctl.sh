#!/bin/bash
# guest-ctl.sh NAME COMMAND [ARG]: send one command to the guest's control port (virtio-serial
# port org.snapfs.ctl; host side: the unix socket in the domain's live XML) and print the reply line.
# Works without the guest agent. Commands: ping | status | writer-stop | writer-start | agent-stop [SECONDS] | agent-start |
# agent-pause (SIGSTOP qemu-ga: requests hang) | agent-resume (SIGCONT) |
# run 'SHELL COMMAND' (prints its output; 10 s limit in the guest)
set -euo pipefail
NAME=${1:?usage: guest-ctl.sh NAME COMMAND [ARG]}
shift
export LIBVIRT_DEFAULT_URI=${LIBVIRT_DEFAULT_URI:-qemu:///system}
# host end of the channel named org.snapfs.ctl, from the live XML (libvirt picks the path)
SOCK=$(virsh -q dumpxml "$NAME" 2>/dev/null | awk '
    /<channel type=.unix.>/ { inch = 1; path = "" }
    inch && /<source / { if (match($0, /path=.[^"\x27]*/)) path = substr($0, RSTART + 6, RLENGTH - 6) }
    inch && /name=.org\.snapfs\.ctl./ { print path; exit }
    /<\/channel>/ { inch = 0 }')
[[ -n $SOCK && -S $SOCK ]] || { echo "guest-ctl: no control socket for $NAME (not running?)" >&2; exit 1; }
coproc CTL { exec socat - "UNIX-CONNECT:$SOCK" 2>/dev/null; }
trap 'kill "$CTL_PID" 2>/dev/null || true' EXIT
printf '%s\n' "$*" >&"${CTL[1]}"
reply=
read -r -t 10 reply <&"${CTL[0]}" || true
reply=${reply%$'\r'}
[[ -n $reply ]] || { echo "guest-ctl: no reply from $NAME" >&2; exit 1; }
if [[ $1 == run ]]; then
    [[ $reply == ok* ]] || { echo "$reply" >&2; exit 1; }
    base64 -d <<<"${reply#ok }"
    exit 0
fi
echo "$reply"
[[ $reply != err* ]]

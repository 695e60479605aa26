#!/bin/bash
# guest-agent-start.sh NAME [TIMEOUT=30]: restart qemu-ga in guest NAME after guest-agent-kill.sh
# (through the control port: SIGCONT a stopped agent, lift the hold of a killed one) and wait
# until it answers.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
NAME=${1:?usage: guest-agent-start.sh NAME [TIMEOUT]}
"$HERE/guest-ctl.sh" "$NAME" agent-resume >/dev/null   # after --hang
"$HERE/guest-ctl.sh" "$NAME" agent-start >/dev/null    # after a kill
exec "$HERE/wait-agent.sh" "$NAME" "${2:-30}"

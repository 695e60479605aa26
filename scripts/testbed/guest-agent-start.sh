#!/bin/bash
# guest-agent-start.sh NAME [TIMEOUT=30]: restart qemu-ga in guest NAME after guest-agent-kill.sh
# (through the control port) and wait until it answers.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
NAME=${1:?usage: guest-agent-start.sh NAME [TIMEOUT]}
"$HERE/guest-ctl.sh" "$NAME" agent-start >/dev/null
exec "$HERE/wait-agent.sh" "$NAME" "${2:-30}"

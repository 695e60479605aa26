# shellcheck shell=bash
# Helpers for the bench scripts that watch a snapfs daemon. Sourced.

# daemon_pid MNT: the pid of the process whose command line is `snapfs mount … MNT`; status 1
# (and nothing printed) when there is none.
daemon_pid() {
  local mnt=$1 p
  for p in /proc/[0-9]*; do
    if { tr '\0' '\n' <"$p/cmdline"; } 2>/dev/null | grep -qxF -- "$mnt"; then
      if { tr '\0' '\n' <"$p/cmdline"; } 2>/dev/null | sed -n 2p | grep -qx mount; then
        basename "$p"; return 0
      fi
    fi
  done
  return 1
}

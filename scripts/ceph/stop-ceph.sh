#!/usr/bin/env bash
# Stop the snapfs test cluster started by start-ceph.sh. Keeps its data unless --purge.
#
# Usage: scripts/ceph/stop-ceph.sh [--purge]
set -euo pipefail

DIR=${SNAPFS_CEPH_DIR:-/var/lib/snapfs-ceph}
purge=0
case "${1:-}" in
  --purge) purge=1 ;;
  "") ;;
  *) echo "usage: $0 [--purge]" >&2; exit 2 ;;
esac

pids=()
for name in mgr.x osd.0 mon.a; do
  pf=$DIR/run/$name.pid
  if [[ -s $pf ]] && kill -0 "$(cat "$pf")" 2>/dev/null; then
    pid=$(cat "$pf")
    echo "stop-ceph: stopping $name (pid $pid)" >&2
    kill "$pid"
    pids+=("$pid")
  fi
done
# Bounded wait, then SIGKILL whatever is left of the daemons we signalled.
for _ in $(seq 1 100); do
  left=()
  for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && left+=("$p"); done
  ((${#left[@]})) || break
  sleep 0.1
done
for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && kill -9 "$p" || true; done

if ((purge)); then
  echo "stop-ceph: removing $DIR" >&2
  rm -rf "${DIR:?}"
fi

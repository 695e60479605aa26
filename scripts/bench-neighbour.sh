#!/usr/bin/env bash
# Neighbour figures (issue 20, item 2): does a reader of volume A keep its throughput while
# volume B is attacked? Not a test: it prints numbers (tests/neighbour.rs checks the gate).
#
# Usage: scripts/bench-neighbour.sh [--snapfs BIN] [--peer BIN] [--seconds N] [--rounds N] [WORKDIR]
#   --snapfs BIN   snapfs binary (default: target/release/snapfs of this repository)
#   --peer BIN     a second binary (e.g. main's) measured in the same run, alternated
#   --seconds N    length of A's random-read phase (default 10)
#   --rounds N     rounds of everything (default 2)
#   WORKDIR        default /var/tmp/snapfs-neighbour (images are made there once)
#
# Volumes (one images pool, one daemon per binary and round, --threads 4, --cache-mb 48):
#   a      384 MiB of random bytes, qcow2 with 4 KiB clusters (192 L2 tables), snapshot s
#   benign the same bytes in another file: B's benign peer, same readers as the hostile one
#   chain  8 GiB virtual, 4 KiB clusters, a backing chain of 9 files: the base has 4,096
#          compressed clusters 2 MiB apart (one L2 table each), each overlay rewrites a
#          cluster in every 8th stride: every read of B misses the block cache
#   max    65,536 snapshots (scripts/make-hostile-images.py snapshots-max)
# Attacks on B while A is measured: none; benign (4 parallel random 4 KiB O_DIRECT readers
# of `benign`); chain (the same 4 readers of `chain`, one per FUSE thread); ls (`ls -f` of
# max's .snapshots in a loop, 2 in parallel).
# A is measured with `dd iflag=direct bs=1M` of its whole snapshot (MiB/s, through the
# daemon, no page cache), then random 4 KiB O_DIRECT reads for --seconds (reads/s, p99 and
# worst latency in ms). Printed tab-separated: binary, round, attack, stream MiB/s,
# random reads/s, p99 ms, worst ms, B's reads done (random readers) or listings done (ls).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
SNAPFS=$REPO/target/release/snapfs
PEER=
SECS=10
ROUNDS=2
WORK=/var/tmp/snapfs-neighbour
while [[ $# -gt 0 ]]; do
  case $1 in
    --snapfs) SNAPFS=$(realpath "$2"); shift 2 ;;
    --peer) PEER=$(realpath "$2"); shift 2 ;;
    --seconds) SECS=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
    *) WORK=$1; shift ;;
  esac
done
mkdir -p "$WORK"
WORK=$(realpath "$WORK")
POOL=$WORK/pool/nb
mkdir -p "$POOL"

# --- images (made once) ---
if [[ ! -f $POOL/a.qcow2 ]]; then
  head -c $((384 << 20)) /dev/urandom >"$WORK/a.raw"
  qemu-img convert -O qcow2 -o cluster_size=4096 "$WORK/a.raw" "$WORK/a.tmp.qcow2"
  qemu-img snapshot -c s "$WORK/a.tmp.qcow2"
  cp "$WORK/a.tmp.qcow2" "$WORK/benign.tmp.qcow2"
  mv "$WORK/benign.tmp.qcow2" "$POOL/benign.qcow2"
  mv "$WORK/a.tmp.qcow2" "$POOL/a.qcow2"
  rm -f "$WORK/a.raw"
fi
if [[ ! -f $POOL/chain.qcow2 ]]; then
  c=$WORK/chain
  rm -rf "$c"; mkdir -p "$c"
  qemu-img create -q -f qcow2 -o cluster_size=4096 "$c/l0.qcow2" 8G
  python3 - "$c/cmds" <<'EOF'
import random, sys
random.seed(20)
with open(sys.argv[1], "w") as f:
    for i in range(4096):
        f.write(f"write -c -P {random.randrange(1, 255)} {i * 2 * 1024 * 1024} 4k\n")
EOF
  qemu-io -f qcow2 "$c/l0.qcow2" <"$c/cmds" >/dev/null
  for l in 1 2 3 4 5 6 7 8; do
    qemu-img create -q -f qcow2 -o cluster_size=4096 -b "$c/l$((l - 1)).qcow2" -F qcow2 \
      "$c/l$l.qcow2"
    python3 - "$c/cmds" "$l" <<'EOF'
import sys
l = int(sys.argv[2])
with open(sys.argv[1], "w") as f:
    for i in range(l, 4096, 8):
        f.write(f"write -P {l} {i * 2 * 1024 * 1024} 4k\n")
EOF
    qemu-io -f qcow2 "$c/l$l.qcow2" <"$c/cmds" >/dev/null
  done
  qemu-img snapshot -c s "$c/l8.qcow2"
  # The pool holds only the top (its backing names are absolute).
  cp "$c/l8.qcow2" "$POOL/chain.tmp.qcow2"
  mv "$POOL/chain.tmp.qcow2" "$POOL/chain.qcow2"
fi
if [[ ! -f $POOL/max.qcow2 ]]; then
  python3 "$REPO/scripts/make-hostile-images.py" "$WORK/cases" snapshots-max
  cp "$WORK/cases/snapshots-max.qcow2" "$POOL/max.qcow2"
fi

# --- readers ---
# rand PATH SECONDS [EXTENT_BYTES STRIDE]: random 4 KiB O_DIRECT reads for SECONDS, or until
# the file $STOP exists when set; prints "reads reads_per_s p99_ms worst_ms". With a stride,
# reads land at multiples of it.
rand() {
  python3 - "$@" <<'EOF'
import mmap, os, random, sys, time
path, secs = sys.argv[1], float(sys.argv[2])
fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
size = os.fstat(fd).st_size
stride = int(sys.argv[4]) if len(sys.argv) > 4 else 4096
n_slots = (int(sys.argv[3]) if len(sys.argv) > 3 else size) // stride
buf = mmap.mmap(-1, 4096)
lat = []
stop = os.environ.get("STOP")
start = time.monotonic()
end = start + secs
while time.monotonic() < end:
    if stop and len(lat) % 16 == 0 and os.path.exists(stop):
        break
    off = random.randrange(n_slots) * stride
    t = time.perf_counter()
    os.preadv(fd, [buf], off)
    lat.append(time.perf_counter() - t)
el = time.monotonic() - start
lat.sort()
p99 = lat[int(len(lat) * 0.99)] if lat else 0
print(f"{len(lat)} {len(lat) / el:.0f} {p99 * 1000:.2f} {(lat[-1] if lat else 0) * 1000:.1f}")
EOF
}

# shellcheck source=scripts/lib/daemon.sh
source "$REPO/scripts/lib/daemon.sh"

MNT=$WORK/mnt
printf 'binary\tround\tattack\tstream_mib_s\trand_reads_s\tp99_ms\tworst_ms\tb_work\n'
bins=("$SNAPFS")
[[ -n $PEER ]] && bins+=("$PEER")
for round in $(seq "$ROUNDS"); do
  for attack in none benign chain ls; do
    for bin in "${bins[@]}"; do
      mkdir -p "$MNT"
      "$bin" mount --images "$POOL" --state-dir "$WORK/state" --log-file "$WORK/log" \
        --threads 4 --cache-mb 48 "$MNT"
      snaps=$MNT/volumes/nb
      a=$snaps/a.qcow2/.snapshots/s/disk.raw
      # Warm-up: open everything once (parsed metadata), as a running daemon would have.
      dd if="$a" of=/dev/null bs=1M count=1 iflag=direct status=none
      bpids=()
      bout=$WORK/b-out
      rm -rf "$bout"; mkdir -p "$bout"
      dur=3600
      stop=$WORK/stop
      rm -f "$stop"
      case $attack in
        benign|chain)
          for i in 1 2 3 4; do
            if [[ $attack == benign ]]; then
              STOP=$stop rand "$snaps/benign.qcow2/.snapshots/s/disk.raw" "$dur" >"$bout/$i" &
            else
              STOP=$stop rand "$snaps/chain.qcow2/.snapshots/s/disk.raw" "$dur" $((8 << 30)) \
                $((2 << 20)) \
                >"$bout/$i" &
            fi
            bpids+=($!)
          done ;;
        ls)
          for i in 1 2; do
            ( n=0; while [[ ! -e $stop ]]; do
                ls -f "$snaps/max.qcow2/.snapshots" >/dev/null 2>&1 || true; n=$((n + 1)); done
              echo "$n" >"$bout/$i" ) &
            bpids+=($!)
          done ;;
      esac
      sleep 2
      t0=$(date +%s.%N)
      dd if="$a" of=/dev/null bs=1M iflag=direct status=none
      t1=$(date +%s.%N)
      mibs=$(python3 -c "print(f'{384 / ($t1 - $t0):.0f}')")
      r=$(rand "$a" "$SECS")
      # B stops when A is done: its work is what it did beside A.
      touch "$stop"
      for p in "${bpids[@]}"; do wait "$p" || true; done
      bwork=$( (cat "$bout"/* 2>/dev/null || true) | awk '{ s += $1 } END { print s + 0 }')
      read -r _ rs p99 worst <<<"$r"
      printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$(basename "$(dirname "$(dirname "$bin")")")/$(basename "$bin")" \
        "$round" "$attack" "$mibs" "$rs" "$p99" "$worst" "$bwork"
      "$bin" unmount "$MNT" >/dev/null 2>&1 || "$bin" unmount --lazy "$MNT" >/dev/null 2>&1 || true
      pid=$(daemon_pid "$MNT" || true)
      for _ in $(seq 100); do [[ -z $pid || ! -d /proc/$pid ]] && break; sleep 0.1; done
    done
  done
done

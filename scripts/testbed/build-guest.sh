#!/bin/bash
# Build the tiny test guest into OUTDIR:
#   vmlinuz            Debian linux-image-*-cloud-amd64 kernel (apt-get download + dpkg-deb -x)
#   initrd.img         gzip'ed cpio: busybox-static, host qemu-ga + its libraries, virtio modules,
#                      busybox init with: agent supervisor, writer loop, control port reader
#   cmdline            kernel command line
#   demo-disk.qcow2    64 MiB qcow2: GPT, partition 1 = ext4 (label snapfs-data) with a few files
#   debs/              cached kernel .deb (re-runs do not download again)
# Idempotent: skips everything when OUTDIR/.stamp matches this script + package versions.
set -euo pipefail

OUTDIR=${1:?usage: build-guest.sh OUTDIR}
mkdir -p "$OUTDIR/debs"
OUTDIR=$(cd "$OUTDIR" && pwd)
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
log() { echo "build-guest: $*" >&2; }

for t in busybox qemu-ga cpio gzip sgdisk mkfs.ext4 qemu-img dpkg-deb; do
    command -v "$t" >/dev/null || { log "ERROR: $t missing (run install-libvirt.sh)"; exit 1; }
done
BUSYBOX=$(command -v busybox)
ldd "$BUSYBOX" >/dev/null 2>&1 && {
    log "ERROR: $BUSYBOX is dynamic; install busybox-static"; exit 1; }

# ---- which kernel ----------------------------------------------------------------------------
# The cached .deb decides unless BUILD_GUEST_REFRESH=1 (then apt decides, which takes ~1 s).
cached=$(ls -1 "$OUTDIR"/debs/linux-image-*-cloud-amd64_*.deb 2>/dev/null | tail -1 || true)
KPKG=
if [[ -z $cached || ${BUILD_GUEST_REFRESH:-0} == 1 ]]; then
    KPKG=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
           awk '/Depends: linux-image-[0-9].*-cloud-amd64/ {print $2; exit}' || true)
fi
if [[ -n $KPKG ]]; then
    KVER_PKG=$(apt-cache policy "$KPKG" | awk '/Candidate:/ {print $2}')
else
    [[ -n $cached ]] || { log "ERROR: cannot resolve linux-image-cloud-amd64 (apt-get update?)"; exit 1; }
    KPKG=$(dpkg-deb -f "$cached" Package)
    KVER_PKG=$(dpkg-deb -f "$cached" Version)
fi

STAMP=$( { sha256sum "$HERE/build-guest.sh"; echo "$KPKG $KVER_PKG";
           dpkg-query -W -f='${Version}\n' qemu-guest-agent busybox-static 2>/dev/null || true; } |
         sha256sum | cut -c1-16)
if [[ -s $OUTDIR/.stamp && $(cat "$OUTDIR/.stamp") == "$STAMP" ]] &&
   [[ -s $OUTDIR/vmlinuz && -s $OUTDIR/initrd.img && -s $OUTDIR/cmdline && -s $OUTDIR/demo-disk.qcow2 ]]; then
    log "up to date ($OUTDIR)"
    exit 0
fi

T0=$SECONDS
WORK=$(mktemp -d /tmp/snapfs-guest-build.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

# ---- kernel ----------------------------------------------------------------------------------
DEB=$(ls -1 "$OUTDIR"/debs/"${KPKG}"_*.deb 2>/dev/null | tail -1 || true)
if [[ -z $DEB ]]; then
    log "downloading $KPKG $KVER_PKG"
    (cd "$OUTDIR/debs" && apt-get download -q "$KPKG" 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2 || true)
    DEB=$(ls -1 "$OUTDIR"/debs/"${KPKG}"_*.deb 2>/dev/null | tail -1 || true)
    [[ -n $DEB ]] || { log "ERROR: apt-get download $KPKG failed"; exit 1; }
    # keep only this kernel in the cache
    find "$OUTDIR/debs" -name 'linux-image-*.deb' ! -path "$DEB" -delete
fi
dpkg-deb -x "$DEB" "$WORK/k"
KVER=$(ls -1 "$WORK/k/lib/modules" | head -1)
MODDIR=$WORK/k/lib/modules/$KVER
cp "$WORK/k/boot/vmlinuz-$KVER" "$WORK/vmlinuz"

# ---- initramfs tree --------------------------------------------------------------------------
R=$WORK/root
mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,run,tmp,data,root,var,lib/modules}
ln -s ../run "$R/var/run"
cp "$BUSYBOX" "$R/bin/busybox"
for a in $("$BUSYBOX" --list); do
    [[ $a == busybox ]] && continue
    [[ -e $R/bin/$a ]] || ln -s busybox "$R/bin/$a"
done
ln -sf bin/busybox "$R/init"      # kernel runs /init -> busybox init (reaps, respawns)

# qemu-ga and its shared libraries (same paths as on the host; libc from the host too)
cp /usr/sbin/qemu-ga "$R/usr/sbin/qemu-ga"
copy_lib() {
    local src=$1 dst
    dst=$R$src
    [[ -e $dst ]] && return 0
    mkdir -p "$(dirname "$dst")"
    cp -L "$src" "$dst"
}
while read -r lib; do copy_lib "$lib"; done < <(
    ldd /usr/sbin/qemu-ga | awk '/=> \// {print $3} /^\t\/[^ ]+ \(/ {print $1}')
# ldd gives /lib/x86_64-linux-gnu/... and /lib64/ld-linux-x86-64.so.2: both must resolve in the guest
[[ -e $R/lib64/ld-linux-x86-64.so.2 ]] || { log "ERROR: dynamic loader not copied"; exit 1; }

# kernel modules: virtio_pci, virtio_blk, virtio_console (+ ext4 if modular), deps from modules.dep
"$BUSYBOX" depmod -b "$WORK/k" "$KVER"
WANT=(virtio_pci virtio_blk virtio_console ext4)
declare -A SEEN=()
ORDER=()
modpath() {  # modpath NAME -> relative path in modules.dep ('' if built in / absent)
    local n=${1//-/_}
    awk -F: -v n="$n" '{ p=$1; b=p; sub(/.*\//, "", b); sub(/\.ko(\.(xz|gz|zst))?$/, "", b);
                         gsub(/-/, "_", b); if (b == n) { print p; exit } }' "$MODDIR/modules.dep"
}
resolve() {  # depth-first: dependencies before the module
    local p=$1 d
    [[ -n ${SEEN[$p]:-} ]] && return 0
    SEEN[$p]=1
    for d in $(awk -F: -v p="$p" '$1 == p { print $2; exit }' "$MODDIR/modules.dep"); do
        resolve "$d"
    done
    ORDER+=("$p")
}
for m in "${WANT[@]}"; do
    p=$(modpath "$m")
    if [[ -z $p ]]; then
        grep -q "/$m.ko" "$MODDIR/modules.builtin" || { log "ERROR: module $m neither built in nor present"; exit 1; }
        continue
    fi
    resolve "$p"
done
: > "$R/etc/modules"
for p in "${ORDER[@]}"; do
    b=$(basename "$p")
    case $b in
        *.xz)  xz -dc  "$MODDIR/$p" > "$R/lib/modules/${b%.xz}";  b=${b%.xz} ;;
        *.zst) zstd -qdc "$MODDIR/$p" > "$R/lib/modules/${b%.zst}"; b=${b%.zst} ;;
        *.gz)  gzip -dc "$MODDIR/$p" > "$R/lib/modules/${b%.gz}";  b=${b%.gz} ;;
        *)     cp "$MODDIR/$p" "$R/lib/modules/$b" ;;
    esac
    echo "$b" >> "$R/etc/modules"
done
log "kernel $KVER, modules: $(tr '\n' ' ' < "$R/etc/modules")"

# ---- guest scripts ---------------------------------------------------------------------------
cat > "$R/etc/inittab" <<'EOF'
::sysinit:/etc/rc.sysinit
::respawn:/usr/sbin/qga-run
::respawn:/usr/sbin/writer
::respawn:/usr/sbin/ctl-loop
::shutdown:/etc/rc.shutdown
EOF

cat > "$R/etc/rc.sysinit" <<'EOF'
#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null || true
mkdir -p /dev/pts /run/qga /data
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=755 tmpfs /run && mkdir -p /run/qga
echo "snapfs-guest: sysinit, uptime $(cut -d' ' -f1 /proc/uptime)"
for m in $(cat /etc/modules); do insmod /lib/modules/$m || echo "snapfs-guest: insmod $m failed"; done

# data disk: first GPT partition of vda, ext4
i=0
while [ ! -e /sys/class/block/vda1 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
if [ -e /sys/class/block/vda1 ]; then
    [ -b /dev/vda1 ] || mknod /dev/vda1 b $(sed 's/:/ /' /sys/class/block/vda1/dev)
    if mount -t ext4 -o rw /dev/vda1 /data; then
        echo "snapfs-guest: /dev/vda1 mounted on /data"
    else
        echo "snapfs-guest: ERROR mounting /dev/vda1"
    fi
else
    echo "snapfs-guest: ERROR no /dev/vda1"
fi

# virtio-serial ports: /dev/virtio-ports/<name> by hand (no udev)
mkdir -p /dev/virtio-ports
i=0
while [ $i -lt 100 ]; do
    n=0
    for d in /sys/class/virtio-ports/*; do
        [ -r "$d/name" ] || continue
        name=$(cat "$d/name"); [ -n "$name" ] || continue
        [ -e "/dev/virtio-ports/$name" ] || mknod "/dev/virtio-ports/$name" c $(sed 's/:/ /' "$d/dev")
        n=$((n+1))
    done
    [ -e /dev/virtio-ports/org.qemu.guest_agent.0 ] && break
    sleep 0.1; i=$((i+1))
done
ls -l /dev/virtio-ports/
echo "snapfs-guest: sysinit done, uptime $(cut -d' ' -f1 /proc/uptime)"
EOF

cat > "$R/etc/rc.shutdown" <<'EOF'
#!/bin/sh
sync; umount /data 2>/dev/null || mount -o remount,ro /data 2>/dev/null
EOF

# Agent supervisor (respawned by init). While /run/qga-hold holds an uptime second in the future,
# the agent stays down (guest-agent-kill.sh); ctl-loop or the deadline brings it back.
cat > "$R/usr/sbin/qga-run" <<'EOF'
#!/bin/sh
while :; do
    hold=$(cat /run/qga-hold 2>/dev/null || echo 0)
    now=$(cut -d. -f1 /proc/uptime)
    [ "$now" -ge "${hold:-0}" ] && break
    sleep 0.5
done
rm -f /run/qga-hold
echo "snapfs-guest: starting qemu-ga, uptime $(cut -d' ' -f1 /proc/uptime)" > /dev/console
exec /usr/sbin/qemu-ga -m virtio-serial -p /dev/virtio-ports/org.qemu.guest_agent.0 \
    -t /run/qga -f /run/qemu-ga.pid -l /run/qemu-ga.log
EOF

# Writer loop: "<seq> <monotonic ms>" appended to /data/writer.log every ~20 ms, each followed by
# sync. The monotonic clock is read from /proc/timer_list ("now at N nsecs") with shell builtins.
cat > "$R/usr/sbin/writer" <<'EOF'
#!/bin/sh
LOG=/data/writer.log
grep -q ' /data ' /proc/mounts || { sleep 5; exit 1; }
seq=0
if [ -s $LOG ]; then
    last=$(tail -n 1 $LOG | tr -cd "0-9 ")
    case ${last%% *} in ""|*[!0-9]*) seq=0 ;; *) seq=$(( ${last%% *} + 1 )) ;; esac
fi
echo "snapfs-guest: writer starts at seq $seq" > /dev/console
# sleep without a fork (forks are expensive under TCG): read with a timeout on a silent fifo
[ -p /run/writer-tick ] || mkfifo /run/writer-tick
exec 4<>/run/writer-tick
while :; do
    { read _ ; read _ ; read _ _ ns _ ; } < /proc/timer_list
    echo "$seq ${ns%??????}" >> $LOG
    sync
    seq=$((seq + 1))
    if [ $((seq % 5000)) = 0 ] && [ $(stat -c %s $LOG) -gt 16777216 ]; then mv $LOG $LOG.1; fi
    while [ -e /run/writer-stop ]; do read -t 1 _ <&4; done
    read -t 0.02 _ <&4
done
EOF

# Control port (org.snapfs.ctl, a second virtio-serial port, host side = unix socket):
# one command per line: agent-start | agent-stop [SECONDS] | agent-pause | agent-resume |
# status | ping | writer-stop | writer-start | run SHELL-COMMAND (output base64, 10 s limit)
cat > "$R/usr/sbin/ctl-loop" <<'EOF'
#!/bin/sh
P=/dev/virtio-ports/org.snapfs.ctl
[ -e $P ] || { sleep 3600; exit 0; }
# Keep the port open for good: the kernel discards data that arrives while no guest process
# has the port open. read returns EOF (not blocking) while no host client is connected.
exec 3<>$P
while :; do
    read -r cmd arg <&3 || { sleep 0.2; continue; }
    case $cmd in
        agent-start) echo 0 > /run/qga-hold; echo "ok agent-start" >&3 ;;
        agent-stop)  echo $(( $(cut -d. -f1 /proc/uptime) + ${arg:-86400} )) > /run/qga-hold
                     killall qemu-ga 2>/dev/null; echo "ok agent-stop" >&3 ;;
        agent-pause) killall -STOP qemu-ga 2>/dev/null; echo "ok agent-pause" >&3 ;;
        agent-resume) killall -CONT qemu-ga 2>/dev/null; echo "ok agent-resume" >&3 ;;
        status)      echo "ok qga=$(pidof qemu-ga || echo none) hold=$(cat /run/qga-hold 2>/dev/null || echo 0)" \
                          "frozen=$([ -e /run/qga/qga.state.isfrozen ] && echo 1 || echo 0)" \
                          "writer=$(tail -n 1 /data/writer.log 2>/dev/null | tr ' ' /)" >&3 ;;
        writer-stop) touch /run/writer-stop; echo "ok writer-stop" >&3 ;;
        writer-start) rm -f /run/writer-stop; echo "ok writer-start" >&3 ;;
        ping)        echo "pong $(cut -d' ' -f1 /proc/uptime)" >&3 ;;
        run)         echo "ok $(timeout 10 sh -c "$arg" 2>&1 | base64 | tr -d '\n')" >&3 ;;
        "")          ;;
        *)           echo "err unknown $cmd" >&3 ;;
    esac
done
EOF
chmod 755 "$R"/etc/rc.sysinit "$R"/etc/rc.shutdown "$R"/usr/sbin/{qga-run,writer,ctl-loop}
echo "root:x:0:0:root:/root:/bin/sh" > "$R/etc/passwd"
echo "root:x:0:" > "$R/etc/group"
echo snapfs-guest > "$R/etc/hostname"

(cd "$R" && find . | LC_ALL=C sort | cpio -o -H newc --quiet | gzip -6 > "$WORK/initrd.img")

echo "console=ttyS0 panic=10 loglevel=4" > "$WORK/cmdline"

# ---- demo disk: GPT + one ext4 partition -----------------------------------------------------
DISK_MB=64
T=$WORK/tree
mkdir -p "$T/dir/sub"
echo "hello from the snapfs test guest" > "$T/hello.txt"
printf 'This ext4 filesystem is the data disk of the snapfs test guest.\nIt is mounted on /data in the guest; /data/writer.log grows while the guest runs.\n' > "$T/README"
echo "nested file" > "$T/dir/sub/nested.txt"
ln -s ../hello.txt "$T/dir/hello-link"
ln "$T/hello.txt" "$T/dir/hello-hardlink.txt"
head -c 65536 /dev/zero | tr '\0' 'x' > "$T/dir/64k.bin"
chmod 0640 "$T/dir/sub/nested.txt"

RAW=$WORK/disk.raw
truncate -s ${DISK_MB}M "$RAW"
sgdisk -o -n 1:2048:0 -t 1:8300 -c 1:snapfs-data "$RAW" >/dev/null
read -r FIRST LAST < <(sgdisk -i 1 "$RAW" | awk '/First sector/ {f=$3} /Last sector/ {l=$3} END {print f, l}')
PART=$WORK/part.ext4
truncate -s $(( (LAST - FIRST + 1) * 512 )) "$PART"
# Explicit features = a bookworm guest's defaults (4 KiB blocks, metadata_csum, no orphan_file):
# the same image whatever e2fsprogs version builds it.
mkfs.ext4 -q -F -b 4096 -L snapfs-data -d "$T" -E root_owner=0:0 \
    -O ^orphan_file,^metadata_csum_seed,metadata_csum,64bit,extent,huge_file,flex_bg,dir_nlink,extra_isize "$PART"
dd if="$PART" of="$RAW" bs=512 seek="$FIRST" conv=notrunc,sparse status=none
qemu-img convert -q -f raw -O qcow2 "$RAW" "$WORK/demo-disk.qcow2"

# ---- install into OUTDIR -----------------------------------------------------------------------
for f in vmlinuz initrd.img cmdline demo-disk.qcow2; do mv -f "$WORK/$f" "$OUTDIR/$f"; done
echo "$STAMP" > "$OUTDIR/.stamp"
log "built in $((SECONDS - T0)) s: $(du -sh "$OUTDIR" | cut -f1) in $OUTDIR" \
    "(initrd $(du -h "$OUTDIR/initrd.img" | cut -f1), disk partition 1 at sector $FIRST)"

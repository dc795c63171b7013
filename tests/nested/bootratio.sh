#!/bin/sh
# Boot-time ratio, run on a node with a real /dev/kvm (the nested L1 or a
# hardware-KVM host): the same guest kernel + agent initramfs booted to
# "husk-agent ready" on the console by husk-vmm and by QEMU -accel kvm
# (microvm and q35, vsock through `husk-vmm vhost-user vsock` as huskd does),
# in interleaved rounds. Prints one line per boot and the medians.
#   HUSK_VMM GUEST_KERNEL GUEST_INITRD CMDLINE (huskd's husk-vmm command line)
#   QCMDLINE (huskd's QEMU command line) [ROUNDS=5] [MEM=512] [QEMU]
#   [BASE_VMM BASE_CMDLINE]: a second husk-vmm column, `husk-vmm-base` (a build and
#   command line from before a change, measured in the same rounds)
set -eu
ROUNDS=${ROUNDS:-5}
MEM=${MEM:-512}
QEMU=${QEMU:-qemu-system-x86_64}
W=$(mktemp -d "${NODE_TMP:-/tmp}/ratio.XXXXXX")
ms() { awk '{ printf "%d\n", $1 * 1000 }' /proc/uptime; }
wait_for() { # FILE TEXT SECS
    n=0
    until grep -q "$2" "$1" 2>/dev/null; do
        n=$((n + 1))
        [ "$n" -gt $(($3 * 20)) ] && { echo "timeout: $2"; tail -5 "$1"; return 1; }
        sleep 0.05
    done
}
rss_kb() { awk '/^VmRSS/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }
stop() { kill -TERM "$1" 2>/dev/null || true; n=0; while kill -0 "$1" 2>/dev/null; do n=$((n+1)); [ $n -gt 100 ] && kill -KILL "$1"; sleep 0.1; done; }

boot_husk() { # NAME VMM CMDLINE
    rm -f "$W/c" "$W/v.sock"
    t0=$(ms)
    "$2" --kernel "$GUEST_KERNEL" --initrd "$GUEST_INITRD" --cmdline "$3" \
        --memory "$MEM" --vsock "cid=3,uds=$W/v.sock" --serial "file:$W/c" &
    p=$!
    wait_for "$W/c" "husk-agent ready" 120
    t=$(($(ms) - t0))
    echo "$1 $t ms rss $(rss_kb $p) kB"
    stop $p
}

boot_qemu() { # microvm | q35
    rm -f "$W/c" "$W/vu.sock" "$W/qv.sock"
    "$HUSK_VMM" vhost-user vsock --cid 3 --socket "$W/vu.sock" --uds "$W/qv.sock" &
    h=$!
    n=0; until [ -S "$W/vu.sock" ]; do n=$((n+1)); [ $n -gt 200 ] && break; sleep 0.05; done
    if [ "$1" = microvm ]; then dev=vhost-user-vsock-device; m=microvm; else dev=vhost-user-vsock-pci; m=q35; fi
    t0=$(ms)
    "$QEMU" -L /usr/share/qemu -L /usr/share/seabios \
        -accel kvm -cpu host -M "$m,memory-backend=mem" -m "$MEM" \
        -object "memory-backend-memfd,id=mem,size=${MEM}M,share=on" \
        -nodefaults -no-user-config -display none -no-reboot \
        -kernel "$GUEST_KERNEL" -initrd "$GUEST_INITRD" -append "$QCMDLINE" \
        -serial "file:$W/c" -chardev "socket,id=vu,path=$W/vu.sock" -device "$dev,chardev=vu" &
    p=$!
    wait_for "$W/c" "husk-agent ready" 120
    t=$(($(ms) - t0))
    echo "qemu-$1 $t ms rss $(($(rss_kb $p) + $(rss_kb $h))) kB"
    stop $p
    stop $h
}

i=0
while [ $i -lt "$ROUNDS" ]; do
    i=$((i + 1))
    boot_husk husk-vmm "$HUSK_VMM" "$CMDLINE"
    [ -n "${BASE_VMM:-}" ] && boot_husk husk-vmm-base "$BASE_VMM" "$BASE_CMDLINE"
    boot_qemu microvm
    boot_qemu q35
done 2>/dev/null | tee "$W/results"
for v in husk-vmm husk-vmm-base qemu-microvm qemu-q35; do
    grep -q "^$v " "$W/results" || continue
    grep "^$v " "$W/results" | awk '{ print $2 }' | sort -n | awk -v v=$v '{ a[NR] = $1 } END { print "median " v " " a[int((NR + 1) / 2)] " ms (" a[1] "-" a[NR] ", " NR " boots)" }'
    grep "^$v " "$W/results" | awk '{ print $5 }' | sort -n | awk -v v=$v '{ a[NR] = $1 } END { print "median-rss " v " " a[int((NR + 1) / 2)] " kB" }'
done

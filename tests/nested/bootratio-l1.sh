#!/usr/bin/env bash
# husk-vmm beside QEMU in one nested L1 node VM whose root is this host's
# (l1.sh boot-host; with hardware KVM the same commands run on this host):
#
#   bootratio-l1.sh ratio [ROUNDS]   boot time to "husk-agent ready" and VMM RSS,
#                                    husk-vmm vs QEMU -accel kvm microvm and q35,
#                                    in interleaved rounds (bootratio.sh; default 10)
#   bootratio-l1.sh bench            `husk bench cri` (the cri_vm bench) with huskd's
#                                    handler `husk` (husk-vmm) and then `husk-qemu`
#                                    (QEMU -accel kvm), one huskd, one run
#   bootratio-l1.sh density          `husk bench density` (the density bench): idle pods
#                                    on handler `husk` (husk-vmm) and then `husk-qemu`
#                                    (QEMU -accel kvm), HUSK_DENSITY_MAX each (default 6):
#                                    host memory per pod, guest RAM apart from the VMM's own
#   bootratio-l1.sh profile          the guest kernel's own boot with huskd's husk-vmm
#                                    command line + initcall_debug: the test guest
#                                    prints its dmesg (where the boot time goes)
#
# The kernel command lines are huskd's (`husk-guest-cmdline vm|qemu`). Needs
# HUSK_GUEST_KERNEL, HUSK_GUEST_INITRD, CARGO_TARGET_DIR with the debug
# binaries built (`cargo build --workspace --bins`; `bench` also builds the
# cri_vm bench), qemu-system-x86_64, socat, busybox, cpio, docker-registry.
# L1_MEM (MiB, default 4096), L1_SMP (default 1). BOOTRATIO_LOG keeps the output;
# CMDLINE replaces huskd's husk-vmm command line (to try a change before making it).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
: "${HUSK_GUEST_KERNEL:?}" "${HUSK_GUEST_INITRD:?}" "${CARGO_TARGET_DIR:?}"
bin=$CARGO_TARGET_DIR/debug
mode=${1:-ratio}
for b in husk-vmm husk-guest-cmdline; do
    [ -x "$bin/$b" ] || { echo "bootratio-l1: $bin/$b missing (cargo build --workspace --bins)" >&2; exit 1; }
done
# CMDLINE overrides huskd's husk-vmm command line (to compare a change before making it).
vmline=${CMDLINE:-$("$bin/husk-guest-cmdline" vm)}
hw=0
if grep -qwE 'vmx|svm' /proc/cpuinfo && [ -c /dev/kvm ]; then hw=1; fi

case $mode in
    ratio)
        script="export HUSK_VMM=$bin/husk-vmm GUEST_KERNEL=$HUSK_GUEST_KERNEL GUEST_INITRD=$HUSK_GUEST_INITRD \
ROUNDS=${2:-10} NODE_TMP=/l1/tmp CMDLINE='$vmline' QCMDLINE='$("$bin/husk-guest-cmdline" qemu)'
echo \"load \$(cat /proc/loadavg)\"; sh $here/bootratio.sh; echo \"load \$(cat /proc/loadavg)\"" ;;
    bench)
        exe=$(cd "$repo" && cargo build -p husk-tests --locked --bench cri_vm --message-format=json \
            | grep -o '"executable":"[^"]*/deps/cri_vm-[^"]*"' | cut -d'"' -f4 | tail -1)
        [ -x "$exe" ] || { echo "bootratio-l1: cri_vm bench not built" >&2; exit 1; }
        script="cd /tmp && export TMPDIR=/l1/tmp HUSK_GUEST_KERNEL=$HUSK_GUEST_KERNEL HUSK_GUEST_INITRD=$HUSK_GUEST_INITRD \
HUSK_BENCH_HANDLER=husk HUSK_BENCH_ALSO=husk-qemu HUSK_BENCH_ACCEL=kvm HUSK_BENCH_POOL=0 \
HUSK_BENCH_RUNS=${HUSK_BENCH_RUNS:-5} HUSK_BENCH_PARALLEL=${HUSK_BENCH_PARALLEL:-4} && $exe --bench" ;;
    density)
        exe=$(cd "$repo" && cargo build -p husk-tests --locked --bench density --message-format=json \
            | grep -o '"executable":"[^"]*/deps/density-[^"]*"' | cut -d'"' -f4 | tail -1)
        [ -x "$exe" ] || { echo "bootratio-l1: density bench not built" >&2; exit 1; }
        script="cd /tmp && export TMPDIR=/l1/tmp HUSK_GUEST_KERNEL=$HUSK_GUEST_KERNEL HUSK_GUEST_INITRD=$HUSK_GUEST_INITRD \
HUSK_DENSITY_HANDLERS=${HUSK_DENSITY_HANDLERS:-husk,husk-qemu} HUSK_BENCH_ACCEL=kvm \
HUSK_DENSITY_VARIANTS=${HUSK_DENSITY_VARIANTS:-default} HUSK_DENSITY_MAX=${HUSK_DENSITY_MAX:-6} \
HUSK_DENSITY_STEP=${HUSK_DENSITY_STEP:-3} HUSK_DENSITY_RESERVE_MIB=${HUSK_DENSITY_RESERVE_MIB:-512} \
HUSK_DENSITY_P99_MS=${HUSK_DENSITY_P99_MS:-100000} && $exe --bench" ;;
    profile)
        tg=$(mktemp /tmp/bootratio-tg.XXXXXX)
        bash "$here/l1.sh" testguest "$tg"
        script="W=\$(mktemp -d /l1/tmp/p.XXXXXX); mkdir \$W/r
printf '#!/bin/sh\ndmesg\n' >\$W/r/test.sh; chmod +x \$W/r/test.sh
(cd \$W/r && find . | cpio -o -H newc 2>/dev/null) >\$W/t.cpio; cat $tg \$W/t.cpio >\$W/initrd
t0=\$(awk '{ printf \"%d\", \$1 * 1000 }' /proc/uptime)
timeout 600 $bin/husk-vmm --kernel $HUSK_GUEST_KERNEL --initrd \$W/initrd --memory 512 --serial file:\$W/c \
    --cmdline \"$vmline initcall_debug\" || echo \"husk-vmm exit \$?\"
echo \"== husk-vmm ran \$((\$(awk '{ printf \"%d\", \$1 * 1000 }' /proc/uptime) - t0)) ms\"
cat \$W/c; rm -rf \$W" ;;
    *) sed -n '2,26p' "$0" >&2; exit 2 ;;
esac

if [ $hw = 1 ]; then
    exec sh -c "$(echo "$script" | sed 's#/l1/tmp#/tmp#g')"
fi
work=$(mktemp -d /tmp/bootratio-l1.XXXXXX)
qpid=
cleanup() {
    [ -n "$qpid" ] && kill "$qpid" 2>/dev/null && wait "$qpid" 2>/dev/null
    rm -rf "$work" "${tg:-}"
}
trap cleanup EXIT
export L1_MEM=${L1_MEM:-4096} L1_SMP=${L1_SMP:-1}
bash "$here/l1.sh" boot-host "$work" "$bin/husk-vmm" >"$work/qemu.log" 2>&1 &
qpid=$!
for _ in $(seq 600); do
    grep -q '^l1: ready' "$work/console.log" 2>/dev/null && break
    kill -0 "$qpid" 2>/dev/null || break
    sleep 0.5
done
grep -q '^l1: ready' "$work/console.log" 2>/dev/null \
    || { echo "bootratio-l1: L1 did not come up" >&2; cat "$work/qemu.log" "$work/console.log" >&2; exit 1; }
echo "bootratio-l1: L1 ready (${L1_MEM} MiB, ${L1_SMP} vCPUs); host load $(cut -d' ' -f1-3 /proc/loadavg)"
bash "$here/l1.sh" run "$work" "$script" 5400 | tee "${BOOTRATIO_LOG:-/dev/null}"

//! Linux guests on husk-vmm: the project's guest kernel with huskd's own
//! command line for husk-vmm pods, booted by husk-vmm on a node with a real
//! /dev/kvm (the nested L1 of tests/nested/l1.sh here, this host itself with
//! hardware KVM). The guest userland is busybox + socat (tests/nested/
//! guest-init); each test appends its /test.sh. One L1 boot serves all of
//! them (they take turns). Needs root, HUSK_GUEST_KERNEL/INITRD, socat,
//! busybox, cpio, and qemu-system-x86_64 without hardware KVM; prints
//! `skipped: <reason>` otherwise.

use std::time::{Duration, Instant};

use husk_host::config::HandlerKind;
use husk_host::sandbox::vm::guest_cmdline;
use husk_tests::nested::{Outcome, with_node};

const TIMEOUT: Duration = Duration::from_secs(240);

/// Shell helpers every script starts with.
const PRELUDE: &str = r#"
W=$(mktemp -d "$NODE_TMP/t.XXXXXX")
# guest_initrd BODY: the test guest whose /test.sh runs BODY
guest_initrd() {
    mkdir -p "$W/r"
    printf '#!/bin/sh\n%s\n' "$1" >"$W/r/test.sh"
    chmod +x "$W/r/test.sh"
    (cd "$W/r" && find . | cpio -o -H newc 2>/dev/null) >"$W/t.cpio"
    cat "$TESTGUEST" "$W/t.cpio" >"$W/initrd"
}
# wait_for FILE TEXT SECS
wait_for() {
    n=0
    while ! grep -q "$2" "$1" 2>/dev/null; do
        n=$((n + 1))
        if [ "$n" -gt $(($3 * 10)) ]; then
            echo "timed out waiting for '$2' in $1:"
            cat "$1"
            return 1
        fi
        sleep 0.1
    done
}
# vmm ARGS...: husk-vmm with the test guest and huskd's command line
vmm() {
    timeout 180 "$HUSK_VMM" --kernel "$GUEST_KERNEL" --initrd "$W/initrd" --cmdline "$CMDLINE$EXTRA" \
        --memory 256 --serial "file:$W/console" "$@"
}
# vmm_bg ARGS...: the same in the background, its pid in $pid
vmm_bg() {
    "$HUSK_VMM" --kernel "$GUEST_KERNEL" --initrd "$W/initrd" --cmdline "$CMDLINE$EXTRA" \
        --memory 256 --serial "file:$W/console" "$@" &
    pid=$!
    # A guest that hangs fails the test with its console instead of stalling the node.
    (sleep 180; kill -KILL $pid 2>/dev/null) &
}
# ctl SOCKET LINE: one control-socket request, prints the answer
ctl() { printf '%s\n' "$2" | socat -t 10 - "UNIX-CONNECT:$1"; }
ms() { awk '{ printf "%d\n", $1 * 1000 }' /proc/uptime; }
"#;

fn run(name: &str, script: &str) -> Option<Outcome> {
    let cmdline = guest_cmdline(HandlerKind::Vm);
    assert!(!cmdline.contains("noapic "), "{cmdline}");
    let full = format!("export CMDLINE='{cmdline}' EXTRA=''\n{PRELUDE}\n{script}");
    with_node(|node| {
        let t0 = Instant::now();
        let out = node
            .run(&full, TIMEOUT)
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        println!(
            "{name}: exit {} after {:?} ({})\n{}",
            out.code,
            t0.elapsed(),
            if node.nested() {
                "nested L1"
            } else {
                "this host"
            },
            out.output
        );
        out
    })
}

/// huskd's husk-vmm command line boots (no `noapic`: the MP table routes
/// every ISA IRQ through the IOAPIC), both vCPUs come up, the serial console
/// carries the guest's output, and the guest's reboot ends husk-vmm with 0.
#[test]
fn linux_boots_smp_with_huskd_cmdline_and_reboots_cleanly() {
    let Some(out) = run(
        "boot",
        r#"
guest_initrd 'echo "guest: cmdline $(cat /proc/cmdline)"; dmesg | grep -iE "ExtINT|IO-APIC|panic|i8042|serio" | sed "s/^/guest: dmesg /"
grep -qw tsc_deadline_timer /proc/cpuinfo && echo "guest: cpu flag tsc_deadline_timer"
for c in /sys/devices/system/clockevents/clockevent*; do echo "guest: clockevent $(cat $c/current_device)"; done
echo "guest: clocksource $(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"; exit 0'
t0=$(ms)
vmm --vcpus 2 && rc=0 || rc=$?
echo "husk-vmm exit $rc after $(($(ms) - t0)) ms"
cat "$W/console"
[ "$rc" = 0 ]
"#,
    ) else {
        return;
    };
    let text = out.ok("boot");
    assert!(text.contains("guest: up, 2 cpus"), "{text}");
    assert!(text.contains("guest: test rc=0"), "{text}");
    assert!(text.contains("guest: rebooting"), "{text}");
    assert!(!text.contains("ExtINT not setup"), "{text}");
    assert!(!text.contains("Kernel panic"), "{text}");
    assert!(text.contains("i8042"), "keyboard controller found: {text}");
    // The boot tuning: the LAPIC timer in TSC-deadline mode on every vCPU (CPUID offers
    // it, so the guest neither calibrates it against the PIT nor runs the PIT).
    assert!(
        text.contains("guest: cpu flag tsc_deadline_timer"),
        "{text}"
    );
    let events: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split("guest: clockevent ").nth(1))
        .collect();
    assert_eq!(events, ["lapic-deadline", "lapic-deadline"], "{text}");
}

/// SIGTERM → Ctrl-Alt-Del the guest's keyboard driver decodes → the guest
/// reboots → husk-vmm exits 0 (the grace period, 60 s here so that a slow
/// nested guest is not cut short, ends it with 143 instead).
#[test]
fn sigterm_stops_linux_guest_cleanly() {
    let Some(out) = run(
        "sigterm",
        r#"
guest_initrd 'exit 0'
EXTRA=' husk_hold'
vmm_bg --vcpus 2 --stop-grace-ms 60000
wait_for "$W/console" "guest: holding" 120
t0=$(ms)
kill -TERM $pid
wait $pid && rc=0 || rc=$?
echo "husk-vmm exit $rc $(($(ms) - t0)) ms after SIGTERM"
cat "$W/console"
[ "$rc" = 0 ]
"#,
    ) else {
        return;
    };
    let text = out.ok("sigterm");
    let ms: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("husk-vmm exit 0 "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no exit line: {text}"));
    assert!(
        ms < 5000,
        "stopped by the grace period, not the guest: {text}"
    );
    assert!(!text.contains("Unknown key"), "{text}");
}

/// Hybrid vsock both ways, 1 MiB each, in writes of 128 KiB: guest → host
/// (guest connects to CID 2, husk-vmm dials `<uds>_PORT`) and host → guest
/// (`CONNECT PORT` on the uds), checked by digest. The guest closes and reboots as soon as it
/// has written: nothing husk-vmm held for the host may be lost on the way out.
#[test]
fn vsock_moves_a_mebibyte_each_way() {
    let Some(out) = run(
        "vsock",
        r#"
guest_initrd '
socat -u -b 131072 VSOCK-LISTEN:5001 CREATE:/tmp/h2g &
sleep 0.2
echo "guest: listening"
dd if=/dev/urandom of=/tmp/g2h bs=65536 count=16 2>/dev/null
echo "guest: g2h-sum $(md5sum </tmp/g2h | cut -d" " -f1)"
socat -u -b 131072 OPEN:/tmp/g2h VSOCK-CONNECT:2:5000 || echo "guest: g2h failed"
wait
echo "guest: h2g-sum $(md5sum </tmp/h2g | cut -d" " -f1) size $(wc -c </tmp/h2g)"'
dd if=/dev/urandom of="$W/h2g" bs=65536 count=16 2>/dev/null
socat -u -b 131072 "UNIX-LISTEN:$W/v.sock_5000" "CREATE:$W/g2h" &
lpid=$!
vmm_bg --vcpus 2 --vsock "cid=3,uds=$W/v.sock"
wait_for "$W/console" "guest: listening" 120
ok=
for i in 1 2 3 4 5 6 7 8 9 10; do
    if socat -b 131072 "UNIX-CONNECT:$W/v.sock" SYSTEM:"echo CONNECT 5001; read a; echo \"\$a\" >$W/ok; cat $W/h2g" ; then
        grep -q '^OK' "$W/ok" && { ok=1; break; }
    fi
    sleep 0.5
done
[ -n "$ok" ] || { echo "host: no OK from CONNECT"; cat "$W/ok"; }
# The guest closes its g2h connection and reboots without waiting for the host to read:
# what husk-vmm still holds for the host is drained before the RST and at exit.
wait $pid && rc=0 || rc=$?
wait $lpid || true
cat "$W/console"
echo "host: h2g-sum $(md5sum <"$W/h2g" | cut -d' ' -f1)"
echo "host: g2h-sum $(md5sum <"$W/g2h" | cut -d' ' -f1) size $(wc -c <"$W/g2h")"
echo "husk-vmm exit $rc"
[ "$rc" = 0 ]
"#,
    ) else {
        return;
    };
    let text = out.ok("vsock");
    let field = |prefix: &str| -> String {
        text.lines()
            .find_map(|l| {
                l.find(prefix)
                    .map(|i| l[i + prefix.len()..].trim().to_string())
            })
            .unwrap_or_else(|| panic!("no {prefix:?} in {text}"))
    };
    let h2g_sent = field("host: h2g-sum ");
    let g2h_got = field("host: g2h-sum ");
    let g2h_sent = field("guest: g2h-sum ");
    let h2g_got = field("guest: h2g-sum ");
    assert_eq!(g2h_got, format!("{g2h_sent} size 1048576"), "guest→host");
    assert_eq!(h2g_got, format!("{h2g_sent} size 1048576"), "host→guest");
}

/// virtio-blk: a read-write disk written with O_SYNC and fsync (flush) and
/// read back by the host; a read-only disk read by digest and refusing writes.
#[test]
fn virtio_blk_read_write_flush_and_read_only() {
    let Some(out) = run(
        "blk",
        r#"
guest_initrd '
echo "guest: vdb-sum $(head -c 4194304 /dev/vdb | md5sum | cut -d" " -f1)"
dd if=/dev/vdb of=/dev/vda bs=65536 count=64 conv=fsync 2>/dev/null && echo "guest: vda written"
echo x | dd of=/dev/vdb bs=512 count=1 conv=fsync 2>/dev/null && echo "guest: vdb WRITABLE" || echo "guest: vdb refused write"
echo "guest: ro=$(cat /sys/block/vdb/ro)"'
dd if=/dev/zero of="$W/rw.img" bs=1M count=4 2>/dev/null
dd if=/dev/urandom of="$W/ro.img" bs=1M count=4 2>/dev/null
vmm --disk "id=rw,path=$W/rw.img" --disk "id=ro,path=$W/ro.img,ro" && rc=0 || rc=$?
cat "$W/console"
echo "host: ro-sum $(md5sum <"$W/ro.img" | cut -d' ' -f1)"
echo "host: rw-sum $(md5sum <"$W/rw.img" | cut -d' ' -f1)"
echo "husk-vmm exit $rc"
[ "$rc" = 0 ]
"#,
    ) else {
        return;
    };
    let text = out.ok("blk");
    let sum = |p: &str| {
        text.lines()
            .find_map(|l| l.find(p).map(|i| l[i + p.len()..].trim().to_string()))
            .unwrap_or_else(|| panic!("no {p:?}: {text}"))
    };
    assert_eq!(sum("guest: vdb-sum "), sum("host: ro-sum "), "read");
    assert_eq!(
        sum("host: rw-sum "),
        sum("host: ro-sum "),
        "written+flushed"
    );
    assert!(text.contains("guest: vda written"), "{text}");
    assert!(text.contains("guest: vdb refused write"), "{text}");
    assert!(text.contains("guest: ro=1"), "{text}");
}

/// Disk slots: an empty slot filled at run time (the guest sees the new
/// capacity and the content), then emptied (capacity back to 0).
#[test]
fn disk_slot_filled_and_emptied_at_run_time() {
    let Some(out) = run(
        "slots",
        r#"
guest_initrd '
echo "guest: slot size $(cat /sys/block/vda/size)"
n=0; while [ "$(cat /sys/block/vda/size)" = 0 ] && [ $n -lt 600 ]; do sleep 0.1; n=$((n+1)); done
echo "guest: slot filled size $(cat /sys/block/vda/size) sum $(head -c 2097152 /dev/vda | md5sum | cut -d" " -f1)"
n=0; while [ "$(cat /sys/block/vda/size)" != 0 ] && [ $n -lt 600 ]; do sleep 0.1; n=$((n+1)); done
echo "guest: slot emptied size $(cat /sys/block/vda/size)"'
dd if=/dev/urandom of="$W/img" bs=1M count=2 2>/dev/null
vmm_bg --disk-slots 2 --control-socket "$W/ctl"
wait_for "$W/console" "guest: slot size" 120
echo "attach: $(ctl "$W/ctl" "disk-attach 0 $W/img img0")"
wait_for "$W/console" "guest: slot filled" 60
echo "disks: $(ctl "$W/ctl" disks)"
echo "detach: $(ctl "$W/ctl" "disk-detach 0")"
wait_for "$W/console" "guest: slot emptied" 60
wait $pid && rc=0 || rc=$?
cat "$W/console"
echo "host: sum $(md5sum <"$W/img" | cut -d' ' -f1)"
echo "husk-vmm exit $rc"
[ "$rc" = 0 ]
"#,
    ) else {
        return;
    };
    let text = out.ok("slots");
    assert!(text.contains("guest: slot size 0"), "{text}");
    assert!(text.contains("attach: ok"), "{text}");
    assert!(text.contains("detach: ok"), "{text}");
    assert!(
        text.contains("0=img0"),
        "disks lists the filled slot: {text}"
    );
    let host = text
        .lines()
        .find_map(|l| l.strip_prefix("host: sum "))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        text.contains(&format!("guest: slot filled size 4096 sum {host}")),
        "{text}"
    );
    assert!(text.contains("guest: slot emptied size 0"), "{text}");
}

/// virtio-net through a tap on the node: the guest pings the node's end.
#[test]
fn virtio_net_through_a_tap() {
    let Some(out) = run(
        "net",
        r#"
guest_initrd '
ip link set eth0 up && ip addr add 10.77.0.2/24 dev eth0
n=0; until ping -c 1 -W 1 10.77.0.1 >/dev/null 2>&1; do n=$((n+1)); [ $n -gt 60 ] && break; done
ping -c 3 -W 2 10.77.0.1 | sed "s/^/guest: /"'
tap=hnt$$
vmm_bg --net "tap=$tap"
n=0; until ip link show "$tap" >/dev/null 2>&1; do n=$((n+1)); [ $n -gt 600 ] && break; sleep 0.1; done
ip addr add 10.77.0.1/24 dev "$tap"
ip link set "$tap" up
wait $pid && rc=0 || rc=$?
cat "$W/console"
echo "husk-vmm exit $rc"
[ "$rc" = 0 ]
"#,
    ) else {
        return;
    };
    let text = out.ok("net");
    assert!(
        text.contains("3 packets transmitted, 3 packets received"),
        "{text}"
    );
}

/// The in-process virtio-fs server: the guest reads a file the node wrote
/// and writes one the node reads.
#[test]
fn virtio_fs_read_and_write() {
    let Some(out) = run(
        "fs",
        r#"
guest_initrd '
mkdir -p /mnt/s && mount -t virtiofs share /mnt/s && echo "guest: mounted"
echo "guest: read $(cat /mnt/s/in.txt)"
dd if=/dev/urandom of=/tmp/big bs=65536 count=16 2>/dev/null
cp /tmp/big /mnt/s/big && echo "guest: big-sum $(md5sum </tmp/big | cut -d" " -f1)"
echo from-guest >/mnt/s/out.txt
sync
umount /mnt/s && echo "guest: unmounted"'
mkdir -p "$W/share"
echo from-node >"$W/share/in.txt"
vmm --fs "tag=share,dir=$W/share" && rc=0 || rc=$?
cat "$W/console"
echo "host: out $(cat "$W/share/out.txt")"
echo "host: big-sum $(md5sum <"$W/share/big" | cut -d' ' -f1)"
echo "husk-vmm exit $rc"
[ "$rc" = 0 ]
"#,
    ) else {
        return;
    };
    let text = out.ok("fs");
    assert!(text.contains("guest: read from-node"), "{text}");
    assert!(text.contains("host: out from-guest"), "{text}");
    assert!(text.contains("guest: unmounted"), "{text}");
    let sum = |p: &str| {
        text.lines()
            .find_map(|l| l.find(p).map(|i| l[i + p.len()..].trim().to_string()))
            .unwrap_or_else(|| panic!("no {p:?}: {text}"))
    };
    assert_eq!(sum("guest: big-sum "), sum("host: big-sum "));
}

/// virtio-balloon free page reporting (`--balloon`, huskd's `free_page_reporting`): the guest
/// fills 64 MiB of tmpfs, frees it, and the host pages behind what it freed go back: husk-vmm's
/// resident memory falls by at least half of that within seconds.
#[test]
fn freed_guest_memory_goes_back_to_the_host() {
    let Some(out) = run(
        "balloon",
        r#"
guest_initrd '
echo "guest: balloon devices $(ls /sys/bus/virtio/drivers/virtio_balloon 2>/dev/null | grep -c ^virtio)"
dd if=/dev/zero of=/tmp/fill bs=1M count=64 2>/dev/null; sync; echo "guest: filled"; sleep 4
rm /tmp/fill; echo "guest: freed"; sleep 10; echo "guest: done"; sleep 4'
EXTRA=' page_reporting.page_reporting_order=0'
vmm_bg --balloon
wait_for "$W/console" "guest: filled" 150 || exit 1
sleep 1; filled=$(awk '/^VmRSS/{print $2}' /proc/$pid/status)
wait_for "$W/console" "guest: done" 150 || exit 1
after=$(awk '/^VmRSS/{print $2}' /proc/$pid/status)
wait $pid; rc=$?
cat "$W/console"
echo "host: rss filled ${filled} kB, after free ${after} kB, returned $((filled - after)) kB"
echo "husk-vmm exit $rc"
[ "$rc" = 0 ]
"#,
    ) else {
        return;
    };
    let text = out.ok("balloon");
    assert!(text.contains("guest: balloon devices 1"), "{text}");
    let returned: i64 = text
        .lines()
        .find_map(|l| l.split("returned ").nth(1))
        .and_then(|v| v.trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no RSS figures: {text}"));
    assert!(
        returned >= 32 * 1024,
        "only {returned} kB of 64 MiB freed in the guest went back: {text}"
    );
}

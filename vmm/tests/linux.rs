//! Boots a real Linux guest kernel when one is provided:
//!   HUSK_TEST_KERNEL=path/to/vmlinux-or-bzImage  [HUSK_TEST_INITRD=path]
//!   [HUSK_TEST_MARKER=text printed by the initrd's init, default "Linux version"]
//!   [HUSK_TEST_LINUX_TIMEOUT=seconds, default 300]
//! The kernel comes from `images/` (the VM sandbox issue). On kvm-pvm hosts a Linux guest never
//! reaches user space, so the test skips unless a kernel is given explicitly.

mod common;
use common::*;

use std::time::{Duration, Instant};

#[test]
fn linux_guest_boots_to_marker() {
    let Ok(kernel) = std::env::var("HUSK_TEST_KERNEL") else {
        println!(
            "skipped: HUSK_TEST_KERNEL not set (no Linux guest kernel on this host; see the VM sandbox issue)"
        );
        return;
    };
    if !kvm_usable() {
        return;
    }
    let marker = std::env::var("HUSK_TEST_MARKER").unwrap_or_else(|_| "Linux version".into());
    let secs: u64 = std::env::var("HUSK_TEST_LINUX_TIMEOUT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let mut a = vec![
        "--kernel".to_string(),
        kernel,
        "--memory".into(),
        "256".into(),
        "--vcpus".into(),
        "2".into(),
        "--cmdline".into(),
        // No `noapictimer`: husk-vmm offers the TSC-deadline LAPIC timer, so Linux starts no
        // PIT, and without the LAPIC timer it would have no clock event device at all.
        "console=ttyS0 reboot=k panic=-1".into(),
    ];
    if let Ok(initrd) = std::env::var("HUSK_TEST_INITRD") {
        a.extend(["--initrd".to_string(), initrd]);
    }
    let mut vm = Vm::spawn(&a);
    let t0 = Instant::now();
    let found = vm.line_within(&marker, Duration::from_secs(secs));
    assert!(
        found.is_some(),
        "no {marker:?} on the serial console within {secs} s; saw {:#?}",
        vm.seen
    );
    println!("linux: {marker:?} after {:?}", t0.elapsed());
}

#![allow(clippy::unwrap_used)]
//! huskd's side of husk-vmm's disk slots (`sandbox::vm::husk_vmm::vmmctl`) against a real husk-vmm:
//! `attach_disk` fills the first empty slot, finds an image's slot again (idempotent per image,
//! from husk-vmm's own `disks` answer, as after a huskd restart), empties a slot whose image no
//! container uses for another image, and reports slots full of used images. The
//! slots are VMM state, so the guest need not get far: any kernel husk-vmm loads will do (the
//! guest side is tested in vmm/tests/block.rs and tests/tests/runtime_vm.rs).
//!
//! Needs /dev/kvm and HUSK_GUEST_KERNEL; prints `skipped: <reason>` otherwise.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use husk_host::sandbox::vm::husk_vmm::vmmctl::{self, VmmCtlError};
use husk_tests::require;

#[tokio::test]
async fn attach_disk_fills_slots_in_order_idempotently() {
    let kernel = std::env::var("HUSK_GUEST_KERNEL").unwrap_or_default();
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    require!(
        kvm && Path::new(&kernel).is_file(),
        "needs /dev/kvm and HUSK_GUEST_KERNEL"
    );
    let d = tempfile::tempdir().unwrap();
    let sock = d.path().join("control.sock");
    let mut vmm = Command::new(husk_tests::bin_path("husk-vmm"))
        .args(["--kernel", &kernel, "--memory", "64", "--serial", "none"])
        .args(["--disk-slots", "2", "--control-socket"])
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !sock.exists() && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let timeout = Duration::from_secs(5);
    let img = |name: &str| {
        let p = d.path().join(name);
        std::fs::write(&p, vec![1u8; 8192]).unwrap();
        p
    };
    let (a, b, c) = (img("a.erofs"), img("b.erofs"), img("c.erofs"));
    let all = |_: &str| true;
    let result = async {
        assert_eq!(vmmctl::disks(&sock, timeout).await.unwrap(), [None, None]);
        vmmctl::attach_disk(&sock, &a, "imga", timeout, &all)
            .await
            .unwrap();
        vmmctl::attach_disk(&sock, &a, "imga", timeout, &all)
            .await
            .unwrap();
        vmmctl::attach_disk(&sock, &b, "imgb", timeout, &all)
            .await
            .unwrap();
        assert_eq!(
            vmmctl::disks(&sock, timeout).await.unwrap(),
            [Some("imga".to_string()), Some("imgb".to_string())]
        );
        let e = vmmctl::attach_disk(&sock, &c, "imgc", timeout, &all)
            .await
            .unwrap_err();
        assert!(matches!(e, VmmCtlError::Full(2)), "{e}");
        // imga is no container's any more: its slot takes imgc.
        vmmctl::attach_disk(&sock, &c, "imgc", timeout, &|s| s != "imga")
            .await
            .unwrap();
        assert_eq!(
            vmmctl::disks(&sock, timeout).await.unwrap(),
            [Some("imgc".to_string()), Some("imgb".to_string())]
        );
        // husk-vmm's own refusals come back as errors with its reason.
        let e = vmmctl::command(&sock, "disk-attach 0 /nonexistent x", timeout)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("already holds disk"), "{e}");
        let e = vmmctl::command(&sock, "disk-attach 9 /nonexistent x", timeout)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("no disk slot"), "{e}");
    };
    // The VMM goes whatever the assertions say.
    let r = tokio::time::timeout(Duration::from_secs(60), result).await;
    let _ = vmm.kill();
    let _ = vmm.wait();
    r.unwrap();
}

//! virtio-blk end to end: the guest reads known sectors, writes and reads back, flushes, gets
//! the disk id, and sees a read-only disk refuse writes.

mod common;
use common::*;

fn disk_image() -> Vec<u8> {
    (0..128 * 512u32)
        .map(|i| ((i / 512) as u8).wrapping_mul(3) ^ (i as u8))
        .collect()
}

/// The guest's checksum of the first 4 KiB.
fn guest_sum(d: &[u8]) -> u32 {
    d[..4096]
        .iter()
        .fold(0u32, |s, b| s.wrapping_mul(31).wrapping_add(*b as u32))
}

#[test]
fn block_read_write_flush_id_and_read_only() {
    if !kvm_usable() {
        return;
    }
    let dir = tempdir();
    let rw = tmp_path(&dir, "rw.img");
    let ro = tmp_path(&dir, "ro.img");
    let img = disk_image();
    std::fs::write(&rw, &img).expect("w");
    std::fs::write(&ro, &img).expect("w");
    let d1 = format!("id=rootdisk,path={}", rw.display());
    let d2 = format!("id=layers,path={},ro", ro.display());
    let mut vm = Vm::spawn(&args(GUEST_PVH, "blk", &["--disk", &d1, "--disk", &d2]));
    let sum = format!("sum={:08x}", guest_sum(&img));

    assert!(
        vm.expect_line("blk: isr=").ends_with("isr=1 after-ack=0"),
        "used-buffer interrupt status"
    );
    assert!(
        vm.expect_line("blk: id=")
            .contains("id=rootdisk status=0 sectors=128 ro=0")
    );
    assert!(
        vm.expect_line("blk: read")
            .contains(&format!("status=0 {sum}"))
    );
    assert!(vm.expect_line("blk: write").ends_with("status=0"));
    assert!(
        vm.expect_line("blk: flush")
            .ends_with("flush status=0 readback status=0 match=1")
    );
    // Completion interrupt through irqfd -> IOAPIC pin 5 -> LAPIC -> the guest's handler.
    assert!(vm.expect_line("blk: irq").ends_with("irq 5 delivered=1"));
    assert!(vm.expect_line("blk: beyond-end").ends_with("status=1"));

    assert!(
        vm.expect_line("blk: id=")
            .contains("id=layers status=0 sectors=128 ro=1")
    );
    assert!(
        vm.expect_line("blk: read")
            .contains(&format!("status=0 {sum}"))
    );
    assert!(
        vm.expect_line("blk: write").ends_with("status=1"),
        "read-only disk refuses writes"
    );
    assert!(vm.expect_line("blk: flush").ends_with("match=0"));
    assert!(vm.expect_line("blk: irq").ends_with("irq 6 delivered=1"));
    vm.expect_line("HUSK_GUEST_DONE");
    assert_eq!(vm.wait().0, 0);

    let after = std::fs::read(&rw).expect("r");
    let expect: Vec<u8> = (0..512u32).map(|i| (i as u8) ^ 0xa5).collect();
    assert_eq!(&after[1024..1536], &expect[..], "sector 2 written through");
    assert_eq!(&after[..1024], &img[..1024]);
    assert_eq!(&after[1536..], &img[1536..]);
    assert_eq!(
        std::fs::read(&ro).expect("r"),
        img,
        "read-only image untouched"
    );
}

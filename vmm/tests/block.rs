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

/// One control-socket command, its one-line answer (without the newline).
fn ctl(sock: &std::path::Path, cmd: &str) -> String {
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::os::unix::net::UnixStream::connect(sock).expect("connect control socket");
    s.write_all(format!("{cmd}\n").as_bytes()).expect("w");
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).expect("reply");
    line.trim_end().to_string()
}

#[test]
fn disk_slot_filled_at_run_time_raises_config_change() {
    if !kvm_usable() {
        return;
    }
    let dir = tempdir();
    let sock = tmp_path(&dir, "ctl.sock");
    let image = tmp_path(&dir, "an image.img");
    let img = disk_image();
    std::fs::write(&image, &img).expect("w");
    let mut vm = Vm::spawn(&args(
        GUEST_PVH,
        "husk.wait",
        &["--disk-slots", "1", "--control-socket", &path_str(&sock)],
    ));
    // The slot is an empty read-only disk: no capacity, no serial, reads fail.
    let l = vm.expect_line("blkslot: empty");
    assert!(l.ends_with("sectors=0 gen=0 id= id_status=0"), "{l}");
    assert!(vm.expect_line("blkslot: read-empty").ends_with("status=1"));
    vm.expect_line("blkslot: waiting");
    // The guest runs: the VMM has given up every capability and installed its seccomp filter
    // (disk-attach below opens files all the same).
    assert_eq!(
        confinement(vm.child.id()),
        ("1".into(), "2".into(), "0000000000000000".into())
    );
    assert_eq!(ctl(&sock, "disks"), "disks 0=-");
    assert!(ctl(&sock, "disk-attach 0").starts_with("error usage"));
    assert!(ctl(&sock, "disk-attach 1 /x s").starts_with("error no disk slot"));
    let missing = format!("disk-attach 0 {}/missing s", dir.path().display());
    assert!(ctl(&sock, &missing).starts_with("error slot 0: cannot open disk"));
    let bad_serial = format!("disk-attach 0 {} {}", image.display(), "s".repeat(21));
    assert!(ctl(&sock, &bad_serial).starts_with("error slot 0: serial"));
    assert_eq!(
        ctl(&sock, "disks"),
        "disks 0=-",
        "refusals leave the slot empty"
    );

    let t = std::time::Instant::now();
    let attach = format!("disk-attach 0 {} img0123456789abcdef", image.display());
    assert_eq!(ctl(&sock, &attach), "ok");
    // The guest idles in hlt until the config-change interrupt (ISR bit 1), then re-reads the
    // capacity (new generation), the serial and the new file's bytes.
    let l = vm.expect_line("blkslot: isr=");
    let seen = t.elapsed();
    assert!(l.ends_with("isr=2 sectors=128 gen=1"), "{l}");
    println!("disk-attach to the guest printing the new capacity: {seen:?}");
    let l = vm.expect_line("blkslot: filled");
    assert!(l.ends_with("id=img0123456789abcdef id_status=0"), "{l}");
    let sum = format!("status=0 sum={:08x}", guest_sum(&img));
    assert!(vm.expect_line("blkslot: read").ends_with(&sum));
    assert!(vm.expect_line("blkslot: beyond-end").ends_with("status=1"));
    vm.expect_line("waiting for ctrl-alt-del");
    assert_eq!(ctl(&sock, "disks"), "disks 0=img0123456789abcdef");
    let again = ctl(&sock, &attach);
    assert!(
        again.contains("already holds disk"),
        "a filled slot is never swapped: {again}"
    );
    // Emptied (the guest is done with it), the slot takes a disk again.
    assert!(ctl(&sock, "disk-detach 3").starts_with("error no disk slot"));
    assert_eq!(ctl(&sock, "disk-detach 0"), "ok");
    assert_eq!(ctl(&sock, "disks"), "disks 0=-");
    assert_eq!(ctl(&sock, "disk-detach 0"), "ok", "idempotent");
    let other = format!("disk-attach 0 {} imgother", image.display());
    assert_eq!(ctl(&sock, &other), "ok");
    assert_eq!(ctl(&sock, "disks"), "disks 0=imgother");
    assert_eq!(ctl(&sock, "stop"), "ok");
    assert_eq!(vm.wait().0, 0);
}

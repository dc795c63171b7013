//! virtio-fs as husk-vmm's own MMIO device: the bare-metal test guest drives the queues with
//! raw FUSE requests (INIT, LOOKUP, OPEN, READ, CREATE, WRITE) against a host directory, and a
//! LOOKUP of `..` and a malformed request come back as errors.

mod common;
use common::*;

use std::os::unix::fs::MetadataExt;

#[test]
fn raw_fuse_requests_from_the_test_guest() {
    if !kvm_usable() {
        return;
    }
    let dir = tempdir();
    let share = dir.path().join("share");
    std::fs::create_dir(&share).expect("mkdir");
    std::fs::write(share.join("hello.txt"), b"hello from the host").expect("write");
    std::fs::write(dir.path().join("outside"), b"secret").expect("write");
    let spec = format!("tag=share0,dir={}", share.display());
    let mut vm = Vm::spawn(&args(GUEST_PVH, "fs", &["--fs", &spec]));

    assert!(vm.expect_line("fs: tag=").ends_with("tag=share0 queues=1"));
    assert!(
        vm.expect_line("fs: init")
            .ends_with("errno=0 major=7 len=80")
    );
    assert!(vm.expect_line("fs: lookup").ends_with("errno=0 size=19"));
    assert!(vm.expect_line("fs: open").ends_with("errno=0"));
    assert!(
        vm.expect_line("fs: read")
            .ends_with("errno=0 data=hello from the host")
    );
    assert!(vm.expect_line("fs: create").ends_with("errno=0"));
    assert!(vm.expect_line("fs: write").ends_with("errno=0 size=26"));
    assert!(
        vm.expect_line("fs: escape").ends_with("errno=1"),
        "LOOKUP .. is EPERM"
    );
    assert!(
        vm.expect_line("fs: malformed").ends_with("errno=22"),
        "EINVAL"
    );
    vm.expect_line("HUSK_GUEST_DONE");
    assert_eq!(vm.wait().0, 0);

    let f = share.join("fromguest");
    assert_eq!(
        std::fs::read(&f).expect("read"),
        b"written by the test guest\n"
    );
    assert_eq!(std::fs::metadata(&f).expect("meta").mode() & 0o777, 0o644);
}

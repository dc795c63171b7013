use super::*;
use crate::devices::virtio::queue::tests::{F_NEXT, F_WRITE, desc, parse};
use vm_memory::{Bytes, GuestAddress};

fn setup(ro: bool) -> (BlockDevice, GuestMemoryMmap, tempfile::NamedTempFile) {
    let f = tempfile::NamedTempFile::new().expect("tmp");
    let data: Vec<u8> = (0..8 * 512u32).map(|i| (i / 512) as u8).collect();
    std::fs::write(f.path(), &data).expect("write");
    let ch = Arc::new(DeviceChannel::new().expect("ch"));
    let irq = Arc::new(Interrupt::new().expect("irq"));
    let dev = BlockDevice::open(f.path(), ro, "disk0", ch, irq, EventFd::new(0).expect("e"))
        .expect("open");
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("mem");
    (dev, mem, f)
}

fn req(mem: &GuestMemoryMmap, kind: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&kind.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(0x1000)).expect("hdr");
}

fn run(
    dev: &mut BlockDevice,
    mem: &GuestMemoryMmap,
    descs: &[virtio_queue::desc::RawDescriptor],
) -> (u8, usize) {
    let segs = parse(mem, descs, MAX_REQUEST_BYTES + 4096).expect("chain");
    dev.execute(&segs, mem)
}

#[test]
fn read_write_flush_id() {
    let (mut dev, mem, f) = setup(false);
    assert_eq!(dev.info().config[..8], 8u64.to_le_bytes());
    req(&mem, T_IN, 3);
    let d = [
        desc(0x1000, 16, F_NEXT, 1),
        desc(0x2000, 1024, F_WRITE | F_NEXT, 2),
        desc(0x3000, 1, F_WRITE, 0),
    ];
    assert_eq!(run(&mut dev, &mem, &d), (S_OK, 1024));
    let mut b = [0u8; 1024];
    mem.read_slice(&mut b, GuestAddress(0x2000)).expect("r");
    assert!(b[..512].iter().all(|x| *x == 3) && b[512..].iter().all(|x| *x == 4));

    mem.write_slice(&[0xab; 512], GuestAddress(0x4000))
        .expect("w");
    req(&mem, T_OUT, 7);
    let d = [
        desc(0x1000, 16, F_NEXT, 1),
        desc(0x4000, 512, F_NEXT, 2),
        desc(0x3000, 1, F_WRITE, 0),
    ];
    assert_eq!(run(&mut dev, &mem, &d), (S_OK, 0));
    assert!(
        std::fs::read(f.path()).expect("r")[7 * 512..]
            .iter()
            .all(|x| *x == 0xab)
    );

    req(&mem, T_FLUSH, 0);
    assert_eq!(
        run(
            &mut dev,
            &mem,
            &[desc(0x1000, 16, F_NEXT, 1), desc(0x3000, 1, F_WRITE, 0)]
        ),
        (S_OK, 0)
    );
    req(&mem, T_GET_ID, 0);
    let d = [
        desc(0x1000, 16, F_NEXT, 1),
        desc(0x5000, 20, F_WRITE | F_NEXT, 2),
        desc(0x3000, 1, F_WRITE, 0),
    ];
    assert_eq!(run(&mut dev, &mem, &d), (S_OK, 20));
    let mut id = [0u8; 5];
    mem.read_slice(&mut id, GuestAddress(0x5000)).expect("r");
    assert_eq!(&id, b"disk0");
    req(&mem, 99, 0);
    assert_eq!(
        run(
            &mut dev,
            &mem,
            &[desc(0x1000, 16, F_NEXT, 1), desc(0x3000, 1, F_WRITE, 0)]
        )
        .0,
        S_UNSUPP
    );
}

#[test]
fn queue_processing_survives_malformed_chains() {
    use crate::devices::virtio::queue::tests::{MockSplitQueue, used};
    let (mut dev, mem, _f) = setup(false);
    let q = MockSplitQueue::create(&mem, GuestAddress(0x8_0000), 16);
    dev.active = Some((mem.clone(), q.create_queue().expect("q")));
    req(&mem, T_IN, 1);
    q.add_desc_chains(
        &[
            // Good read of one sector.
            desc(0x1000, 16, F_NEXT, 1),
            desc(0x2000, 512, F_WRITE | F_NEXT, 2),
            desc(0x3000, 1, F_WRITE, 0),
            // Data descriptor outside guest memory.
            desc(0x1000, 16, F_NEXT, 4),
            desc(0xdead_0000, 512, F_WRITE | F_NEXT, 5),
            desc(0x3000, 1, F_WRITE, 0),
            // No status byte at all.
            desc(0x1000, 16, 0, 0),
            // A loop: 7 -> 8 -> 7 ...
            desc(0x1000, 16, F_NEXT, 8),
            desc(0x3000, 1, F_WRITE | F_NEXT, 7),
        ],
        0,
    )
    .expect("chains");
    dev.process_queue();
    let u = used(&mem, &q);
    assert_eq!(u.len(), 4, "all chains returned: {u:?}");
    assert_eq!(u[0], (0, 513));
    assert_eq!((u[1].1, u[2].1), (0, 0));
    let mut b = [0u8; 512];
    mem.read_slice(&mut b, GuestAddress(0x2000)).expect("r");
    assert!(b.iter().all(|x| *x == 1), "sector 1 read");
    assert!(
        dev.interrupt
            .status
            .load(std::sync::atomic::Ordering::SeqCst)
            & 1
            == 1
    );
}

#[test]
fn large_requests_stream_through_the_bounce_buffer() {
    let f = tempfile::NamedTempFile::new().expect("tmp");
    let data: Vec<u8> = (0..300 * 1024u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(f.path(), &data).expect("w");
    let ch = Arc::new(DeviceChannel::new().expect("ch"));
    let irq = Arc::new(Interrupt::new().expect("irq"));
    let mut dev = BlockDevice::open(f.path(), false, "big", ch, irq, EventFd::new(0).expect("e"))
        .expect("open");
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).expect("mem");
    assert_eq!(dev.info().config[12..16], 254u32.to_le_bytes(), "seg_max");
    // 200 KiB read over two data descriptors, then written back 1 sector further.
    req(&mem, T_IN, 0);
    let d = [
        desc(0x1000, 16, F_NEXT, 1),
        desc(0x10_0000, 150 * 1024, F_WRITE | F_NEXT, 2),
        desc(0x20_0000, 50 * 1024, F_WRITE | F_NEXT, 3),
        desc(0x3000, 1, F_WRITE, 0),
    ];
    assert_eq!(run(&mut dev, &mem, &d), (S_OK, 200 * 1024));
    let mut a = vec![0u8; 150 * 1024];
    let mut b = vec![0u8; 50 * 1024];
    mem.read_slice(&mut a, GuestAddress(0x10_0000)).expect("r");
    mem.read_slice(&mut b, GuestAddress(0x20_0000)).expect("r");
    assert_eq!([a, b].concat(), data[..200 * 1024]);
    req(&mem, T_OUT, 1);
    let d = [
        desc(0x1000, 16, F_NEXT, 1),
        desc(0x10_0000, 150 * 1024, F_NEXT, 2),
        desc(0x20_0000, 50 * 1024, F_NEXT, 3),
        desc(0x3000, 1, F_WRITE, 0),
    ];
    assert_eq!(run(&mut dev, &mem, &d), (S_OK, 0));
    let after = std::fs::read(f.path()).expect("r");
    assert_eq!(after[512..512 + 200 * 1024], data[..200 * 1024]);
}

#[test]
fn slot_fill_updates_config_serial_and_raises_config_interrupt() {
    use crate::devices::bus::BusDevice;
    use crate::devices::virtio::INT_CONFIG;
    use crate::devices::virtio::mmio::MmioTransport;
    use crate::devices::virtio::queue::tests::{MockSplitQueue, used};
    use std::sync::atomic::Ordering;
    let ch = Arc::new(DeviceChannel::new().expect("ch"));
    let irq = Arc::new(Interrupt::new().expect("irq"));
    let mut dev = BlockDevice::slot(ch.clone(), irq.clone(), EventFd::new(0).expect("e"));
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("mem");
    let mut t = MmioTransport::new(dev.info(), mem.clone(), ch, irq.clone(), vec![])
        .with_config(dev.config_space());
    let reg = |t: &mut MmioTransport, off: u64| {
        let mut b = [0u8; 8];
        t.read(
            off,
            if off >= 0x100 {
                &mut b[..]
            } else {
                &mut b[..4]
            },
        );
        u64::from_le_bytes(b)
    };
    assert!(dev.is_empty_slot());
    assert_ne!(dev.info().features & F_RO, 0, "slots are read-only");
    assert_eq!(
        (reg(&mut t, 0x100), reg(&mut t, 0xfc)),
        (0, 0),
        "capacity, generation"
    );

    // Empty: GET_ID answers no serial, reads fail, writes fail.
    req(&mem, T_GET_ID, 0);
    mem.write_slice(&[0xee; 20], GuestAddress(0x5000))
        .expect("w");
    let id = [
        desc(0x1000, 16, F_NEXT, 1),
        desc(0x5000, 20, F_WRITE | F_NEXT, 2),
        desc(0x3000, 1, F_WRITE, 0),
    ];
    assert_eq!(run(&mut dev, &mem, &id), (S_OK, 20));
    let mut b = [0u8; 20];
    mem.read_slice(&mut b, GuestAddress(0x5000)).expect("r");
    assert_eq!(b, [0u8; 20]);
    req(&mem, T_IN, 0);
    let rd = [
        desc(0x1000, 16, F_NEXT, 1),
        desc(0x2000, 512, F_WRITE | F_NEXT, 2),
        desc(0x3000, 1, F_WRITE, 0),
    ];
    assert_eq!(run(&mut dev, &mem, &rd).0, S_IOERR);
    assert_eq!(irq.status.load(Ordering::SeqCst), 0);

    let f = tempfile::NamedTempFile::new().expect("tmp");
    let data: Vec<u8> = (0..6 * 512 + 100u32).map(|i| (i / 512) as u8 + 1).collect();
    std::fs::write(f.path(), &data).expect("write");
    dev.fill(f.path(), "img0123456789abcdef").expect("fill");
    assert!(!dev.is_empty_slot());
    assert_eq!(reg(&mut t, 0x100), 6, "whole sectors only");
    assert_eq!(reg(&mut t, 0xfc), 1, "generation bumped");
    assert_eq!(
        reg(&mut t, 0x60) as u32,
        INT_CONFIG,
        "config-change interrupt"
    );
    t.write(0x64, &INT_CONFIG.to_le_bytes());
    assert_eq!(reg(&mut t, 0x60), 0, "acknowledged");

    req(&mem, T_GET_ID, 0);
    assert_eq!(run(&mut dev, &mem, &id), (S_OK, 20));
    mem.read_slice(&mut b, GuestAddress(0x5000)).expect("r");
    assert_eq!(&b[..19], b"img0123456789abcdef");
    assert_eq!(b[19], 0);
    // Reads through the queue now see the file; the last whole sector is readable, the
    // partial one after it is not.
    let q = MockSplitQueue::create(&mem, GuestAddress(0x8_0000), 16);
    dev.active = Some((mem.clone(), q.create_queue().expect("q")));
    req(&mem, T_IN, 5);
    q.add_desc_chains(&rd, 0).expect("chain");
    dev.process_queue();
    assert_eq!(used(&mem, &q), vec![(0, 513)]);
    let mut s = [0u8; 512];
    mem.read_slice(&mut s, GuestAddress(0x2000)).expect("r");
    assert!(s.iter().all(|x| *x == 6), "sector 5 of the new file");
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x3000)).expect("r"), S_OK);
    req(&mem, T_IN, 6);
    assert_eq!(run(&mut dev, &mem, &rd).0, S_IOERR);
    req(&mem, T_OUT, 0);
    let wr = [
        desc(0x1000, 16, F_NEXT, 1),
        desc(0x2000, 512, F_NEXT, 2),
        desc(0x3000, 1, F_WRITE, 0),
    ];
    assert_eq!(
        run(&mut dev, &mem, &wr).0,
        S_IOERR,
        "filled slots stay read-only"
    );

    // A filled slot is never swapped: the guest may have cached its blocks.
    let e = dev.fill(f.path(), "other").expect_err("in use");
    assert!(matches!(e, BlockError::SlotInUse { ref serial } if serial == "img0123456789abcdef"));
    assert_eq!(reg(&mut t, 0xfc), 1);
    assert_eq!(dev.serial(), "img0123456789abcdef");

    // Emptied: capacity 0, no serial, the guest told; reads fail; filled again it serves
    // the new file.
    dev.empty().expect("empty");
    assert!(dev.is_empty_slot());
    assert_eq!((reg(&mut t, 0x100), reg(&mut t, 0xfc)), (0, 2));
    let status = reg(&mut t, 0x60) as u32;
    assert_ne!(status & INT_CONFIG, 0, "config-change interrupt");
    t.write(0x64, &status.to_le_bytes());
    assert_eq!(dev.serial(), "");
    req(&mem, T_IN, 0);
    assert_eq!(run(&mut dev, &mem, &rd).0, S_IOERR);
    dev.empty().expect("emptying an empty slot");
    assert_eq!(reg(&mut t, 0xfc), 2, "nothing to tell");
    let g = tempfile::NamedTempFile::new().expect("tmp");
    std::fs::write(g.path(), [9u8; 1024]).expect("write");
    dev.fill(g.path(), "imgnext").expect("refill");
    assert_eq!((reg(&mut t, 0x100), reg(&mut t, 0xfc)), (2, 3));
    req(&mem, T_IN, 1);
    assert_eq!(run(&mut dev, &mem, &rd).0, S_OK);
    mem.read_slice(&mut s, GuestAddress(0x2000)).expect("r");
    assert!(s.iter().all(|x| *x == 9), "the new file");
    let (mut disk, _mem, _f) = setup(true);
    assert!(matches!(disk.empty(), Err(BlockError::NotASlot)));
}

#[test]
fn slot_fill_refusals() {
    let (mut disk, _mem, f) = setup(true);
    assert!(matches!(
        disk.fill(f.path(), "x"),
        Err(BlockError::NotASlot)
    ));
    let ch = Arc::new(DeviceChannel::new().expect("ch"));
    let irq = Arc::new(Interrupt::new().expect("irq"));
    let mut dev = BlockDevice::slot(ch, irq.clone(), EventFd::new(0).expect("e"));
    for bad in ["", "has space", "123456789012345678901", "tab\t"] {
        assert!(
            matches!(dev.fill(f.path(), bad), Err(BlockError::Serial(_))),
            "{bad:?}"
        );
    }
    let d = tempfile::tempdir().expect("d");
    assert!(matches!(
        dev.fill(&d.path().join("missing"), "a"),
        Err(BlockError::Open { .. })
    ));
    assert!(
        matches!(dev.fill(d.path(), "a"), Err(BlockError::Open { .. })),
        "a directory"
    );
    let small = d.path().join("small");
    std::fs::write(&small, [1u8; 511]).expect("w");
    assert!(matches!(
        dev.fill(&small, "a"),
        Err(BlockError::TooSmall(_))
    ));
    // Nothing changed and the guest was not told anything.
    assert!(dev.is_empty_slot());
    assert_eq!(dev.config_space().generation(), 0);
    assert_eq!(irq.status.load(std::sync::atomic::Ordering::SeqCst), 0);
    dev.fill(f.path(), "ok").expect("fill after refusals");
}

#[test]
fn refuses_bad_requests() {
    let (mut dev, mem, f) = setup(true);
    assert_ne!(dev.info().features & F_RO, 0);
    req(&mem, T_OUT, 0);
    let d = [
        desc(0x1000, 16, F_NEXT, 1),
        desc(0x4000, 512, F_NEXT, 2),
        desc(0x3000, 1, F_WRITE, 0),
    ];
    assert_eq!(run(&mut dev, &mem, &d).0, S_IOERR, "read-only");
    assert!(
        std::fs::read(f.path()).expect("r")[..512]
            .iter()
            .all(|x| *x == 0)
    );
    // Past the end of the disk, and a sector number that overflows.
    for sector in [7, u64::MAX / 2] {
        req(&mem, T_IN, sector);
        let d = [
            desc(0x1000, 16, F_NEXT, 1),
            desc(0x2000, 1024, F_WRITE | F_NEXT, 2),
            desc(0x3000, 1, F_WRITE, 0),
        ];
        assert_eq!(run(&mut dev, &mem, &d).0, S_IOERR);
    }
    // IN with a device-readable data buffer (wrong direction).
    req(&mem, T_IN, 0);
    let d = [
        desc(0x1000, 16, F_NEXT, 1),
        desc(0x2000, 512, F_NEXT, 2),
        desc(0x3000, 1, F_WRITE, 0),
    ];
    assert_eq!(run(&mut dev, &mem, &d).0, S_IOERR);
    // Partial sector.
    req(&mem, T_IN, 0);
    let d = [
        desc(0x1000, 16, F_NEXT, 1),
        desc(0x2000, 100, F_WRITE | F_NEXT, 2),
        desc(0x3000, 1, F_WRITE, 0),
    ];
    assert_eq!(run(&mut dev, &mem, &d).0, S_IOERR);
}

use super::*;
use crate::devices::virtio::queue::tests::{F_NEXT, F_WRITE, MockSplitQueue, desc, used};
use vm_memory::{Bytes, GuestAddress};

const RAM: u64 = 0x10_0000;

/// A device activated on three mock queues (inflate, deflate, reporting) in 1 MiB of RAM.
fn setup() -> (
    BalloonDevice,
    GuestMemoryMmap,
    Vec<MockSplitQueue<'static, GuestMemoryMmap>>,
) {
    let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).expect("mem"),
    ));
    let ch = Arc::new(DeviceChannel::new().expect("ch"));
    let irq = Arc::new(Interrupt::new().expect("irq"));
    let mut dev = BalloonDevice::new(ch, irq, vec![]);
    let mocks: Vec<_> = (0..NUM_QUEUES as u64)
        .map(|i| MockSplitQueue::create(mem, GuestAddress(0x8_0000 + i * 0x1000), 16))
        .collect();
    let queues = mocks.iter().map(|m| m.create_queue().expect("q")).collect();
    dev.active = Some((mem.clone(), queues));
    (dev, mem.clone(), mocks)
}

fn fill(mem: &GuestMemoryMmap, at: u64, len: usize) {
    mem.write_slice(&vec![0xa5; len], GuestAddress(at))
        .expect("fill");
}

fn zero(mem: &GuestMemoryMmap, at: u64, len: usize) -> bool {
    let mut b = vec![1u8; len];
    mem.read_slice(&mut b, GuestAddress(at)).expect("read");
    b.iter().all(|x| *x == 0)
}

#[test]
fn reported_pages_go_back_to_the_host_and_read_as_zero() {
    let (mut dev, mem, q) = setup();
    fill(&mem, 0x4_0000, 0x3000);
    fill(&mem, 0x6_0000, 0x1000);
    // One report of two blocks (as Linux sends them: device-writable entries of one chain).
    q[REPORTING_QUEUE]
        .add_desc_chains(
            &[
                desc(0x4_0000, 0x2000, F_WRITE | F_NEXT, 1),
                desc(0x6_0000, 0x1000, F_WRITE, 0),
            ],
            0,
        )
        .expect("chain");
    dev.process_queues();
    assert_eq!(used(&mem, &q[REPORTING_QUEUE]), vec![(0, 0)]);
    assert_eq!(dev.reported_bytes(), 0x3000);
    assert!(zero(&mem, 0x4_0000, 0x2000), "reported pages are dropped");
    assert!(zero(&mem, 0x6_0000, 0x1000));
    assert!(
        !zero(&mem, 0x4_2000, 0x1000),
        "the page after the report is kept"
    );
    assert_eq!(
        dev.interrupt
            .status
            .load(std::sync::atomic::Ordering::SeqCst)
            & crate::devices::virtio::INT_VRING,
        crate::devices::virtio::INT_VRING
    );
}

#[test]
fn hostile_reports_drop_nothing_but_whole_guest_pages() {
    let (mut dev, mem, q) = setup();
    fill(&mem, 0x5_0000, 0x3000);
    fill(&mem, RAM - 0x1000, 0x1000);
    q[REPORTING_QUEUE]
        .add_desc_chains(
            &[
                // Outside guest RAM.
                desc(0xdead_0000, 0x1000, F_WRITE, 0),
                // Past the end of RAM.
                desc(RAM - 0x1000, 0x3000, F_WRITE, 0),
                // Less than one whole page.
                desc(0x5_0010, 0x1000, F_WRITE, 0),
                // Partial pages around one whole page: only the whole one goes.
                desc(0x5_1800, 0x1800, F_WRITE, 0),
                // Zero length.
                desc(0x5_0000, 0, F_WRITE, 0),
            ],
            0,
        )
        .expect("chains");
    dev.process_queues();
    assert_eq!(
        used(&mem, &q[REPORTING_QUEUE]).len(),
        5,
        "every chain returned"
    );
    assert_eq!(dev.reported_bytes(), 0x1000);
    assert!(!zero(&mem, 0x5_0000, 0x1000), "partial page kept");
    assert!(!zero(&mem, 0x5_1000, 0x1000), "partial page kept");
    assert!(zero(&mem, 0x5_2000, 0x1000), "the one whole page dropped");
    assert!(
        !zero(&mem, RAM - 0x1000, 0x1000),
        "a range past RAM drops nothing"
    );
    // An address that overflows.
    assert_eq!(discard(&mem, GuestAddress(u64::MAX - 10), 0x1000), 0);
    // A start in the last page of the address space (no next page boundary).
    assert_eq!(discard(&mem, GuestAddress(u64::MAX - 4000), 100), 0);
}

#[test]
fn inflate_and_deflate_chains_come_back_unread() {
    let (mut dev, mem, q) = setup();
    fill(&mem, 0x4_0000, 0x1000);
    // A page frame number list pointing at a filled page: the host never asked for it.
    mem.write_obj(0x40u32, GuestAddress(0x3000)).expect("pfn");
    for i in [0, 1] {
        q[i].add_desc_chains(&[desc(0x3000, 4, 0, 0)], 0)
            .expect("chain");
    }
    dev.process_queues();
    assert_eq!(used(&mem, &q[0]), vec![(0, 0)]);
    assert_eq!(used(&mem, &q[1]), vec![(0, 0)]);
    assert_eq!(dev.reported_bytes(), 0);
    assert!(!zero(&mem, 0x4_0000, 0x1000), "nothing dropped");
}

#[test]
fn the_driver_sees_reporting_and_a_zero_target() {
    let info = device_info();
    assert_eq!(info.device_type, 5);
    assert_eq!(info.features & F_REPORTING, F_REPORTING);
    assert_eq!(info.queue_max_sizes.len(), 3);
    assert!(
        info.config[..8].iter().all(|b| *b == 0),
        "num_pages 0, actual 0"
    );
}

//! Randomised descriptor tables and packet contents (vsock headers, FUSE requests) thrown at
//! every device model: whatever the guest writes, the VMM must not panic, must return every
//! chain it consumed, and must only touch guest memory (vm-memory bounds-checks every access;
//! out-of-range descriptors fail).

use std::os::unix::net::UnixDatagram;
use std::sync::Arc;

use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::block::BlockDevice;
use super::fs::device::FsDevice;
use super::net::NetDevice;
use super::vsock::{VsockDevice, VsockMuxer, packet};
use super::{DeviceChannel, Interrupt, TransportMsg};

const MEM: u64 = 0x10_0000;
const QSIZE: u16 = 16;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A descriptor that is usually plausible and sometimes hostile.
fn random_desc(r: &mut Rng) -> RawDescriptor {
    let addr = match r.below(10) {
        0 => u64::MAX - r.below(64),
        1 => MEM - r.below(64),
        2 => 0x1_0000_0000 + r.below(1 << 20),
        _ => 0x4_0000 + r.below(0xb_0000),
    };
    let len = match r.below(8) {
        0 => u32::MAX - r.below(16) as u32,
        1 => 0,
        _ => r.below(0x1_2000) as u32,
    };
    let flags = r.below(8) as u16; // NEXT, WRITE, INDIRECT in any mix
    let next = r.below(QSIZE as u64 + 4) as u16;
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

/// A queue at `base` (descriptors, avail ring at +0x100, used ring at +0x200) filled with
/// random descriptors, random avail entries and a random avail index.
struct RawQueue {
    base: u64,
}

impl RawQueue {
    fn new(r: &mut Rng, mem: &GuestMemoryMmap, base: u64) -> Self {
        for i in 0..QSIZE as u64 {
            let d = random_desc(r);
            let d = SplitDescriptor::from(d);
            mem.write_obj(d.addr().0, GuestAddress(base + i * 16))
                .expect("w");
            mem.write_obj(d.len(), GuestAddress(base + i * 16 + 8))
                .expect("w");
            mem.write_obj(d.flags(), GuestAddress(base + i * 16 + 12))
                .expect("w");
            mem.write_obj(d.next(), GuestAddress(base + i * 16 + 14))
                .expect("w");
            mem.write_obj(
                r.below(QSIZE as u64 + 2) as u16,
                GuestAddress(base + 0x104 + i * 2),
            )
            .expect("w");
        }
        mem.write_obj(r.below(QSIZE as u64 * 2) as u16, GuestAddress(base + 0x102))
            .expect("w");
        RawQueue { base }
    }

    fn queue(&self) -> Queue {
        let mut q = Queue::new(QSIZE).expect("queue");
        q.set_size(QSIZE);
        q.set_desc_table_address(Some(self.base as u32), Some(0));
        q.set_avail_ring_address(Some(self.base as u32 + 0x100), Some(0));
        q.set_used_ring_address(Some(self.base as u32 + 0x200), Some(0));
        q.set_ready(true);
        q
    }

    fn check_used(&self, mem: &GuestMemoryMmap) {
        let idx: u16 = mem.read_obj(GuestAddress(self.base + 0x202)).expect("idx");
        assert!(
            idx <= QSIZE,
            "no more chains used than made available: {idx}"
        );
        for i in 0..idx as u64 {
            let id: u32 = mem
                .read_obj(GuestAddress(self.base + 0x204 + 8 * i))
                .expect("id");
            assert!(id < QSIZE as u32, "used ids are real heads: {id}");
        }
    }
}

fn scribble(r: &mut Rng, mem: &GuestMemoryMmap) {
    // Random bytes where payloads live, with plausible vsock headers sprinkled in.
    let mut buf = vec![0u8; 0xb_0000];
    for b in buf.iter_mut() {
        *b = r.next() as u8;
    }
    for off in (0..buf.len() - 64).step_by(0x1000) {
        let h = packet::VsockHeader {
            src_cid: 3,
            dst_cid: 2,
            src_port: r.below(4) as u32,
            dst_port: r.below(4) as u32,
            len: r.below(0x2_0000) as u32,
            type_: 1,
            op: r.below(9) as u16,
            flags: r.below(4) as u32,
            buf_alloc: r.next() as u32,
            fwd_cnt: r.next() as u32,
        };
        buf[off..off + packet::HDR_SIZE].copy_from_slice(&h.to_bytes());
        // A plausible FUSE request header half a page further on.
        let f = off + 0x800;
        let len = 40 + r.below(200) as u32;
        buf[f..f + 4].copy_from_slice(&len.to_le_bytes());
        buf[f + 4..f + 8].copy_from_slice(&(r.below(52) as u32).to_le_bytes());
        buf[f + 16..f + 24].copy_from_slice(&r.below(4).to_le_bytes());
    }
    mem.write_slice(&buf, GuestAddress(0x4_0000))
        .expect("scribble");
}

#[test]
fn random_chains_never_crash_any_device() {
    let mut r = Rng(0x9e37_79b9_7f4a_7c15);
    let dir = tempfile::tempdir().expect("tmp");
    let disk = dir.path().join("disk");
    std::fs::write(&disk, vec![7u8; 64 * 1024]).expect("disk");
    for round in 0..300 {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).expect("mem");
        scribble(&mut r, &mem);
        let ch = Arc::new(DeviceChannel::new().expect("ch"));
        let irq = Arc::new(Interrupt::new().expect("irq"));
        let evts = |n| {
            (0..n)
                .map(|_| EventFd::new(0).expect("e"))
                .collect::<Vec<_>>()
        };
        match round % 4 {
            0 => {
                let uds = dir.path().join(format!("v{round}.sock"));
                let mux = VsockMuxer::new(3, &uds).expect("muxer");
                let mut dev = VsockDevice::new(mux, ch.clone(), irq, evts(3));
                let (rx, tx, ev) = (
                    RawQueue::new(&mut r, &mem, 0),
                    RawQueue::new(&mut r, &mem, 0x1000),
                    RawQueue::new(&mut r, &mem, 0x2000),
                );
                let queues = vec![rx.queue(), tx.queue(), ev.queue()];
                ch.send(TransportMsg::Activate {
                    queues,
                    mem: mem.clone(),
                });
                dev.handle_channel();
                dev.run_queues();
                tx.check_used(&mem);
                rx.check_used(&mem);
            }
            1 => {
                let mut dev = BlockDevice::open(
                    &disk,
                    round % 2 == 0,
                    "d",
                    ch.clone(),
                    irq,
                    evts(1).remove(0),
                )
                .expect("blk");
                let q = RawQueue::new(&mut r, &mem, 0);
                ch.send(TransportMsg::Activate {
                    queues: vec![q.queue()],
                    mem: mem.clone(),
                });
                dev.handle_channel();
                dev.process_queue();
                q.check_used(&mem);
            }
            3 => {
                let share = dir.path().join(format!("share{round}"));
                std::fs::create_dir_all(share.join("d")).expect("share");
                std::fs::write(share.join("f"), b"x").expect("file");
                let mut dev = FsDevice::new(&share, ch.clone(), irq, evts(2)).expect("fs");
                let (hi, rq) = (
                    RawQueue::new(&mut r, &mem, 0),
                    RawQueue::new(&mut r, &mem, 0x1000),
                );
                ch.send(TransportMsg::Activate {
                    queues: vec![hi.queue(), rq.queue()],
                    mem: mem.clone(),
                });
                dev.handle_channel();
                dev.run_queues();
                hi.check_used(&mem);
                rq.check_used(&mem);
                // Whatever arrived, nothing outside the share changed.
                assert!(!dir.path().join("escaped").exists());
            }
            _ => {
                let (a, b) = UnixDatagram::pair().expect("pair");
                a.set_nonblocking(true).expect("nb");
                b.set_nonblocking(true).expect("nb");
                for i in 0..3 {
                    let _ = b.send(&vec![i as u8; r.below(3000) as usize + 1]);
                }
                let mut dev = NetDevice::new(a, ch.clone(), irq, evts(2));
                let (rx, tx) = (
                    RawQueue::new(&mut r, &mem, 0),
                    RawQueue::new(&mut r, &mem, 0x1000),
                );
                ch.send(TransportMsg::Activate {
                    queues: vec![rx.queue(), tx.queue()],
                    mem: mem.clone(),
                });
                dev.handle_channel();
                dev.process_tx();
                dev.process_rx();
                tx.check_used(&mem);
                rx.check_used(&mem);
            }
        }
    }
}

//! virtio-vsock device (user space, no vhost): the virtqueue side. Packet parsing accepts a
//! header and payload spread over any number of descriptors (Linux >= 6 sends large payloads as
//! multi-descriptor chains). Connections live in the transport-independent `muxer`.

pub mod muxer;
pub mod packet;
mod uds;
pub mod vhost_user;

use std::path::Path;
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::queue::Segments;
use super::{DeviceChannel, DeviceInfo, Interrupt, TYPE_VSOCK, TransportMsg, VIRTIO_F_VERSION_1};
pub use muxer::{MuxerError, VsockMuxer};
use packet::{HDR_SIZE, MAX_PKT_PAYLOAD, VsockHeader};

pub const QUEUE_SIZE: u16 = 256;
const RXQ: usize = 0;
const TXQ: usize = 1;
/// Largest RX buffer we will fill (bounds host-side work per guest buffer).
const MAX_RX_CHAIN: usize = HDR_SIZE + MAX_PKT_PAYLOAD;
/// Event-loop tokens.
const TOKEN_CHANNEL: u32 = 0;
const TOKEN_RXQ: u32 = 1;
const TOKEN_TXQ: u32 = 2;
const TOKEN_EVQ: u32 = 3;
const TOKEN_MUXER: u32 = 4;

pub fn device_info(cid: u64) -> DeviceInfo {
    DeviceInfo {
        device_type: TYPE_VSOCK,
        features: VIRTIO_F_VERSION_1,
        queue_max_sizes: vec![QUEUE_SIZE; 3],
        config: cid.to_le_bytes().to_vec(),
    }
}

struct Active {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
}

pub struct VsockDevice {
    muxer: VsockMuxer,
    channel: Arc<DeviceChannel>,
    interrupt: Arc<Interrupt>,
    queue_evts: Vec<EventFd>,
    active: Option<Active>,
    scratch: Vec<u8>,
}

/// Outcome of parsing one TX chain.
#[derive(Debug, PartialEq, Eq)]
pub enum TxParse {
    Packet(VsockHeader),
    Malformed(&'static str),
}

/// Reads the header and payload of a TX chain into (`hdr`, `payload`).
pub fn parse_tx(segs: &Segments, mem: &GuestMemoryMmap, payload: &mut Vec<u8>) -> TxParse {
    if !segs.writable.is_empty() {
        return TxParse::Malformed("device-writable descriptor in a TX chain");
    }
    let mut hb = [0u8; HDR_SIZE];
    if segs.read_at(mem, 0, &mut hb) != Ok(HDR_SIZE) {
        return TxParse::Malformed("chain shorter than the header");
    }
    let hdr = VsockHeader::from_bytes(&hb);
    let len = hdr.len as usize;
    if len > MAX_PKT_PAYLOAD || len > segs.read_len - HDR_SIZE {
        return TxParse::Malformed("payload length beyond the chain or the 64 KiB limit");
    }
    payload.resize(len, 0);
    if segs.read_at(mem, HDR_SIZE, payload) != Ok(len) {
        return TxParse::Malformed("payload unreadable");
    }
    TxParse::Packet(hdr)
}

/// Drains a TX queue into the muxer: every chain is returned to the guest, malformed ones too.
/// Returns true if a used buffer was added. Shared by the MMIO device and the vhost-user backend.
pub(crate) fn drain_tx(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    muxer: &mut VsockMuxer,
    scratch: &mut Vec<u8>,
) -> bool {
    let mut used = false;
    while let Some(chain) = q.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        match Segments::from_chain(chain, mem, HDR_SIZE + MAX_PKT_PAYLOAD) {
            Ok(segs) => match parse_tx(&segs, mem, scratch) {
                TxParse::Packet(hdr) => muxer.send_pkt(&hdr, scratch),
                TxParse::Malformed(why) => tracing::warn!("vsock: dropping TX chain: {why}"),
            },
            Err(e) => tracing::warn!("vsock: dropping TX chain: {e}"),
        }
        if let Err(e) = q.add_used(mem, head, 0) {
            tracing::warn!("vsock: add_used: {e}");
        }
        used = true;
    }
    used
}

/// Fills guest RX buffers with the muxer's pending packets. Returns true if a used buffer was
/// added. Shared by the MMIO device and the vhost-user backend.
pub(crate) fn fill_rx(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    muxer: &mut VsockMuxer,
    scratch: &mut Vec<u8>,
) -> bool {
    let mut used = false;
    while muxer.has_rx() {
        let Some(chain) = q.pop_descriptor_chain(mem) else {
            break;
        };
        let head = chain.head_index();
        let segs = match Segments::from_chain(chain, mem, usize::MAX) {
            Ok(s) if s.readable.is_empty() && s.write_len >= HDR_SIZE => s,
            other => {
                tracing::warn!("vsock: unusable RX chain: {:?}", other.err());
                let _ = q.add_used(mem, head, 0);
                used = true;
                continue;
            }
        };
        let room = segs.write_len.min(MAX_RX_CHAIN) - HDR_SIZE;
        let Some(mut hdr) = muxer.recv_pkt(room, scratch) else {
            q.go_to_previous_position();
            break;
        };
        hdr.len = scratch.len() as u32;
        let ok = segs.write_at(mem, 0, &hdr.to_bytes()) == Ok(HDR_SIZE)
            && segs.write_at(mem, HDR_SIZE, scratch) == Ok(scratch.len());
        let len = if ok { HDR_SIZE + scratch.len() } else { 0 };
        if let Err(e) = q.add_used(mem, head, len as u32) {
            tracing::warn!("vsock: add_used: {e}");
        }
        used = true;
    }
    used
}

impl VsockDevice {
    pub fn new(
        muxer: VsockMuxer,
        channel: Arc<DeviceChannel>,
        interrupt: Arc<Interrupt>,
        queue_evts: Vec<EventFd>,
    ) -> Self {
        Self {
            muxer,
            channel,
            interrupt,
            queue_evts,
            active: None,
            scratch: Vec::with_capacity(MAX_PKT_PAYLOAD),
        }
    }

    pub fn bind(cid: u64, uds: &Path) -> Result<VsockMuxer, MuxerError> {
        VsockMuxer::new(cid, uds)
    }

    /// Drains the TX queue into the muxer. Returns true if a used buffer was added.
    fn process_tx(&mut self) -> bool {
        match self.active.as_mut() {
            Some(a) => drain_tx(
                &mut a.queues[TXQ],
                &a.mem,
                &mut self.muxer,
                &mut self.scratch,
            ),
            None => false,
        }
    }

    /// Fills guest RX buffers with pending packets. Returns true if a used buffer was added.
    fn process_rx(&mut self) -> bool {
        match self.active.as_mut() {
            Some(a) => fill_rx(
                &mut a.queues[RXQ],
                &a.mem,
                &mut self.muxer,
                &mut self.scratch,
            ),
            None => false,
        }
    }

    pub(crate) fn run_queues(&mut self) {
        let tx = self.process_tx();
        let rx = self.process_rx();
        if tx || rx {
            self.interrupt.signal_used_queue();
        }
    }

    pub(crate) fn handle_channel(&mut self) {
        for m in self.channel.take() {
            match m {
                TransportMsg::Activate { queues, mem } => {
                    tracing::debug!("vsock: activated");
                    self.active = Some(Active { mem, queues });
                }
                TransportMsg::Reset => {
                    self.active = None;
                    self.muxer.reset();
                }
            }
        }
    }
}

impl MutEventSubscriber for VsockDevice {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            TOKEN_CHANNEL => self.handle_channel(),
            t @ (TOKEN_RXQ | TOKEN_TXQ | TOKEN_EVQ) => {
                let _ = self.queue_evts[(t - TOKEN_RXQ) as usize].read();
            }
            TOKEN_MUXER => self.muxer.process_events(),
            _ => {}
        }
        self.run_queues();
    }

    fn init(&mut self, ops: &mut EventOps) {
        let mut add = |fd: &dyn std::os::fd::AsRawFd, token: u32| {
            if let Err(e) = ops.add(Events::with_data_raw(fd.as_raw_fd(), token, EventSet::IN)) {
                tracing::error!("vsock: cannot register event {token}: {e:?}");
            }
        };
        add(&self.channel.evt, TOKEN_CHANNEL);
        for (i, e) in self.queue_evts.iter().enumerate() {
            add(e, TOKEN_RXQ + i as u32);
        }
        add(&self.muxer, TOKEN_MUXER);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::queue::tests::{F_NEXT, F_WRITE, desc, parse};
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::EventFd;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).expect("mem")
    }

    fn hdr(len: u32) -> VsockHeader {
        VsockHeader {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1,
            dst_port: 2,
            len,
            type_: 1,
            op: packet::OP_RW,
            ..Default::default()
        }
    }

    #[test]
    fn tx_header_and_payload_split_over_many_descriptors() {
        // Linux >= 6 sends payloads over 32 KiB like this; virtio-vsock's parser rejects it.
        let m = mem();
        let payload: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
        let plen = 60_000usize;
        let h = hdr(plen as u32).to_bytes();
        // Header split 10 + 34 bytes, payload in 4 KiB pieces plus a tail.
        m.write_slice(&h[..10], GuestAddress(0x1_0000)).expect("w");
        m.write_slice(&h[10..], GuestAddress(0x1_1000)).expect("w");
        m.write_slice(&payload[..plen], GuestAddress(0x2_0000))
            .expect("w");
        // 2 header descriptors + 8 payload descriptors of up to 8 KiB (the mock queue has 16).
        let mut descs = vec![desc(0x1_0000, 10, F_NEXT, 1), desc(0x1_1000, 34, F_NEXT, 2)];
        let mut off = 0;
        let mut i = 2;
        while off < plen {
            let n = (plen - off).min(8192);
            let last = off + n == plen;
            descs.push(desc(
                0x2_0000 + off as u64,
                n as u32,
                if last { 0 } else { F_NEXT },
                i + 1,
            ));
            off += n;
            i += 1;
        }
        let segs = parse(&m, &descs, HDR_SIZE + MAX_PKT_PAYLOAD).expect("valid");
        let mut out = Vec::new();
        assert_eq!(
            parse_tx(&segs, &m, &mut out),
            TxParse::Packet(hdr(plen as u32))
        );
        assert_eq!(out, payload[..plen]);
    }

    #[test]
    fn device_moves_packets_and_survives_malformed_chains() {
        use crate::devices::virtio::queue::tests::{MockSplitQueue, used};
        use std::os::unix::net::UnixListener;
        let m = mem();
        let dir = tempfile::tempdir().expect("tmp");
        let uds = dir.path().join("v.sock");
        let listener = UnixListener::bind(format!("{}_99", uds.display())).expect("bind");
        let ch = Arc::new(DeviceChannel::new().expect("ch"));
        let irq = Arc::new(Interrupt::new().expect("irq"));
        let evts = (0..3).map(|_| EventFd::new(0).expect("e")).collect();
        let mut dev = VsockDevice::new(
            VsockMuxer::new(3, &uds).expect("muxer"),
            ch.clone(),
            irq.clone(),
            evts,
        );
        let rxq = MockSplitQueue::create(&m, GuestAddress(0), 16);
        let txq = MockSplitQueue::create(&m, GuestAddress(0x1000), 16);
        let evq = MockSplitQueue::create(&m, GuestAddress(0x2000), 16);
        let queues = vec![
            rxq.create_queue().expect("q"),
            txq.create_queue().expect("q"),
            evq.create_queue().expect("q"),
        ];
        ch.send(TransportMsg::Activate {
            queues,
            mem: m.clone(),
        });
        dev.handle_channel();

        // RX: a chain with a device-readable descriptor (unusable), then a good split buffer.
        rxq.add_desc_chains(
            &[
                desc(0x2_0000, 64, 0, 0),
                desc(0x1_0000, 44, F_NEXT | F_WRITE, 2),
                desc(0x1_1000, 4096, F_WRITE, 0),
            ],
            0,
        )
        .expect("rx chains");
        // TX: a REQUEST with its header over two descriptors, a descriptor outside guest memory,
        // and a chain with a device-writable descriptor.
        let mut req = hdr(0);
        (req.op, req.src_port, req.dst_port) = (packet::OP_REQUEST, 1025, 99);
        m.write_slice(&req.to_bytes(), GuestAddress(0x3_0000))
            .expect("w");
        txq.add_desc_chains(
            &[
                desc(0x3_0000, 20, F_NEXT, 1),
                desc(0x3_0014, 24, 0, 0),
                desc(0x7000_0000, 44, 0, 0),
                desc(0x3_0000, 44, F_NEXT, 4),
                desc(0x3_1000, 8, F_WRITE, 0),
            ],
            0,
        )
        .expect("tx chains");
        dev.run_queues();

        assert_eq!(
            used(&m, &txq).len(),
            3,
            "every TX chain is returned, malformed ones too"
        );
        assert_eq!(used(&m, &rxq), vec![(0, 0), (1, HDR_SIZE as u32)]);
        let mut hb = [0u8; HDR_SIZE];
        m.read_slice(&mut hb, GuestAddress(0x1_0000)).expect("r");
        let resp = VsockHeader::from_bytes(&hb);
        assert_eq!(
            (resp.op, resp.src_port, resp.dst_port, resp.dst_cid),
            (packet::OP_RESPONSE, 99, 1025, 3)
        );
        assert_ne!(irq.status.load(std::sync::atomic::Ordering::SeqCst) & 1, 0);
        listener.set_nonblocking(true).expect("nb");
        assert!(
            listener.accept().is_ok(),
            "the guest's REQUEST reached <uds>_99"
        );

        // Reset drops the queues: later notifications are ignored without touching memory.
        ch.send(TransportMsg::Reset);
        dev.handle_channel();
        dev.run_queues();
        assert_eq!(used(&m, &txq).len(), 3);
    }

    #[test]
    fn tx_malformed_chains_are_rejected() {
        let m = mem();
        let mut out = Vec::new();
        // Short header.
        let s = parse(&m, &[desc(0x1_0000, 20, 0, 0)], 1 << 20).expect("chain");
        assert!(matches!(parse_tx(&s, &m, &mut out), TxParse::Malformed(_)));
        // Header claims more payload than the chain carries.
        m.write_slice(&hdr(500).to_bytes(), GuestAddress(0x1_0000))
            .expect("w");
        let s = parse(
            &m,
            &[desc(0x1_0000, 44, F_NEXT, 1), desc(0x2_0000, 100, 0, 0)],
            1 << 20,
        )
        .expect("chain");
        assert!(matches!(parse_tx(&s, &m, &mut out), TxParse::Malformed(_)));
        // Oversized length field.
        m.write_slice(&hdr(u32::MAX).to_bytes(), GuestAddress(0x1_0000))
            .expect("w");
        let s = parse(&m, &[desc(0x1_0000, 44, 0, 0)], 1 << 20).expect("chain");
        assert!(matches!(parse_tx(&s, &m, &mut out), TxParse::Malformed(_)));
        // Writable descriptor in TX.
        m.write_slice(&hdr(0).to_bytes(), GuestAddress(0x1_0000))
            .expect("w");
        let s = parse(
            &m,
            &[desc(0x1_0000, 44, F_NEXT, 1), desc(0x2_0000, 8, F_WRITE, 0)],
            1 << 20,
        )
        .expect("chain");
        assert!(matches!(parse_tx(&s, &m, &mut out), TxParse::Malformed(_)));
    }

    /// A split virtqueue laid out by hand (desc table, avail and used rings 4 KiB apart: the
    /// mock's own layout overlaps its rings beyond 64 entries), refilled one descriptor per
    /// chain so a flood can go on for ever.
    struct Ring {
        base: u64,
    }

    impl Ring {
        fn desc(&self) -> u64 {
            self.base
        }
        fn avail(&self) -> u64 {
            self.base + 0x1000
        }
        fn used(&self) -> u64 {
            self.base + 0x2000
        }

        fn queue(&self, m: &GuestMemoryMmap) -> Queue {
            for a in [self.avail(), self.used()] {
                m.write_slice(&[0u8; 0x1000], GuestAddress(a))
                    .expect("zero");
            }
            let mut q = Queue::new(FQ).expect("queue");
            q.set_size(FQ);
            q.set_ready(true);
            let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
            let (l, h) = split(self.desc());
            q.set_desc_table_address(l, h);
            let (l, h) = split(self.avail());
            q.set_avail_ring_address(l, h);
            let (l, h) = split(self.used());
            q.set_used_ring_address(l, h);
            q
        }

        /// Makes a one-descriptor chain the available entry number `idx`.
        fn post(&self, m: &GuestMemoryMmap, idx: u16, addr: u64, len: u32, flags: u16) {
            let slot = idx % FQ;
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            m.write_slice(&d, GuestAddress(self.desc() + 16 * slot as u64))
                .expect("desc");
            m.write_obj(slot, GuestAddress(self.avail() + 4 + 2 * slot as u64))
                .expect("avail ring");
            m.write_obj(idx.wrapping_add(1), GuestAddress(self.avail() + 2))
                .expect("avail idx");
        }

        fn used_idx(&self, m: &GuestMemoryMmap) -> u16 {
            m.read_obj(GuestAddress(self.used() + 2)).expect("used idx")
        }

        /// The (id, len) of used entry number `i`.
        fn used_entry(&self, m: &GuestMemoryMmap, i: u16) -> (u32, u32) {
            let e = self.used() + 4 + 8 * (i % FQ) as u64;
            (
                m.read_obj(GuestAddress(e)).expect("id"),
                m.read_obj(GuestAddress(e + 4)).expect("len"),
            )
        }
    }

    /// Guest side of the flood tests: a vsock device on 256-entry queues.
    struct Flood {
        m: GuestMemoryMmap,
        dev: VsockDevice,
        rxq: Ring,
        txq: Ring,
        _dir: tempfile::TempDir,
        uds: std::path::PathBuf,
        tx_posted: u16,
        rx_posted: u16,
    }

    const FQ: u16 = 256;
    const TX_BUFS: u64 = 0x10_0000;
    const RX_BUFS: u64 = 0x30_0000;
    /// Room per TX/RX buffer: a header and a 4 KiB payload.
    const BUF: u64 = 0x1100;

    impl Flood {
        fn new() -> Self {
            let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).expect("mem");
            let dir = tempfile::tempdir().expect("tmp");
            let uds = dir.path().join("v.sock");
            let ch = Arc::new(DeviceChannel::new().expect("ch"));
            let irq = Arc::new(Interrupt::new().expect("irq"));
            let evts = (0..3).map(|_| EventFd::new(0).expect("e")).collect();
            let mut dev = VsockDevice::new(
                VsockMuxer::new(3, &uds).expect("muxer"),
                ch.clone(),
                irq,
                evts,
            );
            let (rxq, txq, evq) = (
                Ring { base: 0 },
                Ring { base: 0x1_0000 },
                Ring { base: 0x2_0000 },
            );
            let queues = vec![rxq.queue(&m), txq.queue(&m), evq.queue(&m)];
            ch.send(TransportMsg::Activate {
                queues,
                mem: m.clone(),
            });
            dev.handle_channel();
            Self {
                m,
                dev,
                rxq,
                txq,
                _dir: dir,
                uds,
                tx_posted: 0,
                rx_posted: 0,
            }
        }

        /// Posts a TX packet (the header's `len` is set from `payload`).
        fn tx(&mut self, mut h: VsockHeader, payload: &[u8]) {
            assert!(payload.len() as u64 <= BUF - HDR_SIZE as u64);
            h.len = payload.len() as u32;
            let addr = TX_BUFS + (self.tx_posted % FQ) as u64 * BUF;
            self.m
                .write_slice(&h.to_bytes(), GuestAddress(addr))
                .expect("w");
            self.m
                .write_slice(payload, GuestAddress(addr + HDR_SIZE as u64))
                .expect("w");
            let len = (HDR_SIZE + payload.len()) as u32;
            self.txq.post(&self.m, self.tx_posted, addr, len, 0);
            self.tx_posted = self.tx_posted.wrapping_add(1);
        }

        /// Posts one RX buffer.
        fn rx_buffer(&mut self) {
            let addr = RX_BUFS + (self.rx_posted % FQ) as u64 * BUF;
            self.rxq
                .post(&self.m, self.rx_posted, addr, BUF as u32, F_WRITE);
            self.rx_posted = self.rx_posted.wrapping_add(1);
        }

        /// The headers the device put in the RX buffers used since entry `from`.
        fn received(&self, from: u16) -> Vec<VsockHeader> {
            let to = self.rxq.used_idx(&self.m);
            let mut out = Vec::new();
            let mut i = from;
            while i != to {
                let (id, _) = self.rxq.used_entry(&self.m, i);
                let mut hb = [0u8; HDR_SIZE];
                self.m
                    .read_slice(&mut hb, GuestAddress(RX_BUFS + id as u64 * BUF))
                    .expect("r");
                out.push(VsockHeader::from_bytes(&hb));
                i = i.wrapping_add(1);
            }
            out
        }
    }

    fn guest_hdr(
        src_port: u32,
        dst_port: u32,
        op: u16,
        buf_alloc: u32,
        fwd_cnt: u32,
    ) -> VsockHeader {
        VsockHeader {
            src_cid: 3,
            dst_cid: 2,
            src_port,
            dst_port,
            type_: packet::TYPE_STREAM,
            op,
            buf_alloc,
            fwd_cnt,
            ..Default::default()
        }
    }

    #[test]
    fn tx_flood_without_rx_buffers_keeps_the_control_queue_bounded() {
        use muxer::MAX_CTRL_RX;
        let mut f = Flood::new();
        // 200 000 packets for connections that do not exist, each asking for an RST, while the
        // guest posts no RX buffer (the attack measured at ≈ 900 MiB per 20 M packets).
        for r in 0..800u32 {
            for i in 0..(FQ as u32 - 6) {
                f.tx(guest_hdr(r, i, packet::OP_RW, 0, 0), b"x");
            }
            f.dev.run_queues();
            assert_eq!(
                f.txq.used_idx(&f.m),
                f.tx_posted,
                "every TX chain went back"
            );
            assert!(f.dev.muxer.ctrl_backlog() <= MAX_CTRL_RX);
            assert!(f.dev.muxer.ctrl_capacity() <= MAX_CTRL_RX.next_power_of_two());
        }
        assert_eq!(f.dev.muxer.ctrl_backlog(), MAX_CTRL_RX);
        // The guest starts reading: it gets the queued RSTs, then the queue is empty.
        let mut got = 0;
        while f.dev.muxer.has_rx() {
            let from = f.rxq.used_idx(&f.m);
            for _ in 0..64 {
                f.rx_buffer();
            }
            f.dev.run_queues();
            let pkts = f.received(from);
            assert!(pkts.iter().all(|h| h.op == packet::OP_RST));
            got += pkts.len();
        }
        assert_eq!(got, MAX_CTRL_RX);
        // And the device still works: a fresh bad packet is answered.
        let from = f.rxq.used_idx(&f.m);
        f.rx_buffer();
        f.tx(guest_hdr(1, 2, packet::OP_RW, 0, 0), b"x");
        f.dev.run_queues();
        assert_eq!(f.received(from).len(), 1);
    }

    #[test]
    fn per_connection_floods_stay_bounded() {
        use muxer::{CONN_BUF_ALLOC, MAX_CONNECTIONS, MAX_CTRL_RX};
        use std::os::unix::net::UnixListener;
        let mut f = Flood::new();
        let listener = UnixListener::bind(format!("{}_99", f.uds.display())).expect("bind");
        listener.set_nonblocking(true).expect("nb");
        let mut peers = Vec::new();
        // Connection flood: REQUESTs from many guest ports; the host accepts them all.
        let want = MAX_CONNECTIONS as u32 + 100;
        let mut port = 2000;
        while port < 2000 + want {
            for _ in 0..64.min(2000 + want - port) {
                f.tx(
                    guest_hdr(port, 99, packet::OP_REQUEST, CONN_BUF_ALLOC, 0),
                    &[],
                );
                port += 1;
            }
            f.dev.run_queues();
            while let Ok((s, _)) = listener.accept() {
                peers.push(s);
            }
        }
        assert_eq!(f.dev.muxer.connections(), MAX_CONNECTIONS);
        assert_eq!(
            peers.len(),
            MAX_CONNECTIONS,
            "refused ones never reached the host"
        );
        // Credit-request flood on one connection: one CREDIT_UPDATE waits, not thousands.
        let before = f.dev.muxer.ctrl_backlog();
        for _ in 0..20 {
            for _ in 0..(FQ - 6) {
                f.tx(
                    guest_hdr(2000, 99, packet::OP_CREDIT_REQUEST, CONN_BUF_ALLOC, 0),
                    &[],
                );
            }
            f.dev.run_queues();
        }
        assert_eq!(f.dev.muxer.ctrl_backlog(), before + 1);
        assert!(f.dev.muxer.ctrl_backlog() <= MAX_CTRL_RX);
        // Data flood to a host peer that never reads: the guest may fill the window it was
        // given (the host socket buffer first, then the muxer's), and a packet beyond the
        // window resets the connection instead of growing the buffer.
        let chunk = vec![0x5a; 4096];
        let mut sent = 0usize;
        let mut reset = false;
        while sent < 64 << 20 {
            for _ in 0..64 {
                f.tx(
                    guest_hdr(2001, 99, packet::OP_RW, CONN_BUF_ALLOC, 0),
                    &chunk,
                );
                sent += chunk.len();
            }
            f.dev.run_queues();
            assert!(f.dev.muxer.buffered_guest_bytes() <= CONN_BUF_ALLOC as usize);
            if f.dev.muxer.connections() < MAX_CONNECTIONS {
                reset = true;
                break;
            }
        }
        assert!(reset, "overrunning the window ends the connection");
        assert_eq!(f.dev.muxer.buffered_guest_bytes(), 0);
        assert!(f.dev.muxer.ctrl_backlog() <= MAX_CTRL_RX);
        drop(peers);
    }
}

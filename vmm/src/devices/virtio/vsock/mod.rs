//! virtio-vsock device (user space, no vhost): the virtqueue side. Packet parsing accepts a
//! header and payload spread over any number of descriptors (Linux >= 6 sends large payloads as
//! multi-descriptor chains). Connections live in the transport-independent `muxer`.

pub mod muxer;
pub mod packet;
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
}

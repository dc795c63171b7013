//! virtio-net on a tap device: one RX and one TX queue, no offloads, MAC from the config.

pub mod tap;

use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::queue::Segments;
use super::{DeviceChannel, DeviceInfo, Interrupt, TYPE_NET, TransportMsg, VIRTIO_F_VERSION_1};
pub use tap::{Tap, TapError};

pub const QUEUE_SIZE: u16 = 256;
/// `virtio_net_hdr_v1` (with `num_buffers`), required with VIRTIO_F_VERSION_1.
pub const NET_HDR_SIZE: usize = 12;
/// Largest frame: 64 KiB payload plus Ethernet and VLAN headers.
pub const MAX_FRAME: usize = 65_562;
const F_MAC: u64 = 1 << 5;
const RXQ: usize = 0;
const TXQ: usize = 1;
const TOKEN_CHANNEL: u32 = 0;
const TOKEN_RXQ: u32 = 1;
const TOKEN_TXQ: u32 = 2;
const TOKEN_TAP: u32 = 3;

pub fn device_info(mac: [u8; 6]) -> DeviceInfo {
    let mut config = mac.to_vec();
    config.extend_from_slice(&[0, 0]);
    DeviceInfo {
        device_type: TYPE_NET,
        features: VIRTIO_F_VERSION_1 | F_MAC,
        queue_max_sizes: vec![QUEUE_SIZE; 2],
        config,
    }
}

/// Where frames go: the tap in production; any datagram fd can stand in for it in tests.
pub trait FrameIo: AsRawFd + Send {
    fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize>;
    fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<usize>;
}

impl FrameIo for Tap {
    fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        Tap::read_frame(self, buf)
    }
    fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<usize> {
        Tap::write_frame(self, frame)
    }
}

pub struct NetDevice<T: FrameIo = Tap> {
    tap: T,
    channel: Arc<DeviceChannel>,
    interrupt: Arc<Interrupt>,
    queue_evts: Vec<EventFd>,
    active: Option<(GuestMemoryMmap, Vec<Queue>)>,
    /// A frame read from the tap that is waiting for a guest RX buffer.
    pending: Option<usize>,
    rx_buf: Vec<u8>,
    tx_buf: Vec<u8>,
    tap_listening: bool,
    tap_gone: bool,
}

impl<T: FrameIo> NetDevice<T> {
    pub fn new(
        tap: T,
        channel: Arc<DeviceChannel>,
        interrupt: Arc<Interrupt>,
        queue_evts: Vec<EventFd>,
    ) -> Self {
        Self {
            tap,
            channel,
            interrupt,
            queue_evts,
            active: None,
            pending: None,
            rx_buf: vec![0u8; NET_HDR_SIZE + MAX_FRAME],
            tx_buf: Vec::with_capacity(NET_HDR_SIZE + MAX_FRAME),
            tap_listening: true,
            tap_gone: false,
        }
    }

    pub(crate) fn handle_channel(&mut self) {
        for m in self.channel.take() {
            match m {
                TransportMsg::Activate { queues, mem } => self.active = Some((mem, queues)),
                TransportMsg::Reset => {
                    self.active = None;
                    self.pending = None;
                }
            }
        }
    }

    pub(crate) fn process_tx(&mut self) -> bool {
        let Some((mem, queues)) = self.active.as_mut() else {
            return false;
        };
        let mut used = false;
        while let Some(chain) = queues[TXQ].pop_descriptor_chain(&*mem) {
            let head = chain.head_index();
            match Segments::from_chain(chain, mem, NET_HDR_SIZE + MAX_FRAME) {
                Ok(s) if s.writable.is_empty() && s.read_len > NET_HDR_SIZE => {
                    self.tx_buf.resize(s.read_len - NET_HDR_SIZE, 0);
                    if s.read_at(mem, NET_HDR_SIZE, &mut self.tx_buf) == Ok(self.tx_buf.len())
                        && let Err(e) = self.tap.write_frame(&self.tx_buf)
                    {
                        tracing::debug!("virtio-net: tap write dropped a frame: {e}");
                    }
                }
                other => {
                    tracing::warn!("virtio-net: dropping malformed TX chain: {:?}", other.err())
                }
            }
            let _ = queues[TXQ].add_used(&*mem, head, 0);
            used = true;
        }
        used
    }

    /// Moves frames from the tap into guest RX buffers while both are available.
    pub(crate) fn process_rx(&mut self) -> bool {
        let Some((mem, queues)) = self.active.as_mut() else {
            return false;
        };
        let mut used = false;
        loop {
            let len = match self.pending.take() {
                Some(l) => l,
                None => match self.tap.read_frame(&mut self.rx_buf[NET_HDR_SIZE..]) {
                    Ok(n) => NET_HDR_SIZE + n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tracing::warn!("virtio-net: tap read: {e}");
                        break;
                    }
                },
            };
            let Some(chain) = queues[RXQ].pop_descriptor_chain(&*mem) else {
                self.pending = Some(len);
                break;
            };
            let head = chain.head_index();
            self.rx_buf[..NET_HDR_SIZE].fill(0);
            self.rx_buf[10] = 1; // num_buffers
            let written = match Segments::from_chain(chain, mem, usize::MAX) {
                Ok(s) if s.readable.is_empty() && s.write_len >= len => {
                    s.write_at(mem, 0, &self.rx_buf[..len]).unwrap_or(0)
                }
                other => {
                    tracing::warn!(
                        "virtio-net: RX buffer unusable or too small, frame dropped: {:?}",
                        other.err()
                    );
                    0
                }
            };
            let _ = queues[RXQ].add_used(&*mem, head, written as u32);
            used = true;
        }
        used
    }

    fn run(&mut self, ops: &mut EventOps) {
        let tx = self.process_tx();
        let rx = self.process_rx();
        if tx || rx {
            self.interrupt.signal_used_queue();
        }
        // Stop watching the tap while a frame waits for a guest buffer (level-triggered epoll).
        let want = self.pending.is_none();
        if want != self.tap_listening && !self.tap_gone {
            let set = if want {
                EventSet::IN
            } else {
                EventSet::empty()
            };
            if ops
                .modify(Events::with_data(&self.tap, TOKEN_TAP, set))
                .is_ok()
            {
                self.tap_listening = want;
            }
        }
    }
}

impl<T: FrameIo> MutEventSubscriber for NetDevice<T> {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TOKEN_CHANNEL => self.handle_channel(),
            t @ (TOKEN_RXQ | TOKEN_TXQ) => {
                let _ = self.queue_evts[(t - TOKEN_RXQ) as usize].read();
            }
            TOKEN_TAP
                if events
                    .event_set()
                    .intersects(EventSet::HANG_UP | EventSet::ERROR) =>
            {
                // The interface went away: stop watching it (HUP would wake epoll forever).
                tracing::warn!("virtio-net: tap hung up; the guest's network is down");
                let _ = ops.remove(Events::with_data(&self.tap, TOKEN_TAP, EventSet::IN));
                self.tap_listening = false;
                self.tap_gone = true;
                return;
            }
            _ => {}
        }
        if self.active.is_none() {
            // Not live: drain the tap so the host side does not back up.
            while matches!(self.tap.read_frame(&mut self.rx_buf), Ok(n) if n > 0) {}
            return;
        }
        self.run(ops);
    }

    fn init(&mut self, ops: &mut EventOps) {
        let mut add = |fd: &dyn std::os::fd::AsRawFd, token: u32| {
            if let Err(e) = ops.add(Events::with_data_raw(fd.as_raw_fd(), token, EventSet::IN)) {
                tracing::error!("virtio-net: cannot register event {token}: {e:?}");
            }
        };
        add(&self.channel.evt, TOKEN_CHANNEL);
        add(&self.queue_evts[RXQ], TOKEN_RXQ);
        add(&self.queue_evts[TXQ], TOKEN_TXQ);
        add(&self.tap, TOKEN_TAP);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::queue::tests::{F_NEXT, F_WRITE, MockSplitQueue, desc, used};
    use std::os::unix::net::UnixDatagram;
    use vm_memory::{Bytes, GuestAddress};

    impl FrameIo for UnixDatagram {
        fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.recv(buf)
        }
        fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<usize> {
            self.send(frame)
        }
    }

    impl FrameIo for std::os::unix::net::UnixStream {
        fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            std::io::Read::read(self, buf)
        }
        fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<usize> {
            std::io::Write::write(self, frame)
        }
    }

    #[test]
    fn vanished_tap_is_dropped_from_the_event_loop() {
        use event_manager::{EventManager, SubscriberOps};
        let (dev_end, host_end) = std::os::unix::net::UnixStream::pair().expect("pair");
        dev_end.set_nonblocking(true).expect("nb");
        let ch = Arc::new(DeviceChannel::new().expect("ch"));
        let irq = Arc::new(Interrupt::new().expect("irq"));
        let evts = (0..2).map(|_| EventFd::new(0).expect("e")).collect();
        let dev = NetDevice::new(dev_end, ch, irq, evts);
        let mut em: EventManager<Arc<std::sync::Mutex<dyn MutEventSubscriber + Send>>> =
            EventManager::new().expect("em");
        em.add_subscriber(Arc::new(std::sync::Mutex::new(dev)));
        drop(host_end);
        assert!(em.run_with_timeout(100).expect("run") >= 1, "hang-up seen");
        assert_eq!(em.run_with_timeout(0).expect("run"), 0, "and not again");
    }

    #[test]
    fn frames_both_ways_and_malformed_chains() {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).expect("mem");
        let (dev_end, host_end) = UnixDatagram::pair().expect("pair");
        dev_end.set_nonblocking(true).expect("nb");
        host_end.set_nonblocking(true).expect("nb");
        let ch = Arc::new(DeviceChannel::new().expect("ch"));
        let irq = Arc::new(Interrupt::new().expect("irq"));
        let evts = (0..2).map(|_| EventFd::new(0).expect("e")).collect();
        let mut dev = NetDevice::new(dev_end, ch, irq.clone(), evts);
        let rxq = MockSplitQueue::create(&m, GuestAddress(0), 16);
        let txq = MockSplitQueue::create(&m, GuestAddress(0x1000), 16);
        dev.active = Some((
            m.clone(),
            vec![
                rxq.create_queue().expect("q"),
                txq.create_queue().expect("q"),
            ],
        ));

        // TX: a good frame split over header + two pieces, one outside guest memory, one with
        // a device-writable descriptor, and one that is only a header.
        let frame: Vec<u8> = (0..60u8).collect();
        m.write_slice(&[0u8; NET_HDR_SIZE], GuestAddress(0x2_0000))
            .expect("w");
        m.write_slice(&frame, GuestAddress(0x2_1000)).expect("w");
        txq.add_desc_chains(
            &[
                desc(0x2_0000, NET_HDR_SIZE as u32, F_NEXT, 1),
                desc(0x2_1000, 20, F_NEXT, 2),
                desc(0x2_1014, 40, 0, 0),
                desc(0xffff_0000_0000, 60, 0, 0),
                desc(0x2_0000, 72, F_NEXT, 5),
                desc(0x2_3000, 8, F_WRITE, 0),
                desc(0x2_0000, NET_HDR_SIZE as u32, 0, 0),
            ],
            0,
        )
        .expect("tx");
        assert!(dev.process_tx());
        assert_eq!(used(&m, &txq).len(), 4);
        let mut got = [0u8; 128];
        assert_eq!(host_end.recv(&mut got).expect("one frame"), 60);
        assert_eq!(&got[..60], &frame[..]);
        assert!(
            host_end.recv(&mut got).is_err(),
            "malformed chains sent nothing"
        );

        // RX: a frame arrives before any buffer; a too-small buffer drops it; a good one gets
        // the next frame with a virtio_net_hdr_v1 in front.
        host_end
            .send(b"first-frame-too-big-for-the-buffer")
            .expect("send");
        assert!(!dev.process_rx());
        assert!(dev.pending.is_some(), "frame held for a guest buffer");
        rxq.add_desc_chains(&[desc(0x3_0000, 16, F_WRITE, 0)], 0)
            .expect("rx");
        host_end.send(b"second").expect("send");
        assert!(dev.process_rx());
        rxq.add_desc_chains(
            &[
                desc(0x3_1000, 8, F_WRITE | F_NEXT, 2),
                desc(0x3_2000, 100, F_WRITE, 0),
            ],
            1,
        )
        .expect("rx");
        assert!(dev.process_rx());
        let u = used(&m, &rxq);
        assert_eq!(u, vec![(0, 0), (1, (NET_HDR_SIZE + 6) as u32)]);
        let mut hdr = [0u8; 12];
        m.read_slice(&mut hdr[..8], GuestAddress(0x3_1000))
            .expect("r");
        m.read_slice(&mut hdr[8..], GuestAddress(0x3_2000))
            .expect("r");
        assert_eq!(hdr[10], 1, "num_buffers");
        let mut payload = [0u8; 6];
        m.read_slice(&mut payload, GuestAddress(0x3_2004))
            .expect("r");
        assert_eq!(&payload, b"second");
    }
}

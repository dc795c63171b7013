//! virtio-net on a tap device: one RX and one TX queue, no offloads, MAC from the config.

pub mod tap;

use std::io::ErrorKind;
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
    DeviceInfo { device_type: TYPE_NET, features: VIRTIO_F_VERSION_1 | F_MAC, queue_max_sizes: vec![QUEUE_SIZE; 2], config }
}

pub struct NetDevice {
    tap: Tap,
    channel: Arc<DeviceChannel>,
    interrupt: Arc<Interrupt>,
    queue_evts: Vec<EventFd>,
    active: Option<(GuestMemoryMmap, Vec<Queue>)>,
    /// A frame read from the tap that is waiting for a guest RX buffer.
    pending: Option<usize>,
    rx_buf: Vec<u8>,
    tx_buf: Vec<u8>,
    tap_listening: bool,
}

impl NetDevice {
    pub fn new(tap: Tap, channel: Arc<DeviceChannel>, interrupt: Arc<Interrupt>, queue_evts: Vec<EventFd>) -> Self {
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
        }
    }

    fn process_tx(&mut self) -> bool {
        let Some((mem, queues)) = self.active.as_mut() else { return false };
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
                other => tracing::warn!("virtio-net: dropping malformed TX chain: {:?}", other.err()),
            }
            let _ = queues[TXQ].add_used(&*mem, head, 0);
            used = true;
        }
        used
    }

    /// Moves frames from the tap into guest RX buffers while both are available.
    fn process_rx(&mut self) -> bool {
        let Some((mem, queues)) = self.active.as_mut() else { return false };
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
                Ok(s) if s.readable.is_empty() && s.write_len >= len => s.write_at(mem, 0, &self.rx_buf[..len]).unwrap_or(0),
                other => {
                    tracing::warn!("virtio-net: RX buffer unusable or too small, frame dropped: {:?}", other.err());
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
        if want != self.tap_listening {
            let set = if want { EventSet::IN } else { EventSet::empty() };
            if ops.modify(Events::with_data(&self.tap, TOKEN_TAP, set)).is_ok() {
                self.tap_listening = want;
            }
        }
    }
}

impl MutEventSubscriber for NetDevice {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TOKEN_CHANNEL => {
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
            t @ (TOKEN_RXQ | TOKEN_TXQ) => {
                let _ = self.queue_evts[(t - TOKEN_RXQ) as usize].read();
            }
            _ => {}
        }
        if self.active.is_none() {
            // Not live: drain the tap so the host side does not back up.
            while self.tap.read_frame(&mut self.rx_buf).is_ok() {}
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

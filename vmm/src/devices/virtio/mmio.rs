//! virtio-mmio transport (version 2, "modern" only) as a bus device on the vCPU threads.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{ConfigSpace, DeviceChannel, DeviceInfo, Interrupt, TransportMsg, VIRTIO_F_VERSION_1};
use crate::devices::bus::BusDevice;

pub const MMIO_SIZE: u64 = 0x1000;
/// Offset of QueueNotify, where queue ioeventfds are registered.
pub const NOTIFY_OFFSET: u64 = 0x50;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR: u32 = 0x4b53_5548; // "HUSK"

const S_ACK: u32 = 1;
const S_DRIVER: u32 = 2;
const S_DRIVER_OK: u32 = 4;
const S_FEATURES_OK: u32 = 8;
const S_NEEDS_RESET: u32 = 0x40;
const S_FAILED: u32 = 0x80;

pub struct MmioTransport {
    info: DeviceInfo,
    mem: GuestMemoryMmap,
    channel: Arc<DeviceChannel>,
    interrupt: Arc<Interrupt>,
    /// Written on QueueNotify when the access reached userspace (no ioeventfd registered).
    queue_evts: Vec<EventFd>,
    queues: Vec<Queue>,
    features_sel: u32,
    acked_features: u64,
    acked_sel: u32,
    queue_sel: u32,
    status: u32,
    /// The device's config space; shared with backends that change it at run time.
    config: Arc<ConfigSpace>,
}

impl MmioTransport {
    pub fn new(
        info: DeviceInfo,
        mem: GuestMemoryMmap,
        channel: Arc<DeviceChannel>,
        interrupt: Arc<Interrupt>,
        queue_evts: Vec<EventFd>,
    ) -> Self {
        let queues = info
            .queue_max_sizes
            .iter()
            .map(|&s| {
                Queue::new(s)
                    .unwrap_or_else(|_| Queue::new(256).expect("256 is a valid queue size"))
            })
            .collect();
        let config = Arc::new(ConfigSpace::new(info.config.clone()));
        Self {
            info,
            mem,
            channel,
            interrupt,
            queue_evts,
            queues,
            features_sel: 0,
            acked_features: 0,
            acked_sel: 0,
            queue_sel: 0,
            status: 0,
            config,
        }
    }

    /// Serves `config` (which the backend may change) instead of the static `info.config`.
    pub fn with_config(mut self, config: Arc<ConfigSpace>) -> Self {
        self.config = config;
        self
    }

    fn queue(&mut self) -> Option<&mut Queue> {
        if self.status & S_DRIVER_OK != 0 {
            return None; // queue registers are frozen once the device is live
        }
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        self.status = 0;
        self.acked_features = 0;
        self.interrupt.status.store(0, Ordering::SeqCst);
        self.channel.send(TransportMsg::Reset);
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let added = v & !self.status;
        if added & S_FEATURES_OK != 0 && self.acked_features & VIRTIO_F_VERSION_1 == 0 {
            // Legacy drivers are not supported: refuse FEATURES_OK.
            self.status = v & !S_FEATURES_OK;
            return;
        }
        if added & S_DRIVER_OK != 0 {
            let wanted = S_ACK | S_DRIVER | S_FEATURES_OK;
            let ready: Vec<&Queue> = self.queues.iter().filter(|q| q.ready()).collect();
            if v & wanted != wanted || ready.iter().any(|q| !q.is_valid(&self.mem)) {
                tracing::warn!(
                    device = self.info.device_type,
                    "driver set DRIVER_OK with an invalid setup"
                );
                self.status = v | S_NEEDS_RESET;
                return;
            }
            self.status = v;
            let queues = self
                .queues
                .iter()
                .map(|q| Queue::try_from(q.state()))
                .collect::<Result<Vec<_>, _>>();
            match queues {
                Ok(queues) => self.channel.send(TransportMsg::Activate {
                    queues,
                    mem: self.mem.clone(),
                }),
                Err(e) => {
                    tracing::warn!("cannot snapshot queues: {e}");
                    self.status = v | S_NEEDS_RESET;
                }
            }
            return;
        }
        self.status = v;
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= 0x100 {
            self.config.read((offset - 0x100) as usize, data);
            return;
        }
        if data.len() != 4 {
            data.fill(0);
            return;
        }
        let q = self.queues.get(self.queue_sel as usize);
        let v: u32 = match offset {
            0x00 => MAGIC,
            0x04 => VERSION,
            0x08 => self.info.device_type,
            0x0c => VENDOR,
            0x10 => match self.features_sel {
                0 => self.info.features as u32,
                1 => (self.info.features >> 32) as u32,
                _ => 0,
            },
            0x34 => q.map_or(0, |q| u32::from(q.max_size())),
            0x44 => q.map_or(0, |q| u32::from(q.ready())),
            0x60 => self.interrupt.status.load(Ordering::SeqCst),
            0x70 => self.status,
            // Shared memory regions (SHMLen/SHMBase): none, reported as all-ones.
            0xb0..=0xbc => u32::MAX,
            0xfc => self.config.generation(),
            _ => 0,
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= 0x100 {
            tracing::debug!(
                device = self.info.device_type,
                offset,
                "ignored config space write"
            );
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        let v = u32::from_le_bytes(bytes);
        let features_open =
            self.status & (S_FEATURES_OK | S_FAILED) == 0 && self.status & S_DRIVER != 0;
        match offset {
            0x14 => self.features_sel = v,
            0x20 if features_open => {
                let shift = match self.acked_sel {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                let mask = 0xffff_ffffu64 << shift;
                let offered = self.info.features & mask;
                self.acked_features =
                    (self.acked_features & !mask) | ((u64::from(v) << shift) & offered);
            }
            0x24 => self.acked_sel = v,
            0x30 => self.queue_sel = v,
            0x38 => {
                if let Some(q) = self.queue() {
                    q.set_size(v as u16);
                }
            }
            0x44 => {
                if let Some(q) = self.queue() {
                    q.set_ready(v == 1);
                }
            }
            0x50 => {
                if let Some(e) = self.queue_evts.get(v as usize) {
                    let _ = e.write(1);
                }
            }
            0x64 => {
                self.interrupt.status.fetch_and(!v, Ordering::SeqCst);
            }
            0x70 => self.set_status(v),
            0x80 => self
                .queue()
                .into_iter()
                .for_each(|q| q.set_desc_table_address(Some(v), None)),
            0x84 => self
                .queue()
                .into_iter()
                .for_each(|q| q.set_desc_table_address(None, Some(v))),
            0x90 => self
                .queue()
                .into_iter()
                .for_each(|q| q.set_avail_ring_address(Some(v), None)),
            0x94 => self
                .queue()
                .into_iter()
                .for_each(|q| q.set_avail_ring_address(None, Some(v))),
            0xa0 => self
                .queue()
                .into_iter()
                .for_each(|q| q.set_used_ring_address(Some(v), None)),
            0xa4 => self
                .queue()
                .into_iter()
                .for_each(|q| q.set_used_ring_address(None, Some(v))),
            _ => tracing::debug!(device = self.info.device_type, offset, "ignored mmio write"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::create_guest_memory;

    fn transport() -> (MmioTransport, Arc<DeviceChannel>) {
        let info = DeviceInfo {
            device_type: 19,
            features: VIRTIO_F_VERSION_1 | 1,
            queue_max_sizes: vec![16, 16],
            config: vec![3, 0, 0, 0, 0, 0, 0, 0],
        };
        let ch = Arc::new(DeviceChannel::new().expect("ch"));
        let irq = Arc::new(Interrupt::new().expect("irq"));
        let evts = vec![EventFd::new(0).expect("e"), EventFd::new(0).expect("e")];
        let mem = create_guest_memory(4).expect("mem");
        (MmioTransport::new(info, mem, ch.clone(), irq, evts), ch)
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }
    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn setup_queue(t: &mut MmioTransport, sel: u32, base: u32) {
        w(t, 0x30, sel);
        w(t, 0x38, 16);
        w(t, 0x80, base);
        w(t, 0x90, base + 0x100);
        w(t, 0xa0, base + 0x200);
        w(t, 0x44, 1);
    }

    #[test]
    fn identity_and_config() {
        let (mut t, _) = transport();
        assert_eq!(r(&mut t, 0), MAGIC);
        assert_eq!(r(&mut t, 4), 2);
        assert_eq!(r(&mut t, 8), 19);
        w(&mut t, 0x30, 1);
        assert_eq!(r(&mut t, 0x34), 16);
        let mut b = [0u8; 1];
        t.read(0x100, &mut b);
        assert_eq!(b[0], 3);
        t.read(0x100 + 4096, &mut b);
        assert_eq!(b[0], 0);
        assert_eq!(r(&mut t, 0xb0), u32::MAX, "no shared memory region");
    }

    #[test]
    fn full_negotiation_activates_backend() {
        let (mut t, ch) = transport();
        w(&mut t, 0x70, S_ACK | S_DRIVER);
        w(&mut t, 0x24, 1);
        w(&mut t, 0x20, 1 | 0x8000); // only VERSION_1 is offered in the high word
        w(&mut t, 0x24, 0);
        w(&mut t, 0x20, 0xffff_ffff);
        assert_eq!(t.acked_features, VIRTIO_F_VERSION_1 | 1);
        w(&mut t, 0x70, S_ACK | S_DRIVER | S_FEATURES_OK);
        assert_ne!(r(&mut t, 0x70) & S_FEATURES_OK, 0);
        setup_queue(&mut t, 0, 0x10000);
        setup_queue(&mut t, 1, 0x20000);
        w(&mut t, 0x70, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
        let msgs = ch.take();
        assert_eq!(msgs.len(), 1);
        let TransportMsg::Activate { queues, .. } = &msgs[0] else {
            panic!("expected activate")
        };
        assert_eq!(queues[1].desc_table(), 0x20000);
        // Queue registers are frozen while live.
        w(&mut t, 0x30, 0);
        w(&mut t, 0x80, 0x5000);
        assert_eq!(t.queues[0].desc_table(), 0x10000);
        w(&mut t, 0x70, 0);
        assert!(matches!(ch.take()[..], [TransportMsg::Reset]));
        assert_eq!(r(&mut t, 0x70), 0);
    }

    #[test]
    fn legacy_driver_and_bad_queue_are_refused() {
        let (mut t, ch) = transport();
        w(&mut t, 0x70, S_ACK | S_DRIVER);
        w(&mut t, 0x70, S_ACK | S_DRIVER | S_FEATURES_OK);
        assert_eq!(
            r(&mut t, 0x70) & S_FEATURES_OK,
            0,
            "no VERSION_1, no FEATURES_OK"
        );
        w(&mut t, 0x24, 1);
        w(&mut t, 0x20, 1);
        w(&mut t, 0x70, S_ACK | S_DRIVER | S_FEATURES_OK);
        // Descriptor table outside guest memory (4 MiB).
        w(&mut t, 0x30, 0);
        w(&mut t, 0x38, 16);
        w(&mut t, 0x80, 0x7000_0000);
        w(&mut t, 0x44, 1);
        w(&mut t, 0x70, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
        assert_ne!(r(&mut t, 0x70) & S_NEEDS_RESET, 0);
        assert!(ch.take().is_empty());
    }

    #[test]
    fn interrupt_ack_and_notify_fallback() {
        let (mut t, _) = transport();
        t.interrupt.signal_used_queue();
        assert_eq!(r(&mut t, 0x60), 1);
        w(&mut t, 0x64, 1);
        assert_eq!(r(&mut t, 0x60), 0);
        w(&mut t, 0x50, 1);
        assert_eq!(t.queue_evts[1].read().expect("notified"), 1);
        w(&mut t, 0x50, 7); // out of range: ignored
    }
}

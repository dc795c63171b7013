//! Virtio devices. The MMIO transport (`mmio`) runs on vCPU threads and only touches registers;
//! each device backend runs on the event-loop thread and owns its queues once activated. The two
//! halves meet through a `DeviceChannel` (activate/reset messages) and an `Interrupt`, so a vCPU
//! never waits for device I/O.

pub mod balloon;
pub mod block;
pub mod fs;
#[cfg(test)]
mod fuzz_tests;
pub mod mmio;
pub mod net;
pub mod queue;
pub mod vsock;

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::lock;

pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_VSOCK: u32 = 19;
/// Interrupt status bits.
pub const INT_VRING: u32 = 1;
pub const INT_CONFIG: u32 = 2;

/// The device's side of the interrupt line: a status word read by the transport and an irqfd.
pub struct Interrupt {
    pub status: AtomicU32,
    pub irqfd: EventFd,
}

impl Interrupt {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            status: AtomicU32::new(0),
            irqfd: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    pub fn signal_used_queue(&self) {
        self.raise(INT_VRING);
    }

    /// The device's configuration space changed (VIRTIO_MMIO_INT_CONFIG): the driver re-reads it.
    pub fn signal_config_change(&self) {
        self.raise(INT_CONFIG);
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.irqfd.write(1) {
            tracing::warn!("cannot raise virtio interrupt: {e}");
        }
    }
}

/// A device configuration space the backend may change at run time (a block slot's capacity),
/// shared with the transport, which reads it on vCPU threads. Every change bumps the
/// generation the driver checks around multi-word reads (ConfigGeneration).
pub struct ConfigSpace {
    bytes: Mutex<Vec<u8>>,
    generation: AtomicU32,
}

impl ConfigSpace {
    pub fn new(bytes: Vec<u8>) -> Self {
        Self {
            bytes: Mutex::new(bytes),
            generation: AtomicU32::new(0),
        }
    }

    /// Copies bytes from `offset` into `data`; bytes past the end read as 0.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        let b = lock(&self.bytes);
        for (i, d) in data.iter_mut().enumerate() {
            *d = b.get(offset + i).copied().unwrap_or(0);
        }
    }

    /// Changes the bytes and bumps the generation (under the same lock, so a reader never sees
    /// new bytes with the old generation after both reads).
    pub fn update(&self, f: impl FnOnce(&mut Vec<u8>)) {
        let mut b = lock(&self.bytes);
        f(&mut b);
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    pub fn generation(&self) -> u32 {
        self.generation.load(Ordering::SeqCst)
    }
}

/// A request from the transport to the backend.
pub enum TransportMsg {
    /// The driver set DRIVER_OK: here are the configured queues.
    Activate {
        queues: Vec<Queue>,
        mem: GuestMemoryMmap,
    },
    /// The driver wrote 0 to the status register.
    Reset,
}

/// Transport → backend message queue, with an eventfd the backend's event loop listens on.
pub struct DeviceChannel {
    msgs: Mutex<VecDeque<TransportMsg>>,
    pub evt: EventFd,
}

impl DeviceChannel {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            msgs: Mutex::new(VecDeque::new()),
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    pub fn send(&self, m: TransportMsg) {
        lock(&self.msgs).push_back(m);
        let _ = self.evt.write(1);
    }

    /// Drains pending messages (called by the backend when `evt` fires).
    pub fn take(&self) -> Vec<TransportMsg> {
        let _ = self.evt.read();
        lock(&self.msgs).drain(..).collect()
    }
}

/// The static facts the transport exposes about a device.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    pub device_type: u32,
    pub features: u64,
    pub queue_max_sizes: Vec<u16>,
    /// Device config space (read-only for the devices implemented here).
    pub config: Vec<u8>,
}

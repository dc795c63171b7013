//! Places devices on the buses: legacy PIO devices at their fixed ports, virtio devices in 4 KiB
//! MMIO slots from the start of the MMIO hole, each with its own IRQ, ioeventfds for queue
//! notifications, an irqfd for interrupts, and a `virtio_mmio.device=` command-line entry.

use std::sync::{Arc, Mutex};

use event_manager::MutEventSubscriber;
use kvm_ioctls::{IoEventAddress, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::devices::ExitSignal;
use crate::devices::bus::{Bus, BusError};
use crate::devices::i8042::{I8042, I8042_LEN, I8042_PORT, KBD_IRQ};
use crate::devices::serial::{COM1_IRQ, COM1_PORT, PendingFlush, SerialDevice};
use crate::devices::virtio::mmio::{MMIO_SIZE, MmioTransport, NOTIFY_OFFSET};
use crate::devices::virtio::{ConfigSpace, DeviceChannel, DeviceInfo, Interrupt};
use crate::vstate::memory::MMIO_HOLE_START;

/// First IRQ for virtio devices (after the legacy ISA ones we use).
const FIRST_VIRTIO_IRQ: u32 = 5;
const LAST_VIRTIO_IRQ: u32 = 23;

#[derive(Debug, thiserror::Error)]
pub enum DeviceManagerError {
    #[error("eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    #[error("cannot register irqfd for IRQ {irq}: {source}")]
    Irqfd {
        irq: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot register ioeventfd at {addr:#x}: {source}")]
    Ioeventfd {
        addr: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("out of IRQs for virtio devices")]
    NoIrq,
    #[error(transparent)]
    Bus(#[from] BusError),
}

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// The wiring a virtio backend needs, created before the backend itself.
pub struct VirtioSlot {
    pub base: u64,
    pub irq: u32,
    pub channel: Arc<DeviceChannel>,
    pub interrupt: Arc<Interrupt>,
    pub queue_evts: Vec<EventFd>,
}

pub struct DeviceManager {
    pub pio: Bus,
    pub mmio: Bus,
    pub i8042: Arc<Mutex<I8042>>,
    pub serial: Arc<Mutex<SerialDevice>>,
    pub subscribers: Vec<Subscriber>,
    /// `virtio_mmio.device=` entries for the kernel command line.
    pub cmdline_devices: Vec<String>,
    next_base: u64,
    next_irq: u32,
}

fn efd() -> Result<EventFd, DeviceManagerError> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceManagerError::EventFd)
}

impl DeviceManager {
    /// Creates the buses with COM1 and the i8042.
    pub fn new(
        vm: &VmFd,
        exit: Arc<ExitSignal>,
        serial_out: Box<dyn PendingFlush>,
    ) -> Result<Self, DeviceManagerError> {
        let serial_irq = efd()?;
        vm.register_irqfd(&serial_irq, COM1_IRQ)
            .map_err(|source| DeviceManagerError::Irqfd {
                irq: COM1_IRQ,
                source,
            })?;
        let kbd_irq = efd()?;
        vm.register_irqfd(&kbd_irq, KBD_IRQ)
            .map_err(|source| DeviceManagerError::Irqfd {
                irq: KBD_IRQ,
                source,
            })?;
        let mut pio = Bus::default();
        let serial = Arc::new(Mutex::new(SerialDevice::new(serial_irq, serial_out)));
        pio.insert(serial.clone(), COM1_PORT, 8)?;
        let i8042 = Arc::new(Mutex::new(I8042::new(exit, kbd_irq)));
        pio.insert(i8042.clone(), I8042_PORT, I8042_LEN)?;
        Ok(Self {
            pio,
            mmio: Bus::default(),
            i8042,
            serial,
            subscribers: Vec::new(),
            cmdline_devices: Vec::new(),
            next_base: MMIO_HOLE_START,
            next_irq: FIRST_VIRTIO_IRQ,
        })
    }

    /// Reserves an MMIO slot and IRQ and registers the irqfd and per-queue ioeventfds.
    pub fn allocate_virtio(
        &mut self,
        vm: &VmFd,
        num_queues: usize,
    ) -> Result<VirtioSlot, DeviceManagerError> {
        if self.next_irq > LAST_VIRTIO_IRQ {
            return Err(DeviceManagerError::NoIrq);
        }
        let (base, irq) = (self.next_base, self.next_irq);
        let interrupt = Arc::new(Interrupt::new().map_err(DeviceManagerError::EventFd)?);
        vm.register_irqfd(&interrupt.irqfd, irq)
            .map_err(|source| DeviceManagerError::Irqfd { irq, source })?;
        let mut queue_evts = Vec::with_capacity(num_queues);
        for i in 0..num_queues {
            let e = efd()?;
            let addr = base + NOTIFY_OFFSET;
            vm.register_ioevent(&e, &IoEventAddress::Mmio(addr), i as u32)
                .map_err(|source| DeviceManagerError::Ioeventfd { addr, source })?;
            queue_evts.push(e);
        }
        self.next_base += MMIO_SIZE;
        self.next_irq += 1;
        Ok(VirtioSlot {
            base,
            irq,
            channel: Arc::new(DeviceChannel::new().map_err(DeviceManagerError::EventFd)?),
            interrupt,
            queue_evts,
        })
    }

    /// Puts the transport on the MMIO bus and the backend on the event loop.
    pub fn attach_virtio(
        &mut self,
        slot: &VirtioSlot,
        info: DeviceInfo,
        mem: &GuestMemoryMmap,
        backend: Subscriber,
    ) -> Result<(), DeviceManagerError> {
        let config = Arc::new(ConfigSpace::new(info.config.clone()));
        self.attach_virtio_with_config(slot, info, config, mem, backend)
    }

    /// As `attach_virtio`, for a backend that changes its config space at run time.
    pub fn attach_virtio_with_config(
        &mut self,
        slot: &VirtioSlot,
        info: DeviceInfo,
        config: Arc<ConfigSpace>,
        mem: &GuestMemoryMmap,
        backend: Subscriber,
    ) -> Result<(), DeviceManagerError> {
        let evts = slot
            .queue_evts
            .iter()
            .map(|e| e.try_clone().map_err(DeviceManagerError::EventFd))
            .collect::<Result<Vec<_>, _>>()?;
        let transport = MmioTransport::new(
            info,
            mem.clone(),
            slot.channel.clone(),
            slot.interrupt.clone(),
            evts,
        )
        .with_config(config);
        self.mmio
            .insert(Arc::new(Mutex::new(transport)), slot.base, MMIO_SIZE)?;
        self.subscribers.push(backend);
        self.cmdline_devices.push(format!(
            "virtio_mmio.device=4K@{:#x}:{}",
            slot.base, slot.irq
        ));
        Ok(())
    }
}

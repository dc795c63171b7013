//! Builds a VM from a `VmConfig` and runs it: vCPU threads plus the device event loop on the
//! calling thread, until the guest shuts down, a fatal error occurs, or SIGTERM's grace runs out.

use std::fs::File;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};

use crate::api::{Control, bind_control};
use crate::boot::{self, BootSpec};
use crate::config::{SerialConfig, VmConfig, derive_mac, parse_mac};
use crate::device_manager::{DeviceManager, DeviceManagerError};
use crate::devices::bus::lock;
use crate::devices::serial::{LineWriter, PendingFlush};
use crate::devices::virtio::balloon::{self, BalloonDevice};
use crate::devices::virtio::block::{BlockDevice, BlockError};
use crate::devices::virtio::fs::{self, device::FsDevice, device::FsDeviceError};
use crate::devices::virtio::net::{self, NetDevice, Tap, TapError};
use crate::devices::virtio::vsock::{self, MuxerError, VsockDevice};
use crate::devices::{ExitReason, ExitSignal};
use crate::vstate::kvm::{KvmContext, KvmError};
use crate::vstate::memory::{MemoryError, create_guest_memory};
use crate::vstate::vcpu::{Vcpu, VcpuError, VcpuShared};
use crate::vstate::vm::{Vm, VmError};

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Kvm(#[from] KvmError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Devices(#[from] DeviceManagerError),
    #[error(transparent)]
    Block(#[from] BlockError),
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error(transparent)]
    Vsock(#[from] MuxerError),
    #[error(transparent)]
    Fs(#[from] FsDeviceError),
    #[error("confine the VMM: {0}")]
    Confine(#[from] crate::confine::ConfineError),
    #[error("cannot open serial output {path}: {source}")]
    SerialFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("event loop: {0:?}")]
    EventLoop(event_manager::Error),
    #[error("cannot bind control socket {path}: {source}")]
    ControlSocket {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("signal setup: {0}")]
    Signal(#[source] std::io::Error),
}

pub struct RunOptions {
    /// Process start, for `--boot-timer` reporting.
    pub boot_timer: Option<Instant>,
}

fn serial_output(cfg: &SerialConfig) -> Result<Box<dyn PendingFlush>, VmmError> {
    Ok(match cfg {
        SerialConfig::Stdout => Box::new(LineWriter::new(std::io::stdout())),
        SerialConfig::File(p) => Box::new(LineWriter::new(File::create(p).map_err(|source| {
            VmmError::SerialFile {
                path: p.clone(),
                source,
            }
        })?)),
        SerialConfig::None => Box::new(LineWriter::new(std::io::sink())),
    })
}

/// Blocks SIGTERM/SIGINT in this thread (and the threads it spawns later) and returns a signalfd.
fn signal_fd() -> Result<File, VmmError> {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use; the calls only read
    // and write the set we own and this thread's signal mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(VmmError::Signal(std::io::Error::last_os_error()));
        }
        let fd = libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC);
        if fd < 0 {
            return Err(VmmError::Signal(std::io::Error::last_os_error()));
        }
        use std::os::fd::FromRawFd;
        Ok(File::from_raw_fd(fd))
    }
}

/// Builds and runs the VM; returns why it stopped.
pub fn run(cfg: &VmConfig, opts: RunOptions) -> Result<ExitReason, VmmError> {
    cfg.validate()?;
    let signals = signal_fd()?;
    let kvm = KvmContext::new()?;
    tracing::debug!("kvm opened");
    let mem = create_guest_memory(cfg.memory_mib)?;
    let vm = Vm::new(&kvm, &mem)?;
    tracing::debug!("vm created");
    let exit = Arc::new(ExitSignal::new().map_err(VmmError::Signal)?);
    let mut dm = DeviceManager::new(&vm.fd, exit.clone(), serial_output(&cfg.serial)?)?;
    let slots = attach_virtio_devices(cfg, &vm, &mem, &mut dm)?;

    let mut cmdline = cfg.cmdline.clone();
    for d in &dm.cmdline_devices {
        cmdline.push(' ');
        cmdline.push_str(d);
    }
    let spec = BootSpec {
        kernel: &cfg.kernel,
        initrd: cfg.initrd.as_deref(),
        cmdline: &cmdline,
        mem_mib: cfg.memory_mib,
        vcpus: cfg.vcpus,
    };
    tracing::debug!("devices created");
    let entry = boot::load(&mem, &spec)?;
    tracing::debug!(?entry, %cmdline, "kernel loaded");

    let mut evmgr: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
        EventManager::new().map_err(VmmError::EventLoop)?;
    for s in dm.subscribers.drain(..) {
        evmgr.add_subscriber(s);
    }
    let api = match &cfg.control_socket {
        Some(p) => Some(bind_control(p).map_err(|source| VmmError::ControlSocket {
            path: p.clone(),
            source,
        })?),
        None => None,
    };
    let status = format!("running vcpus={} memory_mib={}", cfg.vcpus, cfg.memory_mib);
    let control = Arc::new(Mutex::new(
        Control::new(
            exit.clone(),
            signals,
            dm.i8042.clone(),
            api,
            status,
            std::time::Duration::from_millis(cfg.stop_grace_ms),
        )
        .with_disk_slots(slots),
    ));
    evmgr.add_subscriber(control.clone());

    let mut vcpus = Vec::with_capacity(cfg.vcpus as usize);
    for id in 0..cfg.vcpus {
        let v = Vcpu::new(&vm.fd, id)?;
        v.configure(&kvm, cfg.vcpus, entry)?;
        vcpus.push(v);
    }
    // Everything is open and mapped: from here on the guest can reach the device models, so
    // the process gives up what they never need (the in-process file server keeps its file
    // capabilities), and each thread installs the seccomp list of its own role: every vCPU
    // thread its `Vcpu` list before it first enters the guest, then this thread (the event
    // loop and the control socket) its `Vmm` list before it serves any event. The lists do
    // not stack: the vCPU threads start before this thread is filtered.
    crate::confine::drop_privileges(if cfg.fs.is_empty() {
        &[]
    } else {
        crate::confine::FS_CAPS
    })?;
    let shared = Arc::new(VcpuShared {
        pio: std::mem::take(&mut dm.pio),
        mmio: std::mem::take(&mut dm.mmio),
        exit: exit.clone(),
        boot_timer: opts.boot_timer,
    });
    for v in vcpus {
        v.start(shared.clone())?;
    }
    tracing::debug!("vcpus started");
    crate::seccomp::install(crate::seccomp::Role::Vmm, false)
        .map_err(|e| crate::confine::ConfineError::Os("seccomp", e))?;
    tracing::debug!("confined");

    let serial = dm.serial.clone();
    loop {
        evmgr.run_with_timeout(100).map_err(VmmError::EventLoop)?;
        lock(&serial).flush_pending();
        if let Some(r) = exit.reason() {
            // Events the guest raised just before it stopped (a last TX kick) are served,
            // so its last writes reach the devices; the devices flush as they are dropped.
            evmgr.run_with_timeout(0).map_err(VmmError::EventLoop)?;
            return Ok(r);
        }
        if lock(&control)
            .stop_deadline()
            .is_some_and(|d| Instant::now() >= d)
        {
            tracing::warn!(
                "guest did not stop within {} ms of Ctrl-Alt-Del",
                cfg.stop_grace_ms
            );
            return Ok(ExitReason::Stopped);
        }
    }
}

/// Creates the configured virtio devices, in the order vsock, disks, disk slots, file systems,
/// network interfaces, balloon. Returns the disk slots (for the control socket).
fn attach_virtio_devices(
    cfg: &VmConfig,
    vm: &Vm,
    mem: &vm_memory::GuestMemoryMmap,
    dm: &mut DeviceManager,
) -> Result<Vec<Arc<Mutex<BlockDevice>>>, VmmError> {
    if let Some(v) = &cfg.vsock {
        let slot = dm.allocate_virtio(&vm.fd, 3)?;
        let muxer = VsockDevice::bind(v.guest_cid, &v.uds_path)?;
        let evts = clone_evts(&slot.queue_evts)?;
        let dev = VsockDevice::new(muxer, slot.channel.clone(), slot.interrupt.clone(), evts);
        dm.attach_virtio(
            &slot,
            vsock::device_info(v.guest_cid),
            mem,
            Arc::new(Mutex::new(dev)),
        )?;
    }
    for d in &cfg.disks {
        let slot = dm.allocate_virtio(&vm.fd, 1)?;
        let evt = clone_evts(&slot.queue_evts)?.remove(0);
        let dev = BlockDevice::open(
            &d.path,
            d.read_only,
            &d.id,
            slot.channel.clone(),
            slot.interrupt.clone(),
            evt,
        )?;
        let info = dev.info();
        dm.attach_virtio(&slot, info, mem, Arc::new(Mutex::new(dev)))?;
    }
    let mut slots = Vec::with_capacity(cfg.disk_slots as usize);
    for _ in 0..cfg.disk_slots {
        let slot = dm.allocate_virtio(&vm.fd, 1)?;
        let evt = clone_evts(&slot.queue_evts)?.remove(0);
        let dev = BlockDevice::slot(slot.channel.clone(), slot.interrupt.clone(), evt);
        let (info, config) = (dev.info(), dev.config_space());
        let dev = Arc::new(Mutex::new(dev));
        dm.attach_virtio_with_config(&slot, info, config, mem, dev.clone())?;
        slots.push(dev);
    }
    for f in &cfg.fs {
        let slot = dm.allocate_virtio(&vm.fd, fs::NUM_QUEUES)?;
        let dev = FsDevice::new(
            &f.shared_dir,
            slot.channel.clone(),
            slot.interrupt.clone(),
            clone_evts(&slot.queue_evts)?,
        )?
        .allow_special_files(f.allow_special_files);
        dm.attach_virtio(
            &slot,
            fs::device::device_info(&f.tag),
            mem,
            Arc::new(Mutex::new(dev)),
        )?;
    }
    for n in &cfg.net {
        let mac = match &n.mac {
            Some(m) => parse_mac(m)?,
            None => derive_mac(&n.tap),
        };
        let tap = match n.fd {
            Some(fd) => Tap::from_fd(fd, &n.tap)?,
            None => Tap::open(&n.tap)?,
        };
        let slot = dm.allocate_virtio(&vm.fd, 2)?;
        let dev = NetDevice::new(
            tap,
            slot.channel.clone(),
            slot.interrupt.clone(),
            clone_evts(&slot.queue_evts)?,
        );
        dm.attach_virtio(&slot, net::device_info(mac), mem, Arc::new(Mutex::new(dev)))?;
    }
    if cfg.balloon {
        let slot = dm.allocate_virtio(&vm.fd, balloon::NUM_QUEUES)?;
        let dev = BalloonDevice::new(
            slot.channel.clone(),
            slot.interrupt.clone(),
            clone_evts(&slot.queue_evts)?,
        );
        dm.attach_virtio(
            &slot,
            balloon::device_info(),
            mem,
            Arc::new(Mutex::new(dev)),
        )?;
    }
    Ok(slots)
}

fn clone_evts(
    evts: &[vmm_sys_util::eventfd::EventFd],
) -> Result<Vec<vmm_sys_util::eventfd::EventFd>, VmmError> {
    evts.iter()
        .map(|e| {
            e.try_clone()
                .map_err(|e| VmmError::Devices(DeviceManagerError::EventFd(e)))
        })
        .collect()
}

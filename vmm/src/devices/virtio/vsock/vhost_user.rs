//! virtio-vsock as a vhost-user backend (`husk-vmm vhost-user vsock`): another VMM (QEMU's
//! `vhost-user-vsock-pci`, Cloud Hypervisor) owns the device and hands us guest memory and the
//! RX/TX virtqueues over the vhost-user socket. The queues are served by the same code as the
//! MMIO device ([`drain_tx`] / [`fill_rx`], multi-descriptor TX chains included) and the
//! connections by the same hybrid-vsock [`VsockMuxer`].
//!
//! The guest CID is ours to give: the frontend reads it from the config space (QEMU's
//! `vhost-user-vsock-pci` has no `guest-cid` property and requires `VHOST_USER_PROTOCOL_F_CONFIG`).
//! The event queue stays with the frontend (QEMU sets up only RX and TX).

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::{Arc, Mutex};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackendMut, VhostUserDaemon, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_config::{VIRTIO_F_NOTIFY_ON_EMPTY, VIRTIO_F_VERSION_1};
use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use super::muxer::{MuxerError, VsockMuxer};
use super::packet::MAX_PKT_PAYLOAD;
use super::{QUEUE_SIZE, RXQ, TXQ, drain_tx, fill_rx};

/// RX, TX and event queue (the frontend keeps the event queue to itself).
const NUM_QUEUES: usize = 3;
/// `handle_event` ids: 0..NUM_QUEUES are queue kicks, NUM_QUEUES is the library's own exit /
/// vring-enabled event, so ours start above it.
const MUXER_EVENT: u16 = NUM_QUEUES as u16 + 1;

#[derive(Debug, thiserror::Error)]
pub enum VhostUserVsockError {
    #[error(transparent)]
    Muxer(#[from] MuxerError),
    #[error("vhost-user daemon: {0}")]
    Daemon(String),
    #[error("cannot watch the vsock muxer: {0}")]
    Register(String),
    #[error("guest memory not set up by the frontend yet")]
    NoMemory,
    #[error("virtqueue: {0}")]
    Queue(String),
    #[error("unexpected event {0}")]
    UnknownEvent(u16),
    #[error("cannot signal the frontend: {0}")]
    Signal(#[source] std::io::Error),
}

impl From<VhostUserVsockError> for std::io::Error {
    fn from(e: VhostUserVsockError) -> Self {
        std::io::Error::other(e)
    }
}

/// The vhost-user vsock device: muxer plus the state the queue code needs.
pub struct VsockBackend {
    cid: u64,
    muxer: VsockMuxer,
    mem: Option<GuestMemoryAtomic<GuestMemoryMmap>>,
    event_idx: bool,
    scratch: Vec<u8>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Which {
    Rx,
    Tx,
}

impl VsockBackend {
    /// Binds the hybrid socket `uds` (host clients connect here; guest connections to port P go
    /// to `<uds>_P`).
    pub fn new(cid: u64, uds: &Path) -> Result<Self, VhostUserVsockError> {
        Ok(Self {
            cid,
            muxer: VsockMuxer::new(cid, uds)?,
            mem: None,
            event_idx: false,
            scratch: Vec::with_capacity(MAX_PKT_PAYLOAD),
        })
    }

    /// The muxer's readiness fd, to be registered with the daemon's epoll handler.
    pub fn muxer_fd(&self) -> std::os::fd::RawFd {
        self.muxer.as_raw_fd()
    }

    /// Serves one queue until it is empty (RX: or the muxer has nothing left), re-arming guest
    /// notifications as EVENT_IDX requires, then interrupts the guest if it wants one.
    fn process(&mut self, vring: &VringRwLock, which: Which) -> Result<(), VhostUserVsockError> {
        let mem = self
            .mem
            .as_ref()
            .ok_or(VhostUserVsockError::NoMemory)?
            .memory();
        let qerr = |e: virtio_queue::Error| VhostUserVsockError::Queue(e.to_string());
        let mut st = vring.get_mut();
        if !st.is_enabled() || !st.get_queue().ready() {
            return Ok(());
        }
        let mut used = false;
        loop {
            st.disable_notification().map_err(qerr)?;
            let q = st.get_queue_mut();
            used |= match which {
                Which::Tx => drain_tx(q, &mem, &mut self.muxer, &mut self.scratch),
                Which::Rx => fill_rx(q, &mem, &mut self.muxer, &mut self.scratch),
            };
            // More buffers arrived while notifications were off: go again (for RX only while
            // there is something to put in them, or idle RX buffers would spin us).
            let more = st.enable_notification().map_err(qerr)?;
            if !more || (which == Which::Rx && !self.muxer.has_rx()) {
                break;
            }
        }
        if used && st.needs_notification().map_err(qerr)? {
            st.signal_used_queue()
                .map_err(VhostUserVsockError::Signal)?;
        }
        Ok(())
    }

    fn run_queues(&mut self, vrings: &[VringRwLock]) -> Result<(), VhostUserVsockError> {
        self.process(&vrings[TXQ], Which::Tx)?;
        self.process(&vrings[RXQ], Which::Rx)
    }
}

impl VhostUserBackendMut for VsockBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE as usize
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_F_NOTIFY_ON_EMPTY)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ
    }

    fn reset_device(&mut self) {
        tracing::debug!("vhost-user vsock: reset");
        self.muxer.reset();
    }

    fn set_event_idx(&mut self, enabled: bool) {
        self.event_idx = enabled;
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let cfg = self.cid.to_le_bytes();
        let start = (offset as usize).min(cfg.len());
        let end = start.saturating_add(size as usize).min(cfg.len());
        cfg[start..end].to_vec()
    }

    fn update_memory(&mut self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> std::io::Result<()> {
        tracing::debug!("vhost-user vsock: guest memory table set");
        self.mem = Some(mem);
        Ok(())
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        if evset != EventSet::IN {
            tracing::debug!(?evset, device_event, "vhost-user vsock: event");
        }
        match device_event {
            e if (e as usize) < NUM_QUEUES => {}
            MUXER_EVENT => self.muxer.process_events(),
            e => return Err(VhostUserVsockError::UnknownEvent(e).into()),
        }
        if self.mem.is_none() {
            return Ok(());
        }
        self.run_queues(vrings).map_err(Into::into)
    }
}

/// Serves one vhost-user frontend on `socket` (we listen; the frontend connects) until it
/// disconnects.
pub fn serve(socket: &Path, uds: &Path, cid: u64) -> Result<(), VhostUserVsockError> {
    let backend = VsockBackend::new(cid, uds)?;
    let muxer_fd = backend.muxer_fd();
    let backend = Arc::new(Mutex::new(backend));
    let mut daemon = VhostUserDaemon::new(
        "husk-vhost-user-vsock".into(),
        backend,
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .map_err(|e| VhostUserVsockError::Daemon(e.to_string()))?;
    for h in daemon.get_epoll_handlers() {
        h.register_listener(muxer_fd, EventSet::IN, u64::from(MUXER_EVENT))
            .map_err(|e| VhostUserVsockError::Register(e.to_string()))?;
    }
    tracing::info!(socket = %socket.display(), uds = %uds.display(), cid, "vhost-user vsock: listening");
    daemon
        .serve(socket)
        .map_err(|e| VhostUserVsockError::Daemon(e.to_string()))?;
    tracing::info!("vhost-user vsock: frontend disconnected");
    Ok(())
}

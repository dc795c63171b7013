//! virtio-fs as a vhost-user backend (`husk-vmm vhost-user fs`): QEMU's `vhost-user-fs-pci`
//! (or another frontend) owns the device and hands us guest memory and the queues; requests
//! are served by [`Server`] on the daemon's worker thread.

use std::path::Path;
use std::sync::{Arc, Mutex};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackendMut, VhostUserDaemon, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier,
};

use super::passthrough::PassthroughFs;
use super::{NUM_QUEUES, QUEUE_SIZE, Server, config_space, process_queue};

#[derive(Debug, thiserror::Error)]
pub enum VhostUserFsError {
    #[error("share {0}: {1}")]
    Share(String, #[source] std::io::Error),
    #[error(transparent)]
    Confine(#[from] crate::confine::ConfineError),
    #[error("vhost-user daemon: {0}")]
    Daemon(String),
    #[error("virtqueue: {0}")]
    Queue(String),
    #[error("unexpected event {0}")]
    UnknownEvent(u16),
    #[error("cannot signal the frontend: {0}")]
    Signal(#[source] std::io::Error),
}

impl From<VhostUserFsError> for std::io::Error {
    fn from(e: VhostUserFsError) -> Self {
        std::io::Error::other(e)
    }
}

pub struct FsBackend {
    server: Server,
    tag: String,
    mem: Option<GuestMemoryAtomic<GuestMemoryMmap>>,
    scratch: Vec<u8>,
}

impl FsBackend {
    /// `special_files`: see [`PassthroughFs::allow_special_files`].
    pub fn new(share: &Path, tag: &str, special_files: bool) -> Result<Self, VhostUserFsError> {
        let fs = PassthroughFs::new(share)
            .map_err(|e| VhostUserFsError::Share(share.display().to_string(), e))?
            .allow_special_files(special_files);
        Ok(Self {
            server: Server::new(fs),
            tag: tag.to_string(),
            mem: None,
            scratch: Vec::new(),
        })
    }

    fn process(&mut self, vring: &VringRwLock) -> Result<(), VhostUserFsError> {
        let Some(mem) = self.mem.as_ref().map(|m| m.memory()) else {
            return Ok(());
        };
        let qerr = |e: virtio_queue::Error| VhostUserFsError::Queue(e.to_string());
        let mut st = vring.get_mut();
        if !st.is_enabled() || !st.get_queue().ready() {
            return Ok(());
        }
        let mut used = false;
        loop {
            st.disable_notification().map_err(qerr)?;
            used |= process_queue(st.get_queue_mut(), &mem, &self.server, &mut self.scratch);
            if !st.enable_notification().map_err(qerr)? {
                break;
            }
        }
        if used && st.needs_notification().map_err(qerr)? {
            st.signal_used_queue().map_err(VhostUserFsError::Signal)?;
        }
        Ok(())
    }
}

impl VhostUserBackendMut for FsBackend {
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
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ
    }

    fn reset_device(&mut self) {
        tracing::debug!("vhost-user fs: reset");
        self.server.fs().reset();
    }

    fn set_event_idx(&mut self, enabled: bool) {
        tracing::debug!(enabled, "vhost-user fs: EVENT_IDX");
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let cfg = config_space(&self.tag);
        let start = (offset as usize).min(cfg.len());
        let end = start.saturating_add(size as usize).min(cfg.len());
        cfg[start..end].to_vec()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)
            .inspect_err(|e| tracing::error!("vhost-user fs: no exit event: {e}"))
            .ok()
    }

    fn update_memory(&mut self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> std::io::Result<()> {
        crate::vstate::memory::exclude_from_core_dumps(&mem.memory());
        self.mem = Some(mem);
        Ok(())
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        let q = device_event as usize;
        if q >= NUM_QUEUES {
            return Err(VhostUserFsError::UnknownEvent(device_event).into());
        }
        self.process(&vrings[q]).map_err(Into::into)
    }
}

/// Serves one frontend on `socket` (we listen) until it disconnects. The process gives up
/// privileges first (see `confine`).
pub fn serve(
    socket: &Path,
    share: &Path,
    tag: &str,
    special_files: bool,
) -> Result<(), VhostUserFsError> {
    let backend = FsBackend::new(share, tag, special_files)?;
    crate::confine::confine(crate::confine::FS_CAPS, crate::seccomp::Role::VhostUserFs)?;
    let mut daemon = VhostUserDaemon::new(
        "husk-vhost-user-fs".into(),
        Arc::new(Mutex::new(backend)),
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .map_err(|e| VhostUserFsError::Daemon(e.to_string()))?;
    tracing::info!(socket = %socket.display(), share = %share.display(), tag, "vhost-user fs: listening");
    daemon
        .serve(socket)
        .map_err(|e| VhostUserFsError::Daemon(e.to_string()))?;
    tracing::info!("vhost-user fs: frontend disconnected");
    Ok(())
}

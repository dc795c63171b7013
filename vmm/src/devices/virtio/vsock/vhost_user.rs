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
use vmm_sys_util::event::{
    EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier,
};

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
    #[error(transparent)]
    Confine(#[from] crate::confine::ConfineError),
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

    /// The library already switched every vring's queue to EVENT_IDX (or not); `process`
    /// follows the queue's mode through `enable_notification` / `needs_notification`.
    fn set_event_idx(&mut self, enabled: bool) {
        tracing::debug!(enabled, "vhost-user vsock: EVENT_IDX");
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let cfg = self.cid.to_le_bytes();
        let start = (offset as usize).min(cfg.len());
        let end = start.saturating_add(size as usize).min(cfg.len());
        cfg[start..end].to_vec()
    }

    /// Without an exit event the library cannot stop its vring worker, and dropping the daemon
    /// after the frontend left would wait for that thread forever.
    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)
            .inspect_err(|e| tracing::error!("vhost-user vsock: no exit event: {e}"))
            .ok()
    }

    fn update_memory(&mut self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> std::io::Result<()> {
        crate::vstate::memory::exclude_from_core_dumps(&mem.memory());
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
    // The hybrid socket is bound: give up what a vsock device never needs (no capabilities).
    crate::confine::confine(&[], crate::seccomp::Role::VhostUserVsock)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::queue::tests::{F_NEXT, F_WRITE, MockSplitQueue, desc};
    use crate::devices::virtio::vsock::packet::{
        HDR_SIZE, HOST_CID, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RW, TYPE_STREAM,
        VsockHeader,
    };
    use std::fs::File;
    use std::io::{Read, Write};
    use std::os::fd::FromRawFd;
    use std::os::unix::net::UnixListener;
    use vm_memory::{Bytes, GuestAddress};

    const SIZE: u16 = 16;

    fn guest_hdr(op: u16, len: u32) -> VsockHeader {
        VsockHeader {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 1025,
            dst_port: 99,
            len,
            type_: TYPE_STREAM,
            op,
            buf_alloc: 256 * 1024,
            ..Default::default()
        }
    }

    /// Where the used ring goes: `MockSplitQueue` puts its own used ring over the tail of the
    /// avail ring (its `end()` counts ring elements as bytes), which clobbers `used_event`.
    fn used_ring(q: &MockSplitQueue<GuestMemoryMmap>) -> GuestAddress {
        GuestAddress(q.desc_table_addr().0 + 0x800)
    }

    fn used(m: &GuestMemoryMmap, q: &MockSplitQueue<GuestMemoryMmap>) -> Vec<(u32, u32)> {
        let base = used_ring(q).0;
        let idx: u16 = m.read_obj(GuestAddress(base + 2)).expect("used idx");
        (0..u64::from(idx))
            .map(|i| {
                let e = base + 4 + 8 * i;
                let id = m.read_obj(GuestAddress(e)).expect("id");
                (id, m.read_obj(GuestAddress(e + 4)).expect("len"))
            })
            .collect()
    }

    /// A vring set up the way the vhost-user handler does it, over a mock split queue.
    fn vring(
        atomic: &GuestMemoryAtomic<GuestMemoryMmap>,
        q: &MockSplitQueue<GuestMemoryMmap>,
        call: Option<File>,
    ) -> VringRwLock {
        let v = VringRwLock::new(atomic.clone(), QUEUE_SIZE).expect("vring");
        v.set_queue_size(SIZE);
        v.set_queue_info(q.desc_table_addr().0, q.avail_addr().0, used_ring(q).0)
            .expect("queue info");
        v.set_queue_event_idx(true);
        v.set_queue_ready(true);
        v.set_enabled(true);
        v.set_call(call);
        v
    }

    fn eventfd() -> File {
        // SAFETY: eventfd() returns a new descriptor (checked below) that nothing else owns.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        assert!(fd >= 0, "eventfd");
        // SAFETY: `fd` is a valid, owned descriptor; the File takes sole ownership.
        unsafe { File::from_raw_fd(fd) }
    }

    #[test]
    fn config_space_is_the_cid_and_features_fit_qemu() {
        let dir = tempfile::tempdir().expect("tmp");
        let b = VsockBackend::new(0x1122_3344_5566_7788, &dir.path().join("v.sock")).expect("b");
        assert_eq!(b.get_config(0, 8), 0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(b.get_config(4, 4), 0x1122_3344u32.to_le_bytes());
        assert_eq!(b.get_config(6, 100), vec![0x22, 0x11]);
        assert!(b.get_config(8, 4).is_empty() && b.get_config(u32::MAX, u32::MAX).is_empty());
        assert_ne!(
            b.features() & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
            0
        );
        assert_ne!(b.features() & (1 << VIRTIO_F_VERSION_1), 0);
        // QEMU's vhost-user-vsock refuses a backend without CONFIG.
        assert!(
            b.protocol_features()
                .contains(VhostUserProtocolFeatures::CONFIG)
        );
        assert!(MUXER_EVENT as usize > b.num_queues());
    }

    /// The whole backend path on mock vrings with EVENT_IDX: a guest REQUEST and a 64 KiB RW whose
    /// header and payload span ten descriptors (as Linux >= 6 sends anything over 32 KiB) reach
    /// `<uds>_99` intact; the RESPONSE and host data come back through RX buffers; the guest is
    /// interrupted through the call eventfd.
    #[test]
    fn multi_descriptor_tx_and_rx_through_the_vrings() {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).expect("mem");
        let atomic = GuestMemoryAtomic::new(m.clone());
        let dir = tempfile::tempdir().expect("tmp");
        let uds = dir.path().join("v.sock");
        let listener = UnixListener::bind(format!("{}_99", uds.display())).expect("bind");
        let mut b = VsockBackend::new(3, &uds).expect("backend");

        let rxq = MockSplitQueue::create(&m, GuestAddress(0), SIZE);
        let txq = MockSplitQueue::create(&m, GuestAddress(0x1000), SIZE);
        let evq = MockSplitQueue::create(&m, GuestAddress(0x2000), SIZE);
        let rx_call = eventfd();
        let vrings = vec![
            vring(&atomic, &rxq, Some(rx_call.try_clone().expect("dup"))),
            vring(&atomic, &txq, None),
            vring(&atomic, &evq, None),
        ];

        // Before SET_MEM_TABLE a kick is a no-op, not a crash.
        b.handle_event(TXQ as u16, EventSet::IN, &vrings, 0)
            .expect("no memory yet");
        assert!(
            b.handle_event(MUXER_EVENT + 1, EventSet::IN, &vrings, 0)
                .is_err()
        );
        b.update_memory(atomic.clone()).expect("mem");
        b.set_event_idx(true);

        // TX: REQUEST in one descriptor, then RW: header 10 + 34 bytes, payload 8 x 8 KiB.
        let payload: Vec<u8> = (0..MAX_PKT_PAYLOAD as u32)
            .map(|i| (i * 31 + 7) as u8)
            .collect();
        m.write_slice(&guest_hdr(OP_REQUEST, 0).to_bytes(), GuestAddress(0x1_0000))
            .expect("w");
        let rw = guest_hdr(OP_RW, payload.len() as u32).to_bytes();
        m.write_slice(&rw[..10], GuestAddress(0x1_1000)).expect("w");
        m.write_slice(&rw[10..], GuestAddress(0x1_2000)).expect("w");
        m.write_slice(&payload, GuestAddress(0x2_0000)).expect("w");
        let mut descs = vec![
            desc(0x1_0000, HDR_SIZE as u32, 0, 0),
            desc(0x1_1000, 10, F_NEXT, 2),
            desc(0x1_2000, 34, F_NEXT, 3),
        ];
        for i in 0..8u16 {
            let last = i == 7;
            descs.push(desc(
                0x2_0000 + u64::from(i) * 8192,
                8192,
                if last { 0 } else { F_NEXT },
                4 + i,
            ));
        }
        txq.add_desc_chains(&descs, 0).expect("tx chains");
        b.handle_event(TXQ as u16, EventSet::IN, &vrings, 0)
            .expect("tx");
        assert_eq!(
            used(&m, &txq),
            vec![(0, 0), (1, 0)],
            "both TX chains returned"
        );

        let (mut host, _) = listener.accept().expect("the REQUEST reached <uds>_99");
        host.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .expect("timeout");
        let mut got = vec![0u8; payload.len()];
        host.read_exact(&mut got).expect("64 KiB payload");
        assert!(got == payload, "payload reassembled from ten descriptors");

        // RX: three guest buffers, the first with its header split over two descriptors.
        rxq.add_desc_chains(
            &[
                desc(0x3_0000, 20, F_NEXT | F_WRITE, 1),
                desc(0x3_1000, 4096, F_WRITE, 0),
                desc(0x3_4000, HDR_SIZE as u32, F_WRITE, 0),
                desc(0x3_2000, HDR_SIZE as u32, F_NEXT | F_WRITE, 4),
                desc(0x3_3000, 4096, F_WRITE, 0),
            ],
            0,
        )
        .expect("rx chains");
        b.handle_event(RXQ as u16, EventSet::IN, &vrings, 0)
            .expect("rx");
        let mut hb = [0u8; HDR_SIZE];
        m.read_slice(&mut hb[..20], GuestAddress(0x3_0000))
            .expect("r");
        m.read_slice(&mut hb[20..], GuestAddress(0x3_1000))
            .expect("r");
        let resp = VsockHeader::from_bytes(&hb);
        assert_eq!(
            (resp.op, resp.src_port, resp.dst_port, resp.dst_cid),
            (OP_RESPONSE, 99, 1025, 3)
        );
        // 64 KiB consumed by the host socket: the guest hears about its credit.
        m.read_slice(&mut hb, GuestAddress(0x3_4000)).expect("r");
        let credit = VsockHeader::from_bytes(&hb);
        assert_eq!(
            (credit.op, credit.fwd_cnt),
            (OP_CREDIT_UPDATE, MAX_PKT_PAYLOAD as u32)
        );

        host.write_all(b"pong").expect("host write");
        b.handle_event(MUXER_EVENT, EventSet::IN, &vrings, 0)
            .expect("muxer");
        assert_eq!(
            used(&m, &rxq),
            vec![
                (0, HDR_SIZE as u32),
                (2, HDR_SIZE as u32),
                (3, HDR_SIZE as u32 + 4)
            ]
        );
        m.read_slice(&mut hb, GuestAddress(0x3_2000)).expect("r");
        let data = VsockHeader::from_bytes(&hb);
        assert_eq!((data.op, data.len), (OP_RW, 4));
        let mut pong = [0u8; 4];
        m.read_slice(&mut pong, GuestAddress(0x3_3000)).expect("r");
        assert_eq!(&pong, b"pong");

        let mut n = [0u8; 8];
        (&rx_call)
            .read_exact(&mut n)
            .expect("the guest was interrupted");
        assert!(u64::from_ne_bytes(n) >= 1);

        // EVENT_IDX: the driver wants an interrupt only once used entry 10 is written.
        let used_event = GuestAddress(rxq.avail_addr().0 + 4 + 2 * u64::from(SIZE));
        m.write_obj(10u16, used_event).expect("w");
        rxq.add_desc_chains(&[desc(0x3_5000, 4096, F_WRITE, 0)], 5)
            .expect("rx chain");
        host.write_all(b"more").expect("host write");
        b.handle_event(MUXER_EVENT, EventSet::IN, &vrings, 0)
            .expect("muxer");
        assert_eq!(used(&m, &rxq).last(), Some(&(5, HDR_SIZE as u32 + 4)));
        let e = (&rx_call)
            .read_exact(&mut n)
            .expect_err("interrupt suppressed");
        assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);

        // Reset drops connections: the host side sees EOF.
        b.reset_device();
        let mut rest = Vec::new();
        assert_eq!(host.read_to_end(&mut rest).expect("eof"), 0);
    }
}

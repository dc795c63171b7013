//! virtio-fs as husk-vmm's own MMIO device: the same [`Server`] as the vhost-user backend,
//! run on the event-loop thread with the queues the transport hands over at DRIVER_OK.

use std::path::Path;
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::passthrough::PassthroughFs;
use super::{NUM_QUEUES, QUEUE_SIZE, Server, config_space, process_queue};
use crate::devices::virtio::{
    DeviceChannel, DeviceInfo, Interrupt, TransportMsg, VIRTIO_F_VERSION_1,
};

/// virtio device id of a file system device.
pub const TYPE_FS: u32 = 26;

#[derive(Debug, thiserror::Error)]
#[error("virtio-fs share {path}: {source}")]
pub struct FsDeviceError {
    path: String,
    #[source]
    source: std::io::Error,
}

pub fn device_info(tag: &str) -> DeviceInfo {
    DeviceInfo {
        device_type: TYPE_FS,
        features: VIRTIO_F_VERSION_1,
        queue_max_sizes: vec![QUEUE_SIZE; NUM_QUEUES],
        config: config_space(tag),
    }
}

pub struct FsDevice {
    server: Server,
    channel: Arc<DeviceChannel>,
    interrupt: Arc<Interrupt>,
    queue_evts: Vec<EventFd>,
    active: Option<(GuestMemoryMmap, Vec<Queue>)>,
    scratch: Vec<u8>,
}

impl FsDevice {
    pub fn new(
        share: &Path,
        channel: Arc<DeviceChannel>,
        interrupt: Arc<Interrupt>,
        queue_evts: Vec<EventFd>,
    ) -> Result<Self, FsDeviceError> {
        let fs = PassthroughFs::new(share).map_err(|source| FsDeviceError {
            path: share.display().to_string(),
            source,
        })?;
        Ok(Self {
            server: Server::new(fs),
            channel,
            interrupt,
            queue_evts,
            active: None,
            scratch: Vec::new(),
        })
    }

    pub(crate) fn handle_channel(&mut self) {
        for m in self.channel.take() {
            match m {
                TransportMsg::Activate { queues, mem } => {
                    tracing::debug!("virtio-fs: activated");
                    self.active = Some((mem, queues));
                }
                TransportMsg::Reset => {
                    self.active = None;
                    self.server.fs().reset();
                }
            }
        }
    }

    pub(crate) fn run_queues(&mut self) {
        let Some((mem, queues)) = self.active.as_mut() else {
            return;
        };
        let mut used = false;
        for q in queues.iter_mut() {
            used |= process_queue(q, mem, &self.server, &mut self.scratch);
        }
        if used {
            self.interrupt.signal_used_queue();
        }
    }
}

impl MutEventSubscriber for FsDevice {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            0 => self.handle_channel(),
            t => {
                if let Some(e) = self.queue_evts.get(t as usize - 1) {
                    let _ = e.read();
                }
            }
        }
        self.run_queues();
    }

    fn init(&mut self, ops: &mut EventOps) {
        let mut add = |fd: &EventFd, token: u32| {
            if let Err(e) = ops.add(Events::with_data(fd, token, EventSet::IN)) {
                tracing::error!("virtio-fs: cannot register event {token}: {e:?}");
            }
        };
        add(&self.channel.evt, 0);
        for (i, e) in self.queue_evts.iter().enumerate() {
            add(e, i as u32 + 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::fs::abi::{IN_HEADER_LEN, Writer, op};
    use crate::devices::virtio::queue::tests::{F_NEXT, F_WRITE, MockSplitQueue, desc, used};
    use vm_memory::{Bytes, GuestAddress};

    /// Requests on mock queues through the device: a LOOKUP answered into a reply split over
    /// two writable descriptors, a chain with no room for a reply, a FORGET (no reply).
    #[test]
    fn device_serves_chains_from_its_queues() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::write(dir.path().join("f"), b"data").expect("write");
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).expect("mem");
        let ch = Arc::new(DeviceChannel::new().expect("ch"));
        let irq = Arc::new(Interrupt::new().expect("irq"));
        let evts = (0..NUM_QUEUES)
            .map(|_| EventFd::new(0).expect("e"))
            .collect();
        let mut dev = FsDevice::new(dir.path(), ch.clone(), irq.clone(), evts).expect("dev");
        let hiq = MockSplitQueue::create(&m, GuestAddress(0), 16);
        let rq = MockSplitQueue::create(&m, GuestAddress(0x1000), 16);
        ch.send(TransportMsg::Activate {
            queues: vec![
                hiq.create_queue().expect("q"),
                rq.create_queue().expect("q"),
            ],
            mem: m.clone(),
        });
        dev.handle_channel();

        let mut w = Writer::default();
        w.u32((IN_HEADER_LEN + 2) as u32)
            .u32(op::LOOKUP)
            .u64(5)
            .u64(1)
            .u32(0)
            .u32(0)
            .u32(0)
            .u16(0)
            .u16(0);
        w.bytes(b"f\0");
        m.write_slice(&w.buf, GuestAddress(0x1_0000)).expect("w");
        rq.add_desc_chains(
            &[
                desc(0x1_0000, w.buf.len() as u32, F_NEXT, 1),
                desc(0x2_0000, 16, F_NEXT | F_WRITE, 2),
                desc(0x3_0000, 4096, F_WRITE, 0),
                // No writable descriptor: returned with length 0.
                desc(0x1_0000, w.buf.len() as u32, 0, 0),
            ],
            0,
        )
        .expect("chains");
        dev.run_queues();
        let u = used(&m, &rq);
        assert_eq!(u, vec![(0, 16 + 128), (3, 0)]);
        let err: i32 = m.read_obj(GuestAddress(0x2_0004)).expect("r");
        let size: u64 = m.read_obj(GuestAddress(0x3_0000 + 48)).expect("r");
        assert_eq!((err, size), (0, 4));
        assert_ne!(irq.status.load(std::sync::atomic::Ordering::SeqCst), 0);
    }
}

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

    /// See [`PassthroughFs::allow_special_files`].
    pub fn allow_special_files(self, allow: bool) -> Self {
        Self {
            server: self.server.allow_special_files(allow),
            ..self
        }
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

    /// READ and WRITE go straight between the file and guest buffers split over several
    /// descriptors (zero copy), and the result is what the copying path would give.
    #[test]
    fn read_and_write_span_descriptors_without_copies() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::write(dir.path().join("f"), b"0123456789").expect("write");
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).expect("mem");
        let ch = Arc::new(DeviceChannel::new().expect("ch"));
        let irq = Arc::new(Interrupt::new().expect("irq"));
        let evts = (0..NUM_QUEUES)
            .map(|_| EventFd::new(0).expect("e"))
            .collect();
        let mut dev = FsDevice::new(dir.path(), ch.clone(), irq, evts).expect("dev");
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
        let (node, _) = dev.server.fs().lookup(1, b"f").expect("lookup");
        let fh = dev
            .server
            .fs()
            .open(node, libc::O_RDWR as u32)
            .expect("open");
        let io = |op: u32, unique: u64, offset: u64, size: u32, data: &[u8]| {
            let mut w = Writer::default();
            w.u32((IN_HEADER_LEN + 40 + data.len()) as u32)
                .u32(op)
                .u64(unique)
                .u64(node);
            w.u32(0).u32(0).u32(0).u16(0).u16(0);
            w.u64(fh).u64(offset).u32(size).u32(0).u64(0).u32(0).u32(0);
            w.bytes(data);
            w.buf
        };
        // WRITE "abcdef" at 2: header + write_in in one descriptor, the data in two.
        let req = io(op::WRITE, 1, 2, 6, b"abcdef");
        m.write_slice(&req[..80], GuestAddress(0x1_0000))
            .expect("w");
        m.write_slice(&req[80..83], GuestAddress(0x1_1000))
            .expect("w");
        m.write_slice(&req[83..], GuestAddress(0x1_2000))
            .expect("w");
        // READ 8 at 1: reply header and data spread over three writable descriptors.
        let rd = io(op::READ, 2, 1, 8, b"");
        m.write_slice(&rd, GuestAddress(0x1_3000)).expect("w");
        rq.add_desc_chains(
            &[
                desc(0x1_0000, 80, F_NEXT, 1),
                desc(0x1_1000, 3, F_NEXT, 2),
                desc(0x1_2000, 3, F_NEXT, 3),
                desc(0x2_0000, 24, F_WRITE, 0),
                desc(0x1_3000, 80, F_NEXT, 5),
                desc(0x3_0000, 10, F_NEXT | F_WRITE, 6),
                desc(0x3_1000, 4, F_NEXT | F_WRITE, 7),
                desc(0x3_2000, 100, F_WRITE, 0),
            ],
            0,
        )
        .expect("chains");
        dev.run_queues();
        assert_eq!(used(&m, &rq), vec![(0, 24), (4, 16 + 8)]);
        let written: u32 = m.read_obj(GuestAddress(0x2_0010)).expect("r");
        assert_eq!(written, 6);
        assert_eq!(
            std::fs::read(dir.path().join("f")).expect("read"),
            b"01abcdef89"
        );
        let mut got = [0u8; 14];
        m.read_slice(&mut got[..10], GuestAddress(0x3_0000))
            .expect("r");
        m.read_slice(&mut got[10..], GuestAddress(0x3_1000))
            .expect("r");
        let mut tail = [0u8; 10];
        m.read_slice(&mut tail, GuestAddress(0x3_2000)).expect("r");
        let len: u32 = m.read_obj(GuestAddress(0x3_0000)).expect("r");
        assert_eq!(len, 24);
        // 16-byte header: 10 bytes in the first buffer, 4 + 2 in the next; data from there.
        let mut all = Vec::new();
        all.extend_from_slice(&got);
        all.extend_from_slice(&tail);
        assert_eq!(&all[16..24], b"1abcdef8");
    }
}

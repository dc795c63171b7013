//! virtio-blk on a host file: read, write, flush, get-id; read-only disks refuse writes.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::queue::Segments;
use super::{DeviceChannel, DeviceInfo, Interrupt, TYPE_BLOCK, TransportMsg, VIRTIO_F_VERSION_1};

pub const QUEUE_SIZE: u16 = 256;
pub const SECTOR_SIZE: u64 = 512;
/// Largest data transfer per request (Linux's default tops out at 1280 KiB; `max_sectors_kb`
/// can raise it). Data moves through a fixed 64 KiB bounce buffer, whatever the size.
pub const MAX_REQUEST_BYTES: usize = 32 << 20;
const CHUNK: usize = 64 * 1024;
const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_FLUSH: u64 = 1 << 9;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
const ID_BYTES: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot open disk {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub struct BlockDevice {
    file: File,
    read_only: bool,
    id: String,
    capacity_bytes: u64,
    channel: Arc<DeviceChannel>,
    interrupt: Arc<Interrupt>,
    queue_evt: EventFd,
    active: Option<(GuestMemoryMmap, Queue)>,
    buf: Vec<u8>,
}

impl BlockDevice {
    pub fn open(
        path: &Path,
        read_only: bool,
        id: &str,
        channel: Arc<DeviceChannel>,
        interrupt: Arc<Interrupt>,
        queue_evt: EventFd,
    ) -> Result<Self, BlockError> {
        let err = |source| BlockError::Open {
            path: path.to_owned(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(err)?;
        let capacity_bytes = file.metadata().map_err(err)?.len();
        Ok(Self {
            file,
            read_only,
            id: id.to_string(),
            capacity_bytes,
            channel,
            interrupt,
            queue_evt,
            active: None,
            buf: vec![0u8; CHUNK],
        })
    }

    pub fn info(&self) -> DeviceInfo {
        let mut features = VIRTIO_F_VERSION_1 | F_FLUSH | F_SEG_MAX;
        if self.read_only {
            features |= F_RO;
        }
        // capacity (sectors), size_max (unused), seg_max: a request may use every descriptor
        // but the header and the status.
        let mut config = (self.capacity_bytes / SECTOR_SIZE).to_le_bytes().to_vec();
        config.extend_from_slice(&0u32.to_le_bytes());
        config.extend_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        DeviceInfo {
            device_type: TYPE_BLOCK,
            features,
            queue_max_sizes: vec![QUEUE_SIZE],
            config,
        }
    }

    /// Executes one request; returns (status, bytes written into the guest's data buffers).
    fn execute(&mut self, segs: &Segments, mem: &GuestMemoryMmap) -> (u8, usize) {
        let mut hdr = [0u8; 16];
        if segs.read_at(mem, 0, &mut hdr) != Ok(16) {
            return (S_IOERR, 0);
        }
        let kind = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let sector = u64::from_le_bytes(hdr[8..16].try_into().unwrap_or_default());
        // Data: readable bytes after the header (OUT) or writable bytes before the status (IN).
        let out_len = segs.read_len - 16;
        let in_len = segs.write_len - 1;
        let range_ok = |len: usize| {
            sector
                .checked_mul(SECTOR_SIZE)
                .and_then(|o| o.checked_add(len as u64))
                .is_some_and(|end| end <= self.capacity_bytes)
                && len.is_multiple_of(SECTOR_SIZE as usize)
                && len <= MAX_REQUEST_BYTES
        };
        match kind {
            T_IN => {
                if out_len != 0 || !range_ok(in_len) {
                    return (S_IOERR, 0);
                }
                let mut off = 0;
                while off < in_len {
                    let n = (in_len - off).min(CHUNK);
                    let buf = &mut self.buf[..n];
                    if self
                        .file
                        .read_exact_at(buf, sector * SECTOR_SIZE + off as u64)
                        .is_err()
                        || segs.write_at(mem, off, buf) != Ok(n)
                    {
                        return (S_IOERR, 0);
                    }
                    off += n;
                }
                (S_OK, in_len)
            }
            T_OUT => {
                if self.read_only || in_len != 0 || !range_ok(out_len) {
                    return (S_IOERR, 0);
                }
                let mut off = 0;
                while off < out_len {
                    let n = (out_len - off).min(CHUNK);
                    let buf = &mut self.buf[..n];
                    if segs.read_at(mem, 16 + off, buf) != Ok(n)
                        || self
                            .file
                            .write_all_at(buf, sector * SECTOR_SIZE + off as u64)
                            .is_err()
                    {
                        return (S_IOERR, 0);
                    }
                    off += n;
                }
                (S_OK, 0)
            }
            T_FLUSH => match self.read_only || self.file.sync_data().is_ok() {
                true => (S_OK, 0),
                false => (S_IOERR, 0),
            },
            T_GET_ID => {
                let mut id = [0u8; ID_BYTES];
                let b = self.id.as_bytes();
                id[..b.len().min(ID_BYTES)].copy_from_slice(&b[..b.len().min(ID_BYTES)]);
                let n = in_len.min(ID_BYTES);
                match segs.write_at(mem, 0, &id[..n]) {
                    Ok(w) => (S_OK, w),
                    Err(_) => (S_IOERR, 0),
                }
            }
            _ => (S_UNSUPP, 0),
        }
    }

    pub(crate) fn process_queue(&mut self) {
        let Some((mem, mut q)) = self.active.take() else {
            return;
        };
        let mut used = false;
        while let Some(chain) = q.pop_descriptor_chain(&mem) {
            let head = chain.head_index();
            let len = match Segments::from_chain(chain, &mem, MAX_REQUEST_BYTES + 4096) {
                Ok(segs) if segs.read_len >= 16 && segs.write_len >= 1 => {
                    let (status, n) = self.execute(&segs, &mem);
                    // The status byte is the last writable byte.
                    match segs.write_at(&mem, segs.write_len - 1, &[status]) {
                        Ok(1) => n as u32 + 1,
                        _ => 0,
                    }
                }
                other => {
                    tracing::warn!("virtio-blk: dropping malformed request: {:?}", other.err());
                    0
                }
            };
            if let Err(e) = q.add_used(&mem, head, len) {
                tracing::warn!("virtio-blk: add_used: {e}");
            }
            used = true;
        }
        if used {
            self.interrupt.signal_used_queue();
        }
        self.active = Some((mem, q));
    }
}

impl BlockDevice {
    pub(crate) fn handle_channel(&mut self) {
        for m in self.channel.take() {
            match m {
                TransportMsg::Activate { mut queues, mem } => {
                    self.active = queues.pop().map(|q| (mem, q));
                }
                TransportMsg::Reset => self.active = None,
            }
        }
    }
}

impl MutEventSubscriber for BlockDevice {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.data() == 0 {
            self.handle_channel();
        } else {
            let _ = self.queue_evt.read();
        }
        self.process_queue();
    }

    fn init(&mut self, ops: &mut EventOps) {
        for (fd, token) in [(&self.channel.evt, 0), (&self.queue_evt, 1)] {
            if let Err(e) = ops.add(Events::with_data(fd, token, EventSet::IN)) {
                tracing::error!("virtio-blk: cannot register event: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::queue::tests::{F_NEXT, F_WRITE, desc, parse};
    use vm_memory::{Bytes, GuestAddress};

    fn setup(ro: bool) -> (BlockDevice, GuestMemoryMmap, tempfile::NamedTempFile) {
        let f = tempfile::NamedTempFile::new().expect("tmp");
        let data: Vec<u8> = (0..8 * 512u32).map(|i| (i / 512) as u8).collect();
        std::fs::write(f.path(), &data).expect("write");
        let ch = Arc::new(DeviceChannel::new().expect("ch"));
        let irq = Arc::new(Interrupt::new().expect("irq"));
        let dev = BlockDevice::open(f.path(), ro, "disk0", ch, irq, EventFd::new(0).expect("e"))
            .expect("open");
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("mem");
        (dev, mem, f)
    }

    fn req(mem: &GuestMemoryMmap, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(0x1000)).expect("hdr");
    }

    fn run(
        dev: &mut BlockDevice,
        mem: &GuestMemoryMmap,
        descs: &[virtio_queue::desc::RawDescriptor],
    ) -> (u8, usize) {
        let segs = parse(mem, descs, MAX_REQUEST_BYTES + 4096).expect("chain");
        dev.execute(&segs, mem)
    }

    #[test]
    fn read_write_flush_id() {
        let (mut dev, mem, f) = setup(false);
        assert_eq!(dev.info().config[..8], 8u64.to_le_bytes());
        req(&mem, T_IN, 3);
        let d = [
            desc(0x1000, 16, F_NEXT, 1),
            desc(0x2000, 1024, F_WRITE | F_NEXT, 2),
            desc(0x3000, 1, F_WRITE, 0),
        ];
        assert_eq!(run(&mut dev, &mem, &d), (S_OK, 1024));
        let mut b = [0u8; 1024];
        mem.read_slice(&mut b, GuestAddress(0x2000)).expect("r");
        assert!(b[..512].iter().all(|x| *x == 3) && b[512..].iter().all(|x| *x == 4));

        mem.write_slice(&[0xab; 512], GuestAddress(0x4000))
            .expect("w");
        req(&mem, T_OUT, 7);
        let d = [
            desc(0x1000, 16, F_NEXT, 1),
            desc(0x4000, 512, F_NEXT, 2),
            desc(0x3000, 1, F_WRITE, 0),
        ];
        assert_eq!(run(&mut dev, &mem, &d), (S_OK, 0));
        assert!(
            std::fs::read(f.path()).expect("r")[7 * 512..]
                .iter()
                .all(|x| *x == 0xab)
        );

        req(&mem, T_FLUSH, 0);
        assert_eq!(
            run(
                &mut dev,
                &mem,
                &[desc(0x1000, 16, F_NEXT, 1), desc(0x3000, 1, F_WRITE, 0)]
            ),
            (S_OK, 0)
        );
        req(&mem, T_GET_ID, 0);
        let d = [
            desc(0x1000, 16, F_NEXT, 1),
            desc(0x5000, 20, F_WRITE | F_NEXT, 2),
            desc(0x3000, 1, F_WRITE, 0),
        ];
        assert_eq!(run(&mut dev, &mem, &d), (S_OK, 20));
        let mut id = [0u8; 5];
        mem.read_slice(&mut id, GuestAddress(0x5000)).expect("r");
        assert_eq!(&id, b"disk0");
        req(&mem, 99, 0);
        assert_eq!(
            run(
                &mut dev,
                &mem,
                &[desc(0x1000, 16, F_NEXT, 1), desc(0x3000, 1, F_WRITE, 0)]
            )
            .0,
            S_UNSUPP
        );
    }

    #[test]
    fn queue_processing_survives_malformed_chains() {
        use crate::devices::virtio::queue::tests::{MockSplitQueue, used};
        let (mut dev, mem, _f) = setup(false);
        let q = MockSplitQueue::create(&mem, GuestAddress(0x8_0000), 16);
        dev.active = Some((mem.clone(), q.create_queue().expect("q")));
        req(&mem, T_IN, 1);
        q.add_desc_chains(
            &[
                // Good read of one sector.
                desc(0x1000, 16, F_NEXT, 1),
                desc(0x2000, 512, F_WRITE | F_NEXT, 2),
                desc(0x3000, 1, F_WRITE, 0),
                // Data descriptor outside guest memory.
                desc(0x1000, 16, F_NEXT, 4),
                desc(0xdead_0000, 512, F_WRITE | F_NEXT, 5),
                desc(0x3000, 1, F_WRITE, 0),
                // No status byte at all.
                desc(0x1000, 16, 0, 0),
                // A loop: 7 -> 8 -> 7 ...
                desc(0x1000, 16, F_NEXT, 8),
                desc(0x3000, 1, F_WRITE | F_NEXT, 7),
            ],
            0,
        )
        .expect("chains");
        dev.process_queue();
        let u = used(&mem, &q);
        assert_eq!(u.len(), 4, "all chains returned: {u:?}");
        assert_eq!(u[0], (0, 513));
        assert_eq!((u[1].1, u[2].1), (0, 0));
        let mut b = [0u8; 512];
        mem.read_slice(&mut b, GuestAddress(0x2000)).expect("r");
        assert!(b.iter().all(|x| *x == 1), "sector 1 read");
        assert!(
            dev.interrupt
                .status
                .load(std::sync::atomic::Ordering::SeqCst)
                & 1
                == 1
        );
    }

    #[test]
    fn large_requests_stream_through_the_bounce_buffer() {
        let f = tempfile::NamedTempFile::new().expect("tmp");
        let data: Vec<u8> = (0..300 * 1024u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(f.path(), &data).expect("w");
        let ch = Arc::new(DeviceChannel::new().expect("ch"));
        let irq = Arc::new(Interrupt::new().expect("irq"));
        let mut dev =
            BlockDevice::open(f.path(), false, "big", ch, irq, EventFd::new(0).expect("e"))
                .expect("open");
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).expect("mem");
        assert_eq!(dev.info().config[12..16], 254u32.to_le_bytes(), "seg_max");
        // 200 KiB read over two data descriptors, then written back 1 sector further.
        req(&mem, T_IN, 0);
        let d = [
            desc(0x1000, 16, F_NEXT, 1),
            desc(0x10_0000, 150 * 1024, F_WRITE | F_NEXT, 2),
            desc(0x20_0000, 50 * 1024, F_WRITE | F_NEXT, 3),
            desc(0x3000, 1, F_WRITE, 0),
        ];
        assert_eq!(run(&mut dev, &mem, &d), (S_OK, 200 * 1024));
        let mut a = vec![0u8; 150 * 1024];
        let mut b = vec![0u8; 50 * 1024];
        mem.read_slice(&mut a, GuestAddress(0x10_0000)).expect("r");
        mem.read_slice(&mut b, GuestAddress(0x20_0000)).expect("r");
        assert_eq!([a, b].concat(), data[..200 * 1024]);
        req(&mem, T_OUT, 1);
        let d = [
            desc(0x1000, 16, F_NEXT, 1),
            desc(0x10_0000, 150 * 1024, F_NEXT, 2),
            desc(0x20_0000, 50 * 1024, F_NEXT, 3),
            desc(0x3000, 1, F_WRITE, 0),
        ];
        assert_eq!(run(&mut dev, &mem, &d), (S_OK, 0));
        let after = std::fs::read(f.path()).expect("r");
        assert_eq!(after[512..512 + 200 * 1024], data[..200 * 1024]);
    }

    #[test]
    fn refuses_bad_requests() {
        let (mut dev, mem, f) = setup(true);
        assert_ne!(dev.info().features & F_RO, 0);
        req(&mem, T_OUT, 0);
        let d = [
            desc(0x1000, 16, F_NEXT, 1),
            desc(0x4000, 512, F_NEXT, 2),
            desc(0x3000, 1, F_WRITE, 0),
        ];
        assert_eq!(run(&mut dev, &mem, &d).0, S_IOERR, "read-only");
        assert!(
            std::fs::read(f.path()).expect("r")[..512]
                .iter()
                .all(|x| *x == 0)
        );
        // Past the end of the disk, and a sector number that overflows.
        for sector in [7, u64::MAX / 2] {
            req(&mem, T_IN, sector);
            let d = [
                desc(0x1000, 16, F_NEXT, 1),
                desc(0x2000, 1024, F_WRITE | F_NEXT, 2),
                desc(0x3000, 1, F_WRITE, 0),
            ];
            assert_eq!(run(&mut dev, &mem, &d).0, S_IOERR);
        }
        // IN with a device-readable data buffer (wrong direction).
        req(&mem, T_IN, 0);
        let d = [
            desc(0x1000, 16, F_NEXT, 1),
            desc(0x2000, 512, F_NEXT, 2),
            desc(0x3000, 1, F_WRITE, 0),
        ];
        assert_eq!(run(&mut dev, &mem, &d).0, S_IOERR);
        // Partial sector.
        req(&mem, T_IN, 0);
        let d = [
            desc(0x1000, 16, F_NEXT, 1),
            desc(0x2000, 100, F_WRITE | F_NEXT, 2),
            desc(0x3000, 1, F_WRITE, 0),
        ];
        assert_eq!(run(&mut dev, &mem, &d).0, S_IOERR);
    }
}

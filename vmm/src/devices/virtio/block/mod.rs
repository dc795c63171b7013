//! virtio-blk on a host file: read, write, flush, get-id; read-only disks refuse writes.
//!
//! A disk *slot* starts empty (capacity 0, no serial, read-only) and can be filled once, at run
//! time, with a file (`fill`): the capacity and serial change and the device raises a
//! config-change interrupt, so the guest's driver re-reads the capacity (Linux:
//! `virtblk_config_changed` → `set_capacity_and_notify`). A filled slot is never swapped again:
//! the guest may have cached its blocks.

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
use super::{
    ConfigSpace, DeviceChannel, DeviceInfo, Interrupt, TYPE_BLOCK, TransportMsg, VIRTIO_F_VERSION_1,
};

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
    #[error("not a disk slot (only --disk-slots devices can be filled)")]
    NotASlot,
    #[error("slot already holds disk {serial:?} (a filled slot is never swapped)")]
    SlotInUse { serial: String },
    #[error("serial {0:?} must be 1 to 20 printable ASCII bytes without spaces")]
    Serial(String),
    #[error("disk {0} is smaller than one 512-byte sector")]
    TooSmall(PathBuf),
}

pub struct BlockDevice {
    /// None: an empty slot.
    file: Option<File>,
    read_only: bool,
    /// Fillable once (`fill`) while `file` is None.
    slot: bool,
    id: String,
    capacity_bytes: u64,
    /// The config space as the transport serves it (capacity changes when a slot is filled).
    config: Arc<ConfigSpace>,
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
        Ok(Self::new(
            Some(file),
            read_only,
            false,
            id,
            capacity_bytes,
            channel,
            interrupt,
            queue_evt,
        ))
    }

    /// An empty, read-only disk slot: capacity 0 and no serial until `fill`.
    pub fn slot(
        channel: Arc<DeviceChannel>,
        interrupt: Arc<Interrupt>,
        queue_evt: EventFd,
    ) -> Self {
        Self::new(None, true, true, "", 0, channel, interrupt, queue_evt)
    }

    #[allow(clippy::too_many_arguments)]
    fn new(
        file: Option<File>,
        read_only: bool,
        slot: bool,
        id: &str,
        capacity_bytes: u64,
        channel: Arc<DeviceChannel>,
        interrupt: Arc<Interrupt>,
        queue_evt: EventFd,
    ) -> Self {
        let mut d = Self {
            file,
            read_only,
            slot,
            id: id.to_string(),
            capacity_bytes,
            config: Arc::new(ConfigSpace::new(vec![])),
            channel,
            interrupt,
            queue_evt,
            active: None,
            buf: vec![0u8; CHUNK],
        };
        d.config = Arc::new(ConfigSpace::new(d.info().config));
        d
    }

    /// The live config space, for the transport.
    pub fn config_space(&self) -> Arc<ConfigSpace> {
        self.config.clone()
    }

    /// The disk's serial (GET_ID); empty for an empty slot.
    pub fn serial(&self) -> &str {
        &self.id
    }

    pub fn is_empty_slot(&self) -> bool {
        self.slot && self.file.is_none()
    }

    /// Fills an empty slot with `path` (opened read-only) under `serial`, then tells the guest
    /// through a config-change interrupt. Only empty slots can be filled.
    pub fn fill(&mut self, path: &Path, serial: &str) -> Result<(), BlockError> {
        if !self.slot {
            return Err(BlockError::NotASlot);
        }
        if self.file.is_some() {
            return Err(BlockError::SlotInUse {
                serial: self.id.clone(),
            });
        }
        if serial.is_empty()
            || serial.len() > ID_BYTES
            || !serial.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(BlockError::Serial(serial.to_string()));
        }
        let err = |source| BlockError::Open {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(err)?;
        let meta = file.metadata().map_err(err)?;
        if !meta.is_file() {
            return Err(err(std::io::Error::other("not a regular file")));
        }
        // Whole sectors only: a trailing partial sector cannot be addressed.
        let capacity_bytes = meta.len() / SECTOR_SIZE * SECTOR_SIZE;
        if capacity_bytes == 0 {
            return Err(BlockError::TooSmall(path.to_owned()));
        }
        self.file = Some(file);
        self.capacity_bytes = capacity_bytes;
        self.id = serial.to_string();
        let sectors = capacity_bytes / SECTOR_SIZE;
        self.config.update(|c| {
            if c.len() >= 8 {
                c[..8].copy_from_slice(&sectors.to_le_bytes());
            }
        });
        self.interrupt.signal_config_change();
        tracing::info!(serial, path = %path.display(), sectors, "disk slot filled");
        Ok(())
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
                let Some(file) = &self.file else {
                    return if in_len == 0 { (S_OK, 0) } else { (S_IOERR, 0) };
                };
                let mut off = 0;
                while off < in_len {
                    let n = (in_len - off).min(CHUNK);
                    let buf = &mut self.buf[..n];
                    if file
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
                let Some(file) = &self.file else {
                    return (S_IOERR, 0);
                };
                let mut off = 0;
                while off < out_len {
                    let n = (out_len - off).min(CHUNK);
                    let buf = &mut self.buf[..n];
                    if segs.read_at(mem, 16 + off, buf) != Ok(n)
                        || file
                            .write_all_at(buf, sector * SECTOR_SIZE + off as u64)
                            .is_err()
                    {
                        return (S_IOERR, 0);
                    }
                    off += n;
                }
                (S_OK, 0)
            }
            T_FLUSH => {
                match self.read_only || self.file.as_ref().is_none_or(|f| f.sync_data().is_ok()) {
                    true => (S_OK, 0),
                    false => (S_IOERR, 0),
                }
            }
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
    fn slot_fill_updates_config_serial_and_raises_config_interrupt() {
        use crate::devices::bus::BusDevice;
        use crate::devices::virtio::INT_CONFIG;
        use crate::devices::virtio::mmio::MmioTransport;
        use crate::devices::virtio::queue::tests::{MockSplitQueue, used};
        use std::sync::atomic::Ordering;
        let ch = Arc::new(DeviceChannel::new().expect("ch"));
        let irq = Arc::new(Interrupt::new().expect("irq"));
        let mut dev = BlockDevice::slot(ch.clone(), irq.clone(), EventFd::new(0).expect("e"));
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("mem");
        let mut t = MmioTransport::new(dev.info(), mem.clone(), ch, irq.clone(), vec![])
            .with_config(dev.config_space());
        let reg = |t: &mut MmioTransport, off: u64| {
            let mut b = [0u8; 8];
            t.read(
                off,
                if off >= 0x100 {
                    &mut b[..]
                } else {
                    &mut b[..4]
                },
            );
            u64::from_le_bytes(b)
        };
        assert!(dev.is_empty_slot());
        assert_ne!(dev.info().features & F_RO, 0, "slots are read-only");
        assert_eq!(
            (reg(&mut t, 0x100), reg(&mut t, 0xfc)),
            (0, 0),
            "capacity, generation"
        );

        // Empty: GET_ID answers no serial, reads fail, writes fail.
        req(&mem, T_GET_ID, 0);
        mem.write_slice(&[0xee; 20], GuestAddress(0x5000))
            .expect("w");
        let id = [
            desc(0x1000, 16, F_NEXT, 1),
            desc(0x5000, 20, F_WRITE | F_NEXT, 2),
            desc(0x3000, 1, F_WRITE, 0),
        ];
        assert_eq!(run(&mut dev, &mem, &id), (S_OK, 20));
        let mut b = [0u8; 20];
        mem.read_slice(&mut b, GuestAddress(0x5000)).expect("r");
        assert_eq!(b, [0u8; 20]);
        req(&mem, T_IN, 0);
        let rd = [
            desc(0x1000, 16, F_NEXT, 1),
            desc(0x2000, 512, F_WRITE | F_NEXT, 2),
            desc(0x3000, 1, F_WRITE, 0),
        ];
        assert_eq!(run(&mut dev, &mem, &rd).0, S_IOERR);
        assert_eq!(irq.status.load(Ordering::SeqCst), 0);

        let f = tempfile::NamedTempFile::new().expect("tmp");
        let data: Vec<u8> = (0..6 * 512 + 100u32).map(|i| (i / 512) as u8 + 1).collect();
        std::fs::write(f.path(), &data).expect("write");
        dev.fill(f.path(), "img0123456789abcdef").expect("fill");
        assert!(!dev.is_empty_slot());
        assert_eq!(reg(&mut t, 0x100), 6, "whole sectors only");
        assert_eq!(reg(&mut t, 0xfc), 1, "generation bumped");
        assert_eq!(
            reg(&mut t, 0x60) as u32,
            INT_CONFIG,
            "config-change interrupt"
        );
        t.write(0x64, &INT_CONFIG.to_le_bytes());
        assert_eq!(reg(&mut t, 0x60), 0, "acknowledged");

        req(&mem, T_GET_ID, 0);
        assert_eq!(run(&mut dev, &mem, &id), (S_OK, 20));
        mem.read_slice(&mut b, GuestAddress(0x5000)).expect("r");
        assert_eq!(&b[..19], b"img0123456789abcdef");
        assert_eq!(b[19], 0);
        // Reads through the queue now see the file; the last whole sector is readable, the
        // partial one after it is not.
        let q = MockSplitQueue::create(&mem, GuestAddress(0x8_0000), 16);
        dev.active = Some((mem.clone(), q.create_queue().expect("q")));
        req(&mem, T_IN, 5);
        q.add_desc_chains(&rd, 0).expect("chain");
        dev.process_queue();
        assert_eq!(used(&mem, &q), vec![(0, 513)]);
        let mut s = [0u8; 512];
        mem.read_slice(&mut s, GuestAddress(0x2000)).expect("r");
        assert!(s.iter().all(|x| *x == 6), "sector 5 of the new file");
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x3000)).expect("r"), S_OK);
        req(&mem, T_IN, 6);
        assert_eq!(run(&mut dev, &mem, &rd).0, S_IOERR);
        req(&mem, T_OUT, 0);
        let wr = [
            desc(0x1000, 16, F_NEXT, 1),
            desc(0x2000, 512, F_NEXT, 2),
            desc(0x3000, 1, F_WRITE, 0),
        ];
        assert_eq!(
            run(&mut dev, &mem, &wr).0,
            S_IOERR,
            "filled slots stay read-only"
        );

        // A filled slot is never swapped: the guest may have cached its blocks.
        let e = dev.fill(f.path(), "other").expect_err("in use");
        assert!(
            matches!(e, BlockError::SlotInUse { ref serial } if serial == "img0123456789abcdef")
        );
        assert_eq!(reg(&mut t, 0xfc), 1);
        assert_eq!(dev.serial(), "img0123456789abcdef");
    }

    #[test]
    fn slot_fill_refusals() {
        let (mut disk, _mem, f) = setup(true);
        assert!(matches!(
            disk.fill(f.path(), "x"),
            Err(BlockError::NotASlot)
        ));
        let ch = Arc::new(DeviceChannel::new().expect("ch"));
        let irq = Arc::new(Interrupt::new().expect("irq"));
        let mut dev = BlockDevice::slot(ch, irq.clone(), EventFd::new(0).expect("e"));
        for bad in ["", "has space", "123456789012345678901", "tab\t"] {
            assert!(
                matches!(dev.fill(f.path(), bad), Err(BlockError::Serial(_))),
                "{bad:?}"
            );
        }
        let d = tempfile::tempdir().expect("d");
        assert!(matches!(
            dev.fill(&d.path().join("missing"), "a"),
            Err(BlockError::Open { .. })
        ));
        assert!(
            matches!(dev.fill(d.path(), "a"), Err(BlockError::Open { .. })),
            "a directory"
        );
        let small = d.path().join("small");
        std::fs::write(&small, [1u8; 511]).expect("w");
        assert!(matches!(
            dev.fill(&small, "a"),
            Err(BlockError::TooSmall(_))
        ));
        // Nothing changed and the guest was not told anything.
        assert!(dev.is_empty_slot());
        assert_eq!(dev.config_space().generation(), 0);
        assert_eq!(irq.status.load(std::sync::atomic::Ordering::SeqCst), 0);
        dev.fill(f.path(), "ok").expect("fill after refusals");
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

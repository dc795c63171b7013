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
        self.id = serial.to_string();
        self.set_capacity(capacity_bytes);
        let sectors = capacity_bytes / SECTOR_SIZE;
        tracing::info!(serial, path = %path.display(), sectors, "disk slot filled");
        Ok(())
    }

    /// Empties a slot: the disk's file is closed and the guest sees capacity 0 through a
    /// config-change interrupt; requests from then on fail as out of range. Emptying an empty
    /// slot does nothing. The guest must have stopped using the disk (unmounted it); a slot
    /// filled again later may show the guest new content under the same device, so the guest
    /// drops its cached blocks before mounting one (husk-agent does, with BLKFLSBUF).
    pub fn empty(&mut self) -> Result<(), BlockError> {
        if !self.slot {
            return Err(BlockError::NotASlot);
        }
        if self.file.take().is_none() {
            return Ok(());
        }
        let serial = std::mem::take(&mut self.id);
        self.set_capacity(0);
        tracing::info!(serial, "disk slot emptied");
        Ok(())
    }

    /// A slot's new capacity: into the live config space (capacity in sectors, generation
    /// bumped), then the config-change interrupt tells the guest.
    fn set_capacity(&mut self, bytes: u64) {
        self.capacity_bytes = bytes;
        let sectors = bytes / SECTOR_SIZE;
        self.config.update(|c| {
            if c.len() >= 8 {
                c[..8].copy_from_slice(&sectors.to_le_bytes());
            }
        });
        self.interrupt.signal_config_change();
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
mod tests;

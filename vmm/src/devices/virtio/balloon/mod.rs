//! virtio-balloon with free page reporting only (`VIRTIO_BALLOON_F_REPORTING`): the guest
//! kernel hands back blocks of RAM it has freed (Linux's page_reporting, blocks of
//! `page_reporting_order` and up), and the device drops the host pages behind them
//! (`MADV_DONTNEED` on the private guest mapping), so memory a pod's guest used once and freed
//! returns to the host. The guest gets zero pages when it touches such a block again.
//!
//! The host never asks for memory back (`num_pages` stays 0), so the inflate and deflate queues
//! carry nothing from a well-behaved guest; whatever arrives there is returned unread. Every
//! reported range is the guest's to give: it must lie inside one guest RAM region, and only
//! whole pages inside it are dropped. A guest can discard nothing but its own memory.

use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::{DeviceChannel, DeviceInfo, Interrupt, TransportMsg, VIRTIO_F_VERSION_1};

pub const TYPE_BALLOON: u32 = 5;
/// inflate, deflate, reporting (no stats or free-page-hint queue: those features are off).
pub const NUM_QUEUES: usize = 3;
const REPORTING_QUEUE: usize = 2;
pub const QUEUE_SIZE: u16 = 64;
/// VIRTIO_BALLOON_F_REPORTING (virtio 1.2 §5.5.3).
pub const F_REPORTING: u64 = 1 << 5;
const PAGE: u64 = 4096;

/// The device's config space: num_pages, actual, free_page_hint_cmd_id, poison_val, all 0.
pub fn device_info() -> DeviceInfo {
    DeviceInfo {
        device_type: TYPE_BALLOON,
        features: VIRTIO_F_VERSION_1 | F_REPORTING,
        queue_max_sizes: vec![QUEUE_SIZE; NUM_QUEUES],
        config: vec![0; 16],
    }
}

pub struct BalloonDevice {
    channel: Arc<DeviceChannel>,
    interrupt: Arc<Interrupt>,
    queue_evts: Vec<EventFd>,
    active: Option<(GuestMemoryMmap, Vec<Queue>)>,
    /// Bytes of guest RAM given back to the host so far (what the tests check).
    reported_bytes: u64,
}

impl BalloonDevice {
    pub fn new(
        channel: Arc<DeviceChannel>,
        interrupt: Arc<Interrupt>,
        queue_evts: Vec<EventFd>,
    ) -> Self {
        Self {
            channel,
            interrupt,
            queue_evts,
            active: None,
            reported_bytes: 0,
        }
    }

    pub fn reported_bytes(&self) -> u64 {
        self.reported_bytes
    }

    fn handle_channel(&mut self) {
        for m in self.channel.take() {
            match m {
                TransportMsg::Activate { queues, mem } => self.active = Some((mem, queues)),
                TransportMsg::Reset => self.active = None,
            }
        }
    }

    /// Returns every chain on every queue; on the reporting queue, drops the host pages behind
    /// each reported range first.
    pub(crate) fn process_queues(&mut self) {
        let Some((mem, mut queues)) = self.active.take() else {
            return;
        };
        let mut used = false;
        for (i, q) in queues.iter_mut().enumerate() {
            while let Some(chain) = q.pop_descriptor_chain(&mem) {
                let head = chain.head_index();
                if i == REPORTING_QUEUE {
                    for d in chain {
                        self.reported_bytes += discard(&mem, d.addr(), u64::from(d.len()));
                    }
                }
                if let Err(e) = q.add_used(&mem, head, 0) {
                    tracing::warn!("virtio-balloon: add_used: {e}");
                }
                used = true;
            }
        }
        if used {
            self.interrupt.signal_used_queue();
        }
        self.active = Some((mem, queues));
    }
}

/// Drops the host pages of the whole pages in `addr..addr+len` if that range lies inside one
/// guest RAM region; returns the bytes dropped (0 for a range that is not the guest's).
fn discard(mem: &GuestMemoryMmap, addr: GuestAddress, len: u64) -> u64 {
    let Some(end) = addr.0.checked_add(len) else {
        return 0;
    };
    // A start in the last page of the address space has no next page boundary.
    let Some(start) = addr.0.checked_next_multiple_of(PAGE) else {
        return 0;
    };
    let end = end / PAGE * PAGE;
    if start >= end {
        return 0;
    }
    let Some(region) = mem.iter().find(|r| {
        let (rs, re) = (
            r.start_addr().raw_value(),
            r.start_addr().raw_value() + r.len(),
        );
        rs <= start && end <= re
    }) else {
        tracing::debug!(
            addr = addr.0,
            len,
            "virtio-balloon: range outside guest RAM ignored"
        );
        return 0;
    };
    let offset = start - region.start_addr().raw_value();
    let bytes = end - start;
    // SAFETY: [offset, offset + bytes) lies inside this region's private anonymous mapping,
    // which lives as long as `mem`; MADV_DONTNEED only replaces its pages with zero pages on
    // next touch (what the guest agreed to by reporting them free).
    let rc = unsafe {
        libc::madvise(
            region.as_ptr().add(offset as usize).cast(),
            bytes as usize,
            libc::MADV_DONTNEED,
        )
    };
    if rc != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "virtio-balloon: madvise");
        return 0;
    }
    bytes
}

impl MutEventSubscriber for BalloonDevice {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.data() == 0 {
            self.handle_channel();
        } else if let Some(e) = self.queue_evts.get(events.data() as usize - 1) {
            let _ = e.read();
        }
        self.process_queues();
    }

    fn init(&mut self, ops: &mut EventOps) {
        let fds = std::iter::once(&self.channel.evt).chain(self.queue_evts.iter());
        for (token, fd) in fds.enumerate() {
            if let Err(e) = ops.add(Events::with_data(fd, token as u32, EventSet::IN)) {
                tracing::error!("virtio-balloon: cannot register event: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests;

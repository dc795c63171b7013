//! virtio-fs: a passthrough FUSE server over one host directory (the share), written once and
//! served two ways: as husk-vmm's own MMIO device (`device`, `--fs tag=T,dir=D`) and over
//! vhost-user (`husk-vmm vhost-user fs`, for QEMU's `vhost-user-fs-pci`).
//!
//! Layers: `abi` (FUSE wire format, hostile-input parsing), `passthrough` (the file system,
//! confined to the share by `O_PATH` fds and `openat2(RESOLVE_BENEATH)`), `server` (request
//! dispatch), [`process_queue`] (descriptor chains in, replies out), `vhost_user` (the
//! backend), `confine` (what the serving process gives up).

pub mod abi;
pub mod confine;
pub mod device;
pub mod passthrough;
pub mod server;
pub mod vhost_user;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::queue::Segments;
pub use server::Server;

pub const QUEUE_SIZE: u16 = 1024;
/// High-priority queue (FORGET, INTERRUPT) and one request queue.
pub const NUM_QUEUES: usize = 2;
/// Tag length in the config space (NUL-padded).
pub const TAG_LEN: usize = 36;

/// The device config space: tag, then the number of request queues.
pub fn config_space(tag: &str) -> Vec<u8> {
    let mut c = vec![0u8; TAG_LEN + 4];
    let t = tag.as_bytes();
    let n = t.len().min(TAG_LEN);
    c[..n].copy_from_slice(&t[..n]);
    c[TAG_LEN..].copy_from_slice(&((NUM_QUEUES - 1) as u32).to_le_bytes());
    c
}

/// Serves every request on `q`; every chain is returned, malformed ones too. Returns true if
/// a used buffer was added.
pub fn process_queue(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    server: &Server,
    scratch: &mut Vec<u8>,
) -> bool {
    let mut used = false;
    while let Some(chain) = q.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let written = match Segments::from_chain(chain, mem, 2 * server::MAX_REQUEST) {
            Ok(segs) => serve_chain(&segs, mem, server, scratch),
            Err(e) => {
                tracing::warn!("virtio-fs: dropping chain: {e}");
                0
            }
        };
        if let Err(e) = q.add_used(mem, head, written) {
            tracing::warn!("virtio-fs: add_used: {e}");
        }
        used = true;
    }
    used
}

fn serve_chain(
    segs: &Segments,
    mem: &GuestMemoryMmap,
    server: &Server,
    scratch: &mut Vec<u8>,
) -> u32 {
    if segs.read_len > server::MAX_REQUEST {
        tracing::warn!(len = segs.read_len, "virtio-fs: request too long");
        return 0;
    }
    scratch.resize(segs.read_len, 0);
    match segs.read_at(mem, 0, scratch) {
        Ok(n) if n == segs.read_len => {}
        _ => return 0,
    }
    let Some(reply) = server.handle(scratch, segs.write_len) else {
        return 0;
    };
    match segs.write_at(mem, 0, &reply) {
        Ok(n) => n as u32,
        Err(e) => {
            tracing::warn!("virtio-fs: writing the reply: {e}");
            0
        }
    }
}

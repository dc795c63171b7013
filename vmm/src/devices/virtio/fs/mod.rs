//! virtio-fs: a passthrough FUSE server over one host directory (the share), written once and
//! served two ways: as husk-vmm's own MMIO device (`device`, `--fs tag=T,dir=D`) and over
//! vhost-user (`husk-vmm vhost-user fs`, for QEMU's `vhost-user-fs-pci`).
//!
//! Layers: `abi` (FUSE wire format, hostile-input parsing), `passthrough` (the file system,
//! confined to the share by `O_PATH` fds and `openat2(RESOLVE_BENEATH)`), `server` (request
//! dispatch), [`process_queue`] (descriptor chains in, replies out), `vhost_user` (the
//! backend); `crate::confine` is what the serving process gives up.

pub mod abi;
pub mod device;
pub mod passthrough;
pub mod server;
pub mod vhost_user;

use virtio_queue::{Queue, QueueT};
use vm_memory::volatile_memory::PtrGuardMut;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

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
    if let Some(used) = zero_copy(segs, mem, server) {
        return used;
    }
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

/// READ and WRITE move file data straight between the file and guest memory (preadv/pwritev
/// on the chain's buffers). None: not one of those, or buffers that need the copying path.
fn zero_copy(segs: &Segments, mem: &GuestMemoryMmap, server: &Server) -> Option<u32> {
    const FIXED: usize = abi::IN_HEADER_LEN + 40;
    let mut head = [0u8; FIXED];
    if segs.read_at(mem, 0, &mut head).ok()? != FIXED {
        return None;
    }
    let mut r = abi::Reader::new(&head);
    let (len, opcode, unique) = (r.u32("").ok()?, r.u32("").ok()?, r.u64("").ok()?);
    r.take(24, "").ok()?;
    let (fh, offset, size) = (r.u64("").ok()?, r.u64("").ok()?, r.u32("").ok()? as usize);
    let reply = |error: i32, body_len: usize| {
        let mut w = abi::Writer::default();
        w.u32((abi::OUT_HEADER_LEN + body_len) as u32)
            .u32(error as u32)
            .u64(unique);
        w.buf
    };
    match opcode {
        abi::op::WRITE => {
            if len as usize != FIXED + size
                || segs.read_len < FIXED + size
                || size > server::MAX_WRITE as usize
                || segs.write_len < abi::OUT_HEADER_LEN + 8
            {
                return None;
            }
            let (iov, _guards) = iovecs(&segs.readable, mem, FIXED, size)?;
            let out = match server.fs().write_iov(fh, offset, &iov) {
                Ok(n) => {
                    let mut w = abi::Writer::default();
                    w.bytes(&reply(0, 8)).u32(n as u32).u32(0);
                    w.buf
                }
                Err(e) => reply(-e.0, 0),
            };
            segs.write_at(mem, 0, &out).ok().map(|n| n as u32)
        }
        abi::op::READ => {
            if len as usize != FIXED || segs.write_len < abi::OUT_HEADER_LEN {
                return None;
            }
            let room = (segs.write_len - abi::OUT_HEADER_LEN)
                .min(size)
                .min(server::MAX_WRITE as usize);
            let (iov, _guards) = iovecs(&segs.writable, mem, abi::OUT_HEADER_LEN, room)?;
            let (hdr, n) = match server.fs().read_iov(fh, offset, &iov) {
                Ok(n) => (reply(0, n), n),
                Err(e) => (reply(-e.0, 0), 0),
            };
            segs.write_at(mem, 0, &hdr).ok()?;
            Some((abi::OUT_HEADER_LEN + n) as u32)
        }
        _ => None,
    }
}

/// `len` bytes of a segment list from `offset` as iovecs into guest memory (None if a piece
/// crosses a memory region: the copying path handles that). The guards keep the mappings.
fn iovecs(
    segs: &[(GuestAddress, u32)],
    mem: &GuestMemoryMmap,
    mut offset: usize,
    mut len: usize,
) -> Option<(Vec<libc::iovec>, Vec<PtrGuardMut>)> {
    let (mut iov, mut guards) = (Vec::new(), Vec::new());
    for &(addr, seg) in segs {
        let seg = seg as usize;
        if len == 0 {
            break;
        }
        if offset >= seg {
            offset -= seg;
            continue;
        }
        let n = (seg - offset).min(len);
        let at = GuestAddress(addr.0.checked_add(offset as u64)?);
        let slice = mem.get_slice(at, n).ok()?;
        let g = slice.ptr_guard_mut();
        iov.push(libc::iovec {
            iov_base: g.as_ptr().cast(),
            iov_len: n,
        });
        guards.push(g);
        len -= n;
        offset = 0;
    }
    (len == 0).then_some((iov, guards))
}

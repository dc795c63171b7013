//! Entry points for the fuzz targets in `vmm/fuzz/` and for the corpus replay test
//! (`vmm/tests/fuzz_corpus.rs`): each takes the fuzzer's bytes, drives one guest-facing parser
//! with them and panics only when an invariant breaks (a chain not returned, a used length
//! beyond the guest's buffer, a file outside a share touched, a muxer queue past its bound).
//! Not part of the VMM's API.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::virtio::block::BlockDevice;
use crate::devices::virtio::fs::device::FsDevice;
use crate::devices::virtio::fs::passthrough::PassthroughFs;
use crate::devices::virtio::fs::server::Server;
use crate::devices::virtio::net::{FrameIo, NetDevice};
use crate::devices::virtio::vsock::muxer;
use crate::devices::virtio::vsock::packet::{self, VsockHeader};
use crate::devices::virtio::vsock::{VsockDevice, VsockMuxer};
use crate::devices::virtio::{DeviceChannel, Interrupt, TransportMsg};

/// Guest memory of every queue target: rings in the first pages, buffers above `DATA`.
const MEM: u64 = 0x10_0000;
const DATA: u64 = 0x1_0000;
const QSIZE: u16 = 16;
const QUEUE_STRIDE: u64 = 0x1000;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

/// Bounds the muxer target holds the muxer to, the muxer's own: whatever a guest sends, the
/// packets waiting for it (control packets, plus each connection queued once for its data) and
/// the connections it holds stay within these (issue 18: nothing the guest fills grows without
/// bound). A weakened bound in the muxer fails the target.
pub const MUXER_MAX_QUEUED: usize = muxer::MAX_CTRL_RX + muxer::MAX_CONNECTIONS;
pub const MUXER_MAX_CONNS: usize = muxer::MAX_CONNECTIONS;

/// Reads the fuzzer's bytes front to back; past the end everything reads as 0.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
    pub fn u8(&mut self) -> u8 {
        let Some((&b, rest)) = self.data.split_first() else {
            return 0;
        };
        self.data = rest;
        b
    }
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    /// Up to `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (a, b) = self.data.split_at(n);
        self.data = b;
        a
    }
    pub fn rest(&mut self) -> &'a [u8] {
        self.bytes(self.data.len())
    }
}

/// A scratch directory under the system temp dir, removed on drop.
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new(what: &str) -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "husk-fuzz-{what}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("scratch dir");
        Scratch(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What the harness knows about each chain it made available: its head and how many bytes
/// the device may write into it.
struct Posted {
    heads: Vec<(u16, u64)>,
}

/// One split virtqueue in guest memory at `base`: descriptors, avail ring at +0x100, used
/// ring at +0x200.
struct FuzzQueue {
    base: u64,
    next_desc: u16,
    avail: u16,
    posted: Posted,
    raw: bool,
    /// Raw mode: a device-writable buffer of the input overlaps the rings or a descriptor
    /// table, so what the used ring holds afterwards is partly the guest's own doing.
    aliased: bool,
}

impl FuzzQueue {
    fn new(index: usize) -> Self {
        Self {
            base: index as u64 * QUEUE_STRIDE,
            next_desc: 0,
            avail: 0,
            posted: Posted { heads: Vec::new() },
            raw: false,
            aliased: false,
        }
    }

    fn queue(&self) -> Queue {
        let mut q = Queue::new(QSIZE).expect("queue");
        q.set_size(QSIZE);
        q.set_desc_table_address(Some(self.base as u32), Some(0));
        q.set_avail_ring_address(Some(self.base as u32 + 0x100), Some(0));
        q.set_used_ring_address(Some(self.base as u32 + 0x200), Some(0));
        q.set_ready(true);
        q
    }

    fn write_desc(
        &self,
        mem: &GuestMemoryMmap,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let at = self.base + u64::from(i) * 16;
        mem.write_obj(addr, GuestAddress(at)).expect("desc");
        mem.write_obj(len, GuestAddress(at + 8)).expect("desc");
        mem.write_obj(flags, GuestAddress(at + 12)).expect("desc");
        mem.write_obj(next, GuestAddress(at + 14)).expect("desc");
    }

    /// Makes one chain from the input available: a count of descriptors, then for each a flag
    /// byte (write-only, hostile address, loop back) and a length; readable descriptors carry
    /// their bytes from the input.
    fn post_chain(&mut self, inp: &mut Input, mem: &GuestMemoryMmap, data_at: &mut u64) -> bool {
        let n = 1 + u16::from(inp.u8() % 6);
        if self.next_desc + n > QSIZE {
            return false;
        }
        let head = self.next_desc;
        let mut writable = 0u64;
        let mut jumped = false;
        for k in 0..n {
            let i = head + k;
            let flags = inp.u8();
            let mut len = u32::from(inp.u16()) % 0x1_2000;
            if flags & 0x40 != 0 {
                len = len.wrapping_mul(64);
            }
            let mut dflags = if k + 1 < n { F_NEXT } else { 0 };
            if flags & 1 != 0 {
                dflags |= F_WRITE;
            }
            let mut next = i + 1;
            if flags & 0x10 != 0 {
                jumped = true;
                dflags |= F_NEXT;
                next = flags as u16 % QSIZE; // a loop or a jump: the queue must cope
            }
            let addr = match flags & 0x0c {
                0x04 => MEM - u64::from(len % 64), // runs off the end of guest memory
                0x08 => u64::MAX - u64::from(flags),
                _ => {
                    if *data_at + u64::from(len) > MEM {
                        *data_at = DATA;
                    }
                    let a = *data_at;
                    *data_at += u64::from(len);
                    a
                }
            };
            let in_data =
                addr >= DATA && addr.checked_add(u64::from(len)).is_some_and(|e| e <= MEM);
            if dflags & F_WRITE == 0 && in_data {
                let content = inp.bytes(len as usize);
                mem.write_slice(content, GuestAddress(addr))
                    .expect("content");
            } else if dflags & F_WRITE != 0 {
                writable += u64::from(len);
            }
            self.write_desc(mem, i, addr, len, dflags, next);
        }
        self.next_desc += n;
        let slot = self.avail % QSIZE;
        mem.write_obj(head, GuestAddress(self.base + 0x104 + u64::from(slot) * 2))
            .expect("avail");
        self.avail += 1;
        mem.write_obj(self.avail, GuestAddress(self.base + 0x102))
            .expect("avail idx");
        // A chain that jumps walks descriptors of other chains: its writable size is unknown.
        let writable = if jumped { u64::MAX } else { writable };
        self.posted.heads.push((head, writable));
        true
    }

    /// The device returned no more chains than were made available, only real heads, and
    /// never claimed to have written more than a chain's writable bytes.
    fn check_used(&self, mem: &GuestMemoryMmap) {
        let idx: u16 = mem
            .read_obj(GuestAddress(self.base + 0x202))
            .expect("used idx");
        assert!(idx <= QSIZE, "more chains used ({idx}) than made available");
        if self.raw {
            if self.aliased {
                // The guest pointed a buffer the device writes at its own rings or tables:
                // the device wrote what it was asked where it was asked (ASan and the
                // target's own asserts still judge it), the ring's contents prove nothing.
                return;
            }
            for i in 0..u64::from(idx) {
                let id: u32 = mem
                    .read_obj(GuestAddress(self.base + 0x204 + 8 * i))
                    .expect("used id");
                assert!(id < u32::from(QSIZE), "used id {id} is no head");
            }
            return;
        }
        assert!(
            usize::from(idx) <= self.posted.heads.len(),
            "used idx {idx} beyond the {} chains posted",
            self.posted.heads.len()
        );
        for i in 0..u64::from(idx) {
            let id: u32 = mem
                .read_obj(GuestAddress(self.base + 0x204 + 8 * i))
                .expect("used id");
            let len: u32 = mem
                .read_obj(GuestAddress(self.base + 0x208 + 8 * i))
                .expect("used len");
            let Some(&(_, writable)) = self.posted.heads.iter().find(|(h, _)| u32::from(*h) == id)
            else {
                panic!("used id {id} is not a posted head");
            };
            assert!(
                u64::from(len) <= writable,
                "used len {len} > the chain's {writable} writable bytes"
            );
        }
    }
}

/// Whether any device-writable descriptor of the raw rings (direct, or in an indirect table
/// one of them names) overlaps the ring pages `[0, rings)` or an indirect table: then the
/// device's legitimate writes into the guest's buffers land on the rings themselves.
///
/// Works on one snapshot of guest memory, and reads every memory position that lies in some
/// indirect table once per 16-byte alignment (tables overlap freely in random input, each up
/// to `u16::MAX` entries): walking each table on its own cost seconds per input.
fn raw_writes_alias(mem: &GuestMemoryMmap, rings: u64) -> bool {
    thread_local! {
        // One snapshot buffer per thread: a fresh 1 MiB allocation per input is an mmap and
        // munmap each time (more system than user time under ASan).
        static SNAP: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; MEM as usize]);
    }
    SNAP.with_borrow_mut(|snap| {
        mem.read_slice(snap, GuestAddress(0))
            .expect("memory snapshot");
        writes_alias(snap, rings)
    })
}

/// [`raw_writes_alias`] on a snapshot of guest memory.
fn writes_alias(snap: &[u8], rings: u64) -> bool {
    const F_INDIRECT: u16 = 4;
    const ENTRY: u64 = 16;
    let desc = |at: u64| -> Option<(u64, u64, u16)> {
        let at = usize::try_from(at).ok()?;
        let b = snap.get(at..at.checked_add(14)?)?;
        Some((
            u64::from_le_bytes(b[0..8].try_into().ok()?),
            u64::from(u32::from_le_bytes(b[8..12].try_into().ok()?)),
            u16::from_le_bytes([b[12], b[13]]),
        ))
    };
    let mut tables: Vec<(u64, u64)> = Vec::new();
    let mut writable: Vec<(u64, u64)> = Vec::new();
    // Direct descriptors of every ring page; indirect tables are walked below.
    for t in (0..rings).step_by(QUEUE_STRIDE as usize) {
        for i in 0..u64::from(QSIZE) {
            let Some((addr, len, flags)) = desc(t + ENTRY * i) else {
                continue;
            };
            if flags & F_INDIRECT != 0 {
                tables.push((addr, len));
            } else if flags & F_WRITE != 0 {
                writable.push((addr, len));
            }
        }
    }
    let overlaps = |(a, l): (u64, u64), (b, m): (u64, u64)| {
        l > 0 && m > 0 && a < b.saturating_add(m) && b < a.saturating_add(l)
    };
    let hits = |w: (u64, u64)| overlaps(w, (0, rings)) || tables.iter().any(|t| overlaps(w, *t));
    // The entries a table can hold, clipped to memory: [start, end) per alignment class.
    let mut spans: Vec<Vec<(u64, u64)>> = vec![Vec::new(); ENTRY as usize];
    for &(addr, len) in &tables {
        let end = addr
            .saturating_add(ENTRY * (len / ENTRY).min(u64::from(u16::MAX)))
            .min(MEM);
        if addr < end {
            spans[(addr % ENTRY) as usize].push((addr, end));
        }
    }
    for class in &mut spans {
        class.sort_unstable();
        let mut at = 0u64;
        for &(start, end) in class.iter() {
            // Same class: positions stay 16 bytes apart from `start`.
            let mut p = if at > start {
                start + (at - start).div_ceil(ENTRY) * ENTRY
            } else {
                start
            };
            while p < end {
                if let Some((a, l, f)) = desc(p)
                    && f & F_WRITE != 0
                    && hits((a, l))
                {
                    return true;
                }
                p += ENTRY;
            }
            at = at.max(end);
        }
    }
    writable.iter().any(|w| hits(*w))
}

/// Lays out `nq` queues from the input: mode byte bit 7 = raw (the input is copied over the
/// ring pages as is), else structured chains (queue selector byte, then a chain).
fn build_queues(inp: &mut Input, mem: &GuestMemoryMmap, nq: usize) -> Vec<FuzzQueue> {
    let mut qs: Vec<FuzzQueue> = (0..nq).map(FuzzQueue::new).collect();
    let mode = inp.u8();
    if mode & 0x80 != 0 {
        let raw = inp.bytes(nq * QUEUE_STRIDE as usize);
        mem.write_slice(raw, GuestAddress(0)).expect("raw rings");
        // The used rings belong to the device: they start zeroed, as a driver leaves them.
        for q in 0..nq as u64 {
            let used = q * QUEUE_STRIDE + 0x200;
            mem.write_slice(&[0u8; 0x200], GuestAddress(used))
                .expect("used ring");
        }
        let rest = inp.bytes((MEM - DATA) as usize);
        mem.write_slice(rest, GuestAddress(DATA)).expect("raw data");
        let aliased = raw_writes_alias(mem, nq as u64 * QUEUE_STRIDE);
        for q in &mut qs {
            q.raw = true;
            q.aliased = aliased;
        }
        return qs;
    }
    let chains = usize::from(mode & 0x3f);
    let mut data_at = DATA;
    for _ in 0..chains {
        if inp.is_empty() {
            break;
        }
        let q = usize::from(inp.u8()) % nq;
        if !qs[q].post_chain(inp, mem, &mut data_at) {
            break;
        }
    }
    qs
}

struct Env {
    mem: GuestMemoryMmap,
    ch: Arc<DeviceChannel>,
    irq: Arc<Interrupt>,
}

impl Env {
    fn new() -> Self {
        Self {
            mem: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).expect("mem"),
            ch: Arc::new(DeviceChannel::new().expect("channel")),
            irq: Arc::new(Interrupt::new().expect("irq")),
        }
    }
    fn activate(&self, qs: &[FuzzQueue]) {
        self.ch.send(TransportMsg::Activate {
            queues: qs.iter().map(FuzzQueue::queue).collect(),
            mem: self.mem.clone(),
        });
    }
}

fn evts(n: usize) -> Vec<EventFd> {
    (0..n).map(|_| EventFd::new(0).expect("eventfd")).collect()
}

/// virtio-vsock: RX/TX/event queues through the MMIO device model and its muxer.
pub fn virtio_vsock(data: &[u8]) {
    let mut inp = Input::new(data);
    let dir = Scratch::new("vsock");
    let uds = dir.path().join("v.sock");
    // A host service the guest may connect to (port 1024), so REQUESTs reach a real socket.
    let _svc = UnixListener::bind(format!("{}_1024", uds.display())).expect("service");
    let env = Env::new();
    let qs = build_queues(&mut inp, &env.mem, 3);
    let mux = VsockMuxer::new(3, &uds).expect("muxer");
    let mut dev = VsockDevice::new(mux, env.ch.clone(), env.irq.clone(), evts(3));
    env.activate(&qs);
    dev.handle_channel();
    dev.run_queues();
    for q in &qs {
        q.check_used(&env.mem);
    }
}

/// virtio-blk on a 64 KiB scratch disk (writable or read-only, as the input says).
pub fn virtio_blk(data: &[u8]) {
    let mut inp = Input::new(data);
    let dir = Scratch::new("blk");
    let disk = dir.path().join("disk");
    std::fs::write(&disk, vec![0x5a; 64 * 1024]).expect("disk");
    let read_only = inp.u8() & 1 == 1;
    let env = Env::new();
    let qs = build_queues(&mut inp, &env.mem, 1);
    let mut dev = BlockDevice::open(
        &disk,
        read_only,
        "fuzz-disk",
        env.ch.clone(),
        env.irq.clone(),
        evts(1).remove(0),
    )
    .expect("block device");
    env.activate(&qs);
    dev.handle_channel();
    dev.process_queue();
    qs[0].check_used(&env.mem);
    let len = std::fs::metadata(&disk).expect("disk").len();
    assert_eq!(len, 64 * 1024, "the guest cannot grow its disk");
}

/// The tap stand-in of the net target: frames from the input in, frames out counted.
struct FuzzTap {
    rx: VecDeque<Vec<u8>>,
    evt: EventFd,
    sent: usize,
}

impl AsRawFd for FuzzTap {
    fn as_raw_fd(&self) -> RawFd {
        self.evt.as_raw_fd()
    }
}

impl FrameIo for FuzzTap {
    fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let Some(f) = self.rx.pop_front() else {
            return Err(std::io::ErrorKind::WouldBlock.into());
        };
        let n = f.len().min(buf.len());
        buf[..n].copy_from_slice(&f[..n]);
        Ok(n)
    }
    fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<usize> {
        assert!(
            frame.len() <= crate::devices::virtio::net::MAX_FRAME,
            "frame of {} bytes reached the tap",
            frame.len()
        );
        self.sent += 1;
        Ok(frame.len())
    }
}

/// virtio-net: TX chains to the tap, tap frames into RX chains.
pub fn virtio_net(data: &[u8]) {
    let mut inp = Input::new(data);
    let mut rx = VecDeque::new();
    for _ in 0..inp.u8() % 4 {
        let len = usize::from(inp.u16());
        let mut f = inp.bytes(len).to_vec();
        f.resize(len, 0xee);
        rx.push_back(f);
    }
    let tap = FuzzTap {
        rx,
        evt: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
        sent: 0,
    };
    let env = Env::new();
    let qs = build_queues(&mut inp, &env.mem, 2);
    let mut dev = NetDevice::new(tap, env.ch.clone(), env.irq.clone(), evts(2));
    env.activate(&qs);
    dev.handle_channel();
    dev.process_tx();
    dev.process_rx();
    for q in &qs {
        q.check_used(&env.mem);
    }
}

/// A share with a file, a directory and a symlink pointing out of it, inside a parent that
/// also holds a sentinel: after the guest's requests the parent must hold exactly these two.
struct Share {
    dir: Scratch,
}

impl Share {
    fn new() -> Self {
        let dir = Scratch::new("fs");
        let share = dir.path().join("share");
        std::fs::create_dir_all(share.join("d/e")).expect("share");
        std::fs::write(share.join("f"), b"hello").expect("file");
        std::fs::write(share.join("d/g"), vec![1u8; 8192]).expect("file");
        std::os::unix::fs::symlink("../outside", share.join("out")).expect("symlink");
        std::os::unix::fs::symlink(dir.path(), share.join("parent")).expect("symlink");
        std::fs::write(dir.path().join("outside"), b"sentinel").expect("sentinel");
        Share { dir }
    }
    fn path(&self) -> PathBuf {
        self.dir.path().join("share")
    }
    fn check(&self) {
        let mut names: Vec<_> = std::fs::read_dir(self.dir.path())
            .expect("parent")
            .map(|e| e.expect("entry").file_name())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["outside", "share"],
            "nothing appears beside the share"
        );
        let s = std::fs::read(self.dir.path().join("outside")).expect("sentinel");
        assert_eq!(s, b"sentinel", "the file outside the share is untouched");
    }
}

/// The FUSE decoder and dispatcher on a scratch share: the input is a stream of requests,
/// each as long as its header says (cut at the end of the input), each given a reply room.
pub fn fuse_server(data: &[u8]) {
    let share = Share::new();
    let server = Server::new(PassthroughFs::new(&share.path()).expect("share"));
    let mut inp = Input::new(data);
    while !inp.is_empty() {
        let room = usize::from(inp.u16()) * 4;
        let rest = inp.rest();
        let len = rest
            .get(..4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .unwrap_or(rest.len())
            .clamp(1, rest.len().max(1));
        let (req, tail) = rest.split_at(len.min(rest.len()));
        inp = Input::new(tail);
        if let Some(reply) = server.handle(req, room) {
            assert!(reply.len() >= 16, "a reply carries its header");
            let declared = u32::from_le_bytes([reply[0], reply[1], reply[2], reply[3]]);
            assert_eq!(declared as usize, reply.len(), "reply length header");
            assert!(reply.len() <= room.max(16), "reply fits the guest's room");
        }
    }
    drop(server);
    share.check();
}

/// virtio-fs: the request queues of the device model on a scratch share.
pub fn virtio_fs(data: &[u8]) {
    let mut inp = Input::new(data);
    let share = Share::new();
    let env = Env::new();
    let qs = build_queues(&mut inp, &env.mem, 2);
    let mut dev =
        FsDevice::new(&share.path(), env.ch.clone(), env.irq.clone(), evts(2)).expect("fs device");
    env.activate(&qs);
    dev.handle_channel();
    dev.run_queues();
    for q in &qs {
        q.check_used(&env.mem);
    }
    drop(dev);
    share.check();
}

/// The vsock muxer as a state machine: guest packets (single or flooded), host clients that
/// connect with a `CONNECT` line, write, half-close and vanish, host services the guest
/// connects to, and a guest that takes packets with any buffer size or none. After every step
/// the muxer's queues and connections stay within `MUXER_MAX_*`.
pub fn vsock_muxer(data: &[u8]) {
    let mut inp = Input::new(data);
    let dir = Scratch::new("mux");
    let uds = dir.path().join("v.sock");
    let mut m = VsockMuxer::new(3, &uds).expect("muxer");
    let mut clients: Vec<UnixStream> = Vec::new();
    let mut services: Vec<(u32, UnixListener)> = Vec::new();
    let mut accepted: Vec<UnixStream> = Vec::new();
    // Ports the guest has heard of (REQUESTs from host clients): packets may aim at them.
    let mut seen: Vec<(u32, u32)> = Vec::new();
    let mut buf = Vec::new();
    let mut steps = 0;
    let mut flood_budget: usize = 256 * 1024;
    while !inp.is_empty() && steps < 256 {
        steps += 1;
        match inp.u8() % 9 {
            0 | 1 => {
                let flood = inp.u8();
                let mut h = guest_header(&mut inp, &seen);
                let plen = usize::from(inp.u16() % 4096);
                let payload = inp.bytes(plen).to_vec();
                h.len = payload.len() as u32;
                let times = if flood & 0x80 != 0 {
                    usize::from(flood & 0x7f) * 1024
                } else {
                    1
                }
                .min(flood_budget);
                flood_budget -= times;
                for i in 0..times {
                    if flood & 0x40 != 0 {
                        h.src_port = h.src_port.wrapping_add(i as u32);
                    }
                    m.send_pkt(&h, &payload);
                }
            }
            2 => {
                if clients.len() < 8
                    && let Ok(mut c) = UnixStream::connect(&uds)
                {
                    let _ = c.set_nonblocking(true);
                    let n = usize::from(inp.u8() % 48);
                    let line = inp.bytes(n);
                    let _ = c.write_all(line);
                    clients.push(c);
                }
            }
            3 => {
                let n = usize::from(inp.u8());
                let len = usize::from(inp.u16() % 8192);
                let d = inp.bytes(len).to_vec();
                if let Some(c) = pick(&mut clients, n) {
                    let _ = c.write_all(&d);
                } else if let Some(c) = pick(&mut accepted, n) {
                    let _ = c.write_all(&d);
                }
            }
            4 => {
                let n = usize::from(inp.u8());
                let how = inp.u8();
                let list = if how & 1 == 0 {
                    &mut clients
                } else {
                    &mut accepted
                };
                if !list.is_empty() {
                    let i = n % list.len();
                    if how & 2 == 0 {
                        list.swap_remove(i);
                    } else {
                        let _ = list[i].shutdown(std::net::Shutdown::Write);
                    }
                }
            }
            5 => {
                let port = 1024 + u32::from(inp.u8() % 4);
                if services.len() < 4
                    && !services.iter().any(|(p, _)| *p == port)
                    && let Ok(l) = UnixListener::bind(format!("{}_{port}", uds.display()))
                {
                    let _ = l.set_nonblocking(true);
                    services.push((port, l));
                }
                for (_, l) in &services {
                    while accepted.len() < 16
                        && let Ok((s, _)) = l.accept()
                    {
                        let _ = s.set_nonblocking(true);
                        accepted.push(s);
                    }
                }
            }
            6 => {
                // The guest takes packets: up to `k` of them, into buffers of `room` bytes.
                let k = usize::from(inp.u8() % 16);
                let room = usize::from(inp.u16());
                m.process_events();
                for _ in 0..k {
                    let Some(h) = m.recv_pkt(room, &mut buf) else {
                        break;
                    };
                    assert!(buf.len() <= room, "payload beyond the guest's buffer");
                    assert!(buf.len() <= packet::MAX_PKT_PAYLOAD);
                    assert_eq!(h.dst_cid, 3, "packets go to the guest");
                    if h.op == packet::OP_REQUEST && seen.len() < 16 {
                        seen.push((h.src_port, h.dst_port));
                    }
                }
            }
            7 => {
                // Host clients read what arrived (OK lines, data).
                let mut sink = [0u8; 4096];
                for c in clients.iter_mut().chain(accepted.iter_mut()) {
                    let _ = c.read(&mut sink);
                }
            }
            _ => m.process_events(),
        }
        let d = m.queue_depths();
        // HUSK_FUZZ_MUXER_UNBOUNDED=1 skips the two bounds (to fuzz on past a known finding).
        let bounded = std::env::var_os("HUSK_FUZZ_MUXER_UNBOUNDED").is_none();
        assert!(
            !bounded || d.packets_for_guest <= MUXER_MAX_QUEUED,
            "muxer holds {} packets for a guest that takes none",
            d.packets_for_guest
        );
        assert!(
            !bounded || d.connections <= MUXER_MAX_CONNS,
            "muxer holds {} connections",
            d.connections
        );
        assert!(d.buffered_bytes <= d.connections * muxer::CONN_BUF_ALLOC as usize);
    }
}

fn pick<T>(v: &mut [T], n: usize) -> Option<&mut T> {
    if v.is_empty() {
        return None;
    }
    let i = n % v.len();
    v.get_mut(i)
}

/// A header mostly addressed as a real guest addresses it, sometimes not.
fn guest_header(inp: &mut Input, seen: &[(u32, u32)]) -> VsockHeader {
    let sel = inp.u8();
    let (src_port, dst_port) = match sel % 4 {
        0 if !seen.is_empty() => {
            let (local, peer) = seen[usize::from(sel >> 2) % seen.len()];
            (peer, local)
        }
        1 => (1025 + u32::from(sel >> 4), 1024 + u32::from((sel >> 2) % 4)),
        _ => (inp.u32(), inp.u32()),
    };
    let odd = inp.u8();
    VsockHeader {
        src_cid: if odd & 1 != 0 { u64::from(odd) } else { 3 },
        dst_cid: if odd & 2 != 0 {
            u64::from(odd)
        } else {
            packet::HOST_CID
        },
        src_port,
        dst_port,
        len: 0,
        type_: if odd & 4 != 0 { 2 } else { packet::TYPE_STREAM },
        op: u16::from(inp.u8() % 9),
        flags: u32::from(inp.u8() % 4),
        buf_alloc: inp.u32(),
        fwd_cnt: inp.u32(),
    }
}

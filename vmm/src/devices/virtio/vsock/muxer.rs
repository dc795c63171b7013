//! Firecracker-compatible hybrid vsock: maps guest stream connections onto host unix sockets.
//! Host-initiated: a client connects to `<uds>` and writes `CONNECT <port>\n`; once the guest
//! accepts, it reads `OK <host_port>\n`. Guest-initiated: a connection to host port P is
//! forwarded to the unix socket `<uds>_P`. Credit-based flow control both ways.
//!
//! The muxer knows nothing about guest memory or virtqueues: it takes packets from the guest
//! (`send_pkt`) and produces packets for it (`recv_pkt`), and exposes one epoll fd for readiness.
//! That is what both the virtio-mmio device and a vhost-user backend need.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::num::Wrapping;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::packet::*;

/// Bytes of guest data we buffer per connection (advertised to the guest as `buf_alloc`).
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;
/// Send a credit update once this many consumed bytes have not been reported to the guest.
const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_ALLOC / 4;
/// First local port handed out for host-initiated connections.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
const MAX_CONNECT_LINE: usize = 32;
/// A host-initiated connection the guest has not accepted by then is refused (as Firecracker).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Most connections at once (both directions). A guest REQUEST beyond it gets an RST, a host
/// client beyond it is closed. With [`CONN_BUF_ALLOC`] this bounds the guest data the muxer
/// can hold for host peers that do not read: 64 MiB.
pub const MAX_CONNECTIONS: usize = 256;
/// Most control packets (REQUEST, RESPONSE, RST, SHUTDOWN, CREDIT_UPDATE) waiting for a guest
/// RX buffer. A live connection has at most three queued at once (credit updates are not
/// repeated), so a guest that takes its packets never reaches it; one that posts no RX buffers
/// while it floods the TX queue does: further replies are dropped, and a connection whose
/// control packet cannot be queued is closed. 1024 × 44-byte headers: ≈ 48 KiB.
pub const MAX_CTRL_RX: usize = 4 * MAX_CONNECTIONS;
/// When a muxer goes away (the VM exited, the vhost-user frontend left), how long it may
/// still spend handing buffered guest data to host peers that are reading it. A peer that
/// does not read cannot hold the exit back longer than this.
pub const EXIT_FLUSH: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum MuxerError {
    #[error("cannot bind vsock socket {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("vsock epoll: {0}")]
    Epoll(#[source] std::io::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct ConnKey {
    local_port: u32,
    peer_port: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConnState {
    /// Host client connected and sent CONNECT; waiting for the guest's RESPONSE.
    LocalInit,
    Established,
    /// We told the guest the host side closed; waiting for its RST.
    Closing,
    /// The guest shut down both directions while its data for the host was still buffered:
    /// that data is written as the host reads it, then the connection ends with an RST.
    Draining,
}

struct Connection {
    stream: UnixStream,
    state: ConnState,
    created: Instant,
    /// Guest data not yet written to the host socket.
    tx_buf: VecDeque<u8>,
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    rx_cnt: Wrapping<u32>,
    /// Waiting in `rx_ready` for a guest buffer.
    rx_queued: bool,
    /// A CREDIT_UPDATE for this connection is in `ctrl_rx` already.
    credit_update_queued: bool,
    peer_shut_send: bool,
    /// The host client shut down its sending side (EOF); it may still read.
    host_eof: bool,
    interest: EventSet,
}

impl Connection {
    fn new(stream: UnixStream, state: ConnState) -> Self {
        Self {
            stream,
            state,
            created: Instant::now(),
            tx_buf: VecDeque::new(),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            rx_queued: false,
            credit_update_queued: false,
            peer_shut_send: false,
            host_eof: false,
            interest: EventSet::empty(),
        }
    }

    fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Writes buffered guest data to the host socket; returns false on a hard error.
    fn flush(&mut self) -> bool {
        while !self.tx_buf.is_empty() {
            let (a, _) = self.tx_buf.as_slices();
            match self.stream.write(a) {
                Ok(0) => return false,
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    self.fwd_cnt += Wrapping(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return false,
            }
        }
        if self.tx_buf.is_empty() && self.peer_shut_send {
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
        true
    }
}

enum FdKind {
    Listener,
    /// Fires when the oldest unaccepted host-initiated connection times out.
    Timer,
    /// Accepted host client that has not finished its `CONNECT <port>\n` line.
    Pending(UnixStream, Vec<u8>),
    Conn(ConnKey),
}

pub struct VsockMuxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    fds: HashMap<RawFd, FdKind>,
    conns: HashMap<ConnKey, Connection>,
    ctrl_rx: VecDeque<VsockHeader>,
    rx_ready: VecDeque<ConnKey>,
    next_local_port: u32,
    /// Control packets dropped because `ctrl_rx` was full (for the log).
    ctrl_dropped: u64,
    timer: TimerFd,
    timer_armed: bool,
    connect_timeout: Duration,
}

impl VsockMuxer {
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, MuxerError> {
        let bind_err = |source| MuxerError::Bind {
            path: uds_path.to_owned(),
            source,
        };
        match std::fs::remove_file(uds_path) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(bind_err(e)),
        }
        let listener = UnixListener::bind(uds_path).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        let epoll = Epoll::new().map_err(MuxerError::Epoll)?;
        let timer = TimerFd::new()
            .map_err(|e| MuxerError::Epoll(std::io::Error::from_raw_os_error(e.errno())))?;
        let mut m = Self {
            guest_cid,
            uds_path: uds_path.to_owned(),
            listener,
            epoll,
            fds: HashMap::new(),
            conns: HashMap::new(),
            ctrl_rx: VecDeque::with_capacity(MAX_CTRL_RX),
            rx_ready: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
            ctrl_dropped: 0,
            timer,
            timer_armed: false,
            connect_timeout: CONNECT_TIMEOUT,
        };
        let fd = m.listener.as_raw_fd();
        m.epoll_ctl(ControlOperation::Add, fd, EventSet::IN)
            .map_err(MuxerError::Epoll)?;
        m.fds.insert(fd, FdKind::Listener);
        let tfd = m.timer.as_raw_fd();
        m.epoll_ctl(ControlOperation::Add, tfd, EventSet::IN)
            .map_err(MuxerError::Epoll)?;
        m.fds.insert(tfd, FdKind::Timer);
        Ok(m)
    }

    fn epoll_ctl(&self, op: ControlOperation, fd: RawFd, ev: EventSet) -> std::io::Result<()> {
        self.epoll.ctl(op, fd, EpollEvent::new(ev, fd as u64))
    }

    /// Drops every connection (device reset). Guest data already buffered for a host peer is
    /// offered to its socket once, without waiting.
    pub fn reset(&mut self) {
        self.flush_guest_data(Duration::ZERO);
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for k in keys {
            self.remove(k);
        }
        self.ctrl_rx.clear();
        self.rx_ready.clear();
    }

    pub fn has_rx(&self) -> bool {
        !self.ctrl_rx.is_empty() || !self.rx_ready.is_empty()
    }

    fn header(&self, key: ConnKey, op: u16) -> VsockHeader {
        VsockHeader {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.local_port,
            dst_port: key.peer_port,
            type_: TYPE_STREAM,
            op,
            ..Default::default()
        }
    }

    /// Control packets waiting for guest RX buffers (never above [`MAX_CTRL_RX`]).
    pub fn ctrl_backlog(&self) -> usize {
        self.ctrl_rx.len()
    }

    #[cfg(test)]
    pub(crate) fn ctrl_capacity(&self) -> usize {
        self.ctrl_rx.capacity()
    }

    /// Open connections (never above [`MAX_CONNECTIONS`]).
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Guest data held for host peers, over all connections.
    pub fn buffered_guest_bytes(&self) -> usize {
        self.conns.values().map(|c| c.tx_buf.len()).sum()
    }

    /// Writes guest data still buffered for host peers to their sockets, waiting at most
    /// `within` for slow readers (not at all with zero). Returns the bytes left unwritten
    /// (their peers did not read in time, or are gone). Used when the device goes away: a
    /// guest that wrote and then powered off loses nothing a reading peer was owed.
    pub fn flush_guest_data(&mut self, within: Duration) -> usize {
        let end = Instant::now() + within;
        loop {
            let mut fds = Vec::new();
            for c in self.conns.values_mut() {
                if !c.tx_buf.is_empty() && !c.flush() {
                    c.tx_buf.clear();
                }
                if !c.tx_buf.is_empty() {
                    fds.push(libc::pollfd {
                        fd: c.stream.as_raw_fd(),
                        events: libc::POLLOUT,
                        revents: 0,
                    });
                }
            }
            let now = Instant::now();
            if fds.is_empty() || now >= end {
                return self.buffered_guest_bytes();
            }
            let ms = (end - now).as_millis().clamp(1, i32::MAX as u128) as i32;
            // SAFETY: `fds` is a live, correctly sized array of pollfd for the whole call.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
            if n < 0 && std::io::Error::last_os_error().kind() != ErrorKind::Interrupted {
                return self.buffered_guest_bytes();
            }
        }
    }

    /// Queues a control packet for the guest; false (and nothing queued) when [`MAX_CTRL_RX`]
    /// are waiting already. A live connection whose packet is dropped is closed by the caller.
    #[must_use]
    fn try_push_ctrl(&mut self, key: ConnKey, op: u16, flags: u32) -> bool {
        if self.ctrl_rx.len() >= MAX_CTRL_RX {
            if self.ctrl_dropped.is_power_of_two() {
                tracing::warn!(
                    dropped = self.ctrl_dropped + 1,
                    "vsock: guest takes no RX packets, dropping control packets"
                );
            }
            self.ctrl_dropped += 1;
            return false;
        }
        let mut h = self.header(key, op);
        h.flags = flags;
        self.ctrl_rx.push_back(h);
        true
    }

    /// Queues a control packet whose loss leaves no host state behind (an RST for a
    /// connection that is gone): dropped when the queue is full.
    fn push_ctrl(&mut self, key: ConnKey, op: u16, flags: u32) {
        let _ = self.try_push_ctrl(key, op, flags);
    }

    /// Queues a control packet for the live connection `key`, or closes the connection when
    /// the guest cannot be told.
    fn push_conn_ctrl(&mut self, key: ConnKey, op: u16, flags: u32) -> bool {
        if self.try_push_ctrl(key, op, flags) {
            return true;
        }
        self.remove(key);
        false
    }

    fn rst_for(&mut self, hdr: &VsockHeader) {
        if hdr.op != OP_RST {
            self.push_ctrl(
                ConnKey {
                    local_port: hdr.dst_port,
                    peer_port: hdr.src_port,
                },
                OP_RST,
                0,
            );
        }
    }

    fn remove(&mut self, key: ConnKey) {
        if let Some(c) = self.conns.remove(&key) {
            let fd = c.stream.as_raw_fd();
            let _ = self.epoll_ctl(ControlOperation::Delete, fd, EventSet::empty());
            self.fds.remove(&fd);
        }
        self.rx_ready.retain(|k| *k != key);
    }

    /// Recomputes what we wait for on a connection's socket.
    fn update_interest(&mut self, key: ConnKey) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        let mut ev = EventSet::empty();
        if c.state == ConnState::Established && !c.host_eof && !c.rx_queued && c.peer_credit() > 0 {
            ev |= EventSet::IN | EventSet::READ_HANG_UP;
        }
        if !c.tx_buf.is_empty() {
            ev |= EventSet::OUT;
        }
        if ev != c.interest {
            c.interest = ev;
            let fd = c.stream.as_raw_fd();
            let _ = self
                .epoll
                .ctl(ControlOperation::Modify, fd, EpollEvent::new(ev, fd as u64));
        }
    }

    fn maybe_credit_update(&mut self, key: ConnKey) {
        if let Some(c) = self.conns.get(&key)
            && (c.fwd_cnt - c.last_fwd_cnt_sent).0 >= CREDIT_UPDATE_THRESHOLD
        {
            self.credit_update(key);
        }
    }

    /// Queues one CREDIT_UPDATE for `key` unless one is waiting already (the one waiting will
    /// carry the newest counters: they are filled in when the guest takes it).
    fn credit_update(&mut self, key: ConnKey) {
        match self.conns.get(&key) {
            Some(c) if !c.credit_update_queued => {}
            _ => return,
        }
        if self.push_conn_ctrl(key, OP_CREDIT_UPDATE, 0)
            && let Some(c) = self.conns.get_mut(&key)
        {
            c.credit_update_queued = true;
        }
    }

    /// Handles one packet the guest sent.
    pub fn send_pkt(&mut self, hdr: &VsockHeader, payload: &[u8]) {
        if hdr.src_cid != self.guest_cid || hdr.dst_cid != HOST_CID || hdr.type_ != TYPE_STREAM {
            tracing::debug!(?hdr, "vsock: dropping packet with bad addressing");
            self.rst_for(hdr);
            return;
        }
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        if hdr.op == OP_REQUEST {
            self.guest_connect(key, hdr);
            return;
        }
        let Some(c) = self.conns.get_mut(&key) else {
            self.rst_for(hdr);
            return;
        };
        c.peer_buf_alloc = hdr.buf_alloc;
        c.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        match hdr.op {
            OP_RESPONSE if c.state == ConnState::LocalInit => {
                c.state = ConnState::Established;
                let line = format!("OK {}\n", key.local_port);
                if c.stream.write_all(line.as_bytes()).is_err() {
                    self.remove(key);
                    self.push_ctrl(key, OP_RST, 0);
                    return;
                }
            }
            OP_RW if c.state == ConnState::Established => {
                if c.tx_buf.len() + payload.len() > CONN_BUF_ALLOC as usize {
                    tracing::warn!(
                        ?key,
                        "vsock: guest overran its credit, resetting connection"
                    );
                    self.remove(key);
                    self.push_ctrl(key, OP_RST, 0);
                    return;
                }
                c.tx_buf.extend(payload);
                if !c.flush() {
                    self.host_closed(key);
                    return;
                }
                self.maybe_credit_update(key);
            }
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => {
                self.credit_update(key);
                if !self.conns.contains_key(&key) {
                    return;
                }
            }
            OP_SHUTDOWN => {
                if hdr.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND) == (SHUTDOWN_RCV | SHUTDOWN_SEND)
                    || c.state == ConnState::Closing
                {
                    let open = c.flush();
                    if open
                        && !c.tx_buf.is_empty()
                        && matches!(c.state, ConnState::Established | ConnState::Draining)
                    {
                        // Its last bytes are still on their way to the host: keep the
                        // connection until the host has read them (bounded by the credit).
                        c.state = ConnState::Draining;
                        c.peer_shut_send = true;
                        c.rx_queued = false;
                        self.rx_ready.retain(|k| *k != key);
                        self.update_interest(key);
                        return;
                    }
                    self.remove(key);
                    self.push_ctrl(key, OP_RST, 0);
                    return;
                }
                if hdr.flags & SHUTDOWN_SEND != 0 {
                    c.peer_shut_send = true;
                    c.flush();
                    if c.host_eof && c.tx_buf.is_empty() {
                        self.remove(key);
                        self.push_ctrl(key, OP_RST, 0);
                        return;
                    }
                }
            }
            OP_RST => {
                self.remove(key);
                return;
            }
            _ => {
                self.remove(key);
                self.push_ctrl(key, OP_RST, 0);
                return;
            }
        }
        self.update_interest(key);
    }

    fn guest_connect(&mut self, key: ConnKey, hdr: &VsockHeader) {
        if self.conns.contains_key(&key) {
            self.remove(key);
            self.push_ctrl(key, OP_RST, 0);
            return;
        }
        if self.conns.len() >= MAX_CONNECTIONS || self.ctrl_rx.len() >= MAX_CTRL_RX {
            tracing::debug!(?key, "vsock: refusing guest connect: connection limit");
            self.push_ctrl(key, OP_RST, 0);
            return;
        }
        let path = format!("{}_{}", self.uds_path.display(), key.local_port);
        // Non-blocking from the start: a host service whose backlog is full refuses at once
        // (RST) rather than stalling the device thread until it accepts.
        let stream = match super::uds::connect_nonblocking(Path::new(&path)) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(%path, "vsock: guest connect refused: {e}");
                self.push_ctrl(key, OP_RST, 0);
                return;
            }
        };
        let fd = stream.as_raw_fd();
        if self
            .epoll_ctl(ControlOperation::Add, fd, EventSet::empty())
            .is_err()
        {
            self.push_ctrl(key, OP_RST, 0);
            return;
        }
        self.fds.insert(fd, FdKind::Conn(key));
        let mut c = Connection::new(stream, ConnState::Established);
        c.peer_buf_alloc = hdr.buf_alloc;
        c.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        self.conns.insert(key, c);
        if self.push_conn_ctrl(key, OP_RESPONSE, 0) {
            self.update_interest(key);
        }
    }

    /// The host side of a connection is gone (closed or failed): tell the guest, and stop
    /// watching the socket (a hung-up socket would otherwise wake epoll forever).
    fn host_closed(&mut self, key: ConnKey) {
        if self.conns.get(&key).map(|c| c.state) == Some(ConnState::Draining) {
            self.remove(key);
            self.push_ctrl(key, OP_RST, 0);
            return;
        }
        if let Some(c) = self.conns.get_mut(&key) {
            c.state = ConnState::Closing;
            c.rx_queued = false;
            let fd = c.stream.as_raw_fd();
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
        self.rx_ready.retain(|k| *k != key);
        let _ = self.push_conn_ctrl(key, OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND);
    }

    /// The host client will send no more (EOF) but may still read: a half-close. If the guest
    /// has shut down its sending side too, the connection is over.
    fn host_eof(&mut self, key: ConnKey) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        c.host_eof = true;
        c.rx_queued = false;
        if c.peer_shut_send && c.tx_buf.is_empty() {
            self.remove(key);
            self.push_ctrl(key, OP_RST, 0);
            return;
        }
        if self.push_conn_ctrl(key, OP_SHUTDOWN, SHUTDOWN_SEND) {
            self.update_interest(key);
        }
    }

    /// Produces the next packet for the guest, its payload in `buf` (at most `max_payload`).
    pub fn recv_pkt(&mut self, max_payload: usize, buf: &mut Vec<u8>) -> Option<VsockHeader> {
        buf.clear();
        if let Some(mut h) = self.ctrl_rx.pop_front() {
            let key = ConnKey {
                local_port: h.src_port,
                peer_port: h.dst_port,
            };
            if let Some(c) = self.conns.get_mut(&key) {
                h.buf_alloc = CONN_BUF_ALLOC;
                h.fwd_cnt = c.fwd_cnt.0;
                c.last_fwd_cnt_sent = c.fwd_cnt;
                if h.op == OP_CREDIT_UPDATE {
                    c.credit_update_queued = false;
                }
            }
            return Some(h);
        }
        while let Some(key) = self.rx_ready.pop_front() {
            let Some(c) = self.conns.get_mut(&key) else {
                continue;
            };
            c.rx_queued = false;
            let want = (c.peer_credit() as usize)
                .min(max_payload)
                .min(MAX_PKT_PAYLOAD);
            if c.state != ConnState::Established || want == 0 {
                self.update_interest(key);
                continue;
            }
            buf.resize(want, 0);
            match c.stream.read(buf) {
                Ok(0) => {
                    buf.clear();
                    self.host_eof(key);
                    return self.recv_pkt(max_payload, buf);
                }
                Ok(n) => {
                    buf.truncate(n);
                    c.rx_cnt += Wrapping(n as u32);
                    c.last_fwd_cnt_sent = c.fwd_cnt;
                    let fwd_cnt = c.fwd_cnt.0;
                    let mut h = self.header(key, OP_RW);
                    h.len = n as u32;
                    h.buf_alloc = CONN_BUF_ALLOC;
                    h.fwd_cnt = fwd_cnt;
                    self.update_interest(key);
                    return Some(h);
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                    buf.clear();
                    self.update_interest(key);
                }
                Err(_) => {
                    buf.clear();
                    self.host_closed(key);
                    return self.recv_pkt(max_payload, buf);
                }
            }
        }
        None
    }

    /// Handles readiness on the muxer's sockets (non-blocking).
    pub fn process_events(&mut self) {
        let mut events = [EpollEvent::default(); 32];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("vsock epoll_wait: {e}");
                return;
            }
        };
        for ev in &events[..n] {
            let fd = ev.data() as RawFd;
            let set = ev.event_set();
            match self.fds.get(&fd) {
                Some(FdKind::Listener) => self.accept(),
                Some(FdKind::Timer) => self.expire_connects(),
                Some(FdKind::Pending(..)) => self.read_connect_line(fd),
                Some(FdKind::Conn(key)) => {
                    let key = *key;
                    self.conn_event(key, set);
                }
                None => {}
            }
        }
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((s, _)) => {
                    if s.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let fd = s.as_raw_fd();
                    if self
                        .epoll_ctl(ControlOperation::Add, fd, EventSet::IN)
                        .is_ok()
                    {
                        self.fds.insert(fd, FdKind::Pending(s, Vec::new()));
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
    }

    /// Reads the `CONNECT <port>\n` line one byte at a time, so no payload byte is consumed.
    fn read_connect_line(&mut self, fd: RawFd) {
        let Some(FdKind::Pending(s, line)) = self.fds.get_mut(&fd) else {
            return;
        };
        let mut b = [0u8; 1];
        let port = loop {
            match s.read(&mut b) {
                Ok(1) if b[0] == b'\n' => {
                    break std::str::from_utf8(line)
                        .ok()
                        .and_then(|l| l.strip_prefix("CONNECT "))
                        .and_then(|p| p.trim().parse::<u32>().ok());
                }
                Ok(1) if line.len() < MAX_CONNECT_LINE => line.push(b[0]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                _ => break None,
            }
        };
        let Some(FdKind::Pending(stream, _)) = self.fds.remove(&fd) else {
            return;
        };
        let Some(port) = port else {
            let _ = self.epoll_ctl(ControlOperation::Delete, fd, EventSet::empty());
            return; // dropping the stream closes it
        };
        if self.conns.len() >= MAX_CONNECTIONS || self.ctrl_rx.len() >= MAX_CTRL_RX {
            tracing::warn!(
                port,
                "vsock: refusing host connect: connection limit or guest not reading"
            );
            let _ = self.epoll_ctl(ControlOperation::Delete, fd, EventSet::empty());
            return;
        }
        let key = loop {
            let k = ConnKey {
                local_port: self.next_local_port,
                peer_port: port,
            };
            self.next_local_port = self.next_local_port.wrapping_add(1).max(FIRST_LOCAL_PORT);
            if !self.conns.contains_key(&k) {
                break k;
            }
        };
        let _ = self.epoll_ctl(ControlOperation::Modify, fd, EventSet::empty());
        self.fds.insert(fd, FdKind::Conn(key));
        self.conns
            .insert(key, Connection::new(stream, ConnState::LocalInit));
        if !self.push_conn_ctrl(key, OP_REQUEST, 0) {
            return;
        }
        if !self.timer_armed {
            self.arm_timer(self.connect_timeout);
        }
    }

    fn arm_timer(&mut self, after: Duration) {
        self.timer_armed = self
            .timer
            .reset(after.max(Duration::from_millis(1)), None)
            .is_ok();
    }

    /// Refuses host-initiated connections the guest did not accept in time.
    fn expire_connects(&mut self) {
        let _ = self.timer.wait();
        self.timer_armed = false;
        let now = Instant::now();
        let mut oldest_left: Option<Instant> = None;
        let mut expired = Vec::new();
        for (k, c) in &self.conns {
            if c.state == ConnState::LocalInit {
                if now.duration_since(c.created) >= self.connect_timeout {
                    expired.push(*k);
                } else {
                    oldest_left = Some(oldest_left.map_or(c.created, |o| o.min(c.created)));
                }
            }
        }
        for k in expired {
            tracing::debug!(?k, "vsock: guest did not accept in time");
            self.abort_local_init(k);
        }
        if let Some(o) = oldest_left {
            self.arm_timer(self.connect_timeout.saturating_sub(now.duration_since(o)));
        }
    }

    /// Drops a host-initiated connection the guest has not accepted: the REQUEST is withdrawn
    /// if the guest never saw it, otherwise the guest gets an RST.
    fn abort_local_init(&mut self, k: ConnKey) {
        self.remove(k);
        let queued = |h: &VsockHeader| {
            h.op == OP_REQUEST && h.src_port == k.local_port && h.dst_port == k.peer_port
        };
        let before = self.ctrl_rx.len();
        self.ctrl_rx.retain(|h| !queued(h));
        if self.ctrl_rx.len() == before {
            self.push_ctrl(k, OP_RST, 0);
        }
    }

    fn conn_event(&mut self, key: ConnKey, set: EventSet) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if set.contains(EventSet::OUT) {
            if !c.flush() {
                self.host_closed(key);
                return;
            }
            self.maybe_credit_update(key);
        }
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if c.state == ConnState::Draining {
            // Done when the host has taken everything, or is gone.
            if c.tx_buf.is_empty() || set.intersects(EventSet::HANG_UP | EventSet::ERROR) {
                self.remove(key);
                self.push_ctrl(key, OP_RST, 0);
            }
            return;
        }
        // EPOLLHUP/EPOLLERR are reported whatever the interest set: act on them once.
        let gone = set.intersects(EventSet::HANG_UP | EventSet::ERROR);
        if gone && c.state == ConnState::LocalInit {
            self.abort_local_init(key);
            return;
        }
        if gone && c.host_eof {
            self.host_closed(key);
            return;
        }
        if set
            .intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR)
            && c.state == ConnState::Established
            && !c.host_eof
            && !c.rx_queued
        {
            c.rx_queued = true;
            self.rx_ready.push_back(key);
        }
        self.update_interest(key);
    }
}

/// How much a muxer holds (for the fuzz targets' memory assertions).
#[doc(hidden)]
#[derive(Debug, Clone, Copy)]
pub struct QueueDepths {
    /// Control packets and ready connections waiting for a guest RX buffer.
    pub packets_for_guest: usize,
    /// Connections, and host clients still sending their `CONNECT` line.
    pub connections: usize,
    /// Guest data buffered for host sockets, over all connections.
    pub buffered_bytes: usize,
}

impl VsockMuxer {
    #[doc(hidden)]
    pub fn queue_depths(&self) -> QueueDepths {
        QueueDepths {
            packets_for_guest: self.ctrl_rx.len() + self.rx_ready.len(),
            connections: self.conns.len()
                + self
                    .fds
                    .values()
                    .filter(|k| matches!(k, FdKind::Pending(..)))
                    .count(),
            buffered_bytes: self.conns.values().map(|c| c.tx_buf.len()).sum(),
        }
    }
}

impl AsRawFd for VsockMuxer {
    fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }
}

impl Drop for VsockMuxer {
    fn drop(&mut self) {
        let left = self.flush_guest_data(EXIT_FLUSH);
        if left > 0 {
            tracing::warn!(
                bytes = left,
                "vsock: guest data its host peers did not read"
            );
        }
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CID: u64 = 3;

    fn muxer() -> (VsockMuxer, tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tmp");
        let uds = dir.path().join("v.sock");
        (VsockMuxer::new(CID, &uds).expect("muxer"), dir, uds)
    }

    fn from_guest(
        src_port: u32,
        dst_port: u32,
        op: u16,
        buf_alloc: u32,
        fwd_cnt: u32,
    ) -> VsockHeader {
        VsockHeader {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            type_: TYPE_STREAM,
            op,
            buf_alloc,
            fwd_cnt,
            ..Default::default()
        }
    }

    fn next(m: &mut VsockMuxer, buf: &mut Vec<u8>) -> Option<VsockHeader> {
        for _ in 0..50 {
            m.process_events();
            if let Some(h) = m.recv_pkt(4096, buf) {
                return Some(h);
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        None
    }

    fn read_line(s: &mut UnixStream) -> String {
        let mut out = Vec::new();
        let mut b = [0u8; 1];
        while s.read(&mut b).expect("read") == 1 && b[0] != b'\n' {
            out.push(b[0]);
        }
        String::from_utf8(out).expect("utf8")
    }

    #[test]
    fn host_initiated_handshake_keeps_early_data_and_respects_credit() {
        let (mut m, _d, uds) = muxer();
        let mut c = UnixStream::connect(&uds).expect("connect");
        c.write_all(b"CONNECT 52\nabcdefghij").expect("w");
        let mut buf = Vec::new();
        let req = next(&mut m, &mut buf).expect("request to guest");
        assert_eq!((req.op, req.dst_port, req.dst_cid), (OP_REQUEST, 52, CID));
        assert!(req.src_port >= FIRST_LOCAL_PORT);
        // The guest accepts with a 4-byte receive window.
        m.send_pkt(&from_guest(52, req.src_port, OP_RESPONSE, 4, 0), &[]);
        assert_eq!(read_line(&mut c), format!("OK {}", req.src_port));
        let rw = next(&mut m, &mut buf).expect("data");
        assert_eq!((rw.op, rw.len), (OP_RW, 4));
        assert_eq!(buf, b"abcd");
        assert!(next(&mut m, &mut buf).is_none(), "no credit left");
        // The guest consumed 4 bytes: 4 more may flow.
        m.send_pkt(&from_guest(52, req.src_port, OP_CREDIT_UPDATE, 4, 4), &[]);
        let rw = next(&mut m, &mut buf).expect("data after credit update");
        assert_eq!(buf, b"efgh");
        assert_eq!(rw.fwd_cnt, 0);
        // Guest → host data, and the host sees it.
        m.send_pkt(&from_guest(52, req.src_port, OP_RW, 4, 8), b"pong");
        let mut got = [0u8; 4];
        c.read_exact(&mut got).expect("read");
        assert_eq!(&got, b"pong");
        // Host closes: the guest is told, and its RST ends the connection.
        drop(c);
        m.send_pkt(
            &from_guest(52, req.src_port, OP_CREDIT_UPDATE, 4096, 8),
            &[],
        );
        let mut saw_shutdown = false;
        while let Some(h) = next(&mut m, &mut buf) {
            if h.op == OP_SHUTDOWN {
                saw_shutdown = true;
                break;
            }
        }
        assert!(saw_shutdown);
        m.send_pkt(&from_guest(52, req.src_port, OP_RST, 0, 0), &[]);
        assert!(m.conns.is_empty());
    }

    #[test]
    fn guest_initiated_connect_refused_and_accepted() {
        let (mut m, _d, uds) = muxer();
        let mut buf = Vec::new();
        m.send_pkt(&from_guest(1025, 99, OP_REQUEST, 4096, 0), &[]);
        assert_eq!(
            next(&mut m, &mut buf).expect("reply").op,
            OP_RST,
            "nobody listens on _99"
        );
        let l = UnixListener::bind(format!("{}_99", uds.display())).expect("bind");
        m.send_pkt(&from_guest(1025, 99, OP_REQUEST, 4096, 0), &[]);
        let r = next(&mut m, &mut buf).expect("reply");
        assert_eq!((r.op, r.src_port, r.dst_port), (OP_RESPONSE, 99, 1025));
        let (mut s, _) = l.accept().expect("accept");
        m.send_pkt(&from_guest(1025, 99, OP_RW, 4096, 0), b"hello");
        let mut got = [0u8; 5];
        s.read_exact(&mut got).expect("read");
        assert_eq!(&got, b"hello");
        s.write_all(b"back").expect("w");
        let rw = next(&mut m, &mut buf).expect("rw");
        assert_eq!((rw.op, rw.dst_port), (OP_RW, 1025));
        assert_eq!(buf, b"back");
        // A duplicate REQUEST for a live connection resets it.
        m.send_pkt(&from_guest(1025, 99, OP_REQUEST, 4096, 0), &[]);
        assert_eq!(next(&mut m, &mut buf).expect("rst").op, OP_RST);
        assert!(m.conns.is_empty());
    }

    /// A host service that does not accept (its backlog full) cannot stall the device: the
    /// guest's REQUEST gets an RST at once, and other connections keep working.
    #[test]
    fn guest_connect_to_a_full_backlog_is_refused_without_blocking() {
        let (mut m, _d, uds) = muxer();
        let mut buf = Vec::new();
        let busy = format!("{}_77", uds.display());
        let l = UnixListener::bind(&busy).expect("bind");
        // SAFETY: listen(2) again on our listener: the backlog shrinks to its minimum.
        assert_eq!(unsafe { libc::listen(l.as_raw_fd(), 0) }, 0);
        let mut held = Vec::new();
        while let Ok(s) = super::super::uds::connect_nonblocking(Path::new(&busy)) {
            held.push(s);
            assert!(held.len() < 1000, "the backlog never filled");
        }
        let t = Instant::now();
        m.send_pkt(&from_guest(1030, 77, OP_REQUEST, 4096, 0), &[]);
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "connect blocked for {:?}",
            t.elapsed()
        );
        assert_eq!(next(&mut m, &mut buf).expect("reply").op, OP_RST);
        assert!(m.conns.is_empty());
        // A service that accepts still gets its connection.
        let ok = UnixListener::bind(format!("{}_78", uds.display())).expect("bind");
        m.send_pkt(&from_guest(1031, 78, OP_REQUEST, 4096, 0), &[]);
        assert_eq!(next(&mut m, &mut buf).expect("reply").op, OP_RESPONSE);
        let _accepted = ok.accept().expect("accept");
        drop(held);
    }

    #[test]
    fn malformed_guest_packets_get_rst_and_nothing_else() {
        let (mut m, _d, _uds) = muxer();
        let mut buf = Vec::new();
        let mut h = from_guest(1, 2, OP_RW, 0, 0);
        h.src_cid = 7; // spoofed source CID
        m.send_pkt(&h, b"x");
        assert_eq!(m.recv_pkt(4096, &mut buf).expect("rst").op, OP_RST);
        let mut h = from_guest(1, 2, OP_RW, 0, 0);
        h.type_ = 2; // SEQPACKET is not supported
        m.send_pkt(&h, b"x");
        assert_eq!(m.recv_pkt(4096, &mut buf).expect("rst").op, OP_RST);
        // Data for a connection that does not exist.
        m.send_pkt(&from_guest(1, 2, OP_RW, 0, 0), b"x");
        assert_eq!(m.recv_pkt(4096, &mut buf).expect("rst").op, OP_RST);
        // An RST for an unknown connection is not answered.
        m.send_pkt(&from_guest(1, 2, OP_RST, 0, 0), &[]);
        assert!(m.recv_pkt(4096, &mut buf).is_none());
        assert!(m.conns.is_empty());
    }

    /// True when the muxer's epoll fd has nothing pending (no busy loop in the event manager).
    fn quiet(m: &VsockMuxer) -> bool {
        let mut events = [EpollEvent::default(); 4];
        m.epoll.wait(0, &mut events).expect("wait") == 0
    }

    /// Opens a host-initiated connection the guest accepts with a big window; returns its port.
    fn established(m: &mut VsockMuxer, uds: &Path, port: u32) -> (UnixStream, u32) {
        let mut c = UnixStream::connect(uds).expect("connect");
        c.write_all(format!("CONNECT {port}\n").as_bytes())
            .expect("w");
        let mut buf = Vec::new();
        let req = next(m, &mut buf).expect("request");
        m.send_pkt(
            &from_guest(port, req.src_port, OP_RESPONSE, 1 << 20, 0),
            &[],
        );
        assert!(read_line(&mut c).starts_with("OK "));
        (c, req.src_port)
    }

    /// Guest → host data until at least 64 KiB wait in the muxer (the host does not read);
    /// returns the bytes sent.
    fn fill_unread(m: &mut VsockMuxer, port: u32, hp: u32) -> usize {
        let chunk = vec![0x5a; 4096];
        let mut sent = 0;
        while m.buffered_guest_bytes() < 64 * 1024 {
            assert!(sent < 8 << 20, "the host socket never filled up");
            m.send_pkt(&from_guest(port, hp, OP_RW, 1 << 20, 0), &chunk);
            sent += chunk.len();
        }
        sent
    }

    /// Packets for the guest until an RST (true) or none for a while (false).
    fn until_rst(m: &mut VsockMuxer) -> bool {
        let mut buf = Vec::new();
        while let Some(h) = next(m, &mut buf) {
            if h.op == OP_RST {
                return true;
            }
        }
        false
    }

    fn read_all(mut c: UnixStream) -> std::thread::JoinHandle<usize> {
        std::thread::spawn(move || {
            c.set_read_timeout(Some(std::time::Duration::from_secs(10)))
                .expect("t");
            let mut all = Vec::new();
            c.read_to_end(&mut all).expect("read to EOF");
            all.len()
        })
    }

    #[test]
    fn guest_close_with_unread_data_drains_before_the_rst() {
        let (mut m, _d, uds) = muxer();
        let (c, hp) = established(&mut m, &uds, 62);
        let sent = fill_unread(&mut m, 62, hp);
        let mut sd = from_guest(62, hp, OP_SHUTDOWN, 1 << 20, 0);
        sd.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
        m.send_pkt(&sd, &[]);
        assert!(!until_rst(&mut m), "no RST while data waits");
        assert_eq!(m.connections(), 1);
        let reader = read_all(c);
        assert!(until_rst(&mut m), "RST once the host has read it all");
        assert_eq!(m.connections(), 0);
        assert_eq!(
            reader.join().expect("reader"),
            sent,
            "every byte reached the host"
        );
    }

    #[test]
    fn a_draining_connection_ends_when_the_host_goes() {
        let (mut m, _d, uds) = muxer();
        let (c, hp) = established(&mut m, &uds, 63);
        fill_unread(&mut m, 63, hp);
        let mut sd = from_guest(63, hp, OP_SHUTDOWN, 1 << 20, 0);
        sd.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
        m.send_pkt(&sd, &[]);
        drop(c);
        assert!(until_rst(&mut m), "RST when the host went");
        assert_eq!((m.connections(), m.buffered_guest_bytes()), (0, 0));
    }

    #[test]
    fn dropping_the_muxer_hands_unread_guest_data_to_a_reading_host() {
        let (mut m, _d, uds) = muxer();
        let (c, hp) = established(&mut m, &uds, 64);
        let sent = fill_unread(&mut m, 64, hp);
        let reader = read_all(c);
        drop(m);
        assert_eq!(reader.join().expect("reader"), sent);
    }

    #[test]
    fn a_host_that_does_not_read_holds_the_drop_back_at_most_exit_flush() {
        let (mut m, _d, uds) = muxer();
        let (_c, hp) = established(&mut m, &uds, 65);
        fill_unread(&mut m, 65, hp);
        let t = Instant::now();
        drop(m);
        let took = t.elapsed();
        assert!(took >= EXIT_FLUSH, "it waited for the reader: {took:?}");
        assert!(took < EXIT_FLUSH * 10, "and then gave up: {took:?}");
    }

    #[test]
    fn host_half_close_keeps_the_other_direction() {
        let (mut m, _d, uds) = muxer();
        let (mut c, hp) = established(&mut m, &uds, 60);
        c.write_all(b"req").expect("w");
        c.shutdown(std::net::Shutdown::Write).expect("half close");
        let mut buf = Vec::new();
        let rw = next(&mut m, &mut buf).expect("data");
        assert_eq!((rw.op, &buf[..]), (OP_RW, &b"req"[..]));
        let sd = next(&mut m, &mut buf).expect("shutdown");
        assert_eq!(
            (sd.op, sd.flags),
            (OP_SHUTDOWN, SHUTDOWN_SEND),
            "host sends no more"
        );
        assert!(quiet(&m), "no readiness left after EOF");
        // The guest still answers, and the host reads it.
        m.send_pkt(&from_guest(60, hp, OP_RW, 1 << 20, 3), b"resp");
        let mut got = [0u8; 4];
        c.read_exact(&mut got).expect("read");
        assert_eq!(&got, b"resp");
        // Guest done too: the connection ends with an RST.
        let mut sd = from_guest(60, hp, OP_SHUTDOWN, 1 << 20, 3);
        sd.flags = SHUTDOWN_SEND;
        m.send_pkt(&sd, &[]);
        assert_eq!(m.recv_pkt(4096, &mut buf).expect("rst").op, OP_RST);
        assert!(m.conns.is_empty());
        c.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .expect("t");
        assert_eq!(c.read(&mut got).expect("eof"), 0);
    }

    #[test]
    fn hung_up_sockets_do_not_busy_loop() {
        let (mut m, _d, uds) = muxer();
        // Established, then the host client vanishes and the guest never answers.
        let (c, _hp) = established(&mut m, &uds, 61);
        drop(c);
        let mut buf = Vec::new();
        let mut ops = Vec::new();
        while let Some(h) = next(&mut m, &mut buf) {
            ops.push(h.op);
        }
        assert!(ops.contains(&OP_SHUTDOWN), "{ops:?}");
        assert!(quiet(&m), "closed socket no longer polled");
        // A client that gives up before the guest accepted.
        let mut c = UnixStream::connect(&uds).expect("connect");
        c.write_all(b"CONNECT 62\n").expect("w");
        for _ in 0..50 {
            m.process_events();
            if m.has_rx() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        drop(c);
        std::thread::sleep(std::time::Duration::from_millis(5));
        m.process_events();
        assert!(
            !m.conns.keys().any(|k| k.peer_port == 62),
            "abandoned connect dropped"
        );
        assert!(!m.has_rx(), "its REQUEST withdrawn");
        assert!(quiet(&m));
    }

    #[test]
    fn unaccepted_host_connections_time_out() {
        let (mut m, _d, uds) = muxer();
        m.connect_timeout = std::time::Duration::from_millis(50);
        let mut c = UnixStream::connect(&uds).expect("connect");
        c.write_all(b"CONNECT 9\n").expect("w");
        let mut buf = Vec::new();
        let req = next(&mut m, &mut buf).expect("request");
        assert_eq!(req.op, OP_REQUEST);
        // The guest never answers.
        let rst = next(&mut m, &mut buf).expect("rst after the timeout");
        assert_eq!((rst.op, rst.src_port), (OP_RST, req.src_port));
        assert!(m.conns.is_empty());
        c.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .expect("t");
        let mut b = [0u8; 1];
        assert_eq!(
            c.read(&mut b).expect("closed"),
            0,
            "client sees the refusal as EOF"
        );

        // A guest that never takes packets (driver not up): the REQUEST is withdrawn, no RST.
        let mut c2 = UnixStream::connect(&uds).expect("connect");
        c2.write_all(b"CONNECT 10\n").expect("w");
        for _ in 0..50 {
            m.process_events();
            if m.has_rx() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        assert!(m.has_rx(), "REQUEST queued");
        std::thread::sleep(std::time::Duration::from_millis(60));
        m.process_events();
        assert!(!m.has_rx(), "REQUEST withdrawn, nothing left for the guest");
        assert!(m.conns.is_empty());
    }

    #[test]
    fn bad_connect_lines_are_dropped() {
        let (mut m, _d, uds) = muxer();
        let mut buf = Vec::new();
        for line in [&b"CONNECT x\n"[..], b"HELLO 5\n", &[b'A'; 64]] {
            let mut c = UnixStream::connect(&uds).expect("connect");
            c.write_all(line).expect("w");
            assert!(next(&mut m, &mut buf).is_none());
            c.set_read_timeout(Some(std::time::Duration::from_secs(2)))
                .expect("t");
            let mut b = [0u8; 1];
            match c.read(&mut b) {
                Ok(n) => assert_eq!(n, 0, "closed"),
                Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset),
            }
        }
    }
}

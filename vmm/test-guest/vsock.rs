//! virtio-vsock exercise: accepts host-initiated connections, opens one to the host port given
//! by `husk.vsock_connect=`, sends a greeting on it, and echoes every byte received on every
//! connection back without copying it: the RX buffers are re-posted only after the TX chain
//! that references them completes. Echo chains gather up to 16 RX payloads (up to 64 KiB,
//! 17-18 descriptors, the header split over two descriptors on every other chain).

use crate::virtio::{F_NEXT, F_WRITE, Mmio, QSIZE, Vq};
use crate::{VSOCK_EVT, VSOCK_RXBUF, VSOCK_TXHDR, param, parse_num, put_dec, puts, rd16, rd32, rd64, wr16, wr32, wr64};

const NBUF: usize = 64;
const PAYLOAD: u32 = 4096;
const BUF_ALLOC: u32 = NBUF as u32 * PAYLOAD;
const MAX_GATHER: usize = 16;
const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
const OP_CREDIT_UPDATE: u16 = 6;
const OP_CREDIT_REQUEST: u16 = 7;
const GREETING: &[u8] = b"hello from guest\n";
const GUEST_PORT: u32 = 40000;

#[derive(Clone, Copy)]
struct Conn {
    active: bool,
    local: u32,
    peer: u32,
    fwd_cnt: u32,
    last_fwd: u32,
    tx_cnt: u32,
    peer_alloc: u32,
    peer_fwd: u32,
    echoed: u64,
    fifo: [u8; NBUF],
    head: usize,
    len: usize,
}

const NO_CONN: Conn = Conn {
    active: false,
    local: 0,
    peer: 0,
    fwd_cnt: 0,
    last_fwd: 0,
    tx_cnt: 0,
    peer_alloc: 0,
    peer_fwd: 0,
    echoed: 0,
    fifo: [0; NBUF],
    head: 0,
    len: 0,
};

struct Dev {
    cid: u64,
    rx: Vq,
    tx: Vq,
    conns: [Conn; 4],
    rx_len: [u32; NBUF],
    tx_conn: [u8; QSIZE as usize],
    tx_nb: [u8; QSIZE as usize],
    tx_bufs: [[u8; MAX_GATHER]; QSIZE as usize],
    tx_bytes: [u32; QSIZE as usize],
    chains: u32,
    closed: u32,
    max_chain: u32,
    /// After a hostile flood: packets for connections the guest forgot are dropped silently.
    quiet: bool,
}

fn buf_addr(b: usize) -> u64 {
    VSOCK_RXBUF + b as u64 * 0x2000
}

impl Dev {
    fn post_rx(&mut self, b: usize) {
        let d = (2 * b) as u16;
        let a = buf_addr(b);
        if b % 2 == 0 {
            self.rx.set_desc(d, a, 44, F_NEXT | F_WRITE, d + 1);
            self.rx.set_desc(d + 1, a + 44, PAYLOAD, F_WRITE, 0);
        } else {
            self.rx.set_desc(d, a, 44 + PAYLOAD, F_WRITE, 0);
        }
        self.rx.push(d);
    }

    fn write_hdr(&self, at: u64, c: usize, len: u32, op: u16, flags: u32) {
        let k = &self.conns[c];
        wr64(at, self.cid);
        wr64(at + 8, 2);
        wr32(at + 16, k.local);
        wr32(at + 20, k.peer);
        wr32(at + 24, len);
        wr16(at + 28, 1);
        wr16(at + 30, op);
        wr32(at + 32, flags);
        wr32(at + 36, BUF_ALLOC);
        wr32(at + 40, k.fwd_cnt);
    }

    fn reclaim_tx(&mut self) {
        let mut reposted = false;
        while let Some((head, _)) = self.tx.pop_used() {
            let h = head as usize;
            let c = self.tx_conn[h] as usize;
            for i in 0..self.tx_nb[h] as usize {
                let b = self.tx_bufs[h][i] as usize;
                self.post_rx(b);
                reposted = true;
            }
            self.conns[c].fwd_cnt = self.conns[c].fwd_cnt.wrapping_add(self.tx_bytes[h]);
            self.tx_nb[h] = 0;
            self.tx_bytes[h] = 0;
            self.tx.free_chain(head);
        }
        if reposted {
            self.rx.notify();
        }
    }

    /// Sends a header-only packet, or one with `payload` (guest address, length).
    fn send(&mut self, c: usize, op: u16, flags: u32, payload: Option<(u64, u32)>) {
        while self.tx.nfree < 2 {
            self.reclaim_tx();
        }
        let head = self.tx.alloc();
        let at = VSOCK_TXHDR + head as u64 * 64;
        let len = payload.map_or(0, |p| p.1);
        self.write_hdr(at, c, len, op, flags);
        self.conns[c].last_fwd = self.conns[c].fwd_cnt;
        match payload {
            Some((addr, n)) => {
                let d = self.tx.alloc();
                self.tx.set_desc(head, at, 44, F_NEXT, d);
                self.tx.set_desc(d, addr, n, 0, 0);
                self.conns[c].tx_cnt = self.conns[c].tx_cnt.wrapping_add(n);
            }
            None => self.tx.set_desc(head, at, 44, 0, 0),
        }
        self.tx_conn[head as usize] = c as u8;
        self.tx_nb[head as usize] = 0;
        self.tx_bytes[head as usize] = 0;
        self.tx.push(head);
        self.tx.notify();
    }

    /// Echoes queued RX payloads of connection `c` within the peer's credit.
    fn flush_echo(&mut self, c: usize) {
        loop {
            let k = self.conns[c];
            if k.len == 0 {
                return;
            }
            let credit = k.peer_alloc.wrapping_sub(k.tx_cnt.wrapping_sub(k.peer_fwd));
            let mut n = 0;
            let mut total = 0u32;
            while n < k.len && n < MAX_GATHER && self.tx.nfree >= n + 4 {
                let b = k.fifo[(k.head + n) % NBUF] as usize;
                if total + self.rx_len[b] > credit {
                    break;
                }
                total += self.rx_len[b];
                n += 1;
            }
            if n == 0 {
                if self.tx.nfree < 4 {
                    self.reclaim_tx();
                    continue;
                }
                return; // wait for a credit update
            }
            if total > self.max_chain {
                self.max_chain = total;
            }
            let head = self.tx.alloc();
            let at = VSOCK_TXHDR + head as u64 * 64;
            self.write_hdr(at, c, total, OP_RW, 0);
            let split = self.chains % 2 == 1;
            self.chains += 1;
            let mut prev = head;
            if split {
                let d = self.tx.alloc();
                self.tx.set_desc(head, at, 16, F_NEXT, d);
                self.tx.set_desc(d, at + 16, 28, F_NEXT, 0);
                prev = d;
            } else {
                self.tx.set_desc(head, at, 44, F_NEXT, 0);
            }
            for i in 0..n {
                let b = self.conns[c].fifo[(k.head + i) % NBUF] as usize;
                let d = self.tx.alloc();
                // Link the previous descriptor to this one.
                let p = self.tx.desc + prev as u64 * 16;
                wr16(p + 14, d);
                let last = i + 1 == n;
                self.tx.set_desc(d, buf_addr(b) + 44, self.rx_len[b], if last { 0 } else { F_NEXT }, 0);
                self.tx_bufs[head as usize][i] = b as u8;
                prev = d;
            }
            let kc = &mut self.conns[c];
            kc.head = (k.head + n) % NBUF;
            kc.len -= n;
            kc.tx_cnt = kc.tx_cnt.wrapping_add(total);
            kc.echoed += total as u64;
            kc.last_fwd = kc.fwd_cnt;
            self.tx_conn[head as usize] = c as u8;
            self.tx_nb[head as usize] = n as u8;
            self.tx_bytes[head as usize] = total;
            self.tx.push(head);
            self.tx.notify();
        }
    }

    /// Hostile mode: `n` packets the host must survive, sent before a single RX buffer is
    /// posted (every reply the device owes stays queued on its side): connection requests
    /// to unbound ports and to a host service whose backlog is full (`_5003`), RSTs and
    /// credit requests for connections that do not exist, headers with a foreign type, a
    /// spoofed source CID, a length far past the chain, chains too short for a header, an
    /// unknown op, requests to a host service that accepts (`_5002`: many connections), and
    /// data on one connection (`_5001`, a peer that never reads) far past the credit the
    /// host gave. Notifies when the ring is full; waits for every chain to come back.
    fn flood(&mut self, n: u32) {
        puts("vsock: hostile start\n");
        let payload = buf_addr(0);
        for i in 0..n {
            if self.tx.nfree < 2 {
                self.tx.notify();
                while self.tx.nfree < 2 {
                    while let Some((h, _)) = self.tx.pop_used() {
                        self.tx.free_chain(h);
                    }
                }
            }
            let head = self.tx.alloc();
            let at = VSOCK_TXHDR + head as u64 * 64;
            let (mut cid, mut ty, mut len, mut hdr_len) = (self.cid, 1u16, 0u32, 44u32);
            let (src, dst, op) = match i % 10 {
                // The data connection first: the data packets below all go on it.
                0 if i == 0 => (GUEST_PORT + 1, 5001, OP_REQUEST),
                0 => (100_000 + i, 7000 + i % 1000, OP_REQUEST),
                1 => (200_000 + i, 9, OP_RST),
                2 => {
                    ty = 2;
                    (300_000 + i, 5002, OP_REQUEST)
                }
                3 => {
                    len = 0x7fff_ffff;
                    (400_000 + i, 5001, OP_RW)
                }
                4 => {
                    cid = 7;
                    (500_000 + i, 5002, OP_REQUEST)
                }
                5 => (600_000 + i, 5002, OP_REQUEST),
                6 | 7 => {
                    len = PAYLOAD;
                    (GUEST_PORT + 1, 5001, OP_RW)
                }
                8 => {
                    hdr_len = 20;
                    (700_000 + i, 5003, OP_REQUEST)
                }
                _ => (800_000 + i, 5003, if i % 20 == 9 { OP_REQUEST } else { 99 }),
            };
            wr64(at, cid);
            wr64(at + 8, 2);
            wr32(at + 16, src);
            wr32(at + 20, dst);
            wr32(at + 24, len);
            wr16(at + 28, ty);
            wr16(at + 30, op);
            wr32(at + 32, 0);
            wr32(at + 36, BUF_ALLOC);
            wr32(at + 40, 0);
            if i % 10 == 6 || i % 10 == 7 {
                let d = self.tx.alloc();
                self.tx.set_desc(head, at, hdr_len, F_NEXT, d);
                self.tx.set_desc(d, payload, len, 0, 0);
            } else {
                self.tx.set_desc(head, at, hdr_len, 0, 0);
            }
            self.tx.push(head);
        }
        self.tx.notify();
        while self.tx.nfree < QSIZE as usize {
            while let Some((h, _)) = self.tx.pop_used() {
                self.tx.free_chain(h);
            }
            core::hint::spin_loop();
        }
        puts("vsock: hostile done packets=");
        put_dec(n as u64);
        puts("\n");
    }

    fn find(&self, local: u32, peer: u32) -> Option<usize> {
        (0..self.conns.len()).find(|&i| self.conns[i].active && self.conns[i].local == local && self.conns[i].peer == peer)
    }

    fn close(&mut self, c: usize, why: &str) {
        puts("vsock: port ");
        put_dec(self.conns[c].local as u64);
        puts(why);
        puts(" echoed=");
        put_dec(self.conns[c].echoed);
        puts(" max_tx_payload=");
        put_dec(self.max_chain as u64);
        puts("\n");
        self.conns[c].active = false;
        self.closed += 1;
    }

    /// Handles one received packet in buffer `b`; returns true if the buffer was kept.
    fn on_rx(&mut self, b: usize) -> bool {
        let h = buf_addr(b);
        let (src_cid, dst_cid) = (rd64(h), rd64(h + 8));
        let (src_port, dst_port, len) = (rd32(h + 16), rd32(h + 20), rd32(h + 24));
        let op = rd16(h + 30);
        if src_cid != 2 || dst_cid != self.cid || rd16(h + 28) != 1 {
            if self.quiet {
                return false;
            }
            puts("vsock: misaddressed packet\n");
            return false;
        }
        let found = self.find(dst_port, src_port);
        if let Some(c) = found {
            self.conns[c].peer_alloc = rd32(h + 36);
            self.conns[c].peer_fwd = rd32(h + 40);
        }
        match (op, found) {
            (OP_REQUEST, None) => {
                let Some(c) = (0..self.conns.len()).find(|&i| !self.conns[i].active) else { return false };
                self.conns[c] = NO_CONN;
                let k = &mut self.conns[c];
                (k.active, k.local, k.peer, k.peer_alloc, k.peer_fwd) = (true, dst_port, src_port, rd32(h + 36), rd32(h + 40));
                puts("vsock: accepted host connection on port ");
                put_dec(dst_port as u64);
                puts("\n");
                self.send(c, OP_RESPONSE, 0, None);
            }
            (OP_RESPONSE, Some(c)) => {
                puts("vsock: connected to host port ");
                put_dec(src_port as u64);
                puts("\n");
                self.send(c, OP_RW, 0, Some((GREETING.as_ptr() as u64, GREETING.len() as u32)));
            }
            (OP_RW, Some(c)) if len > 0 && len <= PAYLOAD => {
                self.rx_len[b] = len;
                let k = &mut self.conns[c];
                k.fifo[(k.head + k.len) % NBUF] = b as u8;
                k.len += 1;
                return true;
            }
            (OP_CREDIT_REQUEST, Some(c)) => self.send(c, OP_CREDIT_UPDATE, 0, None),
            (OP_SHUTDOWN, Some(c)) => {
                self.send(c, OP_RST, 0, None);
                self.close(c, " closed by host");
            }
            (OP_RST, Some(c)) => self.close(c, " reset by host"),
            (OP_CREDIT_UPDATE, Some(_)) | (OP_RW, Some(_)) => {}
            _ if self.quiet => {}
            _ => {
                puts("vsock: unexpected op ");
                put_dec(op as u64);
                puts("\n");
            }
        }
        false
    }
}

pub fn run(base: u64, area: u64, cmd: &'static [u8]) {
    let m = Mmio(base);
    m.init(0);
    let rx = Vq::new(&m, 0, area);
    let tx = Vq::new(&m, 1, area + 0x4000);
    let mut ev = Vq::new(&m, 2, area + 0x8000);
    let mut d = Dev {
        cid: crate::rd64(base + 0x100),
        rx,
        tx,
        conns: [NO_CONN; 4],
        rx_len: [0; NBUF],
        tx_conn: [0; QSIZE as usize],
        tx_nb: [0; QSIZE as usize],
        tx_bufs: [[0; MAX_GATHER]; QSIZE as usize],
        tx_bytes: [0; QSIZE as usize],
        chains: 0,
        closed: 0,
        max_chain: 0,
        quiet: false,
    };
    m.driver_ok();
    if let Some(n) = param(cmd, b"husk.vsock_hostile") {
        d.flood(parse_num(n) as u32);
        d.quiet = true;
    }
    for b in 0..NBUF {
        d.post_rx(b);
    }
    for i in 0..4u16 {
        let e = ev.alloc();
        ev.set_desc(e, VSOCK_EVT + i as u64 * 8, 8, F_WRITE, 0);
        ev.push(e);
    }
    d.rx.notify();
    ev.notify();
    let expect = param(cmd, b"husk.vsock_conns").map_or(2, parse_num) as u32;
    puts("vsock: cid=");
    put_dec(d.cid);
    puts(" ready\n");
    if let Some(p) = param(cmd, b"husk.vsock_connect") {
        d.conns[0] = NO_CONN;
        let k = &mut d.conns[0];
        (k.active, k.local, k.peer) = (true, GUEST_PORT, parse_num(p) as u32);
        d.send(0, OP_REQUEST, 0, None);
    }
    while d.closed < expect {
        while let Some((head, _len)) = d.rx.pop_used() {
            let b = head as usize / 2;
            if !d.on_rx(b) {
                d.post_rx(b);
                d.rx.notify();
            }
        }
        d.reclaim_tx();
        for c in 0..d.conns.len() {
            if d.conns[c].active {
                d.flush_echo(c);
                let k = d.conns[c];
                if k.len == 0 && k.fwd_cnt != k.last_fwd {
                    d.send(c, OP_CREDIT_UPDATE, 0, None);
                }
            }
        }
        core::hint::spin_loop();
    }
    puts("vsock: done\n");
}

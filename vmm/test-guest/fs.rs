//! virtio-fs exercise with raw FUSE requests: INIT, LOOKUP + OPEN + READ of a host file,
//! CREATE + WRITE of a new one, and a LOOKUP of `..` and a malformed LOOKUP that must fail.

use crate::virtio::{F_NEXT, F_WRITE, Mmio, Vq};
use crate::{FS_AREA, put_dec, putb, puts, rd32, rd64, wr8, wr16, wr32, wr64};

const REQ: u64 = FS_AREA;
const REPLY: u64 = FS_AREA + 0x1000;
const REPLY_LEN: u32 = 0x1000;
const LOOKUP: u32 = 1;
const OPEN: u32 = 14;
const READ: u32 = 15;
const WRITE: u32 = 16;
const INIT: u32 = 26;
const CREATE: u32 = 35;

/// Writes a request header for `body_len` body bytes (already at REQ + 40).
fn header(op: u32, unique: u64, node: u64, body_len: u32) -> u32 {
    let len = 40 + body_len;
    wr32(REQ, len);
    wr32(REQ + 4, op);
    wr64(REQ + 8, unique);
    wr64(REQ + 16, node);
    wr32(REQ + 24, 0);
    wr32(REQ + 28, 0);
    wr32(REQ + 32, 1);
    wr32(REQ + 36, 0);
    len
}

fn put_bytes(at: u64, s: &[u8]) {
    let mut i = 0;
    while i < s.len() {
        wr8(at + i as u64, s[i]);
        i += 1;
    }
}

/// Sends one request; returns (errno, reply length).
fn call(q: &mut Vq, len: u32) -> (u32, u32) {
    wr32(REPLY + 4, 0xdead);
    let (a, b) = (q.alloc(), q.alloc());
    q.set_desc(a, REQ, len, F_NEXT, b);
    q.set_desc(b, REPLY, REPLY_LEN, F_WRITE, 0);
    q.push(a);
    q.notify();
    let (head, used) = q.wait_used();
    q.free_chain(head);
    let err = rd32(REPLY + 4) as i32;
    ((-err) as u32, used)
}

fn report(what: &str, errno: u32) {
    puts("fs: ");
    puts(what);
    puts(" errno=");
    put_dec(errno as u64);
}

fn lookup(q: &mut Vq, unique: u64, name: &[u8]) -> (u32, u64, u64) {
    put_bytes(REQ + 40, name);
    let len = header(LOOKUP, unique, 1, name.len() as u32);
    let (e, _) = call(q, len);
    (e, rd64(REPLY + 16), rd64(REPLY + 16 + 40 + 8))
}

pub fn run(base: u64, area: u64) {
    let m = Mmio(base);
    m.init(0);
    let _hiprio = Vq::new(&m, 0, area);
    let mut q = Vq::new(&m, 1, area + 0x2000);
    m.driver_ok();
    let mut tag = [0u8; 36];
    let mut n = 0;
    while n < 36 {
        tag[n] = crate::rd8(base + 0x100 + n as u64);
        if tag[n] == 0 {
            break;
        }
        n += 1;
    }
    puts("fs: tag=");
    putb(&tag[..n]);
    puts(" queues=");
    put_dec(rd32(base + 0x100 + 36) as u64);
    puts("\n");

    // INIT 7.31, flags none.
    wr32(REQ + 40, 7);
    wr32(REQ + 44, 31);
    wr32(REQ + 48, 0x20000);
    let mut i = 52;
    while i < 104 {
        wr32(REQ + i, 0);
        i += 4;
    }
    let len = header(INIT, 1, 0, 64);
    let (e, used) = call(&mut q, len);
    report("init", e);
    puts(" major=");
    put_dec(rd32(REPLY + 16) as u64);
    puts(" len=");
    put_dec(used as u64);
    puts("\n");

    let (e, node, size) = lookup(&mut q, 2, b"hello.txt\0");
    report("lookup", e);
    puts(" size=");
    put_dec(size);
    puts("\n");

    wr32(REQ + 40, 0);
    wr32(REQ + 44, 0);
    let len = header(OPEN, 3, node, 8);
    let (e, _) = call(&mut q, len);
    let fh = rd64(REPLY + 16);
    report("open", e);
    puts("\n");

    wr64(REQ + 40, fh);
    wr64(REQ + 48, 0);
    wr32(REQ + 56, 64);
    wr32(REQ + 60, 0);
    wr64(REQ + 64, 0);
    wr32(REQ + 72, 0);
    wr32(REQ + 76, 0);
    let len = header(READ, 4, node, 40);
    let (e, used) = call(&mut q, len);
    report("read", e);
    puts(" data=");
    let data = unsafe { core::slice::from_raw_parts((REPLY + 16) as *const u8, (used as usize).saturating_sub(16)) };
    putb(data);
    puts("\n");

    // CREATE fromguest (O_WRONLY | O_CREAT, 0644), then WRITE.
    wr32(REQ + 40, 0x41);
    wr32(REQ + 44, 0o100644);
    wr32(REQ + 48, 0);
    wr32(REQ + 52, 0);
    put_bytes(REQ + 56, b"fromguest\0");
    let len = header(CREATE, 5, 1, 16 + 10);
    let (e, _) = call(&mut q, len);
    let fh = rd64(REPLY + 16 + 128);
    let new_node = rd64(REPLY + 16);
    report("create", e);
    puts("\n");
    let msg = b"written by the test guest\n";
    wr64(REQ + 40, fh);
    wr64(REQ + 48, 0);
    wr32(REQ + 56, msg.len() as u32);
    wr32(REQ + 60, 0);
    wr64(REQ + 64, 0);
    wr32(REQ + 72, 0);
    wr32(REQ + 76, 0);
    put_bytes(REQ + 80, msg);
    let len = header(WRITE, 6, new_node, 40 + msg.len() as u32);
    let (e, _) = call(&mut q, len);
    report("write", e);
    puts(" size=");
    put_dec(rd32(REPLY + 16) as u64);
    puts("\n");

    let (e, _, _) = lookup(&mut q, 7, b"..\0");
    report("escape", e);
    puts("\n");
    // A name without its NUL.
    wr16(REQ + 40, 0x6161);
    let len = header(LOOKUP, 8, 1, 2);
    let (e, _) = call(&mut q, len);
    report("malformed", e);
    puts("\n");
}

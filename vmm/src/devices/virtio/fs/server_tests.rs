//! Raw FUSE requests through the dispatcher, as the guest kernel sends them.

use super::*;
use crate::devices::virtio::fs::abi::{IN_HEADER_LEN, OUT_HEADER_LEN, Writer};
use proptest::prelude::*;

fn req(opcode: u32, unique: u64, nodeid: u64, body: &[u8]) -> Vec<u8> {
    let mut w = Writer::default();
    w.u32((IN_HEADER_LEN + body.len()) as u32)
        .u32(opcode)
        .u64(unique)
        .u64(nodeid)
        .u32(0)
        .u32(0)
        .u32(1)
        .u16(0)
        .u16(0);
    w.bytes(body);
    w.buf
}

fn out(r: &[u8]) -> (u32, i32, u64, &[u8]) {
    let len = u32::from_le_bytes(r[0..4].try_into().expect("len"));
    let err = i32::from_le_bytes(r[4..8].try_into().expect("err"));
    let unique = u64::from_le_bytes(r[8..16].try_into().expect("unique"));
    assert_eq!(len as usize, r.len());
    (len, err, unique, &r[OUT_HEADER_LEN..])
}

fn server() -> (tempfile::TempDir, Server) {
    let d = tempfile::tempdir().expect("tmp");
    let s = Server::new(PassthroughFs::new(d.path()).expect("fs"));
    (d, s)
}

#[test]
fn init_lookup_open_read_write() {
    let (d, s) = server();
    std::fs::write(d.path().join("hello"), b"hi there").expect("write");
    let mut w = Writer::default();
    w.u32(7).u32(41).u32(65536).u32(0xffff_ffff).zeros(48);
    let r = s.handle(&req(op::INIT, 1, 0, &w.buf), 4096).expect("reply");
    let (_, err, unique, body) = out(&r);
    assert_eq!((err, unique, body.len()), (0, 1, abi::INIT_OUT_LEN));
    assert_eq!(u32::from_le_bytes(body[0..4].try_into().expect("x")), 7);
    assert_eq!(
        u32::from_le_bytes(body[20..24].try_into().expect("x")),
        MAX_WRITE
    );
    let granted = u32::from_le_bytes(body[12..16].try_into().expect("x"));
    assert_ne!(
        granted & abi::init::DO_READDIRPLUS,
        0,
        "READDIRPLUS granted: {granted:#x}"
    );
    assert_eq!(
        granted & (1 << 16),
        0,
        "no writeback cache (host changes must show)"
    );

    let r = s
        .handle(&req(op::LOOKUP, 2, 1, b"hello\0"), 4096)
        .expect("reply");
    let (_, err, _, body) = out(&r);
    assert_eq!((err, body.len()), (0, abi::ENTRY_OUT_LEN));
    let node = u64::from_le_bytes(body[0..8].try_into().expect("x"));
    let size = u64::from_le_bytes(body[48..56].try_into().expect("x"));
    assert_eq!(size, 8);

    let r = s
        .handle(&req(op::OPEN, 3, node, &[2, 0, 0, 0, 0, 0, 0, 0]), 4096)
        .expect("reply");
    let (_, err, _, body) = out(&r);
    assert_eq!(err, 0);
    let fh = u64::from_le_bytes(body[0..8].try_into().expect("x"));

    let mut w = Writer::default();
    w.u64(fh)
        .u64(3)
        .u32(3)
        .u32(0)
        .u64(0)
        .u32(0)
        .u32(0)
        .bytes(b"ere");
    let r = s
        .handle(&req(op::WRITE, 4, node, &w.buf), 4096)
        .expect("reply");
    let (_, err, _, body) = out(&r);
    assert_eq!(
        (err, u32::from_le_bytes(body[0..4].try_into().expect("x"))),
        (0, 3)
    );
    let mut w = Writer::default();
    w.u64(fh).u64(0).u32(100).u32(0).u64(0).u32(0).u32(0);
    let r = s
        .handle(&req(op::READ, 5, node, &w.buf), 4096)
        .expect("reply");
    assert_eq!(out(&r).3, b"hi erere");
    // The reply is bounded by the room the guest gave.
    let r = s
        .handle(&req(op::READ, 6, node, &w.buf), OUT_HEADER_LEN + 4)
        .expect("reply");
    assert_eq!(out(&r).3, b"hi e");

    // Escapes and unknown operations.
    let r = s
        .handle(&req(op::LOOKUP, 7, 1, b"..\0"), 4096)
        .expect("reply");
    assert_eq!(out(&r).1, -libc::EPERM);
    let r = s
        .handle(&req(op::LOOKUP, 8, 1, b"no-nul"), 4096)
        .expect("reply");
    assert_eq!(out(&r).1, -libc::EINVAL);
    let r = s.handle(&req(9999, 9, 1, b""), 4096).expect("reply");
    assert_eq!(out(&r).1, -libc::ENOSYS);
    // WRITE claiming more data than it carries.
    let mut w = Writer::default();
    w.u64(fh)
        .u64(0)
        .u32(1000)
        .u32(0)
        .u64(0)
        .u32(0)
        .u32(0)
        .bytes(b"xy");
    let r = s
        .handle(&req(op::WRITE, 10, node, &w.buf), 4096)
        .expect("reply");
    assert_eq!(out(&r).1, -libc::EINVAL);
    // FORGET has no reply.
    assert!(
        s.handle(&req(op::FORGET, 11, node, &1u64.to_le_bytes()), 4096)
            .is_none()
    );
}

proptest! {
    /// Any request body for any opcode: a reply with the request's unique id (or none for the
    /// no-reply opcodes), never a panic, never a reply larger than the room.
    #[test]
    fn random_requests_never_panic(opcode in 0u32..60, nodeid in 0u64..4, body in proptest::collection::vec(any::<u8>(), 0..160), room in 0usize..512) {
        let (_d, s) = server();
        let r = s.handle(&req(opcode, 77, nodeid, &body), room);
        if let Some(r) = r {
            prop_assert!(r.len() <= room.max(OUT_HEADER_LEN));
            prop_assert_eq!(u64::from_le_bytes(r[8..16].try_into().expect("x")), 77);
        }
    }

    /// Garbage instead of a header.
    #[test]
    fn garbage_never_panics(buf in proptest::collection::vec(any::<u8>(), 0..100)) {
        let (_d, s) = server();
        let _ = s.handle(&buf, 4096);
    }
}

//! virtio-vsock end to end: the test guest echoes on a guest-initiated connection (to
//! `<uds>_5000`) and a host-initiated one (`CONNECT 1234` on `<uds>`), with transfers large
//! enough to need credit updates and multi-descriptor TX chains of up to 64 KiB.

mod common;
use common::*;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

fn pattern(n: usize, seed: u32) -> Vec<u8> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// Writes `data` from one thread while reading the echo on this one; returns what came back.
fn echo_roundtrip(stream: UnixStream, data: Vec<u8>) -> Vec<u8> {
    let mut w = stream.try_clone().expect("clone");
    let n = data.len();
    let writer = std::thread::spawn(move || {
        for chunk in data.chunks(100_000) {
            w.write_all(chunk).expect("write to guest");
        }
    });
    let mut r = stream;
    r.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    let mut got = vec![0u8; n];
    r.read_exact(&mut got).expect("read echo");
    writer.join().expect("writer");
    got
}

fn read_line_bytewise(s: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        s.read_exact(&mut b).expect("read line");
        if b[0] == b'\n' {
            return String::from_utf8(line).expect("utf8");
        }
        line.push(b[0]);
    }
}

#[test]
fn hybrid_vsock_echo_both_directions() {
    if !kvm_usable() {
        return;
    }
    let dir = tempdir();
    let uds = tmp_path(&dir, "v.sock");
    let guest_listener =
        UnixListener::bind(format!("{}_5000", uds.display())).expect("bind uds_5000");
    let vsock_arg = format!("cid=3,uds={}", uds.display());
    let mut vm = Vm::spawn(&args(
        GUEST_PVH,
        "husk.vsock_connect=5000 husk.vsock_conns=2",
        &["--vsock", &vsock_arg],
    ));
    vm.expect_line("vsock: cid=3 ready");

    // Guest-initiated: greeting, then 300 KiB echoed (more than the 256 KiB credit window).
    let guest_side = std::thread::spawn(move || {
        let (mut s, _) = guest_listener.accept().expect("guest connects to uds_5000");
        s.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        let mut greet = [0u8; 17];
        s.read_exact(&mut greet).expect("greeting");
        assert_eq!(&greet, b"hello from guest\n");
        let data = pattern(300 * 1024, 7);
        let got = echo_roundtrip(s, data.clone());
        assert!(got == data, "guest-initiated echo mismatch");
    });

    // Host-initiated: CONNECT / OK handshake, then 1 MiB echoed.
    let mut s = UnixStream::connect(&uds).expect("connect uds");
    s.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    s.write_all(b"CONNECT 1234\n").expect("connect line");
    let ok = read_line_bytewise(&mut s);
    let port: u32 = ok
        .strip_prefix("OK ")
        .expect("OK reply")
        .parse()
        .expect("port");
    assert!(port >= 1 << 30, "host-side port {port}");
    let data = pattern(1 << 20, 99);
    let got = echo_roundtrip(s, data.clone());
    assert!(got == data, "host-initiated echo mismatch");

    guest_side.join().expect("guest-initiated side");
    // Both connections closed by the host; the guest reports what it echoed on each.
    let mut closed = vec![
        vm.expect_line("closed by host"),
        vm.expect_line("closed by host"),
    ];
    closed.sort();
    assert!(
        closed[0].contains("port 1234 closed by host echoed=1048576"),
        "{closed:?}"
    );
    assert!(
        closed[1].contains("port 40000 closed by host echoed=307200"),
        "{closed:?}"
    );
    let max_tx: u32 = closed[0]
        .rsplit("max_tx_payload=")
        .next()
        .and_then(|v| v.parse().ok())
        .expect("max");
    assert!(
        max_tx > 32 * 1024,
        "guest sent multi-descriptor TX packets over 32 KiB: {max_tx}"
    );
    vm.expect_line("HUSK_GUEST_DONE");
    let (code, err) = vm.wait();
    assert_eq!(code, 0, "stderr: {err}");
}

#[test]
fn connect_to_unknown_guest_port_is_refused() {
    if !kvm_usable() {
        return;
    }
    let dir = tempdir();
    let uds = tmp_path(&dir, "v.sock");
    let vsock_arg = format!("cid=3,uds={}", uds.display());
    // The guest accepts any port, so ask for a malformed CONNECT: the muxer closes the socket.
    let mut vm = Vm::spawn(&args(
        GUEST_PVH,
        "husk.vsock_conns=1",
        &["--vsock", &vsock_arg],
    ));
    vm.expect_line("vsock: cid=3 ready");
    let mut bad = UnixStream::connect(&uds).expect("connect");
    bad.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    bad.write_all(b"CONNECT notaport\n").expect("write");
    let mut b = [0u8; 1];
    assert_eq!(bad.read(&mut b).expect("eof, not a hang"), 0);
    // A good one still works afterwards, and a plain close ends it.
    let mut s = UnixStream::connect(&uds).expect("connect");
    s.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    s.write_all(b"CONNECT 77\n").expect("write");
    assert!(read_line_bytewise(&mut s).starts_with("OK "));
    s.write_all(b"ping").expect("w");
    let mut echo = [0u8; 4];
    s.read_exact(&mut echo).expect("echo");
    assert_eq!(&echo, b"ping");
    drop(s);
    vm.expect_line("port 77 closed by host echoed=4");
    assert_eq!(vm.wait().0, 0);
    assert!(!uds.exists(), "vsock socket removed at exit");
}

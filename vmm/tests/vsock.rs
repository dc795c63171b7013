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

/// A non-blocking connect (for filling a listener's backlog without waiting).
fn connect_nonblocking(path: &std::path::Path) -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: sockaddr_un is plain old data.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(path.as_os_str().as_bytes()) {
        *d = *s as libc::c_char;
    }
    // SAFETY: socket(2) with constants; connect(2) with a valid sockaddr_un.
    unsafe {
        let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0);
        assert!(fd >= 0);
        let fd = std::os::fd::OwnedFd::from_raw_fd(fd);
        let r = libc::connect(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            (&addr as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        );
        (r == 0).then_some(fd)
    }
}

fn vm_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// A hostile guest floods the vsock device from inside a real VM before posting a single RX
/// buffer (test-guest `husk.vsock_hostile`): requests to unbound ports, to a service with a
/// full backlog and to one that accepts (many connections), RSTs and unknown ops for
/// connections that do not exist, garbage headers, and data far past its credit on a
/// connection whose peer never reads. husk-vmm's memory stays bounded, its control socket
/// keeps answering during the flood, the connections stay within `MAX_CONNECTIONS`, and a
/// well-behaved host connection is served afterwards.
#[test]
fn hostile_guest_vsock_flood_stays_bounded_and_the_device_keeps_serving() {
    if !kvm_usable() {
        return;
    }
    use std::io::{BufRead, BufReader};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    const PACKETS: u32 = 300_000;
    const MAX_CONNECTIONS: usize = 256;
    let dir = tempdir();
    let uds = tmp_path(&dir, "v.sock");
    let ctl = tmp_path(&dir, "ctl.sock");
    // _5001: accepts, never reads. _5002: accepts every connection and holds it.
    // _5003: its backlog is full (nobody accepts).
    let never_reads = UnixListener::bind(format!("{}_5001", uds.display())).expect("bind");
    let accepts = UnixListener::bind(format!("{}_5002", uds.display())).expect("bind");
    let full_path = std::path::PathBuf::from(format!("{}_5003", uds.display()));
    let full = UnixListener::bind(&full_path).expect("bind");
    // SAFETY: listen(2) again on our listener: the backlog shrinks to its minimum.
    let rc = unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&full), 0) };
    assert_eq!(rc, 0);
    let mut backlog = Vec::new();
    while let Some(fd) = connect_nonblocking(&full_path) {
        backlog.push(fd);
        assert!(backlog.len() < 1000, "backlog never filled");
    }
    let done = Arc::new(AtomicBool::new(false));
    let accepted = Arc::new(AtomicUsize::new(0));
    let holder = {
        let (done, accepted) = (done.clone(), accepted.clone());
        std::thread::spawn(move || {
            let mut held = Vec::new();
            never_reads.set_nonblocking(true).expect("nb");
            accepts.set_nonblocking(true).expect("nb");
            while !done.load(Ordering::Relaxed) {
                let mut idle = true;
                if let Ok((s, _)) = never_reads.accept() {
                    held.push(s);
                    idle = false;
                }
                // Connections to _5002 are never closed by either side during the flood:
                // every one counts against MAX_CONNECTIONS.
                if let Ok((s, _)) = accepts.accept() {
                    held.push(s);
                    accepted.fetch_add(1, Ordering::Relaxed);
                    idle = false;
                }
                if idle {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            held
        })
    };
    let vsock_arg = format!("cid=3,uds={}", uds.display());
    let mut vm = Vm::spawn(&args(
        GUEST_PVH,
        &format!("husk.vsock_hostile={PACKETS} husk.vsock_conns=1"),
        &["--vsock", &vsock_arg, "--control-socket", &path_str(&ctl)],
    ));
    let pid = vm.child.id();
    vm.expect_line("vsock: hostile start");
    let rss0 = vm_rss_kib(pid);
    // Sample husk-vmm's RSS and the control socket's answer time until the flood is over.
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (sampling, ctl) = (sampling.clone(), ctl.clone());
        std::thread::spawn(move || {
            let (mut max_rss, mut max_status, mut n) = (0u64, Duration::ZERO, 0u32);
            while sampling.load(Ordering::Relaxed) {
                max_rss = max_rss.max(vm_rss_kib(pid));
                let t = std::time::Instant::now();
                let mut s = UnixStream::connect(&ctl).expect("control socket");
                s.set_read_timeout(Some(TIMEOUT)).expect("timeout");
                s.write_all(b"status\n").expect("w");
                let mut line = String::new();
                BufReader::new(s)
                    .read_line(&mut line)
                    .expect("status reply");
                assert!(line.starts_with("running"), "{line}");
                max_status = max_status.max(t.elapsed());
                n += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            (max_rss, max_status, n)
        })
    };
    let t = std::time::Instant::now();
    // ≈ 50 s for 300 000 packets on this machine's KVM: every notification is an exit.
    assert!(
        vm.line_within("vsock: hostile done", Duration::from_secs(300))
            .is_some(),
        "flood not over after 300 s: {:?}",
        vm.seen.last()
    );
    let flood = t.elapsed();
    vm.expect_line("vsock: cid=3 ready");
    sampling.store(false, Ordering::Relaxed);
    let (max_rss, max_status, samples) = sampler.join().expect("sampler");
    println!(
        "hostile vsock flood: {PACKETS} packets in {flood:?}; husk-vmm RSS {rss0} KiB at the \
         start, at most {max_rss} KiB; control socket answered {samples} times, slowest {max_status:?}; \
         {} connections to _5002 accepted",
        accepted.load(Ordering::Relaxed)
    );
    assert!(
        // An unbounded reply queue would hold ≈ 45 bytes per refused packet: ≥ 9 MiB here.
        max_rss < rss0 + 4 * 1024,
        "husk-vmm grew from {rss0} KiB to {max_rss} KiB"
    );
    assert!(
        max_status < Duration::from_secs(1),
        "control socket took {max_status:?}"
    );
    assert!(samples >= 2, "the flood was not sampled ({samples})");
    assert!(
        accepted.load(Ordering::Relaxed) <= MAX_CONNECTIONS,
        "{} connections",
        accepted.load(Ordering::Relaxed)
    );

    // A well-behaved host connection is served.
    let mut s = UnixStream::connect(&uds).expect("connect uds");
    s.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    s.write_all(b"CONNECT 1234\n").expect("connect line");
    assert!(read_line_bytewise(&mut s).starts_with("OK "));
    let data = pattern(64 * 1024, 5);
    let got = echo_roundtrip(s, data.clone());
    assert!(got == data, "echo after the flood");
    vm.expect_line("port 1234 closed by host echoed=65536");
    done.store(true, Ordering::Relaxed);
    let held = holder.join().expect("holder");
    drop(held);
    drop(backlog);
    let (code, err) = vm.wait();
    assert_eq!(code, 0, "stderr: {err}");
}

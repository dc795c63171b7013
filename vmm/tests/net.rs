//! virtio-net end to end on a tap inside a network namespace this test creates: the guest's
//! frame is read from the tap with a packet socket, and a reply frame reaches the guest.

mod common;
use common::*;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;

const ETH_P_ALL: u16 = 0x0003;
const MAC: [u8; 6] = [0x06, 0x00, 0xac, 0x10, 0x00, 0x02];

struct Netns(String);
impl Netns {
    fn create(name: &str) -> Option<Netns> {
        let ok = |c: &mut Command| c.status().map(|s| s.success()).unwrap_or(false);
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        if !ok(Command::new("ip").args(["netns", "add", name])) {
            return None;
        }
        let ns = Netns(name.to_string());
        let steps: [&[&str]; 3] = [
            &["ip", "tuntap", "add", "dev", "htap0", "mode", "tap"],
            &["ip", "link", "set", "htap0", "up"],
            &["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"],
        ];
        for s in steps {
            if !ok(Command::new("ip").args(["netns", "exec", name]).args(s)) && s[0] == "ip" {
                return None;
            }
        }
        Some(ns)
    }
}
impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// Opens an AF_PACKET socket bound to `ifname` inside the namespace (on a thread that joined it).
fn packet_socket(ns: &str, ifname: &str) -> OwnedFd {
    let ns_path = format!("/var/run/netns/{ns}");
    let ifname = std::ffi::CString::new(ifname).expect("cstr");
    std::thread::spawn(move || {
        let nsf = std::fs::File::open(&ns_path).expect("open netns");
        // SAFETY: plain syscalls on fds we own; this thread only joins the test's namespace.
        unsafe {
            assert_eq!(libc::setns(nsf.as_raw_fd(), libc::CLONE_NEWNET), 0, "setns");
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, ETH_P_ALL.to_be() as i32);
            assert!(fd >= 0, "packet socket");
            let idx = libc::if_nametoindex(ifname.as_ptr());
            assert!(idx > 0, "tap exists");
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = ETH_P_ALL.to_be();
            sll.sll_ifindex = idx as i32;
            let r = libc::bind(
                fd,
                &sll as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            assert_eq!(r, 0, "bind packet socket");
            let tv = libc::timeval {
                tv_sec: 1,
                tv_usec: 0,
            };
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            );
            OwnedFd::from_raw_fd(fd)
        }
    })
    .join()
    .expect("netns thread")
}

#[test]
fn net_frames_both_ways_through_tap() {
    if !kvm_usable() {
        return;
    }
    if !is_root() {
        println!("skipped: needs root for a network namespace and tap");
        return;
    }
    let name = format!("husk-vmm-net-{}", std::process::id());
    let Some(_ns) = Netns::create(&name) else {
        println!("skipped: cannot create a network namespace with a tap (ip netns/tuntap failed)");
        return;
    };
    let sock = packet_socket(&name, "htap0");
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &name, VMM]).args(args(
        GUEST_PVH,
        "net",
        &["--net", "tap=htap0,mac=06:00:ac:10:00:02"],
    ));
    let mut vm = Vm::spawn_cmd(&mut cmd);
    assert!(
        vm.expect_line("net: mac=")
            .ends_with("mac=06:00:ac:10:00:02")
    );
    vm.expect_line("net: tx done");

    // The guest's broadcast frame, read on the host side of the tap.
    let mut buf = [0u8; 2048];
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "no frame from the guest on the tap"
        );
        // SAFETY: reading into a buffer we own from our socket.
        let n = unsafe {
            libc::recv(
                sock.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                0,
            )
        };
        if n < 14 {
            continue;
        }
        let f = &buf[..n as usize];
        if f[12..14] == [0x88, 0xb5] {
            assert_eq!(&f[6..12], &MAC, "source MAC from config");
            assert_eq!(&f[0..6], &[0xff; 6]);
            assert_eq!(&f[14..27], b"husk-net-ping");
            assert_eq!(n, 60, "frame length as sent");
            break;
        }
    }
    let mut pong = [0u8; 60];
    pong[..6].copy_from_slice(&MAC);
    pong[6..12].copy_from_slice(&[0x06, 0, 0, 0, 0, 0x99]);
    pong[12..14].copy_from_slice(&[0x88, 0xb5]);
    pong[14..27].copy_from_slice(b"husk-net-pong");
    // SAFETY: sending a buffer we own on our socket.
    let n = unsafe {
        libc::send(
            sock.as_raw_fd(),
            pong.as_ptr() as *const libc::c_void,
            pong.len(),
            0,
        )
    };
    assert_eq!(n, 60);
    vm.expect_line("net: rx pong ok");
    vm.expect_line("HUSK_GUEST_DONE");
    assert_eq!(vm.wait().0, 0);
}

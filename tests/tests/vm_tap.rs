#![allow(clippy::unwrap_used)]
//! The VM pod plumbing (`husk_host::network::tap`) with a real VMM: a pod
//! namespace whose `eth0` is a veth into a second (peer) namespace — what a
//! CNI plugin leaves — gets the tap and the tc redirects; husk-vmm runs the
//! bare-metal test guest on the tap with the guest MAC from the plumbing.
//! The guest's frame must come out of the peer end of the veth, and a frame
//! sent to the guest MAC from the peer end must reach the guest. Only
//! namespaces this test creates are touched.

use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use husk_host::network::cni::CniResult;
use husk_host::network::{netns, tap};
use husk_tests::require;

const ETH_P_ALL: u16 = 0x0003;
const TIMEOUT: Duration = Duration::from_secs(60);

/// The test guest husk-vmm's build script made (next to the binaries).
fn test_guest() -> Option<PathBuf> {
    let build = husk_tests::bin_path("husk-vmm").parent()?.join("build");
    std::fs::read_dir(build)
        .ok()?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("husk-vmm-"))
        .map(|e| e.path().join("out/guest-pvh.elf"))
        .filter(|p| p.exists())
        .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok())
}

fn kvm() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

fn run_ok(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An AF_PACKET socket on `ifname` inside the namespace at `ns`.
fn packet_socket(ns: &Path, ifname: &str) -> OwnedFd {
    let ifname = std::ffi::CString::new(ifname).unwrap();
    netns::run_in(ns, move || {
        // SAFETY: plain syscalls on an fd we own and structs we initialise.
        unsafe {
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, ETH_P_ALL.to_be() as i32);
            assert!(fd >= 0, "packet socket");
            let idx = libc::if_nametoindex(ifname.as_ptr());
            assert!(idx > 0, "link exists");
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
    .unwrap()
}

fn parse_mac(s: &str) -> [u8; 6] {
    let v: Vec<u8> = s
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect();
    v.try_into().unwrap()
}

struct Cleanup(Vec<PathBuf>);
impl Drop for Cleanup {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = netns::remove(p);
        }
    }
}

#[test]
fn tap_redirect_carries_guest_frames_both_ways() {
    require!(
        husk_tests::is_root(),
        "needs root for namespaces, veth and tap"
    );
    require!(kvm(), "needs /dev/kvm for husk-vmm");
    let Some(guest) = test_guest() else {
        panic!("husk-vmm's test guest not found: run `cargo build --workspace --bins` first");
    };
    let dir = tempfile::tempdir().unwrap();
    let (pod, peer) = (dir.path().join("pod"), dir.path().join("peer"));
    let _cleanup = Cleanup(vec![pod.clone(), peer.clone()]);
    netns::create(&pod).unwrap();
    netns::create(&peer).unwrap();
    // What a CNI plugin leaves: eth0 in the pod, its peer outside, an address, MTU 1400.
    let peer_s = peer.display().to_string();
    netns::run_in(&pod, move || {
        run_ok(Command::new("ip").args([
            "link", "add", "eth0", "mtu", "1400", "type", "veth", "peer", "name", "peer0", "mtu",
            "1400",
        ]));
        run_ok(Command::new("ip").args(["link", "set", "peer0", "netns", &peer_s]));
        run_ok(Command::new("ip").args(["addr", "add", "10.77.0.5/24", "dev", "eth0"]));
        run_ok(Command::new("ip").args(["link", "set", "eth0", "up"]));
    })
    .unwrap();
    netns::run_in(&peer, || {
        run_ok(Command::new("ip").args(["link", "set", "peer0", "up"]));
    })
    .unwrap();
    let result = CniResult::parse(&serde_json::json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "sandbox": pod}],
        "ips": [
            {"address": "10.77.0.5/24", "gateway": "10.77.0.1", "interface": 0},
            {"address": "fd00:77::5/64", "gateway": "fd00:77::1", "interface": 0}
        ]
    }));
    let nic = tap::attach(&pod, "eth0", tap::TAP_NAME, &result).unwrap();
    let eth0_mac = netns::run_in(&pod, || netns::mac("eth0").unwrap()).unwrap();
    assert_eq!(nic.mac, eth0_mac, "the guest takes the CNI interface's MAC");
    assert_eq!(nic.mtu, 1400, "and its MTU");
    let tap_mtu = netns::run_in(&pod, || netns::mtu(tap::TAP_NAME).unwrap()).unwrap();
    assert_eq!(tap_mtu, 1400);
    assert_eq!(nic.addresses, ["10.77.0.5/24", "fd00:77::5/64"]);
    assert_eq!(
        nic.routes,
        [
            ("0.0.0.0/0".to_string(), "10.77.0.1".to_string()),
            ("::/0".to_string(), "fd00:77::1".to_string())
        ]
    );
    // Attaching again replaces the filters (one per direction, not two).
    let nic2 = tap::attach(&pod, "eth0", tap::TAP_NAME, &result).unwrap();
    assert_eq!(nic2, nic);
    let filters = netns::run_in(&pod, || {
        let out = Command::new("tc")
            .args(["filter", "show", "dev", "eth0", "ingress"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    })
    .unwrap();
    assert_eq!(
        filters
            .matches("Egress Redirect to device tap0_husk")
            .count(),
        1,
        "{filters}"
    );

    let sock = packet_socket(&peer, "peer0");
    let guest_mac = parse_mac(&nic.mac);
    let mut vm = Command::new("nsenter")
        .arg(format!("--net={}", pod.display()))
        .arg(husk_tests::bin_path("husk-vmm"))
        .args(["--kernel", &guest.display().to_string(), "--memory", "32"])
        .args(["--cmdline", "net"])
        .args(["--net", &format!("tap={},mac={}", nic.tap, nic.mac)])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let (tx, lines) = mpsc::channel::<String>();
    let out = vm.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let expect = |needle: &str| {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return l,
                Ok(_) => {}
                Err(_) => panic!("no serial line containing {needle:?}"),
            }
        }
    };
    let stop = |vm: &mut std::process::Child| {
        let _ = vm.kill();
        let _ = vm.wait();
    };
    assert!(expect("net: mac=").ends_with(&nic.mac));

    // guest → tap → (redirect) → eth0 → peer0.
    let mut buf = [0u8; 2048];
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if Instant::now() > deadline {
            stop(&mut vm);
            panic!("the guest's frame never came out of the veth's peer end");
        }
        // SAFETY: reading into a buffer we own from our socket.
        let n = unsafe {
            libc::recv(
                sock.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                0,
            )
        };
        if n >= 27 && buf[12..14] == [0x88, 0xb5] {
            assert_eq!(&buf[6..12], &guest_mac, "source: the guest MAC");
            assert_eq!(&buf[14..27], b"husk-net-ping");
            break;
        }
    }
    // peer0 → eth0 → (redirect) → tap → guest.
    let mut pong = [0u8; 60];
    pong[..6].copy_from_slice(&guest_mac);
    pong[6..12].copy_from_slice(&[0x06, 0, 0, 0, 0, 0x77]);
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
    expect("net: rx pong ok");
    stop(&mut vm);

    // An fd on the tap from outside the namespace (what QEMU gets), then removal.
    let fd = tap::open(&pod, tap::TAP_NAME).unwrap();
    assert!(fd.as_raw_fd() >= 0);
    drop(fd);
    tap::remove(&pod, tap::TAP_NAME).unwrap();
    tap::remove(&pod, tap::TAP_NAME).unwrap();
    let gone = netns::run_in(&pod, || netns::mtu(tap::TAP_NAME).is_err()).unwrap();
    assert!(gone, "tap removed");
}

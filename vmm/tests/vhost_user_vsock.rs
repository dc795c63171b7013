//! husk-vmm as QEMU's vhost-user vsock backend (`husk-vmm vhost-user vsock`), with the real
//! guest image (linux 6.12 bzImage + initramfs with husk-agent as PID 1) under QEMU TCG q35.
//! The host side dials the hybrid socket (`CONNECT 1024`) and speaks ttrpc to the agent.
//!
//! Needs HUSK_GUEST_KERNEL (bzImage) and HUSK_GUEST_INITRD (tests/run.sh builds them with
//! images/) and qemu-system-x86_64; prints `skipped: <reason>` otherwise.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use husk_proto::agent as pb;

const QEMU: &str = "qemu-system-x86_64";
const CID: u64 = 3;
const AGENT_PORT: u32 = 1024;
/// Boot, connect and every RPC must fit in this (TCG boot is ~1-3 s here).
const DEADLINE: Duration = Duration::from_secs(60);

/// Kills and reaps QEMU and the backend however the test ends.
struct Guest {
    qemu: Child,
    backend: Child,
    dir: tempfile::TempDir,
    uds: PathBuf,
    started: Instant,
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.qemu.kill();
        let _ = self.qemu.wait();
        let _ = self.backend.kill();
        let _ = self.backend.wait();
    }
}

impl Guest {
    fn log(&self, name: &str) -> String {
        let s = std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(25)..].join("\n")
    }

    fn diagnostics(&self) -> String {
        format!(
            "--- console ---\n{}\n--- husk-vmm vhost-user ---\n{}\n--- qemu ---\n{}",
            self.log("console.log"),
            self.log("backend.log"),
            self.log("qemu.log")
        )
    }
}

fn guest_image() -> Option<(String, String)> {
    let (Ok(kernel), Ok(initrd)) = (
        std::env::var("HUSK_GUEST_KERNEL"),
        std::env::var("HUSK_GUEST_INITRD"),
    ) else {
        println!(
            "skipped: HUSK_GUEST_KERNEL / HUSK_GUEST_INITRD not set (tests/run.sh builds them)"
        );
        return None;
    };
    let found = Command::new(QEMU)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        println!("skipped: {QEMU} missing");
        return None;
    }
    Some((kernel, initrd))
}

/// (stdout, stderr) sharing one log file and its offset.
fn log_file(dir: &Path, name: &str) -> (std::fs::File, std::fs::File) {
    let f = std::fs::File::create(dir.join(name)).expect("log file");
    (f.try_clone().expect("dup"), f)
}

/// Starts the backend, waits for its vhost-user socket, then starts QEMU against it.
fn boot(kernel: &str, initrd: &str) -> Guest {
    boot_jailed(kernel, initrd, None)
}

/// As `boot`, with the backend run through `husk-vmm jail` as `uid` when given: its sockets
/// in a directory of its own (owned by `uid`), the jail's root built on another.
fn boot_jailed(kernel: &str, initrd: &str, uid: Option<u32>) -> Guest {
    let dir = common::tempdir();
    let socks = dir.path().join("sock");
    std::fs::create_dir(&socks).expect("sock dir");
    let vu = socks.join("vhost-user.sock");
    let uds = socks.join("vsock.sock");
    let (out, err) = log_file(dir.path(), "backend.log");
    let mut cmd = Command::new(common::VMM);
    if let Some(uid) = uid {
        std::os::unix::fs::chown(&socks, Some(uid), Some(uid)).expect("chown");
        let root = dir.path().join("root");
        std::fs::create_dir(&root).expect("root dir");
        cmd.args(["jail", "--uid", &uid.to_string(), "--gid", &uid.to_string()])
            .arg("--root")
            .arg(&root)
            .arg("--rw")
            .arg(&socks)
            .args(["--", common::VMM]);
    }
    let backend = cmd
        .args(["vhost-user", "vsock", "--cid", &CID.to_string()])
        .arg("--socket")
        .arg(&vu)
        .arg("--uds")
        .arg(&uds)
        .env("HUSK_VMM_LOG", "info")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("start husk-vmm vhost-user vsock");
    let t = Instant::now();
    while !vu.exists() && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let chardev = format!("socket,id=vs,path={}", vu.display());
    let (out, err) = log_file(dir.path(), "qemu.log");
    let qemu = Command::new(QEMU)
        .args([
            "-machine",
            "q35,memory-backend=mem",
            "-accel",
            "tcg",
            "-cpu",
            "max",
        ])
        .args(["-m", "512M", "-smp", "1"])
        .args(["-object", "memory-backend-memfd,id=mem,size=512M,share=on"])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .arg("-serial")
        .arg(format!("file:{}", dir.path().join("console.log").display()))
        .args(["-kernel", kernel, "-initrd", initrd])
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .args(["-chardev", &chardev])
        .args(["-device", "vhost-user-vsock-pci,chardev=vs"])
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("start qemu");
    Guest {
        qemu,
        backend,
        uds,
        dir,
        started: Instant::now(),
    }
}

/// One hybrid-vsock handshake: `CONNECT <port>\n`, then `OK <hostport>\n` read byte by byte
/// (the guest's data may follow right behind it). None if the guest refused or is not up.
fn hybrid_connect_once(uds: &Path, port: u32) -> Option<UnixStream> {
    let mut s = UnixStream::connect(uds).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(format!("CONNECT {port}\n").as_bytes()).ok()?;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.last() != Some(&b'\n') {
        match s.read(&mut b) {
            Ok(1) => line.push(b[0]),
            _ => return None,
        }
        if line.len() > 32 {
            return None;
        }
    }
    let line = String::from_utf8(line).ok()?;
    let host_port: u32 = line.strip_prefix("OK ")?.trim_end().parse().ok()?;
    assert!(host_port > 0, "bad OK line {line:?}");
    s.set_read_timeout(None).ok()?;
    Some(s)
}

/// Retries the handshake until the agent listens (the guest is booting meanwhile).
fn connect_agent(g: &mut Guest) -> UnixStream {
    loop {
        if let Some(s) = hybrid_connect_once(&g.uds, AGENT_PORT) {
            return s;
        }
        if let Ok(Some(st)) = g.qemu.try_wait() {
            panic!(
                "qemu exited ({st}) before the agent answered\n{}",
                g.diagnostics()
            );
        }
        if let Ok(Some(st)) = g.backend.try_wait() {
            panic!("husk-vmm vhost-user exited ({st})\n{}", g.diagnostics());
        }
        assert!(
            g.started.elapsed() < DEADLINE,
            "no CONNECT {AGENT_PORT} answered within {DEADLINE:?}\n{}",
            g.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio")
}

fn agent_client(s: UnixStream) -> pb::AgentClient {
    s.set_nonblocking(true).expect("nonblocking");
    let s = tokio::net::UnixStream::from_std(s).expect("tokio stream");
    let c = ttrpc::r#async::Client::new(ttrpc::r#async::transport::Socket::new(s));
    pb::AgentClient::new(c)
}

fn ctx(d: Duration) -> ttrpc::context::Context {
    ttrpc::context::with_timeout(d.as_nanos() as i64)
}

/// The vsock server jailed (`husk-vmm jail`): the agent still answers; the server runs as the
/// jail's uid with no capability, seccomp on, no_new_privs, in a root holding only /usr, its
/// binary, its sockets, /dev and /proc.
#[test]
fn jailed_vsock_server_serves_the_agent() {
    if !common::is_root() {
        println!("skipped: the jail needs root (mount namespace, setuid)");
        return;
    }
    let Some((kernel, initrd)) = guest_image() else {
        return;
    };
    const UID: u32 = 0x7000_0000 + 4242;
    let mut g = boot_jailed(&kernel, &initrd, Some(UID));
    let stream = connect_agent(&mut g);
    let j = common::jail_of(g.backend.id());
    assert_eq!(j.uids, format!("{UID}\t{UID}\t{UID}\t{UID}"), "{j:?}");
    assert_eq!(j.gids, format!("{UID}\t{UID}\t{UID}\t{UID}"), "{j:?}");
    assert_eq!(
        (
            j.no_new_privs.as_str(),
            j.seccomp.as_str(),
            j.cap_eff.as_str()
        ),
        ("1", "2", "0000000000000000"),
        "{j:?}"
    );
    assert_eq!(j.cap_bnd, "0000000000000000", "{j:?}");
    common::assert_jail_root(&j);
    let rt = runtime();
    let resp = rt
        .block_on(async {
            agent_client(stream)
                .check(ctx(Duration::from_secs(20)), &pb::CheckRequest::new())
                .await
        })
        .unwrap_or_else(|e| panic!("Check failed: {e}\n{}", g.diagnostics()));
    assert_eq!(resp.pid, 1, "{resp:?}");
}

#[test]
fn agent_answers_check_over_husk_vhost_user_vsock() {
    let Some((kernel, initrd)) = guest_image() else {
        return;
    };
    let mut g = boot(&kernel, &initrd);
    let stream = connect_agent(&mut g);
    let connected = g.started.elapsed();
    // The vsock server serves a frontend confined: no capabilities, seccomp filter.
    assert_eq!(
        common::confinement(g.backend.id()),
        ("1".into(), "2".into(), "0000000000000000".into())
    );
    let rt = runtime();
    let resp = rt.block_on(async {
        let client = agent_client(stream);
        client
            .check(ctx(Duration::from_secs(20)), &pb::CheckRequest::new())
            .await
    });
    let checked = g.started.elapsed();
    let resp = resp.unwrap_or_else(|e| panic!("Check failed: {e}\n{}", g.diagnostics()));
    assert!(resp.init, "agent is not init: {resp:?}");
    assert_eq!(resp.pid, 1, "{resp:?}");
    println!(
        "qemu start -> CONNECT {AGENT_PORT} OK: {connected:?}; -> Check answered: {checked:?} \
         (version {}, cgroup {})",
        resp.version, resp.cgroup_version
    );

    // The frontend going away ends the backend (one process per VM, like QEMU itself).
    let _ = g.qemu.kill();
    let _ = g.qemu.wait();
    let t = Instant::now();
    let status = loop {
        match g.backend.try_wait() {
            Ok(Some(st)) => break st,
            _ if t.elapsed() > Duration::from_secs(10) => {
                panic!(
                    "husk-vmm vhost-user still running after QEMU left\n{}",
                    g.diagnostics()
                )
            }
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    assert!(
        status.success(),
        "backend exit: {status}\n{}",
        g.diagnostics()
    );
}

/// Pseudo-random printable bytes (the agent echoes ids in its errors, which are UTF-8 strings).
fn ascii(n: usize, seed: u64) -> String {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'a' + (x % 26) as u8)
        })
        .collect()
}

/// The agent has no echo service and the initramfs no rootfs to run one in, but an RPC naming
/// an unknown container comes back as `container <id> not found`: a 1 MiB id is 1 MiB each way
/// through the guest kernel's vsock, written with one large write on each side (Linux sends it
/// as 64 KiB packets whose payloads span several descriptors).
#[test]
fn megabytes_cross_the_guest_both_ways_over_husk_vhost_user_vsock() {
    let Some((kernel, initrd)) = guest_image() else {
        return;
    };
    const MIB: usize = 1 << 20;
    const ROUNDS: u64 = 4;
    let mut g = boot(&kernel, &initrd);
    let stream = connect_agent(&mut g);
    let rt = runtime();
    let result = rt.block_on(async {
        let client = agent_client(stream);
        let t = Instant::now();
        for round in 0..ROUNDS {
            let id = ascii(MIB, 0x9e37_79b9_7f4a_7c15 ^ round);
            let req = pb::WriteStdinRequest {
                container_id: id.clone(),
                exec_id: String::new(),
                data: ascii(MIB, round).into_bytes(),
                ..Default::default()
            };
            match client.write_stdin(ctx(Duration::from_secs(30)), &req).await {
                Err(ttrpc::Error::RpcStatus(s)) => {
                    if s.code() != ttrpc::Code::NOT_FOUND {
                        return Err(format!("round {round}: unexpected status {:?}", s.code()));
                    }
                    let want = format!("container {id} not found");
                    if s.message() != want {
                        return Err(format!(
                            "round {round}: echoed id differs (got {} bytes, want {})",
                            s.message().len(),
                            want.len()
                        ));
                    }
                }
                Err(e) => return Err(format!("round {round}: {e}")),
                Ok(r) => return Err(format!("round {round}: unexpected success {r:?}")),
            }
        }
        Ok(t.elapsed())
    });
    let took = result.unwrap_or_else(|e| panic!("{e}\n{}", g.diagnostics()));
    let mib = 3 * ROUNDS; // 2 MiB in (id + data) and 1 MiB out (the id) per round
    println!(
        "{ROUNDS} rounds: {} MiB host->guest + {ROUNDS} MiB guest->host in {took:?} \
         ({:.1} MiB/s both ways together)",
        2 * ROUNDS,
        mib as f64 / took.as_secs_f64()
    );
    // And the connection still works afterwards.
    let again = rt.block_on(async {
        let stream = hybrid_connect_once(&g.uds, AGENT_PORT).ok_or("reconnect refused")?;
        let client = agent_client(stream);
        client
            .check(ctx(Duration::from_secs(20)), &pb::CheckRequest::new())
            .await
            .map_err(|e| e.to_string())
            .map(|r| r.pid)
    });
    assert_eq!(again, Ok(1), "{}", g.diagnostics());
}

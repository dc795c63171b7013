//! A guest under QEMU TCG with husk-vmm's vhost-user vsock (to reach the agent) and a
//! vhost-user-fs backend (husk-vmm's or another, e.g. virtiofsd), plus containers on a busybox
//! rootfs inside the share. Shared by the virtio-fs end-to-end test and benchmark.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use husk_proto::agent as pb;
use protobuf::MessageField;

pub const VMM: &str = env!("CARGO_BIN_EXE_husk-vmm");
pub const QEMU: &str = "qemu-system-x86_64";
pub const BUSYBOX: &str = "/usr/bin/busybox";
pub const TAG: &str = "hostshare";
pub const SANDBOX: &str = "fs-e2e";
const DEADLINE: Duration = Duration::from_secs(90);

/// Where the agent mounts the share, and the container rootfs inside it.
pub fn guest_rootfs() -> String {
    format!("/run/husk-agent/{SANDBOX}/mounts/share/rootfs")
}

pub struct Guest {
    pub qemu: Child,
    pub backends: Vec<Child>,
    pub dir: tempfile::TempDir,
    pub uds: PathBuf,
    pub started: Instant,
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.qemu.kill();
        let _ = self.qemu.wait();
        for b in &mut self.backends {
            let _ = b.kill();
            let _ = b.wait();
        }
    }
}

impl Guest {
    fn log(&self, name: &str) -> String {
        let s = std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(25)..].join("\n")
    }

    pub fn diagnostics(&self) -> String {
        format!(
            "--- console ---\n{}\n--- fs backend ---\n{}\n--- vsock backend ---\n{}\n--- qemu ---\n{}",
            self.log("console.log"),
            self.log("fs.log"),
            self.log("vsock.log"),
            self.log("qemu.log")
        )
    }
}

pub fn guest_image() -> Option<(String, String)> {
    let (Ok(kernel), Ok(initrd)) = (
        std::env::var("HUSK_GUEST_KERNEL"),
        std::env::var("HUSK_GUEST_INITRD"),
    ) else {
        println!(
            "skipped: HUSK_GUEST_KERNEL / HUSK_GUEST_INITRD not set (tests/run.sh builds them)"
        );
        return None;
    };
    let qemu = Command::new(QEMU)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !qemu {
        println!("skipped: {QEMU} missing");
        return None;
    }
    if !Path::new(BUSYBOX).exists() {
        println!("skipped: {BUSYBOX} missing (the container's rootfs)");
        return None;
    }
    Some((kernel, initrd))
}

fn log_file(dir: &Path, name: &str) -> (std::fs::File, std::fs::File) {
    let f = std::fs::File::create(dir.join(name)).expect("log file");
    (f.try_clone().expect("dup"), f)
}

fn wait_for(p: &Path) {
    let t = Instant::now();
    while !p.exists() && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Starts `husk-vmm vhost-user fs` on `share`, the vsock backend, then QEMU with both devices.
pub fn boot(kernel: &str, initrd: &str, dir: tempfile::TempDir, share: &Path) -> Guest {
    boot_with(kernel, initrd, dir, |sock| {
        let mut c = Command::new(VMM);
        c.args(["vhost-user", "fs", "--tag", TAG])
            .arg("--socket")
            .arg(sock)
            .arg("--shared-dir")
            .arg(share);
        c
    })
}

/// Like [`boot`] with another vhost-user-fs backend: `fs_cmd(socket)` must listen there.
pub fn boot_with(
    kernel: &str,
    initrd: &str,
    dir: tempfile::TempDir,
    fs_cmd: impl FnOnce(&Path) -> Command,
) -> Guest {
    let fs_sock = dir.path().join("fs.sock");
    let vs_sock = dir.path().join("vs.sock");
    let uds = dir.path().join("vsock.sock");
    let (out, err) = log_file(dir.path(), "fs.log");
    let fs = fs_cmd(&fs_sock)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("start husk-vmm vhost-user fs");
    let (out, err) = log_file(dir.path(), "vsock.log");
    let vs = Command::new(VMM)
        .args(["vhost-user", "vsock", "--cid", "3"])
        .arg("--socket")
        .arg(&vs_sock)
        .arg("--uds")
        .arg(&uds)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("start husk-vmm vhost-user vsock");
    wait_for(&fs_sock);
    wait_for(&vs_sock);
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
        .args([
            "-chardev",
            &format!("socket,id=vs,path={}", vs_sock.display()),
        ])
        .args(["-device", "vhost-user-vsock-pci,chardev=vs"])
        .args([
            "-chardev",
            &format!("socket,id=fs,path={}", fs_sock.display()),
        ])
        .args([
            "-device",
            &format!("vhost-user-fs-pci,chardev=fs,tag={TAG}"),
        ])
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("start qemu");
    Guest {
        qemu,
        backends: vec![fs, vs],
        uds,
        dir,
        started: Instant::now(),
    }
}

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
    String::from_utf8(line).ok()?.strip_prefix("OK ")?;
    s.set_read_timeout(None).ok()?;
    Some(s)
}

pub fn connect_agent(g: &mut Guest) -> pb::AgentClient {
    let s = loop {
        if let Some(s) = hybrid_connect_once(&g.uds, 1024) {
            break s;
        }
        if let Ok(Some(st)) = g.qemu.try_wait() {
            panic!("qemu exited ({st})\n{}", g.diagnostics());
        }
        assert!(
            g.started.elapsed() < DEADLINE,
            "agent never answered\n{}",
            g.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    s.set_nonblocking(true).expect("nonblocking");
    let s = tokio::net::UnixStream::from_std(s).expect("tokio stream");
    pb::AgentClient::new(ttrpc::r#async::Client::new(
        ttrpc::r#async::transport::Socket::new(s),
    ))
}

pub fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(Duration::from_secs(60).as_nanos() as i64)
}

pub fn spec(script: &str, extra_mounts: &[serde_json::Value]) -> serde_json::Value {
    let mut s = serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": ["/bin/busybox", "sh", "-c", script],
            "env": ["PATH=/bin"],
            "cwd": "/",
            "capabilities": {"bounding": ["CAP_CHOWN", "CAP_FOWNER", "CAP_DAC_OVERRIDE"],
                             "effective": ["CAP_CHOWN", "CAP_FOWNER", "CAP_DAC_OVERRIDE"],
                             "permitted": ["CAP_CHOWN", "CAP_FOWNER", "CAP_DAC_OVERRIDE"]},
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": false},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
            {"destination": "/data", "type": "bind", "source": "sandbox:share", "options": ["rbind", "rw"]}
        ],
        "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}]}
    });
    if let Some(m) = s["mounts"].as_array_mut() {
        m.extend(extra_mounts.iter().cloned());
    }
    s
}

/// Runs `script` in a new container; (exit code, stdout + stderr). None when the guest agent
/// cannot start containers yet (it still runs on the initramfs root, which pivot_root refuses;
/// the VM sandbox issue moves it off).
pub async fn run(
    c: &pb::AgentClient,
    id: &str,
    rootfs: &str,
    script: &str,
    extra_mounts: &[serde_json::Value],
) -> Option<(i32, String)> {
    let req = pb::CreateContainerRequest {
        container_id: id.into(),
        oci_spec: serde_json::to_vec(&spec(script, extra_mounts)).expect("json"),
        rootfs: MessageField::some(pb::Rootfs {
            source: Some(pb::rootfs::Source::Path(rootfs.into())),
            ..Default::default()
        }),
        ..Default::default()
    };
    match c.create_container(ctx(), &req).await {
        Ok(_) => {}
        Err(ttrpc::Error::RpcStatus(s))
            if s.message().contains("pivot_root") && s.message().contains("EINVAL") =>
        {
            println!(
                "skipped: this guest agent cannot start containers from the initramfs root ({})",
                s.message()
            );
            return None;
        }
        Err(e) => panic!("CreateContainer: {e}"),
    }
    let start = pb::StartContainerRequest {
        container_id: id.into(),
        ..Default::default()
    };
    c.start_container(ctx(), &start)
        .await
        .expect("StartContainer");
    let mut out = Vec::new();
    for stderr in [false, true] {
        loop {
            let r = pb::ReadStreamRequest {
                container_id: id.into(),
                ..Default::default()
            };
            let r = if stderr {
                c.read_stderr(ctx(), &r).await
            } else {
                c.read_stdout(ctx(), &r).await
            };
            let r = r.expect("read");
            out.extend_from_slice(&r.data);
            if r.eof {
                break;
            }
        }
    }
    let w = pb::WaitProcessRequest {
        container_id: id.into(),
        ..Default::default()
    };
    let code = c.wait_process(ctx(), &w).await.expect("wait").exit_code;
    let out = String::from_utf8_lossy(&out).into_owned();
    println!("--- container {id} (exit {code}) ---\n{out}");
    Some((code, out))
}

/// CreateSandbox with the share as the sandbox mount `share` (`mount -t virtiofs`).
pub async fn create_sandbox(c: &pb::AgentClient) {
    let req = pb::CreateSandboxRequest {
        sandbox_id: SANDBOX.into(),
        hostname: "fs".into(),
        mounts: vec![pb::SandboxMount {
            name: "share".into(),
            source: TAG.into(),
            fstype: "virtiofs".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    c.create_sandbox(ctx(), &req)
        .await
        .expect("CreateSandbox (mount -t virtiofs)");
}

/// A busybox rootfs at `rootfs`.
pub fn make_rootfs(rootfs: &Path) {
    for d in ["bin", "proc", "dev", "data", "tmp", "etc"] {
        std::fs::create_dir_all(rootfs.join(d)).expect("mkdir");
    }
    std::fs::copy(BUSYBOX, rootfs.join("bin/busybox")).expect("copy busybox");
    std::os::unix::fs::symlink("busybox", rootfs.join("bin/sh")).expect("sh");
}

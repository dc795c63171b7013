//! husk-vmm's virtio-fs server as QEMU's vhost-user-fs backend (`husk-vmm vhost-user fs`),
//! exercised by the guest's own virtio-fs driver: the real guest image (linux 6.12 +
//! husk-agent as PID 1) under QEMU TCG, the agent reached over `husk-vmm vhost-user vsock`.
//!
//! The agent mounts the share as a sandbox mount (`fstype virtiofs`); a container whose
//! rootfs is a static busybox inside the share gets the share at /data through a
//! `sandbox:share` spec mount. Checked both ways: host files (mode, owner, mtime, content)
//! as the guest sees them, guest writes (content, chown, chmod, touch, 1 MiB file, symlink)
//! as the host sees them, a ConfigMap-style atomic `..data` symlink swap on the host seen in
//! the guest, and symlinks pointing out of the share (absolute host path, `../..`) that never
//! reach the host file.
//!
//! Needs HUSK_GUEST_KERNEL, HUSK_GUEST_INITRD, qemu-system-x86_64 and a static busybox at
//! /usr/bin/busybox; prints `skipped: <reason>` otherwise.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use husk_proto::agent as pb;
use protobuf::MessageField;

const QEMU: &str = "qemu-system-x86_64";
const BUSYBOX: &str = "/usr/bin/busybox";
const TAG: &str = "hostshare";
const SANDBOX: &str = "fs-e2e";
const DEADLINE: Duration = Duration::from_secs(90);

struct Guest {
    qemu: Child,
    backends: Vec<Child>,
    dir: tempfile::TempDir,
    uds: PathBuf,
    started: Instant,
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

    fn diagnostics(&self) -> String {
        format!(
            "--- console ---\n{}\n--- fs backend ---\n{}\n--- vsock backend ---\n{}\n--- qemu ---\n{}",
            self.log("console.log"),
            self.log("fs.log"),
            self.log("vsock.log"),
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

/// Starts `husk-vmm vhost-user fs` on `share` (or another server: `fs_cmd`), the vsock
/// backend, then QEMU with both devices.
fn boot(kernel: &str, initrd: &str, dir: tempfile::TempDir, share: &Path) -> Guest {
    let fs_sock = dir.path().join("fs.sock");
    let vs_sock = dir.path().join("vs.sock");
    let uds = dir.path().join("vsock.sock");
    let (out, err) = log_file(dir.path(), "fs.log");
    let fs = Command::new(common::VMM)
        .args(["vhost-user", "fs", "--tag", TAG])
        .arg("--socket")
        .arg(&fs_sock)
        .arg("--shared-dir")
        .arg(share)
        .env("HUSK_VMM_LOG", "info")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("start husk-vmm vhost-user fs");
    let (out, err) = log_file(dir.path(), "vsock.log");
    let vs = Command::new(common::VMM)
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

fn connect_agent(g: &mut Guest) -> pb::AgentClient {
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

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(Duration::from_secs(60).as_nanos() as i64)
}

fn spec(script: &str) -> serde_json::Value {
    serde_json::json!({
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
    })
}

/// Runs `script` in a new container; (exit code, stdout + stderr). None when the guest agent
/// cannot start containers yet (it still runs on the initramfs root, which pivot_root refuses;
/// the VM sandbox issue moves it off).
async fn run(c: &pb::AgentClient, id: &str, rootfs: &str, script: &str) -> Option<(i32, String)> {
    let req = pb::CreateContainerRequest {
        container_id: id.into(),
        oci_spec: serde_json::to_vec(&spec(script)).expect("json"),
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

/// `share/`: busybox rootfs under `rootfs/`, test data at the top; `secret` next to it.
fn make_share(outer: &Path) -> (PathBuf, PathBuf) {
    let share = outer.join("share");
    let rootfs = share.join("rootfs");
    for d in ["bin", "proc", "dev", "data", "tmp", "etc"] {
        std::fs::create_dir_all(rootfs.join(d)).expect("mkdir");
    }
    std::fs::copy(BUSYBOX, rootfs.join("bin/busybox")).expect("copy busybox");
    std::fs::write(rootfs.join("bin/sh"), b"").ok();
    std::fs::remove_file(rootfs.join("bin/sh")).ok();
    symlink("busybox", rootfs.join("bin/sh")).expect("sh");
    let secret = outer.join("secret");
    std::fs::write(&secret, b"host secret\n").expect("secret");
    let f = share.join("host.txt");
    std::fs::write(&f, b"written on the host\n").expect("write");
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    std::os::unix::fs::chown(&f, Some(1001), Some(1002)).expect("chown");
    let t = std::fs::FileTimes::new()
        .set_modified(std::time::UNIX_EPOCH + Duration::from_secs(1_600_000_000));
    std::fs::File::options()
        .write(true)
        .open(&f)
        .expect("open")
        .set_times(t)
        .expect("times");
    // ConfigMap layout: key -> ..data/key, ..data -> ..v1.
    let cfg = share.join("cfg");
    std::fs::create_dir_all(cfg.join("..v1")).expect("mkdir");
    std::fs::write(cfg.join("..v1/key"), b"v1").expect("write");
    symlink("..v1", cfg.join("..data")).expect("symlink");
    symlink("..data/key", cfg.join("key")).expect("symlink");
    // Ways out that must not work.
    symlink(&secret, share.join("abs")).expect("symlink");
    symlink("../secret", share.join("rel")).expect("symlink");
    (share, secret)
}

/// The kubelet's atomic update: new dir, new symlink, rename over `..data`.
fn swap_configmap(share: &Path) {
    let cfg = share.join("cfg");
    std::fs::create_dir_all(cfg.join("..v2")).expect("mkdir");
    std::fs::write(cfg.join("..v2/key"), b"v2").expect("write");
    symlink("..v2", cfg.join("..data_tmp")).expect("symlink");
    std::fs::rename(cfg.join("..data_tmp"), cfg.join("..data")).expect("rename");
}

#[test]
fn guest_and_host_share_files_through_husk_virtio_fs() {
    let Some((kernel, initrd)) = guest_image() else {
        return;
    };
    let dir = common::tempdir();
    let (share, secret) = make_share(dir.path());
    let mut g = boot(&kernel, &initrd, dir, &share);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio");
    let _in_rt = rt.enter();
    let client = connect_agent(&mut g);
    let rootfs = format!("/run/husk-agent/{SANDBOX}/mounts/share/rootfs");
    let first = rt.block_on(async {
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
        client.create_sandbox(ctx(), &req).await.expect("CreateSandbox (mount -t virtiofs)");
        run(
            &client,
            "c1",
            &rootfs,
            "cd /data; cat host.txt; stat -c 'attr %a %u %g %Y %s' host.txt; echo cfg=$(cat cfg/key); \
             echo from the guest > guest.txt; chown 1234:5678 guest.txt; chmod 600 guest.txt; \
             touch -d @1700000000 guest.txt; mkdir -p newdir; dd if=/dev/zero of=newdir/big bs=64k count=16 2>/dev/null; \
             ln -s target guestlink; \
             cat abs; echo abs=$?; cat rel; echo rel=$?; cat ../../secret; echo up=$?; \
             echo planted > /data/../../../planted; ls /",
        )
        .await
    });
    let Some((code, out)) = first else { return };
    let ok = |cond: bool, what: &str| {
        assert!(
            cond,
            "{what}\ncontainer output:\n{out}\n{}",
            g.diagnostics()
        )
    };
    ok(code == 0, "container exit");
    ok(
        out.contains("written on the host"),
        "host content in the guest",
    );
    ok(
        out.contains("attr 640 1001 1002 1600000000 20"),
        "mode, uid, gid, mtime, size in the guest",
    );
    ok(
        out.contains("cfg=v1"),
        "configmap through the ..data symlink",
    );
    ok(!out.contains("host secret"), "no way out of the share");
    ok(
        out.contains("abs=1") && out.contains("rel=1") && out.contains("up=1"),
        "escape attempts fail",
    );

    let gf = share.join("guest.txt");
    let m = std::fs::symlink_metadata(&gf).expect("guest.txt on the host");
    assert_eq!(std::fs::read(&gf).expect("read"), b"from the guest\n");
    assert_eq!(
        (m.uid(), m.gid(), m.mode() & 0o777, m.mtime()),
        (1234, 5678, 0o600, 1_700_000_000)
    );
    assert_eq!(
        std::fs::metadata(share.join("newdir/big"))
            .expect("big")
            .len(),
        1 << 20
    );
    assert_eq!(
        std::fs::read_link(share.join("guestlink")).expect("link"),
        Path::new("target")
    );
    assert_eq!(std::fs::read(&secret).expect("secret"), b"host secret\n");
    assert!(!dir_of(&share).join("planted").exists() && !Path::new("/planted").exists());

    swap_configmap(&share);
    let (code, out) = rt
        .block_on(run(
        &client,
        "c2",
        &rootfs,
        "for i in $(seq 1 50); do v=$(cat /data/cfg/key); [ \"$v\" = v2 ] && break; sleep 0.1; done; echo cfg=$v; \
         cat /data/guest.txt",
    ))
        .expect("second container");
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("cfg=v2"),
        "the swap is seen in the guest: {out}\n{}",
        g.diagnostics()
    );
    assert!(out.contains("from the guest"), "{out}");
}

fn dir_of(share: &Path) -> PathBuf {
    share.parent().expect("parent").to_path_buf()
}

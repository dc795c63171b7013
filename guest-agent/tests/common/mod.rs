//! Test harness: a busybox rootfs, a real `husk-agent --listen unix:...`
//! process, and the generated ttrpc client.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use husk_proto::agent as pb;
use ttrpc::context::{self, Context};

pub const BUSYBOX: &str = "/bin/busybox";

/// Why these tests cannot run here, if they cannot.
pub fn skip_reason() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not root".into());
    }
    if !Path::new(BUSYBOX).exists() {
        return Some(format!(
            "{BUSYBOX} missing (apt-get install busybox-static)"
        ));
    }
    None
}

#[macro_export]
macro_rules! require_root {
    () => {
        if let Some(reason) = common::skip_reason() {
            eprintln!("skipped: {reason}");
            return;
        }
    };
}

const APPLETS: &[&str] = &[
    "sh", "echo", "cat", "sleep", "id", "hostname", "touch", "pwd", "env", "ls", "mkdir", "head",
    "tr", "true", "false", "kill", "wc", "grep", "stty", "dd", "ps", "rm", "test", "readlink",
];

/// A busybox rootfs (built once per test binary), used as an overlay lower dir.
pub fn rootfs() -> &'static Path {
    static ROOTFS: OnceLock<tempfile::TempDir> = OnceLock::new();
    ROOTFS
        .get_or_init(|| {
            let dir = tempfile::Builder::new()
                .prefix("husk-agent-rootfs")
                .tempdir()
                .expect("tmp");
            let r = dir.path();
            for d in [
                "bin",
                "etc",
                "tmp",
                "proc",
                "sys",
                "dev",
                "root",
                "home/alice",
                "data",
            ] {
                std::fs::create_dir_all(r.join(d)).expect("mkdir");
            }
            std::fs::copy(BUSYBOX, r.join("bin/busybox")).expect("copy busybox");
            for a in APPLETS {
                std::os::unix::fs::symlink("busybox", r.join("bin").join(a)).expect("symlink");
            }
            std::fs::write(
                r.join("etc/passwd"),
                "root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n",
            )
            .expect("passwd");
            std::fs::write(
                r.join("etc/group"),
                "root:x:0:\nwheel:x:10:alice\nalice:x:1000:\n",
            )
            .expect("group");
            std::fs::write(r.join("etc/motd"), "from the image\n").expect("motd");
            // World-writable tmp, as images have it.
            nix::sys::stat::fchmodat(
                nix::fcntl::AT_FDCWD,
                &r.join("tmp"),
                nix::sys::stat::Mode::from_bits_truncate(0o1777),
                nix::sys::stat::FchmodatFlags::FollowSymlink,
            )
            .expect("chmod tmp");
            dir
        })
        .path()
}

/// A runc-like default spec running `args`.
pub fn spec(args: &[&str]) -> serde_json::Value {
    let caps = [
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FSETID",
        "CAP_FOWNER",
        "CAP_MKNOD",
        "CAP_NET_RAW",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_SETFCAP",
        "CAP_SETPCAP",
        "CAP_NET_BIND_SERVICE",
        "CAP_SYS_CHROOT",
        "CAP_KILL",
        "CAP_AUDIT_WRITE",
    ];
    serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/bin", "TERM=xterm"],
            "cwd": "/",
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": false},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "ipc"}, {"type": "uts"}, {"type": "network"}],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware", "/proc/scsi"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
        }
    })
}

pub fn ctx() -> Context {
    context::with_timeout(Duration::from_secs(30).as_nanos() as i64)
}

pub fn short_ctx(d: Duration) -> Context {
    context::with_timeout(d.as_nanos() as i64)
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A running agent process with its client. Dropping it stops the agent
/// (SIGTERM: the agent destroys its sandbox), then cleans the temp dir.
pub struct TestAgent {
    pub child: Child,
    /// The agent's pid on the host (differs from `child` under a wrapper).
    pub agent_pid: i32,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub client: pb::AgentClient,
    pub sandbox_id: String,
    pub hostname: String,
}

impl TestAgent {
    pub async fn start() -> TestAgent {
        Self::start_wrapped(&[]).await
    }

    /// Start the agent under `wrapper` (e.g. `unshare --pid --fork ...`).
    pub async fn start_wrapped(wrapper: &[&str]) -> TestAgent {
        Self::start_wrapped_args(wrapper, &[]).await
    }

    /// Start the agent under `wrapper` with extra agent arguments.
    pub async fn start_wrapped_args(wrapper: &[&str], extra: &[&str]) -> TestAgent {
        let dir = tempfile::Builder::new()
            .prefix("husk-agent-test")
            .tempdir()
            .expect("tmp");
        let socket = dir.path().join("agent.sock");
        // HUSK_AGENT_BIN runs the suite against another build (e.g. the static one).
        let bin = std::env::var("HUSK_AGENT_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_husk-agent").to_string());
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        let child = cmd
            .args(extra)
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .env("RUST_LOG", "husk_agent=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("agent.log")).expect("log"))
            .spawn()
            .expect("spawn husk-agent");
        let deadline = Instant::now() + Duration::from_secs(20);
        let client = loop {
            if socket.exists()
                && let Ok(c) =
                    ttrpc::r#async::Client::connect(&format!("unix://{}", socket.display())).await
            {
                let client = pb::AgentClient::new(c);
                if client
                    .check(short_ctx(Duration::from_secs(2)), &pb::CheckRequest::new())
                    .await
                    .is_ok()
                {
                    break client;
                }
            }
            assert!(
                Instant::now() < deadline,
                "agent did not come up: {}",
                std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let agent_pid = if wrapper.is_empty() {
            child.id() as i32
        } else {
            children(child.id() as i32)[0]
        };
        TestAgent {
            child,
            agent_pid,
            dir,
            socket,
            client,
            sandbox_id: unique("sb"),
            hostname: unique("host"),
        }
    }

    /// Start an agent and create a sandbox with fresh net/ipc/uts namespaces.
    pub async fn with_sandbox() -> TestAgent {
        let a = Self::start().await;
        a.create_sandbox(false).await;
        a
    }

    pub fn cgroup_parent(&self) -> String {
        format!("husk-test/{}", self.sandbox_id)
    }

    pub async fn create_sandbox(&self, pid_ns: bool) -> pb::CreateSandboxResponse {
        self.create_sandbox_with(pid_ns, vec![], None).await
    }

    pub async fn create_sandbox_with(
        &self,
        pid_ns: bool,
        mounts: Vec<pb::SandboxMount>,
        resources: Option<serde_json::Value>,
    ) -> pb::CreateSandboxResponse {
        let req = pb::CreateSandboxRequest {
            mounts,
            resources: resources
                .map(|r| serde_json::to_vec(&r).expect("json"))
                .unwrap_or_default(),
            sandbox_id: self.sandbox_id.clone(),
            hostname: self.hostname.clone(),
            dns: Some(pb::DnsConfig {
                servers: vec!["10.96.0.10".into()],
                searches: vec!["svc.local".into()],
                ..Default::default()
            })
            .into(),
            namespaces: Some(pb::SandboxNamespaces {
                network: true,
                ipc: true,
                uts: true,
                pid: pid_ns,
                ..Default::default()
            })
            .into(),
            cgroup_parent: self.cgroup_parent(),
            ..Default::default()
        };
        self.client
            .create_sandbox(ctx(), &req)
            .await
            .expect("create sandbox")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    pub async fn create(
        &self,
        id: &str,
        spec: &serde_json::Value,
    ) -> ttrpc::Result<pb::CreateContainerResponse> {
        self.create_with(id, spec, false, false).await
    }

    pub async fn create_with(
        &self,
        id: &str,
        spec: &serde_json::Value,
        stdin: bool,
        tty: bool,
    ) -> ttrpc::Result<pb::CreateContainerResponse> {
        let req = pb::CreateContainerRequest {
            container_id: id.into(),
            oci_spec: serde_json::to_vec(spec).expect("json"),
            rootfs: Some(pb::Rootfs {
                source: Some(pb::rootfs::Source::Overlay(pb::OverlayRootfs {
                    lower_dirs: vec![rootfs().display().to_string()],
                    ..Default::default()
                })),
                ..Default::default()
            })
            .into(),
            stdio: Some(pb::StdioConfig {
                stdin,
                tty,
                ..Default::default()
            })
            .into(),
            ..Default::default()
        };
        self.client.create_container(ctx(), &req).await
    }

    pub async fn start_container(&self, id: &str) -> ttrpc::Result<pb::Empty> {
        self.client
            .start_container(
                ctx(),
                &pb::StartContainerRequest {
                    container_id: id.into(),
                    ..Default::default()
                },
            )
            .await
    }

    /// Create and start.
    pub async fn run(&self, id: &str, spec: &serde_json::Value) {
        self.create(id, spec)
            .await
            .unwrap_or_else(|e| panic!("create {id}: {e:?}\n{}", self.log()));
        self.start_container(id)
            .await
            .unwrap_or_else(|e| panic!("start {id}: {e:?}\n{}", self.log()));
    }

    /// Read a stream to EOF.
    pub async fn read_all(&self, id: &str, exec_id: &str, stderr: bool) -> String {
        let mut out = Vec::new();
        loop {
            let req = pb::ReadStreamRequest {
                container_id: id.into(),
                exec_id: exec_id.into(),
                ..Default::default()
            };
            let r = if stderr {
                self.client.read_stderr(ctx(), &req).await
            } else {
                self.client.read_stdout(ctx(), &req).await
            }
            .expect("read stream");
            out.extend_from_slice(&r.data);
            if r.eof {
                break;
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    pub async fn wait(&self, id: &str, exec_id: &str) -> pb::WaitProcessResponse {
        let req = pb::WaitProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        self.client.wait_process(ctx(), &req).await.expect("wait")
    }

    pub async fn signal(&self, id: &str, exec_id: &str, sig: i32) -> ttrpc::Result<pb::Empty> {
        let req = pb::SignalProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            signal: sig as u32,
            ..Default::default()
        };
        self.client.signal_process(ctx(), &req).await
    }

    pub async fn remove(&self, id: &str, force: bool) -> ttrpc::Result<pb::Empty> {
        self.client
            .remove_container(
                ctx(),
                &pb::RemoveContainerRequest {
                    container_id: id.into(),
                    force,
                    ..Default::default()
                },
            )
            .await
    }

    /// Rehearse (a pooled VM's warm-up) with a minimal spec.
    pub async fn rehearse(&self) -> ttrpc::Result<pb::RehearseResponse> {
        self.client
            .rehearse(
                ctx(),
                &pb::RehearseRequest {
                    oci_spec: br#"{"ociVersion":"1.0.2","process":{"args":["true"],"cwd":"/"}}"#
                        .to_vec(),
                    ..Default::default()
                },
            )
            .await
    }

    /// Run `args` to completion: (stdout, stderr, exit code).
    pub async fn output(&self, id: &str, spec: &serde_json::Value) -> (String, String, i32) {
        self.run(id, spec).await;
        let (out, err) = tokio::join!(self.read_all(id, "", false), self.read_all(id, "", true));
        let code = self.wait(id, "").await.exit_code;
        self.remove(id, false).await.expect("remove");
        (out, err, code)
    }

    pub async fn exec(
        &self,
        id: &str,
        exec_id: &str,
        args: &[&str],
        stdin: bool,
        tty: bool,
    ) -> ttrpc::Result<pb::ExecProcessResponse> {
        // Only args: the rest comes from the container's process.
        let process = serde_json::json!({"args": args});
        let req = pb::ExecProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            process: serde_json::to_vec(&process).expect("json"),
            stdio: Some(pb::StdioConfig {
                stdin,
                tty,
                ..Default::default()
            })
            .into(),
            ..Default::default()
        };
        self.client.exec_process(ctx(), &req).await
    }
}

/// rmdir a cgroup subtree (deepest first) in every hierarchy: what huskd
/// must do after an agent died without cleaning up.
pub fn remove_cgroup_tree(rel: &str) {
    fn walk(dir: &Path) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                walk(&e.path());
            }
        }
        let _ = std::fs::remove_dir(dir);
    }
    let mut roots = vec![PathBuf::from("/sys/fs/cgroup")];
    roots.extend(
        std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path()),
    );
    for r in roots {
        let d = r.join(rel);
        if d.is_dir() {
            walk(&d);
        }
    }
}

/// Direct children of `pid`.
pub fn children(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let c = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
        out.extend(c.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
    }
    out
}

/// Children of `pid` that are zombies (exited, not reaped).
pub fn zombie_children(pid: i32) -> Vec<i32> {
    children(pid)
        .into_iter()
        .filter(|c| {
            let stat = std::fs::read_to_string(format!("/proc/{c}/stat")).unwrap_or_default();
            stat.rsplit_once(") ")
                .map(|(_, rest)| rest.starts_with('Z'))
                .unwrap_or(false)
        })
        .collect()
}

pub fn code(r: &ttrpc::Error) -> ttrpc::Code {
    match r {
        ttrpc::Error::RpcStatus(s) => s.code(),
        _ => ttrpc::Code::UNKNOWN,
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.agent_pid);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
            }
        }
        // The agent removed its cgroups; remove the shared test parent if empty.
        if let Ok(entries) = std::fs::read_dir("/sys/fs/cgroup") {
            for e in entries.flatten() {
                let _ = std::fs::remove_dir(e.path().join("husk-test"));
            }
        }
    }
}

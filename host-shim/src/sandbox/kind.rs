//! The one seam between the shared pod machinery and how a pod's agent is
//! run: [`SandboxKind`], with the namespace sandbox (`husk-ns`: a host
//! process in fresh namespaces) here and the VM sandbox in `vm/`.

use std::collections::HashSet;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use husk_proto::agent as pb;
use husk_proto::cri;

use super::agent::{Agent, AgentError};
use super::error::{AgentStartFailure, RuntimeError};
use super::state::{AgentProcess, ProcRef};
use crate::image::ImageService;
use crate::image::store::ImageRecord;

/// What a pod's sandbox is started with.
pub struct LaunchSpec<'a> {
    /// The pod's cgroup, relative to the cgroup root.
    pub cgroup_parent: &'a str,
    pub config: &'a cri::PodSandboxConfig,
    /// VM sandboxes: the pod's CNI network as a tap (None: no CNI network).
    pub network: Option<&'a crate::network::tap::VmNic>,
    /// Where the launch reports its phases (spawn, agent ready).
    pub start: &'a crate::metrics::PodStart,
    /// VM sandboxes: (vCPUs, MiB) instead of the size from `config` (a pooled VM's).
    pub vm_size: Option<(u32, u32)>,
    /// VM sandboxes: background work (a pooled VM's boot): its cgroup gets the least CPU
    /// weight, so it runs on what pods leave (a claim gives the default back).
    pub background: bool,
}

/// How a pod's agent is launched, found again and stopped.
#[async_trait::async_trait]
pub trait SandboxKind: Send + Sync {
    /// Starts the agent of pod `id` and connects to it.
    async fn launch(
        &self,
        id: &str,
        spec: &LaunchSpec<'_>,
    ) -> Result<(AgentProcess, Agent), RuntimeError>;
    /// Dials the agent of a running pod again (after a huskd restart).
    async fn connect(&self, p: &AgentProcess) -> Result<Agent, AgentError> {
        Agent::connect(&p.socket).await
    }
    /// Whether the agent process is still there (not exited, pid not reused).
    fn alive(&self, p: &AgentProcess) -> bool;
    /// The processes whose exit ends the pod (what `alive` checks).
    fn watched(&self, p: &AgentProcess) -> Vec<ProcRef> {
        vec![ProcRef {
            pid: p.pid,
            start_time: p.start_time,
        }]
    }
    /// Pod `id`'s agent connection broke while `what` was being set up: the error that says
    /// why when the agent's process exited (a VM's console and VMM log), None while it runs.
    async fn exited_during(
        &self,
        _id: &str,
        _p: &AgentProcess,
        _what: &'static str,
    ) -> Option<RuntimeError> {
        None
    }
    /// Stops the agent process: SIGTERM, `grace`, SIGKILL.
    async fn shutdown(&self, p: &AgentProcess, grace: Duration);
    /// Removes the pod's runtime files.
    fn cleanup(&self, id: &str);
    /// A connection to the agent's port-forward endpoint (guest-agent
    /// `forward.rs`: `FORWARD <port>\n` → `OK\n` / `ERR <msg>\n`, then raw
    /// bytes to localhost:<port> in the pod's network namespace).
    async fn dial_forward(
        &self,
        _p: &AgentProcess,
    ) -> Result<tokio::net::UnixStream, RuntimeError> {
        Err(RuntimeError::FailedPrecondition(
            "port forwarding is not available for this sandbox kind yet".into(),
        ))
    }
    /// Makes `image` available to the pod's agent as a container rootfs. `in_use`: the ids
    /// of the images the pod's containers use now (a VM kind may unplug the disk of an image
    /// outside it to make room).
    async fn rootfs(
        &self,
        id: &str,
        p: &AgentProcess,
        image: &ImageRecord,
        in_use: &HashSet<String>,
    ) -> Result<pb::Rootfs, RuntimeError>;
    /// The agent runs in a guest (host paths are not visible to it).
    fn agent_in_guest(&self) -> bool {
        false
    }
    /// Deadline of the pod's setup calls to its freshly started agent (CreateSandbox,
    /// ConfigureNetwork): part of the pod's start, not an ordinary call.
    fn setup_timeout(&self) -> Duration {
        super::agent::RPC_TIMEOUT
    }
    /// The host directory the guest sees as sandbox mount `share` (virtio-fs), where a
    /// container's CRI mounts are bound (`share.rs`); None: host paths are used directly.
    fn share_dir(&self, _p: &AgentProcess) -> Option<std::path::PathBuf> {
        None
    }
    /// husk-ns: the pod's run dir, holding the shared directory through which
    /// bidirectional volumes reach the agent (`propagation.rs`); None: not supported.
    fn propagation_pod_dir(&self, _id: &str) -> Option<std::path::PathBuf> {
        None
    }
}

/// `husk-ns`: per pod a `husk-agent --host` process, the init of a fresh PID
/// namespace (via `unshare --pid --fork --kill-child`), in its own session
/// and process group so it outlives huskd. The agent unshares a private
/// mount namespace; the pod's net/ipc/uts namespaces are made by the agent's
/// CreateSandbox. Container-level isolation: the pod shares the host kernel.
pub struct NamespaceSandbox {
    pub run_dir: PathBuf,
    pub agent_binary: PathBuf,
    pub start_timeout: Duration,
    pub images: std::sync::Arc<ImageService>,
}

impl NamespaceSandbox {
    pub fn pod_dir(&self, id: &str) -> PathBuf {
        self.run_dir.join("pods").join(id)
    }
}

#[async_trait::async_trait]
impl SandboxKind for NamespaceSandbox {
    async fn launch(
        &self,
        id: &str,
        spec: &LaunchSpec<'_>,
    ) -> Result<(AgentProcess, Agent), RuntimeError> {
        spec.start.mark();
        let dir = self.pod_dir(id);
        std::fs::create_dir_all(&dir).map_err(RuntimeError::io("pod run dir", &dir))?;
        let peer = super::propagation::host_dir(&dir);
        super::propagation::setup(&peer).map_err(RuntimeError::io("pod propagation dir", &peer))?;
        let socket = dir.join("agent.sock");
        let log_path = dir.join("agent.log");
        let log =
            std::fs::File::create(&log_path).map_err(RuntimeError::io("agent log", &log_path))?;
        let log2 = log
            .try_clone()
            .map_err(RuntimeError::io("agent log", &log_path))?;
        let mut cmd = Command::new("unshare");
        super::helper_log::without_backtraces(&mut cmd)
            .args(["--pid", "--fork", "--kill-child"])
            .arg(&self.agent_binary)
            .arg("--host")
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .arg("--forward-listen")
            .arg(format!("unix:{}", forward_socket(&socket).display()))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--propagation-dir")
            .arg(&peer)
            .env(
                "RUST_LOG",
                std::env::var("HUSK_AGENT_LOG").unwrap_or_else(|_| "husk_agent=info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        super::orphans::mark(&mut cmd, id, &self.run_dir);
        // SAFETY: setsid(2) is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid().map_err(std::io::Error::from)?;
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|source| RuntimeError::Spawn {
            program: format!("unshare {}", self.agent_binary.display()),
            source,
        })?;
        let pid = child.id() as i32;
        spec.start.end(crate::metrics::Phase::Spawn);
        super::orphans::crash_point("run_pod:spawned");
        // Reap it while this huskd lives; after a restart init does.
        std::thread::spawn(move || {
            let _ = child.wait();
        });
        let proc = AgentProcess {
            pid,
            start_time: start_time(pid).unwrap_or(0),
            socket: socket.clone(),
            vm: None,
        };
        let deadline = Instant::now() + self.start_timeout;
        loop {
            if socket.exists()
                && let Ok(agent) = Agent::connect(&socket).await
                && agent.check(Duration::from_secs(2)).await.is_ok()
            {
                tracing::debug!(pod = id, pid, "agent up");
                spec.start.end(crate::metrics::Phase::AgentReady);
                return Ok((proc, agent));
            }
            let gone = !self.alive(&proc);
            if gone || Instant::now() > deadline {
                self.shutdown(&proc, Duration::ZERO).await;
                let tail = super::helper_log::tail(&log_path, 5);
                return Err(RuntimeError::AgentStart {
                    binary: self.agent_binary.clone(),
                    failure: if gone {
                        AgentStartFailure::Exited
                    } else {
                        AgentStartFailure::Timeout
                    },
                    log: tail,
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn alive(&self, p: &AgentProcess) -> bool {
        proc_alive(p.pid, p.start_time)
    }

    async fn rootfs(
        &self,
        _id: &str,
        _p: &AgentProcess,
        image: &ImageRecord,
        _in_use: &HashSet<String>,
    ) -> Result<pb::Rootfs, RuntimeError> {
        Ok(pb::Rootfs {
            source: Some(pb::rootfs::Source::Overlay(pb::OverlayRootfs {
                lower_dirs: self
                    .images
                    .lower_dirs(image)
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect(),
                ..Default::default()
            })),
            ..Default::default()
        })
    }

    async fn shutdown(&self, p: &AgentProcess, grace: Duration) {
        if !self.alive(p) {
            return;
        }
        // The agent is unshare's child: SIGTERM it so it tears its sandbox down.
        if !grace.is_zero() {
            for c in children(p.pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(c),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            let deadline = Instant::now() + grace;
            while self.alive(p) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        if self.alive(p) {
            // --kill-child: the agent (and with it the pod's PID namespace) gets SIGKILL too.
            let (pid, start) = (p.pid, p.start_time);
            let _ = tokio::task::spawn_blocking(move || kill_wait(pid, start)).await;
        }
    }

    async fn dial_forward(&self, p: &AgentProcess) -> Result<tokio::net::UnixStream, RuntimeError> {
        let path = forward_socket(&p.socket);
        tokio::net::UnixStream::connect(&path)
            .await
            .map_err(|source| RuntimeError::ForwardDial { path, source })
    }

    fn propagation_pod_dir(&self, id: &str) -> Option<PathBuf> {
        Some(self.pod_dir(id))
    }

    fn cleanup(&self, id: &str) {
        let dir = self.pod_dir(id);
        // Host sources may be bound below it: never removed by path while they are.
        if !super::propagation::teardown(&super::propagation::host_dir(&dir)) {
            tracing::error!(pod = id, dir = %dir.display(), "propagation dir still mounted: pod run dir left in place");
            return;
        }
        if let Err(e) = std::fs::remove_dir_all(&dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(pod = id, error = %e, "remove pod run dir");
        }
    }
}

/// The agent's port-forward socket, next to its ttrpc socket.
fn forward_socket(agent_socket: &Path) -> PathBuf {
    agent_socket.with_file_name("forward.sock")
}

/// (state, start time) from /proc/PID/stat.
fn proc_stat(pid: i32) -> Option<(char, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = s.rsplit_once(") ")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); start time is field 22.
    let state = fields.first()?.chars().next()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

/// `pid` runs (not a zombie) and is the process started at `start_time`
/// (0 = not recorded).
/// SIGKILL to process `pid` (if it is still the one started at `start_time`), then wait up
/// to 5 s for it to be gone. Blocking.
pub fn kill_wait(pid: i32, start_time: u64) {
    if proc_alive(pid, start_time) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let t = Instant::now();
    while proc_alive(pid, start_time) && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub fn proc_alive(pid: i32, start_time: u64) -> bool {
    match proc_stat(pid) {
        Some((state, start)) => {
            state != 'Z' && state != 'X' && (start_time == 0 || start == start_time)
        }
        None => false,
    }
}

pub fn start_time(pid: i32) -> Option<u64> {
    proc_stat(pid).map(|(_, s)| s)
}

fn children(pid: i32) -> Vec<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// rmdir a cgroup subtree (deepest first) in every mounted hierarchy: what
/// is left when an agent died without cleaning up. Returns what remains.
pub fn remove_cgroup_tree(rel: &str) -> Vec<PathBuf> {
    fn walk(dir: &Path) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                walk(&e.path());
            }
        }
        let _ = std::fs::remove_dir(dir);
    }
    let rel = rel.trim_start_matches('/');
    if rel.is_empty() {
        return vec![];
    }
    let root = Path::new("/sys/fs/cgroup");
    let mut roots = vec![root.to_path_buf()];
    roots.extend(
        std::fs::read_dir(root)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_dir()),
    );
    let mut left = vec![];
    for r in roots {
        let d = r.join(rel);
        if d.is_dir() {
            walk(&d);
            if d.exists() {
                left.push(d);
            }
        }
    }
    left
}

/// [`remove_cgroup_tree`], retried while the pod's processes are still
/// dying (rmdir of a cgroup with tasks fails with EBUSY).
pub async fn remove_cgroup_tree_patiently(rel: &str, timeout: Duration) -> Vec<PathBuf> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = remove_cgroup_tree(rel);
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Removes a pod's cgroups: the whole `parent` tree when huskd chose it
/// (`owned`), else only what the agent made below a parent the CRI gave
/// (the kubelet owns that one).
pub async fn remove_pod_cgroups(parent: &str, owned: bool, timeout: Duration) -> Vec<PathBuf> {
    if owned {
        return remove_cgroup_tree_patiently(parent, timeout).await;
    }
    let parent = parent.trim_start_matches('/');
    if parent.is_empty() {
        return vec![];
    }
    let root = Path::new("/sys/fs/cgroup");
    let mut children = std::collections::BTreeSet::new();
    for r in std::iter::once(root.to_path_buf()).chain(
        std::fs::read_dir(root)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path()),
    ) {
        for e in std::fs::read_dir(r.join(parent))
            .into_iter()
            .flatten()
            .flatten()
        {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                children.insert(e.file_name().to_string_lossy().into_owned());
            }
        }
    }
    let mut left = vec![];
    for c in children {
        left.extend(remove_cgroup_tree_patiently(&format!("{parent}/{c}"), timeout).await);
    }
    left
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The longest socket path below `run_dir` is the bound config.rs checks.
    #[test]
    fn agent_socket_paths_fit_the_run_dir_bound() {
        let images = crate::image::ImageService::open(crate::image::ImageSettings {
            root: tempfile::tempdir().unwrap().keep(),
            registry_config_dir: None,
            docker_config: None,
            max_concurrent_downloads: 1,
        })
        .unwrap();
        let ns = NamespaceSandbox {
            run_dir: "/r".into(),
            agent_binary: "husk-agent".into(),
            start_timeout: Duration::from_secs(1),
            images,
        };
        let agent = ns.pod_dir(&"f".repeat(64)).join("agent.sock");
        let forward = forward_socket(&agent);
        assert!(agent.as_os_str().len() < forward.as_os_str().len());
        assert_eq!(
            forward.as_os_str().len() - "/r".len(),
            crate::config::NS_RUN_DIR_SOCKET_SUFFIX_MAX
        );
    }

    #[test]
    fn proc_stat_of_self() {
        let (state, start) = proc_stat(std::process::id() as i32).expect("stat");
        assert!(state == 'R' || state == 'S', "{state}");
        assert!(start > 0);
        assert!(proc_stat(i32::MAX).is_none());
    }
}

//! Helpers for the RuntimeService suites: CRI config builders, CRI log
//! parsing, waiting, cgroup files, and cleanup of pods a test left behind
//! (their agents outlive huskd by design).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use husk_host::client::Clients;
use husk_proto::cri;

pub fn pod_config(name: &str, log_dir: &Path) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "e2e".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        log_directory: log_dir.join(name).display().to_string(),
        labels: [("app".to_string(), name.to_string())].into(),
        annotations: [("note".to_string(), "e2e".to_string())].into(),
        ..Default::default()
    }
}

pub fn container_config(name: &str, image: &str, cmd: &[&str]) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: image.into(),
            ..Default::default()
        }),
        command: cmd.iter().map(|s| s.to_string()).collect(),
        log_path: format!("{name}.log"),
        labels: [("ctr".to_string(), name.to_string())].into(),
        annotations: [("a".to_string(), "b".to_string())].into(),
        ..Default::default()
    }
}

/// `(stream, partial, content)` records of a CRI log file; panics on a malformed line.
pub fn log_records(path: &Path) -> Vec<(String, bool, String)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let (s, p, c) = husk_host::sandbox::logs::parse_record(l)
                .unwrap_or_else(|| panic!("malformed CRI log line {l:?}"));
            (s.to_string(), p, c.to_string())
        })
        .collect()
}

pub async fn container_status(
    c: &Clients,
    id: &str,
) -> Result<cri::ContainerStatusResponse, tonic::Status> {
    c.runtime
        .clone()
        .container_status(cri::ContainerStatusRequest {
            container_id: id.into(),
            verbose: true,
        })
        .await
        .map(|r| r.into_inner())
}

pub async fn pod_status(
    c: &Clients,
    id: &str,
) -> Result<cri::PodSandboxStatusResponse, tonic::Status> {
    c.runtime
        .clone()
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: id.into(),
            verbose: true,
        })
        .await
        .map(|r| r.into_inner())
}

/// Waits until the container is EXITED; returns its status.
pub async fn wait_exited(c: &Clients, id: &str, timeout: Duration) -> cri::ContainerStatus {
    let deadline = Instant::now() + timeout;
    loop {
        let st = container_status(c, id)
            .await
            .expect("container status")
            .status
            .expect("status");
        if st.state == cri::ContainerState::ContainerExited as i32 {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "container {id} did not exit: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `f` until it returns true.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The "info" JSON of a verbose status.
pub fn info(m: &std::collections::HashMap<String, String>) -> serde_json::Value {
    serde_json::from_str(m.get("info").map(String::as_str).unwrap_or("{}")).expect("info json")
}

/// Kills the agents of every pod recorded under `state_dir` and removes
/// their cgroups: what a test leaves behind when it fails half way.
pub fn kill_leftover_pods(state_dir: &Path) {
    for e in std::fs::read_dir(state_dir.join("pods"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let Ok(text) = std::fs::read_to_string(e.path().join("pod.json")) else {
            continue;
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
            continue;
        };
        let helpers = v["agent"]["vm"]["helpers"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let pids = v["agent"]["pid"]
            .as_i64()
            .into_iter()
            .chain(helpers.iter().filter_map(|h| h["pid"].as_i64()));
        for pid in pids {
            // SAFETY: plain kill(2); the pid is the agent's unshare process (start time not rechecked: test cleanup).
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                if stat
                    .rsplit_once(") ")
                    .is_some_and(|(_, r)| r.starts_with('Z'))
                {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if let Some(cg) = v["cgroup_parent"].as_str() {
            // The pod's processes die with the agent's PID namespace, not instantly.
            let deadline = Instant::now() + Duration::from_secs(5);
            while !remove_cgroup_tree(cg).is_empty() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// rmdir a cgroup subtree (deepest first) in every hierarchy; returns what is left.
pub fn remove_cgroup_tree(rel: &str) -> Vec<PathBuf> {
    husk_host::sandbox::kind::remove_cgroup_tree(rel)
}

/// Whether any hierarchy still has `rel`.
pub fn cgroup_exists(rel: &str) -> bool {
    let root = Path::new("/sys/fs/cgroup");
    std::iter::once(root.to_path_buf())
        .chain(
            std::fs::read_dir(root)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path()),
        )
        .any(|r| r.join(rel.trim_start_matches('/')).is_dir())
}

/// Direct children of `pid`.
pub fn children(pid: i32) -> Vec<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

pub fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z')))
        .unwrap_or(false)
}

/// The namespace sandbox's runtime handler.
pub const NS: &str = "husk-ns";

/// What the namespace-sandbox suites need (printed when they skip).
pub const NS_NEEDS: &str = "needs root, /usr/bin/docker-registry, /bin/busybox and unshare(1) (tests/run.sh installs them)";

/// Whether the namespace sandbox can run here: root, docker-registry,
/// busybox and unshare(1).
pub fn ns_env_ok() -> bool {
    crate::registry::available()
        && crate::is_root()
        && Path::new("/bin/busybox").exists()
        && std::process::Command::new("unshare")
            .arg("--version")
            .output()
            .is_ok()
}

/// The QEMU handler of the VM suites (TCG on machines without hardware KVM).
pub const QEMU: &str = "husk-qemu";

/// The husk-vmm handler.
pub const HUSK: &str = "husk";

/// `[runtime.handlers]` entries of both VM handlers (TOML lines).
pub const VM_HANDLERS: &str = "husk = \"vm\"\nhusk-qemu = { kind = \"qemu\", accel = \"tcg\" }\n";

/// The handler the VM suites run their pods on: `husk-qemu` (QEMU/TCG), or `husk` (husk-vmm)
/// with `HUSK_VM_HANDLER=husk`, which needs a /dev/kvm that runs Linux: hardware KVM, or the
/// nested L1 node VM of `tests/nested/husk-suite.sh`.
pub fn vm_handler() -> &'static str {
    match std::env::var("HUSK_VM_HANDLER").as_deref() {
        Ok("husk") => HUSK,
        Ok("husk-qemu") | Ok("") | Err(_) => QEMU,
        Ok(other) => panic!("HUSK_VM_HANDLER={other}: expected husk or husk-qemu"),
    }
}

/// Whether the VM suites run on husk-vmm (else QEMU).
pub fn on_husk_vmm() -> bool {
    vm_handler() == HUSK
}

/// The `kind` and `isolation` a VM pod of [`vm_handler`] reports in its verbose status.
pub fn vm_kind() -> (&'static str, &'static str) {
    if on_husk_vmm() {
        ("vm", "virtual machine (husk-vmm)")
    } else {
        ("qemu", "virtual machine (QEMU)")
    }
}

/// What the VM-sandbox suites need (printed when they skip).
pub const VM_NEEDS: &str = "needs root, docker-registry, busybox, unshare, HUSK_GUEST_KERNEL/HUSK_GUEST_INITRD, and qemu-system-x86_64 (husk-qemu) or a /dev/kvm that runs Linux (HUSK_VM_HANDLER=husk) (tests/run.sh provides them)";

/// The guest kernel and initramfs (`HUSK_GUEST_KERNEL`, `HUSK_GUEST_INITRD`; tests/run.sh
/// builds them).
pub fn guest() -> Option<(String, String)> {
    Some((
        std::env::var("HUSK_GUEST_KERNEL").ok()?,
        std::env::var("HUSK_GUEST_INITRD").ok()?,
    ))
}

/// Whether VM pods of [`vm_handler`] can run here: what the namespace sandbox needs, the
/// guest, and QEMU (husk-qemu) or hardware KVM (husk).
pub fn vm_env_ok() -> bool {
    ns_env_ok()
        && guest().is_some()
        && if on_husk_vmm() {
            crate::nested::hardware_kvm()
        } else {
            std::process::Command::new("qemu-system-x86_64")
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        }
}

/// The gRPC code of a call that must fail.
pub fn code_of<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> tonic::Code {
    r.expect_err("expected an error").code()
}

pub fn cgroup_v2() -> bool {
    Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
}

/// A cgroup file of `rel`: the v1 controller's `v1` file, or the unified `v2` one.
pub fn cgroup_file(rel: &str, controller: &str, v1: &str, v2: &str) -> String {
    let p = if cgroup_v2() {
        Path::new("/sys/fs/cgroup").join(rel).join(v2)
    } else {
        let root = Path::new("/sys/fs/cgroup");
        let dir = [
            controller.to_string(),
            format!("{controller},cpuacct"),
            format!("cpu,{controller}"),
        ]
        .iter()
        .map(|c| root.join(c))
        .find(|d| d.is_dir())
        .unwrap_or_else(|| root.join(controller));
        dir.join(rel).join(v1)
    };
    std::fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .trim()
        .to_string()
}

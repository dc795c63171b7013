//! What the agent tells the runner (serialized as JSON over `INIT_FD`).

use std::path::PathBuf;

use nix::sched::CloneFlags;
use oci_spec::runtime::{Linux, Process, Spec};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Ns {
    Net,
    Ipc,
    Uts,
    Pid,
    Mnt,
    Cgroup,
}

impl Ns {
    pub fn flag(self) -> CloneFlags {
        match self {
            Ns::Net => CloneFlags::CLONE_NEWNET,
            Ns::Ipc => CloneFlags::CLONE_NEWIPC,
            Ns::Uts => CloneFlags::CLONE_NEWUTS,
            Ns::Pid => CloneFlags::CLONE_NEWPID,
            Ns::Mnt => CloneFlags::CLONE_NEWNS,
            Ns::Cgroup => CloneFlags::CLONE_NEWCGROUP,
        }
    }

    /// The name under /proc/PID/ns/.
    pub fn proc_name(self) -> &'static str {
        match self {
            Ns::Net => "net",
            Ns::Ipc => "ipc",
            Ns::Uts => "uts",
            Ns::Pid => "pid",
            Ns::Mnt => "mnt",
            Ns::Cgroup => "cgroup",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NsJoin {
    pub ns: Ns,
    pub path: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RootfsMount {
    /// overlay with lowerdirs (top first) and a per-container upper/work dir.
    Overlay {
        lower: Vec<PathBuf>,
        upper: PathBuf,
        work: PathBuf,
    },
    /// A directory bind-mounted as the root.
    Bind { path: PathBuf },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContainerInit {
    /// The spec after the agent resolved sandbox mounts and /etc files.
    pub spec: Spec,
    pub rootfs: RootfsMount,
    /// Where the rootfs is mounted before pivot_root.
    pub rootfs_dir: PathBuf,
    pub tty: bool,
    /// Device nodes bind-mounted from the agent's /dev (null, zero, ...).
    pub host_devices: Vec<String>,
    /// Env added when missing (HOME, PATH defaults).
    pub extra_env: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecInit {
    pub process: Process,
    /// The container's linux section (seccomp applies to exec'd processes too).
    pub linux: Option<Linux>,
    pub tty: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PauseInit {
    pub hostname: Option<String>,
    pub loopback_up: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[allow(clippy::large_enum_variant)]
pub enum InitMode {
    Container(ContainerInit),
    Exec(ExecInit),
    Pause(PauseInit),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InitConfig {
    /// cgroup.procs files to write "0" to before anything else.
    pub cgroup_procs: Vec<PathBuf>,
    pub join: Vec<NsJoin>,
    pub unshare: Vec<Ns>,
    pub mode: InitMode,
}

//! The VM sandbox's own failures (both backends), each with its cause; their gRPC codes are
//! chosen in `cri/error.rs`.

use std::path::PathBuf;

use super::husk_vmm::vmmctl::VmmCtlError;
use super::hybrid::HybridError;
use super::qemu::qmp::QmpError;
use crate::image::block::BlockError;
use crate::network::tap::TapError;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The VM exited or did not bring its agent up in time; the tails of the guest console
    /// and the logs say why.
    #[error(
        "{backend} VM of pod {pod} {failure}; guest console (last lines): {console}; {backend} log: {vmm_log}{helper_logs}"
    )]
    Boot {
        backend: &'static str,
        pod: String,
        failure: BootFailure,
        console: String,
        vmm_log: String,
        /// `; <helper> log: <tail>` for each helper (QEMU's vsock server).
        helper_logs: String,
    },
    /// A vhost-user server exited or did not create its socket in time.
    #[error("husk-vmm vhost-user {server} did not start: {log}")]
    HelperStart { server: &'static str, log: String },
    /// The VMM or a helper could not be started (a missing or unusable binary).
    #[error("start {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    /// The pipes to the pod's log writer.
    #[error("log pipes: {0}")]
    LogPipes(#[source] std::io::Error),
    #[error("log {}: {source}", path.display())]
    LogFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("too many log pipes")]
    TooManyLogs,
    #[error("no log pipe {0}")]
    NoLogPipe(String),
    #[error("log pipe {name}: {source}")]
    LogPipe {
        name: String,
        #[source]
        source: std::io::Error,
    },
    /// The pod's tap (in the pod's network namespace) for the guest's NIC.
    #[error("VM pod network: {0}")]
    Tap(#[source] TapError),
    #[error("VM pod network: open {}: {source}", path.display())]
    Netns {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Where image block images are kept.
    #[error("image block dir: {0}")]
    BlockDir(#[source] std::io::Error),
    /// An image's block image (built on first use).
    #[error("rootfs block image: {0}")]
    BlockImage(#[source] BlockError),
    /// QEMU's disk hot-plug over QMP.
    #[error("attach image disk: {0}")]
    Qmp(#[source] QmpError),
    /// husk-vmm's disk slots over its control socket.
    #[error("attach image disk: {0}")]
    VmmCtl(#[source] VmmCtlError),
    /// The agent's port-forward endpoint in the guest (over hybrid vsock).
    #[error("agent port-forward endpoint in the guest: {0}")]
    Forward(#[source] HybridError),
    /// Every uid of the jail range is held by a pod.
    #[error("all {count} jail uids from {base} are taken (runtime.vm.jail_uid_count)")]
    JailUidsTaken { count: u32, base: u32 },
}

/// How a booting VM failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BootFailure {
    #[error("exited during boot")]
    Exited,
    /// The agent came up, then the VM exited while huskd set the pod up (`{0}`).
    #[error("exited after its agent came up, during {0}")]
    ExitedDuring(&'static str),
    #[error("did not bring the agent up within {0} ms (runtime.vm.boot_timeout_ms)")]
    Timeout(u64),
}

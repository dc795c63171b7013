//! The backend interface of the VM sandbox: the few calls whose work differs between QEMU
//! and husk-vmm, each dispatched here, in one place, to the backend's module (`qemu/`,
//! `husk_vmm/`). Everything else about a VM pod (run dir, jail uid, logs, cgroup, boot wait,
//! agent dial, cleanup) is the same for both and lives in `mod.rs`.

use std::path::Path;

use super::qemu::qmp::DiskNames;
use super::{Start, husk_vmm, qemu};
use crate::config::{Accel, HandlerKind, VmConfig};
use crate::sandbox::error::RuntimeError;
use crate::sandbox::state::ProcRef;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Backend {
    /// QEMU (handler kind `qemu`), KVM or TCG.
    Qemu,
    /// husk-vmm (handler kind `vm`), KVM only.
    HuskVmm,
}

impl Backend {
    pub fn of(kind: HandlerKind) -> Self {
        match kind {
            HandlerKind::Qemu => Backend::Qemu,
            _ => Backend::HuskVmm,
        }
    }

    /// The VMM's name in messages.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Qemu => "QEMU",
            Backend::HuskVmm => "husk-vmm",
        }
    }

    /// The pod's log files (each a pipe to the pod's log writer).
    pub fn logs(self) -> &'static [&'static str] {
        match self {
            Backend::Qemu => qemu::launch::LOGS,
            Backend::HuskVmm => husk_vmm::LOGS,
        }
    }

    /// What the backend needs beyond the guest image and the husk-vmm binary.
    pub fn preflight(self, cfg: &VmConfig, accel: Accel) -> Result<(), RuntimeError> {
        match self {
            Backend::Qemu => qemu::launch::preflight(cfg, accel),
            Backend::HuskVmm => husk_vmm::preflight(cfg),
        }
    }

    /// Starts the VMM and its helpers: (VMM, helpers).
    pub fn start(self, s: &Start<'_>) -> Result<(ProcRef, Vec<ProcRef>), RuntimeError> {
        match self {
            Backend::Qemu => qemu::launch::start(s),
            Backend::HuskVmm => husk_vmm::start(s),
        }
    }

    /// Attaches the image disk `names` (backed by `file`) to the running VM in `dir`;
    /// `used` says whether a disk's image is still used by a container.
    pub async fn attach_disk(
        self,
        dir: &Path,
        file: &Path,
        names: &DiskNames,
        cfg: &VmConfig,
        used: &(dyn Fn(&str) -> bool + Sync),
    ) -> Result<(), RuntimeError> {
        match self {
            Backend::Qemu => {
                qemu::launch::attach_disk(dir, file, names, cfg, &|d| used(&d.serial)).await
            }
            Backend::HuskVmm => husk_vmm::attach_disk(dir, file, &names.serial, used).await,
        }
    }

    /// Stops a VM the agent's shutdown left running, before it is killed.
    pub async fn quit(self, vmm: &ProcRef, dir: &Path) {
        match self {
            Backend::Qemu => qemu::launch::quit(vmm, dir).await,
            // husk-vmm has no stop channel besides the guest's power-off: it is killed.
            Backend::HuskVmm => {}
        }
    }

    /// The helper logs a start error quotes besides the console and the VMM's.
    pub fn start_error_logs(self, dir: &Path) -> String {
        match self {
            Backend::Qemu => qemu::launch::start_error_logs(dir),
            Backend::HuskVmm => String::new(),
        }
    }
}

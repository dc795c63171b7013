//! The husk-vmm backend (handler `husk`): our own VMM on hardware KVM, serving the
//! hybrid-vsock socket and the pod share itself; `vmmctl.rs` talks to its control socket
//! (disk slots).

mod net;
pub mod vmmctl;

use std::path::Path;
use std::time::Duration;

use super::process::spawn_detached;
use super::{GUEST_CID, SHARE_FD, SHARE_TAG, Start, VmError, jail};
use crate::config::VmConfig;
use crate::sandbox::error::RuntimeError;
use crate::sandbox::orphans::mark;
use crate::sandbox::state::ProcRef;

/// husk-vmm control-socket answers (disk slots).
const VMM_CTL_TIMEOUT: Duration = Duration::from_secs(10);
/// Disk slots husk-vmm supports (its MAX_DISK_SLOTS: one virtio IRQ each).
pub(super) const VMM_MAX_DISK_SLOTS: u32 = 16;

/// The pod's log files: the console and husk-vmm's own output.
pub(super) const LOGS: &[&str] = &["console.log", "vmm.log"];

/// What husk-vmm needs beyond what every backend does.
pub(super) fn preflight(cfg: &VmConfig) -> Result<(), RuntimeError> {
    let missing = |what: String| Err(RuntimeError::FailedPrecondition(what));
    if cfg.hotplug_slots > VMM_MAX_DISK_SLOTS {
        return missing(format!(
            "VM sandbox: runtime.vm.hotplug_slots is {}, husk-vmm supports at most {VMM_MAX_DISK_SLOTS} disk slots",
            cfg.hotplug_slots
        ));
    }
    if !super::host::kvm_opens() {
        return missing(
            "VM sandbox: husk-vmm needs /dev/kvm, which cannot be opened here \
             (no KVM: use the husk-qemu handler, which can run on TCG)"
                .into(),
        );
    }
    Ok(())
}

/// Starts husk-vmm (it serves vsock and the share itself: no helpers).
pub(super) fn start(s: &Start<'_>) -> Result<(ProcRef, Vec<ProcRef>), RuntimeError> {
    let Start {
        id,
        dir,
        vcpus,
        memory_mib,
        nic,
        logs,
        uid,
        cfg,
        run_dir,
        ref cmdline,
        ref vmm,
        ref sock,
        ref uds,
        ref share,
        ref share_arg,
        ref blocks,
        ..
    } = *s;
    let mut cmd = jail::command(
        vmm,
        uid,
        dir,
        vmm,
        &jail::Jailed {
            ro: vec![&cfg.kernel, &cfg.initrd, blocks],
            rw: vec![sock],
            devs: vec!["kvm"],
            open_dirs: vec![(share, SHARE_FD)],
            keep_fs_caps: true,
        },
    );
    cmd.arg("--kernel")
        .arg(&cfg.kernel)
        .arg("--initrd")
        .arg(&cfg.initrd)
        .args(["--cmdline", cmdline])
        .args(["--vcpus", &vcpus.min(255).to_string()])
        .args(["--memory", &memory_mib.to_string()])
        .arg("--vsock")
        .arg(format!("cid={GUEST_CID},uds={}", uds.display()))
        .arg("--fs")
        .arg(format!("tag={SHARE_TAG},dir={}", share_arg.display()))
        .args(["--serial", "stdout"])
        .arg("--control-socket")
        .arg(sock.join("control.sock"))
        // Empty read-only virtio-blk slots for image disks (filled by `rootfs`).
        .args(["--disk-slots", &cfg.hotplug_slots.to_string()]);
    if cfg.free_page_reporting {
        // Pages the guest frees go back to the host (virtio-balloon free page reporting).
        cmd.arg("--balloon");
    }
    mark(&mut cmd, id, run_dir);
    let ns = nic
        .map(|n| net::nic(&mut cmd, n, uid.is_some()))
        .transpose()?;
    let spawned = logs
        .sink("console.log")
        .and_then(|o| spawn_detached(cmd, o, logs.sink("vmm.log")?));
    drop(ns);
    Ok((spawned?, vec![]))
}

/// Fills a disk slot with `file`: the image's slot if one holds it, else the next empty one.
pub(super) async fn attach_disk(
    dir: &Path,
    file: &Path,
    serial: &str,
    used: &(dyn Fn(&str) -> bool + Sync),
) -> Result<(), RuntimeError> {
    vmmctl::attach_disk(
        &jail::sock_dir(dir).join("control.sock"),
        file,
        serial,
        VMM_CTL_TIMEOUT,
        used,
    )
    .await
    .map_err(|e| VmError::VmmCtl(e).into())
}

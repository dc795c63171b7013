//! The QEMU backend's part of a VM pod (handler `husk-qemu`, KVM or TCG): what must exist,
//! the processes (husk-vmm's virtio-fs and vhost-user vsock servers, then QEMU itself), a
//! disk hot-plugged over QMP, and QMP `quit` when the guest does not power off.

use std::path::Path;
use std::time::{Duration, Instant};

use super::super::process::{kill_wait, spawn_detached, wait_socket};
use super::super::{GUEST_CID, SHARE_FD, SHARE_TAG, Start, VmError, jail};
use super::net;
use super::qmp;
use crate::config::{Accel, VmConfig};
use crate::sandbox::error::RuntimeError;
use crate::sandbox::kind::proc_alive;
use crate::sandbox::orphans::mark;
use crate::sandbox::state::ProcRef;

/// QMP answers (hot-plug, quit).
const QMP_TIMEOUT: Duration = Duration::from_secs(10);

/// The pod's log files: the console, QEMU's own output and each helper's.
pub(in crate::sandbox::vm) const LOGS: &[&str] = &["console.log", "vmm.log", "vsock.log", "fs.log"];

/// What QEMU needs beyond what every backend does.
pub(in crate::sandbox::vm) fn preflight(cfg: &VmConfig, accel: Accel) -> Result<(), RuntimeError> {
    let missing = |what: String| Err(RuntimeError::FailedPrecondition(what));
    if super::super::host::find_binary(&cfg.qemu_binary).is_none() {
        return missing(format!(
            "VM sandbox: {} not found (apt install qemu-system-x86, or set runtime.vm.qemu_binary)",
            cfg.qemu_binary.display()
        ));
    }
    if accel == Accel::Kvm && !super::super::host::kvm_opens() {
        return missing(
            "VM sandbox: QEMU with accel kvm needs /dev/kvm, which cannot be opened here \
             (use accel \"tcg\" or \"auto\")"
                .into(),
        );
    }
    Ok(())
}

/// Starts the fs and vsock servers, waits for their sockets, then QEMU. Returns QEMU and
/// the helpers.
pub(in crate::sandbox::vm) fn start(
    s: &Start<'_>,
) -> Result<(ProcRef, Vec<ProcRef>), RuntimeError> {
    let Start {
        id,
        dir,
        accel,
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
    } = *s;
    let out = |name: &str| -> Result<_, RuntimeError> { Ok((logs.sink(name)?, logs.sink(name)?)) };
    let helper = jail::Jailed {
        rw: vec![sock],
        ..Default::default()
    };
    let fs_helper = jail::Jailed {
        rw: vec![sock],
        open_dirs: vec![(share, SHARE_FD)],
        keep_fs_caps: true,
        ..Default::default()
    };
    let fs_sock = sock.join("fs.sock");
    let mut cmd = jail::command(vmm, uid, dir, vmm, &fs_helper);
    cmd.args(["vhost-user", "fs", "--tag", SHARE_TAG])
        .arg("--socket")
        .arg(&fs_sock)
        .arg("--shared-dir")
        .arg(share_arg);
    mark(&mut cmd, id, run_dir);
    let (o, e) = out("fs.log")?;
    let fs = spawn_detached(cmd, o, e)?;
    if let Err(e) = wait_socket(&fs, &fs_sock, &dir.join("fs.log"), "fs") {
        kill_wait(&fs);
        return Err(e);
    }
    let vu = sock.join("vu.sock");
    let mut cmd = jail::command(vmm, uid, dir, vmm, &helper);
    cmd.args(["vhost-user", "vsock", "--cid", &GUEST_CID.to_string()])
        .arg("--socket")
        .arg(&vu)
        .arg("--uds")
        .arg(uds);
    mark(&mut cmd, id, run_dir);
    let helper = match out("vsock.log").and_then(|(o, e)| spawn_detached(cmd, o, e)) {
        Ok(h) => h,
        Err(e) => {
            kill_wait(&fs);
            return Err(e);
        }
    };
    if let Err(e) = wait_socket(&helper, &vu, &dir.join("vsock.log"), "vsock") {
        kill_wait(&helper);
        kill_wait(&fs);
        return Err(e);
    }
    let args = super::args(&super::QemuSpec {
        binary: &cfg.qemu_binary,
        accel,
        vcpus,
        memory_mib,
        kernel: &cfg.kernel,
        initrd: &cfg.initrd,
        cmdline,
        // The serial console goes to QEMU's stdout, the log writer's pipe.
        console: None,
        vhost_user_vsock: &vu,
        vhost_user_fs: Some((&fs_sock, SHARE_TAG)),
        qmp: &sock.join("qmp.sock"),
        hotplug_slots: cfg.hotplug_slots,
        name: &format!("husk-{}", &id[..12.min(id.len())]),
        tcg_tb_mib: cfg.tcg_tb_mib,
        free_page_reporting: cfg.free_page_reporting,
    });
    let qemu_bin = super::super::host::find_binary(&cfg.qemu_binary)
        .unwrap_or_else(|| cfg.qemu_binary.clone());
    let mut cmd = jail::command(
        vmm,
        uid,
        dir,
        &qemu_bin,
        &jail::Jailed {
            ro: vec![&cfg.kernel, &cfg.initrd, blocks],
            rw: vec![sock],
            devs: if accel == Accel::Kvm {
                vec!["kvm"]
            } else {
                vec![]
            },
            ..Default::default()
        },
    );
    cmd.args(args);
    mark(&mut cmd, id, run_dir);
    let tap_fd = match nic.map(|n| net::nic(&mut cmd, n)).transpose() {
        Ok(fd) => fd,
        Err(e) => {
            kill_wait(&helper);
            kill_wait(&fs);
            return Err(e);
        }
    };
    let spawned = logs
        .sink("console.log")
        .and_then(|o| spawn_detached(cmd, o, logs.sink("vmm.log")?));
    drop(tap_fd);
    match spawned {
        Ok(vm) => Ok((vm, vec![helper, fs])),
        Err(e) => {
            kill_wait(&helper);
            kill_wait(&fs);
            Err(e)
        }
    }
}

/// Hot-plugs `file` as the image disk `names` (a slot whose disk no container uses is
/// emptied for it when all are taken).
pub(in crate::sandbox::vm) async fn attach_disk(
    dir: &Path,
    file: &Path,
    names: &qmp::DiskNames,
    cfg: &VmConfig,
    used: &(dyn Fn(&qmp::DiskNames) -> bool + Sync),
) -> Result<(), RuntimeError> {
    qmp::hotplug_disk(
        &jail::sock_dir(dir).join("qmp.sock"),
        file,
        names,
        cfg.hotplug_slots,
        QMP_TIMEOUT,
        used,
    )
    .await
    .map_err(|e| VmError::Qmp(e).into())
}

/// QMP `quit` for a VM still running after the agent's shutdown, then up to 1 s for it to go.
pub(in crate::sandbox::vm) async fn quit(vmm: &ProcRef, dir: &Path) {
    let _ = qmp::quit(
        &jail::sock_dir(dir).join("qmp.sock"),
        Duration::from_secs(1),
    )
    .await;
    let t = Instant::now();
    while proc_alive(vmm.pid, vmm.start_time) && t.elapsed() < Duration::from_secs(1) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The helper logs quoted in a start error.
pub(in crate::sandbox::vm) fn start_error_logs(dir: &Path) -> String {
    format!(
        "; vsock server log: {}",
        crate::sandbox::helper_log::tail(&dir.join("vsock.log"), 5)
    )
}

//! The VM sandbox: one micro-VM per pod, the agent as the guest's PID 1,
//! reached over hybrid vsock. Two backends behind one small set of calls
//! (launch, attach a disk, stop, kill, find again):
//! - `husk-vmm` (handler `husk`): our own VMM on hardware KVM; it serves the
//!   hybrid-vsock socket itself.
//! - QEMU (handler `husk-qemu`, KVM or TCG): q35 with husk-vmm's virtio-vsock
//!   device served over vhost-user (`husk-vmm vhost-user vsock`), QMP for
//!   disk hot-plug and shutdown.
//!
//! Every process is started detached (own session, outlives huskd), placed
//! in the pod's host cgroup, and recorded by pid + start time so a restarted
//! huskd finds it again.

pub mod hybrid;
pub mod jail;
mod net;
pub mod pool;
mod process;
pub mod qemu;
pub mod qmp;
use super::helper_log::tail;
use super::orphans::{crash_point, mark};
pub use process::LOG_MAX_BYTES;
use process::{PodLogs, kill_wait, place_in_cgroup, spawn_detached, wait_socket};
pub mod vmmctl;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use husk_proto::agent as pb;
use husk_proto::cri;

use super::agent::{Agent, AgentError};
use super::error::RuntimeError;
use super::kind::{LaunchSpec, SandboxKind, proc_alive};
use super::share::PodShare;
use super::state::{AgentProcess, ProcRef, VmProcess};
use crate::config::{Accel, HandlerKind as Kind, VmConfig};
use crate::image::store::{ImageRecord, hex_of};
use crate::image::{ImageService, KeyedLocks};

/// The agent's vsock port (guest-agent `VSOCK_PORT`).
pub const AGENT_PORT: u32 = 1024;
/// The agent's port-forward endpoint (guest-agent `forward::VSOCK_PORT`).
pub const FORWARD_PORT: u32 = 1025;
/// Guest CID given to the vsock device (one VM per device: any ≥ 3 works).
const GUEST_CID: u64 = 3;
/// The virtio-fs tag of the pod share (the agent mounts it as sandbox mount `share`).
pub const SHARE_TAG: &str = "husk-share";
/// How long a vhost-user server gets to create its socket.
pub(super) const HELPER_WAIT: Duration = Duration::from_secs(10);
/// QMP answers (hot-plug, quit).
const QMP_TIMEOUT: Duration = Duration::from_secs(10);
/// husk-vmm control-socket answers (disk slots).
const VMM_CTL_TIMEOUT: Duration = Duration::from_secs(10);
/// Disk slots husk-vmm supports (its MAX_DISK_SLOTS: one virtio IRQ each).
const VMM_MAX_DISK_SLOTS: u32 = 16;
/// The fd a jailed file server finds the pod share on.
const SHARE_FD: i32 = 3;
/// Console/log lines quoted in start errors.
const TAIL_LINES: usize = 15;

/// The guest kernel command line for a backend (before the configured
/// `kernel_params`); the nested test bed boots husk-vmm guests with it.
pub fn guest_cmdline(backend: Kind) -> String {
    // no_timer_check: under TCG on a loaded host the kernel's IO-APIC
    // timer check misses its window and panics ("IO-APIC + timer doesn't
    // work!"; seen with 20 guests booting at once). KVM guests skip the
    // check by themselves (kvm_guest_init).
    let mut c = String::from("console=ttyS0 panic=-1 quiet no_timer_check");
    if backend == Kind::Vm {
        // husk-vmm has no ACPI: reboot through the keyboard controller, and
        // find its i8042 without PNP; only the keyboard port, which never
        // answers commands (dumbkbd), so Ctrl-Alt-Del (SIGTERM) is decoded
        // as raw set 2 without a probe.
        c.push_str(" reboot=k noapictimer i8042.nopnp i8042.noaux i8042.nomux i8042.dumbkbd");
    }
    c
}

pub struct VmSandbox {
    pub backend: Kind,
    /// QEMU only; `Auto` is resolved at launch.
    pub accel: Accel,
    pub cfg: VmConfig,
    pub run_dir: PathBuf,
    pub images: Arc<ImageService>,
    hotplug: KeyedLocks,
}

impl VmSandbox {
    pub fn new(
        backend: Kind,
        accel: Accel,
        cfg: VmConfig,
        run_dir: PathBuf,
        images: Arc<ImageService>,
    ) -> Self {
        Self {
            backend,
            accel,
            cfg,
            run_dir,
            images,
            hotplug: KeyedLocks::default(),
        }
    }

    /// Short (unix socket paths must fit in 108 bytes): run_dir/vm/<16 hex>.
    fn pod_dir(&self, id: &str) -> PathBuf {
        self.run_dir.join("vm").join(&id[..16.min(id.len())])
    }

    fn name(&self) -> &'static str {
        match self.backend {
            Kind::Qemu => "QEMU",
            _ => "husk-vmm",
        }
    }

    /// Whether a pod could be started (binaries, guest image, KVM).
    pub fn ready(&self) -> Result<(), String> {
        self.preflight(qemu::resolve_accel(self.accel))
            .map_err(|e| e.to_string())
    }

    /// What must exist before anything is started.
    fn preflight(&self, accel: Accel) -> Result<(), RuntimeError> {
        let missing = |what: String| Err(RuntimeError::FailedPrecondition(what));
        for (what, p) in [("kernel", &self.cfg.kernel), ("initrd", &self.cfg.initrd)] {
            if !p.is_file() {
                return missing(format!(
                    "VM sandbox: guest {what} {} not found (build it with images/build-kernel.sh and images/build-initramfs.sh, \
                     or set runtime.vm.{what} in huskd's config)",
                    p.display()
                ));
            }
        }
        let vmm = self.cfg.vmm_path();
        if qemu::find_binary(&vmm).is_none() {
            return missing(format!(
                "VM sandbox: husk-vmm binary {} not found (runtime.vm.vmm_binary)",
                vmm.display()
            ));
        }
        match self.backend {
            Kind::Qemu => {
                if qemu::find_binary(&self.cfg.qemu_binary).is_none() {
                    return missing(format!(
                        "VM sandbox: {} not found (apt install qemu-system-x86, or set runtime.vm.qemu_binary)",
                        self.cfg.qemu_binary.display()
                    ));
                }
                if accel == Accel::Kvm && !qemu::kvm_opens() {
                    return missing(
                        "VM sandbox: QEMU with accel kvm needs /dev/kvm, which cannot be opened here \
                         (use accel \"tcg\" or \"auto\")"
                            .into(),
                    );
                }
            }
            _ => {
                if self.cfg.hotplug_slots > VMM_MAX_DISK_SLOTS {
                    return missing(format!(
                        "VM sandbox: runtime.vm.hotplug_slots is {}, husk-vmm supports at most {VMM_MAX_DISK_SLOTS} disk slots",
                        self.cfg.hotplug_slots
                    ));
                }
                if !qemu::kvm_opens() {
                    return missing(
                        "VM sandbox: husk-vmm needs /dev/kvm, which cannot be opened here \
                         (no KVM: use the husk-qemu handler, which can run on TCG)"
                            .into(),
                    );
                }
            }
        }
        Ok(())
    }

    /// vCPUs and MiB: the defaults plus the pod's limits (rounded up).
    pub fn size(&self, config: &cri::PodSandboxConfig) -> (u32, u32) {
        let r = config.linux.as_ref().and_then(|l| l.resources.as_ref());
        let cpus = r
            .filter(|r| r.cpu_quota > 0 && r.cpu_period > 0)
            .map(|r| (r.cpu_quota as u64).div_ceil(r.cpu_period as u64) as u32)
            .unwrap_or(0);
        let mem = r
            .map(|r| (r.memory_limit_in_bytes.max(0) as u64).div_ceil(1 << 20) as u32)
            .unwrap_or(0);
        (
            (self.cfg.vcpus + cpus).min(self.cfg.max_vcpus),
            (self.cfg.memory_mib.saturating_add(mem)).min(self.cfg.max_memory_mib),
        )
    }

    fn cmdline(&self) -> String {
        let mut c = guest_cmdline(self.backend);
        if !self.cfg.kernel_params.trim().is_empty() {
            c.push(' ');
            c.push_str(self.cfg.kernel_params.trim());
        }
        c
    }

    /// Starts the VMM (and for QEMU its vsock and fs servers), their output
    /// going to the pod's size-capped logs through one `husk-vmm log-writer`.
    /// Returns the VMM and the helpers (the log writer last).
    fn start_processes(
        &self,
        id: &str,
        dir: &Path,
        accel: Accel,
        size: (u32, u32),
        nic: Option<&crate::network::tap::VmNic>,
        uid: Option<u32>,
    ) -> Result<(ProcRef, Vec<ProcRef>), RuntimeError> {
        let names: &[&'static str] = match self.backend {
            Kind::Qemu => &["console.log", "vmm.log", "vsock.log", "fs.log"],
            _ => &["console.log", "vmm.log"],
        };
        jail::prepare(dir, uid)?;
        let vmm = qemu::find_binary(&self.cfg.vmm_path()).unwrap_or_else(|| self.cfg.vmm_path());
        let logs = PodLogs::start(&vmm, dir, names, self.cfg.log_max_bytes, uid, |c| {
            mark(c, id, &self.run_dir)
        })?;
        match self.start_vm_processes(id, dir, accel, size, nic, &logs, uid) {
            Ok((vm, mut helpers)) => {
                helpers.push(logs.proc.clone());
                Ok((vm, helpers))
            }
            Err(e) => {
                let writer = logs.proc.clone();
                drop(logs);
                kill_wait(&writer);
                Err(e)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn start_vm_processes(
        &self,
        id: &str,
        dir: &Path,
        accel: Accel,
        (vcpus, memory_mib): (u32, u32),
        nic: Option<&crate::network::tap::VmNic>,
        logs: &PodLogs,
        uid: Option<u32>,
    ) -> Result<(ProcRef, Vec<ProcRef>), RuntimeError> {
        let sock = jail::sock_dir(dir);
        let uds = sock.join("vsock.sock");
        let out =
            |name: &str| -> Result<_, RuntimeError> { Ok((logs.sink(name)?, logs.sink(name)?)) };
        let vmm = qemu::find_binary(&self.cfg.vmm_path()).unwrap_or_else(|| self.cfg.vmm_path());
        let share = dir.join("share");
        std::fs::create_dir_all(&share)
            .map_err(|e| RuntimeError::Internal(format!("pod share {}: {e}", share.display())))?;
        let blocks = self
            .images
            .block_dir()
            .map_err(|e| RuntimeError::Internal(format!("image block dir: {e}")))?;
        // The share is reached through fd 3 (opened before the jail's root changes), so volumes
        // bound into it later are seen.
        let share_arg = if uid.is_some() {
            PathBuf::from(format!("/proc/self/fd/{SHARE_FD}"))
        } else {
            share.clone()
        };
        let helper = jail::Jailed {
            rw: vec![&sock],
            ..Default::default()
        };
        let fs_helper = jail::Jailed {
            rw: vec![&sock],
            open_dirs: vec![(&share, SHARE_FD)],
            keep_fs_caps: true,
            ..Default::default()
        };
        match self.backend {
            Kind::Qemu => {
                let fs_sock = sock.join("fs.sock");
                let mut cmd = jail::command(&vmm, uid, dir, &vmm, &fs_helper);
                cmd.args(["vhost-user", "fs", "--tag", SHARE_TAG])
                    .arg("--socket")
                    .arg(&fs_sock)
                    .arg("--shared-dir")
                    .arg(&share_arg);
                mark(&mut cmd, id, &self.run_dir);
                let (o, e) = out("fs.log")?;
                let fs = spawn_detached(cmd, o, e)?;
                if let Err(e) = wait_socket(&fs, &fs_sock, &dir.join("fs.log"), "fs") {
                    kill_wait(&fs);
                    return Err(e);
                }
                let vu = sock.join("vu.sock");
                let mut cmd = jail::command(&vmm, uid, dir, &vmm, &helper);
                cmd.args(["vhost-user", "vsock", "--cid", &GUEST_CID.to_string()])
                    .arg("--socket")
                    .arg(&vu)
                    .arg("--uds")
                    .arg(&uds);
                mark(&mut cmd, id, &self.run_dir);
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
                let args = qemu::args(&qemu::QemuSpec {
                    binary: &self.cfg.qemu_binary,
                    accel,
                    vcpus,
                    memory_mib,
                    kernel: &self.cfg.kernel,
                    initrd: &self.cfg.initrd,
                    cmdline: &self.cmdline(),
                    // The serial console goes to QEMU's stdout, the log writer's pipe.
                    console: None,
                    vhost_user_vsock: &vu,
                    vhost_user_fs: Some((&fs_sock, SHARE_TAG)),
                    qmp: &sock.join("qmp.sock"),
                    hotplug_slots: self.cfg.hotplug_slots,
                    name: &format!("husk-{}", &id[..12.min(id.len())]),
                    tcg_tb_mib: self.cfg.tcg_tb_mib,
                    free_page_reporting: self.cfg.free_page_reporting,
                });
                let qemu_bin = qemu::find_binary(&self.cfg.qemu_binary)
                    .unwrap_or_else(|| self.cfg.qemu_binary.clone());
                let mut cmd = jail::command(
                    &vmm,
                    uid,
                    dir,
                    &qemu_bin,
                    &jail::Jailed {
                        ro: vec![&self.cfg.kernel, &self.cfg.initrd, &blocks],
                        rw: vec![&sock],
                        devs: if accel == Accel::Kvm {
                            vec!["kvm"]
                        } else {
                            vec![]
                        },
                        ..Default::default()
                    },
                );
                cmd.args(args);
                mark(&mut cmd, id, &self.run_dir);
                let tap_fd = match nic.map(|n| net::qemu(&mut cmd, n)).transpose() {
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
            _ => {
                let mut cmd = jail::command(
                    &vmm,
                    uid,
                    dir,
                    &vmm,
                    &jail::Jailed {
                        ro: vec![&self.cfg.kernel, &self.cfg.initrd, &blocks],
                        rw: vec![&sock],
                        devs: vec!["kvm"],
                        open_dirs: vec![(&share, SHARE_FD)],
                        keep_fs_caps: true,
                    },
                );
                cmd.arg("--kernel")
                    .arg(&self.cfg.kernel)
                    .arg("--initrd")
                    .arg(&self.cfg.initrd)
                    .args(["--cmdline", &self.cmdline()])
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
                    .args(["--disk-slots", &self.cfg.hotplug_slots.to_string()]);
                mark(&mut cmd, id, &self.run_dir);
                let ns = nic
                    .map(|n| net::husk_vmm(&mut cmd, n, uid.is_some()))
                    .transpose()?;
                let spawned = logs
                    .sink("console.log")
                    .and_then(|o| spawn_detached(cmd, o, logs.sink("vmm.log")?));
                drop(ns);
                Ok((spawned?, vec![]))
            }
        }
    }

    /// Moves a VM's processes (VMM and helpers) into `cgroup` (a pooled VM joining its pod).
    pub fn join_cgroup(p: &AgentProcess, cgroup: &str, id: &str) {
        for r in Self::procs(p) {
            if let Err(e) = place_in_cgroup(r.pid, cgroup) {
                tracing::warn!(pod = id, pid = r.pid, error = %e, "VM process not moved into the pod cgroup");
            }
        }
    }

    fn procs(p: &AgentProcess) -> Vec<ProcRef> {
        let mut v = vec![ProcRef {
            pid: p.pid,
            start_time: p.start_time,
        }];
        if let Some(vm) = &p.vm {
            v.extend(vm.helpers.iter().cloned());
        }
        v
    }

    /// The start failure, with the tails of the guest console and the logs.
    fn start_error(&self, id: &str, dir: &Path, what: &str, timeout: bool) -> RuntimeError {
        let msg = format!(
            "{} VM of pod {id} {what}; guest console (last lines): {}; {} log: {}{}",
            self.name(),
            tail(&dir.join("console.log"), TAIL_LINES),
            self.name(),
            tail(&dir.join("vmm.log"), 5),
            if self.backend == Kind::Qemu {
                format!("; vsock server log: {}", tail(&dir.join("vsock.log"), 5))
            } else {
                String::new()
            }
        );
        if timeout {
            RuntimeError::DeadlineExceeded(msg)
        } else {
            RuntimeError::Unavailable(msg)
        }
    }
}

#[async_trait::async_trait]
impl SandboxKind for VmSandbox {
    async fn launch(
        &self,
        id: &str,
        spec: &LaunchSpec<'_>,
    ) -> Result<(AgentProcess, Agent), RuntimeError> {
        let accel = qemu::resolve_accel(self.accel);
        self.preflight(accel)?;
        let dir = self.pod_dir(id);
        std::fs::create_dir_all(&dir)
            .map_err(|e| RuntimeError::Internal(format!("pod run dir {}: {e}", dir.display())))?;
        let started = Instant::now();
        let size = spec.vm_size.unwrap_or_else(|| self.size(spec.config));
        let uid = match self.cfg.jail {
            true => Some(jail::claim(
                &self.run_dir,
                id,
                self.cfg.jail_uid_base,
                self.cfg.jail_uid_count,
            )?),
            false => None,
        };
        spec.start.mark();
        let (vm, helpers) = match self.start_processes(id, &dir, accel, size, spec.network, uid) {
            Ok(x) => x,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                jail::release(&self.run_dir, id);
                return Err(e);
            }
        };
        crash_point("run_pod:spawned");
        spec.start.end(crate::metrics::Phase::Spawn);
        let proc = AgentProcess {
            pid: vm.pid,
            start_time: vm.start_time,
            socket: jail::sock_dir(&dir).join("vsock.sock"),
            vm: Some(VmProcess {
                backend: self.backend,
                helpers,
                dir: dir.clone(),
            }),
        };
        for p in Self::procs(&proc) {
            if let Err(e) = place_in_cgroup(p.pid, spec.cgroup_parent) {
                tracing::warn!(pod = id, pid = p.pid, error = %e, "VMM process not placed in the pod cgroup");
            }
        }
        tracing::info!(
            pod = id,
            backend = self.name(),
            ?accel,
            vcpus = size.0,
            memory_mib = size.1,
            pid = vm.pid,
            "VM starting"
        );
        let deadline = started + Duration::from_millis(self.cfg.boot_timeout_ms);
        loop {
            if !self.alive(&proc) {
                self.shutdown(&proc, Duration::ZERO).await;
                return Err(self.start_error(id, &dir, "exited during boot", false));
            }
            if let Ok(s) = hybrid::connect(&proc.socket, AGENT_PORT, Duration::from_secs(2)).await {
                let agent = Agent::over(s);
                if agent.check(Duration::from_secs(5)).await.is_ok() {
                    tracing::info!(
                        pod = id,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "guest agent up"
                    );
                    spec.start.end(crate::metrics::Phase::AgentReady);
                    return Ok((proc, agent));
                }
            }
            if Instant::now() > deadline {
                self.shutdown(&proc, Duration::ZERO).await;
                return Err(self.start_error(
                    id,
                    &dir,
                    &format!(
                        "did not bring the agent up within {} ms (runtime.vm.boot_timeout_ms)",
                        self.cfg.boot_timeout_ms
                    ),
                    true,
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn connect(&self, p: &AgentProcess) -> Result<Agent, AgentError> {
        let s = hybrid::connect(&p.socket, AGENT_PORT, Duration::from_secs(3))
            .await
            .map_err(|e| AgentError::Transport(e.to_string()))?;
        Ok(Agent::over(s))
    }

    async fn dial_forward(&self, p: &AgentProcess) -> Result<tokio::net::UnixStream, RuntimeError> {
        hybrid::connect(&p.socket, FORWARD_PORT, Duration::from_secs(5))
            .await
            .map_err(|e| {
                RuntimeError::Unavailable(format!("agent port-forward endpoint in the guest: {e}"))
            })
    }

    fn alive(&self, p: &AgentProcess) -> bool {
        Self::procs(p)
            .iter()
            .all(|r| proc_alive(r.pid, r.start_time))
    }

    async fn shutdown(&self, p: &AgentProcess, grace: Duration) {
        let deadline = Instant::now() + grace;
        let vmm = ProcRef {
            pid: p.pid,
            start_time: p.start_time,
        };
        if !grace.is_zero() && proc_alive(vmm.pid, vmm.start_time) {
            // The agent destroys the sandbox and powers the guest off.
            if let Ok(agent) = self.connect(p).await
                && let Err(e) = agent.shutdown(Duration::from_secs(2)).await
            {
                tracing::debug!(error = %e, "agent shutdown");
            }
            while proc_alive(vmm.pid, vmm.start_time) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if proc_alive(vmm.pid, vmm.start_time)
                && let Some(vm) = &p.vm
                && vm.backend == Kind::Qemu
            {
                let _ = qmp::quit(
                    &jail::sock_dir(&vm.dir).join("qmp.sock"),
                    Duration::from_secs(1),
                )
                .await;
                let t = Instant::now();
                while proc_alive(vmm.pid, vmm.start_time) && t.elapsed() < Duration::from_secs(1) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        let procs = Self::procs(p);
        let _ = tokio::task::spawn_blocking(move || procs.iter().for_each(kill_wait)).await;
    }

    fn cleanup(&self, id: &str) {
        let dir = self.pod_dir(id);
        // The share's bind mounts go first: removing the run dir must never reach into a
        // pod's volumes, so a share that could not be emptied keeps the run dir.
        if let Some(share) = PodShare::existing(&dir.join("share"))
            && !share.destroy()
        {
            tracing::warn!(pod = id, dir = %dir.display(), "pod share not emptied: run dir kept");
            return;
        }
        if let Err(e) = std::fs::remove_dir_all(&dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(pod = id, error = %e, "remove pod run dir");
        }
        jail::release(&self.run_dir, id);
    }

    async fn rootfs(
        &self,
        id: &str,
        p: &AgentProcess,
        image: &ImageRecord,
        in_use: &HashSet<String>,
    ) -> Result<pb::Rootfs, RuntimeError> {
        let dir =
            p.vm.as_ref()
                .map(|v| v.dir.clone())
                .unwrap_or_else(|| self.pod_dir(id));
        let file = self
            .images
            .block_image(image)
            .await
            .map_err(|e| RuntimeError::Internal(format!("rootfs block image: {e}")))?;
        let names = disk_names(&image.id);
        let used: HashSet<String> = in_use.iter().map(|i| disk_names(i).serial).collect();
        {
            let _g = self.hotplug.lock(id).await;
            match self.backend {
                Kind::Qemu => qmp::hotplug_disk(
                    &jail::sock_dir(&dir).join("qmp.sock"),
                    &file,
                    &names,
                    self.cfg.hotplug_slots,
                    QMP_TIMEOUT,
                    &|disk| used.contains(&disk.serial),
                )
                .await
                .map_err(|e| match e {
                    qmp::QmpError::SlotsFull(_) => RuntimeError::ResourceExhausted(e.to_string()),
                    e => RuntimeError::Internal(format!("attach image disk: {e}")),
                })?,
                // husk-vmm: the image's slot if one holds it, else the next empty one.
                _ => vmmctl::attach_disk(
                    &jail::sock_dir(&dir).join("control.sock"),
                    &file,
                    &names.serial,
                    VMM_CTL_TIMEOUT,
                    &|serial| used.contains(serial),
                )
                .await
                .map_err(|e| match e {
                    vmmctl::VmmCtlError::Full(_) => RuntimeError::ResourceExhausted(e.to_string()),
                    e => RuntimeError::Internal(format!("attach image disk: {e}")),
                })?,
            }
        }
        Ok(pb::Rootfs {
            source: Some(pb::rootfs::Source::Block(pb::BlockRootfs {
                device: format!("virtio-blk:{}", names.serial),
                fstype: "erofs".into(),
                options: vec!["ro".into()],
                overlay: true,
                ..Default::default()
            })),
            ..Default::default()
        })
    }

    fn agent_in_guest(&self) -> bool {
        true
    }

    fn share_dir(&self, p: &AgentProcess) -> Option<PathBuf> {
        p.vm.as_ref().map(|v| v.dir.join("share"))
    }
}

/// The disk names of an image (from the image id's first 16 hex digits).
fn disk_names(image_id: &str) -> qmp::DiskNames {
    let hex = hex_of(image_id);
    qmp::DiskNames::new(&hex[..16.min(hex.len())])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn husk_vmm_cmdline_finds_its_keyboard_and_keeps_the_ioapic() {
        let c = guest_cmdline(Kind::Vm);
        for opt in ["reboot=k", "i8042.nopnp", "i8042.dumbkbd", "i8042.noaux"] {
            assert!(c.split(' ').any(|o| o == opt), "{opt} in {c}");
        }
        assert!(!c.split(' ').any(|o| o == "noapic"), "{c}");
        assert!(!guest_cmdline(Kind::Qemu).contains("i8042"));
    }

    /// An image service on a fresh temp dir (the VM sandbox needs one to exist).
    fn images() -> std::sync::Arc<crate::image::ImageService> {
        crate::image::ImageService::open(crate::image::ImageSettings {
            root: tempfile::tempdir().unwrap().keep(),
            registry_config_dir: None,
            docker_config: None,
            max_concurrent_downloads: 1,
        })
        .unwrap()
    }

    #[test]
    fn pod_sizing() {
        let img = images();
        let vm = VmSandbox::new(
            Kind::Qemu,
            Accel::Tcg,
            VmConfig::default(),
            "/tmp".into(),
            img,
        );
        let mut c = cri::PodSandboxConfig::default();
        assert_eq!(vm.size(&c), (1, 256));
        c.linux = Some(cri::LinuxPodSandboxConfig {
            resources: Some(cri::LinuxContainerResources {
                cpu_quota: 150_000,
                cpu_period: 100_000,
                memory_limit_in_bytes: 100 << 20,
                ..Default::default()
            }),
            ..Default::default()
        });
        assert_eq!(vm.size(&c), (3, 356));
        c.linux
            .as_mut()
            .unwrap()
            .resources
            .as_mut()
            .unwrap()
            .memory_limit_in_bytes = 1 << 40;
        assert_eq!(vm.size(&c).1, 8192);
    }

    #[test]
    fn husk_vmm_disk_slot_limit() {
        let d = tempfile::tempdir().unwrap();
        let img = crate::image::ImageService::open(crate::image::ImageSettings {
            root: d.path().join("img"),
            registry_config_dir: None,
            docker_config: None,
            max_concurrent_downloads: 1,
        })
        .unwrap();
        let (k, i) = (d.path().join("bzImage"), d.path().join("initrd"));
        std::fs::write(&k, b"k").unwrap();
        std::fs::write(&i, b"i").unwrap();
        let cfg = VmConfig {
            kernel: k,
            initrd: i,
            vmm_binary: Some("/bin/true".into()),
            hotplug_slots: VMM_MAX_DISK_SLOTS + 1,
            ..VmConfig::default()
        };
        let vm = VmSandbox::new(Kind::Vm, Accel::Auto, cfg, d.path().into(), img);
        let e = vm.preflight(Accel::Auto).unwrap_err();
        assert!(
            matches!(&e, RuntimeError::FailedPrecondition(m) if m.contains("hotplug_slots is 17")),
            "{e}"
        );
    }
    /// Every socket of a VM pod fits the bound config.rs checks `run_dir` against.
    #[test]
    fn vm_socket_paths_fit_the_run_dir_bound() {
        let img = images();
        let run = PathBuf::from("/r");
        let vm = VmSandbox::new(
            Kind::Qemu,
            Accel::Tcg,
            VmConfig::default(),
            run.clone(),
            img,
        );
        let dir = vm.pod_dir(&"f".repeat(64));
        // husk-vmm's muxer reaches guest-initiated ports at `<vsock uds>_<port>`.
        let muxer = format!("vsock.sock_{}", u32::MAX);
        for name in [
            "vsock.sock",
            &muxer,
            "fs.sock",
            "vu.sock",
            "qmp.sock",
            "control.sock",
        ] {
            let p = jail::sock_dir(&dir).join(name);
            let suffix = p.as_os_str().len() - run.as_os_str().len();
            assert!(
                suffix <= crate::config::VM_RUN_DIR_SOCKET_SUFFIX_MAX,
                "{}",
                p.display()
            );
        }
    }
}

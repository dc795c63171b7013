//! The VM sandbox: one micro-VM per pod, the agent as the guest's PID 1,
//! reached over hybrid vsock. Two backends behind one small set of calls
//! (launch, attach a disk, stop, kill, find again):
//! - `husk-vmm` (handler `husk`): our own VMM on hardware KVM; it serves the
//!   hybrid-vsock socket itself.
//! - QEMU (handler `husk-qemu`, KVM or TCG): q35 with husk-vmm's virtio-vsock
//!   device served over vhost-user (`husk-vmm vhost-user vsock`), QMP for
//!   disk hot-plug and shutdown.
//!
//! This file holds what both share (run dir, jail uid, logs, cgroup, boot wait, agent
//! dial, cleanup); `backend.rs` dispatches the few calls that differ to `qemu/` and
//! `husk_vmm/`, which never import each other (shared host probes are in `host.rs`).
//! Failures specific to VMs are `error.rs`'s `VmError`.
//!
//! Every process is started detached (own session, outlives huskd), placed
//! in the pod's host cgroup, and recorded by pid + start time so a restarted
//! huskd finds it again.

mod backend;
mod error;
pub mod host;
pub mod husk_vmm;
pub mod hybrid;
pub mod jail;
pub mod pool;
mod process;
pub mod qemu;
use super::helper_log::tail;
use super::orphans::{crash_point, mark};
use backend::Backend;
pub use error::{BootFailure, VmError};
pub(super) use process::CpuWeight;
pub use process::LOG_MAX_BYTES;
use process::{PodLogs, kill_wait, place_in_cgroup};
use qemu::qmp;

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
/// The fd a jailed file server finds the pod share on.
const SHARE_FD: i32 = 3;
/// Console/log lines quoted in start errors.
const TAIL_LINES: usize = 15;
/// How long a VM whose agent connection broke during setup may take to be seen exited.
const EXIT_SETTLE: Duration = Duration::from_secs(2);

/// What a backend starts a pod's VM with (see `backend.rs`).
struct Start<'a> {
    id: &'a str,
    /// The pod's run dir.
    dir: &'a Path,
    /// Resolved: Kvm or Tcg (QEMU only).
    accel: Accel,
    vcpus: u32,
    memory_mib: u32,
    nic: Option<&'a crate::network::tap::VmNic>,
    logs: &'a PodLogs,
    /// The pod's jail uid (`None`: not jailed).
    uid: Option<u32>,
    cfg: &'a VmConfig,
    run_dir: &'a Path,
    /// The guest kernel command line.
    cmdline: String,
    /// The husk-vmm binary (VMM, vhost-user servers, jail).
    vmm: PathBuf,
    /// The pod's socket dir (`jail::sock_dir`).
    sock: PathBuf,
    /// The hybrid-vsock socket huskd dials.
    uds: PathBuf,
    /// The pod share and the path the file server is given for it.
    share: PathBuf,
    share_arg: PathBuf,
    /// The image block dir (read-only in the jail).
    blocks: PathBuf,
}

/// The guest kernel command line for a backend (before the configured
/// `kernel_params`); the nested test bed boots husk-vmm guests with it.
pub fn guest_cmdline(backend: Kind) -> String {
    // no_timer_check: under TCG on a loaded host the kernel's IO-APIC
    // timer check misses its window and panics ("IO-APIC + timer doesn't
    // work!"; seen with 20 guests booting at once). KVM guests skip the
    // check by themselves (kvm_guest_init).
    // tsc=reliable: a VM's TSC comes from the host (KVM, or QEMU's TCG clock),
    // so the clocksource watchdog, which checks it against HPET/ACPI PM twice
    // a second with a timer that is not deferrable, only wakes idle guests
    // (measured on an idle TCG guest: 2 of its few timer wakeups a second).
    let mut c = String::from("console=ttyS0 panic=-1 quiet no_timer_check tsc=reliable");
    if backend == Kind::Vm {
        // husk-vmm has no ACPI: reboot through the keyboard controller, and
        // find its i8042 without PNP; only the keyboard port, which never
        // answers commands (dumbkbd), so Ctrl-Alt-Del (SIGTERM) is decoded
        // as raw set 2 without a probe.
        c.push_str(" reboot=k i8042.nopnp i8042.noaux i8042.nomux i8042.dumbkbd");
        // What husk-vmm does not have, the guest need not look for: no PCI
        // (virtio-mmio only), one UART (COM1; the kernel probes four), no
        // BSD-style ptys (containers use /dev/ptmx; 256 pairs are 512
        // devices to create at boot). The LAPIC timer runs in TSC-deadline
        // mode (husk-vmm's CPUID offers it, kvmclock gives the TSC rate), so
        // there is no timer to calibrate and no PIT to program.
        c.push_str(" pci=off 8250.nr_uarts=1 pty.legacy_count=0");
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
        Backend::of(self.backend).name()
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
        if host::find_binary(&vmm).is_none() {
            return missing(format!(
                "VM sandbox: husk-vmm binary {} not found (runtime.vm.vmm_binary)",
                vmm.display()
            ));
        }
        Backend::of(self.backend).preflight(&self.cfg, accel)
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
        let names = Backend::of(self.backend).logs();
        jail::prepare(dir, uid)?;
        let vmm = host::find_binary(&self.cfg.vmm_path()).unwrap_or_else(|| self.cfg.vmm_path());
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
        let vmm = host::find_binary(&self.cfg.vmm_path()).unwrap_or_else(|| self.cfg.vmm_path());
        let share = dir.join("share");
        std::fs::create_dir_all(&share).map_err(RuntimeError::io("pod share", &share))?;
        let blocks = self.images.block_dir().map_err(VmError::BlockDir)?;
        // The share is reached through fd 3 (opened before the jail's root changes), so volumes
        // bound into it later are seen.
        let share_arg = if uid.is_some() {
            PathBuf::from(format!("/proc/self/fd/{SHARE_FD}"))
        } else {
            share.clone()
        };
        let sock = jail::sock_dir(dir);
        Backend::of(self.backend).start(&Start {
            id,
            dir,
            accel,
            vcpus,
            memory_mib,
            nic,
            logs,
            uid,
            cfg: &self.cfg,
            run_dir: &self.run_dir,
            cmdline: self.cmdline(),
            vmm,
            uds: sock.join("vsock.sock"),
            sock,
            share,
            share_arg,
            blocks,
        })
    }

    /// The CPU weight of the cgroup `cgroup` (a pooled VM's while it boots and waits).
    pub fn set_cpu_weight(cgroup: &str, weight: CpuWeight, id: &str) {
        if let Err(e) = process::set_cpu_weight(cgroup, weight) {
            tracing::warn!(pod = id, cgroup, ?weight, error = %e, "VM cgroup CPU weight not set");
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
    fn start_error(&self, id: &str, dir: &Path, failure: BootFailure) -> RuntimeError {
        VmError::Boot {
            backend: self.name(),
            pod: id.to_string(),
            failure,
            console: tail(&dir.join("console.log"), TAIL_LINES),
            vmm_log: tail(&dir.join("vmm.log"), 5),
            helper_logs: Backend::of(self.backend).start_error_logs(dir),
        }
        .into()
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
        std::fs::create_dir_all(&dir).map_err(RuntimeError::io("pod run dir", &dir))?;
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
        if spec.background {
            Self::set_cpu_weight(spec.cgroup_parent, CpuWeight::Background, id);
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
                return Err(self.start_error(id, &dir, BootFailure::Exited));
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
                    BootFailure::Timeout(self.cfg.boot_timeout_ms),
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
            .map_err(|e| VmError::Forward(e).into())
    }

    fn alive(&self, p: &AgentProcess) -> bool {
        Self::procs(p)
            .iter()
            .all(|r| proc_alive(r.pid, r.start_time))
    }

    fn watched(&self, p: &AgentProcess) -> Vec<ProcRef> {
        Self::procs(p)
    }

    async fn exited_during(
        &self,
        id: &str,
        p: &AgentProcess,
        what: &'static str,
    ) -> Option<RuntimeError> {
        // The guest side of the connection goes before the VMM process does: give a dying
        // VMM a moment to be gone.
        let until = Instant::now() + EXIT_SETTLE;
        while self.alive(p) {
            if Instant::now() >= until {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // A pooled VM keeps the run dir it was booted in.
        let dir =
            p.vm.as_ref()
                .map_or_else(|| self.pod_dir(id), |v| v.dir.clone());
        Some(self.start_error(id, &dir, BootFailure::ExitedDuring(what)))
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
            {
                Backend::of(vm.backend).quit(&vmm, &vm.dir).await;
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
            .map_err(VmError::BlockImage)?;
        let names = disk_names(&image.id);
        let used: HashSet<String> = in_use.iter().map(|i| disk_names(i).serial).collect();
        {
            let _g = self.hotplug.lock(id).await;
            Backend::of(self.backend)
                .attach_disk(&dir, &file, &names, &self.cfg, &|serial| {
                    used.contains(serial)
                })
                .await?;
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

    /// A guest starved of CPU (many TCG guests starting at once) answers its first calls
    /// late though it is up: setup gets the boot budget, never less than an ordinary call.
    fn setup_timeout(&self) -> Duration {
        Duration::from_millis(self.cfg.boot_timeout_ms).max(super::agent::RPC_TIMEOUT)
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
        // husk-vmm offers the TSC-deadline LAPIC timer, so the guest starts no PIT: without
        // its LAPIC timer it would have no clock event device at all.
        assert!(!c.split(' ').any(|o| o == "noapictimer"), "{c}");
        for opt in ["pci=off", "8250.nr_uarts=1", "pty.legacy_count=0"] {
            assert!(c.split(' ').any(|o| o == opt), "{opt} in {c}");
        }
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
    fn setup_calls_get_the_boot_budget_never_less_than_an_ordinary_call() {
        let vm = |boot_timeout_ms| {
            let cfg = VmConfig {
                boot_timeout_ms,
                ..VmConfig::default()
            };
            VmSandbox::new(Kind::Qemu, Accel::Tcg, cfg, "/tmp".into(), images())
        };
        assert_eq!(vm(90_000).setup_timeout(), Duration::from_secs(90));
        assert_eq!(vm(5_000).setup_timeout(), super::super::agent::RPC_TIMEOUT);
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
            hotplug_slots: husk_vmm::VMM_MAX_DISK_SLOTS + 1,
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

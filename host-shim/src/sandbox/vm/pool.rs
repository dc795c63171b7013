//! Warm VM pool (`[runtime.vm.pool]`): per VM handler, VMs booted to "agent ready" in
//! the background before any pod asks, so RunPodSandbox only has to make one the pod's.
//!
//! - A pooled VM is a pod in waiting: it is booted under a fresh pod id (its run dir, jail
//!   uid, cgroup `<cgroup_parent>/<id>` and the `HUSK_SANDBOX` mark of its processes are
//!   that id's), and the pod that claims it takes that id. Everything keyed by pod id then
//!   already belongs to the pod, and a `kill -9` of huskd leaves nothing new to recover:
//!   a pooled VM no pod record names is killed and cleaned at the next start like any
//!   unrecorded pod's processes (`orphans.rs`); one claimed by a pod whose start was cut
//!   short is cleaned with that pod's record (state `Creating`).
//! - Its NIC is a tap in the pools' own network namespace (`<run_dir>/netns/pool`), not
//!   persistent (it goes with the VMM). At claim the tap moves into the pod's namespace and
//!   is wired to the CNI interface; the VMM keeps its fd, so the guest sees no hot-plug. The
//!   agent gives the guest NIC the CNI interface's MAC.
//! - Each VM is claimed at most once: `claim` moves it out of the pool under the pool's
//!   lock, and it never comes back. A VM that died, or was booted from a kernel/initrd that
//!   changed since, is discarded instead of claimed.
//! - Refill runs in the background (at most `parallel_boots` boots per handler), bounded
//!   by `memory_budget_mib` of guest RAM over all pools; failed boots back off.

use std::collections::{HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use husk_proto::cri;
use serde::Serialize;

use super::super::agent::Agent;
use super::super::error::RuntimeError;
use super::super::kind::{LaunchSpec, SandboxKind, remove_cgroup_tree_patiently};
use super::super::state::{AgentProcess, new_id};
use super::{CpuWeight, VmSandbox};
use crate::config::PoolConfig;
use crate::network::tap::VmNic;

/// How long a claim waits for a pooled VM's agent to answer before discarding it. An
/// idle agent answers in milliseconds; 500 ms discarded healthy VMs on a loaded host
/// (nested CI, one L1 vCPU shared with CNI plugins: the pod then booted cold, seconds
/// more than this wait).
const CLAIM_CHECK: Duration = Duration::from_secs(3);
/// How often the refill loop looks at its VMs without being woken.
const TICK: Duration = Duration::from_secs(5);
/// First wait after a failed boot; doubled per failure in a row, up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_secs(10);
const BACKOFF_MAX: Duration = Duration::from_secs(600);
/// A pooled VM's NIC MTU until the pod's is set (the device's MTU is the guest's maximum).
const POOL_MTU: u32 = 9000;
/// How long the cgroup of a discarded VM may stay busy.
const CGROUP_WAIT: Duration = Duration::from_secs(5);

/// The guest image a VM was booted from: a VM from other files is stale.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint(Vec<(u64, u64, u64, i64, i64)>);

impl Fingerprint {
    fn of(paths: &[&Path]) -> Self {
        use std::os::unix::fs::MetadataExt;
        Self(
            paths
                .iter()
                .map(|p| {
                    std::fs::metadata(p)
                        .map(|m| (m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec()))
                        .unwrap_or_default()
                })
                .collect(),
        )
    }
}

/// A booted VM waiting for its pod; owned by exactly one holder (never cloned).
pub struct PooledVm {
    /// The pod id it was booted under: the claiming pod's id.
    pub id: String,
    pub proc: AgentProcess,
    pub agent: Agent,
    /// The tap in the pool namespace (the VMM holds it) and the guest NIC's MAC.
    pub tap: String,
    pub mac: String,
    /// vCPUs, MiB.
    pub size: (u32, u32),
    fingerprint: Fingerprint,
}

/// Guest RAM reserved by pooled VMs, shared by every pool.
pub struct Budget {
    limit_mib: u64,
    used_mib: Mutex<u64>,
}

impl Budget {
    pub fn new(limit_mib: u64) -> Arc<Self> {
        Arc::new(Self {
            limit_mib,
            used_mib: Mutex::new(0),
        })
    }

    fn take(&self, mib: u64) -> bool {
        let mut u = self.used_mib.lock().unwrap_or_else(|e| e.into_inner());
        if *u + mib > self.limit_mib {
            return false;
        }
        *u += mib;
        true
    }

    fn give(&self, mib: u64) {
        let mut u = self.used_mib.lock().unwrap_or_else(|e| e.into_inner());
        *u = u.saturating_sub(mib);
    }

    fn used(&self) -> u64 {
        *self.used_mib.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What Status (verbose) reports per pool.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolStats {
    pub handler: String,
    pub target: u32,
    pub ready: usize,
    pub booting: u32,
    /// Pods started on a pooled VM.
    pub claimed: u64,
    /// Pods that found the pool empty and booted their own VM.
    pub empty: u64,
    /// Pods that asked for more vCPUs or memory than a pooled VM has.
    pub too_big: u64,
    /// Pooled VMs thrown away: died, stale guest image, failed check.
    pub discarded: u64,
    pub boot_failures: u64,
    pub last_error: String,
    /// Why the pool does not fill (e.g. the handler cannot start VMs here), or "".
    pub paused: String,
    /// Guest RAM of all pools' VMs, and the budget (MiB).
    pub budget_used_mib: u64,
    pub budget_mib: u64,
    pub vcpus: u32,
    pub memory_mib: u32,
}

#[derive(Default)]
struct State {
    ready: VecDeque<PooledVm>,
    booting: u32,
    failures_in_row: u32,
    retry_at: Option<Instant>,
    closed: bool,
    /// Pod ids of the boots in flight (killed by marker when the pool is drained).
    booting_ids: Vec<String>,
    stats: PoolStats,
}

/// One handler's pool.
pub struct VmPool {
    handler: String,
    vm: Arc<VmSandbox>,
    target: u32,
    parallel: u32,
    size: (u32, u32),
    netns: PathBuf,
    cgroup_root: String,
    budget: Arc<Budget>,
    /// Images attached to each pooled VM after its boot (`images` in the config).
    images: Vec<String>,
    /// Pod starts each pooled VM rehearses after its boot (`rehearsals`), and the OCI
    /// spec of the rehearsal's container (made by the pod machinery, `pooled.rs`).
    rehearsals: u32,
    rehearsal_spec: Vec<u8>,
    state: Mutex<State>,
    wake: tokio::sync::Notify,
}

impl VmPool {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        handler: &str,
        vm: Arc<VmSandbox>,
        target: u32,
        cfg: &PoolConfig,
        netns: PathBuf,
        cgroup_root: &str,
        budget: Arc<Budget>,
        rehearsal_spec: Vec<u8>,
    ) -> Arc<Self> {
        let size = (
            if cfg.vcpus == 0 {
                vm.cfg.vcpus
            } else {
                cfg.vcpus
            },
            if cfg.memory_mib == 0 {
                vm.cfg.memory_mib
            } else {
                cfg.memory_mib
            },
        );
        Arc::new(Self {
            handler: handler.to_string(),
            vm,
            target,
            parallel: cfg.parallel_boots.max(1),
            size,
            netns,
            cgroup_root: cgroup_root.trim_matches('/').to_string(),
            budget,
            images: cfg.images.clone(),
            rehearsals: if rehearsal_spec.is_empty() {
                0
            } else {
                cfg.rehearsals
            },
            rehearsal_spec,
            state: Mutex::new(State::default()),
            wake: tokio::sync::Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The pool's namespace and the cgroup its VMs wait in.
    pub fn netns(&self) -> &Path {
        &self.netns
    }

    /// The cgroup a pooled VM of pod id `id` runs in until claimed.
    pub fn cgroup_of(&self, id: &str) -> String {
        format!("{}/{id}", self.cgroup_root)
    }

    /// Starts the background refill.
    pub fn start(self: &Arc<Self>) {
        let me = self.clone();
        tokio::spawn(async move { me.refill().await });
    }

    /// A pooled VM for a pod that needs `need` (vCPUs, MiB), or None (empty pool, or the pod
    /// is bigger than a pooled VM: it boots its own). The VM leaves the pool for good.
    pub async fn claim(&self, need: (u32, u32)) -> Option<PooledVm> {
        if need.0 > self.size.0 || need.1 > self.size.1 {
            self.lock().stats.too_big += 1;
            return None;
        }
        let now = Fingerprint::of(&[&self.vm.cfg.kernel, &self.vm.cfg.initrd]);
        loop {
            let vm = {
                let mut st = self.lock();
                match st.ready.pop_front() {
                    Some(v) => v,
                    None => {
                        st.stats.empty += 1;
                        drop(st);
                        self.wake.notify_one();
                        return None;
                    }
                }
            };
            self.wake.notify_one();
            VmSandbox::set_cpu_weight(&self.cgroup_of(&vm.id), CpuWeight::Default, &vm.id);
            let ok = vm.fingerprint == now
                && self.vm.alive(&vm.proc)
                && vm.agent.check(CLAIM_CHECK).await.is_ok();
            if ok {
                self.budget.give(u64::from(vm.size.1));
                self.lock().stats.claimed += 1;
                tracing::info!(handler = %self.handler, pod = %vm.id, "pooled VM claimed");
                return Some(vm);
            }
            tracing::info!(handler = %self.handler, pod = %vm.id, "pooled VM discarded at claim (gone, stale guest image or agent silent)");
            self.discard(vm).await;
        }
    }

    /// Stops and forgets every pooled VM (huskd shutting down).
    pub async fn drain(&self) {
        let vms: Vec<PooledVm> = {
            let mut st = self.lock();
            st.closed = true;
            st.ready.drain(..).collect()
        };
        self.wake.notify_one();
        // A boot in flight would outlive huskd: its processes go by their pod marker (its
        // launch then fails and cleans up, if huskd is still there to see it).
        let booting = self.lock().booting_ids.clone();
        let run_dir = self.vm.run_dir.clone();
        let _ = tokio::task::spawn_blocking(move || {
            for id in booting {
                crate::sandbox::orphans::kill_pod(&run_dir, &id);
            }
        })
        .await;
        for vm in vms {
            self.discard(vm).await;
        }
    }

    pub fn stats(&self) -> PoolStats {
        let st = self.lock();
        let mut s = st.stats.clone();
        s.handler = self.handler.clone();
        s.target = self.target;
        s.ready = st.ready.len();
        s.booting = st.booting;
        s.budget_used_mib = self.budget.used();
        s.budget_mib = self.budget.limit_mib;
        s.vcpus = self.size.0;
        s.memory_mib = self.size.1;
        s
    }

    /// Kills a pooled VM that will serve no pod and removes what it had.
    async fn discard(&self, vm: PooledVm) {
        self.budget.give(u64::from(vm.size.1));
        self.discard_claimed(vm).await;
    }

    /// Kills a claimed VM whose pod did not get as far as a record of it (it is never
    /// given to another pod).
    pub async fn discard_claimed(&self, vm: PooledVm) {
        self.lock().stats.discarded += 1;
        self.vm.shutdown(&vm.proc, Duration::ZERO).await;
        self.forget(&vm.id).await;
    }

    async fn forget(&self, id: &str) {
        self.vm.cleanup(id);
        remove_cgroup_tree_patiently(&self.cgroup_of(id), CGROUP_WAIT).await;
    }

    /// Why the pool cannot fill now, if it cannot.
    fn blocked(&self) -> Option<String> {
        if let Err(e) = self.vm.ready() {
            return Some(e);
        }
        if self.vm.backend == crate::config::HandlerKind::Vm && !super::qemu::hw_virt() {
            return Some(
                "husk-vmm boots Linux only with hardware virtualisation (no vmx/svm here)".into(),
            );
        }
        None
    }

    async fn refill(self: Arc<Self>) {
        loop {
            self.reap().await;
            let blocked = self.blocked();
            loop {
                let go = {
                    let mut st = self.lock();
                    st.stats.paused = blocked.clone().unwrap_or_default();
                    let waiting = st.retry_at.is_some_and(|t| Instant::now() < t);
                    let want = (st.ready.len() as u32 + st.booting) < self.target
                        && st.booting < self.parallel
                        && !waiting
                        && !st.closed
                        && blocked.is_none();
                    if want && self.budget.take(u64::from(self.size.1)) {
                        st.booting += 1;
                        true
                    } else {
                        false
                    }
                };
                if !go {
                    break;
                }
                let me = self.clone();
                tokio::spawn(async move { me.boot_one().await });
            }
            if self.lock().closed {
                return;
            }
            let _ = tokio::time::timeout(TICK, self.wake.notified()).await;
        }
    }

    /// Discards ready VMs that died or whose guest image changed.
    async fn reap(&self) {
        let now = Fingerprint::of(&[&self.vm.cfg.kernel, &self.vm.cfg.initrd]);
        let bad: Vec<PooledVm> = {
            let mut st = self.lock();
            let (keep, bad): (VecDeque<_>, VecDeque<_>) = st
                .ready
                .drain(..)
                .partition(|v| v.fingerprint == now && self.vm.alive(&v.proc));
            st.ready = keep;
            bad.into()
        };
        for vm in bad {
            tracing::info!(handler = %self.handler, pod = %vm.id, "pooled VM discarded (gone or stale guest image)");
            self.discard(vm).await;
        }
    }

    async fn boot_one(self: Arc<Self>) {
        let id = new_id();
        {
            let mut st = self.lock();
            if st.closed {
                st.booting -= 1;
                drop(st);
                self.budget.give(u64::from(self.size.1));
                return;
            }
            st.booting_ids.push(id.clone());
        }
        let fingerprint = Fingerprint::of(&[&self.vm.cfg.kernel, &self.vm.cfg.initrd]);
        let nic = VmNic {
            netns: self.netns.clone(),
            tap: format!("hp{}", &id[..12]),
            mac: pool_mac(&id),
            mtu: POOL_MTU,
            addresses: vec![],
            routes: vec![],
        };
        let cgroup = self.cgroup_of(&id);
        let config = cri::PodSandboxConfig::default();
        // A pooled boot is no pod's start: its phases are not reported as one.
        let start = crate::metrics::PodStart::new(&self.handler);
        let spec = LaunchSpec {
            cgroup_parent: &cgroup,
            config: &config,
            network: Some(&nic),
            start: &start,
            vm_size: Some(self.size),
            // A refill runs on the CPU pods leave (its siblings in the cgroup tree): its
            // boot and rehearsal must not slow pods starting beside it.
            background: true,
        };
        let t = Instant::now();
        let mut r = self.vm.launch(&id, &spec).await;
        if let Ok((proc, agent)) = &r
            && let Err(e) = self.prepare(&id, proc, agent).await
        {
            // Such a VM is of no use as it is: it counts as a failed boot.
            self.vm.shutdown(proc, Duration::ZERO).await;
            r = Err(e);
        }
        let outcome = {
            let mut st = self.lock();
            st.booting -= 1;
            st.booting_ids.retain(|b| *b != id);
            match r {
                Ok((proc, agent)) => {
                    st.failures_in_row = 0;
                    st.retry_at = None;
                    let vm = PooledVm {
                        id: id.clone(),
                        proc,
                        agent,
                        tap: nic.tap,
                        mac: nic.mac,
                        size: self.size,
                        fingerprint,
                    };
                    if st.closed {
                        Err(Some(vm))
                    } else {
                        st.ready.push_back(vm);
                        Ok(())
                    }
                }
                Err(e) => {
                    st.failures_in_row += 1;
                    let wait = BACKOFF_MIN
                        .saturating_mul(1 << (st.failures_in_row - 1).min(8))
                        .min(BACKOFF_MAX);
                    st.retry_at = Some(Instant::now() + wait);
                    st.stats.boot_failures += 1;
                    st.stats.last_error = e.to_string().chars().take(2000).collect();
                    tracing::warn!(handler = %self.handler, pod = %id, error = %e, retry_in_s = wait.as_secs(), "pooled VM failed to boot");
                    Err(None)
                }
            }
        };
        match outcome {
            Ok(()) => {
                tracing::info!(handler = %self.handler, pod = %id, elapsed_ms = t.elapsed().as_millis() as u64, "pooled VM ready");
            }
            Err(Some(vm)) => self.discard(vm).await,
            Err(None) => {
                self.budget.give(u64::from(self.size.1));
                self.forget(&id).await;
            }
        }
        self.wake.notify_one();
    }

    /// After the boot: the image disks, then the rehearsals.
    async fn prepare(
        &self,
        id: &str,
        proc: &AgentProcess,
        agent: &Agent,
    ) -> Result<(), RuntimeError> {
        self.attach_images(id, proc).await?;
        for _ in 0..self.rehearsals {
            let took = agent
                .rehearse(self.rehearsal_spec.clone(), self.vm.setup_timeout())
                .await
                .map_err(|e| RuntimeError::Agent {
                    what: "rehearse a pod start",
                    source: e,
                })?;
            tracing::debug!(handler = %self.handler, pod = %id, guest_ms = took.as_millis() as u64, "pooled VM rehearsed a pod start");
        }
        Ok(())
    }

    /// Attaches the disks of the configured images that are pulled; an image not
    /// (yet) on the node is left out.
    async fn attach_images(&self, id: &str, proc: &AgentProcess) -> Result<(), RuntimeError> {
        for spec in &self.images {
            let image = match self.vm.images.status(spec) {
                Ok(Some(i)) => i,
                Ok(None) => {
                    tracing::debug!(handler = %self.handler, image = %spec, "pool image not pulled: not attached");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(handler = %self.handler, image = %spec, error = %e, "pool image");
                    continue;
                }
            };
            self.vm.rootfs(id, proc, &image, &HashSet::new()).await?;
        }
        Ok(())
    }
}

/// A locally administered unicast MAC from a pod id.
fn pool_mac(id: &str) -> String {
    let b = hex::decode(&id[..10.min(id.len())]).unwrap_or_default();
    let mut m = vec![0x02u8];
    m.extend(b.iter().take(5));
    m.resize(6, 0);
    m.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_macs_are_local_unicast() {
        let m = pool_mac(&"ab".repeat(32));
        assert_eq!(m, "02:ab:ab:ab:ab:ab");
        let first = u8::from_str_radix(&m[..2], 16).unwrap();
        assert_eq!(first & 1, 0, "unicast");
        assert_eq!(first & 2, 2, "locally administered");
    }

    #[test]
    fn budget_bounds_reservations() {
        let b = Budget::new(512);
        assert!(b.take(256));
        assert!(b.take(256));
        assert!(!b.take(1), "over the budget");
        b.give(256);
        assert!(b.take(200));
        assert_eq!(b.used(), 456);
    }

    #[test]
    fn fingerprint_changes_with_the_file() {
        let d = tempfile::tempdir().unwrap();
        let k = d.path().join("k");
        std::fs::write(&k, b"one").unwrap();
        let a = Fingerprint::of(&[&k]);
        assert_eq!(a, Fingerprint::of(&[&k]));
        std::fs::write(d.path().join("k2"), b"two!").unwrap();
        std::fs::rename(d.path().join("k2"), &k).unwrap();
        assert_ne!(
            a,
            Fingerprint::of(&[&k]),
            "a replaced kernel is a new image"
        );
    }
}

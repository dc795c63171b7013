//! Pods and containers: lifecycle, state machines, per-pod locking, logs,
//! stats and recovery, shared by every sandbox kind. What differs between
//! the namespace and the VM sandbox is behind [`kind::SandboxKind`].
//!
//! Locking: the maps below are held only to look up or insert (never across
//! I/O). Each pod has a `lifecycle` async lock serialising its own
//! run/stop/remove/create-container steps; each container has one for its
//! start/stop/remove. Records sit in short std mutexes.

pub mod agent;
mod beneath;
mod container;
mod error;
pub mod exec;
pub mod fanout;
mod helper_log;
mod inventory;
pub mod kind;
pub mod logs;
pub mod orphans;
mod pidwatch;
mod pod;
mod pooled;
pub mod propagation;
mod recover;
mod seccomp_gates;
pub mod share;
pub mod spec;
pub mod state;
pub mod stats;
pub mod stream;
mod supervise;
pub mod validate;
pub mod vm;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use husk_proto::cri;

use self::agent::Agent;
use self::kind::{NamespaceSandbox, SandboxKind};
use self::logs::CriLog;
use self::state::{ContainerRecord, PodRecord};
use self::vm::VmSandbox;
use crate::config::{self, RuntimeConfig};
use crate::image::ImageService;
use crate::network::Network;
use crate::store::Store;

pub use self::container::{ContainerView, container_state_code};
pub use self::error::{Result, RuntimeError};
pub use self::pod::{PodView, pod_state_code};

/// The entry of `map` named by `id` exactly or by a unique prefix of its id (containerd's
/// truncated-index lookup): empty → InvalidArgument, no match → NotFound, more than one →
/// InvalidArgument naming how many matched.
fn by_id_or_prefix<T: Clone>(map: &HashMap<String, T>, id: &str, what: &str) -> Result<T> {
    if id.is_empty() {
        return Err(RuntimeError::InvalidArgument(format!("{what} id is empty")));
    }
    if let Some(v) = map.get(id) {
        return Ok(v.clone());
    }
    let mut found = map.iter().filter(|(k, _)| k.starts_with(id));
    match (found.next(), found.count()) {
        (None, _) => Err(RuntimeError::NotFound(format!("{what} {id} not found"))),
        (Some((_, v)), 0) => Ok(v.clone()),
        (Some(_), more) => Err(RuntimeError::InvalidArgument(format!(
            "{what} id prefix {id:?} is ambiguous: it matches {} ids",
            more + 1
        ))),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A live pod.
pub struct Pod {
    pub id: String,
    pub config: cri::PodSandboxConfig,
    rec: Mutex<PodRecord>,
    lifecycle: tokio::sync::Mutex<()>,
    agent: Mutex<Option<Agent>>,
    containers: Mutex<BTreeMap<String, Arc<Container>>>,
    persist_lock: Mutex<()>,
    kind: Arc<dyn SandboxKind>,
    /// The last pod-level stats sample (usage_nano_cores, stale answers).
    sample: stats::SampleCell<stats::PodSample>,
    /// Whether the pod's first container was created / started (metrics phases).
    first_container: [std::sync::atomic::AtomicBool; 2],
}

impl Pod {
    pub fn record(&self) -> PodRecord {
        lock(&self.rec).clone()
    }

    fn agent(&self) -> Option<Agent> {
        lock(&self.agent).clone()
    }

    fn containers(&self) -> Vec<Arc<Container>> {
        lock(&self.containers).values().cloned().collect()
    }

    /// The processes whose exit ends the pod, while it has an agent.
    fn agent_procs(&self) -> Option<Vec<state::ProcRef>> {
        lock(&self.rec).agent.as_ref().map(|p| self.kind.watched(p))
    }

    fn agent_alive(&self) -> bool {
        match &lock(&self.rec).agent {
            Some(p) => self.kind.alive(p),
            None => false,
        }
    }

    fn persist(&self, store: &Store) -> Result<()> {
        let _g = lock(&self.persist_lock);
        let rec = self.record();
        Ok(store.put_pod(&self.id, &rec)?)
    }

    /// Reports `phase` (which began at `began`) if it is the first time for this pod.
    fn first_container_phase(&self, phase: crate::metrics::Phase, began: std::time::Instant) {
        use std::sync::atomic::Ordering;
        let i = match phase {
            crate::metrics::Phase::FirstContainerCreate => 0,
            _ => 1,
        };
        if !self.first_container[i].swap(true, Ordering::Relaxed) {
            let handler = lock(&self.rec).handler.clone();
            crate::metrics::global().phase(&handler, phase, began.elapsed());
        }
    }
}

/// A live container.
pub struct Container {
    pub id: String,
    pub pod_id: String,
    pub config: cri::ContainerConfig,
    rec: Mutex<ContainerRecord>,
    lifecycle: tokio::sync::Mutex<()>,
    /// Flips to true once the container is recorded as exited.
    exited: tokio::sync::watch::Sender<bool>,
    log: Mutex<Option<Arc<CriLog>>>,
    persist_lock: Mutex<()>,
    /// The last stats sample (usage_nano_cores, stale answers).
    sample: stats::SampleCell<stats::ContainerSample>,
    /// The container's output as the log copier reads it, for attach.
    output: tokio::sync::broadcast::Sender<OutputChunk>,
}

/// A piece of a container's output (attach's fan-out of the log copier).
#[derive(Debug, Clone)]
pub enum OutputChunk {
    Data(logs::Stream, bytes::Bytes),
    /// The stream reached its end.
    Eof(logs::Stream),
}

impl Container {
    fn new(rec: ContainerRecord, config: cri::ContainerConfig) -> Arc<Self> {
        let done = rec.state == state::ContainerState::Exited;
        Arc::new(Self {
            id: rec.id.clone(),
            pod_id: rec.pod_id.clone(),
            config,
            rec: Mutex::new(rec),
            lifecycle: tokio::sync::Mutex::new(()),
            exited: tokio::sync::watch::channel(done).0,
            log: Mutex::new(None),
            persist_lock: Mutex::new(()),
            sample: Default::default(),
            output: fanout::channel(),
        })
    }

    pub fn record(&self) -> ContainerRecord {
        lock(&self.rec).clone()
    }

    fn persist(&self, store: &Store) -> Result<()> {
        let _g = lock(&self.persist_lock);
        let rec = self.record();
        Ok(store.put_container(&self.pod_id, &self.id, &rec)?)
    }

    /// Records the exit (once) and wakes waiters.
    fn mark_exited(&self, store: &Store, code: i32, finished_at: i64, reason: &str, message: &str) {
        let changed = lock(&self.rec).exited(code, finished_at, reason, message);
        if changed {
            if let Err(e) = self.persist(store) {
                tracing::error!(container = %self.id, error = %e, "persist exit");
            }
            tracing::info!(container = %self.id, code, reason, "container exited");
        }
        self.exited.send_replace(true);
    }

    fn log(&self) -> Option<Arc<CriLog>> {
        lock(&self.log).clone()
    }
}

/// The runtime: every pod and container huskd knows.
pub struct Manager {
    cfg: RuntimeConfig,
    store: Store,
    images: Arc<ImageService>,
    ns: Arc<NamespaceSandbox>,
    vms: VmKinds,
    net: Arc<Network>,
    pods: RwLock<HashMap<String, Arc<Pod>>>,
    containers: RwLock<HashMap<String, Arc<Container>>>,
    /// name key (name/namespace/uid/attempt) → pod id; reserved before any I/O.
    pod_names: Mutex<HashMap<String, String>>,
    /// Warm VMs per VM handler (`[runtime.vm.pool]`).
    pools: BTreeMap<String, Arc<vm::pool::VmPool>>,
    /// The namespace pooled VMs' taps wait in.
    pool_netns: PathBuf,
}

/// The VM sandboxes: one per configured VM handler (with its accelerator), and one per
/// backend for a pod found again without its handler in the config (recovery, orphans:
/// stopping and cleaning up a VM does not depend on the accelerator).
struct VmKinds {
    by_handler: BTreeMap<String, Arc<VmSandbox>>,
    qemu: Arc<VmSandbox>,
    husk_vmm: Arc<VmSandbox>,
}

impl VmKinds {
    fn new(cfg: &RuntimeConfig, run_dir: &std::path::Path, images: &Arc<ImageService>) -> Self {
        let vm = |backend, accel| {
            Arc::new(VmSandbox::new(
                backend,
                accel,
                cfg.vm.clone(),
                run_dir.to_path_buf(),
                images.clone(),
            ))
        };
        let by_handler = cfg
            .handlers
            .iter()
            .filter(|(_, h)| h.kind.is_vm())
            .map(|(name, h)| {
                let accel = match h.kind {
                    config::HandlerKind::Qemu => h.accel.unwrap_or(cfg.vm.qemu_accel),
                    _ => config::Accel::Auto,
                };
                (name.clone(), vm(h.kind, accel))
            })
            .collect();
        Self {
            by_handler,
            qemu: vm(config::HandlerKind::Qemu, cfg.vm.qemu_accel),
            husk_vmm: vm(config::HandlerKind::Vm, config::Accel::Auto),
        }
    }

    /// The sandbox of VM handler `handler`, else (a handler gone from the config) that of
    /// its backend.
    fn of(&self, handler: &str, kind: config::HandlerKind) -> &Arc<VmSandbox> {
        match self.by_handler.get(handler) {
            Some(v) if v.backend == kind => v,
            _ if kind == config::HandlerKind::Qemu => &self.qemu,
            _ => &self.husk_vmm,
        }
    }
}

pub struct ManagerSettings {
    pub runtime: RuntimeConfig,
    pub state_dir: PathBuf,
    pub run_dir: PathBuf,
    pub network: config::NetworkConfig,
}

impl Manager {
    /// Opens the store and recovers every persisted pod (re-dials live agents).
    pub async fn open(settings: ManagerSettings, images: Arc<ImageService>) -> Result<Arc<Self>> {
        let store = Store::open(&settings.state_dir.join("pods"))?;
        let ns = Arc::new(NamespaceSandbox {
            run_dir: settings.run_dir.clone(),
            agent_binary: settings.runtime.agent_path(),
            start_timeout: std::time::Duration::from_millis(
                settings.runtime.agent_start_timeout_ms,
            ),
            images: images.clone(),
        });
        let net = Network::open(
            settings.network.clone(),
            settings.state_dir.join("network"),
            settings.run_dir.join("netns"),
        )?;
        let vms = VmKinds::new(&settings.runtime, &settings.run_dir, &images);
        let pool_netns = settings.run_dir.join("netns").join(pooled::POOL_NETNS);
        let pools = pooled::make_pools(&settings.runtime, &pool_netns, |h| {
            vms.by_handler.get(h).cloned()
        });
        let m = Arc::new(Self {
            cfg: settings.runtime,
            store,
            images,
            ns,
            vms,
            net: Arc::new(net),
            pods: RwLock::new(HashMap::new()),
            containers: RwLock::new(HashMap::new()),
            pod_names: Mutex::new(HashMap::new()),
            pools,
            pool_netns,
        });
        m.recover().await?;
        m.start_pools();
        Ok(m)
    }

    pub fn runtime_config(&self) -> &RuntimeConfig {
        &self.cfg
    }

    /// Pod networking (CNI).
    pub fn network(&self) -> &Arc<Network> {
        &self.net
    }

    /// The sandbox kind of a pod of handler `handler` (of kind `kind`).
    fn kind(&self, handler: &str, kind: config::HandlerKind) -> Arc<dyn SandboxKind> {
        match kind {
            config::HandlerKind::Namespace => self.ns.clone(),
            _ => self.vms.of(handler, kind).clone(),
        }
    }

    /// Pod `id`: its full id or, as containerd accepts, a unique prefix of it.
    fn pod(&self, id: &str) -> Result<Arc<Pod>> {
        let pods = self.pods.read().unwrap_or_else(|e| e.into_inner());
        by_id_or_prefix(&pods, id, "pod sandbox")
    }

    /// Container `id`: its full id or a unique prefix of it.
    fn container(&self, id: &str) -> Result<Arc<Container>> {
        let containers = self.containers.read().unwrap_or_else(|e| e.into_inner());
        by_id_or_prefix(&containers, id, "container")
    }

    fn all_pods(&self) -> Vec<Arc<Pod>> {
        self.pods
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    fn all_containers(&self) -> Vec<Arc<Container>> {
        self.containers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// huskd's own oom_score_adj when `restrict_oom_score_adj` is set.
    fn min_oom_score_adj(&self) -> Option<i32> {
        if !self.cfg.restrict_oom_score_adj {
            return None;
        }
        std::fs::read_to_string("/proc/self/oom_score_adj")
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Per handler: can it start a pod here (what is missing if not)?
    /// Checks binaries, guest image and KVM; a VM that then fails to boot
    /// still fails RunPodSandbox with its console tail.
    pub fn handler_readiness(&self) -> Vec<(String, std::result::Result<(), String>)> {
        self.cfg
            .handlers
            .keys()
            .map(|n| {
                let r = match self.vms.by_handler.get(n) {
                    Some(v) => v.ready(),
                    None => Ok(()),
                };
                (n.clone(), r)
            })
            .collect()
    }

    /// The configured RuntimeClass handlers.
    pub fn handlers(&self) -> Vec<(String, config::Handler)> {
        self.cfg
            .handlers
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_by_unique_prefix() {
        let map: HashMap<String, u8> = [("abc123".to_string(), 1), ("abd456".to_string(), 2)]
            .into_iter()
            .collect();
        assert!(matches!(by_id_or_prefix(&map, "abc123", "pod"), Ok(1)));
        assert!(matches!(by_id_or_prefix(&map, "abc", "pod"), Ok(1)));
        assert!(matches!(by_id_or_prefix(&map, "abd4", "pod"), Ok(2)));
        assert!(matches!(
            by_id_or_prefix(&map, "ab", "pod"),
            Err(RuntimeError::InvalidArgument(m)) if m.contains("ambiguous")
        ));
        assert!(matches!(
            by_id_or_prefix(&map, "x", "pod"),
            Err(RuntimeError::NotFound(_))
        ));
        assert!(matches!(
            by_id_or_prefix(&map, "", "pod"),
            Err(RuntimeError::InvalidArgument(_))
        ));
    }
}

//! huskd's Prometheus metrics (a leaf: every layer reports here, nothing here
//! imports a layer above it).
//!
//! Counters and histograms live in one process-wide [`Metrics`] that is always
//! recorded into (a few atomics per event); they are served only when
//! `[metrics] address` is set ([`server`]). Gauges that describe what exists
//! now (pods, containers, per-pod host memory) are not kept up to date by
//! events: each scrape asks an [`Inventory`] (the sandbox manager) for a
//! [`Snapshot`] and rewrites them, so they can never drift.
//!
//! Who reports what:
//! - `cri/observe.rs` (a tower layer around the gRPC server): RPC latency and
//!   error counts per method and gRPC code;
//! - `sandbox/` (pod start, container create/start, exits, recovery):
//!   [`PodStart`] phases, sandbox exits, recoveries, container restarts;
//! - `image/`: pulls, their duration and the bytes downloaded.

pub mod server;

use std::collections::HashSet;
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// At most this many distinct `method` label values per service: the method
/// comes from the request path, which any client on the socket chooses.
const MAX_METHODS: usize = 128;
/// Method label of requests past [`MAX_METHODS`].
const OTHER_METHOD: &str = "other";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    service: String,
    method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcCodeLabels {
    service: String,
    method: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    handler: String,
    phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandlerLabels {
    handler: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ExitLabels {
    handler: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    handler: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MemoryLabels {
    pod: String,
    handler: String,
    part: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ColdBootLabels {
    handler: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

/// 1 ms .. ~33 s (16 doubling buckets): CRI calls and start phases.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// 10 ms .. ~5.8 min (16 doubling buckets): image pulls.
fn pull_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 2.0, 16))
}

/// Every metric huskd exports.
pub struct Metrics {
    registry: Registry,
    rpc_duration: Family<RpcLabels, Histogram, fn() -> Histogram>,
    rpc_requests: Family<RpcCodeLabels, Counter>,
    rpc_errors: Family<RpcCodeLabels, Counter>,
    methods: Mutex<HashSet<(String, String)>>,
    pod_start_phase: Family<PhaseLabels, Histogram, fn() -> Histogram>,
    sandbox_exits: Family<ExitLabels, Counter>,
    pods_recovered: Family<HandlerLabels, Counter>,
    container_restarts: Family<HandlerLabels, Counter>,
    pods: Family<StateLabels, Gauge>,
    containers: Family<StateLabels, Gauge>,
    pod_memory: Family<MemoryLabels, Gauge>,
    vm_pool_ready: Family<HandlerLabels, Gauge>,
    vm_pool_booting: Family<HandlerLabels, Gauge>,
    vm_pool_claims: Family<HandlerLabels, Counter>,
    vm_pool_cold_boots: Family<ColdBootLabels, Counter>,
    vm_pool_refill_failures: Family<HandlerLabels, Counter>,
    vm_pool_discards: Family<HandlerLabels, Counter>,
    image_pulls: Family<ResultLabels, Counter>,
    image_pull_duration: Histogram,
    image_pull_bytes: Counter,
    /// Serialises scrapes (each rewrites the gauges from a snapshot).
    scrape: tokio::sync::Mutex<()>,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics.
pub fn global() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("husk");
        let m = Self {
            rpc_duration: Family::new_with_constructor(latency_histogram),
            rpc_requests: Family::default(),
            rpc_errors: Family::default(),
            methods: Mutex::default(),
            pod_start_phase: Family::new_with_constructor(latency_histogram),
            sandbox_exits: Family::default(),
            pods_recovered: Family::default(),
            container_restarts: Family::default(),
            pods: Family::default(),
            containers: Family::default(),
            pod_memory: Family::default(),
            vm_pool_ready: Family::default(),
            vm_pool_booting: Family::default(),
            vm_pool_claims: Family::default(),
            vm_pool_cold_boots: Family::default(),
            vm_pool_refill_failures: Family::default(),
            vm_pool_discards: Family::default(),
            image_pulls: Family::default(),
            image_pull_duration: pull_histogram(),
            image_pull_bytes: Counter::default(),
            scrape: tokio::sync::Mutex::new(()),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "cri_request_duration_seconds",
            "Time huskd took to answer a gRPC call on its socket (to the response headers)",
            m.rpc_duration.clone(),
        );
        r.register(
            "cri_requests",
            "gRPC calls answered, by method and gRPC status code",
            m.rpc_requests.clone(),
        );
        r.register(
            "cri_request_errors",
            "gRPC calls answered with a status other than OK, by method and code",
            m.rpc_errors.clone(),
        );
        r.register(
            "pod_start_phase_seconds",
            "RunPodSandbox phases (network, spawn, agent_ready, sandbox_create, total) and the \
             create and start of a pod's first container",
            m.pod_start_phase.clone(),
        );
        r.register(
            "sandbox_exits",
            "Pod sandboxes (VMs or agents) that ended: reason stopped (StopPodSandbox) or died",
            m.sandbox_exits.clone(),
        );
        r.register(
            "pods_recovered",
            "Running pods huskd adopted again at start (after a restart of huskd)",
            m.pods_recovered.clone(),
        );
        r.register(
            "container_restarts",
            "CreateContainer calls for a restart (attempt > 0) of a container",
            m.container_restarts.clone(),
        );
        r.register(
            "pods",
            "Pods huskd knows, by handler and state",
            m.pods.clone(),
        );
        r.register(
            "containers",
            "Containers huskd knows, by handler and state",
            m.containers.clone(),
        );
        r.register(
            "pod_memory_bytes",
            "Host memory of a pod's VMM and helpers (VM) or agent (namespace): part guest_ram \
             (guest RAM touched, PSS), overhead_pss, overhead_rss",
            m.pod_memory.clone(),
        );
        r.register(
            "vm_pool_ready",
            "Warm VMs booted and waiting for a pod, by VM handler with a pool",
            m.vm_pool_ready.clone(),
        );
        r.register(
            "vm_pool_booting",
            "Warm VMs booting to refill the pool, by handler",
            m.vm_pool_booting.clone(),
        );
        r.register(
            "vm_pool_claims",
            "Pods started on a warm VM of the pool, by handler",
            m.vm_pool_claims.clone(),
        );
        r.register(
            "vm_pool_cold_boots",
            "Pods of a handler with a pool that booted a VM of their own: reason empty (no \
             warm VM ready) or too_small (the pod wants more vCPUs or memory than a warm VM has)",
            m.vm_pool_cold_boots.clone(),
        );
        r.register(
            "vm_pool_refill_failures",
            "Warm VMs that failed to boot while refilling the pool, by handler",
            m.vm_pool_refill_failures.clone(),
        );
        r.register(
            "vm_pool_discards",
            "Warm VMs thrown away (died, stale guest image, agent silent at claim, claimed by a \
             pod that failed), by handler",
            m.vm_pool_discards.clone(),
        );
        r.register(
            "image_pulls",
            "Image pulls, by result (ok, error)",
            m.image_pulls.clone(),
        );
        r.register(
            "image_pull_duration_seconds",
            "Duration of image pulls that downloaded (not joined ones)",
            m.image_pull_duration.clone(),
        );
        r.register(
            "image_pull_bytes",
            "Bytes of image blobs downloaded from registries",
            m.image_pull_bytes.clone(),
        );
        Self { registry, ..m }
    }

    /// One answered gRPC call: `path` is the request's `/package.Service/Method`.
    pub fn rpc(&self, path: &str, code: tonic::Code, took: Duration) {
        let (service, method) = split_path(path);
        let method = {
            let mut known = self.methods.lock().unwrap_or_else(|e| e.into_inner());
            let key = (service.to_string(), method.to_string());
            if known.contains(&key) || known.len() < MAX_METHODS {
                known.insert(key);
                method
            } else {
                OTHER_METHOD
            }
        };
        let l = RpcLabels {
            service: service.into(),
            method: method.into(),
        };
        self.rpc_duration
            .get_or_create(&l)
            .observe(took.as_secs_f64());
        let l = RpcCodeLabels {
            service: l.service,
            method: l.method,
            code: code_name(code).into(),
        };
        self.rpc_requests.get_or_create(&l).inc();
        if code != tonic::Code::Ok {
            self.rpc_errors.get_or_create(&l).inc();
        }
    }

    pub fn sandbox_exit(&self, handler: &str, reason: ExitReason) {
        self.sandbox_exits
            .get_or_create(&ExitLabels {
                handler: handler.into(),
                reason: reason.as_str().into(),
            })
            .inc();
    }

    pub fn pod_recovered(&self, handler: &str) {
        self.pods_recovered
            .get_or_create(&HandlerLabels {
                handler: handler.into(),
            })
            .inc();
    }

    pub fn container_restart(&self, handler: &str) {
        self.container_restarts
            .get_or_create(&HandlerLabels {
                handler: handler.into(),
            })
            .inc();
    }

    /// A phase of a pod's start (see [`PodStart`]).
    pub fn phase(&self, handler: &str, phase: Phase, took: Duration) {
        self.pod_start_phase
            .get_or_create(&PhaseLabels {
                handler: handler.into(),
                phase: phase.as_str().into(),
            })
            .observe(took.as_secs_f64());
    }

    /// A finished image pull (the one that downloaded, not those that joined it).
    pub fn image_pull(&self, ok: bool, took: Duration) {
        let result = if ok { "ok" } else { "error" };
        self.image_pulls
            .get_or_create(&ResultLabels {
                result: result.into(),
            })
            .inc();
        self.image_pull_duration.observe(took.as_secs_f64());
    }

    /// `n` bytes of a blob arrived from a registry.
    pub fn image_bytes(&self, n: u64) {
        self.image_pull_bytes.inc_by(n);
    }

    /// The text exposition (OpenMetrics) with the gauges rewritten from `inventory`.
    pub async fn render(&self, inventory: &std::sync::Arc<dyn Inventory>) -> String {
        let _g = self.scrape.lock().await;
        let inv = inventory.clone();
        let snap = tokio::task::spawn_blocking(move || inv.snapshot())
            .await
            .unwrap_or_default();
        self.set_gauges(&snap);
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "encode metrics");
        }
        out
    }

    fn set_gauges(&self, snap: &Snapshot) {
        for (fam, objs) in [
            (&self.pods, &snap.pods),
            (&self.containers, &snap.containers),
        ] {
            fam.clear();
            for o in objs {
                fam.get_or_create(&StateLabels {
                    handler: o.handler.clone(),
                    state: o.state.clone(),
                })
                .inc();
            }
        }
        self.pod_memory.clear();
        for p in &snap.memory {
            for (part, v) in [
                ("guest_ram", p.guest_ram_bytes),
                ("overhead_pss", p.overhead_pss_bytes),
                ("overhead_rss", p.overhead_rss_bytes),
            ] {
                self.pod_memory
                    .get_or_create(&MemoryLabels {
                        pod: p.pod.clone(),
                        handler: p.handler.clone(),
                        part: part.into(),
                    })
                    .set(i64::try_from(v).unwrap_or(i64::MAX));
            }
        }
        self.vm_pool_ready.clear();
        self.vm_pool_booting.clear();
        for p in &snap.pools {
            let h = HandlerLabels {
                handler: p.handler.clone(),
            };
            let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            self.vm_pool_ready.get_or_create(&h).set(gauge(p.ready));
            self.vm_pool_booting.get_or_create(&h).set(gauge(p.booting));
            catch_up(&self.vm_pool_claims.get_or_create(&h), p.claims);
            catch_up(
                &self.vm_pool_refill_failures.get_or_create(&h),
                p.refill_failures,
            );
            catch_up(&self.vm_pool_discards.get_or_create(&h), p.discards);
            for (reason, n) in [("empty", p.cold_empty), ("too_small", p.cold_too_small)] {
                let l = ColdBootLabels {
                    handler: p.handler.clone(),
                    reason: reason.into(),
                };
                catch_up(&self.vm_pool_cold_boots.get_or_create(&l), n);
            }
        }
    }
}

/// Raises `c` to `to`: a counter the pool keeps itself (monotonic while huskd runs),
/// exported as the Prometheus counter it is.
fn catch_up(c: &Counter, to: u64) {
    let now = c.get();
    if to > now {
        c.inc_by(to - now);
    }
}

/// `/runtime.v1.RuntimeService/RunPodSandbox` → (`runtime.v1.RuntimeService`, `RunPodSandbox`);
/// anything else → (`other`, `other`).
fn split_path(path: &str) -> (&str, &str) {
    let ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_')
    };
    match path.strip_prefix('/').and_then(|p| p.split_once('/')) {
        Some((s, m)) if ok(s) && ok(m) => (s, m),
        _ => (OTHER_METHOD, OTHER_METHOD),
    }
}

/// The gRPC code's name as the gRPC docs spell it (`NotFound`).
pub fn code_name(c: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match c {
        Ok => "OK",
        Cancelled => "Canceled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}

/// Why a pod's sandbox ended.
#[derive(Debug, Clone, Copy)]
pub enum ExitReason {
    /// StopPodSandbox (or RemovePodSandbox) ended it.
    Stopped,
    /// Its VMM or agent died on its own.
    Died,
}

impl ExitReason {
    fn as_str(self) -> &'static str {
        match self {
            ExitReason::Stopped => "stopped",
            ExitReason::Died => "died",
        }
    }
}

/// The phases of a pod's start.
#[derive(Debug, Clone, Copy)]
pub enum Phase {
    /// Taking a warm VM from the pool (its agent's `Check`).
    Claim,
    /// CNI ADD (and the tap of a VM pod).
    Network,
    /// Spawning the VMM and its helpers (VM) or the agent process (namespace).
    Spawn,
    /// Spawned → the agent answers (a VM's guest boot included).
    AgentReady,
    /// A pooled VM's processes joining the pod's cgroup.
    Adopt,
    /// The agent's CreateSandbox.
    SandboxCreate,
    /// A VM's guest network setup (the agent's ConfigureNetwork).
    GuestNetwork,
    /// The whole RunPodSandbox.
    Total,
    /// CreateContainer of the pod's first container.
    FirstContainerCreate,
    /// StartContainer of the pod's first container.
    FirstContainerStart,
}

impl Phase {
    fn as_str(self) -> &'static str {
        match self {
            Phase::Claim => "claim",
            Phase::Network => "network",
            Phase::Spawn => "spawn",
            Phase::AgentReady => "agent_ready",
            Phase::Adopt => "adopt",
            Phase::SandboxCreate => "sandbox_create",
            Phase::GuestNetwork => "guest_network",
            Phase::Total => "total",
            Phase::FirstContainerCreate => "first_container_create",
            Phase::FirstContainerStart => "first_container_start",
        }
    }
}

/// Times the phases of one pod's start, for one handler. Phases are recorded
/// only when [`PodStart::succeeded`] is called (a failed start reports none).
pub struct PodStart {
    handler: String,
    began: Instant,
    last: Mutex<Instant>,
    done: Mutex<Vec<(Phase, Duration)>>,
}

impl PodStart {
    pub fn new(handler: &str) -> Self {
        let now = Instant::now();
        Self {
            handler: handler.to_string(),
            began: now,
            last: Mutex::new(now),
            done: Mutex::default(),
        }
    }

    /// Marks the start of the next phase (time since the last mark is not a phase).
    pub fn mark(&self) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    /// Phase `p` ended now (it began at the last mark or phase end).
    pub fn end(&self, p: Phase) {
        let now = Instant::now();
        let took = {
            let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            std::mem::replace(&mut *last, now).elapsed()
        };
        self.done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((p, took));
    }

    /// The pod started: reports its phases and the total, and returns them as
    /// `phase=ms` pairs joined by commas (for the log line that says the pod is ready).
    pub fn succeeded(self) -> String {
        let m = global();
        let total = self.began.elapsed();
        let mut said = String::new();
        for (p, took) in self.done.into_inner().unwrap_or_else(|e| e.into_inner()) {
            m.phase(&self.handler, p, took);
            said.push_str(&format!("{}={},", p.as_str(), took.as_millis()));
        }
        m.phase(&self.handler, Phase::Total, total);
        said.push_str(&format!("total={}", total.as_millis()));
        said
    }
}

/// What exists now, for the gauges.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    pub pods: Vec<Object>,
    pub containers: Vec<Object>,
    pub memory: Vec<PodMemory>,
    pub pools: Vec<PoolCounts>,
}

/// One VM handler's warm pool (`[runtime.vm.pool]`): what it holds now, and its counts
/// since huskd started.
#[derive(Debug, Clone, Default)]
pub struct PoolCounts {
    pub handler: String,
    pub ready: u64,
    pub booting: u64,
    pub claims: u64,
    /// Pods that booted their own VM because no warm VM was ready.
    pub cold_empty: u64,
    /// Pods that booted their own VM because they want more than a warm VM has.
    pub cold_too_small: u64,
    pub refill_failures: u64,
    pub discards: u64,
}

/// A pod or container: its handler and state.
#[derive(Debug, Clone)]
pub struct Object {
    pub handler: String,
    pub state: String,
}

/// The host memory of one running pod's processes.
#[derive(Debug, Clone)]
pub struct PodMemory {
    pub pod: String,
    pub handler: String,
    pub guest_ram_bytes: u64,
    pub overhead_pss_bytes: u64,
    pub overhead_rss_bytes: u64,
}

/// Tells a scrape what exists (implemented by the sandbox manager). Called on a
/// blocking thread: it may read /proc.
pub trait Inventory: Send + Sync + 'static {
    fn snapshot(&self) -> Snapshot;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    struct Fixed(Snapshot);
    impl Inventory for Fixed {
        fn snapshot(&self) -> Snapshot {
            self.0.clone()
        }
    }

    #[test]
    fn paths_split_into_bounded_labels() {
        assert_eq!(
            split_path("/runtime.v1.RuntimeService/RunPodSandbox"),
            ("runtime.v1.RuntimeService", "RunPodSandbox")
        );
        assert_eq!(split_path("/x"), ("other", "other"));
        assert_eq!(split_path("/a/b/c"), ("other", "other"));
        assert_eq!(split_path("/a/b\"c"), ("other", "other"));
        assert_eq!(
            split_path(&format!("/a/{}", "m".repeat(65))),
            ("other", "other")
        );
    }

    #[tokio::test]
    async fn render_counts_and_gauges() {
        let m = Metrics::new();
        m.rpc(
            "/runtime.v1.RuntimeService/Version",
            tonic::Code::Ok,
            Duration::from_millis(2),
        );
        m.rpc(
            "/runtime.v1.RuntimeService/StopPodSandbox",
            tonic::Code::NotFound,
            Duration::from_millis(1),
        );
        for i in 0..(MAX_METHODS + 5) {
            m.rpc(
                &format!("/s/M{i}"),
                tonic::Code::Unimplemented,
                Duration::ZERO,
            );
        }
        let inv: std::sync::Arc<dyn Inventory> = std::sync::Arc::new(Fixed(Snapshot {
            pods: vec![
                Object {
                    handler: "husk-ns".into(),
                    state: "ready".into(),
                };
                2
            ],
            containers: vec![],
            memory: vec![PodMemory {
                pod: "p1".into(),
                handler: "husk-ns".into(),
                guest_ram_bytes: 0,
                overhead_pss_bytes: 4096,
                overhead_rss_bytes: 8192,
            }],
            pools: vec![PoolCounts {
                handler: "husk-qemu".into(),
                ready: 2,
                booting: 1,
                claims: 3,
                cold_empty: 4,
                cold_too_small: 5,
                refill_failures: 6,
                discards: 7,
            }],
        }));
        let text = m.render(&inv).await;
        assert!(
            text.contains(
                "husk_cri_request_errors_total{service=\"runtime.v1.RuntimeService\",method=\"StopPodSandbox\",code=\"NotFound\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("husk_pods{handler=\"husk-ns\",state=\"ready\"} 2"),
            "{text}"
        );
        assert!(text.contains(
            "husk_pod_memory_bytes{pod=\"p1\",handler=\"husk-ns\",part=\"overhead_pss\"} 4096"
        ));
        for line in [
            "husk_vm_pool_ready{handler=\"husk-qemu\"} 2",
            "husk_vm_pool_booting{handler=\"husk-qemu\"} 1",
            "husk_vm_pool_claims_total{handler=\"husk-qemu\"} 3",
            "husk_vm_pool_cold_boots_total{handler=\"husk-qemu\",reason=\"empty\"} 4",
            "husk_vm_pool_cold_boots_total{handler=\"husk-qemu\",reason=\"too_small\"} 5",
            "husk_vm_pool_refill_failures_total{handler=\"husk-qemu\"} 6",
            "husk_vm_pool_discards_total{handler=\"husk-qemu\"} 7",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
        assert!(
            text.contains("# TYPE husk_vm_pool_claims counter"),
            "{text}"
        );
        // A later scrape with higher counts raises the counters to them (never lowers).
        let inv2: std::sync::Arc<dyn Inventory> = std::sync::Arc::new(Fixed(Snapshot {
            pools: vec![PoolCounts {
                handler: "husk-qemu".into(),
                claims: 9,
                ..Default::default()
            }],
            ..Default::default()
        }));
        let text = m.render(&inv2).await;
        assert!(
            text.contains("husk_vm_pool_claims_total{handler=\"husk-qemu\"} 9"),
            "{text}"
        );
        assert!(
            text.contains("husk_vm_pool_discards_total{handler=\"husk-qemu\"} 7"),
            "{text}"
        );
        assert!(
            text.contains("husk_vm_pool_ready{handler=\"husk-qemu\"} 0"),
            "{text}"
        );
        assert!(text.contains("method=\"other\""), "past the method cap");
        let methods = m.methods.lock().unwrap().len();
        assert_eq!(methods, MAX_METHODS);
        assert!(text.ends_with("# EOF\n"));
    }
}

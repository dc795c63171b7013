//! Pod sandbox lifecycle: run, stop, remove, status, list.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use husk_proto::agent as pb;
use husk_proto::cri;
use prost::Message;
use protobuf::MessageField;

use super::kind::{LaunchSpec, remove_pod_cgroups};
use super::orphans::{crash_point, kill_agent_point};
use super::state::{ContainerState, PodRecord, PodState, new_id, now_ns};
use super::{ContainerView, Manager, Pod, Result, RuntimeError, lock};
use crate::config::HandlerKind as Kind;
use crate::metrics::{ExitReason, Phase, PodStart};

/// A pod as the CRI layer sees it.
#[derive(Debug, Clone)]
pub struct PodView {
    pub rec: PodRecord,
    pub config: cri::PodSandboxConfig,
    pub containers: Vec<ContainerView>,
    pub agent_alive: bool,
    /// Pod IPs from CNI (IPv4 first); empty without CNI.
    pub ips: Vec<String>,
}

/// How long a stopping agent gets to tear its sandbox down before SIGKILL.
const AGENT_GRACE: Duration = Duration::from_secs(3);
/// How long StopPodSandbox waits for the agent to stop the pod's containers and tear its
/// sandbox down before it stops the sandbox (the VM) without it.
const STOP_AGENT_BUDGET: Duration = Duration::from_secs(15);
/// How long the cgroups of a dead pod may stay busy (its processes dying).
pub(super) const CGROUP_WAIT: Duration = Duration::from_secs(5);

pub(super) const NS_NODE: i32 = 2;

fn name_key(md: &cri::PodSandboxMetadata) -> String {
    format!("{}/{}/{}/{}", md.namespace, md.name, md.uid, md.attempt)
}

/// The namespace options of a pod config (defaults when absent).
pub(super) fn pod_ns(config: &cri::PodSandboxConfig) -> cri::NamespaceOption {
    config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .and_then(|s| s.namespace_options.clone())
        .unwrap_or_default()
}

/// The kernel's limit on a host name (HOST_NAME_MAX).
const HOST_NAME_MAX: usize = 64;

/// An explicit pod hostname must fit the kernel's limit (containerd and runc refuse longer).
fn validate_hostname(h: &str) -> Result<()> {
    if h.len() > HOST_NAME_MAX {
        return Err(RuntimeError::InvalidArgument(format!(
            "pod sandbox config: hostname is {} bytes long, the limit is {HOST_NAME_MAX}",
            h.len()
        )));
    }
    Ok(())
}

/// The pod's hostname: the CRI's, or (as containerd does when the CRI gives none) the
/// node's own hostname, never derived from the pod name (which may be longer than a
/// hostname can be).
fn pod_hostname(config: &cri::PodSandboxConfig) -> Result<String> {
    if !config.hostname.is_empty() {
        return Ok(config.hostname.clone());
    }
    nix::unistd::gethostname()
        .map_err(|e| RuntimeError::Host {
            what: "gethostname",
            source: e.into(),
        })?
        .into_string()
        .map_err(|_| RuntimeError::HostnameNotUtf8)
}

impl Manager {
    pub async fn run_pod(
        self: &Arc<Self>,
        config: cri::PodSandboxConfig,
        handler: &str,
    ) -> Result<String> {
        super::validate::pod_config(&config)?;
        let md = config
            .metadata
            .clone()
            .filter(|m| !m.name.is_empty())
            .ok_or_else(|| {
                RuntimeError::InvalidArgument(
                    "pod sandbox config: metadata with a name is required".into(),
                )
            })?;
        validate_hostname(&config.hostname)?;
        let (handler, spec) = self.cfg.resolve(handler).ok_or_else(|| {
            RuntimeError::InvalidArgument(format!(
                "unknown runtime handler {handler:?} (configured: {})",
                self.cfg
                    .handlers
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
        let handler = handler.to_string();
        let kind = spec.kind;
        let ns = pod_ns(&config);
        if kind.is_vm() {
            for (what, mode) in [("network", ns.network), ("PID", ns.pid), ("IPC", ns.ipc)] {
                if mode == NS_NODE {
                    return Err(RuntimeError::InvalidArgument(format!(
                        "the VM sandbox (handler {handler:?}) cannot share the host {what} namespace: \
                         a pod in a VM has its own kernel; use a namespace-sandbox handler (husk-ns) for host-{} pods",
                        what.to_lowercase()
                    )));
                }
            }
        }
        if kind == Kind::Namespace && ns.pid == NS_NODE {
            return Err(RuntimeError::InvalidArgument(
                "host PID namespace is not supported by the namespace sandbox (its agent is the init of its own PID namespace)".into(),
            ));
        }
        let cgroup_parent = match config
            .linux
            .as_ref()
            .map(|l| l.cgroup_parent.trim_matches('/'))
            .filter(|p| !p.is_empty())
        {
            Some(p) if p.split('/').any(|c| c == ".." || c == ".") => {
                return Err(RuntimeError::InvalidArgument(format!(
                    "bad cgroup_parent {p:?}"
                )));
            }
            Some(p) => p.to_string(),
            None => String::new(),
        };
        let start = PodStart::new(&handler);
        // A warm VM when the handler has a pool and the pod fits one: the pod takes its id.
        let pooled = match kind.is_vm() {
            true => self.claim_pooled(&handler, &config).await,
            false => None,
        };
        if pooled.is_some() {
            start.end(Phase::Claim);
        }
        let id = pooled.as_ref().map_or_else(new_id, |v| v.id.clone());
        let owns_cgroup = cgroup_parent.is_empty();
        let cgroup_parent = if cgroup_parent.is_empty() {
            format!("{}/{}", self.cfg.cgroup_parent, id)
        } else {
            cgroup_parent
        };

        let key = name_key(&md);
        let clash = {
            let mut names = lock(&self.pod_names);
            let other = names.get(&key).cloned();
            if other.is_none() {
                names.insert(key.clone(), id.clone());
            }
            other
        };
        if let Some(other) = clash {
            if let Some(vm) = pooled {
                // A claimed VM is never given to another pod: it goes.
                self.discard_pooled(&handler, vm).await;
            }
            return Err(RuntimeError::AlreadyExists(format!(
                "pod sandbox {:?} (namespace {:?}, uid {:?}, attempt {}) already exists: {other}",
                md.name, md.namespace, md.uid, md.attempt
            )));
        }
        let result = self
            .run_pod_reserved(
                &id,
                config,
                &handler,
                spec,
                cgroup_parent,
                owns_cgroup,
                pooled,
                start,
            )
            .await;
        if result.is_err() {
            lock(&self.pod_names).remove(&key);
        }
        result.map(|()| id)
    }

    #[allow(clippy::too_many_arguments)]
    async fn run_pod_reserved(
        self: &Arc<Self>,
        id: &str,
        config: cri::PodSandboxConfig,
        handler: &str,
        spec: crate::config::Handler,
        cgroup_parent: String,
        owns_cgroup: bool,
        pooled: Option<super::vm::pool::PooledVm>,
        start: PodStart,
    ) -> Result<()> {
        let kind = spec.kind;
        let kind_impl = self.kind(handler, kind);
        let hostname = pod_hostname(&config)?;
        let mut rec = PodRecord {
            id: id.to_string(),
            handler: handler.to_string(),
            kind,
            state: PodState::Creating,
            created_at: now_ns(),
            config: config.encode_to_vec(),
            cgroup_parent: cgroup_parent.clone(),
            owns_cgroup,
            agent: None,
            reason: String::new(),
        };
        if let Err(e) = self.store.put_pod(id, &rec) {
            if let Some(vm) = pooled {
                self.discard_pooled(handler, vm).await;
            }
            return Err(e.into());
        }
        crash_point("run_pod:recorded");
        let pooled_proc = pooled.as_ref().map(|v| v.proc.clone());
        // Before the agent starts: its mount namespace must see the pinned netns.
        let netns = match self.net.setup(id, &config).await {
            Ok(p) => p,
            Err(e) => {
                if let Some(vm) = pooled {
                    self.discard_pooled(handler, vm).await;
                }
                let _ = self.store.remove_pod(id);
                return Err(e.into());
            }
        };
        let cleanup = |proc: Option<super::state::AgentProcess>| {
            let kind_impl = kind_impl.clone();
            let net = self.net.clone();
            let store = self.store.clone();
            let id = id.to_string();
            let cg = cgroup_parent.clone();
            async move {
                if let Some(p) = proc {
                    kind_impl.shutdown(&p, Duration::ZERO).await;
                }
                kind_impl.cleanup(&id);
                remove_pod_cgroups(&cg, owns_cgroup, CGROUP_WAIT).await;
                if let Err(e) = net.teardown(&id).await {
                    tracing::error!(pod = %id, error = %e, "remove the network of a failed pod");
                }
                let _ = store.remove_pod(&id);
            }
        };
        // A VM pod's CNI network reaches the guest through a tap.
        let vm_nic = if kind.is_vm() {
            let nic = match &pooled {
                Some(vm) => self.net.adopt_vm(id, &self.pool_netns, &vm.tap),
                None => self.net.attach_vm(id),
            };
            match nic {
                Ok(n) => n,
                Err(e) => {
                    cleanup(pooled_proc).await;
                    return Err(e.into());
                }
            }
        } else {
            None
        };
        crash_point("run_pod:network");
        start.end(Phase::Network);
        // A pooled VM's NIC has its own MAC: the agent gives it the CNI interface's.
        let pool_mac = pooled.as_ref().map(|v| v.mac.clone());
        let (proc, agent) = match pooled {
            Some(vm) => {
                start.mark();
                self.adopt_pooled(handler, &vm, &cgroup_parent).await;
                start.end(Phase::Adopt);
                (vm.proc, vm.agent)
            }
            None => {
                let launch = LaunchSpec {
                    cgroup_parent: &cgroup_parent,
                    config: &config,
                    network: vm_nic.as_ref(),
                    start: &start,
                    vm_size: None,
                    background: false,
                };
                match kind_impl.launch(id, &launch).await {
                    Ok(x) => x,
                    Err(e) => {
                        cleanup(None).await;
                        return Err(e);
                    }
                }
            }
        };
        crash_point("run_pod:launched");
        rec.agent = Some(proc.clone());
        if let Err(e) = self.store.put_pod(id, &rec) {
            cleanup(Some(proc)).await;
            return Err(e.into());
        }
        crash_point("run_pod:agent-recorded");
        kill_agent_point("run_pod:agent-recorded", proc.pid);
        start.mark();
        let ns = pod_ns(&config);
        let dns = config.dns_config.clone().unwrap_or_default();
        let req = pb::CreateSandboxRequest {
            sandbox_id: id.to_string(),
            hostname,
            dns: MessageField::some(pb::DnsConfig {
                servers: dns.servers,
                searches: dns.searches,
                options: dns.options,
                ..Default::default()
            }),
            // In a VM the guest's own namespaces are the pod's.
            namespaces: MessageField::some(pb::SandboxNamespaces {
                network: !kind.is_vm() && ns.network != NS_NODE,
                ipc: !kind.is_vm() && ns.ipc != NS_NODE,
                uts: !kind.is_vm() && ns.network != NS_NODE,
                // The agent's own fresh PID namespace is the pod's.
                pid: false,
                // A host path: only the namespace sandbox can join it (a VM
                // pod's network reaches the guest through a tap).
                network_path: netns
                    .as_ref()
                    .filter(|_| !kind.is_vm())
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                ..Default::default()
            }),
            cgroup_parent: cgroup_parent.clone(),
            // A VM pod's share (CRI mounts are bound into it): virtio-fs in the guest.
            mounts: kind_impl
                .share_dir(&proc)
                .map(|_| pb::SandboxMount {
                    name: super::share::SHARE.into(),
                    source: super::vm::SHARE_TAG.into(),
                    fstype: "virtiofs".into(),
                    ..Default::default()
                })
                .into_iter()
                .collect(),
            ..Default::default()
        };
        let setup = kind_impl.setup_timeout();
        if let Err(e) = agent.create_sandbox(req, setup).await {
            let e = setup_failed(kind_impl.as_ref(), id, &proc, "create sandbox", e).await;
            cleanup(Some(proc)).await;
            return Err(e);
        }
        crash_point("run_pod:sandbox-created");
        start.end(Phase::SandboxCreate);
        if let Some(nic) = &vm_nic
            && let Err(e) = agent
                .configure_network(guest_network(nic, pool_mac.as_deref()), setup)
                .await
        {
            let what = "configure the guest network";
            let e = setup_failed(kind_impl.as_ref(), id, &proc, what, e).await;
            let _ = agent.destroy_sandbox(id).await;
            cleanup(Some(proc)).await;
            return Err(e);
        }
        if vm_nic.is_some() {
            start.end(Phase::GuestNetwork);
        }
        rec.state = PodState::Ready;
        if let Err(e) = self.store.put_pod(id, &rec) {
            let _ = agent.destroy_sandbox(id).await;
            cleanup(Some(proc)).await;
            return Err(e.into());
        }
        let pod = Arc::new(Pod {
            id: id.to_string(),
            config,
            rec: Mutex::new(rec),
            lifecycle: tokio::sync::Mutex::new(()),
            agent: Mutex::new(Some(agent)),
            containers: Mutex::new(BTreeMap::new()),
            persist_lock: Mutex::new(()),
            sample: Default::default(),
            first_container: Default::default(),
            kind: kind_impl,
        });
        self.pods
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_string(), pod.clone());
        self.spawn_monitor(pod);
        let phases = start.succeeded();
        tracing::info!(pod = id, handler, %phases, "pod sandbox ready");
        Ok(())
    }

    /// Stops every container (SIGKILL), destroys the sandbox and stops its
    /// agent. Idempotent.
    pub async fn stop_pod(self: &Arc<Self>, id: &str) -> Result<()> {
        let pod = self.pod(id)?;
        let id: &str = &pod.id;
        let _g = pod.lifecycle.lock().await;
        // What the agent is asked (stop each container, tear the sandbox down) is bounded as a
        // whole: a guest that stops answering must not hold the stop for the agent's RPC
        // deadline per call. Past the bound the VM is stopped anyway, and containers not seen
        // exiting are recorded as stopped with the sandbox (below).
        let agent_part = async {
            for c in pod.containers() {
                if let Err(e) = self.stop_container_inner(&pod, &c, 0).await {
                    tracing::warn!(container = %c.id, error = %e, "stop container of a stopping pod");
                }
            }
            if let Some(agent) = pod.agent()
                && pod.agent_alive()
                && let Err(e) = agent.destroy_sandbox(id).await
            {
                tracing::warn!(pod = id, error = %e, "destroy sandbox");
            }
        };
        if tokio::time::timeout(STOP_AGENT_BUDGET, agent_part)
            .await
            .is_err()
        {
            tracing::warn!(
                pod = id,
                budget_s = STOP_AGENT_BUDGET.as_secs(),
                "the agent did not finish stopping the pod in time; stopping its sandbox without it"
            );
        }
        let rec = pod.record();
        if pod.agent().is_some() {
            crate::metrics::global().sandbox_exit(&rec.handler, ExitReason::Stopped);
        }
        if let Some(p) = &rec.agent {
            pod.kind.shutdown(p, AGENT_GRACE).await;
        }
        *lock(&pod.agent) = None;
        let left = remove_pod_cgroups(&rec.cgroup_parent, rec.owns_cgroup, CGROUP_WAIT).await;
        if !left.is_empty() {
            tracing::warn!(pod = id, ?left, "pod cgroups left behind");
        }
        // CNI DEL once nothing runs in the namespace; a failure fails the stop (retried).
        let net = self.net.teardown(id).await;
        let now = now_ns();
        for c in pod.containers() {
            if c.record().state != ContainerState::Exited {
                c.mark_exited(
                    &self.store,
                    0,
                    now,
                    "SandboxStopped",
                    "the pod sandbox was stopped",
                );
            }
        }
        {
            let mut r = lock(&pod.rec);
            if r.state.can_become(PodState::NotReady) {
                r.state = PodState::NotReady;
            }
        }
        pod.persist(&self.store)?;
        net?;
        Ok(())
    }

    /// Stops and forgets a pod and all its containers. Removing an unknown
    /// pod succeeds (the CRI makes RemovePodSandbox idempotent).
    pub async fn remove_pod(self: &Arc<Self>, id: &str) -> Result<()> {
        let pod = match self.pod(id) {
            Ok(p) => p,
            Err(RuntimeError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        let id: &str = &pod.id;
        self.stop_pod(id).await?;
        let _g = pod.lifecycle.lock().await;
        {
            let mut all = self.containers.write().unwrap_or_else(|e| e.into_inner());
            for c in pod.containers() {
                all.remove(&c.id);
            }
        }
        lock(&pod.containers).clear();
        pod.kind.cleanup(id);
        self.store.remove_pod(id)?;
        self.pods
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        lock(&self.pod_names).retain(|_, v| v != id);
        tracing::info!(pod = id, "pod sandbox removed");
        Ok(())
    }

    fn view(&self, pod: &Pod) -> PodView {
        PodView {
            rec: pod.record(),
            config: pod.config.clone(),
            containers: pod
                .containers()
                .iter()
                .map(|c| ContainerView::of(c))
                .collect(),
            agent_alive: pod.agent_alive(),
            ips: self.net.pod_ips(&pod.id),
        }
    }

    pub fn pod_status(&self, id: &str) -> Result<PodView> {
        let pod = self.pod(id)?;
        Ok(self.view(&pod))
    }

    /// Pods matching the CRI filter (id: exact or unique prefix).
    pub fn list_pods(&self, filter: Option<&cri::PodSandboxFilter>) -> Vec<PodView> {
        let mut out: Vec<PodView> = self
            .all_pods()
            .iter()
            .map(|p| self.view(p))
            .filter(|v| match filter {
                None => true,
                Some(f) => {
                    (f.id.is_empty() || v.rec.id.starts_with(&f.id))
                        && f.state
                            .as_ref()
                            .is_none_or(|s| pod_state_code(v.rec.state) == s.state)
                        && labels_match(&v.config.labels, &f.label_selector)
                }
            })
            .collect();
        out.sort_by_key(|v| v.rec.created_at);
        out
    }
}

/// The error of a failed setup RPC `what`: when the connection broke because the agent's
/// process (a VM) exited, that exit with its logs, not the broken connection.
async fn setup_failed(
    kind: &dyn super::kind::SandboxKind,
    id: &str,
    proc: &super::state::AgentProcess,
    what: &'static str,
    e: super::agent::AgentError,
) -> RuntimeError {
    use super::agent::AgentError as A;
    if matches!(e, A::Transport(_) | A::Timeout)
        && let Some(exited) = kind.exited_during(id, proc, what).await
    {
        tracing::warn!(pod = id, error = %e, "agent's process exited during {what}");
        return exited;
    }
    RuntimeError::agent(what, e)
}

/// The agent's ConfigureNetwork for a VM pod's NIC; a pooled VM's NIC is found by its own
/// MAC (`pool_mac`) and given the CNI interface's.
fn guest_network(
    nic: &crate::network::tap::VmNic,
    pool_mac: Option<&str>,
) -> pb::ConfigureNetworkRequest {
    let mut r = nic.configure_request(crate::network::IFNAME);
    if let Some(m) = pool_mac {
        for i in &mut r.interfaces {
            i.set_mac = std::mem::replace(&mut i.mac, m.to_string());
        }
    }
    r
}

/// CRI PodSandboxState code of a pod state.
pub fn pod_state_code(s: PodState) -> i32 {
    match s {
        PodState::Ready => cri::PodSandboxState::SandboxReady as i32,
        _ => cri::PodSandboxState::SandboxNotready as i32,
    }
}

pub(super) fn labels_match(
    labels: &HashMap<String, String>,
    selector: &HashMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

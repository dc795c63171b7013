//! Startup: rebuild pods and containers from the store and reconcile them
//! with their agents (which outlive huskd).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use husk_proto::agent as pb;
use husk_proto::cri;
use prost::Message;

use super::agent::Agent;
use super::kind::{SandboxKind, remove_pod_cgroups};
use super::logs::CriLog;
use super::orphans;
use super::pod::CGROUP_WAIT;
use super::state::{AgentProcess, ContainerRecord, ContainerState, PodRecord, PodState, now_ns};
use super::{Container, Manager, Pod, Result, lock};

impl Manager {
    pub(super) async fn recover(self: &Arc<Self>) -> Result<()> {
        let all: Vec<(PodRecord, Vec<ContainerRecord>)> = self.store.load()?;
        // All pods at once: each may wait up to DIAL_WAIT for a slow (or silent) agent.
        futures::future::join_all(all.into_iter().map(|(prec, crecs)| async move {
            let id = prec.id.clone();
            if let Err(e) = self.recover_pod(prec, crecs).await {
                tracing::error!(pod = %id, error = %e, "recover pod");
            }
        }))
        .await;
        self.kill_unrecorded().await;
        let pods = self.pods.read().unwrap_or_else(|e| e.into_inner()).clone();
        self.net
            .remove_orphans(&|id: &str| pods.contains_key(id))
            .await;
        let ready = pods
            .values()
            .filter(|p| p.record().state == PodState::Ready)
            .map(|p| p.id.clone())
            .collect();
        self.net.clone().spawn_checks(ready);
        Ok(())
    }

    /// Kills the processes of pods huskd has no record of (a crash after a pod's
    /// record went but before its processes did) and removes their run dirs and cgroups.
    async fn kill_unrecorded(self: &Arc<Self>) {
        let known: std::collections::HashSet<String> = self
            .pods
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        let run_dir = self.ns.run_dir.clone();
        let killed = tokio::task::spawn_blocking(move || {
            orphans::kill_unknown(&run_dir, &|p| known.contains(p))
        })
        .await
        .unwrap_or_default();
        for id in killed {
            self.ns.cleanup(&id);
            self.vms.husk_vmm.cleanup(&id);
            let cg = format!("{}/{id}", self.cfg.cgroup_parent.trim_matches('/'));
            remove_pod_cgroups(&cg, true, CGROUP_WAIT).await;
        }
    }

    async fn recover_pod(
        self: &Arc<Self>,
        mut prec: PodRecord,
        crecs: Vec<ContainerRecord>,
    ) -> Result<()> {
        let kind = self.kind(&prec.handler, prec.kind);
        let id = prec.id.clone();
        if prec.state == PodState::Creating {
            // huskd died while starting it: undo.
            tracing::info!(pod = %id, "cleaning up a pod whose start was interrupted");
            if let Some(p) = &prec.agent {
                kind.shutdown(p, Duration::ZERO).await;
            }
            // Also what it started before recording a pid (a VM boots for seconds first).
            let run_dir = self.ns.run_dir.clone();
            let pod = id.clone();
            let _ = tokio::task::spawn_blocking(move || orphans::kill_pod(&run_dir, &pod)).await;
            kind.cleanup(&id);
            remove_pod_cgroups(&prec.cgroup_parent, prec.owns_cgroup, CGROUP_WAIT).await;
            if let Err(e) = self.net.teardown(&id).await {
                tracing::error!(pod = %id, error = %e, "remove the network of an interrupted pod");
            }
            self.store.remove_pod(&id)?;
            return Ok(());
        }
        let config = cri::PodSandboxConfig::decode(prec.config.as_slice()).unwrap_or_default();
        let mut agent = None;
        if prec.state == PodState::Ready {
            let alive = prec.agent.as_ref().is_some_and(|p| kind.alive(p));
            if alive && let Some(p) = &prec.agent {
                agent = dial(kind.as_ref(), p, &id).await;
            }
            if agent.is_none() {
                if alive {
                    tracing::warn!(pod = %id, wait = ?DIAL_WAIT, "the agent of a live pod did not answer: pod marked NotReady, its processes stopped");
                } else {
                    tracing::warn!(pod = %id, "the pod's agent process was gone: pod marked NotReady");
                }
                prec.state = PodState::NotReady;
                prec.reason = "AgentExited: the agent was gone when huskd restarted".into();
                if let Some(p) = &prec.agent {
                    kind.shutdown(p, Duration::ZERO).await;
                }
                remove_pod_cgroups(&prec.cgroup_parent, prec.owns_cgroup, CGROUP_WAIT).await;
            }
        }
        let agent_states: HashMap<String, pb::ContainerStateResponse> = match &agent {
            Some(a) => a
                .list_containers()
                .await
                .map(|l| l.into_iter().map(|s| (s.container_id.clone(), s)).collect())
                .unwrap_or_default(),
            None => HashMap::new(),
        };
        let pod = Arc::new(Pod {
            id: id.clone(),
            config,
            rec: Mutex::new(prec.clone()),
            lifecycle: tokio::sync::Mutex::new(()),
            agent: Mutex::new(agent.clone()),
            containers: Mutex::new(BTreeMap::new()),
            persist_lock: Mutex::new(()),
            sample: Default::default(),
            // Not a start: no first-container phases for an adopted pod.
            first_container: [true.into(), true.into()],
            kind,
        });
        pod.persist(&self.store)?;
        let mut to_supervise = vec![];
        for mut crec in crecs {
            let known = agent_states.get(&crec.id);
            reconcile(&mut crec, known, agent.is_some());
            let config = cri::ContainerConfig::decode(crec.config.as_slice()).unwrap_or_default();
            let running = crec.state == ContainerState::Running;
            let log_path = crec.log_path.clone();
            let c = Container::new(crec, config);
            c.persist(&self.store)?;
            if running {
                let progress = self.store.log_progress(&id, &c.id);
                match CriLog::open(log_path, Some(&progress)) {
                    Ok(l) => *lock(&c.log) = Some(Arc::new(l)),
                    Err(e) => tracing::warn!(container = %c.id, error = %e, "reopen log"),
                }
                to_supervise.push(c.clone());
            }
            lock(&pod.containers).insert(c.id.clone(), c.clone());
            self.containers
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .insert(c.id.clone(), c);
        }
        // A VM pod's share entries of containers huskd never recorded (a crash during
        // CreateContainer, after the binds).
        if let Some(share) = prec
            .agent
            .as_ref()
            .and_then(|p| pod.kind.share_dir(p))
            .and_then(|d| super::share::PodShare::existing(&d))
        {
            let known = lock(&pod.containers).keys().cloned().collect();
            for cid in super::share::unrecorded_containers(&share, &known) {
                tracing::info!(pod = %id, container = %cid, "unbinding the share entries of a container huskd has no record of");
                share.unbind_container(&cid);
            }
        }
        // Containers the agent has but huskd never recorded (crash between the two).
        if let Some(a) = &agent {
            for cid in agent_states.keys() {
                if !lock(&pod.containers).contains_key(cid) {
                    tracing::info!(pod = %id, container = %cid, "removing a container huskd has no record of");
                    let _ = a.remove_container(cid, true).await;
                }
            }
        }
        if let Some(md) = &pod.config.metadata {
            let key = format!("{}/{}/{}/{}", md.namespace, md.name, md.uid, md.attempt);
            lock(&self.pod_names).insert(key, id.clone());
        }
        self.pods
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone(), pod.clone());
        if let Some(a) = agent {
            crate::metrics::global().pod_recovered(&prec.handler);
            for c in to_supervise {
                self.spawn_supervisor(pod.clone(), c, a.clone());
            }
            self.spawn_monitor(pod);
        }
        tracing::info!(pod = %id, state = ?prec.state, "pod recovered");
        Ok(())
    }
}

/// Connects to the agent of pod `id`; `None` unless it answers, serves
/// that pod and its namespace holder is alive.
/// How long a restarted huskd waits for the agent of a pod whose processes live. A guest on a
/// loaded node can take seconds to answer; giving up stops a running pod.
const DIAL_WAIT: Duration = Duration::from_secs(15);

async fn dial(kind: &dyn SandboxKind, p: &AgentProcess, id: &str) -> Option<Agent> {
    let deadline = Instant::now() + DIAL_WAIT;
    loop {
        if let Ok(a) = kind.connect(p).await
            && let Ok(check) = a.check(Duration::from_secs(5)).await
        {
            if check.sandbox_id == id && check.sandbox_ready {
                return Some(a);
            }
            tracing::warn!(pod = id, serves = %check.sandbox_id, ready = check.sandbox_ready, "agent does not serve a ready pod");
            return None;
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Brings a container record in line with what the agent says (the agent
/// is authoritative for state and exit codes while it lives).
fn reconcile(c: &mut ContainerRecord, agent: Option<&pb::ContainerStateResponse>, agent_up: bool) {
    use pb::ContainerStatus as S;
    if c.state == ContainerState::Exited {
        return;
    }
    match agent.map(|s| (s.status.enum_value_or_default(), s)) {
        Some((S::CONTAINER_STATUS_RUNNING, s)) => {
            if c.transition(ContainerState::Running) && c.started_at == 0 {
                c.started_at = s.started_at;
            }
        }
        Some((S::CONTAINER_STATUS_STOPPED, s)) => {
            if c.state == ContainerState::Created && s.started_at > 0 {
                c.transition(ContainerState::Running);
                c.started_at = s.started_at;
            }
            let reason = if s.oom_killed {
                "OOMKilled"
            } else if s.exit_code == 0 {
                "Completed"
            } else {
                "Error"
            };
            let at = if s.finished_at > 0 {
                s.finished_at
            } else {
                now_ns()
            };
            c.exited(s.exit_code, at, reason, "");
        }
        Some(_) => {}
        None if agent_up => {
            c.exited(
                255,
                now_ns(),
                "ContainerLost",
                "the agent no longer knows this container",
            );
        }
        None => {
            c.exited(
                137,
                now_ns(),
                "SandboxAgentExited",
                "the pod's husk-agent exited; the container was killed with its PID namespace",
            );
        }
    }
}

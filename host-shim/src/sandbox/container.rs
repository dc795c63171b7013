//! Container lifecycle: create, start, stop, remove, status, list, update,
//! log reopen.

use std::sync::Arc;
use std::time::Duration;

use husk_proto::cri;
use prost::Message;

use super::logs::CriLog;
use super::pod::labels_match;
use super::share;
use super::spec;
use super::state::{ContainerRecord, ContainerState, PodState, new_id, now_ns};
use super::validate;
use super::{Container, Manager, Pod, Result, RuntimeError, lock};
use crate::metrics::Phase;

/// A container as the CRI layer sees it.
#[derive(Debug, Clone)]
pub struct ContainerView {
    pub rec: ContainerRecord,
    pub config: cri::ContainerConfig,
}

impl ContainerView {
    pub(super) fn of(c: &Container) -> Self {
        Self {
            rec: c.record(),
            config: c.config.clone(),
        }
    }

    pub fn resources(&self) -> Option<cri::LinuxContainerResources> {
        cri::LinuxContainerResources::decode(self.rec.resources.as_slice()).ok()
    }
}

/// How long SIGKILL may take to be reported before StopContainer gives up.
const KILL_WAIT: Duration = Duration::from_secs(10);

impl Manager {
    pub async fn create_container(
        self: &Arc<Self>,
        pod_id: &str,
        config: cri::ContainerConfig,
    ) -> Result<String> {
        let began = std::time::Instant::now();
        let md = config
            .metadata
            .clone()
            .filter(|m| !m.name.is_empty())
            .ok_or_else(|| {
                RuntimeError::InvalidArgument(
                    "container config: metadata with a name is required".into(),
                )
            })?;
        let image = config
            .image
            .as_ref()
            .map(|i| i.image.clone())
            .unwrap_or_default();
        if image.is_empty() {
            return Err(RuntimeError::InvalidArgument(
                "container config: image is required".into(),
            ));
        }
        spec::validate_mounts(&config.mounts)?;
        if let Some(r) = config.linux.as_ref().and_then(|l| l.resources.as_ref()) {
            spec::validate_resources(r)?;
        }
        validate::container_config(&config)?;
        let pod = self.pod(pod_id)?;
        let pod_id: &str = &pod.id;
        validate::privileged(&config, &pod.config)?;
        // Confined below the pod's log directory before anything is made.
        let log_path = validate::log_path(&pod.config.log_directory, &config.log_path)?;
        let _g = pod.lifecycle.lock().await;
        let prec = pod.record();
        if prec.state != PodState::Ready {
            return Err(RuntimeError::FailedPrecondition(format!(
                "pod sandbox {pod_id} is not ready: cannot create containers in it"
            )));
        }
        let agent = pod.agent().ok_or_else(|| {
            RuntimeError::FailedPrecondition(format!("pod sandbox {pod_id} has no agent"))
        })?;
        if let Some(other) = pod.containers().iter().find(|c| {
            let m = c.config.metadata.clone().unwrap_or_default();
            m.name == md.name && m.attempt == md.attempt
        }) {
            return Err(RuntimeError::AlreadyExists(format!(
                "container {:?} attempt {} already exists in pod sandbox {pod_id}: {}",
                md.name, md.attempt, other.id
            )));
        }
        let img = self
            .images
            .status(&image)
            .map_err(|e| RuntimeError::InvalidArgument(e.to_string()))?
            .ok_or_else(|| {
                RuntimeError::NotFound(format!("image {image:?} not found: pull it first"))
            })?;
        let image_config = self
            .images
            .config_json(&img)
            .map_err(|source| RuntimeError::Image {
                what: "image config",
                source,
            })?;
        let stop_signal = spec::stop_signal(&image_config)?;
        // Off the executor: a seccomp `localhost/` profile is read from disk.
        let mut spec = {
            let all_caps = all_capabilities(pod.kind.agent_in_guest())?;
            // A guest's cgroups are v2; husk-ns containers live in the host's.
            let cgroup_v2 = pod.kind.agent_in_guest()
                || std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
            let (c, p, min) = (config.clone(), pod.config.clone(), self.min_oom_score_adj());
            tokio::task::spawn_blocking(move || {
                spec::container_spec(&c, &p, &image_config, min, all_caps, cgroup_v2)
            })
            .await
            .map_err(|source| RuntimeError::Task {
                what: "oci spec",
                source,
            })??
        };
        let agent_proc = prec.agent.clone().ok_or_else(|| {
            RuntimeError::FailedPrecondition(format!("pod sandbox {pod_id} has no agent"))
        })?;
        let id = new_id();
        // A VM pod sees host paths only through its virtio-fs share.
        let share = match pod.kind.share_dir(&agent_proc) {
            Some(dir) => Some(share::PodShare::open(&dir)?),
            None if pod.kind.agent_in_guest()
                && config.mounts.iter().any(|m| !m.host_path.is_empty()) =>
            {
                return Err(RuntimeError::FailedPrecondition(
                    "this VM sandbox has no share for host path mounts".into(),
                ));
            }
            None => None,
        };
        if let Some(s) = &share {
            share::share_mounts(s, &id, &config.mounts, &mut spec)?;
        }
        let peer_dir = pod.kind.propagation_pod_dir(pod_id);
        if let Some(d) = &peer_dir {
            let privileged = config
                .linux
                .as_ref()
                .and_then(|l| l.security_context.as_ref())
                .is_some_and(|s| s.privileged);
            for m in config
                .mounts
                .iter()
                .filter(|m| m.propagation == cri::MountPropagation::PropagationBidirectional as i32)
            {
                super::propagation::validate(m, privileged)?;
            }
            super::propagation::bind_mounts(d, &id, &config.mounts, &mut spec)?;
        }
        super::orphans::crash_point("create_container:shared");
        let unshare = || {
            if let Some(s) = &share {
                s.unbind_container(&id);
            }
            if let Some(s) = peer_dir
                .as_ref()
                .and_then(|d| share::PodShare::existing(&super::propagation::host_dir(d)))
            {
                s.unbind_container(&id);
            }
        };
        let spec = match serde_json::to_vec(&spec) {
            Ok(s) => s,
            Err(e) => {
                unshare();
                return Err(RuntimeError::Json {
                    what: "oci spec",
                    source: e,
                });
            }
        };
        // Creates in a pod are serialised (pod.lifecycle): no other container is half made.
        let in_use = pod
            .containers()
            .iter()
            .map(|c| lock(&c.rec).image_id.clone())
            .collect();
        let rootfs = match pod.kind.rootfs(pod_id, &agent_proc, &img, &in_use).await {
            Ok(r) => r,
            Err(e) => {
                unshare();
                return Err(e);
            }
        };
        super::orphans::crash_point("create_container:rootfs");

        let resources = config
            .linux
            .as_ref()
            .and_then(|l| l.resources.clone())
            .unwrap_or_default();
        let mut rec = ContainerRecord {
            id: id.clone(),
            pod_id: pod_id.to_string(),
            config: config.encode_to_vec(),
            image_id: img.id.clone(),
            image_ref: img
                .repo_digests
                .first()
                .cloned()
                .unwrap_or_else(|| img.id.clone()),
            state: ContainerState::Created,
            created_at: now_ns(),
            started_at: 0,
            finished_at: 0,
            exit_code: 0,
            reason: String::new(),
            message: String::new(),
            log_path,
            resources: resources.encode_to_vec(),
            pid: 0,
            stop_signal,
        };
        let prepared = began.elapsed();
        let resp = match agent
            .create_container(&id, spec, rootfs, config.stdin, config.tty)
            .await
        {
            Ok(r) => r,
            Err(e) => {
                unshare();
                return Err(RuntimeError::agent("create container", e));
            }
        };
        super::orphans::crash_point("create_container:agent-created");
        rec.pid = resp.pid;
        let c = Container::new(rec, config);
        if let Err(e) = c.persist(&self.store) {
            let _ = agent.remove_container(&id, true).await;
            unshare();
            return Err(e);
        }
        lock(&pod.containers).insert(id.clone(), c.clone());
        self.containers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone(), c);
        pod.first_container_phase(Phase::FirstContainerCreate, began);
        if md.attempt > 0 {
            crate::metrics::global().container_restart(&prec.handler);
        }
        // Where the time went: huskd's part (image, spec, share, rootfs) and the agent's.
        tracing::info!(
            pod = pod_id,
            container = %id,
            name = %md.name,
            prepare_ms = prepared.as_millis() as u64,
            total_ms = began.elapsed().as_millis() as u64,
            "container created"
        );
        Ok(id)
    }

    pub async fn start_container(self: &Arc<Self>, id: &str) -> Result<()> {
        let began = std::time::Instant::now();
        let c = self.container(id)?;
        let id: &str = &c.id;
        let pod = self.pod(&c.pod_id)?;
        let _g = c.lifecycle.lock().await;
        let rec = c.record();
        if rec.state != ContainerState::Created {
            return Err(RuntimeError::FailedPrecondition(format!(
                "container {id} is {:?}, only a created container can be started",
                rec.state
            )));
        }
        let agent = match (pod.record().state, pod.agent()) {
            (PodState::Ready, Some(a)) => a,
            _ => {
                return Err(RuntimeError::FailedPrecondition(format!(
                    "pod sandbox {} is not ready",
                    pod.id
                )));
            }
        };
        let progress = self.store.log_progress(&pod.id, id);
        let log = CriLog::open(rec.log_path.clone(), Some(&progress)).map_err(RuntimeError::io(
            "open log",
            rec.log_path.clone().unwrap_or_default(),
        ))?;
        *lock(&c.log) = Some(Arc::new(log));
        if let Err(e) = agent.start_container(id).await {
            c.mark_exited(&self.store, 128, now_ns(), "StartError", &e.to_string());
            return Err(RuntimeError::agent("start container", e));
        }
        {
            let mut r = lock(&c.rec);
            if r.transition(ContainerState::Running) {
                r.started_at = now_ns();
            }
        }
        c.persist(&self.store)?;
        drop(_g);
        pod.first_container_phase(Phase::FirstContainerStart, began);
        tracing::info!(container = %id, total_ms = began.elapsed().as_millis() as u64, "container started");
        self.spawn_supervisor(pod, c.clone(), agent);
        Ok(())
    }

    pub async fn stop_container(self: &Arc<Self>, id: &str, timeout: i64) -> Result<()> {
        let c = self.container(id)?;
        let pod = self.pod(&c.pod_id)?;
        self.stop_container_inner(&pod, &c, timeout).await
    }

    /// SIGTERM, `timeout` seconds, SIGKILL (all processes). No-op unless running.
    pub(super) async fn stop_container_inner(
        self: &Arc<Self>,
        pod: &Arc<Pod>,
        c: &Arc<Container>,
        timeout: i64,
    ) -> Result<()> {
        let _g = c.lifecycle.lock().await;
        if c.record().state != ContainerState::Running {
            return Ok(());
        }
        let Some(agent) = pod.agent() else {
            return Ok(());
        };
        let mut exited = c.exited.subscribe();
        let wait = |d: Duration, rx: &mut tokio::sync::watch::Receiver<bool>| {
            let mut rx = rx.clone();
            async move { tokio::time::timeout(d, rx.wait_for(|e| *e)).await.is_ok() }
        };
        if timeout > 0 {
            let sig = match c.record().stop_signal {
                0 => libc::SIGTERM,
                s => s,
            };
            match agent.signal(&c.id, "", sig, false).await {
                Ok(()) => {}
                Err(e) if pod.agent_alive() => {
                    tracing::debug!(container = %c.id, error = %e, "SIGTERM")
                }
                Err(_) => {
                    self.agent_died(pod, "the agent is gone");
                    return Ok(());
                }
            }
            if wait(Duration::from_secs(timeout as u64), &mut exited).await {
                return Ok(());
            }
        }
        if let Err(e) = agent.signal(&c.id, "", libc::SIGKILL, true).await {
            if !pod.agent_alive() {
                self.agent_died(pod, "the agent is gone");
                return Ok(());
            }
            tracing::debug!(container = %c.id, error = %e, "SIGKILL");
        }
        if wait(KILL_WAIT, &mut exited).await {
            return Ok(());
        }
        Err(RuntimeError::DeadlineExceeded(format!(
            "container {} did not exit after SIGKILL",
            c.id
        )))
    }

    /// Removes a container (stopping it first). Unknown ids succeed: the CRI
    /// makes RemoveContainer idempotent.
    pub async fn remove_container(self: &Arc<Self>, id: &str) -> Result<()> {
        let c = match self.container(id) {
            Ok(c) => c,
            Err(RuntimeError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        let id: &str = &c.id;
        let pod = self.pod(&c.pod_id)?;
        self.stop_container_inner(&pod, &c, 0).await?;
        let _g = c.lifecycle.lock().await;
        if let Some(agent) = pod.agent() {
            match agent.remove_container(id, true).await {
                Ok(()) => {}
                Err(e) if e.is_code(ttrpc::Code::NOT_FOUND) || !pod.agent_alive() => {}
                Err(e) => return Err(RuntimeError::agent("remove container", e)),
            }
        }
        self.store.remove_container(&c.pod_id, id)?;
        // Its CRI mounts leave the pod's share.
        if let Some(dir) = pod
            .record()
            .agent
            .as_ref()
            .and_then(|p| pod.kind.share_dir(p))
            && let Some(s) = share::PodShare::existing(&dir)
        {
            s.unbind_container(id);
        }
        if let Some(s) = pod
            .kind
            .propagation_pod_dir(&c.pod_id)
            .and_then(|d| share::PodShare::existing(&super::propagation::host_dir(&d)))
        {
            s.unbind_container(id);
        }
        lock(&pod.containers).remove(id);
        self.containers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        tracing::info!(container = id, "container removed");
        Ok(())
    }

    pub fn container_status(&self, id: &str) -> Result<ContainerView> {
        Ok(ContainerView::of(&*self.container(id)?))
    }

    /// The container's pod (for verbose status).
    pub fn container_pod(&self, id: &str) -> Result<super::PodView> {
        let c = self.container(id)?;
        self.pod_status(&c.pod_id)
    }

    pub fn list_containers(&self, filter: Option<&cri::ContainerFilter>) -> Vec<ContainerView> {
        let mut out: Vec<ContainerView> = self
            .all_containers()
            .iter()
            .map(|c| ContainerView::of(c))
            .filter(|v| match filter {
                None => true,
                Some(f) => {
                    (f.id.is_empty() || v.rec.id.starts_with(&f.id))
                        && (f.pod_sandbox_id.is_empty()
                            || v.rec.pod_id.starts_with(&f.pod_sandbox_id))
                        && f.state
                            .as_ref()
                            .is_none_or(|s| container_state_code(v.rec.state) == s.state)
                        && labels_match(&v.config.labels, &f.label_selector)
                }
            })
            .collect();
        out.sort_by_key(|v| v.rec.created_at);
        out
    }

    pub async fn update_resources(
        self: &Arc<Self>,
        id: &str,
        res: cri::LinuxContainerResources,
    ) -> Result<()> {
        spec::validate_resources(&res)?;
        let c = self.container(id)?;
        let id: &str = &c.id;
        let pod = self.pod(&c.pod_id)?;
        let _g = c.lifecycle.lock().await;
        let state = c.record().state;
        if !matches!(state, ContainerState::Created | ContainerState::Running) {
            return Err(RuntimeError::FailedPrecondition(format!(
                "container {id} is {state:?}: cannot update resources"
            )));
        }
        let agent = pod.agent().ok_or_else(|| {
            RuntimeError::FailedPrecondition(format!("pod sandbox {} has no agent", pod.id))
        })?;
        let oci = spec::linux_resources(&res)?;
        let json = serde_json::to_vec(&oci).map_err(|source| RuntimeError::Json {
            what: "resources",
            source,
        })?;
        agent
            .update_resources(id, json)
            .await
            .map_err(|e| RuntimeError::agent("update resources", e))?;
        lock(&c.rec).resources = res.encode_to_vec();
        c.persist(&self.store)
    }

    pub fn reopen_log(&self, id: &str) -> Result<()> {
        let c = self.container(id)?;
        let id: &str = &c.id;
        if c.record().state != ContainerState::Running {
            return Err(RuntimeError::FailedPrecondition(format!(
                "container {id} is not running"
            )));
        }
        match c.log() {
            Some(log) => log.reopen().map_err(RuntimeError::io(
                "reopen log",
                log.path()
                    .map(std::path::Path::to_path_buf)
                    .unwrap_or_default(),
            )),
            None => Err(RuntimeError::FailedPrecondition(format!(
                "container {id} has no log"
            ))),
        }
    }
}

/// What "all capabilities" (privileged, `ALL`) means for a container: in a VM the guest
/// kernel's whole set (the agent is its unconfined PID 1), on the host huskd's own
/// bounding set (containerd's semantics: a capability the host withholds from root cannot
/// be granted).
fn all_capabilities(in_guest: bool) -> Result<u64> {
    if in_guest {
        return Ok(husk_proto::caps::ALL);
    }
    husk_proto::caps::own_bounding()
        .map(|m| m & husk_proto::caps::ALL)
        .map_err(|source| RuntimeError::Host {
            what: "huskd's capability bounding set",
            source,
        })
}

pub fn container_state_code(s: ContainerState) -> i32 {
    match s {
        ContainerState::Created => cri::ContainerState::ContainerCreated as i32,
        ContainerState::Running => cri::ContainerState::ContainerRunning as i32,
        ContainerState::Exited => cri::ContainerState::ContainerExited as i32,
        ContainerState::Unknown => cri::ContainerState::ContainerUnknown as i32,
    }
}

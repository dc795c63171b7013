//! Container and pod stats and metrics, in CRI terms.
//!
//! Every agent is asked concurrently, each call bounded by [`STATS_DEADLINE`]:
//! a pod whose agent (guest) does not answer in time is answered from its last
//! sample, which keeps its old timestamps (that is how a caller sees it is
//! stale: docs/stats.md), so one frozen guest never stalls a node-wide call.
//! Pods that are not Ready are left out of the lists (as containerd does); a
//! PodSandboxStats of such a pod still carries its `linux` part, empty.

mod host;
mod metrics;
mod sample;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use husk_proto::cri;

use super::agent::{Agent, AgentError};
use super::pod::labels_match;
use super::state::{ContainerState, PodState, now_ns};
use super::{Container, Manager, Pod, Result, RuntimeError};

pub use host::HostCgroup;
pub use sample::{ContainerSample, PodSample, SampleCell};

/// How long one pod's agent may take to answer a stats call.
pub const STATS_DEADLINE: Duration = Duration::from_secs(2);

/// What one round of sampling found for a pod.
struct PodSnapshot {
    /// Fresh, or the last one when the agent did not answer (stale).
    pod: Option<Arc<PodSample>>,
    /// The pod's host cgroup now (unix ns, readings).
    host: Option<(i64, HostCgroup)>,
    containers: Vec<(Arc<Container>, Arc<ContainerSample>)>,
}

fn attributes(c: &Container) -> cri::ContainerAttributes {
    cri::ContainerAttributes {
        id: c.id.clone(),
        metadata: c.config.metadata.clone(),
        labels: c.config.labels.clone(),
        annotations: c.config.annotations.clone(),
    }
}

fn pod_attributes(pod: &Pod) -> cri::PodSandboxAttributes {
    cri::PodSandboxAttributes {
        id: pod.id.clone(),
        metadata: pod.config.metadata.clone(),
        labels: pod.config.labels.clone(),
        annotations: pod.config.annotations.clone(),
    }
}

fn running(c: &Container) -> bool {
    c.record().state == ContainerState::Running
}

/// Whether a failed call may be answered from the last sample: the agent
/// did not answer or is unreachable (an answer with an error code is believed).
fn agent_silent(e: &AgentError) -> bool {
    matches!(e, AgentError::Timeout | AgentError::Transport(_))
}

impl Manager {
    /// The host directory standing for the filesystem of a pod's writable
    /// layers: huskd's run dir (their upper dirs live below it) for a
    /// namespace pod; None for a VM pod, whose layers live in guest memory.
    fn layer_mountpoint(&self, pod: &Pod) -> Option<String> {
        (!pod.kind.agent_in_guest()).then(|| self.ns.run_dir.display().to_string())
    }

    /// A fresh sample of running container `c`, or its last one when the agent
    /// does not answer within [`STATS_DEADLINE`].
    async fn sample_container(
        &self,
        agent: Option<&Agent>,
        c: &Container,
    ) -> Result<Arc<ContainerSample>> {
        let err = match agent {
            Some(a) => match a.container_stats(&c.id, STATS_DEADLINE).await {
                Ok(s) => {
                    let at = now_ns();
                    return Ok(c.sample.update(|prev| ContainerSample::new(prev, s, at)));
                }
                Err(e) => e,
            },
            None => AgentError::Transport("pod has no agent".into()),
        };
        match c.sample.get() {
            Some(last) if agent_silent(&err) => {
                tracing::debug!(container = %c.id, error = %err, "stats: answering from the last sample");
                Ok(last)
            }
            _ => Err(RuntimeError::agent("container stats", err)),
        }
    }

    /// Samples a Ready pod: its cgroup and interfaces, its running
    /// containers and its host cgroup, all at once.
    async fn snapshot(&self, pod: &Arc<Pod>) -> PodSnapshot {
        let agent = pod.agent();
        let rel = pod.record().cgroup_parent;
        let pod_part = async {
            let err = match &agent {
                Some(a) => match a.sandbox_stats(&pod.id, STATS_DEADLINE).await {
                    Ok(s) => {
                        let at = now_ns();
                        return Some(pod.sample.update(|prev| PodSample::new(prev, s, at)));
                    }
                    Err(e) => e,
                },
                None => AgentError::Transport("pod has no agent".into()),
            };
            tracing::debug!(pod = %pod.id, error = %err, "stats: answering from the last pod sample");
            pod.sample.get().filter(|_| agent_silent(&err))
        };
        let host_part = async {
            let r = tokio::task::spawn_blocking(move || {
                host::read(Path::new("/sys/fs/cgroup"), &rel).map(|h| (now_ns(), h))
            });
            tokio::time::timeout(STATS_DEADLINE, r)
                .await
                .ok()
                .and_then(|r| r.ok())
                .flatten()
        };
        let ctr_part = join_all(
            pod.containers()
                .into_iter()
                .filter(|c| running(c))
                .map(|c| {
                    let agent = agent.clone();
                    async move {
                        let s = self.sample_container(agent.as_ref(), &c).await.ok()?;
                        Some((c, s))
                    }
                }),
        );
        let (pod_sample, host, containers) = tokio::join!(pod_part, host_part, ctr_part);
        PodSnapshot {
            pod: pod_sample,
            host,
            containers: containers.into_iter().flatten().collect(),
        }
    }

    pub async fn container_stats(self: &Arc<Self>, id: &str) -> Result<cri::ContainerStats> {
        let c = self.container(id)?;
        let pod = self.pod(&c.pod_id)?;
        if !running(&c) {
            // Nothing to measure: attributes only (what containerd reports).
            return Ok(cri::ContainerStats {
                attributes: Some(attributes(&c)),
                ..Default::default()
            });
        }
        let s = self.sample_container(pod.agent().as_ref(), &c).await?;
        Ok(s.to_cri(attributes(&c), self.layer_mountpoint(&pod).as_deref()))
    }

    /// Stats of running containers matching the filter (others are skipped),
    /// every agent asked at once.
    pub async fn list_container_stats(
        self: &Arc<Self>,
        f: Option<&cri::ContainerStatsFilter>,
    ) -> Result<Vec<cri::ContainerStats>> {
        let wanted = self.all_containers().into_iter().filter(|c| {
            f.is_none_or(|f| {
                (f.id.is_empty() || c.id.starts_with(&f.id))
                    && (f.pod_sandbox_id.is_empty() || c.pod_id.starts_with(&f.pod_sandbox_id))
                    && labels_match(&c.config.labels, &f.label_selector)
            }) && running(c)
        });
        let calls = wanted.filter_map(|c| {
            let pod = self.pod(&c.pod_id).ok()?;
            Some(async move {
                match self.sample_container(pod.agent().as_ref(), &c).await {
                    Ok(s) => Some(s.to_cri(attributes(&c), self.layer_mountpoint(&pod).as_deref())),
                    Err(e) => {
                        tracing::debug!(container = %c.id, error = %e, "stats skipped");
                        None
                    }
                }
            })
        });
        let mut out: Vec<_> = join_all(calls).await.into_iter().flatten().collect();
        out.sort_by(|a, b| {
            let id = |s: &cri::ContainerStats| s.attributes.as_ref().map(|a| a.id.clone());
            id(a).cmp(&id(b))
        });
        Ok(out)
    }

    pub async fn pod_stats(self: &Arc<Self>, id: &str) -> Result<cri::PodSandboxStats> {
        let pod = self.pod(id)?;
        let snap = if pod.record().state == PodState::Ready {
            Some(self.snapshot(&pod).await)
        } else {
            None
        };
        Ok(self.pod_stats_of(&pod, snap.as_ref()).unwrap_or_else(|| {
            // kubelet dereferences `linux`: never leave it out.
            cri::PodSandboxStats {
                attributes: Some(pod_attributes(&pod)),
                linux: Some(Default::default()),
                windows: None,
            }
        }))
    }

    /// The CRI stats of a sampled pod (None: no pod sample, fresh or old).
    fn pod_stats_of(&self, pod: &Pod, snap: Option<&PodSnapshot>) -> Option<cri::PodSandboxStats> {
        let snap = snap?;
        let ps = snap.pod.as_ref()?;
        let mount = self.layer_mountpoint(pod);
        let containers = snap
            .containers
            .iter()
            .map(|(c, s)| s.to_cri(attributes(c), mount.as_deref()))
            .collect();
        Some(cri::PodSandboxStats {
            attributes: Some(pod_attributes(pod)),
            linux: Some(ps.to_cri(containers)),
            windows: None,
        })
    }

    /// Ready pods matching the filter, every agent asked at once; a pod with
    /// no sample at all (its agent never answered) is left out.
    pub async fn list_pod_stats(
        self: &Arc<Self>,
        f: Option<&cri::PodSandboxStatsFilter>,
    ) -> Result<Vec<cri::PodSandboxStats>> {
        let pods = self.ready_pods(|p| {
            f.is_none_or(|f| {
                (f.id.is_empty() || p.id.starts_with(&f.id))
                    && labels_match(&p.config.labels, &f.label_selector)
            })
        });
        let snaps = join_all(pods.iter().map(|p| self.snapshot(p))).await;
        Ok(pods
            .iter()
            .zip(&snaps)
            .filter_map(|(p, s)| self.pod_stats_of(p, Some(s)))
            .collect())
    }

    fn ready_pods(&self, keep: impl Fn(&Pod) -> bool) -> Vec<Arc<Pod>> {
        let mut pods: Vec<_> = self
            .all_pods()
            .into_iter()
            .filter(|p| p.record().state == PodState::Ready && keep(p))
            .collect();
        pods.sort_by(|a, b| a.id.cmp(&b.id));
        pods
    }

    pub fn metric_descriptors(&self) -> Vec<cri::MetricDescriptor> {
        metrics::descriptors()
    }

    /// cAdvisor-style metrics of every Ready pod and its running containers.
    pub async fn list_pod_metrics(self: &Arc<Self>) -> Vec<cri::PodSandboxMetrics> {
        let pods = self.ready_pods(|_| true);
        let snaps = join_all(pods.iter().map(|p| self.snapshot(p))).await;
        pods.iter()
            .zip(snaps)
            .map(|(pod, snap)| {
                let meta = pod.config.metadata.clone().unwrap_or_default();
                let names = metrics::PodNames {
                    id: &pod.id,
                    name: &meta.name,
                    namespace: &meta.namespace,
                };
                let device = self.layer_mountpoint(pod).unwrap_or_default();
                let container_metrics = snap
                    .containers
                    .iter()
                    .map(|(c, s)| {
                        let name = c.config.metadata.as_ref().map(|m| m.name.as_str());
                        let started = c.record().started_at;
                        metrics::container(&names, name.unwrap_or(""), &c.id, started, s, &device)
                    })
                    .collect();
                cri::PodSandboxMetrics {
                    pod_sandbox_id: pod.id.clone(),
                    metrics: metrics::pod(&names, snap.host, snap.pod.as_deref()),
                    container_metrics,
                }
            })
            .collect()
    }
}

//! Container and pod stats from the agent's cgroup readings, in CRI terms.

use std::sync::Arc;

use husk_proto::agent as pb;
use husk_proto::cri;

use super::pod::labels_match;
use super::state::{ContainerState, PodState};
use super::{Container, Manager, Pod, Result, RuntimeError, lock};

fn u64v(v: u64) -> Option<cri::UInt64Value> {
    Some(cri::UInt64Value { value: v })
}

impl Manager {
    fn container_attributes(c: &Container) -> cri::ContainerAttributes {
        cri::ContainerAttributes {
            id: c.id.clone(),
            metadata: c.config.metadata.clone(),
            labels: c.config.labels.clone(),
            annotations: c.config.annotations.clone(),
        }
    }

    fn to_cri(c: &Container, s: &pb::ContainerStatsResponse) -> cri::ContainerStats {
        let ts = s.timestamp;
        // usage_nano_cores from the previous sample of this container.
        let nano_cores = {
            let mut last = lock(&c.last_cpu);
            let rate = match *last {
                Some((t0, u0)) if ts > t0 && s.cpu_usage_ns >= u0 => {
                    Some(((s.cpu_usage_ns - u0) as u128 * 1_000_000_000 / (ts - t0) as u128) as u64)
                }
                _ => None,
            };
            *last = Some((ts, s.cpu_usage_ns));
            rate
        };
        cri::ContainerStats {
            attributes: Some(Self::container_attributes(c)),
            cpu: Some(cri::CpuUsage {
                timestamp: ts,
                usage_core_nano_seconds: u64v(s.cpu_usage_ns),
                usage_nano_cores: nano_cores.and_then(u64v),
            }),
            memory: Some(cri::MemoryUsage {
                timestamp: ts,
                working_set_bytes: u64v(s.memory_working_set_bytes),
                usage_bytes: u64v(s.memory_usage_bytes),
                available_bytes: (s.memory_limit_bytes > 0 && s.memory_limit_bytes < u64::MAX / 2)
                    .then(|| {
                        s.memory_limit_bytes
                            .saturating_sub(s.memory_working_set_bytes)
                    })
                    .and_then(u64v),
                ..Default::default()
            }),
            writable_layer: None,
            swap: None,
        }
    }

    async fn stats_of(&self, pod: &Pod, c: &Container) -> Result<cri::ContainerStats> {
        let agent = pod.agent().ok_or_else(|| {
            RuntimeError::FailedPrecondition(format!("pod sandbox {} has no agent", pod.id))
        })?;
        let s = agent
            .container_stats(&c.id)
            .await
            .map_err(|e| RuntimeError::agent("container stats", e))?;
        Ok(Self::to_cri(c, &s))
    }

    pub async fn container_stats(self: &Arc<Self>, id: &str) -> Result<cri::ContainerStats> {
        let c = self.container(id)?;
        let pod = self.pod(&c.pod_id)?;
        if c.record().state != ContainerState::Running {
            // Nothing to measure: attributes only (what containerd reports).
            return Ok(cri::ContainerStats {
                attributes: Some(Self::container_attributes(&c)),
                ..Default::default()
            });
        }
        self.stats_of(&pod, &c).await
    }

    /// Stats of running containers matching the filter (others are skipped).
    pub async fn list_container_stats(
        self: &Arc<Self>,
        f: Option<&cri::ContainerStatsFilter>,
    ) -> Result<Vec<cri::ContainerStats>> {
        let mut out = vec![];
        for c in self.all_containers() {
            if let Some(f) = f
                && !((f.id.is_empty() || c.id.starts_with(&f.id))
                    && (f.pod_sandbox_id.is_empty() || c.pod_id.starts_with(&f.pod_sandbox_id))
                    && labels_match(&c.config.labels, &f.label_selector))
            {
                continue;
            }
            if c.record().state != ContainerState::Running {
                continue;
            }
            let Ok(pod) = self.pod(&c.pod_id) else {
                continue;
            };
            match self.stats_of(&pod, &c).await {
                Ok(s) => out.push(s),
                Err(e) => tracing::debug!(container = %c.id, error = %e, "stats skipped"),
            }
        }
        Ok(out)
    }

    pub async fn pod_stats(self: &Arc<Self>, id: &str) -> Result<cri::PodSandboxStats> {
        let pod = self.pod(id)?;
        self.pod_stats_of(&pod).await
    }

    async fn pod_stats_of(&self, pod: &Arc<Pod>) -> Result<cri::PodSandboxStats> {
        let rec = pod.record();
        let attributes = Some(cri::PodSandboxAttributes {
            id: pod.id.clone(),
            metadata: pod.config.metadata.clone(),
            labels: pod.config.labels.clone(),
            annotations: pod.config.annotations.clone(),
        });
        let agent = match (rec.state, pod.agent()) {
            (PodState::Ready, Some(a)) => a,
            _ => {
                return Ok(cri::PodSandboxStats {
                    attributes,
                    ..Default::default()
                });
            }
        };
        let s = agent
            .sandbox_stats(&pod.id)
            .await
            .map_err(|e| RuntimeError::agent("sandbox stats", e))?;
        let cg = s.cgroup.clone().unwrap_or_default();
        let ts = cg.timestamp;
        let interfaces: Vec<cri::NetworkInterfaceUsage> = s
            .interfaces
            .iter()
            .map(|i| cri::NetworkInterfaceUsage {
                name: i.name.clone(),
                rx_bytes: u64v(i.rx_bytes),
                rx_errors: u64v(i.rx_errors),
                tx_bytes: u64v(i.tx_bytes),
                tx_errors: u64v(i.tx_errors),
            })
            .collect();
        let mut containers = vec![];
        for c in pod.containers() {
            if c.record().state == ContainerState::Running
                && let Ok(cs) = self.stats_of(pod, &c).await
            {
                containers.push(cs);
            }
        }
        Ok(cri::PodSandboxStats {
            attributes,
            linux: Some(cri::LinuxPodSandboxStats {
                cpu: Some(cri::CpuUsage {
                    timestamp: ts,
                    usage_core_nano_seconds: u64v(cg.cpu_usage_ns),
                    usage_nano_cores: None,
                }),
                memory: Some(cri::MemoryUsage {
                    timestamp: ts,
                    working_set_bytes: u64v(cg.memory_working_set_bytes),
                    usage_bytes: u64v(cg.memory_usage_bytes),
                    ..Default::default()
                }),
                network: Some(cri::NetworkUsage {
                    timestamp: ts,
                    default_interface: interfaces
                        .iter()
                        .find(|i| i.name != "lo")
                        .or(interfaces.first())
                        .cloned(),
                    interfaces,
                }),
                process: Some(cri::ProcessUsage {
                    timestamp: ts,
                    process_count: u64v(cg.pids_current),
                }),
                containers,
            }),
            windows: None,
        })
    }

    pub async fn list_pod_stats(
        self: &Arc<Self>,
        f: Option<&cri::PodSandboxStatsFilter>,
    ) -> Result<Vec<cri::PodSandboxStats>> {
        let mut out = vec![];
        for pod in self.all_pods() {
            if let Some(f) = f
                && !((f.id.is_empty() || pod.id.starts_with(&f.id))
                    && labels_match(&pod.config.labels, &f.label_selector))
            {
                continue;
            }
            match self.pod_stats_of(&pod).await {
                Ok(s) => out.push(s),
                Err(e) => tracing::debug!(pod = %pod.id, error = %e, "pod stats skipped"),
            }
        }
        Ok(out)
    }
}

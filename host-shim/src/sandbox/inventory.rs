//! What the metrics gauges show, read at each scrape: pods and containers by
//! handler and state, and the host memory of each live pod's processes.

use std::collections::HashMap;

use super::Manager;
use super::state::{ContainerState, PodState};
use crate::memory;
use crate::metrics::{Inventory, Object, PodMemory, PoolCounts, Snapshot};

fn pod_state(s: PodState) -> &'static str {
    match s {
        PodState::Creating => "creating",
        PodState::Ready => "ready",
        PodState::NotReady => "notready",
    }
}

fn container_state(s: ContainerState) -> &'static str {
    match s {
        ContainerState::Created => "created",
        ContainerState::Running => "running",
        ContainerState::Exited => "exited",
        ContainerState::Unknown => "unknown",
    }
}

impl Inventory for Manager {
    /// Blocking: reads `/proc/PID/smaps` of each live pod's VMM, helpers or agent.
    fn snapshot(&self) -> Snapshot {
        let mut s = Snapshot::default();
        let mut handlers = HashMap::new();
        for pod in self.all_pods() {
            let rec = pod.record();
            s.pods.push(Object {
                handler: rec.handler.clone(),
                state: pod_state(rec.state).into(),
            });
            handlers.insert(pod.id.clone(), rec.handler.clone());
            let Some(p) = rec.agent.as_ref().filter(|_| pod.agent_alive()) else {
                continue;
            };
            let pids = std::iter::once(p.pid)
                .chain(p.vm.iter().flat_map(|vm| vm.helpers.iter().map(|h| h.pid)));
            let m = memory::of_processes(pids);
            s.memory.push(PodMemory {
                pod: pod.id.clone(),
                handler: rec.handler,
                guest_ram_bytes: m.guest_ram_bytes,
                overhead_pss_bytes: m.overhead_pss_bytes,
                overhead_rss_bytes: m.overhead_rss_bytes,
            });
        }
        for c in self.all_containers() {
            let rec = c.record();
            s.containers.push(Object {
                handler: handlers.get(&c.pod_id).cloned().unwrap_or_default(),
                state: container_state(rec.state).into(),
            });
        }
        s.pools = self
            .pools
            .values()
            .map(|p| {
                let st = p.stats();
                PoolCounts {
                    handler: st.handler,
                    ready: st.ready as u64,
                    booting: u64::from(st.booting),
                    claims: st.claimed,
                    cold_empty: st.empty,
                    cold_too_small: st.too_big,
                    refill_failures: st.boot_failures,
                    discards: st.discarded,
                }
            })
            .collect();
        s
    }
}

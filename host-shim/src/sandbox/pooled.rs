//! RunPodSandbox on a warm VM (`vm::pool`): the pools per handler, claiming a VM for a
//! pod, and what a pooled VM needs to become the pod's beyond what a cold boot does.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use husk_proto::cri;

use super::Manager;
use super::kind::remove_cgroup_tree_patiently;
use super::pod::CGROUP_WAIT;
use super::vm::VmSandbox;
use super::vm::pool::{Budget, PoolStats, PooledVm, VmPool};
use crate::config::RuntimeConfig;
use crate::network::netns;

/// The pools' network namespace below the run dir's `netns/` (pod ids are hex: no clash).
pub const POOL_NETNS: &str = "pool";

/// One pool per VM handler with a non-zero size (not started yet).
pub(super) fn make_pools(
    cfg: &RuntimeConfig,
    netns: &Path,
    vm_of: impl Fn(&str) -> Option<Arc<VmSandbox>>,
) -> BTreeMap<String, Arc<VmPool>> {
    let budget = Budget::new(cfg.vm.pool.memory_budget_mib);
    // Pooled VMs without a rehearsal spec do not rehearse (it cannot fail for the fixed
    // config it is made from; logged if it ever does).
    let rehearsal = rehearsal_spec().unwrap_or_else(|e| {
        tracing::error!(error = %e, "rehearsal spec: pooled VMs do not rehearse");
        Vec::new()
    });
    cfg.handlers
        .iter()
        .filter(|(_, h)| h.kind.is_vm())
        .filter_map(|(name, _)| {
            let size = cfg.vm.pool.size_of(name);
            let vm = vm_of(name)?;
            (size > 0).then(|| {
                let pool = VmPool::new(
                    name,
                    vm,
                    size,
                    &cfg.vm.pool,
                    netns.to_path_buf(),
                    &cfg.cgroup_parent,
                    budget.clone(),
                    rehearsal.clone(),
                );
                (name.clone(), pool)
            })
        })
        .collect()
}

/// The OCI spec of the rehearsal's container: what huskd gives a default container (the
/// runtime's default seccomp profile, capabilities, masked and read-only paths); the
/// agent sets its rootfs and process.
fn rehearsal_spec() -> Result<Vec<u8>, super::RuntimeError> {
    let config = cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: "rehearsal".into(),
            attempt: 0,
        }),
        command: vec!["/init".into()],
        linux: Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                seccomp: Some(cri::SecurityProfile {
                    profile_type: cri::security_profile::ProfileType::RuntimeDefault as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let image = serde_json::json!({ "config": {} });
    let spec = super::spec::container_spec(
        &config,
        &cri::PodSandboxConfig::default(),
        &image,
        None,
        husk_proto::caps::ALL,
        true,
    )?;
    serde_json::to_vec(&spec).map_err(|source| super::RuntimeError::Json {
        what: "rehearsal spec",
        source,
    })
}

impl Manager {
    /// Starts filling the pools (after recovery: pooled VMs of an earlier huskd are gone).
    pub(super) fn start_pools(&self) {
        if self.pools.is_empty() {
            return;
        }
        if !netns::is_netns(&self.pool_netns) {
            let _ = netns::remove(&self.pool_netns);
            if let Err(e) = netns::create(&self.pool_netns) {
                tracing::error!(error = %e, "VM pool network namespace: pools stay empty");
                return;
            }
        }
        for p in self.pools.values() {
            p.start();
        }
    }

    /// A pooled VM of `handler` for a pod with `config`, if one is ready and big enough.
    pub(super) async fn claim_pooled(
        &self,
        handler: &str,
        config: &cri::PodSandboxConfig,
    ) -> Option<PooledVm> {
        let pool = self.pools.get(handler)?;
        let vm = self.vms.by_handler.get(handler)?;
        pool.claim(vm.size(config)).await
    }

    /// A claimed VM whose pod failed before it was recorded as the pod's.
    pub(super) async fn discard_pooled(&self, handler: &str, vm: PooledVm) {
        match self.pools.get(handler) {
            Some(p) => p.discard_claimed(vm).await,
            None => tracing::error!(pod = %vm.id, "claimed VM of a handler without a pool"),
        }
    }

    /// The pooled VM's processes join the pod's cgroup (when the CRI gave the pod one;
    /// otherwise the pool's `<cgroup_parent>/<id>` already is the pod's).
    pub(super) async fn adopt_pooled(&self, handler: &str, vm: &PooledVm, cgroup: &str) {
        let Some(pool) = self.pools.get(handler) else {
            return;
        };
        let waiting = pool.cgroup_of(&vm.id);
        if waiting.trim_matches('/') == cgroup.trim_matches('/') {
            return;
        }
        VmSandbox::join_cgroup(&vm.proc, cgroup, &vm.id);
        let left = remove_cgroup_tree_patiently(&waiting, CGROUP_WAIT).await;
        if !left.is_empty() {
            tracing::warn!(pod = %vm.id, ?left, "pool cgroup of a claimed VM left behind");
        }
    }

    /// Per pool: size, ready, booting, claims (Status, verbose).
    pub fn pool_stats(&self) -> Vec<PoolStats> {
        self.pools.values().map(|p| p.stats()).collect()
    }

    /// Stops every pooled VM (huskd shutting down; pods keep running).
    pub async fn drain_pools(&self) {
        for p in self.pools.values() {
            p.drain().await;
        }
        if !self.pools.is_empty() {
            let _ = netns::remove(&self.pool_netns);
        }
    }
}

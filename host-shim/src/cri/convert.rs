//! Domain records → CRI status messages (wire mapping only; the OCI spec is
//! built in `sandbox/spec.rs`).

use std::collections::HashMap;

use husk_proto::cri;

use crate::sandbox::state::ContainerState;
use crate::sandbox::{ContainerView, PodView};

pub fn container_status(v: &ContainerView) -> cri::ContainerStatus {
    let r = &v.rec;
    cri::ContainerStatus {
        id: r.id.clone(),
        metadata: v.config.metadata.clone(),
        state: crate::sandbox::container_state_code(r.state),
        created_at: r.created_at,
        started_at: r.started_at,
        finished_at: r.finished_at,
        exit_code: r.exit_code,
        image: v.config.image.clone(),
        image_ref: r.image_ref.clone(),
        image_id: r.image_id.clone(),
        reason: r.reason.clone(),
        message: r.message.clone(),
        labels: v.config.labels.clone(),
        annotations: v.config.annotations.clone(),
        mounts: v.config.mounts.clone(),
        log_path: r
            .log_path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        resources: Some(cri::ContainerResources {
            linux: v.resources(),
            windows: None,
        }),
        user: None,
    }
}

pub fn container(v: &ContainerView) -> cri::Container {
    cri::Container {
        id: v.rec.id.clone(),
        pod_sandbox_id: v.rec.pod_id.clone(),
        metadata: v.config.metadata.clone(),
        image: v.config.image.clone(),
        image_ref: v.rec.image_ref.clone(),
        image_id: v.rec.image_id.clone(),
        state: crate::sandbox::container_state_code(v.rec.state),
        created_at: v.rec.created_at,
        labels: v.config.labels.clone(),
        annotations: v.config.annotations.clone(),
    }
}

pub fn pod_status(v: &PodView) -> cri::PodSandboxStatus {
    let ns = v
        .config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .and_then(|s| s.namespace_options.clone());
    cri::PodSandboxStatus {
        id: v.rec.id.clone(),
        metadata: v.config.metadata.clone(),
        state: crate::sandbox::pod_state_code(v.rec.state),
        created_at: v.rec.created_at,
        network: Some(cri::PodSandboxNetworkStatus {
            ip: v.ips.first().cloned().unwrap_or_default(),
            additional_ips: v
                .ips
                .iter()
                .skip(1)
                .map(|ip| cri::PodIp { ip: ip.clone() })
                .collect(),
        }),
        linux: Some(cri::LinuxPodSandboxStatus {
            namespaces: Some(cri::Namespace { options: ns }),
        }),
        labels: v.config.labels.clone(),
        annotations: v.config.annotations.clone(),
        runtime_handler: v.rec.handler.clone(),
    }
}

pub fn pod_sandbox(v: &PodView) -> cri::PodSandbox {
    cri::PodSandbox {
        id: v.rec.id.clone(),
        metadata: v.config.metadata.clone(),
        state: crate::sandbox::pod_state_code(v.rec.state),
        created_at: v.rec.created_at,
        labels: v.config.labels.clone(),
        annotations: v.config.annotations.clone(),
        runtime_handler: v.rec.handler.clone(),
    }
}

/// Verbose info: one "info" key holding JSON, like containerd.
pub fn pod_info(v: &PodView) -> HashMap<String, String> {
    let info = serde_json::json!({
        "id": v.rec.id,
        "handler": v.rec.handler,
        "kind": v.rec.kind,
        "state": v.rec.state,
        "reason": v.rec.reason,
        "cgroupParent": v.rec.cgroup_parent,
        "agentPid": v.rec.agent.as_ref().map(|a| a.pid),
        "agentSocket": v.rec.agent.as_ref().map(|a| a.socket.display().to_string()),
        "agentAlive": v.agent_alive,
        "vmHelpers": v.rec.agent.as_ref().and_then(|a| a.vm.as_ref()).map(|vm| vm.helpers.iter().map(|h| h.pid).collect::<Vec<_>>()),
        "vmDir": v.rec.agent.as_ref().and_then(|a| a.vm.as_ref()).map(|vm| vm.dir.display().to_string()),
        // Host-side cost of a VM pod: the VMM's and its helpers' resident memory,
        // guest RAM apart from their own overhead.
        "vmHostMemory": v.rec.agent.as_ref().filter(|a| a.vm.is_some()).map(|a| {
            crate::memory::of_processes(
                std::iter::once(a.pid)
                    .chain(a.vm.iter().flat_map(|vm| vm.helpers.iter().map(|h| h.pid))),
            )
        }),
        "isolation": match v.rec.kind {
            crate::config::HandlerKind::Namespace => "namespaces (container-level isolation, not a VM)",
            crate::config::HandlerKind::Vm => "virtual machine (husk-vmm)",
            crate::config::HandlerKind::Qemu => "virtual machine (QEMU)",
        },
    });
    HashMap::from([("info".to_string(), info.to_string())])
}

pub fn container_info(v: &ContainerView, pod: &PodView) -> HashMap<String, String> {
    let info = serde_json::json!({
        "id": v.rec.id,
        "sandboxId": v.rec.pod_id,
        "pid": v.rec.pid,
        "state": v.rec.state,
        "cgroupsPath": format!("{}/{}", pod.rec.cgroup_parent, v.rec.id),
        "running": v.rec.state == ContainerState::Running,
    });
    HashMap::from([("info".to_string(), info.to_string())])
}

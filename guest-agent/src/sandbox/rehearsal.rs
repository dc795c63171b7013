//! Rehearse: one throwaway pod start in a warm pooled VM, before it serves a pod.
//!
//! QEMU's TCG translates guest code the first time it runs, once per VM: a pooled VM that
//! has only booted pays for translating every kernel and agent path of a pod start (the
//! cgroups, the runner, ≈ 30 mounts, pivot_root, seccomp, the exec) in its first pod's
//! first container. Measured in a TCG guest: CreateContainer ≈ 500 ms for a VM's first
//! container, ≈ 160–200 ms for its second, ≈ 60–80 ms from the third on. huskd's pool
//! asks for a rehearsal right after a VM's boot, so the pod that claims it starts on
//! translated code. On KVM it costs a few tens of ms of a pooled VM's CPU and warms the
//! guest's caches; it changes nothing else.
//!
//! What runs is an ordinary sandbox and container through the same functions as
//! CreateSandbox/CreateContainer/StartContainer/DestroySandbox, with the spec huskd would
//! give a default container: only its rootfs (an overlay of the guest's own root) and
//! its process (`/init __rehearsal`: the agent's own binary, which exits 0 at once) are fixed
//! here. The sandbox does not take the spare namespace holder (that stays for the pod).
//! Nothing of it is left: DestroySandbox removes the container, its cgroups, mounts and
//! state, whatever happened.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::agent::Agent;
use crate::container::create::{self, CreateRequest, RootfsSource};
use crate::container::start;
use crate::error::{AgentError, Result};
use crate::runner::REHEARSAL_ARG;

use super::SandboxConfig;
use super::lifecycle;

/// The rehearsal's sandbox and container id.
const ID: &str = "rehearsal";
/// The agent binary in a guest's root (the initramfs's `/init`, copied by `init.rs`).
const GUEST_INIT: &str = "/init";
/// How long the container may take to exit once started.
const EXIT_WAIT: Duration = Duration::from_secs(30);

/// Runs the rehearsal; returns how long it took.
pub async fn run(agent: &Arc<Agent>, spec_json: &[u8]) -> Result<Duration> {
    if !agent.config.is_init {
        return Err(AgentError::FailedPrecondition(
            "only a guest's agent rehearses a pod start".into(),
        ));
    }
    if let Ok(s) = agent.sandbox() {
        return Err(AgentError::FailedPrecondition(format!(
            "sandbox {} exists: a VM that serves a pod is not rehearsed",
            s.id
        )));
    }
    let spec = rehearsal_spec(spec_json)?;
    let began = Instant::now();
    lifecycle::do_create(
        agent,
        SandboxConfig {
            id: ID.into(),
            keep_spare: true,
            ..Default::default()
        },
    )
    .await?;
    let ran = container(agent, spec).await;
    let destroyed = lifecycle::do_destroy(agent, ID).await;
    ran?;
    destroyed?;
    Ok(began.elapsed())
}

/// The spec with the rehearsal's process: the guest's `/init` (the agent's own binary,
/// seen through the overlay of the guest's root).
fn rehearsal_spec(spec_json: &[u8]) -> Result<Vec<u8>> {
    let mut spec: serde_json::Value = serde_json::from_slice(spec_json)
        .map_err(|e| AgentError::InvalidArgument(format!("rehearsal spec: {e}")))?;
    let Some(process) = spec.get_mut("process").and_then(|p| p.as_object_mut()) else {
        return Err(AgentError::InvalidArgument(
            "rehearsal spec has no process".into(),
        ));
    };
    process.insert(
        "args".into(),
        serde_json::json!([GUEST_INIT, REHEARSAL_ARG]),
    );
    process.insert("cwd".into(), serde_json::json!("/"));
    serde_json::to_vec(&spec).map_err(|e| AgentError::InvalidArgument(e.to_string()))
}

async fn container(agent: &Arc<Agent>, spec_json: Vec<u8>) -> Result<()> {
    let c = create::do_create(
        agent,
        CreateRequest {
            id: ID.into(),
            spec_json,
            rootfs: Some(RootfsSource::Overlay {
                lower_dirs: vec![PathBuf::from("/")],
            }),
            stdin: false,
            tty: false,
        },
    )
    .await?;
    start::do_start(agent, ID).await?;
    match tokio::time::timeout(EXIT_WAIT, c.init.wait()).await {
        Ok(s) if s.code == 0 => Ok(()),
        Ok(s) => Err(AgentError::FailedPrecondition(format!(
            "the rehearsal's container exited {} (signal {})",
            s.code, s.signal
        ))),
        Err(_) => Err(AgentError::FailedPrecondition(format!(
            "the rehearsal's container did not exit within {EXIT_WAIT:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spec_keeps_everything_but_the_process_command() {
        let spec = serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["sh", "-c", "evil"], "cwd": "/work", "env": ["A=1"]},
            "linux": {"maskedPaths": ["/proc/kcore"]},
        });
        let out: serde_json::Value =
            serde_json::from_slice(&rehearsal_spec(&serde_json::to_vec(&spec).unwrap()).unwrap())
                .unwrap();
        assert_eq!(
            out["process"]["args"],
            serde_json::json!(["/init", "__rehearsal"])
        );
        assert_eq!(out["process"]["cwd"], "/");
        assert_eq!(out["process"]["env"], serde_json::json!(["A=1"]));
        assert_eq!(out["linux"], spec["linux"]);
        assert!(rehearsal_spec(b"{}").is_err());
        assert!(rehearsal_spec(b"not json").is_err());
    }
}

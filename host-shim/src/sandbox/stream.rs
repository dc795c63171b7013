//! What the streaming server needs from pods and containers: validated
//! targets for Exec/Attach/PortForward and the agent connections behind them.

use std::sync::Arc;

use super::agent::Agent;
use super::state::{ContainerState, PodState};
use super::{Manager, Result, RuntimeError};

/// A running container the streaming server can talk to.
pub struct StreamTarget {
    pub container_id: String,
    pub pod_id: String,
    pub agent: Agent,
    /// The container was created with stdin open / a tty.
    pub stdin: bool,
    pub tty: bool,
    pub stdin_once: bool,
    /// Flips to true when the container exits.
    pub exited: tokio::sync::watch::Receiver<bool>,
    /// The container's output from now on (what the log copier reads).
    pub output: tokio::sync::broadcast::Receiver<super::OutputChunk>,
}

impl Manager {
    /// The running container `id` with its pod's agent: NotFound for an
    /// unknown container, FailedPrecondition when it is not running.
    pub fn stream_target(&self, id: &str) -> Result<StreamTarget> {
        let c = self.container(id)?;
        if c.record().state != ContainerState::Running {
            return Err(RuntimeError::FailedPrecondition(format!(
                "container {id} is not running"
            )));
        }
        let pod = self.pod(&c.pod_id)?;
        let agent = pod.agent().ok_or_else(|| {
            RuntimeError::FailedPrecondition(format!("pod sandbox {} has no agent", pod.id))
        })?;
        Ok(StreamTarget {
            container_id: c.id.clone(),
            pod_id: pod.id.clone(),
            agent,
            stdin: c.config.stdin,
            tty: c.config.tty,
            stdin_once: c.config.stdin_once,
            exited: c.exited.subscribe(),
            output: c.output.subscribe(),
        })
    }

    /// Checks that pod `id` (or a unique prefix of it) exists and is ready (for
    /// PortForward); returns its full id.
    pub fn port_forward_target(&self, id: &str) -> Result<String> {
        let pod = self.pod(id)?;
        if pod.record().state != PodState::Ready {
            return Err(RuntimeError::FailedPrecondition(format!(
                "pod sandbox {} is not ready",
                pod.id
            )));
        }
        Ok(pod.id.clone())
    }

    /// A connection to pod `id`'s agent port-forward endpoint.
    pub async fn dial_forward(self: &Arc<Self>, id: &str) -> Result<tokio::net::UnixStream> {
        let pod = self.pod(id)?;
        let rec = pod.record();
        if rec.state != PodState::Ready {
            return Err(RuntimeError::FailedPrecondition(format!(
                "pod sandbox {id} is not ready"
            )));
        }
        let p = rec.agent.ok_or_else(|| {
            RuntimeError::FailedPrecondition(format!("pod sandbox {id} has no agent"))
        })?;
        pod.kind.dial_forward(&p).await
    }
}

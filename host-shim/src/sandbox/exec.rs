//! ExecSync: run a command in a container, collect its output and exit code.

use std::sync::Arc;
use std::time::Duration;

use super::agent::{Agent, AgentError, POLL_TIMEOUT};
use super::state::{ContainerState, new_id};
use super::{Manager, Result, RuntimeError};

/// CRI's cap on ExecSync output per stream (kubelet: 16 MiB).
pub const MAX_OUTPUT: usize = 16 << 20;

#[derive(Debug, Default)]
pub struct ExecOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub exit_code: i32,
}

impl Manager {
    /// Runs `cmd` in container `id`; `timeout` 0 = none. On timeout the
    /// process is killed and DeadlineExceeded returned.
    pub async fn exec_sync(
        self: &Arc<Self>,
        id: &str,
        cmd: Vec<String>,
        timeout: Duration,
    ) -> Result<ExecOutput> {
        if cmd.is_empty() {
            return Err(RuntimeError::InvalidArgument("exec: cmd is empty".into()));
        }
        let c = self.container(id)?;
        let id: &str = &c.id;
        if c.record().state != ContainerState::Running {
            return Err(RuntimeError::FailedPrecondition(format!(
                "container {id} is not running"
            )));
        }
        let pod = self.pod(&c.pod_id)?;
        let agent = pod.agent().ok_or_else(|| {
            RuntimeError::FailedPrecondition(format!("pod sandbox {} has no agent", pod.id))
        })?;
        let exec_id = format!("exec-{}", &new_id()[..16]);
        agent
            .exec(id, &exec_id, serde_json::json!({ "args": cmd }))
            .await
            .map_err(|e| RuntimeError::agent("exec", e))?;
        let run = run_to_end(&agent, id, &exec_id);
        let result = if timeout.is_zero() {
            run.await
        } else {
            match tokio::time::timeout(timeout, run).await {
                Ok(r) => r,
                Err(_) => {
                    let _ = agent.signal(id, &exec_id, libc::SIGKILL, false).await;
                    let _ = tokio::time::timeout(
                        Duration::from_secs(5),
                        agent.wait(id, &exec_id, Duration::from_secs(5)),
                    )
                    .await;
                    Err(RuntimeError::DeadlineExceeded(format!(
                        "exec in {id}: timeout {}s exceeded, the process was killed",
                        timeout.as_secs_f64()
                    )))
                }
            }
        };
        if let Err(e) = agent.remove_process(id, &exec_id).await {
            tracing::debug!(container = id, exec = %exec_id, error = %e, "remove exec process");
        }
        result
    }
}

async fn run_to_end(agent: &Agent, id: &str, exec_id: &str) -> Result<ExecOutput> {
    let (stdout, stderr) = tokio::join!(
        read_all(agent, id, exec_id, false),
        read_all(agent, id, exec_id, true)
    );
    let exit_code = loop {
        match agent.wait(id, exec_id, POLL_TIMEOUT).await {
            Ok(w) => break w.exit_code,
            Err(AgentError::Timeout) => continue,
            Err(e) => return Err(RuntimeError::agent("exec wait", e)),
        }
    };
    Ok(ExecOutput {
        stdout: stdout?,
        stderr: stderr?,
        exit_code,
    })
}

async fn read_all(agent: &Agent, id: &str, exec_id: &str, stderr: bool) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut offset = 0u64;
    loop {
        match agent
            .read(id, exec_id, stderr, Some((offset, offset)), POLL_TIMEOUT)
            .await
        {
            Ok(r) => {
                offset = r.offset + r.data.len() as u64;
                let room = MAX_OUTPUT.saturating_sub(out.len());
                out.extend_from_slice(&r.data[..r.data.len().min(room)]);
                if r.eof {
                    return Ok(out);
                }
            }
            Err(AgentError::Timeout) => continue,
            Err(e) => return Err(RuntimeError::agent("exec output", e)),
        }
    }
}

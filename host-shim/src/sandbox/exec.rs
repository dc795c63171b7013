//! ExecSync: run a command in a container, collect its output and exit code.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::agent::{Agent, AgentError, POLL_TIMEOUT};
use super::state::{ContainerState, new_id};
use super::{Manager, Result, RuntimeError};

/// The largest ExecSync response the kubelet accepts (its gRPC client's
/// receive limit): stdout and stderr *together* stay below it.
pub const MAX_OUTPUT: usize = 16 << 20;
/// Room kept for the rest of the response: field tags, the exit code and the
/// truncation markers.
const RESPONSE_SLACK: usize = 4 << 10;
/// Output bytes kept from both streams together.
pub const OUTPUT_BUDGET: usize = MAX_OUTPUT - RESPONSE_SLACK;
/// Ends a stream whose output did not fit in [`OUTPUT_BUDGET`] (the same in
/// both sandbox kinds: both run ExecSync through the agent).
pub const TRUNCATED_MARKER: &[u8] =
    b"\n[husk: output truncated: stdout and stderr together exceed 16 MiB]\n";

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
        super::validate::argv_env("exec", cmd.iter().map(String::as_str), [])?;
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
        // With a timeout the whole call is bounded, starting the process included: a guest
        // that stops answering gets DeadlineExceeded after `timeout` (+ at most KILL_GRACE to
        // kill what it started), never the agent's 30 s RPC deadline per step.
        let deadline = (!timeout.is_zero()).then(|| tokio::time::Instant::now() + timeout);
        let timed_out = || {
            RuntimeError::DeadlineExceeded(format!(
                "exec in {id}: timeout {}s exceeded, the process was killed",
                timeout.as_secs_f64()
            ))
        };
        let start = agent.exec(id, &exec_id, serde_json::json!({ "args": cmd }));
        let started = match deadline {
            None => start.await,
            Some(d) => match tokio::time::timeout_at(d, start).await {
                Ok(r) => r,
                Err(_) => {
                    // The process may have started as the deadline fired.
                    reap_in_background(&agent, id, &exec_id, true);
                    return Err(timed_out());
                }
            },
        };
        started.map_err(|e| RuntimeError::agent("exec", e))?;
        let run = run_to_end(&agent, id, &exec_id);
        let result = match deadline {
            None => run.await,
            Some(d) => match tokio::time::timeout_at(d, run).await {
                Ok(r) => r,
                Err(_) => {
                    let _ = tokio::time::timeout(KILL_GRACE, async {
                        let _ = agent.signal(id, &exec_id, libc::SIGKILL, false).await;
                        let _ = agent.wait(id, &exec_id, KILL_GRACE).await;
                    })
                    .await;
                    reap_in_background(&agent, id, &exec_id, false);
                    return Err(timed_out());
                }
            },
        };
        forget(&agent, id, &exec_id).await;
        result
    }
}

/// How long a timed-out ExecSync waits for its process to be killed before it answers.
const KILL_GRACE: Duration = Duration::from_secs(3);

/// Kills (if `kill`) and forgets an exec process without holding up the reply: the agent may
/// be slow or silent (each call is bounded by the agent's own RPC deadline).
fn reap_in_background(agent: &Agent, id: &str, exec_id: &str, kill: bool) {
    let (agent, id, exec_id) = (agent.clone(), id.to_string(), exec_id.to_string());
    tokio::spawn(async move {
        if kill {
            let _ = agent.signal(&id, &exec_id, libc::SIGKILL, false).await;
        }
        forget(&agent, &id, &exec_id).await;
    });
}

/// Drops the agent's record of an exec process (best effort: logged when it fails).
async fn forget(agent: &Agent, id: &str, exec_id: &str) {
    if let Err(e) = agent.remove_process(id, exec_id).await {
        tracing::debug!(container = id, exec = %exec_id, error = %e, "remove exec process");
    }
}

async fn run_to_end(agent: &Agent, id: &str, exec_id: &str) -> Result<ExecOutput> {
    let budget = AtomicUsize::new(OUTPUT_BUDGET);
    let (stdout, stderr) = tokio::join!(
        read_all(agent, id, exec_id, false, &budget),
        read_all(agent, id, exec_id, true, &budget)
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

/// Takes up to `want` bytes from the shared output budget; returns how many.
fn take_budget(budget: &AtomicUsize, want: usize) -> usize {
    let mut got = 0;
    let _ = budget.fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
        got = want.min(left);
        Some(left - got)
    });
    got
}

/// Keeps what the shared budget allows of `data`; once something was cut,
/// the stream ends with [`TRUNCATED_MARKER`] (appended by the caller).
fn keep(out: &mut Vec<u8>, data: &[u8], budget: &AtomicUsize, truncated: &mut bool) {
    let n = take_budget(budget, data.len());
    out.extend_from_slice(&data[..n]);
    *truncated |= n < data.len();
}

async fn read_all(
    agent: &Agent,
    id: &str,
    exec_id: &str,
    stderr: bool,
    budget: &AtomicUsize,
) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut truncated = false;
    let mut offset = 0u64;
    loop {
        match agent
            .read(id, exec_id, stderr, Some((offset, offset)), POLL_TIMEOUT)
            .await
        {
            Ok(r) => {
                offset = r.offset + r.data.len() as u64;
                keep(&mut out, &r.data, budget, &mut truncated);
                if r.eof {
                    if truncated {
                        out.extend_from_slice(TRUNCATED_MARKER);
                    }
                    return Ok(out);
                }
            }
            Err(AgentError::Timeout) => continue,
            Err(e) => return Err(RuntimeError::agent("exec output", e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_streams_share_one_budget() {
        let budget = AtomicUsize::new(OUTPUT_BUDGET);
        let (mut o, mut e) = (Vec::new(), Vec::new());
        let (mut to, mut te) = (false, false);
        let chunk = vec![b'x'; 4 << 20];
        // 20 MiB to each stream, interleaved as the two readers would see it.
        for _ in 0..5 {
            keep(&mut o, &chunk, &budget, &mut to);
            keep(&mut e, &chunk, &budget, &mut te);
        }
        assert!(to && te, "both streams were cut");
        assert_eq!(o.len() + e.len(), OUTPUT_BUDGET);
        o.extend_from_slice(TRUNCATED_MARKER);
        e.extend_from_slice(TRUNCATED_MARKER);
        assert!(o.len() + e.len() + 64 < MAX_OUTPUT, "a response still fits");
        // Small output is untouched.
        let budget = AtomicUsize::new(OUTPUT_BUDGET);
        let mut t = false;
        let mut out = Vec::new();
        keep(&mut out, b"hello", &budget, &mut t);
        assert!(!t);
        assert_eq!(out, b"hello");
    }
}

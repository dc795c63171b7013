//! SignalProcess and WaitProcess.

use std::sync::Arc;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::agent::Agent;
use crate::error::{AgentError, Result};
use crate::reaper::ExitStatus;

pub fn parse_signal(n: u32) -> Result<Signal> {
    Signal::try_from(n as i32).map_err(|_| AgentError::InvalidArgument(format!("signal {n}")))
}

pub fn do_signal(
    agent: &Arc<Agent>,
    container_id: &str,
    exec_id: &str,
    signal: u32,
    all: bool,
) -> Result<()> {
    let sig = parse_signal(signal)?;
    let c = agent.container(container_id)?;
    let p = c.process(exec_id)?;
    if p.exited().is_some() {
        return Err(AgentError::FailedPrecondition(format!(
            "process {} of {container_id} has exited",
            p.pid
        )));
    }
    if all && exec_id.is_empty() {
        for pid in c.cgroup.pids() {
            let _ = kill(Pid::from_raw(pid), sig);
        }
    }
    match kill(Pid::from_raw(p.pid), sig) {
        Ok(()) | Err(nix::Error::ESRCH) => Ok(()),
        Err(e) => Err(AgentError::Os("kill", e)),
    }
}

pub async fn do_wait(
    agent: &Arc<Agent>,
    container_id: &str,
    exec_id: &str,
) -> Result<(ExitStatus, Option<std::time::SystemTime>)> {
    let c = agent.container(container_id)?;
    let p = c.process(exec_id)?;
    let status = p.wait().await;
    let started = *crate::sync::lock(&p.started_at);
    Ok((status, started))
}

//! ContainerStats, UpdateResources, ListProcesses.

use std::sync::Arc;

use oci_spec::runtime::LinuxResources;

use crate::agent::{Agent, AgentError, Result};
use crate::cgroup::Stats;

pub fn do_stats(agent: &Arc<Agent>, id: &str) -> Result<Stats> {
    Ok(agent.container(id)?.cgroup.stats())
}

pub fn do_update(agent: &Arc<Agent>, id: &str, resources_json: &[u8]) -> Result<()> {
    let c = agent.container(id)?;
    let res: LinuxResources = serde_json::from_slice(resources_json)
        .map_err(|e| AgentError::InvalidArgument(format!("resources: {e}")))?;
    crate::cgroup::validate(&res).map_err(|e| AgentError::InvalidArgument(e.to_string()))?;
    c.cgroup.apply(&res)?;
    Ok(())
}

/// (host pid, cmdline) of every process in the container's cgroup.
pub fn do_list_processes(agent: &Arc<Agent>, id: &str) -> Result<Vec<(i32, String)>> {
    let c = agent.container(id)?;
    Ok(c.cgroup
        .pids()
        .into_iter()
        .map(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmd: Vec<String> =
                cmd.split(|b| *b == 0).filter(|s| !s.is_empty()).map(|s| String::from_utf8_lossy(s).into_owned()).collect();
            (pid, cmd.join(" "))
        })
        .collect())
}

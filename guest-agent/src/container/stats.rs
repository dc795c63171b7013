//! ContainerStats, UpdateResources, ListProcesses.

use std::sync::Arc;

use oci_spec::runtime::LinuxResources;

use crate::agent::{Agent, AgentError, Result};
use crate::cgroup::Stats;

pub fn do_stats(agent: &Arc<Agent>, id: &str) -> Result<Stats> {
    Ok(agent.container(id)?.cgroup.stats())
}

/// One line of /proc/net/dev.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub rx_bytes: u64,
    pub rx_errors: u64,
    pub tx_bytes: u64,
    pub tx_errors: u64,
}

pub fn parse_net_dev(content: &str) -> Vec<Interface> {
    content
        .lines()
        .skip(2)
        .filter_map(|l| {
            let (name, rest) = l.split_once(':')?;
            let f: Vec<u64> = rest
                .split_whitespace()
                .map(|v| v.parse().unwrap_or(0))
                .collect();
            (f.len() >= 12).then(|| Interface {
                name: name.trim().to_string(),
                rx_bytes: f[0],
                rx_errors: f[2],
                tx_bytes: f[8],
                tx_errors: f[10],
            })
        })
        .collect()
}

/// Pod cgroup stats and the interfaces of the pod's network namespace.
pub fn do_sandbox_stats(agent: &Arc<Agent>, sandbox_id: &str) -> Result<(Stats, Vec<Interface>)> {
    let s = agent.sandbox()?;
    if s.id != sandbox_id {
        return Err(AgentError::NotFound(format!("sandbox {sandbox_id}")));
    }
    let net = std::fs::read_to_string(format!("/proc/{}/net/dev", s.holder_pid))
        .map_err(|e| AgentError::Io("read pod /proc/net/dev".into(), e))?;
    Ok((s.cgroup.stats(), parse_net_dev(&net)))
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
            let cmd: Vec<String> = cmd
                .split(|b| *b == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect();
            (pid, cmd.join(" "))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_dev_parses() {
        let c = "Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:    1234      10    1    0    0     0          0         0     5678      12    2    0    0     0       0          0
  eth0: 99 1 0 0 0 0 0 0 77 1 0 0 0 0 0 0
";
        let ifs = parse_net_dev(c);
        assert_eq!(ifs.len(), 2);
        assert_eq!(
            ifs[0],
            Interface {
                name: "lo".into(),
                rx_bytes: 1234,
                rx_errors: 1,
                tx_bytes: 5678,
                tx_errors: 2
            }
        );
        assert_eq!(
            (ifs[1].name.as_str(), ifs[1].rx_bytes, ifs[1].tx_bytes),
            ("eth0", 99, 77)
        );
    }
}

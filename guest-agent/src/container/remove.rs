//! RemoveContainer: stop what is left, free cgroup, mounts and state.

use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::Status;
use crate::agent::Agent;
use crate::error::{AgentError, Result};
use crate::sync::lock;

pub async fn do_remove(agent: &Arc<Agent>, id: &str, force: bool) -> Result<()> {
    let c = agent.container(id)?;
    // A created container (never started) can always be removed.
    if c.status() == Status::Running && !force {
        return Err(AgentError::FailedPrecondition(format!(
            "container {id} is running (use force)"
        )));
    }
    if !lock(&agent.busy).insert(id.to_string()) {
        return Err(AgentError::FailedPrecondition(format!(
            "container {id} is busy"
        )));
    }
    let result = async {
        let mut procs = vec![c.init.clone()];
        procs.extend(lock(&c.inner).execs.values().cloned());
        for _ in 0..50 {
            let mut pids = c.cgroup.pids();
            pids.extend(procs.iter().filter(|p| p.exited().is_none()).map(|p| p.pid));
            if pids.is_empty() {
                break;
            }
            for pid in pids {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for p in &procs {
            if tokio::time::timeout(Duration::from_secs(10), p.wait())
                .await
                .is_err()
            {
                return Err(AgentError::FailedPrecondition(format!(
                    "process {} of {id} did not die",
                    p.pid
                )));
            }
        }
        c.cgroup.destroy()?;
        for m in &c.agent_mounts {
            let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
        }
        // The rootfs overlay lived in the container's mount namespace, gone now.
        std::fs::remove_dir_all(&c.dir)
            .or_else(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    Ok(())
                } else {
                    Err(e)
                }
            })
            .map_err(|e| AgentError::Io(format!("remove {}", c.dir.display()), e))?;
        lock(&agent.containers).remove(id);
        tracing::info!(container = %id, "container removed");
        Ok(())
    }
    .await;
    lock(&agent.busy).remove(id);
    result
}

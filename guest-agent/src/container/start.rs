//! StartContainer: release the waiting runner and confirm the exec.

use std::sync::Arc;
use std::time::SystemTime;

use super::spawn::Spawned;
use super::{Container, Status};
use crate::agent::Agent;
use crate::error::{AgentError, Result};
use crate::sync::lock;

pub async fn do_start(agent: &Arc<Agent>, id: &str) -> Result<Arc<Container>> {
    let c = agent.container(id)?;
    let pending = {
        let mut inner = lock(&c.inner);
        if inner.status != Status::Created || c.init.exited().is_some() {
            return Err(AgentError::FailedPrecondition(format!(
                "container {id} is not in created state"
            )));
        }
        // Taking `pending` makes a concurrent second start fail above.
        inner.status = Status::Running;
        inner.pending.take()
    };
    let Some(mut pending) = pending else {
        return Err(AgentError::FailedPrecondition(format!(
            "container {id} is already starting"
        )));
    };
    *lock(&c.init.started_at) = Some(SystemTime::now());
    if let Err(e) = Spawned::start(pending.start.take(), &mut pending.sync).await {
        lock(&c.inner).status = Status::Stopped;
        return Err(e.into());
    }
    tracing::info!(container = %id, "container started");
    Ok(c)
}

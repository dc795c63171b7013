//! Background work per running container (log copying, exit wait) and per
//! pod (agent liveness).

use std::sync::Arc;
use std::time::Duration;

use super::agent::{Agent, AgentError, POLL_TIMEOUT};
use super::kind::remove_pod_cgroups;
use super::logs::{CriLog, Stream};
use super::pidwatch::ExitWatch;
use super::state::{ContainerState, PodState, now_ns};
use super::{Container, Manager, OutputChunk, Pod, lock};

/// How often a pod's agent process is checked where its exit cannot be awaited
/// (no pidfd), and while a stop that kills it on purpose is in progress.
const MONITOR_EVERY: Duration = Duration::from_millis(250);
/// How often a monitor that awaits the exit looks whether its pod is still Ready.
const RECHECK_EVERY: Duration = Duration::from_secs(30);
/// How long an exit waits for the log copiers to reach end of stream.
const DRAIN_WAIT: Duration = Duration::from_secs(2);

impl Manager {
    /// Copies the container's output into its log and records its exit.
    pub(super) fn spawn_supervisor(
        self: &Arc<Self>,
        pod: Arc<Pod>,
        c: Arc<Container>,
        agent: Agent,
    ) {
        let m = self.clone();
        tokio::spawn(async move { m.supervise(pod, c, agent).await });
    }

    async fn supervise(self: Arc<Self>, pod: Arc<Pod>, c: Arc<Container>, agent: Agent) {
        let log = c
            .log()
            .unwrap_or_else(|| Arc::new(CriLog::new(None).unwrap_or_else(|_| unreachable_log())));
        let out = tokio::spawn(copy(
            pod.clone(),
            agent.clone(),
            c.id.clone(),
            log.clone(),
            Stream::Stdout,
            c.output.clone(),
        ));
        let err = tokio::spawn(copy(
            pod.clone(),
            agent.clone(),
            c.id.clone(),
            log.clone(),
            Stream::Stderr,
            c.output.clone(),
        ));
        loop {
            if *c.exited.borrow() {
                return;
            }
            match agent.wait(&c.id, "", POLL_TIMEOUT).await {
                Ok(w) => {
                    let _ = tokio::time::timeout(DRAIN_WAIT, async {
                        let _ = out.await;
                        let _ = err.await;
                    })
                    .await;
                    let reason = if w.oom_killed {
                        "OOMKilled"
                    } else if w.exit_code == 0 {
                        "Completed"
                    } else {
                        "Error"
                    };
                    let at = if w.exited_at > 0 {
                        w.exited_at
                    } else {
                        now_ns()
                    };
                    c.mark_exited(&self.store, w.exit_code, at, reason, "");
                    return;
                }
                Err(AgentError::Timeout) => continue,
                Err(e) if e.is_code(ttrpc::Code::NOT_FOUND) => {
                    c.mark_exited(
                        &self.store,
                        255,
                        now_ns(),
                        "ContainerLost",
                        "the agent no longer knows this container",
                    );
                    return;
                }
                Err(e) => {
                    if !pod.agent_alive() {
                        self.agent_died(&pod, &e.to_string());
                        return;
                    }
                    tracing::debug!(container = %c.id, error = %e, "wait; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    /// Watches a Ready pod's agent process; marks the pod NotReady when it dies.
    pub(super) fn spawn_monitor(self: &Arc<Self>, pod: Arc<Pod>) {
        let m = self.clone();
        tokio::spawn(async move {
            // Awaits the exit of the VMM, its helpers or the namespace agent (pidfds);
            // polls only where that is not possible.
            let watch = pod
                .agent_procs()
                .and_then(|procs| match ExitWatch::new(&procs) {
                    Ok(w) => Some(w),
                    Err(e) => {
                        tracing::debug!(pod = %pod.id, error = %e, "no pidfd: the agent is polled");
                        None
                    }
                });
            loop {
                match &watch {
                    Some(w) => {
                        tokio::select! {
                            _ = w.any_exited() => {}
                            _ = tokio::time::sleep(RECHECK_EVERY) => {}
                        }
                    }
                    None => tokio::time::sleep(MONITOR_EVERY).await,
                }
                if pod.record().state != PodState::Ready {
                    return;
                }
                if !pod.agent_alive() {
                    // A stop in progress kills the agent on purpose.
                    if pod.lifecycle.try_lock().is_err() {
                        tokio::time::sleep(MONITOR_EVERY).await;
                        continue;
                    }
                    // A VM's exit is logged with its console and VMM log tails (a guest
                    // panic, a triple fault), as a failed boot is.
                    let agent = lock(&pod.rec).agent.clone();
                    if let Some(p) = agent
                        && let Some(e) = pod.kind.exited_during(&pod.id, &p, "its run").await
                    {
                        tracing::warn!(pod = %pod.id, error = %e, "pod VM exited");
                    }
                    m.agent_died(&pod, "the agent process exited");
                    return;
                }
            }
        });
    }

    /// The pod's agent is gone: the pod is NotReady, its containers exited
    /// (they died with the agent's PID namespace), its cgroups removed.
    pub(super) fn agent_died(&self, pod: &Pod, why: &str) {
        {
            let mut r = lock(&pod.rec);
            if r.state != PodState::Ready {
                return;
            }
            r.state = PodState::NotReady;
            r.reason = format!("AgentExited: {why}");
        }
        tracing::warn!(pod = %pod.id, why, "pod agent died");
        crate::metrics::global()
            .sandbox_exit(&lock(&pod.rec).handler, crate::metrics::ExitReason::Died);
        *lock(&pod.agent) = None;
        if let Err(e) = pod.persist(&self.store) {
            tracing::error!(pod = %pod.id, error = %e, "persist pod");
        }
        let now = now_ns();
        for c in pod.containers() {
            let s = c.record().state;
            if s == ContainerState::Running || s == ContainerState::Created {
                c.mark_exited(
                    &self.store,
                    137,
                    now,
                    "SandboxAgentExited",
                    "the pod's husk-agent exited; the container was killed with its PID namespace",
                );
            }
        }
        let rec = pod.record();
        tokio::spawn(async move {
            let left =
                remove_pod_cgroups(&rec.cgroup_parent, rec.owns_cgroup, super::pod::CGROUP_WAIT)
                    .await;
            if !left.is_empty() {
                tracing::warn!(?left, "cgroups of a dead pod left behind");
            }
        });
    }
}

fn unreachable_log() -> CriLog {
    // CriLog::new(None) opens nothing and cannot fail.
    #[allow(clippy::unwrap_used)]
    CriLog::new(None).unwrap()
}

/// Turns one agent reply (at most ttrpc's 4 MiB) into log records on a
/// blocking thread: a reply of newlines is millions of records, and that
/// file work stays off the async workers. Hands the data back.
async fn write_log(log: &Arc<CriLog>, stream: Stream, data: Vec<u8>) -> Vec<u8> {
    let l = log.clone();
    match tokio::task::spawn_blocking(move || {
        l.write(stream, &data);
        data
    })
    .await
    {
        Ok(data) => data,
        Err(e) => {
            tracing::error!(error = %e, "log writer task failed");
            Vec::new()
        }
    }
}

/// Long-polls one stream into the log until end of stream or agent loss.
/// Reads are acknowledged: each request carries the offset the log has
/// durably consumed, so a response lost in flight (a timeout firing as the
/// agent answered, or huskd killed) is read again.
/// What it copies also goes to `fanout` (attached clients).
async fn copy(
    pod: Arc<Pod>,
    agent: Agent,
    id: String,
    log: Arc<CriLog>,
    stream: Stream,
    fanout: tokio::sync::broadcast::Sender<OutputChunk>,
) {
    let stderr = stream == Stream::Stderr;
    let fan = |r: &[u8]| super::fanout::send(&fanout, stream, r);
    loop {
        let at = log.position(stream);
        match agent.read(&id, "", stderr, Some(at), POLL_TIMEOUT).await {
            Ok(r) => {
                if r.offset != at.0 {
                    tracing::warn!(container = %id, asked = at.0, got = r.offset, "log stream offset moved");
                    log.skip_to(stream, r.offset);
                }
                let data = write_log(&log, stream, r.data).await;
                fan(&data);
                if r.eof {
                    log.finish(stream);
                    let _ = fanout.send(OutputChunk::Eof(stream));
                    return;
                }
            }
            Err(AgentError::Timeout) => continue,
            Err(e) if e.is_code(ttrpc::Code::NOT_FOUND) => return,
            Err(e) if e.is_code(ttrpc::Code::OUT_OF_RANGE) => {
                // Cannot happen while only this copier reads the stream; if
                // it does, say so and go on from what the agent still holds.
                tracing::error!(container = %id, error = %e, "container output lost; resuming at the oldest held byte");
                if let Ok(r) = agent.read(&id, "", stderr, None, POLL_TIMEOUT).await {
                    log.skip_to(stream, r.offset);
                    let data = write_log(&log, stream, r.data).await;
                    fan(&data);
                }
            }
            Err(e) => {
                if !pod.agent_alive() {
                    log.finish(stream);
                    return;
                }
                tracing::debug!(container = %id, error = %e, "read stream; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

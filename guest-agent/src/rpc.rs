//! The ttrpc service: thin handlers (trace, convert, call `do_*`, map the error).
//! Errors become ttrpc codes in exactly one place: [`status`].

use std::sync::Arc;

use async_trait::async_trait;
use husk_proto::agent as pb;
use ttrpc::r#async::TtrpcContext;
use ttrpc::{Code, Status};

use crate::agent::Agent;
use crate::cgroup::CgroupError;
use crate::container::spawn::SpawnError;
use crate::container::stdio::{Chunk, ReadAt, StdioError};
use crate::container::{create, exec, remove, signal, start, stats};
use crate::error::AgentError;
use crate::network::NetError;
use crate::{convert, sandbox};

const DEFAULT_READ: usize = 64 * 1024;
const MAX_READ: usize = 1024 * 1024;

/// The one error-to-code mapping of the agent.
pub fn code(e: &AgentError) -> Code {
    match e {
        AgentError::NotFound(_) => Code::NOT_FOUND,
        AgentError::AlreadyExists(_) => Code::ALREADY_EXISTS,
        AgentError::InvalidArgument(_)
        | AgentError::Stdio(StdioError::BadOffset(_))
        | AgentError::Cgroup(CgroupError::Invalid(_))
        | AgentError::Spawn(SpawnError::Invalid(_))
        | AgentError::Net(NetError::Address(_) | NetError::NoInterface(_)) => {
            Code::INVALID_ARGUMENT
        }
        AgentError::FailedPrecondition(_)
        | AgentError::Stdio(StdioError::NoStdin | StdioError::NoTty) => Code::FAILED_PRECONDITION,
        AgentError::Spawn(SpawnError::Timeout) => Code::DEADLINE_EXCEEDED,
        AgentError::Stdio(StdioError::Gone { .. }) => Code::OUT_OF_RANGE,
        AgentError::Stdio(StdioError::Unacknowledged(_)) => Code::RESOURCE_EXHAUSTED,
        _ => Code::INTERNAL,
    }
}

fn status(e: AgentError) -> ttrpc::Error {
    let code = code(&e);
    if code == Code::INTERNAL {
        tracing::warn!(error = %e, "request failed");
    } else {
        tracing::debug!(error = %e, ?code, "request rejected");
    }
    let mut s = Status::new();
    s.set_code(code);
    s.set_message(e.to_string());
    ttrpc::Error::RpcStatus(s)
}

type R<T> = ttrpc::Result<T>;

pub struct AgentService {
    pub agent: Arc<Agent>,
}

fn read_at(r: &pb::ReadStreamRequest) -> ReadAt {
    match r.offset {
        Some(offset) => ReadAt::Offset {
            offset,
            consumed: r.consumed,
        },
        None => ReadAt::Next,
    }
}

fn read_len(max: u32) -> usize {
    if max == 0 {
        DEFAULT_READ
    } else {
        (max as usize).min(MAX_READ)
    }
}

#[async_trait]
impl pb::Agent for AgentService {
    async fn check(&self, _: &TtrpcContext, _: pb::CheckRequest) -> R<pb::CheckResponse> {
        let sandbox = self.agent.sandbox().ok();
        Ok(pb::CheckResponse {
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            cgroup_version: self.agent.cgroups.version().to_string(),
            init: self.agent.config.is_init,
            sandbox_id: sandbox.as_ref().map(|s| s.id.clone()).unwrap_or_default(),
            sandbox_ready: sandbox.as_ref().is_some_and(|s| s.alive()),
            ..Default::default()
        })
    }

    async fn create_sandbox(
        &self,
        _: &TtrpcContext,
        r: pb::CreateSandboxRequest,
    ) -> R<pb::CreateSandboxResponse> {
        tracing::info!(sandbox = %r.sandbox_id, "CreateSandbox");
        let s = sandbox::lifecycle::do_create(&self.agent, convert::sandbox_config(&r))
            .await
            .map_err(status)?;
        Ok(pb::CreateSandboxResponse {
            pid: s.holder_pid as u32,
            ..Default::default()
        })
    }

    async fn rehearse(&self, _: &TtrpcContext, r: pb::RehearseRequest) -> R<pb::RehearseResponse> {
        tracing::info!("Rehearse");
        let took = sandbox::rehearsal::run(&self.agent, &r.oci_spec)
            .await
            .map_err(status)?;
        tracing::info!(elapsed_ms = took.as_millis() as u64, "rehearsal done");
        Ok(pb::RehearseResponse {
            elapsed_ms: took.as_millis().min(u32::MAX as u128) as u32,
            ..Default::default()
        })
    }

    async fn shutdown(&self, _: &TtrpcContext, _: pb::Empty) -> R<pb::Empty> {
        tracing::info!("Shutdown requested");
        // Answer first; the SIGTERM path then destroys the sandbox and, as a
        // guest's PID 1, powers off.
        tokio::spawn(async {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGTERM);
        });
        Ok(pb::Empty::new())
    }

    async fn destroy_sandbox(
        &self,
        _: &TtrpcContext,
        r: pb::DestroySandboxRequest,
    ) -> R<pb::Empty> {
        tracing::info!(sandbox = %r.sandbox_id, "DestroySandbox");
        sandbox::lifecycle::do_destroy(&self.agent, &r.sandbox_id)
            .await
            .map_err(status)?;
        Ok(pb::Empty::new())
    }

    async fn configure_network(
        &self,
        _: &TtrpcContext,
        r: pb::ConfigureNetworkRequest,
    ) -> R<pb::Empty> {
        tracing::info!(
            interfaces = r.interfaces.len(),
            routes = r.routes.len(),
            "ConfigureNetwork"
        );
        let (interfaces, routes) = convert::network(&r).map_err(|e| status(e.into()))?;
        sandbox::lifecycle::do_configure_network(&self.agent, interfaces, routes)
            .await
            .map_err(status)?;
        Ok(pb::Empty::new())
    }

    async fn create_container(
        &self,
        _: &TtrpcContext,
        r: pb::CreateContainerRequest,
    ) -> R<pb::CreateContainerResponse> {
        tracing::info!(container = %r.container_id, "CreateContainer");
        let stdio = r.stdio.as_ref();
        let req = create::CreateRequest {
            id: r.container_id.clone(),
            spec_json: r.oci_spec.clone(),
            rootfs: convert::rootfs(r.rootfs.as_ref()),
            stdin: stdio.is_some_and(|s| s.stdin),
            tty: stdio.is_some_and(|s| s.tty),
        };
        let c = create::do_create(&self.agent, req).await.map_err(status)?;
        Ok(pb::CreateContainerResponse {
            pid: c.init.pid as u32,
            ..Default::default()
        })
    }

    async fn start_container(
        &self,
        _: &TtrpcContext,
        r: pb::StartContainerRequest,
    ) -> R<pb::Empty> {
        tracing::info!(container = %r.container_id, "StartContainer");
        start::do_start(&self.agent, &r.container_id)
            .await
            .map_err(status)?;
        Ok(pb::Empty::new())
    }

    async fn remove_container(
        &self,
        _: &TtrpcContext,
        r: pb::RemoveContainerRequest,
    ) -> R<pb::Empty> {
        tracing::info!(container = %r.container_id, force = r.force, "RemoveContainer");
        remove::do_remove(&self.agent, &r.container_id, r.force)
            .await
            .map_err(status)?;
        Ok(pb::Empty::new())
    }

    async fn container_state(
        &self,
        _: &TtrpcContext,
        r: pb::ContainerStateRequest,
    ) -> R<pb::ContainerStateResponse> {
        let c = self.agent.container(&r.container_id).map_err(status)?;
        // Up to date even between two polls of the OOM monitor.
        self.agent.refresh_oom(&c);
        Ok(convert::container_state(&c))
    }

    async fn list_containers(
        &self,
        _: &TtrpcContext,
        _: pb::ListContainersRequest,
    ) -> R<pb::ListContainersResponse> {
        let all = self.agent.all_containers();
        for c in &all {
            self.agent.refresh_oom(c);
        }
        let containers = all.iter().map(|c| convert::container_state(c)).collect();
        Ok(pb::ListContainersResponse {
            containers,
            ..Default::default()
        })
    }

    async fn exec_process(
        &self,
        _: &TtrpcContext,
        r: pb::ExecProcessRequest,
    ) -> R<pb::ExecProcessResponse> {
        tracing::info!(container = %r.container_id, exec = %r.exec_id, "ExecProcess");
        let stdio = r.stdio.as_ref();
        let req = exec::ExecRequest {
            container_id: r.container_id.clone(),
            exec_id: r.exec_id.clone(),
            process_json: r.process.clone(),
            stdin: stdio.is_some_and(|s| s.stdin),
            tty: stdio.is_some_and(|s| s.tty),
        };
        let p = exec::do_exec(&self.agent, req).await.map_err(status)?;
        Ok(pb::ExecProcessResponse {
            pid: p.pid as u32,
            ..Default::default()
        })
    }

    async fn remove_process(&self, _: &TtrpcContext, r: pb::RemoveProcessRequest) -> R<pb::Empty> {
        exec::do_remove_process(&self.agent, &r.container_id, &r.exec_id).map_err(status)?;
        Ok(pb::Empty::new())
    }

    async fn signal_process(&self, _: &TtrpcContext, r: pb::SignalProcessRequest) -> R<pb::Empty> {
        tracing::info!(container = %r.container_id, exec = %r.exec_id, signal = r.signal, "SignalProcess");
        signal::do_signal(&self.agent, &r.container_id, &r.exec_id, r.signal, r.all)
            .map_err(status)?;
        Ok(pb::Empty::new())
    }

    async fn wait_process(
        &self,
        _: &TtrpcContext,
        r: pb::WaitProcessRequest,
    ) -> R<pb::WaitProcessResponse> {
        let (exit, started) = signal::do_wait(&self.agent, &r.container_id, &r.exec_id)
            .await
            .map_err(status)?;
        let oom_killed = r.exec_id.is_empty() && self.oom_killed(&r.container_id);
        Ok(pb::WaitProcessResponse {
            oom_killed,
            exit_code: exit.code,
            started_at: crate::container::unix_nanos(started),
            exited_at: crate::container::unix_nanos(Some(exit.at)),
            signal: exit.signal,
            ..Default::default()
        })
    }

    async fn write_stdin(
        &self,
        _: &TtrpcContext,
        r: pb::WriteStdinRequest,
    ) -> R<pb::WriteStdinResponse> {
        let p = self.process(&r.container_id, &r.exec_id)?;
        let len =
            p.io.write_stdin(&r.data)
                .await
                .map_err(|e| status(e.into()))?;
        Ok(pb::WriteStdinResponse {
            len: len as u32,
            ..Default::default()
        })
    }

    async fn close_stdin(&self, _: &TtrpcContext, r: pb::CloseStdinRequest) -> R<pb::Empty> {
        let p = self.process(&r.container_id, &r.exec_id)?;
        p.io.close_stdin().await.map_err(|e| status(e.into()))?;
        Ok(pb::Empty::new())
    }

    async fn read_stdout(
        &self,
        _: &TtrpcContext,
        r: pb::ReadStreamRequest,
    ) -> R<pb::ReadStreamResponse> {
        let p = self.process(&r.container_id, &r.exec_id)?;
        let c = p.io.read_stdout(read_at(&r), read_len(r.max_len)).await;
        chunk_reply(c)
    }

    async fn read_stderr(
        &self,
        _: &TtrpcContext,
        r: pb::ReadStreamRequest,
    ) -> R<pb::ReadStreamResponse> {
        let p = self.process(&r.container_id, &r.exec_id)?;
        let c = p.io.read_stderr(read_at(&r), read_len(r.max_len)).await;
        chunk_reply(c)
    }

    async fn resize_tty(&self, _: &TtrpcContext, r: pb::ResizeTtyRequest) -> R<pb::Empty> {
        let p = self.process(&r.container_id, &r.exec_id)?;
        let (rows, cols) = (u16::try_from(r.rows), u16::try_from(r.cols));
        let (Ok(rows), Ok(cols)) = (rows, cols) else {
            return Err(status(AgentError::InvalidArgument(format!(
                "tty size {}x{}",
                r.rows, r.cols
            ))));
        };
        p.io.resize(rows, cols).map_err(|e| status(e.into()))?;
        Ok(pb::Empty::new())
    }

    async fn list_processes(
        &self,
        _: &TtrpcContext,
        r: pb::ListProcessesRequest,
    ) -> R<pb::ListProcessesResponse> {
        let procs = stats::do_list_processes(&self.agent, &r.container_id).map_err(status)?;
        let processes = procs
            .into_iter()
            .map(|(pid, cmdline)| pb::ProcessInfo {
                pid: pid as u32,
                cmdline,
                ..Default::default()
            })
            .collect();
        Ok(pb::ListProcessesResponse {
            processes,
            ..Default::default()
        })
    }

    async fn container_stats(
        &self,
        _: &TtrpcContext,
        r: pb::ContainerStatsRequest,
    ) -> R<pb::ContainerStatsResponse> {
        let (s, layer) = stats::do_stats(&self.agent, &r.container_id)
            .await
            .map_err(status)?;
        Ok(convert::stats(&s, layer))
    }

    async fn sandbox_stats(
        &self,
        _: &TtrpcContext,
        r: pb::SandboxStatsRequest,
    ) -> R<pb::SandboxStatsResponse> {
        let (s, ifs) = stats::do_sandbox_stats(&self.agent, &r.sandbox_id).map_err(status)?;
        let interfaces = ifs
            .into_iter()
            .map(|i| pb::InterfaceStats {
                name: i.name,
                rx_bytes: i.rx_bytes,
                rx_errors: i.rx_errors,
                tx_bytes: i.tx_bytes,
                tx_errors: i.tx_errors,
                rx_packets: i.rx_packets,
                rx_dropped: i.rx_dropped,
                tx_packets: i.tx_packets,
                tx_dropped: i.tx_dropped,
                ..Default::default()
            })
            .collect();
        Ok(pb::SandboxStatsResponse {
            cgroup: Some(convert::stats(&s, None)).into(),
            interfaces,
            ..Default::default()
        })
    }

    async fn update_resources(
        &self,
        _: &TtrpcContext,
        r: pb::UpdateResourcesRequest,
    ) -> R<pb::Empty> {
        tracing::info!(container = %r.container_id, "UpdateResources");
        stats::do_update(&self.agent, &r.container_id, &r.resources).map_err(status)?;
        Ok(pb::Empty::new())
    }

    async fn get_oom_event(&self, _: &TtrpcContext, _: pb::GetOomEventRequest) -> R<pb::OomEvent> {
        let id = self.agent.oom.next().await;
        Ok(pb::OomEvent {
            container_id: id,
            ..Default::default()
        })
    }
}

/// A stream read as ReadStdout/ReadStderr answer it.
fn chunk_reply(c: std::result::Result<Chunk, StdioError>) -> R<pb::ReadStreamResponse> {
    let c = c.map_err(|e| status(e.into()))?;
    Ok(pb::ReadStreamResponse {
        data: c.data,
        eof: c.eof,
        offset: c.offset,
        ..Default::default()
    })
}

impl AgentService {
    /// Whether the container's cgroup counted an OOM kill (read now, after
    /// its init exited; the kernel counts the kill before sending SIGKILL).
    fn oom_killed(&self, container_id: &str) -> bool {
        match self.agent.container(container_id) {
            Ok(c) => {
                self.agent.refresh_oom(&c);
                c.oom_killed()
            }
            Err(_) => false,
        }
    }

    fn process(&self, container_id: &str, exec_id: &str) -> R<Arc<crate::container::Process>> {
        self.agent
            .container(container_id)
            .and_then(|c| c.process(exec_id))
            .map_err(status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        assert_eq!(code(&AgentError::NotFound("x".into())), Code::NOT_FOUND);
        assert_eq!(
            code(&AgentError::AlreadyExists("x".into())),
            Code::ALREADY_EXISTS
        );
        assert_eq!(
            code(&AgentError::Spawn(SpawnError::Invalid("x".into()))),
            Code::INVALID_ARGUMENT
        );
        assert_eq!(
            code(&AgentError::Cgroup(CgroupError::Invalid("x".into()))),
            Code::INVALID_ARGUMENT
        );
        assert_eq!(
            code(&AgentError::Stdio(StdioError::NoStdin)),
            Code::FAILED_PRECONDITION
        );
        assert_eq!(code(&AgentError::Spawn(SpawnError::Died)), Code::INTERNAL);
        assert_eq!(
            code(&AgentError::Stdio(StdioError::Gone { offset: 1, held: 2 })),
            Code::OUT_OF_RANGE
        );
        assert_eq!(
            code(&AgentError::Stdio(StdioError::BadOffset("x".into()))),
            Code::INVALID_ARGUMENT
        );
        assert_eq!(
            code(&AgentError::Stdio(StdioError::Unacknowledged(1))),
            Code::RESOURCE_EXHAUSTED
        );
    }
}

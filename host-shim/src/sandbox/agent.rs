//! huskd's side of the agent API: the generated ttrpc client with deadlines
//! and errors sorted into what the callers act on (an answer with a code, a
//! deadline, or a connection that is gone).

use std::path::Path;
use std::time::Duration;

use husk_proto::agent as pb;
use protobuf::MessageField;
use ttrpc::context;

/// Deadline of ordinary agent RPCs.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(30);
/// Deadline of one long-poll round (reads, waits); callers loop.
pub const POLL_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, thiserror::Error)]
pub enum AgentError {
    /// The agent answered with a non-OK status.
    #[error("agent: {message}")]
    Rpc { code: ttrpc::Code, message: String },
    /// The deadline passed without an answer.
    #[error("agent did not answer in time")]
    Timeout,
    /// The connection could not be made or broke (agent gone?).
    #[error("agent connection: {0}")]
    Transport(String),
    /// The agent answered something that does not decode (a string field that
    /// is not UTF-8, a truncated message): the guest is broken or hostile.
    #[error("agent sent a malformed reply: {0}")]
    BadReply(String),
}

impl AgentError {
    pub fn is_code(&self, code: ttrpc::Code) -> bool {
        matches!(self, AgentError::Rpc { code: c, .. } if *c == code)
    }
}

impl From<ttrpc::Error> for AgentError {
    fn from(e: ttrpc::Error) -> Self {
        match e {
            ttrpc::Error::RpcStatus(s) if s.code() == ttrpc::Code::DEADLINE_EXCEEDED => {
                AgentError::Timeout
            }
            // ttrpc refuses a reply over `MESSAGE_LENGTH_MAX` (4 MiB) with a
            // status of its own: the agent's fault, not the caller's argument.
            ttrpc::Error::RpcStatus(s)
                if s.code() == ttrpc::Code::INVALID_ARGUMENT
                    && s.message().contains("exceed maximum message size") =>
            {
                AgentError::BadReply(s.message().to_string())
            }
            ttrpc::Error::RpcStatus(s) => AgentError::Rpc {
                code: s.code(),
                message: s.message().to_string(),
            },
            ttrpc::Error::Others(m) if m.contains("deadline") => AgentError::Timeout,
            // ttrpc's words for a reply (envelope or payload) that does not decode.
            ttrpc::Error::Others(m) if m.starts_with("Unpack") => AgentError::BadReply(m),
            other => AgentError::Transport(other.to_string()),
        }
    }
}

type Result<T> = std::result::Result<T, AgentError>;

fn ctx(d: Duration) -> context::Context {
    context::with_timeout(d.as_nanos() as i64)
}

/// A connected agent. Cheap to clone (one multiplexed connection).
#[derive(Clone)]
pub struct Agent {
    client: pb::AgentClient,
}

impl Agent {
    pub async fn connect(socket: &Path) -> Result<Self> {
        let c = ttrpc::r#async::Client::connect(&format!("unix://{}", socket.display())).await?;
        Ok(Self {
            client: pb::AgentClient::new(c),
        })
    }

    /// An agent over an already connected stream (e.g. a hybrid-vsock
    /// connection after its `CONNECT`/`OK` handshake).
    pub fn over(stream: tokio::net::UnixStream) -> Self {
        let c = ttrpc::r#async::Client::new(ttrpc::r#async::transport::Socket::from(stream));
        Self {
            client: pb::AgentClient::new(c),
        }
    }

    /// Asks the agent to stop (a guest agent powers the VM off).
    pub async fn shutdown(&self, timeout: Duration) -> Result<()> {
        self.client
            .shutdown(ctx(timeout), &pb::Empty::new())
            .await?;
        Ok(())
    }

    pub async fn check(&self, timeout: Duration) -> Result<pb::CheckResponse> {
        Ok(self
            .client
            .check(ctx(timeout), &pb::CheckRequest::new())
            .await?)
    }

    /// The guest's interfaces and routes (VM pods with a CNI network).
    pub async fn configure_network(
        &self,
        req: pb::ConfigureNetworkRequest,
        timeout: Duration,
    ) -> Result<()> {
        self.client.configure_network(ctx(timeout), &req).await?;
        Ok(())
    }

    pub async fn create_sandbox(
        &self,
        req: pb::CreateSandboxRequest,
        timeout: Duration,
    ) -> Result<pb::CreateSandboxResponse> {
        Ok(self.client.create_sandbox(ctx(timeout), &req).await?)
    }

    /// A pooled VM's rehearsal of a pod start (`spec`: a default container's OCI spec);
    /// the guest's time for it.
    pub async fn rehearse(&self, spec: Vec<u8>, timeout: Duration) -> Result<Duration> {
        let req = pb::RehearseRequest {
            oci_spec: spec,
            ..Default::default()
        };
        let r = self.client.rehearse(ctx(timeout), &req).await?;
        Ok(Duration::from_millis(u64::from(r.elapsed_ms)))
    }

    pub async fn destroy_sandbox(&self, id: &str) -> Result<()> {
        let req = pb::DestroySandboxRequest {
            sandbox_id: id.into(),
            ..Default::default()
        };
        self.client.destroy_sandbox(ctx(RPC_TIMEOUT), &req).await?;
        Ok(())
    }

    pub async fn create_container(
        &self,
        id: &str,
        spec: Vec<u8>,
        rootfs: pb::Rootfs,
        stdin: bool,
        tty: bool,
    ) -> Result<pb::CreateContainerResponse> {
        let req = pb::CreateContainerRequest {
            container_id: id.into(),
            oci_spec: spec,
            rootfs: MessageField::some(rootfs),
            stdio: MessageField::some(pb::StdioConfig {
                stdin,
                tty,
                ..Default::default()
            }),
            ..Default::default()
        };
        Ok(self.client.create_container(ctx(RPC_TIMEOUT), &req).await?)
    }

    pub async fn start_container(&self, id: &str) -> Result<()> {
        let req = pb::StartContainerRequest {
            container_id: id.into(),
            ..Default::default()
        };
        self.client.start_container(ctx(RPC_TIMEOUT), &req).await?;
        Ok(())
    }

    pub async fn remove_container(&self, id: &str, force: bool) -> Result<()> {
        let req = pb::RemoveContainerRequest {
            container_id: id.into(),
            force,
            ..Default::default()
        };
        self.client.remove_container(ctx(RPC_TIMEOUT), &req).await?;
        Ok(())
    }

    pub async fn list_containers(&self) -> Result<Vec<pb::ContainerStateResponse>> {
        Ok(self
            .client
            .list_containers(ctx(RPC_TIMEOUT), &pb::ListContainersRequest::new())
            .await?
            .containers)
    }

    pub async fn exec(&self, id: &str, exec_id: &str, process: serde_json::Value) -> Result<u32> {
        let req = pb::ExecProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            process: serde_json::to_vec(&process).unwrap_or_default(),
            stdio: MessageField::some(pb::StdioConfig::default()),
            ..Default::default()
        };
        Ok(self.client.exec_process(ctx(RPC_TIMEOUT), &req).await?.pid)
    }

    /// Starts an exec'd process with the given stdio (stdin pipe, tty).
    pub async fn exec_stdio(
        &self,
        id: &str,
        exec_id: &str,
        process: serde_json::Value,
        stdin: bool,
        tty: bool,
    ) -> Result<u32> {
        let req = pb::ExecProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            process: serde_json::to_vec(&process).unwrap_or_default(),
            stdio: MessageField::some(pb::StdioConfig {
                stdin,
                tty,
                ..Default::default()
            }),
            ..Default::default()
        };
        Ok(self.client.exec_process(ctx(RPC_TIMEOUT), &req).await?.pid)
    }

    /// Writes all of `data` to the process's stdin.
    pub async fn write_stdin(&self, id: &str, exec_id: &str, data: Vec<u8>) -> Result<()> {
        let req = pb::WriteStdinRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            data,
            ..Default::default()
        };
        self.client.write_stdin(ctx(RPC_TIMEOUT), &req).await?;
        Ok(())
    }

    pub async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<()> {
        let req = pb::CloseStdinRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        self.client.close_stdin(ctx(RPC_TIMEOUT), &req).await?;
        Ok(())
    }

    pub async fn resize_tty(&self, id: &str, exec_id: &str, rows: u32, cols: u32) -> Result<()> {
        let req = pb::ResizeTtyRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            rows,
            cols,
            ..Default::default()
        };
        self.client.resize_tty(ctx(RPC_TIMEOUT), &req).await?;
        Ok(())
    }

    pub async fn remove_process(&self, id: &str, exec_id: &str) -> Result<()> {
        let req = pb::RemoveProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        self.client.remove_process(ctx(RPC_TIMEOUT), &req).await?;
        Ok(())
    }

    pub async fn signal(&self, id: &str, exec_id: &str, signal: i32, all: bool) -> Result<()> {
        let req = pb::SignalProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            signal: signal as u32,
            all,
            ..Default::default()
        };
        self.client.signal_process(ctx(RPC_TIMEOUT), &req).await?;
        Ok(())
    }

    /// One long-poll round: the exit, or [`AgentError::Timeout`].
    pub async fn wait(
        &self,
        id: &str,
        exec_id: &str,
        timeout: Duration,
    ) -> Result<pb::WaitProcessResponse> {
        let req = pb::WaitProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        Ok(self.client.wait_process(ctx(timeout), &req).await?)
    }

    /// One long-poll read of stdout (`stderr = false`) or stderr. `at`:
    /// (offset to read from, bytes durably consumed) for an acknowledged
    /// read; `None` consumes on read.
    pub async fn read(
        &self,
        id: &str,
        exec_id: &str,
        stderr: bool,
        at: Option<(u64, u64)>,
        timeout: Duration,
    ) -> Result<pb::ReadStreamResponse> {
        let req = pb::ReadStreamRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            offset: at.map(|a| a.0),
            consumed: at.map(|a| a.1).unwrap_or(0),
            ..Default::default()
        };
        Ok(if stderr {
            self.client.read_stderr(ctx(timeout), &req).await?
        } else {
            self.client.read_stdout(ctx(timeout), &req).await?
        })
    }

    /// The container's cgroup and writable layer readings, within `deadline`
    /// (enforced here too, whatever the transport does).
    pub async fn container_stats(
        &self,
        id: &str,
        deadline: Duration,
    ) -> Result<pb::ContainerStatsResponse> {
        let req = pb::ContainerStatsRequest {
            container_id: id.into(),
            ..Default::default()
        };
        match tokio::time::timeout(deadline, self.client.container_stats(ctx(deadline), &req)).await
        {
            Ok(r) => Ok(r?),
            Err(_) => Err(AgentError::Timeout),
        }
    }

    /// The pod cgroup and interfaces, within `deadline`.
    pub async fn sandbox_stats(
        &self,
        id: &str,
        deadline: Duration,
    ) -> Result<pb::SandboxStatsResponse> {
        let req = pb::SandboxStatsRequest {
            sandbox_id: id.into(),
            ..Default::default()
        };
        match tokio::time::timeout(deadline, self.client.sandbox_stats(ctx(deadline), &req)).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(AgentError::Timeout),
        }
    }

    pub async fn update_resources(&self, id: &str, resources: Vec<u8>) -> Result<()> {
        let req = pb::UpdateResourcesRequest {
            container_id: id.into(),
            resources,
            ..Default::default()
        };
        self.client.update_resources(ctx(RPC_TIMEOUT), &req).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A hostile agent: answers the first request with `reply(stream_id)`, raw bytes.
    async fn hostile(
        reply: impl Fn(u32) -> Vec<u8> + Send + 'static,
    ) -> (Agent, tempfile::TempDir) {
        let d = tempfile::tempdir().unwrap();
        let sock = d.path().join("agent.sock");
        let l = tokio::net::UnixListener::bind(&sock).unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut h = [0u8; 10];
            s.read_exact(&mut h).await.unwrap();
            let len = u32::from_be_bytes(h[0..4].try_into().unwrap()) as usize;
            let id = u32::from_be_bytes(h[4..8].try_into().unwrap());
            let mut body = vec![0u8; len];
            s.read_exact(&mut body).await.unwrap();
            s.write_all(&reply(id)).await.unwrap();
            // Keep the connection open: the client must not wait for more.
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        (Agent::connect(&sock).await.unwrap(), d)
    }

    /// A ttrpc frame: header (length, stream id, type, flags) and payload.
    fn frame(id: u32, len: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = len.to_be_bytes().to_vec();
        f.extend_from_slice(&id.to_be_bytes());
        f.extend_from_slice(&[2, 0]); // MESSAGE_TYPE_RESPONSE, no flags
        f.extend_from_slice(payload);
        f
    }

    /// A length-delimited protobuf field.
    fn field(n: u8, data: &[u8]) -> Vec<u8> {
        assert!(data.len() < 128);
        let mut f = vec![(n << 3) | 2, data.len() as u8];
        f.extend_from_slice(data);
        f
    }

    #[tokio::test]
    async fn non_utf8_strings_in_a_reply_are_a_bad_reply() {
        let (agent, _d) = hostile(|id| {
            // Response { payload: CheckResponse { version: b"\xff\xfe" } }
            let resp = field(2, &field(1, b"v\xff\xfe"));
            frame(id, resp.len() as u32, &resp)
        })
        .await;
        let e = agent.check(Duration::from_secs(5)).await.unwrap_err();
        // (Its gRPC code, Unavailable, is checked in cri/error.rs.)
        assert!(matches!(e, AgentError::BadReply(_)), "{e:?}");
    }

    #[tokio::test]
    async fn oversized_replies_are_refused_without_buffering_them() {
        // Claims 1 GiB (ttrpc reads at most MESSAGE_LENGTH_MAX = 4 MiB per
        // message and discards the rest page by page), then sends 8 MiB.
        let (agent, _d) = hostile(|id| frame(id, 1 << 30, &vec![0u8; 8 << 20])).await;
        let e = agent.check(Duration::from_secs(3)).await.unwrap_err();
        // The body never ends: the call ends at its deadline, nothing buffered.
        assert!(matches!(e, AgentError::Timeout), "{e:?}");
        let (agent, _d) = hostile(|id| frame(id, (8 << 20) as u32, &vec![0u8; 8 << 20])).await;
        let e = agent.check(Duration::from_secs(5)).await.unwrap_err();
        assert!(matches!(e, AgentError::BadReply(_)), "{e:?}");
    }
}

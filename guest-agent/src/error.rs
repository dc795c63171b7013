//! The agent's domain error (one enum; its ttrpc code is chosen in `rpc.rs`).

use crate::cgroup::CgroupError;
use crate::container::spawn::SpawnError;
use crate::container::stdio::StdioError;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    AlreadyExists(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    #[error("cgroup: {0}")]
    Cgroup(#[from] CgroupError),
    #[error("runner: {0}")]
    Spawn(#[from] SpawnError),
    #[error("stdio: {0}")]
    Stdio(#[from] StdioError),
    #[error("network: {0}")]
    Net(#[from] crate::network::NetError),
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    #[error("{0}: {1}")]
    Os(&'static str, #[source] nix::Error),
}

pub type Result<T> = std::result::Result<T, AgentError>;

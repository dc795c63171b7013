//! The pod machinery's error, below the pod machinery: the sandbox kinds and
//! `vm/` return it too. Leaf errors (network, store, agent) convert into it here;
//! its gRPC code is chosen in `cri/error.rs`.

use super::agent::AgentError;
use crate::network::NetworkError;
use crate::network::cni::CniError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    DeadlineExceeded(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    Internal(String),
    #[error("state store: {0}")]
    Store(#[from] StoreError),
}

impl RuntimeError {
    /// An agent failure in the context of `what`.
    pub fn agent(what: &str, e: AgentError) -> Self {
        let msg = format!("{what}: {e}");
        match e {
            AgentError::Rpc { code, .. } => match code {
                ttrpc::Code::NOT_FOUND => RuntimeError::NotFound(msg),
                ttrpc::Code::ALREADY_EXISTS => RuntimeError::AlreadyExists(msg),
                ttrpc::Code::INVALID_ARGUMENT => RuntimeError::InvalidArgument(msg),
                ttrpc::Code::FAILED_PRECONDITION => RuntimeError::FailedPrecondition(msg),
                ttrpc::Code::DEADLINE_EXCEEDED => RuntimeError::DeadlineExceeded(msg),
                _ => RuntimeError::Internal(msg),
            },
            AgentError::Timeout => RuntimeError::DeadlineExceeded(msg),
            AgentError::Transport(_) | AgentError::BadReply(_) => RuntimeError::Unavailable(msg),
        }
    }
}

pub type Result<T> = std::result::Result<T, RuntimeError>;

impl From<NetworkError> for RuntimeError {
    fn from(e: NetworkError) -> Self {
        match e {
            NetworkError::Cni(CniError::PluginNotFound { .. } | CniError::BadConfig { .. }) => {
                RuntimeError::FailedPrecondition(e.to_string())
            }
            NetworkError::BadCidr(_) => RuntimeError::InvalidArgument(e.to_string()),
            e => RuntimeError::Internal(e.to_string()),
        }
    }
}

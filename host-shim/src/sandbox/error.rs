//! The pod machinery's error, below the pod machinery: the sandbox kinds and
//! `vm/` return it too. Two sorts of variants:
//! - what is wrong with the request (a missing or existing object, a bad argument, a state or
//!   node that does not allow it, its own deadline, a node limit), with a message for the caller;
//! - what failed on the node, typed, with its cause kept as the source (I/O with the operation
//!   and path, the agent, the VM, the network, the image, the state store, the OCI spec...).
//!
//! Its gRPC code is chosen from the variant (and the cause's) in `cri/error.rs`, nowhere else.

use std::path::PathBuf;

use super::agent::AgentError;
use super::share::ShareError;
use super::vm::VmError;
use crate::image::ImageError;
use crate::network::NetworkError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// A pod, container or image the request names does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A pod or container the request would create exists already.
    #[error("{0}")]
    AlreadyExists(String),
    /// The request is malformed or asks for what huskd refuses.
    #[error("{0}")]
    InvalidArgument(String),
    /// The pod, container or handler is not in a state that allows the request (not running,
    /// no agent, a VM handler missing its binaries or KVM...).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The request's own time limit passed (an exec's or a stop's timeout).
    #[error("{0}")]
    DeadlineExceeded(String),
    /// The pod's agent failed a call (its code, a timeout, the connection).
    #[error("{what}: {source}")]
    Agent {
        what: &'static str,
        #[source]
        source: AgentError,
    },
    /// The namespace sandbox's agent exited or did not answer while starting.
    #[error("husk-agent ({}) {failure}: {log}", binary.display())]
    AgentStart {
        binary: PathBuf,
        failure: AgentStartFailure,
        /// The last lines of its log.
        log: String,
    },
    /// The agent's port-forward endpoint of a namespace pod cannot be dialled.
    #[error("agent port-forward endpoint {}: {source}", path.display())]
    ForwardDial {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file operation on the node.
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A process could not be started.
    #[error("spawn {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    /// A host call (`gethostname`, reading huskd's own capabilities...).
    #[error("{what}: {source}")]
    Host {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the node's hostname is not UTF-8")]
    HostnameNotUtf8,
    /// A blocking task panicked or was cancelled.
    #[error("{what}: {source}")]
    Task {
        what: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
    /// The OCI spec (or part of it) cannot be built or encoded.
    #[error("{what}: {source}")]
    OciSpec {
        what: &'static str,
        #[source]
        source: oci_spec::OciSpecError,
    },
    #[error("{what}: {source}")]
    Json {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    /// An image a pod needs (its config, its block image).
    #[error("{what}: {source}")]
    Image {
        what: &'static str,
        #[source]
        source: ImageError,
    },
    /// Boxed: a boot failure carries the logs' tails.
    #[error("{0}")]
    Vm(#[source] Box<VmError>),
    #[error("{0}")]
    Network(#[from] NetworkError),
    #[error("{0}")]
    Share(#[from] ShareError),
    #[error("state store: {0}")]
    Store(#[from] StoreError),
}

/// How a starting namespace agent failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AgentStartFailure {
    #[error("exited during start")]
    Exited,
    #[error("did not come up in time")]
    Timeout,
}

impl RuntimeError {
    /// An agent failure in the context of `what`.
    pub fn agent(what: &'static str, source: AgentError) -> Self {
        RuntimeError::Agent { what, source }
    }

    /// A file operation `op` on `path` failed.
    pub fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| RuntimeError::Io { op, path, source }
    }
}

impl From<VmError> for RuntimeError {
    fn from(e: VmError) -> Self {
        RuntimeError::Vm(Box::new(e))
    }
}

pub type Result<T> = std::result::Result<T, RuntimeError>;

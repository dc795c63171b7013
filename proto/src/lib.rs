//! husk's wire contracts.
//!
//! - [`cri`]: Kubernetes CRI `runtime.v1` (from the `k8s-cri` crate).
//! - [`husk`]: husk's own host gRPC service (pull progress), served beside the CRI.
//! - [`agent`]: the husk-agent ttrpc API.
//! - [`caps`]: the capability table both sides use.

pub mod caps;

/// `process.user.gid` of an OCI spec sent to husk-agent when the CRI names no group
/// (no `run_as_group`, no group in the image's `User`): the agent takes the primary
/// group of the user from the container's /etc/passwd (0 when the uid has no entry),
/// as containerd does. `(gid_t)-1` is "no group" in the kernel ABI (setresgid,
/// chown), so it can never be a real group; huskd refuses it as a `run_as_group`.
pub const GID_FROM_PASSWD: u32 = u32::MAX;

/// husk-ns: the name, in the pod's run dir on the host and in the agent's state dir, of
/// the shared directory through which bidirectional volumes reach the agent (the agent's
/// copy is a peer of huskd's, so mounts below it travel both ways).
pub const PROPAGATION_DIR: &str = "propagation";

#[cfg(feature = "cri")]
pub use k8s_cri::v1 as cri;

#[cfg(feature = "cri")]
#[allow(clippy::all, clippy::unwrap_used)]
pub mod husk {
    tonic::include_proto!("husk.v1");
}

#[cfg(feature = "agent")]
#[allow(clippy::all, clippy::unwrap_used, unused_qualifications)]
mod generated {
    include!(concat!(env!("OUT_DIR"), "/ttrpc/mod.rs"));
}

#[cfg(feature = "agent")]
pub mod agent {
    //! ttrpc messages and the async client/server for `husk.agent.v1.Agent`.
    pub use crate::generated::agent::*;
    pub use crate::generated::agent_ttrpc::*;
}

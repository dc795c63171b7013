//! husk's wire contracts.
//!
//! - [`cri`]: Kubernetes CRI `runtime.v1` (from the `k8s-cri` crate).
//! - [`husk`]: husk's own host gRPC service (pull progress), served beside the CRI.
//! - [`agent`]: the husk-agent ttrpc API.

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

//! husk-agent: runs containers for one sandbox, driven by huskd over ttrpc.
//!
//! - [`rpc`]: the ttrpc service (thin handlers, error mapping).
//! - [`agent`]: the state holder; [`error`]: the domain error; [`sandbox`], [`container`]: operations.
//! - [`runner`]: the code of the `husk-agent __init` process that sets up a container.
//! - [`reaper`], [`init`]: PID-1 duties. [`cgroup`]: v1 and v2. [`syscall`]: the test seam.

pub mod agent;
pub mod cgroup;
pub mod container;
pub mod convert;
pub mod error;
pub mod forward;
pub mod init;
pub mod network;
pub mod oom;
pub mod reaper;
pub mod rpc;
pub mod runner;
pub mod sandbox;
pub mod server;
pub mod sync;
pub mod syscall;

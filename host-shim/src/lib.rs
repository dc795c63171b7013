//! huskd and the husk CLI.

pub mod cli;
pub mod client;
pub mod config;
pub mod cri;
#[doc(hidden)]
pub mod fuzzing;
pub mod image;
pub mod logfmt;
pub mod memory;
pub mod metrics;
pub mod network;
pub mod sandbox;
pub mod store;
pub mod streaming;

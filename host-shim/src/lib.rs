//! huskd and the husk CLI.

pub mod config;
pub mod cri;
pub mod image;
pub mod client;
pub mod cli;

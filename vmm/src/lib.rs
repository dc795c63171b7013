//! husk-vmm: a small KVM virtual machine monitor, one process per VM.

pub mod api;
pub mod boot;
pub mod config;
pub mod confine;
pub mod device_manager;
pub mod devices;
#[doc(hidden)]
pub mod fuzzing;
pub mod jail;
pub mod logwriter;
pub mod seccomp;
pub mod vmm;
pub mod vstate;

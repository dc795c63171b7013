//! The husk-vmm backend (handler `husk`): our own VMM on hardware KVM, serving the
//! hybrid-vsock socket itself; `vmmctl.rs` talks to its control socket (disk slots).

pub mod vmmctl;

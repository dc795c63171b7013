//! SPDY/3.1, as the Kubernetes streaming protocols use it: the frame layer
//! ([`frame`]) and a multiplexed connection ([`conn`]).

pub mod conn;
pub mod frame;

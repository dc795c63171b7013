//! huskd's streaming server: Exec, Attach and PortForward over SPDY/3.1 and
//! WebSocket, the way kubelet, kubectl and crictl speak them.

pub mod spdy;

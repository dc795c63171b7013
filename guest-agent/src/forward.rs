//! The port-forward endpoint: huskd connects (unix socket next to the
//! agent's for the namespace sandbox, vsock port [`VSOCK_PORT`] in a guest),
//! sends `FORWARD <port>\n`, gets `OK\n` or `ERR <message>\n`, and then the
//! connection carries raw bytes to localhost:<port> in the pod's network
//! namespace. The TCP socket is made by a short-lived thread that joined
//! the pod's network namespace (a socket keeps the namespace it was made in).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::agent::Agent;
use crate::runner::config::Ns;

/// vsock port of the forward endpoint in a guest.
pub const VSOCK_PORT: u32 = 1025;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForwardListen {
    Unix(PathBuf),
    Vsock(u32),
}

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("bad forward listen address {0:?} (want unix:PATH or vsock:PORT)")]
    Address(String),
    #[error("forward listener: {0}")]
    Io(#[from] std::io::Error),
}

impl std::str::FromStr for ForwardListen {
    type Err = ForwardError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(p) = s.strip_prefix("unix:").filter(|p| !p.is_empty()) {
            return Ok(ForwardListen::Unix(p.trim_start_matches("//").into()));
        }
        if let Some(p) = s.strip_prefix("vsock:") {
            return p
                .parse()
                .map(ForwardListen::Vsock)
                .map_err(|_| ForwardError::Address(s.into()));
        }
        Err(ForwardError::Address(s.into()))
    }
}

/// Binds `listen` and serves forward requests in the background.
pub fn serve(agent: Arc<Agent>, listen: &ForwardListen) -> Result<(), ForwardError> {
    match listen {
        ForwardListen::Unix(p) => {
            let _ = std::fs::remove_file(p);
            let l = tokio::net::UnixListener::bind(p)?;
            tokio::spawn(async move {
                loop {
                    match l.accept().await {
                        Ok((s, _)) => {
                            tokio::spawn(handle(agent.clone(), s));
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "forward accept");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            });
        }
        ForwardListen::Vsock(port) => {
            use nix::sys::socket::{
                AddressFamily, SockFlag, SockType, VsockAddr, bind, listen, socket,
            };
            let fd = socket(
                AddressFamily::Vsock,
                SockType::Stream,
                SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
                None,
            )
            .map_err(std::io::Error::from)?;
            bind(fd.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, *port))
                .map_err(std::io::Error::from)?;
            listen(
                &fd,
                nix::sys::socket::Backlog::new(64).map_err(std::io::Error::from)?,
            )
            .map_err(std::io::Error::from)?;
            // SAFETY: `fd` is a listening socket we own; AsyncFd takes it over.
            let afd = unsafe { tokio::io::unix::AsyncFd::register(fd) }
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            tokio::spawn(async move {
                loop {
                    let accepted = match afd.readable().await {
                        Ok(mut g) => match g.try_io(|f| {
                            nix::sys::socket::accept4(
                                f.as_raw_fd(),
                                SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
                            )
                            .map_err(std::io::Error::from)
                        }) {
                            Ok(r) => r,
                            Err(_would_block) => continue,
                        },
                        Err(e) => Err(e),
                    };
                    match accepted {
                        Ok(raw) => {
                            // SAFETY: accept4 returned a fresh fd that nothing else owns.
                            let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                            // A connected stream socket: read/write work the same as on a unix one.
                            let std = std::os::unix::net::UnixStream::from(owned);
                            match tokio::net::UnixStream::from_std(std) {
                                Ok(s) => {
                                    tokio::spawn(handle(agent.clone(), s));
                                }
                                Err(e) => {
                                    tracing::warn!(error = %e, "forward: wrap vsock connection")
                                }
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "forward vsock accept");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            });
        }
    }
    Ok(())
}

/// Reads the request line (at most 64 bytes).
async fn request_port<S: AsyncRead + Unpin>(s: &mut S) -> Result<u16, String> {
    let mut line = Vec::with_capacity(32);
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b).await {
            Ok(0) => return Err("connection closed before the request".into()),
            Ok(_) if b[0] == b'\n' => break,
            Ok(_) => line.push(b[0]),
            Err(e) => return Err(e.to_string()),
        }
        if line.len() > 64 {
            return Err("request line too long".into());
        }
    }
    let line = String::from_utf8_lossy(&line);
    let port = line
        .strip_prefix("FORWARD ")
        .ok_or_else(|| format!("bad request {line:?} (want FORWARD <port>)"))?;
    match port.trim().parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!("bad port {port:?}")),
    }
}

async fn handle<S: AsyncRead + AsyncWrite + Unpin>(agent: Arc<Agent>, mut s: S) {
    let port = match tokio::time::timeout(Duration::from_secs(10), request_port(&mut s)).await {
        Ok(Ok(p)) => p,
        Ok(Err(m)) => {
            let _ = s.write_all(format!("ERR {m}\n").as_bytes()).await;
            return;
        }
        Err(_) => return,
    };
    let tcp = match connect(&agent, port).await {
        Ok(t) => t,
        Err(m) => {
            tracing::debug!(port, error = %m, "forward connect");
            let _ = s.write_all(format!("ERR {m}\n").as_bytes()).await;
            return;
        }
    };
    if s.write_all(b"OK\n").await.is_err() {
        return;
    }
    let mut tcp = tcp;
    let _ = tokio::io::copy_bidirectional(&mut s, &mut tcp).await;
}

/// Connects to localhost:`port` inside the sandbox's network namespace.
async fn connect(agent: &Agent, port: u16) -> Result<tokio::net::TcpStream, String> {
    let sandbox = agent.sandbox().map_err(|e| e.to_string())?;
    let netns = sandbox.ns_path(Ns::Net);
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("forward-connect".into())
        .spawn(move || {
            let r = (|| -> Result<TcpStream, String> {
                let f = std::fs::File::open(&netns)
                    .map_err(|e| format!("open {}: {e}", netns.display()))?;
                nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| format!("join the pod network namespace: {e}"))?;
                let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
                match TcpStream::connect_timeout(&v4, CONNECT_TIMEOUT) {
                    Ok(s) => Ok(s),
                    Err(e4) => TcpStream::connect_timeout(
                        &SocketAddr::from((Ipv6Addr::LOCALHOST, port)),
                        CONNECT_TIMEOUT,
                    )
                    .map_err(|_| format!("dial tcp 127.0.0.1:{port}: {e4}")),
                }
            })();
            let _ = tx.send(r);
        })
        .map_err(|e| format!("spawn: {e}"))?;
    let std = rx.await.map_err(|_| "connect thread died".to_string())??;
    std.set_nonblocking(true).map_err(|e| e.to_string())?;
    let _ = std.set_nodelay(true);
    tokio::net::TcpStream::from_std(std).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_listen() {
        assert_eq!(
            "unix:/a/f.sock".parse::<ForwardListen>().expect("unix"),
            ForwardListen::Unix("/a/f.sock".into())
        );
        assert_eq!(
            "vsock:1025".parse::<ForwardListen>().expect("vsock"),
            ForwardListen::Vsock(1025)
        );
        assert!("tcp:1".parse::<ForwardListen>().is_err());
    }

    #[tokio::test]
    async fn request_lines() {
        let mut ok: &[u8] = b"FORWARD 8080\n";
        assert_eq!(request_port(&mut ok).await, Ok(8080));
        for bad in [
            &b"FORWARD 0\n"[..],
            b"FORWARD x\n",
            b"GET / HTTP/1.1\n",
            b"FORWARD 70000\n",
            b"FORWARD 1",
        ] {
            let mut b = bad;
            assert!(request_port(&mut b).await.is_err(), "{bad:?}");
        }
        let long = [b'A'; 100];
        assert!(request_port(&mut &long[..]).await.is_err());
    }
}

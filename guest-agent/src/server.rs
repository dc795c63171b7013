//! Listening addresses and the ttrpc server.

use std::path::PathBuf;
use std::sync::Arc;

use crate::agent::Agent;
use crate::rpc::AgentService;

/// vsock port huskd dials in a guest.
pub const VSOCK_PORT: u32 = 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Unix(PathBuf),
    Vsock(u32),
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("bad listen address {0:?} (want unix:PATH or vsock:PORT)")]
    Address(String),
    #[error("ttrpc: {0}")]
    Ttrpc(#[from] ttrpc::Error),
    #[error("remove stale socket {0}: {1}")]
    Stale(String, #[source] std::io::Error),
}

impl std::str::FromStr for Listen {
    type Err = ServerError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(p) = s
            .strip_prefix("unix://")
            .or_else(|| s.strip_prefix("unix:"))
        {
            if p.is_empty() {
                return Err(ServerError::Address(s.into()));
            }
            return Ok(Listen::Unix(PathBuf::from(p)));
        }
        if let Some(port) = s
            .strip_prefix("vsock://")
            .or_else(|| s.strip_prefix("vsock:"))
        {
            let port = port.rsplit(':').next().unwrap_or(port);
            return port
                .parse()
                .map(Listen::Vsock)
                .map_err(|_| ServerError::Address(s.into()));
        }
        Err(ServerError::Address(s.into()))
    }
}

impl Listen {
    fn ttrpc_address(&self) -> String {
        match self {
            Listen::Unix(p) => format!("unix://{}", p.display()),
            Listen::Vsock(port) => format!("vsock://-1:{port}"),
        }
    }
}

/// Bind and start serving; returns the running server.
pub async fn serve(
    agent: Arc<Agent>,
    listen: &Listen,
) -> Result<ttrpc::r#async::Server, ServerError> {
    if let Listen::Unix(p) = listen {
        match std::fs::remove_file(p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(ServerError::Stale(p.display().to_string(), e)),
        }
        if let Some(dir) = p.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
    }
    let service = husk_proto::agent::create_agent(Arc::new(AgentService { agent }));
    let mut server = ttrpc::r#async::Server::new()
        .bind(&listen.ttrpc_address())?
        .register_service(service);
    server.start().await?;
    Ok(server)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses() {
        assert_eq!(
            "unix:/run/a.sock".parse::<Listen>().expect("unix"),
            Listen::Unix("/run/a.sock".into())
        );
        assert_eq!(
            "unix:///run/a.sock".parse::<Listen>().expect("unix"),
            Listen::Unix("/run/a.sock".into())
        );
        assert_eq!(
            "vsock:1024".parse::<Listen>().expect("vsock"),
            Listen::Vsock(1024)
        );
        assert_eq!(
            "vsock://-1:1024".parse::<Listen>().expect("vsock"),
            Listen::Vsock(1024)
        );
        assert!("tcp:1".parse::<Listen>().is_err());
        assert!("unix:".parse::<Listen>().is_err());
    }
}

//! huskd's streaming server: Exec, Attach and PortForward over SPDY/3.1 and
//! WebSocket, the way kubelet, kubectl and crictl speak them.
//!
//! The CRI RPCs validate the request and hand out a one-time URL
//! (`http://ADDR/{exec,attach,portforward}/TOKEN`); the token expires after
//! `[streaming] token_ttl_secs` and is consumed by the first request that
//! uses it (an unknown, expired or reused token gets 404).

pub mod channels;
pub mod client;
mod exec;
mod http;
mod portforward;
pub mod protocol;
pub mod spdy;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;

pub use self::exec::{AttachParams, ExecParams};
use crate::config::StreamingConfig;
use crate::sandbox::Manager;

/// Most URLs outstanding at once.
const MAX_PENDING: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum StreamingError {
    #[error("streaming server address {0:?}: {1}")]
    Bind(String, #[source] std::io::Error),
    #[error("too many outstanding streaming requests")]
    TooMany,
}

/// A request waiting for its client.
#[derive(Debug, Clone)]
pub enum Pending {
    Exec(ExecParams),
    Attach(AttachParams),
    PortForward { pod_id: String, ports: Vec<u16> },
}

impl Pending {
    fn path(&self) -> &'static str {
        match self {
            Pending::Exec(_) => "exec",
            Pending::Attach(_) => "attach",
            Pending::PortForward { .. } => "portforward",
        }
    }
}

/// One-time tokens: each registered request gets a random token that is valid for `ttl` and
/// taken by the first request presenting it.
struct Tokens {
    ttl: Duration,
    pending: Mutex<HashMap<String, (Pending, Instant)>>,
}

impl Tokens {
    fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            pending: Mutex::new(HashMap::new()),
        }
    }

    /// Registers `p` at `now`; returns its token.
    fn issue(&self, p: Pending, now: Instant) -> Result<String, StreamingError> {
        let mut raw = [0u8; 24];
        rand::fill(&mut raw);
        let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
        let mut m = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        m.retain(|_, (_, exp)| *exp > now);
        if m.len() >= MAX_PENDING {
            return Err(StreamingError::TooMany);
        }
        m.insert(token.clone(), (p, now + self.ttl));
        Ok(token)
    }

    /// Takes the request of `token` if it exists, has not expired at `now` and is of `kind`;
    /// a token presented once is gone, whatever the answer.
    fn take(&self, kind: &str, token: &str, now: Instant) -> Option<Pending> {
        let mut m = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let (p, exp) = m.remove(token)?;
        if exp <= now || p.path() != kind {
            return None;
        }
        Some(p)
    }
}

pub struct StreamingServer {
    base: String,
    tokens: Tokens,
    runtime: Arc<Manager>,
}

impl StreamingServer {
    /// Binds `cfg.address` and serves in the background.
    pub async fn start(
        cfg: &StreamingConfig,
        runtime: Arc<Manager>,
    ) -> Result<Arc<Self>, StreamingError> {
        let listener = tokio::net::TcpListener::bind(&cfg.address)
            .await
            .map_err(|e| StreamingError::Bind(cfg.address.clone(), e))?;
        let addr: SocketAddr = listener
            .local_addr()
            .map_err(|e| StreamingError::Bind(cfg.address.clone(), e))?;
        let host = cfg.advertise.clone().unwrap_or_else(|| addr.to_string());
        let s = Arc::new(Self {
            base: format!("http://{host}"),
            tokens: Tokens::new(Duration::from_secs(cfg.token_ttl_secs.max(1))),
            runtime,
        });
        tracing::info!(%addr, "streaming server listening");
        tokio::spawn(http::serve(listener, s.clone()));
        Ok(s)
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// Registers `p` and returns its one-time URL.
    pub fn url(&self, p: Pending) -> Result<String, StreamingError> {
        let path = p.path();
        let token = self.tokens.issue(p, Instant::now())?;
        Ok(format!("{}/{path}/{token}", self.base))
    }

    /// Takes the request of `token` if it exists, has not expired and is of `kind`.
    fn consume(&self, kind: &str, token: &str) -> Option<Pending> {
        self.tokens.take(kind, token, Instant::now())
    }

    fn runtime(&self) -> &Arc<Manager> {
        &self.runtime
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pf() -> Pending {
        Pending::PortForward {
            pod_id: "p".into(),
            ports: vec![80],
        }
    }

    #[test]
    fn tokens_are_one_time_typed_and_expire() {
        let t = Tokens::new(Duration::from_secs(60));
        let t0 = Instant::now();
        let a = t.issue(pf(), t0).unwrap();
        let b = t.issue(pf(), t0).unwrap();
        assert_ne!(a, b);
        assert!(t.take("portforward", &a, t0).is_some());
        assert!(t.take("portforward", &a, t0).is_none(), "used once");
        assert!(t.take("exec", &b, t0).is_none(), "wrong kind");
        assert!(
            t.take("portforward", &b, t0).is_none(),
            "a wrong try consumes it"
        );
        assert!(t.take("portforward", "nope", t0).is_none());

        let c = t.issue(pf(), t0).unwrap();
        let d = t.issue(pf(), t0).unwrap();
        let ttl = Duration::from_secs(60);
        assert!(
            t.take("portforward", &c, t0 + ttl - Duration::from_millis(1))
                .is_some()
        );
        assert!(t.take("portforward", &d, t0 + ttl).is_none(), "expired");
    }

    #[test]
    fn outstanding_tokens_are_bounded_and_expired_ones_make_room() {
        let ttl = Duration::from_secs(60);
        let t = Tokens::new(ttl);
        let t0 = Instant::now();
        for _ in 0..MAX_PENDING {
            t.issue(pf(), t0).unwrap();
        }
        assert!(matches!(t.issue(pf(), t0), Err(StreamingError::TooMany)));
        assert!(
            t.issue(pf(), t0 + ttl).is_ok(),
            "expired tokens are dropped"
        );
    }
}

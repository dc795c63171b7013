//! The HTTP/1.1 side: routes `/{exec,attach,portforward}/TOKEN`, negotiates
//! SPDY/3.1 (`Upgrade: SPDY/3.1`, `X-Stream-Protocol-Version`) or WebSocket
//! (`Sec-WebSocket-Protocol`), answers 101 and hands the upgraded
//! connection to the session.

use std::convert::Infallible;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role as WsRole;

use super::channels::{self, Wanted};
use super::exec;
use super::portforward;
use super::protocol::{self, SPDY_EXEC, SPDY_PORT_FORWARD, WS_EXEC, WS_PORT_FORWARD};
use super::{Pending, StreamingServer};

type Resp = Response<Full<Bytes>>;

pub async fn serve(listener: tokio::net::TcpListener, s: Arc<StreamingServer>) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "streaming accept");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let s = s.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let s = s.clone();
                async move { Ok::<_, Infallible>(route(s, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .max_buf_size(64 << 10)
                .header_read_timeout(std::time::Duration::from_secs(30))
                .timer(hyper_util::rt::TokioTimer::new())
                .serve_connection(TokioIo::new(tcp), svc)
                .with_upgrades();
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "streaming http connection");
            }
        });
    }
}

fn plain(code: StatusCode, msg: &str) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(format!("{msg}\n"))));
    *r.status_mut() = code;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn values(req: &Request<Incoming>, name: &str) -> Vec<String> {
    req.headers()
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::to_string)
        .collect()
}

fn has_token(req: &Request<Incoming>, name: header::HeaderName, token: &str) -> bool {
    req.headers()
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|v| v.trim().eq_ignore_ascii_case(token))
}

enum Transport {
    Spdy,
    WebSocket { accept: String },
}

async fn route(s: Arc<StreamingServer>, mut req: Request<Incoming>) -> Resp {
    let path = req.uri().path().trim_matches('/').to_string();
    tracing::debug!(method = %req.method(), path = %req.uri().path(), "streaming request");
    let Some((kind, token)) = path.split_once('/') else {
        return plain(StatusCode::NOT_FOUND, "not found");
    };
    if !matches!(kind, "exec" | "attach" | "portforward") || token.contains('/') {
        return plain(StatusCode::NOT_FOUND, "not found");
    }
    let Some(pending) = s.consume(kind, token) else {
        tracing::debug!(kind, "unknown, expired or used streaming token");
        return plain(StatusCode::NOT_FOUND, "unknown or expired streaming URL");
    };
    let transport = if has_token(&req, header::UPGRADE, "websocket") {
        let Some(key) = req.headers().get("sec-websocket-key") else {
            return plain(
                StatusCode::BAD_REQUEST,
                "websocket upgrade without Sec-WebSocket-Key",
            );
        };
        Transport::WebSocket {
            accept: derive_accept_key(key.as_bytes()),
        }
    } else if has_token(&req, header::UPGRADE, "spdy/3.1") {
        Transport::Spdy
    } else {
        return plain(
            StatusCode::BAD_REQUEST,
            "streaming requests must upgrade to SPDY/3.1 or websocket",
        );
    };
    let pf = matches!(pending, Pending::PortForward { .. });
    let (offered, supported) = match (&transport, pf) {
        (Transport::Spdy, false) => (values(&req, "x-stream-protocol-version"), SPDY_EXEC),
        (Transport::Spdy, true) => (values(&req, "x-stream-protocol-version"), SPDY_PORT_FORWARD),
        (Transport::WebSocket { .. }, false) => (values(&req, "sec-websocket-protocol"), WS_EXEC),
        (Transport::WebSocket { .. }, true) => {
            (values(&req, "sec-websocket-protocol"), WS_PORT_FORWARD)
        }
    };
    // No protocol offered at all: the oldest one (what old clients mean).
    let proto = if offered.is_empty() {
        supported.last().copied()
    } else {
        protocol::negotiate(&offered, supported)
    };
    let Some(proto) = proto else {
        tracing::debug!(?offered, "no common streaming protocol");
        let mut r = plain(
            StatusCode::FORBIDDEN,
            &format!(
                "unable to upgrade: none of the offered protocols {offered:?} is supported; supported: {supported:?}"
            ),
        );
        for p in supported {
            r.headers_mut().append(
                "x-accepted-stream-protocol-versions",
                HeaderValue::from_static(p),
            );
        }
        return r;
    };
    // Port-forward ports: the CRI request's, else the WebSocket query's.
    let pending = match pending {
        Pending::PortForward { pod_id, mut ports } => {
            if ports.is_empty() {
                ports = query_ports(req.uri().query().unwrap_or(""));
            }
            Pending::PortForward { pod_id, ports }
        }
        p => p,
    };
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    match &transport {
        Transport::Spdy => {
            h.insert(header::UPGRADE, HeaderValue::from_static("SPDY/3.1"));
            h.insert("x-stream-protocol-version", HeaderValue::from_static(proto));
        }
        Transport::WebSocket { accept } => {
            h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            if let Ok(v) = HeaderValue::from_str(accept) {
                h.insert("sec-websocket-accept", v);
            }
            if !offered.is_empty() {
                h.insert("sec-websocket-protocol", HeaderValue::from_static(proto));
            }
        }
    }
    let upgrade = hyper::upgrade::on(&mut req);
    let runtime = s.runtime().clone();
    tokio::spawn(async move {
        let io = match upgrade.await {
            Ok(u) => TokioIo::new(u),
            Err(e) => {
                tracing::debug!(error = %e, "streaming upgrade failed");
                return;
            }
        };
        match transport {
            Transport::Spdy => run_spdy(runtime, pending, proto, io).await,
            Transport::WebSocket { .. } => {
                let ws =
                    tokio_tungstenite::WebSocketStream::from_raw_socket(io, WsRole::Server, None)
                        .await;
                run_ws(runtime, pending, proto, ws).await
            }
        }
    });
    r
}

fn query_ports(q: &str) -> Vec<u16> {
    q.split('&')
        .filter_map(|kv| kv.split_once('='))
        .filter(|(k, _)| *k == "port" || *k == "ports")
        .flat_map(|(_, v)| v.split("%2C").flat_map(|v| v.split(',')))
        .filter_map(|v| v.parse().ok())
        .collect()
}

fn wanted(p: &Pending, proto: &str) -> Wanted {
    let (tty, stdin, stdout, stderr) = match p {
        Pending::Exec(e) => (e.tty, e.stdin, e.stdout, e.stderr),
        Pending::Attach(a) => (a.tty, a.stdin, a.stdout, a.stderr),
        Pending::PortForward { .. } => (false, false, false, false),
    };
    Wanted {
        stdin,
        stdout,
        stderr: stderr && !tty,
        resize: tty && protocol::has_resize(proto),
    }
}

async fn run_spdy(
    runtime: Arc<crate::sandbox::Manager>,
    p: Pending,
    proto: &'static str,
    io: TokioIo<hyper::upgrade::Upgraded>,
) {
    if let Pending::PortForward { pod_id, .. } = p {
        portforward::serve_spdy(runtime, pod_id, io).await;
        return;
    }
    let session = match channels::spdy_session(io, proto, wanted(&p, proto)).await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(error = %e, "spdy session setup");
            return;
        }
    };
    run_session(runtime, p, session).await;
}

async fn run_ws(
    runtime: Arc<crate::sandbox::Manager>,
    p: Pending,
    proto: &'static str,
    ws: channels::Ws,
) {
    if let Pending::PortForward { pod_id, ports } = p {
        portforward::serve_ws(runtime, pod_id, ports, proto, ws).await;
        return;
    }
    let session = channels::ws_session(ws, proto, wanted(&p, proto));
    run_session(runtime, p, session).await;
}

async fn run_session(
    runtime: Arc<crate::sandbox::Manager>,
    p: Pending,
    session: channels::Session,
) {
    let cid = match &p {
        Pending::Exec(e) => e.container_id.clone(),
        Pending::Attach(a) => a.container_id.clone(),
        Pending::PortForward { .. } => return,
    };
    // The container may have stopped since the URL was handed out.
    let target = match runtime.stream_target(&cid) {
        Ok(t) => t,
        Err(e) => {
            if let Some(err) = &session.error {
                err.write(&protocol::error_status(session.format, &e.to_string()))
                    .await;
            }
            session.finish().await;
            return;
        }
    };
    match p {
        Pending::Exec(e) => exec::run_exec(target, e, session).await,
        Pending::Attach(a) => exec::run_attach(runtime, target, a, session).await,
        Pending::PortForward { .. } => {}
    }
}

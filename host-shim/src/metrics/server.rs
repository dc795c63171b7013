//! The scrape endpoint: plain HTTP/1.1, `GET /metrics` only, on the address
//! of `[metrics] address`. Bounded: a few connections at once, a header
//! timeout, small request buffers (scrapers send bodiless GETs).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use super::Inventory;

/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 8;
/// A connection's request headers must arrive within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// An idle keep-alive connection is closed after this.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug, thiserror::Error)]
#[error("metrics address {address}: {source}")]
pub struct BindError {
    address: String,
    #[source]
    source: std::io::Error,
}

/// Binds `address` and serves scrapes in the background; the bound address.
pub async fn start(address: &str, inventory: Arc<dyn Inventory>) -> Result<SocketAddr, BindError> {
    let err = |source| BindError {
        address: address.to_string(),
        source,
    };
    let listener = tokio::net::TcpListener::bind(address).await.map_err(err)?;
    let bound = listener.local_addr().map_err(err)?;
    tracing::info!(address = %bound, "serving metrics at /metrics");
    tokio::spawn(serve(listener, inventory));
    Ok(bound)
}

async fn serve(listener: tokio::net::TcpListener, inventory: Arc<dyn Inventory>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "metrics accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let inventory = inventory.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let svc = hyper::service::service_fn(move |req| {
                let inventory = inventory.clone();
                async move { Ok::<_, Infallible>(route(&inventory, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .max_buf_size(16 << 10)
                .header_read_timeout(HEADER_TIMEOUT)
                .timer(hyper_util::rt::TokioTimer::new())
                .serve_connection(TokioIo::new(tcp), svc);
            match tokio::time::timeout(IDLE_TIMEOUT, conn).await {
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "metrics connection"),
                Ok(Ok(())) => {}
                Err(_) => {
                    tracing::debug!(%peer, "metrics connection closed after the idle timeout")
                }
            }
        });
    }
}

async fn route(inventory: &Arc<dyn Inventory>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (code, ctype, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => (
            StatusCode::OK,
            CONTENT_TYPE,
            super::global().render(inventory).await,
        ),
        (_, "/metrics") => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "GET only\n".to_string(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "metrics are at /metrics\n".to_string(),
        ),
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    r
}

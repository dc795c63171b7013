//! One tower layer around every gRPC service on huskd's socket: a tracing span
//! per call (`rpc{method=… pod=… container=…}`) and the RPC metrics (latency,
//! calls and errors by gRPC code). Handlers add only the ids they see, with
//! [`ids`]; nothing else in them is about observability.
//!
//! The code is read from the response headers: tonic puts `grpc-status` there
//! for every error (a trailers-only response); a response without it is OK
//! (unary successes carry it in the trailers). Latency is to the response
//! headers, which for unary calls is the handler's whole work.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use tonic::codegen::http;
use tracing::Instrument as _;

/// The layer: `Server::builder().layer(ObserveLayer)`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ObserveLayer;

impl<S> tower::Layer<S> for ObserveLayer {
    type Service = Observe<S>;
    fn layer(&self, inner: S) -> Observe<S> {
        Observe { inner }
    }
}

#[derive(Debug, Clone)]
pub struct Observe<S> {
    inner: S,
}

impl<S, B, RB> tower::Service<http::Request<B>> for Observe<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let path = req.uri().path().to_string();
        let method = path.rsplit('/').next().unwrap_or_default();
        let span = tracing::info_span!(
            "rpc",
            method = %method,
            pod = tracing::field::Empty,
            container = tracing::field::Empty,
        );
        let start = Instant::now();
        let fut = {
            let _e = span.enter();
            self.inner.call(req)
        };
        Box::pin(
            async move {
                let r = fut.await;
                let code = match &r {
                    Ok(resp) => code_of(resp.headers()),
                    Err(_) => tonic::Code::Internal,
                };
                if code != tonic::Code::Ok {
                    tracing::debug!(code = crate::metrics::code_name(code), "rpc failed");
                }
                crate::metrics::global().rpc(&path, code, start.elapsed());
                r
            }
            .instrument(span),
        )
    }
}

fn code_of(h: &http::HeaderMap) -> tonic::Code {
    match h.get("grpc-status") {
        None => tonic::Code::Ok,
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|v| v.parse::<i32>().ok())
            .map_or(tonic::Code::Unknown, tonic::Code::from_i32),
    }
}

/// Puts the pod and container ids a request names on the current call's span.
pub fn ids(pod: &str, container: &str) {
    let span = tracing::Span::current();
    if !pod.is_empty() {
        span.record("pod", pod);
    }
    if !container.is_empty() {
        span.record("container", container);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_from_headers() {
        let mut h = http::HeaderMap::new();
        assert_eq!(code_of(&h), tonic::Code::Ok);
        h.insert("grpc-status", http::HeaderValue::from_static("5"));
        assert_eq!(code_of(&h), tonic::Code::NotFound);
        h.insert("grpc-status", http::HeaderValue::from_static("x"));
        assert_eq!(code_of(&h), tonic::Code::Unknown);
    }
}

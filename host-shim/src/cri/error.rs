//! Domain errors → gRPC status codes, in one place.

use tonic::{Code, Status};

use crate::image::ImageError;
use crate::sandbox::RuntimeError;

impl From<RuntimeError> for Status {
    fn from(e: RuntimeError) -> Self {
        let code = match &e {
            RuntimeError::NotFound(_) => Code::NotFound,
            RuntimeError::AlreadyExists(_) => Code::AlreadyExists,
            RuntimeError::InvalidArgument(_) => Code::InvalidArgument,
            RuntimeError::FailedPrecondition(_) => Code::FailedPrecondition,
            RuntimeError::DeadlineExceeded(_) => Code::DeadlineExceeded,
            RuntimeError::Unavailable(_) => Code::Unavailable,
            RuntimeError::ResourceExhausted(_) => Code::ResourceExhausted,
            RuntimeError::Internal(_) | RuntimeError::Store(_) => Code::Internal,
        };
        Status::new(code, e.to_string())
    }
}

impl From<crate::streaming::StreamingError> for Status {
    fn from(e: crate::streaming::StreamingError) -> Self {
        let code = match &e {
            crate::streaming::StreamingError::TooMany => Code::ResourceExhausted,
            crate::streaming::StreamingError::Bind(..) => Code::Internal,
        };
        Status::new(code, e.to_string())
    }
}

impl From<ImageError> for Status {
    fn from(e: ImageError) -> Self {
        let code = match &e {
            ImageError::Reference(_) | ImageError::InvalidArgument(_) => Code::InvalidArgument,
            ImageError::NotFound(_) => Code::NotFound,
            ImageError::Unauthorized(_) => Code::Unauthenticated,
            ImageError::Unavailable(_) => Code::Unavailable,
            ImageError::DigestMismatch { .. } | ImageError::BadContent(_) => Code::DataLoss,
            ImageError::Unsupported(_) => Code::Unimplemented,
            ImageError::Registry(_) => Code::Unknown,
            ImageError::Config(_) => Code::FailedPrecondition,
            ImageError::Store(_) | ImageError::Internal(_) => Code::Internal,
        };
        Status::new(code, e.to_string())
    }
}

pub fn invalid(msg: impl Into<String>) -> Status {
    Status::invalid_argument(msg)
}

/// tonic answers a request prost cannot decode (invalid UTF-8 in a string field, a
/// malformed message) with Internal; it is the caller's bad input, so the status becomes
/// InvalidArgument. Used as a response layer on the CRI server: only tonic's own decode
/// failures carry that message, before any handler runs.
pub fn decode_error_is_invalid_argument<B>(
    mut r: tonic::codegen::http::Response<B>,
) -> tonic::codegen::http::Response<B> {
    use tonic::codegen::http::HeaderValue;
    let h = r.headers_mut();
    let internal = h.get("grpc-status").is_some_and(|v| v.as_bytes() == b"13");
    let decode = h.get("grpc-message").is_some_and(|m| {
        String::from_utf8_lossy(m.as_bytes())
            .replace("%20", " ")
            .starts_with("failed to decode Protobuf message")
    });
    if internal && decode {
        h.insert("grpc-status", HeaderValue::from_static("3"));
    }
    r
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn only_decode_failures_become_invalid_argument() {
        use tonic::codegen::http::{HeaderValue, Response};
        let resp = |status: &'static str, msg: &'static str| {
            let mut r = Response::new(());
            r.headers_mut()
                .insert("grpc-status", HeaderValue::from_static(status));
            r.headers_mut()
                .insert("grpc-message", HeaderValue::from_static(msg));
            decode_error_is_invalid_argument(r)
                .headers()
                .get("grpc-status")
                .cloned()
                .unwrap()
        };
        let msg = "failed%20to%20decode%20Protobuf%20message:%20invalid%20string";
        assert_eq!(resp("13", msg), "3");
        assert_eq!(resp("13", "failed to decode Protobuf message: x"), "3");
        assert_eq!(resp("13", "agent%20died"), "13");
        assert_eq!(resp("5", msg), "5");
    }
}

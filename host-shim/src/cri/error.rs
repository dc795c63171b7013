//! Domain errors → gRPC status codes, in one place.

use tonic::{Code, Status};

use crate::image::ImageError;
use crate::sandbox::RuntimeError;

/// Metadata every Internal status huskd's handlers answer carries: an Internal answer without
/// it was made by tonic before any handler ran (a request it could not decode), which
/// [`decode_error_is_invalid_argument`] turns into InvalidArgument.
pub const INTERNAL_MARK: &str = "husk-internal";

/// The status for `code`; an Internal one carries [`INTERNAL_MARK`].
fn status(code: Code, msg: String) -> Status {
    if code != Code::Internal {
        return Status::new(code, msg);
    }
    let mut md = tonic::metadata::MetadataMap::new();
    md.insert(
        INTERNAL_MARK,
        tonic::metadata::MetadataValue::from_static("1"),
    );
    Status::with_metadata(code, msg, md)
}

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
        status(code, e.to_string())
    }
}

impl From<crate::streaming::StreamingError> for Status {
    fn from(e: crate::streaming::StreamingError) -> Self {
        let code = match &e {
            crate::streaming::StreamingError::TooMany => Code::ResourceExhausted,
            crate::streaming::StreamingError::Bind(..) => Code::Internal,
        };
        status(code, e.to_string())
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
        status(code, e.to_string())
    }
}

pub fn invalid(msg: impl Into<String>) -> Status {
    Status::invalid_argument(msg)
}

/// tonic answers a request prost cannot decode (invalid UTF-8 in a string field, a
/// malformed message) with Internal before any handler runs; it is the caller's bad input, so
/// the status becomes InvalidArgument. Used as a response layer on the CRI server. Every
/// Internal status huskd's own handlers answer carries [`INTERNAL_MARK`] (all of them come
/// from this module), so an Internal without it is tonic's (decoding, or the decompression of
/// a request): no matching on tonic's message text. The mark is taken off.
pub fn decode_error_is_invalid_argument<B>(
    mut r: tonic::codegen::http::Response<B>,
) -> tonic::codegen::http::Response<B> {
    use tonic::codegen::http::HeaderValue;
    let h = r.headers_mut();
    let internal = h.get("grpc-status").is_some_and(|v| v.as_bytes() == b"13");
    let ours = h.remove(INTERNAL_MARK).is_some();
    if internal && !ours {
        h.insert("grpc-status", HeaderValue::from_static("3"));
    }
    r
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn only_internal_statuses_huskd_did_not_make_become_invalid_argument() {
        use tonic::codegen::http::{HeaderValue, Response};
        let resp = |status: &'static str, ours: bool| {
            let mut r = Response::new(());
            r.headers_mut()
                .insert("grpc-status", HeaderValue::from_static(status));
            r.headers_mut().insert(
                "grpc-message",
                HeaderValue::from_static("whatever%20tonic%20says"),
            );
            if ours {
                r.headers_mut()
                    .insert(INTERNAL_MARK, HeaderValue::from_static("1"));
            }
            let r = decode_error_is_invalid_argument(r);
            assert!(r.headers().get(INTERNAL_MARK).is_none());
            r.headers().get("grpc-status").cloned().unwrap()
        };
        assert_eq!(resp("13", false), "3", "tonic's own Internal: the request");
        assert_eq!(resp("13", true), "13", "a handler's Internal stays");
        assert_eq!(resp("5", false), "5");
        // Every Internal huskd makes is marked, in the headers a trailers-only answer has.
        let s: Status = RuntimeError::Internal("boom".into()).into();
        assert_eq!(s.code(), Code::Internal);
        assert!(s.metadata().get(INTERNAL_MARK).is_some());
        let s: Status = RuntimeError::NotFound("x".into()).into();
        assert!(s.metadata().get(INTERNAL_MARK).is_none());
        let r = s.into_http::<()>();
        assert_eq!(r.headers().get("grpc-status").unwrap(), "5");
        let s: Status = RuntimeError::Internal("boom".into()).into();
        let r = decode_error_is_invalid_argument(s.into_http::<()>());
        assert_eq!(r.headers().get("grpc-status").unwrap(), "13");
    }
}

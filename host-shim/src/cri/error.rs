//! Domain errors → gRPC status codes, in one place.

use tonic::{Code, Status};

use crate::image::ImageError;
use crate::sandbox::RuntimeError;

/// Metadata every Internal status huskd's handlers answer carries: an Internal answer without
/// it was made by tonic before any handler ran (a request it could not decode), which
/// `validate::decode_error_is_invalid_argument` turns into InvalidArgument.
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

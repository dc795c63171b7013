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

/// The gRPC code of a runtime failure: the request's own categories as they are; the
/// node's failures by their cause (an agent's answer keeps its code, a VM out of disk slots is
/// ResourceExhausted, a boot timeout DeadlineExceeded...), the rest Internal.
fn runtime_code(e: &RuntimeError) -> Code {
    use crate::network::NetworkError;
    use crate::network::cni::CniError;
    use crate::sandbox::agent::AgentError;
    use crate::sandbox::share::ShareError;
    use crate::sandbox::vm::husk_vmm::vmmctl::VmmCtlError;
    use crate::sandbox::vm::qemu::qmp::QmpError;
    use crate::sandbox::vm::{BootFailure, VmError};
    match e {
        RuntimeError::NotFound(_) => Code::NotFound,
        RuntimeError::AlreadyExists(_) => Code::AlreadyExists,
        RuntimeError::InvalidArgument(_) => Code::InvalidArgument,
        RuntimeError::FailedPrecondition(_) => Code::FailedPrecondition,
        RuntimeError::DeadlineExceeded(_) => Code::DeadlineExceeded,
        RuntimeError::Agent { source, .. } => match source {
            AgentError::Rpc { code, .. } => match *code {
                ttrpc::Code::NOT_FOUND => Code::NotFound,
                ttrpc::Code::ALREADY_EXISTS => Code::AlreadyExists,
                ttrpc::Code::INVALID_ARGUMENT => Code::InvalidArgument,
                ttrpc::Code::FAILED_PRECONDITION => Code::FailedPrecondition,
                ttrpc::Code::DEADLINE_EXCEEDED => Code::DeadlineExceeded,
                _ => Code::Internal,
            },
            AgentError::Timeout => Code::DeadlineExceeded,
            AgentError::Transport(_) | AgentError::BadReply(_) => Code::Unavailable,
        },
        RuntimeError::ForwardDial { .. } => Code::Unavailable,
        RuntimeError::Vm(v) => match v.as_ref() {
            VmError::Boot {
                failure: BootFailure::Timeout(_),
                ..
            } => Code::DeadlineExceeded,
            VmError::Boot {
                failure: BootFailure::Exited | BootFailure::ExitedDuring(_),
                ..
            }
            | VmError::Forward(_) => Code::Unavailable,
            VmError::Spawn { .. } => Code::FailedPrecondition,
            VmError::Qmp(QmpError::SlotsFull(_))
            | VmError::VmmCtl(VmmCtlError::Full(_))
            | VmError::JailUidsTaken { .. } => Code::ResourceExhausted,
            _ => Code::Internal,
        },
        RuntimeError::Network(n) => match n {
            NetworkError::Cni(CniError::PluginNotFound { .. } | CniError::BadConfig { .. }) => {
                Code::FailedPrecondition
            }
            NetworkError::BadCidr(_) => Code::InvalidArgument,
            _ => Code::Internal,
        },
        // What the request asks cannot be done in a VM sandbox: the request is at fault.
        RuntimeError::Share(ShareError::Refused { .. } | ShareError::Source(..)) => {
            Code::InvalidArgument
        }
        RuntimeError::AgentStart { .. }
        | RuntimeError::Io { .. }
        | RuntimeError::Spawn { .. }
        | RuntimeError::Host { .. }
        | RuntimeError::HostnameNotUtf8
        | RuntimeError::Task { .. }
        | RuntimeError::OciSpec { .. }
        | RuntimeError::Json { .. }
        | RuntimeError::Image { .. }
        | RuntimeError::Share(_)
        | RuntimeError::Store(_) => Code::Internal,
    }
}

impl From<RuntimeError> for Status {
    fn from(e: RuntimeError) -> Self {
        status(runtime_code(&e), e.to_string())
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
            ImageError::Store { .. }
            | ImageError::Io { .. }
            | ImageError::Task { .. }
            | ImageError::NoHost => Code::Internal,
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
        let boom = || RuntimeError::HostnameNotUtf8;
        let s: Status = boom().into();
        assert_eq!(s.code(), Code::Internal);
        assert!(s.metadata().get(INTERNAL_MARK).is_some());
        let s: Status = RuntimeError::NotFound("x".into()).into();
        assert!(s.metadata().get(INTERNAL_MARK).is_none());
        let r = s.into_http::<()>();
        assert_eq!(r.headers().get("grpc-status").unwrap(), "5");
        let s: Status = boom().into();
        let r = decode_error_is_invalid_argument(s.into_http::<()>());
        assert_eq!(r.headers().get("grpc-status").unwrap(), "13");
    }

    /// Each failure's gRPC code comes from its variant and cause (the codes the
    /// status-shaped variants had before); the message keeps the cause.
    #[test]
    fn runtime_codes_follow_the_cause() {
        use crate::network::NetworkError;
        use crate::network::cni::CniError;
        use crate::sandbox::agent::AgentError;
        use crate::sandbox::vm::husk_vmm::vmmctl::VmmCtlError;
        use crate::sandbox::vm::qemu::qmp::QmpError;
        use crate::sandbox::vm::{BootFailure, VmError};
        let code = |e: RuntimeError| Status::from(e).code();
        let agent = |e| RuntimeError::agent("check", e);
        assert_eq!(
            code(agent(AgentError::BadReply("x".into()))),
            Code::Unavailable
        );
        assert_eq!(
            code(agent(AgentError::Transport("x".into()))),
            Code::Unavailable
        );
        assert_eq!(code(agent(AgentError::Timeout)), Code::DeadlineExceeded);
        let rpc = |c| {
            agent(AgentError::Rpc {
                code: c,
                message: "m".into(),
            })
        };
        assert_eq!(code(rpc(ttrpc::Code::NOT_FOUND)), Code::NotFound);
        assert_eq!(code(rpc(ttrpc::Code::ALREADY_EXISTS)), Code::AlreadyExists);
        assert_eq!(
            code(rpc(ttrpc::Code::INVALID_ARGUMENT)),
            Code::InvalidArgument
        );
        assert_eq!(
            code(rpc(ttrpc::Code::FAILED_PRECONDITION)),
            Code::FailedPrecondition
        );
        assert_eq!(code(rpc(ttrpc::Code::INTERNAL)), Code::Internal);
        let s = Status::from(rpc(ttrpc::Code::UNKNOWN));
        assert_eq!(s.message(), "check: agent: m");
        assert!(s.metadata().get(INTERNAL_MARK).is_some());

        let plugin = NetworkError::Cni(CniError::PluginNotFound {
            plugin: "nosuchplugin".into(),
            dirs: "/opt/cni/bin".into(),
        });
        assert_eq!(code(plugin.into()), Code::FailedPrecondition);
        assert_eq!(
            code(NetworkError::BadCidr("x".into()).into()),
            Code::InvalidArgument
        );

        let boot = |failure| VmError::Boot {
            backend: "QEMU",
            pod: "p".into(),
            failure,
            console: "c".into(),
            vmm_log: "v".into(),
            helper_logs: String::new(),
        };
        assert_eq!(
            code(boot(BootFailure::Timeout(5)).into()),
            Code::DeadlineExceeded
        );
        let s = Status::from(RuntimeError::from(boot(BootFailure::Exited)));
        assert_eq!(s.code(), Code::Unavailable);
        assert!(
            s.message().contains("exited during boot") && s.message().contains("guest console"),
            "{}",
            s.message()
        );
        assert_eq!(
            code(VmError::Qmp(QmpError::SlotsFull(4)).into()),
            Code::ResourceExhausted
        );
        assert_eq!(
            code(VmError::VmmCtl(VmmCtlError::Full(4)).into()),
            Code::ResourceExhausted
        );
        assert_eq!(
            code(
                VmError::JailUidsTaken {
                    count: 2,
                    base: 5000
                }
                .into()
            ),
            Code::ResourceExhausted
        );
        assert_eq!(
            code(VmError::Qmp(QmpError::Protocol("x".into())).into()),
            Code::Internal
        );
        let io = || std::io::Error::from(std::io::ErrorKind::NotFound);
        assert_eq!(
            code(
                VmError::Spawn {
                    program: "qemu".into(),
                    source: io(),
                }
                .into()
            ),
            Code::FailedPrecondition
        );
        let e = RuntimeError::io("pod run dir", "/run/x")(io());
        assert!(std::error::Error::source(&e).is_some(), "the cause is kept");
        let s = Status::from(e);
        assert_eq!(s.code(), Code::Internal);
        assert!(
            s.message().starts_with("pod run dir /run/x: "),
            "{}",
            s.message()
        );
    }
}

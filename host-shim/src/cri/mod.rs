//! The gRPC surface on huskd's socket: CRI RuntimeService + ImageService
//! (thin handlers) and husk's own service. Errors map to gRPC codes in
//! [`error`] only.

pub mod convert;
pub mod error;
mod husk;
mod image;
mod runtime;
mod seccomp_gates;
mod streaming;
pub mod validate;

use std::path::Path;
use std::sync::Arc;

use husk_proto::cri::image_service_server::ImageServiceServer;
use husk_proto::cri::runtime_service_server::RuntimeServiceServer;
use husk_proto::husk::husk_server::HuskServer;

use crate::image::ImageService;
use crate::sandbox::Manager;

pub use self::runtime::RUNTIME_NAME;

/// Shared state behind all handlers.
pub struct Services {
    pub images: Arc<ImageService>,
    pub runtime: Arc<Manager>,
    pub streaming: Arc<crate::streaming::StreamingServer>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("socket {path}: {source}")]
    Socket {
        path: String,
        source: std::io::Error,
    },
    #[error("grpc server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Binds `socket` (mode 0660, replacing a stale one) and serves until
/// `shutdown` resolves.
pub async fn serve(
    services: Arc<Services>,
    socket: &Path,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    use std::os::unix::fs::PermissionsExt;
    let err = |source| ServeError::Socket {
        path: socket.display().to_string(),
        source,
    };
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    match std::fs::remove_file(socket) {
        Ok(()) => tracing::debug!(socket = %socket.display(), "removed stale socket"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let listener = tokio::net::UnixListener::bind(socket).map_err(err)?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o660)).map_err(err)?;
    tracing::info!(socket = %socket.display(), "serving CRI");
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    let result = tonic::transport::Server::builder()
        .layer(tower::util::MapResponseLayer::new(
            validate::decode_error_is_invalid_argument::<tonic::body::Body>,
        ))
        .add_service(
            RuntimeServiceServer::new(runtime::Runtime::new(services.clone()))
                .max_decoding_message_size(16 << 20),
        )
        .add_service(
            ImageServiceServer::new(image::Images::new(services.clone()))
                .max_decoding_message_size(16 << 20),
        )
        .add_service(HuskServer::new(husk::Husk::new(services)))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    let _ = std::fs::remove_file(socket);
    Ok(result?)
}

//! A CRI client on huskd's unix socket (used by the CLI and the tests).

use std::path::{Path, PathBuf};

use husk_proto::cri::image_service_client::ImageServiceClient;
use husk_proto::cri::runtime_service_client::RuntimeServiceClient;
use husk_proto::husk::husk_client::HuskClient;
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

#[derive(Debug, thiserror::Error)]
#[error("connect to {path}: {source}")]
pub struct ConnectError {
    path: PathBuf,
    #[source]
    source: tonic::transport::Error,
}

/// Connects to a gRPC server on a unix socket.
pub async fn connect(path: &Path) -> Result<Channel, ConnectError> {
    let p = path.to_path_buf();
    Endpoint::try_from("http://[::]:50051")
        .map_err(|source| ConnectError {
            path: p.clone(),
            source,
        })?
        .connect_with_connector(tower::service_fn(move |_| {
            let p = p.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(p).await?))
            }
        }))
        .await
        .map_err(|source| ConnectError {
            path: path.to_path_buf(),
            source,
        })
}

/// The three services huskd serves on its socket.
#[derive(Clone)]
pub struct Clients {
    pub runtime: RuntimeServiceClient<Channel>,
    pub image: ImageServiceClient<Channel>,
    pub husk: HuskClient<Channel>,
}

impl Clients {
    pub async fn connect(path: &Path) -> Result<Self, ConnectError> {
        let ch = connect(path).await?;
        Ok(Self {
            runtime: RuntimeServiceClient::new(ch.clone()).max_decoding_message_size(16 << 20),
            image: ImageServiceClient::new(ch.clone()).max_decoding_message_size(16 << 20),
            husk: HuskClient::new(ch),
        })
    }
}

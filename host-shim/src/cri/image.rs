//! CRI ImageService: thin handlers over [`crate::image::ImageService`].

use std::collections::HashMap;
use std::sync::Arc;

use husk_proto::cri::{self, image_service_server::ImageService};
use tonic::{Request, Response, Status};

use super::Services;
use super::error::invalid;
use crate::image::auth::Credentials;
use crate::image::split_user;
use crate::image::store::ImageRecord;

pub struct Images {
    s: Arc<Services>,
}

impl Images {
    pub fn new(s: Arc<Services>) -> Self {
        Self { s }
    }
}

fn to_cri(rec: &ImageRecord) -> cri::Image {
    let (uid, username) = split_user(&rec.user);
    cri::Image {
        id: rec.id.clone(),
        repo_tags: rec.repo_tags.clone(),
        repo_digests: rec.repo_digests.clone(),
        size: rec.size,
        uid: uid.map(|value| cri::Int64Value { value }),
        username,
        spec: Some(cri::ImageSpec {
            image: rec.id.clone(),
            ..Default::default()
        }),
        pinned: rec.pinned,
    }
}

fn spec_of(spec: Option<cri::ImageSpec>) -> Result<String, Status> {
    let image = spec.map(|s| s.image).unwrap_or_default();
    if image.trim().is_empty() {
        return Err(invalid("image spec is required"));
    }
    Ok(image)
}

#[tonic::async_trait]
impl ImageService for Images {
    async fn list_images(
        &self,
        req: Request<cri::ListImagesRequest>,
    ) -> Result<Response<cri::ListImagesResponse>, Status> {
        let filter = req
            .into_inner()
            .filter
            .and_then(|f| f.image)
            .map(|s| s.image);
        let images = self
            .s
            .images
            .list(filter.as_deref())
            .iter()
            .map(to_cri)
            .collect();
        Ok(Response::new(cri::ListImagesResponse { images }))
    }

    async fn image_status(
        &self,
        req: Request<cri::ImageStatusRequest>,
    ) -> Result<Response<cri::ImageStatusResponse>, Status> {
        let req = req.into_inner();
        let spec = spec_of(req.image)?;
        let Some(rec) = self.s.images.status(&spec)? else {
            return Ok(Response::new(cri::ImageStatusResponse::default()));
        };
        let mut info = HashMap::new();
        if req.verbose {
            let config = self.s.images.config_json(&rec)?;
            let layers: Vec<_> = rec
                .layers
                .iter()
                .zip(self.s.images.lower_dirs(&rec).into_iter().rev())
                .map(|(l, dir)| {
                    serde_json::json!({
                        "digest": l.digest, "diffID": l.diff_id, "size": l.size,
                        "mediaType": l.media_type, "snapshot": dir,
                    })
                })
                .collect();
            let v = serde_json::json!({
                "imageSpec": config,
                "manifestDigest": rec.manifest_digest,
                "manifestMediaType": rec.manifest_media_type,
                "indexDigest": rec.index_digest,
                "layers": layers,
                "pulledAt": rec.pulled_at,
            });
            info.insert("info".to_string(), v.to_string());
        }
        Ok(Response::new(cri::ImageStatusResponse {
            image: Some(to_cri(&rec)),
            info,
        }))
    }

    async fn pull_image(
        &self,
        req: Request<cri::PullImageRequest>,
    ) -> Result<Response<cri::PullImageResponse>, Status> {
        let req = req.into_inner();
        let image = spec_of(req.image)?;
        let creds = req.auth.map(|a| Credentials {
            username: a.username,
            password: a.password,
            auth: a.auth,
            identity_token: a.identity_token,
            registry_token: a.registry_token,
        });
        tracing::info!(%image, sandbox = ?req.sandbox_config.as_ref().and_then(|c| c.metadata.as_ref()).map(|m| &m.name), "PullImage");
        let rec = self.s.images.pull(&image, creds).await?;
        Ok(Response::new(cri::PullImageResponse { image_ref: rec.id }))
    }

    async fn remove_image(
        &self,
        req: Request<cri::RemoveImageRequest>,
    ) -> Result<Response<cri::RemoveImageResponse>, Status> {
        let image = spec_of(req.into_inner().image)?;
        // Idempotent per the CRI: removing an absent image succeeds.
        let removed = self.s.images.remove(&image)?;
        tracing::info!(%image, removed, "RemoveImage");
        Ok(Response::new(cri::RemoveImageResponse {}))
    }

    async fn image_fs_info(
        &self,
        _req: Request<cri::ImageFsInfoRequest>,
    ) -> Result<Response<cri::ImageFsInfoResponse>, Status> {
        let u = self.s.images.usage()?;
        let fs = cri::FilesystemUsage {
            timestamp: crate::image::pull::now_nanos(),
            fs_id: Some(cri::FilesystemIdentifier {
                mountpoint: self.s.images.store().root().display().to_string(),
            }),
            used_bytes: Some(cri::UInt64Value { value: u.bytes }),
            inodes_used: Some(cri::UInt64Value { value: u.inodes }),
        };
        Ok(Response::new(cri::ImageFsInfoResponse {
            image_filesystems: vec![fs],
            container_filesystems: vec![],
        }))
    }
}

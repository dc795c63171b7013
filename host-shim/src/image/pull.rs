//! Pulling an image: resolve the reference on the configured hosts (mirrors
//! first), pick the linux/amd64 manifest from an index, fetch and verify
//! every blob into the store (temp file + rename), and unpack each layer
//! into its own snapshot, all layers concurrently.

use std::io::{BufReader, Read};
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use oci_client::client::{
    BlobResponse, Certificate, CertificateEncoding, ClientConfig, ClientProtocol,
};
use oci_client::errors::OciDistributionError;
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;

use super::ImageError;
use super::hosts::RegistryHost;
use super::progress::{Phase, Tracker};
use super::reference::ImageRef;
use super::store::{ImageRecord, ImageStore, LayerRecord};
use super::unpack;

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const ACCEPTED: &[&str] = &[OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST];
/// Manifests and configs larger than this are refused.
const MAX_CONFIG: u64 = 16 << 20;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    schema_version: u32,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    config: Option<OciDescriptor>,
    #[serde(default)]
    layers: Vec<OciDescriptor>,
    #[serde(default)]
    manifests: Option<Vec<IndexEntry>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct IndexEntry {
    digest: String,
    #[serde(default)]
    media_type: String,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Debug, Deserialize)]
struct Platform {
    architecture: String,
    os: String,
    #[serde(default)]
    variant: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ImageConfig {
    #[serde(default)]
    config: Option<ContainerConfig>,
    rootfs: RootFs,
}

#[derive(Debug, Default, Deserialize)]
struct ContainerConfig {
    #[serde(default, rename = "User")]
    user: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RootFs {
    diff_ids: Vec<String>,
}

pub struct PullSettings {
    pub max_concurrent_downloads: usize,
}

/// One pull of one reference from a list of hosts.
pub struct Pull<'a> {
    pub store: &'a Arc<ImageStore>,
    pub settings: &'a PullSettings,
    pub image: &'a ImageRef,
    pub auth: &'a RegistryAuth,
    pub tracker: &'a Tracker,
    pub locks: &'a super::KeyedLocks,
}

impl Pull<'_> {
    /// Tries each host in order; returns the stored image.
    pub async fn run(&self, hosts: &[RegistryHost]) -> Result<ImageRecord, ImageError> {
        let by_digest = self.image.digest.is_some();
        let usable: Vec<_> = hosts
            .iter()
            .filter(|h| if by_digest { h.pull } else { h.resolve })
            .collect();
        if usable.is_empty() {
            return Err(ImageError::Config(format!(
                "no configured host of {} may {}",
                self.image.registry,
                if by_digest { "pull" } else { "resolve" }
            )));
        }
        let mut failures: Vec<(String, ImageError)> = Vec::new();
        for host in &usable {
            match self.pull_from_host(host).await {
                Ok(r) => return Ok(r),
                Err(e) => {
                    tracing::warn!(image = %self.image, host = %host.host, error = %e, "pull from host failed");
                    failures.push((host.host.clone(), e));
                }
            }
        }
        // One host: its error as is. Several: the last host's kind, with
        // every host's reason in the message.
        let (_, last) = failures.pop().ok_or(ImageError::NoHost)?;
        if failures.is_empty() {
            return Err(last);
        }
        let earlier: Vec<String> = failures.iter().map(|(h, e)| format!("{h}: {e}")).collect();
        Err(last.with_context(&format!("after mirrors failed ({})", earlier.join("; "))))
    }

    async fn pull_from_host(&self, host: &RegistryHost) -> Result<ImageRecord, ImageError> {
        let client = make_client(host)?;
        let oref = self.image.to_oci(&host.host);
        let mut lease = self.store.lease();

        let (top, top_digest) = client
            .pull_manifest_raw(&oref, self.auth, ACCEPTED)
            .await
            .map_err(map_oci)?;
        crate::metrics::global().image_bytes(top.len() as u64);
        verify_bytes(&top, &top_digest, "manifest")?;
        if let Some(want) = &self.image.digest
            && *want != top_digest
        {
            return Err(ImageError::DigestMismatch {
                what: "manifest".into(),
                expected: want.clone(),
                actual: top_digest,
            });
        }
        let parsed: Manifest = serde_json::from_slice(&top)
            .map_err(|e| ImageError::BadContent(format!("manifest: {e}")))?;
        let (manifest, manifest_bytes, manifest_digest, index_digest) =
            if let Some(entries) = &parsed.manifests {
                let entry = select_platform(entries)?;
                check_digests([entry.digest.as_str()])?;
                let mref = oci_client::Reference::with_digest(
                    oref.registry().to_string(),
                    oref.repository().to_string(),
                    entry.digest.clone(),
                );
                let mut mref = mref;
                if host.host != self.image.registry {
                    mref.set_mirror_registry(host.host.clone());
                }
                let (bytes, digest) = client
                    .pull_manifest_raw(&mref, self.auth, ACCEPTED)
                    .await
                    .map_err(map_oci)?;
                crate::metrics::global().image_bytes(bytes.len() as u64);
                verify_bytes(&bytes, &entry.digest, "platform manifest")?;
                let m: Manifest = serde_json::from_slice(&bytes)
                    .map_err(|e| ImageError::BadContent(format!("platform manifest: {e}")))?;
                if m.manifests.is_some() {
                    return Err(ImageError::BadContent("nested image index".into()));
                }
                (m, bytes, digest, Some(top_digest.clone()))
            } else {
                (parsed, top.clone(), top_digest.clone(), None)
            };
        if manifest.schema_version != 2 {
            return Err(ImageError::Unsupported(format!(
                "manifest schema version {}",
                manifest.schema_version
            )));
        }
        let media_type = manifest
            .media_type
            .clone()
            .unwrap_or_else(|| OCI_MANIFEST.to_string());
        let config_desc = manifest
            .config
            .clone()
            .ok_or_else(|| ImageError::BadContent("manifest has no config".into()))?;
        check_digests(
            std::iter::once(config_desc.digest.as_str())
                .chain(manifest.layers.iter().map(|l| l.digest.as_str())),
        )?;
        if config_desc.size < 0 || config_desc.size as u64 > MAX_CONFIG {
            return Err(ImageError::BadContent(format!(
                "image config size {} out of range",
                config_desc.size
            )));
        }

        // Config.
        lease.add(&config_desc.digest);
        self.fetch_blob(&client, &oref, &config_desc, None).await?;
        let config_bytes = self.store.read_blob(&config_desc.digest)?;
        let config: ImageConfig = serde_json::from_slice(&config_bytes)
            .map_err(|e| ImageError::BadContent(format!("image config: {e}")))?;
        check_digests(config.rootfs.diff_ids.iter().map(String::as_str))?;
        if config.rootfs.diff_ids.len() != manifest.layers.len() {
            return Err(ImageError::BadContent(format!(
                "manifest has {} layers but the config lists {} diff ids",
                manifest.layers.len(),
                config.rootfs.diff_ids.len()
            )));
        }

        // Layers, concurrently.
        self.tracker.set_layers(
            manifest
                .layers
                .iter()
                .map(|l| (l.digest.clone(), l.size.max(0) as u64)),
        );
        for (l, d) in manifest.layers.iter().zip(&config.rootfs.diff_ids) {
            lease.add(&l.digest);
            lease.add(d);
        }
        let work: Vec<(OciDescriptor, String)> = manifest
            .layers
            .iter()
            .cloned()
            .zip(config.rootfs.diff_ids.iter().cloned())
            .collect();
        let (client_ref, oref_ref) = (&client, &oref);
        let layers: Vec<LayerRecord> = futures::stream::iter(work)
            .map(move |(desc, diff_id)| async move {
                self.ensure_layer(client_ref, oref_ref, &desc, &diff_id)
                    .await
            })
            .buffered(self.settings.max_concurrent_downloads.max(1))
            .try_collect()
            .await?;

        lease.add(&manifest_digest);
        self.store.write_blob(&manifest_bytes, &manifest_digest)?;
        if let Some(d) = &index_digest {
            lease.add(d);
            self.store.write_blob(&top, d)?;
        }
        let size = layers.iter().map(|l| l.size).sum::<u64>()
            + config_bytes.len() as u64
            + manifest_bytes.len() as u64;
        let record = ImageRecord {
            id: config_desc.digest.clone(),
            repo_tags: vec![],
            repo_digests: vec![],
            manifest_digest,
            index_digest,
            manifest_media_type: media_type,
            layers,
            size,
            user: config.config.unwrap_or_default().user.unwrap_or_default(),
            pulled_at: now_nanos(),
            pinned: false,
        };
        let tag = self.image.tagged();
        let stored =
            self.store
                .put_image(record, tag.as_deref(), &self.image.with_digest(&top_digest))?;
        drop(lease);
        Ok(stored)
    }

    async fn ensure_layer(
        &self,
        client: &oci_client::Client,
        oref: &oci_client::Reference,
        desc: &OciDescriptor,
        diff_id: &str,
    ) -> Result<LayerRecord, ImageError> {
        super::reference::validate_digest(diff_id)
            .map_err(|why| ImageError::BadContent(format!("diff id {diff_id:?} {why}")))?;
        let record = LayerRecord {
            digest: desc.digest.clone(),
            media_type: desc.media_type.clone(),
            size: desc.size.max(0) as u64,
            diff_id: diff_id.to_string(),
        };
        let _guard = self.locks.lock(diff_id).await;
        if self.store.has_snapshot(diff_id) && self.store.has_blob(&desc.digest) {
            self.tracker.update(&desc.digest, Phase::Exists, None);
            return Ok(record);
        }
        self.fetch_blob(client, oref, desc, Some(self.tracker))
            .await?;
        if !self.store.has_snapshot(diff_id) {
            self.tracker.update(&desc.digest, Phase::Unpacking, None);
            let store = self.store.clone();
            let (blob, diff) = (desc.digest.clone(), diff_id.to_string());
            tokio::task::spawn_blocking(move || unpack_blob(&store, &blob, &diff))
                .await
                .map_err(|e| ImageError::task("unpack task", e))??;
        }
        self.tracker.update(&desc.digest, Phase::Done, None);
        Ok(record)
    }

    /// Downloads one blob into the store, verifying size and digest.
    async fn fetch_blob(
        &self,
        client: &oci_client::Client,
        oref: &oci_client::Reference,
        desc: &OciDescriptor,
        tracker: Option<&Tracker>,
    ) -> Result<(), ImageError> {
        super::reference::validate_digest(&desc.digest).map_err(|why| {
            ImageError::BadContent(format!("blob digest {:?} {why}", desc.digest))
        })?;
        if self.store.has_blob(&desc.digest) {
            return Ok(());
        }
        if desc.size < 0 {
            return Err(ImageError::BadContent(format!(
                "blob {} has a negative size",
                desc.digest
            )));
        }
        let want = desc.size as u64;
        let stream = match client
            .pull_blob_stream_partial(oref, desc, 0, None)
            .await
            .map_err(map_oci)?
        {
            BlobResponse::Full(s) | BlobResponse::Partial(s) => s,
        };
        let tmp = self.store.ingest_path();
        let result = async {
            let mut file = tokio::fs::File::create(&tmp)
                .await
                .map_err(ImageError::io("ingest", &tmp))?;
            let mut hasher = Sha256::new();
            let mut got = 0u64;
            let mut stream = stream.stream;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| {
                    ImageError::Unavailable(format!("download of {}: {e}", desc.digest))
                })?;
                got += chunk.len() as u64;
                crate::metrics::global().image_bytes(chunk.len() as u64);
                if got > want {
                    return Err(ImageError::BadContent(format!(
                        "blob {} is larger than its {want} bytes",
                        desc.digest
                    )));
                }
                hasher.update(&chunk);
                file.write_all(&chunk)
                    .await
                    .map_err(ImageError::io("ingest", &tmp))?;
                if let Some(t) = tracker {
                    t.update(&desc.digest, Phase::Downloading, Some(got));
                }
            }
            if got != want {
                return Err(ImageError::BadContent(format!(
                    "blob {} is truncated: {got} of {want} bytes",
                    desc.digest
                )));
            }
            let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
            if actual != desc.digest {
                return Err(ImageError::DigestMismatch {
                    what: "blob".into(),
                    expected: desc.digest.clone(),
                    actual,
                });
            }
            file.sync_data()
                .await
                .map_err(ImageError::io("ingest", &tmp))?;
            drop(file);
            self.store.commit_blob(&tmp, &desc.digest)?;
            Ok(())
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        result
    }
}

/// Decompresses and unpacks a stored layer blob into a new snapshot,
/// checking the uncompressed digest against the config's diff id.
fn unpack_blob(store: &ImageStore, blob: &str, diff_id: &str) -> Result<(), ImageError> {
    let tmp = store.new_snapshot_tmp()?;
    let result = (|| {
        let path = store.blob_path(blob);
        let f = std::fs::File::open(&path).map_err(ImageError::io("open blob", &path))?;
        let mut r = BufReader::with_capacity(256 << 10, f);
        let magic = {
            let buf =
                std::io::BufRead::fill_buf(&mut r).map_err(ImageError::io("read blob", &path))?;
            buf.get(..4).map(<[u8]>::to_vec).unwrap_or_default()
        };
        let decoder: Box<dyn Read> = if magic.starts_with(&[0x1f, 0x8b]) {
            Box::new(flate2::read::MultiGzDecoder::new(r))
        } else if magic == [0x28, 0xb5, 0x2f, 0xfd] {
            Box::new(
                zstd::stream::read::Decoder::with_buffer(r)
                    .map_err(ImageError::io("zstd decoder for blob", &path))?,
            )
        } else {
            Box::new(r)
        };
        let mut hashing = HashingReader {
            inner: decoder,
            hasher: Sha256::new(),
        };
        unpack::unpack_layer(&mut hashing, &tmp.join("fs"))
            .map_err(|e| ImageError::BadContent(format!("layer {blob}: {e}")))?;
        std::io::copy(&mut hashing, &mut std::io::sink())
            .map_err(|e| ImageError::BadContent(format!("layer {blob}: {e}")))?;
        let actual = format!("sha256:{}", hex::encode(hashing.hasher.finalize()));
        if actual != diff_id {
            return Err(ImageError::DigestMismatch {
                what: format!("layer {blob} diff id"),
                expected: diff_id.into(),
                actual,
            });
        }
        store.commit_snapshot(&tmp, diff_id)?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
        // A blob that does not unpack is useless: drop it.
        let _ = std::fs::remove_file(store.blob_path(blob));
    }
    result
}

struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

fn select_platform(entries: &[IndexEntry]) -> Result<&IndexEntry, ImageError> {
    let pick = entries.iter().find(|e| {
        e.platform
            .as_ref()
            .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
            && matches!(e.media_type.as_str(), "" | OCI_MANIFEST | DOCKER_MANIFEST)
    });
    pick.ok_or_else(|| {
        let have: Vec<String> = entries
            .iter()
            .filter_map(|e| e.platform.as_ref())
            .map(|p| match &p.variant {
                Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
                None => format!("{}/{}", p.os, p.architecture),
            })
            .collect();
        ImageError::NotFound(format!(
            "no linux/amd64 image in the index (it has: {})",
            have.join(", ")
        ))
    })
}

/// The digests huskd would name store files after, from a manifest, an index or an image
/// config as a registry sends them (for the fuzz targets).
#[doc(hidden)]
pub fn fuzz_manifest(b: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(m) = serde_json::from_slice::<Manifest>(b) {
        if let Some(entries) = &m.manifests {
            if let Ok(e) = select_platform(entries)
                && check_digests([e.digest.as_str()]).is_ok()
            {
                out.push(e.digest.clone());
            }
        } else if m.schema_version == 2
            && let Some(c) = &m.config
        {
            let all = std::iter::once(c.digest.as_str())
                .chain(m.layers.iter().map(|l| l.digest.as_str()));
            if check_digests(all.clone()).is_ok() {
                out.extend(all.map(str::to_string));
            }
        }
    }
    if let Ok(c) = serde_json::from_slice::<ImageConfig>(b)
        && check_digests(c.rootfs.diff_ids.iter().map(String::as_str)).is_ok()
    {
        out.extend(c.rootfs.diff_ids);
    }
    out
}

/// Digests from a registry name files in the store (`blobs/sha256/HEX`, `snapshots/HEX`): only
/// `sha256:` and 64 lowercase hex digits is one (no `..`, `/` or absolute path, which would
/// make huskd take a host file for a blob it already has).
fn check_digests<'a>(digests: impl IntoIterator<Item = &'a str>) -> Result<(), ImageError> {
    for d in digests {
        let ok = d.strip_prefix("sha256:").is_some_and(|h| {
            h.len() == 64
                && h.bytes()
                    .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
        });
        if !ok {
            return Err(ImageError::BadContent(format!("invalid digest {d:?}")));
        }
    }
    Ok(())
}

fn verify_bytes(data: &[u8], digest: &str, what: &str) -> Result<(), ImageError> {
    let actual = format!("sha256:{}", hex::encode(Sha256::digest(data)));
    if actual != digest {
        return Err(ImageError::DigestMismatch {
            what: what.into(),
            expected: digest.into(),
            actual,
        });
    }
    Ok(())
}

fn make_client(host: &RegistryHost) -> Result<oci_client::Client, ImageError> {
    let mut certs = Vec::new();
    for p in &host.ca {
        let data =
            std::fs::read(p).map_err(|e| ImageError::Config(format!("ca {}: {e}", p.display())))?;
        certs.push(Certificate {
            encoding: CertificateEncoding::Pem,
            data,
        });
    }
    let config = ClientConfig {
        protocol: if host.plain_http {
            ClientProtocol::Http
        } else {
            ClientProtocol::Https
        },
        accept_invalid_certificates: host.skip_verify,
        extra_root_certificates: certs,
        platform_resolver: None,
        connect_timeout: Some(std::time::Duration::from_secs(10)),
        read_timeout: Some(std::time::Duration::from_secs(60)),
        ..Default::default()
    };
    oci_client::Client::try_from(config)
        .map_err(|e| ImageError::Config(format!("registry client for {}: {e}", host.host)))
}

/// Maps registry client errors onto husk's error kinds.
fn map_oci(e: OciDistributionError) -> ImageError {
    use OciDistributionError as E;
    match e {
        E::UnauthorizedError { url } => {
            ImageError::Unauthorized(format!("registry refused credentials for {url}"))
        }
        E::AuthenticationFailure(m) => {
            ImageError::Unauthorized(format!("registry authentication failed: {m}"))
        }
        E::ImageManifestNotFoundError(m) => ImageError::NotFound(m),
        E::RegistryError { envelope, url } => {
            let text = envelope
                .errors
                .iter()
                .map(|e| format!("{:?}: {}", e.code, e.message))
                .collect::<Vec<_>>()
                .join("; ");
            let notfound = envelope.errors.iter().any(|e| {
                use oci_client::errors::OciErrorCode as C;
                matches!(
                    e.code,
                    C::ManifestUnknown | C::NameUnknown | C::BlobUnknown | C::NotFound
                )
            });
            let denied = envelope.errors.iter().any(|e| {
                use oci_client::errors::OciErrorCode as C;
                matches!(e.code, C::Unauthorized | C::Denied)
            });
            if notfound {
                ImageError::NotFound(format!("{url}: {text}"))
            } else if denied {
                ImageError::Unauthorized(format!("{url}: {text}"))
            } else {
                ImageError::Registry(format!("{url}: {text}"))
            }
        }
        E::ServerError { code: 404, url, .. } => ImageError::NotFound(format!("{url}: not found")),
        E::ServerError {
            code: 401 | 403,
            url,
            message,
        } => ImageError::Unauthorized(format!("{url}: {message}")),
        E::ServerError { code, url, message } => {
            ImageError::Registry(format!("{url}: HTTP {code}: {message}"))
        }
        E::DigestError(d) => ImageError::BadContent(format!("digest check failed: {d}")),
        E::RequestError(r) => {
            ImageError::Unavailable(format!("registry unreachable: {}", error_chain(&r)))
        }
        E::UnsupportedMediaTypeError(m) => ImageError::Unsupported(format!("media type {m}")),
        E::UnsupportedSchemaVersionError(v) => {
            ImageError::Unsupported(format!("manifest schema version {v}"))
        }
        E::ManifestParsingError(m) | E::VersionedParsingError(m) => {
            ImageError::BadContent(format!("manifest: {m}"))
        }
        other => ImageError::Registry(other.to_string()),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

pub fn now_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

//! Test images built by our own code and pushed to a registry: layers from
//! entry lists (files, dirs, symlinks, hard links, whiteouts), gzip / zstd /
//! uncompressed, OCI or Docker schema2 manifests, and multi-arch indexes.

use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};
use sha2::{Digest as _, Sha256};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

#[derive(Clone, Debug)]
pub enum Entry {
    Dir(&'static str, u32),
    File(String, Vec<u8>, u32),
    /// File with owner uid/gid.
    Owned(String, Vec<u8>, u32, u64, u64),
    Symlink(String, String),
    Hardlink(String, String),
    /// Raw path bytes, unvalidated (for `../` attacks).
    RawFile(Vec<u8>, Vec<u8>),
}

pub fn file(path: &str, data: impl Into<Vec<u8>>) -> Entry {
    Entry::File(path.into(), data.into(), 0o644)
}

#[derive(Clone, Debug)]
pub struct Layer {
    pub entries: Vec<Entry>,
    pub compression: Compression,
}

pub struct BuiltLayer {
    pub blob: Vec<u8>,
    pub digest: String,
    pub diff_id: String,
    pub media_type: String,
}

pub fn sha(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// A GNU header with fixed owner and mtime (and no path yet).
fn new_header(kind: tar::EntryType, size: u64, mode: u32, uid: u64, gid: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_uid(uid);
    h.set_gid(gid);
    h.set_mtime(1_700_000_000);
    h
}

pub fn tar_of(entries: &[Entry]) -> Vec<u8> {
    use tar::EntryType as T;
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        match e {
            Entry::Dir(p, mode) => b
                .append_data(&mut new_header(T::Directory, 0, *mode, 0, 0), p, &[][..])
                .expect("dir"),
            Entry::File(p, d, mode) => b
                .append_data(
                    &mut new_header(T::Regular, d.len() as u64, *mode, 0, 0),
                    p,
                    &d[..],
                )
                .expect("file"),
            Entry::Owned(p, d, mode, uid, gid) => b
                .append_data(
                    &mut new_header(T::Regular, d.len() as u64, *mode, *uid, *gid),
                    p,
                    &d[..],
                )
                .expect("file"),
            Entry::Symlink(p, t) => b
                .append_link(&mut new_header(T::Symlink, 0, 0o777, 0, 0), p, t)
                .expect("symlink"),
            Entry::Hardlink(p, t) => b
                .append_link(&mut new_header(T::Link, 0, 0o644, 0, 0), p, t)
                .expect("hardlink"),
            Entry::RawFile(p, d) => {
                // Raw name bytes, bypassing the builder's path checks.
                let mut h = new_header(T::Regular, d.len() as u64, 0o644, 0, 0);
                let n = p.len().min(100);
                h.as_old_mut().name[..n].copy_from_slice(&p[..n]);
                h.set_cksum();
                b.append(&h, &d[..]).expect("raw");
            }
        }
    }
    b.into_inner().expect("tar")
}

pub fn build_layer(l: &Layer) -> BuiltLayer {
    let tar = tar_of(&l.entries);
    let diff_id = sha(&tar);
    let (blob, media_type) = match l.compression {
        Compression::None => (tar, "application/vnd.oci.image.layer.v1.tar"),
        Compression::Gzip => {
            use std::io::Write;
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(&tar).expect("gzip");
            (
                e.finish().expect("gzip"),
                "application/vnd.oci.image.layer.v1.tar+gzip",
            )
        }
        Compression::Zstd => (
            zstd::encode_all(&tar[..], 3).expect("zstd"),
            "application/vnd.oci.image.layer.v1.tar+zstd",
        ),
    };
    BuiltLayer {
        digest: sha(&blob),
        blob,
        diff_id,
        media_type: media_type.into(),
    }
}

/// A built image: blobs plus its manifest bytes.
pub struct BuiltImage {
    pub layers: Vec<BuiltLayer>,
    pub config: Vec<u8>,
    pub config_digest: String,
    pub manifest: Vec<u8>,
    pub manifest_digest: String,
    pub manifest_media_type: &'static str,
}

pub struct ImageSpec {
    pub layers: Vec<Layer>,
    pub user: &'static str,
    pub arch: &'static str,
    pub docker: bool,
}

impl Default for ImageSpec {
    fn default() -> Self {
        Self {
            layers: vec![],
            user: "",
            arch: "amd64",
            docker: false,
        }
    }
}

pub fn build_image(spec: &ImageSpec) -> BuiltImage {
    let layers: Vec<BuiltLayer> = spec.layers.iter().map(build_layer).collect();
    build_image_from(layers, spec)
}

/// Builds config and manifest around prebuilt layers (possibly tampered).
pub fn build_image_from(mut layers: Vec<BuiltLayer>, spec: &ImageSpec) -> BuiltImage {
    let config = serde_json::json!({
        "architecture": spec.arch,
        "os": "linux",
        "config": { "User": spec.user, "Env": ["PATH=/bin"], "Cmd": ["/bin/sh"] },
        "rootfs": { "type": "layers", "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>() },
    });
    let config = serde_json::to_vec(&config).expect("config");
    let config_digest = sha(&config);
    if spec.docker {
        for l in &mut layers {
            l.media_type = match l.media_type.as_str() {
                "application/vnd.oci.image.layer.v1.tar+gzip" => {
                    "application/vnd.docker.image.rootfs.diff.tar.gzip".into()
                }
                "application/vnd.oci.image.layer.v1.tar" => {
                    "application/vnd.docker.image.rootfs.diff.tar".into()
                }
                other => other.into(),
            };
        }
    }
    let (mt, cfg_mt) = if spec.docker {
        (
            DOCKER_MANIFEST,
            "application/vnd.docker.container.image.v1+json",
        )
    } else {
        (OCI_MANIFEST, "application/vnd.oci.image.config.v1+json")
    };
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": mt,
        "config": { "mediaType": cfg_mt, "digest": config_digest, "size": config.len() },
        "layers": layers.iter().map(|l| serde_json::json!({
            "mediaType": l.media_type, "digest": l.digest, "size": l.blob.len(),
        })).collect::<Vec<_>>(),
    });
    let manifest = serde_json::to_vec(&manifest).expect("manifest");
    BuiltImage {
        manifest_digest: sha(&manifest),
        manifest,
        manifest_media_type: mt,
        layers,
        config,
        config_digest,
    }
}

pub struct Pusher {
    pub client: Client,
    pub registry: String,
    pub auth: RegistryAuth,
}

impl Pusher {
    pub fn new(registry: &str, auth: Option<(&str, &str)>) -> Self {
        Self::with_protocol(registry, auth, false)
    }

    /// `https`: push over TLS, trusting any certificate (test registries).
    pub fn with_protocol(registry: &str, auth: Option<(&str, &str)>, https: bool) -> Self {
        let client = Client::new(oci_client::client::ClientConfig {
            protocol: if https {
                oci_client::client::ClientProtocol::Https
            } else {
                oci_client::client::ClientProtocol::Http
            },
            accept_invalid_certificates: https,
            use_monolithic_push: true,
            ..Default::default()
        });
        let auth = match auth {
            Some((u, p)) => RegistryAuth::Basic(u.into(), p.into()),
            None => RegistryAuth::Anonymous,
        };
        Self {
            client,
            registry: registry.into(),
            auth,
        }
    }

    fn reference(&self, repo: &str, tag: &str) -> Reference {
        Reference::with_tag(self.registry.clone(), repo.into(), tag.into())
    }

    async fn auth(&self, r: &Reference) -> anyhow::Result<()> {
        self.client
            .auth(r, &self.auth, RegistryOperation::Push)
            .await?;
        Ok(())
    }

    pub async fn push_blob(&self, repo: &str, data: &[u8], digest: &str) -> anyhow::Result<()> {
        let r = self.reference(repo, "latest");
        self.auth(&r).await?;
        self.client.push_blob(&r, data.to_vec(), digest).await?;
        Ok(())
    }

    /// Pushes an image's blobs and its manifest under `tag` (if any);
    /// returns the manifest digest.
    pub async fn push_image(
        &self,
        repo: &str,
        tag: Option<&str>,
        img: &BuiltImage,
    ) -> anyhow::Result<String> {
        for l in &img.layers {
            self.push_blob(repo, &l.blob, &l.digest).await?;
        }
        self.push_blob(repo, &img.config, &img.config_digest)
            .await?;
        let target = tag.unwrap_or(&img.manifest_digest);
        self.push_manifest(repo, target, &img.manifest, img.manifest_media_type)
            .await?;
        Ok(img.manifest_digest.clone())
    }

    pub async fn push_manifest(
        &self,
        repo: &str,
        tag_or_digest: &str,
        body: &[u8],
        media_type: &str,
    ) -> anyhow::Result<()> {
        let r = if tag_or_digest.starts_with("sha256:") {
            Reference::with_digest(self.registry.clone(), repo.into(), tag_or_digest.into())
        } else {
            self.reference(repo, tag_or_digest)
        };
        self.auth(&r).await?;
        self.client
            .push_manifest_raw(&r, body.to_vec(), http::HeaderValue::from_str(media_type)?)
            .await?;
        Ok(())
    }

    /// Pushes a multi-arch index of `(arch, image)` under `tag`; returns its digest.
    pub async fn push_index(
        &self,
        repo: &str,
        tag: &str,
        images: &[(&str, &BuiltImage)],
    ) -> anyhow::Result<String> {
        let mut entries = Vec::new();
        for (arch, img) in images {
            self.push_image(repo, None, img).await?;
            entries.push(serde_json::json!({
                "mediaType": img.manifest_media_type, "digest": img.manifest_digest, "size": img.manifest.len(),
                "platform": { "architecture": arch, "os": "linux" },
            }));
        }
        let index = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries,
        }))?;
        self.push_manifest(repo, tag, &index, OCI_INDEX).await?;
        Ok(sha(&index))
    }
}

/// A busybox rootfs layer from Debian's busybox-static, with applet links
/// and an /etc/passwd that names `nobody` (uid 65534).
pub fn busybox_layer(compression: Compression) -> anyhow::Result<Layer> {
    let bb = std::fs::read("/bin/busybox")
        .map_err(|e| anyhow::anyhow!("/bin/busybox: {e} (apt-get install busybox-static)"))?;
    let mut entries = vec![
        Entry::Dir("bin", 0o755),
        Entry::Dir("etc", 0o755),
        Entry::Dir("tmp", 0o1777),
        Entry::File("bin/busybox".into(), bb, 0o755),
        file(
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        ),
        file("etc/group", "root:x:0:\nnogroup:x:65534:\n"),
    ];
    for applet in [
        "sh", "echo", "cat", "ls", "sleep", "true", "false", "id", "env", "uname", "hostname",
        "ps", "wc", "head", "nc", "httpd", "stty", "mount",
    ] {
        entries.push(Entry::Symlink(format!("bin/{applet}"), "busybox".into()));
    }
    Ok(Layer {
        entries,
        compression,
    })
}

/// A layer of `size` pseudo-random (barely compressible) bytes in `files` files.
pub fn random_layer(seed: u64, size: usize, files: usize, compression: Compression) -> Layer {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let per = size / files.max(1);
    let mut entries = vec![];
    for i in 0..files {
        let mut data = Vec::with_capacity(per);
        while data.len() < per {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            // Half random, half text: compresses somewhat, like real binaries.
            if (data.len() / 4096) % 2 == 0 {
                data.extend_from_slice(&state.to_le_bytes());
            } else {
                data.extend_from_slice(b"husk-bench-");
            }
        }
        data.truncate(per);
        entries.push(Entry::File(format!("data/l{seed}/f{i}"), data, 0o644));
    }
    Layer {
        entries,
        compression,
    }
}

/// Replaces an image's config `Cmd` (and with it the config and manifest
/// digests), e.g. to make a pause image from busybox.
pub fn set_cmd(img: &mut BuiltImage, cmd: &[&str]) {
    let mut config: serde_json::Value = serde_json::from_slice(&img.config).expect("config json");
    config["config"]["Cmd"] = serde_json::json!(cmd);
    img.config = serde_json::to_vec(&config).expect("config");
    let old = std::mem::replace(&mut img.config_digest, sha(&img.config));
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&img.manifest).expect("manifest json");
    assert_eq!(manifest["config"]["digest"], old.as_str());
    manifest["config"]["digest"] = serde_json::json!(img.config_digest);
    manifest["config"]["size"] = serde_json::json!(img.config.len());
    img.manifest = serde_json::to_vec(&manifest).expect("manifest");
    img.manifest_digest = sha(&img.manifest);
}

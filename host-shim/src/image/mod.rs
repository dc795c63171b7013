//! The image service: references, registry hosts and credentials, pulls
//! into a content store, and layer snapshots used as overlay lower dirs.

pub mod auth;
pub mod block;
pub mod hosts;
pub mod progress;
pub mod pull;
pub mod reference;
pub mod store;
pub mod unpack;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};

use self::auth::Credentials;
use self::reference::ImageRef;
use self::store::{ImageRecord, ImageStore, StoreError, Usage};

#[derive(Debug, Clone, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Reference(#[from] reference::ReferenceError),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("image not found: {0}")]
    NotFound(String),
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{what} digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },
    #[error("bad image content: {0}")]
    BadContent(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("registry error: {0}")]
    Registry(String),
    #[error("registry configuration: {0}")]
    Config(String),
    /// The image store's files (`context`: where in a pull, or empty).
    #[error("image store: {source}{context}")]
    Store {
        #[source]
        source: Arc<StoreError>,
        context: String,
    },
    /// A file of the image store (a download, a blob being unpacked).
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: String,
        path: PathBuf,
        #[source]
        source: Arc<std::io::Error>,
    },
    /// A pull's or an unpack's task panicked or was cancelled.
    #[error("{what}: {source}")]
    Task {
        what: String,
        #[source]
        source: Arc<tokio::task::JoinError>,
    },
    /// The pull tried no registry host.
    #[error("no registry host to pull from")]
    NoHost,
}

impl ImageError {
    /// The same kind of error with `ctx` appended to its message.
    pub fn with_context(self, ctx: &str) -> Self {
        use ImageError as E;
        match self {
            E::Reference(r) => E::InvalidArgument(format!("{r} {ctx}")),
            E::InvalidArgument(m) => E::InvalidArgument(format!("{m} {ctx}")),
            E::NotFound(m) => E::NotFound(format!("{m} {ctx}")),
            E::Unauthorized(m) => E::Unauthorized(format!("{m} {ctx}")),
            E::Unavailable(m) => E::Unavailable(format!("{m} {ctx}")),
            E::DigestMismatch {
                what,
                expected,
                actual,
            } => E::DigestMismatch {
                what: format!("{what} {ctx}"),
                expected,
                actual,
            },
            E::BadContent(m) => E::BadContent(format!("{m} {ctx}")),
            E::Unsupported(m) => E::Unsupported(format!("{m} {ctx}")),
            E::Registry(m) => E::Registry(format!("{m} {ctx}")),
            E::Config(m) => E::Config(format!("{m} {ctx}")),
            E::Store { source, context } => E::Store {
                source,
                context: format!("{context} {ctx}"),
            },
            E::Io { op, path, source } => E::Io {
                op: format!("{op} {ctx}"),
                path,
                source,
            },
            E::Task { what, source } => E::Task {
                what: format!("{what} {ctx}"),
                source,
            },
            E::NoHost => E::NoHost,
        }
    }
}

impl ImageError {
    /// A file operation `op` on `path` failed.
    pub fn io(op: &str, path: &Path) -> impl FnOnce(std::io::Error) -> Self {
        let (op, path) = (op.to_string(), path.to_path_buf());
        move |e| ImageError::Io {
            op,
            path,
            source: Arc::new(e),
        }
    }

    pub fn task(what: &str, e: tokio::task::JoinError) -> Self {
        ImageError::Task {
            what: what.to_string(),
            source: Arc::new(e),
        }
    }
}

impl From<StoreError> for ImageError {
    fn from(e: StoreError) -> Self {
        ImageError::Store {
            source: Arc::new(e),
            context: String::new(),
        }
    }
}

impl From<hosts::HostsError> for ImageError {
    fn from(e: hosts::HostsError) -> Self {
        ImageError::Config(e.to_string())
    }
}

impl From<auth::AuthError> for ImageError {
    fn from(e: auth::AuthError) -> Self {
        match e {
            auth::AuthError::Invalid(m) => ImageError::InvalidArgument(m),
            other => ImageError::Config(other.to_string()),
        }
    }
}

/// Per-key async locks (one download/unpack per layer at a time).
#[derive(Default)]
pub struct KeyedLocks {
    map: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl KeyedLocks {
    pub async fn lock(&self, key: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let m = {
            let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
            map.retain(|_, v| Arc::strong_count(v) > 1);
            map.entry(key.to_string()).or_default().clone()
        };
        m.lock_owned().await
    }
}

#[derive(Debug, Clone)]
pub struct ImageSettings {
    pub root: PathBuf,
    /// Directory with `<registry>/hosts.toml` files.
    pub registry_config_dir: Option<PathBuf>,
    /// Docker `config.json` with registry credentials.
    pub docker_config: Option<PathBuf>,
    pub max_concurrent_downloads: usize,
}

type SharedPull = Shared<BoxFuture<'static, Result<ImageRecord, ImageError>>>;

/// Everything the CRI ImageService needs.
pub struct ImageService {
    store: Arc<ImageStore>,
    settings: ImageSettings,
    progress: progress::Registry,
    locks: KeyedLocks,
    inflight: Mutex<HashMap<String, SharedPull>>,
}

impl ImageService {
    pub fn open(settings: ImageSettings) -> Result<Arc<Self>, ImageError> {
        let store = ImageStore::open(&settings.root)?;
        Ok(Arc::new(Self {
            store,
            settings,
            progress: progress::Registry::default(),
            locks: KeyedLocks::default(),
            inflight: Mutex::default(),
        }))
    }

    pub fn store(&self) -> &Arc<ImageStore> {
        &self.store
    }

    /// Pulls `image`; concurrent pulls of the same reference share one
    /// download. Returns the stored image.
    pub async fn pull(
        self: &Arc<Self>,
        image: &str,
        creds: Option<Credentials>,
    ) -> Result<ImageRecord, ImageError> {
        let r = ImageRef::parse(image)?;
        let key = r.to_string();
        let fut = {
            let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
            match inflight.get(&key) {
                Some(f) => f.clone(),
                None => {
                    let this = self.clone();
                    let (r2, k2) = (r.clone(), key.clone());
                    let f = async move {
                        let res = this.do_pull(&r2, creds).await;
                        this.inflight
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(&k2);
                        res
                    }
                    .boxed()
                    .shared();
                    inflight.insert(key.clone(), f.clone());
                    f
                }
            }
        };
        // Run the shared pull in its own task so a cancelled RPC does not
        // abandon a pull others wait on.
        tokio::spawn(fut)
            .await
            .map_err(|e| ImageError::task("pull task", e))?
    }

    async fn do_pull(
        &self,
        r: &ImageRef,
        creds: Option<Credentials>,
    ) -> Result<ImageRecord, ImageError> {
        let key = r.to_string();
        let began = std::time::Instant::now();
        let tracker = self.progress.start(&key);
        let result = async {
            let auth = auth::resolve(
                creds.as_ref(),
                self.settings.docker_config.as_deref(),
                &r.registry,
            )?;
            let hosts =
                hosts::hosts_for(self.settings.registry_config_dir.as_deref(), &r.registry)?;
            let settings = pull::PullSettings {
                max_concurrent_downloads: self.settings.max_concurrent_downloads,
            };
            let pull = pull::Pull {
                store: &self.store,
                settings: &settings,
                image: r,
                auth: &auth,
                tracker: &tracker,
                locks: &self.locks,
            };
            pull.run(&hosts).await
        }
        .await;
        match &result {
            Ok(rec) => tracing::info!(image = %key, id = %rec.id, "pulled"),
            Err(e) => {
                tracing::warn!(image = %key, error = %e, "pull failed");
                // Free whatever the failed pull stored and no image uses.
                if let Err(gc) = self.store.gc() {
                    tracing::warn!(error = %gc, "gc after failed pull");
                }
            }
        }
        crate::metrics::global().image_pull(result.is_ok(), began.elapsed());
        tracker.finish(result.as_ref().err().map(ToString::to_string));
        self.progress.end(&key);
        result
    }

    /// Progress of an in-flight pull of `image`, if one is running.
    pub fn watch_pull(
        &self,
        image: &str,
    ) -> Result<Option<tokio::sync::watch::Receiver<progress::PullState>>, ImageError> {
        let key = ImageRef::parse(image)?.to_string();
        Ok(self.progress.watch(&key))
    }

    /// Images, optionally only those `filter` (a reference or id) names.
    pub fn list(&self, filter: Option<&str>) -> Vec<ImageRecord> {
        match filter.filter(|f| !f.is_empty()) {
            Some(f) => self.store.resolve(f).into_iter().collect(),
            None => self.store.images(),
        }
    }

    pub fn status(&self, spec: &str) -> Result<Option<ImageRecord>, ImageError> {
        if spec.trim().is_empty() {
            return Err(ImageError::InvalidArgument("image spec is empty".into()));
        }
        Ok(self.store.resolve(spec))
    }

    /// The image config blob as JSON.
    pub fn config_json(&self, rec: &ImageRecord) -> Result<serde_json::Value, ImageError> {
        let b = self.store.read_blob(&rec.id)?;
        serde_json::from_slice(&b).map_err(|e| ImageError::BadContent(format!("image config: {e}")))
    }

    /// Removes the image `spec` names (all its tags); `Ok(false)` if none.
    pub fn remove(&self, spec: &str) -> Result<bool, ImageError> {
        if spec.trim().is_empty() {
            return Err(ImageError::InvalidArgument("image spec is empty".into()));
        }
        match self.store.resolve(spec) {
            Some(rec) => {
                let removed = self.store.remove_image(&rec.id)?;
                if removed {
                    block::remove(self.store.root(), &rec.id);
                }
                Ok(removed)
            }
            None => Ok(false),
        }
    }

    pub fn usage(&self) -> Result<Usage, ImageError> {
        Ok(self.store.usage()?)
    }

    /// The image's rootfs as one read-only erofs file (VM sandbox), built
    /// on first use and cached.
    pub async fn block_image(&self, rec: &ImageRecord) -> Result<PathBuf, block::BlockError> {
        let _g = self.locks.lock(&format!("block:{}", rec.id)).await;
        let root = self.store.root().to_path_buf();
        let id = rec.id.clone();
        let lowers = self.lower_dirs(rec);
        tokio::task::spawn_blocking(move || block::ensure(&root, &id, &lowers))
            .await
            .unwrap_or_else(|e| {
                Err(block::BlockError::Build {
                    path: PathBuf::new(),
                    msg: format!("build task: {e}"),
                })
            })
    }

    /// The directory of the images' block files (created if missing): VMMs see it read-only.
    pub fn block_dir(&self) -> std::io::Result<PathBuf> {
        let d = block::image_path(self.store.root(), "x")
            .parent()
            .map(std::path::Path::to_path_buf)
            .unwrap_or_else(|| self.store.root().to_path_buf());
        std::fs::create_dir_all(&d)?;
        Ok(d)
    }

    /// Overlay lower dirs of an image, top layer first.
    pub fn lower_dirs(&self, rec: &ImageRecord) -> Vec<PathBuf> {
        rec.layers
            .iter()
            .rev()
            .map(|l| self.store.snapshot_fs(&l.diff_id))
            .collect()
    }
}

/// uid or user name from an image config `User` (`uid`, `uid:gid`, `name`, `name:group`).
pub fn split_user(user: &str) -> (Option<i64>, String) {
    let u = user.split(':').next().unwrap_or("");
    match u.parse::<i64>() {
        Ok(uid) => (Some(uid), String::new()),
        Err(_) => (None, u.to_string()),
    }
}

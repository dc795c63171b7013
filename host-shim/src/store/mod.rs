//! Persisted pod and container records under `<state_dir>/pods`:
//!
//! ```text
//! pods/<pod id>/pod.json
//! pods/<pod id>/containers/<container id>.json
//! ```
//!
//! Every write is atomic (temp file, fsync, rename), so a `kill -9` of huskd
//! leaves either the old or the new record, never a torn one.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `data` to `path` atomically.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), StoreError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", rand::random::<u32>()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io(path))
}

/// The record store.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(root).map_err(io(root))?;
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    pub fn pod_dir(&self, pod: &str) -> PathBuf {
        self.root.join(pod)
    }

    fn pod_file(&self, pod: &str) -> PathBuf {
        self.pod_dir(pod).join("pod.json")
    }

    fn container_file(&self, pod: &str, id: &str) -> PathBuf {
        self.pod_dir(pod)
            .join("containers")
            .join(format!("{id}.json"))
    }

    pub fn put_pod<T: Serialize>(&self, pod: &str, rec: &T) -> Result<(), StoreError> {
        put(&self.pod_file(pod), rec)
    }

    pub fn put_container<T: Serialize>(
        &self,
        pod: &str,
        id: &str,
        rec: &T,
    ) -> Result<(), StoreError> {
        put(&self.container_file(pod, id), rec)
    }

    /// The container's log copy progress (see `sandbox::logs`).
    pub fn log_progress(&self, pod: &str, id: &str) -> PathBuf {
        self.pod_dir(pod)
            .join("containers")
            .join(format!("{id}.progress"))
    }

    pub fn remove_container(&self, pod: &str, id: &str) -> Result<(), StoreError> {
        for p in [self.container_file(pod, id), self.log_progress(pod, id)] {
            match std::fs::remove_file(&p) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&p)(e)),
                _ => {}
            }
        }
        Ok(())
    }

    pub fn remove_pod(&self, pod: &str) -> Result<(), StoreError> {
        let p = self.pod_dir(pod);
        match std::fs::remove_dir_all(&p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(&p)(e)),
            _ => Ok(()),
        }
    }

    /// Every pod with its containers. Unreadable records are skipped with a
    /// warning (they are reported, not fatal: one torn file must not keep
    /// huskd from starting).
    pub fn load<P: DeserializeOwned, C: DeserializeOwned>(
        &self,
    ) -> Result<Vec<(P, Vec<C>)>, StoreError> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.root)
            .map_err(io(&self.root))?
            .flatten()
        {
            let dir = e.path();
            if !dir.is_dir() {
                continue;
            }
            let pod: P = match get(&dir.join("pod.json")) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(error = %e, "skipping unreadable pod record");
                    continue;
                }
            };
            let mut containers = Vec::new();
            for c in std::fs::read_dir(dir.join("containers"))
                .into_iter()
                .flatten()
                .flatten()
            {
                let p = c.path();
                if p.extension().is_some_and(|x| x == "json") {
                    match get(&p) {
                        Ok(rec) => containers.push(rec),
                        Err(e) => {
                            tracing::warn!(error = %e, "skipping unreadable container record")
                        }
                    }
                }
            }
            out.push((pod, containers));
        }
        Ok(out)
    }
}

fn put<T: Serialize>(path: &Path, rec: &T) -> Result<(), StoreError> {
    let data = serde_json::to_vec_pretty(rec).map_err(|source| StoreError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    write_atomic(path, &data)
}

fn get<T: DeserializeOwned>(path: &Path) -> Result<T, StoreError> {
    let data = std::fs::read(path).map_err(io(path))?;
    serde_json::from_slice(&data).map_err(|source| StoreError::Json {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn round_trip_and_atomic_overwrite() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        s.put_pod("p1", &serde_json::json!({"id": "p1"})).unwrap();
        s.put_container("p1", "c1", &serde_json::json!({"id": "c1", "n": 1}))
            .unwrap();
        s.put_container("p1", "c1", &serde_json::json!({"id": "c1", "n": 2}))
            .unwrap();
        // A garbage pod dir is skipped, not fatal.
        std::fs::create_dir_all(d.path().join("p2")).unwrap();
        std::fs::write(d.path().join("p2/pod.json"), b"{torn").unwrap();
        let all: Vec<(serde_json::Value, Vec<serde_json::Value>)> = s.load().unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].1[0]["n"], 2);
        // No temp files left behind.
        let names: Vec<_> = std::fs::read_dir(d.path().join("p1/containers"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        s.remove_container("p1", "c1").unwrap();
        s.remove_container("p1", "c1").unwrap();
        s.remove_pod("p1").unwrap();
        assert!(!d.path().join("p1").exists());
    }
}

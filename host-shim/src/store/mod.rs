//! Persisted pod and container records under `<state_dir>/pods`:
//!
//! ```text
//! pods/<pod id>/pod.json
//! pods/<pod id>/containers/<container id>.json
//! ```
//!
//! Every write is atomic (temp file, fsync, rename), so a `kill -9` of huskd
//! leaves either the old or the new record, never a torn one.
//!
//! Records hold container config (environment, i.e. secrets): files are 0600 and
//! directories 0700, and [`Store::open`] puts existing ones back to those modes.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
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

/// Mode of a record file (only huskd reads them).
pub const FILE_MODE: u32 = 0o600;
/// Mode of a directory of records.
pub const DIR_MODE: u32 = 0o700;

/// Makes `dir` and its missing parents with [`DIR_MODE`].
fn create_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
}

/// Writes `data` to `path` atomically, readable by root only ([`FILE_MODE`]).
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), StoreError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    create_dir(dir).map_err(io(dir))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", rand::random::<u32>()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(FILE_MODE)
            .open(&tmp)?;
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
    /// Opens (or makes) the store at `root`; records and directories made by an older huskd
    /// with wider modes are narrowed to [`FILE_MODE`]/[`DIR_MODE`].
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        create_dir(root).map_err(io(root))?;
        narrow_modes(root, 3).map_err(io(root))?;
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

/// Sets [`DIR_MODE`] on `dir` and, `depth` levels down (never following a symlink),
/// [`DIR_MODE`] on directories and [`FILE_MODE`] on files.
fn narrow_modes(dir: &Path, depth: usize) -> std::io::Result<()> {
    let set = |p: &Path, mode: u32| -> std::io::Result<()> {
        let m = std::fs::symlink_metadata(p)?;
        if m.permissions().mode() & 0o7777 != mode {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))?;
        }
        Ok(())
    };
    set(dir, DIR_MODE)?;
    if depth == 0 {
        return Ok(());
    }
    for e in std::fs::read_dir(dir)?.flatten() {
        let p = e.path();
        match e.file_type() {
            Ok(t) if t.is_dir() => narrow_modes(&p, depth - 1)?,
            Ok(t) if t.is_file() => set(&p, FILE_MODE)?,
            _ => {}
        }
    }
    Ok(())
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

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn records_are_root_only_and_old_modes_are_narrowed() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("pods");
        let s = Store::open(&root).unwrap();
        s.put_pod("p1", &serde_json::json!({"id": "p1"})).unwrap();
        s.put_container("p1", "c1", &serde_json::json!({"env": ["SECRET=x"]}))
            .unwrap();
        assert_eq!(mode(&root), DIR_MODE);
        assert_eq!(mode(&root.join("p1")), DIR_MODE);
        assert_eq!(mode(&root.join("p1/containers")), DIR_MODE);
        assert_eq!(mode(&root.join("p1/pod.json")), FILE_MODE);
        assert_eq!(mode(&root.join("p1/containers/c1.json")), FILE_MODE);
        // What an older huskd left (0755 dirs, 0644 files) is narrowed on open.
        let set = |p: &Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
        };
        set(&root, 0o755);
        set(&root.join("p1"), 0o755);
        set(&root.join("p1/containers"), 0o755);
        set(&root.join("p1/pod.json"), 0o644);
        set(&root.join("p1/containers/c1.json"), 0o644);
        std::fs::write(root.join("p1/containers/c1.progress"), b"").unwrap();
        set(&root.join("p1/containers/c1.progress"), 0o644);
        // A symlink planted in the store is not followed.
        let outside = d.path().join("outside");
        std::fs::write(&outside, b"").unwrap();
        set(&outside, 0o644);
        std::os::unix::fs::symlink(&outside, root.join("p1/link")).unwrap();
        let _s = Store::open(&root).unwrap();
        assert_eq!(mode(&root), DIR_MODE);
        assert_eq!(mode(&root.join("p1")), DIR_MODE);
        assert_eq!(mode(&root.join("p1/containers")), DIR_MODE);
        assert_eq!(mode(&root.join("p1/pod.json")), FILE_MODE);
        assert_eq!(mode(&root.join("p1/containers/c1.json")), FILE_MODE);
        assert_eq!(mode(&root.join("p1/containers/c1.progress")), FILE_MODE);
        assert_eq!(mode(&outside), 0o644);
    }
}

//! The image store on disk (under `<state_dir>/images`):
//!
//! ```text
//! blobs/sha256/<hex>        verified content (manifests, configs, layer blobs)
//! ingest/<random>           downloads in progress (removed at open)
//! snapshots/<hex>/fs        one unpacked layer, keyed by its diff id (overlay lower dir)
//! snapshots/.tmp-<random>   unpacks in progress (removed at open)
//! index.json                image records, replaced atomically
//! ```
//! An image becomes visible only when its record is written, after every
//! blob and snapshot it names exists, so a crash mid-pull leaves no half
//! image; what it left behind is garbage-collected at the next open.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::reference::{ImageRef, as_image_id};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("image store {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("image index {path} is corrupt: {source}")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LayerRecord {
    /// Digest of the (compressed) blob.
    pub digest: String,
    pub media_type: String,
    pub size: u64,
    /// Digest of the uncompressed tar (the snapshot key).
    pub diff_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageRecord {
    /// `sha256:<config digest>`.
    pub id: String,
    pub repo_tags: Vec<String>,
    pub repo_digests: Vec<String>,
    /// The platform manifest's digest.
    pub manifest_digest: String,
    /// The index digest when the image came from an index.
    #[serde(default)]
    pub index_digest: Option<String>,
    pub manifest_media_type: String,
    pub layers: Vec<LayerRecord>,
    /// Bytes of all blobs (manifest, config, layers).
    pub size: u64,
    /// `User` from the image config, as written there.
    pub user: String,
    /// Unix nanoseconds of the pull.
    pub pulled_at: i64,
    #[serde(default)]
    pub pinned: bool,
}

impl ImageRecord {
    /// Every blob the image references.
    pub fn blobs(&self) -> impl Iterator<Item = &str> {
        self.layers
            .iter()
            .map(|l| l.digest.as_str())
            .chain([self.id.as_str(), self.manifest_digest.as_str()])
            .chain(self.index_digest.as_deref())
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Index {
    version: u32,
    images: BTreeMap<String, ImageRecord>,
}

/// Disk usage of the store.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Usage {
    pub bytes: u64,
    pub inodes: u64,
}

pub struct ImageStore {
    root: PathBuf,
    index: Mutex<Index>,
    /// Digests an ongoing pull is writing; GC leaves them alone.
    leases: Mutex<HashMap<String, usize>>,
}

/// Holds digests against GC while a pull is in progress.
pub struct Lease {
    store: Arc<ImageStore>,
    digests: Vec<String>,
}

impl Lease {
    pub fn add(&mut self, digest: &str) {
        *self
            .store
            .leases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(digest.to_string())
            .or_default() += 1;
        self.digests.push(digest.to_string());
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut leases = self.store.leases.lock().unwrap_or_else(|e| e.into_inner());
        for d in &self.digests {
            if let Some(n) = leases.get_mut(d) {
                *n -= 1;
                if *n == 0 {
                    leases.remove(d);
                }
            }
        }
    }
}

pub fn hex_of(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

impl ImageStore {
    /// Opens (creating if needed) the store at `root`, dropping leftovers of
    /// interrupted pulls.
    pub fn open(root: &Path) -> Result<Arc<Self>, StoreError> {
        for d in ["blobs/sha256", "ingest", "snapshots"] {
            let p = root.join(d);
            fs::create_dir_all(&p).map_err(io_at(&p))?;
        }
        let ingest = root.join("ingest");
        for e in fs::read_dir(&ingest).map_err(io_at(&ingest))?.flatten() {
            let _ = fs::remove_file(e.path());
        }
        let snaps = root.join("snapshots");
        for e in fs::read_dir(&snaps).map_err(io_at(&snaps))?.flatten() {
            if e.file_name().to_string_lossy().starts_with(".tmp-") {
                let _ = fs::remove_dir_all(e.path());
            }
        }
        // Half-built VM block images (image/block.rs) of a killed huskd.
        for e in fs::read_dir(root.join("blocks"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with(".tmp-") {
                let _ = fs::remove_file(e.path());
            } else if n.starts_with(".mnt-") {
                let _ = fs::remove_dir(e.path());
            }
        }
        let index_path = root.join("index.json");
        let index = match fs::read(&index_path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|source| StoreError::Corrupt {
                path: index_path,
                source,
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Index {
                version: 1,
                ..Default::default()
            },
            Err(e) => return Err(io_at(&index_path)(e)),
        };
        let store = Arc::new(Self {
            root: root.to_path_buf(),
            index: Mutex::new(index),
            leases: Mutex::default(),
        });
        store.gc()?;
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn lease(self: &Arc<Self>) -> Lease {
        Lease {
            store: self.clone(),
            digests: vec![],
        }
    }

    pub fn blob_path(&self, digest: &str) -> PathBuf {
        self.root.join("blobs/sha256").join(hex_of(digest))
    }

    pub fn has_blob(&self, digest: &str) -> bool {
        self.blob_path(digest).exists()
    }

    /// A fresh temp file path for a download.
    pub fn ingest_path(&self) -> PathBuf {
        self.root
            .join("ingest")
            .join(format!("{:016x}", rand::random::<u64>()))
    }

    /// Moves a verified download into place.
    pub fn commit_blob(&self, tmp: &Path, digest: &str) -> Result<(), StoreError> {
        let dst = self.blob_path(digest);
        fs::rename(tmp, &dst).map_err(io_at(&dst))
    }

    /// Writes small verified content (manifests) directly.
    pub fn write_blob(&self, data: &[u8], digest: &str) -> Result<(), StoreError> {
        if self.has_blob(digest) {
            return Ok(());
        }
        let tmp = self.ingest_path();
        write_synced(&tmp, data)?;
        self.commit_blob(&tmp, digest)
    }

    pub fn read_blob(&self, digest: &str) -> Result<Vec<u8>, StoreError> {
        let p = self.blob_path(digest);
        fs::read(&p).map_err(io_at(&p))
    }

    pub fn snapshot_fs(&self, diff_id: &str) -> PathBuf {
        self.root.join("snapshots").join(hex_of(diff_id)).join("fs")
    }

    pub fn has_snapshot(&self, diff_id: &str) -> bool {
        self.snapshot_fs(diff_id).is_dir()
    }

    /// A fresh directory to unpack into; commit it with [`Self::commit_snapshot`].
    pub fn new_snapshot_tmp(&self) -> Result<PathBuf, StoreError> {
        let p = self
            .root
            .join("snapshots")
            .join(format!(".tmp-{:016x}", rand::random::<u64>()));
        fs::create_dir_all(p.join("fs")).map_err(io_at(&p))?;
        Ok(p)
    }

    /// Records the snapshot's usage and moves it into place. If another pull
    /// committed the same layer first, this copy is dropped.
    pub fn commit_snapshot(&self, tmp: &Path, diff_id: &str) -> Result<(), StoreError> {
        let usage = dir_usage(&tmp.join("fs")).map_err(io_at(tmp))?;
        let json = serde_json::to_vec(&usage).unwrap_or_default();
        fs::write(tmp.join("usage.json"), json).map_err(io_at(tmp))?;
        let dst = self.root.join("snapshots").join(hex_of(diff_id));
        match fs::rename(tmp, &dst) {
            Ok(()) => Ok(()),
            Err(_) if dst.join("fs").is_dir() => {
                let _ = fs::remove_dir_all(tmp);
                Ok(())
            }
            Err(e) => Err(io_at(&dst)(e)),
        }
    }

    pub fn images(&self) -> Vec<ImageRecord> {
        self.index
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .images
            .values()
            .cloned()
            .collect()
    }

    /// Finds an image by id (full or unique prefix of ≥ 12 hex digits),
    /// by `name:tag`, or by `name@digest`.
    pub fn resolve(&self, spec: &str) -> Option<ImageRecord> {
        let index = self.index.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(id) = as_image_id(spec)
            && let Some(r) = index.images.get(&id)
        {
            return Some(r.clone());
        }
        let hex = spec.strip_prefix("sha256:").unwrap_or(spec);
        if hex.len() >= 12 && hex.len() < 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            let mut hits = index
                .images
                .values()
                .filter(|r| hex_of(&r.id).starts_with(hex));
            if let (Some(r), None) = (hits.next(), hits.next()) {
                return Some(r.clone());
            }
        }
        let r = ImageRef::parse(spec).ok()?;
        let by_digest = r.digest.as_ref().map(|d| r.with_digest(d));
        let by_tag = if r.digest.is_none() { r.tagged() } else { None };
        index
            .images
            .values()
            .find(|i| {
                by_digest
                    .as_ref()
                    .is_some_and(|d| i.repo_digests.contains(d))
                    || by_tag.as_ref().is_some_and(|t| i.repo_tags.contains(t))
            })
            .cloned()
    }

    /// Adds (or merges into) an image record and makes `tag` point at it,
    /// taking the tag from any other image. Images left without names are
    /// removed. Returns the stored record.
    pub fn put_image(
        &self,
        mut rec: ImageRecord,
        tag: Option<&str>,
        repo_digest: &str,
    ) -> Result<ImageRecord, StoreError> {
        let stored = {
            let mut index = self.index.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(t) = tag {
                for other in index.images.values_mut().filter(|o| o.id != rec.id) {
                    other.repo_tags.retain(|x| x != t);
                }
            }
            index.images.retain(|_, o| {
                o.id == rec.id || !o.repo_tags.is_empty() || !o.repo_digests.is_empty()
            });
            if let Some(old) = index.images.remove(&rec.id) {
                rec.repo_tags = old.repo_tags;
                rec.repo_digests = old.repo_digests;
                rec.pinned |= old.pinned;
            }
            if let Some(t) = tag
                && !rec.repo_tags.iter().any(|x| x == t)
            {
                rec.repo_tags.push(t.to_string());
            }
            if !rec.repo_digests.iter().any(|x| x == repo_digest) {
                rec.repo_digests.push(repo_digest.to_string());
            }
            index.images.insert(rec.id.clone(), rec.clone());
            self.persist(&index)?;
            rec
        };
        self.gc()?;
        Ok(stored)
    }

    /// Removes an image record; returns whether it existed. Content no other
    /// image uses is freed.
    pub fn remove_image(&self, id: &str) -> Result<bool, StoreError> {
        let existed = {
            let mut index = self.index.lock().unwrap_or_else(|e| e.into_inner());
            let existed = index.images.remove(id).is_some();
            if existed {
                self.persist(&index)?;
            }
            existed
        };
        if existed {
            self.gc()?;
        }
        Ok(existed)
    }

    fn persist(&self, index: &Index) -> Result<(), StoreError> {
        let path = self.root.join("index.json");
        let tmp = self.root.join("index.json.tmp");
        let data = serde_json::to_vec_pretty(index).unwrap_or_default();
        write_synced(&tmp, &data)?;
        fs::rename(&tmp, &path).map_err(io_at(&path))?;
        if let Ok(d) = fs::File::open(&self.root) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// Deletes blobs and snapshots no image references and no pull holds.
    pub fn gc(&self) -> Result<(), StoreError> {
        let (blobs, snaps): (HashSet<String>, HashSet<String>) = {
            let index = self.index.lock().unwrap_or_else(|e| e.into_inner());
            let leases = self.leases.lock().unwrap_or_else(|e| e.into_inner());
            let mut blobs: HashSet<String> = leases.keys().map(|d| hex_of(d).to_string()).collect();
            let mut snaps = blobs.clone();
            for img in index.images.values() {
                blobs.extend(img.blobs().map(|d| hex_of(d).to_string()));
                snaps.extend(img.layers.iter().map(|l| hex_of(&l.diff_id).to_string()));
            }
            (blobs, snaps)
        };
        let bdir = self.root.join("blobs/sha256");
        for e in fs::read_dir(&bdir).map_err(io_at(&bdir))?.flatten() {
            if !blobs.contains(e.file_name().to_string_lossy().as_ref()) {
                tracing::debug!(blob = %e.file_name().to_string_lossy(), "gc: removing blob");
                let _ = fs::remove_file(e.path());
            }
        }
        let sdir = self.root.join("snapshots");
        for e in fs::read_dir(&sdir).map_err(io_at(&sdir))?.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if !name.starts_with(".tmp-") && !snaps.contains(&name) {
                tracing::debug!(snapshot = %name, "gc: removing snapshot");
                let _ = fs::remove_dir_all(e.path());
            }
        }
        Ok(())
    }

    /// Bytes and inodes the store uses: blob sizes plus the usage recorded
    /// for each snapshot when it was unpacked.
    pub fn usage(&self) -> Result<Usage, StoreError> {
        let mut u = Usage::default();
        let bdir = self.root.join("blobs/sha256");
        for e in fs::read_dir(&bdir).map_err(io_at(&bdir))?.flatten() {
            if let Ok(m) = e.metadata() {
                u.bytes += m.blocks() * 512;
                u.inodes += 1;
            }
        }
        let sdir = self.root.join("snapshots");
        for e in fs::read_dir(&sdir).map_err(io_at(&sdir))?.flatten() {
            if let Ok(b) = fs::read(e.path().join("usage.json"))
                && let Ok(s) = serde_json::from_slice::<Usage>(&b)
            {
                u.bytes += s.bytes;
                u.inodes += s.inodes;
            }
        }
        if let Ok(m) = fs::metadata(self.root.join("index.json")) {
            u.bytes += m.blocks() * 512;
            u.inodes += 1;
        }
        Ok(u)
    }
}

fn write_synced(path: &Path, data: &[u8]) -> Result<(), StoreError> {
    let mut f = fs::File::create(path).map_err(io_at(path))?;
    f.write_all(data).map_err(io_at(path))?;
    f.sync_all().map_err(io_at(path))
}

/// Disk usage of a tree: allocated bytes and distinct inodes (hard links once).
pub fn dir_usage(root: &Path) -> io::Result<Usage> {
    let mut seen = HashSet::new();
    let mut u = Usage::default();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let m = fs::symlink_metadata(&p)?;
        if seen.insert((m.dev(), m.ino())) {
            u.bytes += m.blocks() * 512;
            u.inodes += 1;
        }
        if m.is_dir() {
            for e in fs::read_dir(&p)? {
                stack.push(e?.path());
            }
        }
    }
    Ok(u)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, layer: &str) -> ImageRecord {
        ImageRecord {
            id: id.into(),
            repo_tags: vec![],
            repo_digests: vec![],
            manifest_digest: format!("sha256:{}", "0".repeat(64)),
            index_digest: None,
            manifest_media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            layers: vec![LayerRecord {
                digest: layer.into(),
                media_type: "x".into(),
                size: 1,
                diff_id: layer.into(),
            }],
            size: 1,
            user: String::new(),
            pulled_at: 0,
            pinned: false,
        }
    }

    #[test]
    fn tags_move_and_gc_frees_unreferenced_content() {
        let d = tempfile::tempdir().unwrap();
        let s = ImageStore::open(d.path()).unwrap();
        let (a, b) = (
            format!("sha256:{}", "a".repeat(64)),
            format!("sha256:{}", "b".repeat(64)),
        );
        let (la, lb) = (
            format!("sha256:{}", "1".repeat(64)),
            format!("sha256:{}", "2".repeat(64)),
        );
        let mut lease = s.lease();
        for l in [&la, &lb] {
            lease.add(l);
            s.write_blob(b"layer", l).unwrap();
            let t = s.new_snapshot_tmp().unwrap();
            s.commit_snapshot(&t, l).unwrap();
        }
        s.put_image(
            rec(&a, &la),
            Some("docker.io/library/x:1"),
            "docker.io/library/x@sha256:aa",
        )
        .unwrap();
        assert!(s.resolve("x:1").is_some());
        assert!(s.resolve(&a).is_some());
        assert!(s.resolve(&"a".repeat(12)).is_some(), "unique id prefix");
        // The tag moves to b; a keeps its digest name, so it stays.
        s.put_image(
            rec(&b, &lb),
            Some("docker.io/library/x:1"),
            "docker.io/library/x@sha256:bb",
        )
        .unwrap();
        assert_eq!(s.resolve("x:1").unwrap().id, b);
        assert!(
            s.resolve("docker.io/library/x@sha256:aa").is_none(),
            "not a valid digest ref"
        );
        assert_eq!(s.images().len(), 2);
        drop(lease);
        assert!(s.remove_image(&a).unwrap());
        assert!(
            !s.has_blob(&la) && !s.has_snapshot(&la),
            "a's content freed"
        );
        assert!(s.has_blob(&lb) && s.has_snapshot(&lb));
        // Reopen: the index survives.
        drop(s);
        let s = ImageStore::open(d.path()).unwrap();
        assert_eq!(s.images().len(), 1);
        assert!(s.usage().unwrap().bytes > 0);
    }

    #[test]
    fn open_drops_interrupted_work() {
        let d = tempfile::tempdir().unwrap();
        let s = ImageStore::open(d.path()).unwrap();
        let tmp = s.ingest_path();
        fs::write(&tmp, "partial").unwrap();
        let snap = s.new_snapshot_tmp().unwrap();
        s.write_blob(b"orphan", &format!("sha256:{}", "c".repeat(64)))
            .unwrap();
        drop(s);
        let _s = ImageStore::open(d.path()).unwrap();
        assert!(!tmp.exists() && !snap.exists());
        assert_eq!(
            fs::read_dir(d.path().join("blobs/sha256")).unwrap().count(),
            0,
            "orphan blob collected"
        );
    }
}

//! Read-only block images of image rootfs for the VM sandbox: an image's
//! layer snapshots, merged the way overlayfs merges them (whiteouts and
//! opaque dirs applied), written once into one erofs file per image and
//! cached beside the snapshots. The guest mounts it (virtio-blk) under an
//! overlay with a per-container writable upper dir, so no image bytes are
//! copied through the agent.
//!
//! The merge happens in a private mount namespace of a short-lived child
//! (`unshare --mount`), so a huskd killed mid-build leaves no mount behind;
//! the result is written to a temp file and renamed into place.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::store::hex_of;

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("image has no layers")]
    NoLayers,
    #[error("{tool} is needed to build VM rootfs images (apt install {package}): {source}")]
    MissingTool {
        tool: &'static str,
        package: &'static str,
        source: std::io::Error,
    },
    #[error("build block image {path}: {msg}")]
    Build { path: PathBuf, msg: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The cached block image of image `image_id` (`sha256:<hex>`).
pub fn image_path(root: &Path, image_id: &str) -> PathBuf {
    root.join("blocks")
        .join(format!("{}.erofs", hex_of(image_id)))
}

/// Builds (or reuses) the erofs image of the layers `lower_dirs` (top layer
/// first). The caller serialises builds of one image.
pub fn ensure(root: &Path, image_id: &str, lower_dirs: &[PathBuf]) -> Result<PathBuf, BlockError> {
    let dst = image_path(root, image_id);
    if dst.is_file() {
        return Ok(dst);
    }
    if lower_dirs.is_empty() {
        return Err(BlockError::NoLayers);
    }
    let dir = dst.parent().unwrap_or(root).to_path_buf();
    std::fs::create_dir_all(&dir).map_err(|source| BlockError::Io {
        path: dir.clone(),
        source,
    })?;
    let tmp = dir.join(format!(".tmp-{:016x}.erofs", rand::random::<u64>()));
    let mnt = dir.join(format!(".mnt-{:016x}", rand::random::<u64>()));
    let started = std::time::Instant::now();
    let result = build(&tmp, &mnt, lower_dirs);
    let _ = std::fs::remove_dir(&mnt);
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, &dst).map_err(|source| BlockError::Io {
        path: dst.clone(),
        source,
    })?;
    let size = std::fs::metadata(&dst).map(|m| m.len()).unwrap_or(0);
    tracing::info!(image = image_id, path = %dst.display(), size, elapsed_ms = started.elapsed().as_millis() as u64, "built VM rootfs block image");
    Ok(dst)
}

/// Removes the cached block image of an image (when the image is removed).
pub fn remove(root: &Path, image_id: &str) {
    let p = image_path(root, image_id);
    if let Err(e) = std::fs::remove_file(&p)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(path = %p.display(), error = %e, "remove block image");
    }
}

fn build(tmp: &Path, mnt: &Path, lower_dirs: &[PathBuf]) -> Result<(), BlockError> {
    let fail = |msg: String| BlockError::Build {
        path: tmp.to_path_buf(),
        msg,
    };
    for d in lower_dirs {
        let s = d.to_string_lossy();
        if s.contains(':') || s.contains(',') || s.contains('\'') {
            return Err(fail(format!("unusable layer path {s:?}")));
        }
    }
    // One layer is used as is (an overlay needs two lower dirs without an
    // upper); several are merged by a read-only overlay mount.
    let source = if lower_dirs.len() == 1 {
        lower_dirs[0].clone()
    } else {
        std::fs::create_dir_all(mnt).map_err(|source| BlockError::Io {
            path: mnt.to_path_buf(),
            source,
        })?;
        mnt.to_path_buf()
    };
    let lower = lower_dirs
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(":");
    // -T0 + --all-root would lose owners and times: keep both from the tree.
    let mkfs = format!(
        "exec mkfs.erofs -Enoinline_data '{}' '{}'",
        tmp.display(),
        source.display()
    );
    let script = if lower_dirs.len() == 1 {
        mkfs
    } else {
        format!(
            "mount -t overlay overlay -o ro,lowerdir='{lower}' '{}' && {mkfs}",
            mnt.display()
        )
    };
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .map_err(|source| BlockError::MissingTool {
            tool: "unshare",
            package: "util-linux",
            source,
        })?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("mkfs.erofs: not found") || err.contains("mkfs.erofs: No such file") {
            return Err(BlockError::MissingTool {
                tool: "mkfs.erofs",
                package: "erofs-utils",
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            });
        }
        let tail: Vec<&str> = err.lines().rev().take(4).collect();
        return Err(fail(format!(
            "{}: {}",
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join("; ")
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};

    fn is_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    fn have_mkfs() -> bool {
        Command::new("mkfs.erofs").arg("--help").output().is_ok()
    }

    /// path → (mode, uid, gid, size, content or link target)
    fn walk(root: &Path) -> BTreeMap<String, (u32, u32, u32, String)> {
        fn rec(root: &Path, dir: &Path, out: &mut BTreeMap<String, (u32, u32, u32, String)>) {
            let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().flatten().collect();
            entries.sort_by_key(|e| e.file_name());
            for e in entries {
                let p = e.path();
                let md = std::fs::symlink_metadata(&p).unwrap();
                let rel = p.strip_prefix(root).unwrap().display().to_string();
                let body = if md.file_type().is_symlink() {
                    format!("-> {}", std::fs::read_link(&p).unwrap().display())
                } else if md.is_file() {
                    String::from_utf8_lossy(&std::fs::read(&p).unwrap()).into_owned()
                } else {
                    String::new()
                };
                out.insert(rel, (md.mode(), md.uid(), md.gid(), body));
                if md.is_dir() {
                    rec(root, &p, out);
                }
            }
        }
        let mut out = BTreeMap::new();
        rec(root, root, &mut out);
        out
    }

    fn whiteout(p: &Path) {
        nix::sys::stat::mknod(
            p,
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::empty(),
            0,
        )
        .unwrap();
    }

    /// Two layers with a whiteout, an opaque dir, owners, modes, a symlink
    /// and a hard link; the block image, mounted back, must show exactly the
    /// merged tree file by file.
    #[test]
    fn erofs_image_matches_merged_layers() {
        if !is_root() || !have_mkfs() {
            println!("skipped: needs root and mkfs.erofs");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let base = t.path().join("l0");
        let top = t.path().join("l1");
        for d in [&base, &top] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::create_dir_all(base.join("etc")).unwrap();
        std::fs::write(base.join("etc/passwd"), "root:x:0:0::/root:/bin/sh\n").unwrap();
        std::fs::write(base.join("etc/gone"), "deleted above").unwrap();
        std::fs::create_dir_all(base.join("opaque/old")).unwrap();
        std::fs::write(base.join("opaque/old/f"), "hidden").unwrap();
        std::fs::write(base.join("bin-tool"), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(
            base.join("bin-tool"),
            std::fs::Permissions::from_mode(0o4755),
        )
        .unwrap();
        std::fs::hard_link(base.join("bin-tool"), base.join("bin-link")).unwrap();
        std::os::unix::fs::chown(base.join("etc/passwd"), Some(1000), Some(2000)).unwrap();
        std::fs::create_dir_all(top.join("etc")).unwrap();
        whiteout(&top.join("etc/gone"));
        std::fs::write(top.join("etc/new"), "added").unwrap();
        std::fs::create_dir_all(top.join("opaque")).unwrap();
        std::fs::set_permissions(top.join("opaque"), std::fs::Permissions::from_mode(0o750))
            .unwrap();
        xattr_set(&top.join("opaque"), "trusted.overlay.opaque", b"y");
        std::fs::write(top.join("opaque/new"), "visible").unwrap();
        symlink("../etc/new", top.join("link")).unwrap();

        let root = t.path().join("store");
        let img = ensure(&root, "sha256:abc", &[top.clone(), base.clone()]).expect("build");
        assert_eq!(img, image_path(&root, "sha256:abc"));
        // Cached: a second call reuses the file.
        let ino = std::fs::metadata(&img).unwrap().ino();
        ensure(&root, "sha256:abc", &[top.clone(), base.clone()]).unwrap();
        assert_eq!(std::fs::metadata(&img).unwrap().ino(), ino);

        // Mount the image and the reference overlay in a private namespace
        // and compare the two listings.
        let out_img = t.path().join("img.txt");
        let out_ovl = t.path().join("ovl.txt");
        let m1 = t.path().join("m1");
        let m2 = t.path().join("m2");
        std::fs::create_dir_all(&m1).unwrap();
        std::fs::create_dir_all(&m2).unwrap();
        let script = format!(
            "mount -t erofs -o ro,loop '{img}' '{m1}' && mount -t overlay overlay -o ro,lowerdir='{top}:{base}' '{m2}' && \
             cd '{m1}' && find . \\( -type d -printf '%p d %m %U %G %Ts\\n' \\) -o -printf '%p %y %m %U %G %Ts %s %l\\n' | sort > '{oi}' && md5sum $(find . -type f | sort) >> '{oi}' && \
             cd '{m2}' && find . \\( -type d -printf '%p d %m %U %G %Ts\\n' \\) -o -printf '%p %y %m %U %G %Ts %s %l\\n' | sort > '{oo}' && md5sum $(find . -type f | sort) >> '{oo}'",
            img = img.display(),
            m1 = m1.display(),
            m2 = m2.display(),
            top = top.display(),
            base = base.display(),
            oi = out_img.display(),
            oo = out_ovl.display(),
        );
        let st = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .status()
            .unwrap();
        assert!(st.success(), "mount back failed");
        let a = std::fs::read_to_string(&out_img).unwrap();
        let b = std::fs::read_to_string(&out_ovl).unwrap();
        assert_eq!(a, b, "erofs image differs from the merged layers");
        assert!(a.contains("./etc/new f 644 0 0 "), "{a}");
        assert!(a.contains("./etc/passwd f 644 1000 2000 "), "{a}");
        assert!(a.contains("./bin-tool f 4755"), "{a}");
        assert!(a.contains(" 10 ../etc/new"), "{a}");
        assert!(a.contains("./opaque d 750"), "{a}");
        assert!(!a.contains("gone"), "whiteout not applied: {a}");
        assert!(!a.contains("opaque/old"), "opaque dir not applied: {a}");
        // Sanity on our own walker: the top layer alone still has the whiteout.
        assert!(walk(&top).contains_key("etc/gone"));

        remove(&root, "sha256:abc");
        assert!(!img.exists());
        assert!(matches!(
            ensure(&root, "sha256:none", &[]),
            Err(BlockError::NoLayers)
        ));
    }

    fn xattr_set(p: &Path, name: &str, value: &[u8]) {
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        let n = std::ffi::CString::new(name).unwrap();
        // SAFETY: valid NUL-terminated strings and a live buffer.
        let r = unsafe {
            libc::setxattr(
                c.as_ptr(),
                n.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        };
        assert_eq!(r, 0, "setxattr {name}");
    }
}

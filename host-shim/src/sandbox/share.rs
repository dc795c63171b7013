//! A VM pod's share: one host directory served to the guest over virtio-fs (husk-vmm's FUSE
//! server), into which each container's CRI mount sources are bind-mounted. The agent mounts
//! the share as the sandbox mount [`SHARE`] and binds `sandbox:share/<entry>` into the
//! container, so the guest only ever sees what was put here.
//!
//! Entries are `<container id>-<n>`: a directory or an empty file (single-file mounts such as
//! `/etc/hosts` or `/dev/termination-log`) with the source bind-mounted over it, read-only
//! when the CRI asks. Propagation: private and host-to-container are honoured on the host side
//! (the bind is `rprivate`, or `rslave` of its source so that new submounts reach the guest
//! through the FUSE server); bidirectional cannot cross the VM boundary and is refused. An SELinux relabel
//! request is checked with every CRI mount (`cri::convert::validate_mounts`): ignored on a
//! host without SELinux, as containerd does, refused where SELinux is enabled.

use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};

/// The sandbox mount name the agent gives the share.
pub const SHARE: &str = "share";

#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    #[error("mount {source_path} -> {container_path}: {why}")]
    Refused {
        source_path: String,
        container_path: String,
        why: &'static str,
    },
    #[error("mount source {0}: {1}")]
    Source(String, #[source] std::io::Error),
    #[error("{0} {1}: {2}")]
    Io(&'static str, PathBuf, #[source] std::io::Error),
    #[error("{0} {1}: {2}")]
    Os(&'static str, PathBuf, #[source] nix::Error),
}

/// One CRI mount as the share needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostMount {
    pub host_path: String,
    pub container_path: String,
    pub readonly: bool,
    /// CRI `MountPropagation`: 0 private, 1 host-to-container, 2 bidirectional.
    pub propagation: i32,
}

pub struct PodShare {
    dir: PathBuf,
}

impl PodShare {
    /// The share directory of a pod (created if missing).
    pub fn open(dir: &Path) -> Result<Self, ShareError> {
        std::fs::create_dir_all(dir).map_err(|e| ShareError::Io("mkdir", dir.to_path_buf(), e))?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    /// The share of a pod if it exists (never creates it).
    pub fn existing(dir: &Path) -> Option<Self> {
        dir.is_dir().then(|| Self {
            dir: dir.to_path_buf(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Binds `m.host_path` into the share as entry `<container>-<n>`; returns the agent's
    /// mount source for it (`sandbox:share/<entry>`).
    pub fn bind(&self, container: &str, n: usize, m: &HostMount) -> Result<String, ShareError> {
        let refuse = |why| ShareError::Refused {
            source_path: m.host_path.clone(),
            container_path: m.container_path.clone(),
            why,
        };
        if m.propagation == 2 {
            return Err(refuse(
                "bidirectional propagation cannot cross into a VM sandbox",
            ));
        }
        let src = Path::new(&m.host_path);
        if !src.is_absolute() {
            return Err(refuse("the host path must be absolute"));
        }
        let meta =
            std::fs::metadata(src).map_err(|e| ShareError::Source(m.host_path.clone(), e))?;
        let entry = format!("{container}-{n}");
        if entry.contains('/') || container.is_empty() {
            return Err(refuse("bad container id"));
        }
        let target = self.dir.join(&entry);
        if meta.is_dir() {
            std::fs::create_dir_all(&target)
                .map_err(|e| ShareError::Io("mkdir", target.clone(), e))?;
        } else {
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(&target)
                .map_err(|e| ShareError::Io("create", target.clone(), e))?;
        }
        let t = target.as_path();
        let os = |what: &'static str| move |e| ShareError::Os(what, t.to_path_buf(), e);
        nix::mount::mount(
            Some(src),
            &target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(os("bind"))?;
        // Host-to-container: a slave of the source (later host mounts under it reach the
        // guest through the FUSE server); private: cut off from the source's peers.
        let (propagation, what) = if m.propagation == 1 {
            (MsFlags::MS_SLAVE, "make rslave")
        } else {
            (MsFlags::MS_PRIVATE, "make rprivate")
        };
        let done = (|| {
            nix::mount::mount(
                None::<&str>,
                &target,
                None::<&str>,
                propagation | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(os(what))?;
            if m.readonly {
                nix::mount::mount(
                    None::<&str>,
                    &target,
                    None::<&str>,
                    MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                    None::<&str>,
                )
                .map_err(os("remount read-only"))?;
            }
            Ok(())
        })();
        if let Err(e) = done {
            unmount_entry(&target);
            return Err(e);
        }
        Ok(format!("sandbox:{SHARE}/{entry}"))
    }

    /// Unmounts and removes every entry of `container` (after it is removed).
    pub fn unbind_container(&self, container: &str) {
        let prefix = format!("{container}-");
        for e in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            let n = name.strip_prefix(&prefix);
            if n.is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())) {
                unmount_entry(&e.path());
            }
        }
    }

    /// Unmounts every entry and removes the share (after the pod's VM is gone).
    pub fn destroy(self) {
        for e in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            unmount_entry(&e.path());
        }
        if let Err(e) = std::fs::remove_dir(&self.dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %self.dir.display(), error = %e, "remove pod share");
        }
    }
}

/// For a VM pod: binds every CRI mount into the share and points the spec's mount for it
/// (destination = container path, source = host path) at `sandbox:share/<entry>`. On error
/// nothing of `container`'s stays bound.
pub fn share_mounts(
    share: &PodShare,
    container: &str,
    mounts: &[husk_proto::cri::Mount],
    spec: &mut oci_spec::runtime::Spec,
) -> Result<(), ShareError> {
    let mut specs = spec.mounts().clone().unwrap_or_default();
    for (n, m) in mounts
        .iter()
        .enumerate()
        .filter(|(_, m)| !m.host_path.is_empty())
    {
        let hm = HostMount {
            host_path: m.host_path.clone(),
            container_path: m.container_path.clone(),
            readonly: m.readonly,
            propagation: m.propagation,
        };
        let src = match share.bind(container, n, &hm) {
            Ok(s) => s,
            Err(e) => {
                share.unbind_container(container);
                return Err(e);
            }
        };
        for s in specs.iter_mut().filter(|s| {
            s.destination() == Path::new(&m.container_path)
                && s.source().as_deref() == Some(Path::new(&m.host_path))
        }) {
            s.set_source(Some(PathBuf::from(&src)));
        }
    }
    spec.set_mounts(Some(specs));
    Ok(())
}

impl From<ShareError> for super::RuntimeError {
    fn from(e: ShareError) -> Self {
        match e {
            // What the request asks cannot be done in a VM sandbox: the request is at fault.
            ShareError::Refused { .. } => super::RuntimeError::InvalidArgument(e.to_string()),
            ShareError::Source(..) => super::RuntimeError::InvalidArgument(e.to_string()),
            _ => super::RuntimeError::Internal(e.to_string()),
        }
    }
}

/// Lazily unmounts `p` (every stacked mount) and removes the mount point.
fn unmount_entry(p: &Path) {
    while nix::mount::umount2(p, MntFlags::MNT_DETACH).is_ok() {}
    let r = if p.is_dir() {
        std::fs::remove_dir(p)
    } else {
        std::fs::remove_file(p)
    };
    if let Err(e) = r
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(path = %p.display(), error = %e, "remove share entry");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn is_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    fn hm(src: &Path, dst: &str, ro: bool) -> HostMount {
        HostMount {
            host_path: src.display().to_string(),
            container_path: dst.into(),
            readonly: ro,
            propagation: 0,
        }
    }

    #[test]
    fn refusals_need_no_privileges() {
        let d = tempfile::tempdir().unwrap();
        let share = PodShare::open(&d.path().join("share")).unwrap();
        let mut m = hm(d.path(), "/x", false);
        m.propagation = 2;
        assert!(matches!(
            share.bind("c", 0, &m),
            Err(ShareError::Refused { .. })
        ));
        let m = HostMount {
            host_path: "rel/path".into(),
            ..hm(d.path(), "/x", false)
        };
        assert!(matches!(
            share.bind("c", 0, &m),
            Err(ShareError::Refused { .. })
        ));
        let m = hm(&d.path().join("missing"), "/x", false);
        assert!(matches!(
            share.bind("c", 0, &m),
            Err(ShareError::Source(..))
        ));
        assert!(matches!(
            share.bind("a/b", 0, &hm(d.path(), "/x", false)),
            Err(ShareError::Refused { .. })
        ));
    }

    #[test]
    fn directories_and_single_files_bound_read_only_and_cleaned_up() {
        if !is_root() {
            eprintln!("skipped: bind mounts need root");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let vol = d.path().join("vol");
        std::fs::create_dir(&vol).unwrap();
        std::fs::write(vol.join("a"), b"in the volume").unwrap();
        let hosts = d.path().join("hosts");
        std::fs::write(&hosts, b"127.0.0.1 localhost\n").unwrap();
        let share = PodShare::open(&d.path().join("share")).unwrap();

        assert_eq!(
            share.bind("c1", 0, &hm(&vol, "/data", false)).unwrap(),
            "sandbox:share/c1-0"
        );
        assert_eq!(
            share
                .bind("c1", 1, &hm(&hosts, "/etc/hosts", true))
                .unwrap(),
            "sandbox:share/c1-1"
        );
        assert_eq!(
            share.bind("c2", 0, &hm(&vol, "/ro", true)).unwrap(),
            "sandbox:share/c2-0"
        );
        let s = share.dir().to_path_buf();
        assert_eq!(std::fs::read(s.join("c1-0/a")).unwrap(), b"in the volume");
        assert_eq!(
            std::fs::read(s.join("c1-1")).unwrap(),
            b"127.0.0.1 localhost\n"
        );
        // Writable where asked, read-only where asked; both ways visible.
        std::fs::write(s.join("c1-0/b"), b"through the share").unwrap();
        assert_eq!(std::fs::read(vol.join("b")).unwrap(), b"through the share");
        let e = std::fs::write(s.join("c2-0/c"), b"x").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EROFS));
        let e = std::fs::write(s.join("c1-1"), b"x").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EROFS));

        share.unbind_container("c1");
        assert!(!s.join("c1-0").exists() && !s.join("c1-1").exists());
        assert!(s.join("c2-0/a").exists(), "other containers keep theirs");
        assert_eq!(
            std::fs::read(vol.join("a")).unwrap(),
            b"in the volume",
            "sources untouched"
        );
        share.destroy();
        assert!(!s.exists());
        assert!(hosts.exists() && vol.join("b").exists());
    }
}

//! A VM pod's share: one host directory served to the guest over virtio-fs (husk-vmm's FUSE
//! server), into which each container's CRI mount sources are bind-mounted. The agent mounts
//! the share as the sandbox mount [`SHARE`] and binds `sandbox:share/<entry>` into the
//! container, so the guest only ever sees what was put here.
//!
//! Entries are `<container id>-<n>`: a directory or an empty file (single-file mounts such as
//! `/etc/hosts` or `/dev/termination-log`) with the source bind-mounted over it, read-only
//! when the CRI asks. Propagation: private and host-to-container are honoured on the host side
//! (the bind is `rprivate`, or `rslave` of its source so that new submounts reach the guest
//! through the FUSE server); bidirectional cannot cross the VM boundary and is refused. An
//! SELinux relabel request is checked with every CRI mount (`sandbox::spec::validate_mounts`):
//! ignored on a host without SELinux, as containerd does, refused where SELinux is enabled.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use super::beneath::{self, Dir, Kind};

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

/// The guest writes the share (its root included: it can plant symlinks, directories and
/// files under any name), so everything here works on the share's descriptor, one component
/// at a time (see [`beneath`]): never by a path below [`PodShare::dir`].
pub struct PodShare {
    dir: PathBuf,
    fd: Dir,
}

impl PodShare {
    /// The share directory of a pod (created if missing).
    pub fn open(dir: &Path) -> Result<Self, ShareError> {
        std::fs::create_dir_all(dir).map_err(|e| ShareError::Io("mkdir", dir.to_path_buf(), e))?;
        let fd = Dir::open(dir).map_err(|e| ShareError::Io("open", dir.to_path_buf(), e))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            fd,
        })
    }

    /// The share of a pod if it exists (never creates it).
    pub fn existing(dir: &Path) -> Option<Self> {
        match Dir::open(dir) {
            Ok(fd) => Some(Self {
                dir: dir.to_path_buf(),
                fd,
            }),
            Err(e) => {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(dir = %dir.display(), error = %e, "open pod share");
                }
                None
            }
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Binds `m.host_path` into the share as entry `<container>-<n>` (`nosuid,nodev`, and
    /// read-only through the whole tree when asked); returns the agent's mount source for it
    /// (`sandbox:share/<entry>`).
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
        let mut attrs = beneath::MOUNT_ATTR_NOSUID | beneath::MOUNT_ATTR_NODEV;
        if m.readonly {
            attrs |= beneath::MOUNT_ATTR_RDONLY;
        }
        // Host-to-container: a slave of the source (later host mounts under it reach the
        // guest through the FUSE server); private: cut off from the source's peers.
        let propagation = if m.propagation == 1 {
            libc::MS_SLAVE
        } else {
            libc::MS_PRIVATE
        };
        let entry = self.bind_entry(container, n, m, attrs, propagation)?;
        Ok(format!("sandbox:{SHARE}/{entry}"))
    }

    /// husk-ns, a bidirectional volume: binds `m.host_path` into this (shared) directory as
    /// entry `<container>-<n>`, a peer of the source's mount (nothing changed but read-only
    /// when asked), so that it reaches the agent's peer copy and mounts below it travel
    /// both ways. Returns the entry's name.
    pub fn bind_peer(
        &self,
        container: &str,
        n: usize,
        m: &HostMount,
    ) -> Result<String, ShareError> {
        let attrs = if m.readonly {
            beneath::MOUNT_ATTR_RDONLY
        } else {
            0
        };
        self.bind_entry(container, n, m, attrs, 0)
    }

    fn bind_entry(
        &self,
        container: &str,
        n: usize,
        m: &HostMount,
        attrs: u64,
        propagation: u64,
    ) -> Result<String, ShareError> {
        let refuse = |why| ShareError::Refused {
            source_path: m.host_path.clone(),
            container_path: m.container_path.clone(),
            why,
        };
        let src = Path::new(&m.host_path);
        if !src.is_absolute() {
            return Err(refuse("the host path must be absolute"));
        }
        let meta =
            std::fs::metadata(src).map_err(|e| ShareError::Source(m.host_path.clone(), e))?;
        let entry = format!("{container}-{n}");
        if entry.contains('/') || container.is_empty() || container.starts_with('.') {
            return Err(refuse("bad container id"));
        }
        // The source is cloned first: nothing is left in the share if it cannot be.
        let tree = beneath::clone_tree(src, attrs, propagation)
            .map_err(|e| ShareError::Io("clone mount", src.to_path_buf(), e))?;
        let name = OsStr::new(&entry);
        let target = self.dir.join(&entry);
        let (made, want) = if meta.is_dir() {
            (self.fd.mkdir(name, 0o755), Kind::Dir)
        } else {
            (self.fd.create_file(name, 0o644), Kind::File)
        };
        made.map_err(|e| ShareError::Io("create", target.clone(), e))?;
        if let Err(e) = self.fd.attach(&tree, name, want) {
            self.remove_entry(name);
            return Err(ShareError::Io("bind", target, e));
        }
        Ok(entry)
    }

    /// Unmounts and removes every entry of `container` (after it is removed).
    pub fn unbind_container(&self, container: &str) {
        let prefix = format!("{container}-");
        for name in self.list() {
            let n = name.to_str().and_then(|s| s.strip_prefix(&prefix));
            if n.is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())) {
                self.remove_entry(&name);
            }
        }
    }

    /// Unmounts every entry and removes the share (after the pod's VM is gone). Returns
    /// false when something could not be taken off or removed: the share (and whatever is
    /// still mounted below it) is then left in place, and nothing may remove it by path.
    pub fn destroy(self) -> bool {
        let mut clean = true;
        for name in self.list() {
            clean &= self.remove_entry(&name);
        }
        if !clean {
            return false;
        }
        if let Err(e) = std::fs::remove_dir(&self.dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %self.dir.display(), error = %e, "remove pod share");
            return false;
        }
        true
    }

    /// Unmounts and removes every entry; false when one could not be.
    pub fn unbind_all(&self) -> bool {
        let mut clean = true;
        for name in self.list() {
            clean &= self.remove_entry(&name);
        }
        clean
    }

    fn list(&self) -> Vec<std::ffi::OsString> {
        self.fd.entries().unwrap_or_else(|e| {
            tracing::warn!(dir = %self.dir.display(), error = %e, "list pod share");
            Vec::new()
        })
    }

    /// Lazily unmounts entry `name` (every mount stacked on it) and removes it (whatever the
    /// guest made of it). Never follows a symlink; a failure is logged and reported.
    fn remove_entry(&self, name: &OsStr) -> bool {
        let r = self
            .fd
            .unmount(name)
            .map_err(|e| ("unmount", e))
            .and_then(|_| self.fd.remove_tree(name).map_err(|e| ("remove", e)));
        if let Err((what, e)) = r {
            tracing::warn!(dir = %self.dir.display(), entry = ?name, error = %e, "{what} share entry");
            return false;
        }
        true
    }
}

/// Container ids (64 hex digits) with entries in `share` that are not in `known`. The
/// names come from a directory the guest can write: they select only what
/// [`PodShare::unbind_container`] then undoes inside the share.
pub fn unrecorded_containers(
    share: &PodShare,
    known: &std::collections::HashSet<String>,
) -> std::collections::BTreeSet<String> {
    share
        .list()
        .into_iter()
        .filter_map(|name| {
            let name = name.into_string().ok()?;
            let (cid, n) = name.rsplit_once('-')?;
            let ok = cid.len() == 64
                && cid.bytes().all(|b| b.is_ascii_hexdigit())
                && n.parse::<usize>().is_ok();
            (ok && !known.contains(cid)).then(|| cid.to_string())
        })
        .collect()
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

    /// A tmpfs mounted at `<d>/hostmnt` with a file in it: a host mount point the guest
    /// must not be able to unmount. Unmounted (lazily) when dropped.
    struct HostMnt(PathBuf);

    impl HostMnt {
        fn new(d: &Path) -> Self {
            let p = d.join("hostmnt");
            std::fs::create_dir(&p).unwrap();
            nix::mount::mount(
                Some("tmpfs"),
                &p,
                Some("tmpfs"),
                nix::mount::MsFlags::empty(),
                Some("size=1m"),
            )
            .unwrap();
            std::fs::write(p.join("keep"), b"host data").unwrap();
            Self(p)
        }

        fn mounted(&self) -> bool {
            use std::os::unix::fs::MetadataExt;
            let parent = self.0.parent().unwrap();
            std::fs::metadata(&self.0).unwrap().dev() != std::fs::metadata(parent).unwrap().dev()
        }
    }

    impl Drop for HostMnt {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }

    #[test]
    fn planted_symlinks_never_reach_a_host_mount_or_file() {
        if !is_root() {
            eprintln!("skipped: mounts need root");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let host = HostMnt::new(d.path());
        let outside = d.path().join("outside");
        std::fs::write(&outside, b"host file").unwrap();
        let vol = d.path().join("vol");
        std::fs::create_dir(&vol).unwrap();
        let share = PodShare::open(&d.path().join("share")).unwrap();
        let s = share.dir().to_path_buf();
        share.bind("c1", 0, &hm(&vol, "/data", false)).unwrap();
        // What a guest can do in the share root: links named like entries (ours and
        // others'), at any name, to the host mount and to a host file; a directory of
        // links; a link replacing one of our entries' names after its mount went away.
        let ln =
            |target: &Path, name: &str| std::os::unix::fs::symlink(target, s.join(name)).unwrap();
        ln(&host.0, "c1-1");
        ln(&host.0, "c2-0");
        ln(&host.0, "anything");
        ln(&outside, "c1-2");
        ln(&d.path().join("vol"), "c1-3");
        std::fs::create_dir(s.join("guestdir")).unwrap();
        ln(&host.0, "guestdir/c1-0");
        ln(&outside, "guestdir/f");

        share.unbind_container("c1");
        assert!(host.mounted(), "the host mount is still mounted");
        assert!(!s.join("c1-0").exists(), "our entry went");
        for n in ["c1-1", "c1-2", "c1-3"] {
            assert!(
                std::fs::symlink_metadata(s.join(n)).is_err(),
                "{n}: the link went"
            );
        }
        assert!(
            std::fs::symlink_metadata(s.join("c2-0")).is_ok(),
            "not c1's"
        );
        share.unbind_container("c2");
        assert!(host.mounted());
        let share = PodShare::existing(&s).unwrap();
        assert!(
            share.destroy(),
            "a share of links and guest dirs is removed"
        );
        assert!(!s.exists());
        assert!(host.mounted(), "the host mount is still mounted");
        assert_eq!(std::fs::read(host.0.join("keep")).unwrap(), b"host data");
        assert_eq!(std::fs::read(&outside).unwrap(), b"host file");
        assert!(vol.is_dir(), "the volume source is untouched");
    }

    #[test]
    fn a_bind_never_follows_a_planted_target() {
        if !is_root() {
            eprintln!("skipped: mounts need root");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let host = HostMnt::new(d.path());
        let vol = d.path().join("vol");
        std::fs::create_dir(&vol).unwrap();
        std::fs::write(vol.join("v"), b"volume").unwrap();
        let file = d.path().join("file");
        std::fs::write(&file, b"single").unwrap();
        let share = PodShare::open(&d.path().join("share")).unwrap();
        let s = share.dir().to_path_buf();
        // A link already at the entry's name: refused, nothing mounted over the host.
        std::os::unix::fs::symlink(&host.0, s.join("c1-0")).unwrap();
        std::os::unix::fs::symlink(d.path().join("file2"), s.join("c1-1")).unwrap();
        assert!(share.bind("c1", 0, &hm(&vol, "/data", false)).is_err());
        assert!(share.bind("c1", 1, &hm(&file, "/f", false)).is_err());
        assert!(
            !host.0.join("v").exists(),
            "nothing bound over the host mount"
        );
        assert!(
            !d.path().join("file2").exists(),
            "no file made through the link"
        );
        // Swapped for a link between creation and mount: the mount refuses it.
        let fd = &share.fd;
        fd.mkdir(OsStr::new("x"), 0o755).unwrap();
        std::fs::remove_dir(s.join("x")).unwrap();
        std::os::unix::fs::symlink(&host.0, s.join("x")).unwrap();
        let tree = beneath::clone_tree(&vol, 0, libc::MS_SLAVE).unwrap();
        assert!(fd.attach(&tree, OsStr::new("x"), Kind::Dir).is_err());
        assert!(!host.0.join("v").exists());
        assert!(share.destroy());
        assert!(host.mounted());
        assert_eq!(std::fs::read(host.0.join("keep")).unwrap(), b"host data");
    }

    #[test]
    fn volumes_are_nosuid_nodev_and_read_only_all_the_way_down() {
        if !is_root() {
            eprintln!("skipped: mounts need root");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let vol = d.path().join("vol");
        std::fs::create_dir(&vol).unwrap();
        let host = HostMnt::new(&vol);
        let share = PodShare::open(&d.path().join("share")).unwrap();
        share.bind("c", 0, &hm(&vol, "/rw", false)).unwrap();
        share.bind("c", 1, &hm(&vol, "/ro", true)).unwrap();
        let s = share.dir().to_path_buf();
        let flags = |p: &Path| nix::sys::statvfs::statvfs(p).unwrap().flags();
        use nix::sys::statvfs::FsFlags;
        for p in [
            s.join("c-0"),
            s.join("c-0/hostmnt"),
            s.join("c-1"),
            s.join("c-1/hostmnt"),
        ] {
            let f = flags(&p);
            assert!(
                f.contains(FsFlags::ST_NOSUID | FsFlags::ST_NODEV),
                "{}: {f:?}",
                p.display()
            );
        }
        assert!(!flags(&s.join("c-0/hostmnt")).contains(FsFlags::ST_RDONLY));
        assert!(
            flags(&s.join("c-1/hostmnt")).contains(FsFlags::ST_RDONLY),
            "submounts too"
        );
        assert!(
            !flags(&vol).contains(FsFlags::ST_NOSUID),
            "the source keeps its flags"
        );
        assert!(share.destroy());
        assert!(host.mounted());
    }

    #[test]
    fn removal_never_crosses_a_mount_below_the_share() {
        if !is_root() {
            eprintln!("skipped: mounts need root");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let share = PodShare::open(&d.path().join("share")).unwrap();
        let s = share.dir().to_path_buf();
        std::fs::create_dir(s.join("g")).unwrap();
        let host = HostMnt::new(&s.join("g"));
        assert!(
            !share.destroy(),
            "a mount below an entry is not removed through"
        );
        assert!(host.mounted());
        assert_eq!(std::fs::read(host.0.join("keep")).unwrap(), b"host data");
        assert!(s.exists(), "the share stays for a human");
    }
}

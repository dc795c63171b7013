//! Mount namespace setup: rootfs, spec mounts, devices, pivot_root, masked and
//! read-only paths, sysctls and hostname. All through the syscall seam.

use std::path::{Component, Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};
use oci_spec::runtime::{LinuxNamespaceType, Mount, Spec};

use super::config::RootfsMount;
use crate::syscall::{Syscall, SyscallError};

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error(transparent)]
    Sys(#[from] SyscallError),
    #[error("mount destination {0} is not absolute")]
    RelativeDestination(String),
    #[error("bind mount source {0} does not exist")]
    MissingSource(String),
    #[error("bad mount {0}")]
    BadMount(String),
    #[error("bad device {0}")]
    Device(String),
    #[error("bad sysctl name {0:?}")]
    Sysctl(String),
    #[error("unknown rootfs propagation {0}")]
    Propagation(String),
}

type Result<T> = std::result::Result<T, RootfsError>;

/// Parsed mount options: kernel flags, propagation flags and fs data.
#[derive(Debug, PartialEq, Eq)]
pub struct MountOptions {
    pub flags: MsFlags,
    pub clear: MsFlags,
    pub propagation: MsFlags,
    pub data: Vec<String>,
    pub bind: bool,
    pub recursive: bool,
}

pub fn parse_options(options: &[String]) -> MountOptions {
    let mut o = MountOptions {
        flags: MsFlags::empty(),
        clear: MsFlags::empty(),
        propagation: MsFlags::empty(),
        data: Vec::new(),
        bind: false,
        recursive: false,
    };
    for opt in options {
        let (set, clear, prop) = match opt.as_str() {
            "ro" => (MsFlags::MS_RDONLY, MsFlags::empty(), MsFlags::empty()),
            "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY, MsFlags::empty()),
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty(), MsFlags::empty()),
            "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID, MsFlags::empty()),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty(), MsFlags::empty()),
            "dev" => (MsFlags::empty(), MsFlags::MS_NODEV, MsFlags::empty()),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty(), MsFlags::empty()),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC, MsFlags::empty()),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty(), MsFlags::empty()),
            "async" => (MsFlags::empty(), MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
            "dirsync" => (MsFlags::MS_DIRSYNC, MsFlags::empty(), MsFlags::empty()),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty(), MsFlags::empty()),
            "atime" => (MsFlags::empty(), MsFlags::MS_NOATIME, MsFlags::empty()),
            "nodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty(), MsFlags::empty()),
            "diratime" => (MsFlags::empty(), MsFlags::MS_NODIRATIME, MsFlags::empty()),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty(), MsFlags::empty()),
            "norelatime" => (MsFlags::empty(), MsFlags::MS_RELATIME, MsFlags::empty()),
            "strictatime" => (MsFlags::MS_STRICTATIME, MsFlags::empty(), MsFlags::empty()),
            "bind" => {
                o.bind = true;
                continue;
            }
            "rbind" => {
                o.bind = true;
                o.recursive = true;
                continue;
            }
            "private" => (MsFlags::empty(), MsFlags::empty(), MsFlags::MS_PRIVATE),
            "rprivate" => (
                MsFlags::empty(),
                MsFlags::empty(),
                MsFlags::MS_PRIVATE | MsFlags::MS_REC,
            ),
            "shared" => (MsFlags::empty(), MsFlags::empty(), MsFlags::MS_SHARED),
            "rshared" => (
                MsFlags::empty(),
                MsFlags::empty(),
                MsFlags::MS_SHARED | MsFlags::MS_REC,
            ),
            "slave" => (MsFlags::empty(), MsFlags::empty(), MsFlags::MS_SLAVE),
            "rslave" => (
                MsFlags::empty(),
                MsFlags::empty(),
                MsFlags::MS_SLAVE | MsFlags::MS_REC,
            ),
            "unbindable" => (MsFlags::empty(), MsFlags::empty(), MsFlags::MS_UNBINDABLE),
            "runbindable" => (
                MsFlags::empty(),
                MsFlags::empty(),
                MsFlags::MS_UNBINDABLE | MsFlags::MS_REC,
            ),
            other => {
                o.data.push(other.to_string());
                continue;
            }
        };
        o.flags |= set;
        o.flags &= !clear;
        o.clear |= clear;
        o.propagation |= prop;
    }
    o
}

/// Join `path` under `root`, resolving symlinks inside the rootfs so that a
/// malicious image cannot point a mount destination outside of it.
pub fn secure_join(root: &Path, path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    let mut pending: Vec<PathBuf> = path
        .components()
        .rev()
        .map(|c| PathBuf::from(c.as_os_str()))
        .collect();
    let mut hops = 0;
    while let Some(part) = pending.pop() {
        match part.components().next() {
            None | Some(Component::RootDir) | Some(Component::CurDir) => continue,
            Some(Component::ParentDir) => {
                out.pop();
                continue;
            }
            _ => {}
        }
        let candidate = root.join(&out).join(&part);
        match std::fs::read_link(&candidate) {
            Ok(target) if hops < 40 => {
                hops += 1;
                if target.is_absolute() {
                    out = PathBuf::new();
                }
                for c in target.components().rev() {
                    pending.push(PathBuf::from(c.as_os_str()));
                }
            }
            _ => out.push(part),
        }
    }
    root.join(out)
}

fn propagation_flags(name: Option<&str>) -> Result<MsFlags> {
    Ok(match name.unwrap_or("rslave") {
        "" | "rslave" => MsFlags::MS_SLAVE | MsFlags::MS_REC,
        "slave" => MsFlags::MS_SLAVE,
        "rprivate" => MsFlags::MS_PRIVATE | MsFlags::MS_REC,
        "private" => MsFlags::MS_PRIVATE,
        "rshared" => MsFlags::MS_SHARED | MsFlags::MS_REC,
        "shared" => MsFlags::MS_SHARED,
        "runbindable" => MsFlags::MS_UNBINDABLE | MsFlags::MS_REC,
        "unbindable" => MsFlags::MS_UNBINDABLE,
        other => return Err(RootfsError::Propagation(other.to_string())),
    })
}

pub fn overlay_data(lower: &[PathBuf], upper: &Path, work: &Path) -> String {
    let lower: Vec<String> = lower.iter().map(|p| p.display().to_string()).collect();
    format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.join(":"),
        upper.display(),
        work.display()
    )
}

/// Set up the container's mount namespace and pivot into it.
pub fn setup(
    sys: &dyn Syscall,
    spec: &Spec,
    rootfs: &RootfsMount,
    dir: &Path,
    host_devices: &[String],
) -> Result<()> {
    let linux = spec.linux().as_ref();
    // Stop our mounts from leaking to the parent namespace (and back).
    let prop = propagation_flags(linux.and_then(|l| l.rootfs_propagation().as_deref()))?;
    sys.mount(None, Path::new("/"), None, prop, None)?;

    sys.create_dir_all(dir)?;
    match rootfs {
        RootfsMount::Overlay { lower, upper, work } => {
            let data = overlay_data(lower, upper, work);
            sys.mount(
                Some(Path::new("overlay")),
                dir,
                Some("overlay"),
                MsFlags::empty(),
                Some(&data),
            )?;
        }
        RootfsMount::Bind { path } => {
            sys.mount(
                Some(path),
                dir,
                None,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None,
            )?;
        }
    }

    // A shared root (rootfs propagation `rshared`, for bidirectional volumes): pivot_root
    // refuses a shared new root or parent, so the new root is made private and bound onto
    // itself first, as runc does; the volumes bound below keep their own propagation.
    let shared_root = prop.contains(MsFlags::MS_SHARED);
    if shared_root {
        sys.mount(None, dir, None, MsFlags::MS_PRIVATE, None)?;
        sys.mount(
            Some(dir),
            dir,
            None,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None,
        )?;
    }

    super::mark("rootfs.root");
    // Without a cgroup namespace of its own the container's cgroup2 mount would be made in
    // the initial one, where a new mount re-applies its options to the whole hierarchy
    // (the guest's `favordynmods`, a host's `nsdelegate`, `memory_recursiveprot`): the
    // mounted hierarchy is bound instead, the same view.
    let own_cgroup_ns = linux
        .and_then(|l| l.namespaces().as_ref())
        .is_some_and(|ns| ns.iter().any(|n| n.typ() == LinuxNamespaceType::Cgroup));
    let mut dev_mounted = false;
    for m in spec.mounts().as_deref().unwrap_or_default() {
        if m.destination() == Path::new("/dev") {
            dev_mounted = true;
        }
        mount_one(sys, dir, m, own_cgroup_ns).map_err(|e| {
            // The kernel refusing a spec mount (unknown option or fs type, a
            // file over a directory) is a bad request, not a broken machine.
            let refused = matches!(
                &e,
                RootfsError::Sys(SyscallError::Nix {
                    source: nix::Error::EINVAL
                        | nix::Error::ENODEV
                        | nix::Error::ENOTDIR
                        | nix::Error::ENOENT,
                    ..
                })
            );
            if refused {
                RootfsError::BadMount(format!("{}: {e}", m.destination().display()))
            } else {
                e
            }
        })?;
    }
    super::mark("rootfs.mounts");
    if dev_mounted {
        setup_dev(sys, dir, host_devices)?;
    }
    for d in linux
        .and_then(|l| l.devices().as_ref())
        .into_iter()
        .flatten()
    {
        create_device(sys, dir, d)?;
    }

    sys.pivot_root(dir)?;
    super::mark("rootfs.pivot_root");
    if shared_root {
        // The root the spec asked for (runc re-applies it after pivot_root too).
        sys.mount(None, Path::new("/"), None, prop, None)?;
    }

    if let Some(linux) = linux {
        // Sysctls first: /proc/sys is usually among the read-only paths.
        for (key, value) in linux.sysctl().iter().flatten() {
            sys.write_file(&sysctl_path(key)?, value.as_bytes())?;
        }
        for p in linux.masked_paths().as_deref().unwrap_or_default() {
            mask_path(sys, Path::new(p))?;
        }
        for p in linux.readonly_paths().as_deref().unwrap_or_default() {
            readonly_path(sys, Path::new(p))?;
        }
    }
    if let Some(h) = spec.hostname() {
        sys.sethostname(h)?;
    }
    if spec
        .root()
        .as_ref()
        .and_then(|r| r.readonly())
        .unwrap_or(false)
    {
        sys.mount(
            None,
            Path::new("/"),
            None,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None,
        )?;
    }
    Ok(())
}

/// /proc/sys path of a sysctl key ("net.ipv4.ip_forward" or "net/ipv4/ip_forward").
pub fn sysctl_path(key: &str) -> Result<PathBuf> {
    let parts: Vec<&str> = key.split(['.', '/']).collect();
    if parts.iter().any(|p| p.is_empty() || *p == "..") {
        return Err(RootfsError::Sysctl(key.to_string()));
    }
    Ok(Path::new("/proc/sys").join(parts.join("/")))
}

fn mount_one(sys: &dyn Syscall, root: &Path, m: &Mount, own_cgroup_ns: bool) -> Result<()> {
    let dest = m.destination();
    if !dest.is_absolute() {
        return Err(RootfsError::RelativeDestination(dest.display().to_string()));
    }
    let target = secure_join(root, dest);
    let opts = parse_options(m.options().as_deref().unwrap_or_default());
    let fstype = m.typ().as_deref().unwrap_or("");
    let bind = opts.bind || fstype == "bind";
    if bind {
        let Some(source) = m.source().as_deref() else {
            return Err(RootfsError::MissingSource(String::new()));
        };
        if !sys.exists(source) {
            return Err(RootfsError::MissingSource(source.display().to_string()));
        }
        if sys.is_dir(source) {
            sys.create_dir_all(&target)?;
        } else {
            sys.touch(&target)?;
        }
        let mut flags = MsFlags::MS_BIND;
        if opts.recursive {
            flags |= MsFlags::MS_REC;
        }
        sys.mount(Some(source), &target, None, flags, None)?;
        // Bind mounts ignore flags on the first call: remount to apply ro etc.
        // `nosuid`/`nodev` alone need no remount (which would also clear the
        // source's own flags, such as its `ro`): they are set on their own, below.
        let attrs = opts.flags & (MsFlags::MS_NOSUID | MsFlags::MS_NODEV);
        if !(opts.flags - attrs).is_empty() {
            sys.mount(
                None,
                &target,
                None,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | opts.flags,
                None,
            )?;
        }
        // On every mount of an `rbind` tree, not just its top: a mount below a
        // volume must not bring back set-id binaries or device nodes.
        if !attrs.is_empty() {
            sys.mount_setattr(&target, attrs, opts.recursive)?;
        }
    } else {
        let fstype = match fstype {
            // Without a cgroup namespace a v1 cgroup mount would expose the host
            // tree; only the unified hierarchy is mounted.
            "cgroup" | "cgroup2" => {
                if !sys.exists(Path::new("/sys/fs/cgroup/cgroup.controllers")) {
                    tracing::warn!(dest = %dest.display(), "skipping cgroup mount on a cgroup v1 host");
                    return Ok(());
                }
                if !own_cgroup_ns {
                    return bind_cgroup_root(sys, &target, &opts);
                }
                "cgroup2"
            }
            other => other,
        };
        sys.create_dir_all(&target)?;
        let data = opts.data.join(",");
        let source = m.source().as_deref().unwrap_or(Path::new(fstype));
        sys.mount(
            Some(source),
            &target,
            Some(fstype),
            opts.flags,
            if data.is_empty() { None } else { Some(&data) },
        )?;
    }
    if !opts.propagation.is_empty() {
        sys.mount(None, &target, None, opts.propagation, None)?;
    }
    Ok(())
}

/// The mounted unified hierarchy bound at `target` with the mount's flags (see `setup`).
fn bind_cgroup_root(sys: &dyn Syscall, target: &Path, opts: &MountOptions) -> Result<()> {
    sys.create_dir_all(target)?;
    sys.mount(
        Some(Path::new("/sys/fs/cgroup")),
        target,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    )?;
    if !opts.flags.is_empty() {
        sys.mount(
            None,
            target,
            None,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | opts.flags,
            None,
        )?;
    }
    if !opts.propagation.is_empty() {
        sys.mount(None, target, None, opts.propagation, None)?;
    }
    Ok(())
}

fn setup_dev(sys: &dyn Syscall, root: &Path, host_devices: &[String]) -> Result<()> {
    let dev = root.join("dev");
    for name in host_devices {
        let target = dev.join(name);
        sys.touch(&target)?;
        let host = Path::new("/dev").join(name);
        sys.mount(Some(&host), &target, None, MsFlags::MS_BIND, None)?;
    }
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("core", "/proc/kcore"),
    ] {
        let link = dev.join(link);
        if !sys.exists(&link) {
            sys.symlink(Path::new(target), &link)?;
        }
    }
    let ptmx = dev.join("ptmx");
    if !sys.exists(&ptmx) {
        sys.symlink(Path::new("pts/ptmx"), &ptmx)?;
    }
    Ok(())
}

fn create_device(sys: &dyn Syscall, root: &Path, d: &oci_spec::runtime::LinuxDevice) -> Result<()> {
    use nix::sys::stat::SFlag;
    if !d.path().is_absolute() {
        return Err(RootfsError::RelativeDestination(
            d.path().display().to_string(),
        ));
    }
    let kind = match d.typ().as_str() {
        "b" => SFlag::S_IFBLK,
        "c" | "u" => SFlag::S_IFCHR,
        "p" => SFlag::S_IFIFO,
        other => {
            return Err(RootfsError::Device(format!(
                "{}: type {other}",
                d.path().display()
            )));
        }
    };
    let target = secure_join(root, d.path());
    if let Some(parent) = target.parent() {
        sys.create_dir_all(parent)?;
    }
    let dev = nix::sys::stat::makedev(d.major() as u64, d.minor() as u64);
    let owner = (d.uid().unwrap_or(0), d.gid().unwrap_or(0));
    sys.mknod(&target, kind, d.file_mode().unwrap_or(0o666), dev, owner)?;
    Ok(())
}

fn mask_path(sys: &dyn Syscall, path: &Path) -> Result<()> {
    if !sys.exists(path) {
        return Ok(());
    }
    if sys.is_dir(path) {
        sys.mount(
            Some(Path::new("tmpfs")),
            path,
            Some("tmpfs"),
            MsFlags::MS_RDONLY,
            None,
        )?;
    } else {
        sys.mount(
            Some(Path::new("/dev/null")),
            path,
            None,
            MsFlags::MS_BIND,
            None,
        )?;
    }
    Ok(())
}

fn readonly_path(sys: &dyn Syscall, path: &Path) -> Result<()> {
    if !sys.exists(path) {
        return Ok(());
    }
    sys.mount(
        Some(path),
        path,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    )?;
    sys.mount(
        None,
        path,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_REC,
        None,
    )?;
    Ok(())
}

/// Unmount helper for the agent (not used in the runner).
pub fn lazy_unmount(sys: &dyn Syscall, path: &Path) -> Result<()> {
    Ok(sys.umount2(path, MntFlags::MNT_DETACH)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::syscall::{Call, RecordingSyscall};

    fn spec(json: serde_json::Value) -> Spec {
        serde_json::from_value(json).expect("spec")
    }

    #[test]
    fn options_parse_flags_propagation_and_data() {
        let o = parse_options(&[
            "ro".into(),
            "nosuid".into(),
            "rbind".into(),
            "rslave".into(),
            "size=65536k".into(),
        ]);
        assert_eq!(o.flags, MsFlags::MS_RDONLY | MsFlags::MS_NOSUID);
        assert_eq!(o.propagation, MsFlags::MS_SLAVE | MsFlags::MS_REC);
        assert!(o.bind && o.recursive);
        assert_eq!(o.data, vec!["size=65536k".to_string()]);
        let o = parse_options(&["ro".into(), "rw".into()]);
        assert_eq!(o.flags, MsFlags::empty());
    }

    #[test]
    fn sysctl_names_cannot_escape() {
        assert_eq!(
            sysctl_path("net.ipv4.ip_forward").expect("ok"),
            Path::new("/proc/sys/net/ipv4/ip_forward")
        );
        assert_eq!(
            sysctl_path("net/ipv4/conf/eth0.1/rp_filter").expect("ok"),
            Path::new("/proc/sys/net/ipv4/conf/eth0/1/rp_filter")
        );
        for bad in ["", "net..x", "../../etc/passwd", "/abs", "kernel/../x"] {
            assert!(sysctl_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn secure_join_stays_inside_root() {
        let root = tempfile::tempdir().expect("tmp");
        std::os::unix::fs::symlink("/etc", root.path().join("evil")).expect("symlink");
        std::os::unix::fs::symlink("../../../..", root.path().join("up")).expect("symlink");
        assert_eq!(
            secure_join(root.path(), Path::new("/evil/passwd")),
            root.path().join("etc/passwd")
        );
        assert_eq!(
            secure_join(root.path(), Path::new("/up/x")),
            root.path().join("x")
        );
        assert_eq!(
            secure_join(root.path(), Path::new("/../../a/./b")),
            root.path().join("a/b")
        );
    }

    /// The cgroup2 mount: a new one in the container's own cgroup namespace, else the
    /// mounted hierarchy bound (a new mount in the initial cgroup namespace would re-apply
    /// its options to the whole hierarchy, turning the guest's `favordynmods` off).
    #[test]
    fn cgroup_mount_is_new_only_in_a_cgroup_namespace_of_its_own() {
        let cgroup_mount = |own_ns: bool| {
            let sys = RecordingSyscall::default();
            sys.files
                .borrow_mut()
                .insert(PathBuf::from("/sys/fs/cgroup/cgroup.controllers"));
            let mut namespaces = vec![serde_json::json!({"type": "mount"})];
            if own_ns {
                namespaces.push(serde_json::json!({"type": "cgroup"}));
            }
            let s = spec(serde_json::json!({
                "ociVersion": "1.0.2",
                "mounts": [{"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
                            "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}],
                "linux": {"namespaces": namespaces}
            }));
            let rootfs = RootfsMount::Bind { path: "/r".into() };
            setup(&sys, &s, &rootfs, Path::new("/run/c/rootfs"), &[]).expect("setup");
            sys.mounts()
                .into_iter()
                .filter(|m| m.1 == Path::new("/run/c/rootfs/sys/fs/cgroup"))
                .collect::<Vec<_>>()
        };
        let ro = MsFlags::MS_NOSUID
            | MsFlags::MS_NOEXEC
            | MsFlags::MS_NODEV
            | MsFlags::MS_RELATIME
            | MsFlags::MS_RDONLY;
        let own = cgroup_mount(true);
        assert_eq!(own.len(), 1, "{own:?}");
        assert_eq!(own[0].0.as_deref(), Some(Path::new("cgroup")));
        assert_eq!(own[0].2.as_deref(), Some("cgroup2"));
        let shared = cgroup_mount(false);
        assert_eq!(
            shared,
            vec![
                (
                    Some(PathBuf::from("/sys/fs/cgroup")),
                    PathBuf::from("/run/c/rootfs/sys/fs/cgroup"),
                    None,
                    MsFlags::MS_BIND | MsFlags::MS_REC
                ),
                (
                    None,
                    PathBuf::from("/run/c/rootfs/sys/fs/cgroup"),
                    None,
                    MsFlags::MS_BIND | MsFlags::MS_REMOUNT | ro
                ),
            ],
            "no cgroup2 mount of its own"
        );
    }

    #[test]
    fn setup_mounts_overlay_then_spec_mounts_then_pivots() {
        let sys = RecordingSyscall::default();
        sys.dirs.borrow_mut().insert(PathBuf::from("/host/data"));
        sys.files.borrow_mut().insert(PathBuf::from("/proc/kcore"));
        sys.dirs.borrow_mut().insert(PathBuf::from("/proc/acpi"));
        sys.files.borrow_mut().insert(PathBuf::from("/proc/sys"));
        let s = spec(serde_json::json!({
            "ociVersion": "1.0.2",
            "hostname": "pod",
            "root": {"path": "rootfs", "readonly": true},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
                {"destination": "/data", "type": "bind", "source": "/host/data", "options": ["rbind", "ro", "rprivate"]}
            ],
            "linux": {"maskedPaths": ["/proc/kcore", "/proc/acpi", "/proc/missing"], "readonlyPaths": ["/proc/sys"],
                      "devices": [{"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229, "fileMode": 438, "uid": 0, "gid": 0}],
                      "sysctl": {"net.ipv4.ip_forward": "1"}}
        }));
        let rootfs = RootfsMount::Overlay {
            lower: vec!["/l1".into(), "/l2".into()],
            upper: "/u".into(),
            work: "/w".into(),
        };
        setup(
            &sys,
            &s,
            &rootfs,
            Path::new("/run/c1/rootfs"),
            &["null".into()],
        )
        .expect("setup");
        let calls = sys.calls();
        assert_eq!(
            calls[0],
            Call::Mount {
                source: None,
                target: "/".into(),
                fstype: None,
                flags: MsFlags::MS_SLAVE | MsFlags::MS_REC,
                data: None
            }
        );
        assert!(calls.contains(&Call::Mount {
            source: Some("overlay".into()),
            target: "/run/c1/rootfs".into(),
            fstype: Some("overlay".into()),
            flags: MsFlags::empty(),
            data: Some("lowerdir=/l1:/l2,upperdir=/u,workdir=/w".into()),
        }));
        let mounts = sys.mounts();
        let targets: Vec<_> = mounts.iter().map(|m| m.1.display().to_string()).collect();
        let pivot = calls
            .iter()
            .position(|c| matches!(c, Call::PivotRoot(_)))
            .expect("pivot");
        let data_ro = calls
            .iter()
            .position(|c| matches!(c, Call::Mount { target, flags, .. } if target == Path::new("/run/c1/rootfs/data") && flags.contains(MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY)))
            .expect("ro remount of /data");
        assert!(data_ro < pivot);
        assert!(targets.contains(&"/run/c1/rootfs/dev/null".to_string()));
        let mknod = calls.iter().position(|c| matches!(c, Call::Mknod { path, dev, mode: 438, .. }
            if path == Path::new("/run/c1/rootfs/dev/fuse") && *dev == nix::sys::stat::makedev(10, 229)));
        assert!(mknod.expect("fuse node") < pivot);
        // Masked file gets /dev/null, masked dir a ro tmpfs, missing is skipped.
        assert!(mounts.contains(&(
            Some("/dev/null".into()),
            "/proc/kcore".into(),
            None,
            MsFlags::MS_BIND
        )));
        assert!(mounts.contains(&(
            Some("tmpfs".into()),
            "/proc/acpi".into(),
            Some("tmpfs".into()),
            MsFlags::MS_RDONLY
        )));
        assert!(!targets.contains(&"/proc/missing".to_string()));
        let sysctl = calls
            .iter()
            .position(|c| *c == Call::Write("/proc/sys/net/ipv4/ip_forward".into(), b"1".to_vec()));
        let ro_sys = calls.iter().position(
            |c| matches!(c, Call::Mount { target, .. } if target == Path::new("/proc/sys")),
        );
        assert!(sysctl.expect("sysctl written") < ro_sys.expect("/proc/sys made read-only"));
        assert!(calls.contains(&Call::Sethostname("pod".into())));
        // Read-only root is the last step.
        assert_eq!(
            calls.last(),
            Some(&Call::Mount {
                source: None,
                target: "/".into(),
                fstype: None,
                flags: MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                data: None
            })
        );
    }

    #[test]
    fn missing_bind_source_and_relative_destination_fail() {
        let sys = RecordingSyscall::default();
        let s = spec(serde_json::json!({"ociVersion": "1.0.2",
            "mounts": [{"destination": "/x", "type": "bind", "source": "/nope", "options": ["bind"]}]}));
        let r = setup(
            &sys,
            &s,
            &RootfsMount::Bind { path: "/r".into() },
            Path::new("/t"),
            &[],
        );
        assert!(matches!(r, Err(RootfsError::MissingSource(_))), "{r:?}");
        let s = spec(serde_json::json!({"ociVersion": "1.0.2",
            "mounts": [{"destination": "x", "type": "tmpfs", "source": "tmpfs"}]}));
        let r = setup(
            &sys,
            &s,
            &RootfsMount::Bind { path: "/r".into() },
            Path::new("/t"),
            &[],
        );
        assert!(
            matches!(r, Err(RootfsError::RelativeDestination(_))),
            "{r:?}"
        );
    }
}

//! PID-1 duties in a guest (mounts, subreaping, power-off) and the matching
//! setup for a host process (subreaper, private mount namespace).

use std::path::Path;

use nix::mount::MsFlags;

use crate::syscall::{Syscall, SyscallError};

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error(transparent)]
    Sys(#[from] SyscallError),
    #[error("{0}: {1}")]
    Os(&'static str, #[source] nix::Error),
}

/// (source, target, fstype, flags, data) of the guest's early mounts.
const MOUNTS: &[(&str, &str, &str, MsFlags, Option<&str>)] = &[
    (
        "proc",
        "/proc",
        "proc",
        MsFlags::MS_NOSUID
            .union(MsFlags::MS_NODEV)
            .union(MsFlags::MS_NOEXEC),
        None,
    ),
    (
        "sysfs",
        "/sys",
        "sysfs",
        MsFlags::MS_NOSUID
            .union(MsFlags::MS_NODEV)
            .union(MsFlags::MS_NOEXEC),
        None,
    ),
    (
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    ),
    (
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        Some("newinstance,ptmxmode=0666,mode=0620"),
    ),
    (
        "shm",
        "/dev/shm",
        "tmpfs",
        MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        Some("mode=1777"),
    ),
    (
        "tmpfs",
        "/run",
        "tmpfs",
        MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        Some("mode=0755"),
    ),
    // favordynmods: moving a process into a cgroup (every container's runner, the sandbox
    // holder) then takes no RCU grace period, ≈ 30 ms each in a TCG guest measured; forks
    // and exits pay a little more. A kernel without the option (older than the 6.x guest
    // kernel images/ builds) mounts without it.
    (
        "cgroup2",
        "/sys/fs/cgroup",
        "cgroup2",
        MsFlags::MS_NOSUID
            .union(MsFlags::MS_NODEV)
            .union(MsFlags::MS_NOEXEC),
        Some(CGROUP2_OPTS),
    ),
];

const CGROUP2_OPTS: &str = "favordynmods";

/// Mount the guest's pseudo filesystems. A mount that already exists (EBUSY,
/// e.g. devtmpfs mounted by the kernel) is fine.
pub fn mount_guest_filesystems(sys: &dyn Syscall) -> Result<(), InitError> {
    for (source, target, fstype, flags, data) in MOUNTS {
        let target = Path::new(target);
        sys.create_dir_all(target)?;
        let mut r = sys.mount(Some(Path::new(source)), target, Some(fstype), *flags, *data);
        if let Err(SyscallError::Nix {
            source: nix::Error::EINVAL,
            ..
        }) = r
            && *data == Some(CGROUP2_OPTS)
        {
            r = sys.mount(Some(Path::new(source)), target, Some(fstype), *flags, None);
        }
        match r {
            Ok(()) => {}
            Err(SyscallError::Nix {
                source: nix::Error::EBUSY,
                ..
            }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let ptmx = Path::new("/dev/ptmx");
    if !sys.exists(ptmx) {
        sys.symlink(Path::new("pts/ptmx"), ptmx)?;
    }
    Ok(())
}

/// Set in the environment once PID 1 runs from its tmpfs root.
const SWITCHED_ENV: &str = "HUSK_AGENT_ROOT_SWITCHED";

/// PID 1 in a guest starts on the initramfs (rootfs), which cannot be
/// pivoted away from: containers' pivot_root would fail with EINVAL, and a
/// chroot fallback leaves the guest root reachable. Like switch_root: copy
/// /init onto a fresh tmpfs, move that mount over /, chroot into it and
/// exec /init again (with a marker so this happens once). Must run first,
/// single-threaded. Returns only when the switch is not needed or failed.
pub fn leave_initramfs() -> Result<(), InitError> {
    if std::env::var_os(SWITCHED_ENV).is_some() {
        return Ok(());
    }
    let os = |what: &'static str| move |e: nix::Error| InitError::Os(what, e);
    let new = Path::new("/newroot");
    let _ = std::fs::create_dir(new);
    nix::mount::mount(
        Some("tmpfs"),
        new,
        Some("tmpfs"),
        MsFlags::empty(),
        Some("mode=0755"),
    )
    .map_err(os("mount tmpfs root"))?;
    for d in ["dev", "proc", "sys", "run", "tmp", "etc", "mnt"] {
        let _ = std::fs::create_dir(new.join(d));
    }
    let _ = nix::sys::stat::fchmodat(
        nix::fcntl::AT_FDCWD,
        &new.join("tmp"),
        nix::sys::stat::Mode::from_bits_truncate(0o1777),
        nix::sys::stat::FchmodatFlags::FollowSymlink,
    );
    std::fs::copy("/init", new.join("init")).map_err(|e| {
        InitError::Os(
            "copy /init",
            nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
        )
    })?;
    // The initramfs copy is not needed any more: free its memory.
    let _ = std::fs::remove_file("/init");
    nix::unistd::chdir(new).map_err(os("chdir /newroot"))?;
    nix::mount::mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(os("move root"))?;
    nix::unistd::chroot(".").map_err(os("chroot"))?;
    nix::unistd::chdir("/").map_err(os("chdir /"))?;
    let argv: Vec<std::ffi::CString> = std::env::args_os()
        .filter_map(|a| std::ffi::CString::new(a.into_encoded_bytes()).ok())
        .collect();
    let mut env: Vec<std::ffi::CString> = std::env::vars_os()
        .filter_map(|(k, v)| {
            let mut kv = k.into_encoded_bytes();
            kv.push(b'=');
            kv.extend(v.into_encoded_bytes());
            std::ffi::CString::new(kv).ok()
        })
        .collect();
    env.push(std::ffi::CString::new(format!("{SWITCHED_ENV}=1")).unwrap_or_default());
    let init = std::ffi::CString::new("/init").unwrap_or_default();
    let e = nix::unistd::execve(&init, &argv, &env).unwrap_err();
    Err(InitError::Os("exec /init on the tmpfs root", e))
}

/// Enable every cgroup v2 controller for children of the root.
pub fn enable_cgroup_controllers(root: &Path) {
    if let Ok(c) = std::fs::read_to_string(root.join("cgroup.controllers")) {
        for ctrl in c.split_whitespace() {
            let _ = std::fs::write(root.join("cgroup.subtree_control"), format!("+{ctrl}"));
        }
    }
}

/// As a host process: become the subreaper of everything we spawn, and get a
/// private mount namespace (call before any thread exists) so the agent's
/// mounts (sandbox shm, block rootfs) never leak to the host. As the init of
/// a fresh PID namespace, /proc must show that namespace: /proc/PID/ns paths
/// of the pod are resolved through it.
///
/// `peer`: (a shared directory of the host, where to attach it): a copy of the host's
/// mount is taken before the namespace is made one-way and attached afterwards, so it
/// stays a peer of the host's (mounts below it travel both ways). huskd binds the host
/// sources of bidirectional volumes there (husk-ns).
pub fn host_process_setup(
    private_mounts: bool,
    pid1: bool,
    peer: Option<(&Path, &Path)>,
) -> Result<(), InitError> {
    nix::sys::prctl::set_child_subreaper(true)
        .map_err(|e| InitError::Os("set child subreaper", e))?;
    let peer_tree = match peer {
        Some((src, _)) => Some(clone_mount(src)?),
        None => None,
    };
    if private_mounts || pid1 {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
            .map_err(|e| InitError::Os("unshare mount ns", e))?;
        nix::mount::mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_SLAVE,
            None::<&str>,
        )
        .map_err(|e| InitError::Os("make / rslave", e))?;
    }
    if let (Some(tree), Some((_, at))) = (peer_tree, peer) {
        std::fs::create_dir_all(at).map_err(|e| {
            InitError::Os(
                "mkdir the bidirectional propagation dir",
                nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
            )
        })?;
        attach_mount(&tree, at)?;
    }
    if pid1 {
        let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
        nix::mount::mount(Some("proc"), "/proc", Some("proc"), flags, None::<&str>)
            .map_err(|e| InitError::Os("mount /proc for the new pid namespace", e))?;
    }
    Ok(())
}

const OPEN_TREE_CLONE: libc::c_uint = 0x1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;

fn path_cstr(p: &Path) -> Result<std::ffi::CString, InitError> {
    std::ffi::CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|_| InitError::Os("path with a NUL byte", nix::Error::EINVAL))
}

/// A detached copy of the mount at `src` (`open_tree(OPEN_TREE_CLONE)`): of a shared
/// mount, a peer of it.
fn clone_mount(src: &Path) -> Result<std::os::fd::OwnedFd, InitError> {
    use std::os::fd::FromRawFd;
    let c = path_cstr(src)?;
    // SAFETY: open_tree of a valid C string; the result is checked before use.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            c.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(InitError::Os(
            "open_tree of the bidirectional propagation dir",
            nix::Error::last(),
        ));
    }
    // SAFETY: a new descriptor open_tree returned, owned by nobody else.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// Attaches the detached tree `tree` at `at` (`move_mount`).
fn attach_mount(tree: &std::os::fd::OwnedFd, at: &Path) -> Result<(), InitError> {
    use std::os::fd::AsRawFd;
    let c = path_cstr(at)?;
    // SAFETY: move_mount from a descriptor we hold (empty path) to a valid C string.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            c.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if r < 0 {
        return Err(InitError::Os(
            "attach the bidirectional propagation dir",
            nix::Error::last(),
        ));
    }
    Ok(())
}

/// PID 1 shutdown: stop everything, flush, power off. Never returns.
pub fn poweroff() -> ! {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(-1),
        nix::sys::signal::Signal::SIGKILL,
    );
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    std::process::exit(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::syscall::RecordingSyscall;

    #[test]
    fn guest_mounts_in_order() {
        let sys = RecordingSyscall::default();
        mount_guest_filesystems(&sys).expect("mounts");
        let targets: Vec<String> = sys
            .mounts()
            .iter()
            .map(|m| m.1.display().to_string())
            .collect();
        assert_eq!(
            targets,
            [
                "/proc",
                "/sys",
                "/dev",
                "/dev/pts",
                "/dev/shm",
                "/run",
                "/sys/fs/cgroup"
            ]
        );
        let cg = &sys.mounts()[6];
        assert_eq!(cg.2.as_deref(), Some("cgroup2"));
        assert!(
            sys.calls()
                .iter()
                .any(|c| format!("{c:?}").contains("favordynmods"))
        );
        assert!(sys.calls().contains(&crate::syscall::Call::Symlink(
            "pts/ptmx".into(),
            "/dev/ptmx".into()
        )));
    }
}

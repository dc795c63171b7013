//! Pod network namespaces as bind-mounted nsfs files
//! (`<run_dir>/netns/<pod id>`), work done inside one on a short-lived
//! thread (no runtime thread ever changes namespace), and the few link
//! ioctls huskd needs (up, MTU, MAC).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("netns thread panicked")]
    Panicked,
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> NetnsError + 'a {
    move |source| NetnsError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

fn errno(e: nix::Error) -> std::io::Error {
    std::io::Error::from_raw_os_error(e as i32)
}

/// Makes a fresh network namespace pinned at `path` with `lo` up.
pub fn create(path: &Path) -> Result<(), NetnsError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io("create", path))?;
    let target = path.to_path_buf();
    let made = std::thread::spawn(move || -> Result<(), NetnsError> {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| io("unshare net for", &target)(errno(e)))?;
        nix::mount::mount(
            Some("/proc/thread-self/ns/net"),
            &target,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| io("bind mount netns on", &target)(errno(e)))?;
        set_up("lo").map_err(io("bring up lo in", &target))
    })
    .join()
    .map_err(|_| NetnsError::Panicked)
    .and_then(|r| r);
    if made.is_err() {
        let _ = remove(path);
    }
    made
}

/// Unmounts and deletes a pinned namespace; absent is fine.
pub fn remove(path: &Path) -> Result<(), NetnsError> {
    match nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => {}
        Err(e) => return Err(io("unmount", path)(errno(e))),
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io("remove", path)(e)),
    }
}

/// Whether `path` is a mounted network namespace (not just a leftover file).
pub fn is_netns(path: &Path) -> bool {
    const NSFS_MAGIC: i64 = 0x6e73_6673;
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type().0 == NSFS_MAGIC)
        .unwrap_or(false)
}

/// Runs `f` on a new thread that joined the namespace at `path`; processes
/// it spawns start in that namespace.
pub fn run_in<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, NetnsError> {
    let ns = std::fs::File::open(path).map_err(io("open netns", path))?;
    let p = path.to_path_buf();
    std::thread::spawn(move || -> Result<T, NetnsError> {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| io("join netns", &p)(errno(e)))?;
        Ok(f())
    })
    .join()
    .map_err(|_| NetnsError::Panicked)?
}

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req
        .ifr_name
        .iter_mut()
        .zip(name.bytes().take(libc::IFNAMSIZ - 1))
    {
        *d = s as libc::c_char;
    }
    req
}

fn ctl_socket() -> std::io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ioctl(fd: &OwnedFd, req: libc::c_ulong, r: &mut libc::ifreq) -> std::io::Result<()> {
    // SAFETY: the SIOC* requests used here read/write one ifreq that outlives the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), req as _, r as *mut libc::ifreq) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Sets link `name` (in the calling thread's namespace) up.
pub fn set_up(name: &str) -> std::io::Result<()> {
    let s = ctl_socket()?;
    let mut r = ifreq(name);
    ioctl(&s, libc::SIOCGIFFLAGS, &mut r)?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe { r.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    ioctl(&s, libc::SIOCSIFFLAGS, &mut r)
}

/// The MTU of link `name`.
pub fn mtu(name: &str) -> std::io::Result<u32> {
    let s = ctl_socket()?;
    let mut r = ifreq(name);
    ioctl(&s, libc::SIOCGIFMTU, &mut r)?;
    // SAFETY: SIOCGIFMTU filled the mtu member of the union.
    Ok(unsafe { r.ifr_ifru.ifru_mtu } as u32)
}

pub fn set_mtu(name: &str, mtu: u32) -> std::io::Result<()> {
    let s = ctl_socket()?;
    let mut r = ifreq(name);
    r.ifr_ifru.ifru_mtu = mtu as libc::c_int;
    ioctl(&s, libc::SIOCSIFMTU, &mut r)
}

/// The MAC address of link `name`, as `aa:bb:cc:dd:ee:ff`.
pub fn mac(name: &str) -> std::io::Result<String> {
    let s = ctl_socket()?;
    let mut r = ifreq(name);
    ioctl(&s, libc::SIOCGIFHWADDR, &mut r)?;
    // SAFETY: SIOCGIFHWADDR filled the hwaddr member of the union.
    let sa = unsafe { r.ifr_ifru.ifru_hwaddr };
    Ok(sa.sa_data[..6]
        .iter()
        .map(|b| format!("{:02x}", *b as u8))
        .collect::<Vec<_>>()
        .join(":"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn create_use_remove() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root to create a network namespace");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("netns/pod");
        create(&p).unwrap();
        assert!(is_netns(&p));
        assert!(create(&p).is_err(), "exists already");
        let (lo_mtu, lo_mac) = run_in(&p, || (mtu("lo").unwrap(), mac("lo").unwrap())).unwrap();
        assert_eq!(lo_mtu, 65536);
        assert_eq!(lo_mac, "00:00:00:00:00:00");
        let ours = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
        let theirs = run_in(&p, || {
            std::fs::read_link("/proc/thread-self/ns/net").unwrap()
        })
        .unwrap();
        assert_ne!(ours, theirs);
        remove(&p).unwrap();
        assert!(!p.exists());
        remove(&p).unwrap();
        assert!(!is_netns(&p));
    }
}

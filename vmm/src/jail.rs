//! `husk-vmm jail`: starts a VMM or helper process (QEMU, `husk-vmm vhost-user …`, husk-vmm
//! itself) jailed, after Firecracker's jailer. Run as root by huskd, it
//! - opens the directories the program reaches by fd (`--open-dir PATH:FD`) while it still sees
//!   the host's tree (the virtio-fs server's share: mounts huskd adds under it later stay
//!   reachable through the fd, which a bind mount in a private namespace would not see),
//! - enters a private mount namespace and builds a minimal root on a small tmpfs: `/usr`
//!   read-only (and the host's `/bin`, `/lib*`, `/sbin` symlinks into it), the program and the
//!   paths named by `--ro` read-only, those named by `--rw` (its sockets dir, its console file)
//!   writable, its own nodes for a few devices (`null`, `zero`, `full`, `random`, `urandom`, plus
//!   `--dev` ones such as `kvm`, given to its uid when the host's node is not for everyone), a `/proc` that shows only its own processes; everything at the same
//!   absolute path as on the host, so command lines need no rewriting;
//! - `pivot_root`s into it, detaches the host's tree and makes the new root read-only,
//! - drops to the pod's uid/gid with no supplementary groups, every capability gone from the
//!   bounding set except `--keep-fs-caps` ones (the virtio-fs server's `FS_CAPS`, carried over
//!   exec as ambient capabilities of a non-root user), sets no_new_privs,
//! - and execs the program with a clean environment.
//!
//! What it cannot take away is left to the program: its seccomp filter (husk-vmm's allow list,
//! QEMU's `-sandbox`), and the cgroup placement huskd does after the spawn.

use std::ffi::{CString, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("{what} {path}: {source}")]
    Path {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}: {1}")]
    Os(&'static str, #[source] std::io::Error),
    #[error("bad jail argument: {0}")]
    Arg(String),
}

/// What to jail a program in.
#[derive(Debug, Clone, Default)]
pub struct JailSpec {
    pub uid: u32,
    pub gid: u32,
    /// An empty directory the jail's tmpfs root is mounted on (in the jail's namespace only).
    pub root: PathBuf,
    pub ro: Vec<PathBuf>,
    pub rw: Vec<PathBuf>,
    /// Device nodes besides the default ones, by name under /dev (e.g. `kvm`).
    pub devs: Vec<String>,
    /// Directories opened (O_PATH) onto the given fd numbers before the root changes.
    pub open_dirs: Vec<(PathBuf, i32)>,
    /// Keep `confine::FS_CAPS` (as ambient capabilities of the unprivileged user).
    pub keep_fs_caps: bool,
    /// Environment variables passed through (the rest is dropped).
    pub env: Vec<(String, String)>,
}

/// Device nodes every jail has.
const DEFAULT_DEVS: &[&str] = &["null", "zero", "full", "random", "urandom"];
/// Host top-level entries that are symlinks into /usr on a merged-/usr system.
const USR_LINKS: &[&str] = &["bin", "sbin", "lib", "lib32", "lib64", "libx32"];
/// Environment variables a jailed program keeps.
/// `HUSK_SANDBOX` marks the process as its pod's for a restarted huskd (host-shim's
/// `sandbox/orphans.rs`).
pub const KEPT_ENV: &[&str] = &[
    "HUSK_VMM_LOG",
    "HUSK_SECCOMP",
    "RUST_BACKTRACE",
    "HUSK_SANDBOX",
];

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> JailError + 'a {
    move |source| JailError::Path {
        what,
        path: path.to_path_buf(),
        source,
    }
}

fn cstr(p: &OsStr) -> Result<CString, JailError> {
    CString::new(p.as_bytes()).map_err(|_| JailError::Arg(format!("NUL in {p:?}")))
}

fn last(what: &'static str) -> JailError {
    JailError::Os(what, std::io::Error::last_os_error())
}

fn mount(
    src: Option<&Path>,
    dst: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), JailError> {
    let src_c = src.map(|s| cstr(s.as_os_str())).transpose()?;
    let dst_c = cstr(dst.as_os_str())?;
    let fs_c = fstype.map(|f| cstr(OsStr::new(f))).transpose()?;
    let data_c = data.map(|d| cstr(OsStr::new(d))).transpose()?;
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated string alive for the call.
    let r = unsafe {
        libc::mount(
            ptr(&src_c),
            dst_c.as_ptr(),
            ptr(&fs_c),
            flags,
            ptr(&data_c) as *const libc::c_void,
        )
    };
    if r != 0 {
        return Err(JailError::Path {
            what: "mount",
            path: dst.to_path_buf(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// `root` + absolute `p`.
fn inside(root: &Path, p: &Path) -> Result<PathBuf, JailError> {
    if !p.is_absolute() {
        return Err(JailError::Arg(format!(
            "{} is not an absolute path",
            p.display()
        )));
    }
    Ok(root.join(p.strip_prefix("/").unwrap_or(p)))
}

/// Bind-mounts host `src` at the same path under `root`; read-only unless `rw`; nosuid and
/// nodev always, noexec when writable.
fn bind(root: &Path, src: &Path, rw: bool) -> Result<(), JailError> {
    let meta = std::fs::metadata(src).map_err(io("bind source", src))?;
    let dst = inside(root, src)?;
    if let Some(parent) = dst.parent() {
        std::fs::create_dir_all(parent).map_err(io("jail dir", parent))?;
    }
    if meta.is_dir() {
        std::fs::create_dir_all(&dst).map_err(io("jail dir", &dst))?;
    } else if !dst.exists() {
        std::fs::File::create(&dst).map_err(io("jail file", &dst))?;
    }
    mount(Some(src), &dst, None, libc::MS_BIND | libc::MS_REC, None)?;
    let mut flags = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_NOSUID | libc::MS_NODEV;
    if rw {
        flags |= libc::MS_NOEXEC;
    } else {
        flags |= libc::MS_RDONLY;
    }
    mount(None, &dst, None, flags, None)
}

/// Makes the jail's own node for host character device `/dev/<name>` (same device number and
/// mode). One the host keeps from other users (as /dev/kvm often is, 0600 root) is given to
/// the jail's uid/gid: the host's node stays as it is.
fn dev_node(dev_dir: &Path, name: &str, uid: u32, gid: u32) -> Result<(), JailError> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let host = Path::new("/dev").join(name);
    let meta = std::fs::metadata(&host).map_err(io("device", &host))?;
    if !meta.file_type().is_char_device() {
        return Err(JailError::Arg(format!(
            "{} is not a character device",
            host.display()
        )));
    }
    let dst = dev_dir.join(name);
    let c = cstr(dst.as_os_str())?;
    let perm = meta.mode() & 0o666;
    // SAFETY: mknod with a valid C string and the host node's device number.
    if unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | perm, meta.rdev()) } != 0 {
        return Err(JailError::Path {
            what: "mknod",
            path: dst,
            source: std::io::Error::last_os_error(),
        });
    }
    // mknod's mode is masked by the umask: set it exactly.
    let mut mode = perm;
    if perm & 0o006 != 0o006 {
        std::os::unix::fs::chown(&dst, Some(uid), Some(gid)).map_err(io("chown", &dst))?;
        mode = 0o600;
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(mode))
        .map_err(io("chmod", &dst))?;
    Ok(())
}

/// Builds the jail root on `spec.root` (in a new private mount namespace) and pivots into it.
fn build_root(spec: &JailSpec, program: &Path) -> Result<(), JailError> {
    // SAFETY: unshare with a flag constant.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        return Err(last("unshare mount namespace"));
    }
    // Nothing done here reaches the host's mount table, and nothing the host mounts later
    // appears in the jail.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )?;
    let root = &spec.root;
    mount(
        Some(Path::new("tmpfs")),
        root,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("mode=0755,size=1m,nr_inodes=4096"),
    )?;
    bind(root, Path::new("/usr"), false)?;
    for l in USR_LINKS {
        let host = Path::new("/").join(l);
        match std::fs::read_link(&host) {
            Ok(target) => std::os::unix::fs::symlink(&target, root.join(l))
                .map_err(io("jail symlink", &host))?,
            // Not merged /usr: the directory itself, read-only.
            Err(_) if host.is_dir() => bind(root, &host, false)?,
            Err(_) => {}
        }
    }
    if !program.starts_with("/usr/") {
        bind(root, program, false)?;
    }
    for p in &spec.ro {
        bind(root, p, false)?;
    }
    for p in &spec.rw {
        bind(root, p, true)?;
    }
    let dev = root.join("dev");
    std::fs::create_dir_all(&dev).map_err(io("jail dir", &dev))?;
    for d in DEFAULT_DEVS
        .iter()
        .copied()
        .chain(spec.devs.iter().map(String::as_str))
    {
        if d.contains('/') || d.contains("..") {
            return Err(JailError::Arg(format!("bad device name {d:?}")));
        }
        dev_node(&dev, d, spec.uid, spec.gid)?;
    }
    let proc = root.join("proc");
    std::fs::create_dir_all(&proc).map_err(io("jail dir", &proc))?;
    mount(
        Some(Path::new("proc")),
        &proc,
        Some("proc"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        Some("hidepid=invisible,subset=pid"),
    )?;
    std::env::set_current_dir(root).map_err(io("chdir", root))?;
    // SAFETY: pivot_root(".", ".") stacks the old root on the new one; both strings are valid.
    if unsafe { libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) } != 0 {
        return Err(last("pivot_root"));
    }
    // SAFETY: detaches the old root (stacked on "."); a valid string.
    if unsafe { libc::umount2(c".".as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(last("detach the host root"));
    }
    std::env::set_current_dir("/").map_err(io("chdir", Path::new("/")))?;
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NOEXEC,
        None,
    )
}

/// Opens each `(dir, fd)` as an O_PATH directory fd numbered `fd`, inherited across exec.
fn open_dirs(dirs: &[(PathBuf, i32)]) -> Result<(), JailError> {
    for (p, n) in dirs {
        if *n < 3 {
            return Err(JailError::Arg(format!("fd {n} is stdio")));
        }
        let c = cstr(p.as_os_str())?;
        // SAFETY: open with a valid C string; checked below.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_DIRECTORY) };
        if fd < 0 {
            return Err(JailError::Path {
                what: "open",
                path: p.clone(),
                source: std::io::Error::last_os_error(),
            });
        }
        if fd != *n {
            // SAFETY: dup2 onto a number we own from here on (no CLOEXEC on the copy); the
            // original is closed.
            let r = unsafe { libc::dup2(fd, *n) };
            // SAFETY: closing the fd opened just above.
            unsafe { libc::close(fd) };
            if r < 0 {
                return Err(last("dup2"));
            }
        }
    }
    Ok(())
}

/// Leaves root: the bounding set shrinks to `keep`, then uid/gid change (keeping `keep` as
/// permitted, effective, inheritable and ambient so they survive the exec), no_new_privs.
fn drop_to_user(uid: u32, gid: u32, keep: &[u32]) -> Result<(), JailError> {
    if uid == 0 || gid == 0 {
        return Err(JailError::Arg("the jail uid/gid must not be 0".into()));
    }
    for cap in 0..=crate::confine::LAST_CAP {
        if keep.contains(&cap) {
            continue;
        }
        // SAFETY: prctl with integer arguments; EINVAL past the kernel's last cap ends the loop.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINVAL) {
                break;
            }
            return Err(JailError::Os("drop bounding capability", e));
        }
    }
    if !keep.is_empty() {
        // SAFETY: prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) } != 0 {
            return Err(last("keepcaps"));
        }
    }
    // SAFETY: setgroups with an empty list, then setresgid/setresuid with plain ids.
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0 {
            return Err(last("setgroups"));
        }
        if libc::setresgid(gid, gid, gid) != 0 {
            return Err(last("setresgid"));
        }
        if libc::setresuid(uid, uid, uid) != 0 {
            return Err(last("setresuid"));
        }
    }
    if !keep.is_empty() {
        crate::confine::set_caps(keep, true).map_err(|e| JailError::Arg(e.to_string()))?;
        for cap in keep {
            // SAFETY: prctl with integer arguments.
            let r = unsafe {
                libc::prctl(
                    libc::PR_CAP_AMBIENT,
                    libc::PR_CAP_AMBIENT_RAISE,
                    *cap as libc::c_ulong,
                    0,
                    0,
                )
            };
            if r != 0 {
                return Err(last("raise ambient capability"));
            }
        }
    }
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(last("no_new_privs"));
    }
    Ok(())
}

/// Jails this (single-threaded) process and execs `program` with `args`; returns only on error.
pub fn exec(spec: &JailSpec, program: &Path, args: &[String]) -> JailError {
    let run = || -> Result<std::convert::Infallible, JailError> {
        let program = std::fs::canonicalize(program).map_err(io("program", program))?;
        let prog_c = cstr(program.as_os_str())?;
        let mut argv_c = vec![prog_c.clone()];
        for a in args {
            argv_c.push(cstr(OsStr::new(a))?);
        }
        let env_c = spec
            .env
            .iter()
            .map(|(k, v)| cstr(OsStr::new(&format!("{k}={v}"))))
            .collect::<Result<Vec<_>, _>>()?;
        open_dirs(&spec.open_dirs)?;
        build_root(spec, &program)?;
        drop_to_user(
            spec.uid,
            spec.gid,
            if spec.keep_fs_caps {
                crate::confine::FS_CAPS
            } else {
                &[]
            },
        )?;
        let mut argv: Vec<*const libc::c_char> = argv_c.iter().map(|c| c.as_ptr()).collect();
        argv.push(std::ptr::null());
        let mut envp: Vec<*const libc::c_char> = env_c.iter().map(|c| c.as_ptr()).collect();
        envp.push(std::ptr::null());
        // SAFETY: NULL-terminated arrays of valid C strings that outlive the call.
        unsafe { libc::execve(prog_c.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
        Err(last("exec"))
    };
    match run() {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

/// `PATH:FD` of `--open-dir`.
pub fn parse_open_dir(s: &str) -> Result<(PathBuf, i32), String> {
    let (p, n) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?}: want PATH:FD"))?;
    let n: i32 = n.parse().map_err(|_| format!("{s:?}: bad fd"))?;
    Ok((PathBuf::from(p), n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_dir_argument() {
        assert_eq!(
            parse_open_dir("/a:b/c:3").unwrap(),
            (PathBuf::from("/a:b/c"), 3)
        );
        assert!(parse_open_dir("/a").is_err());
        assert!(parse_open_dir("/a:x").is_err());
        assert!(inside(Path::new("/r"), Path::new("rel")).is_err());
        assert_eq!(
            inside(Path::new("/r"), Path::new("/usr/bin")).unwrap(),
            PathBuf::from("/r/usr/bin")
        );
    }
}

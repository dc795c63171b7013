//! File operations confined beneath a directory the guest can write (a VM pod's share).
//!
//! Nothing here resolves a guest-made path by name: a [`Dir`] is an `O_PATH` descriptor
//! opened once from a path only huskd writes, and every name below it is one component
//! resolved with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`.
//! Mounts are made with the fd-based mount API (`open_tree` + `mount_setattr` +
//! `move_mount` onto an `O_PATH` descriptor) and taken off through `/proc/self/fd/N` of a
//! descriptor that was vetted first, so a symlink the guest plants where an entry was (or
//! will be) never sends an unmount, a bind or a removal to a host path.

use std::ffi::{CStr, CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// How deep [`Dir::remove_tree`] goes into a guest-made tree before giving up.
pub const MAX_REMOVE_DEPTH: usize = 64;
/// How many mounts [`Dir::unmount`] takes off one entry at most (stacked binds).
const MAX_STACKED_MOUNTS: usize = 16;

// uapi/linux/mount.h (not all exported by the libc crate).
const OPEN_TREE_CLONE: libc::c_uint = 0x1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
const MOVE_MOUNT_T_EMPTY_PATH: libc::c_uint = 0x40;
pub const MOUNT_ATTR_RDONLY: u64 = 0x1;
pub const MOUNT_ATTR_NOSUID: u64 = 0x2;
pub const MOUNT_ATTR_NODEV: u64 = 0x4;

/// `struct mount_attr` (uapi/linux/mount.h, `MOUNT_ATTR_SIZE_VER0`).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

const RESOLVE: u64 =
    libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;

fn cname(name: &OsStr) -> io::Result<CString> {
    let b = name.as_bytes();
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not one path component"),
        ));
    }
    CString::new(b).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "nul in a name"))
}

fn cpath(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "nul in a path"))
}

fn fd_result(r: libc::c_long) -> io::Result<OwnedFd> {
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = RawFd::try_from(r).map_err(|_| io::Error::other("descriptor out of range"))?;
    // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn check(r: libc::c_long) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    // SAFETY: zeroed is a valid `stat`; fstat fills it for a valid descriptor.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid descriptor and out pointer.
    check(libc::c_long::from(unsafe { libc::fstat(fd, &mut st) }))?;
    Ok(st)
}

/// The id of the mount `fd` is on (`statx` `STATX_MNT_ID`).
fn mount_id(fd: RawFd) -> io::Result<u64> {
    // SAFETY: zeroed is a valid `statx`.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: statx of the descriptor itself (empty path), valid out pointer.
    check(libc::c_long::from(unsafe {
        libc::statx(
            fd,
            c"".as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
            libc::STATX_MNT_ID,
            &mut stx,
        )
    }))?;
    if stx.stx_mask & libc::STATX_MNT_ID == 0 {
        return Err(io::Error::other("statx gave no mount id"));
    }
    Ok(stx.stx_mnt_id)
}

fn proc_fd(fd: RawFd) -> CString {
    CString::new(format!("/proc/self/fd/{fd}")).unwrap_or_default()
}

/// What kind of node an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    /// A symlink, FIFO, socket or device: never ours.
    Other,
}

fn kind(st: &libc::stat) -> Kind {
    match st.st_mode & libc::S_IFMT {
        libc::S_IFDIR => Kind::Dir,
        libc::S_IFREG => Kind::File,
        _ => Kind::Other,
    }
}

/// A directory held by an `O_PATH` descriptor; every operation takes one component below it.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    mnt: u64,
}

impl Dir {
    /// Opens `path` (a path only huskd writes; its last component is not followed).
    pub fn open(path: &Path) -> io::Result<Self> {
        let c = cpath(path)?;
        // SAFETY: open of a valid C string; the result is checked.
        let fd = fd_result(libc::c_long::from(unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        }))?;
        Self::from_fd(fd)
    }

    fn from_fd(fd: OwnedFd) -> io::Result<Self> {
        let mnt = mount_id(fd.as_raw_fd())?;
        Ok(Self { fd, mnt })
    }

    /// `openat2` of one component with `flags`, never following a symlink or leaving the
    /// directory; with `same_mount` it also refuses (`EXDEV`) to cross onto a mount.
    fn open_at(
        &self,
        name: &CStr,
        flags: libc::c_int,
        mode: u32,
        same_mount: bool,
    ) -> io::Result<OwnedFd> {
        // SAFETY: zeroed is a valid `open_how`; its fields are set below.
        let mut how: libc::open_how = unsafe { std::mem::zeroed() };
        how.flags = (flags | libc::O_CLOEXEC | libc::O_NOFOLLOW) as u64;
        how.mode = if flags & libc::O_CREAT != 0 {
            u64::from(mode & 0o777)
        } else {
            0
        };
        how.resolve = RESOLVE | if same_mount { libc::RESOLVE_NO_XDEV } else { 0 };
        // SAFETY: openat2 with our own dir fd, a valid C string and a valid `open_how`.
        fd_result(unsafe {
            libc::syscall(
                libc::SYS_openat2,
                self.fd.as_raw_fd(),
                name.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        })
    }

    /// The entries of the directory (names only, `.` and `..` left out).
    pub fn entries(&self) -> io::Result<Vec<OsString>> {
        let fd = self.open_at(c".", libc::O_RDONLY | libc::O_DIRECTORY, 0, true)?;
        let mut dir = nix::dir::Dir::from_fd(fd).map_err(io::Error::from)?;
        let mut out = Vec::new();
        for e in dir.iter() {
            let e = e.map_err(io::Error::from)?;
            let n = e.file_name().to_bytes();
            if n != b"." && n != b".." {
                out.push(OsStr::from_bytes(n).to_os_string());
            }
        }
        Ok(out)
    }

    /// Makes a new directory `name` (fails if anything is there already).
    pub fn mkdir(&self, name: &OsStr, mode: u32) -> io::Result<()> {
        let c = cname(name)?;
        // SAFETY: mkdirat of one validated component in our own dir fd (never follows).
        check(libc::c_long::from(unsafe {
            libc::mkdirat(self.fd.as_raw_fd(), c.as_ptr(), mode & 0o777)
        }))
    }

    /// Makes a new empty regular file `name` (fails if anything is there already).
    pub fn create_file(&self, name: &OsStr, mode: u32) -> io::Result<()> {
        let c = cname(name)?;
        self.open_at(
            &c,
            libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY,
            mode,
            true,
        )
        .map(drop)
    }

    /// An `O_PATH` descriptor of entry `name` on this directory's own mount, with its kind.
    fn node(&self, name: &CStr) -> io::Result<(OwnedFd, Kind)> {
        let fd = self.open_at(name, libc::O_PATH, 0, true)?;
        let k = kind(&fstat(fd.as_raw_fd())?);
        Ok((fd, k))
    }

    /// Binds the detached mount `tree` (see [`clone_tree`]) over entry `name`, which must be
    /// a directory or regular file (as `want`) of ours and not a mount already.
    pub fn attach(&self, tree: &OwnedFd, name: &OsStr, want: Kind) -> io::Result<()> {
        let c = cname(name)?;
        let (target, k) = self.node(&c)?;
        if k != want {
            return Err(io::Error::other(format!(
                "{name:?} is a {k:?}, not the {want:?} made for the mount"
            )));
        }
        // SAFETY: move_mount between two descriptors we hold (empty paths: no resolution).
        check(unsafe {
            libc::syscall(
                libc::SYS_move_mount,
                tree.as_raw_fd(),
                c"".as_ptr(),
                target.as_raw_fd(),
                c"".as_ptr(),
                MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH,
            )
        })
    }

    /// Lazily detaches every mount stacked on entry `name` (a directory or regular file; a
    /// symlink or anything else is left alone). Returns how many were taken off.
    pub fn unmount(&self, name: &OsStr) -> io::Result<usize> {
        let c = cname(name)?;
        let mut n = 0;
        while n < MAX_STACKED_MOUNTS {
            // Crossing mounts here on purpose: the descriptor lands on the topmost one.
            let fd = match self.open_at(&c, libc::O_PATH, 0, false) {
                Ok(fd) => fd,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(n),
                Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Ok(n),
                Err(e) => return Err(e),
            };
            let k = kind(&fstat(fd.as_raw_fd())?);
            if k == Kind::Other || mount_id(fd.as_raw_fd())? == self.mnt {
                return Ok(n);
            }
            // `/proc/self/fd/N` resolves to exactly the (mount, dentry) the vetted descriptor
            // holds, the root of the mount stacked on the entry: nothing else can be hit.
            let p = proc_fd(fd.as_raw_fd());
            // SAFETY: umount2 of a valid C string.
            check(libc::c_long::from(unsafe {
                libc::umount2(p.as_ptr(), libc::MNT_DETACH)
            }))?;
            n += 1;
        }
        Err(io::Error::other(format!(
            "{name:?}: more than {MAX_STACKED_MOUNTS} mounts stacked"
        )))
    }

    /// Removes entry `name` and, for a directory, everything below it, never following a
    /// symlink nor crossing onto a mount (a mount found below is an error, left in place).
    pub fn remove_tree(&self, name: &OsStr) -> io::Result<()> {
        self.remove_below(&cname(name)?, MAX_REMOVE_DEPTH)
    }

    fn remove_below(&self, name: &CStr, depth: usize) -> io::Result<()> {
        let k = match self.node(name) {
            Ok((_, k)) => k,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            // A symlink (ELOOP, not opened) is removed as the link itself below.
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => Kind::Other,
            Err(e) => return Err(e),
        };
        if k == Kind::Dir {
            if depth == 0 {
                return Err(io::Error::other(format!(
                    "{name:?}: deeper than {MAX_REMOVE_DEPTH} levels"
                )));
            }
            let sub = self.open_at(name, libc::O_PATH | libc::O_DIRECTORY, 0, true)?;
            let sub = Dir::from_fd(sub)?;
            for e in sub.entries()? {
                sub.remove_below(&cname(&e)?, depth - 1)?;
            }
        }
        let flags = if k == Kind::Dir {
            libc::AT_REMOVEDIR
        } else {
            0
        };
        // SAFETY: unlinkat of one validated component in our own dir fd (never follows).
        let r = unsafe { libc::unlinkat(self.fd.as_raw_fd(), name.as_ptr(), flags) };
        match check(libc::c_long::from(r)) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            r => r,
        }
    }
}

impl AsFd for Dir {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// A detached recursive copy of the mount tree at `src` (`open_tree(OPEN_TREE_CLONE)`),
/// with `attr_set` (`MOUNT_ATTR_*`) applied to every mount in it and `propagation`
/// (`MS_SLAVE`: a slave of its source, host-to-container; `MS_PRIVATE`) set on each.
/// `src` is a host path from the CRI.
pub fn clone_tree(src: &Path, attr_set: u64, propagation: u64) -> io::Result<OwnedFd> {
    let c = cpath(src)?;
    // SAFETY: open_tree of a valid C string; the result is checked.
    let tree = fd_result(unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            c.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | libc::AT_RECURSIVE as libc::c_uint,
        )
    })?;
    let attr = MountAttr {
        attr_set,
        attr_clr: 0,
        propagation,
        userns_fd: 0,
    };
    // SAFETY: mount_setattr on the detached tree we hold, with a valid `mount_attr`.
    check(unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    })?;
    Ok(tree)
}

//! The real implementation of the seam.

use std::fs::OpenOptions;
use std::os::fd::AsFd;
use std::path::Path;

use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;

use super::{Result, Syscall, SyscallError};

#[derive(Debug, Default, Clone, Copy)]
pub struct LinuxSyscall;

fn nix_err(op: &'static str, path: &Path) -> impl FnOnce(nix::Error) -> SyscallError {
    let path = path.display().to_string();
    move |source| SyscallError::Nix { op, path, source }
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SyscallError {
    let path = path.display().to_string();
    move |source| SyscallError::Io { op, path, source }
}

impl Syscall for LinuxSyscall {
    fn mount(
        &self,
        source: Option<&Path>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Result<()> {
        nix::mount::mount(source, target, fstype, flags, data).map_err(nix_err("mount", target))
    }

    fn umount2(&self, target: &Path, flags: MntFlags) -> Result<()> {
        nix::mount::umount2(target, flags).map_err(nix_err("umount", target))
    }

    fn mount_setattr(&self, target: &Path, set: MsFlags, recursive: bool) -> Result<()> {
        // The kernel's `struct mount_attr` (linux/mount.h).
        #[repr(C)]
        struct MountAttr {
            attr_set: u64,
            attr_clr: u64,
            propagation: u64,
            userns_fd: u64,
        }
        const MOUNT_ATTR_RDONLY: u64 = 0x1;
        const MOUNT_ATTR_NOSUID: u64 = 0x2;
        const MOUNT_ATTR_NODEV: u64 = 0x4;
        const MOUNT_ATTR_NOEXEC: u64 = 0x8;
        let mut attr_set = 0;
        for (ms, attr) in [
            (MsFlags::MS_RDONLY, MOUNT_ATTR_RDONLY),
            (MsFlags::MS_NOSUID, MOUNT_ATTR_NOSUID),
            (MsFlags::MS_NODEV, MOUNT_ATTR_NODEV),
            (MsFlags::MS_NOEXEC, MOUNT_ATTR_NOEXEC),
        ] {
            if set.contains(ms) {
                attr_set |= attr;
            }
        }
        let attr = MountAttr {
            attr_set,
            attr_clr: 0,
            propagation: 0,
            userns_fd: 0,
        };
        let path = std::ffi::CString::new(target.as_os_str().as_encoded_bytes())
            .map_err(|_| nix_err("mount_setattr", target)(nix::Error::EINVAL))?;
        let flags = if recursive { libc::AT_RECURSIVE } else { 0 };
        // SAFETY: a NUL-terminated path and a `mount_attr` that live across the call,
        // with its size; the kernel reads nothing else.
        let r = unsafe {
            libc::syscall(
                libc::SYS_mount_setattr,
                libc::AT_FDCWD,
                path.as_ptr(),
                flags,
                &attr as *const MountAttr,
                std::mem::size_of::<MountAttr>(),
            )
        };
        if r < 0 {
            return Err(nix_err("mount_setattr", target)(nix::Error::last()));
        }
        Ok(())
    }

    fn pivot_root(&self, new_root: &Path) -> Result<()> {
        // pivot_root(".", ".") stacks the old root on top of the new one; a lazy
        // unmount of the old root then drops it without needing a put_old directory.
        // As runc does, the old root is reached through a descriptor opened before the
        // pivot ("." is the new root's own mount for mount(2)), and its mounts are made
        // slaves first: with a shared root, their unmount would otherwise reach their
        // peers (a bidirectional volume's host side).
        let old_root = std::fs::File::open("/").map_err(io_err("open", Path::new("/")))?;
        nix::unistd::chdir(new_root).map_err(nix_err("chdir", new_root))?;
        nix::unistd::pivot_root(".", ".").map_err(nix_err("pivot_root", new_root))?;
        nix::unistd::fchdir(old_root.as_fd()).map_err(nix_err("fchdir old root", new_root))?;
        nix::mount::mount(
            None::<&str>,
            ".",
            None::<&str>,
            MsFlags::MS_SLAVE | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(nix_err("make the old root rslave", new_root))?;
        nix::mount::umount2(".", MntFlags::MNT_DETACH)
            .map_err(nix_err("umount old root", new_root))?;
        nix::unistd::chdir("/").map_err(nix_err("chdir", Path::new("/")))
    }

    fn chdir(&self, path: &Path) -> Result<()> {
        nix::unistd::chdir(path).map_err(nix_err("chdir", path))
    }

    fn sethostname(&self, name: &str) -> Result<()> {
        nix::unistd::sethostname(name).map_err(nix_err("sethostname", Path::new(name)))
    }

    fn unshare(&self, flags: CloneFlags) -> Result<()> {
        nix::sched::unshare(flags).map_err(nix_err("unshare", Path::new("")))
    }

    fn setns(&self, path: &Path, kind: CloneFlags) -> Result<()> {
        let file = std::fs::File::open(path).map_err(io_err("open namespace", path))?;
        nix::sched::setns(file.as_fd(), kind).map_err(nix_err("setns", path))
    }

    fn create_dir_all(&self, path: &Path) -> Result<()> {
        std::fs::create_dir_all(path).map_err(io_err("mkdir", path))
    }

    fn touch(&self, path: &Path) -> Result<()> {
        if path.exists() {
            return Ok(());
        }
        if let Some(parent) = path.parent() {
            self.create_dir_all(parent)?;
        }
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map(drop)
            .map_err(io_err("create", path))
    }

    fn write_file(&self, path: &Path, data: &[u8]) -> Result<()> {
        std::fs::write(path, data).map_err(io_err("write", path))
    }

    fn symlink(&self, target: &Path, link: &Path) -> Result<()> {
        std::os::unix::fs::symlink(target, link).map_err(io_err("symlink", link))
    }

    fn mknod(
        &self,
        path: &Path,
        kind: nix::sys::stat::SFlag,
        mode: u32,
        dev: u64,
        owner: (u32, u32),
    ) -> Result<()> {
        let perm = nix::sys::stat::Mode::from_bits_truncate(mode);
        nix::sys::stat::mknod(path, kind, perm, dev).map_err(nix_err("mknod", path))?;
        nix::unistd::chown(
            path,
            Some(nix::unistd::Uid::from_raw(owner.0)),
            Some(nix::unistd::Gid::from_raw(owner.1)),
        )
        .map_err(nix_err("chown", path))
    }

    fn exists(&self, path: &Path) -> bool {
        path.symlink_metadata().is_ok()
    }

    fn is_dir(&self, path: &Path) -> bool {
        path.is_dir()
    }
}

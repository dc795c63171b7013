//! The syscall seam: every privileged OS call the container runner makes goes
//! through [`Syscall`], so the mount/namespace logic is unit-tested with
//! [`RecordingSyscall`] and runs for real with [`LinuxSyscall`].

mod linux;
mod recording;

use std::path::Path;

pub use linux::LinuxSyscall;
use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;
pub use recording::{Call, RecordingSyscall};

#[derive(Debug, thiserror::Error)]
pub enum SyscallError {
    #[error("{op} {path}: {source}")]
    Nix {
        op: &'static str,
        path: String,
        #[source]
        source: nix::Error,
    },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, SyscallError>;

/// Privileged calls of the runner, in the order the kernel sees them.
pub trait Syscall {
    fn mount(
        &self,
        source: Option<&Path>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Result<()>;
    fn umount2(&self, target: &Path, flags: MntFlags) -> Result<()>;
    /// Sets `MS_NOSUID`/`MS_NODEV`/`MS_NOEXEC`/`MS_RDONLY` (only those) on the mount at
    /// `target`, and on every mount below it when `recursive`; other flags are left alone.
    fn mount_setattr(&self, target: &Path, set: MsFlags, recursive: bool) -> Result<()>;
    fn pivot_root(&self, new_root: &Path) -> Result<()>;
    fn chdir(&self, path: &Path) -> Result<()>;
    fn sethostname(&self, name: &str) -> Result<()>;
    fn unshare(&self, flags: CloneFlags) -> Result<()>;
    /// Join the namespace at `path` (e.g. /proc/PID/ns/net).
    fn setns(&self, path: &Path, kind: CloneFlags) -> Result<()>;
    fn create_dir_all(&self, path: &Path) -> Result<()>;
    /// Create an empty file (a bind mount target) if it does not exist.
    fn touch(&self, path: &Path) -> Result<()>;
    fn write_file(&self, path: &Path, data: &[u8]) -> Result<()>;
    fn symlink(&self, target: &Path, link: &Path) -> Result<()>;
    /// mknod a device node (kind: S_IFCHR/S_IFBLK/S_IFIFO) and chown it.
    fn mknod(
        &self,
        path: &Path,
        kind: nix::sys::stat::SFlag,
        mode: u32,
        dev: u64,
        owner: (u32, u32),
    ) -> Result<()>;
    fn exists(&self, path: &Path) -> bool;
    fn is_dir(&self, path: &Path) -> bool;
}

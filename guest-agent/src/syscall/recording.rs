//! A test implementation that records calls instead of making them.

use std::cell::RefCell;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;

use super::{Result, Syscall};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Mount {
        source: Option<PathBuf>,
        target: PathBuf,
        fstype: Option<String>,
        flags: MsFlags,
        data: Option<String>,
    },
    Umount {
        target: PathBuf,
        flags: MntFlags,
    },
    SetAttr {
        target: PathBuf,
        set: MsFlags,
        recursive: bool,
    },
    PivotRoot(PathBuf),
    Chdir(PathBuf),
    Sethostname(String),
    Unshare(CloneFlags),
    Setns(PathBuf, CloneFlags),
    Mkdir(PathBuf),
    Touch(PathBuf),
    Write(PathBuf, Vec<u8>),
    Symlink(PathBuf, PathBuf),
    Mknod {
        path: PathBuf,
        kind: nix::sys::stat::SFlag,
        mode: u32,
        dev: u64,
        owner: (u32, u32),
    },
}

/// Records every call; `dirs` decides what `is_dir`/`exists` answer.
#[derive(Debug, Default)]
pub struct RecordingSyscall {
    pub calls: RefCell<Vec<Call>>,
    pub dirs: RefCell<HashSet<PathBuf>>,
    pub files: RefCell<HashSet<PathBuf>>,
}

impl RecordingSyscall {
    pub fn calls(&self) -> Vec<Call> {
        self.calls.borrow().clone()
    }

    pub fn mounts(&self) -> Vec<(Option<PathBuf>, PathBuf, Option<String>, MsFlags)> {
        self.calls
            .borrow()
            .iter()
            .filter_map(|c| match c {
                Call::Mount {
                    source,
                    target,
                    fstype,
                    flags,
                    ..
                } => Some((source.clone(), target.clone(), fstype.clone(), *flags)),
                _ => None,
            })
            .collect()
    }

    fn push(&self, call: Call) {
        self.calls.borrow_mut().push(call);
    }
}

impl Syscall for RecordingSyscall {
    fn mount(
        &self,
        source: Option<&Path>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Result<()> {
        self.push(Call::Mount {
            source: source.map(Path::to_path_buf),
            target: target.to_path_buf(),
            fstype: fstype.map(str::to_string),
            flags,
            data: data.map(str::to_string),
        });
        Ok(())
    }
    fn umount2(&self, target: &Path, flags: MntFlags) -> Result<()> {
        self.push(Call::Umount {
            target: target.to_path_buf(),
            flags,
        });
        Ok(())
    }
    fn mount_setattr(&self, target: &Path, set: MsFlags, recursive: bool) -> Result<()> {
        self.push(Call::SetAttr {
            target: target.to_path_buf(),
            set,
            recursive,
        });
        Ok(())
    }
    fn pivot_root(&self, new_root: &Path) -> Result<()> {
        self.push(Call::PivotRoot(new_root.to_path_buf()));
        Ok(())
    }
    fn chdir(&self, path: &Path) -> Result<()> {
        self.push(Call::Chdir(path.to_path_buf()));
        Ok(())
    }
    fn sethostname(&self, name: &str) -> Result<()> {
        self.push(Call::Sethostname(name.to_string()));
        Ok(())
    }
    fn unshare(&self, flags: CloneFlags) -> Result<()> {
        self.push(Call::Unshare(flags));
        Ok(())
    }
    fn setns(&self, path: &Path, kind: CloneFlags) -> Result<()> {
        self.push(Call::Setns(path.to_path_buf(), kind));
        Ok(())
    }
    fn create_dir_all(&self, path: &Path) -> Result<()> {
        self.dirs.borrow_mut().insert(path.to_path_buf());
        self.push(Call::Mkdir(path.to_path_buf()));
        Ok(())
    }
    fn touch(&self, path: &Path) -> Result<()> {
        self.files.borrow_mut().insert(path.to_path_buf());
        self.push(Call::Touch(path.to_path_buf()));
        Ok(())
    }
    fn write_file(&self, path: &Path, data: &[u8]) -> Result<()> {
        self.push(Call::Write(path.to_path_buf(), data.to_vec()));
        Ok(())
    }
    fn symlink(&self, target: &Path, link: &Path) -> Result<()> {
        self.push(Call::Symlink(target.to_path_buf(), link.to_path_buf()));
        Ok(())
    }
    fn mknod(
        &self,
        path: &Path,
        kind: nix::sys::stat::SFlag,
        mode: u32,
        dev: u64,
        owner: (u32, u32),
    ) -> Result<()> {
        self.files.borrow_mut().insert(path.to_path_buf());
        self.push(Call::Mknod {
            path: path.to_path_buf(),
            kind,
            mode,
            dev,
            owner,
        });
        Ok(())
    }
    fn exists(&self, path: &Path) -> bool {
        self.dirs.borrow().contains(path) || self.files.borrow().contains(path)
    }
    fn is_dir(&self, path: &Path) -> bool {
        self.dirs.borrow().contains(path)
    }
}

//! A passthrough file system over one host directory (the share), addressed the FUSE way: by
//! inode number plus a name.
//!
//! Confinement is structural, not by checking path strings:
//! - every inode the guest knows is an `O_PATH` descriptor the server opened itself; the
//!   guest only ever names one of those plus a single path component;
//! - a component is never `.`/`..`/empty and never contains `/`, and it is resolved with
//!   `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)` and
//!   `O_NOFOLLOW`: a symlink in the share is returned as the link itself (the guest kernel
//!   follows it in its own namespace), never followed on the host;
//! - the guest never hands the server a path or a host file handle, only nodeids and fhs the
//!   server issued (unknown ones are `EBADF`/`ENOENT`);
//! - files are reopened for I/O through `/proc/self/fd/N` of their vetted `O_PATH` fd, and
//!   only regular files and directories are opened (device nodes, FIFOs and sockets in the
//!   share are never opened on the host); `mknod` only makes regular files and sockets;
//! - the guest is hostile, so what it makes must not be a tool against the host: set-user-id
//!   (anything) and set-group-id (anything but a directory) bits are refused (`EPERM`) on
//!   create, mkdir, mknod and chmod, and so are FIFOs (a host process opening one would block);
//!   [`PassthroughFs::allow_special_files`] lifts both for a share that needs them. Device
//!   nodes are never made (no device number is ever passed).

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The guest-visible root's nodeid.
pub const ROOT_ID: u64 = 1;

/// An errno for the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("errno {0}")]
pub struct Errno(pub i32);

impl Errno {
    fn last() -> Self {
        Errno(
            std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO),
        )
    }
}

impl From<std::io::Error> for Errno {
    fn from(e: std::io::Error) -> Self {
        Errno(e.raw_os_error().unwrap_or(libc::EIO))
    }
}

pub type Res<T> = Result<T, Errno>;

fn check(r: libc::c_int) -> Res<libc::c_int> {
    if r < 0 { Err(Errno::last()) } else { Ok(r) }
}

/// The caller, for ownership of what it creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
}

/// What makes a host node one guest inode: its device and inode number, and the mount it
/// was reached through. Two binds of one directory (a private and a host-to-container
/// volume of the same host path) are different nodes: a mount made later under one of them
/// must not show through the other (the lookup continues from the inode's fd).
type InodeKey = (u64, u64, u64);

struct Inode {
    fd: OwnedFd,
    key: InodeKey,
    mode: u32,
    /// Lookups the guest holds (FORGET gives them back).
    refs: AtomicU64,
}

struct Handle {
    file: File,
    /// Serialises seek + getdents for directories.
    dir: Mutex<()>,
}

/// SETATTR's requested changes.
#[derive(Debug, Default, Clone, Copy)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    /// (seconds, nanoseconds) or `UTIME_NOW`.
    pub atime: Option<(i64, i64)>,
    pub mtime: Option<(i64, i64)>,
    pub fh: Option<u64>,
}

pub struct PassthroughFs {
    proc_self_fd: OwnedFd,
    /// Set-id bits and FIFOs allowed (off by default).
    special_files: bool,
    inodes: Mutex<Inodes>,
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    next_fh: AtomicU64,
}

struct Inodes {
    by_id: HashMap<u64, Arc<Inode>>,
    by_key: HashMap<InodeKey, u64>,
    next: u64,
}

fn cstr(b: &[u8]) -> Res<CString> {
    CString::new(b).map_err(|_| Errno(libc::EINVAL))
}

/// One path component the guest may name.
pub fn valid_name(name: &[u8]) -> Res<CString> {
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') {
        return Err(Errno(libc::EPERM));
    }
    if name.len() > 255 {
        return Err(Errno(libc::ENAMETOOLONG));
    }
    cstr(name)
}

fn open_path(dir: RawFd, name: &CString, flags: libc::c_int, mode: u32) -> Res<OwnedFd> {
    /// `struct open_how` (linux/openat2.h).
    #[repr(C)]
    struct OpenHow {
        flags: u64,
        mode: u64,
        resolve: u64,
    }
    let how = OpenHow {
        flags: (flags | libc::O_CLOEXEC | libc::O_NOFOLLOW) as u64,
        mode: if flags & libc::O_CREAT != 0 {
            u64::from(mode & 0o7777)
        } else {
            0
        },
        resolve: libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: openat2 reads `how` (size passed) and the NUL-terminated name; returns a new fd.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir,
            name.as_ptr(),
            &how as *const OpenHow,
            size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        return Err(Errno::last());
    }
    // SAFETY: the kernel just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// The id of the mount `fd` is on (`statx` `STATX_MNT_ID`, Linux 5.8); 0 where the kernel
/// does not report it.
fn mount_id(fd: RawFd) -> Res<u64> {
    // SAFETY: zeroed is a valid statx; statx fills it.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: empty path with AT_EMPTY_PATH asks about `fd` itself; `stx` is a valid out pointer.
    check(unsafe {
        libc::statx(
            fd,
            c"".as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
            libc::STATX_MNT_ID,
            &mut stx,
        )
    })?;
    Ok(if stx.stx_mask & libc::STATX_MNT_ID != 0 {
        stx.stx_mnt_id
    } else {
        0
    })
}

fn inode_key(fd: RawFd, st: &libc::stat64) -> Res<InodeKey> {
    Ok((st.st_dev, st.st_ino, mount_id(fd)?))
}

fn stat_fd(fd: RawFd) -> Res<libc::stat64> {
    // SAFETY: zeroed is a valid stat64; fstatat64 fills it.
    let mut st: libc::stat64 = unsafe { std::mem::zeroed() };
    // SAFETY: empty path with AT_EMPTY_PATH stats `fd` itself; `st` is a valid out pointer.
    check(unsafe {
        libc::fstatat64(
            fd,
            c"".as_ptr(),
            &mut st,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(st)
}

fn ftype(mode: u32) -> u32 {
    mode & libc::S_IFMT
}

impl PassthroughFs {
    /// Serves `share` (which must be a directory).
    pub fn new(share: &Path) -> std::io::Result<Self> {
        let root = File::open(share).map(OwnedFd::from)?;
        let root_path = {
            let c = cstr(share.as_os_str().as_encoded_bytes())
                .map_err(|_| std::io::Error::other("bad path"))?;
            // SAFETY: open with a valid C string; the result is checked below.
            let fd = unsafe {
                libc::open(
                    c.as_ptr(),
                    libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
                )
            };
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: freshly returned descriptor.
            unsafe { OwnedFd::from_raw_fd(fd) }
        };
        drop(root);
        // SAFETY: as above.
        let pfd = unsafe {
            libc::open(
                c"/proc/self/fd".as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if pfd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: freshly returned descriptor.
        let proc_self_fd = unsafe { OwnedFd::from_raw_fd(pfd) };
        let st =
            stat_fd(root_path.as_raw_fd()).map_err(|e| std::io::Error::from_raw_os_error(e.0))?;
        let key = inode_key(root_path.as_raw_fd(), &st)
            .map_err(|e| std::io::Error::from_raw_os_error(e.0))?;
        let root = Inode {
            fd: root_path,
            key,
            mode: st.st_mode,
            refs: AtomicU64::new(u64::MAX / 2),
        };
        let mut by_id = HashMap::new();
        let mut by_key = HashMap::new();
        by_key.insert(root.key, ROOT_ID);
        by_id.insert(ROOT_ID, Arc::new(root));
        Ok(Self {
            proc_self_fd,
            special_files: false,
            inodes: Mutex::new(Inodes {
                by_id,
                by_key,
                next: ROOT_ID + 1,
            }),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
        })
    }

    /// Lets the guest make set-id files and FIFOs (refused by default: a setuid-root binary or
    /// a FIFO the guest leaves in a host volume is a tool against the host).
    pub fn allow_special_files(mut self, allow: bool) -> Self {
        self.special_files = allow;
        self
    }

    /// `EPERM` for a mode the guest may not give a `kind` (file type) of node.
    fn vet_mode(&self, kind: u32, mode: u32) -> Res<()> {
        if self.special_files {
            return Ok(());
        }
        let set_id = match kind {
            libc::S_IFDIR => mode & libc::S_ISUID,
            _ => mode & (libc::S_ISUID | libc::S_ISGID),
        };
        if set_id != 0 || kind == libc::S_IFIFO {
            return Err(Errno(libc::EPERM));
        }
        Ok(())
    }

    fn inode(&self, id: u64) -> Res<Arc<Inode>> {
        lock(&self.inodes)
            .by_id
            .get(&id)
            .cloned()
            .ok_or(Errno(libc::ENOENT))
    }

    /// Runs `f` with the inode's `O_PATH` fd (and its file type).
    fn with_fd<T>(&self, id: u64, f: impl FnOnce(RawFd, u32) -> Res<T>) -> Res<T> {
        // The Arc keeps the fd open while `f` runs; no lock is held (f may take others).
        let ino = self.inode(id)?;
        f(ino.fd.as_raw_fd(), ino.mode)
    }

    fn handle(&self, fh: u64) -> Res<Arc<Handle>> {
        lock(&self.handles)
            .get(&fh)
            .cloned()
            .ok_or(Errno(libc::EBADF))
    }

    /// Records a looked-up fd: the same host inode on the same mount always gets the same
    /// nodeid.
    fn remember(&self, fd: OwnedFd) -> Res<(u64, libc::stat64)> {
        let st = stat_fd(fd.as_raw_fd())?;
        let key = inode_key(fd.as_raw_fd(), &st)?;
        let mut t = lock(&self.inodes);
        if let Some(id) = t.by_key.get(&key).copied()
            && let Some(ino) = t.by_id.get(&id)
        {
            ino.refs.fetch_add(1, Ordering::Relaxed);
            return Ok((id, st));
        }
        let id = t.next;
        t.next += 1;
        t.by_key.insert(key, id);
        t.by_id.insert(
            id,
            Arc::new(Inode {
                fd,
                key,
                mode: st.st_mode,
                refs: AtomicU64::new(1),
            }),
        );
        Ok((id, st))
    }

    pub fn lookup(&self, parent: u64, name: &[u8]) -> Res<(u64, libc::stat64)> {
        let name = valid_name(name)?;
        let fd = self.with_fd(parent, |dir, mode| {
            if ftype(mode) != libc::S_IFDIR {
                return Err(Errno(libc::ENOTDIR));
            }
            open_path(dir, &name, libc::O_PATH, 0)
        })?;
        self.remember(fd)
    }

    pub fn forget(&self, id: u64, n: u64) {
        if id == ROOT_ID {
            return;
        }
        let mut t = lock(&self.inodes);
        let Some(ino) = t.by_id.get(&id).cloned() else {
            return;
        };
        let left = ino.refs.load(Ordering::Relaxed).saturating_sub(n);
        ino.refs.store(left, Ordering::Relaxed);
        if left == 0 {
            let key = ino.key;
            t.by_id.remove(&id);
            if t.by_key.get(&key) == Some(&id) {
                t.by_key.remove(&key);
            }
        }
    }

    /// Drops every inode but the root and every open handle (DESTROY, device reset).
    pub fn reset(&self) {
        let mut t = lock(&self.inodes);
        t.by_id.retain(|id, _| *id == ROOT_ID);
        let root_key = t.by_id.get(&ROOT_ID).map(|i| i.key);
        t.by_key.retain(|k, _| Some(*k) == root_key);
        lock(&self.handles).clear();
    }

    pub fn known_inodes(&self) -> usize {
        lock(&self.inodes).by_id.len()
    }

    pub fn getattr(&self, id: u64) -> Res<libc::stat64> {
        self.with_fd(id, |fd, _| stat_fd(fd))
    }

    fn proc_name(fd: RawFd) -> CString {
        // A decimal number never contains NUL.
        CString::new(fd.to_string()).unwrap_or_default()
    }

    /// Reopens a vetted inode for I/O. Only regular files and directories.
    fn reopen(&self, fd: RawFd, mode: u32, flags: libc::c_int) -> Res<File> {
        match ftype(mode) {
            libc::S_IFREG | libc::S_IFDIR => {}
            libc::S_IFLNK => return Err(Errno(libc::ELOOP)),
            _ => return Err(Errno(libc::EACCES)),
        }
        let name = Self::proc_name(fd);
        // SAFETY: openat relative to our /proc/self/fd dir; the name is our own fd's number.
        let nfd = check(unsafe {
            libc::openat(
                self.proc_self_fd.as_raw_fd(),
                name.as_ptr(),
                flags | libc::O_CLOEXEC,
            )
        })?;
        // SAFETY: freshly returned descriptor.
        Ok(unsafe { File::from_raw_fd(nfd) })
    }

    fn add_handle(&self, file: File) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        lock(&self.handles).insert(
            fh,
            Arc::new(Handle {
                file,
                dir: Mutex::new(()),
            }),
        );
        fh
    }

    /// The open flags a guest may ask for (no creation, no O_PATH/O_TMPFILE, no O_DIRECT).
    fn open_flags(flags: u32) -> libc::c_int {
        let allowed = libc::O_ACCMODE
            | libc::O_APPEND
            | libc::O_TRUNC
            | libc::O_NONBLOCK
            | libc::O_DSYNC
            | libc::O_SYNC
            | libc::O_NOATIME
            | libc::O_DIRECTORY;
        (flags as libc::c_int) & allowed
    }

    pub fn open(&self, id: u64, flags: u32) -> Res<u64> {
        let file = self.with_fd(id, |fd, mode| {
            self.reopen(fd, mode, Self::open_flags(flags))
        })?;
        Ok(self.add_handle(file))
    }

    pub fn opendir(&self, id: u64) -> Res<u64> {
        let file = self.with_fd(id, |fd, mode| {
            if ftype(mode) != libc::S_IFDIR {
                return Err(Errno(libc::ENOTDIR));
            }
            self.reopen(fd, mode, libc::O_RDONLY | libc::O_DIRECTORY)
        })?;
        Ok(self.add_handle(file))
    }

    pub fn release(&self, fh: u64) {
        lock(&self.handles).remove(&fh);
    }

    pub fn read(&self, fh: u64, offset: u64, size: usize) -> Res<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let h = self.handle(fh)?;
        let mut buf = vec![0u8; size];
        let mut done = 0;
        while done < size {
            match h.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
        }
        buf.truncate(done);
        Ok(buf)
    }

    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> Res<usize> {
        use std::os::unix::fs::FileExt;
        let h = self.handle(fh)?;
        Ok(h.file.write_at(data, offset)?)
    }

    /// pwritev from caller-provided buffers (guest memory).
    pub fn write_iov(&self, fh: u64, offset: u64, iov: &[libc::iovec]) -> Res<usize> {
        let h = self.handle(fh)?;
        // SAFETY: the iovecs point at memory the caller keeps mapped for the call.
        let n = unsafe {
            libc::pwritev(
                h.file.as_raw_fd(),
                iov.as_ptr(),
                iov.len() as i32,
                offset as i64,
            )
        };
        if n < 0 {
            Err(Errno::last())
        } else {
            Ok(n as usize)
        }
    }

    /// preadv into caller-provided buffers (guest memory); short reads go on until EOF.
    pub fn read_iov(&self, fh: u64, offset: u64, iov: &[libc::iovec]) -> Res<usize> {
        let h = self.handle(fh)?;
        let total: usize = iov.iter().map(|v| v.iov_len).sum();
        let mut done = 0usize;
        while done < total {
            let mut rest = Vec::with_capacity(iov.len());
            let mut skip = done;
            for v in iov {
                if skip >= v.iov_len {
                    skip -= v.iov_len;
                    continue;
                }
                // SAFETY: stays inside the same iovec's buffer (skip < iov_len).
                let base = unsafe { v.iov_base.cast::<u8>().add(skip) };
                rest.push(libc::iovec {
                    iov_base: base.cast(),
                    iov_len: v.iov_len - skip,
                });
                skip = 0;
            }
            let at = (offset + done as u64) as i64;
            // SAFETY: the iovecs point at memory the caller keeps mapped for the call.
            let n =
                unsafe { libc::preadv(h.file.as_raw_fd(), rest.as_ptr(), rest.len() as i32, at) };
            if n == 0 {
                break;
            }
            if n < 0 {
                let e = Errno::last();
                if e.0 == libc::EINTR {
                    continue;
                }
                return Err(e);
            }
            done += n as usize;
        }
        Ok(done)
    }

    pub fn fsync(&self, fh: u64, datasync: bool) -> Res<()> {
        let h = self.handle(fh)?;
        if datasync {
            h.file.sync_data()?
        } else {
            h.file.sync_all()?
        }
        Ok(())
    }

    /// Directory entries from `offset`, as FUSE dirents fitting in `size` bytes. With `plus`
    /// (READDIRPLUS: the cache time to give), each entry is preceded by its lookup (an entry
    /// the guest now holds a reference to; `.` and `..` get none).
    pub fn readdir(
        &self,
        dir: u64,
        fh: u64,
        offset: u64,
        size: usize,
        plus: Option<u64>,
    ) -> Res<Vec<u8>> {
        let h = self.handle(fh)?;
        let _g = lock(&h.dir);
        let fd = h.file.as_raw_fd();
        // SAFETY: lseek on our own directory fd.
        if unsafe { libc::lseek64(fd, offset as i64, libc::SEEK_SET) } < 0 {
            return Err(Errno::last());
        }
        let mut out = Vec::new();
        let mut buf = vec![0u8; 32 * 1024];
        'outer: loop {
            // SAFETY: getdents64 writes at most buf.len() bytes into buf.
            let n = unsafe { libc::syscall(libc::SYS_getdents64, fd, buf.as_mut_ptr(), buf.len()) };
            if n < 0 {
                return Err(Errno::last());
            }
            if n == 0 {
                break;
            }
            let mut p = 0usize;
            while p + 19 <= n as usize {
                let rec = &buf[p..n as usize];
                let ino = u64::from_ne_bytes(rec[0..8].try_into().unwrap_or_default());
                let off = u64::from_ne_bytes(rec[8..16].try_into().unwrap_or_default());
                let reclen = u16::from_ne_bytes([rec[16], rec[17]]) as usize;
                let typ = u32::from(rec[18]);
                if reclen < 19 || reclen > rec.len() {
                    return Err(Errno(libc::EIO));
                }
                let name = &rec[19..reclen];
                let name = &name[..name.iter().position(|b| *b == 0).unwrap_or(name.len())];
                let extra = if plus.is_some() {
                    super::abi::ENTRY_OUT_LEN
                } else {
                    0
                };
                let Some(d) = super::abi::dirent(
                    ino,
                    off,
                    typ,
                    name,
                    (size - out.len()).saturating_sub(extra),
                ) else {
                    break 'outer;
                };
                if let Some(secs) = plus {
                    let entry = match name {
                        b"." | b".." => None,
                        _ => self.lookup(dir, name).ok(),
                    };
                    match entry {
                        Some((id, st)) => {
                            out.extend_from_slice(&super::abi::entry_out(id, &st, secs))
                        }
                        None => out.resize(out.len() + super::abi::ENTRY_OUT_LEN, 0),
                    }
                }
                out.extend_from_slice(&d);
                p += reclen;
            }
        }
        Ok(out)
    }

    pub fn readlink(&self, id: u64) -> Res<Vec<u8>> {
        self.with_fd(id, |fd, _| {
            let mut buf = vec![0u8; libc::PATH_MAX as usize];
            // SAFETY: readlinkat of `fd` itself (empty path) into buf, bounded by its length.
            let n =
                unsafe { libc::readlinkat(fd, c"".as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                return Err(Errno::last());
            }
            buf.truncate(n as usize);
            Ok(buf)
        })
    }

    /// Makes `name` in `parent` owned by the caller, then looks it up.
    fn created(&self, parent: u64, name: &CString, who: Caller) -> Res<(u64, libc::stat64)> {
        self.with_fd(parent, |dir, _| {
            // SAFETY: fchownat on a single validated component of our own dir fd, no follow.
            check(unsafe {
                libc::fchownat(
                    dir,
                    name.as_ptr(),
                    who.uid,
                    who.gid,
                    libc::AT_SYMLINK_NOFOLLOW,
                )
            })
        })?;
        self.lookup(parent, name.as_bytes())
    }

    fn dir_fd<T>(&self, parent: u64, f: impl FnOnce(RawFd) -> Res<T>) -> Res<T> {
        self.with_fd(parent, |dir, mode| {
            if ftype(mode) != libc::S_IFDIR {
                return Err(Errno(libc::ENOTDIR));
            }
            f(dir)
        })
    }

    pub fn mkdir(
        &self,
        parent: u64,
        name: &[u8],
        mode: u32,
        who: Caller,
    ) -> Res<(u64, libc::stat64)> {
        let name = valid_name(name)?;
        self.vet_mode(libc::S_IFDIR, mode)?;
        self.dir_fd(parent, |dir| {
            // SAFETY: mkdirat of a validated component in our own dir fd.
            check(unsafe { libc::mkdirat(dir, name.as_ptr(), mode & 0o7777) })
        })?;
        self.created(parent, &name, who)
    }

    pub fn mknod(
        &self,
        parent: u64,
        name: &[u8],
        mode: u32,
        who: Caller,
    ) -> Res<(u64, libc::stat64)> {
        let name = valid_name(name)?;
        match ftype(mode) {
            libc::S_IFREG | libc::S_IFIFO | libc::S_IFSOCK => {}
            _ => return Err(Errno(libc::EPERM)),
        }
        self.vet_mode(ftype(mode), mode)?;
        self.dir_fd(parent, |dir| {
            // SAFETY: mknodat of a validated component; device numbers are never passed.
            check(unsafe { libc::mknodat(dir, name.as_ptr(), mode, 0) })
        })?;
        self.created(parent, &name, who)
    }

    pub fn symlink(
        &self,
        parent: u64,
        name: &[u8],
        target: &[u8],
        who: Caller,
    ) -> Res<(u64, libc::stat64)> {
        let name = valid_name(name)?;
        let target = cstr(target)?;
        self.dir_fd(parent, |dir| {
            // SAFETY: symlinkat stores `target` as data; it is never followed by the server.
            check(unsafe { libc::symlinkat(target.as_ptr(), dir, name.as_ptr()) })
        })?;
        self.created(parent, &name, who)
    }

    /// CREATE: make (or open) `name` and open it. Returns the entry and the handle.
    pub fn create(
        &self,
        parent: u64,
        name: &[u8],
        flags: u32,
        mode: u32,
        who: Caller,
    ) -> Res<((u64, libc::stat64), u64)> {
        let name = valid_name(name)?;
        self.vet_mode(libc::S_IFREG, mode)?;
        let flags = Self::open_flags(flags) & !libc::O_DIRECTORY;
        let excl = (flags as u32 & libc::O_EXCL as u32) != 0;
        let file = self.dir_fd(parent, |dir| {
            match open_path(dir, &name, flags | libc::O_CREAT | libc::O_EXCL, mode) {
                Ok(fd) => {
                    // SAFETY: fchown on the file we just created.
                    check(unsafe { libc::fchown(fd.as_raw_fd(), who.uid, who.gid) })?;
                    Ok(File::from(fd))
                }
                Err(Errno(libc::EEXIST)) if !excl => {
                    // An existing regular file only (no FIFO or device opened here).
                    let p = open_path(dir, &name, libc::O_PATH, 0)?;
                    let st = stat_fd(p.as_raw_fd())?;
                    self.reopen(p.as_raw_fd(), st.st_mode, flags)
                }
                Err(e) => Err(e),
            }
        })?;
        let entry = self.lookup(parent, name.as_bytes())?;
        Ok((entry, self.add_handle(file)))
    }

    pub fn unlink(&self, parent: u64, name: &[u8], dir_flag: bool) -> Res<()> {
        let name = valid_name(name)?;
        let flags = if dir_flag { libc::AT_REMOVEDIR } else { 0 };
        self.dir_fd(parent, |dir| {
            // SAFETY: unlinkat of a validated component in our own dir fd.
            check(unsafe { libc::unlinkat(dir, name.as_ptr(), flags) }).map(|_| ())
        })
    }

    pub fn rename(&self, olddir: u64, old: &[u8], newdir: u64, new: &[u8], flags: u32) -> Res<()> {
        let (old, new) = (valid_name(old)?, valid_name(new)?);
        let allowed = libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE;
        if flags & !allowed != 0 {
            return Err(Errno(libc::EINVAL));
        }
        self.dir_fd(olddir, |a| {
            self.dir_fd(newdir, |b| {
                // SAFETY: renameat2 of validated components between our own dir fds.
                let r = unsafe {
                    libc::syscall(libc::SYS_renameat2, a, old.as_ptr(), b, new.as_ptr(), flags)
                };
                if r < 0 { Err(Errno::last()) } else { Ok(()) }
            })
        })
    }

    pub fn link(&self, id: u64, newparent: u64, name: &[u8]) -> Res<(u64, libc::stat64)> {
        let name = valid_name(name)?;
        self.with_fd(id, |fd, mode| {
            if ftype(mode) == libc::S_IFDIR {
                return Err(Errno(libc::EPERM));
            }
            self.dir_fd(newparent, |dir| {
                // SAFETY: links our own vetted inode fd (AT_EMPTY_PATH) under a validated name.
                check(unsafe {
                    libc::linkat(fd, c"".as_ptr(), dir, name.as_ptr(), libc::AT_EMPTY_PATH)
                })
            })
        })?;
        self.lookup(newparent, name.as_bytes())
    }

    pub fn setattr(&self, id: u64, a: SetAttr) -> Res<libc::stat64> {
        self.with_fd(id, |fd, mode| {
            let name = Self::proc_name(fd);
            let pfd = self.proc_self_fd.as_raw_fd();
            if let Some(m) = a.mode {
                if ftype(mode) == libc::S_IFLNK {
                    return Err(Errno(libc::EOPNOTSUPP));
                }
                self.vet_mode(ftype(mode), m)?;
                // SAFETY: chmod of our own vetted inode through its /proc/self/fd entry.
                check(unsafe { libc::fchmodat(pfd, name.as_ptr(), m & 0o7777, 0) })?;
            }
            if a.uid.is_some() || a.gid.is_some() {
                let (u, g) = (a.uid.unwrap_or(u32::MAX), a.gid.unwrap_or(u32::MAX));
                // SAFETY: fchownat of `fd` itself; -1 keeps a value.
                check(unsafe {
                    libc::fchownat(
                        fd,
                        c"".as_ptr(),
                        u,
                        g,
                        libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
                    )
                })?;
            }
            if let Some(size) = a.size {
                match a.fh.map(|fh| self.handle(fh)) {
                    Some(Ok(h)) => h.file.set_len(size)?,
                    _ => self.reopen(fd, mode, libc::O_WRONLY)?.set_len(size)?,
                }
            }
            if a.atime.is_some() || a.mtime.is_some() {
                let ts = |t: Option<(i64, i64)>| match t {
                    Some((s, ns)) => libc::timespec {
                        tv_sec: s,
                        tv_nsec: ns,
                    },
                    None => libc::timespec {
                        tv_sec: 0,
                        tv_nsec: libc::UTIME_OMIT,
                    },
                };
                let times = [ts(a.atime), ts(a.mtime)];
                if ftype(mode) == libc::S_IFLNK {
                    // SAFETY: utimensat on the link itself (empty path, no follow).
                    check(unsafe {
                        libc::utimensat(
                            fd,
                            c"".as_ptr(),
                            times.as_ptr(),
                            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
                        )
                    })?;
                } else {
                    // SAFETY: utimensat of our own vetted inode through /proc/self/fd.
                    check(unsafe { libc::utimensat(pfd, name.as_ptr(), times.as_ptr(), 0) })?;
                }
            }
            stat_fd(fd)
        })
    }

    pub fn statfs(&self, id: u64) -> Res<libc::statvfs64> {
        self.with_fd(id, |fd, mode| {
            // SAFETY: zeroed is a valid statvfs64; fstatvfs64 fills it.
            let mut s: libc::statvfs64 = unsafe { std::mem::zeroed() };
            let f = self.reopen(fd, mode, libc::O_RDONLY).ok();
            let target = f.as_ref().map(|f| f.as_raw_fd()).unwrap_or(fd);
            // SAFETY: valid fd and out pointer.
            check(unsafe { libc::fstatvfs64(target, &mut s) })?;
            Ok(s)
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
#[path = "passthrough_tests.rs"]
mod tests;

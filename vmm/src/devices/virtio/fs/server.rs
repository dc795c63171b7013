//! FUSE request dispatch: one request's bytes in, one reply's bytes out (or none for the
//! requests that take no reply). Protocol errors become `EINVAL`/`EIO` replies, never panics;
//! unsupported operations are `ENOSYS` (the guest kernel then stops asking).

use super::abi::{self, AbiError, InHeader, Reader, Writer, fattr, op};
use super::passthrough::{Caller, Errno, PassthroughFs, Res, SetAttr};

/// Largest WRITE payload we accept (and announce in INIT).
pub const MAX_WRITE: u32 = 1024 * 1024;
/// Largest request: a WRITE of MAX_WRITE plus headers.
pub const MAX_REQUEST: usize = MAX_WRITE as usize + 4096;
/// Entry and attribute cache time given to the guest (host changes show within this).
const CACHE_SECS: u64 = 1;

pub struct Server {
    fs: PassthroughFs,
}

impl Server {
    pub fn new(fs: PassthroughFs) -> Self {
        Self { fs }
    }

    pub fn fs(&self) -> &PassthroughFs {
        &self.fs
    }

    /// See [`PassthroughFs::allow_special_files`].
    pub fn allow_special_files(self, allow: bool) -> Self {
        Self {
            fs: self.fs.allow_special_files(allow),
        }
    }

    /// Handles one request; `room` is how many reply bytes the guest provided.
    pub fn handle(&self, req: &[u8], room: usize) -> Option<Vec<u8>> {
        let (h, body) = match abi::parse_request(req) {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("virtio-fs: bad request: {e}");
                // Answer if we can tell whom to answer.
                let unique = Reader::new(req.get(8..16).unwrap_or(&[]))
                    .u64("unique")
                    .ok()?;
                return Some(abi::reply(unique, -libc::EINVAL, &[]));
            }
        };
        tracing::trace!(
            opcode = h.opcode,
            nodeid = h.nodeid,
            len = h.len,
            "virtio-fs request"
        );
        let r = match self.dispatch(&h, body, room.saturating_sub(abi::OUT_HEADER_LEN)) {
            Ok(None) => return None,
            Ok(Some(body)) => abi::reply(h.unique, 0, &body),
            Err(Failure::Errno(Errno(e))) => abi::reply(h.unique, -e, &[]),
            Err(Failure::Abi(e)) => {
                tracing::warn!(opcode = h.opcode, "virtio-fs: malformed request: {e}");
                abi::reply(h.unique, -libc::EINVAL, &[])
            }
        };
        if r.len() > room {
            return Some(abi::reply(h.unique, -libc::ERANGE, &[]));
        }
        Some(r)
    }

    fn dispatch(&self, h: &InHeader, body: &[u8], room: usize) -> Result<Option<Vec<u8>>, Failure> {
        let mut r = Reader::new(body);
        let who = Caller {
            uid: h.uid,
            gid: h.gid,
        };
        let node = h.nodeid;
        let reply = match h.opcode {
            op::INIT => self.init(&mut r)?,
            op::DESTROY => {
                self.fs.reset();
                Vec::new()
            }
            op::LOOKUP => entry(self.fs.lookup(node, r.cstr()?)?),
            op::FORGET => {
                self.fs.forget(node, r.u64("forget")?);
                return Ok(None);
            }
            op::BATCH_FORGET => {
                let count = r.u32("batch forget")?;
                let _ = r.u32("batch forget")?;
                for _ in 0..count {
                    let (id, n) = (r.u64("forget one")?, r.u64("forget one")?);
                    self.fs.forget(id, n);
                }
                return Ok(None);
            }
            op::INTERRUPT => return Ok(None),
            op::GETATTR => abi::attr_out(&self.fs.getattr(node)?, CACHE_SECS),
            op::SETATTR => abi::attr_out(&self.fs.setattr(node, setattr(&mut r)?)?, CACHE_SECS),
            op::READLINK => self.fs.readlink(node)?,
            op::SYMLINK => {
                let name = r.cstr()?;
                let target = r.cstr()?;
                entry(self.fs.symlink(node, name, target, who)?)
            }
            op::MKNOD => {
                let (mode, _rdev, umask, _) = (
                    r.u32("mknod")?,
                    r.u32("mknod")?,
                    r.u32("mknod")?,
                    r.u32("mknod")?,
                );
                entry(self.fs.mknod(node, r.cstr()?, mode & !umask, who)?)
            }
            op::MKDIR => {
                let (mode, umask) = (r.u32("mkdir")?, r.u32("mkdir")?);
                entry(self.fs.mkdir(node, r.cstr()?, mode & !umask, who)?)
            }
            op::UNLINK => empty(self.fs.unlink(node, r.cstr()?, false)?),
            op::RMDIR => empty(self.fs.unlink(node, r.cstr()?, true)?),
            op::RENAME | op::RENAME2 => {
                let newdir = r.u64("rename")?;
                let flags = if h.opcode == op::RENAME2 {
                    let f = r.u32("rename2")?;
                    r.u32("rename2")?;
                    f
                } else {
                    0
                };
                let (old, new) = (r.cstr()?, r.cstr()?);
                empty(self.fs.rename(node, old, newdir, new, flags)?)
            }
            op::LINK => {
                let old = r.u64("link")?;
                entry(self.fs.link(old, node, r.cstr()?)?)
            }
            op::OPEN | op::OPENDIR => {
                let flags = r.u32("open")?;
                let fh = if h.opcode == op::OPEN {
                    self.fs.open(node, flags)?
                } else {
                    self.fs.opendir(node)?
                };
                abi::open_out(fh)
            }
            op::CREATE => {
                let (flags, mode, umask, _) = (
                    r.u32("create")?,
                    r.u32("create")?,
                    r.u32("create")?,
                    r.u32("create")?,
                );
                let (e, fh) = self.fs.create(node, r.cstr()?, flags, mode & !umask, who)?;
                let mut out = entry(e);
                out.extend_from_slice(&abi::open_out(fh));
                out
            }
            op::READ | op::READDIR | op::READDIRPLUS => {
                let (fh, offset, size) = (r.u64("read")?, r.u64("read")?, r.u32("read")? as usize);
                let size = size.min(room).min(MAX_WRITE as usize);
                match h.opcode {
                    op::READ => self.fs.read(fh, offset, size)?,
                    op::READDIR => self.fs.readdir(node, fh, offset, size, None)?,
                    _ => self.fs.readdir(node, fh, offset, size, Some(CACHE_SECS))?,
                }
            }
            op::WRITE => {
                let (fh, offset, size) =
                    (r.u64("write")?, r.u64("write")?, r.u32("write")? as usize);
                r.take(4 + 8 + 4 + 4, "write")?;
                let data = r.rest();
                if size > data.len() || size > MAX_WRITE as usize {
                    return Err(Failure::Errno(Errno(libc::EINVAL)));
                }
                let n = self.fs.write(fh, offset, &data[..size])?;
                let mut w = Writer::default();
                w.u32(n as u32).u32(0);
                w.buf
            }
            op::RELEASE | op::RELEASEDIR => {
                self.fs.release(r.u64("release")?);
                Vec::new()
            }
            op::FLUSH => Vec::new(),
            op::FSYNC | op::FSYNCDIR => {
                let (fh, flags) = (r.u64("fsync")?, r.u32("fsync")?);
                empty(self.fs.fsync(fh, flags & 1 != 0)?)
            }
            op::STATFS => statfs(&self.fs.statfs(node)?),
            _ => return Err(Failure::Errno(Errno(libc::ENOSYS))),
        };
        Ok(Some(reply))
    }

    fn init(&self, r: &mut Reader) -> Result<Vec<u8>, Failure> {
        let (major, minor, max_readahead, flags) = (
            r.u32("init")?,
            r.u32("init")?,
            r.u32("init")?,
            r.u32("init")?,
        );
        if major < abi::KERNEL_VERSION {
            return Err(Failure::Errno(Errno(libc::EPROTO)));
        }
        tracing::info!(major, minor, "virtio-fs: INIT");
        let want = abi::init::ASYNC_READ
            | abi::init::BIG_WRITES
            | abi::init::PARALLEL_DIROPS
            | abi::init::MAX_PAGES
            | abi::init::DO_READDIRPLUS
            | abi::init::READDIRPLUS_AUTO;
        tracing::info!(
            offered = format!("{flags:#x}"),
            granted = format!("{:#x}", flags & want),
            "virtio-fs: INIT flags"
        );
        let mut w = Writer::default();
        w.u32(abi::KERNEL_VERSION)
            .u32(abi::KERNEL_MINOR_VERSION.min(minor))
            .u32(max_readahead)
            .u32(flags & want)
            .u16(16) // max_background
            .u16(12) // congestion_threshold
            .u32(MAX_WRITE)
            .u32(1) // time_gran: nanoseconds
            .u16((MAX_WRITE / 4096) as u16) // max_pages
            .u16(0)
            .u32(0) // flags2
            .u32(0) // max_stack_depth
            .zeros(abi::INIT_OUT_LEN - 40);
        Ok(w.buf)
    }
}

enum Failure {
    Errno(Errno),
    Abi(AbiError),
}

impl From<Errno> for Failure {
    fn from(e: Errno) -> Self {
        Failure::Errno(e)
    }
}

impl From<AbiError> for Failure {
    fn from(e: AbiError) -> Self {
        Failure::Abi(e)
    }
}

fn entry((id, st): (u64, libc::stat64)) -> Vec<u8> {
    abi::entry_out(id, &st, CACHE_SECS)
}

fn empty(_: ()) -> Vec<u8> {
    Vec::new()
}

fn setattr(r: &mut Reader) -> Res<SetAttr> {
    let bad = |_| Errno(libc::EINVAL);
    let valid = r.u32("setattr").map_err(bad)?;
    r.u32("setattr").map_err(bad)?;
    let fh = r.u64("setattr").map_err(bad)?;
    let size = r.u64("setattr").map_err(bad)?;
    let _lock_owner = r.u64("setattr").map_err(bad)?;
    let (atime, mtime, _ctime) = (
        r.u64("setattr").map_err(bad)?,
        r.u64("setattr").map_err(bad)?,
        r.u64("setattr").map_err(bad)?,
    );
    let (atimensec, mtimensec, _) = (
        r.u32("setattr").map_err(bad)?,
        r.u32("setattr").map_err(bad)?,
        r.u32("setattr").map_err(bad)?,
    );
    let mode = r.u32("setattr").map_err(bad)?;
    r.u32("setattr").map_err(bad)?;
    let (uid, gid) = (
        r.u32("setattr").map_err(bad)?,
        r.u32("setattr").map_err(bad)?,
    );
    let on = |bit: u32| valid & bit != 0;
    let time = |set: u32, now: u32, s: u64, ns: u32| {
        if on(now) {
            Some((0, libc::UTIME_NOW))
        } else if on(set) {
            Some((s as i64, i64::from(ns)))
        } else {
            None
        }
    };
    Ok(SetAttr {
        mode: on(fattr::MODE).then_some(mode),
        uid: on(fattr::UID).then_some(uid),
        gid: on(fattr::GID).then_some(gid),
        size: on(fattr::SIZE).then_some(size),
        atime: time(fattr::ATIME, fattr::ATIME_NOW, atime, atimensec),
        mtime: time(fattr::MTIME, fattr::MTIME_NOW, mtime, mtimensec),
        fh: on(fattr::FH).then_some(fh),
    })
}

fn statfs(s: &libc::statvfs64) -> Vec<u8> {
    let mut w = Writer::default();
    w.u64(s.f_blocks)
        .u64(s.f_bfree)
        .u64(s.f_bavail)
        .u64(s.f_files)
        .u64(s.f_ffree)
        .u32(s.f_bsize as u32)
        .u32(s.f_namemax as u32)
        .u32(s.f_frsize as u32)
        .u32(0)
        .zeros(24);
    w.buf
}

#[cfg(test)]
#[path = "server_tests.rs"]
mod tests;

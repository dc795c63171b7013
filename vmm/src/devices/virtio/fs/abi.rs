//! The FUSE wire format (the parts a passthrough virtio-fs server needs), parsed from and
//! written to plain byte slices. Everything read here comes from the guest: every length is
//! checked, nothing is trusted to be aligned, and a short or odd request is an error, never a
//! panic.

/// Protocol version we speak (Linux's `fuse_kernel.h` 7.31 layout; newer kernels accept it).
pub const KERNEL_VERSION: u32 = 7;
pub const KERNEL_MINOR_VERSION: u32 = 31;

pub const IN_HEADER_LEN: usize = 40;
pub const OUT_HEADER_LEN: usize = 16;
pub const ATTR_LEN: usize = 88;
pub const ENTRY_OUT_LEN: usize = 40 + ATTR_LEN;
pub const ATTR_OUT_LEN: usize = 16 + ATTR_LEN;
pub const OPEN_OUT_LEN: usize = 16;
pub const INIT_OUT_LEN: usize = 64;
pub const STATFS_OUT_LEN: usize = 80;
/// Fixed part of a directory entry (ino, off, namelen, type).
pub const DIRENT_LEN: usize = 24;

/// Opcodes.
pub mod op {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const READLINK: u32 = 5;
    pub const SYMLINK: u32 = 6;
    pub const MKNOD: u32 = 8;
    pub const MKDIR: u32 = 9;
    pub const UNLINK: u32 = 10;
    pub const RMDIR: u32 = 11;
    pub const RENAME: u32 = 12;
    pub const LINK: u32 = 13;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const FSYNCDIR: u32 = 30;
    pub const CREATE: u32 = 35;
    pub const INTERRUPT: u32 = 36;
    pub const DESTROY: u32 = 38;
    pub const BATCH_FORGET: u32 = 42;
    pub const READDIRPLUS: u32 = 44;
    pub const RENAME2: u32 = 45;
}

/// INIT flags we may grant (only those the guest offered are granted).
pub mod init {
    pub const ASYNC_READ: u32 = 1 << 0;
    pub const BIG_WRITES: u32 = 1 << 5;
    pub const DO_READDIRPLUS: u32 = 1 << 13;
    pub const READDIRPLUS_AUTO: u32 = 1 << 14;
    pub const PARALLEL_DIROPS: u32 = 1 << 18;
    pub const MAX_PAGES: u32 = 1 << 22;
}

/// SETATTR `valid` bits.
pub mod fattr {
    pub const MODE: u32 = 1 << 0;
    pub const UID: u32 = 1 << 1;
    pub const GID: u32 = 1 << 2;
    pub const SIZE: u32 = 1 << 3;
    pub const ATIME: u32 = 1 << 4;
    pub const MTIME: u32 = 1 << 5;
    pub const FH: u32 = 1 << 6;
    pub const ATIME_NOW: u32 = 1 << 7;
    pub const MTIME_NOW: u32 = 1 << 8;
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AbiError {
    #[error("request too short for {0}")]
    Short(&'static str),
    #[error("header length {header} disagrees with the {got} bytes received")]
    Length { header: u32, got: usize },
    #[error("name is not NUL-terminated")]
    Unterminated,
}

/// A cursor over guest bytes.
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    pub fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], AbiError> {
        if self.buf.len() < n {
            return Err(AbiError::Short(what));
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }

    pub fn u16(&mut self, what: &'static str) -> Result<u16, AbiError> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    pub fn u32(&mut self, what: &'static str) -> Result<u32, AbiError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn u64(&mut self, what: &'static str) -> Result<u64, AbiError> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    /// A NUL-terminated name (without the NUL).
    pub fn cstr(&mut self) -> Result<&'a [u8], AbiError> {
        let nul = self
            .buf
            .iter()
            .position(|b| *b == 0)
            .ok_or(AbiError::Unterminated)?;
        let s = &self.buf[..nul];
        self.buf = &self.buf[nul + 1..];
        Ok(s)
    }

    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InHeader {
    pub len: u32,
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

/// Splits a request into its header and body, checking the header's length against what
/// arrived.
pub fn parse_request(buf: &[u8]) -> Result<(InHeader, &[u8]), AbiError> {
    let mut r = Reader::new(buf);
    let h = InHeader {
        len: r.u32("in header")?,
        opcode: r.u32("in header")?,
        unique: r.u64("in header")?,
        nodeid: r.u64("in header")?,
        uid: r.u32("in header")?,
        gid: r.u32("in header")?,
        pid: r.u32("in header")?,
    };
    let _total_extlen = r.u16("in header")?;
    let _padding = r.u16("in header")?;
    let len = h.len as usize;
    if len < IN_HEADER_LEN || len > buf.len() {
        return Err(AbiError::Length {
            header: h.len,
            got: buf.len(),
        });
    }
    Ok((h, &buf[IN_HEADER_LEN..len]))
}

/// Little-endian writer for replies.
#[derive(Default)]
pub struct Writer {
    pub buf: Vec<u8>,
}

impl Writer {
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(b);
        self
    }
    pub fn zeros(&mut self, n: usize) -> &mut Self {
        self.buf.resize(self.buf.len() + n, 0);
        self
    }
}

/// A reply: header (error 0 or -errno) and body.
pub fn reply(unique: u64, error: i32, body: &[u8]) -> Vec<u8> {
    let mut w = Writer::default();
    w.u32((OUT_HEADER_LEN + body.len()) as u32)
        .u32(error as u32)
        .u64(unique)
        .bytes(body);
    w.buf
}

/// `struct fuse_attr` from a stat.
pub fn put_attr(w: &mut Writer, st: &libc::stat64) {
    w.u64(st.st_ino)
        .u64(st.st_size as u64)
        .u64(st.st_blocks as u64)
        .u64(st.st_atime as u64)
        .u64(st.st_mtime as u64)
        .u64(st.st_ctime as u64)
        .u32(st.st_atime_nsec as u32)
        .u32(st.st_mtime_nsec as u32)
        .u32(st.st_ctime_nsec as u32)
        .u32(st.st_mode)
        .u32(st.st_nlink as u32)
        .u32(st.st_uid)
        .u32(st.st_gid)
        .u32(st.st_rdev as u32)
        .u32(st.st_blksize as u32)
        .u32(0);
}

/// `struct fuse_entry_out`.
pub fn entry_out(nodeid: u64, st: &libc::stat64, valid_secs: u64) -> Vec<u8> {
    let mut w = Writer::default();
    w.u64(nodeid)
        .u64(0)
        .u64(valid_secs)
        .u64(valid_secs)
        .u32(0)
        .u32(0);
    put_attr(&mut w, st);
    w.buf
}

/// `struct fuse_attr_out`.
pub fn attr_out(st: &libc::stat64, valid_secs: u64) -> Vec<u8> {
    let mut w = Writer::default();
    w.u64(valid_secs).u32(0).u32(0);
    put_attr(&mut w, st);
    w.buf
}

/// `struct fuse_open_out`.
pub fn open_out(fh: u64) -> Vec<u8> {
    let mut w = Writer::default();
    w.u64(fh).u32(0).u32(0);
    w.buf
}

/// One `struct fuse_dirent` (8-byte aligned), or None if it does not fit in `room`.
pub fn dirent(ino: u64, off: u64, typ: u32, name: &[u8], room: usize) -> Option<Vec<u8>> {
    let len = DIRENT_LEN + name.len();
    let padded = (len + 7) & !7;
    if padded > room {
        return None;
    }
    let mut w = Writer::default();
    w.u64(ino)
        .u64(off)
        .u32(name.len() as u32)
        .u32(typ)
        .bytes(name)
        .zeros(padded - len);
    Some(w.buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    pub fn header(len: u32, opcode: u32, unique: u64, nodeid: u64) -> Vec<u8> {
        let mut w = Writer::default();
        w.u32(len)
            .u32(opcode)
            .u64(unique)
            .u64(nodeid)
            .u32(1000)
            .u32(1000)
            .u32(7)
            .u16(0)
            .u16(0);
        w.buf
    }

    #[test]
    fn header_round_trip_and_length_checks() {
        let mut req = header(IN_HEADER_LEN as u32 + 4, op::LOOKUP, 9, 1);
        req.extend_from_slice(b"abc\0");
        let (h, body) = parse_request(&req).expect("parse");
        assert_eq!(
            (h.opcode, h.unique, h.nodeid, h.uid, h.pid),
            (op::LOOKUP, 9, 1, 1000, 7)
        );
        assert_eq!(body, b"abc\0");
        assert_eq!(Reader::new(body).cstr().expect("name"), b"abc");
        assert!(matches!(
            Reader::new(b"abc").cstr(),
            Err(AbiError::Unterminated)
        ));
        // Header claims more than arrived, or less than a header.
        let bad = header(IN_HEADER_LEN as u32 + 100, op::LOOKUP, 1, 1);
        assert!(matches!(parse_request(&bad), Err(AbiError::Length { .. })));
        let bad = header(3, op::LOOKUP, 1, 1);
        assert!(matches!(parse_request(&bad), Err(AbiError::Length { .. })));
        assert!(matches!(parse_request(&req[..39]), Err(AbiError::Short(_))));
        // Trailing bytes past the header's length are ignored.
        let mut long = req.clone();
        long.extend_from_slice(&[1, 2, 3]);
        assert_eq!(parse_request(&long).expect("parse").1, b"abc\0");
    }

    #[test]
    fn dirent_is_padded_and_bounded() {
        let d = dirent(5, 6, 8, b"abc", 64).expect("fits");
        assert_eq!(d.len(), 32);
        assert!(dirent(5, 6, 8, b"abc", 31).is_none());
    }

    proptest! {
        /// Any bytes: parsing never panics, and a parsed body lies within the input.
        #[test]
        fn parse_request_never_panics(buf in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok((h, body)) = parse_request(&buf) {
                prop_assert!(h.len as usize <= buf.len());
                prop_assert_eq!(body.len(), h.len as usize - IN_HEADER_LEN);
            }
        }

        #[test]
        fn reader_never_reads_past_the_end(buf in proptest::collection::vec(any::<u8>(), 0..64), ops in proptest::collection::vec(0u8..5, 0..20)) {
            let mut r = Reader::new(&buf);
            let mut used = 0usize;
            for o in ops {
                let before = r.buf.len();
                let ok = match o {
                    0 => r.u16("x").is_ok(),
                    1 => r.u32("x").is_ok(),
                    2 => r.u64("x").is_ok(),
                    3 => r.cstr().is_ok(),
                    _ => { r.rest(); true }
                };
                if !ok { prop_assert_eq!(r.buf.len(), before); }
                used += before - r.buf.len();
            }
            prop_assert!(used <= buf.len());
        }
    }
}

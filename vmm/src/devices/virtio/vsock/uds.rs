//! Connecting to a host service's unix socket for a guest-initiated connection without ever
//! blocking the device thread: the socket is non-blocking before `connect`, so a listener whose
//! backlog is full answers `EAGAIN` at once (a unix stream connect never completes later: it
//! either succeeds or fails in the call), and the guest gets an RST.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::Path;

/// A non-blocking, close-on-exec stream connected to `path`, or the error (`WouldBlock` when
/// the listener's backlog is full).
pub fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: socket(2) with constant arguments; checked below.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd this function owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = (std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1) as libc::socklen_t;
    // SAFETY: connect with a valid sockaddr_un of `len` bytes that outlives the call.
    let r = unsafe {
        libc::connect(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            (&addr as *const libc::sockaddr_un).cast(),
            len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    /// A listener whose backlog is full: the connect fails at once with WouldBlock instead of
    /// waiting for an accept that never comes.
    #[test]
    fn a_full_backlog_refuses_at_once() {
        let d = tempfile::tempdir().expect("tmp");
        let p = d.path().join("svc");
        let l = std::os::unix::net::UnixListener::bind(&p).expect("bind");
        // SAFETY: listen(2) again on our listener: the backlog shrinks to its minimum.
        assert_eq!(unsafe { libc::listen(l.as_raw_fd(), 0) }, 0);
        let mut held = Vec::new();
        let t = std::time::Instant::now();
        let err = loop {
            match connect_nonblocking(&p) {
                Ok(s) => held.push(s),
                Err(e) => break e,
            }
            assert!(held.len() < 1000, "the backlog never filled");
        };
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock, "{err}");
        assert!(t.elapsed() < std::time::Duration::from_secs(1));
        // Once the service accepts, connecting works again.
        let _ = l.accept().expect("accept");
        assert!(connect_nonblocking(&p).is_ok());
        assert!(connect_nonblocking(&d.path().join("nobody")).is_err());
    }
}

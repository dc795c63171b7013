//! A terminal allocated inside the container (its own devpts instance, like
//! runc's console socket): the runner opens /dev/ptmx after pivot_root, makes
//! the slave its controlling terminal and stdio, and sends the master to the
//! agent over a unix socket (SCM_RIGHTS). `tty` then names /dev/pts/N inside.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::fcntl::OFlag;
use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("{0}: {1}")]
    Os(&'static str, #[source] nix::Error),
    #[error("no pty master received")]
    NoMaster,
}

type Result<T> = std::result::Result<T, ConsoleError>;

/// In the runner: allocate the pty in the current /dev, hand the master over,
/// make the slave stdin/stdout/stderr and the controlling terminal.
pub fn setup(console: &OwnedFd) -> Result<()> {
    let os = |what| move |e| ConsoleError::Os(what, e);
    let master = nix::pty::posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY)
        .map_err(os("open /dev/ptmx (is /dev/pts mounted?)"))?;
    nix::pty::grantpt(&master).map_err(os("grantpt"))?;
    nix::pty::unlockpt(&master).map_err(os("unlockpt"))?;
    let name = nix::pty::ptsname_r(&master).map_err(os("ptsname"))?;
    let slave = nix::fcntl::open(
        name.as_str(),
        OFlag::O_RDWR | OFlag::O_NOCTTY,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(os("open pty slave"))?;
    send_fd(console, master.as_raw_fd())?;
    drop(master);
    for target in 0..3 {
        // SAFETY: dup2 onto the standard fds; slave stays open until dropped.
        if unsafe { libc::dup2(slave.as_raw_fd(), target) } < 0 {
            return Err(ConsoleError::Os("dup2 pty slave", nix::Error::last()));
        }
    }
    drop(slave);
    // SAFETY: TIOCSCTTY on fd 0 with an integer argument.
    if unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) } < 0 {
        return Err(ConsoleError::Os("TIOCSCTTY", nix::Error::last()));
    }
    Ok(())
}

pub fn send_fd(sock: &OwnedFd, fd: RawFd) -> Result<()> {
    let fds = [fd];
    let iov = [IoSlice::new(b"m")];
    sendmsg::<()>(
        sock.as_raw_fd(),
        &iov,
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .map_err(|e| ConsoleError::Os("send pty master", e))?;
    Ok(())
}

/// In the agent: receive the master (blocking; the socket has a timeout).
pub fn recv_fd(sock: &OwnedFd) -> Result<OwnedFd> {
    let mut byte = [0u8; 1];
    let mut iov = [IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(|e| ConsoleError::Os("receive pty master", e))?;
    for cmsg in msg
        .cmsgs()
        .map_err(|e| ConsoleError::Os("control message", e))?
    {
        if let ControlMessageOwned::ScmRights(fds) = cmsg
            && let Some(fd) = fds.first()
        {
            // SAFETY: the kernel installed this fd for us.
            return Ok(unsafe { OwnedFd::from_raw_fd(*fd) });
        }
    }
    Err(ConsoleError::NoMaster)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fd_passing_round_trip() {
        let (a, b) = nix::sys::socket::socketpair(
            nix::sys::socket::AddressFamily::Unix,
            nix::sys::socket::SockType::Stream,
            None,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        )
        .expect("socketpair");
        let (r, w) = nix::unistd::pipe().expect("pipe");
        send_fd(&a, w.as_raw_fd()).expect("send");
        drop(w);
        let got = recv_fd(&b).expect("recv");
        nix::unistd::write(&got, b"via scm").expect("write");
        drop(got);
        let mut buf = [0u8; 16];
        let n = nix::unistd::read(&r, &mut buf).expect("read");
        assert_eq!(&buf[..n], b"via scm");
    }
}

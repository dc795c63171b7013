//! Process stdio: pipes or a pty, read and written by long-poll RPCs.
//!
//! Every read/write waits for readiness and then does one non-blocking syscall,
//! so an RPC cancelled by its ttrpc deadline never loses data.

use std::os::fd::{AsRawFd, OwnedFd};

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::Mutex;

#[derive(Debug, thiserror::Error)]
pub enum StdioError {
    #[error("{0}: {1}")]
    Os(&'static str, #[source] nix::Error),
    #[error("{0}: {1}")]
    Io(&'static str, #[source] std::io::Error),
    #[error("stdin is closed or was not requested")]
    NoStdin,
    #[error("process has no tty")]
    NoTty,
}

type Result<T> = std::result::Result<T, StdioError>;

/// The child's ends, handed to the runner as fds 0, 1, 2, and for a tty the
/// socket the runner sends the pty master on.
pub struct ChildStdio {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    pub console: Option<OwnedFd>,
}

/// The agent's side: ready now (pipes), or once the runner sent the master.
pub enum IoPlan {
    Ready(Box<ProcessIo>),
    Console { sock: OwnedFd, stdin: bool },
}

impl IoPlan {
    /// The process's io; for a tty, receive the master the runner sent.
    pub async fn finish(self) -> Result<ProcessIo> {
        match self {
            IoPlan::Ready(io) => Ok(*io),
            IoPlan::Console { sock, stdin } => {
                let timeout = nix::sys::time::TimeVal::new(30, 0);
                nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::ReceiveTimeout, &timeout)
                    .map_err(|e| StdioError::Os("console timeout", e))?;
                let master = tokio::task::spawn_blocking(move || crate::runner::console::recv_fd(&sock))
                    .await
                    .map_err(|e| StdioError::Io("console", std::io::Error::other(e.to_string())))?
                    .map_err(|e| StdioError::Io("console", std::io::Error::other(e.to_string())))?;
                ProcessIo::from_master(master, stdin)
            }
        }
    }
}

/// The agent's ends.
pub struct ProcessIo {
    stdin: Mutex<Option<AsyncFd<OwnedFd>>>,
    stdout: Mutex<Option<AsyncFd<OwnedFd>>>,
    stderr: Mutex<Option<AsyncFd<OwnedFd>>>,
    pty: Option<OwnedFd>,
}

fn nonblocking(fd: &OwnedFd) -> Result<()> {
    let flags = fcntl(fd, FcntlArg::F_GETFL).map_err(|e| StdioError::Os("F_GETFL", e))?;
    let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
    fcntl(fd, FcntlArg::F_SETFL(flags)).map_err(|e| StdioError::Os("F_SETFL", e))?;
    Ok(())
}

fn async_fd(fd: OwnedFd, interest: Interest) -> Result<AsyncFd<OwnedFd>> {
    nonblocking(&fd)?;
    // SAFETY: we own `fd` and it stays open (inside the AsyncFd) until the
    // registration is dropped with it.
    unsafe { AsyncFd::register_with_interest(fd, interest) }
        .map_err(|e| StdioError::Io("register fd", e.into_parts().1))
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| StdioError::Os("pipe", e))
}

fn dup(fd: &OwnedFd) -> Result<OwnedFd> {
    fd.try_clone().map_err(|e| StdioError::Io("dup", e))
}

fn dev_null() -> Result<OwnedFd> {
    std::fs::File::open("/dev/null").map(OwnedFd::from).map_err(|e| StdioError::Io("open /dev/null", e))
}

/// Make the pipes (or the console socket) for a new process.
pub fn make(stdin: bool, tty: bool) -> Result<(ChildStdio, IoPlan)> {
    if tty {
        let (sock, child_sock) = nix::sys::socket::socketpair(
            nix::sys::socket::AddressFamily::Unix,
            nix::sys::socket::SockType::Stream,
            None,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| StdioError::Os("socketpair", e))?;
        let child = ChildStdio { stdin: dev_null()?, stdout: dev_null()?, stderr: dev_null()?, console: Some(child_sock) };
        return Ok((child, IoPlan::Console { sock, stdin }));
    }
    let (in_r, in_w) = if stdin { pipe().map(|(r, w)| (r, Some(w)))? } else { (dev_null()?, None) };
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let child = ChildStdio { stdin: in_r, stdout: out_w, stderr: err_w, console: None };
    let io = ProcessIo {
        stdin: Mutex::new(in_w.map(|w| async_fd(w, Interest::WRITABLE)).transpose()?),
        stdout: Mutex::new(Some(async_fd(out_r, Interest::READABLE)?)),
        stderr: Mutex::new(Some(async_fd(err_r, Interest::READABLE)?)),
        pty: None,
    };
    Ok((child, IoPlan::Ready(Box::new(io))))
}

impl ProcessIo {
    /// Io over a pty master: stdout reads it, stdin writes it, stderr is empty.
    pub fn from_master(master: OwnedFd, stdin: bool) -> Result<Self> {
        Ok(ProcessIo {
            stdin: Mutex::new(if stdin { Some(async_fd(dup(&master)?, Interest::WRITABLE)?) } else { None }),
            stdout: Mutex::new(Some(async_fd(dup(&master)?, Interest::READABLE)?)),
            stderr: Mutex::new(None),
            pty: Some(master),
        })
    }
}

/// Read up to `max` bytes; `(data, eof)`. Waits until data or EOF.
async fn read_stream(slot: &Mutex<Option<AsyncFd<OwnedFd>>>, max: usize) -> Result<(Vec<u8>, bool)> {
    let mut guard = slot.lock().await;
    let Some(fd) = guard.as_ref() else { return Ok((Vec::new(), true)) };
    let mut buf = vec![0u8; max];
    let result = loop {
        let mut ready = fd.readable().await.map_err(|e| StdioError::Io("poll", e))?;
        match ready.try_io(|inner| nix::unistd::read(inner.get_ref(), &mut buf).map_err(std::io::Error::from)) {
            Ok(r) => break r,
            Err(_would_block) => continue,
        }
    };
    match result {
        Ok(0) => {
            *guard = None;
            Ok((Vec::new(), true))
        }
        Ok(n) => {
            buf.truncate(n);
            Ok((buf, false))
        }
        // A pty master reads EIO once the slave side is gone: that is EOF.
        Err(e) if e.raw_os_error() == Some(libc::EIO) => {
            *guard = None;
            Ok((Vec::new(), true))
        }
        Err(e) => Err(StdioError::Io("read", e)),
    }
}

impl ProcessIo {
    pub fn is_tty(&self) -> bool {
        self.pty.is_some()
    }

    pub async fn read_stdout(&self, max: usize) -> Result<(Vec<u8>, bool)> {
        read_stream(&self.stdout, max).await
    }

    pub async fn read_stderr(&self, max: usize) -> Result<(Vec<u8>, bool)> {
        read_stream(&self.stderr, max).await
    }

    /// Write all of `data` to stdin.
    pub async fn write_stdin(&self, data: &[u8]) -> Result<usize> {
        let guard = self.stdin.lock().await;
        let fd = guard.as_ref().ok_or(StdioError::NoStdin)?;
        let mut done = 0;
        while done < data.len() {
            let mut ready = fd.writable().await.map_err(|e| StdioError::Io("poll", e))?;
            match ready.try_io(|inner| nix::unistd::write(inner.get_ref(), &data[done..]).map_err(std::io::Error::from)) {
                Ok(Ok(n)) => done += n,
                Ok(Err(e)) => return Err(StdioError::Io("write stdin", e)),
                Err(_would_block) => continue,
            }
        }
        Ok(done)
    }

    /// Close stdin: EOF for a pipe, ^D for a tty.
    pub async fn close_stdin(&self) -> Result<()> {
        if self.pty.is_some()
            && self.stdin.lock().await.is_some() {
                self.write_stdin(&[0x04]).await?;
            }
        self.stdin.lock().await.take();
        Ok(())
    }

    pub fn resize(&self, rows: u16, cols: u16) -> Result<()> {
        let pty = self.pty.as_ref().ok_or(StdioError::NoTty)?;
        let ws = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
        // SAFETY: TIOCSWINSZ reads a winsize from the pointer we pass.
        let r = unsafe { libc::ioctl(pty.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        if r < 0 {
            return Err(StdioError::Io("TIOCSWINSZ", std::io::Error::last_os_error()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready(plan: IoPlan) -> ProcessIo {
        match plan {
            IoPlan::Ready(io) => *io,
            IoPlan::Console { .. } => panic!("pipes expected"),
        }
    }

    #[tokio::test]
    async fn pipes_carry_data_and_eof() {
        let (child, io) = make(true, false).expect("make");
        let io = ready(io);
        nix::unistd::write(&child.stdout, b"hello").expect("write");
        assert_eq!(io.read_stdout(3).await.expect("read"), (b"hel".to_vec(), false));
        assert_eq!(io.read_stdout(64).await.expect("read"), (b"lo".to_vec(), false));
        drop(child.stdout);
        assert_eq!(io.read_stdout(64).await.expect("read"), (vec![], true));
        assert_eq!(io.read_stdout(64).await.expect("read"), (vec![], true));
        assert_eq!(io.write_stdin(b"in").await.expect("write"), 2);
        let mut buf = [0u8; 8];
        assert_eq!(nix::unistd::read(&child.stdin, &mut buf).expect("read"), 2);
        io.close_stdin().await.expect("close");
        assert_eq!(nix::unistd::read(&child.stdin, &mut buf).expect("read"), 0);
        assert!(matches!(io.write_stdin(b"x").await, Err(StdioError::NoStdin)));
        assert!(matches!(io.resize(1, 1), Err(StdioError::NoTty)));
    }

    #[tokio::test]
    async fn cancelled_read_loses_nothing() {
        let (child, io) = make(false, false).expect("make");
        let io = ready(io);
        let r = tokio::time::timeout(std::time::Duration::from_millis(50), io.read_stderr(64)).await;
        assert!(r.is_err(), "no data yet");
        nix::unistd::write(&child.stderr, b"late").expect("write");
        assert_eq!(io.read_stderr(64).await.expect("read"), (b"late".to_vec(), false));
    }

    #[tokio::test]
    async fn pty_resize_and_output() {
        // What the runner does, in-process: master over the console socket.
        let (child, plan) = make(true, true).expect("make");
        let pty = nix::pty::openpty(None, None).expect("openpty");
        crate::runner::console::send_fd(child.console.as_ref().expect("console"), pty.master.as_raw_fd()).expect("send");
        drop(pty.master);
        let io = plan.finish().await.expect("finish");
        let slave = pty.slave;
        io.resize(40, 120).expect("resize");
        let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
        // SAFETY: TIOCGWINSZ writes a winsize into ws.
        let r = unsafe { libc::ioctl(slave.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
        assert_eq!(r, 0);
        assert_eq!((ws.ws_row, ws.ws_col), (40, 120));
        nix::unistd::write(&slave, b"tty!").expect("write");
        let (data, eof) = io.read_stdout(64).await.expect("read");
        assert!(!eof);
        assert!(String::from_utf8_lossy(&data).contains("tty!"));
        drop(slave);
        // Slave closed: EIO becomes EOF.
        let (_, eof) = io.read_stdout(64).await.expect("read");
        assert!(eof);
        assert_eq!(io.read_stderr(64).await.expect("read"), (vec![], true));
        drop(child);
    }
}

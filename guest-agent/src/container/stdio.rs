//! Process stdio: pipes or a pty, read and written by long-poll RPCs.
//!
//! Every read/write waits for readiness and then does one non-blocking syscall,
//! so an RPC cancelled by its ttrpc deadline never loses data.
//!
//! Output is read at stream offsets: bytes read from the pipe are held until a
//! later request acknowledges them, so a response lost on the way (the caller
//! was killed, or its timeout fired just as the read completed) is answered
//! again. At most [`HOLD_MAX`] unacknowledged bytes are held; beyond that the
//! pipe is not read and the process blocks on its writes.

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
    #[error("stream offset {offset} is no longer held (output from {held} on is)")]
    Gone { offset: u64, held: u64 },
    #[error("bad stream offset: {0}")]
    BadOffset(String),
    #[error("{0} unacknowledged output bytes held; acknowledge before reading on")]
    Unacknowledged(usize),
}

/// Most unacknowledged output bytes held per stream.
pub const HOLD_MAX: usize = 4 * 1024 * 1024;

/// One output stream: the pipe and the bytes read but not yet acknowledged.
struct OutStream {
    fd: Option<AsyncFd<OwnedFd>>,
    /// Stream offset of `held[0]`.
    base: u64,
    held: Vec<u8>,
    eof: bool,
}

impl OutStream {
    fn new(fd: Option<AsyncFd<OwnedFd>>) -> Self {
        let eof = fd.is_none();
        Self {
            fd,
            base: 0,
            held: Vec::new(),
            eof,
        }
    }

    fn end(&self) -> u64 {
        self.base + self.held.len() as u64
    }

    /// Forget everything before `upto` (clamped to what is held).
    fn ack(&mut self, upto: u64) {
        if upto > self.base {
            let n = ((upto - self.base) as usize).min(self.held.len());
            self.held.drain(..n);
            self.base += n as u64;
        }
    }
}

/// Where a read answers from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadAt {
    /// Consume-on-read: the oldest held byte; what is returned is forgotten.
    Next,
    /// Answer from `offset`; bytes before `consumed` may be forgotten.
    Offset { offset: u64, consumed: u64 },
}

/// A read's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub offset: u64,
    pub data: Vec<u8>,
    pub eof: bool,
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
                nix::sys::socket::setsockopt(
                    &sock,
                    nix::sys::socket::sockopt::ReceiveTimeout,
                    &timeout,
                )
                .map_err(|e| StdioError::Os("console timeout", e))?;
                let master =
                    tokio::task::spawn_blocking(move || crate::runner::console::recv_fd(&sock))
                        .await
                        .map_err(|e| {
                            StdioError::Io("console", std::io::Error::other(e.to_string()))
                        })?
                        .map_err(|e| {
                            StdioError::Io("console", std::io::Error::other(e.to_string()))
                        })?;
                ProcessIo::from_master(master, stdin)
            }
        }
    }
}

/// The agent's ends.
pub struct ProcessIo {
    stdin: Mutex<Option<AsyncFd<OwnedFd>>>,
    stdout: Mutex<OutStream>,
    stderr: Mutex<OutStream>,
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
    std::fs::File::open("/dev/null")
        .map(OwnedFd::from)
        .map_err(|e| StdioError::Io("open /dev/null", e))
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
        let child = ChildStdio {
            stdin: dev_null()?,
            stdout: dev_null()?,
            stderr: dev_null()?,
            console: Some(child_sock),
        };
        return Ok((child, IoPlan::Console { sock, stdin }));
    }
    let (in_r, in_w) = if stdin {
        pipe().map(|(r, w)| (r, Some(w)))?
    } else {
        (dev_null()?, None)
    };
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let child = ChildStdio {
        stdin: in_r,
        stdout: out_w,
        stderr: err_w,
        console: None,
    };
    let io = ProcessIo {
        stdin: Mutex::new(in_w.map(|w| async_fd(w, Interest::WRITABLE)).transpose()?),
        stdout: Mutex::new(OutStream::new(Some(async_fd(out_r, Interest::READABLE)?))),
        stderr: Mutex::new(OutStream::new(Some(async_fd(err_r, Interest::READABLE)?))),
        pty: None,
    };
    Ok((child, IoPlan::Ready(Box::new(io))))
}

impl ProcessIo {
    /// Io over a pty master: stdout reads it, stdin writes it, stderr is empty.
    pub fn from_master(master: OwnedFd, stdin: bool) -> Result<Self> {
        Ok(ProcessIo {
            stdin: Mutex::new(if stdin {
                Some(async_fd(dup(&master)?, Interest::WRITABLE)?)
            } else {
                None
            }),
            stdout: Mutex::new(OutStream::new(Some(async_fd(
                dup(&master)?,
                Interest::READABLE,
            )?))),
            stderr: Mutex::new(OutStream::new(None)),
            pty: Some(master),
        })
    }
}

/// Read up to `max` bytes at `at`. Waits until data or EOF.
async fn read_stream(slot: &Mutex<OutStream>, at: ReadAt, max: usize) -> Result<Chunk> {
    let mut st = slot.lock().await;
    let (pos, consumed) = match at {
        ReadAt::Next => (st.base, st.base),
        ReadAt::Offset { offset, consumed } => (offset, consumed),
    };
    if consumed > pos {
        return Err(StdioError::BadOffset(format!(
            "consumed {consumed} is past offset {pos}"
        )));
    }
    if pos < st.base {
        return Err(StdioError::Gone {
            offset: pos,
            held: st.base,
        });
    }
    if pos > st.end() {
        return Err(StdioError::BadOffset(format!(
            "offset {pos} is past the output's end {}",
            st.end()
        )));
    }
    st.ack(consumed);
    if pos == st.end() && !st.eof {
        fill(&mut st, max).await?;
    }
    let from = (pos - st.base) as usize;
    let n = (st.held.len() - from).min(max);
    let data = st.held[from..from + n].to_vec();
    let eof = st.eof && pos + n as u64 == st.end();
    if at == ReadAt::Next {
        st.ack(pos + n as u64);
    }
    Ok(Chunk {
        offset: pos,
        data,
        eof,
    })
}

/// Reads once from the pipe (waiting for data) and appends to what is held.
/// Cancel-safe: the data is held as soon as it is read.
async fn fill(st: &mut OutStream, max: usize) -> Result<()> {
    let room = HOLD_MAX.saturating_sub(st.held.len());
    if room == 0 {
        return Err(StdioError::Unacknowledged(st.held.len()));
    }
    let Some(fd) = st.fd.as_ref() else {
        st.eof = true;
        return Ok(());
    };
    let mut buf = vec![0u8; max.min(room)];
    let result = loop {
        let mut ready = fd.readable().await.map_err(|e| StdioError::Io("poll", e))?;
        match ready.try_io(|inner| {
            nix::unistd::read(inner.get_ref(), &mut buf).map_err(std::io::Error::from)
        }) {
            Ok(r) => break r,
            Err(_would_block) => continue,
        }
    };
    match result {
        Ok(0) => {}
        Ok(n) => {
            st.held.extend_from_slice(&buf[..n]);
            return Ok(());
        }
        // A pty master reads EIO once the slave side is gone: that is EOF.
        Err(e) if e.raw_os_error() == Some(libc::EIO) => {}
        Err(e) => return Err(StdioError::Io("read", e)),
    }
    st.fd = None;
    st.eof = true;
    Ok(())
}

impl ProcessIo {
    pub fn is_tty(&self) -> bool {
        self.pty.is_some()
    }

    pub async fn read_stdout(&self, at: ReadAt, max: usize) -> Result<Chunk> {
        read_stream(&self.stdout, at, max).await
    }

    pub async fn read_stderr(&self, at: ReadAt, max: usize) -> Result<Chunk> {
        read_stream(&self.stderr, at, max).await
    }

    /// Write all of `data` to stdin.
    pub async fn write_stdin(&self, data: &[u8]) -> Result<usize> {
        let guard = self.stdin.lock().await;
        let fd = guard.as_ref().ok_or(StdioError::NoStdin)?;
        let mut done = 0;
        while done < data.len() {
            let mut ready = fd.writable().await.map_err(|e| StdioError::Io("poll", e))?;
            match ready.try_io(|inner| {
                nix::unistd::write(inner.get_ref(), &data[done..]).map_err(std::io::Error::from)
            }) {
                Ok(Ok(n)) => done += n,
                Ok(Err(e)) => return Err(StdioError::Io("write stdin", e)),
                Err(_would_block) => continue,
            }
        }
        Ok(done)
    }

    /// Close stdin: EOF for a pipe, ^D for a tty.
    pub async fn close_stdin(&self) -> Result<()> {
        if self.pty.is_some() && self.stdin.lock().await.is_some() {
            self.write_stdin(&[0x04]).await?;
        }
        self.stdin.lock().await.take();
        Ok(())
    }

    pub fn resize(&self, rows: u16, cols: u16) -> Result<()> {
        let pty = self.pty.as_ref().ok_or(StdioError::NoTty)?;
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads a winsize from the pointer we pass.
        let r = unsafe { libc::ioctl(pty.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        if r < 0 {
            return Err(StdioError::Io(
                "TIOCSWINSZ",
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn out(io: &ProcessIo, max: usize) -> (Vec<u8>, bool) {
        let c = io.read_stdout(ReadAt::Next, max).await.expect("read");
        (c.data, c.eof)
    }

    async fn err(io: &ProcessIo, max: usize) -> (Vec<u8>, bool) {
        let c = io.read_stderr(ReadAt::Next, max).await.expect("read");
        (c.data, c.eof)
    }

    fn at(offset: u64, consumed: u64) -> ReadAt {
        ReadAt::Offset { offset, consumed }
    }

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
        assert_eq!(out(&io, 3).await, (b"hel".to_vec(), false));
        assert_eq!(out(&io, 64).await, (b"lo".to_vec(), false));
        drop(child.stdout);
        assert_eq!(out(&io, 64).await, (vec![], true));
        assert_eq!(out(&io, 64).await, (vec![], true));
        assert_eq!(io.write_stdin(b"in").await.expect("write"), 2);
        let mut buf = [0u8; 8];
        assert_eq!(nix::unistd::read(&child.stdin, &mut buf).expect("read"), 2);
        io.close_stdin().await.expect("close");
        assert_eq!(nix::unistd::read(&child.stdin, &mut buf).expect("read"), 0);
        assert!(matches!(
            io.write_stdin(b"x").await,
            Err(StdioError::NoStdin)
        ));
        assert!(matches!(io.resize(1, 1), Err(StdioError::NoTty)));
    }

    #[tokio::test]
    async fn cancelled_read_loses_nothing() {
        let (child, io) = make(false, false).expect("make");
        let io = ready(io);
        let r = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            io.read_stderr(ReadAt::Next, 64),
        )
        .await;
        assert!(r.is_err(), "no data yet");
        nix::unistd::write(&child.stderr, b"late").expect("write");
        assert_eq!(err(&io, 64).await, (b"late".to_vec(), false));
    }

    #[tokio::test]
    async fn pty_resize_and_output() {
        // What the runner does, in-process: master over the console socket.
        let (child, plan) = make(true, true).expect("make");
        let pty = nix::pty::openpty(None, None).expect("openpty");
        crate::runner::console::send_fd(
            child.console.as_ref().expect("console"),
            pty.master.as_raw_fd(),
        )
        .expect("send");
        drop(pty.master);
        let io = plan.finish().await.expect("finish");
        let slave = pty.slave;
        io.resize(40, 120).expect("resize");
        // SAFETY: winsize is plain integers; all zeroes is a valid value.
        let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
        // SAFETY: TIOCGWINSZ writes a winsize into ws.
        let r = unsafe { libc::ioctl(slave.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
        assert_eq!(r, 0);
        assert_eq!((ws.ws_row, ws.ws_col), (40, 120));
        nix::unistd::write(&slave, b"tty!").expect("write");
        let (data, eof) = out(&io, 64).await;
        assert!(!eof);
        assert!(String::from_utf8_lossy(&data).contains("tty!"));
        drop(slave);
        // Slave closed: EIO becomes EOF.
        let (_, eof) = out(&io, 64).await;
        assert!(eof);
        assert_eq!(err(&io, 64).await, (vec![], true));
        drop(child);
    }

    #[tokio::test]
    async fn offsets_replay_until_acknowledged() {
        let (child, io) = make(false, false).expect("make");
        let io = ready(io);
        nix::unistd::write(&child.stdout, b"hello").expect("write");
        let c = io.read_stdout(at(0, 0), 64).await.expect("read");
        assert_eq!(
            (c.offset, c.data.as_slice(), c.eof),
            (0, &b"hello"[..], false)
        );
        // Not acknowledged: the same request gets the same answer.
        assert_eq!(io.read_stdout(at(0, 0), 64).await.expect("read"), c);
        // From the middle, acknowledging the first two bytes.
        let c = io.read_stdout(at(3, 2), 64).await.expect("read");
        assert_eq!((c.offset, c.data.as_slice()), (3, &b"lo"[..]));
        assert!(matches!(
            io.read_stdout(at(1, 1), 64).await,
            Err(StdioError::Gone { offset: 1, held: 2 })
        ));
        assert!(matches!(
            io.read_stdout(at(9, 0), 64).await,
            Err(StdioError::BadOffset(_))
        ));
        assert!(matches!(
            io.read_stdout(at(3, 4), 64).await,
            Err(StdioError::BadOffset(_))
        ));
        nix::unistd::write(&child.stdout, b" world").expect("write");
        drop(child.stdout);
        let c = io.read_stdout(at(5, 5), 64).await.expect("read");
        assert_eq!(
            (c.offset, c.data.as_slice(), c.eof),
            (5, &b" world"[..], false)
        );
        let c = io.read_stdout(at(11, 5), 64).await.expect("read");
        assert_eq!((c.offset, c.data.len(), c.eof), (11, 0, true));
        // EOF does not drop unacknowledged output.
        let c = io.read_stdout(at(5, 5), 3).await.expect("read");
        assert_eq!((c.data.as_slice(), c.eof), (&b" wo"[..], false));
        let c = io.read_stdout(at(8, 8), 64).await.expect("read");
        assert_eq!((c.data.as_slice(), c.eof), (&b"rld"[..], true));
    }

    /// The race the offsets exist for: the agent's read completes just as the
    /// caller's timeout fires, so the response never arrives. The caller asks
    /// again at the same offset and gets the same bytes.
    #[tokio::test]
    async fn a_response_lost_to_a_timeout_is_answered_again() {
        let (child, io) = make(false, false).expect("make");
        let io = std::sync::Arc::new(ready(io));
        let (io2, w) = (io.clone(), child.stdout);
        let lost = tokio::spawn(async move { io2.read_stdout(at(0, 0), 64).await });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        nix::unistd::write(&w, b"in flight").expect("write");
        // The read completed; its response is dropped (the caller gave up).
        let dropped = lost.await.expect("join").expect("read");
        assert_eq!(dropped.data, b"in flight");
        drop(dropped);
        let again = io.read_stdout(at(0, 0), 64).await.expect("read");
        assert_eq!(
            (again.offset, again.data.as_slice()),
            (0, &b"in flight"[..])
        );
        // Same for a read cancelled while waiting: nothing is lost either.
        let r = tokio::time::timeout(
            std::time::Duration::from_millis(30),
            io.read_stdout(at(9, 9), 64),
        )
        .await;
        assert!(r.is_err());
        nix::unistd::write(&w, b"!").expect("write");
        assert_eq!(io.read_stdout(at(9, 9), 64).await.expect("read").data, b"!");
    }

    #[tokio::test]
    async fn unacknowledged_output_back_pressures_the_pipe() {
        let (child, io) = make(false, false).expect("make");
        let io = ready(io);
        let writer = std::thread::spawn(move || {
            let chunk = vec![b'x'; 64 * 1024];
            let mut total = 0usize;
            while total < 2 * HOLD_MAX {
                match nix::unistd::write(&child.stdout, &chunk) {
                    Ok(n) => total += n,
                    Err(_) => break,
                }
            }
            total
        });
        // Read without acknowledging until the hold is full.
        let mut off = 0u64;
        loop {
            match io.read_stdout(at(off, 0), 1024 * 1024).await {
                Ok(c) => off += c.data.len() as u64,
                Err(StdioError::Unacknowledged(n)) => {
                    assert_eq!(n, HOLD_MAX);
                    break;
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(off as usize, HOLD_MAX);
        assert!(
            !writer.is_finished(),
            "the writer is blocked, nothing dropped"
        );
        // Acknowledge and drain the rest: every byte arrives exactly once.
        loop {
            let c = io
                .read_stdout(at(off, off), 1024 * 1024)
                .await
                .expect("read");
            off += c.data.len() as u64;
            if c.eof {
                break;
            }
        }
        assert_eq!(off as usize, writer.join().expect("join"));
    }
}

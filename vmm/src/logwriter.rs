//! `husk-vmm log-writer`: the size-capped writer of a VM pod's logs (guest console, VMM and
//! helper output). The guest decides how much goes to its serial console, and a hostile one
//! writes without end: no log file it can fill grows past [`DEFAULT_MAX_BYTES`].
//!
//! It reads pipes (inherited fds) and appends what arrives to one log per pipe, kept in two
//! files, `<file>` (the newest output) and `<file>.1` (the output before it). When `<file>`
//! reaches half the cap its content moves to `<file>.1` (replacing what was there) and it
//! starts again empty, so each log keeps its newest output, between half the cap and the cap.
//! It exits once every pipe is at end of file (all writers gone). Detached like the processes
//! whose output it takes, it outlives a restart of huskd.
//!
//! huskd runs it jailed (the pod's uid, no capability, its seccomp list, a root without the
//! pod dir) and hands it both files of every log as open fds (`PIPE:CUR:OLD`): the move is a
//! copy between the two fds, so the writer needs no directory at all. `PIPE=PATH` (it opens
//! `PATH` and `PATH.1` itself) is for running it by hand.

use std::fs::File;
use std::io::{ErrorKind, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

/// Bytes one log keeps at most, over its two files.
pub const DEFAULT_MAX_BYTES: u64 = 4 << 20;
/// Smallest cap accepted (a rotation per few lines would be pointless churn).
pub const MIN_MAX_BYTES: u64 = 8 << 10;
/// Bytes read from a pipe at once.
const READ_CHUNK: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum LogWriterError {
    #[error("log {path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("log pipes: {0}")]
    Poll(#[source] std::io::Error),
    #[error("bad log spec {0:?}: want FD=PATH or FD:CURFD:OLDFD with FDs >= 3")]
    Spec(String),
}

/// The name a full log file is moved to.
pub fn rotated(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".1");
    PathBuf::from(p)
}

/// Where one pipe's log goes.
#[derive(Debug, PartialEq, Eq)]
pub enum Target {
    /// Files the writer opens: `PATH` and `PATH.1`.
    Path(PathBuf),
    /// Inherited fds of the two files (readable and writable).
    Fds(RawFd, RawFd),
}

/// One log: the current file and the previous one; the current moves to the previous at half
/// the cap.
pub struct CappedLog {
    name: PathBuf,
    cur: File,
    old: File,
    len: u64,
    half: u64,
}

impl CappedLog {
    /// Starts the log at `path` empty (a previous `<path>.1` is emptied too).
    pub fn create(path: &Path, max_bytes: u64) -> Result<Self, LogWriterError> {
        let open = |p: &Path| {
            std::fs::OpenOptions::new()
                .read(true)
                .append(true)
                .create(true)
                .truncate(false)
                .open(p)
                .map_err(|source| LogWriterError::File {
                    path: p.to_owned(),
                    source,
                })
        };
        Self::from_files(
            path.to_owned(),
            open(path)?,
            open(&rotated(path))?,
            max_bytes,
        )
    }

    /// Starts the log on two open files (both emptied), `name` for messages.
    pub fn from_files(
        name: PathBuf,
        cur: File,
        old: File,
        max_bytes: u64,
    ) -> Result<Self, LogWriterError> {
        let log = Self {
            name,
            cur,
            old,
            len: 0,
            half: max_bytes.max(MIN_MAX_BYTES) / 2,
        };
        log.cur.set_len(0).map_err(|e| log.err(e))?;
        log.old.set_len(0).map_err(|e| log.err(e))?;
        Ok(log)
    }

    fn err(&self, source: std::io::Error) -> LogWriterError {
        LogWriterError::File {
            path: self.name.clone(),
            source,
        }
    }

    /// Appends `data`, rotating as often as needed.
    pub fn write(&mut self, mut data: &[u8]) -> Result<(), LogWriterError> {
        while !data.is_empty() {
            if self.len >= self.half {
                self.rotate()?;
            }
            let n = data.len().min((self.half - self.len) as usize);
            // At explicit offsets: the fds may lack O_APPEND (their offsets would leave holes
            // after a truncation).
            self.cur
                .write_all_at(&data[..n], self.len)
                .map_err(|e| self.err(e))?;
            self.len += n as u64;
            data = &data[n..];
        }
        Ok(())
    }

    /// Moves the current file's content to the previous one (a copy: at most half the cap,
    /// so every byte is copied once) and empties the current one.
    fn rotate(&mut self) -> Result<(), LogWriterError> {
        self.old.set_len(0).map_err(|e| self.err(e))?;
        let mut buf = vec![0u8; READ_CHUNK];
        let mut off = 0u64;
        while off < self.len {
            let n = self.cur.read_at(&mut buf, off).map_err(|e| self.err(e))?;
            if n == 0 {
                break;
            }
            self.old
                .write_all_at(&buf[..n], off)
                .map_err(|e| self.err(e))?;
            off += n as u64;
        }
        self.cur.set_len(0).map_err(|e| self.err(e))?;
        self.len = 0;
        Ok(())
    }
}

/// Parses `FD=PATH` or `FD:CURFD:OLDFD`.
pub fn parse_spec(s: &str) -> Result<(RawFd, Target), LogWriterError> {
    let bad = || LogWriterError::Spec(s.to_owned());
    let fd = |n: &str| -> Result<RawFd, LogWriterError> {
        match n.parse::<RawFd>() {
            Ok(n) if n >= 3 => Ok(n),
            _ => Err(bad()),
        }
    };
    if let Some((pipe, path)) = s.split_once('=') {
        if path.is_empty() {
            return Err(bad());
        }
        return Ok((fd(pipe)?, Target::Path(PathBuf::from(path))));
    }
    let mut it = s.split(':');
    match (it.next(), it.next(), it.next(), it.next()) {
        (Some(p), Some(c), Some(o), None) => {
            let (p, c, o) = (fd(p)?, fd(c)?, fd(o)?);
            if p == c || p == o || c == o {
                return Err(bad());
            }
            Ok((p, Target::Fds(c, o)))
        }
        _ => Err(bad()),
    }
}

/// Copies every pipe into its capped log until all of them are at end of file.
pub fn run(pipes: Vec<(OwnedFd, CappedLog)>) -> Result<(), LogWriterError> {
    let epoll = Epoll::new().map_err(LogWriterError::Poll)?;
    let mut logs = Vec::new();
    for (i, (fd, log)) in pipes.into_iter().enumerate() {
        epoll
            .ctl(
                ControlOperation::Add,
                fd.as_raw_fd(),
                EpollEvent::new(EventSet::IN, i as u64),
            )
            .map_err(LogWriterError::Poll)?;
        logs.push(Some((File::from(fd), log)));
    }
    let mut open = logs.len();
    let mut buf = vec![0u8; READ_CHUNK];
    let mut events = vec![EpollEvent::default(); logs.len().max(1)];
    while open > 0 {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(LogWriterError::Poll(e)),
        };
        for ev in &events[..n] {
            let i = ev.data() as usize;
            let Some(Some((pipe, log))) = logs.get_mut(i) else {
                continue;
            };
            match pipe.read(&mut buf) {
                Ok(0) => {
                    let _ = epoll.ctl(
                        ControlOperation::Delete,
                        pipe.as_raw_fd(),
                        EpollEvent::default(),
                    );
                    logs[i] = None;
                    open -= 1;
                }
                Ok(k) => {
                    // A log that cannot be written (disk full) drops output, never blocks the
                    // writers: the pipe keeps being drained.
                    if let Err(e) = log.write(&buf[..k]) {
                        tracing::warn!("{e}");
                    }
                }
                Err(e) if matches!(e.kind(), ErrorKind::Interrupted | ErrorKind::WouldBlock) => {}
                Err(e) => return Err(LogWriterError::Poll(e)),
            }
        }
    }
    Ok(())
}

/// Takes ownership of inherited fd `fd` (from the command line).
///
/// # Safety
/// `fd` must be an open fd of this process that nothing else owns.
pub unsafe fn inherited(fd: RawFd) -> OwnedFd {
    // SAFETY: the caller guarantees `fd` is open and unowned.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn size(p: &Path) -> u64 {
        std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
    }

    #[test]
    fn floods_stay_within_the_cap_and_keep_the_newest_output() {
        let d = tempfile::tempdir().expect("tmp");
        let (console, vmm) = (d.path().join("console.log"), d.path().join("vmm.log"));
        let max = 64 << 10;
        let (r1, w1) = std::io::pipe().expect("pipe");
        let (r2, w2) = std::io::pipe().expect("pipe");
        let pipes = vec![
            (
                OwnedFd::from(r1),
                CappedLog::create(&console, max).expect("log"),
            ),
            (
                OwnedFd::from(r2),
                CappedLog::create(&vmm, max).expect("log"),
            ),
        ];
        let t = std::thread::spawn(move || run(pipes));
        let (mut w1, mut w2) = (w1, w2);
        // 32 MiB of numbered lines to the console, a little to the other log.
        let mut last = String::new();
        for i in 0..400_000u32 {
            last = format!(
                "console line {i:08} ........................................................\n"
            );
            w1.write_all(last.as_bytes()).expect("w");
        }
        w2.write_all(b"vmm says hi\n").expect("w");
        drop(w1);
        drop(w2);
        t.join().expect("join").expect("run");
        let total = size(&console) + size(&rotated(&console));
        assert!(total <= max, "{total} > {max}");
        assert!(total >= max / 2, "{total}: the newest half is kept");
        let tail = std::fs::read_to_string(&console).expect("read");
        assert!(tail.ends_with(&last), "newest output kept");
        assert_eq!(std::fs::read_to_string(&vmm).expect("r"), "vmm says hi\n");
        assert_eq!(size(&rotated(&vmm)), 0);
    }

    #[test]
    fn specs() {
        assert_eq!(
            parse_spec("3=/a/b").expect("ok"),
            (3, Target::Path(PathBuf::from("/a/b")))
        );
        assert_eq!(parse_spec("3:4:5").expect("ok"), (3, Target::Fds(4, 5)));
        for bad in [
            "1=/x", "x=/y", "4=", "/z", "3:4", "3:3:5", "3:4:5:6", "3:2:5",
        ] {
            assert!(parse_spec(bad).is_err(), "{bad}");
        }
    }
}

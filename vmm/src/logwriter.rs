//! `husk-vmm log-writer`: the size-capped writer of a VM pod's logs (guest console, VMM and
//! helper output). The guest decides how much goes to its serial console, and a hostile one
//! writes without end: no log file it can fill grows past [`DEFAULT_MAX_BYTES`].
//!
//! It reads pipes (inherited fds) and appends what arrives to one file per pipe. A file that
//! reaches half the cap is renamed to `<file>.1` (replacing the previous one) and a new file is
//! started, so each log keeps its newest output, between half the cap and the cap, in two
//! files. It exits once every pipe is at end of file (all writers gone). Detached like the
//! processes whose output it takes, it outlives a restart of huskd.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
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
    #[error("bad log spec {0:?}: want FD=PATH with FD >= 3")]
    Spec(String),
}

/// The name a full log file is moved to.
pub fn rotated(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".1");
    PathBuf::from(p)
}

/// One log: the current file and its length; rotated at half the cap.
pub struct CappedLog {
    path: PathBuf,
    file: File,
    len: u64,
    half: u64,
}

impl CappedLog {
    /// Starts the log at `path` empty (a previous `<path>.1` is removed).
    pub fn create(path: &Path, max_bytes: u64) -> Result<Self, LogWriterError> {
        let err = |source| LogWriterError::File {
            path: path.to_owned(),
            source,
        };
        match std::fs::remove_file(rotated(path)) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(err(e)),
        }
        Ok(Self {
            path: path.to_owned(),
            file: File::create(path).map_err(err)?,
            len: 0,
            half: max_bytes.max(MIN_MAX_BYTES) / 2,
        })
    }

    /// Appends `data`, rotating as often as needed.
    pub fn write(&mut self, mut data: &[u8]) -> Result<(), LogWriterError> {
        while !data.is_empty() {
            if self.len >= self.half {
                self.rotate()?;
            }
            let n = data.len().min((self.half - self.len) as usize);
            self.file
                .write_all(&data[..n])
                .map_err(|source| LogWriterError::File {
                    path: self.path.clone(),
                    source,
                })?;
            self.len += n as u64;
            data = &data[n..];
        }
        Ok(())
    }

    fn rotate(&mut self) -> Result<(), LogWriterError> {
        let err = |source| LogWriterError::File {
            path: self.path.clone(),
            source,
        };
        std::fs::rename(&self.path, rotated(&self.path)).map_err(err)?;
        self.file = File::create(&self.path).map_err(err)?;
        self.len = 0;
        Ok(())
    }
}

/// Parses `FD=PATH`.
pub fn parse_spec(s: &str) -> Result<(RawFd, PathBuf), LogWriterError> {
    let bad = || LogWriterError::Spec(s.to_owned());
    let (fd, path) = s.split_once('=').ok_or_else(bad)?;
    let fd: RawFd = fd.parse().map_err(|_| bad())?;
    if fd < 3 || path.is_empty() {
        return Err(bad());
    }
    Ok((fd, PathBuf::from(path)))
}

/// Copies every pipe into its capped log until all of them are at end of file.
pub fn run(pipes: Vec<(OwnedFd, PathBuf)>, max_bytes: u64) -> Result<(), LogWriterError> {
    let epoll = Epoll::new().map_err(LogWriterError::Poll)?;
    let mut logs = Vec::new();
    for (i, (fd, path)) in pipes.into_iter().enumerate() {
        let log = CappedLog::create(&path, max_bytes)?;
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
            (OwnedFd::from(r1), console.clone()),
            (OwnedFd::from(r2), vmm.clone()),
        ];
        let t = std::thread::spawn(move || run(pipes, max));
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
        assert!(!rotated(&vmm).exists());
    }

    #[test]
    fn specs() {
        assert_eq!(
            parse_spec("3=/a/b").expect("ok"),
            (3, PathBuf::from("/a/b"))
        );
        for bad in ["1=/x", "x=/y", "4=", "/z"] {
            assert!(parse_spec(bad).is_err(), "{bad}");
        }
    }
}

//! Container logs in the CRI format the kubelet reads:
//! `<RFC3339Nano> <stdout|stderr> <F|P> <content>\n`. A line longer than
//! [`MAX_LINE`] is split into `P` (partial) records ending with an `F` one;
//! a last line without a newline is written as `F` at end of stream.
//!
//! Copy progress is durable: a small progress file beside the container's
//! record holds, per stream, the stream offset up to which output has become
//! log records, and the log's length and inode at that point. It is rewritten
//! (one `pwrite`, no fsync: it only has to survive a huskd crash, not a host
//! one) after every log write. After a restart the log is cut back to the
//! recorded length (records written after the last progress update are
//! written again) and copying resumes at the recorded offsets, so every line
//! appears exactly once.

use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Longest log record before a line is split (containerd's default).
pub const MAX_LINE: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
    fn idx(self) -> usize {
        self as usize
    }
}

/// Records are written to the log file in pieces of about this size.
pub const WRITE_CHUNK: usize = 256 * 1024;

/// `<timestamp> <stream> <P|F> `: what precedes a record's content.
fn record_prefix(ts: chrono::DateTime<chrono::Utc>, stream: Stream, partial: bool) -> Vec<u8> {
    format!(
        "{} {} {} ",
        ts.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
        stream.name(),
        if partial { "P" } else { "F" }
    )
    .into_bytes()
}

/// One CRI record.
pub fn format_record(
    ts: chrono::DateTime<chrono::Utc>,
    stream: Stream,
    partial: bool,
    content: &[u8],
) -> Vec<u8> {
    let mut out = record_prefix(ts, stream, partial);
    out.extend_from_slice(content);
    out.push(b'\n');
    out
}

/// Size of the progress file: consumed offsets (stdout, stderr), log length, log inode.
const PROGRESS_LEN: usize = 32;

struct Inner {
    file: Option<std::fs::File>,
    pending: [Vec<u8>; 2],
    /// Stream offset just past the last byte received, per stream.
    received: [u64; 2],
    /// Length and inode of the log file (0 without one).
    log_len: u64,
    log_ino: u64,
    progress: Option<std::fs::File>,
}

impl Inner {
    fn consumed(&self, i: usize) -> u64 {
        self.received[i] - self.pending[i].len() as u64
    }

    fn persist(&self) {
        let Some(p) = &self.progress else { return };
        let mut buf = [0u8; PROGRESS_LEN];
        for (i, v) in [
            self.consumed(0),
            self.consumed(1),
            self.log_len,
            self.log_ino,
        ]
        .into_iter()
        .enumerate()
        {
            buf[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        if let Err(e) = p.write_all_at(&buf, 0) {
            tracing::warn!(error = %e, "write log progress");
        }
    }
}

fn read_progress(f: &std::fs::File) -> std::io::Result<Option<[u64; 4]>> {
    let mut buf = [0u8; PROGRESS_LEN];
    match f.read_exact_at(&mut buf, 0) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut v = [0u64; 4];
    for (i, x) in v.iter_mut().enumerate() {
        let mut w = [0u8; 8];
        w.copy_from_slice(&buf[i * 8..i * 8 + 8]);
        *x = u64::from_le_bytes(w);
    }
    Ok(Some(v))
}

/// A container's log file (or a sink when the CRI gave no log path).
pub struct CriLog {
    path: Option<PathBuf>,
    inner: Mutex<Inner>,
}

fn open(path: &Path) -> std::io::Result<std::fs::File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}

impl CriLog {
    /// A log without durable progress (copying always starts at offset 0).
    pub fn new(path: Option<PathBuf>) -> std::io::Result<Self> {
        Self::open(path, None)
    }

    /// A log whose copy progress lives in `progress` (created if missing). An
    /// existing progress file is resumed: the log is cut back to the length
    /// it had when the progress was last recorded.
    pub fn open(path: Option<PathBuf>, progress: Option<&Path>) -> std::io::Result<Self> {
        let file = path.as_deref().map(open).transpose()?;
        let progress = progress
            .map(|p| {
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(p)
            })
            .transpose()?;
        let saved = progress.as_ref().map(read_progress).transpose()?.flatten();
        let (mut log_len, mut log_ino) = (0, 0);
        if let Some(f) = &file {
            let meta = f.metadata()?;
            (log_len, log_ino) = (meta.len(), meta.ino());
            if let Some([_, _, len, ino]) = saved
                && ino == log_ino
                && len < log_len
            {
                tracing::info!(
                    ?path,
                    from = log_len,
                    to = len,
                    "cutting log records written after the last progress"
                );
                f.set_len(len)?;
                log_len = len;
            }
        }
        let received = saved.map(|v| [v[0], v[1]]).unwrap_or([0, 0]);
        let inner = Inner {
            file,
            pending: [Vec::new(), Vec::new()],
            received,
            log_len,
            log_ino,
            progress,
        };
        inner.persist();
        Ok(Self {
            path,
            inner: Mutex::new(inner),
        })
    }

    /// Where copying `stream` goes on: (offset to read from, bytes consumed
    /// into records). They differ by a partial line waiting for its end.
    pub fn position(&self, stream: Stream) -> (u64, u64) {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        (g.received[stream.idx()], g.consumed(stream.idx()))
    }

    /// Output before `offset` is gone: drop a pending partial line and go on
    /// from `offset`.
    pub fn skip_to(&self, stream: Stream, offset: u64) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.pending[stream.idx()].clear();
        g.received[stream.idx()] = offset;
        g.persist();
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Appends stream data: complete lines become `F` records, overlong
    /// ones `P` records; the rest waits for more data. Linear in the bytes:
    /// each byte is looked at once (a line is searched for its end no further
    /// than [`MAX_LINE`]), the consumed lines are dropped from the pending
    /// buffer once, and records go to the file in chunks of [`WRITE_CHUNK`],
    /// so one call holds at most that much output besides its input.
    pub fn write(&self, stream: Stream, data: &[u8]) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let inner = &mut *g;
        inner.received[stream.idx()] += data.len() as u64;
        let mut pending = std::mem::take(&mut inner.pending[stream.idx()]);
        pending.extend_from_slice(data);
        let now = chrono::Utc::now();
        let full = record_prefix(now, stream, false);
        let part = record_prefix(now, stream, true);
        let mut out = Vec::with_capacity(WRITE_CHUNK.min(pending.len() * 2 + full.len()));
        let mut start = 0;
        loop {
            let rest = &pending[start..];
            let window = &rest[..rest.len().min(MAX_LINE + 1)];
            let (prefix, line, used) = match window.iter().position(|b| *b == b'\n') {
                Some(nl) => (&full, &rest[..nl], nl + 1),
                None if rest.len() > MAX_LINE => (&part, &rest[..MAX_LINE], MAX_LINE),
                None => break,
            };
            out.extend_from_slice(prefix);
            out.extend_from_slice(line);
            out.push(b'\n');
            start += used;
            if out.len() >= WRITE_CHUNK {
                Self::emit(inner, &out);
                out.clear();
            }
        }
        Self::emit(inner, &out);
        pending.drain(..start);
        inner.pending[stream.idx()] = pending;
        inner.persist();
    }

    /// End of `stream`: a pending partial line is written as a full record.
    pub fn finish(&self, stream: Stream) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let inner = &mut *g;
        let pending = std::mem::take(&mut inner.pending[stream.idx()]);
        if !pending.is_empty() {
            let rec = format_record(chrono::Utc::now(), stream, false, &pending);
            Self::emit(inner, &rec);
        }
        inner.persist();
    }

    fn emit(inner: &mut Inner, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let Some(f) = inner.file.as_mut() else { return };
        match f.write_all(data) {
            Ok(()) => inner.log_len += data.len() as u64,
            Err(e) => {
                tracing::warn!(error = %e, "write container log");
                inner.log_len = f.metadata().map(|m| m.len()).unwrap_or(inner.log_len);
            }
        }
    }

    /// Reopens the file at the same path (after the kubelet rotated it).
    pub fn reopen(&self) -> std::io::Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let f = open(path)?;
        let meta = f.metadata()?;
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.file = Some(f);
        (g.log_len, g.log_ino) = (meta.len(), meta.ino());
        g.persist();
        Ok(())
    }
}

pub use crate::logfmt::parse_record;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn records(p: &Path) -> Vec<(String, bool, String)> {
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .map(|l| {
                let (s, p, c) = parse_record(l).unwrap_or_else(|| panic!("bad record {l:?}"));
                (s.to_string(), p, c.to_string())
            })
            .collect()
    }

    #[test]
    fn lines_partials_and_reopen() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sub/c.log");
        let log = CriLog::new(Some(p.clone())).unwrap();
        log.write(Stream::Stdout, b"hel");
        log.write(Stream::Stderr, b"oops\n");
        log.write(Stream::Stdout, b"lo\nwor");
        let long = vec![b'x'; MAX_LINE + 10];
        log.write(Stream::Stderr, &long);
        log.write(Stream::Stderr, b"\n");
        log.finish(Stream::Stdout);
        log.finish(Stream::Stderr);
        let r = records(&p);
        assert_eq!(
            r,
            vec![
                ("stderr".into(), false, "oops".into()),
                ("stdout".into(), false, "hello".into()),
                ("stderr".into(), true, "x".repeat(MAX_LINE)),
                ("stderr".into(), false, "x".repeat(10)),
                ("stdout".into(), false, "wor".into()),
            ]
        );
        let first = std::fs::read_to_string(&p).unwrap();
        let ts = first.split(' ').next().unwrap();
        assert!(
            ts.ends_with('Z') && ts.len() == "2026-01-01T00:00:00.000000000Z".len(),
            "{ts}"
        );
        // Rotation: the kubelet renames the file, then asks for a reopen.
        std::fs::rename(&p, d.path().join("c.log.1")).unwrap();
        log.reopen().unwrap();
        log.write(Stream::Stdout, b"after\n");
        assert_eq!(records(&p), vec![("stdout".into(), false, "after".into())]);
    }

    #[test]
    fn progress_resumes_and_cuts_unrecorded_records() {
        let d = tempfile::tempdir().unwrap();
        let (p, prog) = (d.path().join("c.log"), d.path().join("c.progress"));
        let log = CriLog::open(Some(p.clone()), Some(&prog)).unwrap();
        assert_eq!(log.position(Stream::Stdout), (0, 0));
        log.write(Stream::Stdout, b"one\ntw");
        log.write(Stream::Stderr, b"e1\n");
        assert_eq!(log.position(Stream::Stdout), (6, 4));
        assert_eq!(log.position(Stream::Stderr), (3, 3));
        let good = std::fs::read(&p).unwrap();
        // Records that reached the log after the last progress update (a
        // crash between the two writes) are cut on reopen.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&p)
            .unwrap()
            .write_all(b"2026-01-01T00:00:00.000000000Z stdout F two\n")
            .unwrap();
        drop(log);
        let log = CriLog::open(Some(p.clone()), Some(&prog)).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), good);
        // Resumes at what became records: the partial "tw" is read again.
        assert_eq!(log.position(Stream::Stdout), (4, 4));
        assert_eq!(log.position(Stream::Stderr), (3, 3));
        log.write(Stream::Stdout, b"two\n");
        log.finish(Stream::Stdout);
        let r: Vec<_> = records(&p).into_iter().map(|r| r.2).collect();
        assert_eq!(r, ["one", "e1", "two"]);
        // After a rotation the progress follows the new file.
        std::fs::rename(&p, d.path().join("c.log.1")).unwrap();
        log.reopen().unwrap();
        log.write(Stream::Stdout, b"three\n");
        drop(log);
        let rotated = std::fs::read(&p).unwrap();
        let log = CriLog::open(Some(p.clone()), Some(&prog)).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), rotated);
        assert_eq!(log.position(Stream::Stdout), (14, 14));
        log.skip_to(Stream::Stdout, 20);
        assert_eq!(log.position(Stream::Stdout), (20, 20));
    }

    #[test]
    fn newline_floods_are_linear() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.log");
        let log = CriLog::open(Some(p.clone()), Some(&d.path().join("prog"))).unwrap();
        // One agent reply's worth (ttrpc's 4 MiB) of empty lines: was ≈ 280 s.
        let data = vec![b'\n'; 4 << 20];
        let t = std::time::Instant::now();
        log.write(Stream::Stdout, &data);
        let took = t.elapsed();
        // Sanity bound only: the quadratic writer took ≈ 280 s; this one takes
        // ≈ 0.1 s optimised, 1–3 s as an unoptimised test build on a loaded machine.
        println!("4 MiB of newlines: {took:?}");
        assert!(took < std::time::Duration::from_secs(10), "{took:?}");
        let text = std::fs::read_to_string(&p).unwrap();
        assert_eq!(text.lines().count(), 4 << 20);
        assert!(text.lines().all(|l| l.ends_with(" stdout F ")));
        assert_eq!(log.position(Stream::Stdout), (4 << 20, 4 << 20));
        // A line far longer than MAX_LINE among newlines: split the same way.
        let mut data = vec![b'a'; 3 * MAX_LINE + 5];
        data.extend_from_slice(b"\n\nb");
        log.write(Stream::Stderr, &data);
        log.finish(Stream::Stderr);
        let r: Vec<_> = records(&p)
            .into_iter()
            .filter(|r| r.0 == "stderr")
            .map(|r| (r.1, r.2.len()))
            .collect();
        assert_eq!(
            r,
            [
                (true, MAX_LINE),
                (true, MAX_LINE),
                (true, MAX_LINE),
                (false, 5),
                (false, 0),
                (false, 1)
            ]
        );
    }
}

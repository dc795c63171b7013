//! Container logs in the CRI format the kubelet reads:
//! `<RFC3339Nano> <stdout|stderr> <F|P> <content>\n`. A line longer than
//! [`MAX_LINE`] is split into `P` (partial) records ending with an `F` one;
//! a last line without a newline is written as `F` at end of stream.

use std::io::Write;
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

/// One CRI record.
pub fn format_record(
    ts: chrono::DateTime<chrono::Utc>,
    stream: Stream,
    partial: bool,
    content: &[u8],
) -> Vec<u8> {
    let mut out = format!(
        "{} {} {} ",
        ts.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
        stream.name(),
        if partial { "P" } else { "F" }
    )
    .into_bytes();
    out.extend_from_slice(content);
    out.push(b'\n');
    out
}

struct Inner {
    file: Option<std::fs::File>,
    pending: [Vec<u8>; 2],
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
    pub fn new(path: Option<PathBuf>) -> std::io::Result<Self> {
        let file = path.as_deref().map(open).transpose()?;
        Ok(Self {
            path,
            inner: Mutex::new(Inner {
                file,
                pending: [Vec::new(), Vec::new()],
            }),
        })
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Appends stream data: complete lines become `F` records, overlong
    /// ones `P` records; the rest waits for more data.
    pub fn write(&self, stream: Stream, data: &[u8]) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let inner = &mut *g;
        let pending = &mut inner.pending[stream.idx()];
        pending.extend_from_slice(data);
        let mut out = Vec::new();
        let now = chrono::Utc::now();
        loop {
            match pending.iter().position(|b| *b == b'\n') {
                Some(nl) if nl <= MAX_LINE => {
                    out.extend(format_record(now, stream, false, &pending[..nl]));
                    pending.drain(..=nl);
                }
                _ if pending.len() > MAX_LINE => {
                    out.extend(format_record(now, stream, true, &pending[..MAX_LINE]));
                    pending.drain(..MAX_LINE);
                }
                _ => break,
            }
        }
        Self::emit(inner, &out);
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
    }

    fn emit(inner: &mut Inner, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        if let Some(f) = inner.file.as_mut()
            && let Err(e) = f.write_all(data)
        {
            tracing::warn!(error = %e, "write container log");
        }
    }

    /// Reopens the file at the same path (after the kubelet rotated it).
    pub fn reopen(&self) -> std::io::Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let f = open(path)?;
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).file = Some(f);
        Ok(())
    }
}

/// Parses one CRI record: (stream, partial, content). For readers (CLI, tests).
pub fn parse_record(line: &str) -> Option<(&str, bool, &str)> {
    let mut it = line.splitn(4, ' ');
    let ts = it.next()?;
    chrono::DateTime::parse_from_rfc3339(ts).ok()?;
    let stream = it.next().filter(|s| *s == "stdout" || *s == "stderr")?;
    let partial = match it.next()? {
        "P" => true,
        "F" => false,
        _ => return None,
    };
    Some((stream, partial, it.next().unwrap_or("")))
}

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
}

//! The CRI container log format (`<RFC 3339 time> <stream> <P|F> <content>`), as
//! readers see it: a leaf shared by the CLI and the tests. The writer is
//! `sandbox/logs.rs`.

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

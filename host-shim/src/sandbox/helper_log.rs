//! The helper processes huskd starts for a pod (the `husk-ns` agent,
//! husk-vmm, its vhost-user servers, QEMU): the environment they get and
//! the error line quoted from their log when they die at start.
//!
//! A Rust helper that fails with `RUST_BACKTRACE` set prints its error and
//! then dozens of stack frames; the last lines of its log are then frames,
//! not the error. Helpers are started without the backtrace variables, and
//! the quoted tail skips backtrace blocks anyway (a helper that sets them
//! itself, or a panic's frames).

use std::path::Path;
use std::process::Command;

/// The variables that make Rust programs print stack backtraces.
const BACKTRACE_VARS: [&str; 2] = ["RUST_BACKTRACE", "RUST_LIB_BACKTRACE"];

/// Starts `cmd` without the backtrace variables huskd's environment may carry.
pub(crate) fn without_backtraces(cmd: &mut Command) -> &mut Command {
    for v in BACKTRACE_VARS {
        cmd.env_remove(v);
    }
    cmd
}

/// Bytes read from the end of a log (and of its rotated `<log>.1`) for the tail quoted in
/// start errors: the guest fills the console at will.
const TAIL_BYTES: u64 = 64 << 10;

/// The last [`TAIL_BYTES`] of a file (empty if missing).
fn read_end(path: &Path) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut out = Vec::new();
    if f.seek(SeekFrom::Start(len.saturating_sub(TAIL_BYTES)))
        .is_ok()
    {
        let _ = f.take(TAIL_BYTES).read_to_end(&mut out);
    }
    out
}

/// The last `n` meaningful lines of a helper's (rotated) log joined with " | ", or
/// "(empty)": read from the end of `<path>.1` and `<path>`, a bounded amount of each.
pub(crate) fn tail(path: &Path, n: usize) -> String {
    let mut rotated = path.as_os_str().to_owned();
    rotated.push(".1");
    let mut s = read_end(Path::new(&rotated));
    s.extend(read_end(path));
    let s = String::from_utf8_lossy(&s);
    let lines = error_lines(&s, n);
    if lines.is_empty() {
        return "(empty)".into();
    }
    lines.join(" | ")
}

/// The last `n` non-empty lines of `log` that are not part of a stack
/// backtrace: a `stack backtrace:` header (std's panic, anyhow's
/// `Stack backtrace:`) and the indented frame lines after it are dropped,
/// and so is std's `note: ... RUST_BACKTRACE ...` hint.
fn error_lines(log: &str, n: usize) -> Vec<&str> {
    let mut kept = vec![];
    let mut in_backtrace = false;
    for line in log.lines().map(str::trim_end) {
        if line.trim().eq_ignore_ascii_case("stack backtrace:") {
            in_backtrace = true;
            continue;
        }
        if in_backtrace {
            // Frames are indented ("  0: sym", "      at file:line").
            if line.is_empty() || line.starts_with(char::is_whitespace) {
                continue;
            }
            in_backtrace = false;
        }
        if line.is_empty() || (line.starts_with("note: ") && line.contains("BACKTRACE")) {
            continue;
        }
        kept.push(line);
    }
    let skip = kept.len().saturating_sub(n);
    kept.split_off(skip)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_of_logs() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("l");
        std::fs::write(&p, "a\n\nb\nc\n").unwrap();
        assert_eq!(tail(&p, 2), "b | c");
        assert_eq!(tail(&d.path().join("none"), 2), "(empty)");
        std::fs::write(&p, "\n\n").unwrap();
        assert_eq!(tail(&p, 2), "(empty)");
        // Just rotated: the lines come from both files.
        std::fs::write(d.path().join("l.1"), "x\ny\n").unwrap();
        std::fs::write(&p, "z\n").unwrap();
        assert_eq!(tail(&p, 3), "x | y | z");
    }

    /// What `fn main() -> anyhow::Result<()>` prints with RUST_BACKTRACE=1.
    #[test]
    fn anyhow_backtrace_is_skipped() {
        let log = "\
2026-12-06T10:00:00Z  INFO husk_agent: starting
husk-agent: fatal: host process setup: mount /proc: Operation not permitted (os error 1)
Error: host process setup

Caused by:
    0: mount /proc
    1: Operation not permitted (os error 1)

Stack backtrace:
   0: anyhow::error::<impl anyhow::Error>::msg
             at /root/.cargo/registry/src/anyhow-1.0.100/src/backtrace.rs:27:14
   1: husk_agent::run
             at ./guest-agent/src/main.rs:130:9
   2: std::rt::lang_start_internal
   3: main
   4: __libc_start_main
   5: _start
";
        assert_eq!(
            error_lines(log, 4),
            [
                "Error: host process setup",
                "Caused by:",
                "    0: mount /proc",
                "    1: Operation not permitted (os error 1)",
            ]
        );
        assert_eq!(
            error_lines(log, 5)[0],
            "husk-agent: fatal: host process setup: mount /proc: Operation not permitted (os error 1)"
        );
    }

    /// A panic with RUST_BACKTRACE=1 (and the hint without it).
    #[test]
    fn panic_backtrace_is_skipped() {
        let log = "\
thread 'main' panicked at vmm/src/main.rs:12:5:
no vsock device
stack backtrace:
   0: rust_begin_unwind
   1: core::panicking::panic_fmt
note: Some details are omitted, run with `RUST_BACKTRACE=full` for a verbose backtrace.
";
        assert_eq!(
            error_lines(log, 5),
            [
                "thread 'main' panicked at vmm/src/main.rs:12:5:",
                "no vsock device"
            ]
        );
        let log = "thread 'main' panicked at x.rs:1:1:\nboom\nnote: run with `RUST_BACKTRACE=1` environment variable to display a backtrace\n";
        assert_eq!(error_lines(log, 1), ["boom"]);
    }

    /// Lines after a backtrace (another process writing to the same log) are kept.
    #[test]
    fn lines_after_a_backtrace_are_kept() {
        let log = "Error: x\n\nStack backtrace:\n   0: main\nqemu-system-x86_64: -chardev socket: Failed to connect\n";
        assert_eq!(
            error_lines(log, 2),
            [
                "Error: x",
                "qemu-system-x86_64: -chardev socket: Failed to connect"
            ]
        );
    }

    #[test]
    fn backtrace_variables_are_removed() {
        let mut cmd = Command::new("env");
        cmd.env("RUST_BACKTRACE", "1")
            .env("RUST_LIB_BACKTRACE", "1");
        without_backtraces(&mut cmd);
        let out = cmd.output().unwrap();
        let env = String::from_utf8_lossy(&out.stdout);
        assert!(!env.contains("BACKTRACE"), "{env}");
    }
}

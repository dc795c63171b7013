//! Finding a pod's host processes without huskd's records.
//!
//! Every process huskd starts for a pod (a VMM, its vhost-user servers, a husk-ns
//! agent) carries `HUSK_SANDBOX=<pod id>:<run dir>` in its environment, set before
//! exec. A restarted huskd finds them by scanning `/proc`, whatever point a `kill -9`
//! interrupted it at: before their pid was recorded (a VM boots for seconds between
//! spawn and record), or after the pod's record was gone. The run dir names the huskd
//! instance, so one huskd never touches another's pods on the same host.
//!
//! Also here: the crash points a test arms through `HUSK_TEST_CRASH_AT` to kill huskd
//! (SIGKILL, exactly as `kill -9`) at a named step of a pod's or container's start.

use std::collections::BTreeSet;
use std::io::Read;
use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

use super::kind::{kill_wait, start_time};

/// The environment variable that marks a pod's processes.
pub const POD_ENV: &str = "HUSK_SANDBOX";

/// At most this much of a process's environment is read while scanning (ours put
/// the marker among a handful of variables; a huge foreign environ is skipped).
const ENVIRON_READ_MAX: u64 = 256 * 1024;

/// Marks `cmd` as a process of pod `id` of the huskd whose run dir is `run_dir`.
pub fn mark(cmd: &mut Command, id: &str, run_dir: &Path) {
    cmd.env(POD_ENV, marker(id, run_dir));
}

fn marker(id: &str, run_dir: &Path) -> String {
    format!("{id}:{}", run_dir.display())
}

/// A marked process: pid, start time (to never kill a recycled pid) and its pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Marked {
    pub pid: i32,
    pub start_time: u64,
    pub pod: String,
}

/// Every live process marked by the huskd of `run_dir`.
pub fn scan(run_dir: &Path) -> Vec<Marked> {
    let suffix = format!(":{}", run_dir.display());
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    let mut out = vec![];
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Some(value) = env_value(pid, POD_ENV) else {
            continue;
        };
        let Some(pod) = value.strip_suffix(&suffix) else {
            continue;
        };
        if pod.is_empty() || !pod.bytes().all(|b| b.is_ascii_alphanumeric()) {
            continue;
        }
        if let Some(st) = start_time(pid) {
            out.push(Marked {
                pid,
                start_time: st,
                pod: pod.to_string(),
            });
        }
    }
    out
}

/// `name`'s value in `pid`'s environment (as it was at exec).
fn env_value(pid: i32, name: &str) -> Option<String> {
    let f = std::fs::File::open(format!("/proc/{pid}/environ")).ok()?;
    let mut buf = vec![];
    f.take(ENVIRON_READ_MAX).read_to_end(&mut buf).ok()?;
    let prefix = format!("{name}=");
    buf.split(|b| *b == 0)
        .find_map(|kv| kv.strip_prefix(prefix.as_bytes()))
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// SIGKILLs (and waits for) every process of pod `id`; returns how many there were.
pub fn kill_pod(run_dir: &Path, id: &str) -> usize {
    let procs: Vec<Marked> = scan(run_dir).into_iter().filter(|m| m.pod == id).collect();
    for m in &procs {
        tracing::info!(
            pod = id,
            pid = m.pid,
            "killing a process of an interrupted pod"
        );
        kill_wait(m.pid, m.start_time);
    }
    procs.len()
}

/// SIGKILLs every marked process whose pod `known` does not know; returns those pods.
pub fn kill_unknown(run_dir: &Path, known: &dyn Fn(&str) -> bool) -> BTreeSet<String> {
    let mut pods = BTreeSet::new();
    for m in scan(run_dir) {
        if known(&m.pod) {
            continue;
        }
        tracing::warn!(pod = %m.pod, pid = m.pid, "killing a process of a pod huskd has no record of");
        kill_wait(m.pid, m.start_time);
        pods.insert(m.pod);
    }
    pods
}

/// Whether fault-injection variable `var` (read once into `at`) names `point`.
fn armed(at: &OnceLock<Option<String>>, var: &str, point: &str) -> bool {
    at.get_or_init(|| std::env::var(var).ok()).as_deref() == Some(point)
}

/// Kills huskd with SIGKILL when `HUSK_TEST_CRASH_AT` names `point` (a fault-injection
/// hook for the crash-recovery tests; unset, it costs one cached comparison).
pub fn crash_point(point: &str) {
    static AT: OnceLock<Option<String>> = OnceLock::new();
    if armed(&AT, "HUSK_TEST_CRASH_AT", point) {
        tracing::warn!(point, "HUSK_TEST_CRASH_AT: killing huskd");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}

/// Kills the pod's agent process `pid` (a VM's VMM) with SIGKILL when
/// `HUSK_TEST_KILL_AGENT_AT` names `point`: a guest that dies in the middle of a call
/// (fault injection for the tests; unset, one cached comparison).
pub fn kill_agent_point(point: &str, pid: i32) {
    static AT: OnceLock<Option<String>> = OnceLock::new();
    if armed(&AT, "HUSK_TEST_KILL_AGENT_AT", point) {
        tracing::warn!(
            point,
            pid,
            "HUSK_TEST_KILL_AGENT_AT: killing the agent's process"
        );
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_and_kills_only_its_own_marked_processes() {
        let run = tempfile::tempdir().expect("tempdir");
        let other = tempfile::tempdir().expect("tempdir");
        let spawn = |id: &str, dir: &Path| {
            let mut c = Command::new("sleep");
            c.arg("60");
            mark(&mut c, id, dir);
            c.spawn().expect("sleep")
        };
        let mut mine = spawn("abc123", run.path());
        let mut theirs = spawn("abc123", other.path());
        let mut unknown = spawn("def456", run.path());
        // spawn() returns once the child replaced its memory (vfork's release), which can
        // be before execve set up the new environment: /proc/PID/environ is empty until
        // then. Scan until both of ours show their marker (a busy host took a while).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let found = loop {
            let found = scan(run.path());
            let seen = |pid: u32| found.iter().any(|m| m.pid == pid as i32);
            if (seen(mine.id()) && seen(unknown.id())) || std::time::Instant::now() > deadline {
                break found;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        assert!(
            found
                .iter()
                .any(|m| m.pid == mine.id() as i32 && m.pod == "abc123")
        );
        assert!(
            found
                .iter()
                .any(|m| m.pid == unknown.id() as i32 && m.pod == "def456")
        );
        assert!(!found.iter().any(|m| m.pid == theirs.id() as i32));

        let killed = kill_unknown(run.path(), &|p| p == "abc123");
        assert_eq!(
            killed.into_iter().collect::<Vec<_>>(),
            vec!["def456".to_string()]
        );
        assert!(
            unknown.try_wait().expect("wait").is_some(),
            "unknown pod's process killed"
        );
        assert!(
            mine.try_wait().expect("wait").is_none(),
            "known pod's process kept"
        );
        assert_eq!(kill_pod(run.path(), "abc123"), 1);
        assert!(mine.try_wait().expect("wait").is_some());
        assert!(
            theirs.try_wait().expect("wait").is_none(),
            "another huskd's pod untouched"
        );
        let _ = theirs.kill();
        let _ = theirs.wait();
    }
}

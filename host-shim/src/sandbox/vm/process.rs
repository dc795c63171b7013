//! The VM sandbox's host processes (VMM, vhost-user servers): started detached in their own
//! session so they outlive huskd, placed in the pod's host cgroup, waited for, killed; and
//! the tail of their logs for error messages (`helper_log`).

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::super::RuntimeError;
use super::super::helper_log::{tail, without_backtraces};
use super::super::kind::{proc_alive, start_time};
use super::super::state::ProcRef;
use super::HELPER_WAIT;

/// Waits for a vhost-user server's socket (or its early exit).
pub(super) fn wait_socket(
    p: &ProcRef,
    sock: &Path,
    log: &Path,
    what: &str,
) -> Result<(), RuntimeError> {
    let t = Instant::now();
    while !sock.exists() {
        if !proc_alive(p.pid, p.start_time) || t.elapsed() > HELPER_WAIT {
            return Err(RuntimeError::Internal(format!(
                "husk-vmm vhost-user {what} did not start: {}",
                tail(log, 5)
            )));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// Spawns `cmd` in its own session with stdout+stderr to `log`; a thread
/// reaps it while this huskd lives (init does after a restart).
pub(super) fn spawn_detached(mut cmd: Command, log: &Path) -> Result<ProcRef, RuntimeError> {
    let f = std::fs::File::create(log)
        .map_err(|e| RuntimeError::Internal(format!("{}: {e}", log.display())))?;
    let f2 = f
        .try_clone()
        .map_err(|e| RuntimeError::Internal(format!("{}: {e}", log.display())))?;
    without_backtraces(&mut cmd)
        .stdin(Stdio::null())
        .stdout(f)
        .stderr(f2);
    // SAFETY: setsid(2) is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut child = cmd
        .spawn()
        .map_err(|e| RuntimeError::FailedPrecondition(format!("start {program}: {e}")))?;
    let pid = child.id() as i32;
    std::thread::spawn(move || {
        let _ = child.wait();
    });
    Ok(ProcRef {
        pid,
        start_time: start_time(pid).unwrap_or(0),
    })
}

/// SIGKILL (if still running), then wait up to 5 s for it to be gone.
pub(super) fn kill_wait(r: &ProcRef) {
    super::super::kind::kill_wait(r.pid, r.start_time);
}

/// Moves `pid` into `<hierarchy>/<parent>` of every host cgroup hierarchy
/// that accounts resources (v1: cpu, cpuacct, memory, pids, blkio; v2: the
/// unified tree), creating the directories.
pub(super) fn place_in_cgroup(pid: i32, parent: &str) -> std::io::Result<()> {
    let parent = parent.trim_matches('/');
    let root = Path::new("/sys/fs/cgroup");
    let mut dirs = vec![];
    if root.join("cgroup.procs").exists() {
        dirs.push(root.join(parent));
    } else {
        for e in std::fs::read_dir(root)?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let wanted = name
                .split(',')
                .any(|c| matches!(c, "cpu" | "cpuacct" | "memory" | "pids" | "blkio"));
            if wanted && e.path().join("cgroup.procs").exists() && !e.path().is_symlink() {
                dirs.push(e.path().join(parent));
            }
        }
    }
    for d in dirs {
        std::fs::create_dir_all(&d)?;
        std::fs::write(d.join("cgroup.procs"), pid.to_string())?;
    }
    Ok(())
}

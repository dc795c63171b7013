//! The VM sandbox's host processes (VMM, vhost-user servers): started detached in their own
//! session so they outlive huskd, placed in the pod's host cgroup, waited for, killed; and
//! the tail of their logs for error messages (`helper_log`).

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::super::error::RuntimeError;
use super::super::helper_log::{tail, without_backtraces};
use super::super::kind::{proc_alive, start_time};
use super::super::state::ProcRef;
use super::{HELPER_WAIT, VmError};

/// Waits for a vhost-user server's socket (or its early exit).
pub(super) fn wait_socket(
    p: &ProcRef,
    sock: &Path,
    log: &Path,
    what: &'static str,
) -> Result<(), RuntimeError> {
    let t = Instant::now();
    while !sock.exists() {
        if !proc_alive(p.pid, p.start_time) || t.elapsed() > HELPER_WAIT {
            return Err(VmError::HelperStart {
                server: what,
                log: tail(log, 5),
            }
            .into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// Bytes each VM pod log (console, VMM, helpers) keeps, over two files, by default
/// (`runtime.vm.log_max_bytes`; `husk-vmm log-writer`'s default): the guest fills the console
/// at will.
pub const LOG_MAX_BYTES: u64 = crate::config::DEFAULT_LOG_MAX_BYTES;
/// Most logs one writer takes.
const MAX_LOGS: usize = 8;
/// Fds a writer inherits: a pipe and two files per log.
const MAX_FDS: usize = 3 * MAX_LOGS;

/// The pod's log writer (`husk-vmm log-writer`) and the write ends of its
/// pipes, by log file name. Dropping it closes huskd's copies of the write
/// ends: the writer exits once the processes holding the others are gone.
pub(super) struct PodLogs {
    pub proc: ProcRef,
    pipes: Vec<(&'static str, OwnedFd)>,
}

impl PodLogs {
    /// Starts `vmm log-writer` with one pipe per name in `names`, writing
    /// `dir/<name>` (capped at `max_bytes`, rotated to `<name>.1`). huskd opens both
    /// files of every log and hands them over with the pipes: the writer runs jailed as the
    /// pod's `uid` (when set) and reaches no directory.
    pub fn start(
        vmm: &Path,
        dir: &Path,
        names: &[&'static str],
        max_bytes: u64,
        uid: Option<u32>,
        mark: impl FnOnce(&mut Command),
    ) -> Result<Self, RuntimeError> {
        use std::os::unix::fs::OpenOptionsExt;
        let err = |e: std::io::Error| RuntimeError::from(VmError::LogPipes(e));
        if names.len() > MAX_LOGS {
            return Err(VmError::TooManyLogs.into());
        }
        // What the writer inherits, in fd order from 3: pipe, current file, previous file.
        let mut inherit: Vec<OwnedFd> = Vec::new();
        let mut pipes = Vec::new();
        let mut cmd = super::jail::command(vmm, uid, dir, vmm, &super::jail::Jailed::default());
        cmd.arg("log-writer")
            .args(["--max-bytes", &max_bytes.to_string()]);
        mark(&mut cmd);
        for name in names {
            let (r, w) = std::io::pipe().map_err(err)?;
            let path = dir.join(name);
            let open = |p: &Path| {
                std::fs::OpenOptions::new()
                    .read(true)
                    .append(true)
                    .create(true)
                    .truncate(false)
                    .mode(0o640)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(p)
                    .map(OwnedFd::from)
                    .map_err(|source| {
                        RuntimeError::from(VmError::LogFile {
                            path: p.to_path_buf(),
                            source,
                        })
                    })
            };
            let n = 3 + inherit.len() as i32;
            cmd.arg(format!("{n}:{}:{}", n + 1, n + 2));
            inherit.push(OwnedFd::from(r));
            inherit.push(open(&path)?);
            let mut old = path.clone().into_os_string();
            old.push(".1");
            inherit.push(open(Path::new(&old))?);
            pipes.push((*name, OwnedFd::from(w)));
        }
        let count = inherit.len();
        let mut raw = [0i32; MAX_FDS];
        for (r, f) in raw.iter_mut().zip(&inherit) {
            *r = f.as_raw_fd();
        }
        // SAFETY: between fork and exec only fcntl(2) and dup2(2) run, on
        // stack arrays (async-signal-safe, no allocation); the source fds stay
        // open in the parent until spawn returns (`inherit` lives past it).
        unsafe {
            cmd.pre_exec(move || {
                // Copy the sources above the targets first so no dup2 clobbers
                // a source that is still to be copied; the copies are
                // close-on-exec, the targets (dup2) are not.
                let base = 3 + count as i32;
                let mut high = [0i32; MAX_FDS];
                for i in 0..count {
                    high[i] = libc::fcntl(raw[i], libc::F_DUPFD_CLOEXEC, base);
                    if high[i] < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                for (i, h) in high.iter().enumerate().take(count) {
                    if libc::dup2(*h, 3 + i as i32) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let null = || {
            std::fs::File::open("/dev/null")
                .map(OwnedFd::from)
                .map_err(err)
        };
        let proc = spawn_detached(cmd, null()?, null()?)?;
        drop(inherit);
        Ok(Self { proc, pipes })
    }

    /// A write end for log `name` (for a process's stdout or stderr).
    pub fn sink(&self, name: &str) -> Result<OwnedFd, RuntimeError> {
        let (_, fd) = self
            .pipes
            .iter()
            .find(|(n, _)| *n == name)
            .ok_or_else(|| VmError::NoLogPipe(name.to_string()))?;
        fd.try_clone().map_err(|source| {
            VmError::LogPipe {
                name: name.to_string(),
                source,
            }
            .into()
        })
    }
}

/// Spawns `cmd` in its own session with stdout and stderr to the given fds
/// (pipes to the pod's log writer); a thread reaps it while this huskd lives
/// (init does after a restart).
pub(super) fn spawn_detached(
    mut cmd: Command,
    stdout: OwnedFd,
    stderr: OwnedFd,
) -> Result<ProcRef, RuntimeError> {
    without_backtraces(&mut cmd)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr);
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
        .map_err(|source| VmError::Spawn { program, source })?;
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
        enable_v2_controllers(root, parent)?;
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

/// A cgroup's CPU weight against its siblings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuWeight {
    /// The least there is (v1 `cpu.shares` 2, v2 `cpu.weight` 1): runs on what its
    /// siblings leave.
    Background,
    /// The kernel's default (v1 1024, v2 100).
    Default,
}

/// Sets the CPU weight of `<hierarchy>/<parent>` (v1: the cpu hierarchy; v2: the unified
/// tree, the cpu controller enabled on the way), creating the directories.
pub(super) fn set_cpu_weight(parent: &str, weight: CpuWeight) -> std::io::Result<()> {
    let parent = parent.trim_matches('/');
    let root = Path::new("/sys/fs/cgroup");
    let (dir, file, value) = if root.join("cgroup.procs").exists() {
        enable_v2_controllers(root, parent)?;
        let v = match weight {
            CpuWeight::Background => "1",
            CpuWeight::Default => "100",
        };
        (root.join(parent), "cpu.weight", v)
    } else {
        let v = match weight {
            CpuWeight::Background => "2",
            CpuWeight::Default => "1024",
        };
        (root.join("cpu").join(parent), "cpu.shares", v)
    };
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join(file), value)
}

/// Controllers a pod's v2 cgroup accounts with (memory.current, cpu.stat, pids.current, io.stat).
const V2_CONTROLLERS: [&str; 4] = ["cpu", "memory", "pids", "io"];

/// cgroup v2: creates each ancestor of `root/parent` below the root and enables in its
/// `cgroup.subtree_control` the [`V2_CONTROLLERS`] it has, so the pod cgroup gets its
/// memory, cpu, pids and io files (a v2 cgroup only has those its parent enables for its
/// children; the root's are the init system's).
fn enable_v2_controllers(root: &Path, parent: &str) -> std::io::Result<()> {
    let comps: Vec<&str> = parent.split('/').filter(|c| !c.is_empty()).collect();
    let mut dir = root.to_path_buf();
    for (i, comp) in comps.iter().enumerate() {
        if i > 0 {
            let have = std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
            let want: Vec<String> = V2_CONTROLLERS
                .iter()
                .filter(|c| have.split_whitespace().any(|h| h == **c))
                .map(|c| format!("+{c}"))
                .collect();
            if !want.is_empty()
                && let Err(e) = std::fs::write(dir.join("cgroup.subtree_control"), want.join(" "))
            {
                tracing::warn!(dir = %dir.display(), "cgroup v2: cannot enable {want:?}: {e}");
            }
        }
        dir.push(comp);
        if !dir.is_dir() {
            std::fs::create_dir(&dir)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod v2_tests {
    use super::*;

    #[test]
    fn v2_ancestors_below_the_root_enable_the_pod_controllers() {
        let root = tempfile::tempdir().unwrap();
        let husk = root.path().join("husk");
        std::fs::create_dir(&husk).unwrap();
        std::fs::write(
            husk.join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .unwrap();
        enable_v2_controllers(root.path(), "/husk/pod1/").unwrap();
        assert_eq!(
            std::fs::read_to_string(husk.join("cgroup.subtree_control")).unwrap(),
            "+cpu +memory +pids +io"
        );
        assert!(husk.join("pod1").is_dir());
        // The root's subtree_control is left to the init system.
        assert!(!root.path().join("cgroup.subtree_control").exists());
    }
}

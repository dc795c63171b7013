//! The container runner: the code that runs in a freshly exec'd, single-threaded
//! `husk-agent __init` process (never in the multi-threaded agent), so it may
//! fork, unshare and set up a container freely.
//!
//! Protocol with the agent (see [`crate::container::spawn`]):
//! - fd `INIT_FD`: the [`InitConfig`] as JSON, read to EOF.
//! - fd `SYNC_FD`: newline-delimited [`SyncMsg`] to the agent. The stage that
//!   unshares/joins namespaces forks; the parent reports the child's pid and
//!   exits (the agent is the subreaper and inherits the child). The child
//!   reports `Ready`, or `Error` on failure. The fd is close-on-exec, so EOF
//!   after start means the exec succeeded.
//! - fd `START_FD` (containers only): one byte from the agent = start.

pub mod caps;
pub mod config;
pub mod console;
pub mod exec;
pub mod rootfs;
pub mod seccomp;
mod syscall_table;
mod syscall_table_i386;
pub mod user;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};

pub use config::{InitConfig, InitMode, Ns, NsJoin, RootfsMount};
use nix::sched::CloneFlags;
use nix::unistd::{ForkResult, Pid};
use serde::{Deserialize, Serialize};

use crate::syscall::{LinuxSyscall, Syscall, SyscallError};

/// Env var with the runner's fds: "INIT,SYNC,START,CONSOLE" (-1 when absent).
pub const FDS_ENV: &str = "_HUSK_RUNNER_FDS";
/// argv[1] of the runner.
pub const INIT_ARG: &str = "__init";
/// argv[1] of a pooled VM's rehearsal container (`sandbox::rehearsal`): exits 0.
pub const REHEARSAL_ARG: &str = "__rehearsal";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncMsg {
    Pid(i32),
    /// Where a container's runner spent its time before Ready: (stage, µs since the
    /// runner started), sent just before Ready (the agent logs it).
    Stages(Vec<(String, u64)>),
    Ready,
    /// `invalid`: caused by the request (bad spec, missing binary, unknown user).
    Error {
        invalid: bool,
        message: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error("read init config: {0}")]
    Config(String),
    #[error(transparent)]
    Sys(#[from] SyscallError),
    #[error("{0}: {1}")]
    Os(&'static str, #[source] nix::Error),
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    #[error("rootfs: {0}")]
    Rootfs(#[from] rootfs::RootfsError),
    #[error("user: {0}")]
    User(#[from] user::UserError),
    #[error("capabilities: {0}")]
    Caps(#[from] caps::CapsError),
    #[error("seccomp: {0}")]
    Seccomp(#[from] seccomp::SeccompError),
    #[error("exec: {0}")]
    Exec(#[from] exec::ExecError),
    #[error("console: {0}")]
    Console(#[from] console::ConsoleError),
    #[error("a tty was asked for but no console socket was passed")]
    NoConsole,
    #[error("not started")]
    NotStarted,
}

struct Sync {
    file: File,
}

/// The runner's stages so far: (name, µs since `runner::main` began). The runner is
/// single-threaded; a forked child keeps the list and the clock (same memory).
static STAGES: std::sync::Mutex<Vec<(&'static str, u64)>> = std::sync::Mutex::new(Vec::new());

/// More marks than any runner makes (a bound, not a budget).
const MAX_STAGES: usize = 64;

/// When `runner::main` began.
static STARTED: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();

/// Marks the end of a runner stage (sent to the agent before Ready, which logs it).
pub(crate) fn mark(name: &'static str) {
    let since = STARTED.get_or_init(std::time::Instant::now).elapsed();
    if let Ok(mut s) = STAGES.lock()
        && s.len() < MAX_STAGES
    {
        s.push((name, since.as_micros() as u64));
    }
}

fn take_stages() -> Vec<(String, u64)> {
    STAGES
        .lock()
        .map(|mut s| s.drain(..).map(|(n, t)| (n.to_string(), t)).collect())
        .unwrap_or_default()
}

impl Sync {
    fn send(&mut self, msg: &SyncMsg) {
        if let Ok(mut line) = serde_json::to_vec(msg) {
            line.push(b'\n');
            // Nothing to do if the agent went away.
            let _ = self.file.write_all(&line);
        }
    }
}

impl RunnerError {
    /// Errors caused by the request rather than the machine.
    pub fn is_invalid(&self) -> bool {
        matches!(
            self,
            RunnerError::Rootfs(
                rootfs::RootfsError::MissingSource(_)
                    | rootfs::RootfsError::RelativeDestination(_)
                    | rootfs::RootfsError::Sysctl(_)
                    | rootfs::RootfsError::Device(_)
                    | rootfs::RootfsError::BadMount(_),
            ) | RunnerError::User(_)
                | RunnerError::Caps(caps::CapsError::Unknown(_))
                | RunnerError::Exec(
                    exec::ExecError::NoArgs
                        | exec::ExecError::NotFound(_)
                        | exec::ExecError::NotExecutable(_)
                        | exec::ExecError::Cwd(..)
                        | exec::ExecError::User(_)
                )
                | RunnerError::Seccomp(
                    seccomp::SeccompError::Action(_) | seccomp::SeccompError::ArgIndex(_)
                )
        )
    }
}

fn fds() -> [RawFd; 4] {
    let v: Vec<RawFd> = std::env::var(FDS_ENV)
        .unwrap_or_default()
        .split(',')
        .map(|s| s.parse().unwrap_or(-1))
        .collect();
    std::array::from_fn(|i| v.get(i).copied().unwrap_or(-1))
}

/// Mark every fd above stderr close-on-exec except `keep`, so nothing of the
/// agent leaks into a container.
fn cloexec_others(keep: &[RawFd]) {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<RawFd> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    for fd in fds.into_iter().filter(|fd| *fd > 2 && !keep.contains(fd)) {
        // SAFETY: F_SETFD on an fd number; harmless if it was the dir's own fd.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
}

/// The agent starts the runner with `ADDR_NO_RANDOMIZE` (the same layout in every runner,
/// see `container::spawn`); the flag is inherited over execve, so the runner clears it before
/// it execs anything: container processes and exec'd commands get ASLR as usual. (The pod's
/// namespace holder is started without the flag: it lives as long as the pod.)
pub fn restore_aslr() {
    // SAFETY: personality with 0xffffffff only reads the persona.
    let persona = unsafe { libc::personality(0xffff_ffff) };
    let no_aslr = libc::ADDR_NO_RANDOMIZE;
    if persona >= 0 && persona & no_aslr != 0 {
        // SAFETY: personality with a persona value; clears one flag.
        unsafe { libc::personality((persona & !no_aslr) as libc::c_ulong) };
    }
}

/// Entry point of `husk-agent __init`. Never returns.
pub fn main() -> ! {
    STARTED.get_or_init(std::time::Instant::now);
    restore_aslr();
    let [init_fd, sync_fd, start_fd, console_fd] = fds();
    if init_fd < 0 || sync_fd < 0 {
        eprintln!("husk-agent {INIT_ARG} is started by the agent, not by hand");
        std::process::exit(2);
    }
    // Everything above stderr, ours included, closes on the container's execve:
    // the agent reads EOF on the sync pipe as "exec succeeded".
    cloexec_others(&[]);
    // Not dumpable until execve: processes already in the container must not
    // reach this host binary through /proc/PID/exe (the runc CVE-2019-5736
    // pattern). execve of the container's binary makes the process dumpable again.
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    let mut sync = Sync {
        // SAFETY: the agent passed these fds to us (spawn.rs); we take ownership once.
        file: unsafe { File::from_raw_fd(sync_fd) },
    };
    // SAFETY: as above.
    let init = unsafe { File::from_raw_fd(init_fd) };
    // SAFETY: as above.
    let start = (start_fd >= 0).then(|| unsafe { File::from_raw_fd(start_fd) });
    // SAFETY: as above.
    let console =
        (console_fd >= 0).then(|| unsafe { std::os::fd::OwnedFd::from_raw_fd(console_fd) });
    let code = match run(&mut sync, init, start, console) {
        Ok(()) => 0,
        Err(e) => {
            sync.send(&SyncMsg::Error {
                invalid: e.is_invalid(),
                message: e.to_string(),
            });
            1
        }
    };
    std::process::exit(code)
}

fn run(
    sync: &mut Sync,
    mut init: File,
    start: Option<File>,
    console: Option<std::os::fd::OwnedFd>,
) -> Result<(), RunnerError> {
    let mut buf = Vec::new();
    init.read_to_end(&mut buf)
        .map_err(|e| RunnerError::Config(e.to_string()))?;
    drop(init);
    let config: InitConfig =
        serde_json::from_slice(&buf).map_err(|e| RunnerError::Config(e.to_string()))?;
    let sys = LinuxSyscall;
    mark("config");

    // Join the cgroups first so everything below is accounted.
    for procs in &config.cgroup_procs {
        sys.write_file(procs, b"0")?;
    }
    mark("cgroup");
    // Open every namespace before joining any: joining the mount namespace
    // changes what /proc/PID/ns paths resolve to.
    let mut joins = Vec::new();
    for j in &config.join {
        let file = File::open(&j.path)
            .map_err(|e| RunnerError::Io(format!("open {}", j.path.display()), e))?;
        joins.push((file, j.ns));
    }
    joins.sort_by_key(|(_, ns)| *ns == Ns::Mnt);
    for (file, ns) in &joins {
        nix::sched::setns(file, ns.flag()).map_err(|e| RunnerError::Os("setns", e))?;
    }
    drop(joins);
    let mut flags = CloneFlags::empty();
    for ns in &config.unshare {
        flags |= ns.flag();
    }
    if !flags.is_empty() {
        sys.unshare(flags)?;
    }
    mark("namespaces");

    // SAFETY: this process is single-threaded (fresh exec, no runtime started).
    match unsafe { nix::unistd::fork() }.map_err(|e| RunnerError::Os("fork", e))? {
        ForkResult::Parent { child } => {
            sync.send(&SyncMsg::Pid(child.as_raw()));
            std::process::exit(0);
        }
        ForkResult::Child => {}
    }
    mark("fork");
    match config.mode {
        InitMode::Container(c) => {
            exec::prepare_session();
            rootfs::setup(&sys, &c.spec, &c.rootfs, &c.rootfs_dir, &c.host_devices)?;
            mark("rootfs");
            if c.tty {
                console::setup(console.as_ref().ok_or(RunnerError::NoConsole)?)?;
            }
            drop(console);
            let plan = exec::prepare_process(
                c.spec.process().as_ref(),
                c.spec.linux().as_ref(),
                &c.extra_env,
            )?;
            exec::drop_privileges(&plan)?;
            mark("process");
            sync.send(&SyncMsg::Stages(take_stages()));
            sync.send(&SyncMsg::Ready);
            let mut start = start.ok_or(RunnerError::NotStarted)?;
            let mut byte = [0u8; 1];
            if start
                .read(&mut byte)
                .map_err(|e| RunnerError::Io("wait for start".into(), e))?
                != 1
            {
                return Err(RunnerError::NotStarted);
            }
            drop(start);
            exec::exec(&plan)?;
            Ok(())
        }
        InitMode::Exec(e) => {
            exec::prepare_session();
            if e.tty {
                console::setup(console.as_ref().ok_or(RunnerError::NoConsole)?)?;
            }
            drop(console);
            let plan = exec::prepare_process(Some(&e.process), e.linux.as_ref(), &[])?;
            exec::drop_privileges(&plan)?;
            sync.send(&SyncMsg::Ready);
            exec::exec(&plan)?;
            Ok(())
        }
        InitMode::Pause(p) => pause(&sys, sync, &p),
    }
}

/// The sandbox's namespace holder: sets hostname, brings up loopback, reaps
/// orphans of its PID namespace and sleeps until SIGTERM/SIGKILL.
fn pause(sys: &dyn Syscall, sync: &mut Sync, p: &config::PauseInit) -> Result<(), RunnerError> {
    if let Some(h) = &p.hostname {
        sys.sethostname(h)?;
    }
    if p.loopback_up {
        exec::loopback_up().map_err(|e| RunnerError::Io("loopback up".into(), e))?;
    }
    // Detach from the agent's stdio (already /dev/null) and session.
    let _ = nix::unistd::setsid();
    sync.send(&SyncMsg::Ready);
    // Close the sync fd so the agent sees EOF.
    // (dup2 /dev/null over it: the fd number stays valid for Sync's drop.)
    if let Ok(null) = File::open("/dev/null") {
        // SAFETY: both fds are open; dup2 atomically replaces the sync pipe end.
        unsafe { libc::dup2(null.as_raw_fd(), sync.file.as_raw_fd()) };
    }
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.add(Signal::SIGCHLD);
    set.thread_block()
        .map_err(|e| RunnerError::Os("sigprocmask", e))?;
    loop {
        match set.wait() {
            Ok(Signal::SIGCHLD) => {
                while let Ok(status) = nix::sys::wait::waitpid(
                    Pid::from_raw(-1),
                    Some(nix::sys::wait::WaitPidFlag::WNOHANG),
                ) {
                    if status == nix::sys::wait::WaitStatus::StillAlive {
                        break;
                    }
                }
            }
            Ok(_) => std::process::exit(0),
            Err(_) => {}
        }
    }
}

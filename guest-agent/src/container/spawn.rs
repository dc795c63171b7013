//! Start a runner process (`husk-agent __init`) and follow its sync messages.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::fcntl::OFlag;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::pipe;

use super::stdio::ChildStdio;
use crate::reaper::{ExitWatch, Reaper};
use crate::runner::{FDS_ENV, INIT_ARG, InitConfig, SyncMsg};

/// How long a runner may take to set up before it is killed.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("{0}: {1}")]
    Io(&'static str, #[source] std::io::Error),
    #[error("{0}: {1}")]
    Os(&'static str, #[source] nix::Error),
    /// The runner reported a failure caused by the request (bad spec, missing binary).
    #[error("{0}")]
    Invalid(String),
    /// The runner failed for another reason.
    #[error("{0}")]
    Child(String),
    #[error("runner exited before it was ready")]
    Died,
    #[error("runner did not answer in time")]
    Timeout,
}

type Result<T> = std::result::Result<T, SpawnError>;

/// The sync channel from the runner.
pub struct SyncReader {
    lines: tokio::io::Lines<BufReader<pipe::Receiver>>,
}

impl SyncReader {
    async fn next(&mut self) -> Result<Option<SyncMsg>> {
        let line = tokio::time::timeout(SETUP_TIMEOUT, self.lines.next_line())
            .await
            .map_err(|_| SpawnError::Timeout)?
            .map_err(|e| SpawnError::Io("read sync", e))?;
        match line {
            None => Ok(None),
            Some(l) => serde_json::from_str(&l)
                .map(Some)
                .map_err(|e| SpawnError::Child(format!("bad sync message: {e}"))),
        }
    }

    /// Wait for the runner to exec (EOF) or fail.
    pub async fn wait_exec(&mut self) -> Result<()> {
        loop {
            match self.next().await? {
                None => return Ok(()),
                Some(SyncMsg::Error { invalid, message }) => return Err(error(invalid, message)),
                Some(_) => continue,
            }
        }
    }
}

fn error(invalid: bool, message: String) -> SpawnError {
    if invalid {
        SpawnError::Invalid(message)
    } else {
        SpawnError::Child(message)
    }
}

/// A runner that reported ready.
pub struct Spawned {
    /// The process that will exec the container's (or exec's) command.
    pub pid: i32,
    pub exit: ExitWatch,
    pub sync: SyncReader,
    /// Write one byte to start a container (None for exec/pause).
    pub start: Option<pipe::Sender>,
    /// A container runner's stages before Ready ("name=ms,…"; empty for others).
    pub stages: String,
}

fn cloexec_pipe() -> Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| SpawnError::Os("pipe", e))
}

/// Spawn the runner with `config`, wait until it is ready.
pub async fn spawn(
    exe: &Path,
    reaper: &Reaper,
    config: &InitConfig,
    stdio: ChildStdio,
    with_start: bool,
) -> Result<Spawned> {
    let json =
        serde_json::to_vec(config).map_err(|e| SpawnError::Child(format!("encode config: {e}")))?;
    let (init_r, init_w) = cloexec_pipe()?;
    let (sync_r, sync_w) = cloexec_pipe()?;
    let (start_r, start_w) = if with_start {
        cloexec_pipe().map(|(r, w)| (Some(r), Some(w)))?
    } else {
        (None, None)
    };
    let child_fds: Vec<RawFd> = [
        Some(init_r.as_raw_fd()),
        Some(sync_w.as_raw_fd()),
        start_r.as_ref().map(AsRawFd::as_raw_fd),
        stdio.console.as_ref().map(AsRawFd::as_raw_fd),
    ]
    .into_iter()
    .map(|f| f.unwrap_or(-1))
    .collect();
    let fds_env = child_fds
        .iter()
        .map(|f| f.to_string())
        .collect::<Vec<_>>()
        .join(",");

    let mut cmd = Command::new(exe);
    cmd.arg(INIT_ARG)
        .env_clear()
        .env(FDS_ENV, fds_env)
        .stdin(Stdio::from(stdio.stdin))
        .stdout(Stdio::from(stdio.stdout))
        .stderr(Stdio::from(stdio.stderr));

    if let Ok(filter) = std::env::var("RUST_LOG") {
        cmd.env("RUST_LOG", filter);
    }
    let keep = child_fds.clone();
    // A pod's namespace holder lives as long as the pod and runs once per VM: it keeps ASLR.
    let fixed_layout = !matches!(config.mode, crate::runner::InitMode::Pause(_));
    // SAFETY: only fcntl and personality (async-signal-safe) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            for fd in keep.iter().copied().filter(|f| *f >= 0) {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // The runner is laid out at the same addresses every time: under TCG, QEMU
            // keeps translated code per virtual address, so a runner at a random base
            // re-translated all of its code in every container start (its first stages
            // took ≈ 60–110 ms instead of ≈ 15–35). The runner gives ASLR back to what it execs
            // (`runner::restore_aslr`); the agent itself keeps its own.
            if fixed_layout {
                libc::personality(libc::ADDR_NO_RANDOMIZE as libc::c_ulong);
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|e| SpawnError::Io("spawn runner", e))?;
    drop(stdio.console);
    // The intermediate exits right after forking; its exit is not interesting.
    drop(reaper.register(child.id() as i32));
    drop(child);
    drop((init_r, sync_w, start_r));

    let mut init =
        pipe::Sender::from_owned_fd(init_w).map_err(|e| SpawnError::Io("init pipe", e))?;
    let receiver =
        pipe::Receiver::from_owned_fd(sync_r).map_err(|e| SpawnError::Io("sync pipe", e))?;
    let mut sync = SyncReader {
        lines: BufReader::new(receiver).lines(),
    };
    let start = start_w
        .map(pipe::Sender::from_owned_fd)
        .transpose()
        .map_err(|e| SpawnError::Io("start pipe", e))?;
    // A runner that died early closes its end: ignore EPIPE, the sync channel says why.
    let _ = tokio::time::timeout(SETUP_TIMEOUT, async {
        init.write_all(&json).await?;
        init.shutdown().await
    })
    .await;
    drop(init);

    // The intermediate reports the pid and the child reports ready; both write
    // to the same pipe, so either may come first.
    let mut pid: Option<(i32, ExitWatch)> = None;
    let mut ready = false;
    let mut stages = String::new();
    let result = loop {
        if pid.is_some() && ready {
            break Ok(());
        }
        match sync.next().await {
            Ok(Some(SyncMsg::Pid(p))) => pid = Some((p, reaper.register(p))),
            Ok(Some(SyncMsg::Ready)) => ready = true,
            Ok(Some(SyncMsg::Stages(s))) => {
                stages = s
                    .iter()
                    .map(|(n, us)| format!("{n}={}", us / 1000))
                    .collect::<Vec<_>>()
                    .join(",");
            }
            Ok(Some(SyncMsg::Error { invalid, message })) => break Err(error(invalid, message)),
            Ok(None) => break Err(SpawnError::Died),
            Err(e) => break Err(e),
        }
    };
    match (result, pid) {
        (Ok(()), Some((pid, exit))) => Ok(Spawned {
            pid,
            exit,
            sync,
            start,
            stages,
        }),
        (Err(e), Some((pid, _))) => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            Err(e)
        }
        (Err(e), None) => Err(e),
        (Ok(()), None) => Err(SpawnError::Child("no pid reported".into())),
    }
}

impl Spawned {
    /// Let a created container exec its process; Ok once execve succeeded.
    pub async fn start(start: Option<pipe::Sender>, sync: &mut SyncReader) -> Result<()> {
        if let Some(mut s) = start {
            s.write_all(b"s")
                .await
                .map_err(|e| SpawnError::Io("start", e))?;
        }
        sync.wait_exec().await
    }
}

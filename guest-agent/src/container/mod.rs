//! Containers and their processes. One file per operation.

pub mod create;
pub mod exec;
pub mod remove;
pub mod signal;
pub mod spawn;
pub mod start;
pub mod stats;
pub mod stdio;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::SystemTime;

use oci_spec::runtime::Spec;
use tokio::net::unix::pipe;

use crate::cgroup::Cgroup;
use crate::error::{AgentError, Result};
use crate::reaper::{ExitStatus, ExitWatch};
use crate::sync::lock;
use spawn::SyncReader;
use stdio::ProcessIo;

/// OCI container states the agent distinguishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Set up, waiting for StartContainer.
    Created,
    Running,
    Stopped,
}

/// A process: the container's init or an exec.
pub struct Process {
    pub exec_id: String,
    pub pid: i32,
    pub io: ProcessIo,
    exit: ExitWatch,
    pub started_at: Mutex<Option<SystemTime>>,
}

impl Process {
    pub fn new(exec_id: String, pid: i32, io: ProcessIo, exit: ExitWatch) -> Self {
        Self {
            exec_id,
            pid,
            io,
            exit,
            started_at: Mutex::new(None),
        }
    }

    pub fn exited(&self) -> Option<ExitStatus> {
        *self.exit.borrow()
    }

    /// Wait for the exit (cancel-safe).
    pub async fn wait(&self) -> ExitStatus {
        let mut rx = self.exit.clone();
        match rx.wait_for(Option::is_some).await {
            Ok(s) => s.unwrap_or_else(unreachable_exit),
            // The reaper never drops a registered sender without sending.
            Err(_) => unreachable_exit(),
        }
    }
}

fn unreachable_exit() -> ExitStatus {
    ExitStatus {
        code: 255,
        signal: 0,
        at: SystemTime::now(),
    }
}

/// What CreateContainer prepared before starting.
pub struct Pending {
    pub start: Option<pipe::Sender>,
    pub sync: SyncReader,
}

pub struct Inner {
    pub status: Status,
    pub pending: Option<Pending>,
    pub execs: HashMap<String, Arc<Process>>,
    pub oom_seen: u64,
    pub oom_killed: bool,
}

pub struct Container {
    pub id: String,
    pub spec: Spec,
    /// State dir: upper/, work/, rootfs/.
    pub dir: PathBuf,
    pub cgroup: Cgroup,
    pub init: Arc<Process>,
    /// A block rootfs mounted by the agent (unmounted on remove).
    pub agent_mounts: Vec<PathBuf>,
    /// The container has its own PID namespace (killing init kills all).
    pub own_pid_ns: bool,
    pub created_at: SystemTime,
    pub inner: Mutex<Inner>,
}

impl Container {
    pub fn status(&self) -> Status {
        if self.init.exited().is_some() {
            return Status::Stopped;
        }
        lock(&self.inner).status
    }

    pub fn process(&self, exec_id: &str) -> Result<Arc<Process>> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        lock(&self.inner)
            .execs
            .get(exec_id)
            .cloned()
            .ok_or_else(|| AgentError::NotFound(format!("exec {exec_id} in container {}", self.id)))
    }

    /// True when the OOM kill counter went up since the last call.
    pub fn check_oom(&self) -> bool {
        let kills = self.cgroup.oom_kills();
        let mut inner = lock(&self.inner);
        if kills > inner.oom_seen {
            inner.oom_seen = kills;
            inner.oom_killed = true;
            return true;
        }
        false
    }

    pub fn oom_killed(&self) -> bool {
        lock(&self.inner).oom_killed
    }
}

/// Unix nanoseconds (0 for None).
pub fn unix_nanos(t: Option<SystemTime>) -> i64 {
    t.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

//! The one place that calls waitpid. The agent is PID 1 or a child subreaper,
//! so every container process (and every orphan) ends up here.
//!
//! Exit codes are never lost to a race: an exit that arrives before anyone
//! registered the pid is kept (for a while) and handed out on registration.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use tokio::sync::watch;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitStatus {
    /// exit code, or 128 + signal.
    pub code: i32,
    /// The killing signal, 0 for a normal exit.
    pub signal: i32,
    pub at: SystemTime,
}

/// Unclaimed exits are dropped after this long (orphans nobody waits for).
const UNCLAIMED_TTL: Duration = Duration::from_secs(120);

enum Slot {
    Waiting(watch::Sender<Option<ExitStatus>>),
    Exited(ExitStatus, Instant),
}

#[derive(Default)]
pub struct Reaper {
    slots: Mutex<HashMap<i32, Slot>>,
}

pub type ExitWatch = watch::Receiver<Option<ExitStatus>>;

impl Reaper {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Watch `pid`'s exit. Call as soon as the pid is known; an exit reaped
    /// before this call is still delivered.
    pub fn register(&self, pid: i32) -> ExitWatch {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        match slots.remove(&pid) {
            Some(Slot::Exited(status, _)) => watch::channel(Some(status)).1,
            Some(Slot::Waiting(tx)) => {
                let rx = tx.subscribe();
                slots.insert(pid, Slot::Waiting(tx));
                rx
            }
            None => {
                let (tx, rx) = watch::channel(None);
                slots.insert(pid, Slot::Waiting(tx));
                rx
            }
        }
    }

    /// Record an exit (public for tests).
    pub fn on_exit(&self, pid: i32, status: ExitStatus) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        match slots.remove(&pid) {
            Some(Slot::Waiting(tx)) => {
                let _ = tx.send(Some(status));
            }
            _ => {
                let now = Instant::now();
                slots.retain(|_, s| !matches!(s, Slot::Exited(_, t) if now.duration_since(*t) > UNCLAIMED_TTL));
                slots.insert(pid, Slot::Exited(status, now));
            }
        }
    }

    /// Reap every exited child without blocking.
    pub fn reap_all(&self) {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => {
                    tracing::debug!(pid = pid.as_raw(), code, "reaped");
                    self.on_exit(
                        pid.as_raw(),
                        ExitStatus {
                            code,
                            signal: 0,
                            at: SystemTime::now(),
                        },
                    );
                }
                Ok(WaitStatus::Signaled(pid, sig, _)) => {
                    tracing::debug!(pid = pid.as_raw(), ?sig, "reaped (signal)");
                    let signal = sig as i32;
                    self.on_exit(
                        pid.as_raw(),
                        ExitStatus {
                            code: 128 + signal,
                            signal,
                            at: SystemTime::now(),
                        },
                    );
                }
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    }

    /// Reap on every SIGCHLD (coalesced signals are one wake-up, and `reap_all` takes every
    /// exited child), plus a slow safety tick: an idle guest should not wake for the agent.
    pub async fn run(self: Arc<Self>) -> std::io::Result<()> {
        let mut sigchld = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())?;
        let mut tick = tokio::time::interval(Duration::from_secs(30));
        loop {
            tokio::select! {
                _ = sigchld.recv() => {}
                _ = tick.tick() => {}
            }
            self.reap_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: i32) -> ExitStatus {
        ExitStatus {
            code,
            signal: 0,
            at: SystemTime::now(),
        }
    }

    #[test]
    fn exit_before_register_is_kept() {
        let r = Reaper::default();
        r.on_exit(42, status(3));
        let rx = r.register(42);
        assert_eq!(rx.borrow().map(|s| s.code), Some(3));
        // Claimed exactly once: a new registration waits again.
        assert!(r.register(42).borrow().is_none());
    }

    #[test]
    fn register_before_exit_is_notified() {
        let r = Reaper::default();
        let rx1 = r.register(7);
        let rx2 = r.register(7);
        assert!(rx1.borrow().is_none());
        r.on_exit(7, status(0));
        assert_eq!(rx1.borrow().map(|s| s.code), Some(0));
        assert_eq!(rx2.borrow().map(|s| s.code), Some(0));
    }

    #[tokio::test]
    async fn reaps_a_real_child() {
        let r = Reaper::new();
        // SAFETY: fork in a test; the child only calls _exit.
        let pid = match unsafe { nix::unistd::fork() }.expect("fork") {
            // SAFETY: _exit is async-signal-safe.
            nix::unistd::ForkResult::Child => unsafe { libc::_exit(9) },
            nix::unistd::ForkResult::Parent { child } => child.as_raw(),
        };
        let mut rx = r.register(pid);
        let deadline = Instant::now() + Duration::from_secs(5);
        while rx.borrow().is_none() && Instant::now() < deadline {
            // Only reap our own child, other tests may fork too.
            if let Ok(WaitStatus::Exited(p, code)) =
                waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG))
            {
                r.on_exit(p.as_raw(), status(code));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let got = rx
            .wait_for(Option::is_some)
            .await
            .expect("exit")
            .map(|s| s.code);
        assert_eq!(got, Some(9));
    }
}

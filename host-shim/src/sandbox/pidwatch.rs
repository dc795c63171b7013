//! Waiting for a pod's processes to exit without polling: one pidfd per
//! process (`pidfd_open`, Linux ≥ 5.3), readable once that process has
//! exited. A pod's monitor used to read /proc for each of them four times a
//! second, which at 150 idle pods was most of what an idle huskd did.

use std::os::fd::{FromRawFd, OwnedFd};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use super::kind::proc_alive;
use super::state::ProcRef;

/// Exit notifications for a set of processes, each pinned by a pidfd.
pub struct ExitWatch {
    fds: Vec<AsyncFd<OwnedFd>>,
}

impl ExitWatch {
    /// Opens a pidfd for each process. Fails (the caller polls instead) when the
    /// kernel has no pidfd_open; a process that is already gone, or whose pid now
    /// belongs to another process (start time differs), counts as exited.
    pub fn new(procs: &[ProcRef]) -> std::io::Result<Self> {
        let mut fds = Vec::with_capacity(procs.len());
        for p in procs {
            // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
            let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, p.pid, 0) };
            if raw < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::ESRCH) {
                    return Ok(Self { fds: Vec::new() });
                }
                return Err(e);
            }
            // SAFETY: a non-negative result is a fresh fd that nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
            // The pidfd pins whatever process has this pid now: make sure that is
            // still the one huskd started (same start time, not a zombie).
            if !proc_alive(p.pid, p.start_time) {
                return Ok(Self { fds: Vec::new() });
            }
            // SAFETY: the OwnedFd is moved in and stays open, unchanged, for the AsyncFd's life.
            let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            fds.push(fd);
        }
        Ok(Self { fds })
    }

    /// Returns when any of the processes has exited (at once if one already has,
    /// or if the watch holds none).
    pub async fn any_exited(&self) {
        if self.fds.is_empty() {
            return;
        }
        // A readable pidfd means the process exited; an error on one (it cannot
        // be polled) is treated the same, so the caller looks for itself.
        let _ = futures::future::select_all(self.fds.iter().map(|f| Box::pin(f.readable()))).await;
    }

    /// How many processes are watched (0: one was already gone).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.fds.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::kind::start_time;
    use std::time::Duration;

    fn spawn_sleep() -> (std::process::Child, ProcRef) {
        let c = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        let pid = c.id() as i32;
        let st = start_time(pid).expect("start time");
        (
            c,
            ProcRef {
                pid,
                start_time: st,
            },
        )
    }

    #[tokio::test]
    async fn waits_until_one_of_the_processes_exits() {
        let (mut a, ra) = spawn_sleep();
        let (mut b, rb) = spawn_sleep();
        let w = ExitWatch::new(&[ra, rb]).expect("pidfd_open");
        assert_eq!(w.len(), 2);
        // Both alive: no exit reported.
        let early = tokio::time::timeout(Duration::from_millis(200), w.any_exited()).await;
        assert!(early.is_err(), "reported an exit while both run");
        b.kill().expect("kill");
        tokio::time::timeout(Duration::from_secs(5), w.any_exited())
            .await
            .expect("the exit of the second process was not seen");
        let _ = b.wait();
        a.kill().expect("kill");
        let _ = a.wait();
    }

    #[tokio::test]
    async fn a_reused_or_missing_pid_counts_as_exited() {
        let (mut a, mut ra) = spawn_sleep();
        // Another start time: the pid no longer belongs to the process we started.
        ra.start_time += 1;
        let w = ExitWatch::new(&[ra]).expect("watch");
        assert_eq!(w.len(), 0);
        tokio::time::timeout(Duration::from_millis(500), w.any_exited())
            .await
            .expect("reported at once");
        a.kill().expect("kill");
        let _ = a.wait();
        // A pid that does not exist at all.
        let w = ExitWatch::new(&[ProcRef {
            pid: i32::MAX - 1,
            start_time: 1,
        }])
        .expect("watch");
        assert_eq!(w.len(), 0);
    }
}

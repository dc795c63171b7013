//! OOM kills, as GetOomEvent reports them: the queue, and the inotify watch that
//! `Agent::oom_monitor` waits on.
//!
//! On cgroup v2 (the guest) the monitor is event driven: the kernel raises a
//! file-modified event on a cgroup's `memory.events` whenever one of its counters
//! changes, so the agent watches each container's file with inotify and reads the
//! counter only when it moved. An idle pod costs the guest no agent wake-ups at all
//! (a 2 Hz poll did, in every VM of a dense node). Cgroup v1 (the agent in host mode on
//! a v1 host) has no such file, and its containers are polled every `V1_POLL`.
//!
//! Status and Wait read the counter themselves (`Agent::refresh_oom`), so a missed
//! event would only delay GetOomEvent, never lose an `OOMKilled`.

use std::collections::VecDeque;
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;

use crate::sync::lock;

/// Kill events held for GetOomEvent; the oldest go first beyond this.
const QUEUE_MAX: usize = 1024;
/// How often containers without a `memory.events` file (cgroup v1) are polled.
pub const V1_POLL: Duration = Duration::from_millis(500);

/// OOM kills seen by the monitor, waiting for GetOomEvent.
#[derive(Default)]
pub struct OomQueue {
    events: Mutex<VecDeque<String>>,
    notify: Notify,
}

impl OomQueue {
    pub fn push(&self, id: String) {
        let mut q = lock(&self.events);
        if q.len() >= QUEUE_MAX {
            q.pop_front();
        }
        q.push_back(id);
        drop(q);
        self.notify.notify_one();
    }

    /// Cancel-safe: an event is removed only when returned.
    pub async fn next(&self) -> String {
        loop {
            let notified = self.notify.notified();
            if let Some(id) = lock(&self.events).pop_front() {
                return id;
            }
            notified.await;
        }
    }
}

/// An inotify instance watching `memory.events` files for modification.
pub struct EventsWatch {
    fd: AsyncFd<OwnedFd>,
}

impl EventsWatch {
    pub fn new() -> std::io::Result<Self> {
        // SAFETY: inotify_init1 takes flags only; a non-negative result is a new fd we own.
        let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh, valid fd owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: the OwnedFd is moved in and stays open, unchanged, for the AsyncFd's life.
        let fd =
            unsafe { AsyncFd::register(fd) }.map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(Self { fd })
    }

    /// Watch one file; the watch goes away (IN_IGNORED) when the file does.
    pub fn add(&self, file: &Path) -> std::io::Result<i32> {
        let c = CString::new(file.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        // SAFETY: a valid fd and a NUL-terminated path that outlives the call.
        let wd =
            unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), c.as_ptr(), libc::IN_MODIFY) };
        if wd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(wd)
    }

    /// Wait for events; returns (watch, gone) pairs: `gone` when the watch was removed.
    pub async fn next(&self) -> std::io::Result<Vec<(i32, bool)>> {
        // Room for many events at once; each is a 16-byte header (no names for file watches).
        let mut buf = [0u8; 4096];
        loop {
            let mut guard = self.fd.readable().await?;
            let r = guard.try_io(|fd| {
                // SAFETY: reads at most buf.len() bytes into buf.
                let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if n < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match r {
                Ok(Ok(n)) => return Ok(parse_events(&buf[..n])),
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }
}

/// Decode inotify records: (watch descriptor, watch removed).
fn parse_events(mut b: &[u8]) -> Vec<(i32, bool)> {
    const HDR: usize = std::mem::size_of::<libc::inotify_event>();
    let mut out = Vec::new();
    while b.len() >= HDR {
        let wd = i32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
        let mask = u32::from_ne_bytes([b[4], b[5], b[6], b[7]]);
        let len = u32::from_ne_bytes([b[12], b[13], b[14], b[15]]) as usize;
        out.push((wd, mask & libc::IN_IGNORED != 0));
        b = b.get(HDR + len..).unwrap_or(&[]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn oom_queue_delivers_in_order() {
        let q = OomQueue::default();
        q.push("a".into());
        q.push("b".into());
        assert_eq!(q.next().await, "a");
        assert_eq!(q.next().await, "b");
        let r = tokio::time::timeout(Duration::from_millis(20), q.next()).await;
        assert!(r.is_err());
    }

    #[tokio::test]
    async fn oom_queue_keeps_the_newest_when_full() {
        let q = OomQueue::default();
        for i in 0..QUEUE_MAX + 2 {
            q.push(i.to_string());
        }
        assert_eq!(q.next().await, "2");
    }

    /// The watch wakes on a write to the file and reports its removal; nothing else wakes it.
    #[tokio::test]
    async fn events_watch_wakes_on_modify_and_removal_only() {
        let d = tempfile::tempdir().expect("tmp");
        let f = d.path().join("memory.events");
        std::fs::write(&f, "oom 0\noom_kill 0\n").expect("write");
        let w = EventsWatch::new().expect("inotify");
        let wd = w.add(&f).expect("watch");
        let quiet = tokio::time::timeout(Duration::from_millis(100), w.next()).await;
        assert!(quiet.is_err(), "woke without a change: {quiet:?}");
        std::fs::write(&f, "oom 1\noom_kill 1\n").expect("write");
        let evs = tokio::time::timeout(Duration::from_secs(5), w.next())
            .await
            .expect("no event for a write")
            .expect("read");
        assert!(evs.contains(&(wd, false)), "{evs:?}");
        std::fs::remove_file(&f).expect("rm");
        let mut gone = false;
        for _ in 0..4 {
            let evs = tokio::time::timeout(Duration::from_secs(5), w.next())
                .await
                .expect("no event for the removal")
                .expect("read");
            if evs.contains(&(wd, true)) {
                gone = true;
                break;
            }
        }
        assert!(gone, "IN_IGNORED not seen");
        assert!(w.add(&f).is_err(), "a missing file was watched");
    }

    /// cgroupfs raises the modified event itself (kernfs notify, the path `memory.events`
    /// takes in the guest): here on the host's v2 mount with `cgroup.events`, whose
    /// `populated` flips when a process moves in. The host's memory controller sits on v1,
    /// so `memory.events` cannot be watched here; that a change of it raises the same
    /// event is the kernel's documented contract (Documentation/admin-guide/cgroup-v2.rst).
    #[tokio::test]
    async fn cgroupfs_files_wake_the_watch() {
        let Some(root) = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
            .iter()
            .map(Path::new)
            .find(|p| p.join("cgroup.procs").exists() && p.join("cgroup.controllers").exists())
        else {
            eprintln!("skipped: no cgroup v2 mount");
            return;
        };
        let cg = root.join(format!("husk-oom-watch-{}", std::process::id()));
        if let Err(e) = std::fs::create_dir(&cg) {
            eprintln!("skipped: cannot create a v2 cgroup ({e})");
            return;
        }
        let w = EventsWatch::new().expect("inotify");
        let wd = w
            .add(&cg.join("cgroup.events"))
            .expect("watch cgroup.events");
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        let moved = std::fs::write(cg.join("cgroup.procs"), child.id().to_string());
        let evs = tokio::time::timeout(Duration::from_secs(5), w.next()).await;
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::write(root.join("cgroup.procs"), child.id().to_string());
        // The cgroup empties once the child is reaped; rmdir may need a moment.
        for _ in 0..50 {
            if std::fs::remove_dir(&cg).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        moved.expect("move into the cgroup");
        let evs = evs.expect("no event from cgroupfs").expect("read");
        assert!(evs.contains(&(wd, false)), "{evs:?}");
    }

    #[test]
    fn truncated_event_records_are_not_read_past() {
        let mut b = Vec::new();
        b.extend_from_slice(&7i32.to_ne_bytes());
        b.extend_from_slice(&libc::IN_IGNORED.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        b.extend_from_slice(&64u32.to_ne_bytes()); // claims a name longer than the buffer
        assert_eq!(parse_events(&b), vec![(7, true)]);
        assert!(parse_events(&b[..10]).is_empty());
    }
}

//! The agent's state: one sandbox, its containers, the reaper and the cgroup
//! hierarchy. Maps are behind short std mutexes that are never held across an
//! await; each container and process has its own state.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::cgroup::{CgroupError, Hierarchy};
use crate::container::Container;
pub use crate::oom::OomQueue;
use crate::oom::{EventsWatch, V1_POLL};
use crate::reaper::Reaper;
use crate::sandbox::Sandbox;
// Re-exported for the binary and outside callers; the agent's own modules
// import them from `error` and `sync`, not from this state holder.
pub use crate::error::{AgentError, Result};
pub use crate::sync::lock;

/// The domain error of every agent operation; rpc.rs maps it to a ttrpc code.

#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Per-sandbox and per-container state (upper dirs, resolv.conf, ...).
    pub state_dir: PathBuf,
    /// Where the cgroup hierarchy is mounted.
    pub cgroup_root: PathBuf,
    /// True when PID 1 in a guest.
    pub is_init: bool,
}

/// A namespace holder spawned ahead of its sandbox: its pid and exit.
pub type SpareHolder = (i32, crate::reaper::ExitWatch);

pub struct Agent {
    pub config: AgentConfig,
    /// This binary, re-executed as the runner.
    pub exe: PathBuf,
    pub reaper: Arc<Reaper>,
    pub cgroups: Hierarchy,
    pub sandbox: Mutex<Option<Arc<Sandbox>>>,
    pub containers: Mutex<HashMap<String, Arc<Container>>>,
    /// Ids being created or removed (reserved, not yet/no longer in the map).
    pub busy: Mutex<HashSet<String>>,
    pub oom: OomQueue,
    /// Woken when a container is added (the OOM monitor then watches its cgroup).
    pub containers_added: tokio::sync::Notify,
    /// A sandbox holder spawned ahead of CreateSandbox (`sandbox/spare.rs`, VM only).
    pub spare_holder: Mutex<Option<SpareHolder>>,
}

impl Agent {
    /// `protect_exe`: run runners from a read-only bind mount of this binary
    /// (only when the agent's mounts are private: host mode or PID 1).
    pub fn new(
        config: AgentConfig,
        reaper: Arc<Reaper>,
        protect_exe: bool,
    ) -> std::result::Result<Arc<Self>, CgroupError> {
        let cgroups = Hierarchy::detect(&config.cgroup_root)?;
        let exe = match protect_exe.then(|| readonly_exe(&config.state_dir)) {
            Some(Ok(p)) => p,
            other => {
                let e = match other {
                    Some(Err(e)) => e.to_string(),
                    _ => "mounts are shared with the host (--shared-mounts)".to_string(),
                };
                tracing::warn!(error = %e, "runner binary is not protected by a read-only mount");
                std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe"))
            }
        };
        Ok(Arc::new(Self {
            config,
            exe,
            reaper,
            cgroups,
            sandbox: Mutex::new(None),
            containers: Mutex::new(HashMap::new()),
            busy: Mutex::new(HashSet::new()),
            oom: OomQueue::default(),
            containers_added: tokio::sync::Notify::new(),
            spare_holder: Mutex::new(None),
        }))
    }

    pub fn sandbox(&self) -> Result<Arc<Sandbox>> {
        lock(&self.sandbox).clone().ok_or_else(|| {
            AgentError::FailedPrecondition("no sandbox: call CreateSandbox first".into())
        })
    }

    pub fn container(&self, id: &str) -> Result<Arc<Container>> {
        lock(&self.containers)
            .get(id)
            .cloned()
            .ok_or_else(|| AgentError::NotFound(format!("container {id}")))
    }

    pub fn all_containers(&self) -> Vec<Arc<Container>> {
        lock(&self.containers).values().cloned().collect()
    }

    /// Look at a container's OOM counter now; queue an event if it went up.
    pub fn refresh_oom(&self, c: &Container) {
        if c.check_oom() {
            tracing::info!(container = %c.id, "oom kill");
            self.oom.push(c.id.clone());
        }
    }

    /// Queue an OOM event for every container whose kill counter went up.
    ///
    /// Event driven where `memory.events` exists (v2) and `watch` is given, polled
    /// otherwise. Without containers it sleeps until one is added.
    pub async fn oom_monitor(self: Arc<Self>, watch: Option<EventsWatch>) {
        // container id → its watch descriptor
        let mut watched: HashMap<String, i32> = HashMap::new();
        loop {
            let containers = self.all_containers();
            let mut poll = false;
            for c in &containers {
                if watched.contains_key(&c.id) {
                    continue;
                }
                let file = c.cgroup.memory_events_file();
                match (&watch, file) {
                    (Some(w), Some(f)) => match w.add(&f) {
                        Ok(wd) => {
                            watched.insert(c.id.clone(), wd);
                            // A kill between creation and the watch is caught here.
                            self.refresh_oom(c);
                        }
                        Err(e) => {
                            tracing::debug!(container = %c.id, error = %e, "memory.events not watchable");
                            poll = true;
                        }
                    },
                    _ => poll = true,
                }
            }
            // Watches of removed containers: the kernel drops them with the cgroup (IN_IGNORED);
            // forget ids no longer present either way.
            watched.retain(|id, _| containers.iter().any(|c| &c.id == id));
            let events = async {
                match &watch {
                    Some(w) if !watched.is_empty() => w.next().await,
                    _ => std::future::pending().await,
                }
            };
            let tick = async {
                if poll {
                    tokio::time::sleep(V1_POLL).await
                } else {
                    std::future::pending().await
                }
            };
            tokio::select! {
                _ = self.containers_added.notified() => {}
                _ = tick => {
                    for c in self.all_containers() {
                        if !watched.contains_key(&c.id) {
                            self.refresh_oom(&c);
                        }
                    }
                }
                r = events => match r {
                    Ok(evs) => {
                        for (wd, gone) in evs {
                            // Events are rare (a counter moved): a scan finds the container.
                            let Some(id) = watched.iter().find(|(_, w)| **w == wd).map(|(id, _)| id.clone()) else {
                                continue;
                            };
                            if gone {
                                watched.remove(&id);
                            }
                            if let Ok(c) = self.container(&id) {
                                self.refresh_oom(&c);
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "inotify read failed: OOM counters are polled");
                        tokio::time::sleep(V1_POLL).await;
                    }
                }
            }
        }
    }
}

/// Bind-mount this binary read-only into the state dir and run runners from
/// there. A container process that gets hold of a runner's /proc/PID/exe (an
/// image whose binary is `#!/proc/self/exe`, CVE-2019-5736) then cannot
/// overwrite the agent: the file is only reachable through a read-only mount.
/// Needs the agent's private mount namespace (host mode) or PID 1.
pub fn readonly_exe(state_dir: &std::path::Path) -> std::io::Result<PathBuf> {
    use nix::mount::MsFlags;
    let target = state_dir.join(".husk-runner");
    std::fs::create_dir_all(state_dir)?;
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&target)?;
    let none: Option<&str> = None;
    // By path, not /proc/self/exe: that names the mount we were exec'd from,
    // which belongs to the mount namespace we left (EINVAL).
    let source = std::env::current_exe()?;
    nix::mount::mount(Some(&source), &target, none, MsFlags::MS_BIND, none)?;
    let ro = MsFlags::MS_BIND
        | MsFlags::MS_REMOUNT
        | MsFlags::MS_RDONLY
        | MsFlags::MS_NOSUID
        | MsFlags::MS_NODEV;
    if let Err(e) = nix::mount::mount(none, &target, none, ro, none) {
        let _ = nix::mount::umount2(&target, nix::mount::MntFlags::MNT_DETACH);
        return Err(e.into());
    }
    Ok(target)
}

/// Ids are path components and cgroup names: keep them boring.
pub fn validate_id(kind: &str, id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !id.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(AgentError::InvalidArgument(format!("bad {kind} id {id:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_validated() {
        assert!(validate_id("container", "abc-1_2.x").is_ok());
        for bad in ["", "../x", "a/b", ".hidden", &"x".repeat(129)] {
            assert!(
                matches!(
                    validate_id("container", bad),
                    Err(AgentError::InvalidArgument(_))
                ),
                "{bad}"
            );
        }
    }
}

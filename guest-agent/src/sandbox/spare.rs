//! A namespace holder started ahead of CreateSandbox, in a VM only.
//!
//! In a VM the guest's own namespaces are the pod's: the holder joins and unshares
//! nothing, sets no hostname and brings no interface up, so the process a CreateSandbox
//! would spawn is the same for every pod but for its cgroup. The agent as a VM's PID 1
//! spawns one just before it starts serving; CreateSandbox takes it and moves it into
//! the pod's pause cgroup: ≈ 5 ms in a TCG guest,
//! against ≈ 45 ms for spawning one then (fork, exec, the runner's double fork; with
//! the cgroup hierarchy mounted `favordynmods`, init.rs). A sandbox that wants
//! namespaces of its own, a second sandbox, or a spare that failed or died: a holder is
//! spawned as before.
//!
//! (Runners exec'd ahead for containers too were tried, their stdio passed over a
//! socket when taken: no gain measured, a container's runner spends its time in its
//! setup, not in its exec.)

use std::sync::Arc;

use crate::agent::Agent;
use crate::cgroup::Cgroup;
use crate::container::spawn;
use crate::container::stdio;
use crate::reaper::ExitWatch;
use crate::runner::config::{InitConfig, InitMode, PauseInit};

/// What a holder that joins and unshares nothing runs with: the only kind a spare is.
fn plain_holder() -> InitConfig {
    InitConfig {
        cgroup_procs: Vec::new(),
        join: Vec::new(),
        unshare: Vec::new(),
        mode: InitMode::Pause(PauseInit {
            hostname: None,
            loopback_up: false,
        }),
    }
}

/// True when a sandbox's holder would be [`plain_holder`] in its cgroup.
pub fn fits(config: &InitConfig) -> bool {
    config.join.is_empty()
        && config.unshare.is_empty()
        && matches!(&config.mode, InitMode::Pause(p) if p.hostname.is_none() && !p.loopback_up)
}

/// Spawns a spare holder (the agent as a VM's PID 1, with no sandbox yet), before the
/// agent serves: a pooled VM is then idle once it answers, and a claim's short `Check`
/// never races the spawn.
pub async fn start(agent: &Arc<Agent>) {
    if !agent.config.is_init {
        return;
    }
    let spawned = async {
        let (child, _io) = stdio::make(false, false)?;
        let s = spawn::spawn(&agent.exe, &agent.reaper, &plain_holder(), child, false).await?;
        crate::error::Result::Ok((s.pid, s.exit))
    }
    .await;
    match spawned {
        Ok(holder) => *crate::sync::lock(&agent.spare_holder) = Some(holder),
        Err(e) => {
            tracing::warn!(error = %e, "spare sandbox holder failed: sandboxes spawn their own")
        }
    }
}

/// The spare holder, moved into `cgroup`, if there is one alive; None otherwise (the
/// caller spawns its own). A spare that cannot be moved is killed.
pub async fn take(agent: &Agent, cgroup: &Cgroup) -> Option<(i32, ExitWatch)> {
    let (pid, exit) = crate::sync::lock(&agent.spare_holder).take()?;
    if exit.borrow().is_some() {
        tracing::warn!(pid, "spare sandbox holder died: spawning one");
        return None;
    }
    for f in cgroup.procs_files() {
        if let Err(e) = std::fs::write(&f, pid.to_string()) {
            tracing::warn!(pid, file = %f.display(), error = %e, "move the spare sandbox holder: spawning one");
            discard_pid(pid, exit).await;
            return None;
        }
    }
    Some((pid, exit))
}

/// Kills the spare holder, if any (a sandbox that wants namespaces of its own).
pub async fn discard(agent: &Agent) {
    let spare = crate::sync::lock(&agent.spare_holder).take();
    if let Some((pid, exit)) = spare {
        discard_pid(pid, exit).await;
    }
}

async fn discard_pid(pid: i32, mut exit: ExitWatch) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        exit.wait_for(Option::is_some),
    )
    .await;
}

//! CreateSandbox, the guest network and DestroySandbox: the operations on a
//! [`Sandbox`] (its state is in `sandbox/mod.rs`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::mount::{MntFlags, MsFlags};
use nix::sys::signal::Signal;
use nix::unistd::Pid;

use crate::agent::{Agent, validate_id};
use crate::container::spawn;
use crate::container::stdio;
use crate::error::{AgentError, Result};
use crate::runner::config::{InitConfig, InitMode, Ns, NsJoin, PauseInit};
use crate::sync::lock;

use super::{PAUSE_CGROUP, Sandbox, SandboxConfig, hosts_file, resolv_conf};

fn io_err(what: String) -> impl FnOnce(std::io::Error) -> AgentError {
    move |e| AgentError::Io(what, e)
}

fn mount_opts(options: &[String]) -> (MsFlags, String) {
    let o = crate::runner::rootfs::parse_options(options);
    let mut flags = o.flags;
    if o.bind {
        flags |= MsFlags::MS_BIND;
    }
    if o.recursive {
        flags |= MsFlags::MS_REC;
    }
    (flags, o.data.join(","))
}

pub async fn do_create(agent: &Arc<Agent>, c: SandboxConfig) -> Result<Arc<Sandbox>> {
    validate_id("sandbox", &c.id)?;
    if let Some(s) = lock(&agent.sandbox).as_ref() {
        return Err(AgentError::AlreadyExists(format!(
            "sandbox {} (this agent serves one sandbox)",
            s.id
        )));
    }
    if !lock(&agent.busy).insert(format!("sandbox/{}", c.id)) {
        return Err(AgentError::AlreadyExists(format!(
            "sandbox {} (being created)",
            c.id
        )));
    }
    let result = create_inner(agent, &c).await;
    lock(&agent.busy).remove(&format!("sandbox/{}", c.id));
    let sandbox = Arc::new(result?);
    *lock(&agent.sandbox) = Some(sandbox.clone());
    Ok(sandbox)
}

async fn create_inner(agent: &Arc<Agent>, c: &SandboxConfig) -> Result<Sandbox> {
    for m in &c.mounts {
        validate_id("sandbox mount", &m.name)?;
        if m.name == "shm" {
            return Err(AgentError::InvalidArgument(
                "sandbox mount name shm is reserved".into(),
            ));
        }
    }
    let dir = agent.config.state_dir.join(&c.id);
    if dir.exists() {
        return Err(AgentError::AlreadyExists(format!(
            "sandbox state {}",
            dir.display()
        )));
    }
    std::fs::create_dir_all(&dir).map_err(io_err(format!("mkdir {}", dir.display())))?;
    let mut made = Made {
        dir: dir.clone(),
        mounts: Vec::new(),
        cgroups: Vec::new(),
    };
    match build(agent, c, &dir, &mut made).await {
        Ok(s) => Ok(s),
        Err(e) => {
            made.undo();
            Err(e)
        }
    }
}

/// What a failed create must undo.
struct Made {
    dir: PathBuf,
    mounts: Vec<PathBuf>,
    cgroups: Vec<crate::cgroup::Cgroup>,
}

impl Made {
    fn undo(&self) {
        for cg in self.cgroups.iter().rev() {
            let _ = cg.destroy();
        }
        for m in self.mounts.iter().rev() {
            let _ = nix::mount::umount2(m, MntFlags::MNT_DETACH);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn build(
    agent: &Arc<Agent>,
    c: &SandboxConfig,
    dir: &Path,
    made: &mut Made,
) -> Result<Sandbox> {
    let write = |name: &str, content: &str| {
        let p = dir.join(name);
        std::fs::write(&p, content).map_err(io_err(format!("write {}", p.display())))
    };
    let began = std::time::Instant::now();
    let resolv = match resolv_conf(c) {
        Some(r) => r,
        None => std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
    };
    write("resolv.conf", &resolv)?;
    write("hosts", &hosts_file(c))?;
    write("hostname", &format!("{}\n", c.hostname))?;

    let mut mounts = HashMap::new();
    let shm = dir.join("shm");
    std::fs::create_dir_all(&shm).map_err(io_err("mkdir shm".into()))?;
    let size = if c.shm_size == 0 {
        64 << 20
    } else {
        c.shm_size
    };
    nix::mount::mount(
        Some("shm"),
        &shm,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some(format!("mode=1777,size={size}").as_str()),
    )
    .map_err(|e| AgentError::Os("mount sandbox shm", e))?;
    made.mounts.push(shm.clone());
    mounts.insert("shm".to_string(), shm);
    for m in &c.mounts {
        let target = dir.join("mounts").join(&m.name);
        std::fs::create_dir_all(&target).map_err(io_err(format!("mkdir {}", target.display())))?;
        let (flags, data) = mount_opts(&m.options);
        let fstype = (!m.fstype.is_empty() && m.fstype != "bind").then_some(m.fstype.as_str());
        let flags = if m.fstype == "bind" {
            flags | MsFlags::MS_BIND
        } else {
            flags
        };
        nix::mount::mount(
            Some(m.source.as_str()),
            &target,
            fstype,
            flags,
            (!data.is_empty()).then_some(data.as_str()),
        )
        .map_err(|e| AgentError::InvalidArgument(format!("sandbox mount {}: {e}", m.name)))?;
        made.mounts.push(target.clone());
        mounts.insert(m.name.clone(), target);
    }
    let mounted = began.elapsed();

    let cgroup_parent = if c.cgroup_parent.is_empty() {
        PathBuf::from("husk").join(&c.id)
    } else {
        PathBuf::from(c.cgroup_parent.trim_start_matches('/'))
    };
    if cgroup_parent
        .components()
        .any(|p| matches!(p, std::path::Component::ParentDir))
    {
        return Err(AgentError::InvalidArgument(format!(
            "cgroup parent {}",
            c.cgroup_parent
        )));
    }
    let parent = agent.cgroups.create(&cgroup_parent)?;
    made.cgroups.push(parent.clone());
    if !c.resources.is_empty() {
        let res: oci_spec::runtime::LinuxResources = serde_json::from_slice(&c.resources)
            .map_err(|e| AgentError::InvalidArgument(format!("sandbox resources: {e}")))?;
        crate::cgroup::validate(&res).map_err(|e| AgentError::InvalidArgument(e.to_string()))?;
        parent.apply(&res)?;
    }
    // The holder goes to a leaf: a v2 cgroup with processes cannot delegate.
    let cgroup = agent.cgroups.create(&cgroup_parent.join(PAUSE_CGROUP))?;
    made.cgroups.push(cgroup.clone());

    if agent.config.is_init && !c.hostname.is_empty() && !c.new_uts {
        nix::unistd::sethostname(&c.hostname).map_err(|e| AgentError::Os("sethostname", e))?;
    }
    let mut unshare = Vec::new();
    let mut join = Vec::new();
    let new_net = c.new_net && c.network_path.is_none();
    if let Some(path) = &c.network_path {
        if !path.is_absolute() || !path.exists() {
            return Err(AgentError::InvalidArgument(format!(
                "network namespace {} does not exist",
                path.display()
            )));
        }
        join.push(NsJoin {
            ns: Ns::Net,
            path: path.clone(),
        });
    }
    for (want, ns) in [
        (new_net, Ns::Net),
        (c.new_ipc, Ns::Ipc),
        (c.new_uts, Ns::Uts),
        (c.new_pid, Ns::Pid),
    ] {
        if want {
            unshare.push(ns);
        }
    }
    let config = InitConfig {
        cgroup_procs: cgroup.procs_files(),
        join,
        unshare,
        mode: InitMode::Pause(PauseInit {
            hostname: (c.new_uts && !c.hostname.is_empty()).then(|| c.hostname.clone()),
            loopback_up: new_net,
        }),
    };
    let cgrouped = began.elapsed();
    let spare = match (c.keep_spare, super::spare::fits(&config)) {
        (true, _) => None,
        (false, true) => super::spare::take(agent, &cgroup).await,
        (false, false) => {
            super::spare::discard(agent).await;
            None
        }
    };
    let spare_used = spare.is_some();
    let (holder_pid, holder_exit) = match spare {
        Some(x) => x,
        None => {
            let (child, _io) = stdio::make(false, false)?;
            let s = spawn::spawn(&agent.exe, &agent.reaper, &config, child, false).await?;
            (s.pid, s.exit)
        }
    };
    // Where a create's time went (ms since it began: files and mounts, cgroups, holder).
    tracing::info!(
        sandbox = %c.id,
        holder = holder_pid,
        spare_used,
        mounted_ms = mounted.as_millis() as u64,
        cgroups_ms = cgrouped.as_millis() as u64,
        holder_ms = began.elapsed().as_millis() as u64,
        "sandbox created"
    );
    Ok(Sandbox {
        id: c.id.clone(),
        dir: dir.to_path_buf(),
        holder_pid,
        holder_exit,
        has_pid_ns: c.new_pid,
        cgroup_parent,
        cgroup: parent,
        mounts,
    })
}

/// ConfigureNetwork: in a thread that joins the pod's network namespace (and
/// dies after, so no runtime thread ever changes namespace).
pub async fn do_configure_network(
    agent: &Arc<Agent>,
    interfaces: Vec<crate::network::InterfaceConfig>,
    routes: Vec<crate::network::RouteConfig>,
) -> Result<()> {
    let sandbox = agent.sandbox()?;
    let netns = sandbox.ns_path(Ns::Net);
    let work = move || -> Result<()> {
        let file = std::fs::File::open(&netns)
            .map_err(|e| AgentError::Io(format!("open {}", netns.display()), e))?;
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| AgentError::Os("setns net", e))?;
        Ok(crate::network::configure(&interfaces, &routes)?)
    };
    tokio::task::spawn_blocking(move || std::thread::spawn(work).join())
        .await
        .map_err(|e| {
            AgentError::Io(
                "network thread".into(),
                std::io::Error::other(e.to_string()),
            )
        })?
        .map_err(|_| AgentError::Io("network thread".into(), std::io::Error::other("panicked")))?
}

/// Kill every container and the holder, undo mounts, remove state.
pub async fn do_destroy(agent: &Arc<Agent>, id: &str) -> Result<()> {
    let sandbox = agent.sandbox()?;
    if sandbox.id != id {
        return Err(AgentError::NotFound(format!("sandbox {id}")));
    }
    for c in agent.all_containers() {
        crate::container::remove::do_remove(agent, &c.id, true).await?;
    }
    let _ = nix::sys::signal::kill(Pid::from_raw(sandbox.holder_pid), Signal::SIGKILL);
    let mut exit = sandbox.holder_exit.clone();
    let _ = tokio::time::timeout(Duration::from_secs(10), exit.wait_for(Option::is_some)).await;
    for m in sandbox.mounts.values() {
        let _ = nix::mount::umount2(m, MntFlags::MNT_DETACH);
    }
    for rel in [
        sandbox.cgroup_parent.join(PAUSE_CGROUP),
        sandbox.cgroup_parent.clone(),
    ] {
        if let Ok(cg) = agent.cgroups.create(&rel) {
            let _ = cg.destroy();
        }
    }
    let _ = std::fs::remove_dir_all(&sandbox.dir);
    *lock(&agent.sandbox) = None;
    tracing::info!(sandbox = %id, "sandbox destroyed");
    Ok(())
}

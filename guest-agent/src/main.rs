//! husk-agent: `husk-agent --listen unix:PATH` on the host (namespace sandbox),
//! or PID 1 in a guest (vsock:1024 by default). `husk-agent __init` is the
//! container runner the agent re-executes; it is not for humans.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use husk_agent::agent::{Agent, AgentConfig};
use husk_agent::reaper::Reaper;
use husk_agent::server::{Listen, VSOCK_PORT};
use husk_agent::syscall::LinuxSyscall;
use husk_agent::{init, runner, sandbox, server};

#[derive(Debug, Parser)]
#[command(name = "husk-agent", version, about = "husk's agent: runs the containers of one sandbox")]
struct Args {
    /// unix:PATH or vsock:PORT (default vsock:1024 when PID 1).
    #[arg(long)]
    listen: Option<String>,
    /// State directory (container upper dirs, pod /etc files).
    #[arg(long, default_value = "/run/husk-agent")]
    state_dir: PathBuf,
    /// Where the cgroup hierarchy is mounted.
    #[arg(long, default_value = "/sys/fs/cgroup")]
    cgroup_root: PathBuf,
    /// Keep the host's mount namespace (host process only; mounts then leak to the host).
    #[arg(long)]
    shared_mounts: bool,
    /// Host process even when PID 1: for the namespace sandbox started as the
    /// init of a fresh PID namespace (no guest mounts, no power-off; /proc is
    /// remounted for the new PID namespace).
    #[arg(long)]
    host: bool,
}

fn main() -> anyhow::Result<()> {
    if std::env::args().nth(1).as_deref() == Some(runner::INIT_ARG) {
        runner::main();
    }
    let args = Args::parse();
    let pid1 = std::process::id() == 1;
    let is_init = pid1 && !args.host;
    if is_init {
        init::mount_guest_filesystems(&LinuxSyscall).context("guest mounts")?;
        init::enable_cgroup_controllers(&args.cgroup_root);
        // SAFETY: still single-threaded.
        unsafe { std::env::set_var("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin") };
    } else {
        init::host_process_setup(!args.shared_mounts, pid1).context("host process setup")?;
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "husk_agent=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let listen: Listen = match &args.listen {
        Some(l) => l.parse()?,
        None if is_init => Listen::Vsock(VSOCK_PORT),
        None => anyhow::bail!("--listen unix:PATH is required when not PID 1"),
    };
    std::fs::create_dir_all(&args.state_dir).with_context(|| format!("mkdir {}", args.state_dir.display()))?;

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let reaper = Reaper::new();
        tokio::spawn(reaper.clone().run());
        let config = AgentConfig { state_dir: args.state_dir.clone(), cgroup_root: args.cgroup_root.clone(), is_init };
        let agent = Agent::new(config, reaper, is_init || !args.shared_mounts).context("cgroups")?;
        tokio::spawn(agent.clone().oom_monitor());
        let mut server = server::serve(agent.clone(), &listen).await.context("serve")?;
        tracing::info!(?listen, cgroup = agent.cgroups.version(), is_init, "husk-agent ready");

        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("shutting down");
        // Long-poll RPCs may be pending: do not wait for them forever.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(3), server.shutdown()).await;
        let sandbox_id = agent.sandbox().ok().map(|s| s.id.clone());
        if let Some(id) = sandbox_id
            && let Err(e) = sandbox::do_destroy(&agent, &id).await {
                tracing::warn!(error = %e, "destroy sandbox on shutdown");
            }
        if let Listen::Unix(p) = &listen {
            let _ = std::fs::remove_file(p);
        }
        let _ = nix::mount::umount2(&agent.exe, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_file(args.state_dir.join(".husk-runner"));
        anyhow::Ok(())
    })?;
    if is_init {
        init::poweroff();
    }
    Ok(())
}

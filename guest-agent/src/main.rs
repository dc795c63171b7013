//! husk-agent: `husk-agent --listen unix:PATH` on the host (namespace sandbox),
//! or PID 1 in a guest (vsock:1024 by default). `husk-agent __init` is the
//! container runner the agent re-executes; it is not for humans.

use std::path::PathBuf;

use anyhow::Context;
use clap::{CommandFactory, Parser};
use husk_agent::agent::{Agent, AgentConfig};
use husk_agent::forward::{self, ForwardListen};
use husk_agent::oom::EventsWatch;
use husk_agent::reaper::Reaper;
use husk_agent::server::{Listen, VSOCK_PORT};
use husk_agent::syscall::LinuxSyscall;
use husk_agent::{init, runner, sandbox, server};

#[derive(Debug, Parser)]
#[command(
    name = "husk-agent",
    version,
    about = "husk's agent: runs the containers of one sandbox"
)]
struct Args {
    /// unix:PATH or vsock:PORT (default vsock:1024 when PID 1).
    #[arg(long)]
    listen: Option<String>,
    /// Port-forward endpoint: unix:PATH (default vsock:1025 when PID 1; none otherwise).
    #[arg(long)]
    forward_listen: Option<String>,
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
    /// A shared host directory (husk-ns) whose peer the agent keeps at
    /// `<state-dir>/propagation`: bidirectional volumes are bound through it.
    #[arg(long)]
    propagation_dir: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    match std::env::args().nth(1).as_deref() {
        Some(runner::INIT_ARG) => runner::main(),
        Some(runner::REHEARSAL_ARG) => std::process::exit(0),
        _ => {}
    }
    let pid1 = std::process::id() == 1;
    if !pid1 {
        return run(Args::parse());
    }
    if !std::env::args().any(|a| a == "--host")
        && let Err(e) = init::leave_initramfs()
    {
        // Containers then fail to pivot_root; say why on the console.
        eprintln!("husk-agent: staying on the initramfs root: {e}");
    }
    // PID 1 must never exit: the kernel would panic. The kernel also hands
    // init the command line words it does not know: ignore what clap does not.
    let argv: Vec<String> = std::env::args().collect();
    let kept = known_args(&argv);
    if kept.len() != argv.len() {
        eprintln!("husk-agent: ignoring unknown arguments in {argv:?}");
    }
    let args = Args::try_parse_from(&kept).unwrap_or_else(|e| {
        eprintln!("husk-agent: bad arguments, using defaults: {e}");
        Args::parse_from(["husk-agent"])
    });
    let host = args.host;
    let result = std::panic::catch_unwind(|| run(args));
    match &result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => eprintln!("husk-agent: fatal: {e:#}"),
        Err(_) => eprintln!("husk-agent: fatal: panic"),
    }
    if host {
        // The namespace sandbox: our exit ends the PID namespace, as intended.
        return result.unwrap_or_else(|_| Err(anyhow::anyhow!("panic")));
    }
    init::poweroff()
}

/// argv[0] and the flags `Args` knows (with their values); the rest dropped.
fn known_args(argv: &[String]) -> Vec<String> {
    let cmd = Args::command();
    let flag = |name: &str| cmd.get_arguments().find(|a| a.get_long() == Some(name));
    let mut out: Vec<String> = argv.iter().take(1).cloned().collect();
    let mut it = argv.iter().skip(1).peekable();
    while let Some(a) = it.next() {
        let Some(long) = a.strip_prefix("--") else {
            continue;
        };
        let (name, inline) = match long.split_once('=') {
            Some((n, _)) => (n, true),
            None => (long, false),
        };
        let Some(arg) = flag(name) else { continue };
        out.push(a.clone());
        if !inline && arg.get_action().takes_values() {
            match it.next() {
                Some(v) => out.push(v.clone()),
                None => {
                    out.pop();
                }
            }
        }
    }
    out
}

fn run(args: Args) -> anyhow::Result<()> {
    let pid1 = std::process::id() == 1;
    let is_init = pid1 && !args.host;
    if is_init {
        init::mount_guest_filesystems(&LinuxSyscall).context("guest mounts")?;
        init::enable_cgroup_controllers(&args.cgroup_root);
        // The guest's own network namespace is the pod's: its loopback must
        // be up (localhost in the pod, port-forward to localhost:<port>).
        if let Err(e) = runner::exec::loopback_up() {
            eprintln!("husk-agent: loopback up: {e}");
        }
        // SAFETY: still single-threaded.
        unsafe {
            std::env::set_var(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
        };
    } else {
        let peer_at = args.state_dir.join(husk_proto::PROPAGATION_DIR);
        let peer = args
            .propagation_dir
            .as_deref()
            .map(|src| (src, peer_at.as_path()));
        init::host_process_setup(!args.shared_mounts, pid1, peer).context("host process setup")?;
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "husk_agent=info".into()),
        )
        .with_writer(std::io::stderr)
        // A VM's console is a serial line the host writes to a file: no colour codes
        // (a third of each line's bytes, and every byte is a port write in the guest).
        .with_ansi(!pid1 && std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let listen: Listen = match &args.listen {
        Some(l) => l.parse()?,
        None if is_init => Listen::Vsock(VSOCK_PORT),
        None => anyhow::bail!("--listen unix:PATH is required when not PID 1"),
    };
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("mkdir {}", args.state_dir.display()))?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let reaper = Reaper::new();
        tokio::spawn(reaper.clone().run());
        let config = AgentConfig {
            state_dir: args.state_dir.clone(),
            cgroup_root: args.cgroup_root.clone(),
            is_init,
        };
        let agent =
            Agent::new(config, reaper, is_init || !args.shared_mounts).context("cgroups")?;
        // Without inotify (a guest kernel built without it) OOM kills are found by
        // polling every container twice a second, which wakes an idle guest: the
        // ready line says which it is (tests/tests/guest_boot.rs checks it).
        let watch = match EventsWatch::new() {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "inotify unavailable: OOM counters are polled");
                None
            }
        };
        let oom_watch = if watch.is_some() { "inotify" } else { "poll" };
        tokio::spawn(agent.clone().oom_monitor(watch));
        // A VM's sandbox takes a holder spawned now (sandbox/spare.rs).
        sandbox::spare::start(&agent).await;
        let mut server = server::serve(agent.clone(), &listen)
            .await
            .context("serve")?;
        let forward: Option<ForwardListen> = match &args.forward_listen {
            Some(l) => Some(l.parse()?),
            None if is_init => Some(ForwardListen::Vsock(forward::VSOCK_PORT)),
            None => None,
        };
        if let Some(f) = &forward {
            // Port forwarding is an extra: the agent serves without it.
            if let Err(e) = forward::serve(agent.clone(), f) {
                tracing::error!(error = %e, ?f, "port-forward endpoint");
            }
        }
        tracing::info!(
            ?listen,
            ?forward,
            cgroup = agent.cgroups.version(),
            is_init,
            oom_watch,
            "husk-agent ready"
        );

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
            && let Err(e) = sandbox::lifecycle::do_destroy(&agent, &id).await
        {
            tracing::warn!(error = %e, "destroy sandbox on shutdown");
        }
        if let Listen::Unix(p) = &listen {
            let _ = std::fs::remove_file(p);
        }
        if let Some(ForwardListen::Unix(p)) = &forward {
            let _ = std::fs::remove_file(p);
        }
        let _ = nix::mount::umount2(&agent.exe, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_file(args.state_dir.join(".husk-runner"));
        anyhow::Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stray_kernel_words_are_dropped() {
        let argv: Vec<String> = [
            "/init",
            "splash",
            "--listen",
            "unix:/a",
            "--bogus",
            "x",
            "--host",
            "--state-dir=/s",
            "--cgroup-root",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            known_args(&argv),
            ["/init", "--listen", "unix:/a", "--host", "--state-dir=/s"]
        );
        let a = Args::try_parse_from(known_args(&argv)).expect("parse");
        assert_eq!(a.listen.as_deref(), Some("unix:/a"));
        assert!(a.host);
    }
}

//! huskd: the husk CRI server.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser;
use husk_host::config::Config;
use husk_host::cri::{self, Services};
use husk_host::image::{ImageService, ImageSettings};
use husk_host::sandbox::{Manager, ManagerSettings};

#[derive(Parser)]
#[command(
    name = "huskd",
    version,
    about = "husk CRI server (VM-isolated pods for Kubernetes)"
)]
struct Args {
    /// Config file (default /etc/husk/config.toml; missing default = all defaults).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override the socket path from the config.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Override the state directory from the config.
    #[arg(long)]
    state_dir: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut cfg = Config::load(args.config.as_deref())?;
    if let Some(s) = args.socket {
        cfg.socket = s;
    }
    if let Some(s) = args.state_dir {
        cfg.state_dir = s;
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cfg.log_level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only on a terminal: not into journald or a log file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(cfg))
}

async fn run(cfg: Config) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("create {}", cfg.state_dir.display()))?;
    std::fs::create_dir_all(&cfg.run_dir)
        .with_context(|| format!("create {}", cfg.run_dir.display()))?;
    let images = ImageService::open(ImageSettings {
        root: cfg.images_dir(),
        registry_config_dir: cfg.image.registry_config_dir.clone(),
        docker_config: cfg.image.docker_config.clone(),
        max_concurrent_downloads: cfg.image.max_concurrent_downloads,
    })
    .context("open image store")?;
    tracing::info!(version = env!("CARGO_PKG_VERSION"), state = %cfg.state_dir.display(), "huskd starting");
    let runtime = Manager::open(
        ManagerSettings {
            runtime: cfg.runtime.clone(),
            state_dir: cfg.state_dir.clone(),
            run_dir: cfg.run_dir.clone(),
            network: cfg.network.clone(),
        },
        images.clone(),
    )
    .await
    .context("recover pods")?;
    let streaming = husk_host::streaming::StreamingServer::start(&cfg.streaming, runtime.clone())
        .await
        .context("start the streaming server")?;
    if let Some(address) = &cfg.metrics.address {
        husk_host::metrics::server::start(address, runtime.clone())
            .await
            .context("start the metrics endpoint")?;
    }
    let pools = runtime.clone();
    let services = Arc::new(Services {
        images,
        runtime,
        streaming,
    });
    // Warm VMs serve no pod: they go with huskd (pods keep running), as soon as the signal
    // comes, before the server waits for its clients to hang up.
    let shutdown = async move {
        shutdown_signal().await;
        pools.drain_pools().await;
    };
    cri::serve(services, &cfg.socket, shutdown).await?;
    tracing::info!("huskd stopped");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
}

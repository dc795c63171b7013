//! husk: command line client of huskd (a CRI client, like crictl).

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use husk_host::cli::images;
use husk_host::client::Clients;
use husk_host::config::DEFAULT_SOCKET;
use husk_proto::cri;

#[derive(Parser)]
#[command(
    name = "husk",
    version,
    about = "husk: VM-isolated pods (client of huskd)"
)]
struct Args {
    /// huskd's CRI socket.
    #[arg(long, global = true, env = "HUSK_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Pull an image (one progress bar per layer).
    Pull {
        image: String,
        /// Registry credentials USER:PASSWORD.
        #[arg(long)]
        creds: Option<String>,
        #[arg(short, long)]
        quiet: bool,
    },
    /// List images.
    Images {
        /// Only images matching this reference or id.
        filter: Option<String>,
        /// Only print ids.
        #[arg(short, long)]
        quiet: bool,
        /// Output format.
        #[arg(short, long, value_parser = ["table", "json"], default_value = "table")]
        output: String,
    },
    /// Remove images (by tag, digest or id).
    Rmi {
        #[arg(required = true)]
        images: Vec<String>,
    },
    /// Show an image's status and config as JSON.
    Inspecti { image: String },
    /// Show runtime and API versions.
    Version,
}

fn main() -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("HUSK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mut c = Clients::connect(&args.socket).await?;
    match args.cmd {
        Cmd::Pull {
            image,
            creds,
            quiet,
        } => images::pull(&mut c, &image, creds.as_deref(), quiet).await,
        Cmd::Images {
            filter,
            quiet,
            output,
        } => images::images(&mut c, filter.as_deref(), quiet, output == "json").await,
        Cmd::Rmi { images: list } => images::rmi(&mut c, &list).await,
        Cmd::Inspecti { image } => images::inspecti(&mut c, &image).await,
        Cmd::Version => {
            let v = c
                .runtime
                .version(cri::VersionRequest {
                    version: "v1".into(),
                })
                .await?
                .into_inner();
            println!(
                "Version:  {}\nRuntimeName:  {}\nRuntimeVersion:  {}\nRuntimeApiVersion:  {}",
                v.version, v.runtime_name, v.runtime_version, v.runtime_api_version
            );
            Ok(())
        }
    }
}

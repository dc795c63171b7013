//! husk: command line client of huskd (a CRI client, like crictl).

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use husk_host::cli::{bench, density, images, runtime, stream};
use husk_host::client::Clients;
use husk_host::config::DEFAULT_SOCKET;
use husk_host::streaming::client::Transport;
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
    /// Run IMAGE [-- CMD...] in a new pod; streams its output, exits with its exit code.
    Run {
        /// Stop and remove the pod (and its logs) afterwards.
        #[arg(long)]
        rm: bool,
        /// RuntimeClass handler: husk (VM on husk-vmm, hardware KVM), husk-qemu (VM on
        /// QEMU, KVM or TCG) or husk-ns (namespace sandbox: container-level isolation,
        /// not a VM). Default: huskd's default handler (a VM sandbox).
        #[arg(long)]
        runtime: Option<String>,
        /// Pod and container name (default run-<random>).
        #[arg(long)]
        name: Option<String>,
        /// Where the pod's log directory is made.
        #[arg(long, default_value = "/var/log/husk/pods")]
        log_root: PathBuf,
        image: String,
        /// Command and arguments (default: the image's).
        #[arg(last = true)]
        cmd: Vec<String>,
    },
    /// List containers (running ones unless -a).
    Ps {
        #[arg(short, long)]
        all: bool,
        #[arg(short, long)]
        quiet: bool,
    },
    /// List pod sandboxes.
    Pods {
        #[arg(short, long)]
        quiet: bool,
    },
    /// Print a container's log (content only), -f to follow until it exits.
    Logs {
        #[arg(short, long)]
        follow: bool,
        container: String,
    },
    /// Run a command in a running container: with -i/-t (or --protocol)
    /// over the streaming server, else with CRI ExecSync.
    Exec {
        /// Seconds; 0 = no timeout (ExecSync only).
        #[arg(long, default_value_t = 0)]
        timeout: i64,
        /// Pass stdin to the command.
        #[arg(short, long)]
        interactive: bool,
        /// Allocate a terminal (raw mode on this side).
        #[arg(short, long)]
        tty: bool,
        /// Streaming protocol: spdy or websocket.
        #[arg(long)]
        protocol: Option<Transport>,
        container: String,
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Attach to a running container's output (and stdin with -i, terminal with -t).
    Attach {
        #[arg(short, long)]
        interactive: bool,
        #[arg(short, long)]
        tty: bool,
        /// Streaming protocol: spdy or websocket.
        #[arg(long, default_value = "spdy")]
        protocol: Transport,
        container: String,
    },
    /// Forward local ports to a pod: LOCAL:REMOTE (or PORT), until ^C.
    PortForward {
        /// Streaming protocol: spdy or websocket.
        #[arg(long, default_value = "spdy")]
        protocol: Transport,
        pod: String,
        #[arg(required = true)]
        ports: Vec<String>,
    },
    /// Stop containers or pods (by id or unique id prefix).
    Stop {
        /// Seconds between SIGTERM and SIGKILL (containers).
        #[arg(short, long, default_value_t = 10)]
        timeout: i64,
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Remove containers or pods (a pod is stopped first).
    Rm {
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Measure huskd: pod start latency and host memory per pod.
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Through the CRI: RunPodSandbox → Ready and → first container running (p50/p99,
    /// sequential and in parallel), host memory of idle pods. Every pod it makes is removed.
    Cri {
        /// RuntimeClass handler (default: huskd's default handler).
        #[arg(long, default_value = "")]
        runtime: String,
        /// Image of the container; its command must keep running.
        #[arg(long, default_value = "docker.io/library/busybox:latest")]
        image: String,
        /// Sequential pods measured (after one warm-up pod).
        #[arg(long, default_value_t = 10)]
        runs: usize,
        /// Pods started at once.
        #[arg(long, default_value_t = 20)]
        parallel: usize,
        /// Idle pods whose host memory is measured (0: skip).
        #[arg(long, default_value_t = 5)]
        idle: usize,
        /// Pods on the host network (a baseline without CNI, e.g. another CRI runtime).
        #[arg(long)]
        host_network: bool,
        /// Before each sequential pod, wait until the handler's warm pool is full again
        /// (each pod gets a pooled VM, no refill boot runs beside it).
        #[arg(long)]
        settle: bool,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// The container's command.
        #[arg(last = true)]
        cmd: Vec<String>,
    },
    /// Idle pods (a sleeping container each), started in steps until a memory budget, a
    /// huskd latency limit or a failed start: per step host memory and idle CPU per pod
    /// and huskd's Version/ListPodSandbox p99. Every pod it makes is removed (also on ^C).
    Density {
        /// RuntimeClass handler (default: huskd's default handler).
        #[arg(long, default_value = "")]
        runtime: String,
        /// Image of the container; its command must keep running.
        #[arg(long, default_value = "docker.io/library/busybox:latest")]
        image: String,
        /// Host memory the pods may use all told (PSS), MiB (0: 3/4 of MemAvailable).
        #[arg(long, default_value_t = 0)]
        budget_mib: u64,
        /// Pods started per step.
        #[arg(long, default_value_t = 10)]
        step: usize,
        /// Pods started at once within a step.
        #[arg(long, default_value_t = 2)]
        concurrency: usize,
        /// Stop after this many pods (0: no limit).
        #[arg(long, default_value_t = 0)]
        max_pods: usize,
        /// Stop when huskd's Version or ListPodSandbox p99 exceeds this (ms).
        #[arg(long, default_value_t = 100.0)]
        p99_limit_ms: f64,
        /// Seconds the pods idle before each step is measured.
        #[arg(long, default_value_t = 5)]
        settle: u64,
        /// Seconds over which idle CPU is measured.
        #[arg(long, default_value_t = 10)]
        window: u64,
        /// Version and ListPodSandbox calls per step (each).
        #[arg(long, default_value_t = 100)]
        probes: usize,
        /// Stop before the host's MemAvailable would fall below this (MiB).
        #[arg(long, default_value_t = 2048)]
        reserve_mib: u64,
        /// Pods on the host network.
        #[arg(long)]
        host_network: bool,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// The container's command.
        #[arg(last = true)]
        cmd: Vec<String>,
    },
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
    let code = rt.block_on(run(args))?;
    drop(rt);
    std::process::exit(code)
}

async fn run(args: Args) -> anyhow::Result<i32> {
    let mut c = Clients::connect(&args.socket).await?;
    let unit = |r: anyhow::Result<()>| r.map(|()| 0);
    match args.cmd {
        Cmd::Run {
            rm,
            runtime: handler,
            name,
            log_root,
            image,
            cmd,
        } => {
            runtime::run(
                &mut c,
                runtime::RunOptions {
                    image,
                    cmd,
                    rm,
                    runtime: handler,
                    name,
                    log_root,
                },
            )
            .await
        }
        Cmd::Ps { all, quiet } => unit(runtime::ps(&mut c, all, quiet).await),
        Cmd::Pods { quiet } => unit(runtime::pods(&mut c, quiet).await),
        Cmd::Logs { follow, container } => unit(runtime::logs(&mut c, &container, follow).await),
        Cmd::Exec {
            timeout,
            interactive,
            tty,
            protocol,
            container,
            cmd,
        } => {
            if interactive || tty || protocol.is_some() {
                let o = stream::StreamOptions {
                    stdin: interactive,
                    tty,
                    protocol: protocol.unwrap_or(Transport::Spdy),
                };
                stream::exec(&mut c, &container, cmd, o).await
            } else {
                runtime::exec(&mut c, &container, cmd, timeout).await
            }
        }
        Cmd::Attach {
            interactive,
            tty,
            protocol,
            container,
        } => {
            let o = stream::StreamOptions {
                stdin: interactive,
                tty,
                protocol,
            };
            stream::attach(&mut c, &container, o).await
        }
        Cmd::PortForward {
            protocol,
            pod,
            ports,
        } => unit(stream::port_forward(&mut c, &pod, &ports, protocol).await),
        Cmd::Stop { timeout, ids } => unit(runtime::stop(&mut c, &ids, timeout).await),
        Cmd::Rm { ids } => unit(runtime::rm(&mut c, &ids).await),
        Cmd::Bench {
            what:
                BenchCmd::Cri {
                    runtime: handler,
                    image,
                    runs,
                    parallel,
                    idle,
                    host_network,
                    settle,
                    json,
                    cmd,
                },
        } => {
            let o = bench::BenchOptions {
                runtime: handler,
                image,
                cmd: idle_cmd(cmd),
                runs,
                parallel,
                idle,
                host_network,
                settle,
            };
            let r = bench::cri(&c, &args.socket, &o).await?;
            print_report(json, &r, r.markdown())?;
            Ok(0)
        }
        Cmd::Bench {
            what:
                BenchCmd::Density {
                    runtime: handler,
                    image,
                    budget_mib,
                    step,
                    concurrency,
                    max_pods,
                    p99_limit_ms,
                    settle,
                    window,
                    probes,
                    reserve_mib,
                    host_network,
                    json,
                    cmd,
                },
        } => {
            let o = density::DensityOptions {
                runtime: handler,
                image,
                cmd: idle_cmd(cmd),
                budget_mib,
                step,
                concurrency,
                max_pods,
                p99_limit_ms,
                settle_s: settle,
                window_s: window,
                probes,
                reserve_mib,
                host_network,
            };
            // ^C stops new starts; the pods made so far are then removed.
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let flag = stop.clone();
            tokio::spawn(async move {
                if tokio::signal::ctrl_c().await.is_ok() {
                    eprintln!("interrupted: removing the bench's pods (^C again: leave them)");
                    flag.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                if tokio::signal::ctrl_c().await.is_ok() {
                    std::process::exit(130);
                }
            });
            let r = density::density(&c, &args.socket, &o, stop).await?;
            print_report(json, &r, r.markdown())?;
            Ok(i32::from(r.left_behind > 0))
        }
        Cmd::Pull {
            image,
            creds,
            quiet,
        } => unit(images::pull(&mut c, &image, creds.as_deref(), quiet).await),
        Cmd::Images {
            filter,
            quiet,
            output,
        } => unit(images::images(&mut c, filter.as_deref(), quiet, output == "json").await),
        Cmd::Rmi { images: list } => unit(images::rmi(&mut c, &list).await),
        Cmd::Inspecti { image } => unit(images::inspecti(&mut c, &image).await),
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
            Ok(0)
        }
    }
}

/// A bench's command when none is given: a container that only sleeps.
fn idle_cmd(cmd: Vec<String>) -> Vec<String> {
    if cmd.is_empty() {
        vec!["sleep".into(), "1000000".into()]
    } else {
        cmd
    }
}

/// A bench report as JSON or as its markdown table.
fn print_report(json: bool, r: &impl serde::Serialize, markdown: String) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(r)?);
    } else {
        print!("{markdown}");
    }
    Ok(())
}

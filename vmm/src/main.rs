//! husk-vmm: runs one KVM micro-VM until the guest shuts down.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use husk_vmm::config::{DiskConfig, FsConfig, NetConfig, SerialConfig, VmConfig, VsockConfig};
use husk_vmm::devices::ExitReason;

/// Boot a VM. Flags override the `--config` JSON file.
#[derive(Parser, Debug)]
#[command(name = "husk-vmm", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// JSON VM config file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Kernel: ELF vmlinux (PVH or 64-bit entry) or bzImage.
    #[arg(long)]
    kernel: Option<PathBuf>,
    #[arg(long)]
    initrd: Option<PathBuf>,
    #[arg(long)]
    cmdline: Option<String>,
    #[arg(long)]
    vcpus: Option<u8>,
    /// Guest memory in MiB.
    #[arg(long)]
    memory: Option<u32>,
    /// Disk: `id=ID,path=PATH[,ro]` (repeatable).
    #[arg(long = "disk")]
    disks: Vec<String>,
    /// Empty read-only disk slots, filled later with the control socket's `disk-attach`.
    #[arg(long)]
    disk_slots: Option<u32>,
    /// Network interface: `tap=NAME[,mac=xx:xx:xx:xx:xx:xx][,fd=N]` (repeatable; `fd`: an
    /// inherited fd attached to the tap already).
    #[arg(long = "net")]
    nets: Vec<String>,
    /// virtio-fs share: `tag=TAG,dir=PATH[,special=on]` (repeatable); the guest mounts it with
    /// `mount -t virtiofs TAG DIR`. `special=on` lets the guest make set-id files and FIFOs.
    #[arg(long = "fs")]
    shares: Vec<String>,
    /// vsock: `cid=N,uds=PATH`.
    #[arg(long)]
    vsock: Option<String>,
    /// Serial output: `stdout`, `none` or `file:PATH`.
    #[arg(long)]
    serial: Option<String>,
    /// Control socket (line protocol: status, stop, kill, disks, disk-attach, disk-detach).
    #[arg(long)]
    control_socket: Option<PathBuf>,
    /// Milliseconds the guest gets to shut down after Ctrl-Alt-Del (SIGTERM, `stop`).
    #[arg(long)]
    stop_grace_ms: Option<u64>,
    /// Print the time from process start to the guest's first boot-timer port write (stderr).
    #[arg(long)]
    boot_timer: bool,
    /// virtio-balloon with free page reporting: pages the guest frees go back to the host.
    #[arg(long)]
    balloon: bool,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Serve a device to another VMM over vhost-user instead of booting a VM.
    #[command(subcommand)]
    VhostUser(VhostUserDevice),
    /// Copy pipes (inherited fds) into size-capped, rotated log files until every pipe is
    /// closed (a VM pod's console and its processes' output).
    LogWriter {
        /// Bytes each log keeps at most, over `<PATH>` and `<PATH>.1`.
        #[arg(long, default_value_t = husk_vmm::logwriter::DEFAULT_MAX_BYTES)]
        max_bytes: u64,
        /// `FD=PATH`: an inherited pipe (FD >= 3) and its log file, or `FD:CURFD:OLDFD`: the
        /// pipe and the inherited fds of the log's two files (repeatable).
        #[arg(required = true)]
        logs: Vec<String>,
    },
    /// Run PROGRAM jailed (as root: private mount namespace with a minimal root, the pod's
    /// unprivileged uid/gid, no capabilities but `--keep-fs-caps`, no_new_privs).
    Jail(JailArgs),
}

#[derive(clap::Args, Debug)]
struct JailArgs {
    #[arg(long)]
    uid: u32,
    #[arg(long)]
    gid: u32,
    /// An empty directory to build the jail's root on.
    #[arg(long)]
    root: PathBuf,
    /// Host path visible read-only at the same path (repeatable).
    #[arg(long)]
    ro: Vec<PathBuf>,
    /// Host path visible writable (not executable) at the same path (repeatable).
    #[arg(long)]
    rw: Vec<PathBuf>,
    /// Extra device node under /dev, e.g. `kvm` (repeatable).
    #[arg(long)]
    dev: Vec<String>,
    /// `PATH:FD`: directory opened (O_PATH) onto fd FD before the root changes (repeatable).
    #[arg(long = "open-dir", value_parser = husk_vmm::jail::parse_open_dir)]
    open_dirs: Vec<(PathBuf, i32)>,
    /// Keep the virtio-fs server's file capabilities (chown, dac_override, dac_read_search,
    /// fowner, fsetid) as ambient capabilities.
    #[arg(long)]
    keep_fs_caps: bool,
    /// The program and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

fn run_jail(a: JailArgs) -> i32 {
    let spec = husk_vmm::jail::JailSpec {
        uid: a.uid,
        gid: a.gid,
        root: a.root,
        ro: a.ro,
        rw: a.rw,
        devs: a.dev,
        open_dirs: a.open_dirs,
        keep_fs_caps: a.keep_fs_caps,
        env: husk_vmm::jail::KEPT_ENV
            .iter()
            .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v)))
            .collect(),
    };
    let e = husk_vmm::jail::exec(&spec, std::path::Path::new(&a.command[0]), &a.command[1..]);
    eprintln!("husk-vmm jail: {e:#}");
    126
}

#[derive(clap::Subcommand, Debug)]
enum VhostUserDevice {
    /// virtio-vsock with Firecracker-style hybrid sockets (e.g. QEMU `vhost-user-vsock-pci`).
    Vsock {
        /// vhost-user socket to listen on (the frontend connects to it).
        #[arg(long)]
        socket: PathBuf,
        /// Hybrid vsock socket: host clients connect here and send `CONNECT <port>`; guest
        /// connections to port P go to `<uds>_P`.
        #[arg(long)]
        uds: PathBuf,
        /// Guest CID (given to the frontend through the device config space).
        #[arg(long)]
        cid: u64,
    },
    /// virtio-fs: a passthrough FUSE server over one directory (e.g. QEMU `vhost-user-fs-pci`).
    Fs {
        /// vhost-user socket to listen on (the frontend connects to it).
        #[arg(long)]
        socket: PathBuf,
        /// The directory the guest sees; nothing outside it is reachable.
        #[arg(long)]
        shared_dir: PathBuf,
        /// Mount tag (`mount -t virtiofs TAG DIR` in the guest).
        #[arg(long)]
        tag: String,
        /// Let the guest make set-id files and FIFOs (refused by default).
        #[arg(long)]
        allow_special_files: bool,
    },
}

fn run_vhost_user(dev: VhostUserDevice) -> i32 {
    match dev {
        VhostUserDevice::Vsock { socket, uds, cid } => {
            match husk_vmm::devices::virtio::vsock::vhost_user::serve(&socket, &uds, cid) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("husk-vmm: vhost-user vsock: {e:#}");
                    1
                }
            }
        }
        VhostUserDevice::Fs {
            socket,
            shared_dir,
            tag,
            allow_special_files,
        } => match husk_vmm::devices::virtio::fs::vhost_user::serve(
            &socket,
            &shared_dir,
            &tag,
            allow_special_files,
        ) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("husk-vmm: vhost-user fs: {e:#}");
                1
            }
        },
    }
}

fn run_log_writer(max_bytes: u64, logs: &[String]) -> anyhow::Result<()> {
    use husk_vmm::logwriter::{self, CappedLog, Target};
    let mut pipes = Vec::new();
    let mut seen = std::collections::HashSet::new();
    // Takes inherited fd `fd`, once.
    let mut take = |fd: i32| -> anyhow::Result<std::os::fd::OwnedFd> {
        // SAFETY: F_GETFD only queries the descriptor table.
        let open = unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0;
        anyhow::ensure!(
            open && seen.insert(fd),
            "log-writer: fd {fd} is not an inherited fd"
        );
        // SAFETY: `fd` is open (checked above), inherited from our parent, and taken once.
        Ok(unsafe { logwriter::inherited(fd) })
    };
    for l in logs {
        let (fd, target) = logwriter::parse_spec(l)?;
        let pipe = take(fd)?;
        let log = match target {
            Target::Path(p) => CappedLog::create(&p, max_bytes)?,
            Target::Fds(cur, old) => CappedLog::from_files(
                PathBuf::from(format!("fd {cur}")),
                take(cur)?.into(),
                take(old)?.into(),
                max_bytes,
            )?,
        };
        pipes.push((pipe, log));
    }
    // Every file is open: from here on only reads, writes and truncation of the fds held.
    husk_vmm::seccomp::install(husk_vmm::seccomp::Role::LogWriter, true)
        .context("log-writer: seccomp")?;
    logwriter::run(pipes)?;
    Ok(())
}

fn kv(spec: &str) -> Vec<(String, String)> {
    spec.split(',')
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (p.to_string(), String::new()),
        })
        .collect()
}

fn get(pairs: &[(String, String)], key: &str, what: &str) -> anyhow::Result<String> {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
        .with_context(|| format!("{what}: missing {key}="))
}

fn build_config(cli: Cli) -> anyhow::Result<VmConfig> {
    let mut cfg = match &cli.config {
        Some(p) => VmConfig::from_file(p)?,
        None => VmConfig {
            kernel: PathBuf::new(),
            initrd: None,
            cmdline: husk_vmm::config::DEFAULT_CMDLINE.into(),
            vcpus: 1,
            memory_mib: 128,
            disks: vec![],
            disk_slots: 0,
            net: vec![],
            vsock: None,
            fs: vec![],
            serial: SerialConfig::Stdout,
            control_socket: None,
            stop_grace_ms: 5000,
            balloon: false,
        },
    };
    cfg.balloon |= cli.balloon;
    if let Some(k) = cli.kernel {
        cfg.kernel = k;
    }
    if cli.initrd.is_some() {
        cfg.initrd = cli.initrd;
    }
    if let Some(c) = cli.cmdline {
        cfg.cmdline = c;
    }
    if let Some(v) = cli.vcpus {
        cfg.vcpus = v;
    }
    if let Some(m) = cli.memory {
        cfg.memory_mib = m;
    }
    for d in &cli.disks {
        let p = kv(d);
        cfg.disks.push(DiskConfig {
            id: get(&p, "id", "--disk")?,
            path: get(&p, "path", "--disk")?.into(),
            read_only: p.iter().any(|(k, _)| k == "ro"),
        });
    }
    if let Some(n) = cli.disk_slots {
        cfg.disk_slots = n;
    }
    for n in &cli.nets {
        let p = kv(n);
        cfg.net.push(NetConfig {
            tap: get(&p, "tap", "--net")?,
            mac: get(&p, "mac", "--net").ok(),
            fd: get(&p, "fd", "--net")
                .ok()
                .map(|f| f.parse().with_context(|| format!("--net: bad fd {f:?}")))
                .transpose()?,
        });
    }
    for f in &cli.shares {
        let p = kv(f);
        cfg.fs.push(FsConfig {
            tag: get(&p, "tag", "--fs")?,
            shared_dir: get(&p, "dir", "--fs")?.into(),
            allow_special_files: match get(&p, "special", "--fs").ok().as_deref() {
                None | Some("off") => false,
                Some("on") => true,
                Some(v) => anyhow::bail!("--fs: special={v:?}: on or off"),
            },
        });
    }
    if let Some(v) = &cli.vsock {
        let p = kv(v);
        let cid = get(&p, "cid", "--vsock")?;
        cfg.vsock = Some(VsockConfig {
            guest_cid: cid
                .parse()
                .with_context(|| format!("--vsock: bad cid {cid:?}"))?,
            uds_path: get(&p, "uds", "--vsock")?.into(),
        });
    }
    if let Some(g) = cli.stop_grace_ms {
        cfg.stop_grace_ms = g;
    }
    if cli.control_socket.is_some() {
        cfg.control_socket = cli.control_socket;
    }
    if let Some(s) = cli.serial {
        cfg.serial = match s.as_str() {
            "stdout" => SerialConfig::Stdout,
            "none" => SerialConfig::None,
            f => SerialConfig::File(
                f.strip_prefix("file:")
                    .context("--serial: want stdout, none or file:PATH")?
                    .into(),
            ),
        };
    }
    Ok(cfg)
}

fn main() {
    let t0 = Instant::now();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HUSK_VMM_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut cli = Cli::parse();
    match cli.command.take() {
        Some(Command::VhostUser(dev)) => std::process::exit(run_vhost_user(dev)),
        Some(Command::LogWriter { max_bytes, logs }) => {
            if let Err(e) = run_log_writer(max_bytes, &logs) {
                eprintln!("husk-vmm: log-writer: {e:#}");
                std::process::exit(1);
            }
            std::process::exit(0);
        }
        Some(Command::Jail(a)) => std::process::exit(run_jail(a)),
        None => {}
    }
    let boot_timer = cli.boot_timer.then_some(t0);
    let result = build_config(cli).and_then(|cfg| {
        husk_vmm::vmm::run(&cfg, husk_vmm::vmm::RunOptions { boot_timer })
            .map_err(anyhow::Error::from)
    });
    let code = match result {
        Ok(ExitReason::GuestShutdown) => 0,
        Ok(r @ ExitReason::Stopped) => {
            eprintln!(
                "husk-vmm: stopped before the guest shut down (stop grace period over, or kill)"
            );
            r.exit_code()
        }
        Ok(ExitReason::Error(msg)) => {
            eprintln!("husk-vmm: error: {msg}");
            1
        }
        Err(e) => {
            eprintln!("husk-vmm: error: {e:#}");
            2
        }
    };
    // vCPU threads may still be inside KVM_RUN: leave without joining them.
    std::process::exit(code);
}

//! CreateContainer: validate the spec, prepare rootfs dirs and the cgroup,
//! start the runner and leave it waiting for StartContainer.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use nix::mount::MsFlags;
use oci_spec::runtime::{LinuxNamespaceType, Mount, Spec};

use super::stdio;
use super::{Container, Inner, Pending, Process, Status, spawn};
use crate::agent::{Agent, validate_id};
use crate::error::{AgentError, Result};
use crate::runner::config::{ContainerInit, InitConfig, InitMode, Ns, NsJoin, RootfsMount};
use crate::sandbox::Sandbox;
use crate::sync::lock;

/// Devices every container gets (bind-mounted from the agent's /dev).
pub const DEFAULT_DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

/// Where the rootfs comes from (wire `Rootfs` converted in rpc.rs).
#[derive(Debug, Clone)]
pub enum RootfsSource {
    Overlay {
        lower_dirs: Vec<PathBuf>,
    },
    Block {
        device: PathBuf,
        fstype: String,
        options: Vec<String>,
        subpath: String,
        overlay: bool,
    },
    Path(PathBuf),
}

#[derive(Debug, Clone)]
pub struct CreateRequest {
    pub id: String,
    pub spec_json: Vec<u8>,
    pub rootfs: Option<RootfsSource>,
    pub stdin: bool,
    pub tty: bool,
}

/// Namespace plan of a container, from its spec and the sandbox.
///
/// net/ipc/uts are always the pod's (or an explicit path from the spec); the
/// mount namespace is always new; pid is new when the spec lists it without a
/// path, else the pod's; cgroup is new when listed.
pub fn plan_namespaces(spec: &Spec, sandbox: &Sandbox) -> Result<(Vec<NsJoin>, Vec<Ns>)> {
    plan_with(spec, sandbox.holder_pid)
}

fn plan_with(spec: &Spec, holder_pid: i32) -> Result<(Vec<NsJoin>, Vec<Ns>)> {
    let pod = |ns: Ns| PathBuf::from(format!("/proc/{holder_pid}/ns/{}", ns.proc_name()));
    let listed: HashMap<LinuxNamespaceType, Option<PathBuf>> = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().clone())
        .unwrap_or_default()
        .into_iter()
        .map(|n| (n.typ(), n.path().clone()))
        .collect();
    if listed.contains_key(&LinuxNamespaceType::User) {
        return Err(AgentError::InvalidArgument(
            "user namespaces are not supported".into(),
        ));
    }
    let mut join = Vec::new();
    let mut unshare = vec![Ns::Mnt];
    for (typ, ns) in [
        (LinuxNamespaceType::Network, Ns::Net),
        (LinuxNamespaceType::Ipc, Ns::Ipc),
        (LinuxNamespaceType::Uts, Ns::Uts),
    ] {
        let path = listed
            .get(&typ)
            .cloned()
            .flatten()
            .unwrap_or_else(|| pod(ns));
        join.push(NsJoin { ns, path });
    }
    match listed.get(&LinuxNamespaceType::Pid) {
        Some(Some(path)) => join.push(NsJoin {
            ns: Ns::Pid,
            path: path.clone(),
        }),
        Some(None) => unshare.push(Ns::Pid),
        None => join.push(NsJoin {
            ns: Ns::Pid,
            path: pod(Ns::Pid),
        }),
    }
    if listed.contains_key(&LinuxNamespaceType::Cgroup) {
        unshare.push(Ns::Cgroup);
    }
    Ok((join, unshare))
}

fn has_mount(spec: &Spec, dest: &str) -> bool {
    spec.mounts()
        .iter()
        .flatten()
        .any(|m| m.destination() == Path::new(dest))
}

fn bind(dest: &str, source: &Path, ro: bool) -> Mount {
    let mut opts = vec![
        "rbind".to_string(),
        "nosuid".to_string(),
        "nodev".to_string(),
    ];
    if ro {
        opts.push("ro".into());
    }
    let mut m = Mount::default();
    m.set_destination(PathBuf::from(dest))
        .set_typ(Some("bind".into()))
        .set_source(Some(source.to_path_buf()))
        .set_options(Some(opts));
    m
}

/// Resolve "sandbox:NAME" sources, check bind sources, add the pod's /etc files
/// and /dev/shm, and drop the hostname (the pod's UTS namespace has it).
pub fn adjust_spec(spec: &mut Spec, sandbox: &Sandbox, joins_pod_ipc: bool) -> Result<()> {
    let mut mounts: Vec<Mount> = Vec::new();
    for mut m in spec.mounts().clone().unwrap_or_default() {
        if !m.destination().is_absolute() {
            return Err(AgentError::InvalidArgument(format!(
                "mount destination {} is relative",
                m.destination().display()
            )));
        }
        if joins_pod_ipc && m.destination() == Path::new("/dev/shm") {
            continue;
        }
        let is_bind = m.typ().as_deref() == Some("bind")
            || m.options()
                .iter()
                .flatten()
                .any(|o| o == "bind" || o == "rbind");
        if let Some(src) = m
            .source()
            .as_ref()
            .and_then(|s| s.to_str())
            .and_then(|s| s.strip_prefix("sandbox:"))
        {
            m.set_source(Some(sandbox_source(&sandbox.mounts, src)?));
        } else if is_bind {
            let src = m.source().clone().unwrap_or_default();
            if !src.is_absolute() {
                return Err(AgentError::InvalidArgument(format!(
                    "bind source {} is not absolute",
                    src.display()
                )));
            }
            if !src.exists() {
                return Err(AgentError::InvalidArgument(format!(
                    "bind source {} does not exist",
                    src.display()
                )));
            }
        }
        mounts.push(m);
    }
    if joins_pod_ipc && let Some(shm) = sandbox.mounts.get("shm") {
        mounts.push(bind("/dev/shm", shm, false));
    }
    for f in ["resolv.conf", "hosts", "hostname"] {
        let dest = format!("/etc/{f}");
        if !has_mount(spec, &dest) {
            mounts.push(bind(&dest, &sandbox.etc_file(f), false));
        }
    }
    spec.set_mounts(Some(mounts));
    spec.set_hostname(None);
    Ok(())
}

/// The path of a "sandbox:NAME" or "sandbox:NAME/SUB/PATH" mount source: the sandbox mount
/// NAME, or a file or directory beneath it (a VM pod's CRI mounts live in subdirectories of
/// its virtio-fs share). SUB/PATH is plain components only, none of them a symlink, and must
/// exist.
pub fn sandbox_source(
    mounts: &std::collections::HashMap<String, PathBuf>,
    src: &str,
) -> Result<PathBuf> {
    let (name, sub) = src.split_once('/').unwrap_or((src, ""));
    let mut path = mounts
        .get(name)
        .ok_or_else(|| AgentError::InvalidArgument(format!("no sandbox mount named {name}")))?
        .clone();
    for c in Path::new(sub).components() {
        let std::path::Component::Normal(c) = c else {
            return Err(AgentError::InvalidArgument(format!(
                "sandbox mount path {src}: only plain components"
            )));
        };
        path.push(c);
        match std::fs::symlink_metadata(&path) {
            Ok(md) if md.file_type().is_symlink() => {
                return Err(AgentError::InvalidArgument(format!(
                    "sandbox mount path {src}: {} is a symlink",
                    path.display()
                )));
            }
            Ok(_) => {}
            Err(e) => {
                return Err(AgentError::InvalidArgument(format!(
                    "sandbox mount path {src}: {e}"
                )));
            }
        }
    }
    Ok(path)
}

/// A guest block device by path, or "virtio-blk:SERIAL" looked up in sysfs.
/// A device whose size is still 0 does not count yet: husk-vmm fills an empty
/// disk slot (serial and capacity change together on the host), and the
/// guest kernel picks the new capacity up from the config-change interrupt
/// a moment later.
pub fn resolve_device(device: &Path, sys_block: &Path) -> Result<PathBuf> {
    let Some(serial) = device.to_str().and_then(|d| d.strip_prefix("virtio-blk:")) else {
        return Ok(device.to_path_buf());
    };
    for entry in std::fs::read_dir(sys_block).into_iter().flatten().flatten() {
        let found = std::fs::read_to_string(entry.path().join("serial")).unwrap_or_default();
        let size = std::fs::read_to_string(entry.path().join("size")).ok();
        let empty = size.is_some_and(|s| s.trim() == "0");
        if found.trim() == serial && !empty {
            return Ok(Path::new("/dev").join(entry.file_name()));
        }
    }
    Err(AgentError::InvalidArgument(format!(
        "no virtio-blk device with serial {serial} and a non-zero size"
    )))
}

/// How long a hot-plugged disk may take to show up in the guest.
const DEVICE_WAIT: std::time::Duration = std::time::Duration::from_secs(15);

nix::ioctl_none!(blkflsbuf, 0x12, 97);

/// Drops the guest's cached blocks of `device` (BLKFLSBUF): a husk-vmm disk slot that held
/// another image before shows new content under the same device node.
fn drop_cached_blocks(device: &Path) -> Result<()> {
    let f = std::fs::File::open(device)
        .map_err(|e| AgentError::Io(format!("open {}", device.display()), e))?;
    // SAFETY: BLKFLSBUF takes no argument; the fd is a block device opened above.
    unsafe { blkflsbuf(std::os::fd::AsRawFd::as_raw_fd(&f)) }
        .map_err(|e| AgentError::Os("BLKFLSBUF on the rootfs block device", e))?;
    Ok(())
}

async fn block_rootfs(
    dir: &Path,
    device: &Path,
    fstype: &str,
    options: &[String],
) -> Result<PathBuf> {
    // huskd hot-plugs the image disk just before CreateContainer: the guest
    // kernel may still be probing it.
    let deadline = std::time::Instant::now() + DEVICE_WAIT;
    let device = loop {
        match resolve_device(device, Path::new("/sys/block")) {
            Ok(d) if d.exists() => break d,
            Ok(d) if std::time::Instant::now() > deadline => break d,
            Err(e) if std::time::Instant::now() > deadline => return Err(e),
            _ => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
        }
    };
    let device = device.as_path();
    drop_cached_blocks(device)?;
    let target = dir.join("block");
    std::fs::create_dir_all(&target)
        .map_err(|e| AgentError::Io(format!("mkdir {}", target.display()), e))?;
    let o = crate::runner::rootfs::parse_options(options);
    let data = o.data.join(",");
    nix::mount::mount(
        Some(device),
        &target,
        Some(if fstype.is_empty() { "ext4" } else { fstype }),
        o.flags | MsFlags::MS_NODEV,
        (!data.is_empty()).then_some(data.as_str()),
    )
    .map_err(|e| AgentError::Os("mount rootfs block device", e))?;
    Ok(target)
}

/// Reject what the runner would reject, before spawning anything.
pub fn validate_process(
    process: &oci_spec::runtime::Process,
    linux: Option<&oci_spec::runtime::Linux>,
) -> Result<()> {
    let invalid = |e: String| AgentError::InvalidArgument(e);
    if process.args().as_ref().is_none_or(|a| a.is_empty()) {
        return Err(invalid("process.args is empty".into()));
    }
    if let Some(c) = process.capabilities() {
        crate::runner::caps::Caps::from_oci(c).map_err(|e| invalid(e.to_string()))?;
    }
    if let Some(l) = linux {
        if let Some(s) = l.seccomp() {
            crate::runner::seccomp::compile(s).map_err(|e| invalid(format!("seccomp: {e}")))?;
        }
        for key in l.sysctl().iter().flatten().map(|(k, _)| k) {
            crate::runner::rootfs::sysctl_path(key).map_err(|e| invalid(e.to_string()))?;
        }
    }
    Ok(())
}

pub async fn do_create(agent: &Arc<Agent>, req: CreateRequest) -> Result<Arc<Container>> {
    validate_id("container", &req.id)?;
    let sandbox = agent.sandbox()?;
    if !sandbox.alive() {
        return Err(AgentError::FailedPrecondition(format!(
            "sandbox {} is not running",
            sandbox.id
        )));
    }
    if lock(&agent.containers).contains_key(&req.id) || !lock(&agent.busy).insert(req.id.clone()) {
        return Err(AgentError::AlreadyExists(format!("container {}", req.id)));
    }
    let dir = agent
        .config
        .state_dir
        .join(&sandbox.id)
        .join("containers")
        .join(&req.id);
    let result = create(agent, &sandbox, &req, &dir).await;
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&dir);
    } else if let Ok(c) = &result {
        lock(&agent.containers).insert(req.id.clone(), c.clone());
        agent.containers_added.notify_one();
    }
    lock(&agent.busy).remove(&req.id);
    result
}

async fn create(
    agent: &Arc<Agent>,
    sandbox: &Arc<Sandbox>,
    req: &CreateRequest,
    dir: &Path,
) -> Result<Arc<Container>> {
    let mut spec: Spec = serde_json::from_slice(&req.spec_json)
        .map_err(|e| AgentError::InvalidArgument(format!("oci spec: {e}")))?;
    let process = spec
        .process()
        .as_ref()
        .ok_or_else(|| AgentError::InvalidArgument("oci spec: no process".into()))?;
    validate_process(process, spec.linux().as_ref())?;
    let (join, unshare) = plan_namespaces(&spec, sandbox)?;
    let joins_pod_ipc = join
        .iter()
        .any(|j| j.ns == Ns::Ipc && j.path == sandbox.ns_path(Ns::Ipc));
    adjust_spec(&mut spec, sandbox, joins_pod_ipc)?;
    let resources = spec.linux().as_ref().and_then(|l| l.resources().clone());
    if let Some(r) = &resources {
        crate::cgroup::validate(r).map_err(|e| AgentError::InvalidArgument(e.to_string()))?;
    }

    let began = std::time::Instant::now();
    std::fs::create_dir_all(dir)
        .map_err(|e| AgentError::Io(format!("mkdir {}", dir.display()), e))?;
    let mut agent_mounts = Vec::new();
    let (upper, work) = (dir.join("upper"), dir.join("work"));
    let rootfs = match req.rootfs.clone() {
        Some(RootfsSource::Overlay { lower_dirs }) => {
            if lower_dirs.is_empty() {
                return Err(AgentError::InvalidArgument(
                    "overlay rootfs without lower dirs".into(),
                ));
            }
            for l in &lower_dirs {
                if !l.is_absolute() || !l.is_dir() {
                    return Err(AgentError::InvalidArgument(format!(
                        "lower dir {} is not an absolute directory",
                        l.display()
                    )));
                }
            }
            RootfsMount::Overlay {
                lower: lower_dirs,
                upper: upper.clone(),
                work: work.clone(),
            }
        }
        Some(RootfsSource::Path(path)) => {
            if !path.is_absolute() || !path.is_dir() {
                return Err(AgentError::InvalidArgument(format!(
                    "rootfs {} is not an absolute directory",
                    path.display()
                )));
            }
            RootfsMount::Bind { path }
        }
        Some(RootfsSource::Block {
            device,
            fstype,
            options,
            subpath,
            overlay,
        }) => {
            let mounted = block_rootfs(dir, &device, &fstype, &options).await?;
            agent_mounts.push(mounted.clone());
            let root = crate::runner::rootfs::secure_join(&mounted, Path::new(&subpath));
            if overlay {
                RootfsMount::Overlay {
                    lower: vec![root],
                    upper: upper.clone(),
                    work: work.clone(),
                }
            } else {
                RootfsMount::Bind { path: root }
            }
        }
        None => return Err(AgentError::InvalidArgument("rootfs is required".into())),
    };
    if matches!(rootfs, RootfsMount::Overlay { .. }) {
        for d in [&upper, &work] {
            std::fs::create_dir_all(d)
                .map_err(|e| AgentError::Io(format!("mkdir {}", d.display()), e))?;
        }
    }

    let rootfs_ready = began.elapsed();
    let rel = match spec.linux().as_ref().and_then(|l| l.cgroups_path().clone()) {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => sandbox.cgroup_parent.join(&req.id),
    };
    let cgroup = agent.cgroups.create(&rel)?;
    let undo = |e: AgentError| {
        let _ = cgroup.destroy();
        for m in &agent_mounts {
            let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
        }
        e
    };
    if let Some(r) = &resources {
        cgroup.apply(r).map_err(|e| undo(e.into()))?;
    }
    cgroup
        .apply_devices(&crate::cgroup::devices::rules(&spec))
        .map_err(|e| undo(e.into()))?;

    let cgrouped = began.elapsed();
    let own_pid_ns = unshare.contains(&Ns::Pid);
    let config = InitConfig {
        cgroup_procs: cgroup.procs_files(),
        join,
        unshare,
        mode: InitMode::Container(ContainerInit {
            spec: spec.clone(),
            rootfs,
            rootfs_dir: dir.join("rootfs"),
            tty: req.tty,
            host_devices: DEFAULT_DEVICES.iter().map(|s| s.to_string()).collect(),
            extra_env: Vec::new(),
        }),
    };
    let (child, io) = stdio::make(req.stdin, req.tty).map_err(|e| undo(e.into()))?;
    let spawned = spawn::spawn(&agent.exe, &agent.reaper, &config, child, true)
        .await
        .map_err(|e| undo(e.into()))?;
    let io = match io.finish().await {
        Ok(io) => io,
        Err(e) => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(spawned.pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            return Err(undo(e.into()));
        }
    };
    // Where a create's time went (ms since it began: rootfs, cgroup, runner ready).
    tracing::info!(
        container = %req.id,
        pid = spawned.pid,
        rootfs_ms = rootfs_ready.as_millis() as u64,
        cgroup_ms = cgrouped.as_millis() as u64,
        runner_ms = began.elapsed().as_millis() as u64,
        runner_stages = %spawned.stages,
        "container created"
    );
    let init = Arc::new(Process::new(String::new(), spawned.pid, io, spawned.exit));
    Ok(Arc::new(Container {
        id: req.id.clone(),
        spec,
        dir: dir.to_path_buf(),
        cgroup,
        init,
        agent_mounts,
        own_pid_ns,
        created_at: SystemTime::now(),
        inner: Mutex::new(Inner {
            status: Status::Created,
            pending: Some(Pending {
                start: spawned.start,
                sync: spawned.sync,
            }),
            execs: HashMap::new(),
            oom_seen: 0,
            oom_killed: false,
        }),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_sources_stay_beneath_their_mount() {
        let d = tempfile::tempdir().expect("tmp");
        let share = d.path().join("share");
        std::fs::create_dir_all(share.join("m0/sub")).expect("mkdir");
        std::fs::write(share.join("m1"), b"file").expect("write");
        std::os::unix::fs::symlink("/etc", share.join("link")).expect("symlink");
        let mounts = std::collections::HashMap::from([("share".to_string(), share.clone())]);
        assert_eq!(sandbox_source(&mounts, "share").expect("whole"), share);
        assert_eq!(
            sandbox_source(&mounts, "share/m0/sub").expect("dir"),
            share.join("m0/sub")
        );
        assert_eq!(
            sandbox_source(&mounts, "share/m1").expect("single file"),
            share.join("m1")
        );
        for bad in [
            "share/../x",
            "share/m0/../../x",
            "share/link",
            "share/link/passwd",
            "share/nope",
            "other",
            "share//etc",
        ] {
            let r = sandbox_source(&mounts, bad);
            // "share//etc" normalises to share/etc, which does not exist.
            assert!(
                matches!(r, Err(AgentError::InvalidArgument(_))),
                "{bad}: {r:?}"
            );
        }
    }

    #[test]
    fn virtio_serial_lookup() {
        let sys = tempfile::tempdir().expect("tmp");
        for (dev, serial) in [("vda", "boot"), ("vdb", "rootfs-c1\n")] {
            std::fs::create_dir_all(sys.path().join(dev)).expect("mkdir");
            std::fs::write(sys.path().join(dev).join("serial"), serial).expect("write");
        }
        assert_eq!(
            resolve_device(Path::new("virtio-blk:rootfs-c1"), sys.path()).expect("found"),
            Path::new("/dev/vdb")
        );
        assert_eq!(
            resolve_device(Path::new("/dev/vdc"), sys.path()).expect("path"),
            Path::new("/dev/vdc")
        );
        assert!(matches!(
            resolve_device(Path::new("virtio-blk:nope"), sys.path()),
            Err(AgentError::InvalidArgument(_))
        ));
        // A husk-vmm disk slot whose new capacity the kernel has not read yet.
        std::fs::create_dir_all(sys.path().join("vdc")).expect("mkdir");
        std::fs::write(sys.path().join("vdc/serial"), "img0123").expect("write");
        std::fs::write(sys.path().join("vdc/size"), "0\n").expect("write");
        assert!(matches!(
            resolve_device(Path::new("virtio-blk:img0123"), sys.path()),
            Err(AgentError::InvalidArgument(_))
        ));
        std::fs::write(sys.path().join("vdc/size"), "16\n").expect("write");
        assert_eq!(
            resolve_device(Path::new("virtio-blk:img0123"), sys.path()).expect("filled"),
            Path::new("/dev/vdc")
        );
    }

    #[test]
    fn namespace_plan_follows_the_spec() {
        let sandbox_pid = 4242;
        let ns = |n: &str| PathBuf::from(format!("/proc/{sandbox_pid}/ns/{n}"));
        let plan = |namespaces: serde_json::Value| {
            let spec: Spec = serde_json::from_value(
                serde_json::json!({"ociVersion": "1.0.2", "linux": {"namespaces": namespaces}}),
            )
            .expect("spec");
            plan_with(&spec, sandbox_pid)
        };
        let (join, unshare) =
            plan(serde_json::json!([{"type": "pid"}, {"type": "network"}])).expect("plan");
        assert_eq!(unshare, vec![Ns::Mnt, Ns::Pid]);
        assert_eq!(
            join.iter()
                .map(|j| (j.ns, j.path.clone()))
                .collect::<Vec<_>>(),
            vec![
                (Ns::Net, ns("net")),
                (Ns::Ipc, ns("ipc")),
                (Ns::Uts, ns("uts"))
            ]
        );
        let (join, unshare) = plan(serde_json::json!([{"type": "network", "path": "/var/run/netns/x"}, {"type": "cgroup"}])).expect("plan");
        assert_eq!(unshare, vec![Ns::Mnt, Ns::Cgroup]);
        assert_eq!(join[0].path, PathBuf::from("/var/run/netns/x"));
        assert_eq!(
            join.last().map(|j| (j.ns, j.path.clone())),
            Some((Ns::Pid, ns("pid"))),
            "pod pid ns"
        );
        assert!(matches!(
            plan(serde_json::json!([{"type": "user"}])),
            Err(AgentError::InvalidArgument(_))
        ));
    }
}

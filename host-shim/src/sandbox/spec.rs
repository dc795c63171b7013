//! The OCI runtime spec of a container, built from the CRI ContainerConfig,
//! the pod config and the image config, and the checks of the CRI values it
//! is built from (mounts, resources, capabilities, seccomp, devices).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use husk_proto::cri;
use oci_spec::runtime::{
    Capability, LinuxCpuBuilder, LinuxMemoryBuilder, LinuxNamespace, LinuxNamespaceType,
    LinuxResources, LinuxResourcesBuilder, LinuxSeccomp, Mount, Spec,
};

use super::RuntimeError;

type Result<T> = std::result::Result<T, RuntimeError>;

fn invalid(msg: impl Into<String>) -> RuntimeError {
    RuntimeError::InvalidArgument(msg.into())
}

/// containerd's default capability set.
const DEFAULT_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// Syscalls the RuntimeDefault profile refuses with EPERM (a subset of
/// Docker's default profile, expressed as a deny list); a granted capability
/// unlocks its syscalls, as there (`seccomp_gates.rs`).
const RUNTIME_DEFAULT_DENY: &[&str] = &[
    "acct",
    "add_key",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "create_module",
    "delete_module",
    "finit_module",
    "get_kernel_syms",
    "init_module",
    "ioperm",
    "iopl",
    "kcmp",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "mount",
    "move_pages",
    "name_to_handle_at",
    "nfsservctl",
    "open_by_handle_at",
    "perf_event_open",
    "pivot_root",
    "process_vm_readv",
    "process_vm_writev",
    "ptrace",
    "query_module",
    "quotactl",
    "reboot",
    "request_key",
    "setns",
    "settimeofday",
    "swapon",
    "swapoff",
    "sysfs",
    "_sysctl",
    "umount2",
    "unshare",
    "uselib",
    "userfaultfd",
    "ustat",
];

const NS_CONTAINER: i32 = 1;
const NS_NODE: i32 = 2;
const NS_TARGET: i32 = 3;

/// Whether SELinux is enabled on this host (selinuxfs is mounted, as libselinux checks).
fn selinux_enabled() -> bool {
    Path::new("/sys/fs/selinux/enforce").exists()
}

/// Mounts: absolute container paths, absolute existing host paths. An SELinux relabel
/// request is ignored where SELinux is not enabled (containerd's semantics; kubelet asks
/// for it on every volume) and refused where it is: husk applies no SELinux labels.
pub fn validate_mounts(mounts: &[cri::Mount]) -> Result<()> {
    let selinux = mounts.iter().any(|m| m.selinux_relabel) && selinux_enabled();
    for m in mounts {
        if m.selinux_relabel && selinux {
            return Err(invalid(format!(
                "mount {}: SELinux relabeling is not supported by husk (SELinux is enabled on this host)",
                m.container_path
            )));
        }
        if !m.container_path.starts_with('/') {
            return Err(invalid(format!(
                "mount: container_path {:?} must be absolute",
                m.container_path
            )));
        }
        if m.image.as_ref().is_some_and(|i| !i.image.is_empty()) {
            return Err(invalid(format!(
                "mount {}: image volumes are not supported",
                m.container_path
            )));
        }
        if !m.host_path.starts_with('/') {
            return Err(invalid(format!(
                "mount {}: host_path {:?} must be absolute",
                m.container_path, m.host_path
            )));
        }
        if !Path::new(&m.host_path).exists() {
            return Err(invalid(format!(
                "mount {}: host_path {} does not exist",
                m.container_path, m.host_path
            )));
        }
    }
    Ok(())
}

/// Resource values the kernel would refuse or that make no sense.
pub fn validate_resources(r: &cri::LinuxContainerResources) -> Result<()> {
    if r.cpu_shares < 0 || (r.cpu_shares > 0 && r.cpu_shares < 2) || r.cpu_shares > 262_144 {
        return Err(invalid(format!(
            "cpu_shares {} out of range (2..=262144)",
            r.cpu_shares
        )));
    }
    if r.cpu_period != 0 && !(1_000..=1_000_000).contains(&r.cpu_period) {
        return Err(invalid(format!(
            "cpu_period {} out of range (1000..=1000000 µs)",
            r.cpu_period
        )));
    }
    if r.cpu_quota != 0 && r.cpu_quota != -1 && r.cpu_quota < 1_000 {
        return Err(invalid(format!(
            "cpu_quota {} must be -1 or at least 1000 µs",
            r.cpu_quota
        )));
    }
    if r.memory_limit_in_bytes < 0 {
        return Err(invalid(format!(
            "memory_limit_in_bytes {} is negative",
            r.memory_limit_in_bytes
        )));
    }
    if r.memory_limit_in_bytes > 0 && r.memory_limit_in_bytes < 4 << 20 {
        return Err(invalid(format!(
            "memory_limit_in_bytes {} is below the 4 MiB minimum",
            r.memory_limit_in_bytes
        )));
    }
    if !(-1000..=1000).contains(&r.oom_score_adj) {
        return Err(invalid(format!(
            "oom_score_adj {} out of range (-1000..=1000)",
            r.oom_score_adj
        )));
    }
    for (name, v) in [
        ("cpuset_cpus", &r.cpuset_cpus),
        ("cpuset_mems", &r.cpuset_mems),
    ] {
        let ok = v.is_empty()
            || v.split(',').all(|part| {
                let mut it = part.splitn(2, '-');
                let a = it.next().and_then(|x| x.trim().parse::<u32>().ok());
                match (a, it.next()) {
                    (Some(_), None) => true,
                    (Some(a), Some(b)) => b.trim().parse::<u32>().is_ok_and(|b| b >= a),
                    _ => false,
                }
            });
        if !ok {
            return Err(invalid(format!("{name} {v:?} is not a cpu list")));
        }
    }
    Ok(())
}

/// CRI resources → OCI LinuxResources (cpu, memory).
pub fn linux_resources(r: &cri::LinuxContainerResources) -> Result<LinuxResources> {
    let bad = |source| RuntimeError::OciSpec {
        what: "resources",
        source,
    };
    let mut cpu = LinuxCpuBuilder::default();
    if r.cpu_shares > 0 {
        cpu = cpu.shares(r.cpu_shares as u64);
    }
    if r.cpu_quota != 0 {
        cpu = cpu.quota(r.cpu_quota);
    }
    if r.cpu_period > 0 {
        cpu = cpu.period(r.cpu_period as u64);
    }
    if !r.cpuset_cpus.is_empty() {
        cpu = cpu.cpus(r.cpuset_cpus.clone());
    }
    if !r.cpuset_mems.is_empty() {
        cpu = cpu.mems(r.cpuset_mems.clone());
    }
    let mut mem = LinuxMemoryBuilder::default();
    if r.memory_limit_in_bytes > 0 {
        mem = mem.limit(r.memory_limit_in_bytes);
    }
    if r.memory_swap_limit_in_bytes > 0 {
        mem = mem.swap(r.memory_swap_limit_in_bytes);
    }
    LinuxResourcesBuilder::default()
        .cpu(cpu.build().map_err(bad)?)
        .memory(mem.build().map_err(bad)?)
        .build()
        .map_err(bad)
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn cap(name: &str) -> Result<Capability> {
    let full = husk_proto::caps::canonical(name)
        .ok_or_else(|| invalid(format!("unknown capability {name:?}")))?;
    serde_json::from_value(serde_json::Value::String(full.into()))
        .map_err(|_| invalid(format!("unknown capability {name:?}")))
}

/// The capabilities of a mask of the project's table ([`husk_proto::caps`]).
fn caps_of(mask: u64) -> Vec<Capability> {
    husk_proto::caps::names(mask)
        .into_iter()
        .filter_map(|c| cap(c).ok())
        .collect()
}

/// The container's capability sets, containerd's way: a privileged container gets
/// `all` (what the container's starter holds, see [`husk_proto::caps`]) and ignores
/// add/drop; otherwise the defaults, then `ALL` in the add list (→ `all`), `ALL` in the
/// drop list (→ none), then the single adds, then the single drops, so
/// `drop: [ALL], add: [NET_BIND_SERVICE]` keeps NET_BIND_SERVICE.
fn capabilities(
    sc: &cri::LinuxContainerSecurityContext,
    all: u64,
) -> Result<oci_spec::runtime::LinuxCapabilities> {
    let is_all = |c: &String| c.eq_ignore_ascii_case("ALL");
    let mut set: Vec<Capability> = if sc.privileged {
        caps_of(all)
    } else {
        DEFAULT_CAPS.iter().filter_map(|c| cap(c).ok()).collect()
    };
    if let Some(c) = sc.capabilities.as_ref().filter(|_| !sc.privileged) {
        if c.add_capabilities.iter().any(is_all) {
            set = caps_of(all);
        }
        if c.drop_capabilities.iter().any(is_all) {
            set.clear();
        }
        for a in c.add_capabilities.iter().filter(|c| !is_all(c)) {
            let x = cap(a)?;
            if !set.contains(&x) {
                set.push(x);
            }
        }
        for d in c.drop_capabilities.iter().filter(|c| !is_all(c)) {
            let x = cap(d)?;
            set.retain(|c| *c != x);
        }
    }
    let set: oci_spec::runtime::Capabilities = set.into_iter().collect();
    let mut caps = oci_spec::runtime::LinuxCapabilities::default();
    caps.set_bounding(Some(set.clone()));
    caps.set_effective(Some(set.clone()));
    caps.set_permitted(Some(set));
    caps.set_inheritable(None);
    let ambient = sc
        .capabilities
        .as_ref()
        .map(|c| c.add_ambient_capabilities.clone())
        .unwrap_or_default();
    caps.set_ambient(if ambient.is_empty() {
        None
    } else {
        Some(ambient.iter().map(|a| cap(a)).collect::<Result<_>>()?)
    });
    Ok(caps)
}

fn seccomp(
    sc: &cri::LinuxContainerSecurityContext,
    bounding: &[Capability],
) -> Result<Option<LinuxSeccomp>> {
    use cri::security_profile::ProfileType;
    let Some(p) = &sc.seccomp else {
        return Ok(None);
    };
    if sc.privileged {
        return Ok(None);
    }
    match ProfileType::try_from(p.profile_type).unwrap_or(ProfileType::RuntimeDefault) {
        ProfileType::Unconfined => Ok(None),
        ProfileType::RuntimeDefault => {
            let json = serde_json::json!({
                "defaultAction": "SCMP_ACT_ALLOW",
                "architectures": ["SCMP_ARCH_X86_64"],
                "syscalls": [{
                    "names": super::seccomp_gates::deny_list(RUNTIME_DEFAULT_DENY, bounding),
                    "action": "SCMP_ACT_ERRNO", "errnoRet": 1,
                }],
            });
            serde_json::from_value(json)
                .map(Some)
                .map_err(|source| RuntimeError::Json {
                    what: "default seccomp",
                    source,
                })
        }
        ProfileType::Localhost => {
            let path = PathBuf::from(&p.localhost_ref);
            if !path.is_absolute() {
                return Err(invalid(format!(
                    "seccomp localhost profile {:?} must be an absolute path",
                    p.localhost_ref
                )));
            }
            let data = crate::sandbox::validate::read_seccomp_profile(&path)?;
            serde_json::from_slice(&data)
                .map(Some)
                .map_err(|e| invalid(format!("seccomp profile {}: {e}", path.display())))
        }
    }
}

/// The image's `StopSignal` (`SIGQUIT`, `QUIT`, `3`) as a number; 0 when unset.
pub fn stop_signal(image_config: &serde_json::Value) -> Result<i32> {
    let Some(name) = image_config["config"]["StopSignal"]
        .as_str()
        .filter(|s| !s.is_empty())
    else {
        return Ok(0);
    };
    if let Ok(n) = name.parse::<i32>() {
        return if (1..=64).contains(&n) {
            Ok(n)
        } else {
            Err(invalid(format!("image StopSignal {name:?} out of range")))
        };
    }
    let upper = name.to_ascii_uppercase();
    let full = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    full.parse::<nix::sys::signal::Signal>()
        .map(|s| s as i32)
        .map_err(|_| invalid(format!("image StopSignal {name:?} is not a signal")))
}

/// CRI devices → OCI device nodes plus their device-cgroup allow rules.
fn devices(
    config: &cri::ContainerConfig,
) -> Result<(Vec<serde_json::Value>, Vec<serde_json::Value>)> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let (mut nodes, mut rules) = (vec![], vec![]);
    for d in &config.devices {
        if !d.container_path.starts_with('/') {
            return Err(invalid(format!(
                "device: container_path {:?} must be absolute",
                d.container_path
            )));
        }
        let md = std::fs::metadata(&d.host_path)
            .map_err(|e| invalid(format!("device {}: {e}", d.host_path)))?;
        let ft = md.file_type();
        let typ = if ft.is_char_device() {
            "c"
        } else if ft.is_block_device() {
            "b"
        } else {
            return Err(invalid(format!(
                "device {}: not a device node",
                d.host_path
            )));
        };
        let access = if d.permissions.is_empty() {
            "rwm"
        } else {
            d.permissions.as_str()
        };
        if !access.chars().all(|c| "rwm".contains(c)) {
            return Err(invalid(format!(
                "device {}: permissions {access:?} must be made of r, w, m",
                d.host_path
            )));
        }
        let (major, minor) = (
            nix::sys::stat::major(md.rdev()),
            nix::sys::stat::minor(md.rdev()),
        );
        nodes.push(serde_json::json!({
            "path": d.container_path, "type": typ, "major": major, "minor": minor,
            "fileMode": md.mode() & 0o7777, "uid": md.uid(), "gid": md.gid(),
        }));
        rules.push(serde_json::json!({"allow": true, "type": typ, "major": major, "minor": minor, "access": access}));
    }
    Ok((nodes, rules))
}

/// The OCI spec of a container.
///
/// `min_oom_score_adj`: clamp the container's oom_score_adj to at least this
/// (containerd's `restrict_oom_score_adj`, for hosts where root may not lower it).
/// `all_caps`: what "all capabilities" means for this pod (privileged, `ALL`), a mask of
/// [`husk_proto::caps`]. `cgroup_v2`: the sandbox's cgroups are the unified hierarchy (a VM
/// guest always; husk-ns on a cgroup v2 host).
pub fn container_spec(
    config: &cri::ContainerConfig,
    pod: &cri::PodSandboxConfig,
    image_config: &serde_json::Value,
    min_oom_score_adj: Option<i32>,
    all_caps: u64,
    cgroup_v2: bool,
) -> Result<Spec> {
    let img = &image_config["config"];
    let sc = config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.clone())
        .unwrap_or_default();

    // Command: Kubernetes semantics over the image's Entrypoint/Cmd.
    let entrypoint = strings(&img["Entrypoint"]);
    let args: Vec<String> = if !config.command.is_empty() {
        config.command.iter().chain(&config.args).cloned().collect()
    } else if !config.args.is_empty() {
        entrypoint
            .into_iter()
            .chain(config.args.iter().cloned())
            .collect()
    } else {
        entrypoint.into_iter().chain(strings(&img["Cmd"])).collect()
    };
    if args.is_empty() {
        return Err(invalid(
            "no command: neither the container config nor the image gives one",
        ));
    }

    let mut env: Vec<(String, String)> = vec![];
    let mut set_env = |k: &str, v: &str| match env.iter_mut().find(|(ek, _)| ek == k) {
        Some(e) => e.1 = v.to_string(),
        None => env.push((k.to_string(), v.to_string())),
    };
    for e in strings(&img["Env"]) {
        let (k, v) = e.split_once('=').unwrap_or((&e, ""));
        set_env(k, v);
    }
    for kv in &config.envs {
        set_env(&kv.key, &kv.value);
    }
    if !env.iter().any(|(k, _)| k == "PATH") {
        env.insert(
            0,
            (
                "PATH".into(),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
            ),
        );
    }
    let env: Vec<String> = env.into_iter().map(|(k, v)| format!("{k}={v}")).collect();

    let cwd = if !config.working_dir.is_empty() {
        config.working_dir.clone()
    } else {
        img["WorkingDir"]
            .as_str()
            .filter(|s| !s.is_empty())
            .unwrap_or("/")
            .to_string()
    };
    if !cwd.starts_with('/') {
        return Err(invalid(format!("working_dir {cwd:?} must be absolute")));
    }

    // User: the security context wins over the image's User (containerd's rules). A group
    // without a user is refused; without a group the agent takes the user's primary group
    // from the image's /etc/passwd, and the groups of /etc/group that list the user join
    // the CRI's supplemental groups.
    let mut user = oci_spec::runtime::User::default();
    let image_user = img["User"].as_str().unwrap_or("");
    let (img_u, img_g) = image_user.split_once(':').unwrap_or((image_user, ""));
    if sc.run_as_group.is_some() && sc.run_as_user.is_none() && sc.run_as_username.is_empty() {
        return Err(invalid(
            "security context: run_as_group is set without run_as_user or run_as_username",
        ));
    }
    let from_cri = sc.run_as_user.is_some() || !sc.run_as_username.is_empty();
    match (&sc.run_as_user, sc.run_as_username.as_str()) {
        (Some(u), _) => {
            user.set_uid(
                u32::try_from(u.value)
                    .map_err(|_| invalid(format!("run_as_user {} out of range", u.value)))?,
            );
        }
        (None, name) if !name.is_empty() => {
            user.set_username(Some(name.to_string()));
        }
        (None, _) => match img_u.parse::<u32>() {
            Ok(uid) => {
                user.set_uid(uid);
            }
            Err(_) if !img_u.is_empty() => {
                user.set_username(Some(img_u.to_string()));
            }
            Err(_) => {}
        },
    }
    user.set_gid(husk_proto::GID_FROM_PASSWD);
    if let Some(g) = &sc.run_as_group {
        user.set_gid(
            u32::try_from(g.value)
                .ok()
                .filter(|g| *g != husk_proto::GID_FROM_PASSWD)
                .ok_or_else(|| invalid(format!("run_as_group {} out of range", g.value)))?,
        );
    } else if !from_cri && let Ok(gid) = img_g.parse::<u32>() {
        user.set_gid(gid);
    }
    if !sc.supplemental_groups.is_empty() {
        let gids = sc
            .supplemental_groups
            .iter()
            .map(|g| {
                u32::try_from(*g)
                    .ok()
                    .filter(|g| *g != husk_proto::GID_FROM_PASSWD)
                    .ok_or_else(|| invalid(format!("supplemental group {g} out of range")))
            })
            .collect::<Result<Vec<_>>>()?;
        user.set_additional_gids(Some(gids));
    }

    let mut spec = Spec::default();
    spec.set_hostname(None);
    let mut process = oci_spec::runtime::Process::default();
    process.set_args(Some(args));
    process.set_env(Some(env));
    process.set_cwd(PathBuf::from(cwd));
    process.set_user(user);
    process.set_terminal(Some(config.tty));
    process.set_no_new_privileges(Some(sc.no_new_privs));
    process.set_capabilities(Some(capabilities(&sc, all_caps)?));
    let res = config
        .linux
        .as_ref()
        .and_then(|l| l.resources.clone())
        .unwrap_or_default();
    let adj = match min_oom_score_adj {
        Some(min) if (res.oom_score_adj as i32) < min => min,
        _ => res.oom_score_adj as i32,
    };
    if adj != 0 {
        process.set_oom_score_adj(Some(adj));
    }
    spec.set_process(Some(process));

    let mut root = oci_spec::runtime::Root::default();
    root.set_readonly(Some(sc.readonly_rootfs));
    spec.set_root(Some(root));

    // Mounts: defaults, minus what the CRI mounts over.
    let mut mounts: Vec<Mount> = spec.mounts().clone().unwrap_or_default();
    mounts.retain(|m| {
        !config
            .mounts
            .iter()
            .any(|c| Path::new(&c.container_path) == m.destination())
    });
    // A privileged container gets /sys and its cgroup file system writable, as containerd
    // gives them (its CRI: `WithWriteableSysfs`, `WithWriteableCgroupfs`).
    if sc.privileged {
        for m in mounts
            .iter_mut()
            .filter(|m| matches!(m.typ().as_deref(), Some("sysfs" | "cgroup" | "cgroup2")))
        {
            let options = m
                .options()
                .clone()
                .unwrap_or_default()
                .into_iter()
                .map(|o| if o == "ro" { "rw".to_string() } else { o })
                .collect();
            m.set_options(Some(options));
        }
    }
    for m in &config.mounts {
        let propagation = match cri::MountPropagation::try_from(m.propagation)
            .unwrap_or(cri::MountPropagation::PropagationPrivate)
        {
            cri::MountPropagation::PropagationPrivate => "rprivate",
            cri::MountPropagation::PropagationHostToContainer => "rslave",
            cri::MountPropagation::PropagationBidirectional => "rshared",
        };
        let mut mount = Mount::default();
        mount.set_destination(PathBuf::from(&m.container_path));
        mount.set_source(Some(PathBuf::from(&m.host_path)));
        mount.set_typ(Some("bind".into()));
        let mut options: Vec<String> = vec![
            "rbind".into(),
            if m.readonly { "ro" } else { "rw" }.into(),
            propagation.into(),
        ];
        // A volume never lends its set-id binaries, file capabilities or device nodes to
        // an unprivileged container (its device cgroup would refuse the nodes anyway). A
        // privileged one gets the host's view, as containerd gives it: it could remount
        // the bind without them, and device plugins and CSI drivers need `/dev` nodes.
        if !sc.privileged {
            options.extend(["nosuid".into(), "nodev".into()]);
        }
        mount.set_options(Some(options));
        mounts.push(mount);
    }
    spec.set_mounts(Some(mounts));

    // Namespaces: net/ipc/uts are the pod's (the agent joins them); mount is
    // new; pid new per container unless the pod shares one.
    let ns = sc.namespace_options.clone().unwrap_or_default();
    let mut namespaces = vec![];
    let mut mnt = LinuxNamespace::default();
    mnt.set_typ(LinuxNamespaceType::Mount);
    namespaces.push(mnt);
    match ns.pid {
        NS_CONTAINER => {
            let mut pid = LinuxNamespace::default();
            pid.set_typ(LinuxNamespaceType::Pid);
            namespaces.push(pid);
        }
        NS_NODE => return Err(invalid("host PID namespace is not supported by husk")),
        NS_TARGET => {
            return Err(invalid(
                "target PID namespaces are not supported by husk yet",
            ));
        }
        _ => {}
    }
    // A cgroup namespace of its own on cgroup v2, unless privileged, as containerd gives it:
    // the container sees its own cgroup as /sys/fs/cgroup and "0::/" in /proc/self/cgroup.
    // (It also keeps the container's cgroup2 mount out of the initial cgroup namespace,
    // where a mount re-applies its options to the whole hierarchy.)
    if cgroup_v2 && !sc.privileged {
        let mut cg = LinuxNamespace::default();
        cg.set_typ(LinuxNamespaceType::Cgroup);
        namespaces.push(cg);
    }
    let mut linux = spec.linux().clone().unwrap_or_default();
    linux.set_namespaces(Some(namespaces));
    let mut resources = linux_resources(&res)?;
    let (nodes, rules) = devices(config)?;
    if !nodes.is_empty() {
        let bad = |source| RuntimeError::Json {
            what: "device",
            source,
        };
        linux.set_devices(Some(
            serde_json::from_value(serde_json::Value::Array(nodes)).map_err(bad)?,
        ));
        resources.set_devices(Some(
            serde_json::from_value(serde_json::Value::Array(rules)).map_err(bad)?,
        ));
    }
    linux.set_resources(Some(resources));
    let mut sysctl: HashMap<String, String> = pod
        .linux
        .as_ref()
        .map(|l| l.sysctls.clone())
        .unwrap_or_default();
    sysctl.retain(|_, _| true);
    linux.set_sysctl(if sysctl.is_empty() {
        None
    } else {
        Some(sysctl)
    });
    if sc.privileged {
        linux.set_masked_paths(None);
        linux.set_readonly_paths(None);
    } else {
        if !sc.masked_paths.is_empty() {
            linux.set_masked_paths(Some(sc.masked_paths.clone()));
        }
        if !sc.readonly_paths.is_empty() {
            linux.set_readonly_paths(Some(sc.readonly_paths.clone()));
        }
    }
    let bounding = spec
        .process()
        .as_ref()
        .and_then(|p| p.capabilities().as_ref())
        .and_then(|c| c.bounding().as_ref())
        .map(|b| b.iter().copied().collect::<Vec<_>>())
        .unwrap_or_default();
    linux.set_seccomp(seccomp(&sc, &bounding)?);
    linux.set_cgroups_path(None);
    spec.set_linux(Some(linux));
    let annotations: HashMap<String, String> = config.annotations.clone().into_iter().collect();
    spec.set_annotations(Some(annotations));
    Ok(spec)
}

/// CRI container status of a container view.
#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn config(f: impl FnOnce(&mut cri::ContainerConfig)) -> cri::ContainerConfig {
        let mut c = cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: "c".into(),
                attempt: 0,
            }),
            image: Some(cri::ImageSpec {
                image: "busybox".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        f(&mut c);
        c
    }

    fn image() -> serde_json::Value {
        serde_json::json!({"config": {"Env": ["PATH=/bin", "A=1"], "Entrypoint": ["/bin/ep"], "Cmd": ["x"], "User": "65534:65534", "WorkingDir": "/w"}})
    }

    #[test]
    fn command_env_user_from_image_and_config() {
        let s = container_spec(
            &config(|_| {}),
            &Default::default(),
            &image(),
            None,
            husk_proto::caps::ALL,
            true,
        )
        .unwrap();
        let p = s.process().as_ref().unwrap();
        assert_eq!(
            p.args().as_ref().unwrap(),
            &vec!["/bin/ep".to_string(), "x".into()]
        );
        assert_eq!(p.cwd(), Path::new("/w"));
        assert_eq!((p.user().uid(), p.user().gid()), (65534, 65534));

        let c = config(|c| {
            c.args = vec!["a".into()];
            c.envs = vec![cri::KeyValue {
                key: "A".into(),
                value: "2".into(),
            }];
            c.linux = Some(cri::LinuxContainerConfig {
                security_context: Some(cri::LinuxContainerSecurityContext {
                    run_as_user: Some(cri::Int64Value { value: 7 }),
                    capabilities: Some(cri::Capability {
                        add_capabilities: vec!["sys_admin".into()],
                        drop_capabilities: vec!["CAP_KILL".into()],
                        ..Default::default()
                    }),
                    namespace_options: Some(cri::NamespaceOption {
                        pid: NS_CONTAINER,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                resources: Some(cri::LinuxContainerResources {
                    memory_limit_in_bytes: 64 << 20,
                    cpu_quota: 50_000,
                    cpu_period: 100_000,
                    ..Default::default()
                }),
            });
        });
        let s = container_spec(
            &c,
            &Default::default(),
            &image(),
            None,
            husk_proto::caps::ALL,
            true,
        )
        .unwrap();
        let p = s.process().as_ref().unwrap();
        assert_eq!(
            p.args().as_ref().unwrap(),
            &vec!["/bin/ep".to_string(), "a".into()]
        );
        assert!(p.env().as_ref().unwrap().contains(&"A=2".to_string()));
        assert_eq!(p.user().uid(), 7);
        let caps = p
            .capabilities()
            .as_ref()
            .unwrap()
            .bounding()
            .as_ref()
            .unwrap();
        assert!(caps.contains(&Capability::SysAdmin) && !caps.contains(&Capability::Kill));
        assert!(caps.contains(&Capability::Chown), "defaults kept");
        let l = s.linux().as_ref().unwrap();
        assert!(
            l.namespaces()
                .as_ref()
                .unwrap()
                .iter()
                .any(|n| n.typ() == LinuxNamespaceType::Pid)
        );
        assert!(
            !l.namespaces()
                .as_ref()
                .unwrap()
                .iter()
                .any(|n| n.typ() == LinuxNamespaceType::Network)
        );
        let r = l.resources().as_ref().unwrap();
        assert_eq!(r.memory().as_ref().unwrap().limit(), Some(64 << 20));
        assert_eq!(r.cpu().as_ref().unwrap().quota(), Some(50_000));
        let mut c2 = c.clone();
        c2.linux
            .as_mut()
            .unwrap()
            .resources
            .as_mut()
            .unwrap()
            .oom_score_adj = -997;
        let adj = |min| {
            container_spec(
                &c2,
                &Default::default(),
                &image(),
                min,
                husk_proto::caps::ALL,
                true,
            )
            .unwrap()
            .process()
            .as_ref()
            .unwrap()
            .oom_score_adj()
        };
        assert_eq!(adj(None), Some(-997));
        assert_eq!(adj(Some(0)), None);
        let json = serde_json::to_value(&s).unwrap();
        assert!(json.get("hostname").is_none());
    }

    #[test]
    fn bad_values_are_invalid_argument() {
        let bad = |r: cri::LinuxContainerResources| {
            matches!(
                validate_resources(&r),
                Err(RuntimeError::InvalidArgument(_))
            )
        };
        assert!(bad(cri::LinuxContainerResources {
            memory_limit_in_bytes: -1,
            ..Default::default()
        }));
        assert!(bad(cri::LinuxContainerResources {
            cpu_shares: -5,
            ..Default::default()
        }));
        assert!(bad(cri::LinuxContainerResources {
            cpu_period: 10,
            ..Default::default()
        }));
        assert!(bad(cri::LinuxContainerResources {
            cpuset_cpus: "0-x".into(),
            ..Default::default()
        }));
        assert!(
            validate_resources(&cri::LinuxContainerResources {
                cpuset_cpus: "0-1,3".into(),
                cpu_quota: -1,
                ..Default::default()
            })
            .is_ok()
        );
        let m = |c: &str, h: &str| {
            vec![cri::Mount {
                container_path: c.into(),
                host_path: h.into(),
                ..Default::default()
            }]
        };
        assert!(validate_mounts(&m("/data", "/tmp")).is_ok());
        assert!(validate_mounts(&m("data", "/tmp")).is_err());
        assert!(validate_mounts(&m("/data", "tmp")).is_err());
        assert!(validate_mounts(&m("/data", "/nonexistent/husk")).is_err());
        let c = config(|c| c.working_dir = "rel".into());
        assert!(
            container_spec(
                &c,
                &Default::default(),
                &image(),
                None,
                husk_proto::caps::ALL,
                true
            )
            .is_err()
        );
        let c = config(|c| {
            c.linux = Some(cri::LinuxContainerConfig {
                security_context: Some(cri::LinuxContainerSecurityContext {
                    capabilities: Some(cri::Capability {
                        add_capabilities: vec!["CAP_NOPE".into()],
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                resources: None,
            })
        });
        assert!(
            container_spec(
                &c,
                &Default::default(),
                &image(),
                None,
                husk_proto::caps::ALL,
                true
            )
            .is_err()
        );
    }

    #[test]
    fn devices_from_host_nodes() {
        let dev = |host: &str, perms: &str| {
            config(|c| {
                c.devices = vec![cri::Device {
                    container_path: "/dev/x".into(),
                    host_path: host.into(),
                    permissions: perms.into(),
                }]
            })
        };
        let s = container_spec(
            &dev("/dev/null", "rw"),
            &Default::default(),
            &image(),
            None,
            husk_proto::caps::ALL,
            true,
        )
        .unwrap();
        let l = s.linux().as_ref().unwrap();
        let d = &l.devices().as_ref().unwrap()[0];
        assert_eq!((d.major(), d.minor()), (1, 3));
        let rule = &l.resources().as_ref().unwrap().devices().as_ref().unwrap()[0];
        assert_eq!(rule.access().as_deref(), Some("rw"));
        assert!(
            container_spec(
                &dev("/etc/passwd", ""),
                &Default::default(),
                &image(),
                None,
                husk_proto::caps::ALL,
                true
            )
            .is_err()
        );
        assert!(
            container_spec(
                &dev("/dev/null", "rwx"),
                &Default::default(),
                &image(),
                None,
                husk_proto::caps::ALL,
                true
            )
            .is_err()
        );
        assert!(
            container_spec(
                &dev("/no/such/dev", ""),
                &Default::default(),
                &image(),
                None,
                husk_proto::caps::ALL,
                true
            )
            .is_err()
        );
    }

    fn sc_spec(
        sc: cri::LinuxContainerSecurityContext,
        image: serde_json::Value,
        all: u64,
    ) -> Result<Spec> {
        let c = config(|c| {
            c.linux = Some(cri::LinuxContainerConfig {
                security_context: Some(sc),
                resources: None,
            })
        });
        container_spec(&c, &Default::default(), &image, None, all, true)
    }

    fn bounding(s: &Spec) -> Vec<Capability> {
        let p = s.process().as_ref().unwrap();
        let b = p
            .capabilities()
            .as_ref()
            .unwrap()
            .bounding()
            .as_ref()
            .unwrap();
        let mut v: Vec<Capability> = b.iter().copied().collect();
        v.sort_by_key(|c| husk_proto::caps::number(&c.to_string()));
        v
    }

    /// containerd's rule: on cgroup v2 a container gets a cgroup namespace of its own unless
    /// it is privileged; on cgroup v1 none does.
    #[test]
    fn cgroup_namespace_on_v2_unless_privileged() {
        let has_cgroupns = |privileged: bool, v2: bool| {
            let c = config(|c| {
                c.linux = Some(cri::LinuxContainerConfig {
                    security_context: Some(cri::LinuxContainerSecurityContext {
                        privileged,
                        ..Default::default()
                    }),
                    resources: None,
                })
            });
            let pod = if privileged {
                cri::PodSandboxConfig {
                    linux: Some(cri::LinuxPodSandboxConfig {
                        security_context: Some(cri::LinuxSandboxSecurityContext {
                            privileged: true,
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }
            } else {
                cri::PodSandboxConfig::default()
            };
            let s = container_spec(&c, &pod, &image(), None, husk_proto::caps::ALL, v2).unwrap();
            s.linux()
                .as_ref()
                .unwrap()
                .namespaces()
                .as_ref()
                .unwrap()
                .iter()
                .any(|n| n.typ() == LinuxNamespaceType::Cgroup)
        };
        assert!(has_cgroupns(false, true));
        assert!(!has_cgroupns(true, true));
        assert!(!has_cgroupns(false, false));
        assert!(!has_cgroupns(true, false));
    }

    #[test]
    fn privileged_containers_get_sysfs_writable_as_containerd_gives_it() {
        let host = husk_proto::caps::ALL;
        let sys = |privileged: bool| {
            let sc = cri::LinuxContainerSecurityContext {
                privileged,
                ..Default::default()
            };
            let spec = sc_spec(sc, image(), host).unwrap();
            let m = spec
                .mounts()
                .clone()
                .unwrap()
                .into_iter()
                .find(|m| m.destination() == Path::new("/sys"))
                .expect("a /sys mount");
            m.options().clone().unwrap_or_default()
        };
        let (p, u) = (sys(true), sys(false));
        assert!(
            p.iter().any(|o| o == "rw") && !p.iter().any(|o| o == "ro"),
            "{p:?}"
        );
        assert!(u.iter().any(|o| o == "ro"), "{u:?}");
    }

    #[test]
    fn privileged_and_all_are_the_starters_set() {
        // A host that withholds CAP_SYS_RESOURCE (24): privileged and ALL stop short of it.
        let host = husk_proto::caps::ALL & !(1 << 24);
        let privileged = cri::LinuxContainerSecurityContext {
            privileged: true,
            capabilities: Some(cri::Capability {
                drop_capabilities: vec!["CHOWN".into()],
                ..Default::default()
            }),
            ..Default::default()
        };
        let s = sc_spec(privileged, image(), host).unwrap();
        let b = bounding(&s);
        assert_eq!(b.len(), husk_proto::caps::NAMES.len() - 1, "{b:?}");
        assert!(!b.contains(&Capability::SysResource));
        assert!(b.contains(&Capability::Chown), "privileged ignores drops");
        assert!(b.contains(&Capability::Bpf) && b.contains(&Capability::CheckpointRestore));
        let all = |add: &[&str], drop: &[&str]| cri::LinuxContainerSecurityContext {
            capabilities: Some(cri::Capability {
                add_capabilities: add.iter().map(|s| s.to_string()).collect(),
                drop_capabilities: drop.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let b = bounding(&sc_spec(all(&["ALL"], &["KILL"]), image(), host).unwrap());
        assert_eq!(b.len(), husk_proto::caps::NAMES.len() - 2);
        assert!(!b.contains(&Capability::Kill) && !b.contains(&Capability::SysResource));
        // Drop ALL then add one: the one stays (containerd's order).
        let b = bounding(&sc_spec(all(&["NET_BIND_SERVICE"], &["ALL"]), image(), host).unwrap());
        assert_eq!(b, vec![Capability::NetBindService]);
        // The three newest capabilities are known on the host side too.
        let b = bounding(&sc_spec(all(&["PERFMON", "BPF"], &[]), image(), host).unwrap());
        assert!(b.contains(&Capability::Perfmon) && b.contains(&Capability::Bpf));
    }

    #[test]
    fn user_and_group_rules() {
        let user =
            |u: Option<i64>, g: Option<i64>, name: &str| cri::LinuxContainerSecurityContext {
                run_as_user: u.map(|value| cri::Int64Value { value }),
                run_as_group: g.map(|value| cri::Int64Value { value }),
                run_as_username: name.into(),
                supplemental_groups: vec![1234],
                ..Default::default()
            };
        let ids = |s: &Spec| {
            let u = s.process().as_ref().unwrap().user();
            (
                u.uid(),
                u.gid(),
                u.username().clone(),
                u.additional_gids().clone(),
            )
        };
        let no_user = serde_json::json!({"config": {"Cmd": ["x"]}});
        // A user without a group: the agent takes the group from /etc/passwd.
        let s = sc_spec(user(Some(1000), None, ""), no_user.clone(), 0).unwrap();
        assert_eq!(
            ids(&s),
            (1000, husk_proto::GID_FROM_PASSWD, None, Some(vec![1234]))
        );
        // The image's group is not the CRI user's.
        let s = sc_spec(user(Some(1000), None, ""), image(), 0).unwrap();
        assert_eq!(ids(&s).1, husk_proto::GID_FROM_PASSWD);
        let s = sc_spec(user(Some(1000), Some(50), ""), image(), 0).unwrap();
        assert_eq!(ids(&s).1, 50);
        let s = sc_spec(user(None, Some(50), "alice"), image(), 0).unwrap();
        assert_eq!(ids(&s), (0, 50, Some("alice".into()), Some(vec![1234])));
        // A group without a user is refused, with or without an image user.
        for img in [no_user, image()] {
            let e = sc_spec(user(None, Some(50), ""), img, 0).unwrap_err();
            assert!(
                matches!(&e, RuntimeError::InvalidArgument(m) if m.contains("run_as_group")),
                "{e:?}"
            );
        }
        assert!(sc_spec(user(Some(1), Some(u32::MAX as i64), ""), image(), 0).is_err());
    }

    #[test]
    fn stop_signals() {
        let img = |s: &str| serde_json::json!({"config": {"StopSignal": s}});
        assert_eq!(stop_signal(&serde_json::json!({})).unwrap(), 0);
        assert_eq!(stop_signal(&img("SIGQUIT")).unwrap(), libc::SIGQUIT);
        assert_eq!(stop_signal(&img("usr1")).unwrap(), libc::SIGUSR1);
        assert_eq!(stop_signal(&img("9")).unwrap(), 9);
        assert!(stop_signal(&img("SIGNOPE")).is_err());
    }

    #[test]
    fn runtime_default_seccomp_parses() {
        let sc = cri::LinuxContainerSecurityContext {
            seccomp: Some(cri::SecurityProfile::default()),
            ..Default::default()
        };
        let s = seccomp(&sc, &[]).unwrap().unwrap();
        assert_eq!(
            s.syscalls().as_ref().unwrap()[0].names().len(),
            RUNTIME_DEFAULT_DENY.len()
        );
    }
}

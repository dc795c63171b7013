//! Wire (generated protobuf) <-> domain conversions.

use std::path::PathBuf;

use husk_proto::agent as pb;

use crate::cgroup::Stats;
use crate::container::create::RootfsSource;
use crate::container::stats::LayerUsage;
use crate::container::{Container, Status, unix_nanos};
use crate::sandbox::{SandboxConfig, SandboxMount};

pub fn sandbox_config(r: &pb::CreateSandboxRequest) -> SandboxConfig {
    let ns = r.namespaces.as_ref();
    let dns = r.dns.as_ref();
    SandboxConfig {
        id: r.sandbox_id.clone(),
        hostname: r.hostname.clone(),
        dns_servers: dns.map(|d| d.servers.clone()).unwrap_or_default(),
        dns_searches: dns.map(|d| d.searches.clone()).unwrap_or_default(),
        dns_options: dns.map(|d| d.options.clone()).unwrap_or_default(),
        hosts: r.hosts.clone(),
        new_net: ns.is_some_and(|n| n.network),
        new_ipc: ns.is_some_and(|n| n.ipc),
        new_uts: ns.is_some_and(|n| n.uts),
        new_pid: ns.is_some_and(|n| n.pid),
        network_path: ns
            .map(|n| n.network_path.clone())
            .filter(|p| !p.is_empty())
            .map(PathBuf::from),
        mounts: r
            .mounts
            .iter()
            .map(|m| SandboxMount {
                name: m.name.clone(),
                source: m.source.clone(),
                fstype: m.fstype.clone(),
                options: m.options.clone(),
            })
            .collect(),
        shm_size: r.shm_size,
        cgroup_parent: r.cgroup_parent.clone(),
        resources: r.resources.clone(),
        keep_spare: false,
    }
}

pub fn rootfs(r: Option<&pb::Rootfs>) -> Option<RootfsSource> {
    match r?.source.as_ref()? {
        pb::rootfs::Source::Overlay(o) => Some(RootfsSource::Overlay {
            lower_dirs: o.lower_dirs.iter().map(PathBuf::from).collect(),
        }),
        pb::rootfs::Source::Block(b) => Some(RootfsSource::Block {
            device: PathBuf::from(&b.device),
            fstype: b.fstype.clone(),
            options: b.options.clone(),
            subpath: b.subpath.clone(),
            overlay: b.overlay,
        }),
        pb::rootfs::Source::Path(p) => Some(RootfsSource::Path(PathBuf::from(p))),
        _ => None,
    }
}

pub fn container_state(c: &Container) -> pb::ContainerStateResponse {
    let exit = c.init.exited();
    let status = match c.status() {
        Status::Created => pb::ContainerStatus::CONTAINER_STATUS_CREATED,
        Status::Running => pb::ContainerStatus::CONTAINER_STATUS_RUNNING,
        Status::Stopped => pb::ContainerStatus::CONTAINER_STATUS_STOPPED,
    };
    pb::ContainerStateResponse {
        container_id: c.id.clone(),
        status: status.into(),
        pid: c.init.pid as u32,
        exit_code: exit.map(|e| e.code).unwrap_or(0),
        created_at: unix_nanos(Some(c.created_at)),
        started_at: unix_nanos(*crate::sync::lock(&c.init.started_at)),
        finished_at: unix_nanos(exit.map(|e| e.at)),
        oom_killed: c.oom_killed(),
        ..Default::default()
    }
}

pub fn stats(s: &Stats, layer: Option<LayerUsage>) -> pb::ContainerStatsResponse {
    pb::ContainerStatsResponse {
        timestamp: unix_nanos(Some(std::time::SystemTime::now())),
        cpu_usage_ns: s.cpu_usage_ns,
        memory_usage_bytes: s.memory_usage,
        memory_working_set_bytes: s.memory_working_set,
        memory_limit_bytes: s.memory_limit,
        pids_current: s.pids_current,
        pids_limit: s.pids_limit,
        io_read_bytes: s.io_read_bytes,
        io_write_bytes: s.io_write_bytes,
        oom_kills: s.oom_kills,
        writable_layer: layer
            .map(|l| pb::WritableLayerUsage {
                used_bytes: l.used_bytes,
                inodes_used: l.inodes_used,
                truncated: l.truncated,
                ..Default::default()
            })
            .into(),
        cpu_user_ns: s.cpu_user_ns,
        cpu_system_ns: s.cpu_system_ns,
        cpu_nr_periods: s.cpu_nr_periods,
        cpu_nr_throttled: s.cpu_nr_throttled,
        cpu_throttled_ns: s.cpu_throttled_ns,
        memory_rss_bytes: s.memory_rss,
        memory_cache_bytes: s.memory_cache,
        memory_mapped_file_bytes: s.memory_mapped_file,
        memory_swap_bytes: s.memory_swap,
        memory_max_usage_bytes: s.memory_max_usage,
        memory_pgfault: s.memory_pgfault,
        memory_pgmajfault: s.memory_pgmajfault,
        io_devices: s
            .io_devices
            .iter()
            .map(|d| pb::IoDeviceStats {
                major: d.major,
                minor: d.minor,
                read_bytes: d.read_bytes,
                write_bytes: d.write_bytes,
                reads: d.reads,
                writes: d.writes,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

pub fn network(
    r: &pb::ConfigureNetworkRequest,
) -> Result<
    (
        Vec<crate::network::InterfaceConfig>,
        Vec<crate::network::RouteConfig>,
    ),
    crate::network::NetError,
> {
    use crate::network::{InterfaceConfig, NetError, RouteConfig, parse_cidr};
    let some = |s: &str| (!s.is_empty()).then(|| s.to_string());
    let interfaces = r
        .interfaces
        .iter()
        .map(|i| {
            if i.mac.is_empty() && i.name.is_empty() {
                return Err(NetError::NoInterface("(neither mac nor name)".into()));
            }
            Ok(InterfaceConfig {
                mac: some(&i.mac),
                name: some(&i.name),
                addresses: i
                    .addresses
                    .iter()
                    .map(|a| parse_cidr(a))
                    .collect::<Result<_, _>>()?,
                mtu: i.mtu,
                set_mac: match i.set_mac.as_str() {
                    "" => None,
                    m => Some(crate::network::parse_mac(m)?),
                },
            })
        })
        .collect::<Result<_, _>>()?;
    let routes = r
        .routes
        .iter()
        .map(|rt| {
            let destination = match rt.destination.as_str() {
                "" | "default" => None,
                d => Some(parse_cidr(d)?),
            };
            let gateway = match rt.gateway.as_str() {
                "" => None,
                g => Some(g.parse().map_err(|_| NetError::Address(g.to_string()))?),
            };
            if destination.is_none() && gateway.is_none() {
                return Err(NetError::Address("default route without a gateway".into()));
            }
            Ok(RouteConfig {
                destination,
                gateway,
                device: some(&rt.device),
            })
        })
        .collect::<Result<_, _>>()?;
    Ok((interfaces, routes))
}

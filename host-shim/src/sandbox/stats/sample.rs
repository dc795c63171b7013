//! One stats sample: the agent's reply bounded and validated, stamped with
//! huskd's own clock (a guest's clock is not trusted, and under TCG it drifts),
//! the CPU rate kept from the previous sample, and its rendering in CRI terms.

use std::sync::{Arc, Mutex};

use husk_proto::agent as pb;
use husk_proto::cri;

use super::super::lock;

/// At most this many interfaces of a pod are kept (the rest of a reply is dropped).
pub const MAX_INTERFACES: usize = 64;
/// At most this many block devices of a container are kept.
pub const MAX_IO_DEVICES: usize = 64;
/// `usage_nano_cores` is computed over at least this window: a second read
/// sooner than that repeats the last rate instead of dividing by a few ms.
pub const RATE_WINDOW_NS: i64 = 1_000_000_000;

pub(super) fn u64v(v: u64) -> Option<cri::UInt64Value> {
    Some(cri::UInt64Value { value: v })
}

/// The last sample of a container or pod (None before the first).
pub struct SampleCell<T>(Mutex<Option<Arc<T>>>);

impl<T> Default for SampleCell<T> {
    fn default() -> Self {
        Self(Mutex::new(None))
    }
}

impl<T> SampleCell<T> {
    pub fn get(&self) -> Option<Arc<T>> {
        lock(&self.0).clone()
    }

    /// Replaces the sample with `make(previous)` and returns it.
    pub fn update(&self, make: impl FnOnce(Option<&T>) -> T) -> Arc<T> {
        let mut g = lock(&self.0);
        let new = Arc::new(make(g.as_deref()));
        *g = Some(new.clone());
        new
    }
}

/// What a CPU rate is computed from: (huskd time ns, cumulative CPU ns).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateBase {
    pub at: i64,
    pub cpu_ns: u64,
}

/// CPU nanoseconds per second over [base, now]: the rate and the base the next
/// sample starts from. A counter that went backwards (a restarted agent or
/// cgroup) starts over; a window shorter than [`RATE_WINDOW_NS`] repeats the
/// previous rate. Bounded by the host's CPUs (a guest cannot use more).
pub fn cpu_rate(
    prev: Option<(RateBase, Option<u64>)>,
    at: i64,
    cpu_ns: u64,
) -> (Option<u64>, RateBase) {
    let now = RateBase { at, cpu_ns };
    let Some((base, last_rate)) = prev else {
        return (None, now);
    };
    if cpu_ns < base.cpu_ns || at < base.at {
        return (None, now);
    }
    let dt = at - base.at;
    if dt < RATE_WINDOW_NS {
        return (last_rate, base);
    }
    let rate = (cpu_ns - base.cpu_ns) as u128 * 1_000_000_000 / dt as u128;
    (Some((rate as u64).min(max_nano_cores())), now)
}

/// The host's CPUs in nano cores.
pub fn max_nano_cores() -> u64 {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get() as u64)
        .unwrap_or(1);
    cpus.saturating_mul(1_000_000_000)
}

/// A container's (or a pod cgroup's) readings as huskd keeps them.
fn sanitize(mut s: pb::ContainerStatsResponse) -> pb::ContainerStatsResponse {
    s.memory_working_set_bytes = s.memory_working_set_bytes.min(s.memory_usage_bytes);
    s.io_devices.truncate(MAX_IO_DEVICES);
    s.timestamp = 0; // the guest's clock: replaced by huskd's
    s
}

/// An interface name as Linux allows it (IFNAMSIZ, no '/', ':' or whitespace):
/// anything else from a guest is dropped, as is everything past [`MAX_INTERFACES`].
fn valid_ifname(n: &str) -> bool {
    !n.is_empty()
        && n.len() < 16
        && n != "."
        && n != ".."
        && n.bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':')
}

/// A sample of one container.
#[derive(Debug, Clone)]
pub struct ContainerSample {
    /// huskd's clock when the reply came (unix ns).
    pub at: i64,
    pub s: pb::ContainerStatsResponse,
    pub nano_cores: Option<u64>,
    base: RateBase,
}

impl ContainerSample {
    pub fn new(prev: Option<&ContainerSample>, s: pb::ContainerStatsResponse, at: i64) -> Self {
        let s = sanitize(s);
        let (nano_cores, base) = cpu_rate(prev.map(|p| (p.base, p.nano_cores)), at, s.cpu_usage_ns);
        Self {
            at,
            s,
            nano_cores,
            base,
        }
    }

    /// The CRI stats; `fs_mount`: the host directory standing for the
    /// filesystem of the writable layer (None when it is not a host one).
    pub fn to_cri(
        &self,
        attributes: cri::ContainerAttributes,
        fs_mount: Option<&str>,
    ) -> cri::ContainerStats {
        let (s, ts) = (&self.s, self.at);
        cri::ContainerStats {
            attributes: Some(attributes),
            cpu: Some(cri::CpuUsage {
                timestamp: ts,
                usage_core_nano_seconds: u64v(s.cpu_usage_ns),
                usage_nano_cores: self.nano_cores.and_then(u64v),
            }),
            memory: Some(memory(s, ts)),
            writable_layer: s.writable_layer.as_ref().map(|l| cri::FilesystemUsage {
                timestamp: ts,
                fs_id: fs_mount.map(|m| cri::FilesystemIdentifier {
                    mountpoint: m.to_string(),
                }),
                used_bytes: u64v(l.used_bytes),
                inodes_used: u64v(l.inodes_used),
            }),
            swap: Some(cri::SwapUsage {
                timestamp: ts,
                swap_usage_bytes: u64v(s.memory_swap_bytes),
                ..Default::default()
            }),
        }
    }
}

fn memory(s: &pb::ContainerStatsResponse, ts: i64) -> cri::MemoryUsage {
    let limited = s.memory_limit_bytes > 0 && s.memory_limit_bytes < u64::MAX / 2;
    cri::MemoryUsage {
        timestamp: ts,
        working_set_bytes: u64v(s.memory_working_set_bytes),
        usage_bytes: u64v(s.memory_usage_bytes),
        available_bytes: limited
            .then(|| {
                s.memory_limit_bytes
                    .saturating_sub(s.memory_working_set_bytes)
            })
            .and_then(u64v),
        rss_bytes: u64v(s.memory_rss_bytes),
        page_faults: u64v(s.memory_pgfault),
        major_page_faults: u64v(s.memory_pgmajfault),
    }
}

/// A sample of a pod: its cgroup (in the guest for a VM pod) and interfaces.
#[derive(Debug, Clone)]
pub struct PodSample {
    pub at: i64,
    pub cg: pb::ContainerStatsResponse,
    pub interfaces: Vec<pb::InterfaceStats>,
    pub nano_cores: Option<u64>,
    base: RateBase,
}

impl PodSample {
    pub fn new(prev: Option<&PodSample>, s: pb::SandboxStatsResponse, at: i64) -> Self {
        let cg = sanitize(s.cgroup.into_option().unwrap_or_default());
        let interfaces = s
            .interfaces
            .into_iter()
            .filter(|i| valid_ifname(&i.name))
            .take(MAX_INTERFACES)
            .collect();
        let (nano_cores, base) =
            cpu_rate(prev.map(|p| (p.base, p.nano_cores)), at, cg.cpu_usage_ns);
        Self {
            at,
            cg,
            interfaces,
            nano_cores,
            base,
        }
    }

    /// The pod's `linux` part with `containers` in it.
    pub fn to_cri(&self, containers: Vec<cri::ContainerStats>) -> cri::LinuxPodSandboxStats {
        let ts = self.at;
        let interfaces: Vec<cri::NetworkInterfaceUsage> = self
            .interfaces
            .iter()
            .map(|i| cri::NetworkInterfaceUsage {
                name: i.name.clone(),
                rx_bytes: u64v(i.rx_bytes),
                rx_errors: u64v(i.rx_errors),
                tx_bytes: u64v(i.tx_bytes),
                tx_errors: u64v(i.tx_errors),
            })
            .collect();
        // kubelet reads default_interface whenever network is set: both or neither.
        let default_interface = interfaces
            .iter()
            .find(|i| i.name == "eth0")
            .or_else(|| interfaces.iter().find(|i| i.name != "lo"))
            .or(interfaces.first())
            .cloned();
        cri::LinuxPodSandboxStats {
            cpu: Some(cri::CpuUsage {
                timestamp: ts,
                usage_core_nano_seconds: u64v(self.cg.cpu_usage_ns),
                usage_nano_cores: self.nano_cores.and_then(u64v),
            }),
            memory: Some(memory(&self.cg, ts)),
            network: default_interface.map(|d| cri::NetworkUsage {
                timestamp: ts,
                default_interface: Some(d),
                interfaces,
            }),
            process: Some(cri::ProcessUsage {
                timestamp: ts,
                process_count: u64v(self.cg.pids_current),
            }),
            containers,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000_000_000;

    #[test]
    fn cpu_rate_needs_two_samples_a_window_apart() {
        let (r, b) = cpu_rate(None, 10 * S, 5 * S as u64);
        assert_eq!(r, None);
        // 0.5 s later: too soon, no rate yet, base kept.
        let (r, b2) = cpu_rate(Some((b, r)), 10 * S + S / 2, 5 * S as u64 + 1);
        assert_eq!((r, b2), (None, b));
        // 2 s after the base, 1 s of CPU: half a core.
        let (r, b3) = cpu_rate(Some((b2, r)), 12 * S, 6 * S as u64);
        assert_eq!(r, Some(500_000_000));
        assert_eq!(b3.at, 12 * S);
        // Soon after: the same rate again.
        assert_eq!(cpu_rate(Some((b3, r)), 12 * S + 1, 7 * S as u64).0, r);
        // A counter that went back starts over.
        assert_eq!(cpu_rate(Some((b3, r)), 20 * S, 1).0, None);
        // A guest claiming more CPU than the host has is capped.
        let (r, _) = cpu_rate(Some((b3, r)), 13 * S, u64::MAX / 2);
        assert_eq!(r, Some(max_nano_cores()));
    }

    #[test]
    fn guest_replies_are_bounded() {
        let s = pb::SandboxStatsResponse {
            cgroup: Some(pb::ContainerStatsResponse {
                memory_usage_bytes: 10,
                memory_working_set_bytes: 1 << 40,
                timestamp: i64::MAX,
                io_devices: vec![pb::IoDeviceStats::default(); 1000],
                ..Default::default()
            })
            .into(),
            interfaces: [
                "eth0",
                "lo",
                "",
                "a/b",
                "x:y",
                "sixteen-chars-xx",
                "bad name",
            ]
            .iter()
            .map(|n| pb::InterfaceStats {
                name: n.to_string(),
                ..Default::default()
            })
            .chain((0..200).map(|i| pb::InterfaceStats {
                name: format!("v{i}"),
                ..Default::default()
            }))
            .collect(),
            ..Default::default()
        };
        let p = PodSample::new(None, s, 42);
        assert_eq!(p.cg.memory_working_set_bytes, 10);
        assert_eq!(p.cg.io_devices.len(), MAX_IO_DEVICES);
        assert_eq!(p.interfaces.len(), MAX_INTERFACES);
        assert_eq!(p.interfaces[0].name, "eth0");
        assert_eq!(p.interfaces[1].name, "lo");
        assert_eq!(p.interfaces[2].name, "v0");
        let l = p.to_cri(vec![]);
        assert_eq!(
            l.cpu.unwrap().timestamp,
            42,
            "huskd's clock, not the guest's"
        );
        assert_eq!(l.network.unwrap().default_interface.unwrap().name, "eth0");
    }

    #[test]
    fn network_is_set_only_with_a_default_interface() {
        let p = PodSample::new(None, pb::SandboxStatsResponse::default(), 1);
        let l = p.to_cri(vec![]);
        assert!(l.network.is_none());
        assert!(l.cpu.is_some() && l.memory.is_some() && l.process.is_some());
        let only_lo = pb::SandboxStatsResponse {
            interfaces: vec![pb::InterfaceStats {
                name: "lo".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let l = PodSample::new(None, only_lo, 1).to_cri(vec![]);
        assert_eq!(l.network.unwrap().default_interface.unwrap().name, "lo");
    }
}

//! cAdvisor-style metrics for `ListMetricDescriptors` / `ListPodSandboxMetrics`:
//! the names and meanings kubelet's `/metrics/cadvisor` has, with the label
//! keys `container, pod, namespace, id` (+ one per-metric key). Per container
//! from its cgroup (in the guest for a VM pod); per pod (`container=""`, as
//! cAdvisor labels a pod cgroup) from the pod's host cgroup (a VM pod's VMM and
//! helpers) and the pod's interfaces. Values are the CRI's unsigned integers:
//! `*_seconds_total` are whole seconds, as containerd publishes them.

use husk_proto::cri;

use super::host::HostCgroup;
use super::sample::{ContainerSample, PodSample, u64v};

/// The label keys every metric starts with.
pub const BASE_LABELS: [&str; 4] = ["container", "pod", "namespace", "id"];

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Counter,
    Gauge,
}

struct Desc {
    name: &'static str,
    help: &'static str,
    kind: Kind,
    /// Label keys after [`BASE_LABELS`].
    extra: &'static [&'static str],
}

const fn d(
    name: &'static str,
    kind: Kind,
    extra: &'static [&'static str],
    help: &'static str,
) -> Desc {
    Desc {
        name,
        help,
        kind,
        extra,
    }
}

use Kind::{Counter, Gauge};

const NET: &[&str] = &["interface"];
const DEV: &[&str] = &["device"];

const DESCRIPTORS: &[Desc] = &[
    d(
        "container_cpu_usage_seconds_total",
        Counter,
        &[],
        "Cumulative CPU time consumed in seconds.",
    ),
    d(
        "container_cpu_user_seconds_total",
        Counter,
        &[],
        "Cumulative user CPU time consumed in seconds.",
    ),
    d(
        "container_cpu_system_seconds_total",
        Counter,
        &[],
        "Cumulative system CPU time consumed in seconds.",
    ),
    d(
        "container_cpu_cfs_periods_total",
        Counter,
        &[],
        "Number of elapsed enforcement period intervals.",
    ),
    d(
        "container_cpu_cfs_throttled_periods_total",
        Counter,
        &[],
        "Number of throttled period intervals.",
    ),
    d(
        "container_cpu_cfs_throttled_seconds_total",
        Counter,
        &[],
        "Total time duration the container has been throttled.",
    ),
    d(
        "container_memory_usage_bytes",
        Gauge,
        &[],
        "Current memory usage in bytes, including all memory regardless of when it was accessed.",
    ),
    d(
        "container_memory_working_set_bytes",
        Gauge,
        &[],
        "Current working set in bytes.",
    ),
    d("container_memory_rss", Gauge, &[], "Size of RSS in bytes."),
    d(
        "container_memory_cache",
        Gauge,
        &[],
        "Number of bytes of page cache memory.",
    ),
    d(
        "container_memory_mapped_file",
        Gauge,
        &[],
        "Size of memory mapped files in bytes.",
    ),
    d(
        "container_memory_swap",
        Gauge,
        &[],
        "Container swap usage in bytes.",
    ),
    d(
        "container_memory_max_usage_bytes",
        Gauge,
        &[],
        "Maximum memory usage recorded in bytes.",
    ),
    d(
        "container_memory_failures_total",
        Counter,
        &["failure_type", "scope"],
        "Cumulative count of memory allocation failures.",
    ),
    d(
        "container_spec_memory_limit_bytes",
        Gauge,
        &[],
        "Memory limit for the container in bytes (0: none).",
    ),
    d(
        "container_oom_events_total",
        Counter,
        &[],
        "Count of out of memory events observed for the container.",
    ),
    d(
        "container_processes",
        Gauge,
        &[],
        "Number of processes running inside the container.",
    ),
    d(
        "container_fs_usage_bytes",
        Gauge,
        DEV,
        "Number of bytes that are consumed by the container's writable layer.",
    ),
    d(
        "container_fs_inodes_used",
        Gauge,
        DEV,
        "Number of inodes used by the container's writable layer.",
    ),
    d(
        "container_fs_reads_bytes_total",
        Counter,
        DEV,
        "Cumulative count of bytes read.",
    ),
    d(
        "container_fs_writes_bytes_total",
        Counter,
        DEV,
        "Cumulative count of bytes written.",
    ),
    d(
        "container_fs_reads_total",
        Counter,
        DEV,
        "Cumulative count of reads completed.",
    ),
    d(
        "container_fs_writes_total",
        Counter,
        DEV,
        "Cumulative count of writes completed.",
    ),
    d(
        "container_network_receive_bytes_total",
        Counter,
        NET,
        "Cumulative count of bytes received.",
    ),
    d(
        "container_network_receive_packets_total",
        Counter,
        NET,
        "Cumulative count of packets received.",
    ),
    d(
        "container_network_receive_packets_dropped_total",
        Counter,
        NET,
        "Cumulative count of packets dropped while receiving.",
    ),
    d(
        "container_network_receive_errors_total",
        Counter,
        NET,
        "Cumulative count of errors encountered while receiving.",
    ),
    d(
        "container_network_transmit_bytes_total",
        Counter,
        NET,
        "Cumulative count of bytes transmitted.",
    ),
    d(
        "container_network_transmit_packets_total",
        Counter,
        NET,
        "Cumulative count of packets transmitted.",
    ),
    d(
        "container_network_transmit_packets_dropped_total",
        Counter,
        NET,
        "Cumulative count of packets dropped while transmitting.",
    ),
    d(
        "container_network_transmit_errors_total",
        Counter,
        NET,
        "Cumulative count of errors encountered while transmitting.",
    ),
    d(
        "container_start_time_seconds",
        Gauge,
        &[],
        "Start time of the container since unix epoch in seconds.",
    ),
    d(
        "container_last_seen",
        Gauge,
        &[],
        "Last time the container was seen by the exporter (its sample's time).",
    ),
];

/// Every metric huskd publishes.
pub fn descriptors() -> Vec<cri::MetricDescriptor> {
    DESCRIPTORS
        .iter()
        .map(|d| cri::MetricDescriptor {
            name: d.name.into(),
            help: d.help.into(),
            label_keys: BASE_LABELS
                .iter()
                .chain(d.extra)
                .map(|s| s.to_string())
                .collect(),
        })
        .collect()
}

/// Metrics with one set of base label values and one timestamp.
struct Out {
    at: i64,
    base: [String; 4],
    metrics: Vec<cri::Metric>,
}

impl Out {
    fn new(at: i64, container: &str, pod: &str, namespace: &str, id: &str) -> Self {
        Self {
            at,
            base: [container, pod, namespace, id].map(String::from),
            metrics: vec![],
        }
    }

    /// Adds `name` (which must be in [`DESCRIPTORS`], with `extra` matching its keys).
    fn put(&mut self, name: &'static str, value: u64, extra: &[&str]) {
        let Some(d) = DESCRIPTORS.iter().find(|d| d.name == name) else {
            debug_assert!(false, "metric {name} has no descriptor");
            return;
        };
        debug_assert_eq!(d.extra.len(), extra.len(), "labels of {name}");
        self.metrics.push(cri::Metric {
            name: name.into(),
            timestamp: self.at,
            metric_type: match d.kind {
                Counter => cri::MetricType::Counter,
                Gauge => cri::MetricType::Gauge,
            } as i32,
            label_values: self
                .base
                .iter()
                .cloned()
                .chain(extra.iter().map(|s| s.to_string()))
                .collect(),
            value: u64v(value),
        });
    }
}

const NS: u64 = 1_000_000_000;

/// Names of what the labels say about a pod.
pub struct PodNames<'a> {
    pub id: &'a str,
    pub name: &'a str,
    pub namespace: &'a str,
}

/// One container's metrics from its sample. `fs_device`: the `device` label
/// of its writable layer; `started_at`: unix ns (0: not started).
pub fn container(
    p: &PodNames<'_>,
    name: &str,
    id: &str,
    started_at: i64,
    sample: &ContainerSample,
    fs_device: &str,
) -> cri::ContainerMetrics {
    let s = &sample.s;
    let mut o = Out::new(sample.at, name, p.name, p.namespace, id);
    o.put(
        "container_cpu_usage_seconds_total",
        s.cpu_usage_ns / NS,
        &[],
    );
    o.put("container_cpu_user_seconds_total", s.cpu_user_ns / NS, &[]);
    o.put(
        "container_cpu_system_seconds_total",
        s.cpu_system_ns / NS,
        &[],
    );
    o.put("container_cpu_cfs_periods_total", s.cpu_nr_periods, &[]);
    o.put(
        "container_cpu_cfs_throttled_periods_total",
        s.cpu_nr_throttled,
        &[],
    );
    o.put(
        "container_cpu_cfs_throttled_seconds_total",
        s.cpu_throttled_ns / NS,
        &[],
    );
    o.put("container_memory_usage_bytes", s.memory_usage_bytes, &[]);
    o.put(
        "container_memory_working_set_bytes",
        s.memory_working_set_bytes,
        &[],
    );
    o.put("container_memory_rss", s.memory_rss_bytes, &[]);
    o.put("container_memory_cache", s.memory_cache_bytes, &[]);
    o.put(
        "container_memory_mapped_file",
        s.memory_mapped_file_bytes,
        &[],
    );
    o.put("container_memory_swap", s.memory_swap_bytes, &[]);
    o.put(
        "container_memory_max_usage_bytes",
        s.memory_max_usage_bytes,
        &[],
    );
    o.put(
        "container_memory_failures_total",
        s.memory_pgfault,
        &["pgfault", "container"],
    );
    o.put(
        "container_memory_failures_total",
        s.memory_pgmajfault,
        &["pgmajfault", "container"],
    );
    let limit = if s.memory_limit_bytes >= u64::MAX / 2 {
        0
    } else {
        s.memory_limit_bytes
    };
    o.put("container_spec_memory_limit_bytes", limit, &[]);
    o.put("container_oom_events_total", s.oom_kills, &[]);
    o.put("container_processes", s.pids_current, &[]);
    if let Some(l) = s.writable_layer.as_ref() {
        o.put("container_fs_usage_bytes", l.used_bytes, &[fs_device]);
        o.put("container_fs_inodes_used", l.inodes_used, &[fs_device]);
    }
    for dev in &s.io_devices {
        let dev_name = format!("{}:{}", dev.major, dev.minor);
        o.put(
            "container_fs_reads_bytes_total",
            dev.read_bytes,
            &[&dev_name],
        );
        o.put(
            "container_fs_writes_bytes_total",
            dev.write_bytes,
            &[&dev_name],
        );
        o.put("container_fs_reads_total", dev.reads, &[&dev_name]);
        o.put("container_fs_writes_total", dev.writes, &[&dev_name]);
    }
    if started_at > 0 {
        o.put("container_start_time_seconds", started_at as u64 / NS, &[]);
    }
    o.put("container_last_seen", sample.at.max(0) as u64 / NS, &[]);
    cri::ContainerMetrics {
        container_id: id.into(),
        metrics: o.metrics,
    }
}

/// The pod-level metrics (`container=""`): the host cgroup (read at `host_at`)
/// and the pod's interfaces from its last sample.
pub fn pod(
    p: &PodNames<'_>,
    host: Option<(i64, HostCgroup)>,
    sample: Option<&PodSample>,
) -> Vec<cri::Metric> {
    let mut all = vec![];
    if let Some((at, h)) = host {
        let mut o = Out::new(at, "", p.name, p.namespace, p.id);
        o.put("container_cpu_usage_seconds_total", h.cpu_ns / NS, &[]);
        o.put("container_memory_usage_bytes", h.memory_usage, &[]);
        o.put(
            "container_memory_working_set_bytes",
            h.memory_working_set,
            &[],
        );
        o.put("container_memory_rss", h.memory_rss, &[]);
        o.put("container_memory_cache", h.memory_cache, &[]);
        o.put("container_processes", h.pids, &[]);
        o.put("container_last_seen", at.max(0) as u64 / NS, &[]);
        all.extend(o.metrics);
    }
    if let Some(s) = sample {
        let mut o = Out::new(s.at, "", p.name, p.namespace, p.id);
        for i in &s.interfaces {
            let n = [i.name.as_str()];
            o.put("container_network_receive_bytes_total", i.rx_bytes, &n);
            o.put("container_network_receive_packets_total", i.rx_packets, &n);
            o.put(
                "container_network_receive_packets_dropped_total",
                i.rx_dropped,
                &n,
            );
            o.put("container_network_receive_errors_total", i.rx_errors, &n);
            o.put("container_network_transmit_bytes_total", i.tx_bytes, &n);
            o.put("container_network_transmit_packets_total", i.tx_packets, &n);
            o.put(
                "container_network_transmit_packets_dropped_total",
                i.tx_dropped,
                &n,
            );
            o.put("container_network_transmit_errors_total", i.tx_errors, &n);
        }
        all.extend(o.metrics);
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;
    use husk_proto::agent as pb;

    #[test]
    fn every_metric_matches_its_descriptor() {
        let descs = descriptors();
        let names: std::collections::HashSet<_> = descs.iter().map(|d| &d.name).collect();
        assert_eq!(names.len(), descs.len(), "duplicate descriptor");
        let cs = ContainerSample::new(
            None,
            pb::ContainerStatsResponse {
                cpu_usage_ns: 3 * NS + 1,
                memory_usage_bytes: 100,
                memory_limit_bytes: u64::MAX,
                writable_layer: Some(pb::WritableLayerUsage {
                    used_bytes: 4096,
                    inodes_used: 2,
                    ..Default::default()
                })
                .into(),
                io_devices: vec![pb::IoDeviceStats {
                    major: 8,
                    minor: 0,
                    read_bytes: 5,
                    ..Default::default()
                }],
                ..Default::default()
            },
            7 * NS as i64,
        );
        let names = PodNames {
            id: "pod1",
            name: "p",
            namespace: "ns",
        };
        let c = container(&names, "c", "ctr1", 5 * NS as i64, &cs, "/run/husk");
        let ps = PodSample::new(
            None,
            pb::SandboxStatsResponse {
                interfaces: vec![pb::InterfaceStats {
                    name: "eth0".into(),
                    rx_bytes: 9,
                    ..Default::default()
                }],
                ..Default::default()
            },
            8,
        );
        let p = pod(&names, Some((9, HostCgroup::default())), Some(&ps));
        for m in c.metrics.iter().chain(&p) {
            let d = descs.iter().find(|d| d.name == m.name).expect("descriptor");
            assert_eq!(d.label_keys.len(), m.label_values.len(), "{}", m.name);
        }
        let v = |ms: &[cri::Metric], n: &str| ms.iter().find(|m| m.name == n).unwrap().clone();
        let cpu = v(&c.metrics, "container_cpu_usage_seconds_total");
        assert_eq!(cpu.value.unwrap().value, 3);
        assert_eq!(cpu.label_values, ["c", "p", "ns", "ctr1"]);
        assert_eq!(cpu.timestamp, 7 * NS as i64);
        assert_eq!(
            v(&c.metrics, "container_spec_memory_limit_bytes")
                .value
                .unwrap()
                .value,
            0
        );
        let fs = v(&c.metrics, "container_fs_usage_bytes");
        assert_eq!(
            (fs.value.unwrap().value, fs.label_values[4].as_str()),
            (4096, "/run/husk")
        );
        let rx = v(&p, "container_network_receive_bytes_total");
        assert_eq!(rx.label_values, ["", "p", "ns", "pod1", "eth0"]);
        assert_eq!(rx.value.unwrap().value, 9);
        assert_eq!(v(&p, "container_memory_usage_bytes").timestamp, 9);
    }
}

#![allow(clippy::unwrap_used)]
//! Stats and metrics through the CRI, read the way kubelet reads them: its CRI
//! stats provider (PodAndContainerStatsFromCRI: ListPodSandboxStats,
//! ListContainerStats, and what it dereferences in them) and its CRI metrics
//! collector (ListMetricDescriptors once, then ListPodSandboxMetrics, each
//! metric matched to a descriptor by name and label count). In both sandbox
//! kinds; and a frozen guest (SIGSTOPped QEMU) answered from its last sample
//! within the stats deadline while other pods get fresh samples.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use husk_host::sandbox::stats::STATS_DEADLINE;
use husk_proto::cri;
use husk_tests::cri_env::CriEnv;
use husk_tests::require;
use husk_tests::runtime::{NS, NS_NEEDS, eventually, info, ns_env_ok, pod_status};
use husk_tests::runtime::{VM_HANDLERS, VM_NEEDS, guest, vm_env_ok, vm_handler};

/// huskd with the VM suites' handler (husk-qemu on TCG unless HUSK_VM_HANDLER) and husk-ns.
async fn vm_env() -> CriEnv {
    let (k, i) = guest().unwrap();
    let h = vm_handler();
    let cfg = format!(
        "[runtime]\ndefault_handler = \"{h}\"\n[runtime.handlers]\n{VM_HANDLERS}{NS} = \"namespace\"\n\
         [runtime.vm]\nkernel = \"{k}\"\ninitrd = \"{i}\"\nboot_timeout_ms = 90000\nmemory_mib = 256\n"
    );
    CriEnv::new(h, &cfg).await.remove_pods_on_drop()
}

/// A CPU-bound container held to 20 % of a CPU (the machine is shared).
fn busy(e: &CriEnv) -> cri::ContainerConfig {
    let mut c = e.ctr("busy", &["sh", "-c", "while :; do :; done"]);
    c.linux = Some(cri::LinuxContainerConfig {
        resources: Some(cri::LinuxContainerResources {
            cpu_quota: 20_000,
            cpu_period: 100_000,
            ..Default::default()
        }),
        security_context: None,
    });
    c
}

fn v(x: &Option<cri::UInt64Value>) -> u64 {
    x.as_ref().map(|x| x.value).unwrap_or_default()
}

/// What kubelet's CRI stats provider dereferences without a nil check.
fn assert_kubelet_safe(stats: &[cri::PodSandboxStats]) {
    for p in stats {
        let a = p.attributes.as_ref().expect("pod attributes");
        assert!(a.metadata.is_some(), "pod metadata");
        let l = p.linux.as_ref().expect("pod stats without linux");
        if let Some(n) = &l.network {
            assert!(
                n.default_interface.is_some(),
                "network without default_interface"
            );
        }
        for c in &l.containers {
            let ca = c.attributes.as_ref().expect("container attributes");
            assert!(ca.metadata.is_some(), "container metadata");
        }
    }
}

/// kubelet's collector: every metric has a descriptor with as many label keys.
fn assert_metrics_match(descs: &[cri::MetricDescriptor], pods: &[cri::PodSandboxMetrics]) {
    let keys: HashMap<&str, usize> = descs
        .iter()
        .map(|d| (d.name.as_str(), d.label_keys.len()))
        .collect();
    for p in pods {
        let all = p
            .metrics
            .iter()
            .chain(p.container_metrics.iter().flat_map(|c| &c.metrics));
        for m in all {
            let n = keys
                .get(m.name.as_str())
                .unwrap_or_else(|| panic!("{} has no descriptor", m.name));
            assert_eq!(*n, m.label_values.len(), "labels of {}", m.name);
            assert!(m.value.is_some() && m.timestamp > 0, "{m:?}");
        }
    }
}

fn metric<'a>(ms: &'a [cri::Metric], name: &str, labels: &[&str]) -> &'a cri::Metric {
    ms.iter()
        .find(|m| m.name == name && m.label_values.iter().zip(labels).all(|(a, b)| a == b))
        .unwrap_or_else(|| panic!("no {name} {labels:?} in {ms:#?}"))
}

async fn pod_in_list(e: &CriEnv, pod: &str) -> Option<cri::PodSandboxStats> {
    let all = e.list_pod_stats(None).await.unwrap();
    assert_kubelet_safe(&all);
    all.into_iter()
        .find(|p| p.attributes.as_ref().unwrap().id == pod)
}

async fn ctr_stats(e: &CriEnv, pod: &str) -> HashMap<String, cri::ContainerStats> {
    e.list_container_stats(Some(cri::ContainerStatsFilter {
        pod_sandbox_id: pod.into(),
        ..Default::default()
    }))
    .await
    .unwrap()
    .into_iter()
    .map(|s| (s.attributes.clone().unwrap().id, s))
    .collect()
}

/// The whole kubelet view of one pod of `handler`: linux always there, CPU
/// rates after two reads, the writable layer growing, metrics consistent,
/// and a stopped pod still safe.
async fn kubelet_view(e: &CriEnv, handler: &str, name: &str) {
    let pcfg = e.pod(name);
    let pod = e
        .run_pod_on(&pcfg, handler)
        .await
        .unwrap_or_else(|s| panic!("{s:?}\n{}", e.d.log()));
    let busy = e.run(&pod, &busy(e), &pcfg).await;
    let idle = e
        .run(&pod, &e.ctr("idle", &["sleep", "100000"]), &pcfg)
        .await;

    // First read: everything there, no rates yet or some.
    let first = pod_in_list(e, &pod).await.expect("ready pod listed");
    assert_eq!(first.linux.as_ref().unwrap().containers.len(), 2);
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // Second read, 1.5 s later: the busy container and the pod use CPU.
    let cs = ctr_stats(e, &pod).await;
    let bcpu = cs[&busy].cpu.unwrap();
    assert!(v(&bcpu.usage_nano_cores) > 0, "busy container: {bcpu:?}");
    assert!(v(&bcpu.usage_nano_cores) <= 1_000_000_000, "{bcpu:?}");
    let p = pod_in_list(e, &pod).await.unwrap();
    let pcpu = p.linux.as_ref().unwrap().cpu.unwrap();
    assert!(v(&pcpu.usage_nano_cores) > 0, "pod: {pcpu:?}");
    assert!(
        p.linux
            .as_ref()
            .unwrap()
            .memory
            .as_ref()
            .unwrap()
            .working_set_bytes
            .is_some()
    );

    // The writable layer grows by what a container writes to its rootfs.
    let layer = |s: &cri::ContainerStats| s.writable_layer.clone().expect("writable layer");
    let w0 = layer(&e.container_stats(&idle).await.unwrap().stats.unwrap());
    e.sh(
        &idle,
        "dd if=/dev/zero of=/grown bs=1024 count=4096 2>/dev/null; mkdir /d1 /d2; sync",
    )
    .await;
    let w1 = layer(&e.container_stats(&idle).await.unwrap().stats.unwrap());
    assert!(
        v(&w1.used_bytes) >= v(&w0.used_bytes) + (4 << 20),
        "{w0:?} -> {w1:?}"
    );
    assert!(
        v(&w1.inodes_used) >= v(&w0.inodes_used) + 3,
        "{w0:?} -> {w1:?}"
    );
    assert!(w1.timestamp > w0.timestamp);
    match handler {
        NS => {
            let m = w1.fs_id.clone().expect("fs_id of a host layer").mountpoint;
            assert!(std::path::Path::new(&m).is_dir(), "{m}");
        }
        _ => assert!(w1.fs_id.is_none(), "a guest layer has no host filesystem"),
    }

    // Metrics: descriptors for all, values that agree with the stats.
    let descs = e.metric_descriptors().await.unwrap();
    for n in [
        "container_cpu_usage_seconds_total",
        "container_memory_working_set_bytes",
        "container_memory_usage_bytes",
        "container_fs_usage_bytes",
        "container_network_receive_bytes_total",
    ] {
        assert!(descs.iter().any(|d| d.name == n), "{n}");
    }
    let before = v(&cs[&busy].cpu.as_ref().unwrap().usage_core_nano_seconds) / 1_000_000_000;
    let pm = e.pod_metrics().await.unwrap();
    assert_metrics_match(&descs, &pm);
    let mine = pm
        .iter()
        .find(|p| p.pod_sandbox_id == pod)
        .expect("pod metrics");
    let of = |id: &str| {
        &mine
            .container_metrics
            .iter()
            .find(|c| c.container_id == id)
            .unwrap()
            .metrics
    };
    let ns_name = "e2e";
    let cpu_s = metric(
        of(&busy),
        "container_cpu_usage_seconds_total",
        &["busy", name, ns_name, &busy],
    );
    assert!(v(&cpu_s.value) >= before, "{cpu_s:?} vs {before} s");
    let ws = metric(of(&busy), "container_memory_working_set_bytes", &["busy"]);
    assert!(v(&ws.value) > 0);
    let fs = metric(of(&idle), "container_fs_usage_bytes", &["idle"]);
    let (a, b) = (v(&fs.value), v(&w1.used_bytes));
    assert!(a.abs_diff(b) <= 64 << 10, "metric {a} vs stats {b}");
    // Pod level (container=""): the host cgroup and the pod's interfaces.
    let host_mem = metric(
        &mine.metrics,
        "container_memory_usage_bytes",
        &["", name, ns_name, &pod],
    );
    assert!(v(&host_mem.value) > 0, "{host_mem:?}");
    metric(
        &mine.metrics,
        "container_cpu_usage_seconds_total",
        &["", name],
    );
    metric(
        &mine.metrics,
        "container_network_receive_bytes_total",
        &["", name],
    );

    // A stopped pod: left out of the lists, its own stats still have `linux`.
    e.stop_pod(&pod).await.unwrap();
    assert!(pod_in_list(e, &pod).await.is_none());
    let st = e.pod_stats(&pod).await.unwrap().stats.unwrap();
    assert_kubelet_safe(std::slice::from_ref(&st));
    assert!(st.linux.unwrap().containers.is_empty());
    let pm = e.pod_metrics().await.unwrap();
    assert!(pm.iter().all(|p| p.pod_sandbox_id != pod));
    e.remove_pod(&pod).await.unwrap();
}

#[tokio::test]
async fn ns_stats_and_metrics_as_kubelet_reads_them() {
    require!(ns_env_ok(), NS_NEEDS);
    let e = CriEnv::new(NS, "").await.remove_pods_on_drop();
    kubelet_view(&e, NS, "nsstats").await;
}

/// Sends SIGCONT to a stopped process when dropped (a failed assertion too).
struct Frozen(i32);

impl Frozen {
    fn new(pid: i32) -> Self {
        // SAFETY: kill(2) on a pid of this test's own VM; no memory involved.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
        Frozen(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

fn cpu_ts(s: &cri::ContainerStats) -> i64 {
    s.cpu.as_ref().unwrap().timestamp
}

#[tokio::test]
async fn vm_stats_metrics_and_a_frozen_guest() {
    require!(vm_env_ok(), VM_NEEDS);
    let e = vm_env().await;
    kubelet_view(&e, vm_handler(), "vmstats").await;

    // A VM pod and a namespace pod; the VM then freezes.
    let (vcfg, ncfg) = (e.pod("frozen"), e.pod("alive"));
    let vpod = e
        .run_pod_on(&vcfg, vm_handler())
        .await
        .unwrap_or_else(|s| panic!("{s:?}\n{}", e.d.log()));
    let npod = e.run_pod_on(&ncfg, NS).await.unwrap();
    let vc = e.run(&vpod, &e.ctr("c", &["sleep", "100000"]), &vcfg).await;
    let nc = e.run(&npod, &e.ctr("c", &["sleep", "100000"]), &ncfg).await;
    // The pod sample, then the container samples, last before the freeze.
    let vpod_before = pod_in_list(&e, &vpod).await.unwrap();
    let before: HashMap<String, i64> = e
        .list_container_stats(None)
        .await
        .unwrap()
        .iter()
        .map(|s| (s.attributes.clone().unwrap().id, cpu_ts(s)))
        .collect();
    let vmm = info(&pod_status(&e.c, &vpod).await.unwrap().info)["agentPid"]
        .as_i64()
        .unwrap() as i32;
    let frozen = Frozen::new(vmm);
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Within the deadline: the frozen pod's last sample (old timestamp),
    // fresh samples for the other pod.
    let bound = STATS_DEADLINE + Duration::from_millis(1500);
    let t = Instant::now();
    let l = e.list_container_stats(None).await.unwrap();
    let took = t.elapsed();
    assert!(
        took < bound,
        "ListContainerStats took {took:?} with a frozen guest"
    );
    eprintln!("ListContainerStats with a frozen guest: {took:?} (deadline {STATS_DEADLINE:?})");
    let now: HashMap<String, i64> = l
        .iter()
        .map(|s| (s.attributes.clone().unwrap().id, cpu_ts(s)))
        .collect();
    assert_eq!(
        now[&vc], before[&vc],
        "frozen guest: the last sample, stale"
    );
    assert!(now[&nc] > before[&nc], "the other pod: a fresh sample");

    let t = Instant::now();
    let ps = e.list_pod_stats(None).await.unwrap();
    assert!(
        t.elapsed() < bound,
        "ListPodSandboxStats took {:?}",
        t.elapsed()
    );
    assert_kubelet_safe(&ps);
    let stale = ps
        .iter()
        .find(|p| p.attributes.as_ref().unwrap().id == vpod)
        .unwrap();
    let ts = |p: &cri::PodSandboxStats| p.linux.as_ref().unwrap().cpu.as_ref().unwrap().timestamp;
    assert_eq!(ts(stale), ts(&vpod_before));
    let fresh = ps
        .iter()
        .find(|p| p.attributes.as_ref().unwrap().id == npod)
        .unwrap();
    assert!(ts(fresh) > ts(&vpod_before));

    let t = Instant::now();
    let pm = e.pod_metrics().await.unwrap();
    assert!(
        t.elapsed() < bound,
        "ListPodSandboxMetrics took {:?}",
        t.elapsed()
    );
    assert!(pm.iter().any(|p| p.pod_sandbox_id == vpod));
    let t = Instant::now();
    e.container_stats(&vc).await.unwrap();
    assert!(t.elapsed() < bound, "ContainerStats took {:?}", t.elapsed());

    // Thawed: fresh samples again.
    drop(frozen);
    eventually(
        "fresh stats after SIGCONT",
        Duration::from_secs(60),
        || async {
            let s = e.container_stats(&vc).await.unwrap().stats.unwrap();
            cpu_ts(&s) > before[&vc]
        },
    )
    .await;
    e.stop_and_remove_pod(&vpod).await;
    e.stop_and_remove_pod(&npod).await;
}

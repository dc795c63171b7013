#![allow(clippy::unwrap_used)]
//! `cargo bench -p husk-tests --bench cri_vm`: the CRI runtime path in VM
//! mode (handler `husk-qemu`, accel from `HUSK_BENCH_ACCEL`, default tcg;
//! `HUSK_BENCH_HANDLER=husk` measures husk-vmm where hardware KVM exists).
//!
//! - RunPodSandbox → pod Ready, and → first container running, sequential,
//!   p50/p99 of N (`HUSK_BENCH_RUNS`, default 10);
//! - 20 pods started in parallel (to a running container): wall time and
//!   per-pod p50/p99;
//! - host memory per idle pod with a running container: the VMM's and its
//!   helpers' RSS split into guest RAM (the shared memfd, RssShmem) and the
//!   VMM's own overhead (RssAnon + RssFile), plus huskd's growth per pod.
//!
//! Needs HUSK_GUEST_KERNEL / HUSK_GUEST_INITRD (images/) and QEMU.

use std::time::{Duration, Instant};

use husk_tests::cri_env::CriEnv;
use husk_tests::runtime::{info, pod_status};

const PARALLEL: usize = 20;

fn pct(mut v: Vec<f64>, p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

/// (anon + file, shmem) resident KiB of a process, from `/proc/PID/status`
/// (smaps_rollup has no per-kind Rss split). Panics when the process is gone:
/// a zero here would be a wrong number, not a small one.
fn rss_kib(pid: i32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    let get = |k: &str| {
        s.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("{k} missing in /proc/{pid}/status"))
    };
    (get("RssAnon:") + get("RssFile:"), get("RssShmem:"))
}

fn huskd_rss_kib(pid: u32) -> u64 {
    rss_kib(pid as i32).0
}

/// (pod id, ready latency, running latency)
async fn pod_to_running(e: &CriEnv, name: &str) -> (String, Duration, Duration) {
    let pcfg = e.pod(name);
    let t0 = Instant::now();
    let pod = e
        .run_pod(&pcfg)
        .await
        .unwrap_or_else(|err| panic!("run pod: {err:?}\n{}", e.d.log()));
    let ready = t0.elapsed();
    e.run(&pod, &e.ctr("main", &["sleep", "100000"]), &pcfg)
        .await;
    (pod, ready, t0.elapsed())
}

async fn remove(e: &CriEnv, pod: &str) {
    let _ = e.stop_pod(pod).await;
    let _ = e.remove_pod(pod).await;
}

#[tokio::main]
async fn main() {
    let (Ok(k), Ok(i)) = (
        std::env::var("HUSK_GUEST_KERNEL"),
        std::env::var("HUSK_GUEST_INITRD"),
    ) else {
        println!("skipped: HUSK_GUEST_KERNEL / HUSK_GUEST_INITRD not set");
        return;
    };
    if !husk_tests::is_root() || !husk_tests::registry::available() {
        println!("skipped: needs root and docker-registry");
        return;
    }
    let runs = husk_tests::bench::env_count("HUSK_BENCH_RUNS", 10);
    let accel = std::env::var("HUSK_BENCH_ACCEL").unwrap_or_else(|_| "tcg".into());
    let handler = std::env::var("HUSK_BENCH_HANDLER").unwrap_or_else(|_| "husk-qemu".into());
    let cfg = format!(
        "[runtime]\ndefault_handler = \"{handler}\"\n[runtime.handlers]\nhusk = \"vm\"\nhusk-qemu = {{ kind = \"qemu\", accel = \"{accel}\" }}\n\
         [runtime.vm]\nkernel = \"{k}\"\ninitrd = \"{i}\"\nboot_timeout_ms = 300000\nmemory_mib = 256\n"
    );
    let e = std::sync::Arc::new(CriEnv::new(&handler, &cfg).await);
    let (pod, _, _) = pod_to_running(&e, "warm").await;
    remove(&e, &pod).await;

    let (mut ready, mut running) = (vec![], vec![]);
    for n in 0..runs {
        let (pod, r, c) = pod_to_running(&e, &format!("seq-{n}")).await;
        ready.push(r.as_secs_f64() * 1e3);
        running.push(c.as_secs_f64() * 1e3);
        remove(&e, &pod).await;
    }

    // Memory of idle pods: 5 pods with a sleeping container each.
    let huskd_pid = e.d.pid().unwrap_or(0);
    let huskd_before = huskd_rss_kib(huskd_pid);
    let mut idle = vec![];
    for n in 0..5 {
        idle.push(pod_to_running(&e, &format!("idle-{n}")).await.0);
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (mut own, mut shmem, mut helpers) = (vec![], vec![], vec![]);
    for p in &idle {
        let i = info(&pod_status(&e.c, p).await.unwrap().info);
        let vmm = i["agentPid"].as_i64().unwrap() as i32;
        let (o, s) = rss_kib(vmm);
        own.push(o as f64 / 1024.0);
        shmem.push(s as f64 / 1024.0);
        let h: u64 = i["vmHelpers"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter_map(|p| p.as_i64())
            .map(|p| rss_kib(p as i32).0)
            .sum();
        helpers.push(h as f64 / 1024.0);
    }
    let huskd_per_pod =
        (huskd_rss_kib(huskd_pid).saturating_sub(huskd_before)) as f64 / 1024.0 / 5.0;
    for p in &idle {
        remove(&e, p).await;
    }

    let t0 = Instant::now();
    let tasks: Vec<_> = (0..PARALLEL)
        .map(|n| {
            let e = e.clone();
            tokio::spawn(async move { pod_to_running(&e, &format!("par-{n}")).await })
        })
        .collect();
    let mut par = vec![];
    let mut pods = vec![];
    for t in tasks {
        let (p, _, c) = t.await.unwrap();
        par.push(c.as_secs_f64() * 1e3);
        pods.push(p);
    }
    let wall = t0.elapsed().as_secs_f64();
    for p in &pods {
        remove(&e, p).await;
    }

    println!(
        "backend: {handler} (accel {accel}), {runs} sequential pods, {PARALLEL} parallel; guest 1 vCPU / 256 MiB"
    );
    println!("| metric | p50 | p99 |");
    println!("|---|---|---|");
    println!(
        "| RunPodSandbox → Ready | {:.0} ms | {:.0} ms |",
        pct(ready.clone(), 0.5),
        pct(ready, 0.99)
    );
    println!(
        "| RunPodSandbox → first container running | {:.0} ms | {:.0} ms |",
        pct(running.clone(), 0.5),
        pct(running, 0.99)
    );
    println!(
        "| {PARALLEL} in parallel, per pod → running | {:.0} ms | {:.0} ms |",
        pct(par.clone(), 0.5),
        pct(par, 0.99)
    );
    println!("| {PARALLEL} in parallel, wall | {wall:.1} s | |");
    println!(
        "| idle pod: VMM own RSS (anon+file) | {:.1} MiB | {:.1} MiB |",
        pct(own.clone(), 0.5),
        pct(own, 0.99)
    );
    println!(
        "| idle pod: guest RAM resident (memfd) | {:.1} MiB | {:.1} MiB |",
        pct(shmem.clone(), 0.5),
        pct(shmem, 0.99)
    );
    println!(
        "| idle pod: helpers RSS (vhost-user vsock) | {:.1} MiB | {:.1} MiB |",
        pct(helpers.clone(), 0.5),
        pct(helpers, 0.99)
    );
    println!("| idle pod: huskd growth per pod | {huskd_per_pod:.2} MiB | |");
}

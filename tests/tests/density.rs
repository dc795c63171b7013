#![allow(clippy::unwrap_used)]
//! `husk bench density` (`husk_host::cli::density`) against a real huskd, small: its steps
//! and limits, a sane report, and nothing left behind.
//!
//! - VM pods (`husk-qemu`, TCG): two steps to 3 pods; memory per pod split into guest RAM
//!   and the VMM's and helpers' own memory, by process; idle CPU; huskd's latencies; every
//!   pod and every process huskd started for them gone afterwards.
//! - Namespace pods (`husk-ns`, cheap): a p99 limit no huskd meets stops it after the first
//!   step; Ctrl-C (the stop flag) during the first step stops it too; both remove all.
//!
//! Needs HUSK_GUEST_KERNEL / HUSK_GUEST_INITRD and qemu-system-x86_64 for the VM case;
//! prints `skipped: <reason>` otherwise.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use husk_host::cli::density::{DensityOptions, DensityReport, density};
use husk_tests::cri_env::CriEnv;
use husk_tests::require;
use husk_tests::runtime::{NS, NS_NEEDS, QEMU, VM_NEEDS, guest, ns_env_ok, vm_env_ok};

fn opts(e: &CriEnv, handler: &str, step: usize, max_pods: usize, p99: f64) -> DensityOptions {
    DensityOptions {
        runtime: handler.into(),
        image: e.image.clone(),
        cmd: vec!["sleep".into(), "1000000".into()],
        budget_mib: 0,
        step,
        concurrency: 2,
        max_pods,
        p99_limit_ms: p99,
        settle_s: 1,
        window_s: 2,
        probes: 10,
        reserve_mib: 512,
        host_network: false,
    }
}

/// Nothing of the bench's is left: no pod listed, no process marked by this huskd.
async fn nothing_left(e: &CriEnv, r: &DensityReport) {
    assert_eq!(r.left_behind, 0, "{r:#?}");
    assert!(e.pods().await.is_empty(), "pods left: {:?}", e.pods().await);
    let marked = husk_host::sandbox::orphans::scan(&e.d.run_dir());
    assert!(marked.is_empty(), "processes left: {marked:?}");
}

#[tokio::test]
async fn density_vm_pods_two_steps_then_everything_removed() {
    require!(vm_env_ok(), VM_NEEDS);
    let (k, i) = guest().unwrap();
    let cfg = format!(
        "[runtime]\ndefault_handler = \"{QEMU}\"\n[runtime.handlers]\nhusk = \"vm\"\n{QEMU} = {{ kind = \"qemu\", accel = \"tcg\" }}\n\
         [runtime.vm]\nkernel = \"{k}\"\ninitrd = \"{i}\"\nboot_timeout_ms = 180000\nmemory_mib = 256\n"
    );
    let e = CriEnv::new(QEMU, &cfg).await.remove_pods_on_drop();
    let r = density(
        &e.c,
        &e.d.socket,
        &opts(&e, QEMU, 2, 3, 1e9),
        Arc::new(AtomicBool::new(false)),
    )
    .await
    .unwrap_or_else(|err| panic!("{err:#}\n{}", e.d.log()));
    eprintln!("{}", r.markdown());
    assert_eq!(r.stop, "max pods (3)", "{r:#?}\n{}", e.d.log());
    let pods: Vec<usize> = r.steps.iter().map(|s| s.pods).collect();
    assert_eq!(pods, [2, 3]);
    assert_eq!(r.max_pods, 3);
    for s in &r.steps {
        // Guest RAM: the touched part of 256 MiB; the VMM's own memory at least its heap.
        assert!(s.guest_ram_mib > 4.0 && s.guest_ram_mib <= 256.0, "{s:#?}");
        assert!(s.overhead_pss_mib > 4.0, "{s:#?}");
        assert!(
            (s.total_pss_mib - s.guest_ram_mib - s.overhead_pss_mib).abs() < 0.01,
            "{s:#?}"
        );
        let by: f64 = s.overhead_by_process_mib.values().sum();
        // The split reads smaps again a moment later: close to the total, not equal.
        assert!(
            (by - s.overhead_pss_mib).abs() < s.overhead_pss_mib * 0.2,
            "{s:#?}"
        );
        for k in [
            "qemu",
            "tcg cache",
            "vhost-user vsock",
            "vhost-user fs",
            "log writer",
        ] {
            assert!(
                s.overhead_by_process_mib.get(k).is_some_and(|v| *v > 0.0),
                "no {k}: {s:#?}"
            );
        }
        // Per pod, of one CPU: an idle VM is far from a whole CPU (a measurement, not a goal).
        assert!(s.idle_cpu_pct >= 0.0 && s.idle_cpu_pct < 100.0, "{s:#?}");
        assert!(s.version_ms.p50 > 0.0 && s.version_ms.p99 >= s.version_ms.p50);
        assert!(s.list_pods_ms.p50 > 0.0 && s.list_pods_ms.p99 >= s.list_pods_ms.p50);
        assert!(s.start_ms.p50 > 0.0 && s.host_mem_available_mib > 0);
        assert!(s.huskd_rss_anon_mib > 0.0);
    }
    assert_eq!(r.removed, 3, "{r:#?}");
    nothing_left(&e, &r).await;
}

#[tokio::test]
async fn density_stops_at_the_p99_limit_and_on_ctrl_c() {
    require!(ns_env_ok(), NS_NEEDS);
    let e = CriEnv::new(NS, "").await.remove_pods_on_drop();

    // No huskd answers within 0 ms: the first step is the last.
    let r = density(
        &e.c,
        &e.d.socket,
        &opts(&e, NS, 2, 0, 0.0),
        Arc::new(AtomicBool::new(false)),
    )
    .await
    .unwrap_or_else(|err| panic!("{err:#}\n{}", e.d.log()));
    eprintln!("{}", r.markdown());
    assert!(r.stop.starts_with("huskd p99 "), "{r:#?}");
    assert_eq!(r.steps.len(), 1);
    assert_eq!(r.steps[0].pods, 2);
    // A namespace pod has no guest RAM: its agent is all it costs.
    assert_eq!(r.steps[0].guest_ram_mib, 0.0);
    assert!(r.steps[0].overhead_pss_mib > 0.0, "{r:#?}");
    assert_eq!(r.removed, 2);
    nothing_left(&e, &r).await;

    // Ctrl-C once a pod runs: no further start or step, then everything goes.
    let stop = Arc::new(AtomicBool::new(false));
    let (flag, c) = (stop.clone(), e.c.clone());
    let watcher = tokio::spawn(async move {
        loop {
            let n = c
                .clone()
                .runtime
                .list_pod_sandbox(husk_proto::cri::ListPodSandboxRequest { filter: None })
                .await
                .map(|r| r.into_inner().items.len())
                .unwrap_or(0);
            if n > 0 {
                flag.store(true, Ordering::Relaxed);
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let mut o = opts(&e, NS, 1, 0, 1e9);
    o.concurrency = 1;
    let r = density(&e.c, &e.d.socket, &o, stop).await.unwrap();
    watcher.await.unwrap();
    eprintln!("{}", r.markdown());
    assert_eq!(r.stop, "interrupted", "{r:#?}");
    assert!(r.steps.len() <= 1, "{r:#?}");
    assert!(r.removed >= 1, "{r:#?}");
    nothing_left(&e, &r).await;
}

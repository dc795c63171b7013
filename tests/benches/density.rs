//! `cargo bench -p husk-tests --bench density`: `husk bench density` (the CLI's density
//! bench, `husk_host::cli::density`) against a huskd and a registry this bench starts, one
//! huskd per variant of the VM configuration, side by side in one run:
//!
//! - `default`: huskd's defaults (1 vCPU, 256 MiB, `tcg_tb_mib = 32`);
//! - `tb16`: `tcg_tb_mib = 16`;
//! - `fpr`: virtio-balloon free page reporting at order 0 (4 KiB blocks);
//! - `mem128`: `memory_mib = 128`;
//! - `lean`: tb16 + fpr + mem128.
//!
//! `HUSK_DENSITY_VARIANTS` (comma-separated, default `default`), `HUSK_DENSITY_MAX` pods per
//! variant (default 20), `HUSK_DENSITY_STEP` (default 5), `HUSK_DENSITY_BUDGET_MIB` (default
//! 0: 3/4 of MemAvailable), `HUSK_DENSITY_P99_MS` (default 100), `HUSK_DENSITY_WINDOW`
//! seconds (default 10), `HUSK_DENSITY_CONCURRENCY` (default 2), `HUSK_DENSITY_RESERVE_MIB` (default 4096: the
//! host MemAvailable it leaves). SIGINT to the bench process stops it early, removing its
//! pods (a ^C in the terminal also reaches its huskd, which then stops first).
//! `HUSK_DENSITY_HANDLERS` (comma-separated, default `husk-qemu`): `husk-qemu` (QEMU with accel
//! `HUSK_BENCH_ACCEL`, default tcg) and/or `husk` (husk-vmm; needs a KVM that runs Linux
//! guests: `tests/nested/bootratio-l1.sh density` runs it in the nested test bed); each
//! variant runs on each handler, one huskd at a time.
//!
//! With `HUSK_DENSITY_MEMINFO=1`, one idle pod per variant first prints the guest's
//! `/proc/meminfo` (where the guest RAM a pod touches goes).
//!
//! Needs HUSK_GUEST_KERNEL / HUSK_GUEST_INITRD (images/) and QEMU.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use husk_host::cli::density::{DensityOptions, DensityReport, density};
use husk_tests::bench::env_count;
use husk_tests::cri_env::CriEnv;

fn variant(name: &str) -> Option<&'static str> {
    Some(match name {
        "default" => "",
        "tb16" => "tcg_tb_mib = 16\n",
        "fpr" => {
            "free_page_reporting = true\nkernel_params = \"page_reporting.page_reporting_order=0\"\n"
        }
        "mem128" => "memory_mib = 128\n",
        "lean" => {
            "tcg_tb_mib = 16\nmemory_mib = 128\nfree_page_reporting = true\nkernel_params = \"page_reporting.page_reporting_order=0\"\n"
        }
        _ => return None,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Some((k, i)) = husk_tests::bench::vm_guest() else {
        return Ok(());
    };
    let accel = std::env::var("HUSK_BENCH_ACCEL").unwrap_or_else(|_| "tcg".into());
    let variants = std::env::var("HUSK_DENSITY_VARIANTS").unwrap_or_else(|_| "default".into());
    let handlers = std::env::var("HUSK_DENSITY_HANDLERS").unwrap_or_else(|_| "husk-qemu".into());
    let p99 = std::env::var("HUSK_DENSITY_P99_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100.0);
    // SIGINT (^C, `timeout -s INT`) stops the stepping; the pods made so far are removed.
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("interrupted: removing the bench's pods");
            flag.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    });
    let mut cols: Vec<(String, DensityReport)> = vec![];
    let list = |s: &str| -> Vec<String> {
        s.split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(String::from)
            .collect()
    };
    let runs: Vec<(String, String)> = list(&handlers)
        .into_iter()
        .flat_map(|h| list(&variants).into_iter().map(move |v| (h.clone(), v)))
        .collect();
    for (handler, name) in &runs {
        let (handler, name) = (handler.as_str(), name.as_str());
        if handler != "husk" && handler != "husk-qemu" {
            anyhow::bail!("unknown handler {handler}: husk, husk-qemu");
        }
        let Some(extra) = variant(name) else {
            anyhow::bail!("unknown variant {name}: default, tb16, fpr, mem128, lean");
        };
        // The variant's keys come last: a later key of the same table would be a TOML
        // error, so the defaults it overrides are not written at all.
        let mut vm = format!("kernel = \"{k}\"\ninitrd = \"{i}\"\nboot_timeout_ms = 300000\n");
        if !extra.contains("memory_mib") {
            vm += "memory_mib = 256\n";
        }
        let cfg = format!(
            "[runtime]\ndefault_handler = \"{handler}\"\n[runtime.handlers]\nhusk = \"vm\"\n\
             husk-qemu = {{ kind = \"qemu\", accel = \"{accel}\" }}\n[runtime.vm]\n{vm}{extra}"
        );
        let e = CriEnv::new(handler, &cfg).await.remove_pods_on_drop();
        let o = DensityOptions {
            runtime: handler.into(),
            image: e.image.clone(),
            cmd: vec!["sleep".into(), "1000000".into()],
            budget_mib: env_count("HUSK_DENSITY_BUDGET_MIB", 0) as u64,
            step: env_count("HUSK_DENSITY_STEP", 5),
            concurrency: env_count("HUSK_DENSITY_CONCURRENCY", 2),
            max_pods: env_count("HUSK_DENSITY_MAX", 20),
            p99_limit_ms: p99,
            settle_s: 5,
            window_s: env_count("HUSK_DENSITY_WINDOW", 10) as u64,
            probes: 100,
            reserve_mib: env_count("HUSK_DENSITY_RESERVE_MIB", 4096) as u64,
            host_network: false,
        };
        let col = match handler {
            "husk" => format!("husk {name}"),
            _ => format!("husk-qemu {name} ({accel})"),
        };
        println!("{col}:");
        if std::env::var("HUSK_DENSITY_MEMINFO").is_ok_and(|v| v == "1") {
            let cfg = e.pod("meminfo");
            let pod = e
                .run_pod(&cfg)
                .await
                .map_err(|s| anyhow::anyhow!("meminfo pod: {s:?}\n{}", e.d.log()))?;
            let ctr = e
                .run(&pod, &e.ctr("main", &["sleep", "1000000"]), &cfg)
                .await;
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            println!(
                "guest /proc/meminfo of an idle pod:\n{}",
                e.sh(&ctr, "cat /proc/meminfo").await
            );
            e.stop_and_remove_pod(&pod).await;
        }
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            break;
        }
        let r = density(&e.c, &e.d.socket, &o, stop.clone())
            .await
            .map_err(|err| anyhow::anyhow!("{err:#}\n{}", e.d.log()))?;
        print!("{}", r.markdown());
        cols.push((col, r));
    }
    println!(
        "\n| handler, variant | pods | guest RAM / pod | VMM + helpers / pod | all told / pod | idle CPU / pod | Version p99 | ListPodSandbox p99 | VMM + helpers by process |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (n, r) in &cols {
        let Some(s) = r.steps.last() else {
            println!("| {n} | 0 | | | | | | | {} |", r.stop);
            continue;
        };
        println!(
            "| {n} | {} | {:.1} | {:.1} | {:.1} | {:.2} % | {:.1} ms | {:.1} ms | {} |",
            s.pods,
            s.guest_ram_mib,
            s.overhead_pss_mib,
            s.total_pss_mib,
            s.idle_cpu_pct,
            s.version_ms.p99,
            s.list_pods_ms.p99,
            s.overhead_by_process_mib
                .iter()
                .map(|(k, v)| format!("{k} {v:.1}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

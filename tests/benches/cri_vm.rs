//! `cargo bench -p husk-tests --bench cri_vm`: `husk bench cri` (the CLI's CRI bench,
//! `husk_host::cli::bench`) in VM mode, against a huskd and a registry this bench starts,
//! side by side in one run:
//! - `husk-qemu`: every pod boots its VM (no pool);
//! - `husk-qemu-pool`: the same backend with a warm pool of `HUSK_BENCH_POOL` VMs
//!   (default 20, the parallel count), filled before each measured step;
//! - containerd + runc (Debian's, its CRI plugin on its own socket, host network: no CNI
//!   here), when containerd is installed.
//!
//! Handler accel `HUSK_BENCH_ACCEL` (default tcg); `HUSK_BENCH_HANDLER=husk` measures
//! husk-vmm (no pool column) where hardware KVM exists. `HUSK_BENCH_RUNS` sequential pods
//! (default 10), `HUSK_BENCH_PARALLEL` in parallel (default 20), 5 idle (cold columns only).
//! `HUSK_BENCH_ALSO` (comma-separated handlers, e.g. `husk-qemu`) adds a cold column for
//! each, measured after the first one by the same huskd: husk-vmm beside QEMU in one run
//! (`tests/nested/bootratio-l1.sh bench` does that in the nested L1).
//!
//! `HUSK_BENCH_POOL_IMAGES=1` gives the pool the bench's image (`[runtime.vm.pool] images`):
//! each pooled VM then holds its disk before a pod asks. `HUSK_BENCH_COLD=0` leaves the
//! cold column out (the pool's column and containerd's only).
//! `HUSK_BENCH_REHEARSALS=N` sets the pod starts each pooled VM rehearses (`rehearsals`).
//! `HUSK_BENCH_SETTLE=1` waits for a full pool before each sequential pod (each finds a
//! warm VM and no refill boot beside it).
//!
//! After the table: the median of each RunPodSandbox phase per handler, from huskd's
//! "pod sandbox ready" lines (where a pod's start went).
//!
//! Needs HUSK_GUEST_KERNEL / HUSK_GUEST_INITRD (images/) and QEMU.

use husk_host::cli::bench::{BenchOptions, Report, cri, side_by_side};
use husk_tests::cri_env::CriEnv;
use husk_tests::oci::{Compression, ImageSpec, Pusher, build_image, busybox_layer, set_cmd};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Some((k, i)) = husk_tests::bench::vm_guest() else {
        return Ok(());
    };
    let accel = std::env::var("HUSK_BENCH_ACCEL").unwrap_or_else(|_| "tcg".into());
    let handler = std::env::var("HUSK_BENCH_HANDLER").unwrap_or_else(|_| "husk-qemu".into());
    let runs = husk_tests::bench::env_count("HUSK_BENCH_RUNS", 10);
    let parallel = husk_tests::bench::env_count("HUSK_BENCH_PARALLEL", 20);
    let pool = husk_tests::bench::env_count("HUSK_BENCH_POOL", parallel);
    let extra = std::env::var("HUSK_BENCH_VM_EXTRA").unwrap_or_default();
    // The registry first: the pool's image list names the image by its address.
    let reg = husk_tests::cri_env::busybox_registry().await;
    let pool_images = if std::env::var("HUSK_BENCH_POOL_IMAGES").is_ok_and(|v| v == "1") {
        format!("images = [\"{}/e2e/busybox:1\"]\n", reg.addr)
    } else {
        String::new()
    };
    let pool_images = match std::env::var("HUSK_BENCH_REHEARSALS") {
        Ok(n) => format!("{pool_images}rehearsals = {}\n", n.parse::<u32>()?),
        Err(_) => pool_images,
    };
    let cfg = format!(
        "[runtime]\ndefault_handler = \"{handler}\"\n[runtime.handlers]\nhusk = \"vm\"\nhusk-qemu = {{ kind = \"qemu\", accel = \"{accel}\" }}\n\
         husk-qemu-pool = {{ kind = \"qemu\", accel = \"{accel}\" }}\n\
         [runtime.vm]\nkernel = \"{k}\"\ninitrd = \"{i}\"\nboot_timeout_ms = 300000\nmemory_mib = 256\n{extra}\n\
         [runtime.vm.pool]\nsize = 0\nmemory_budget_mib = {}\nhandlers = {{ husk-qemu-pool = {pool} }}\n{pool_images}",
        (pool as u64 + 1) * 256
    );
    let d = husk_tests::huskd::Huskd::start_with(
        husk_tests::huskd::Options::plain_http(&reg.addr),
        &cfg,
    )
    .await?;
    let e = CriEnv::with_server(reg, d, &handler).await;
    let opts = |runtime: &str, idle: usize, host_network: bool, image: &str| BenchOptions {
        runtime: runtime.into(),
        image: image.into(),
        cmd: vec!["sleep".into(), "1000000".into()],
        runs,
        parallel,
        idle,
        host_network,
        settle: std::env::var_os("HUSK_BENCH_SETTLE").is_some(),
    };
    let fail = |err: anyhow::Error| anyhow::anyhow!("{err:#}\n{}", e.d.log());
    let mut cols: Vec<(String, Report)> = vec![];
    println!("accel {accel}; guest 1 vCPU / 256 MiB");
    // The pool first: while it fills at huskd's start nothing else is measured, and its
    // VMs then idle (tickless guest) through the cold column.
    if handler == "husk-qemu" && pool > 0 {
        let warm = cri(
            &e.c,
            &e.d.socket,
            &opts("husk-qemu-pool", 0, false, &e.image),
        )
        .await
        .map_err(fail)?;
        print!("{}", warm.markdown());
        cols.push((format!("{handler}, pool {pool}"), warm));
    }
    if std::env::var("HUSK_BENCH_COLD").map_or(true, |v| v != "0") {
        let cold = cri(&e.c, &e.d.socket, &opts(&handler, 5, false, &e.image))
            .await
            .map_err(fail)?;
        print!("{}", cold.markdown());
        cols.insert(0, (format!("{handler}, no pool"), cold));
    }
    let also = std::env::var("HUSK_BENCH_ALSO").unwrap_or_default();
    for (n, other) in also.split(',').filter(|h| !h.is_empty()).enumerate() {
        let r = cri(&e.c, &e.d.socket, &opts(other, 5, false, &e.image))
            .await
            .map_err(fail)?;
        print!("{}", r.markdown());
        cols.insert(n + 1, (format!("{other}, no pool"), r));
    }
    if husk_tests::bench::baseline_ready() {
        let p = Pusher::new(&e.reg.addr, None);
        let mut pause = build_image(&ImageSpec {
            layers: vec![busybox_layer(Compression::Gzip)?],
            ..Default::default()
        });
        set_cmd(&mut pause, &["/bin/sleep", "2147483647"]);
        p.push_image("bench/pause", Some("1"), &pause).await?;
        let pause_ref = format!("{}/bench/pause:1", e.reg.addr);
        let ctd = husk_tests::containerd::Containerd::start(&e.reg.addr, &pause_ref)?;
        let cc = husk_tests::containerd::connect(&ctd.sock)
            .await
            .map_err(|err| anyhow::anyhow!("{err}\n{}", ctd.log()))?;
        husk_tests::containerd::pull(&cc, &pause_ref).await?;
        let r = cri(&cc, &ctd.sock, &opts("", 0, true, &e.image))
            .await
            .map_err(|err| anyhow::anyhow!("containerd: {err:#}\n{}", ctd.log()))?;
        cols.push(("containerd + runc (host network)".into(), r));
    }
    let refs: Vec<(&str, &Report)> = cols.iter().map(|(n, r)| (n.as_str(), r)).collect();
    println!("\n{}", side_by_side(&refs));
    println!("{}", phase_medians(&e.d.log()));
    Ok(())
}

/// Per handler, the median of each phase of huskd's "pod sandbox ready" lines
/// (`phases=claim=12,network=3,…,total=150`), in ms.
fn phase_medians(log: &str) -> String {
    use std::collections::BTreeMap;
    let mut by: BTreeMap<String, BTreeMap<String, Vec<u64>>> = BTreeMap::new();
    for line in log.lines() {
        let field = |k: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .map(|v| v.trim_matches('"').to_string())
        };
        // huskd's own view of the container calls that follow (all handlers together).
        let call = if line.contains("container created") {
            Some("CreateContainer")
        } else if line.contains("container started") {
            Some("StartContainer")
        } else {
            None
        };
        if let Some(call) = call {
            for k in ["prepare_ms=", "total_ms="] {
                if let Some(ms) = field(k).and_then(|v| v.parse().ok()) {
                    by.entry(call.to_string())
                        .or_default()
                        .entry(k.trim_end_matches("_ms=").to_string())
                        .or_default()
                        .push(ms);
                }
            }
            continue;
        }
        if !line.contains("pod sandbox ready") {
            continue;
        }
        let (Some(h), Some(p)) = (field("handler="), field("phases=")) else {
            continue;
        };
        for kv in p.split(',') {
            if let Some((k, v)) = kv.split_once('=')
                && let Ok(ms) = v.parse()
            {
                by.entry(h.clone())
                    .or_default()
                    .entry(k.to_string())
                    .or_default()
                    .push(ms);
            }
        }
    }
    let mut out = String::from(
        "RunPodSandbox phases by handler, and huskd's container calls, median ms (count):\n",
    );
    for (h, phases) in by {
        let row: Vec<String> = phases
            .into_iter()
            .map(|(k, mut v)| {
                v.sort_unstable();
                format!("{k} {} ({})", v[v.len() / 2], v.len())
            })
            .collect();
        out.push_str(&format!("  {h}: {}\n", row.join(", ")));
    }
    out
}

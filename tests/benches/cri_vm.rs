//! `cargo bench -p husk-tests --bench cri_vm`: `husk bench cri` (the CLI's CRI bench,
//! `husk_host::cli::bench`) in VM mode, against a huskd and a registry this bench starts.
//! Handler `husk-qemu` with accel `HUSK_BENCH_ACCEL` (default tcg);
//! `HUSK_BENCH_HANDLER=husk` measures husk-vmm where hardware KVM exists.
//! `HUSK_BENCH_RUNS` sequential pods (default 10), 20 in parallel, 5 idle.
//!
//! Needs HUSK_GUEST_KERNEL / HUSK_GUEST_INITRD (images/) and QEMU.

use husk_host::cli::bench::{BenchOptions, cri};
use husk_tests::cri_env::CriEnv;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (Ok(k), Ok(i)) = (
        std::env::var("HUSK_GUEST_KERNEL"),
        std::env::var("HUSK_GUEST_INITRD"),
    ) else {
        println!("skipped: HUSK_GUEST_KERNEL / HUSK_GUEST_INITRD not set");
        return Ok(());
    };
    if !husk_tests::is_root() || !husk_tests::registry::available() {
        println!("skipped: needs root and docker-registry");
        return Ok(());
    }
    let accel = std::env::var("HUSK_BENCH_ACCEL").unwrap_or_else(|_| "tcg".into());
    let handler = std::env::var("HUSK_BENCH_HANDLER").unwrap_or_else(|_| "husk-qemu".into());
    let cfg = format!(
        "[runtime]\ndefault_handler = \"{handler}\"\n[runtime.handlers]\nhusk = \"vm\"\nhusk-qemu = {{ kind = \"qemu\", accel = \"{accel}\" }}\n\
         [runtime.vm]\nkernel = \"{k}\"\ninitrd = \"{i}\"\nboot_timeout_ms = 300000\nmemory_mib = 256\n"
    );
    let e = CriEnv::new(&handler, &cfg).await;
    let o = BenchOptions {
        runtime: handler.clone(),
        image: e.image.clone(),
        cmd: vec!["sleep".into(), "1000000".into()],
        runs: husk_tests::bench::env_count("HUSK_BENCH_RUNS", 10),
        parallel: 20,
        idle: 5,
    };
    let r = cri(&e.c, &e.d.socket, &o)
        .await
        .map_err(|err| anyhow::anyhow!("{err:#}\n{}", e.d.log()))?;
    println!("accel {accel}; guest 1 vCPU / 256 MiB");
    print!("{}", r.markdown());
    Ok(())
}

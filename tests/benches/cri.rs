#![allow(clippy::unwrap_used)]
//! `cargo bench -p husk-tests --bench cri`: the CRI runtime path, husk
//! (`husk-ns` namespace sandbox) vs containerd + runc (Debian packages, its
//! CRI plugin on its own socket), through the same CRI client, in one run:
//!
//! - pod start: RunPodSandbox → CreateContainer → StartContainer returned
//!   (container running), sequential, median of N;
//! - ExecSync round trip (`true` in a running container), median of M;
//! - 20 pods started in parallel (each to a running container): wall time.
//!
//! Pods use the host network on both (no CNI on this machine). containerd
//! gets a pause image (busybox `sleep`) from the same local registry.
//! `HUSK_BENCH_RUNS` (default 10) sets N; M = 2N.

use std::time::{Duration, Instant};

use husk_host::client::Clients;
use husk_proto::cri;
use husk_tests::containerd::{Containerd, connect, pull};
use husk_tests::huskd::{Huskd, Options};
use husk_tests::oci::{Compression, ImageSpec, Pusher, build_image, busybox_layer, set_cmd};
use husk_tests::registry::Registry;

const PARALLEL: usize = 20;

struct Target {
    name: &'static str,
    c: Clients,
    handler: String,
    image: String,
    logs: std::path::PathBuf,
}

fn pod_config(t: &Target, name: &str) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "bench".into(),
            attempt: 0,
        }),
        // Host network: no hostname of its own (runc refuses one without a UTS namespace).
        hostname: String::new(),
        log_directory: t.logs.join(name).display().to_string(),
        linux: Some(cri::LinuxPodSandboxConfig {
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(cri::NamespaceOption {
                    network: 2,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// RunPodSandbox → running container; returns (pod, container, latency).
async fn pod_to_running(t: &Target, name: &str) -> anyhow::Result<(String, String, Duration)> {
    let mut rt = t.c.runtime.clone();
    let pcfg = pod_config(t, name);
    let t0 = Instant::now();
    let pod = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(pcfg.clone()),
            runtime_handler: t.handler.clone(),
        })
        .await?
        .into_inner()
        .pod_sandbox_id;
    let net = cri::NamespaceOption {
        network: 2,
        ..Default::default()
    };
    let id = rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(cri::ContainerConfig {
                metadata: Some(cri::ContainerMetadata {
                    name: "main".into(),
                    attempt: 0,
                }),
                image: Some(cri::ImageSpec {
                    image: t.image.clone(),
                    ..Default::default()
                }),
                command: vec!["sleep".into(), "1000".into()],
                log_path: "main.log".into(),
                linux: Some(cri::LinuxContainerConfig {
                    security_context: Some(cri::LinuxContainerSecurityContext {
                        namespace_options: Some(net),
                        ..Default::default()
                    }),
                    resources: None,
                }),
                ..Default::default()
            }),
            sandbox_config: Some(pcfg),
        })
        .await?
        .into_inner()
        .container_id;
    rt.start_container(cri::StartContainerRequest {
        container_id: id.clone(),
    })
    .await?;
    Ok((pod, id, t0.elapsed()))
}

async fn remove(t: &Target, pod: &str) {
    let mut rt = t.c.runtime.clone();
    let _ = rt
        .stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: pod.into(),
        })
        .await;
    let _ = rt
        .remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod.into(),
        })
        .await;
}

struct Result3 {
    start_ms: f64,
    exec_ms: f64,
    parallel_s: f64,
}

async fn measure(t: &Target, runs: usize) -> anyhow::Result<Result3> {
    // Warm-up (first pod pays for lazy setup on both sides).
    let (pod, _, _) = pod_to_running(t, "warm").await?;
    remove(t, &pod).await;
    let mut starts = vec![];
    for i in 0..runs {
        let (pod, _, d) = pod_to_running(t, &format!("seq-{i}")).await?;
        starts.push(d.as_secs_f64() * 1e3);
        remove(t, &pod).await;
    }
    let (pod, ctr, _) = pod_to_running(t, "exec").await?;
    let mut execs = vec![];
    for _ in 0..runs * 2 {
        let t0 = Instant::now();
        let r =
            t.c.runtime
                .clone()
                .exec_sync(cri::ExecSyncRequest {
                    container_id: ctr.clone(),
                    cmd: vec!["true".into()],
                    timeout: 10,
                })
                .await?
                .into_inner();
        anyhow::ensure!(r.exit_code == 0, "exec failed: {r:?}");
        execs.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    remove(t, &pod).await;
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..PARALLEL)
        .map(|i| {
            let t = Target {
                name: t.name,
                c: t.c.clone(),
                handler: t.handler.clone(),
                image: t.image.clone(),
                logs: t.logs.clone(),
            };
            tokio::spawn(async move {
                pod_to_running(&t, &format!("par-{i}"))
                    .await
                    .map(|(p, _, _)| p)
            })
        })
        .collect();
    let mut pods = vec![];
    for task in tasks {
        pods.push(task.await??);
    }
    let parallel_s = t0.elapsed().as_secs_f64();
    for p in pods {
        remove(t, &p).await;
    }
    Ok(Result3 {
        start_ms: husk_tests::bench::median(starts),
        exec_ms: husk_tests::bench::median(execs),
        parallel_s,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if !husk_tests::bench::baseline_ready() {
        return Ok(());
    }
    let runs = husk_tests::bench::env_count("HUSK_BENCH_RUNS", 10);
    let reg = Registry::start(None)?;
    let p = Pusher::new(&reg.addr, None);
    let img = build_image(&ImageSpec {
        layers: vec![busybox_layer(Compression::Gzip)?],
        ..Default::default()
    });
    p.push_image("bench/busybox", Some("1"), &img).await?;
    let mut pause = build_image(&ImageSpec {
        layers: vec![busybox_layer(Compression::Gzip)?],
        ..Default::default()
    });
    set_cmd(&mut pause, &["/bin/sleep", "2147483647"]);
    p.push_image("bench/pause", Some("1"), &pause).await?;
    let image = format!("{}/bench/busybox:1", reg.addr);
    let pause_ref = format!("{}/bench/pause:1", reg.addr);

    let logs = tempfile::tempdir()?;
    let d = Huskd::start(Options::plain_http(&reg.addr)).await?;
    let hc = d.clients().await?;
    pull(&hc, &image).await?;
    let husk = Target {
        name: "husk (husk-ns)",
        c: hc,
        handler: "husk-ns".into(),
        image: image.clone(),
        logs: logs.path().join("husk"),
    };
    let ctd = Containerd::start(&reg.addr, &pause_ref)?;
    let cc = match connect(&ctd.sock).await {
        Ok(c) => c,
        Err(e) => anyhow::bail!("{e}\n{}", ctd.log()),
    };
    pull(&cc, &image).await?;
    pull(&cc, &pause_ref).await?;
    let containerd = Target {
        name: "containerd+runc",
        c: cc,
        handler: String::new(),
        image,
        logs: logs.path().join("containerd"),
    };

    let h = measure(&husk, runs).await?;
    println!(
        "husk: pod start {:.1} ms, exec {:.1} ms, {PARALLEL} parallel {:.2} s",
        h.start_ms, h.exec_ms, h.parallel_s
    );
    let c = match measure(&containerd, runs).await {
        Ok(c) => c,
        Err(e) => anyhow::bail!(
            "containerd: {e}\n{}",
            ctd.log()
                .lines()
                .rev()
                .take(20)
                .collect::<Vec<_>>()
                .join("\n")
        ),
    };
    println!(
        "{runs} sequential pod starts, {} exec round trips, {PARALLEL} parallel pod starts",
        runs * 2
    );
    println!(
        "| metric | {} | {} | husk / containerd |",
        husk.name, containerd.name
    );
    println!("|---|---|---|---|");
    println!(
        "| RunPodSandbox → container running (median) | {:.1} ms | {:.1} ms | {:.2} |",
        h.start_ms,
        c.start_ms,
        h.start_ms / c.start_ms
    );
    println!(
        "| ExecSync `true` round trip (median) | {:.1} ms | {:.1} ms | {:.2} |",
        h.exec_ms,
        c.exec_ms,
        h.exec_ms / c.exec_ms
    );
    println!(
        "| {PARALLEL} pods started in parallel (wall) | {:.2} s | {:.2} s | {:.2} |",
        h.parallel_s,
        c.parallel_s,
        h.parallel_s / c.parallel_s
    );
    Ok(())
}

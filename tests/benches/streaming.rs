#![allow(clippy::unwrap_used)]
//! `cargo bench -p husk-tests --bench streaming`: the streaming server, husk
//! (`husk-ns`) vs containerd's (kubelet's streaming library), driven by the
//! same client (husk's own SPDY/WebSocket client) in one run:
//!
//! - exec round trip: CRI Exec → connect → `echo hi` → exit status, median of N;
//! - port-forward throughput: HTTP GET of a 32 MiB file from busybox httpd in
//!   the pod through one forwarded connection (median of 3), and through 10
//!   parallel connections (aggregate).
//!
//! Pods use the host network on both (the same as the cri bench), the
//! server listens on a different port per runtime. `HUSK_BENCH_RUNS`
//! (default 20) sets N.

use std::time::{Duration, Instant};

use husk_host::client::Clients;
use husk_host::streaming::client::{self, SpdyForwarder, Transport};
use husk_proto::cri;
use husk_tests::containerd::{Containerd, connect, pull};
use husk_tests::huskd::{Huskd, Options};
use husk_tests::oci::{Compression, ImageSpec, Pusher, build_image, busybox_layer, set_cmd};
use husk_tests::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const FILE_MB: usize = 32;
const PARALLEL: usize = 10;

struct Target {
    name: &'static str,
    c: Clients,
    handler: String,
    image: String,
    logs: std::path::PathBuf,
    port: u16,
}

fn host_net() -> cri::NamespaceOption {
    cri::NamespaceOption {
        network: 2,
        ..Default::default()
    }
}

/// A pod with a container serving a FILE_MB file with httpd on `t.port`.
async fn server_pod(t: &Target) -> anyhow::Result<(String, String)> {
    let mut rt = t.c.runtime.clone();
    let pcfg = cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: "stream".into(),
            uid: "uid-stream".into(),
            namespace: "bench".into(),
            attempt: 0,
        }),
        log_directory: t.logs.display().to_string(),
        linux: Some(cri::LinuxPodSandboxConfig {
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(host_net()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let pod = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(pcfg.clone()),
            runtime_handler: t.handler.clone(),
        })
        .await?
        .into_inner()
        .pod_sandbox_id;
    let script = format!(
        "mkdir -p /www && head -c {} /dev/zero > /www/big && httpd -p 127.0.0.1:{} -h /www && exec sleep 100000",
        FILE_MB << 20,
        t.port
    );
    let id = rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(cri::ContainerConfig {
                metadata: Some(cri::ContainerMetadata {
                    name: "web".into(),
                    attempt: 0,
                }),
                image: Some(cri::ImageSpec {
                    image: t.image.clone(),
                    ..Default::default()
                }),
                command: vec!["sh".into(), "-c".into(), script],
                log_path: "web.log".into(),
                linux: Some(cri::LinuxContainerConfig {
                    security_context: Some(cri::LinuxContainerSecurityContext {
                        namespace_options: Some(host_net()),
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
    Ok((pod, id))
}

async fn exec_once(t: &Target, ctr: &str, transport: Transport) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    let url =
        t.c.runtime
            .clone()
            .exec(cri::ExecRequest {
                container_id: ctr.into(),
                cmd: vec!["echo".into(), "hi".into()],
                stdout: true,
                stderr: true,
                ..Default::default()
            })
            .await?
            .into_inner()
            .url;
    let (o, _, r) = client::exec_collect(&url, transport, None, true).await;
    let d = t0.elapsed();
    anyhow::ensure!(
        o == b"hi\n" && r == Ok(0),
        "exec: {:?} {r:?}",
        String::from_utf8_lossy(&o)
    );
    Ok(d)
}

/// GET /big through `s`; the bytes received.
async fn get_big(mut s: tokio::io::DuplexStream) -> anyhow::Result<usize> {
    s.write_all(b"GET /big HTTP/1.0\r\n\r\n").await?;
    let mut n = 0;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let k = s.read(&mut buf).await?;
        if k == 0 {
            break;
        }
        n += k;
    }
    anyhow::ensure!(n > FILE_MB << 20, "short transfer: {n} bytes");
    Ok(n)
}

/// (one stream MB/s, PARALLEL streams aggregate MB/s)
async fn throughput(t: &Target, pod: &str) -> anyhow::Result<(f64, f64)> {
    let url =
        t.c.runtime
            .clone()
            .port_forward(cri::PortForwardRequest {
                pod_sandbox_id: pod.into(),
                port: vec![i32::from(t.port)],
            })
            .await?
            .into_inner()
            .url;
    let f = std::sync::Arc::new(SpdyForwarder::connect(&url).await?);
    // Warm-up.
    get_big(f.open(t.port).await?.0).await?;
    let mut one = vec![];
    for _ in 0..3 {
        let t0 = Instant::now();
        let n = get_big(f.open(t.port).await?.0).await?;
        one.push(n as f64 / 1e6 / t0.elapsed().as_secs_f64());
    }
    let t0 = Instant::now();
    let mut tasks = vec![];
    for _ in 0..PARALLEL {
        let s = f.open(t.port).await?.0;
        tasks.push(tokio::spawn(get_big(s)));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await??;
    }
    let par = total as f64 / 1e6 / t0.elapsed().as_secs_f64();
    if let Ok(f) = std::sync::Arc::try_unwrap(f) {
        f.close().await;
    }
    Ok((husk_tests::bench::median(one), par))
}

struct Numbers {
    exec_spdy_ms: f64,
    exec_ws_ms: Option<f64>,
    one_mbs: f64,
    par_mbs: f64,
}

async fn measure(t: &Target, runs: usize) -> anyhow::Result<Numbers> {
    let (pod, ctr) = server_pod(t).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    exec_once(t, &ctr, Transport::Spdy).await?;
    let mut spdy = vec![];
    for _ in 0..runs {
        spdy.push(exec_once(t, &ctr, Transport::Spdy).await?.as_secs_f64() * 1e3);
    }
    let mut ws = vec![];
    for _ in 0..runs {
        match exec_once(t, &ctr, Transport::WebSocket).await {
            Ok(d) => ws.push(d.as_secs_f64() * 1e3),
            Err(e) => {
                println!("{}: exec over WebSocket: {e}", t.name);
                break;
            }
        }
    }
    let (one_mbs, par_mbs) = throughput(t, &pod).await?;
    let mut rt = t.c.runtime.clone();
    let _ = rt
        .stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await;
    let _ = rt
        .remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod,
        })
        .await;
    Ok(Numbers {
        exec_spdy_ms: husk_tests::bench::median(spdy),
        exec_ws_ms: (ws.len() == runs).then(|| husk_tests::bench::median(ws)),
        one_mbs,
        par_mbs,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if !husk_tests::bench::baseline_ready() {
        return Ok(());
    }
    let runs = husk_tests::bench::env_count("HUSK_BENCH_RUNS", 20);
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
        port: 18481,
    };
    let ctd = Containerd::start(&reg.addr, &pause_ref)?;
    let cc = match connect(&ctd.sock).await {
        Ok(c) => c,
        Err(e) => anyhow::bail!("{e}\n{}", ctd.log()),
    };
    pull(&cc, &image).await?;
    pull(&cc, &pause_ref).await?;
    let containerd = Target {
        name: "containerd 1.6",
        c: cc,
        handler: String::new(),
        image,
        logs: logs.path().join("containerd"),
        port: 18482,
    };
    let h = measure(&husk, runs).await?;
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
    let ms = |v: Option<f64>| {
        v.map(|v| format!("{v:.1} ms"))
            .unwrap_or_else(|| "n/a".into())
    };
    println!(
        "{runs} exec round trips per protocol; GET of a {FILE_MB} MiB file; {PARALLEL} parallel connections"
    );
    println!("| metric | {} | {} |", husk.name, containerd.name);
    println!("|---|---|---|");
    println!(
        "| Exec `echo hi` round trip, SPDY (median) | {:.1} ms | {:.1} ms |",
        h.exec_spdy_ms, c.exec_spdy_ms
    );
    println!(
        "| Exec `echo hi` round trip, WebSocket (median) | {} | {} |",
        ms(h.exec_ws_ms),
        ms(c.exec_ws_ms)
    );
    println!(
        "| PortForward, 1 connection (median of 3) | {:.0} MB/s | {:.0} MB/s |",
        h.one_mbs, c.one_mbs
    );
    println!(
        "| PortForward, {PARALLEL} parallel connections (aggregate) | {:.0} MB/s | {:.0} MB/s |",
        h.par_mbs, c.par_mbs
    );
    Ok(())
}

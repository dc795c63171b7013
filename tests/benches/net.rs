#![allow(clippy::unwrap_used)]
//! `cargo bench -p husk-tests --bench net`: pod-to-pod TCP over CNI, husk
//! (`husk-ns` namespace sandbox) vs containerd + runc, the same CNI config
//! list on both (bridge + host-local + portmap + loopback from
//! containernetworking-plugins; each runtime its own bridge and subnet):
//!
//! - throughput: one TCP stream, client pod → server pod, for
//!   `HUSK_BENCH_NET_SECS` (default 5) s, median of 3 runs;
//! - latency: `HUSK_BENCH_RR` (default 20000) 1-byte request/response round
//!   trips on one connection (TCP_NODELAY), p50 and p99.
//!
//! With HUSK_GUEST_KERNEL/HUSK_GUEST_INITRD set, also a VM-sandbox server
//! pod (husk-qemu, QEMU/TCG) with a husk-ns client pod.
//!
//! The client and server are `tests/netperf/netperf.rs`, built here with
//! rustc as a static binary and added to a busybox image.

use std::path::{Path, PathBuf};
use std::process::Command;

use husk_host::client::Clients;
use husk_proto::cri;
use husk_tests::containerd::{Cni, Containerd, connect, pull};
use husk_tests::huskd::{Huskd, Options};
use husk_tests::oci::{
    Compression, Entry, ImageSpec, Layer, Pusher, build_image, busybox_layer, set_cmd,
};
use husk_tests::registry::Registry;

const CNI_BIN: &str = "/usr/lib/cni";
const PORT: &str = "5201";

/// Builds netperf as a static binary.
fn build_netperf(out: &Path) -> anyhow::Result<Vec<u8>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("netperf/netperf.rs");
    let bin = out.join("netperf");
    let st = Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into()))
        .args([
            "-O",
            "-C",
            "target-feature=+crt-static",
            "--edition",
            "2021",
            "-o",
        ])
        .arg(&bin)
        .arg(&src)
        .status()?;
    anyhow::ensure!(st.success(), "rustc netperf failed");
    Ok(std::fs::read(bin)?)
}

/// One runtime's CNI network (bridge deleted on drop).
struct Net {
    bridge: String,
    conflist: String,
}

impl Net {
    fn new(x: u8, ipam: &Path) -> Net {
        let tag: u32 = rand::random();
        let bridge = format!("hb{tag:08x}");
        let conflist = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": format!("husk-bench-{tag:08x}"),
            "plugins": [
                {
                    "type": "bridge", "bridge": bridge, "isGateway": true, "ipMasq": false,
                    "ipam": {
                        "type": "host-local", "dataDir": ipam,
                        "ranges": [[{"subnet": format!("198.19.{x}.0/24")}]],
                        "routes": [{"dst": "0.0.0.0/0"}]
                    }
                },
                {"type": "portmap", "capabilities": {"portMappings": true}},
                {"type": "loopback"}
            ]
        })
        .to_string();
        Net { bridge, conflist }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
    }
}

struct Target {
    name: &'static str,
    c: Clients,
    handler: String,
    image: String,
    logs: PathBuf,
}

fn pod_config(t: &Target, name: &str) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "bench".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        log_directory: t.logs.join(name).display().to_string(),
        ..Default::default()
    }
}

/// A pod with one running container; (pod id, container id, pod IP).
async fn pod(
    t: &Target,
    handler: &str,
    name: &str,
    cmd: &[&str],
) -> anyhow::Result<(String, String, String)> {
    let mut rt = t.c.runtime.clone();
    let pcfg = pod_config(t, name);
    let pod = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(pcfg.clone()),
            runtime_handler: handler.into(),
        })
        .await?
        .into_inner()
        .pod_sandbox_id;
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
                command: cmd.iter().map(|s| s.to_string()).collect(),
                log_path: "main.log".into(),
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
    let ip = rt
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: pod.clone(),
            verbose: false,
        })
        .await?
        .into_inner()
        .status
        .and_then(|s| s.network)
        .map(|n| n.ip)
        .unwrap_or_default();
    anyhow::ensure!(!ip.is_empty(), "{}: pod {name} has no IP", t.name);
    Ok((pod, id, ip))
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

/// Runs netperf in the client container; the numbers after `key`.
async fn netperf(t: &Target, ctr: &str, args: &[&str], key: &str) -> anyhow::Result<Vec<f64>> {
    let mut cmd = vec!["/bin/netperf".to_string()];
    cmd.extend(args.iter().map(|s| s.to_string()));
    let r =
        t.c.runtime
            .clone()
            .exec_sync(cri::ExecSyncRequest {
                container_id: ctr.into(),
                cmd,
                timeout: 120,
            })
            .await?
            .into_inner();
    let out = String::from_utf8_lossy(&r.stdout).into_owned();
    anyhow::ensure!(
        r.exit_code == 0,
        "{}: netperf {args:?}: {out}{}",
        t.name,
        String::from_utf8_lossy(&r.stderr)
    );
    let line = out
        .lines()
        .find(|l| l.starts_with(key))
        .ok_or_else(|| anyhow::anyhow!("no {key} in {out}"))?;
    Ok(line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect())
}

struct Numbers {
    gbit: f64,
    p50_us: f64,
    p99_us: f64,
}

/// Server pod with `server_handler`, client pod with the target's handler.
async fn measure(
    t: &Target,
    server_handler: &str,
    secs: u64,
    rr: usize,
) -> anyhow::Result<Numbers> {
    let (server, _, ip) = pod(
        t,
        server_handler,
        "server",
        &["/bin/netperf", "server", PORT],
    )
    .await?;
    let (client, ctr, _) = pod(t, &t.handler, "client", &["sleep", "100000"]).await?;
    let secs_s = secs.to_string();
    let result = async {
        // Warm-up (ARP, first connection).
        netperf(t, &ctr, &["rr", &ip, PORT, "100"], "rr_us").await?;
        let mut tputs = vec![];
        for _ in 0..3 {
            tputs.push(netperf(t, &ctr, &["tput", &ip, PORT, &secs_s], "tput_gbit_s").await?[0]);
        }
        let lat = netperf(t, &ctr, &["rr", &ip, PORT, &rr.to_string()], "rr_us").await?;
        Ok::<_, anyhow::Error>(Numbers {
            gbit: husk_tests::bench::median(tputs),
            p50_us: lat[0],
            p99_us: lat[1],
        })
    }
    .await;
    remove(t, &client).await;
    remove(t, &server).await;
    result
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if !husk_tests::bench::baseline_ready() {
        return Ok(());
    }
    if !["bridge", "host-local", "portmap", "loopback"]
        .iter()
        .all(|p| Path::new(CNI_BIN).join(p).exists())
    {
        println!("skipped: needs the CNI plugins in {CNI_BIN} (containernetworking-plugins)");
        return Ok(());
    }
    let secs = husk_tests::bench::env_count("HUSK_BENCH_NET_SECS", 5) as u64;
    let rr = husk_tests::bench::env_count("HUSK_BENCH_RR", 20_000);
    let work = tempfile::tempdir()?;
    let netperf_bin = build_netperf(work.path())?;

    let reg = Registry::start(None)?;
    let p = Pusher::new(&reg.addr, None);
    let img = build_image(&ImageSpec {
        layers: vec![
            busybox_layer(Compression::Gzip)?,
            Layer {
                entries: vec![Entry::File("bin/netperf".into(), netperf_bin, 0o755)],
                compression: Compression::Gzip,
            },
        ],
        ..Default::default()
    });
    p.push_image("bench/netperf", Some("1"), &img).await?;
    let mut pause = build_image(&ImageSpec {
        layers: vec![busybox_layer(Compression::Gzip)?],
        ..Default::default()
    });
    set_cmd(&mut pause, &["/bin/sleep", "2147483647"]);
    p.push_image("bench/pause", Some("1"), &pause).await?;
    let image = format!("{}/bench/netperf:1", reg.addr);
    let pause_ref = format!("{}/bench/pause:1", reg.addr);

    let routes =
        String::from_utf8_lossy(&Command::new("ip").arg("route").output()?.stdout).into_owned();
    let free: Vec<u8> = (10..250u8)
        .filter(|x| !routes.contains(&format!("198.19.{x}.")))
        .take(2)
        .collect();
    anyhow::ensure!(free.len() == 2, "no free 198.19.x.0/24");
    let husk_net = Net::new(free[0], &work.path().join("ipam-husk"));
    let ctd_net = Net::new(free[1], &work.path().join("ipam-containerd"));

    let logs = tempfile::tempdir()?;
    // The VM sandbox too where the guest image is built (QEMU/TCG here).
    let guest = match (
        std::env::var("HUSK_GUEST_KERNEL"),
        std::env::var("HUSK_GUEST_INITRD"),
    ) {
        (Ok(k), Ok(i)) => Some(format!(
            "[runtime.handlers]\nhusk = \"vm\"\nhusk-qemu = {{ kind = \"qemu\", accel = \"tcg\" }}\nhusk-ns = \"namespace\"\n\
             [runtime.vm]\nkernel = \"{k}\"\ninitrd = \"{i}\"\nboot_timeout_ms = 120000\nmemory_mib = 256\n"
        )),
        _ => None,
    };
    let d = Huskd::start_with(
        Options::plain_http(&reg.addr),
        &format!(
            "cni_bin_dirs = [\"{CNI_BIN}\"]\n{}",
            guest.clone().unwrap_or_default()
        ),
    )
    .await?;
    std::fs::write(
        d.cni_conf_dir().join("10-bench.conflist"),
        &husk_net.conflist,
    )?;
    let hc = d.clients().await?;
    pull(&hc, &image).await?;
    let husk = Target {
        name: "husk (husk-ns)",
        c: hc,
        handler: "husk-ns".into(),
        image: image.clone(),
        logs: logs.path().join("husk"),
    };
    let ctd_conf = work.path().join("containerd-net.d");
    std::fs::create_dir_all(&ctd_conf)?;
    std::fs::write(ctd_conf.join("10-bench.conflist"), &ctd_net.conflist)?;
    let ctd = Containerd::start_with_cni(
        &reg.addr,
        &pause_ref,
        Some(Cni {
            bin_dir: Path::new(CNI_BIN),
            conf_dir: &ctd_conf,
        }),
    )?;
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

    let h = measure(&husk, "husk-ns", secs, rr).await?;
    let c = match measure(&containerd, "", secs, rr).await {
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
        "pod-to-pod over a CNI bridge: one TCP stream for {secs} s (median of 3), {rr} 1-byte round trips"
    );
    println!(
        "| metric | {} | {} | husk / containerd |",
        husk.name, containerd.name
    );
    println!("|---|---|---|---|");
    println!(
        "| TCP throughput, one stream | {:.2} Gbit/s | {:.2} Gbit/s | {:.2} |",
        h.gbit,
        c.gbit,
        h.gbit / c.gbit
    );
    println!(
        "| TCP round trip p50 | {:.1} µs | {:.1} µs | {:.2} |",
        h.p50_us,
        c.p50_us,
        h.p50_us / c.p50_us
    );
    println!(
        "| TCP round trip p99 | {:.1} µs | {:.1} µs | {:.2} |",
        h.p99_us,
        c.p99_us,
        h.p99_us / c.p99_us
    );
    if guest.is_some() {
        let v = measure(&husk, "husk-qemu", secs, rr).await?;
        println!(
            "VM sandbox (husk-qemu on QEMU/TCG: emulated CPU) server pod, husk-ns client pod: \
             {:.3} Gbit/s, round trip p50 {:.1} µs, p99 {:.1} µs",
            v.gbit, v.p50_us, v.p99_us
        );
    } else {
        println!("VM sandbox: not measured (set HUSK_GUEST_KERNEL/HUSK_GUEST_INITRD)");
    }
    Ok(())
}

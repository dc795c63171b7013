#![allow(clippy::unwrap_used)]
//! `cargo bench -p husk-tests --bench pull`: pull + unpack of a ≥ 50 MB
//! multi-layer image from a local registry, husk vs containerd (Debian's
//! containerd 1.6 with `ctr image pull --plain-http`), interleaved in one
//! run, each from an empty store. Reports wall time and peak RSS (VmHWM of
//! the daemon; for containerd also the `ctr` client, which does the
//! fetching in 1.6).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use husk_proto::cri;
use husk_tests::huskd::{Huskd, Options};
use husk_tests::oci::{Compression, ImageSpec, Pusher, build_image, busybox_layer, random_layer};
use husk_tests::registry::Registry;

fn vm_hwm_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

struct Sample {
    secs: f64,
    daemon_kib: u64,
    client_kib: u64,
}

async fn husk_once(reg: &Registry, image: &str) -> anyhow::Result<Sample> {
    let d = Huskd::start(Options::plain_http(&reg.addr)).await?;
    let mut c = d.clients().await?;
    let t = Instant::now();
    c.image
        .pull_image(cri::PullImageRequest {
            image: Some(cri::ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await?;
    let secs = t.elapsed().as_secs_f64();
    let daemon_kib = vm_hwm_kib(d.pid().unwrap_or(0));
    Ok(Sample {
        secs,
        daemon_kib,
        client_kib: 0,
    })
}

fn containerd_once(image: &str) -> anyhow::Result<Sample> {
    let dir = tempfile::tempdir()?;
    let sock = dir.path().join("containerd.sock");
    let cfg = dir.path().join("config.toml");
    std::fs::write(
        &cfg,
        format!(
            "version = 2\nroot = \"{}\"\nstate = \"{}\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\n  address = \"{}\"\n",
            dir.path().join("root").display(),
            dir.path().join("state").display(),
            sock.display()
        ),
    )?;
    let mut daemon = Command::new("containerd")
        .arg("--config")
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("containerd.log"))?)
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        anyhow::ensure!(Instant::now() < deadline, "containerd did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    let child = Command::new("ctr")
        .arg("--address")
        .arg(&sock)
        .args(["image", "pull", "--plain-http", image])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: zeroed rusage is a valid out-parameter for wait4.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waiting on our own child with valid out-pointers.
    unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    let secs = t.elapsed().as_secs_f64();
    anyhow::ensure!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "ctr pull failed"
    );
    let daemon_kib = vm_hwm_kib(daemon.id());
    let _ = daemon.kill();
    let _ = daemon.wait();
    // Unmount anything containerd left and remove its state.
    let _ = Command::new("umount")
        .arg("-R")
        .arg(dir.path().join("root"))
        .stderr(Stdio::null())
        .status();
    Ok(Sample {
        secs,
        daemon_kib,
        client_kib: ru.ru_maxrss as u64,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if !husk_tests::bench::baseline_ready() {
        return Ok(());
    }
    let rounds = husk_tests::bench::env_count("HUSK_BENCH_ROUNDS", 5);
    let reg = Registry::start(None)?;
    let mut layers = vec![busybox_layer(Compression::Gzip)?];
    for i in 0..7 {
        layers.push(random_layer(i, 15 << 20, 40, Compression::Gzip));
    }
    let img = build_image(&ImageSpec {
        layers,
        ..Default::default()
    });
    let compressed: usize = img.layers.iter().map(|l| l.blob.len()).sum();
    Pusher::new(&reg.addr, None)
        .push_image("bench/big", Some("v1"), &img)
        .await?;
    let image = format!("{}/bench/big:v1", reg.addr);
    let raw: usize = img.layers.len() * (15 << 20);
    println!(
        "image: {} layers, {:.1} MB compressed, ~{:.0} MB unpacked",
        img.layers.len(),
        compressed as f64 / 1e6,
        raw as f64 / 1e6
    );
    anyhow::ensure!(
        compressed >= 50_000_000,
        "bench image must be at least 50 MB"
    );

    let (mut ht, mut ct, mut hr, mut cr, mut cc) = (vec![], vec![], vec![], vec![], vec![]);
    for round in 0..rounds {
        let h = husk_once(&reg, &image).await?;
        let c = containerd_once(&image)?;
        println!(
            "round {round}: husk {:.3}s rss {} KiB | containerd {:.3}s rss {} KiB (+ctr {} KiB)",
            h.secs, h.daemon_kib, c.secs, c.daemon_kib, c.client_kib
        );
        ht.push(h.secs);
        ct.push(c.secs);
        hr.push(h.daemon_kib as f64);
        cr.push(c.daemon_kib as f64);
        cc.push((c.daemon_kib + c.client_kib) as f64);
    }
    let (ht, ct, hr, cr, cc) = (
        husk_tests::bench::median(ht),
        husk_tests::bench::median(ct),
        husk_tests::bench::median(hr),
        husk_tests::bench::median(cr),
        husk_tests::bench::median(cc),
    );
    println!(
        "median pull+unpack: husk {ht:.3}s, containerd {ct:.3}s, ratio husk/containerd = {:.2}",
        ht / ct
    );
    println!(
        "median peak RSS: huskd {:.1} MiB, containerd {:.1} MiB (with ctr {:.1} MiB), ratio = {:.2} ({:.2} vs daemon+ctr)",
        hr / 1024.0,
        cr / 1024.0,
        cc / 1024.0,
        hr / cr,
        hr / cc
    );
    Ok(())
}

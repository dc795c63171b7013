#![allow(clippy::unwrap_used)]
//! Hostile-guest attacks on what huskd buffers, run from containers of VM pods on QEMU/TCG
//! (handler `husk-qemu`): an output flood (`yes ''`: millions of empty log lines) while
//! huskd's CPU, memory and CRI latency are measured, a guest console flood (the console log
//! stays within its cap), and ExecSync output beyond kubelet's 16 MiB (both sandbox kinds).
//!
//! Needs root, a local registry, qemu-system-x86_64 and HUSK_GUEST_KERNEL/HUSK_GUEST_INITRD
//! (tests/run.sh provides them); prints `skipped: <reason>` otherwise. Timing is printed,
//! and asserted only as sanity bounds.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use husk_host::sandbox::exec::{MAX_OUTPUT, TRUNCATED_MARKER};
use husk_host::sandbox::vm::LOG_MAX_BYTES;
use husk_proto::cri;
use husk_tests::cri_env::CriEnv;
use husk_tests::require;
use husk_tests::runtime::{NS, ns_env_ok, wait_exited};
use husk_tests::runtime::{VM_HANDLERS, VM_NEEDS as NEEDS, guest, vm_env_ok as env_ok, vm_handler};

async fn vm_env() -> CriEnv {
    vm_env_with("").await
}

/// `extra`: more `[runtime.vm]` keys.
async fn vm_env_with(extra: &str) -> CriEnv {
    let (k, i) = guest().unwrap();
    let h = vm_handler();
    let cfg = format!(
        "[runtime]\ndefault_handler = \"{h}\"\n[runtime.handlers]\n{VM_HANDLERS}husk-ns = \"namespace\"\n\
         [runtime.vm]\nkernel = \"{k}\"\ninitrd = \"{i}\"\nboot_timeout_ms = 90000\nmemory_mib = 256\n{extra}"
    );
    CriEnv::new(h, &cfg).await.remove_pods_on_drop()
}

/// The console log cap the flood runs against: huskd's default, except in the nested test
/// bed's L1 (`HUSK_NODE=nested`, tests/nested/l1-init), where each byte on the guest's serial
/// port costs two port-I/O exits of L2 at ~10k/s (3 x 4 MiB would take over 40 minutes). The
/// smaller cap (`runtime.vm.log_max_bytes`) runs the same writer, rotations and checks.
fn console_cap() -> u64 {
    if std::env::var("HUSK_NODE").is_ok_and(|n| n == "nested") {
        64 << 10
    } else {
        LOG_MAX_BYTES
    }
}

/// `VmRSS` of a process in KiB (0 when gone).
fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// User + system CPU time of a process (all its threads).
fn cpu_time(pid: i32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|r| r.1).unwrap_or("");
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // utime and stime are fields 14 and 15 of stat: 12 and 13 after the state.
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    // SAFETY: sysconf only reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

#[derive(Debug)]
struct Probe {
    p50: Duration,
    p99: Duration,
    max: Duration,
    calls: usize,
    huskd_cpu: f64,
    huskd_rss_max_kib: u64,
}

/// Calls `Version` and `ListPodSandbox` back to back for `span`, and samples huskd's CPU and
/// RSS meanwhile.
async fn probe(e: &CriEnv, span: Duration) -> Probe {
    let pid = e.d.pid().unwrap() as i32;
    let (cpu0, t0) = (cpu_time(pid), Instant::now());
    let mut lat = Vec::new();
    let mut rss = 0;
    while t0.elapsed() < span {
        let t = Instant::now();
        e.c.runtime
            .clone()
            .version(cri::VersionRequest::default())
            .await
            .unwrap();
        lat.push(t.elapsed());
        let t = Instant::now();
        e.list_pods(None).await;
        lat.push(t.elapsed());
        rss = rss.max(rss_kib(pid));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let huskd_cpu = (cpu_time(pid) - cpu0).as_secs_f64() / t0.elapsed().as_secs_f64();
    lat.sort();
    let at = |q: f64| lat[((lat.len() - 1) as f64 * q) as usize];
    Probe {
        p50: at(0.5),
        p99: at(0.99),
        max: *lat.last().unwrap(),
        calls: lat.len(),
        huskd_cpu,
        huskd_rss_max_kib: rss,
    }
}

impl std::fmt::Display for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} CRI calls: p50 {:?}, p99 {:?}, max {:?}; huskd {:.0} % of a CPU, RSS ≤ {} KiB",
            self.calls,
            self.p50,
            self.p99,
            self.max,
            self.huskd_cpu * 100.0,
            self.huskd_rss_max_kib
        )
    }
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

#[tokio::test]
async fn output_flood_keeps_huskd_responsive_and_bounded() {
    require!(env_ok(), NEEDS);
    let e = vm_env().await;
    let pcfg = e.pod("flood");
    let pod = e
        .run_pod(&pcfg)
        .await
        .unwrap_or_else(|s| panic!("run pod: {s:?}\n{}", e.d.log()));
    let quiet = probe(&e, Duration::from_secs(5)).await;
    println!("idle: {quiet}");
    // `yes ''`: a newline per byte, the worst case for a line-based log writer.
    let c = e
        .run(&pod, &e.ctr("yes", &["sh", "-c", "yes ''"]), &pcfg)
        .await;
    let log = e.log_path(&pcfg, "yes");
    let t = Instant::now();
    let len0 = file_len(&log);
    let attack = probe(&e, Duration::from_secs(30)).await;
    let rate = (file_len(&log) - len0) as f64 / t.elapsed().as_secs_f64();
    let pids = e.vm_pids(&pod).await;
    let helpers: Vec<(i32, u64)> = pids.iter().map(|p| (*p, rss_kib(*p))).collect();
    println!(
        "yes '' flood: {attack}; CRI log grows {:.1} MB/s ({:.0} k records/s); VMM + helpers RSS KiB {helpers:?}",
        rate / 1e6,
        rate / 41.0 / 1e3
    );
    assert!(rate > 0.0, "the flood reached the log");
    assert!(
        attack.p99 < Duration::from_secs(1),
        "huskd stalls under a log flood: {attack:?}"
    );
    assert!(
        attack.huskd_rss_max_kib < 512 << 10,
        "huskd grows under a log flood: {attack:?}"
    );
    // Helpers other than QEMU (vsock and fs servers, log writer) stay small.
    for (pid, kib) in &helpers[1..] {
        assert!(*kib < 128 << 10, "helper {pid} uses {kib} KiB");
    }
    e.stop_container(&c, 0).await.unwrap();
    e.stop_and_remove_pod(&pod).await;
}

#[tokio::test]
async fn guest_console_flood_stays_within_the_log_cap() {
    require!(env_ok(), NEEDS);
    let cap = console_cap();
    let e = vm_env_with(&format!("log_max_bytes = {cap}\n")).await;
    let pcfg = e.pod("console");
    let pod = e
        .run_pod(&pcfg)
        .await
        .unwrap_or_else(|s| panic!("run pod: {s:?}\n{}", e.d.log()));
    let dir: PathBuf = e.d.run_dir().join("vm").join(&pod[..16]);
    // The guest's /dev/console (the serial port QEMU writes to the pod's console log),
    // written three times the cap over.
    let total = 3 * cap;
    let mut cfg = e.ctr(
        "console",
        &[
            "sh",
            "-c",
            &format!("yes 'console flood from a hostile guest' | head -c {total} > /dev/console"),
        ],
    );
    cfg.devices = vec![cri::Device {
        host_path: "/dev/console".into(),
        container_path: "/dev/console".into(),
        permissions: "rw".into(),
    }];
    let t = Instant::now();
    let c = e.run(&pod, &cfg, &pcfg).await;
    let st = wait_exited(&e.c, &c, Duration::from_secs(600)).await;
    let logs_tail = |name: &str| {
        let s = std::fs::read_to_string(dir.join(name)).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    };
    assert_eq!(
        st.exit_code,
        0,
        "{}\nvmm.log:\n{}\nconsole.log:\n{}\n{}",
        st.message,
        logs_tail("vmm.log"),
        logs_tail("console.log"),
        e.d.log()
    );
    let console = dir.join("console.log");
    let rotated = dir.join("console.log.1");
    let size = || file_len(&console) + file_len(&rotated);
    println!(
        "console flood of {total} bytes took {:?}; console.log {} + console.log.1 {} bytes (cap {cap})",
        t.elapsed(),
        file_len(&console),
        file_len(&rotated)
    );
    assert!(rotated.exists(), "the console log was rotated");
    assert!(size() <= cap, "{} > {cap}", size());
    assert!(size() >= cap / 2, "the newest half cap is kept: {}", size());
    let tail = std::fs::read_to_string(&console).unwrap_or_default();
    assert!(
        tail.contains("console flood from a hostile guest"),
        "the newest output is kept"
    );
    for p in e.vm_pids(&pod).await.iter().skip(1) {
        assert!(rss_kib(*p) < 128 << 10, "helper {p} grew");
    }
    // The pod still works.
    let c2 = e.run(&pod, &e.ctr("after", &["sleep", "600"]), &pcfg).await;
    assert_eq!(e.sh(&c2, "echo ok").await.trim(), "ok");
    e.stop_and_remove_pod(&pod).await;
}

/// 20 MiB to stdout, then 20 MiB to stderr: the answer holds 16 MiB at most over both,
/// and each cut stream ends with the marker.
async fn exec_flood(e: &CriEnv, handler: &str) {
    let pcfg = e.pod(&format!("exec-{handler}"));
    let pod = e
        .run_pod_on(&pcfg, handler)
        .await
        .unwrap_or_else(|s| panic!("run pod: {s:?}\n{}", e.d.log()));
    let c = e
        .run(&pod, &e.ctr("sleeper", &["sleep", "600"]), &pcfg)
        .await;
    let mib20 = 20 << 20;
    let script = format!("yes o | head -c {mib20}; yes e | head -c {mib20} >&2; exit 7");
    let t = Instant::now();
    let r = e
        .exec(&c, &["sh", "-c", &script], 300)
        .await
        .unwrap_or_else(|s| panic!("{handler}: exec: {s:?}\n{}", e.d.log()));
    let total = r.stdout.len() + r.stderr.len();
    println!(
        "{handler}: ExecSync of 2 × 20 MiB took {:?}: stdout {} + stderr {} bytes",
        t.elapsed(),
        r.stdout.len(),
        r.stderr.len()
    );
    assert_eq!(r.exit_code, 7);
    assert!(total <= MAX_OUTPUT, "{total} > {MAX_OUTPUT}");
    assert!(
        total > MAX_OUTPUT - (64 << 10),
        "the budget is used: {total}"
    );
    assert!(r.stdout.ends_with(TRUNCATED_MARKER) || r.stderr.ends_with(TRUNCATED_MARKER));
    assert!(r.stderr.ends_with(TRUNCATED_MARKER), "stderr was cut");
    assert!(r.stdout.starts_with(b"o\no\n"));
    // Small output is left alone.
    let r = e
        .exec(&c, &["sh", "-c", "echo out; echo err >&2"], 60)
        .await
        .unwrap();
    assert_eq!(
        (&r.stdout[..], &r.stderr[..]),
        (&b"out\n"[..], &b"err\n"[..])
    );
    e.stop_and_remove_pod(&pod).await;
}

#[tokio::test]
async fn exec_sync_output_fits_kubelet_in_a_vm_pod() {
    require!(env_ok(), NEEDS);
    let e = vm_env().await;
    exec_flood(&e, vm_handler()).await;
}

#[tokio::test]
async fn exec_sync_output_fits_kubelet_in_a_namespace_pod() {
    require!(ns_env_ok(), husk_tests::runtime::NS_NEEDS);
    let e = CriEnv::new(NS, "").await.remove_pods_on_drop();
    exec_flood(&e, NS).await;
}

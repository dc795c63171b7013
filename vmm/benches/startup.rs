//! `cargo bench -p husk-vmm --bench startup`: husk-vmm startup and memory overhead, side by side
//! with QEMU microvm booting the same test guest (when `qemu-system-x86_64` is installed), and
//! 20 VMs started at once.
//!
//! Times are from just before the process is spawned (CLOCK_MONOTONIC) to: the guest's first
//! instruction (its first port write, reported by `husk-vmm --boot-timer`), and the guest's
//! `HUSK_GUEST_READY` serial line arriving on the pipe. RSS is read from /proc/PID/smaps while
//! the guest idles, excluding the guest-memory mapping.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const VMM: &str = env!("CARGO_BIN_EXE_husk-vmm");
const GUEST: &str = env!("HUSK_TEST_GUEST_PVH");
const MEM_MIB: u64 = 128;

fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[derive(Default, Clone, Copy)]
struct Sample {
    /// user + system CPU time of the whole VMM process, start to exit.
    cpu_ms: f64,
    entry_ms: Option<f64>,
    marker_ms: f64,
    rss_kib: u64,
    guest_rss_kib: u64,
}

/// (RSS outside the guest-memory mapping, RSS of the guest-memory mapping) in KiB.
fn rss_split(pid: u32) -> (u64, u64) {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let guest_len = MEM_MIB << 20;
    let (mut other, mut guest, mut in_guest) = (0, 0, false);
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-')
            && let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16))
        {
            in_guest = b - a == guest_len;
            continue;
        }
        if let Some(v) = line.strip_prefix("Rss:") {
            let kib: u64 = v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
            if in_guest { guest += kib } else { other += kib }
        }
    }
    (other, guest)
}

fn wait_line(child: &mut Child, needle: &str) -> Option<u64> {
    let out = child.stdout.take()?;
    let mut r = BufReader::new(out);
    let mut line = String::new();
    let mut t = None;
    loop {
        line.clear();
        if r.read_line(&mut line).ok()? == 0 {
            break;
        }
        if t.is_none() && line.contains(needle) {
            t = Some(now_ns());
        }
        if line.contains("waiting for ctrl-alt-del") || line.contains("HUSK_GUEST_DONE") {
            break;
        }
    }
    // Keep draining so the VMM never blocks on a full pipe.
    std::thread::spawn(move || std::io::copy(&mut r, &mut std::io::sink()));
    t
}

fn husk(wait: bool) -> Option<Sample> {
    let t0 = now_ns();
    let cmdline = if wait { "husk.wait" } else { "quiet" };
    let mut child = Command::new(VMM)
        .args([
            "--kernel",
            GUEST,
            "--memory",
            &MEM_MIB.to_string(),
            "--cmdline",
            cmdline,
            "--boot-timer",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .ok()?;
    let err = child.stderr.take()?;
    let entry = std::thread::spawn(move || {
        let mut l = String::new();
        BufReader::new(err).read_line(&mut l).ok()?;
        l.rsplit("monotonic ")
            .next()?
            .trim()
            .trim_end_matches("ns")
            .trim()
            .parse::<u64>()
            .ok()
    });
    let marker = wait_line(&mut child, "HUSK_GUEST_READY")?;
    let (rss_kib, guest_rss_kib) = if wait { rss_split(child.id()) } else { (0, 0) };
    if wait {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    }
    // wait4 rather than Child::wait, to get the child's CPU time.
    let mut status = 0;
    // SAFETY: rusage is plain data; all-zero is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waiting for our own child with valid out-pointers.
    let r = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut ru) };
    if r < 0 || !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        eprintln!("husk-vmm failed: wait status {status:#x}");
        return None;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
    let cpu_ms = tv(ru.ru_utime) + tv(ru.ru_stime);
    let entry_ms = entry.join().ok().flatten().map(|e| (e - t0) as f64 / 1e6);
    Some(Sample {
        cpu_ms,
        entry_ms,
        marker_ms: (marker - t0) as f64 / 1e6,
        rss_kib,
        guest_rss_kib,
    })
}

/// vsock through the test guest's echo: CONNECT→OK time, 64-byte round trip, bulk echo rate.
fn vsock_bench() -> Option<(f64, Vec<f64>, f64)> {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    let dir = std::env::temp_dir().join(format!("husk-vsock-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).ok()?;
    let uds = dir.join("v.sock");
    let mut child = Command::new(VMM)
        .args([
            "--kernel",
            GUEST,
            "--memory",
            "64",
            "--cmdline",
            "husk.vsock_conns=1",
        ])
        .arg("--vsock")
        .arg(format!("cid=3,uds={}", uds.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let out = child.stdout.take()?;
    let mut r = BufReader::new(out);
    let mut line = String::new();
    while !line.contains("vsock: cid=3 ready") {
        line.clear();
        if r.read_line(&mut line).ok()? == 0 {
            return None;
        }
    }
    std::thread::spawn(move || std::io::copy(&mut r, &mut std::io::sink()));
    let t = now_ns();
    let mut s = UnixStream::connect(&uds).ok()?;
    s.write_all(b"CONNECT 1234\n").ok()?;
    let mut b = [0u8; 1];
    while s.read(&mut b).ok()? == 1 && b[0] != b'\n' {}
    let connect_ms = (now_ns() - t) as f64 / 1e6;
    let mut rtts = Vec::new();
    let msg = [0x42u8; 64];
    let mut back = [0u8; 64];
    for _ in 0..200 {
        let t = now_ns();
        s.write_all(&msg).ok()?;
        s.read_exact(&mut back).ok()?;
        rtts.push((now_ns() - t) as f64 / 1e3);
    }
    let total = 32usize << 20;
    let mut w = s.try_clone().ok()?;
    let t = now_ns();
    let writer = std::thread::spawn(move || {
        let chunk = vec![0x5au8; 256 * 1024];
        for _ in 0..total / chunk.len() {
            if w.write_all(&chunk).is_err() {
                return;
            }
        }
    });
    let mut got = 0;
    let mut buf = vec![0u8; 256 * 1024];
    while got < total {
        let n = s.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        got += n;
    }
    let secs = (now_ns() - t) as f64 / 1e9;
    writer.join().ok()?;
    drop(s);
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    Some((connect_ms, rtts, total as f64 / (1 << 20) as f64 / secs))
}

fn qemu_bin() -> Option<String> {
    let p = "/usr/bin/qemu-system-x86_64";
    std::path::Path::new(p).exists().then(|| p.to_string())
}

fn qemu(bin: &str) -> Option<Sample> {
    let t0 = now_ns();
    let mut child = Command::new(bin)
        .args([
            "-M",
            "microvm",
            "-accel",
            "kvm",
            "-m",
            &format!("{MEM_MIB}M"),
            "-smp",
            "1",
        ])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-serial",
            "stdio",
            "-no-reboot",
        ])
        .args(["-kernel", GUEST, "-append", "husk.wait"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .stdin(Stdio::null())
        .spawn()
        .ok()?;
    let marker = wait_line(&mut child, "HUSK_GUEST_READY");
    let (rss_kib, guest_rss_kib) = rss_split(child.id());
    let _ = child.kill();
    let _ = child.wait();
    Some(Sample {
        cpu_ms: 0.0,
        entry_ms: None,
        marker_ms: (marker? - t0) as f64 / 1e6,
        rss_kib,
        guest_rss_kib,
    })
}

fn stats(mut v: Vec<f64>) -> (f64, f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let p = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    (v[0], p(0.5), p(0.9), v[v.len() - 1])
}

fn row(name: &str, v: Vec<f64>) {
    if v.is_empty() {
        return;
    }
    let n = v.len();
    let (min, med, p90, max) = stats(v);
    println!("| {name} | {n} | {min:.2} | {med:.2} | {p90:.2} | {max:.2} |");
}

fn main() {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        println!("skipped: /dev/kvm unusable");
        return;
    }
    let runs: usize = std::env::var("HUSK_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    for _ in 0..3 {
        husk(false); // warm the page cache
    }
    // husk-vmm and QEMU alternate, so both see the same background load.
    let qbin = qemu_bin();
    if qbin.is_none() {
        println!("note: qemu-system-x86_64 not installed, no QEMU comparison");
    }
    let (mut h, mut q) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        h.extend(husk(true));
        if let Some(b) = &qbin {
            q.extend(qemu(b));
        }
    }
    // 20 VMs at once.
    let handles: Vec<_> = (0..20)
        .map(|_| std::thread::spawn(|| husk(false)))
        .collect();
    let conc_samples: Vec<Sample> = handles
        .into_iter()
        .filter_map(|h| h.join().ok().flatten())
        .collect();
    let conc: Vec<f64> = conc_samples.iter().map(|s| s.marker_ms).collect();

    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "\nload average (1/5/15 min) at the end: {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!("\n| measurement (ms) | n | min | median | p90 | max |");
    println!("|---|---|---|---|---|---|");
    row(
        "husk-vmm: spawn → first guest instruction",
        h.iter().filter_map(|s| s.entry_ms).collect(),
    );
    row(
        "husk-vmm: spawn → serial marker",
        h.iter().map(|s| s.marker_ms).collect(),
    );
    row(
        "qemu microvm: spawn → serial marker",
        q.iter().map(|s| s.marker_ms).collect(),
    );
    row("husk-vmm, 20 started at once: spawn → marker", conc.clone());
    row(
        "husk-vmm CPU time per VM, boot to exit (user+sys)",
        conc_samples.iter().map(|s| s.cpu_ms).collect(),
    );
    println!("\n| memory (KiB, guest idle, {MEM_MIB} MiB guest) | n | min | median | p90 | max |");
    println!("|---|---|---|---|---|---|");
    row(
        "husk-vmm RSS excluding guest memory",
        h.iter().map(|s| s.rss_kib as f64).collect(),
    );
    row(
        "husk-vmm guest-memory RSS",
        h.iter().map(|s| s.guest_rss_kib as f64).collect(),
    );
    row(
        "qemu RSS excluding guest memory",
        q.iter().map(|s| s.rss_kib as f64).collect(),
    );
    if let Some((connect_ms, rtts, mbs)) = vsock_bench() {
        println!("\n| vsock (hybrid unix socket ↔ guest echo) | n | min | median | p90 | max |");
        println!("|---|---|---|---|---|---|");
        row("CONNECT → OK (ms)", vec![connect_ms]);
        row("64-byte round trip (µs)", rtts);
        println!(
            "\nvsock bulk echo: 32 MiB host → guest → host at {mbs:.0} MiB/s (each direction)"
        );
    }
    let med = |v: Vec<f64>| if v.is_empty() { f64::NAN } else { stats(v).1 };
    let hm = med(h.iter().map(|s| s.marker_ms).collect());
    let qm = med(q.iter().map(|s| s.marker_ms).collect());
    println!("\nratio qemu/husk (median marker): {:.1}x", qm / hm);
    let cmax = conc.iter().cloned().fold(0.0, f64::max);
    println!(
        "20 concurrent: {} of 20 reached the marker; slowest {cmax:.2} ms = {:.1}x the single-VM median",
        conc.len(),
        cmax / hm
    );
    std::thread::sleep(Duration::from_millis(10));
}

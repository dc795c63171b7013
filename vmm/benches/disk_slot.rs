//! `cargo bench -p husk-vmm --bench disk_slot`: filling a disk slot at run time. The test
//! guest idles in `hlt` on an empty slot (`--disk-slots 1`); the bench sends
//! `disk-attach 0 PATH SERIAL` on the control socket and times (a) the `ok` answer and (b) the
//! guest's serial line with the new capacity, printed after the config-change interrupt woke
//! it and it re-read the config space. One VM per run (`HUSK_BENCH_RUNS`, default 10).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

const VMM: &str = env!("CARGO_BIN_EXE_husk-vmm");
const GUEST: &str = env!("HUSK_TEST_GUEST_PVH");

fn wait_for(lines: &Receiver<(Instant, String)>, needle: &str) -> Option<(Instant, String)> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (t, l) = lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .ok()?;
        if l.contains(needle) {
            return Some((t, l));
        }
    }
}

/// (ms to the `ok` answer, ms to the guest's capacity line).
fn run(dir: &std::path::Path, image: &std::path::Path) -> Option<(f64, f64)> {
    let sock = dir.join("ctl.sock");
    let mut child = Command::new(VMM)
        .args([
            "--kernel",
            GUEST,
            "--memory",
            "32",
            "--cmdline",
            "husk.wait",
        ])
        .args(["--disk-slots", "1", "--control-socket"])
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let out = child.stdout.take()?;
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines() {
            let Ok(l) = l else { break };
            if tx.send((Instant::now(), l)).is_err() {
                break;
            }
        }
    });
    let result = (|| {
        wait_for(&rx, "blkslot: waiting")?;
        let mut s = UnixStream::connect(&sock).ok()?;
        let t0 = Instant::now();
        s.write_all(format!("disk-attach 0 {} img0\n", image.display()).as_bytes())
            .ok()?;
        let mut answer = String::new();
        BufReader::new(&s).read_line(&mut answer).ok()?;
        let ok = t0.elapsed();
        if answer.trim() != "ok" {
            eprintln!("disk-attach answered {answer:?}");
            return None;
        }
        let (t, l) = wait_for(&rx, "blkslot: isr=")?;
        if !l.contains("isr=2") {
            eprintln!("unexpected guest line {l:?}");
            return None;
        }
        Some((ok.as_secs_f64() * 1e3, (t - t0).as_secs_f64() * 1e3))
    })();
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&sock);
    result
}

fn row(name: &str, mut v: Vec<f64>) {
    if v.is_empty() {
        return;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let p = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    println!(
        "| {name} | {} | {:.3} | {:.3} | {:.3} | {:.3} |",
        v.len(),
        v[0],
        p(0.5),
        p(0.9),
        v[v.len() - 1]
    );
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
        .unwrap_or(10);
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.img");
    std::fs::write(&image, vec![7u8; 1 << 20]).expect("image");
    let (mut ok, mut seen) = (vec![], vec![]);
    for _ in 0..runs {
        if let Some((a, b)) = run(dir.path(), &image) {
            ok.push(a);
            seen.push(b);
        }
    }
    println!("| disk slot fill (ms) | runs | min | p50 | p90 | max |");
    println!("|---|---|---|---|---|---|");
    row("disk-attach → `ok` on the control socket", ok);
    row("disk-attach → guest prints the new capacity", seen);
}

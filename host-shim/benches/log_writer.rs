//! Throughput of the CRI log writer (`cargo bench -p husk-host --bench log_writer`): what a
//! container's output costs huskd per byte. Each case feeds 64 MiB in agent-reply-sized calls
//! (4 MiB, ttrpc's message limit, and 64 KiB) into a log file in a temp dir and reports MiB/s
//! of container output and records/s. Numbers are in SPECIFICATION.md.

use std::time::{Duration, Instant};

use husk_host::sandbox::logs::{CriLog, Stream};

const TOTAL: usize = 64 << 20;

fn run(name: &str, unit: &[u8], call: usize) {
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("skip: no temp dir: {e}");
            return;
        }
    };
    let path = dir.path().join("c.log");
    let log = match CriLog::open(Some(path.clone()), Some(&dir.path().join("progress"))) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("skip: cannot open the log: {e}");
            return;
        }
    };
    let chunk: Vec<u8> = unit.iter().copied().cycle().take(call).collect();
    let calls = TOTAL / call;
    let mut worst = Duration::ZERO;
    let start = Instant::now();
    for _ in 0..calls {
        let t = Instant::now();
        log.write(Stream::Stdout, &chunk);
        worst = worst.max(t.elapsed());
    }
    let took = start.elapsed();
    let records = std::fs::read(&path)
        .map(|b| b.iter().filter(|c| **c == b'\n').count())
        .unwrap_or(0);
    let mib = (calls * call) as f64 / (1 << 20) as f64;
    println!(
        "{name:<34} call {:>5} KiB: {:>8.1} MiB/s, {:>6.2} M records/s, slowest call {:>7.1} ms",
        call >> 10,
        mib / took.as_secs_f64(),
        records as f64 / took.as_secs_f64() / 1e6,
        worst.as_secs_f64() * 1e3
    );
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs it once too.
    for call in [4 << 20, 64 << 10] {
        run("empty lines (`yes ''`)", b"\n", call);
        run("`y` lines (`yes`)", b"y\n", call);
        run(
            "80-byte lines",
            &[b"x".repeat(79), b"\n".to_vec()].concat(),
            call,
        );
        run("no newline (16 KiB P records)", b"z", call);
    }
}

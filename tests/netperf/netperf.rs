//! A tiny TCP throughput / request-response tool for the pod network
//! benchmark (`tests/benches/net.rs`). Built by the bench with `rustc` as a
//! static binary (std only) and put into the benchmark image.
//!
//! ```text
//! netperf server PORT             # serves both tests on [::]:PORT
//! netperf tput HOST PORT SECS     # one stream for SECS s: "tput_gbit_s X"
//! netperf rr HOST PORT COUNT      # COUNT 1-byte round trips: "rr_us p50 X p99 Y"
//! ```

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

fn serve(mut s: TcpStream) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let mut mode = [0u8; 1];
    s.read_exact(&mut mode)?;
    match mode[0] {
        b'T' => {
            let mut buf = vec![0u8; 256 << 10];
            let mut total: u64 = 0;
            loop {
                let n = s.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            s.write_all(&total.to_le_bytes())
        }
        _ => {
            let mut b = [0u8; 1];
            loop {
                if s.read(&mut b)? == 0 {
                    return Ok(());
                }
                s.write_all(&b)?;
            }
        }
    }
}

fn connect(host: &str, port: &str) -> TcpStream {
    let addr = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match TcpStream::connect(&addr) {
            Ok(s) => return s,
            Err(e) if Instant::now() > deadline => panic!("connect {addr}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    match a.get(1).map(String::as_str) {
        Some("server") => {
            let l = TcpListener::bind(format!("[::]:{}", a[2])).expect("bind");
            for s in l.incoming().flatten() {
                std::thread::spawn(move || {
                    let _ = serve(s);
                });
            }
        }
        Some("tput") => {
            let mut s = connect(&a[2], &a[3]);
            let secs: f64 = a[4].parse().expect("seconds");
            s.write_all(b"T").expect("mode");
            let buf = vec![0x5au8; 256 << 10];
            let t0 = Instant::now();
            let mut sent: u64 = 0;
            while t0.elapsed().as_secs_f64() < secs {
                s.write_all(&buf).expect("send");
                sent += buf.len() as u64;
            }
            s.shutdown(std::net::Shutdown::Write).expect("shutdown");
            let mut ack = [0u8; 8];
            s.read_exact(&mut ack).expect("ack");
            let dt = t0.elapsed().as_secs_f64();
            assert_eq!(u64::from_le_bytes(ack), sent, "server got every byte");
            println!("tput_gbit_s {:.3}", sent as f64 * 8.0 / dt / 1e9);
        }
        Some("rr") => {
            let mut s = connect(&a[2], &a[3]);
            s.set_nodelay(true).expect("nodelay");
            let count: usize = a[4].parse().expect("count");
            s.write_all(b"L").expect("mode");
            let mut v = Vec::with_capacity(count);
            let mut b = [7u8; 1];
            for _ in 0..count {
                let t0 = Instant::now();
                s.write_all(&b).expect("send");
                s.read_exact(&mut b).expect("recv");
                v.push(t0.elapsed().as_secs_f64() * 1e6);
            }
            v.sort_by(|x, y| x.total_cmp(y));
            println!(
                "rr_us p50 {:.1} p99 {:.1}",
                v[v.len() / 2],
                v[(v.len() * 99 / 100).min(v.len() - 1)]
            );
        }
        _ => {
            eprintln!("usage: netperf server PORT | tput HOST PORT SECS | rr HOST PORT COUNT");
            std::process::exit(2);
        }
    }
}

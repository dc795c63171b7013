//! `cargo bench -p husk-vmm --bench virtiofs`: husk-vmm's virtio-fs server vs virtiofsd vs the
//! host directly, side by side in one run, on the same QEMU/TCG guest (linux 6.12, the guest
//! kernel's own virtio-fs driver, QEMU `vhost-user-fs-pci`).
//!
//! One workload script runs in a container (busybox rootfs inside the share, the share at
//! /data) for each server, and with busybox directly on the host for the host column:
//! sequential write (dd 64 MiB, fsync), sequential read of a 64 MiB file the host wrote (not in
//! the guest's page cache), and 500 small files created, listed with attributes (`ls -l`:
//! readdir + one getattr each) and removed. Times come from /proc/uptime inside the guest
//! (10 ms resolution); each figure is the median of HUSK_BENCH_RUNS rounds (default 3), the
//! two servers alternating round by round, each round in a freshly booted VM.
//!
//! Needs HUSK_GUEST_KERNEL, HUSK_GUEST_INITRD (an agent that can start containers in the
//! guest), qemu-system-x86_64, /usr/bin/busybox and virtiofsd (HUSK_VIRTIOFSD, default
//! `virtiofsd` on PATH; `cargo install virtiofsd`).

#[path = "../tests/fs_guest/mod.rs"]
mod fs_guest;

use std::path::Path;
use std::process::Command;

use fs_guest::{
    boot, boot_with, connect_agent, create_sandbox, guest_image, guest_rootfs, make_rootfs, run,
};

const MIB: u32 = 64;
const FILES: u32 = 500;

/// One round; prints `name=seconds` lines.
fn script(dir: &str, round: u32) -> String {
    format!(
        "D={dir}/r{round}; mkdir -p $D; t() {{ cut -d' ' -f1 /proc/uptime; }}; \
         a=$(t); dd if=/dev/zero of=$D/seq bs=1M count={MIB} conv=fsync 2>/dev/null; b=$(t); \
         dd if={dir}/hostseq of=/dev/null bs=1M 2>/dev/null; c=$(t); \
         mkdir $D/small; i=0; while [ $i -lt {FILES} ]; do echo x > $D/small/f$i; i=$((i+1)); done; d=$(t); \
         ls -l $D/small > /dev/null; e=$(t); rm -r $D/small; f=$(t); rm -f $D/seq; \
         awk \"BEGIN {{ print \\\"write=\\\" $b-$a; print \\\"read=\\\" $c-$b; print \\\"create=\\\" $d-$c; \
         print \\\"stat=\\\" $e-$d; print \\\"unlink=\\\" $f-$e }}\""
    )
}

#[derive(Default, Clone, Copy)]
struct Round {
    write: f64,
    read: f64,
    create: f64,
    stat: f64,
    unlink: f64,
}

fn parse(out: &str) -> Round {
    let mut r = Round::default();
    for l in out.lines() {
        let Some((k, v)) = l.split_once('=') else {
            continue;
        };
        let v: f64 = v.trim().parse().unwrap_or(f64::NAN);
        match k {
            "write" => r.write = v,
            "read" => r.read = v,
            "create" => r.create = v,
            "stat" => r.stat = v,
            "unlink" => r.unlink = v,
            _ => {}
        }
    }
    r
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// (write MB/s, read MB/s, create/s, stat/s, unlink/s) as medians.
fn summarize(rounds: &[Round]) -> [f64; 5] {
    let m = |f: fn(&Round) -> f64| median(rounds.iter().map(f).collect());
    let mb = f64::from(MIB) * 1.048_576;
    let n = f64::from(FILES);
    [
        mb / m(|r| r.write),
        mb / m(|r| r.read),
        n / m(|r| r.create),
        n / m(|r| r.stat),
        n / m(|r| r.unlink),
    ]
}

fn host_file(share: &Path) {
    let data = vec![0x5au8; (MIB as usize) << 20];
    std::fs::write(share.join("hostseq"), data).expect("hostseq");
}

fn guest_rounds(
    kernel: &str,
    initrd: &str,
    which: &str,
    runs: u32,
    virtiofsd: &str,
) -> Option<Vec<Round>> {
    let dir = tempfile::tempdir().expect("tmp");
    let share = dir.path().join("share");
    make_rootfs(&share.join("rootfs"));
    host_file(&share);
    let mut g = if which == "husk" {
        boot(kernel, initrd, dir, &share)
    } else {
        let share2 = share.clone();
        let vfsd = virtiofsd.to_string();
        boot_with(kernel, initrd, dir, move |sock| {
            let mut c = Command::new(vfsd);
            c.arg(format!("--socket-path={}", sock.display()))
                .arg(format!("--shared-dir={}", share2.display()))
                .args(["--cache=auto", "--sandbox=namespace"]);
            c
        })
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio");
    let _in_rt = rt.enter();
    let client = connect_agent(&mut g);
    rt.block_on(async {
        create_sandbox(&client).await;
        let mut rounds = vec![];
        for i in 0..runs {
            let (code, out) = run(
                &client,
                &format!("{which}-{i}"),
                &guest_rootfs(),
                &script("/data", i),
                &[],
            )
            .await?;
            assert_eq!(code, 0, "{out}\n{}", g.diagnostics());
            rounds.push(parse(&out));
        }
        Some(rounds)
    })
}

fn host_rounds(runs: u32) -> Vec<Round> {
    let dir = tempfile::tempdir().expect("tmp");
    host_file(dir.path());
    (0..runs)
        .map(|i| {
            let out = Command::new(fs_guest::BUSYBOX)
                .args(["sh", "-c", &script(&dir.path().display().to_string(), i)])
                .output()
                .expect("busybox");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            parse(&String::from_utf8_lossy(&out.stdout))
        })
        .collect()
}

fn main() {
    let Some((kernel, initrd)) = guest_image() else {
        return;
    };
    let runs: u32 = std::env::var("HUSK_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let virtiofsd = std::env::var("HUSK_VIRTIOFSD").unwrap_or_else(|_| "virtiofsd".into());
    if Command::new(&virtiofsd).arg("--version").output().is_err() {
        println!("skipped: {virtiofsd} missing (cargo install virtiofsd; HUSK_VIRTIOFSD=PATH)");
        return;
    }
    // Alternate the servers round by round (a fresh VM each), so the machine's load, which
    // swings here, falls on both alike.
    let (mut husk, mut vfsd) = (vec![], vec![]);
    for _ in 0..runs {
        let Some(h) = guest_rounds(&kernel, &initrd, "husk", 1, &virtiofsd) else {
            return;
        };
        let Some(v) = guest_rounds(&kernel, &initrd, "virtiofsd", 1, &virtiofsd) else {
            return;
        };
        husk.extend(h);
        vfsd.extend(v);
    }
    let host = host_rounds(runs);
    let (h, v, o) = (summarize(&husk), summarize(&vfsd), summarize(&host));
    println!(
        "virtio-fs under QEMU TCG, medians of {runs} rounds ({MIB} MiB sequential, {FILES} small files)"
    );
    println!(
        "{:<28} {:>12} {:>12} {:>12} {:>10}",
        "", "husk-vmm fs", "virtiofsd", "host", "husk/vfsd"
    );
    let names = [
        "seq write MB/s (fsync)",
        "seq read MB/s",
        "create files/s",
        "ls -l entries/s",
        "unlink files/s",
    ];
    for i in 0..5 {
        println!(
            "{:<28} {:>12.1} {:>12.1} {:>12.1} {:>9.2}x",
            names[i],
            h[i],
            v[i],
            o[i],
            h[i] / v[i]
        );
    }
}

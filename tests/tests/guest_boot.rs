//! The guest image boots for real: the project's kernel and initramfs under
//! QEMU (TCG here, since this host's KVM cannot run a Linux user space), with
//! husk-agent as PID 1 coming up on cgroup v2 and vsock. The VM sandbox
//! builds on exactly this.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use husk_tests::require;

#[test]
fn guest_kernel_boots_the_agent_as_pid1_under_qemu_tcg() {
    let (Ok(kernel), Ok(initrd)) = (
        std::env::var("HUSK_GUEST_KERNEL"),
        std::env::var("HUSK_GUEST_INITRD"),
    ) else {
        eprintln!(
            "skipped: HUSK_GUEST_KERNEL / HUSK_GUEST_INITRD not set (tests/run.sh builds them with images/)"
        );
        return;
    };
    require!(
        std::path::Path::new("/usr/bin/qemu-system-x86_64").exists(),
        "qemu-system-x86_64 missing"
    );
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-M", "q35", "-accel", "tcg", "-cpu", "max", "-m", "512M", "-smp", "1",
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
        .args(["-kernel", &kernel, "-initrd", &initrd])
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start qemu");
    let start = Instant::now();
    let (tx, rx) = std::sync::mpsc::channel();
    let out = child.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut console = Vec::new();
    let mut ready = None;
    while start.elapsed() < Duration::from_secs(90) {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                let done = line.contains("husk-agent ready");
                console.push(line);
                if done {
                    ready = console.last().cloned();
                    break;
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(_) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let tail = console
        .iter()
        .rev()
        .take(30)
        .rev()
        .cloned()
        .collect::<Vec<_>>()
        .join("\n");
    let ready =
        ready.unwrap_or_else(|| panic!("the agent never reported ready; console tail:\n{tail}"));
    let plain: String = strip_ansi(&ready);
    assert!(plain.contains("is_init=true"), "{plain}");
    assert!(plain.contains("cgroup=\"v2\""), "{plain}");
    assert!(plain.contains("Vsock(1024)"), "{plain}");
    eprintln!(
        "guest agent ready {:.2}s after QEMU started",
        start.elapsed().as_secs_f64()
    );
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\u{1b}' {
            for d in it.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

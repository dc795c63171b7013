//! Shared helpers for the boot tests: run husk-vmm on the test guest and watch its serial output.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

pub const GUEST_PVH: &str = env!("HUSK_TEST_GUEST_PVH");
pub const GUEST_64: &str = env!("HUSK_TEST_GUEST_64");
pub const VMM: &str = env!("CARGO_BIN_EXE_husk-vmm");
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// Returns false (after printing why) when KVM cannot be used here.
pub fn kvm_usable() -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            println!("skipped: /dev/kvm unusable: {e}");
            false
        }
    }
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

pub struct Vm {
    pub child: Child,
    lines: Receiver<(Instant, String)>,
    pub seen: Vec<String>,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl Vm {
    pub fn spawn(args: &[String]) -> Vm {
        Self::spawn_cmd(Command::new(VMM).args(args))
    }

    pub fn spawn_cmd(cmd: &mut Command) -> Vm {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn husk-vmm");
        let out = child.stdout.take().expect("stdout");
        let mut err = child.stderr.take().expect("stderr");
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                if tx.send((Instant::now(), l)).is_err() {
                    break;
                }
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        Vm {
            child,
            lines: rx,
            seen: Vec::new(),
            stderr: Some(stderr),
        }
    }

    /// Waits for a serial line containing `needle`; returns it.
    pub fn expect_line(&mut self, needle: &str) -> String {
        match self.line_within(needle, TIMEOUT) {
            Some(l) => l,
            None => {
                let state = self.post_mortem();
                panic!(
                    "no serial line containing {needle:?}; saw {:#?}\n{state}",
                    self.seen
                )
            }
        }
    }

    /// Whether the VMM still runs (killing it if so) and what it wrote on stderr.
    fn post_mortem(&mut self) -> String {
        let status = match self.child.try_wait() {
            Ok(Some(s)) => format!("husk-vmm had exited: {s}"),
            _ => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                "husk-vmm was still running (killed now)".to_string()
            }
        };
        let stderr = self
            .stderr
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default();
        format!("{status}; stderr:\n{stderr}")
    }

    /// Waits up to `limit` for a serial line containing `needle`.
    pub fn line_within(&mut self, needle: &str, limit: Duration) -> Option<String> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((_, l)) => {
                    self.seen.push(l.clone());
                    if l.contains(needle) {
                        return Some(l);
                    }
                }
                Err(_) => return None,
            }
        }
    }

    /// Waits for the VMM to exit; returns (exit code, stderr). Remaining serial lines are kept.
    pub fn wait(&mut self) -> (i32, String) {
        let deadline = Instant::now() + TIMEOUT;
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                break s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("husk-vmm did not exit; serial so far: {:#?}", self.seen);
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let stderr = self
            .stderr
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default();
        while let Ok((_, l)) = self.lines.recv_timeout(Duration::from_millis(200)) {
            self.seen.push(l);
        }
        (status.code().unwrap_or(-1), stderr)
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn args(kernel: &str, cmdline: &str, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = ["--kernel", kernel, "--memory", "32", "--cmdline", cmdline]
        .iter()
        .map(|s| s.to_string())
        .collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

pub fn path_str(p: &std::path::Path) -> String {
    p.to_str().expect("utf-8 path").to_string()
}

pub fn tmp_path(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

/// `NoNewPrivs`, `Seccomp` and `CapEff` of process `pid`, from /proc.
pub fn confinement(pid: u32) -> (String, String, String) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let field = |k: &str| {
        status
            .lines()
            .find(|l| l.starts_with(k))
            .map(|l| l[k.len()..].trim().to_string())
            .unwrap_or_default()
    };
    (field("NoNewPrivs:"), field("Seccomp:"), field("CapEff:"))
}

/// What /proc shows of a jailed process.
#[derive(Debug)]
pub struct ProcJail {
    /// `Uid:` (real, effective, saved, fs; tab-separated), `Gid:` likewise.
    pub uids: String,
    pub gids: String,
    pub no_new_privs: String,
    pub seccomp: String,
    pub cap_eff: String,
    pub cap_bnd: String,
    /// Entries of its root directory (`/proc/PID/root`).
    pub root: Vec<String>,
}

pub fn jail_of(pid: u32) -> ProcJail {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let field = |k: &str| {
        status
            .lines()
            .find(|l| l.starts_with(k))
            .map(|l| l[k.len()..].trim().to_string())
            .unwrap_or_default()
    };
    let mut root: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/root"))
        .expect("root")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    root.sort();
    ProcJail {
        uids: field("Uid:"),
        gids: field("Gid:"),
        no_new_privs: field("NoNewPrivs:"),
        seccomp: field("Seccomp:"),
        cap_eff: field("CapEff:"),
        cap_bnd: field("CapBnd:"),
        root,
    }
}

/// The root is the jail's: /usr, /dev, /proc and the paths it was given, no host /etc,
/// /root or /home; and nothing of the host's is reachable through it.
pub fn assert_jail_root(j: &ProcJail) {
    for want in ["usr", "dev", "proc"] {
        assert!(j.root.iter().any(|e| e == want), "no /{want}: {j:?}");
    }
    for host in ["etc", "root", "home", "var", "boot", "sys"] {
        assert!(
            !j.root.iter().any(|e| e == host),
            "host /{host} in the jail: {j:?}"
        );
    }
}

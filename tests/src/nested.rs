//! The node a Linux-on-husk-vmm test runs commands on: an L1 "node VM" under
//! QEMU/TCG with nested SVM (tests/nested/l1.sh) where /dev/kvm cannot run
//! Linux (kvm-pvm, no KVM), or this host itself where it has hardware KVM.
//!
//! One L1 boot serves every test of a test binary: [`with_node`] boots it on
//! first use and serialises the commands. Scripts see the same variables on
//! both kinds of node: `HUSK_VMM`, `GUEST_KERNEL`, `GUEST_INITRD` (the agent's
//! initramfs, when HUSK_GUEST_INITRD is set), `TESTGUEST` (busybox + socat guest initramfs, see
//! tests/nested/guest-init), `NODE_TMP` (a scratch directory).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// What a command printed (stdout and stderr together) and its exit code.
#[derive(Debug)]
pub struct Outcome {
    pub output: String,
    pub code: i32,
}

impl Outcome {
    /// Panics with the output unless the command exited 0.
    pub fn ok(self, what: &str) -> String {
        assert_eq!(self.code, 0, "{what} failed:\n{}", self.output);
        self.output
    }
}

enum Kind {
    /// L1 under QEMU/TCG; `stream` is its ttyS1.
    Nested {
        child: Child,
        stream: BufReader<UnixStream>,
        work: tempfile::TempDir,
    },
    /// This host (hardware KVM): scripts run with `sh -c`.
    Direct {
        env: Vec<(String, String)>,
        _tmp: tempfile::TempDir,
    },
}

pub struct Node {
    kind: Kind,
    next_id: u64,
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn l1_script() -> PathBuf {
    repo_root().join("tests/nested/l1.sh")
}

/// True when the CPU has VMX/SVM and /dev/kvm opens: Linux guests run here
/// directly (kvm-pvm hosts have /dev/kvm but no VMX/SVM flag).
pub fn hardware_kvm() -> bool {
    let hw = std::fs::read_to_string("/proc/cpuinfo")
        .map(|c| {
            c.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
        })
        .unwrap_or(false);
    hw && std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

fn on_path(bin: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
        .unwrap_or(false)
}

/// Why the node cannot be made here, or None when it can.
pub fn unavailable() -> Option<String> {
    if !crate::is_root() {
        return Some("needs root".into());
    }
    if std::env::var_os("HUSK_GUEST_KERNEL").is_none() {
        return Some("HUSK_GUEST_KERNEL not set (see tests/run.sh)".into());
    }
    let mut need = vec!["socat", "busybox", "cpio"];
    if !hardware_kvm() {
        if std::env::var_os("HUSK_NESTED_TESTS").is_none_or(|v| v != "1") {
            return Some(
                "no hardware KVM, and the nested test bed is off (HUSK_NESTED_TESTS=1 boots an L1 under QEMU/TCG)"
                    .into(),
            );
        }
        need.push("qemu-system-x86_64");
    }
    for b in need {
        if !on_path(b) {
            return Some(format!("{b} not installed (tests/install-deps.sh)"));
        }
    }
    None
}

fn sh(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Files the scripts need, as (variable, host path).
fn artefacts(tmp: &Path) -> anyhow::Result<Vec<(&'static str, PathBuf)>> {
    let testguest = tmp.join("testguest.cpio");
    sh(Command::new("bash")
        .arg(l1_script())
        .arg("testguest")
        .arg(&testguest))?;
    let mut files = vec![
        ("HUSK_VMM", crate::bin_path("husk-vmm")),
        (
            "GUEST_KERNEL",
            std::env::var_os("HUSK_GUEST_KERNEL")
                .context("HUSK_GUEST_KERNEL")?
                .into(),
        ),
        ("TESTGUEST", testguest),
    ];
    if let Some(initrd) = std::env::var_os("HUSK_GUEST_INITRD") {
        files.push(("GUEST_INITRD", initrd.into()));
    }
    Ok(files)
}

/// Spawns QEMU from a thread that never ends, with PR_SET_PDEATHSIG: the L1
/// dies with the test process (its parent thread must outlive every test).
fn spawn_kept(mut cmd: Command) -> anyhow::Result<Child> {
    // SAFETY: prctl is async-signal-safe; the closure touches nothing else.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(cmd.spawn());
        loop {
            std::thread::park();
        }
    });
    Ok(rx.recv().context("spawner thread")??)
}

impl Node {
    /// Boots L1 (or takes this host, with hardware KVM).
    pub fn start() -> anyhow::Result<Node> {
        let tmp = tempfile::Builder::new().prefix("husk-node-").tempdir()?;
        let files = artefacts(tmp.path())?;
        if hardware_kvm() {
            let mut env: Vec<(String, String)> = files
                .iter()
                .map(|(k, p)| (k.to_string(), p.display().to_string()))
                .collect();
            env.push(("NODE_TMP".into(), tmp.path().display().to_string()));
            return Ok(Node {
                kind: Kind::Direct { env, _tmp: tmp },
                next_id: 1,
            });
        }
        let root = tmp.path().join("root");
        let guest = root.join("husk/guest");
        std::fs::create_dir_all(&guest)?;
        let mut profile = String::from("export NODE_TMP=/tmp\n");
        let mut bins = vec![];
        for (k, p) in &files {
            if *k == "HUSK_VMM" {
                bins.push(p.clone());
                profile.push_str(&format!("export {k}=/husk/bin/husk-vmm\n"));
            } else {
                let name = p.file_name().context("artefact name")?;
                std::fs::copy(p, guest.join(name))
                    .with_context(|| format!("copy {}", p.display()))?;
                profile.push_str(&format!(
                    "export {k}=/husk/guest/{}\n",
                    name.to_string_lossy()
                ));
            }
        }
        bins.push(PathBuf::from(sh(
            Command::new("sh").args(["-c", "command -v socat"])
        )?));
        sh(Command::new("bash")
            .arg(l1_script())
            .arg("stage")
            .arg(&root)
            .args(&bins))?;
        std::fs::write(root.join("husk/profile"), profile)?;
        let t0 = Instant::now();
        let mut cmd = Command::new("bash");
        cmd.arg(l1_script())
            .arg("boot")
            .arg(tmp.path())
            .arg(&root)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(tmp.path().join("qemu.log"))?);
        let mut child = spawn_kept(cmd)?;
        let sock = tmp.path().join("cmd.sock");
        let console = tmp.path().join("console.log");
        let deadline = Instant::now() + Duration::from_secs(300);
        let stream = loop {
            if let Some(st) = child.try_wait()? {
                bail!(
                    "L1 QEMU exited ({st}): {}\nconsole:\n{}",
                    std::fs::read_to_string(tmp.path().join("qemu.log")).unwrap_or_default(),
                    std::fs::read_to_string(&console).unwrap_or_default()
                );
            }
            if let Ok(s) = UnixStream::connect(&sock) {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("L1 command socket never appeared");
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let mut stream = BufReader::new(stream);
        stream
            .get_ref()
            .set_read_timeout(Some(Duration::from_secs(300)))?;
        let mut line = String::new();
        loop {
            line.clear();
            let n = stream.read_line(&mut line).unwrap_or(0);
            if n == 0 {
                let _ = child.kill();
                bail!(
                    "L1 never became ready; console:\n{}",
                    std::fs::read_to_string(&console).unwrap_or_default()
                );
            }
            if line.trim_end() == "@@READY" {
                break;
            }
        }
        eprintln!("nested: L1 ready {:?} after QEMU start", t0.elapsed());
        // QEMU holds the initramfs in guest memory now; the node outlives every test (it is
        // never dropped), so its staging copies go now rather than never.
        let _ = std::fs::remove_dir_all(&root);
        let _ = std::fs::remove_file(tmp.path().join("initrd.cpio"));
        let _ = std::fs::remove_file(tmp.path().join("testguest.cpio"));
        Ok(Node {
            kind: Kind::Nested {
                child,
                stream,
                work: tmp,
            },
            next_id: 1,
        })
    }

    pub fn nested(&self) -> bool {
        matches!(self.kind, Kind::Nested { .. })
    }

    /// Runs `script` (sh) on the node with the artefact variables set.
    pub fn run(&mut self, script: &str, timeout: Duration) -> anyhow::Result<Outcome> {
        let id = self.next_id;
        self.next_id += 1;
        match &mut self.kind {
            Kind::Direct { env, .. } => {
                // A network namespace of its own: taps stay off this host's network.
                let out = Command::new("timeout")
                    .arg(timeout.as_secs().max(1).to_string())
                    .args(["unshare", "-n", "--", "sh", "-c", script])
                    .envs(env.iter().map(|(k, v)| (k, v)))
                    .stdin(Stdio::null())
                    .output()?;
                let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
                output.push_str(&String::from_utf8_lossy(&out.stderr));
                Ok(Outcome {
                    output,
                    code: out.status.code().unwrap_or(-1),
                })
            }
            Kind::Nested { stream, work, .. } => {
                use base64::Engine;
                let full = format!(". /husk/profile\n{script}");
                let b64 = base64::engine::general_purpose::STANDARD.encode(full);
                let secs = timeout.as_secs().max(1);
                stream
                    .get_mut()
                    .write_all(format!("RUN {id} {secs} {b64}\n").as_bytes())?;
                stream
                    .get_ref()
                    .set_read_timeout(Some(timeout + Duration::from_secs(180)))?;
                let begin = format!("@@BEGIN {id}");
                let end = format!("@@END {id} ");
                let mut started = false;
                let mut output = String::new();
                let mut line = Vec::new();
                // Lines read that were not this command's reply (for the error).
                let mut stray: Vec<String> = Vec::new();
                loop {
                    line.clear();
                    let n = stream.read_until(b'\n', &mut line).with_context(|| {
                        format!(
                            "no reply from L1 for command {id}; read instead: {:?}; partial: {:?}; console:\n{}",
                            &stray[stray.len().saturating_sub(20)..],
                            if started { output.as_str() } else { "" },
                            tail(&work.path().join("console.log"))
                        )
                    })?;
                    if n == 0 {
                        bail!(
                            "L1 closed its command channel; console:\n{}",
                            tail(&work.path().join("console.log"))
                        );
                    }
                    let text = String::from_utf8_lossy(&line);
                    let t = text.trim_end_matches('\n');
                    if !started {
                        started = t == begin;
                        if !started {
                            stray.push(t.chars().take(200).collect());
                        }
                    } else if let Some(code) = t.strip_prefix(&end) {
                        // The reply adds one newline before the end marker.
                        if output.ends_with('\n') {
                            output.pop();
                        }
                        let code = code.trim().parse().unwrap_or(-1);
                        return Ok(Outcome { output, code });
                    } else {
                        output.push_str(&text);
                    }
                }
            }
        }
    }
}

fn tail(p: &Path) -> String {
    let s = std::fs::read_to_string(p).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Kind::Nested { child, .. } = &mut self.kind {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

static NODE: Mutex<Option<Result<Node, String>>> = Mutex::new(None);

/// Runs `f` with the node of this test process (booted on first use), or
/// prints `skipped: <reason>` and returns None when there can be none here.
pub fn with_node<R>(f: impl FnOnce(&mut Node) -> R) -> Option<R> {
    if let Some(why) = unavailable() {
        println!("skipped: {why}");
        return None;
    }
    let mut g = NODE.lock().unwrap_or_else(|e| e.into_inner());
    if g.is_none() {
        *g = Some(Node::start().map_err(|e| format!("{e:#}")));
    }
    match g.as_mut() {
        Some(Ok(node)) => Some(f(node)),
        Some(Err(e)) => panic!("the test node did not start: {e}"),
        None => unreachable!("set above"),
    }
}

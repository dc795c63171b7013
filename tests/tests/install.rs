//! The node install (`host-shim/dist/install.sh`) and the Kubernetes manifests:
//! an install into a staging root (DESTDIR) whose huskd and CLI then run, the
//! systemd unit checked by `systemd-analyze`, uninstall and purge; the
//! RuntimeClasses read by the official Python client and matched against the
//! example config's handlers.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use husk_tests::{bin_path, is_root, require};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_path_buf()
}

fn dist() -> PathBuf {
    repo().join("host-shim/dist")
}

/// Runs install.sh with `args` into `destdir`; returns its combined output.
fn install_sh(destdir: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new("bash")
        .arg(dist().join("install.sh"))
        .args(args)
        .env("DESTDIR", destdir)
        .env_remove("PREFIX")
        .output()
        .expect("run install.sh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

const BINS: [&str; 4] = ["huskd", "husk", "husk-vmm", "husk-agent"];

#[test]
fn install_into_a_staging_root_runs_and_uninstalls() {
    require!(is_root(), "needs root (huskd mounts and makes cgroups)");
    let bin_dir = bin_path("huskd").parent().expect("bin dir").to_path_buf();
    for b in BINS {
        assert!(
            bin_dir.join(b).exists(),
            "{b} not built in {}",
            bin_dir.display()
        );
    }
    let root = tempfile::tempdir().expect("tempdir");
    let dest = root.path().join("dest");
    let bin_arg = bin_dir.to_str().expect("utf-8 path").to_string();
    let kernel = std::env::var("HUSK_GUEST_KERNEL").ok();
    let initrd = std::env::var("HUSK_GUEST_INITRD").ok();
    let mut args = vec!["--no-build", "--bin-dir", &bin_arg];
    match (&kernel, &initrd) {
        (Some(k), Some(i)) => args.extend(["--guest-kernel", k, "--guest-initrd", i]),
        _ => {
            eprintln!("guest artefacts not installed: HUSK_GUEST_KERNEL/HUSK_GUEST_INITRD unset");
            args.push("--no-guest");
        }
    }
    let (ok, out) = install_sh(&dest, &args);
    assert!(ok, "install failed:\n{out}");

    for b in BINS {
        let p = dest.join("usr/local/bin").join(b);
        assert_eq!(mode(&p), 0o755, "{}", p.display());
        assert_eq!(
            std::fs::read(&p).expect("installed binary"),
            std::fs::read(bin_dir.join(b)).expect("built binary"),
            "{b} is not the built binary"
        );
    }
    if kernel.is_some() {
        for f in ["bzImage", "initramfs.cpio.gz"] {
            assert_eq!(mode(&dest.join("var/lib/husk/guest").join(f)), 0o644, "{f}");
        }
    }
    assert_eq!(mode(&dest.join("var/lib/husk")), 0o700);
    let unit_path = dest.join("etc/systemd/system/huskd.service");
    let unit = std::fs::read_to_string(&unit_path).expect("unit");
    assert!(unit.contains("ExecStart=/usr/local/bin/huskd --config /etc/husk/config.toml"));
    assert!(
        unit.contains("KillMode=process"),
        "a huskd restart must not kill pods"
    );
    assert!(unit.contains("Restart=always"));
    assert!(!unit.contains("@PREFIX@"));

    // systemd's own check of the unit, with its ExecStart rebased into the staging root.
    if Command::new("systemd-analyze")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
    {
        let rebased = root.path().join("huskd.service");
        let huskd = dest.join("usr/local/bin/huskd");
        std::fs::write(
            &rebased,
            unit.replace("/usr/local/bin/huskd", huskd.to_str().expect("utf-8")),
        )
        .expect("write unit");
        let v = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&rebased)
            .output()
            .expect("systemd-analyze");
        let text = String::from_utf8_lossy(&v.stderr);
        assert!(
            v.status.success() && !text.contains("huskd.service:"),
            "systemd-analyze verify: {text}"
        );
    } else {
        eprintln!("unit not verified: systemd-analyze is not installed");
    }

    // The installed huskd runs with the installed config (paths moved into the temp
    // dir) and finds husk-agent/husk-vmm beside itself; the installed CLI talks to it.
    let config = std::fs::read_to_string(dest.join("etc/husk/config.toml")).expect("config");
    let run = root.path().join("run");
    let state = root.path().join("state");
    let cfg = config
        .replace(
            "/var/lib/husk/guest",
            &format!("{}/var/lib/husk/guest", dest.display()),
        )
        .replace("/var/lib/husk", state.to_str().expect("utf-8"))
        .replace("/run/husk", run.to_str().expect("utf-8"))
        .replace(
            "/etc/husk/certs.d",
            &format!("{}/certs.d", root.path().display()),
        );
    let cfg_path = root.path().join("config.toml");
    std::fs::write(&cfg_path, cfg).expect("write config");
    let mut huskd = Command::new(dest.join("usr/local/bin/huskd"))
        .arg("--config")
        .arg(&cfg_path)
        .stderr(std::fs::File::create(root.path().join("huskd.log")).expect("log"))
        .spawn()
        .expect("start installed huskd");
    let sock = run.join("huskd.sock");
    let start = Instant::now();
    while !sock.exists() && start.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let cli = |args: &[&str]| {
        Command::new(dest.join("usr/local/bin/husk"))
            .arg("--socket")
            .arg(&sock)
            .args(args)
            .output()
            .expect("run installed husk")
    };
    let version = cli(&["version"]);
    let pods = cli(&["pods"]);
    // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
    unsafe { libc::kill(huskd.id() as i32, libc::SIGTERM) };
    let status = huskd.wait().expect("wait huskd");
    let log = std::fs::read_to_string(root.path().join("huskd.log")).unwrap_or_default();
    assert!(
        version.status.success(),
        "husk version: {}\nhuskd log:\n{log}",
        String::from_utf8_lossy(&version.stderr)
    );
    assert!(String::from_utf8_lossy(&version.stdout).contains("husk"));
    assert!(pods.status.success(), "husk pods: {pods:?}");
    assert!(
        status.success(),
        "installed huskd did not stop cleanly: {status}\n{log}"
    );

    // A re-install keeps the operator's config.
    std::fs::write(
        dest.join("etc/husk/config.toml"),
        format!("{config}\n# operator's edit\n"),
    )
    .expect("edit config");
    let (ok, out) = install_sh(&dest, &args);
    assert!(ok && out.contains("kept the existing"), "re-install: {out}");
    assert!(
        std::fs::read_to_string(dest.join("etc/husk/config.toml"))
            .expect("config")
            .contains("operator's edit")
    );

    // Uninstall removes what the install put there and keeps the config ...
    let (ok, out) = install_sh(&dest, &["--uninstall"]);
    assert!(ok, "uninstall: {out}");
    for b in BINS {
        assert!(!dest.join("usr/local/bin").join(b).exists(), "{b} left");
    }
    assert!(!unit_path.exists());
    assert!(!dest.join("var/lib/husk/guest/bzImage").exists());
    assert!(!dest.join("var/lib/husk/install-manifest").exists());
    assert!(dest.join("etc/husk/config.toml").exists());
    let (ok, out) = install_sh(&dest, &["--uninstall"]);
    assert!(!ok && out.contains("nothing installed"), "{out}");

    // ... and --purge drops it too.
    let (ok, out) = install_sh(&dest, &args);
    assert!(ok, "{out}");
    let (ok, out) = install_sh(&dest, &["--uninstall", "--purge"]);
    assert!(ok, "{out}");
    assert!(!dest.join("etc/husk").exists());
}

/// What the official Python client makes of the manifests: one JSON line per document.
const READ_MANIFESTS: &str = r#"
import json, sys, yaml
from kubernetes import client
from kubernetes.utils import parse_quantity
api = client.ApiClient()
for path in sys.argv[1:]:
    for doc in yaml.safe_load_all(open(path)):
        kind = doc["kind"]
        obj = api._ApiClient__deserialize(doc, "V1" + kind)
        if kind == "RuntimeClass":
            fixed = obj.overhead.pod_fixed
            print(json.dumps({"kind": kind, "name": obj.metadata.name, "handler": obj.handler,
                "memory": int(parse_quantity(fixed["memory"])),
                "cpu_milli": int(parse_quantity(fixed["cpu"]) * 1000)}))
        elif kind == "Pod":
            print(json.dumps({"kind": kind, "name": obj.metadata.name,
                "runtime_class": obj.spec.runtime_class_name}))
        else:
            sys.exit("unexpected kind " + kind)
"#;

#[test]
fn runtimeclass_manifests_match_the_example_config() {
    let python = Path::new("/usr/bin/python3");
    let has_client = python.exists()
        && Command::new(python)
            .args(["-c", "import kubernetes, yaml"])
            .status()
            .is_ok_and(|s| s.success());
    require!(
        has_client,
        "needs Debian's python3-kubernetes (tests/install-deps.sh installs it)"
    );
    let cfg = husk_host::config::Config::load(Some(&dist().join("config.toml")))
        .expect("the example config loads");
    let handlers: std::collections::BTreeSet<String> =
        cfg.runtime.handlers.keys().cloned().collect();
    assert!(handlers.contains(&cfg.runtime.default_handler));

    let k8s = dist().join("kubernetes");
    let out = Command::new(python)
        .arg("-c")
        .arg(READ_MANIFESTS)
        .arg(k8s.join("runtimeclass.yaml"))
        .arg(k8s.join("pod-example.yaml"))
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "manifests rejected: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let docs: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    let classes: Vec<&serde_json::Value> = docs
        .iter()
        .filter(|d| d["kind"] == "RuntimeClass")
        .collect();
    let class_handlers: std::collections::BTreeSet<String> = classes
        .iter()
        .map(|d| d["handler"].as_str().expect("handler").to_string())
        .collect();
    assert_eq!(
        class_handlers, handlers,
        "RuntimeClass handlers vs [runtime.handlers]"
    );
    const MIB: i64 = 1 << 20;
    for c in &classes {
        let memory = c["memory"].as_i64().expect("memory");
        let cpu = c["cpu_milli"].as_i64().expect("cpu");
        assert!(memory > 0 && cpu > 0, "{c}");
        // husk-qemu's overhead covers what `husk bench cri` measured for an idle pod:
        // 42.6 MiB guest RAM + 96.5 MiB PSS of QEMU and its vsock server.
        if c["handler"] == "husk-qemu" {
            assert!(
                memory >= 140 * MIB,
                "husk-qemu overhead below the measured {c}"
            );
        }
    }
    let names: Vec<&str> = classes
        .iter()
        .map(|d| d["name"].as_str().expect("name"))
        .collect();
    let pod = docs
        .iter()
        .find(|d| d["kind"] == "Pod")
        .expect("example pod");
    assert!(
        names.contains(&pod["runtime_class"].as_str().expect("runtimeClassName")),
        "the example pod names a RuntimeClass that is not defined: {pod}"
    );
}

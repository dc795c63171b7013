#![allow(clippy::unwrap_used)]
//! Configuration mistakes give clear errors: a `run_dir` too long for the
//! unix sockets huskd creates below it stops huskd at start; a helper that
//! dies at start is reported by its error line, not by backtrace frames,
//! even with `RUST_BACKTRACE` in huskd's environment.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use husk_proto::cri;
use husk_tests::huskd::{Huskd, Options};
use husk_tests::runtime::{NS, pod_config};
use husk_tests::{bin_path, is_root, require};

#[test]
fn too_long_run_dir_stops_huskd_at_start() {
    let d = tempfile::tempdir().unwrap();
    // 25 bytes: one more than fits (/pods/<64 hex>/forward.sock below it).
    let run_dir = format!("/tmp/{}", "r".repeat(20));
    let config = d.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "socket = \"{}\"\nstate_dir = \"{}\"\nrun_dir = \"{run_dir}\"\n",
            d.path().join("huskd.sock").display(),
            d.path().join("state").display(),
        ),
    )
    .unwrap();
    let mut child = Command::new(bin_path("huskd"))
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            panic!(
                "huskd kept running with a run_dir of {} bytes",
                run_dir.len()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&format!("run_dir {run_dir} is too long"))
            && err.contains("108-byte sun_path limit (24 bytes at most"),
        "{err}"
    );
    assert!(!d.path().join("huskd.sock").exists());
    assert!(!std::path::Path::new(&run_dir).exists());
}

#[tokio::test]
async fn agent_dying_at_start_reports_its_error_not_backtrace_frames() {
    require!(
        is_root() && std::path::Path::new("/usr/bin/unshare").exists(),
        "needs root and unshare(1)"
    );
    let d = tempfile::tempdir().unwrap();
    // The real agent, made to fail at start (its listen socket's parent is
    // a file), with backtraces forced on: huskd must quote the error
    // itself. The wrapper also records the backtrace setting huskd passed on.
    let seen = d.path().join("agent-env");
    let wrapper = d.path().join("agent-wrapper");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\n\
             echo \"RUST_BACKTRACE=${{RUST_BACKTRACE-unset}} RUST_LIB_BACKTRACE=${{RUST_LIB_BACKTRACE-unset}}\" > {}\n\
             for a; do\n\
               shift\n\
               case \"$a\" in unix:*/agent.sock) a=unix:/dev/null/agent.sock ;; esac\n\
               set -- \"$@\" \"$a\"\n\
             done\n\
             exec env RUST_BACKTRACE=1 {} \"$@\"\n",
            seen.display(),
            bin_path("husk-agent").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let h = Huskd::start_with_env(
        Options {
            hosts: vec![],
            docker_config: None,
        },
        &format!(
            "[runtime]\nagent_binary = \"{}\"\nagent_start_timeout_ms = 5000\n",
            wrapper.display()
        ),
        &[("RUST_BACKTRACE", "1"), ("RUST_LIB_BACKTRACE", "1")],
    )
    .await
    .unwrap();
    let c = h.clients().await.unwrap();
    let r = c
        .runtime
        .clone()
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(pod_config("helper-error", &h.dir.path().join("logs"))),
            runtime_handler: NS.into(),
        })
        .await
        .unwrap_err();
    let m = r.message();
    assert_eq!(r.code(), tonic::Code::Internal, "{m}");
    assert!(m.contains("exited during start"), "{m}");
    assert!(
        m.contains(
            "husk-agent: fatal: serve: remove stale socket /dev/null/agent.sock: Not a directory"
        ),
        "the agent's error line: {m}"
    );
    for frame in ["backtrace", "lang_start", "__libc_start", " at /"] {
        assert!(!m.contains(frame), "{frame:?} in {m}");
    }
    assert_eq!(
        std::fs::read_to_string(&seen).unwrap().trim(),
        "RUST_BACKTRACE=unset RUST_LIB_BACKTRACE=unset"
    );
}

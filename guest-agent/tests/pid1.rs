//! The agent as PID 1 (its guest duties), in a fresh PID, mount and UTS
//! namespace on this host. reboot(2) from a non-initial PID namespace only
//! ends that namespace, so the power-off path is safe to exercise here.

mod common;

use std::time::{Duration, Instant};

use common::{TestAgent, ctx, spec, unique};
use husk_proto::agent as pb;

#[tokio::test]
async fn agent_as_pid1_mounts_runs_reaps_and_powers_off() {
    require_root!();
    if std::process::Command::new("unshare")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: unshare(1) missing");
        return;
    }
    // Stray words, as the kernel passes unknown command-line words to init.
    let mut a = TestAgent::start_wrapped_args(
        &[
            "unshare",
            "--pid",
            "--fork",
            "--mount",
            "--uts",
            "--propagation",
            "private",
        ],
        &["splash", "--no-such-flag"],
    )
    .await;
    let check = a
        .client
        .check(ctx(), &pb::CheckRequest::new())
        .await
        .expect("check");
    assert!(check.init, "{check:?}");
    assert_eq!(check.pid, 1);
    assert_eq!(
        check.cgroup_version, "v2",
        "PID 1 mounts cgroup2 at /sys/fs/cgroup"
    );

    // VM style: no new namespaces, the agent's own are the pod's.
    let req = pb::CreateSandboxRequest {
        sandbox_id: a.sandbox_id.clone(),
        hostname: a.hostname.clone(),
        cgroup_parent: format!("husk-test/{}", a.sandbox_id),
        ..Default::default()
    };
    a.client.create_sandbox(ctx(), &req).await.expect("sandbox");
    // A guest agent that serves a sandbox never rehearses (that is for pooled VMs).
    let e = a.rehearse().await.expect_err("a sandbox exists");
    assert_eq!(common::code(&e), ttrpc::Code::FAILED_PRECONDITION, "{e:?}");
    let id = unique("pid1");
    let (out, err, code) = a
        .output(&id, &spec(&["sh", "-c", "hostname; echo $$; exit 7"]))
        .await;
    assert_eq!(code, 7, "{err}");
    assert_eq!(out, format!("{}\n1\n", a.hostname));
    // The host's hostname is not the pod's.
    assert_ne!(
        nix::unistd::gethostname()
            .expect("hostname")
            .to_string_lossy(),
        a.hostname
    );
    let deadline = Instant::now() + Duration::from_secs(3);
    while !common::zombie_children(a.agent_pid).is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(common::zombie_children(a.agent_pid), Vec::<i32>::new());

    // cgroup v2: devices are filtered by the agent's eBPF program.
    let (out, err, code) = a
        .output(&unique("dev"), &spec(&["sh", "-c", "mknod /tmp/disk b 7 0 && (head -c 1 /tmp/disk > /dev/null 2>&1 && echo readable || echo denied)"]))
        .await;
    assert_eq!((out.as_str(), code), ("denied\n", 0), "{err}");

    // As a VM's PID 1 the agent spawned the sandbox's holder ahead of CreateSandbox
    // (sandbox/spare.rs) and moved it into the pod's pause cgroup.
    let log = a.log();
    assert!(
        log.lines()
            .any(|l| l.contains("sandbox created") && l.contains("spare_used=true")),
        "{log}"
    );
    // The host's view of that cgroup (cgroup2 where the host has it): the holder is in it.
    let procs: String = [
        "/sys/fs/cgroup/unified/husk-test",
        "/sys/fs/cgroup/husk-test",
    ]
    .iter()
    .map(|r| {
        std::path::Path::new(r)
            .join(&a.sandbox_id)
            .join("pause/cgroup.procs")
    })
    .find_map(|p| std::fs::read_to_string(p).ok())
    .unwrap_or_default();
    assert_eq!(
        procs.lines().count(),
        1,
        "pause cgroup procs {procs:?}\n{log}"
    );
    // The holder lives as long as the pod: it keeps address-space randomisation (runners
    // for containers start without it, spawn.rs).
    // Without randomisation x86-64 loads a PIE at 0x555555554000 (ELF_ET_DYN_BASE).
    let holder = procs.trim();
    let maps = std::fs::read_to_string(format!("/proc/{holder}/maps")).unwrap_or_default();
    assert!(
        !maps.is_empty() && !maps.starts_with("555555554000-"),
        "holder {holder} at the fixed base:\n{maps}"
    );

    // A long-running container, then SIGTERM: the agent tears down and "powers off".
    a.run(&unique("sleeper"), &spec(&["sleep", "1000"])).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(a.agent_pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("term");
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = a.child.try_wait().expect("wait unshare") {
            break s;
        }
        assert!(Instant::now() < deadline, "agent did not stop: {}", a.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // unshare reports how its child (the agent) ended; the pod processes are gone.
    assert!(!status.success() || status.code() == Some(0), "{status:?}");
    assert!(!a.socket.exists(), "socket removed on shutdown");
    assert!(a.log().contains("shutting down"), "{}", a.log());
    let unified = std::path::Path::new("/sys/fs/cgroup/unified/husk-test").join(&a.sandbox_id);
    let v2root = std::path::Path::new("/sys/fs/cgroup/husk-test").join(&a.sandbox_id);
    assert!(
        !unified.exists() && !v2root.exists(),
        "sandbox cgroup removed"
    );
}

/// The namespace sandbox as huskd should launch it: the agent is the init of
/// a fresh PID namespace (`--host`), so its death takes the pod with it.
#[tokio::test]
async fn host_mode_agent_as_init_of_its_own_pid_namespace() {
    require_root!();
    if std::process::Command::new("unshare")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: unshare(1) missing");
        return;
    }
    let a =
        TestAgent::start_wrapped_args(&["unshare", "--pid", "--fork", "--kill-child"], &["--host"])
            .await;
    let check = a
        .client
        .check(ctx(), &pb::CheckRequest::new())
        .await
        .expect("check");
    assert!(!check.init, "{check:?}");
    assert_eq!(check.pid, 1);
    let host_cgroups = if std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        "v2"
    } else {
        "v1"
    };
    assert_eq!(
        check.cgroup_version, host_cgroups,
        "the host's hierarchy, not a fresh cgroup2 mount"
    );
    a.create_sandbox(true).await;
    let mut s = spec(&["sh", "-c", "echo $$; hostname"]);
    s["linux"]["resources"] = serde_json::json!({"memory": {"limit": 67108864}});
    let (out, err, code) = a.output(&unique("hostmode"), &s).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, format!("1\n{}\n", a.hostname));

    // The agent dies: every process of the pod dies with its PID namespace.
    a.run(&unique("orphan"), &spec(&["sleep", "1000"])).await;
    let sleeper = common::children(a.agent_pid)
        .into_iter()
        .find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/cmdline"))
                .unwrap_or_default()
                .starts_with("sleep")
        })
        .expect("sleep is the agent's child");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(a.agent_pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill agent");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::path::Path::new(&format!("/proc/{sleeper}")).exists() {
        assert!(Instant::now() < deadline, "container outlived its agent");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    common::remove_cgroup_tree(&a.cgroup_parent());
    assert!(
        !std::path::Path::new("/sys/fs/cgroup/memory")
            .join(a.cgroup_parent())
            .exists()
    );
}

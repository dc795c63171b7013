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
    if std::process::Command::new("unshare").arg("--version").output().is_err() {
        eprintln!("skipped: unshare(1) missing");
        return;
    }
    let mut a = TestAgent::start_wrapped(&["unshare", "--pid", "--fork", "--mount", "--uts", "--propagation", "private"]).await;
    let check = a.client.check(ctx(), &pb::CheckRequest::new()).await.expect("check");
    assert!(check.init, "{check:?}");
    assert_eq!(check.pid, 1);
    assert_eq!(check.cgroup_version, "v2", "PID 1 mounts cgroup2 at /sys/fs/cgroup");

    // VM style: no new namespaces, the agent's own are the pod's.
    let req = pb::CreateSandboxRequest {
        sandbox_id: a.sandbox_id.clone(),
        hostname: a.hostname.clone(),
        cgroup_parent: format!("husk-test/{}", a.sandbox_id),
        ..Default::default()
    };
    a.client.create_sandbox(ctx(), &req).await.expect("sandbox");
    let id = unique("pid1");
    let (out, err, code) = a.output(&id, &spec(&["sh", "-c", "hostname; echo $$; exit 7"])).await;
    assert_eq!(code, 7, "{err}");
    assert_eq!(out, format!("{}\n1\n", a.hostname));
    // The host's hostname is not the pod's.
    assert_ne!(nix::unistd::gethostname().expect("hostname").to_string_lossy(), a.hostname);
    let deadline = Instant::now() + Duration::from_secs(3);
    while !common::zombie_children(a.agent_pid).is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(common::zombie_children(a.agent_pid), Vec::<i32>::new());

    // A long-running container, then SIGTERM: the agent tears down and "powers off".
    a.run(&unique("sleeper"), &spec(&["sleep", "1000"])).await;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(a.agent_pid), nix::sys::signal::Signal::SIGTERM).expect("term");
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
    assert!(!unified.exists() && !v2root.exists(), "sandbox cgroup removed");
}

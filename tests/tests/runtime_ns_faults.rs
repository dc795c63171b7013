#![allow(clippy::unwrap_used)]
//! The namespace sandbox (`husk-ns`) under faults, end to end: huskd killed
//! and restarted, agents crashing or failing to start, bad CRI input, slow
//! stops, the OOM killer. Same setup as runtime_ns.rs (the shared `CriEnv`).

use std::path::Path;
use std::time::{Duration, Instant};

use husk_proto::cri;
use husk_tests::cri_env::CriEnv;
use husk_tests::require;
use husk_tests::runtime::{
    NS, NS_NEEDS as NEEDS, alive, cgroup_exists, cgroup_v2, children, code_of, container_status,
    eventually, info, log_records, ns_env_ok as env_ok, pod_status, wait_exited,
};
use tonic::Code;

#[tokio::test]
async fn huskd_kill9_and_restart_recovers_pods_containers_and_logs() {
    require!(env_ok(), NEEDS);
    let mut e = CriEnv::new(NS, "").await;
    let pcfg = e.pod("phoenix");
    let pod = e.run_pod(&pcfg).await.unwrap();
    let agent = e.agent_pid(&pod).await;
    let done = e
        .run(
            &pod,
            &e.ctr("done", &["sh", "-c", "echo bye; exit 7"]),
            &pcfg,
        )
        .await;
    wait_exited(&e.c, &done, Duration::from_secs(20)).await;
    let ticker = e
        .run(
            &pod,
            &e.ctr(
                "ticker",
                &[
                    "sh",
                    "-c",
                    "i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.05; done",
                ],
            ),
            &pcfg,
        )
        .await;
    let created = e
        .create(&pod, &e.ctr("later", &["sh", "-c", "echo later"]), &pcfg)
        .await
        .unwrap();
    let log = e.log_path(&pcfg, "ticker");
    eventually("ticks", Duration::from_secs(10), || async {
        log_records(&log).len() > 3
    })
    .await;

    e.d.crash_and_restart().await.unwrap();
    e.c = e.d.clients().await.unwrap();
    assert!(alive(agent), "the agent must outlive huskd");
    let ps = pod_status(&e.c, &pod).await.unwrap();
    assert_eq!(
        ps.status.unwrap().state,
        cri::PodSandboxState::SandboxReady as i32
    );
    assert_eq!(info(&ps.info)["agentPid"].as_i64(), Some(agent as i64));
    let st = e.ctr_status(&done).await;
    assert_eq!(
        (st.state, st.exit_code),
        (cri::ContainerState::ContainerExited as i32, 7)
    );
    let st = e.ctr_status(&ticker).await;
    assert_eq!(st.state, cri::ContainerState::ContainerRunning as i32);
    assert_eq!(
        e.ctr_status(&created).await.state,
        cri::ContainerState::ContainerCreated as i32
    );

    // Log copying resumes: every line the container printed is in the log
    // exactly once, across the kill (reads from the agent are acknowledged
    // only once their records are in the log).
    let n = log_records(&log).len();
    eventually("log copying resumes", Duration::from_secs(10), || async {
        log_records(&log).len() > n + 5
    })
    .await;
    let nums: Vec<u64> = log_records(&log)
        .iter()
        .map(|r| r.2.trim_start_matches("tick ").parse().unwrap())
        .collect();
    let want: Vec<u64> = (0..nums.len() as u64).collect();
    assert_eq!(nums, want, "every line exactly once, in order");

    // The recovered pod is fully usable.
    assert_eq!(
        e.exec(&ticker, &["echo", "ok"], 5).await.unwrap().stdout,
        b"ok\n"
    );
    e.start(&created).await.unwrap();
    assert_eq!(
        wait_exited(&e.c, &created, Duration::from_secs(20))
            .await
            .exit_code,
        0
    );
    e.stop_container(&ticker, 0).await.unwrap();
    assert_eq!(e.ctr_status(&ticker).await.exit_code, 137);
    // Duplicate names are still known after the restart.
    assert_eq!(code_of(e.run_pod(&pcfg).await), Code::AlreadyExists);
    e.stop_pod(&pod).await.unwrap();
    e.remove_pod(&pod).await.unwrap();
    assert!(!alive(agent));
}

#[tokio::test]
async fn agent_crash_makes_pod_notready_and_containers_exited() {
    require!(env_ok(), NEEDS);
    let e = CriEnv::new(NS, "").await;
    let pcfg = e.pod("crash");
    let pod = e.run_pod(&pcfg).await.unwrap();
    let id = e
        .run(&pod, &e.ctr("victim", &["sleep", "1000"]), &pcfg)
        .await;
    let unshare = e.agent_pid(&pod).await;
    let cg = info(&pod_status(&e.c, &pod).await.unwrap().info)["cgroupParent"]
        .as_str()
        .unwrap()
        .to_string();
    let agent = children(unshare)[0];
    // SAFETY: SIGKILL to the agent process this test's huskd started.
    unsafe { libc::kill(agent, libc::SIGKILL) };
    let c = e.c.clone();
    eventually("pod NotReady", Duration::from_secs(10), || {
        let c = c.clone();
        let pod = pod.clone();
        async move {
            pod_status(&c, &pod).await.unwrap().status.unwrap().state
                == cri::PodSandboxState::SandboxNotready as i32
        }
    })
    .await;
    let st = wait_exited(&e.c, &id, Duration::from_secs(10)).await;
    assert_eq!(st.reason, "SandboxAgentExited");
    assert!(!st.message.is_empty() && st.finished_at > 0);
    // Removed by the pod monitor right after it records the exits.
    eventually(
        "cgroups of the dead pod removed",
        Duration::from_secs(10),
        || async { !cgroup_exists(&cg) },
    )
    .await;
    // RPCs keep working.
    assert_eq!(e.pods().await.len(), 1);
    assert_eq!(
        code_of(e.create(&pod, &e.ctr("after", &["true"]), &pcfg).await),
        Code::FailedPrecondition
    );
    assert_eq!(
        code_of(e.exec(&id, &["true"], 1).await),
        Code::FailedPrecondition
    );
    e.stop_container(&id, 1).await.unwrap();
    let other = e.run_pod(&e.pod("healthy")).await.unwrap();
    e.stop_pod(&pod).await.unwrap();
    e.remove_pod(&pod).await.unwrap();
    e.remove_pod(&other).await.unwrap();
    assert!(e.pods().await.is_empty());
}

#[tokio::test]
async fn bad_input_and_failed_creates_clean_up() {
    require!(env_ok(), NEEDS);
    let e = CriEnv::new(NS, "").await;
    let rt = || e.c.runtime.clone();
    let nope = "0000000000000000000000000000000000000000000000000000000000000000";

    // Status: runtime ready (husk-ns), network not ready with a reason.
    let st = e.status_verbose().await;
    let conds = st.status.unwrap().conditions;
    assert!(conds.iter().any(|c| c.r#type == "RuntimeReady" && c.status));
    assert!(
        conds
            .iter()
            .any(|c| c.r#type == "NetworkReady" && !c.status && !c.reason.is_empty())
    );
    assert!(st.runtime_handlers.iter().any(|h| h.name == NS));
    rt().update_runtime_config(cri::UpdateRuntimeConfigRequest::default())
        .await
        .unwrap();
    let bad_cidr = cri::UpdateRuntimeConfigRequest {
        runtime_config: Some(cri::RuntimeConfig {
            network_config: Some(cri::NetworkConfig {
                pod_cidr: "10.0.0.0/99".into(),
            }),
        }),
    };
    assert_eq!(
        code_of(rt().update_runtime_config(bad_cidr).await),
        Code::InvalidArgument
    );

    // Unknown ids.
    assert_eq!(code_of(pod_status(&e.c, nope).await), Code::NotFound);
    assert_eq!(code_of(container_status(&e.c, nope).await), Code::NotFound);
    assert_eq!(code_of(e.start(nope).await), Code::NotFound);
    assert_eq!(code_of(e.stop_container(nope, 0).await), Code::NotFound);
    assert_eq!(code_of(e.stop_pod(nope).await), Code::NotFound);
    assert_eq!(code_of(e.exec(nope, &["true"], 1).await), Code::NotFound);
    assert_eq!(code_of(e.container_stats(nope).await), Code::NotFound);
    assert_eq!(code_of(e.pod_stats(nope).await), Code::NotFound);
    assert_eq!(code_of(e.reopen_log(nope).await), Code::NotFound);
    assert_eq!(
        code_of(e.update_resources(nope, Default::default()).await),
        Code::NotFound
    );
    assert_eq!(
        code_of(e.create(nope, &e.ctr("x", &["true"]), &e.pod("x")).await),
        Code::NotFound
    );
    // Removing what is not there succeeds (the CRI makes removal idempotent).
    e.remove_pod(nope).await.unwrap();
    e.remove_container(nope).await.unwrap();
    // Streaming requests for what is not there: NotFound (tests/tests/streaming.rs
    // has the rest).
    let ex = rt()
        .exec(cri::ExecRequest {
            container_id: nope.into(),
            cmd: vec!["true".into()],
            stdout: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(ex.code(), Code::NotFound, "{ex:?}");
    assert_eq!(
        code_of(
            rt().attach(cri::AttachRequest {
                container_id: nope.into(),
                stdout: true,
                ..Default::default()
            })
            .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code_of(e.port_forward_url(nope, &[80]).await),
        Code::NotFound
    );

    // Pod config problems.
    let mut no_md = e.pod("nomd");
    no_md.metadata = None;
    assert_eq!(code_of(e.run_pod(&no_md).await), Code::InvalidArgument);
    assert_eq!(
        code_of(e.run_pod_on(&e.pod("h"), "kata").await),
        Code::InvalidArgument
    );
    // The default handler is the VM sandbox on husk-vmm: this huskd has no
    // guest image configured (and this host no usable KVM), said clearly.
    let vm = e.run_pod_on(&e.pod("vm"), "").await.unwrap_err();
    assert_eq!(vm.code(), Code::FailedPrecondition, "{vm:?}");
    assert!(vm.message().contains("VM sandbox"), "{}", vm.message());
    let mut host_pid = e.pod("hostpid");
    host_pid.linux = Some(cri::LinuxPodSandboxConfig {
        security_context: Some(cri::LinuxSandboxSecurityContext {
            namespace_options: Some(cri::NamespaceOption {
                pid: 2,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    });
    assert_eq!(code_of(e.run_pod(&host_pid).await), Code::InvalidArgument);
    assert!(e.pods().await.is_empty(), "failed RunPodSandbox left a pod");
    assert_eq!(
        std::fs::read_dir(e.d.run_dir().join("pods"))
            .map(|d| d.count())
            .unwrap_or(0),
        0
    );

    // Duplicates.
    let pcfg = e.pod("dup");
    let pod = e.run_pod(&pcfg).await.unwrap();
    assert_eq!(code_of(e.run_pod(&pcfg).await), Code::AlreadyExists);
    let mut next = pcfg.clone();
    next.metadata.as_mut().unwrap().attempt = 1;
    let pod2 = e.run_pod(&next).await.unwrap();
    e.remove_pod(&pod2).await.unwrap();
    let c = e
        .create(&pod, &e.ctr("same", &["sleep", "100"]), &pcfg)
        .await
        .unwrap();
    assert_eq!(
        code_of(
            e.create(&pod, &e.ctr("same", &["sleep", "100"]), &pcfg)
                .await
        ),
        Code::AlreadyExists
    );

    // Container config problems: nothing is left behind.
    let mut no_md = e.ctr("m", &["true"]);
    no_md.metadata = None;
    assert_eq!(
        code_of(e.create(&pod, &no_md, &pcfg).await),
        Code::InvalidArgument
    );
    let with_mount = |cp: &str, hp: &str| {
        let mut c = e.ctr("mnt", &["true"]);
        c.mounts = vec![cri::Mount {
            container_path: cp.into(),
            host_path: hp.into(),
            ..Default::default()
        }];
        c
    };
    assert_eq!(
        code_of(e.create(&pod, &with_mount("rel", "/tmp"), &pcfg).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code_of(e.create(&pod, &with_mount("/m", "tmp"), &pcfg).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code_of(
            e.create(&pod, &with_mount("/m", "/no/such/husk/path"), &pcfg)
                .await
        ),
        Code::InvalidArgument
    );
    let mut bad_res = e.ctr("res", &["true"]);
    bad_res.linux = Some(cri::LinuxContainerConfig {
        resources: Some(cri::LinuxContainerResources {
            memory_limit_in_bytes: -1,
            ..Default::default()
        }),
        security_context: None,
    });
    assert_eq!(
        code_of(e.create(&pod, &bad_res, &pcfg).await),
        Code::InvalidArgument
    );
    let mut no_image = e.ctr("img", &["true"]);
    no_image.image = Some(cri::ImageSpec {
        image: "127.0.0.1:1/not/pulled:1".into(),
        ..Default::default()
    });
    assert_eq!(
        code_of(e.create(&pod, &no_image, &pcfg).await),
        Code::NotFound
    );
    // The agent refuses a missing binary; huskd keeps no record of it.
    let r = e
        .create(&pod, &e.ctr("nobin", &["/no/such/binary"]), &pcfg)
        .await;
    match r {
        Err(s) => assert_eq!(s.code(), Code::InvalidArgument, "{s:?}"),
        Ok(id) => {
            // Or it fails at start: then it is recorded as exited with the reason.
            assert!(e.start(&id).await.is_err());
            let st = e.ctr_status(&id).await;
            assert_eq!(st.state, cri::ContainerState::ContainerExited as i32);
        }
    }
    let left: Vec<_> = e
        .list_containers(Default::default())
        .await
        .into_iter()
        .filter(|x| x.id != c)
        .collect();
    assert!(
        left.iter()
            .all(|x| x.metadata.as_ref().unwrap().name == "nobin"),
        "{left:?}"
    );
    // The pod is still fine.
    e.start(&c).await.unwrap();
    assert_eq!(
        e.exec(&c, &["echo", "fine"], 5).await.unwrap().stdout,
        b"fine\n"
    );

    // CRI devices: a host node appears (and is allowed) in the container; a non-device is refused.
    let with_dev = |name: &str, host: &str| {
        let mut c = e.ctr(
            name,
            &["sh", "-c", "echo x > /dev/husknull && ls -l /dev/husknull"],
        );
        c.devices = vec![cri::Device {
            container_path: "/dev/husknull".into(),
            host_path: host.into(),
            permissions: "rw".into(),
        }];
        c
    };
    let dev = e.run(&pod, &with_dev("dev", "/dev/null"), &pcfg).await;
    let st = wait_exited(&e.c, &dev, Duration::from_secs(20)).await;
    assert_eq!(
        st.exit_code,
        0,
        "{:?}",
        log_records(&e.log_path(&pcfg, "dev"))
    );
    assert!(
        log_records(&e.log_path(&pcfg, "dev"))[0]
            .2
            .starts_with("crw")
    );
    assert_eq!(
        code_of(
            e.create(&pod, &with_dev("baddev", "/etc/passwd"), &pcfg)
                .await
        ),
        Code::InvalidArgument
    );

    // A stopped sandbox takes no containers.
    e.stop_pod(&pod).await.unwrap();
    assert_eq!(
        code_of(e.create(&pod, &e.ctr("late", &["true"]), &pcfg).await),
        Code::FailedPrecondition
    );
    assert_eq!(
        wait_exited(&e.c, &c, Duration::from_secs(5)).await.state,
        cri::ContainerState::ContainerExited as i32
    );
    e.remove_pod(&pod).await.unwrap();
}

#[tokio::test]
async fn failed_agent_start_cleans_up() {
    require!(env_ok(), NEEDS);
    let e = CriEnv::new(
        NS,
        "[runtime]\nagent_binary = \"/bin/false\"\nagent_start_timeout_ms = 3000\n",
    )
    .await;
    let r = e.run_pod(&e.pod("noagent")).await.unwrap_err();
    assert_eq!(r.code(), Code::Internal, "{r:?}");
    assert!(
        r.message().contains("exited during start"),
        "{}",
        r.message()
    );
    assert!(e.pods().await.is_empty());
    assert_eq!(
        std::fs::read_dir(e.d.run_dir().join("pods"))
            .map(|d| d.count())
            .unwrap_or(0),
        0,
        "run dir left"
    );
    assert_eq!(
        std::fs::read_dir(e.d.state_dir().join("pods"))
            .map(|d| d.count())
            .unwrap_or(0),
        0,
        "record left"
    );
    // The name is free again.
    assert_eq!(
        e.run_pod(&e.pod("noagent")).await.unwrap_err().code(),
        Code::Internal
    );
}

#[tokio::test]
async fn a_slow_stop_blocks_nothing_else() {
    require!(env_ok(), NEEDS);
    let e = CriEnv::new(NS, "").await;
    let pa = e.pod("slow");
    let pod_a = e.run_pod(&pa).await.unwrap();
    let stubborn = e
        .run(
            &pod_a,
            &e.ctr(
                "stubborn",
                &["sh", "-c", "trap '' TERM; while true; do sleep 1; done"],
            ),
            &pa,
        )
        .await;
    let other = e
        .run(&pod_a, &e.ctr("other", &["sleep", "1000"]), &pa)
        .await;
    let c = e.c.clone();
    let id = stubborn.clone();
    let t0 = Instant::now();
    let stop = tokio::spawn(async move {
        c.runtime
            .clone()
            .stop_container(cri::StopContainerRequest {
                container_id: id,
                timeout: 6,
            })
            .await
            .unwrap();
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // While the stop waits out its grace period: the same pod and other pods answer.
    let t = Instant::now();
    let st = e.ctr_status(&stubborn).await;
    assert_eq!(st.state, cri::ContainerState::ContainerRunning as i32);
    assert_eq!(
        e.exec(&other, &["echo", "ok"], 5).await.unwrap().stdout,
        b"ok\n"
    );
    let pb = e.pod("fast");
    let pod_b = e.run_pod(&pb).await.unwrap();
    let b = e.run(&pod_b, &e.ctr("b", &["sleep", "1000"]), &pb).await;
    assert_eq!(e.exec(&b, &["echo", "b"], 5).await.unwrap().stdout, b"b\n");
    assert_eq!(e.pods().await.len(), 2);
    let elapsed = t.elapsed();
    assert!(!stop.is_finished(), "the stop should still be waiting");
    assert!(
        elapsed < Duration::from_secs(5),
        "RPCs waited for the slow stop: {elapsed:?}"
    );
    stop.await.unwrap();
    assert!(t0.elapsed() >= Duration::from_secs(6));
    assert_eq!(e.ctr_status(&stubborn).await.exit_code, 137);
    for p in [pod_a, pod_b] {
        e.stop_pod(&p).await.unwrap();
        e.remove_pod(&p).await.unwrap();
    }
}

#[tokio::test]
async fn oom_kill_is_reported_as_oomkilled() {
    require!(env_ok(), NEEDS);
    let e = CriEnv::new(NS, "").await;
    let pcfg = e.pod("oom");
    let pod = e.run_pod(&pcfg).await.unwrap();
    // dd allocates a 64 MiB buffer in a 16 MiB cgroup.
    let mut cfg = e.ctr(
        "hog",
        &[
            "/bin/busybox",
            "dd",
            "if=/dev/zero",
            "of=/dev/null",
            "bs=64M",
            "count=1",
        ],
    );
    cfg.linux = Some(cri::LinuxContainerConfig {
        resources: Some(cri::LinuxContainerResources {
            memory_limit_in_bytes: 16 << 20,
            memory_swap_limit_in_bytes: 16 << 20,
            ..Default::default()
        }),
        security_context: None,
    });
    let id = e.run(&pod, &cfg, &pcfg).await;
    let st = wait_exited(&e.c, &id, Duration::from_secs(20)).await;
    assert_eq!(
        (st.exit_code, st.reason.as_str()),
        (137, "OOMKilled"),
        "{st:?}"
    );
    e.stop_pod(&pod).await.unwrap();
    e.remove_pod(&pod).await.unwrap();
}

/// Processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            alive(*pid) && String::from_utf8_lossy(&cmd).contains(needle)
        })
        .collect()
}

#[tokio::test]
async fn failed_create_sandbox_cleans_up_agent_socket_and_cgroups() {
    require!(env_ok(), NEEDS);
    let e = CriEnv::new(NS, "").await;
    // A cgroup parent the agent cannot create (a file in the v1 memory hierarchy;
    // a directory it may create in the others, which must go again).
    let mut pcfg = e.pod("badcg");
    let bad = if cgroup_v2() {
        "cgroup.procs"
    } else {
        "memory.limit_in_bytes"
    };
    pcfg.linux = Some(cri::LinuxPodSandboxConfig {
        cgroup_parent: bad.into(),
        ..Default::default()
    });
    let r = e.run_pod(&pcfg).await.unwrap_err();
    assert!(r.message().contains("create sandbox"), "{r:?}");
    assert!(e.pods().await.is_empty());
    let run = e.d.run_dir().join("pods");
    assert_eq!(
        std::fs::read_dir(&run).map(|d| d.count()).unwrap_or(0),
        0,
        "run dir (socket) left"
    );
    assert_eq!(
        std::fs::read_dir(e.d.state_dir().join("pods"))
            .map(|d| d.count())
            .unwrap_or(0),
        0,
        "record left"
    );
    let run = run.display().to_string();
    eventually("the agent to be gone", Duration::from_secs(5), || {
        let run = run.clone();
        async move { processes_mentioning(&run).is_empty() }
    })
    .await;
    // The parent came from the CRI (the kubelet's): huskd removes what the agent made below it.
    let below: Vec<_> = [
        "/sys/fs/cgroup/cpu",
        "/sys/fs/cgroup/pids",
        "/sys/fs/cgroup/unified",
        "/sys/fs/cgroup",
    ]
    .iter()
    .flat_map(|r| {
        std::fs::read_dir(Path::new(r).join(bad))
            .into_iter()
            .flatten()
            .flatten()
    })
    .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
    .map(|e| e.path())
    .collect();
    husk_tests::runtime::remove_cgroup_tree(bad);
    assert!(
        below.is_empty(),
        "cgroups of the failed pod left behind: {below:?}"
    );
    // huskd still works and the name is free.
    pcfg.linux = None;
    let pod = e.run_pod(&pcfg).await.unwrap();
    e.remove_pod(&pod).await.unwrap();
}

#![allow(clippy::unwrap_used)]
//! CRI RuntimeService end to end with the namespace sandbox (`husk-ns`): a
//! real registry, a real huskd (which starts real husk-agent processes), the
//! CRI client on its unix socket, busybox from the local registry (the
//! shared `CriEnv`). Faults, bad input and recovery are in runtime_ns_faults.rs.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use husk_proto::cri;
use husk_tests::cri_env::CriEnv;
use husk_tests::require;
use husk_tests::runtime::{
    NS, NS_NEEDS as NEEDS, alive, cgroup_exists, cgroup_file, cgroup_v2, code_of, container_status,
    eventually, info, log_records, ns_env_ok as env_ok, pod_status, wait_exited,
};
use tonic::Code;

#[tokio::test]
async fn pod_and_container_lifecycle_logs_and_filters() {
    require!(env_ok(), NEEDS);
    let e = CriEnv::new(NS, "").await;
    let pcfg = e.pod("life");
    let pod = e
        .run_pod(&pcfg)
        .await
        .unwrap_or_else(|s| panic!("{s:?}\n{}", e.d.log()));
    let ps = pod_status(&e.c, &pod).await.unwrap();
    let st = ps.status.clone().unwrap();
    assert_eq!(st.state, cri::PodSandboxState::SandboxReady as i32);
    assert_eq!(st.runtime_handler, NS);
    assert_eq!(st.labels["app"], "life");
    let i = info(&ps.info);
    assert!(i["isolation"].as_str().unwrap().contains("not a VM"), "{i}");
    let agent = i["agentPid"].as_i64().unwrap() as i32;
    assert!(alive(agent));

    // A bind mount (read-only) and a command writing both streams, a partial last line, exit 3.
    let data = tempfile::tempdir().unwrap();
    std::fs::write(data.path().join("hello"), "from the host\n").unwrap();
    let mut cfg = e.ctr("one", &["sh", "-c", "cat /data/hello; echo err >&2; hostname; touch /data/x 2>/dev/null || echo ro; printf partial; exit 3"]);
    cfg.mounts = vec![cri::Mount {
        container_path: "/data".into(),
        host_path: data.path().display().to_string(),
        readonly: true,
        ..Default::default()
    }];
    let c1 = e.create(&pod, &cfg, &pcfg).await.unwrap();
    let created = e.ctr_status(&c1).await;
    assert_eq!(created.state, cri::ContainerState::ContainerCreated as i32);
    assert!(created.created_at > 0 && created.started_at == 0);
    e.start(&c1).await.unwrap();
    assert_eq!(
        code_of(e.start(&c1).await),
        Code::FailedPrecondition,
        "start twice"
    );
    let st = wait_exited(&e.c, &c1, Duration::from_secs(20)).await;
    assert_eq!(st.exit_code, 3);
    assert_eq!(st.reason, "Error");
    assert!(
        st.started_at >= st.created_at && st.finished_at >= st.started_at,
        "{st:?}"
    );
    assert_eq!(st.image.as_ref().unwrap().image, e.image);
    assert!(st.image_ref.contains("sha256:"), "{}", st.image_ref);
    assert_eq!(st.labels["ctr"], "one");
    assert_eq!(st.annotations["a"], "b");
    assert_eq!(st.mounts.len(), 1);
    assert_eq!(PathBuf::from(&st.log_path), e.log_path(&pcfg, "one"));
    let recs = log_records(&e.log_path(&pcfg, "one"));
    let out: Vec<_> = recs
        .iter()
        .filter(|r| r.0 == "stdout")
        .map(|r| (r.1, r.2.as_str()))
        .collect();
    let err: Vec<_> = recs
        .iter()
        .filter(|r| r.0 == "stderr")
        .map(|r| (r.1, r.2.as_str()))
        .collect();
    assert_eq!(
        out,
        vec![
            (false, "from the host"),
            (false, "life"),
            (false, "ro"),
            (false, "partial")
        ],
        "{recs:?}"
    );
    assert_eq!(err, vec![(false, "err")]);

    // A long line is split into P records followed by an F record.
    let long = e
        .run(
            &pod,
            &e.ctr(
                "long",
                &[
                    "sh",
                    "-c",
                    "i=0; while [ $i -lt 2000 ]; do printf 0123456789; i=$((i+1)); done; echo",
                ],
            ),
            &pcfg,
        )
        .await;
    wait_exited(&e.c, &long, Duration::from_secs(20)).await;
    let recs = log_records(&e.log_path(&pcfg, "long"));
    assert!(
        recs.len() >= 2 && recs[..recs.len() - 1].iter().all(|r| r.1),
        "{:?}",
        recs.iter().map(|r| (r.1, r.2.len())).collect::<Vec<_>>()
    );
    assert!(!recs.last().unwrap().1);
    assert_eq!(recs.iter().map(|r| r.2.len()).sum::<usize>(), 20_000);

    // A container that ignores SIGTERM: stop = timeout, then SIGKILL.
    let sleeper = e
        .run(
            &pod,
            &e.ctr(
                "sleeper",
                &[
                    "sh",
                    "-c",
                    "trap '' TERM; echo > /trapped; while true; do sleep 1; done",
                ],
            ),
            &pcfg,
        )
        .await;
    // SIGTERM must find the trap set (a loaded host may run StopContainer
    // before the shell has read its first command).
    let t = Instant::now();
    while e
        .exec(&sleeper, &["sh", "-c", "test -e /trapped"], 10)
        .await
        .map_or(true, |r| r.exit_code != 0)
    {
        assert!(t.elapsed() < Duration::from_secs(30), "trap never set");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let running = e
        .list_containers(cri::ContainerFilter {
            state: Some(cri::ContainerStateValue {
                state: cri::ContainerState::ContainerRunning as i32,
            }),
            ..Default::default()
        })
        .await;
    assert_eq!(
        running.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
        vec![sleeper.as_str()]
    );
    let t = Instant::now();
    e.stop_container(&sleeper, 1).await.unwrap();
    assert!(
        t.elapsed() >= Duration::from_secs(1),
        "SIGKILL came before the timeout"
    );
    let st = e.ctr_status(&sleeper).await;
    assert_eq!(st.state, cri::ContainerState::ContainerExited as i32);
    assert_eq!(st.exit_code, 137);
    e.stop_container(&sleeper, 1).await.unwrap(); // idempotent

    // Filters: id prefix, pod, labels, state.
    let all = e.list_containers(Default::default()).await;
    assert_eq!(all.len(), 3);
    let by_id = e
        .list_containers(cri::ContainerFilter {
            id: c1[..12].into(),
            ..Default::default()
        })
        .await;
    assert_eq!(by_id.len(), 1);
    let by_label = e
        .list_containers(cri::ContainerFilter {
            label_selector: [("ctr".into(), "long".into())].into(),
            ..Default::default()
        })
        .await;
    assert_eq!(by_label.len(), 1);
    assert_eq!(by_label[0].id, long);
    let by_pod = e
        .list_containers(cri::ContainerFilter {
            pod_sandbox_id: "nope".into(),
            ..Default::default()
        })
        .await;
    assert!(by_pod.is_empty());
    let pods = e
        .list_pods(Some(cri::PodSandboxFilter {
            label_selector: [("app".into(), "life".into())].into(),
            ..Default::default()
        }))
        .await;
    assert_eq!(pods.len(), 1);
    let pods = e
        .list_pods(Some(cri::PodSandboxFilter {
            state: Some(cri::PodSandboxStateValue {
                state: cri::PodSandboxState::SandboxNotready as i32,
            }),
            ..Default::default()
        }))
        .await;
    assert!(pods.is_empty());

    // Remove one container; stop and remove the pod: agent, cgroups and run dir go away.
    e.remove_container(&c1).await.unwrap();
    assert_eq!(code_of(container_status(&e.c, &c1).await), Code::NotFound);
    let cg = info(&pod_status(&e.c, &pod).await.unwrap().info)["cgroupParent"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(cgroup_exists(&cg));
    e.stop_pod(&pod).await.unwrap();
    let ps = pod_status(&e.c, &pod).await.unwrap();
    assert_eq!(
        ps.status.unwrap().state,
        cri::PodSandboxState::SandboxNotready as i32
    );
    assert!(!alive(agent), "agent still running after StopPodSandbox");
    assert!(!cgroup_exists(&cg), "pod cgroup {cg} left behind");
    e.stop_pod(&pod).await.unwrap(); // idempotent
    e.remove_pod(&pod).await.unwrap();
    assert_eq!(code_of(pod_status(&e.c, &pod).await), Code::NotFound);
    assert!(e.list_containers(Default::default()).await.is_empty());
    assert!(!e.d.run_dir().join("pods").join(&pod).exists());
    assert!(!e.d.state_dir().join("pods").join(&pod).exists());
    e.remove_pod(&pod).await.unwrap(); // idempotent
    // Logs stay for the kubelet to collect.
    assert!(e.log_path(&pcfg, "one").exists());
}

#[tokio::test]
async fn exec_sync_stats_resources_and_log_reopen() {
    require!(env_ok(), NEEDS);
    let e = CriEnv::new(NS, "").await;
    let mut pcfg = e.pod("work");
    let cg_parent = format!("husk-e2e/{}", std::process::id());
    pcfg.linux = Some(cri::LinuxPodSandboxConfig {
        cgroup_parent: cg_parent.clone(),
        ..Default::default()
    });
    let pod = e.run_pod(&pcfg).await.unwrap();
    let mut cfg = e.ctr(
        "ticker",
        &["sh", "-c", "while true; do echo tick; sleep 0.1; done"],
    );
    cfg.linux = Some(cri::LinuxContainerConfig {
        resources: Some(cri::LinuxContainerResources {
            memory_limit_in_bytes: 64 << 20,
            ..Default::default()
        }),
        security_context: None,
    });
    let id = e.run(&pod, &cfg, &pcfg).await;
    let cg = format!("{cg_parent}/{id}");
    assert_eq!(
        cgroup_file(&cg, "memory", "memory.limit_in_bytes", "memory.max"),
        (64u64 << 20).to_string()
    );

    // ExecSync: output, stderr, exit code.
    let r = e
        .exec(&id, &["sh", "-c", "echo hi; echo bad >&2; exit 4"], 10)
        .await
        .unwrap();
    assert_eq!(
        (r.stdout.as_slice(), r.stderr.as_slice(), r.exit_code),
        (&b"hi\n"[..], &b"bad\n"[..], 4)
    );
    let r = e.exec(&id, &["hostname"], 0).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&r.stdout), "work\n");
    // Timeout: killed, DeadlineExceeded, promptly.
    let t = Instant::now();
    assert_eq!(
        code_of(e.exec(&id, &["sleep", "30"], 1).await),
        Code::DeadlineExceeded
    );
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    let ps = e.exec(&id, &["ps"], 5).await.unwrap();
    assert!(
        !String::from_utf8_lossy(&ps.stdout).contains("sleep 30"),
        "timed-out exec still running"
    );
    // A missing binary is an error, not a hang.
    assert!(
        e.exec(&id, &["/nope"], 5)
            .await
            .map(|r| r.exit_code != 0)
            .unwrap_or(true)
    );

    // Stats.
    let s = e.container_stats(&id).await.unwrap().stats.unwrap();
    assert_eq!(s.attributes.as_ref().unwrap().id, id);
    assert!(
        s.cpu
            .as_ref()
            .unwrap()
            .usage_core_nano_seconds
            .as_ref()
            .unwrap()
            .value
            > 0
    );
    assert!(
        s.memory
            .as_ref()
            .unwrap()
            .usage_bytes
            .as_ref()
            .unwrap()
            .value
            > 0
    );
    let l = e.list_container_stats(None).await.unwrap();
    assert_eq!(l.len(), 1);
    let l2 = e
        .list_container_stats(Some(cri::ContainerStatsFilter {
            id: "ffff".into(),
            ..Default::default()
        }))
        .await
        .unwrap();
    assert!(l2.is_empty());
    let p = e.pod_stats(&pod).await.unwrap().stats.unwrap();
    let lin = p.linux.unwrap();
    assert_eq!(lin.containers.len(), 1);
    assert!(lin.process.unwrap().process_count.unwrap().value >= 2);
    assert!(
        lin.network
            .unwrap()
            .interfaces
            .iter()
            .any(|i| i.name == "lo")
    );
    let lp = e.list_pod_stats(None).await.unwrap();
    assert_eq!(lp.len(), 1);

    // UpdateContainerResources shows in the host's (v1) cgroup files.
    let upd = cri::LinuxContainerResources {
        memory_limit_in_bytes: 128 << 20,
        cpu_quota: 50_000,
        cpu_period: 100_000,
        cpu_shares: 512,
        ..Default::default()
    };
    e.update_resources(&id, upd).await.unwrap();
    assert_eq!(
        cgroup_file(&cg, "memory", "memory.limit_in_bytes", "memory.max"),
        (128u64 << 20).to_string()
    );
    if cgroup_v2() {
        assert_eq!(cgroup_file(&cg, "cpu", "", "cpu.max"), "50000 100000");
    } else {
        assert_eq!(cgroup_file(&cg, "cpu", "cpu.cfs_quota_us", ""), "50000");
        assert_eq!(cgroup_file(&cg, "cpu", "cpu.shares", ""), "512");
    }
    let st = e.ctr_status(&id).await;
    assert_eq!(
        st.resources.unwrap().linux.unwrap().memory_limit_in_bytes,
        128 << 20
    );
    let bad = cri::LinuxContainerResources {
        memory_limit_in_bytes: -5,
        ..Default::default()
    };
    assert_eq!(
        code_of(e.update_resources(&id, bad).await),
        Code::InvalidArgument
    );

    // Rotation: rename, ReopenContainerLog, the new file fills.
    let log = e.log_path(&pcfg, "ticker");
    eventually("ticks", Duration::from_secs(10), || async {
        !log_records(&log).is_empty()
    })
    .await;
    std::fs::rename(&log, log.with_extension("log.1")).unwrap();
    e.reopen_log(&id).await.unwrap();
    eventually(
        "ticks in the reopened log",
        Duration::from_secs(10),
        || async { log_records(&log).iter().any(|r| r.2 == "tick") },
    )
    .await;
    assert!(
        log_records(&log.with_extension("log.1"))
            .iter()
            .all(|r| r.2 == "tick" && !r.1)
    );

    e.stop_container(&id, 0).await.unwrap();
    assert_eq!(code_of(e.reopen_log(&id).await), Code::FailedPrecondition);
    assert_eq!(
        code_of(e.exec(&id, &["true"], 1).await),
        Code::FailedPrecondition
    );
    e.stop_pod(&pod).await.unwrap();
    e.remove_pod(&pod).await.unwrap();
    assert!(!cgroup_exists(&format!("{cg_parent}/{id}")));
    husk_tests::runtime::remove_cgroup_tree(&cg_parent);
    let _ = husk_tests::runtime::remove_cgroup_tree("husk-e2e");
}

#[tokio::test]
async fn twenty_pods_in_parallel() {
    require!(env_ok(), NEEDS);
    let e = CriEnv::new(NS, "").await;
    let t = Instant::now();
    let mut tasks = vec![];
    for i in 0..20 {
        let c = e.c.clone();
        let pcfg = e.pod(&format!("par-{i}"));
        let ccfg = e.ctr("main", &["sh", "-c", "hostname; sleep 1000"]);
        tasks.push(tokio::spawn(async move {
            let mut rt = c.runtime.clone();
            let pod = rt
                .run_pod_sandbox(cri::RunPodSandboxRequest {
                    config: Some(pcfg.clone()),
                    runtime_handler: NS.into(),
                })
                .await
                .unwrap()
                .into_inner()
                .pod_sandbox_id;
            let id = rt
                .create_container(cri::CreateContainerRequest {
                    pod_sandbox_id: pod.clone(),
                    config: Some(ccfg),
                    sandbox_config: Some(pcfg.clone()),
                })
                .await
                .unwrap()
                .into_inner()
                .container_id;
            rt.start_container(cri::StartContainerRequest {
                container_id: id.clone(),
            })
            .await
            .unwrap();
            (pod, id, pcfg)
        }));
    }
    let mut started = vec![];
    for t in tasks {
        started.push(t.await.unwrap());
    }
    eprintln!("20 pods with a running container in {:?}", t.elapsed());
    assert_eq!(e.pods().await.len(), 20);
    let running = e
        .list_containers(cri::ContainerFilter {
            state: Some(cri::ContainerStateValue {
                state: cri::ContainerState::ContainerRunning as i32,
            }),
            ..Default::default()
        })
        .await;
    assert_eq!(running.len(), 20);
    for (i, (_, _, pcfg)) in started.iter().enumerate() {
        let log = e.log_path(pcfg, "main");
        eventually("hostname in the log", Duration::from_secs(10), || async {
            !log_records(&log).is_empty()
        })
        .await;
        assert_eq!(
            log_records(&log)[0].2,
            format!("par-{i}"),
            "each pod has its own UTS namespace"
        );
    }
    let mut tasks = vec![];
    for (pod, _, _) in started {
        let mut rt = e.c.runtime.clone();
        tasks.push(tokio::spawn(async move {
            rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: pod.clone(),
            })
            .await
            .unwrap();
            rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
                pod_sandbox_id: pod,
            })
            .await
            .unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(e.pods().await.is_empty());
}

#[tokio::test]
async fn cli_run_ps_logs_exec_stop_rm() {
    require!(env_ok(), NEEDS);
    let e = CriEnv::new(NS, "").await;
    let husk = husk_tests::bin_path("husk");
    let logs = e.d.dir.path().join("cli-logs");
    let cli = |args: &[&str]| {
        std::process::Command::new(&husk)
            .arg("--socket")
            .arg(&e.d.socket)
            .args(args)
            .output()
            .unwrap()
    };
    let log_root = logs.display().to_string();
    let out = cli(&[
        "run",
        "--rm",
        "--runtime",
        NS,
        "--log-root",
        &log_root,
        &e.image,
        "--",
        "sh",
        "-c",
        "echo hello; echo oops >&2; exit 3",
    ]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("oops"));
    assert!(e.pods().await.is_empty(), "--rm left the pod");

    // The default runtime (VM) is not there yet: a clear error with the way out.
    let out = cli(&[
        "run",
        "--rm",
        "--log-root",
        &log_root,
        &e.image,
        "--",
        "true",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--runtime husk-ns"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A kept pod: ps, pods, exec, logs, stop, rm.
    let out = cli(&[
        "run",
        "--runtime",
        NS,
        "--name",
        "kept",
        "--log-root",
        &log_root,
        &e.image,
        "--",
        "sh",
        "-c",
        "echo started; exit 0",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pods = e.pods().await;
    assert_eq!(pods.len(), 1);
    let pod = pods[0].id.clone();
    let pcfg = e.pod("svc");
    let mut pcfg2 = pcfg.clone();
    pcfg2.metadata.as_mut().unwrap().name = "svc".into();
    let svc_pod = e.run_pod(&pcfg2).await.unwrap();
    let svc = e
        .run(
            &svc_pod,
            &e.ctr("svc", &["sh", "-c", "echo up; sleep 1000"]),
            &pcfg2,
        )
        .await;
    let ps = String::from_utf8_lossy(&cli(&["ps"]).stdout).into_owned();
    assert!(ps.contains(&svc[..13]) && ps.contains("RUNNING"), "{ps}");
    assert!(!ps.contains("kept"), "exited containers only with -a: {ps}");
    assert!(String::from_utf8_lossy(&cli(&["ps", "-a"]).stdout).contains("kept"));
    let pods_out = String::from_utf8_lossy(&cli(&["pods"]).stdout).into_owned();
    assert!(
        pods_out.contains("kept") && pods_out.contains("svc") && pods_out.contains(NS),
        "{pods_out}"
    );
    let out = cli(&["exec", &svc[..12], "--", "sh", "-c", "echo in; exit 5"]);
    assert_eq!(
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned()
        ),
        (Some(5), "in\n".to_string())
    );
    eventually("svc log", Duration::from_secs(10), || async {
        !log_records(&e.log_path(&pcfg2, "svc")).is_empty()
    })
    .await;
    let out = cli(&["logs", &svc[..12]]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "up\n");
    let out = cli(&["stop", "-t", "0", &svc[..12]]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(&["logs", "-f", &svc[..12]]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "up\n");
    assert!(cli(&["rm", &pod[..12], &svc_pod[..12]]).status.success());
    assert!(e.pods().await.is_empty());
    let _ = std::fs::remove_dir_all(&logs);
}

#[tokio::test]
async fn cli_bench_cri_measures_and_removes_its_pods() {
    require!(env_ok(), NEEDS);
    let e = CriEnv::new(NS, "").await;
    let bench = |extra: &[&str]| {
        std::process::Command::new(husk_tests::bin_path("husk"))
            .arg("--socket")
            .arg(&e.d.socket)
            .args(["bench", "cri", "--runtime", NS, "--image", &e.image])
            .args(["--runs", "2", "--parallel", "3", "--idle", "2", "--json"])
            .args(extra)
            .output()
            .unwrap()
    };
    let out = bench(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ms = |k: &str, p: &str| r[k][p].as_f64().unwrap();
    assert!(ms("readyMs", "p50") > 0.0, "{r}");
    assert!(ms("runningMs", "p50") > ms("readyMs", "p50"), "{r}");
    assert!(
        ms("parallelRunningMs", "p99") <= r["parallelWallMs"].as_f64().unwrap(),
        "{r}"
    );
    assert_eq!(r["parallel"], 3);
    // No VM: no guest RAM; the agent's own memory is the overhead.
    assert!(r["guestRamMib"].is_null(), "{r}");
    assert!(r["isolation"].as_str().unwrap().contains("not a VM"), "{r}");
    assert!(r["overheadRssMib"].as_f64().unwrap() > 0.1, "{r}");
    assert!(e.pods().await.is_empty(), "bench pods left behind");

    // A step that fails after pods exist: the error names it, and no pod is left.
    let out = bench(&["--", "/no/such/command"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("StartContainer"), "{err}");
    assert!(e.pods().await.is_empty(), "failed bench left pods");
}

#[tokio::test]
async fn restrict_oom_score_adj_clamps_to_huskd_own() {
    require!(env_ok(), NEEDS);
    let e = CriEnv::new(NS, "[runtime]\nrestrict_oom_score_adj = true\n").await;
    let own: i32 = std::fs::read_to_string(format!("/proc/{}/oom_score_adj", e.d.pid().unwrap()))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let pcfg = e.pod("oomadj");
    let pod = e.run_pod(&pcfg).await.unwrap();
    let mut cfg = e.ctr("adj", &["cat", "/proc/self/oom_score_adj"]);
    cfg.linux = Some(cri::LinuxContainerConfig {
        resources: Some(cri::LinuxContainerResources {
            oom_score_adj: -997, // what the kubelet gives Guaranteed pods
            ..Default::default()
        }),
        security_context: None,
    });
    let id = e.run(&pod, &cfg, &pcfg).await;
    assert_eq!(
        wait_exited(&e.c, &id, Duration::from_secs(20))
            .await
            .exit_code,
        0
    );
    assert_eq!(
        log_records(&e.log_path(&pcfg, "adj"))[0].2,
        own.max(-997).to_string()
    );
    e.remove_pod(&pod).await.unwrap();
}

/// A tmpfs mounted below a volume directory for the length of a test.
struct SubMount(PathBuf);

impl Drop for SubMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// Plants a set-uid-root busybox that also carries a file capability (`cap_net_raw+ep`)
/// and a `/dev/null` node (c 1 3) in `dir`.
fn plant_suid_and_dev(dir: &std::path::Path) {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::PermissionsExt;
    let bb = dir.join("busybox");
    std::fs::copy("/bin/busybox", &bb).unwrap();
    std::fs::set_permissions(&bb, std::fs::Permissions::from_mode(0o4755)).unwrap();
    // vfs_cap_data revision 2, effective, permitted = CAP_NET_RAW (bit 13).
    let mut cap = Vec::new();
    for w in [0x0200_0001u32, 1 << 13, 0, 0, 0] {
        cap.extend_from_slice(&w.to_le_bytes());
    }
    let path = std::ffi::CString::new(bb.as_os_str().as_bytes()).unwrap();
    // SAFETY: NUL-terminated strings and a buffer with its length.
    let r = unsafe {
        libc::setxattr(
            path.as_ptr(),
            c"security.capability".as_ptr(),
            cap.as_ptr().cast(),
            cap.len(),
            0,
        )
    };
    assert_eq!(r, 0, "setxattr: {}", std::io::Error::last_os_error());
    let null = std::ffi::CString::new(dir.join("null").as_os_str().as_bytes()).unwrap();
    // SAFETY: a NUL-terminated path.
    let r = unsafe { libc::mknod(null.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3)) };
    assert_eq!(r, 0, "mknod: {}", std::io::Error::last_os_error());
}

/// Whether the mount holding `p` honours set-id bits and device nodes.
fn mount_allows_suid_and_dev(p: &std::path::Path) -> bool {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: statvfs is plain old data; all-zero is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a statvfs the kernel fills.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    assert_eq!(rc, 0);
    st.f_flag & (libc::ST_NOSUID | libc::ST_NODEV) == 0
}

/// Host volumes are `nosuid,nodev` for an unprivileged container, on every mount of the
/// volume's tree (a set-id binary with a file capability, and a device node, planted by
/// the host in the volume and in a tmpfs below it, do not work from the container); a
/// privileged container keeps the host's view, as with containerd.
#[tokio::test]
async fn volumes_are_nosuid_nodev_for_unprivileged_containers() {
    require!(env_ok(), NEEDS);
    let data = tempfile::tempdir().unwrap();
    if !mount_allows_suid_and_dev(data.path()) {
        eprintln!(
            "SKIP: {} is on a nosuid/nodev mount already: the test could not fail",
            data.path().display()
        );
        return;
    }
    plant_suid_and_dev(data.path());
    let sub = data.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m,mode=755", "husk-vol-test"])
        .arg(&sub)
        .status()
        .unwrap();
    assert!(st.success(), "mount tmpfs");
    let _sub = SubMount(sub.clone());
    plant_suid_and_dev(&sub);

    let e = CriEnv::new(NS, "").await;
    let mut pcfg = e.pod("nosuid");
    // A privileged pod (kubelet's and containerd's rule for the privileged container
    // below); the plain container in it is unprivileged.
    pcfg.linux
        .get_or_insert_with(Default::default)
        .security_context = Some(cri::LinuxSandboxSecurityContext {
        privileged: true,
        ..Default::default()
    });
    let pod = e.run_pod(&pcfg).await.unwrap();
    let volume = cri::Mount {
        container_path: "/vol".into(),
        host_path: data.path().display().to_string(),
        ..Default::default()
    };
    let mut cfg = e.ctr("plain", &["sleep", "1000"]);
    cfg.mounts = vec![volume.clone()];
    cfg.linux = Some(cri::LinuxContainerConfig {
        security_context: Some(cri::LinuxContainerSecurityContext {
            run_as_user: Some(cri::Int64Value { value: 65534 }),
            ..Default::default()
        }),
        ..Default::default()
    });
    let plain = e.run(&pod, &cfg, &pcfg).await;
    for dir in ["/vol", "/vol/sub"] {
        let status = e
            .sh(&plain, &format!("{dir}/busybox cat /proc/self/status"))
            .await;
        let line = |k: &str| {
            status
                .lines()
                .find(|l| l.starts_with(k))
                .unwrap_or_else(|| panic!("{k} in {status}"))
                .split_whitespace()
                .skip(1)
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert_eq!(
            line("Uid:"),
            "65534 65534 65534 65534",
            "{dir}: set-uid honoured"
        );
        assert_eq!(
            line("CapPrm:"),
            "0000000000000000",
            "{dir}: file capability honoured"
        );
        let r = e
            .exec(&plain, &["sh", "-c", &format!("cat {dir}/null")], 30)
            .await
            .unwrap();
        assert_ne!(r.exit_code, 0, "{dir}/null opened");
        assert!(
            String::from_utf8_lossy(&r.stderr).contains("Permission denied"),
            "{:?}",
            String::from_utf8_lossy(&r.stderr)
        );
        let opts = e
            .sh(&plain, &format!("grep ' {dir} ' /proc/self/mountinfo"))
            .await;
        assert!(
            opts.contains("nosuid") && opts.contains("nodev"),
            "{dir}: {opts}"
        );
    }

    // The same volume in a privileged container: the node works (the kernel honours it).
    let mut cfg = e.ctr("priv", &["sleep", "1000"]);
    cfg.mounts = vec![volume];
    cfg.linux = Some(cri::LinuxContainerConfig {
        security_context: Some(cri::LinuxContainerSecurityContext {
            privileged: true,
            ..Default::default()
        }),
        ..Default::default()
    });
    let privileged = e.run(&pod, &cfg, &pcfg).await;
    e.sh(&privileged, "cat /vol/null && cat /vol/sub/null")
        .await;
    e.remove_pod(&pod).await.unwrap();
}

#![allow(clippy::unwrap_used)]
//! CRI RuntimeService end to end with the namespace sandbox (`husk-ns`): a
//! real registry, a real huskd (which starts real husk-agent processes), the
//! CRI client on its unix socket, busybox from the local registry.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use husk_host::client::Clients;
use husk_proto::cri;
use husk_tests::huskd::{Huskd, Options};
use husk_tests::oci::{Compression, ImageSpec, Pusher, build_image, busybox_layer};
use husk_tests::registry::{self, Registry};
use husk_tests::require;
use husk_tests::runtime::{
    alive, cgroup_exists, children, container_config, container_status, eventually, info,
    kill_leftover_pods, log_records, pod_config, pod_status, wait_exited,
};
use tonic::Code;

const NS: &str = "husk-ns";
const NEEDS: &str = "needs root, /usr/bin/docker-registry, /bin/busybox and unshare(1) (tests/run.sh installs them)";

fn env_ok() -> bool {
    registry::available()
        && husk_tests::is_root()
        && Path::new("/bin/busybox").exists()
        && std::process::Command::new("unshare")
            .arg("--version")
            .output()
            .is_ok()
}

/// A registry with busybox, a huskd that pulled it, and a CRI client.
struct Env {
    _reg: Registry,
    d: Huskd,
    c: Clients,
    image: String,
    logs: PathBuf,
}

impl Env {
    async fn new() -> Env {
        Self::with_config("").await
    }

    async fn with_config(extra: &str) -> Env {
        let reg = Registry::start(None).unwrap();
        let img = build_image(&ImageSpec {
            layers: vec![busybox_layer(Compression::Gzip).unwrap()],
            ..Default::default()
        });
        Pusher::new(&reg.addr, None)
            .push_image("e2e/busybox", Some("1"), &img)
            .await
            .unwrap();
        let d = Huskd::start_with(Options::plain_http(&reg.addr), extra)
            .await
            .unwrap();
        let c = d.clients().await.unwrap();
        let image = format!("{}/e2e/busybox:1", reg.addr);
        c.image
            .clone()
            .pull_image(cri::PullImageRequest {
                image: Some(cri::ImageSpec {
                    image: image.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap();
        let logs = d.dir.path().join("logs");
        Env {
            _reg: reg,
            d,
            c,
            image,
            logs,
        }
    }

    fn pod(&self, name: &str) -> cri::PodSandboxConfig {
        pod_config(name, &self.logs)
    }

    fn ctr(&self, name: &str, cmd: &[&str]) -> cri::ContainerConfig {
        container_config(name, &self.image, cmd)
    }

    async fn run_pod(&self, cfg: &cri::PodSandboxConfig) -> Result<String, tonic::Status> {
        self.c
            .runtime
            .clone()
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(cfg.clone()),
                runtime_handler: NS.into(),
            })
            .await
            .map(|r| r.into_inner().pod_sandbox_id)
    }

    async fn create(
        &self,
        pod: &str,
        cfg: &cri::ContainerConfig,
        pod_cfg: &cri::PodSandboxConfig,
    ) -> Result<String, tonic::Status> {
        self.c
            .runtime
            .clone()
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod.into(),
                config: Some(cfg.clone()),
                sandbox_config: Some(pod_cfg.clone()),
            })
            .await
            .map(|r| r.into_inner().container_id)
    }

    async fn start(&self, id: &str) -> Result<(), tonic::Status> {
        self.c
            .runtime
            .clone()
            .start_container(cri::StartContainerRequest {
                container_id: id.into(),
            })
            .await
            .map(|_| ())
    }

    /// Create + start; panics with huskd's log on failure.
    async fn run(
        &self,
        pod: &str,
        cfg: &cri::ContainerConfig,
        pod_cfg: &cri::PodSandboxConfig,
    ) -> String {
        let id = self
            .create(pod, cfg, pod_cfg)
            .await
            .unwrap_or_else(|e| panic!("create: {e:?}\n{}", self.d.log()));
        self.start(&id)
            .await
            .unwrap_or_else(|e| panic!("start: {e:?}\n{}", self.d.log()));
        id
    }

    async fn exec(
        &self,
        id: &str,
        cmd: &[&str],
        timeout: i64,
    ) -> Result<cri::ExecSyncResponse, tonic::Status> {
        self.c
            .runtime
            .clone()
            .exec_sync(cri::ExecSyncRequest {
                container_id: id.into(),
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                timeout,
            })
            .await
            .map(|r| r.into_inner())
    }

    async fn stop_container(&self, id: &str, timeout: i64) -> Result<(), tonic::Status> {
        self.c
            .runtime
            .clone()
            .stop_container(cri::StopContainerRequest {
                container_id: id.into(),
                timeout,
            })
            .await
            .map(|_| ())
    }

    async fn stop_pod(&self, id: &str) -> Result<(), tonic::Status> {
        self.c
            .runtime
            .clone()
            .stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: id.into(),
            })
            .await
            .map(|_| ())
    }

    async fn remove_pod(&self, id: &str) -> Result<(), tonic::Status> {
        self.c
            .runtime
            .clone()
            .remove_pod_sandbox(cri::RemovePodSandboxRequest {
                pod_sandbox_id: id.into(),
            })
            .await
            .map(|_| ())
    }

    async fn list_containers(&self, f: cri::ContainerFilter) -> Vec<cri::Container> {
        self.c
            .runtime
            .clone()
            .list_containers(cri::ListContainersRequest { filter: Some(f) })
            .await
            .unwrap()
            .into_inner()
            .containers
    }

    async fn list_pods(&self, f: Option<cri::PodSandboxFilter>) -> Vec<cri::PodSandbox> {
        self.c
            .runtime
            .clone()
            .list_pod_sandbox(cri::ListPodSandboxRequest { filter: f })
            .await
            .unwrap()
            .into_inner()
            .items
    }

    fn log_path(&self, pod_cfg: &cri::PodSandboxConfig, name: &str) -> PathBuf {
        Path::new(&pod_cfg.log_directory).join(format!("{name}.log"))
    }

    async fn agent_pid(&self, pod: &str) -> i32 {
        info(&pod_status(&self.c, pod).await.unwrap().info)["agentPid"]
            .as_i64()
            .unwrap() as i32
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.d.terminate();
        kill_leftover_pods(&self.d.state_dir());
    }
}

fn cgroup_v2() -> bool {
    Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
}

/// A cgroup file of `rel`: the v1 controller's `v1` file, or the unified `v2` one.
fn cgroup_file(rel: &str, controller: &str, v1: &str, v2: &str) -> String {
    let p = if cgroup_v2() {
        Path::new("/sys/fs/cgroup").join(rel).join(v2)
    } else {
        let root = Path::new("/sys/fs/cgroup");
        let dir = [
            controller.to_string(),
            format!("{controller},cpuacct"),
            format!("cpu,{controller}"),
        ]
        .iter()
        .map(|c| root.join(c))
        .find(|d| d.is_dir())
        .unwrap_or_else(|| root.join(controller));
        dir.join(rel).join(v1)
    };
    std::fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .trim()
        .to_string()
}

fn code_of<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> Code {
    r.expect_err("expected an error").code()
}

#[tokio::test]
async fn pod_and_container_lifecycle_logs_and_filters() {
    require!(env_ok(), NEEDS);
    let e = Env::new().await;
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
    let created = container_status(&e.c, &c1).await.unwrap().status.unwrap();
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
                &["sh", "-c", "trap '' TERM; while true; do sleep 1; done"],
            ),
            &pcfg,
        )
        .await;
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
    let st = container_status(&e.c, &sleeper)
        .await
        .unwrap()
        .status
        .unwrap();
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
    e.c.runtime
        .clone()
        .remove_container(cri::RemoveContainerRequest {
            container_id: c1.clone(),
        })
        .await
        .unwrap();
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
    let e = Env::new().await;
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
    let s =
        e.c.runtime
            .clone()
            .container_stats(cri::ContainerStatsRequest {
                container_id: id.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .stats
            .unwrap();
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
    let l =
        e.c.runtime
            .clone()
            .list_container_stats(cri::ListContainerStatsRequest { filter: None })
            .await
            .unwrap()
            .into_inner()
            .stats;
    assert_eq!(l.len(), 1);
    let l2 =
        e.c.runtime
            .clone()
            .list_container_stats(cri::ListContainerStatsRequest {
                filter: Some(cri::ContainerStatsFilter {
                    id: "ffff".into(),
                    ..Default::default()
                }),
            })
            .await
            .unwrap()
            .into_inner()
            .stats;
    assert!(l2.is_empty());
    let p =
        e.c.runtime
            .clone()
            .pod_sandbox_stats(cri::PodSandboxStatsRequest {
                pod_sandbox_id: pod.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .stats
            .unwrap();
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
    let lp =
        e.c.runtime
            .clone()
            .list_pod_sandbox_stats(cri::ListPodSandboxStatsRequest { filter: None })
            .await
            .unwrap()
            .into_inner()
            .stats;
    assert_eq!(lp.len(), 1);

    // UpdateContainerResources shows in the host's (v1) cgroup files.
    let upd = cri::LinuxContainerResources {
        memory_limit_in_bytes: 128 << 20,
        cpu_quota: 50_000,
        cpu_period: 100_000,
        cpu_shares: 512,
        ..Default::default()
    };
    e.c.runtime
        .clone()
        .update_container_resources(cri::UpdateContainerResourcesRequest {
            container_id: id.clone(),
            linux: Some(upd),
            ..Default::default()
        })
        .await
        .unwrap();
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
    let st = container_status(&e.c, &id).await.unwrap().status.unwrap();
    assert_eq!(
        st.resources.unwrap().linux.unwrap().memory_limit_in_bytes,
        128 << 20
    );
    let bad = cri::LinuxContainerResources {
        memory_limit_in_bytes: -5,
        ..Default::default()
    };
    let r =
        e.c.runtime
            .clone()
            .update_container_resources(cri::UpdateContainerResourcesRequest {
                container_id: id.clone(),
                linux: Some(bad),
                ..Default::default()
            })
            .await;
    assert_eq!(code_of(r), Code::InvalidArgument);

    // Rotation: rename, ReopenContainerLog, the new file fills.
    let log = e.log_path(&pcfg, "ticker");
    eventually("ticks", Duration::from_secs(10), || async {
        !log_records(&log).is_empty()
    })
    .await;
    std::fs::rename(&log, log.with_extension("log.1")).unwrap();
    e.c.runtime
        .clone()
        .reopen_container_log(cri::ReopenContainerLogRequest {
            container_id: id.clone(),
        })
        .await
        .unwrap();
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
    assert_eq!(
        code_of(
            e.c.runtime
                .clone()
                .reopen_container_log(cri::ReopenContainerLogRequest {
                    container_id: id.clone()
                })
                .await
        ),
        Code::FailedPrecondition
    );
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
async fn huskd_kill9_and_restart_recovers_pods_containers_and_logs() {
    require!(env_ok(), NEEDS);
    let mut e = Env::new().await;
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
    let st = container_status(&e.c, &done).await.unwrap().status.unwrap();
    assert_eq!(
        (st.state, st.exit_code),
        (cri::ContainerState::ContainerExited as i32, 7)
    );
    let st = container_status(&e.c, &ticker)
        .await
        .unwrap()
        .status
        .unwrap();
    assert_eq!(st.state, cri::ContainerState::ContainerRunning as i32);
    assert_eq!(
        container_status(&e.c, &created)
            .await
            .unwrap()
            .status
            .unwrap()
            .state,
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
    assert_eq!(
        container_status(&e.c, &ticker)
            .await
            .unwrap()
            .status
            .unwrap()
            .exit_code,
        137
    );
    // Duplicate names are still known after the restart.
    assert_eq!(code_of(e.run_pod(&pcfg).await), Code::AlreadyExists);
    e.stop_pod(&pod).await.unwrap();
    e.remove_pod(&pod).await.unwrap();
    assert!(!alive(agent));
}

#[tokio::test]
async fn agent_crash_makes_pod_notready_and_containers_exited() {
    require!(env_ok(), NEEDS);
    let e = Env::new().await;
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
    assert_eq!(e.list_pods(None).await.len(), 1);
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
    assert!(e.list_pods(None).await.is_empty());
}

#[tokio::test]
async fn twenty_pods_in_parallel() {
    require!(env_ok(), NEEDS);
    let e = Env::new().await;
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
    assert_eq!(e.list_pods(None).await.len(), 20);
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
    assert!(e.list_pods(None).await.is_empty());
}

#[tokio::test]
async fn bad_input_and_failed_creates_clean_up() {
    require!(env_ok(), NEEDS);
    let e = Env::new().await;
    let rt = || e.c.runtime.clone();
    let nope = "0000000000000000000000000000000000000000000000000000000000000000";

    // Status: runtime ready (husk-ns), network not ready with a reason.
    let st = rt()
        .status(cri::StatusRequest { verbose: true })
        .await
        .unwrap()
        .into_inner();
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
    assert_eq!(
        code_of(
            rt().container_stats(cri::ContainerStatsRequest {
                container_id: nope.into()
            })
            .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code_of(
            rt().pod_sandbox_stats(cri::PodSandboxStatsRequest {
                pod_sandbox_id: nope.into()
            })
            .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code_of(
            rt().reopen_container_log(cri::ReopenContainerLogRequest {
                container_id: nope.into()
            })
            .await
        ),
        Code::NotFound
    );
    let upd = cri::UpdateContainerResourcesRequest {
        container_id: nope.into(),
        linux: Some(Default::default()),
        ..Default::default()
    };
    assert_eq!(
        code_of(rt().update_container_resources(upd).await),
        Code::NotFound
    );
    assert_eq!(
        code_of(e.create(nope, &e.ctr("x", &["true"]), &e.pod("x")).await),
        Code::NotFound
    );
    // Removing what is not there succeeds (the CRI makes removal idempotent).
    e.remove_pod(nope).await.unwrap();
    rt().remove_container(cri::RemoveContainerRequest {
        container_id: nope.into(),
    })
    .await
    .unwrap();
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
        code_of(
            rt().port_forward(cri::PortForwardRequest {
                pod_sandbox_id: nope.into(),
                port: vec![80],
            })
            .await
        ),
        Code::NotFound
    );

    // Pod config problems.
    let mut no_md = e.pod("nomd");
    no_md.metadata = None;
    assert_eq!(code_of(e.run_pod(&no_md).await), Code::InvalidArgument);
    let bad_handler = rt()
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(e.pod("h")),
            runtime_handler: "kata".into(),
        })
        .await;
    assert_eq!(code_of(bad_handler), Code::InvalidArgument);
    // The default handler is the VM sandbox on husk-vmm: this huskd has no
    // guest image configured (and this host no usable KVM), said clearly.
    let vm = rt()
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(e.pod("vm")),
            runtime_handler: String::new(),
        })
        .await
        .unwrap_err();
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
    assert!(
        e.list_pods(None).await.is_empty(),
        "failed RunPodSandbox left a pod"
    );
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
            let st = container_status(&e.c, &id).await.unwrap().status.unwrap();
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
    let e = Env::with_config(
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
    assert!(e.list_pods(None).await.is_empty());
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
async fn cli_run_ps_logs_exec_stop_rm() {
    require!(env_ok(), NEEDS);
    let e = Env::new().await;
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
    assert!(e.list_pods(None).await.is_empty(), "--rm left the pod");

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
    let pods = e.list_pods(None).await;
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
    assert!(e.list_pods(None).await.is_empty());
    let _ = std::fs::remove_dir_all(&logs);
}

#[tokio::test]
async fn cli_bench_cri_measures_and_removes_its_pods() {
    require!(env_ok(), NEEDS);
    let e = Env::new().await;
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
    assert!(ms("parallelRunningMs", "p99") <= r["parallelWallMs"].as_f64().unwrap(), "{r}");
    assert_eq!(r["parallel"], 3);
    // No VM: no guest RAM; the agent's own memory is the overhead.
    assert!(r["guestRamMib"].is_null(), "{r}");
    assert!(r["overheadRssMib"].as_f64().unwrap() > 0.1, "{r}");
    assert!(e.list_pods(None).await.is_empty(), "bench pods left behind");

    // A step that fails after pods exist: the error names it, and no pod is left.
    let out = bench(&["--", "/no/such/command"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("StartContainer"), "{err}");
    assert!(e.list_pods(None).await.is_empty(), "failed bench left pods");
}

#[tokio::test]
async fn a_slow_stop_blocks_nothing_else() {
    require!(env_ok(), NEEDS);
    let e = Env::new().await;
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
    let st = container_status(&e.c, &stubborn)
        .await
        .unwrap()
        .status
        .unwrap();
    assert_eq!(st.state, cri::ContainerState::ContainerRunning as i32);
    assert_eq!(
        e.exec(&other, &["echo", "ok"], 5).await.unwrap().stdout,
        b"ok\n"
    );
    let pb = e.pod("fast");
    let pod_b = e.run_pod(&pb).await.unwrap();
    let b = e.run(&pod_b, &e.ctr("b", &["sleep", "1000"]), &pb).await;
    assert_eq!(e.exec(&b, &["echo", "b"], 5).await.unwrap().stdout, b"b\n");
    assert_eq!(e.list_pods(None).await.len(), 2);
    let elapsed = t.elapsed();
    assert!(!stop.is_finished(), "the stop should still be waiting");
    assert!(
        elapsed < Duration::from_secs(5),
        "RPCs waited for the slow stop: {elapsed:?}"
    );
    stop.await.unwrap();
    assert!(t0.elapsed() >= Duration::from_secs(6));
    assert_eq!(
        container_status(&e.c, &stubborn)
            .await
            .unwrap()
            .status
            .unwrap()
            .exit_code,
        137
    );
    for p in [pod_a, pod_b] {
        e.stop_pod(&p).await.unwrap();
        e.remove_pod(&p).await.unwrap();
    }
}

#[tokio::test]
async fn oom_kill_is_reported_as_oomkilled() {
    require!(env_ok(), NEEDS);
    let e = Env::new().await;
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
    let e = Env::new().await;
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
    assert!(e.list_pods(None).await.is_empty());
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

#[tokio::test]
async fn restrict_oom_score_adj_clamps_to_huskd_own() {
    require!(env_ok(), NEEDS);
    let e = Env::with_config("[runtime]\nrestrict_oom_score_adj = true\n").await;
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

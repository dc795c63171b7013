//! A CRI test environment for one runtime handler: a local registry with
//! busybox, a huskd that pulled it, and thin wrappers of the RuntimeService
//! calls the suites repeat.
//!
//! The wrappers return the RPC's `Result` (tests assert on error codes);
//! the list calls, which no test expects to fail, panic with huskd's log.

use std::path::{Path, PathBuf};

use husk_host::client::Clients;
use husk_proto::cri;

use crate::huskd::{Huskd, Options};
use crate::oci::{Compression, ImageSpec, Pusher, build_image, busybox_layer};
use crate::registry::Registry;
use crate::runtime::{
    container_config, container_status, info, kill_leftover_pods, pod_config, pod_status,
};

/// The CRI server under test: huskd, or (for the conformance suite's
/// reference run) containerd.
pub trait CriServer: Send + Sync {
    fn socket(&self) -> &Path;
    /// Its log so far (for failure messages).
    fn log(&self) -> String;
    fn pid(&self) -> Option<u32>;
    /// Where the suites' pods keep their CRI logs.
    fn logs_dir(&self) -> PathBuf;
    /// Stops it and whatever it left behind (after the pods were removed).
    fn shutdown(&mut self);
}

impl CriServer for Huskd {
    fn socket(&self) -> &Path {
        &self.socket
    }
    fn log(&self) -> String {
        Huskd::log(self)
    }
    fn pid(&self) -> Option<u32> {
        Huskd::pid(self)
    }
    fn logs_dir(&self) -> PathBuf {
        self.dir.path().join("logs")
    }
    fn shutdown(&mut self) {
        self.terminate();
        kill_leftover_pods(&self.state_dir());
    }
}

impl<T: CriServer + ?Sized> CriServer for Box<T> {
    fn socket(&self) -> &Path {
        (**self).socket()
    }
    fn log(&self) -> String {
        (**self).log()
    }
    fn pid(&self) -> Option<u32> {
        (**self).pid()
    }
    fn logs_dir(&self) -> PathBuf {
        (**self).logs_dir()
    }
    fn shutdown(&mut self) {
        (**self).shutdown()
    }
}

pub struct CriEnv<R: CriServer = Huskd> {
    pub reg: Registry,
    pub d: R,
    pub c: Clients,
    /// busybox, pulled.
    pub image: String,
    pub logs: PathBuf,
    pub handler: String,
    /// On drop, remove every pod through huskd before stopping it (so CNI
    /// DEL runs for the pods of a failed test): see [`Self::remove_pods_on_drop`].
    remove_pods_on_drop: bool,
}

/// A registry on loopback with busybox pushed as `e2e/busybox:1`.
pub async fn busybox_registry() -> Registry {
    let reg = Registry::start(None).expect("registry");
    let img = build_image(&ImageSpec {
        layers: vec![busybox_layer(Compression::Gzip).expect("busybox layer")],
        ..Default::default()
    });
    Pusher::new(&reg.addr, None)
        .push_image("e2e/busybox", Some("1"), &img)
        .await
        .expect("push");
    reg
}

impl CriEnv {
    /// `extra` is TOML appended to huskd's config.
    pub async fn new(handler: &str, extra: &str) -> CriEnv {
        let (reg, d) = Self::start_huskd(extra).await;
        CriEnv::with_server(reg, d, handler).await
    }

    /// A registry with busybox and a huskd (with `extra` config) pulling from it.
    pub async fn start_huskd(extra: &str) -> (Registry, Huskd) {
        let reg = busybox_registry().await;
        let d = Huskd::start_with(Options::plain_http(&reg.addr), extra)
            .await
            .expect("huskd");
        (reg, d)
    }
}

impl<R: CriServer> CriEnv<R> {
    /// The environment of a started server `d` pulling from `reg` (see
    /// [`busybox_registry`]).
    pub async fn with_server(reg: Registry, d: R, handler: &str) -> Self {
        let c = Clients::connect(d.socket())
            .await
            .unwrap_or_else(|e| panic!("connect: {e}\n{}", d.log()));
        let image = format!("{}/e2e/busybox:1", reg.addr);
        let logs = d.logs_dir();
        let e = CriEnv {
            logs,
            reg,
            d,
            c,
            image: image.clone(),
            handler: handler.to_string(),
            remove_pods_on_drop: false,
        };
        e.pull(&image).await;
        e
    }

    /// On drop, remove the pods a failed test left through the CRI first
    /// (killing their agents alone would leave veths and iptables rules).
    pub fn remove_pods_on_drop(mut self) -> Self {
        self.remove_pods_on_drop = true;
        self
    }

    pub async fn pull(&self, image: &str) {
        self.c
            .image
            .clone()
            .pull_image(cri::PullImageRequest {
                image: Some(cri::ImageSpec {
                    image: image.into(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("pull {image}: {e:?}"));
    }

    pub fn pod(&self, name: &str) -> cri::PodSandboxConfig {
        pod_config(name, &self.logs)
    }

    /// A pod whose sandbox asks for `bytes` of memory (more than a pooled VM has, say).
    pub fn pod_with_memory_limit(&self, name: &str, bytes: i64) -> cri::PodSandboxConfig {
        let mut p = self.pod(name);
        p.linux = Some(cri::LinuxPodSandboxConfig {
            resources: Some(cri::LinuxContainerResources {
                memory_limit_in_bytes: bytes,
                ..Default::default()
            }),
            ..Default::default()
        });
        p
    }

    pub fn ctr(&self, name: &str, cmd: &[&str]) -> cri::ContainerConfig {
        container_config(name, &self.image, cmd)
    }

    /// RunPodSandbox with this environment's handler.
    pub async fn run_pod(&self, cfg: &cri::PodSandboxConfig) -> Result<String, tonic::Status> {
        self.run_pod_on(cfg, &self.handler).await
    }

    /// RunPodSandbox with another runtime handler.
    pub async fn run_pod_on(
        &self,
        cfg: &cri::PodSandboxConfig,
        handler: &str,
    ) -> Result<String, tonic::Status> {
        self.c
            .runtime
            .clone()
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(cfg.clone()),
                runtime_handler: handler.into(),
            })
            .await
            .map(|r| r.into_inner().pod_sandbox_id)
    }

    pub async fn create(
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

    pub async fn start(&self, id: &str) -> Result<(), tonic::Status> {
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
    pub async fn run(
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

    pub async fn exec(
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

    /// ExecSync that must succeed; returns stdout.
    pub async fn sh(&self, id: &str, script: &str) -> String {
        let r = self
            .exec(id, &["sh", "-c", script], 60)
            .await
            .unwrap_or_else(|e| panic!("exec {script:?}: {e:?}\n{}", self.d.log()));
        assert_eq!(
            r.exit_code,
            0,
            "{script:?}: stderr {}",
            String::from_utf8_lossy(&r.stderr)
        );
        String::from_utf8_lossy(&r.stdout).into_owned()
    }

    pub async fn stop_container(&self, id: &str, timeout: i64) -> Result<(), tonic::Status> {
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

    pub async fn remove_container(&self, id: &str) -> Result<(), tonic::Status> {
        self.c
            .runtime
            .clone()
            .remove_container(cri::RemoveContainerRequest {
                container_id: id.into(),
            })
            .await
            .map(|_| ())
    }

    pub async fn stop_pod(&self, id: &str) -> Result<(), tonic::Status> {
        self.c
            .runtime
            .clone()
            .stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: id.into(),
            })
            .await
            .map(|_| ())
    }

    /// Status with `verbose` (huskd's info map: handlers, VM pools…).
    pub async fn status_verbose(&self) -> cri::StatusResponse {
        self.c
            .runtime
            .clone()
            .status(cri::StatusRequest { verbose: true })
            .await
            .unwrap_or_else(|e| panic!("status: {e:?}\n{}", self.d.log()))
            .into_inner()
    }

    /// Every pod sandbox huskd lists.
    pub async fn pods(&self) -> Vec<cri::PodSandbox> {
        self.list_pods(None).await
    }

    pub async fn remove_pod(&self, id: &str) -> Result<(), tonic::Status> {
        self.c
            .runtime
            .clone()
            .remove_pod_sandbox(cri::RemovePodSandboxRequest {
                pod_sandbox_id: id.into(),
            })
            .await
            .map(|_| ())
    }

    /// StopPodSandbox + RemovePodSandbox; panics with huskd's log on failure.
    pub async fn stop_and_remove_pod(&self, id: &str) {
        self.stop_pod(id)
            .await
            .unwrap_or_else(|e| panic!("stop pod: {e:?}\n{}", self.d.log()));
        self.remove_pod(id)
            .await
            .unwrap_or_else(|e| panic!("remove pod: {e:?}\n{}", self.d.log()));
    }

    /// The pods huskd lists through `filter`.
    pub async fn list_pods(&self, filter: Option<cri::PodSandboxFilter>) -> Vec<cri::PodSandbox> {
        self.c
            .runtime
            .clone()
            .list_pod_sandbox(cri::ListPodSandboxRequest { filter })
            .await
            .unwrap_or_else(|e| panic!("list pods: {e:?}\n{}", self.d.log()))
            .into_inner()
            .items
    }

    pub async fn list_containers(&self, filter: cri::ContainerFilter) -> Vec<cri::Container> {
        self.c
            .runtime
            .clone()
            .list_containers(cri::ListContainersRequest {
                filter: Some(filter),
            })
            .await
            .unwrap_or_else(|e| panic!("list containers: {e:?}\n{}", self.d.log()))
            .into_inner()
            .containers
    }

    /// ContainerStatus (verbose) that must succeed: the status.
    pub async fn ctr_status(&self, id: &str) -> cri::ContainerStatus {
        container_status(&self.c, id)
            .await
            .unwrap_or_else(|e| panic!("container status {id}: {e:?}\n{}", self.d.log()))
            .status
            .expect("status")
    }

    /// The pod's `agentPid` from its verbose status (the VMM's pid in a VM pod).
    /// A VM pod's VMM pid, then its helpers' pids (the log writer last), from the
    /// verbose status.
    pub async fn vm_pids(&self, pod: &str) -> Vec<i32> {
        let st = pod_status(&self.c, pod).await.expect("pod status");
        let i = info(&st.info);
        let mut v = vec![i["agentPid"].as_i64().expect("agentPid") as i32];
        v.extend(
            i["vmHelpers"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .filter_map(|p| p.as_i64().map(|p| p as i32)),
        );
        v
    }

    pub async fn agent_pid(&self, pod: &str) -> i32 {
        let st = pod_status(&self.c, pod)
            .await
            .unwrap_or_else(|e| panic!("pod status: {e:?}\n{}", self.d.log()));
        info(&st.info)["agentPid"].as_i64().expect("agentPid") as i32
    }

    /// The pod's IPs (primary first) from its status.
    pub async fn pod_ips(&self, pod: &str) -> Vec<String> {
        let n = pod_status(&self.c, pod)
            .await
            .unwrap_or_else(|e| panic!("pod status: {e:?}\n{}", self.d.log()))
            .status
            .expect("status")
            .network
            .expect("network status");
        std::iter::once(n.ip)
            .chain(n.additional_ips.into_iter().map(|i| i.ip))
            .filter(|i| !i.is_empty())
            .collect()
    }

    pub async fn container_stats(
        &self,
        id: &str,
    ) -> Result<cri::ContainerStatsResponse, tonic::Status> {
        self.c
            .runtime
            .clone()
            .container_stats(cri::ContainerStatsRequest {
                container_id: id.into(),
            })
            .await
            .map(|r| r.into_inner())
    }

    pub async fn list_container_stats(
        &self,
        filter: Option<cri::ContainerStatsFilter>,
    ) -> Result<Vec<cri::ContainerStats>, tonic::Status> {
        self.c
            .runtime
            .clone()
            .list_container_stats(cri::ListContainerStatsRequest { filter })
            .await
            .map(|r| r.into_inner().stats)
    }

    pub async fn pod_stats(&self, id: &str) -> Result<cri::PodSandboxStatsResponse, tonic::Status> {
        self.c
            .runtime
            .clone()
            .pod_sandbox_stats(cri::PodSandboxStatsRequest {
                pod_sandbox_id: id.into(),
            })
            .await
            .map(|r| r.into_inner())
    }

    pub async fn list_pod_stats(
        &self,
        filter: Option<cri::PodSandboxStatsFilter>,
    ) -> Result<Vec<cri::PodSandboxStats>, tonic::Status> {
        self.c
            .runtime
            .clone()
            .list_pod_sandbox_stats(cri::ListPodSandboxStatsRequest { filter })
            .await
            .map(|r| r.into_inner().stats)
    }

    pub async fn metric_descriptors(&self) -> Result<Vec<cri::MetricDescriptor>, tonic::Status> {
        self.c
            .runtime
            .clone()
            .list_metric_descriptors(cri::ListMetricDescriptorsRequest {})
            .await
            .map(|r| r.into_inner().descriptors)
    }

    pub async fn pod_metrics(&self) -> Result<Vec<cri::PodSandboxMetrics>, tonic::Status> {
        self.c
            .runtime
            .clone()
            .list_pod_sandbox_metrics(cri::ListPodSandboxMetricsRequest {})
            .await
            .map(|r| r.into_inner().pod_metrics)
    }

    pub async fn update_resources(
        &self,
        id: &str,
        linux: cri::LinuxContainerResources,
    ) -> Result<(), tonic::Status> {
        self.c
            .runtime
            .clone()
            .update_container_resources(cri::UpdateContainerResourcesRequest {
                container_id: id.into(),
                linux: Some(linux),
                ..Default::default()
            })
            .await
            .map(|_| ())
    }

    pub async fn reopen_log(&self, id: &str) -> Result<(), tonic::Status> {
        self.c
            .runtime
            .clone()
            .reopen_container_log(cri::ReopenContainerLogRequest {
                container_id: id.into(),
            })
            .await
            .map(|_| ())
    }

    /// The streaming URL of an Exec (stdout always; stderr unless `tty`).
    pub async fn exec_url(
        &self,
        id: &str,
        cmd: &[&str],
        stdin: bool,
        tty: bool,
    ) -> Result<String, tonic::Status> {
        self.c
            .runtime
            .clone()
            .exec(cri::ExecRequest {
                container_id: id.into(),
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                tty,
                stdin,
                stdout: true,
                stderr: !tty,
            })
            .await
            .map(|r| r.into_inner().url)
    }

    /// The streaming URL of an Attach (stdout always; stderr unless `tty`).
    pub async fn attach_url(
        &self,
        id: &str,
        stdin: bool,
        tty: bool,
    ) -> Result<String, tonic::Status> {
        self.c
            .runtime
            .clone()
            .attach(cri::AttachRequest {
                container_id: id.into(),
                stdin,
                tty,
                stdout: true,
                stderr: !tty,
            })
            .await
            .map(|r| r.into_inner().url)
    }

    /// The streaming URL of a PortForward.
    pub async fn port_forward_url(
        &self,
        pod: &str,
        ports: &[i32],
    ) -> Result<String, tonic::Status> {
        self.c
            .runtime
            .clone()
            .port_forward(cri::PortForwardRequest {
                pod_sandbox_id: pod.into(),
                port: ports.to_vec(),
            })
            .await
            .map(|r| r.into_inner().url)
    }

    pub fn log_path(&self, pod_cfg: &cri::PodSandboxConfig, name: &str) -> PathBuf {
        Path::new(&pod_cfg.log_directory).join(format!("{name}.log"))
    }

    /// Removes every pod through huskd, ignoring errors (drop-time cleanup).
    fn remove_all_pods_blocking(&self) {
        let socket = self.d.socket().to_path_buf();
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                let Ok(c) = Clients::connect(&socket).await else {
                    return;
                };
                let rt = c.runtime.clone();
                let pods = rt
                    .clone()
                    .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
                    .await
                    .map(|r| r.into_inner().items)
                    .unwrap_or_default();
                for p in pods {
                    let _ = rt
                        .clone()
                        .remove_pod_sandbox(cri::RemovePodSandboxRequest {
                            pod_sandbox_id: p.id,
                        })
                        .await;
                }
            })
        })
        .join();
    }
}

impl<R: CriServer> Drop for CriEnv<R> {
    fn drop(&mut self) {
        if self.remove_pods_on_drop {
            self.remove_all_pods_blocking();
        }
        self.d.shutdown();
    }
}

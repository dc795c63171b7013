//! A CRI test environment for one runtime handler: a local registry with
//! busybox, a huskd that pulled it, and thin wrappers of the RuntimeService
//! calls the suites repeat.

use std::path::{Path, PathBuf};

use husk_host::client::Clients;
use husk_proto::cri;

use crate::huskd::{Huskd, Options};
use crate::oci::{Compression, ImageSpec, Pusher, build_image, busybox_layer};
use crate::registry::Registry;
use crate::runtime::{container_config, kill_leftover_pods, pod_config};

pub struct CriEnv {
    pub reg: Registry,
    pub d: Huskd,
    pub c: Clients,
    /// busybox, pulled.
    pub image: String,
    pub logs: PathBuf,
    pub handler: String,
}

impl CriEnv {
    /// `extra` is TOML appended to huskd's config.
    pub async fn new(handler: &str, extra: &str) -> CriEnv {
        let reg = Registry::start(None).expect("registry");
        let img = build_image(&ImageSpec {
            layers: vec![busybox_layer(Compression::Gzip).expect("busybox layer")],
            ..Default::default()
        });
        Pusher::new(&reg.addr, None)
            .push_image("e2e/busybox", Some("1"), &img)
            .await
            .expect("push");
        let d = Huskd::start_with(Options::plain_http(&reg.addr), extra)
            .await
            .expect("huskd");
        let c = d.clients().await.expect("clients");
        let image = format!("{}/e2e/busybox:1", reg.addr);
        let e = CriEnv {
            logs: d.dir.path().join("logs"),
            reg,
            d,
            c,
            image: image.clone(),
            handler: handler.to_string(),
        };
        e.pull(&image).await;
        e
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

    pub fn ctr(&self, name: &str, cmd: &[&str]) -> cri::ContainerConfig {
        container_config(name, &self.image, cmd)
    }

    pub async fn run_pod(&self, cfg: &cri::PodSandboxConfig) -> Result<String, tonic::Status> {
        self.c
            .runtime
            .clone()
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(cfg.clone()),
                runtime_handler: self.handler.clone(),
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

    /// Every pod sandbox huskd lists.
    pub async fn pods(&self) -> Vec<cri::PodSandbox> {
        self.c
            .runtime
            .clone()
            .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
            .await
            .unwrap_or_else(|e| panic!("list pods: {e:?}"))
            .into_inner()
            .items
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

    pub fn log_path(&self, pod_cfg: &cri::PodSandboxConfig, name: &str) -> PathBuf {
        Path::new(&pod_cfg.log_directory).join(format!("{name}.log"))
    }
}

impl Drop for CriEnv {
    fn drop(&mut self) {
        self.d.terminate();
        kill_leftover_pods(&self.d.state_dir());
    }
}

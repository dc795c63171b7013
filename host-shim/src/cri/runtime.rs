//! CRI RuntimeService: thin handlers over [`crate::sandbox::Manager`].
//! Each traces, validates the request shape, calls the domain and maps the
//! error (in [`super::error`]). Wire conversion lives in [`super::convert`].

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use husk_proto::cri::{self, runtime_service_server::RuntimeService};
use tonic::{Request, Response, Status};

use super::Services;
use super::convert;
use super::observe::ids;

pub const RUNTIME_NAME: &str = "husk";
pub const CRI_API_VERSION: &str = "v1";

pub struct Runtime {
    s: Arc<Services>,
}

impl Runtime {
    pub fn new(s: Arc<Services>) -> Self {
        Self { s }
    }
}

macro_rules! unimplemented_rpc {
    ($($name:ident($req:ident) -> $resp:ident: $msg:expr;)*) => {
        $(
            // Written out the way #[async_trait] expands methods: the
            // attribute does not see methods produced by a macro.
            fn $name<'life0, 'async_trait>(
                &'life0 self,
                _r: Request<cri::$req>,
            ) -> Pin<Box<dyn std::future::Future<Output = Result<Response<cri::$resp>, Status>> + Send + 'async_trait>>
            where
                'life0: 'async_trait,
                Self: 'async_trait,
            {
                Box::pin(async { Err(Status::unimplemented($msg)) })
            }
        )*
    };
}

fn ok<T>(t: T) -> Result<Response<T>, Status> {
    Ok(Response::new(t))
}

#[tonic::async_trait]
impl RuntimeService for Runtime {
    type GetContainerEventsStream =
        Pin<Box<dyn Stream<Item = Result<cri::ContainerEventResponse, Status>> + Send>>;

    async fn version(
        &self,
        _r: Request<cri::VersionRequest>,
    ) -> Result<Response<cri::VersionResponse>, Status> {
        ok(cri::VersionResponse {
            version: "0.1.0".into(),
            runtime_name: RUNTIME_NAME.into(),
            runtime_version: env!("CARGO_PKG_VERSION").into(),
            runtime_api_version: CRI_API_VERSION.into(),
        })
    }

    async fn status(
        &self,
        r: Request<cri::StatusRequest>,
    ) -> Result<Response<cri::StatusResponse>, Status> {
        let verbose = r.into_inner().verbose;
        let rt = &self.s.runtime;
        let handlers = rt.handlers();
        let readiness = rt.handler_readiness();
        let cond = |t: &str, status: bool, reason: &str, message: &str| cri::RuntimeCondition {
            r#type: t.into(),
            status,
            reason: if status { String::new() } else { reason.into() },
            message: message.into(),
        };
        let summary = readiness
            .iter()
            .map(|(n, r)| match r {
                Ok(()) => format!("{n}: ready"),
                Err(e) => format!("{n}: not ready ({e})"),
            })
            .collect::<Vec<_>>()
            .join("; ");
        let runtime = cond(
            "RuntimeReady",
            readiness.iter().any(|(_, r)| r.is_ok()),
            "NoWorkingHandler",
            &summary,
        );
        let network = match rt.network().ready() {
            Ok(msg) => cond("NetworkReady", true, "", &msg),
            Err(msg) => cond("NetworkReady", false, "NetworkPluginNotReady", &msg),
        };
        let mut info = std::collections::HashMap::new();
        if verbose {
            let h: Vec<_> = handlers
                .iter()
                .map(|(n, k)| {
                    let ready = readiness
                        .iter()
                        .find(|(r, _)| r == n)
                        .map(|(_, r)| r.clone());
                    serde_json::json!({
                        "name": n,
                        "kind": k.kind,
                        "accel": k.accel,
                        "ready": ready.as_ref().is_some_and(|r| r.is_ok()),
                        "reason": ready.and_then(|r| r.err()),
                    })
                })
                .collect();
            info.insert(
                "config".into(),
                serde_json::json!({"defaultHandler": rt.runtime_config().default_handler, "handlers": h}).to_string(),
            );
            info.insert(
                "vmPools".into(),
                serde_json::to_string(&rt.pool_stats()).unwrap_or_default(),
            );
        }
        ok(cri::StatusResponse {
            status: Some(cri::RuntimeStatus {
                conditions: vec![runtime, network],
            }),
            info,
            runtime_handlers: handlers
                .iter()
                .map(|(n, _)| cri::RuntimeHandler {
                    name: n.clone(),
                    features: Some(cri::RuntimeHandlerFeatures::default()),
                })
                .collect(),
            features: None,
        })
    }

    async fn get_container_events(
        &self,
        _r: Request<cri::GetEventsRequest>,
    ) -> Result<Response<Self::GetContainerEventsStream>, Status> {
        Err(Status::unimplemented(
            "husk: container events are not implemented yet",
        ))
    }

    async fn run_pod_sandbox(
        &self,
        r: Request<cri::RunPodSandboxRequest>,
    ) -> Result<Response<cri::RunPodSandboxResponse>, Status> {
        let r = r.into_inner();
        let config = r
            .config
            .ok_or_else(|| Status::invalid_argument("RunPodSandbox: config is required"))?;
        tracing::debug!(handler = %r.runtime_handler, name = ?config.metadata.as_ref().map(|m| &m.name), "RunPodSandbox");
        let id = self.s.runtime.run_pod(config, &r.runtime_handler).await?;
        ids(&id, "");
        ok(cri::RunPodSandboxResponse { pod_sandbox_id: id })
    }

    async fn stop_pod_sandbox(
        &self,
        r: Request<cri::StopPodSandboxRequest>,
    ) -> Result<Response<cri::StopPodSandboxResponse>, Status> {
        let id = r.into_inner().pod_sandbox_id;
        ids(&id, "");
        tracing::debug!("StopPodSandbox");
        self.s.runtime.stop_pod(&id).await?;
        ok(cri::StopPodSandboxResponse {})
    }

    async fn remove_pod_sandbox(
        &self,
        r: Request<cri::RemovePodSandboxRequest>,
    ) -> Result<Response<cri::RemovePodSandboxResponse>, Status> {
        let id = r.into_inner().pod_sandbox_id;
        ids(&id, "");
        tracing::debug!("RemovePodSandbox");
        self.s.runtime.remove_pod(&id).await?;
        ok(cri::RemovePodSandboxResponse {})
    }

    async fn pod_sandbox_status(
        &self,
        r: Request<cri::PodSandboxStatusRequest>,
    ) -> Result<Response<cri::PodSandboxStatusResponse>, Status> {
        let r = r.into_inner();
        ids(&r.pod_sandbox_id, "");
        let v = self.s.runtime.pod_status(&r.pod_sandbox_id)?;
        ok(cri::PodSandboxStatusResponse {
            status: Some(convert::pod_status(&v)),
            info: if r.verbose {
                convert::pod_info(&v)
            } else {
                Default::default()
            },
            containers_statuses: v.containers.iter().map(convert::container_status).collect(),
            timestamp: crate::sandbox::state::now_ns(),
        })
    }

    async fn list_pod_sandbox(
        &self,
        r: Request<cri::ListPodSandboxRequest>,
    ) -> Result<Response<cri::ListPodSandboxResponse>, Status> {
        let f = r.into_inner().filter;
        let items = self
            .s
            .runtime
            .list_pods(f.as_ref())
            .iter()
            .map(convert::pod_sandbox)
            .collect();
        ok(cri::ListPodSandboxResponse { items })
    }

    async fn create_container(
        &self,
        r: Request<cri::CreateContainerRequest>,
    ) -> Result<Response<cri::CreateContainerResponse>, Status> {
        let r = r.into_inner();
        let config = r
            .config
            .ok_or_else(|| Status::invalid_argument("CreateContainer: config is required"))?;
        ids(&r.pod_sandbox_id, "");
        tracing::debug!(name = ?config.metadata.as_ref().map(|m| &m.name), "CreateContainer");
        let id = self
            .s
            .runtime
            .create_container(&r.pod_sandbox_id, config)
            .await?;
        ids("", &id);
        ok(cri::CreateContainerResponse { container_id: id })
    }

    async fn start_container(
        &self,
        r: Request<cri::StartContainerRequest>,
    ) -> Result<Response<cri::StartContainerResponse>, Status> {
        let id = r.into_inner().container_id;
        ids("", &id);
        tracing::debug!("StartContainer");
        self.s.runtime.start_container(&id).await?;
        ok(cri::StartContainerResponse {})
    }

    async fn stop_container(
        &self,
        r: Request<cri::StopContainerRequest>,
    ) -> Result<Response<cri::StopContainerResponse>, Status> {
        let r = r.into_inner();
        ids("", &r.container_id);
        tracing::debug!(timeout = r.timeout, "StopContainer");
        self.s
            .runtime
            .stop_container(&r.container_id, r.timeout)
            .await?;
        ok(cri::StopContainerResponse {})
    }

    async fn remove_container(
        &self,
        r: Request<cri::RemoveContainerRequest>,
    ) -> Result<Response<cri::RemoveContainerResponse>, Status> {
        let id = r.into_inner().container_id;
        ids("", &id);
        tracing::debug!("RemoveContainer");
        self.s.runtime.remove_container(&id).await?;
        ok(cri::RemoveContainerResponse {})
    }

    async fn list_containers(
        &self,
        r: Request<cri::ListContainersRequest>,
    ) -> Result<Response<cri::ListContainersResponse>, Status> {
        let f = r.into_inner().filter;
        let containers = self
            .s
            .runtime
            .list_containers(f.as_ref())
            .iter()
            .map(convert::container)
            .collect();
        ok(cri::ListContainersResponse { containers })
    }

    async fn container_status(
        &self,
        r: Request<cri::ContainerStatusRequest>,
    ) -> Result<Response<cri::ContainerStatusResponse>, Status> {
        let r = r.into_inner();
        ids("", &r.container_id);
        let v = self.s.runtime.container_status(&r.container_id)?;
        let info = if r.verbose {
            let pod = self.s.runtime.container_pod(&r.container_id)?;
            convert::container_info(&v, &pod)
        } else {
            Default::default()
        };
        ok(cri::ContainerStatusResponse {
            status: Some(convert::container_status(&v)),
            info,
        })
    }

    async fn update_container_resources(
        &self,
        r: Request<cri::UpdateContainerResourcesRequest>,
    ) -> Result<Response<cri::UpdateContainerResourcesResponse>, Status> {
        let r = r.into_inner();
        let linux = r.linux.ok_or_else(|| {
            Status::invalid_argument("UpdateContainerResources: linux resources are required")
        })?;
        ids("", &r.container_id);
        tracing::debug!("UpdateContainerResources");
        self.s
            .runtime
            .update_resources(&r.container_id, linux)
            .await?;
        ok(cri::UpdateContainerResourcesResponse {})
    }

    async fn reopen_container_log(
        &self,
        r: Request<cri::ReopenContainerLogRequest>,
    ) -> Result<Response<cri::ReopenContainerLogResponse>, Status> {
        let id = r.into_inner().container_id;
        ids("", &id);
        self.s.runtime.reopen_log(&id)?;
        ok(cri::ReopenContainerLogResponse {})
    }

    async fn exec_sync(
        &self,
        r: Request<cri::ExecSyncRequest>,
    ) -> Result<Response<cri::ExecSyncResponse>, Status> {
        let r = r.into_inner();
        if r.timeout < 0 {
            return Err(Status::invalid_argument(
                "ExecSync: timeout must not be negative",
            ));
        }
        ids("", &r.container_id);
        tracing::debug!(cmd = ?r.cmd, "ExecSync");
        let out = self
            .s
            .runtime
            .exec_sync(
                &r.container_id,
                r.cmd,
                Duration::from_secs(r.timeout as u64),
            )
            .await?;
        ok(cri::ExecSyncResponse {
            stdout: out.stdout,
            stderr: out.stderr,
            exit_code: out.exit_code,
        })
    }

    async fn exec(
        &self,
        r: Request<cri::ExecRequest>,
    ) -> Result<Response<cri::ExecResponse>, Status> {
        ok(super::streaming::exec(&self.s, r.into_inner())?)
    }

    async fn attach(
        &self,
        r: Request<cri::AttachRequest>,
    ) -> Result<Response<cri::AttachResponse>, Status> {
        ok(super::streaming::attach(&self.s, r.into_inner())?)
    }

    async fn port_forward(
        &self,
        r: Request<cri::PortForwardRequest>,
    ) -> Result<Response<cri::PortForwardResponse>, Status> {
        ok(super::streaming::port_forward(&self.s, r.into_inner())?)
    }

    async fn container_stats(
        &self,
        r: Request<cri::ContainerStatsRequest>,
    ) -> Result<Response<cri::ContainerStatsResponse>, Status> {
        let id = r.into_inner().container_id;
        ids("", &id);
        let stats = self.s.runtime.container_stats(&id).await?;
        ok(cri::ContainerStatsResponse { stats: Some(stats) })
    }

    async fn list_container_stats(
        &self,
        r: Request<cri::ListContainerStatsRequest>,
    ) -> Result<Response<cri::ListContainerStatsResponse>, Status> {
        let f = r.into_inner().filter;
        let stats = self.s.runtime.list_container_stats(f.as_ref()).await?;
        ok(cri::ListContainerStatsResponse { stats })
    }

    async fn pod_sandbox_stats(
        &self,
        r: Request<cri::PodSandboxStatsRequest>,
    ) -> Result<Response<cri::PodSandboxStatsResponse>, Status> {
        let id = r.into_inner().pod_sandbox_id;
        ids(&id, "");
        let stats = self.s.runtime.pod_stats(&id).await?;
        ok(cri::PodSandboxStatsResponse { stats: Some(stats) })
    }

    async fn list_pod_sandbox_stats(
        &self,
        r: Request<cri::ListPodSandboxStatsRequest>,
    ) -> Result<Response<cri::ListPodSandboxStatsResponse>, Status> {
        let f = r.into_inner().filter;
        let stats = self.s.runtime.list_pod_stats(f.as_ref()).await?;
        ok(cri::ListPodSandboxStatsResponse { stats })
    }

    async fn list_metric_descriptors(
        &self,
        _r: Request<cri::ListMetricDescriptorsRequest>,
    ) -> Result<Response<cri::ListMetricDescriptorsResponse>, Status> {
        ok(cri::ListMetricDescriptorsResponse {
            descriptors: self.s.runtime.metric_descriptors(),
        })
    }

    async fn list_pod_sandbox_metrics(
        &self,
        _r: Request<cri::ListPodSandboxMetricsRequest>,
    ) -> Result<Response<cri::ListPodSandboxMetricsResponse>, Status> {
        ok(cri::ListPodSandboxMetricsResponse {
            pod_metrics: self.s.runtime.list_pod_metrics().await,
        })
    }

    async fn update_runtime_config(
        &self,
        r: Request<cri::UpdateRuntimeConfigRequest>,
    ) -> Result<Response<cri::UpdateRuntimeConfigResponse>, Status> {
        // The pod CIDR goes to IPAM plugins with the ipRanges capability.
        if let Some(cidr) = r
            .into_inner()
            .runtime_config
            .and_then(|c| c.network_config)
            .map(|n| n.pod_cidr)
        {
            tracing::info!(%cidr, "UpdateRuntimeConfig: pod CIDR");
            self.s
                .runtime
                .network()
                .set_pod_cidr(&cidr)
                .map_err(crate::sandbox::RuntimeError::from)?;
        }
        ok(cri::UpdateRuntimeConfigResponse {})
    }

    async fn runtime_config(
        &self,
        _r: Request<cri::RuntimeConfigRequest>,
    ) -> Result<Response<cri::RuntimeConfigResponse>, Status> {
        // huskd writes pod and container cgroups itself under cgroup_parent: the
        // cgroupfs driver (no systemd slices or scopes).
        ok(cri::RuntimeConfigResponse {
            linux: Some(cri::LinuxRuntimeConfiguration {
                cgroup_driver: cri::CgroupDriver::Cgroupfs as i32,
            }),
        })
    }

    unimplemented_rpc! {
        checkpoint_container(CheckpointContainerRequest) -> CheckpointContainerResponse: "husk: CheckpointContainer is not supported";
    }
}

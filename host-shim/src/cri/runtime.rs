//! CRI RuntimeService. `Version` and `Status` answer; pod and container
//! RPCs are added by the runtime work and answer Unimplemented until then.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use husk_proto::cri::{self, runtime_service_server::RuntimeService};
use tonic::{Request, Response, Status};

use super::Services;

pub const RUNTIME_NAME: &str = "husk";
pub const CRI_API_VERSION: &str = "v1";

pub struct Runtime {
    _s: Arc<Services>,
}

impl Runtime {
    pub fn new(s: Arc<Services>) -> Self {
        Self { _s: s }
    }
}

macro_rules! not_yet {
    ($($name:ident($req:ident) -> $resp:ident;)*) => {
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
                Box::pin(async {
                    Err(Status::unimplemented(concat!(
                        "husk: RuntimeService.", stringify!($name),
                        " is not implemented yet (this huskd serves images only)"
                    )))
                })
            }
        )*
    };
}

#[tonic::async_trait]
impl RuntimeService for Runtime {
    type GetContainerEventsStream =
        Pin<Box<dyn Stream<Item = Result<cri::ContainerEventResponse, Status>> + Send>>;

    async fn version(
        &self,
        _r: Request<cri::VersionRequest>,
    ) -> Result<Response<cri::VersionResponse>, Status> {
        Ok(Response::new(cri::VersionResponse {
            version: "0.1.0".into(),
            runtime_name: RUNTIME_NAME.into(),
            runtime_version: env!("CARGO_PKG_VERSION").into(),
            runtime_api_version: CRI_API_VERSION.into(),
        }))
    }

    async fn status(
        &self,
        _r: Request<cri::StatusRequest>,
    ) -> Result<Response<cri::StatusResponse>, Status> {
        let cond = |t: &str, reason: &str, message: &str| cri::RuntimeCondition {
            r#type: t.into(),
            status: false,
            reason: reason.into(),
            message: message.into(),
        };
        Ok(Response::new(cri::StatusResponse {
            status: Some(cri::RuntimeStatus {
                conditions: vec![
                    cond(
                        "RuntimeReady",
                        "RuntimeNotImplemented",
                        "pod sandboxes are not available in this huskd yet",
                    ),
                    cond(
                        "NetworkReady",
                        "NetworkNotImplemented",
                        "pod networking is not available in this huskd yet",
                    ),
                ],
            }),
            ..Default::default()
        }))
    }

    async fn get_container_events(
        &self,
        _r: Request<cri::GetEventsRequest>,
    ) -> Result<Response<Self::GetContainerEventsStream>, Status> {
        Err(Status::unimplemented(
            "husk: container events are not implemented yet",
        ))
    }

    not_yet! {
        run_pod_sandbox(RunPodSandboxRequest) -> RunPodSandboxResponse;
        stop_pod_sandbox(StopPodSandboxRequest) -> StopPodSandboxResponse;
        remove_pod_sandbox(RemovePodSandboxRequest) -> RemovePodSandboxResponse;
        pod_sandbox_status(PodSandboxStatusRequest) -> PodSandboxStatusResponse;
        list_pod_sandbox(ListPodSandboxRequest) -> ListPodSandboxResponse;
        create_container(CreateContainerRequest) -> CreateContainerResponse;
        start_container(StartContainerRequest) -> StartContainerResponse;
        stop_container(StopContainerRequest) -> StopContainerResponse;
        remove_container(RemoveContainerRequest) -> RemoveContainerResponse;
        list_containers(ListContainersRequest) -> ListContainersResponse;
        container_status(ContainerStatusRequest) -> ContainerStatusResponse;
        update_container_resources(UpdateContainerResourcesRequest) -> UpdateContainerResourcesResponse;
        reopen_container_log(ReopenContainerLogRequest) -> ReopenContainerLogResponse;
        exec_sync(ExecSyncRequest) -> ExecSyncResponse;
        exec(ExecRequest) -> ExecResponse;
        attach(AttachRequest) -> AttachResponse;
        port_forward(PortForwardRequest) -> PortForwardResponse;
        container_stats(ContainerStatsRequest) -> ContainerStatsResponse;
        list_container_stats(ListContainerStatsRequest) -> ListContainerStatsResponse;
        pod_sandbox_stats(PodSandboxStatsRequest) -> PodSandboxStatsResponse;
        list_pod_sandbox_stats(ListPodSandboxStatsRequest) -> ListPodSandboxStatsResponse;
        update_runtime_config(UpdateRuntimeConfigRequest) -> UpdateRuntimeConfigResponse;
        checkpoint_container(CheckpointContainerRequest) -> CheckpointContainerResponse;
        list_metric_descriptors(ListMetricDescriptorsRequest) -> ListMetricDescriptorsResponse;
        list_pod_sandbox_metrics(ListPodSandboxMetricsRequest) -> ListPodSandboxMetricsResponse;
        runtime_config(RuntimeConfigRequest) -> RuntimeConfigResponse;
    }
}

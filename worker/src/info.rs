//! `tandem.internal.v1.Worker`: what every worker says about itself, and its role switch.

use std::sync::Arc;

use tandem_proto::internal::v1::worker_server::Worker;
use tandem_proto::internal::v1::{
    DescribeRequest, Role, StatsRequest, SwitchRoleRequest, WorkerDescription, WorkerStats,
};
use tonic::{Request, Response, Status};

use tandem_engine::Backend;

use crate::WorkerError;
use crate::host::Host;

pub(crate) struct WorkerInfoService<B: Backend> {
    pub(crate) host: Arc<Host<B>>,
}

#[tonic::async_trait]
impl<B: Backend> Worker for WorkerInfoService<B> {
    async fn describe(
        &self,
        _: Request<DescribeRequest>,
    ) -> Result<Response<WorkerDescription>, Status> {
        Ok(Response::new(self.host.description()))
    }

    async fn stats(&self, _: Request<StatsRequest>) -> Result<Response<WorkerStats>, Status> {
        Ok(Response::new(self.host.stats().await?))
    }

    async fn switch_role(
        &self,
        request: Request<SwitchRoleRequest>,
    ) -> Result<Response<WorkerDescription>, Status> {
        let role = match Role::try_from(request.into_inner().role) {
            Ok(role @ (Role::Prefill | Role::Decode)) => role,
            _ => {
                return Err(WorkerError::InvalidRequest(
                    "role must be ROLE_PREFILL or ROLE_DECODE".into(),
                )
                .into());
            }
        };
        Ok(Response::new(self.host.switch_role(role).await?))
    }
}

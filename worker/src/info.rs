//! `tandem.internal.v1.Worker`: what every worker says about itself.

use tandem_proto::internal::v1::worker_server::Worker;
use tandem_proto::internal::v1::{DescribeRequest, StatsRequest, WorkerDescription, WorkerStats};
use tokio::sync::{mpsc, oneshot};
use tonic::{Request, Response, Status};

use crate::WorkerError;

/// Serves `Describe` from a fixed description and `Stats` by asking the engine thread, whose
/// command type `C` carries the reply.
pub struct WorkerInfoService<C> {
    commands: mpsc::Sender<C>,
    stats_command: fn(oneshot::Sender<WorkerStats>) -> C,
    description: WorkerDescription,
}

impl<C> WorkerInfoService<C> {
    pub fn new(
        commands: mpsc::Sender<C>,
        stats_command: fn(oneshot::Sender<WorkerStats>) -> C,
        description: WorkerDescription,
    ) -> Self {
        Self {
            commands,
            stats_command,
            description,
        }
    }
}

#[tonic::async_trait]
impl<C: Send + 'static> Worker for WorkerInfoService<C> {
    async fn describe(
        &self,
        _: Request<DescribeRequest>,
    ) -> Result<Response<WorkerDescription>, Status> {
        Ok(Response::new(self.description.clone()))
    }

    async fn stats(&self, _: Request<StatsRequest>) -> Result<Response<WorkerStats>, Status> {
        let (reply, stats) = oneshot::channel();
        // Stats wait for room rather than fail: they are how operators see a full queue.
        self.commands
            .send((self.stats_command)(reply))
            .await
            .map_err(|_| WorkerError::EngineStopped)?;
        let stats = stats.await.map_err(|_| WorkerError::EngineStopped)?;
        Ok(Response::new(stats))
    }
}

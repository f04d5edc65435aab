//! `tandem.internal.v1.Worker`: what every worker says about itself, and its role switch.

use std::pin::Pin;
use std::sync::Arc;

use tandem_proto::internal::v1::worker_server::Worker;
use tandem_proto::internal::v1::{
    DescribeRequest, KvEventBatch, Role, StatsRequest, SwitchRoleRequest, WatchKvEventsRequest,
    WorkerDescription, WorkerStats,
};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use tandem_engine::Backend;

use crate::WorkerError;
use crate::host::Host;

pub(crate) struct WorkerInfoService<B: Backend> {
    pub(crate) host: Arc<Host<B>>,
}

/// Batches buffered per watcher stream before the forwarding task waits.
const WATCH_BUFFER: usize = 64;

type KvEventStream = Pin<Box<dyn Stream<Item = Result<KvEventBatch, Status>> + Send>>;

#[tonic::async_trait]
impl<B: Backend> Worker for WorkerInfoService<B> {
    type WatchKvEventsStream = KvEventStream;

    /// A snapshot, then each change; a watcher too slow to keep up gets a new snapshot.
    async fn watch_kv_events(
        &self,
        _: Request<WatchKvEventsRequest>,
    ) -> Result<Response<KvEventStream>, Status> {
        let hub = Arc::clone(&self.host.kv_events);
        let (out, stream) = mpsc::channel(WATCH_BUFFER);
        tokio::spawn(async move {
            let (mut batch, mut changes) = hub.subscribe();
            loop {
                let last = batch.id;
                if out.send(Ok(batch)).await.is_err() {
                    return;
                }
                batch = loop {
                    match changes.recv().await {
                        Ok(change) if change.id <= last => {}
                        Ok(change) => break change,
                        Err(broadcast::error::RecvError::Lagged(_)) => {
                            let (snapshot, fresh) = hub.subscribe();
                            changes = fresh;
                            break snapshot;
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
                    }
                };
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(stream))))
    }

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

//! `tandem.v1.Admin`: workers and pools with live load, cordon, uncordon and drain. State
//! changes act on this router's choice of workers, so a cordoned worker gets no new request
//! while the ones it has run to completion.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_common::registry::DesiredState;
use tandem_proto::internal::v1::StatsRequest;
use tandem_proto::v1::admin_server::Admin;
use tandem_proto::v1::{
    ClusterSummaryRequest, ClusterSummaryResponse, CordonRequest, DescribeWorkerRequest,
    DrainProgress, DrainRequest, ListWorkersRequest, ListWorkersResponse, PoolSummary, WorkerInfo,
    WorkerLoad, WorkerRole, WorkerState,
};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::pool::{AdminState, Worker};
use crate::service::RouterState;

/// Longest wait for one worker's stats before it is shown as unreachable.
const STATS_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a drain checks the worker's load.
const DRAIN_POLL: Duration = Duration::from_millis(200);
/// Metadata key of the admin token.
const AUTHORIZATION: &str = "authorization";

pub(crate) struct AdminService {
    pub(crate) state: Arc<RouterState>,
    /// A drain's deadline when the request gives none.
    pub(crate) drain_timeout: Duration,
}

/// A worker of either pool.
enum AnyWorker {
    Prefill(Arc<Worker<crate::orchestrate::PrefillClient>>),
    Decode(Arc<Worker<crate::orchestrate::DecodeClient>>),
}

impl AnyWorker {
    fn id(&self) -> &str {
        match self {
            Self::Prefill(w) => &w.id,
            Self::Decode(w) => &w.id,
        }
    }

    fn set_state(&self, state: AdminState) {
        match self {
            Self::Prefill(w) => w.set_state(state),
            Self::Decode(w) => w.set_state(state),
        }
    }

    async fn info(&self) -> WorkerInfo {
        match self {
            Self::Prefill(w) => worker_info(w, WorkerRole::Prefill).await,
            Self::Decode(w) => worker_info(w, WorkerRole::Decode).await,
        }
    }
}

/// A worker's state and live load, asking it for stats.
async fn worker_info<C>(worker: &Worker<C>, role: WorkerRole) -> WorkerInfo {
    let mut info = WorkerInfo {
        id: worker.id.clone(),
        role: role as i32,
        state: WorkerState::Unspecified as i32,
        address: worker.addr.clone(),
        model: worker.model.clone(),
        device: worker.device.clone(),
        load: None,
        detail: String::new(),
    };
    let in_flight = worker.requests_in_flight() as u32;
    let stats = tokio::time::timeout(STATS_TIMEOUT, worker.info.clone().stats(StatsRequest {}))
        .await
        .map_err(|_| format!("no stats within {STATS_TIMEOUT:?}"))
        .and_then(|r| r.map_err(|s| s.message().to_owned()));
    let stats = match stats {
        Ok(stats) => stats.into_inner(),
        Err(detail) => {
            info.state = WorkerState::Unreachable as i32;
            info.detail = detail;
            return info;
        }
    };
    let now = Instant::now();
    let tokens_per_second = {
        let mut last = worker
            .last_sample
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let rate = last
            .filter(|(at, _)| now > *at)
            .map(|(at, total)| {
                stats.tokens_total.saturating_sub(total) as f64 / (now - at).as_secs_f64()
            })
            .unwrap_or(0.0);
        *last = Some((now, stats.tokens_total));
        rate
    };
    let idle = stats.running_sequences == 0
        && stats.waiting_sequences == 0
        && stats.pending_transfers == 0
        && stats.queued_prefill_tokens == 0
        && in_flight == 0;
    info.state = match worker.state() {
        AdminState::Ready => WorkerState::Ready,
        AdminState::Cordoned => WorkerState::Cordoned,
        AdminState::Draining if idle => WorkerState::Drained,
        AdminState::Draining => WorkerState::Draining,
    } as i32;
    info.load = Some(WorkerLoad {
        queued_prefill_tokens: stats.queued_prefill_tokens,
        running_sequences: stats.running_sequences,
        waiting_sequences: stats.waiting_sequences,
        kv_blocks_used: stats.kv_blocks_used,
        kv_blocks_total: stats.kv_blocks_total,
        tokens_per_second,
        pending_transfers: stats.pending_transfers,
        router_in_flight: in_flight,
    });
    info
}

impl AdminService {
    /// Records `state` for `worker` in the registry (so every router applies it) and applies
    /// it here at once.
    async fn set_state(&self, worker: &AnyWorker, state: AdminState) -> Result<(), Status> {
        let desired = DesiredState {
            cordoned: state != AdminState::Ready,
            draining: state == AdminState::Draining,
        };
        self.state
            .registry
            .set_desired(worker.id(), desired)
            .await
            .map_err(|e| Status::unavailable(format!("recording the change: {e}")))?;
        worker.set_state(state);
        Ok(())
    }

    fn find(&self, id: &str) -> Result<AnyWorker, Status> {
        let cluster = &self.state.cluster;
        if let Some(w) = cluster.decode.find(id) {
            return Ok(AnyWorker::Decode(w));
        }
        if let Some(w) = cluster.prefill.find(id) {
            return Ok(AnyWorker::Prefill(w));
        }
        Err(Status::not_found(format!(
            "no worker `{id}`; `tandemctl get workers` lists them"
        )))
    }

    async fn all(&self) -> Vec<WorkerInfo> {
        let cluster = &self.state.cluster;
        let mut out = Vec::new();
        for w in cluster.prefill.workers() {
            out.push(worker_info(&w, WorkerRole::Prefill).await);
        }
        for w in cluster.decode.workers() {
            out.push(worker_info(&w, WorkerRole::Decode).await);
        }
        out
    }
}

type DrainStream = Pin<Box<dyn Stream<Item = Result<DrainProgress, Status>> + Send>>;

#[tonic::async_trait]
impl Admin for AdminService {
    type DrainStream = DrainStream;

    async fn list_workers(
        &self,
        _: Request<ListWorkersRequest>,
    ) -> Result<Response<ListWorkersResponse>, Status> {
        Ok(Response::new(ListWorkersResponse {
            workers: self.all().await,
        }))
    }

    async fn describe_worker(
        &self,
        request: Request<DescribeWorkerRequest>,
    ) -> Result<Response<WorkerInfo>, Status> {
        let worker = self.find(&request.into_inner().id)?;
        Ok(Response::new(worker.info().await))
    }

    async fn cordon(
        &self,
        request: Request<CordonRequest>,
    ) -> Result<Response<WorkerInfo>, Status> {
        let worker = self.find(&request.into_inner().id)?;
        self.set_state(&worker, AdminState::Cordoned).await?;
        Ok(Response::new(worker.info().await))
    }

    async fn uncordon(
        &self,
        request: Request<CordonRequest>,
    ) -> Result<Response<WorkerInfo>, Status> {
        let worker = self.find(&request.into_inner().id)?;
        self.set_state(&worker, AdminState::Ready).await?;
        Ok(Response::new(worker.info().await))
    }

    async fn drain(&self, request: Request<DrainRequest>) -> Result<Response<DrainStream>, Status> {
        let r = request.into_inner();
        let timeout = if r.timeout_seconds > 0.0 && r.timeout_seconds.is_finite() {
            Duration::from_secs_f64(r.timeout_seconds)
        } else {
            self.drain_timeout
        };
        let worker = self.find(&r.id)?;
        self.set_state(&worker, AdminState::Draining).await?;
        let state = Arc::clone(&self.state);
        let drain_timeout = self.drain_timeout;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let service = AdminService {
                state,
                drain_timeout,
            };
            let deadline = Instant::now() + timeout;
            loop {
                let info = match service.find(&r.id) {
                    Ok(worker) => worker.info().await,
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                };
                let drained = info.state == WorkerState::Drained as i32;
                let running = info.load.map(|l| l.running_sequences).unwrap_or_default();
                if tx
                    .send(Ok(DrainProgress {
                        worker: Some(info),
                        drained,
                    }))
                    .await
                    .is_err()
                    || drained
                {
                    return;
                }
                if Instant::now() >= deadline {
                    let message = format!(
                        "worker `{}` still runs {running} sequences after {:.0} s; it stays cordoned",
                        r.id,
                        timeout.as_secs_f64()
                    );
                    let _ = tx.send(Err(Status::deadline_exceeded(message))).await;
                    return;
                }
                tokio::time::sleep(DRAIN_POLL).await;
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn cluster_summary(
        &self,
        _: Request<ClusterSummaryRequest>,
    ) -> Result<Response<ClusterSummaryResponse>, Status> {
        let workers = self.all().await;
        let pools = [WorkerRole::Prefill, WorkerRole::Decode]
            .into_iter()
            .map(|role| {
                let mut pool = PoolSummary {
                    role: role as i32,
                    ..PoolSummary::default()
                };
                for w in workers.iter().filter(|w| w.role == role as i32) {
                    pool.workers += 1;
                    if w.state == WorkerState::Ready as i32 {
                        pool.ready += 1;
                    }
                    let load = w.load.unwrap_or_default();
                    pool.queued_prefill_tokens += load.queued_prefill_tokens;
                    pool.running_sequences += load.running_sequences;
                    pool.kv_blocks_used += load.kv_blocks_used;
                    pool.kv_blocks_total += load.kv_blocks_total;
                    pool.tokens_per_second += load.tokens_per_second;
                }
                pool
            })
            .collect();
        Ok(Response::new(ClusterSummaryResponse {
            model: self.state.validator.card.name.clone(),
            pools,
            router_in_flight: workers
                .iter()
                .filter(|w| w.role == WorkerRole::Decode as i32)
                .filter_map(|w| w.load.map(|l| l.router_in_flight))
                .sum(),
        }))
    }
}

/// Checks the admin token (`authorization: Bearer <token>`); without a configured token,
/// only loopback clients are let in.
pub(crate) fn authorize(
    token: Option<Arc<str>>,
) -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |request: Request<()>| {
        let Some(token) = &token else {
            return match request.remote_addr() {
                Some(addr) if addr.ip().is_loopback() => Ok(request),
                _ => Err(Status::unauthenticated(
                    "this router has no admin token, so admin calls are accepted from loopback only; start it with --admin-token",
                )),
            };
        };
        let given = request
            .metadata()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match given {
            None => Err(Status::unauthenticated(
                "admin calls need `authorization: Bearer <token>` (tandemctl --token or TANDEM_ADMIN_TOKEN)",
            )),
            Some(given) if given.as_bytes() == token.as_bytes() => Ok(request),
            Some(_) => Err(Status::unauthenticated("the admin token is wrong")),
        }
    }
}

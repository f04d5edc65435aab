//! `tandem.v1.Admin`: workers and pools with live load, cordon, uncordon, drain, move and
//! rebalance. State changes act on this router's choice of workers, so a cordoned worker gets
//! no new request while the ones it has run to completion; a move drains the worker before it
//! switches role, so no request fails.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_common::registry::{DesiredState, WorkerRole as PoolRole};
use tandem_proto::internal::v1::worker_client::WorkerClient;
use tandem_proto::internal::v1::{Role, StatsRequest, SwitchRoleRequest};
use tandem_proto::v1::admin_server::Admin;
use tandem_proto::v1::{
    ClusterSummaryRequest, ClusterSummaryResponse, CordonRequest, DescribeWorkerRequest,
    DrainProgress, DrainRequest, ExplainRouteRequest, ExplainRouteResponse, ListWorkersRequest,
    ListWorkersResponse, MoveProgress, MoveRequest, PoolSummary, RebalanceRequest, RouteCandidate,
    WorkerInfo, WorkerLoad, WorkerRole, WorkerState,
};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::RouterError;
use crate::pool::{AdminState, Worker};
use crate::service::RouterState;

/// Longest wait for one worker's stats before it is shown as unreachable.
const STATS_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a drain checks the worker's load.
const DRAIN_POLL: Duration = Duration::from_millis(200);
/// Longest wait for a drained worker to switch role (it only swaps engine threads).
const SWITCH_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for a switched worker to show up in its new pool (a registry round trip).
const JOIN_TIMEOUT: Duration = Duration::from_secs(15);
/// How often a move checks whether the worker joined its new pool.
const JOIN_POLL: Duration = Duration::from_millis(100);
/// Metadata key of the admin token.
const AUTHORIZATION: &str = "authorization";

#[derive(Clone)]
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

    fn state(&self) -> AdminState {
        match self {
            Self::Prefill(w) => w.state(),
            Self::Decode(w) => w.state(),
        }
    }

    fn role(&self) -> PoolRole {
        match self {
            Self::Prefill(_) => PoolRole::Prefill,
            Self::Decode(_) => PoolRole::Decode,
        }
    }

    fn requests_in_flight(&self) -> usize {
        match self {
            Self::Prefill(w) => w.requests_in_flight(),
            Self::Decode(w) => w.requests_in_flight(),
        }
    }

    fn control(&self) -> WorkerClient<Channel> {
        match self {
            Self::Prefill(w) => w.info.clone(),
            Self::Decode(w) => w.info.clone(),
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
        tokens_total: stats.tokens_total,
        cached_prompt_tokens: stats.cached_prompt_tokens,
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
            role: Some(worker.role()),
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

    /// A request's timeout, or the router's drain timeout when it gives none.
    fn timeout_or_default(&self, seconds: f64) -> Duration {
        if seconds > 0.0 && seconds.is_finite() {
            Duration::from_secs_f64(seconds)
        } else {
            self.drain_timeout
        }
    }

    /// Reports `id`'s load through `progress` (as `report` shapes it) until it has no request
    /// left; DEADLINE_EXCEEDED once `timeout` passes first.
    async fn wait_drained<T>(
        &self,
        id: &str,
        timeout: Duration,
        progress: &mpsc::Sender<Result<T, Status>>,
        report: impl Fn(WorkerInfo, bool) -> T,
    ) -> Result<(), Status> {
        let deadline = Instant::now() + timeout;
        loop {
            let info = self.find(id)?.info().await;
            let drained = info.state == WorkerState::Drained as i32;
            let running = info.load.map(|l| l.running_sequences).unwrap_or_default();
            if progress.send(Ok(report(info, drained))).await.is_err() {
                return Err(Status::cancelled("the caller went away"));
            }
            if drained {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Status::deadline_exceeded(format!(
                    "worker `{id}` still runs {running} sequences after {:.0} s",
                    timeout.as_secs_f64()
                )));
            }
            tokio::time::sleep(DRAIN_POLL).await;
        }
    }

    /// Moves worker `id` to the `to` pool: drain it, have it switch role (its weights stay
    /// loaded), record the role, and put it in service once the router sees it in its new
    /// pool. Steps go to `progress`; returns the worker as it ends up. On a drain timeout or a
    /// refused switch the worker goes back to the state it had.
    async fn move_worker(
        &self,
        id: &str,
        to: PoolRole,
        timeout: Duration,
        progress: &mpsc::Sender<Result<MoveProgress, Status>>,
    ) -> Result<WorkerInfo, Status> {
        let worker = self.find(id)?;
        if worker.role() == to {
            return Ok(worker.info().await);
        }
        if worker.role() == PoolRole::Decode && self.state.cluster.decode.workers().len() <= 1 {
            return Err(Status::failed_precondition(format!(
                "`{id}` is the only decode worker; the cluster needs one to generate tokens"
            )));
        }
        let before = worker.state();
        self.set_state(&worker, AdminState::Draining).await?;
        let report = |info: WorkerInfo, drained: bool| {
            let running = info.load.map(|l| l.running_sequences).unwrap_or_default();
            MoveProgress {
                message: if drained {
                    format!("`{id}` drained; switching it to {}", role_name(to))
                } else {
                    format!("draining `{id}`: {running} sequences running")
                },
                worker: Some(info),
                done: false,
            }
        };
        let switched = match self.wait_drained(id, timeout, progress, report).await {
            Ok(()) => self.switch(&worker, to).await,
            Err(status) => Err(with_context(
                status,
                "; the move is abandoned and the worker is back as it was",
            )),
        };
        if let Err(status) = switched {
            self.set_state(&worker, before).await?;
            return Err(status);
        }
        self.state
            .local_records
            .set_role(id, to)
            .await
            .map_err(|e| Status::unavailable(format!("recording `{id}`'s new role: {e}")))?;
        let desired = DesiredState {
            role: Some(to),
            ..DesiredState::default()
        };
        self.state
            .registry
            .set_desired(id, desired)
            .await
            .map_err(|e| Status::unavailable(format!("recording the change: {e}")))?;
        let deadline = Instant::now() + JOIN_TIMEOUT;
        loop {
            match self.find(id) {
                Ok(moved) if moved.role() == to => {
                    moved.set_state(AdminState::Ready);
                    return Ok(moved.info().await);
                }
                _ if Instant::now() >= deadline => {
                    return Err(Status::unavailable(format!(
                        "`{id}` serves {} now, but its registry record did not show it within {} s",
                        role_name(to),
                        JOIN_TIMEOUT.as_secs()
                    )));
                }
                _ => tokio::time::sleep(JOIN_POLL).await,
            }
        }
    }

    /// Has a drained worker switch to `to`.
    async fn switch(&self, worker: &AnyWorker, to: PoolRole) -> Result<(), Status> {
        let id = worker.id();
        let role = match to {
            PoolRole::Prefill => Role::Prefill,
            PoolRole::Decode => Role::Decode,
        };
        let mut control = worker.control();
        let call = control.switch_role(SwitchRoleRequest { role: role as i32 });
        match tokio::time::timeout(SWITCH_TIMEOUT, call).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(status)) => Err(Status::new(
                status.code(),
                format!(
                    "`{id}` did not switch to {}: {}",
                    role_name(to),
                    status.message()
                ),
            )),
            Err(_) => Err(Status::unavailable(format!(
                "`{id}` did not switch role within {} s",
                SWITCH_TIMEOUT.as_secs()
            ))),
        }
    }

    /// The moves, one worker at a time and least busy first, that leave `prefill` and
    /// `decode` workers in the pools.
    fn plan_rebalance(
        &self,
        prefill: usize,
        decode: usize,
    ) -> Result<Vec<(String, PoolRole)>, Status> {
        let cluster = &self.state.cluster;
        let prefill_now: Vec<AnyWorker> = cluster
            .prefill
            .workers()
            .into_iter()
            .map(AnyWorker::Prefill)
            .collect();
        let decode_now: Vec<AnyWorker> = cluster
            .decode
            .workers()
            .into_iter()
            .map(AnyWorker::Decode)
            .collect();
        let total = prefill_now.len() + decode_now.len();
        if prefill + decode != total || decode == 0 {
            return Err(Status::invalid_argument(format!(
                "the cluster has {total} workers ({} prefill, {} decode): prefill and decode \
                 must add up to {total}, with at least one decode worker",
                prefill_now.len(),
                decode_now.len(),
            )));
        }
        let (mut surplus, to, count) = if prefill_now.len() > prefill {
            (prefill_now, PoolRole::Decode, decode - decode_now.len())
        } else {
            (decode_now, PoolRole::Prefill, prefill - prefill_now.len())
        };
        surplus.sort_by(|a, b| {
            (a.requests_in_flight(), a.id()).cmp(&(b.requests_in_flight(), b.id()))
        });
        Ok(surplus
            .iter()
            .take(count)
            .map(|w| (w.id().to_owned(), to))
            .collect())
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
type MoveStream = Pin<Box<dyn Stream<Item = Result<MoveProgress, Status>> + Send>>;

#[tonic::async_trait]
impl Admin for AdminService {
    type DrainStream = DrainStream;
    type MoveStream = MoveStream;
    type RebalanceStream = MoveStream;

    async fn list_workers(
        &self,
        _: Request<ListWorkersRequest>,
    ) -> Result<Response<ListWorkersResponse>, Status> {
        Ok(Response::new(ListWorkersResponse {
            workers: self.all().await,
        }))
    }

    async fn explain_route(
        &self,
        request: Request<ExplainRouteRequest>,
    ) -> Result<Response<ExplainRouteResponse>, Status> {
        let request = request.into_inner();
        let prompt = if request.token_ids.is_empty() {
            let state = Arc::clone(&self.state);
            tokio::task::spawn_blocking(move || state.validator.card.encode(&request.text))
                .await
                .map_err(|e| RouterError::Internal(format!("tokenize task: {e}")))??
        } else {
            request.token_ids
        };
        let cluster = &self.state.cluster;
        let hashes = crate::prefix_index::PromptHashes::new(&prompt);
        let mut candidates: Vec<RouteCandidate> = cluster
            .prefill
            .workers()
            .iter()
            .map(|w| {
                let uncached = cluster.uncached_tokens(w, &hashes);
                let queued = w.load() as u64;
                RouteCandidate {
                    worker: w.id.clone(),
                    state: match w.state() {
                        AdminState::Ready => WorkerState::Ready,
                        AdminState::Cordoned => WorkerState::Cordoned,
                        AdminState::Draining => WorkerState::Draining,
                    } as i32,
                    cached_tokens: (prompt.len() - uncached) as u32,
                    uncached_tokens: uncached as u32,
                    queued_tokens: queued,
                    score: uncached as u64 + queued,
                    chosen: false,
                }
            })
            .collect();
        if let Some(best) = candidates
            .iter_mut()
            .filter(|c| c.state == WorkerState::Ready as i32)
            .min_by_key(|c| c.score)
        {
            best.chosen = true;
        }
        Ok(Response::new(ExplainRouteResponse {
            routing: format!("{:?}", cluster.routing),
            prompt_tokens: prompt.len() as u32,
            candidates,
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
        let timeout = self.timeout_or_default(r.timeout_seconds);
        let worker = self.find(&r.id)?;
        self.set_state(&worker, AdminState::Draining).await?;
        let service = self.clone();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let report = |worker, drained| DrainProgress {
                worker: Some(worker),
                drained,
            };
            if let Err(status) = service.wait_drained(&r.id, timeout, &tx, report).await {
                let _ = tx
                    .send(Err(with_context(status, "; it stays cordoned")))
                    .await;
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn r#move(&self, request: Request<MoveRequest>) -> Result<Response<MoveStream>, Status> {
        let r = request.into_inner();
        let to = pool_role(r.to)?;
        let timeout = self.timeout_or_default(r.timeout_seconds);
        let service = self.clone();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let last = match service.move_worker(&r.id, to, timeout, &tx).await {
                Ok(worker) => Ok(MoveProgress {
                    message: format!("`{}` serves {} now", r.id, role_name(to)),
                    worker: Some(worker),
                    done: true,
                }),
                Err(status) => Err(status),
            };
            let _ = tx.send(last).await;
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn rebalance(
        &self,
        request: Request<RebalanceRequest>,
    ) -> Result<Response<MoveStream>, Status> {
        let r = request.into_inner();
        let timeout = self.timeout_or_default(r.timeout_seconds);
        let moves = self.plan_rebalance(r.prefill as usize, r.decode as usize)?;
        let service = self.clone();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let total = moves.len();
            for (n, (id, to)) in moves.into_iter().enumerate() {
                let moved = match service.move_worker(&id, to, timeout, &tx).await {
                    Ok(worker) => Ok(MoveProgress {
                        message: format!("`{id}` serves {} now ({}/{total})", role_name(to), n + 1),
                        worker: Some(worker),
                        done: false,
                    }),
                    Err(status) => Err(status),
                };
                let failed = moved.is_err();
                if tx.send(moved).await.is_err() || failed {
                    return;
                }
            }
            let _ = tx
                .send(Ok(MoveProgress {
                    message: format!(
                        "pools hold {} prefill and {} decode workers",
                        r.prefill, r.decode
                    ),
                    worker: None,
                    done: true,
                }))
                .await;
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

/// The pool a request names.
fn pool_role(role: i32) -> Result<PoolRole, Status> {
    match WorkerRole::try_from(role) {
        Ok(WorkerRole::Prefill) => Ok(PoolRole::Prefill),
        Ok(WorkerRole::Decode) => Ok(PoolRole::Decode),
        _ => Err(Status::invalid_argument(
            "`to` must be WORKER_ROLE_PREFILL or WORKER_ROLE_DECODE",
        )),
    }
}

fn role_name(role: PoolRole) -> &'static str {
    match role {
        PoolRole::Prefill => "prefill",
        PoolRole::Decode => "decode",
    }
}

/// `status` with `context` appended to its message.
fn with_context(status: Status, context: &str) -> Status {
    Status::new(status.code(), format!("{}{context}", status.message()))
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

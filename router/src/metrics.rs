//! The router's Prometheus metrics (`tandem_router_*`): requests by outcome, time to first
//! token, inter-token latency, queue time, end-to-end latency, tokens, and at scrape time the
//! requests running and waiting and the workers in each pool by state.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tandem_common::metrics::{
    Counter, Exporter, Family, Gauge, Histogram, Labels, Registry, Unit, latency_histogram,
};

use crate::service::RouterState;

/// What the request path records.
#[derive(Debug)]
pub(crate) struct RouterMetrics {
    registry: Arc<Registry>,
    requests: Family<Labels, Counter>,
    pub(crate) time_to_first_token: Histogram,
    pub(crate) inter_token_latency: Histogram,
    pub(crate) queue_time: Histogram,
    pub(crate) request_duration: Histogram,
    pub(crate) prompt_tokens: Counter,
    pub(crate) output_tokens: Counter,
    running: Gauge,
    waiting: Gauge,
    workers: Family<Labels, Gauge>,
}

impl Default for RouterMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("tandem_router");
        let requests = Family::<Labels, Counter>::default();
        registry.register(
            "requests",
            "Generation requests by outcome: ok, cancelled (the client left), or the gRPC code they failed with",
            requests.clone(),
        );
        let histogram = |registry: &mut Registry, name: &str, help: &str| {
            let h = latency_histogram();
            registry.register_with_unit(name, help, Unit::Seconds, h.clone());
            h
        };
        let time_to_first_token = histogram(
            &mut registry,
            "time_to_first_token",
            "From a request's arrival to its first token sent to the client",
        );
        let inter_token_latency = histogram(
            &mut registry,
            "inter_token_latency",
            "Between consecutive tokens sent to a client",
        );
        let queue_time = histogram(
            &mut registry,
            "queue_time",
            "Waiting for an admission slot (--max-concurrent-requests)",
        );
        let request_duration = histogram(
            &mut registry,
            "request_duration",
            "From arrival to the end of the stream, any outcome",
        );
        let prompt_tokens = Counter::default();
        registry.register(
            "prompt_tokens",
            "Prompt tokens of admitted requests",
            prompt_tokens.clone(),
        );
        let output_tokens = Counter::default();
        registry.register(
            "output_tokens",
            "Tokens streamed to clients",
            output_tokens.clone(),
        );
        let running = Gauge::default();
        registry.register(
            "running_requests",
            "Requests holding an admission slot",
            running.clone(),
        );
        let waiting = Gauge::default();
        registry.register(
            "waiting_requests",
            "Requests queued for a slot",
            waiting.clone(),
        );
        let workers = Family::<Labels, Gauge>::default();
        registry.register(
            "workers",
            "Workers the router knows, by pool and admin state",
            workers.clone(),
        );
        Self {
            registry: Arc::new(registry),
            requests,
            time_to_first_token,
            inter_token_latency,
            queue_time,
            request_duration,
            prompt_tokens,
            output_tokens,
            running,
            waiting,
            workers,
        }
    }
}

impl RouterMetrics {
    /// Counts one request that ended with `outcome`.
    pub(crate) fn request_ended(&self, outcome: &str) {
        self.requests
            .get_or_create(&vec![("outcome", outcome.to_owned())])
            .inc();
    }
}

/// `outcome` label of a request that failed with `code`: its gRPC code in snake case.
pub(crate) fn outcome_of(code: tonic::Code) -> String {
    let name = format!("{code:?}");
    let mut snake = String::with_capacity(name.len() + 4);
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            snake.push('_');
        }
        snake.push(c.to_ascii_lowercase());
    }
    snake
}

/// The router's `/metrics` and probes.
pub(crate) struct RouterExporter {
    pub(crate) state: Arc<RouterState>,
    /// Set once the router serves, cleared when it stops.
    pub(crate) serving: AtomicBool,
}

impl Exporter for RouterExporter {
    async fn scrape(&self) -> Arc<Registry> {
        let state = &self.state;
        let metrics = &state.metrics;
        let (running, waiting) = state.admission.occupancy();
        metrics.running.set(running as i64);
        metrics.waiting.set(waiting as i64);
        metrics.workers.clear();
        let prefill = state
            .cluster
            .prefill
            .workers()
            .iter()
            .map(|w| w.state())
            .collect();
        let decode = state
            .cluster
            .decode
            .workers()
            .iter()
            .map(|w| w.state())
            .collect();
        let pools: [(&str, Vec<_>); 2] = [("prefill", prefill), ("decode", decode)];
        for (pool, states) in pools {
            for worker_state in states {
                let worker_state = format!("{worker_state:?}").to_lowercase();
                metrics
                    .workers
                    .get_or_create(&vec![("pool", pool.to_owned()), ("state", worker_state)])
                    .inc();
            }
        }
        Arc::clone(&metrics.registry)
    }

    fn ready(&self) -> bool {
        self.serving.load(Ordering::Relaxed) && !self.state.cluster.decode.workers().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_are_grpc_codes_in_snake_case() {
        assert_eq!(
            outcome_of(tonic::Code::ResourceExhausted),
            "resource_exhausted"
        );
        assert_eq!(outcome_of(tonic::Code::Unavailable), "unavailable");
        assert_eq!(outcome_of(tonic::Code::Ok), "ok");
    }
}

//! A worker's Prometheus metrics (`tandem_worker_*`): prefill and KV-transfer times and bytes
//! as they happen; sequences, KV blocks, tokens and per-expert load read from the engine at
//! scrape time. `/readyz` turns ready once the model is loaded and the worker serves.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use tandem_common::metrics::{
    Counter, Exporter, Family, Gauge, Histogram, Labels, Registry, Unit, latency_histogram,
};
use tandem_proto::internal::v1::{Role, WorkerStats};

/// Reads the engine's statistics (None when the engine does not answer).
pub(crate) type StatsSource =
    Box<dyn Fn() -> Pin<Box<dyn Future<Output = Option<WorkerStats>> + Send>> + Send + Sync>;

/// Engine totals since start, as they were at the last scrape: counters grow by the change.
#[derive(Debug, Default)]
struct Totals {
    tokens: u64,
    cached_prompt_tokens: u64,
    expert_load: Vec<u64>,
}

pub(crate) struct WorkerMetrics {
    registry: Arc<Registry>,
    pub(crate) prefill_duration: Histogram,
    pub(crate) kv_transfer_duration: Histogram,
    pub(crate) kv_transfer_bytes: Counter,
    pub(crate) kv_in_place_bytes: Counter,
    gauges: Family<Labels, Gauge>,
    tokens: Counter,
    cached_prompt_tokens: Counter,
    expert_tokens: Family<Labels, Counter>,
    totals: Mutex<Totals>,
    source: RwLock<Option<StatsSource>>,
    serving: AtomicBool,
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("tandem_worker");
        let prefill_duration = latency_histogram();
        registry.register_with_unit(
            "prefill_duration",
            "From a prefill request's arrival to its last KV frame sent",
            Unit::Seconds,
            prefill_duration.clone(),
        );
        let kv_transfer_duration = latency_histogram();
        registry.register_with_unit(
            "kv_transfer_duration",
            "Time one prefill spent writing its KV frames to the decode worker",
            Unit::Seconds,
            kv_transfer_duration.clone(),
        );
        let kv_transfer_bytes = Counter::default();
        registry.register_with_unit(
            "kv_transfer",
            "KV bytes sent to decode workers",
            Unit::Bytes,
            kv_transfer_bytes.clone(),
        );
        let kv_in_place_bytes = Counter::default();
        registry.register_with_unit(
            "kv_in_place",
            "KV bytes written straight into the shared caches of decode workers on this GPU",
            Unit::Bytes,
            kv_in_place_bytes.clone(),
        );
        let gauges = Family::<Labels, Gauge>::default();
        registry.register(
            "engine",
            "Engine state by quantity: running_sequences, waiting_sequences, pending_transfers, queued_prefill_tokens, kv_blocks_used, kv_blocks_total; role is the role served",
            gauges.clone(),
        );
        let tokens = Counter::default();
        registry.register(
            "tokens",
            "Tokens computed: generated tokens on decode, prompt tokens on prefill",
            tokens.clone(),
        );
        let cached_prompt_tokens = Counter::default();
        registry.register(
            "cached_prompt_tokens",
            "Prompt tokens the prefix cache supplied instead of computing them",
            cached_prompt_tokens.clone(),
        );
        let expert_tokens = Family::<Labels, Counter>::default();
        registry.register(
            "expert_tokens",
            "(token, expert) pairs computed per expert, summed over layers and ranks",
            expert_tokens.clone(),
        );
        Self {
            registry: Arc::new(registry),
            prefill_duration,
            kv_transfer_duration,
            kv_transfer_bytes,
            kv_in_place_bytes,
            gauges,
            tokens,
            cached_prompt_tokens,
            expert_tokens,
            totals: Mutex::default(),
            source: RwLock::new(None),
            serving: AtomicBool::new(false),
        }
    }
}

impl WorkerMetrics {
    /// Where scrapes read the engine from, once it is loaded.
    pub(crate) fn set_source(&self, source: StatsSource) {
        *self.source.write().unwrap_or_else(PoisonError::into_inner) = Some(source);
    }

    pub(crate) fn set_serving(&self, serving: bool) {
        self.serving.store(serving, Ordering::Relaxed);
    }

    fn record(&self, stats: &WorkerStats) {
        let role = if stats.role == Role::Prefill as i32 {
            "prefill"
        } else {
            "decode"
        };
        self.gauges.clear();
        for (quantity, value) in [
            ("running_sequences", u64::from(stats.running_sequences)),
            ("waiting_sequences", u64::from(stats.waiting_sequences)),
            ("pending_transfers", u64::from(stats.pending_transfers)),
            ("queued_prefill_tokens", stats.queued_prefill_tokens),
            ("kv_blocks_used", u64::from(stats.kv_blocks_used)),
            ("kv_blocks_total", u64::from(stats.kv_blocks_total)),
        ] {
            self.gauges
                .get_or_create(&vec![
                    ("quantity", quantity.to_owned()),
                    ("role", role.to_owned()),
                ])
                .set(value as i64);
        }
        let mut totals = self.totals.lock().unwrap_or_else(PoisonError::into_inner);
        self.tokens
            .inc_by(stats.tokens_total.saturating_sub(totals.tokens));
        totals.tokens = totals.tokens.max(stats.tokens_total);
        self.cached_prompt_tokens.inc_by(
            stats
                .cached_prompt_tokens
                .saturating_sub(totals.cached_prompt_tokens),
        );
        totals.cached_prompt_tokens = totals.cached_prompt_tokens.max(stats.cached_prompt_tokens);
        totals.expert_load.resize(stats.expert_load.len(), 0);
        for (expert, (&now, seen)) in stats
            .expert_load
            .iter()
            .zip(totals.expert_load.iter_mut())
            .enumerate()
        {
            self.expert_tokens
                .get_or_create(&vec![("expert", expert.to_string())])
                .inc_by(now.saturating_sub(*seen));
            *seen = (*seen).max(now);
        }
    }
}

/// The worker's `/metrics` and probes.
pub(crate) struct WorkerExporter(pub(crate) Arc<WorkerMetrics>);

impl Exporter for WorkerExporter {
    async fn scrape(&self) -> Arc<Registry> {
        let stats = {
            let source = self.0.source.read().unwrap_or_else(PoisonError::into_inner);
            source.as_ref().map(|read| read())
        };
        if let Some(stats) = stats
            && let Some(stats) = stats.await
        {
            self.0.record(&stats);
        }
        Arc::clone(&self.0.registry)
    }

    fn ready(&self) -> bool {
        self.0.serving.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_totals_become_counters_that_only_grow() {
        let metrics = WorkerMetrics::default();
        let mut stats = WorkerStats {
            role: Role::Decode as i32,
            running_sequences: 3,
            kv_blocks_used: 12,
            kv_blocks_total: 100,
            tokens_total: 40,
            expert_load: vec![5, 0, 7],
            ..WorkerStats::default()
        };
        metrics.record(&stats);
        stats.tokens_total = 55;
        stats.expert_load = vec![6, 2, 7];
        metrics.record(&stats);
        let text = tandem_common::metrics::encode(&metrics.registry);
        assert!(text.contains("tandem_worker_tokens_total 55"), "{text}");
        assert!(
            text.contains("tandem_worker_expert_tokens_total{expert=\"1\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("tandem_worker_engine{quantity=\"kv_blocks_used\",role=\"decode\"} 12"),
            "{text}"
        );
    }
}

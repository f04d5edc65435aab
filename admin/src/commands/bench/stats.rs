//! Latency percentiles, throughput and goodput of one sweep point.

use std::time::Duration;

use serde_json::{Value, json};

use super::Load;
use super::client::RequestTiming;

/// p50, p90 and p99 of a set of milliseconds (nearest rank); zeros when empty.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

impl Percentiles {
    fn of(mut values: Vec<f64>) -> Self {
        if values.is_empty() {
            return Self::default();
        }
        values.sort_by(f64::total_cmp);
        let rank =
            |p: f64| values[((p * values.len() as f64).ceil() as usize).clamp(1, values.len()) - 1];
        Self {
            p50: rank(0.50),
            p90: rank(0.90),
            p99: rank(0.99),
        }
    }

    fn to_json(self) -> Value {
        json!({"p50": self.p50, "p90": self.p90, "p99": self.p99})
    }
}

/// Everything reported for one load level.
#[derive(Debug, Clone)]
pub(crate) struct PointStats {
    pub load: Load,
    pub completed: usize,
    pub failed: usize,
    pub first_error: Option<String>,
    pub wall_seconds: f64,
    pub requests_per_second: f64,
    pub output_tokens_per_second: f64,
    /// Median over requests of 1 / TPOT: what one user sees.
    pub tokens_per_second_per_user: f64,
    pub goodput_requests_per_second: f64,
    pub ttft_ms: Percentiles,
    pub tpot_ms: Percentiles,
    pub itl_ms: Percentiles,
    pub e2e_ms: Percentiles,
    /// Every completed request's TTFT, sorted, for the chart.
    pub ttft_samples_ms: Vec<f64>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl PointStats {
    pub(crate) fn new(
        load: Load,
        timings: &[RequestTiming],
        wall: Duration,
        slo_ttft_ms: Option<f64>,
        slo_tpot_ms: Option<f64>,
    ) -> Self {
        let ok: Vec<&RequestTiming> = timings.iter().filter(|t| t.error.is_none()).collect();
        let ttft: Vec<f64> = ok.iter().filter_map(|t| t.ttft()).map(ms).collect();
        // Time per output token after the first, per request.
        let tpot: Vec<f64> = ok
            .iter()
            .filter(|t| t.output_tokens > 1)
            .filter_map(|t| {
                let first = t.chunks.first()?.0;
                Some(ms(t.done.saturating_sub(first)) / f64::from(t.output_tokens - 1))
            })
            .collect();
        // Gaps between chunks, spread over the tokens each brought.
        let itl: Vec<f64> = ok
            .iter()
            .flat_map(|t| {
                t.chunks.windows(2).flat_map(|w| {
                    let n = w[1].1.max(1);
                    std::iter::repeat_n(
                        ms(w[1].0.saturating_sub(w[0].0)) / f64::from(n),
                        n as usize,
                    )
                })
            })
            .collect();
        let e2e: Vec<f64> = ok
            .iter()
            .map(|t| ms(t.done.saturating_sub(t.sent)))
            .collect();
        let good = ok
            .iter()
            .filter(|t| {
                let ttft_ok = slo_ttft_ms.is_none_or(|slo| t.ttft().is_some_and(|x| ms(x) <= slo));
                let tpot_ok = slo_tpot_ms.is_none_or(|slo| {
                    t.output_tokens <= 1
                        || t.chunks.first().is_some_and(|(first, _)| {
                            ms(t.done.saturating_sub(*first)) / f64::from(t.output_tokens - 1)
                                <= slo
                        })
                });
                ttft_ok && tpot_ok
            })
            .count();
        let seconds = wall.as_secs_f64().max(1e-9);
        let tokens: u64 = ok.iter().map(|t| u64::from(t.output_tokens)).sum();
        let mut ttft_samples_ms = ttft.clone();
        ttft_samples_ms.sort_by(f64::total_cmp);
        let tpot_p = Percentiles::of(tpot);
        Self {
            load,
            completed: ok.len(),
            failed: timings.len() - ok.len(),
            first_error: timings.iter().find_map(|t| t.error.clone()),
            wall_seconds: seconds,
            requests_per_second: ok.len() as f64 / seconds,
            output_tokens_per_second: tokens as f64 / seconds,
            tokens_per_second_per_user: if tpot_p.p50 > 0.0 {
                1e3 / tpot_p.p50
            } else {
                0.0
            },
            goodput_requests_per_second: good as f64 / seconds,
            ttft_ms: Percentiles::of(ttft),
            tpot_ms: tpot_p,
            itl_ms: Percentiles::of(itl),
            e2e_ms: Percentiles::of(e2e),
            ttft_samples_ms,
        }
    }

    pub(crate) fn header() -> String {
        format!(
            "{:<18} {:>5} {:>5} {:>8} {:>9} {:>9} {:>24} {:>24} {:>16} {:>9}",
            "load",
            "ok",
            "fail",
            "req/s",
            "out tok/s",
            "tok/s/usr",
            "ttft ms p50/p90/p99",
            "tpot ms p50/p90/p99",
            "e2e ms p50/p99",
            "goodput"
        )
    }

    pub(crate) fn row(&self) -> String {
        let p = |x: Percentiles| format!("{:.1}/{:.1}/{:.1}", x.p50, x.p90, x.p99);
        let mut row = format!(
            "{:<18} {:>5} {:>5} {:>8.2} {:>9.1} {:>9.1} {:>24} {:>24} {:>16} {:>9.2}",
            self.load.to_string(),
            self.completed,
            self.failed,
            self.requests_per_second,
            self.output_tokens_per_second,
            self.tokens_per_second_per_user,
            p(self.ttft_ms),
            p(self.tpot_ms),
            format!("{:.0}/{:.0}", self.e2e_ms.p50, self.e2e_ms.p99),
            self.goodput_requests_per_second,
        );
        if let Some(error) = &self.first_error {
            row.push_str(&format!("\n  first error: {error}"));
        }
        row
    }

    pub(crate) fn to_json(&self) -> Value {
        let (kind, value) = match self.load {
            Load::Concurrency(c) => ("concurrency", json!(c)),
            Load::Rate(r) => ("rate", json!(r)),
        };
        json!({
            kind: value,
            "completed": self.completed,
            "failed": self.failed,
            "first_error": self.first_error,
            "wall_seconds": self.wall_seconds,
            "requests_per_second": self.requests_per_second,
            "output_tokens_per_second": self.output_tokens_per_second,
            "tokens_per_second_per_user": self.tokens_per_second_per_user,
            "goodput_requests_per_second": self.goodput_requests_per_second,
            "ttft_ms": self.ttft_ms.to_json(),
            "tpot_ms": self.tpot_ms.to_json(),
            "itl_ms": self.itl_ms.to_json(),
            "e2e_ms": self.e2e_ms.to_json(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_take_the_nearest_rank() {
        let p = Percentiles::of((1..=100).map(f64::from).collect());
        assert_eq!((p.p50, p.p90, p.p99), (50.0, 90.0, 99.0));
        let one = Percentiles::of(vec![7.0]);
        assert_eq!((one.p50, one.p99), (7.0, 7.0));
    }

    #[test]
    fn goodput_counts_only_requests_within_both_slos() {
        let at = Duration::from_millis;
        let request = |first_ms: u64, done_ms: u64| RequestTiming {
            sent: at(0),
            chunks: vec![(at(first_ms), 1), (at(done_ms), 10)],
            done: at(done_ms),
            output_tokens: 11,
            ..RequestTiming::default()
        };
        // TTFT 10 ms / TPOT 10 ms, TTFT 300 ms, TPOT 50 ms.
        let timings = [request(10, 110), request(300, 400), request(10, 510)];
        let stats = PointStats::new(
            Load::Concurrency(3),
            &timings,
            at(1000),
            Some(100.0),
            Some(20.0),
        );
        assert_eq!(stats.completed, 3);
        assert!((stats.goodput_requests_per_second - 1.0).abs() < 1e-9);
        assert!((stats.output_tokens_per_second - 33.0).abs() < 1e-9);
    }
}

//! The planner: for N GPUs, try prefill TP, decode EP and the P:D split, simulate each at a
//! sweep of loads, and keep the Pareto front of tokens/s per GPU against tokens/s per user.

use serde::Serialize;

use crate::cluster::{
    Deployment, MAX_BATCH_PER_GPU, Outcome, PREFILL_BATCH_TOKENS, RequestSpec, Workload,
    simulate_requests,
};
use crate::cost::CostModel;

/// What a plan is asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanRequest {
    pub gpus: usize,
    /// Request lengths (with a trace, its means, for capacity estimates).
    pub isl: usize,
    pub osl: usize,
    /// p90 targets, seconds.
    pub slo_ttft_s: f64,
    pub slo_tpot_s: f64,
    /// Requests simulated per point (Poisson arrivals).
    pub requests: usize,
    /// Replay these requests instead, their arrival times stretched or squeezed to each load.
    pub trace: Option<Vec<RequestSpec>>,
}

/// The requests of one load point: Poisson at `rate`, or the trace at that mean rate.
fn load(request: &PlanRequest, rate: f64, poisson_requests: usize) -> Vec<RequestSpec> {
    match &request.trace {
        Some(trace) => {
            let first = trace.first().map_or(0.0, |r| r.arrival_s);
            let span = trace.last().map_or(0.0, |r| r.arrival_s) - first;
            // Its own mean rate over the target's.
            let scale = if span > 0.0 {
                trace.len() as f64 / span / rate
            } else {
                0.0
            };
            trace
                .iter()
                .map(|r| RequestSpec {
                    arrival_s: (r.arrival_s - first) * scale,
                    ..*r
                })
                .collect()
        }
        None => Workload {
            rate,
            isl: request.isl,
            osl: request.osl,
            requests: poisson_requests,
            seed: 1,
        }
        .requests(),
    }
}

/// One simulated (deployment, load) pair.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Point {
    pub deployment: Deployment,
    pub rate: f64,
    pub outcome: Outcome,
    pub meets_slo: bool,
}

/// Every point, the Pareto front among them, and the best one meeting the SLOs.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub points: Vec<Point>,
    pub pareto: Vec<Point>,
    pub chosen: Option<Point>,
}

/// Loads tried per deployment, as shares of its estimated capacity.
const LOAD_SHARES: [f64; 6] = [0.05, 0.2, 0.4, 0.6, 0.8, 0.95];
const TP_CHOICES: [usize; 4] = [1, 2, 4, 8];
/// Most requests simulated per point.
const MAX_REQUESTS: usize = 100_000;

/// Sequences `d`'s decode groups run at once.
fn decode_slots(cost: &CostModel, d: Deployment, context: usize) -> f64 {
    let per_gpu = cost
        .decode_capacity_per_gpu(d.ep, context as f64)
        .min(MAX_BATCH_PER_GPU);
    per_gpu * (d.ep * d.decode_groups) as f64
}

/// Deployments of exactly `gpus` GPUs: TP within one NVLink domain (and at most 8), EP any
/// width up to the GPUs left, at least one group of each.
pub fn deployments(cost: &CostModel, gpus: usize) -> Vec<Deployment> {
    let domain = cost.hardware.nvlink_domain;
    let mut out = Vec::new();
    for tp in TP_CHOICES
        .into_iter()
        .filter(|&t| t <= domain && cost.prefill_fits(t))
    {
        for prefill_groups in 1..=gpus / tp {
            let left = gpus - prefill_groups * tp;
            // Power-of-two widths, and one group of all that is left.
            let widths = (1..=left)
                .filter(|&e| (left.is_multiple_of(e) && e.is_power_of_two()) || e == left);
            for ep in widths {
                if cost.decode_capacity_per_gpu(ep, 1.0) < 1.0 {
                    continue;
                }
                out.push(Deployment {
                    prefill_groups,
                    tp,
                    decode_groups: left / ep,
                    ep,
                });
            }
        }
    }
    out
}

/// Requests per second `deployment` can sustain at most, from its unloaded costs: the
/// smaller of what prefill and decode finish.
fn capacity(cost: &CostModel, d: Deployment, isl: usize, osl: usize) -> f64 {
    let prefill_tokens = (PREFILL_BATCH_TOKENS as f64).max(isl as f64);
    let prefill_rate = d.prefill_groups as f64 * prefill_tokens
        / cost.prefill(d.tp, prefill_tokens, isl as f64).seconds()
        / isl as f64;
    let batch = decode_slots(cost, d, isl + osl) / d.decode_groups as f64;
    let step = cost
        .decode_step(d.ep, batch, isl as f64 + osl as f64 / 2.0)
        .seconds();
    let decode_rate = d.decode_groups as f64 * batch / step / osl as f64;
    prefill_rate.min(decode_rate)
}

/// Simulates every deployment at a sweep of loads.
pub fn plan(cost: &CostModel, request: &PlanRequest) -> Plan {
    let mut points = Vec::new();
    for deployment in deployments(cost, request.gpus) {
        let full = capacity(cost, deployment, request.isl, request.osl);
        // Enough requests to fill every decode slot a few times over, for a steady state.
        let slots = decode_slots(cost, deployment, request.isl + request.osl);
        let requests = request
            .requests
            .max((3.0 * slots) as usize)
            .min(MAX_REQUESTS);
        for share in LOAD_SHARES {
            let rate = full * share;
            let requests = load(request, rate, requests);
            if let Some(outcome) = simulate_requests(cost, deployment, &requests) {
                points.push(Point {
                    deployment,
                    rate,
                    outcome,
                    meets_slo: outcome.ttft_p90_s <= request.slo_ttft_s
                        && outcome.tpot_p90_s <= request.slo_tpot_s,
                });
            }
        }
    }
    let pareto = pareto(&points);
    let chosen = points
        .iter()
        .filter(|p| p.meets_slo)
        .max_by(|a, b| {
            a.outcome
                .tokens_per_s_per_gpu
                .total_cmp(&b.outcome.tokens_per_s_per_gpu)
        })
        .copied();
    Plan {
        points,
        pareto,
        chosen,
    }
}

/// Points no other point beats on both tokens/s per GPU and tokens/s per user, by rising
/// tokens/s per user.
pub fn pareto(points: &[Point]) -> Vec<Point> {
    let mut front: Vec<Point> = points
        .iter()
        .filter(|p| {
            !points.iter().any(|q| {
                let (a, b) = (&q.outcome, &p.outcome);
                a.tokens_per_s_per_gpu >= b.tokens_per_s_per_gpu
                    && a.tokens_per_s_per_user >= b.tokens_per_s_per_user
                    && (a.tokens_per_s_per_gpu > b.tokens_per_s_per_gpu
                        || a.tokens_per_s_per_user > b.tokens_per_s_per_user)
            })
        })
        .copied()
        .collect();
    front.sort_by(|a, b| {
        a.outcome
            .tokens_per_s_per_user
            .total_cmp(&b.outcome.tokens_per_s_per_user)
    });
    front
}

/// The best tokens/s per GPU on `front` among points giving each user at least
/// `tokens_per_s_per_user`.
pub fn throughput_at(front: &[Point], tokens_per_s_per_user: f64) -> Option<f64> {
    front
        .iter()
        .filter(|p| p.outcome.tokens_per_s_per_user >= tokens_per_s_per_user)
        .map(|p| p.outcome.tokens_per_s_per_gpu)
        .max_by(f64::total_cmp)
}

/// Helm values (deploy/helm/tandem) for `deployment`.
pub fn helm_values(d: Deployment, model_path: &str) -> String {
    format!(
        "# From tandemctl plan: {} prefill groups of TP {} and {} decode groups of EP {} ({} GPUs).\n\
         model:\n  path: {model_path:?}\n\
         prefill:\n  replicas: {}\n  tp: {}\n  device: cuda\n\
         decode:\n  replicas: {}\n  ep: {}\n  device: cuda\n",
        d.prefill_groups,
        d.tp,
        d.decode_groups,
        d.ep,
        d.gpus(),
        d.prefill_groups,
        d.tp,
        d.decode_groups,
        d.ep
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::fixtures::cost;

    #[test]
    fn deployments_use_every_gpu_and_keep_tp_inside_the_domain() {
        let c = cost("qwen3-30b-a3b", "h100");
        let all = deployments(&c, 16);
        assert!(!all.is_empty());
        assert!(all.iter().all(|d| d.gpus() == 16 && d.tp <= 8));
        assert!(all.contains(&Deployment {
            prefill_groups: 2,
            tp: 2,
            decode_groups: 3,
            ep: 4
        }));
    }

    #[test]
    fn the_chosen_point_meets_the_slo_and_sits_on_or_under_the_front() {
        let c = cost("qwen3-30b-a3b", "h100");
        let request = PlanRequest {
            gpus: 4,
            isl: 1024,
            osl: 128,
            slo_ttft_s: 2.0,
            slo_tpot_s: 0.05,
            requests: 200,
            trace: None,
        };
        let plan = plan(&c, &request);
        let chosen = plan.chosen.expect("a point meets a loose SLO");
        assert!(chosen.outcome.ttft_p90_s <= 2.0 && chosen.outcome.tpot_p90_s <= 0.05);
        assert!(plan.pareto.iter().any(|p| {
            p.outcome.tokens_per_s_per_gpu >= chosen.outcome.tokens_per_s_per_gpu
                && p.outcome.tokens_per_s_per_user >= chosen.outcome.tokens_per_s_per_user
        }));
        // The front trades one for the other: rising per-user speed, falling per-GPU output.
        for pair in plan.pareto.windows(2) {
            assert!(pair[1].outcome.tokens_per_s_per_gpu <= pair[0].outcome.tokens_per_s_per_gpu);
        }
        let values = helm_values(chosen.deployment, "Qwen3-30B-A3B");
        assert!(values.contains(&format!("tp: {}", chosen.deployment.tp)));
    }

    #[test]
    fn an_impossible_slo_chooses_nothing() {
        let c = cost("qwen3-30b-a3b", "h100");
        let request = PlanRequest {
            gpus: 2,
            isl: 1024,
            osl: 64,
            slo_ttft_s: 1e-6,
            slo_tpot_s: 1e-6,
            requests: 100,
            trace: None,
        };
        assert!(plan(&c, &request).chosen.is_none());
    }

    #[test]
    fn a_trace_is_replayed_at_each_load_with_its_own_lengths() {
        let c = cost("qwen3-30b-a3b", "h100");
        let trace: Vec<RequestSpec> = (0..300)
            .map(|i| RequestSpec {
                arrival_s: f64::from(i) * 0.5,
                prompt_len: if i % 2 == 0 { 256 } else { 4096 },
                output_len: if i % 3 == 0 { 16 } else { 256 },
            })
            .collect();
        let request = PlanRequest {
            gpus: 2,
            isl: 2176,
            osl: 176,
            slo_ttft_s: 5.0,
            slo_tpot_s: 0.1,
            requests: 300,
            trace: Some(trace.clone()),
        };
        let replayed = load(&request, 10.0, 0);
        assert_eq!(replayed.len(), trace.len());
        let span = replayed.last().expect("last").arrival_s;
        assert!((299.0 / span - 10.0).abs() < 0.1, "{span}");
        assert_eq!(replayed[1].prompt_len, 4096);
        let plan = plan(&c, &request);
        assert!(!plan.points.is_empty());
        // Heavier loads of the same trace give more tokens per GPU.
        let one = plan.points[0].deployment;
        let of_one: Vec<&Point> = plan.points.iter().filter(|p| p.deployment == one).collect();
        let (light, heavy) = (of_one[0], of_one[of_one.len() - 1]);
        assert!(heavy.outcome.tokens_per_s_per_gpu > light.outcome.tokens_per_s_per_gpu);
    }
}

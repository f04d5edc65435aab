//! A discrete-event simulation of a Tandem cluster under load: Poisson arrivals, the router
//! sending each prompt to the prefill group with the fewest queued tokens, prefill batches up
//! to a token budget, KV pushed layer by layer to the least loaded decode group, and decode
//! groups stepping their running batch (continuous batching, bounded by KV memory and a
//! per-GPU batch cap). Throughput and latencies are measured over the steady part of the run
//! (from the arrival of the first fifth of the requests to the last arrival).

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, VecDeque};

use crate::cost::CostModel;

/// A disaggregated deployment: `prefill_groups` groups of `tp` GPUs and `decode_groups` groups
/// of `ep` GPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Deployment {
    pub prefill_groups: usize,
    pub tp: usize,
    pub decode_groups: usize,
    pub ep: usize,
}

impl Deployment {
    pub fn gpus(&self) -> usize {
        self.prefill_groups * self.tp + self.decode_groups * self.ep
    }
}

/// Requests of `isl` prompt and `osl` output tokens arriving at `rate` per second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Workload {
    pub rate: f64,
    pub isl: usize,
    pub osl: usize,
    pub requests: usize,
    pub seed: u64,
}

/// One request to simulate: when it arrives (seconds) and its lengths.
#[derive(Debug, Clone, Copy, PartialEq, serde::Deserialize)]
pub struct RequestSpec {
    pub arrival_s: f64,
    pub prompt_len: usize,
    pub output_len: usize,
}

impl Workload {
    /// Its requests: Poisson arrivals at `rate`, every one `isl` in and `osl` out.
    pub fn requests(&self) -> Vec<RequestSpec> {
        let mut rng = Rng(self.seed.max(1));
        let mut t = 0.0;
        (0..self.requests)
            .map(|_| {
                t += -rng.uniform().ln() / self.rate;
                RequestSpec {
                    arrival_s: t,
                    prompt_len: self.isl,
                    output_len: self.osl,
                }
            })
            .collect()
    }
}

/// What one simulated run measured (over requests, all of them completed).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Outcome {
    pub ttft_p50_s: f64,
    pub ttft_p90_s: f64,
    pub tpot_p50_s: f64,
    pub tpot_p90_s: f64,
    /// Output tokens per second over the run, per GPU of the deployment.
    pub tokens_per_s_per_gpu: f64,
    /// Output tokens per second one user sees while decoding (1 / median TPOT).
    pub tokens_per_s_per_user: f64,
    pub requests_per_s: f64,
}

/// Most prompt tokens one prefill batch takes.
pub(crate) const PREFILL_BATCH_TOKENS: usize = 16_384;
/// Most sequences one decode GPU runs at once (`--max-running` per rank).
pub const MAX_BATCH_PER_GPU: f64 = 256.0;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Event {
    Arrival(usize),
    PrefillDone(usize),
    KvArrived(usize),
    StepDone(usize),
}

#[derive(Debug, PartialEq)]
struct Timed(f64, u64, Event);

impl Eq for Timed {}

impl Ord for Timed {
    // Earliest first (BinaryHeap pops the largest); ties in insertion order.
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .0
            .total_cmp(&self.0)
            .then_with(|| other.1.cmp(&self.1))
    }
}

impl PartialOrd for Timed {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

#[derive(Debug, Default, Clone)]
struct Request {
    isl: usize,
    osl: usize,
    arrived: f64,
    first_token: f64,
    joined_step: u64,
    done: f64,
}

#[derive(Debug, Default)]
struct PrefillGroup {
    queue: VecDeque<usize>,
    queued_tokens: usize,
    batch: Vec<usize>,
    batch_seconds: f64,
}

/// A decode group's running batch as the steps its sequences finish at: every running
/// sequence gains a token per step, so only joins and finishes cost anything.
#[derive(Debug, Default)]
struct DecodeGroup {
    waiting: VecDeque<usize>,
    finishing: BinaryHeap<Reverse<(u64, usize)>>,
    /// Sums over the running sequences of their join steps and prompt lengths (for their
    /// mean context).
    joined_sum: f64,
    prompt_sum: f64,
    step: u64,
    stepping: bool,
}

impl DecodeGroup {
    fn running(&self) -> usize {
        self.finishing.len()
    }
}

/// xorshift64*: deterministic arrivals for a seed, no dependency.
struct Rng(u64);

impl Rng {
    fn uniform(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        ((x >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
}

struct Simulation<'a> {
    cost: &'a CostModel,
    deployment: Deployment,
    events: BinaryHeap<Timed>,
    sequence: u64,
    requests: Vec<Request>,
    prefill: Vec<PrefillGroup>,
    decode: Vec<DecodeGroup>,
    decode_capacity: usize,
    /// The steady part of the run, and the output tokens produced in it.
    window: (f64, f64),
    window_tokens: f64,
}

/// Runs `workload` on `deployment`; None when the deployment cannot hold the model or one
/// sequence's KV.
pub fn simulate(cost: &CostModel, deployment: Deployment, workload: Workload) -> Option<Outcome> {
    simulate_requests(cost, deployment, &workload.requests())
}

/// Runs `requests` (sorted by arrival) on `deployment`; None when the deployment cannot hold
/// the model or a sequence of the requests' mean length.
pub fn simulate_requests(
    cost: &CostModel,
    deployment: Deployment,
    requests: &[RequestSpec],
) -> Option<Outcome> {
    let n = requests.len() as f64;
    let context = requests
        .iter()
        .map(|r| (r.prompt_len + r.output_len) as f64)
        .sum::<f64>()
        / n;
    let per_gpu = cost.decode_capacity_per_gpu(deployment.ep, context);
    if requests.is_empty() || per_gpu < 1.0 || !cost.prefill_fits(deployment.tp) {
        return None;
    }
    let mut sim = Simulation {
        cost,
        deployment,
        events: BinaryHeap::new(),
        sequence: 0,
        requests: requests
            .iter()
            .map(|r| Request {
                isl: r.prompt_len.max(1),
                osl: r.output_len.max(1),
                ..Request::default()
            })
            .collect(),
        prefill: (0..deployment.prefill_groups)
            .map(|_| PrefillGroup::default())
            .collect(),
        decode: (0..deployment.decode_groups)
            .map(|_| DecodeGroup::default())
            .collect(),
        decode_capacity: (per_gpu.min(MAX_BATCH_PER_GPU) * deployment.ep as f64) as usize,
        window: (
            requests[requests.len() / 5].arrival_s,
            requests[requests.len() - 1].arrival_s,
        ),
        window_tokens: 0.0,
    };
    for (id, r) in requests.iter().enumerate() {
        sim.at(r.arrival_s, Event::Arrival(id));
    }
    sim.run();
    Some(sim.outcome())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

impl Simulation<'_> {
    fn at(&mut self, time: f64, event: Event) {
        self.sequence += 1;
        self.events.push(Timed(time, self.sequence, event));
    }

    fn run(&mut self) {
        while let Some(Timed(now, _, event)) = self.events.pop() {
            match event {
                Event::Arrival(id) => self.arrive(now, id),
                Event::PrefillDone(g) => self.prefill_done(now, g),
                Event::KvArrived(id) => self.kv_arrived(now, id),
                Event::StepDone(g) => self.step_done(now, g),
            }
        }
    }

    fn arrive(&mut self, now: f64, id: usize) {
        self.requests[id].arrived = now;
        let group = (0..self.prefill.len())
            .min_by_key(|&g| self.prefill[g].queued_tokens)
            .unwrap_or(0);
        let p = &mut self.prefill[group];
        p.queue.push_back(id);
        p.queued_tokens += self.requests[id].isl;
        if p.batch.is_empty() {
            self.start_prefill(now, group);
        }
    }

    fn start_prefill(&mut self, now: f64, group: usize) {
        let p = &mut self.prefill[group];
        let mut tokens = 0;
        while let Some(&id) = p.queue.front() {
            let isl = self.requests[id].isl;
            if tokens > 0 && tokens + isl > PREFILL_BATCH_TOKENS {
                break;
            }
            p.queue.pop_front();
            p.batch.push(id);
            tokens += isl;
        }
        if p.batch.is_empty() {
            return;
        }
        p.queued_tokens -= tokens;
        let mean_prompt = tokens as f64 / p.batch.len() as f64;
        let seconds = self
            .cost
            .prefill(self.deployment.tp, tokens as f64, mean_prompt)
            .seconds();
        p.batch_seconds = seconds;
        self.at(now + seconds, Event::PrefillDone(group));
    }

    fn prefill_done(&mut self, now: f64, group: usize) {
        let batch = std::mem::take(&mut self.prefill[group].batch);
        // Prefill and decode groups share an NVLink domain when the deployment fits in one.
        let same_domain = self.deployment.gpus() <= self.cost.hardware.nvlink_domain;
        let hidden_s = self.prefill[group].batch_seconds;
        for id in batch {
            let isl = self.requests[id].isl as f64;
            let transfer = self.cost.kv_transfer(isl, same_domain, hidden_s);
            self.at(now + transfer, Event::KvArrived(id));
        }
        self.start_prefill(now, group);
    }

    fn kv_arrived(&mut self, now: f64, id: usize) {
        // The first token, sampled by the prefill group, reaches the client with the KV.
        self.requests[id].first_token = now;
        self.count_tokens(now, 1.0);
        let group = (0..self.decode.len())
            .min_by_key(|&g| self.decode[g].running() + self.decode[g].waiting.len())
            .unwrap_or(0);
        self.decode[group].waiting.push_back(id);
        if !self.decode[group].stepping {
            self.start_step(now, group);
        }
    }

    fn count_tokens(&mut self, now: f64, tokens: f64) {
        if now >= self.window.0 && now <= self.window.1 {
            self.window_tokens += tokens;
        }
    }

    fn start_step(&mut self, now: f64, group: usize) {
        let capacity = self.decode_capacity;
        let d = &mut self.decode[group];
        while d.running() < capacity {
            let Some(id) = d.waiting.pop_front() else {
                break;
            };
            let r = &mut self.requests[id];
            r.joined_step = d.step;
            d.joined_sum += d.step as f64;
            d.prompt_sum += r.isl as f64;
            // The first token came from prefill; osl - 1 steps remain.
            let steps = r.osl.saturating_sub(1).max(1) as u64;
            d.finishing.push(Reverse((d.step + steps, id)));
        }
        if d.running() == 0 {
            d.stepping = false;
            return;
        }
        d.stepping = true;
        let running = d.running() as f64;
        let mean_generated = d.step as f64 - d.joined_sum / running + 1.0;
        let context = d.prompt_sum / running + mean_generated;
        let seconds = self
            .cost
            .decode_step(self.deployment.ep, running, context)
            .seconds();
        self.at(now + seconds, Event::StepDone(group));
    }

    fn step_done(&mut self, now: f64, group: usize) {
        let produced = self.decode[group].running() as f64;
        self.count_tokens(now, produced);
        let d = &mut self.decode[group];
        d.step += 1;
        while let Some(&Reverse((finish, id))) = d.finishing.peek() {
            if finish > d.step {
                break;
            }
            d.finishing.pop();
            let r = &mut self.requests[id];
            d.joined_sum -= r.joined_step as f64;
            d.prompt_sum -= r.isl as f64;
            r.done = now;
        }
        self.start_step(now, group);
    }

    fn outcome(&self) -> Outcome {
        let (start, end) = self.window;
        let steady: Vec<&Request> = self
            .requests
            .iter()
            .filter(|r| r.arrived >= start && r.arrived <= end)
            .collect();
        let mut ttft: Vec<f64> = steady.iter().map(|r| r.first_token - r.arrived).collect();
        let mut tpot: Vec<f64> = steady
            .iter()
            .map(|r| (r.done - r.first_token) / (r.osl.max(2) - 1) as f64)
            .collect();
        ttft.sort_by(f64::total_cmp);
        tpot.sort_by(f64::total_cmp);
        let span = (end - start).max(f64::MIN_POSITIVE);
        let tpot_p50 = percentile(&tpot, 0.5);
        Outcome {
            ttft_p50_s: percentile(&ttft, 0.5),
            ttft_p90_s: percentile(&ttft, 0.9),
            tpot_p50_s: tpot_p50,
            tpot_p90_s: percentile(&tpot, 0.9),
            tokens_per_s_per_gpu: self.window_tokens / span / self.deployment.gpus() as f64,
            tokens_per_s_per_user: if tpot_p50 > 0.0 { 1.0 / tpot_p50 } else { 0.0 },
            requests_per_s: steady.len() as f64 / span,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qwen_h100() -> CostModel {
        crate::fixtures::cost("qwen3-30b-a3b", "h100")
    }

    const ONE_AND_ONE: Deployment = Deployment {
        prefill_groups: 1,
        tp: 1,
        decode_groups: 1,
        ep: 1,
    };

    fn workload(rate: f64) -> Workload {
        Workload {
            rate,
            isl: 1024,
            osl: 128,
            requests: 400,
            seed: 7,
        }
    }

    #[test]
    fn a_light_load_sees_unloaded_latencies() {
        let cost = qwen_h100();
        let out = simulate(&cost, ONE_AND_ONE, workload(0.5)).expect("fits");
        let prefill = cost.prefill(1, 1024.0, 1024.0).seconds();
        assert!(
            out.ttft_p50_s >= prefill && out.ttft_p50_s < 3.0 * prefill,
            "{out:?}"
        );
        let step = cost.decode_step(1, 1.0, 1100.0).seconds();
        assert!(
            (out.tpot_p50_s / step - 1.0).abs() < 0.5,
            "{out:?} vs step {step}"
        );
    }

    #[test]
    fn more_load_trades_latency_for_throughput_per_gpu() {
        let cost = qwen_h100();
        let light = simulate(&cost, ONE_AND_ONE, workload(1.0)).expect("fits");
        let heavy = simulate(&cost, ONE_AND_ONE, workload(20.0)).expect("fits");
        assert!(heavy.tokens_per_s_per_gpu > 5.0 * light.tokens_per_s_per_gpu);
        assert!(heavy.tpot_p50_s > light.tpot_p50_s);
    }

    #[test]
    fn the_same_seed_gives_the_same_run() {
        let cost = qwen_h100();
        assert_eq!(
            simulate(&cost, ONE_AND_ONE, workload(5.0)),
            simulate(&cost, ONE_AND_ONE, workload(5.0))
        );
    }
}

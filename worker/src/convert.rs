//! Between the engine's types and the internal protos.

use tandem_engine::{Backend, EngineGroup, FinishReason, Logprobs, SamplingParams, TopLogprob};
use tandem_proto::internal::v1::{RankLoad, Role, Sampling, WorkerStats};
use tandem_proto::v1 as api;

/// What an engine thread in `role` reports about its engines.
pub(crate) fn worker_stats<B: Backend>(
    engine: &EngineGroup<B>,
    role: Role,
    tokens_total: u64,
) -> WorkerStats {
    let num_experts = engine.model().config().moe.num_experts.max(1);
    let mut expert_load = vec![0u64; num_experts];
    for rank in engine.ranks() {
        match rank.model().expert_load() {
            Ok(load) => {
                for (i, pairs) in load.into_iter().enumerate() {
                    expert_load[i % num_experts] += pairs;
                }
            }
            Err(e) => tracing::warn!("reading a rank's expert load: {e}"),
        }
    }
    WorkerStats {
        role: role as i32,
        running_sequences: engine.num_running() as u32,
        waiting_sequences: engine.num_waiting() as u32,
        queued_prefill_tokens: engine.queued_prefill_tokens() as u64,
        kv_blocks_used: engine.used_blocks() as u32,
        kv_blocks_total: (engine.used_blocks() + engine.free_blocks()) as u32,
        pending_transfers: engine.num_reserved() as u32,
        tokens_total,
        ranks: engine
            .ranks()
            .iter()
            .map(|e| RankLoad {
                running_sequences: e.num_running() as u32,
                kv_blocks_used: e.used_blocks() as u32,
                kv_blocks_total: (e.used_blocks() + e.free_blocks()) as u32,
            })
            .collect(),
        expert_load,
        cached_prompt_tokens: engine.cached_prompt_tokens(),
    }
}

pub fn sampling_params(s: &Sampling) -> SamplingParams {
    SamplingParams {
        temperature: s.temperature,
        top_k: s.top_k.map(|k| k as usize),
        top_p: s.top_p,
        min_p: s.min_p,
        seed: Some(s.seed),
        repetition_penalty: s.repetition_penalty,
        presence_penalty: s.presence_penalty,
        frequency_penalty: s.frequency_penalty,
        top_logprobs: s.top_logprobs as usize,
    }
}

pub fn token_logprob(l: &Logprobs) -> api::TokenLogprob {
    api::TokenLogprob {
        logprob: l.chosen,
        top: l
            .top
            .iter()
            .map(|t| api::TopLogprob {
                token_id: t.token,
                logprob: t.logprob,
            })
            .collect(),
    }
}

pub fn logprobs_from_proto(l: &api::TokenLogprob) -> Logprobs {
    Logprobs {
        chosen: l.logprob,
        top: l
            .top
            .iter()
            .map(|t| TopLogprob {
                token: t.token_id,
                logprob: t.logprob,
            })
            .collect(),
    }
}

pub fn finish_reason(f: Option<FinishReason>) -> api::FinishReason {
    match f {
        None => api::FinishReason::Unspecified,
        Some(FinishReason::Length) => api::FinishReason::Length,
        Some(FinishReason::Stop) => api::FinishReason::Stop,
    }
}

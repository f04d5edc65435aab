//! Between the engine's types and the internal protos.

use tandem_engine::{FinishReason, Logprobs, SamplingParams, TopLogprob};
use tandem_proto::internal::v1::Sampling;
use tandem_proto::v1 as api;

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

//! Logits processing and token choice: penalties, temperature, top-k, top-p, min-p, seeded
//! sampling and logprobs.

use crate::error::{EngineError, Result};
use crate::rng::Rng;

/// Most alternatives a request may ask logprobs for.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// How to choose each token. `temperature == 0` is greedy.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    /// Keep only the k most likely tokens.
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1 keeps all).
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one (0 keeps all).
    pub min_p: f32,
    /// Same seed, same prompt, same tokens. `None` draws a seed per request.
    pub seed: Option<u64>,
    /// Hugging Face style: logits of tokens seen in prompt or output are divided (if positive)
    /// or multiplied (if negative) by this. 1 is off.
    pub repetition_penalty: f32,
    /// OpenAI style: subtracted once from the logit of every token already generated.
    pub presence_penalty: f32,
    /// OpenAI style: subtracted per occurrence of a token already generated.
    pub frequency_penalty: f32,
    /// Alternatives to report with each token's logprob (the chosen token's is always given).
    pub top_logprobs: usize,
}

/// Log-probability of the chosen token under the model's raw distribution, and the most
/// likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct Logprobs {
    pub chosen: f32,
    pub top: Vec<TopLogprob>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TopLogprob {
    pub token: u32,
    pub logprob: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self::greedy()
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: 1.0,
            min_p: 0.0,
            seed: None,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            top_logprobs: 0,
        }
    }

    /// Checks every field's range; the message names the field, the range and the value.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(EngineError::InvalidRequest(m));
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad(format!(
                "temperature must be a finite number >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        if self.top_k == Some(0) {
            return bad("top_k must be >= 1 when set, got 0".into());
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return bad(format!(
                "repetition_penalty must be a finite number > 0, got {}",
                self.repetition_penalty
            ));
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return bad(format!("{name} must be in [-2, 2], got {v}"));
            }
        }
        if self.top_logprobs > MAX_TOP_LOGPROBS {
            return bad(format!(
                "top_logprobs must be <= {MAX_TOP_LOGPROBS}, got {}",
                self.top_logprobs
            ));
        }
        Ok(())
    }
}

/// Per-sequence sampling state.
#[derive(Debug, Clone)]
pub(crate) struct Sampler {
    params: SamplingParams,
    rng: Rng,
}

impl Sampler {
    /// True when the next token is the plain argmax and only its logprob is wanted, so the
    /// backend can pick it where the logits are (see [`greedy_pick`]).
    pub(crate) fn is_plain_greedy(&self) -> bool {
        let p = &self.params;
        p.temperature == 0.0
            && p.repetition_penalty == 1.0
            && p.presence_penalty == 0.0
            && p.frequency_penalty == 0.0
            && p.top_logprobs == 0
    }

    pub(crate) fn new(params: SamplingParams, fallback_seed: u64) -> Self {
        let rng = Rng::seeded(params.seed.unwrap_or(fallback_seed));
        Self { params, rng }
    }

    /// Chooses the next token from `logits` given the `prompt` and `output` so far.
    pub(crate) fn sample(
        &mut self,
        logits: &[f32],
        prompt: &[u32],
        output: &[u32],
    ) -> (u32, Logprobs) {
        let log_z = log_sum_exp(logits);
        let mut processed = logits.to_vec();
        self.apply_penalties(&mut processed, prompt, output);
        let token = if self.params.temperature == 0.0 {
            argmax(&processed)
        } else {
            self.draw(&mut processed)
        };
        let logprobs = Logprobs {
            chosen: logits[token as usize] - log_z,
            top: top_n(logits, self.params.top_logprobs)
                .into_iter()
                .map(|t| TopLogprob {
                    token: t,
                    logprob: logits[t as usize] - log_z,
                })
                .collect(),
        };
        (token, logprobs)
    }

    /// Consumes the randomness `sample` would have drawn, for a token another worker sampled
    /// with the same seed, so the tokens after it match a single-process run.
    pub(crate) fn replay_draw(&mut self) {
        if self.params.temperature > 0.0 {
            self.rng.next_f64();
        }
    }

    fn apply_penalties(&self, logits: &mut [f32], prompt: &[u32], output: &[u32]) {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let mut seen = vec![false; logits.len()];
            for &t in prompt.iter().chain(output) {
                if let Some(s) = seen.get_mut(t as usize) {
                    *s = true;
                }
            }
            for (l, _) in logits.iter_mut().zip(seen).filter(|(_, s)| *s) {
                *l = if *l > 0.0 {
                    *l / p.repetition_penalty
                } else {
                    *l * p.repetition_penalty
                };
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            let mut counts = vec![0u32; logits.len()];
            for &t in output {
                if let Some(c) = counts.get_mut(t as usize) {
                    *c += 1;
                }
            }
            for (l, c) in logits.iter_mut().zip(counts).filter(|(_, c)| *c > 0) {
                *l -= p.presence_penalty + p.frequency_penalty * c as f32;
            }
        }
    }

    /// Temperature, then top-k, top-p and min-p filters, then one seeded draw.
    fn draw(&mut self, logits: &mut [f32]) -> u32 {
        let p = &self.params;
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        order.sort_by(|&a, &b| {
            logits[b as usize]
                .total_cmp(&logits[a as usize])
                .then(a.cmp(&b))
        });
        if let Some(k) = p.top_k {
            order.truncate(k.max(1));
        }
        let max = logits[order[0] as usize];
        let mut probs: Vec<f64> = order
            .iter()
            .map(|&t| (((logits[t as usize] - max) / p.temperature) as f64).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= total);
        let mut keep = probs.len();
        if p.top_p < 1.0 {
            let mut cumulative = 0.0;
            for (i, x) in probs.iter().enumerate() {
                cumulative += x;
                if cumulative >= f64::from(p.top_p) {
                    keep = i + 1;
                    break;
                }
            }
        }
        if p.min_p > 0.0 {
            let floor = probs[0] * f64::from(p.min_p);
            keep = keep.min(probs.iter().take_while(|&&x| x >= floor).count().max(1));
        }
        let kept = &probs[..keep];
        let mut target = self.rng.next_f64() * kept.iter().sum::<f64>();
        for (i, x) in kept.iter().enumerate() {
            target -= x;
            if target < 0.0 {
                return order[i];
            }
        }
        order[keep - 1]
    }
}

/// Index of the largest logit; the first one on ties, like `torch.argmax`.
pub(crate) fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// The greedy token of one row of logits (ties to the lowest id) and its logprob: what
/// [`Sampler::sample`] gives a plain greedy sampler, without copying the row.
pub(crate) fn greedy_pick(logits: &[f32]) -> (u32, f32) {
    let token = argmax(logits);
    (token, logits[token as usize] - log_sum_exp(logits))
}

fn log_sum_exp(logits: &[f32]) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|l| f64::from(l - max).exp()).sum();
    max + sum.ln() as f32
}

fn top_n(logits: &[f32], n: usize) -> Vec<u32> {
    if n == 0 {
        return Vec::new();
    }
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    order.sort_by(|&a, &b| {
        logits[b as usize]
            .total_cmp(&logits[a as usize])
            .then(a.cmp(&b))
    });
    order.truncate(n);
    order
}

#[cfg(test)]
mod tests;

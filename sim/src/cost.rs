//! Per-operation cost model: how long a prefill batch, a decode step and a KV transfer take on
//! a profile's hardware. Each is the larger of its compute time (FLOPs over the effective GEMM
//! rate) and its memory time (bytes over effective HBM bandwidth), plus collective time over
//! the link the group uses and a launch overhead per layer.

use crate::model::ModelShape;
use crate::profile::HardwareProfile;

/// Kernel launches per layer of a forward pass (norms, projections, attention, routing,
/// expert GEMMs, combine).
pub(crate) const LAUNCHES_PER_LAYER: f64 = 25.0;
/// Activations cross links in bf16.
const ACTIVATION_BYTES: f64 = 2.0;
/// Share of HBM left for the KV cache after weights (activations, workspace, fragmentation).
const KV_MEMORY_SHARE: f64 = 0.9;

/// The cost of one operation, split so a report can say what bounds it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cost {
    pub compute_s: f64,
    pub memory_s: f64,
    /// The memory time adds to the compute time rather than overlapping it.
    pub memory_adds: bool,
    pub communication_s: f64,
    pub launch_s: f64,
}

impl Cost {
    pub fn seconds(&self) -> f64 {
        let busy = match self.memory_adds {
            true => self.compute_s + self.memory_s,
            false => self.compute_s.max(self.memory_s),
        };
        busy + self.communication_s + self.launch_s
    }
}

/// Costs of one model on one hardware profile.
#[derive(Debug, Clone)]
pub struct CostModel {
    pub model: ModelShape,
    pub hardware: HardwareProfile,
}

impl CostModel {
    /// Kernel launches of one forward pass touching `experts_per_layer` experts per layer.
    pub fn launch_count(&self, experts_per_layer: f64) -> f64 {
        let moe = self.model.moe_layers as f64 * experts_per_layer;
        self.model.layers as f64 * LAUNCHES_PER_LAYER + moe * self.hardware.launches_per_expert
    }

    /// `count` collectives among `group` GPUs, each moving `bytes` per GPU over the link
    /// the group spans; none for a group of one.
    fn collectives(&self, group: usize, count: f64, bytes: f64) -> f64 {
        if group <= 1 {
            return 0.0;
        }
        let (bandwidth, latency) = self.hardware.link(group);
        count * (bytes / bandwidth + latency)
    }

    /// Launches and host work of one step over `sequences` sequences.
    fn launches(&self, experts_per_layer: f64, sequences: f64) -> f64 {
        let hw = &self.hardware;
        (self.launch_count(experts_per_layer) * hw.launch_us
            + hw.step_overhead_us
            + sequences * hw.per_sequence_us)
            * 1e-6
    }

    /// Experts of one GPU (of `ep`) that `batch` tokens touch in one layer: each is hit
    /// unless every routed slot misses it.
    pub fn experts_touched(&self, ep: usize, batch: f64) -> f64 {
        let m = &self.model;
        let slots = batch * m.top_k as f64;
        let hit = 1.0 - (1.0 - 1.0 / m.experts as f64).powf(slots);
        m.experts as f64 / ep as f64 * hit
    }

    /// A prefill batch of `tokens` prompt tokens, in prompts of `prompt_len`, on `tp` GPUs
    /// splitting every layer (an all-reduce after attention and after the MLP).
    pub fn prefill(&self, tp: usize, tokens: f64, prompt_len: f64) -> Cost {
        let m = &self.model;
        let hw = &self.hardware;
        let tp_f = tp as f64;
        let linear = tokens * 2.0 * (m.active_params() - m.vocab_params / 2.0);
        // Causal attention: each query sees half the prompt on average.
        let attention = tokens * prompt_len / 2.0 * m.attention_flops_per_pair * m.layers as f64;
        let efficiency = hw.prefill_efficiency.unwrap_or(hw.gemm_efficiency) / hw.gemm_efficiency;
        let compute_s = (linear + attention) / (tp_f * hw.gemm_flops(m.weight_bytes) * efficiency);
        // Every weight of the shard is read once per batch, the prompt's KV written once.
        let bytes = m.total_params() * m.weight_bytes / tp_f + tokens * m.kv_bytes_per_token();
        let memory_s = match hw.prefill_exposed_reads {
            Some(share) => bytes / (hw.hbm_gbps * 1e9) * share,
            None => bytes / hw.memory_bytes_per_second(),
        };
        // Ring all-reduce: each rank sends and receives 2 (tp - 1) / tp of the activations.
        let reduced = tokens * m.hidden as f64 * ACTIVATION_BYTES * 2.0 * (tp_f - 1.0) / tp_f;
        let communication_s = self.collectives(tp, 2.0 * m.layers as f64, reduced);
        Cost {
            compute_s,
            memory_s,
            memory_adds: hw.prefill_exposed_reads.is_some(),
            communication_s,
            launch_s: self.launches(self.experts_touched(1, tokens), tokens / prompt_len),
        }
    }

    /// One decode step of `batch` sequences with mean context `context` on `ep` GPUs: each
    /// attends for its own batch / ep sequences (data-parallel attention) and holds experts / ep
    /// experts; tokens cross all-to-all to their experts and back around every MoE layer.
    pub fn decode_step(&self, ep: usize, batch: f64, context: f64) -> Cost {
        let m = &self.model;
        let hw = &self.hardware;
        let ep_f = ep as f64;
        let per_gpu = (batch / ep_f).ceil().max(1.0);
        let dense_params = m.dense_params_per_layer * m.layers as f64 + m.vocab_params / 2.0;
        let slots = batch * m.top_k as f64;
        let touched = self.experts_touched(ep, batch);
        let bytes = dense_params * m.weight_bytes
            + touched * m.moe_layers as f64 * m.expert_params * m.weight_bytes
            + per_gpu * context * m.kv_bytes_per_token();
        let memory_s = bytes / hw.memory_bytes_per_second();
        let flops = per_gpu * 2.0 * dense_params
            + slots / ep_f * 2.0 * m.expert_params * m.moe_layers as f64
            + per_gpu * context * m.attention_flops_per_pair * m.layers as f64;
        let compute_s = flops / hw.gemm_flops(m.weight_bytes);
        // Dispatch and combine: a GPU's routed rows, all but its own share, each way.
        let sent =
            per_gpu * m.top_k as f64 * m.hidden as f64 * ACTIVATION_BYTES * (ep_f - 1.0) / ep_f;
        let communication_s = self.collectives(ep, 2.0 * m.moe_layers as f64, sent);
        Cost {
            compute_s,
            memory_s,
            memory_adds: false,
            communication_s,
            launch_s: self.launches(touched, per_gpu),
        }
    }

    /// Seconds to move a prompt's KV from its prefill group to its decode group, of which
    /// `hidden_s` overlaps the prefill (layer-by-layer pushing): what is left is the last
    /// layer's share, or the part of the transfer longer than the prefill.
    pub fn kv_transfer(&self, prompt_len: f64, same_domain: bool, hidden_s: f64) -> f64 {
        let hw = &self.hardware;
        let (bandwidth, latency) = if same_domain {
            hw.link(2)
        } else {
            hw.link(usize::MAX)
        };
        let total = prompt_len * self.model.kv_bytes_per_token() / bandwidth;
        let last_layer = total / self.model.layers as f64;
        (total - hidden_s).max(last_layer) + latency
    }

    /// Sequences of `context` tokens one GPU of an `ep`-wide decode group holds KV for, after
    /// its weights; 0 when the weights alone do not fit.
    pub fn decode_capacity_per_gpu(&self, ep: usize, context: f64) -> f64 {
        let m = &self.model;
        let weights = (m.dense_params_per_layer * m.layers as f64 + m.vocab_params)
            * m.weight_bytes
            + m.expert_params * (m.experts * m.moe_layers) as f64 * m.weight_bytes / ep as f64;
        let free = self.hardware.hbm_gb * 1e9 * KV_MEMORY_SHARE - weights;
        (free / (context * m.kv_bytes_per_token())).floor().max(0.0)
    }

    /// Whether a `tp`-wide prefill group holds the weights (and a prompt's activations).
    pub fn prefill_fits(&self, tp: usize) -> bool {
        let m = &self.model;
        m.total_params() * m.weight_bytes / (tp as f64)
            < self.hardware.hbm_gb * 1e9 * KV_MEMORY_SHARE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qwen_on(hardware: &str) -> CostModel {
        crate::fixtures::cost("qwen3-30b-a3b", hardware)
    }

    #[test]
    fn small_decode_batches_are_memory_bound_and_grow_sublinearly() {
        let c = qwen_on("h100");
        let one = c.decode_step(1, 1.0, 2048.0);
        let many = c.decode_step(1, 64.0, 2048.0);
        assert!(one.memory_s > one.compute_s);
        assert!(many.seconds() < 16.0 * one.seconds());
        assert!(many.seconds() > one.seconds());
    }

    #[test]
    fn faster_memory_makes_decode_faster_and_more_gpus_make_prefill_faster() {
        let (h100, h200) = (qwen_on("h100"), qwen_on("h200"));
        assert!(
            h200.decode_step(1, 8.0, 2048.0).seconds() < h100.decode_step(1, 8.0, 2048.0).seconds()
        );
        let one = h100.prefill(1, 8192.0, 8192.0).seconds();
        let four = h100.prefill(4, 8192.0, 8192.0).seconds();
        assert!(four < one / 2.0, "tp 4 {four} vs tp 1 {one}");
    }

    #[test]
    fn kv_transfer_hides_behind_a_long_prefill_but_not_past_its_last_layer() {
        let c = qwen_on("h100");
        let exposed = c.kv_transfer(8192.0, true, 0.0);
        let hidden = c.kv_transfer(8192.0, true, 10.0);
        assert!(hidden < exposed / 10.0);
        assert!(hidden > 0.0);
        assert!(c.kv_transfer(8192.0, false, 0.0) > exposed);
    }
}

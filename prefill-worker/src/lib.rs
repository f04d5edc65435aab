//! Prefill worker: batches prompts on a tensor-parallel group and pushes KV layer by layer.
//!
//! Empty until the cluster issue; nothing here pretends to serve yet.

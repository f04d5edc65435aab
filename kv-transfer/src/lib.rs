//! Moving KV cache blocks between workers, layer by layer (TCP, NCCL, same-process).
//!
//! Empty until the cluster issue; nothing here pretends to transfer yet.

//! Tandem's model engine.
//!
//! Loads Hugging Face MoE checkpoints (Qwen3-MoE, Mixtral, Qwen2-MoE), runs them over a paged
//! KV cache with continuous batching, and samples tokens. The engine is synchronous and knows
//! nothing of gRPC or etcd: workers drive it from a dedicated thread through [`Engine::step`].

mod backend;
mod block_pool;
mod checkpoint;
mod config;
mod demo;
mod engine;
mod error;
mod kv_cache;
mod model;
mod parallel;
mod rng;
mod sampling;
mod sequence;
mod served;
mod shared_kv;
mod tokenizer;
mod weights;

pub use backend::cpu::{CpuBackend, CpuKvStore, CpuMatrix, CpuTensor};

/// The CUDA backend (libraries loaded at run time; [`cuda::probe`] says whether it can run).
pub mod cuda {
    pub use crate::backend::cuda::{
        CudaBackend, CudaExpertCounters, CudaKvStore, CudaMatrix, CudaPeerKv, CudaTensor,
        CudaVector, KERNEL_MAX_ARGS, KERNEL_NAMES, KERNELS_SOURCE, KernelOnTimeline, NCCL_ID_BYTES,
        NcclCollective, TimelineLaunch, compile_kernels, nccl_probe, nccl_unique_id, probe,
        timeline_by_kernel,
    };
}
pub use backend::{
    AttentionBatch, AttentionSeq, Backend, Device, DeviceChoice, HeadTransforms, HostCounters,
    KvRows, KvSpec, ResidualNorm, RopeTable, RouteRule, Routing,
};
pub use block_pool::{BlockId, BlockPool};
pub use checkpoint::{HostTensor, LoadProgress};
pub use config::{Family, ModelConfig, MoeConfig, WeightDtype};
pub use demo::{
    DEMO_MODEL_NAME, demo_config, demo_model_dir, ensure_demo_model, write_demo_model,
    write_random_checkpoint,
};
pub use engine::{Engine, EngineConfig, FinishReason, LayerKv, StepOutput, TokenEvent};
pub use error::EngineError;
pub use kv_cache::{BlockHash, KvEvent, prefix_block_hashes};
pub use model::Model;
pub use parallel::expert::EngineGroup;
pub use parallel::host::{DEFAULT_COLLECTIVE_TIMEOUT, HostCollective};
pub use parallel::tensor::load_tensor_parallel;
pub use parallel::{Collective, ExpertPlacement, Parallelism, Sharding, load_ranks};
pub use sampling::{Logprobs, MAX_TOP_LOGPROBS, SamplingParams, TopLogprob};
pub use sequence::{SeqId, StopCriteria};
pub use served::{Served, ServedModel};
pub use tokenizer::{IncrementalText, Tokenizer, TokenizerConfig};
pub use weights::ExpertWeights;

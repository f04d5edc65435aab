//! A checkpoint folder (or the demo model) loaded for serving on the device `--device`
//! resolves to, with everything a worker reports about it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::{CudaBackend, cuda_device_count};
use crate::backend::{Backend, Device, DeviceChoice};
use crate::checkpoint::LoadProgress;
use crate::demo::ensure_demo_model;
use crate::engine::EngineConfig;
use crate::error::{EngineError, Result};
use crate::model::Model;
use crate::parallel::expert::EngineGroup;
use crate::parallel::{Sharding, load_ranks};
use crate::tokenizer::Tokenizer;

/// A loaded model, its tokenizer and the raw `tokenizer.json` (which workers hand to routers,
/// so routers need no model files).
pub struct ServedModel<B: Backend> {
    pub dir: PathBuf,
    /// The folder's name, which clients use as the model name.
    pub name: String,
    /// One model per data-parallel rank (one unless experts are split).
    pub ranks: Vec<Model<B>>,
    pub tokenizer: Arc<Tokenizer>,
    pub tokenizer_json: Vec<u8>,
    /// `tokenizer_config.json` (chat template, special tokens); empty when absent.
    pub tokenizer_config_json: Vec<u8>,
}

/// A served model on the backend its device needs.
pub enum Served {
    /// `fallback_reason` says why `--device auto` did not pick CUDA.
    Cpu {
        served: Box<ServedModel<CpuBackend>>,
        fallback_reason: Option<String>,
    },
    Cuda(Box<ServedModel<CudaBackend>>),
}

impl Served {
    /// Loads `dir`, or the demo model (written to the cache on first use) when `dir` is None,
    /// on the device `choice` resolves to.
    /// `sharding` spreads it over ranks: on CPU each rank is a thread; on CUDA rank r takes
    /// GPU r (ranks share GPUs round-robin when there are fewer).
    pub fn load(
        dir: Option<&Path>,
        choice: DeviceChoice,
        sharding: &Sharding,
        progress: &mut dyn FnMut(LoadProgress),
    ) -> Result<Self> {
        let device = choice.resolve()?;
        let dir = match dir {
            Some(dir) => dir.to_owned(),
            None => ensure_demo_model()?,
        };
        let ranks = sharding.ranks();
        match device {
            Device::Cpu { fallback_reason } => Ok(Self::Cpu {
                served: Box::new(ServedModel::load(
                    dir,
                    vec![CpuBackend; ranks],
                    sharding,
                    progress,
                )?),
                fallback_reason,
            }),
            Device::Cuda { ordinal } => {
                let gpus = cuda_device_count()?.max(1);
                let backends = (0..ranks)
                    .map(|r| CudaBackend::new((ordinal + r) % gpus))
                    .collect::<Result<Vec<_>>>()?;
                Ok(Self::Cuda(Box::new(ServedModel::load(
                    dir, backends, sharding, progress,
                )?)))
            }
        }
    }
}

impl<B: Backend> ServedModel<B> {
    /// Loads the checkpoint in `dir` onto `backends`, one per rank of `sharding`.
    pub fn load(
        dir: PathBuf,
        backends: Vec<B>,
        sharding: &Sharding,
        progress: &mut dyn FnMut(LoadProgress),
    ) -> Result<Self> {
        let tokenizer_path = dir.join("tokenizer.json");
        let tokenizer_json =
            std::fs::read(&tokenizer_path).map_err(|e| EngineError::io(&tokenizer_path, e))?;
        let config_path = dir.join("tokenizer_config.json");
        let tokenizer_config_json = match std::fs::read(&config_path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(EngineError::io(&config_path, e)),
        };
        let tokenizer = Arc::new(Tokenizer::from_dir(&dir)?);
        let ranks = load_ranks(&dir, backends, sharding, progress)?;
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| dir.display().to_string());
        Ok(Self {
            dir,
            name,
            ranks,
            tokenizer,
            tokenizer_json,
            tokenizer_config_json,
        })
    }

    /// Rank 0's model: what every rank shares (configuration, device).
    pub fn model(&self) -> &Model<B> {
        &self.ranks[0]
    }

    /// One engine per data-parallel rank, each with a KV cache sized by `config`.
    pub fn into_engines(self, config: EngineConfig) -> Result<EngineGroup<B>> {
        EngineGroup::new(self.ranks, Some(self.tokenizer), config)
    }
}

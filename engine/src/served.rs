//! A checkpoint folder (or the demo model) loaded for serving on the device `--device`
//! resolves to, with everything a worker reports about it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::CudaBackend;
use crate::backend::{Backend, Device, DeviceChoice};
use crate::checkpoint::LoadProgress;
use crate::demo::ensure_demo_model;
use crate::error::{EngineError, Result};
use crate::model::Model;
use crate::tokenizer::Tokenizer;

/// A loaded model, its tokenizer and the raw `tokenizer.json` (which workers hand to routers,
/// so routers need no model files).
pub struct ServedModel<B: Backend> {
    pub dir: PathBuf,
    /// The folder's name, which clients use as the model name.
    pub name: String,
    pub model: Model<B>,
    pub tokenizer: Arc<Tokenizer>,
    pub tokenizer_json: Vec<u8>,
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
    pub fn load(
        dir: Option<&Path>,
        choice: DeviceChoice,
        progress: &mut dyn FnMut(LoadProgress),
    ) -> Result<Self> {
        let device = choice.resolve()?;
        let dir = match dir {
            Some(dir) => dir.to_owned(),
            None => ensure_demo_model()?,
        };
        match device {
            Device::Cpu { fallback_reason } => Ok(Self::Cpu {
                served: Box::new(ServedModel::load(dir, CpuBackend, progress)?),
                fallback_reason,
            }),
            Device::Cuda { ordinal } => Ok(Self::Cuda(Box::new(ServedModel::load(
                dir,
                CudaBackend::new(ordinal)?,
                progress,
            )?))),
        }
    }
}

impl<B: Backend> ServedModel<B> {
    /// Loads the checkpoint in `dir` onto `backend`.
    pub fn load(dir: PathBuf, backend: B, progress: &mut dyn FnMut(LoadProgress)) -> Result<Self> {
        let tokenizer_path = dir.join("tokenizer.json");
        let tokenizer_json =
            std::fs::read(&tokenizer_path).map_err(|e| EngineError::io(&tokenizer_path, e))?;
        let tokenizer = Arc::new(Tokenizer::from_dir(&dir)?);
        let model = Model::load(&dir, backend, progress)?;
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| dir.display().to_string());
        Ok(Self {
            dir,
            name,
            model,
            tokenizer,
            tokenizer_json,
        })
    }
}

//! A checkpoint folder (or the demo model) loaded for serving, with everything a worker
//! reports about it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::backend::cpu::CpuBackend;
use crate::backend::{Device, DeviceChoice};
use crate::checkpoint::LoadProgress;
use crate::demo::ensure_demo_model;
use crate::error::{EngineError, Result};
use crate::model::Model;
use crate::tokenizer::Tokenizer;

/// A loaded model, its tokenizer and the raw `tokenizer.json` (which workers hand to routers,
/// so routers need no model files).
pub struct ServedModel {
    pub dir: PathBuf,
    /// The folder's name, which clients use as the model name.
    pub name: String,
    pub model: Model<CpuBackend>,
    pub tokenizer: Arc<Tokenizer>,
    pub tokenizer_json: Vec<u8>,
    pub device: Device,
}

impl ServedModel {
    /// Loads `dir`, or the demo model (written to the cache on first use) when `dir` is None.
    pub fn load(
        dir: Option<&Path>,
        device: DeviceChoice,
        progress: &mut dyn FnMut(LoadProgress),
    ) -> Result<Self> {
        let device = device.resolve()?;
        let dir = match dir {
            Some(dir) => dir.to_owned(),
            None => ensure_demo_model()?,
        };
        let tokenizer_path = dir.join("tokenizer.json");
        let tokenizer_json =
            std::fs::read(&tokenizer_path).map_err(|e| EngineError::io(&tokenizer_path, e))?;
        let tokenizer = Arc::new(Tokenizer::from_dir(&dir)?);
        let model = Model::load(&dir, CpuBackend, progress)?;
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
            device,
        })
    }
}

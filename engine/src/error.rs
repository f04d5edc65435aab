use std::path::PathBuf;

/// Everything the engine can fail with. Variants name the phase; messages say what was wrong,
/// the limit and the value given.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing {path}: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("config.json: {0}")]
    Config(String),
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
    #[error("missing tensor `{name}` in checkpoint {dir}")]
    MissingTensor { name: String, dir: PathBuf },
    #[error("tensor `{name}` has shape {actual:?}, expected {expected:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("tensor `{name}` has dtype {dtype}; supported dtypes are F32, BF16 and F16")]
    UnsupportedDtype { name: String, dtype: String },
    #[error("tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("tokenizing: {0}")]
    Tokenize(String),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("kv cache exhausted: sequence needs {needed} blocks, {free} free of {total}")]
    OutOfBlocks {
        needed: usize,
        free: usize,
        total: usize,
    },
    #[error("engine at capacity: {busy} sequences running or reserved, limit {limit}")]
    AtCapacity { busy: usize, limit: usize },
    #[error("sequence {0} is not reserved in this engine")]
    UnknownSequence(u64),
    #[error("sequence {0} is already in the engine")]
    DuplicateSequence(u64),
    #[error("device {device} unavailable: {reason}")]
    DeviceUnavailable { device: String, reason: String },
    #[error("cuda: {0}")]
    Device(String),
    #[error("collective: {0}")]
    Collective(String),
}

pub(crate) type Result<T, E = EngineError> = std::result::Result<T, E>;

impl EngineError {
    /// True when the request was at fault (retrying it unchanged fails again).
    pub fn is_invalid_request(&self) -> bool {
        matches!(
            self,
            Self::InvalidRequest(_) | Self::DuplicateSequence(_) | Self::Tokenize(_)
        )
    }

    /// True when the engine is full now and the same request may succeed later.
    pub fn is_capacity(&self) -> bool {
        matches!(self, Self::OutOfBlocks { .. } | Self::AtCapacity { .. })
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

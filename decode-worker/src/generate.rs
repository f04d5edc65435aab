//! Single-process generation: load, run one sequence through the continuous-batching engine,
//! print text or one JSON object.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use indicatif::{ProgressBar, ProgressStyle};
use tandem_common::generate::{GenerateArgs, GenerateOutput, OutputFormat, TopLogprobJson, Usage};
use tandem_engine::cuda::CudaBackend;
use tandem_engine::{
    Backend, CpuBackend, Device, Engine, EngineConfig, EngineError, LoadProgress, Model,
    SamplingParams, SeqId, StopCriteria, Tokenizer,
};

/// Failures of `generate`, split by whether the user's input was at fault.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("loading model from {dir}: {source}")]
    Load {
        dir: PathBuf,
        #[source]
        source: EngineError,
    },
    #[error("{0}")]
    Request(#[source] EngineError),
    #[error("running the model: {0}")]
    Run(#[source] EngineError),
    #[error("writing output: {0}")]
    Output(#[from] std::io::Error),
}

impl GenerateError {
    /// True when the command line asked for something impossible (exit code 64).
    pub fn is_usage(&self) -> bool {
        matches!(self, Self::Request(_))
    }
}

/// Runs the command and prints its result on stdout.
pub fn run(args: &GenerateArgs) -> Result<(), GenerateError> {
    let device = tandem_worker::device_choice(args.device)
        .resolve()
        .map_err(GenerateError::Request)?;
    let dir = match &args.model {
        Some(dir) => dir.clone(),
        None => tandem_engine::ensure_demo_model().map_err(|source| GenerateError::Load {
            dir: tandem_engine::demo_model_dir(),
            source,
        })?,
    };
    let load_error = |source| GenerateError::Load {
        dir: dir.clone(),
        source,
    };
    let tokenizer = Arc::new(Tokenizer::from_dir(&dir).map_err(load_error)?);
    match device {
        Device::Cpu { fallback_reason } => {
            // stderr, so `--output json` stays one clean object on stdout.
            if let Some(reason) = fallback_reason {
                eprintln!("device auto: using cpu ({reason})");
            }
            let model = load_with_progress(&dir, CpuBackend).map_err(load_error)?;
            generate(args, model, tokenizer)
        }
        Device::Cuda { ordinal } => {
            let backend = CudaBackend::new(ordinal).map_err(GenerateError::Request)?;
            let model = load_with_progress(&dir, backend).map_err(load_error)?;
            generate(args, model, tokenizer)
        }
    }
}

/// Runs the prompt through `model` and prints the result.
fn generate<B: Backend>(
    args: &GenerateArgs,
    model: Model<B>,
    tokenizer: Arc<Tokenizer>,
) -> Result<(), GenerateError> {
    let prompt = match (&args.prompt_ids, &args.prompt) {
        (Some(ids), _) => ids.clone(),
        (None, Some(text)) => tokenizer.encode(text).map_err(GenerateError::Request)?,
        (None, None) => Vec::new(),
    };
    let prompt_len = prompt.len();
    let engine_config = EngineConfig {
        // At least one block, so an empty prompt or `--max-tokens 0` reaches the request
        // validation and its message rather than a cache-size error.
        num_blocks: (prompt_len + args.max_tokens)
            .div_ceil(EngineConfig::default().block_size)
            .max(1),
        ..EngineConfig::default()
    };
    let mut engine =
        Engine::new(model, Some(tokenizer), engine_config).map_err(GenerateError::Request)?;
    let params = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        min_p: args.min_p,
        seed: args.seed,
        repetition_penalty: args.repetition_penalty,
        presence_penalty: args.presence_penalty,
        frequency_penalty: args.frequency_penalty,
        top_logprobs: args.top_logprobs,
    };
    let stop = StopCriteria {
        max_new_tokens: args.max_tokens,
        stop_token_ids: args.stop_token_ids.clone(),
        stop_strings: args.stop.clone(),
        ignore_eos: args.ignore_eos,
    };
    engine
        .add_request(SeqId(0), prompt.clone(), params, stop)
        .map_err(GenerateError::Request)?;

    let mut out = GenerateOutput {
        token_ids: Vec::new(),
        text: String::new(),
        logprobs: Vec::new(),
        top_logprobs: Vec::new(),
        finish_reason: "length",
        prompt_token_ids: prompt,
        usage: Usage {
            prompt_tokens: prompt_len,
            completion_tokens: 0,
        },
        device: engine.model().backend_name().to_owned(),
    };
    let stdout = std::io::stdout();
    while engine.has_work() {
        for event in engine.step().map_err(GenerateError::Run)?.events {
            if args.output == OutputFormat::Text {
                let mut lock = stdout.lock();
                lock.write_all(event.text.as_bytes())?;
                lock.flush()?;
            }
            out.token_ids.push(event.token);
            out.text.push_str(&event.text);
            out.logprobs.push(event.logprobs.chosen);
            if args.top_logprobs > 0 {
                out.top_logprobs.push(
                    event
                        .logprobs
                        .top
                        .iter()
                        .map(|t| TopLogprobJson {
                            token_id: t.token,
                            logprob: t.logprob,
                        })
                        .collect(),
                );
            }
            if let Some(finish) = event.finish {
                out.finish_reason = finish.as_str();
            }
        }
    }
    out.usage.completion_tokens = out.token_ids.len();
    out.finish(args.output, &mut stdout.lock())?;
    Ok(())
}

/// Loads the checkpoint onto `backend`, drawing a progress bar when stderr is a terminal.
fn load_with_progress<B: Backend>(
    dir: &std::path::Path,
    backend: B,
) -> Result<Model<B>, EngineError> {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("loading {msg} [{bar:30}] {pos}/{len} tensors")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(dir.display().to_string());
    let model = Model::load(dir, backend, &mut |p: LoadProgress| {
        bar.set_length(p.tensors_total as u64);
        bar.set_position(p.tensors_loaded as u64);
    });
    bar.finish_and_clear();
    model
}

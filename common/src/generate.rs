//! The `generate` command-line contract, shared by `tandemctl generate` and the worker binary
//! that runs it, so both parse (and document) exactly the same flags.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, ValueEnum};
use serde::Serialize;

/// Default number of tokens `generate` produces.
pub const DEFAULT_MAX_TOKENS: usize = 64;

/// Where the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceArg {
    /// CUDA when it works here, else CPU (the reason is logged).
    Auto,
    Cpu,
    Cuda,
}

/// How `generate` prints its result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Stream the text as it is generated.
    Text,
    /// One JSON object: token_ids, text, logprobs, finish_reason, usage.
    Json,
}

/// Runs one prompt through a model in a single process.
#[derive(Debug, Clone, PartialEq, Args)]
#[command(group = clap::ArgGroup::new("input").required(true).args(["prompt", "prompt_ids"]))]
pub struct GenerateArgs {
    /// Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer.json). Without it,
    /// the built-in demo model (random weights, meaningless text) is written to the cache and
    /// used.
    #[arg(long, env = "TANDEM_MODEL", value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// Prompt text, tokenized with the model's tokenizer.
    #[arg(long, value_name = "TEXT")]
    pub prompt: Option<String>,
    /// Prompt as comma-separated token ids.
    #[arg(long, value_name = "IDS", value_delimiter = ',')]
    pub prompt_ids: Option<Vec<u32>>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = DEFAULT_MAX_TOKENS)]
    pub max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    /// Seed for reproducible sampling.
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub presence_penalty: f32,
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub frequency_penalty: f32,
    /// Alternatives reported with each token's logprob.
    #[arg(long, default_value_t = 0)]
    pub top_logprobs: usize,
    /// Stop when the text contains this string (repeatable); the string is not returned.
    #[arg(long = "stop", value_name = "TEXT")]
    pub stop: Vec<String>,
    /// Stop on these token ids (comma-separated).
    #[arg(long, value_delimiter = ',', value_name = "IDS")]
    pub stop_token_ids: Vec<u32>,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto, env = "TANDEM_DEVICE")]
    pub device: DeviceArg,
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

/// The JSON contract of `generate --output json`.
#[derive(Debug, Serialize)]
pub struct GenerateOutput {
    /// Generated ids only, prompt excluded.
    pub token_ids: Vec<u32>,
    pub text: String,
    /// Log-probability of each generated token under the model's raw distribution.
    pub logprobs: Vec<f32>,
    /// Per token, the `--top-logprobs` most likely alternatives.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub top_logprobs: Vec<Vec<TopLogprobJson>>,
    pub finish_reason: &'static str,
    pub prompt_token_ids: Vec<u32>,
    pub usage: Usage,
    /// Where it ran: `cpu`, `cuda`, or `cluster` when it went through a router.
    pub device: String,
}

impl GenerateOutput {
    /// Ends a `generate` run's output in `format`: the streamed text's closing newline, or
    /// the one JSON object on a line of its own.
    pub fn finish(
        &self,
        format: OutputFormat,
        out: &mut impl std::io::Write,
    ) -> std::io::Result<()> {
        if format == OutputFormat::Json {
            serde_json::to_writer(&mut *out, self).map_err(std::io::Error::from)?;
        }
        writeln!(out)
    }
}

#[derive(Debug, Serialize)]
pub struct TopLogprobJson {
    pub token_id: u32,
    pub logprob: f32,
}

#[derive(Debug, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

impl GenerateArgs {
    /// The flags that reproduce these arguments, for handing the command to another binary.
    pub fn to_args(&self) -> Vec<OsString> {
        let mut out: Vec<OsString> = Vec::new();
        let mut flag = |name: &str, value: String| {
            out.push(format!("--{name}").into());
            out.push(value.into());
        };
        let join = |ids: &[u32]| ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
        if let Some(model) = &self.model {
            flag("model", model.display().to_string());
        }
        if let Some(prompt) = &self.prompt {
            flag("prompt", prompt.clone());
        }
        if let Some(ids) = &self.prompt_ids {
            flag("prompt-ids", join(ids));
        }
        flag("max-tokens", self.max_tokens.to_string());
        flag("temperature", self.temperature.to_string());
        if let Some(k) = self.top_k {
            flag("top-k", k.to_string());
        }
        flag("top-p", self.top_p.to_string());
        flag("min-p", self.min_p.to_string());
        if let Some(seed) = self.seed {
            flag("seed", seed.to_string());
        }
        flag("repetition-penalty", self.repetition_penalty.to_string());
        flag("presence-penalty", self.presence_penalty.to_string());
        flag("frequency-penalty", self.frequency_penalty.to_string());
        flag("top-logprobs", self.top_logprobs.to_string());
        for stop in &self.stop {
            flag("stop", stop.clone());
        }
        if !self.stop_token_ids.is_empty() {
            flag("stop-token-ids", join(&self.stop_token_ids));
        }
        flag("device", value_name(self.device));
        flag("output", value_name(self.output));
        if self.ignore_eos {
            out.push("--ignore-eos".into());
        }
        out
    }
}

fn value_name(value: impl ValueEnum) -> String {
    value
        .to_possible_value()
        .map(|v| v.get_name().to_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: GenerateArgs,
    }

    fn parse(args: &[&str]) -> Result<GenerateArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("generate").chain(args.iter().copied())).map(|c| c.args)
    }

    #[test]
    fn to_args_round_trips_every_flag() {
        let args = parse(&[
            "--model",
            "/m",
            "--prompt-ids",
            "1,2,3",
            "--max-tokens",
            "7",
            "--temperature",
            "0.5",
            "--top-k",
            "4",
            "--top-p",
            "0.9",
            "--min-p",
            "0.1",
            "--seed",
            "42",
            "--repetition-penalty",
            "1.1",
            "--presence-penalty",
            "-0.5",
            "--frequency-penalty",
            "0.25",
            "--top-logprobs",
            "3",
            "--stop",
            "a b",
            "--stop",
            "c",
            "--stop-token-ids",
            "5,6",
            "--ignore-eos",
            "--device",
            "cpu",
            "--output",
            "json",
        ])
        .expect("valid flags");
        let again =
            Cli::try_parse_from(std::iter::once(OsString::from("generate")).chain(args.to_args()))
                .expect("to_args output parses")
                .args;
        assert_eq!(args, again);
    }

    #[test]
    fn finish_ends_text_with_a_newline_and_json_with_one_object_a_line() {
        let out = GenerateOutput {
            token_ids: vec![7, 8],
            text: "hi".into(),
            logprobs: vec![-0.5, -1.0],
            top_logprobs: Vec::new(),
            finish_reason: "length",
            prompt_token_ids: vec![1],
            usage: Usage {
                prompt_tokens: 1,
                completion_tokens: 2,
            },
            device: "cpu".into(),
        };
        let mut text = Vec::new();
        out.finish(OutputFormat::Text, &mut text).expect("writes");
        assert_eq!(text, b"\n");
        let mut json = Vec::new();
        out.finish(OutputFormat::Json, &mut json).expect("writes");
        let line = std::str::from_utf8(&json).expect("utf-8");
        assert_eq!(line.matches('\n').count(), 1, "{line}");
        let value: serde_json::Value = serde_json::from_str(line).expect("one JSON object");
        assert_eq!(value["token_ids"], serde_json::json!([7, 8]));
        assert_eq!(value["usage"]["completion_tokens"], 2);
        assert!(value.get("top_logprobs").is_none(), "{line}");
    }

    #[test]
    fn prompt_and_prompt_ids_are_exclusive_and_one_is_required() {
        assert!(parse(&["--prompt", "hi", "--prompt-ids", "1"]).is_err());
        let missing = parse(&[]).expect_err("no prompt");
        assert!(missing.to_string().contains("--prompt"), "{missing}");
        assert_eq!(
            parse(&["--prompt", "hi"]).expect("prompt").max_tokens,
            DEFAULT_MAX_TOKENS
        );
    }

    #[test]
    fn bad_prompt_id_is_rejected_naming_the_flag() {
        let err = parse(&["--prompt-ids", "1,x"]).expect_err("x is not an id");
        assert!(err.to_string().contains("--prompt-ids"), "{err}");
    }
}

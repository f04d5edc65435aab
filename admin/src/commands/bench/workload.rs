//! The prompts a bench sends: random lengths, groups sharing a long prefix, or a trace.

use std::path::Path;

use serde::Deserialize;

use super::CommandError;
use crate::args::{BenchArgs, WorkloadKind};

/// Token ids from here up, below the vocabulary size: ids 0–2 are often special.
const FIRST_ORDINARY_ID: u32 = 3;

/// One request of the workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BenchRequest {
    pub prompt_ids: Vec<u32>,
    pub max_tokens: u32,
}

/// A small seeded generator (PCG-style LCG), so a workload is the same run after run.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1))
    }

    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }

    /// Uniform in [0, 1).
    pub(crate) fn unit(&mut self) -> f64 {
        self.next() as f64 / (1u64 << 31) as f64
    }

    fn tokens(&mut self, n: usize, vocab: u32) -> Vec<u32> {
        let span = u64::from(vocab.saturating_sub(FIRST_ORDINARY_ID).max(1));
        (0..n)
            .map(|_| FIRST_ORDINARY_ID + (self.next() % span) as u32)
            .collect()
    }
}

/// A trace line: a prompt (ids, or a length to fill with random ids) and an output length.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TraceLine {
    prompt_ids: Option<Vec<u32>>,
    prompt_len: Option<usize>,
    output_len: u32,
}

/// The `--requests` requests of the workload `args` describes, for a model of `vocab`
/// tokens.
pub(crate) fn build(args: &BenchArgs, vocab: u32) -> Result<Vec<BenchRequest>, CommandError> {
    let mut rng = Rng::new(args.seed);
    let n = args.requests;
    match args.workload {
        WorkloadKind::Random => Ok((0..n)
            .map(|_| BenchRequest {
                prompt_ids: rng.tokens(args.isl.max(1), vocab),
                max_tokens: args.osl,
            })
            .collect()),
        WorkloadKind::SharedPrefix => {
            if args.groups == 0 {
                return Err(CommandError::Usage("--groups must be >= 1".into()));
            }
            let prefixes: Vec<Vec<u32>> = (0..args.groups)
                .map(|_| rng.tokens(args.prefix_len, vocab))
                .collect();
            Ok((0..n)
                .map(|i| {
                    let mut prompt_ids = prefixes[i % args.groups].clone();
                    prompt_ids.extend(rng.tokens(args.isl.max(1), vocab));
                    BenchRequest {
                        prompt_ids,
                        max_tokens: args.osl,
                    }
                })
                .collect())
        }
        WorkloadKind::Trace => {
            let path = args.trace.as_deref().ok_or_else(|| {
                CommandError::Usage("--workload trace needs --trace FILE.jsonl".into())
            })?;
            read_trace(path, n, vocab, &mut rng)
        }
    }
}

fn read_trace(
    path: &Path,
    n: usize,
    vocab: u32,
    rng: &mut Rng,
) -> Result<Vec<BenchRequest>, CommandError> {
    let text = std::fs::read_to_string(path)?;
    let mut requests = Vec::new();
    for (number, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let bad = |what: String| {
            CommandError::Usage(format!("{}:{}: {what}", path.display(), number + 1))
        };
        let line: TraceLine = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
        let prompt_ids = match (line.prompt_ids, line.prompt_len) {
            (Some(ids), None) => ids,
            (None, Some(len)) => rng.tokens(len.max(1), vocab),
            _ => return Err(bad("give exactly one of prompt_ids and prompt_len".into())),
        };
        requests.push(BenchRequest {
            prompt_ids,
            max_tokens: line.output_len,
        });
        if requests.len() == n {
            break;
        }
    }
    if requests.is_empty() {
        return Err(CommandError::Usage(format!(
            "{} holds no requests",
            path.display()
        )));
    }
    Ok(requests)
}

//! `tandemctl bench`: load against a running cluster, closed loop (fixed concurrency) or open
//! loop (Poisson arrivals), over gRPC or OpenAI HTTP; reports TTFT, ITL, TPOT and end-to-end
//! latency percentiles, throughput and goodput per sweep point, as a table, JSON and an SVG
//! chart.

mod chart;
mod client;
mod stats;
mod workload;

use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use tokio::sync::Mutex;

use super::CommandError;
use crate::args::{BenchArgs, WorkloadKind};
use client::{Client, RequestTiming};
use stats::PointStats;
use workload::BenchRequest;

/// How one sweep point drives load.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Load {
    /// This many requests in flight at once.
    Concurrency(usize),
    /// Poisson arrivals at this many requests per second.
    Rate(f64),
}

impl std::fmt::Display for Load {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Concurrency(c) => write!(f, "concurrency {c}"),
            Self::Rate(r) => write!(f, "rate {r}/s"),
        }
    }
}

pub fn run(args: &BenchArgs) -> Result<(), CommandError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(bench(args))
}

fn loads(args: &BenchArgs) -> Result<Vec<Load>, CommandError> {
    match (args.concurrency.is_empty(), args.rate.is_empty()) {
        (false, false) => Err(CommandError::Usage(
            "give --concurrency (closed loop) or --rate (open loop), not both".into(),
        )),
        (true, true) => Ok(vec![Load::Concurrency(8)]),
        (false, true) => {
            if args.concurrency.contains(&0) {
                return Err(CommandError::Usage("--concurrency must be >= 1".into()));
            }
            Ok(args
                .concurrency
                .iter()
                .map(|&c| Load::Concurrency(c))
                .collect())
        }
        (true, false) => {
            if let Some(bad) = args.rate.iter().find(|r| !(r.is_finite() && **r > 0.0)) {
                return Err(CommandError::Usage(format!(
                    "--rate must be > 0, got {bad}"
                )));
            }
            Ok(args.rate.iter().map(|&r| Load::Rate(r)).collect())
        }
    }
}

async fn bench(args: &BenchArgs) -> Result<(), CommandError> {
    let loads = loads(args)?;
    if args.requests == 0 {
        return Err(CommandError::Usage("--requests must be >= 1".into()));
    }
    let client = Client::connect(args).await?;
    let vocab = client.vocab_size().await?;
    let requests = workload::build(args, vocab)?;
    println!(
        "{} requests per point, workload {:?}, over {}",
        requests.len(),
        args.workload,
        client.describe()
    );
    println!("{}", PointStats::header());
    let mut points = Vec::new();
    for load in loads {
        let (timings, wall) = run_point(&client, &requests, load, args).await;
        let point = PointStats::new(load, &timings, wall, args.slo_ttft_ms, args.slo_tpot_ms);
        println!("{}", point.row());
        points.push(point);
    }
    if let Some(path) = &args.json {
        let report = json!({
            "workload": format!("{:?}", args.workload),
            "protocol": client.describe(),
            "requests_per_point": requests.len(),
            "slo_ttft_ms": args.slo_ttft_ms,
            "slo_tpot_ms": args.slo_tpot_ms,
            "points": points.iter().map(PointStats::to_json).collect::<Vec<_>>(),
        });
        std::fs::write(
            path,
            serde_json::to_string_pretty(&report).unwrap_or_default(),
        )?;
        eprintln!("wrote {}", path.display());
    }
    if let Some(path) = &args.chart {
        chart::write(path, &points).map_err(|e| CommandError::Usage(format!("chart: {e}")))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// Runs every request once under `load`; the timings of each, in request order, and the
/// wall time of the whole point.
async fn run_point(
    client: &Client,
    requests: &[BenchRequest],
    load: Load,
    args: &BenchArgs,
) -> (Vec<RequestTiming>, Duration) {
    let progress = if args.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(requests.len() as u64)
    };
    progress.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    progress.set_prefix(load.to_string());
    let results = Arc::new(Mutex::new(vec![None; requests.len()]));
    let started = Instant::now();
    let mut tasks = Vec::new();
    match load {
        Load::Concurrency(c) => {
            let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            for _ in 0..c.min(requests.len()) {
                let (client, next, results, progress) = (
                    client.clone(),
                    next.clone(),
                    results.clone(),
                    progress.clone(),
                );
                let requests = requests.to_vec();
                tasks.push(tokio::spawn(async move {
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(request) = requests.get(i) else {
                            break;
                        };
                        let timing = client.send(request, started).await;
                        results.lock().await[i] = Some(timing);
                        progress.inc(1);
                    }
                }));
            }
        }
        Load::Rate(rate) => {
            let mut rng = workload::Rng::new(args.seed ^ 0x5eed);
            let mut at = Duration::ZERO;
            for (i, request) in requests.iter().enumerate() {
                // Exponential gaps: a Poisson process at `rate`.
                at += Duration::from_secs_f64(-(1.0 - rng.unit()).ln() / rate);
                let (client, results, progress) =
                    (client.clone(), results.clone(), progress.clone());
                let request = request.clone();
                tasks.push(tokio::spawn(async move {
                    tokio::time::sleep_until((started + at).into()).await;
                    let timing = client.send(&request, started).await;
                    results.lock().await[i] = Some(timing);
                    progress.inc(1);
                }));
            }
        }
    }
    for task in tasks {
        let _ = task.await;
    }
    progress.finish_and_clear();
    let wall = started.elapsed();
    let mut results = results.lock().await;
    let timings = results
        .iter_mut()
        .map(|r| r.take().unwrap_or_else(RequestTiming::lost))
        .collect();
    (timings, wall)
}

impl std::fmt::Debug for WorkloadKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Random => "random",
            Self::SharedPrefix => "shared-prefix",
            Self::Trace => "trace",
        })
    }
}

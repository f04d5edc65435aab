//! `tandemctl plan` (the simulator's search over deployments, as a table or JSON) and
//! `tandemctl calibrate` (a profile fitted to the engine bench).

use std::io::Write;

use tandem_sim::plan::{helm_values, plan, throughput_at};
use tandem_sim::{CostModel, HardwareProfile, ModelShape, PlanRequest, Point, RequestSpec};

use super::CommandError;
use crate::args::{CalibrateArgs, Format, PlanArgs};

pub fn run(args: &PlanArgs) -> Result<(), CommandError> {
    let usage = |e: tandem_sim::SimError| CommandError::Usage(e.to_string());
    let model = ModelShape::load(&args.model.to_string_lossy()).map_err(usage)?;
    let hardware = HardwareProfile::load(&args.hardware).map_err(usage)?;
    for (flag, value) in [("--slo-ttft", args.slo_ttft), ("--slo-tpot", args.slo_tpot)] {
        if !(value.is_finite() && value > 0.0) {
            return Err(CommandError::Usage(format!(
                "{flag} must be > 0, got {value}"
            )));
        }
    }
    let cost = CostModel { model, hardware };
    let trace = args.trace.as_deref().map(read_trace).transpose()?;
    let mean = |f: fn(&RequestSpec) -> usize| {
        trace
            .as_ref()
            .map(|t| t.iter().map(f).sum::<usize>() / t.len())
    };
    let request = PlanRequest {
        gpus: args.gpus as usize,
        isl: mean(|r| r.prompt_len).unwrap_or(args.isl as usize),
        osl: mean(|r| r.output_len).unwrap_or(args.osl as usize),
        slo_ttft_s: args.slo_ttft,
        slo_tpot_s: args.slo_tpot,
        requests: args.requests as usize,
        trace,
    };
    let result = plan(&cost, &request);
    if result.points.is_empty() {
        return Err(CommandError::Usage(format!(
            "no deployment of {} GPUs holds {} on {} (weights or one sequence's KV do not fit)",
            args.gpus, cost.model.name, cost.hardware.name
        )));
    }
    let at: Vec<(f64, Option<f64>)> = args
        .at
        .iter()
        .map(|&user| (user, throughput_at(&result.pareto, user)))
        .collect();
    if let (Some(path), Some(chosen)) = (&args.helm_values, &result.chosen) {
        std::fs::write(path, helm_values(chosen.deployment, &args.model_path))?;
    }
    let mut out = std::io::stdout().lock();
    match args.format {
        Format::Json | Format::Yaml => {
            let json = serde_json::json!({
                "model": cost.model.name,
                "hardware": cost.hardware.name,
                "pareto": result.pareto,
                "chosen": result.chosen,
                "at": at.iter().map(|(user, gpu)| serde_json::json!({
                    "tokens_per_s_per_user": user, "tokens_per_s_per_gpu": gpu,
                })).collect::<Vec<_>>(),
                "points": result.points.len(),
            });
            writeln!(out, "{json:#}")?;
        }
        Format::Table => {
            writeln!(
                out,
                "{} on {}: {} GPUs, ISL {} / OSL {}{}, {} deployments x loads simulated",
                cost.model.name,
                cost.hardware.name,
                args.gpus,
                request.isl,
                request.osl,
                if request.trace.is_some() {
                    " (trace means)"
                } else {
                    ""
                },
                result.points.len()
            )?;
            writeln!(
                out,
                "Pareto front (tokens/s per GPU against tokens/s per user):"
            )?;
            writeln!(
                out,
                "{:<24} {:>9} {:>13} {:>13} {:>11} {:>12}  slo",
                "deployment", "req/s", "ttft p90 ms", "tpot p90 ms", "tok/s/gpu", "tok/s/user"
            )?;
            for p in &result.pareto {
                writeln!(out, "{}", row(p))?;
            }
            for (user, gpu) in &at {
                match gpu {
                    Some(gpu) => writeln!(out, "at {user} tok/s/user: {gpu:.0} tok/s/gpu")?,
                    None => writeln!(out, "at {user} tok/s/user: no deployment reaches it")?,
                }
            }
            match &result.chosen {
                Some(chosen) => writeln!(
                    out,
                    "chosen (most tok/s/gpu within the SLOs):\n{}",
                    row(chosen)
                )?,
                None => writeln!(
                    out,
                    "no deployment meets ttft p90 <= {} s and tpot p90 <= {} s",
                    args.slo_ttft, args.slo_tpot
                )?,
            }
        }
    }
    Ok(())
}

fn row(p: &Point) -> String {
    let d = p.deployment;
    let o = p.outcome;
    format!(
        "{:<24} {:>9.2} {:>13.0} {:>13.1} {:>11.0} {:>12.1}  {}",
        format!(
            "{}xTP{} + {}xEP{}",
            d.prefill_groups, d.tp, d.decode_groups, d.ep
        ),
        p.rate,
        o.ttft_p90_s * 1e3,
        o.tpot_p90_s * 1e3,
        o.tokens_per_s_per_gpu,
        o.tokens_per_s_per_user,
        if p.meets_slo { "yes" } else { "no" }
    )
}

pub fn calibrate(args: &CalibrateArgs) -> Result<(), CommandError> {
    let usage = |e: tandem_sim::SimError| CommandError::Usage(e.to_string());
    let base = HardwareProfile::load(&args.base).map_err(usage)?;
    let runs = args
        .bench
        .iter()
        .map(|path| {
            let text = std::fs::read_to_string(path)?;
            serde_json::from_str::<tandem_sim::calibrate::BenchRun>(&text)
                .map_err(|e| CommandError::Usage(format!("{}: {e}", path.display())))
        })
        .collect::<Result<Vec<_>, CommandError>>()?;
    let fit = tandem_sim::calibrate::calibrate(&base, &runs).map_err(usage)?;
    let json = serde_json::to_string_pretty(&fit.profile)
        .map_err(|e| CommandError::Usage(e.to_string()))?;
    std::fs::write(&args.out, format!("{json}\n"))?;
    let p = &fit.profile;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{}: copy {:.0} GB/s, GEMM {:.0} TFLOP/s; fitted: memory efficiency {:.2}, host {:.0} us per step + {:.1} us per sequence + {:.2} us per launch, prefill at {:.2}% of the GEMM rate{}",
        runs[0].device,
        p.hbm_gbps,
        p.bf16_tflops,
        p.memory_efficiency,
        p.step_overhead_us,
        p.per_sequence_us,
        p.launch_us,
        100.0 * p.prefill_efficiency.unwrap_or(p.gemm_efficiency),
        p.prefill_exposed_reads
            .map(|share| format!(
                " plus {:.0}% of its weight reads at the copy rate",
                100.0 * share
            ))
            .unwrap_or_default()
    )?;
    writeln!(
        out,
        "{:<38} {:>12} {:>13} {:>8}",
        "operation", "measured ms", "predicted ms", "error"
    )?;
    for check in &fit.checks {
        writeln!(
            out,
            "{:<38} {:>12.2} {:>13.2} {:>7.0}%",
            check.operation,
            check.measured_s * 1e3,
            check.predicted_s * 1e3,
            100.0 * check.relative_error()
        )?;
    }
    writeln!(out, "wrote {}", args.out.display())?;
    Ok(())
}

/// A trace's requests, sorted by arrival.
fn read_trace(path: &std::path::Path) -> Result<Vec<RequestSpec>, CommandError> {
    let text = std::fs::read_to_string(path)?;
    let mut requests = Vec::new();
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let spec: RequestSpec = serde_json::from_str(line)
            .map_err(|e| CommandError::Usage(format!("{} line {}: {e}", path.display(), n + 1)))?;
        if !(spec.arrival_s.is_finite() && spec.arrival_s >= 0.0) || spec.output_len == 0 {
            return Err(CommandError::Usage(format!(
                "{} line {}: arrival_s must be >= 0 and output_len >= 1",
                path.display(),
                n + 1
            )));
        }
        requests.push(spec);
    }
    if requests.len() < 10 {
        return Err(CommandError::Usage(format!(
            "{}: a trace needs at least 10 requests, got {}",
            path.display(),
            requests.len()
        )));
    }
    requests.sort_by(|a, b| a.arrival_s.total_cmp(&b.arrival_s));
    Ok(requests)
}

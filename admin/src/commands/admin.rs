//! The SRE verbs over the router's `tandem.v1.Admin`: get, describe, cordon, uncordon, drain,
//! move, rebalance and top, printing a table, JSON or YAML.

use std::process::ExitCode;
use std::time::Duration;

use serde_json::{Value, json};
use tandem_proto::v1::admin_client::AdminClient;
use tandem_proto::v1::{
    ClusterSummaryRequest, ClusterSummaryResponse, CordonRequest, DescribeWorkerRequest,
    DrainRequest, ExplainRouteRequest, ListWorkersRequest, MoveProgress, MoveRequest,
    RebalanceRequest, WorkerInfo, WorkerRole, WorkerState,
};
use tonic::Status;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use super::{BearerToken, CommandError};
use crate::args::{
    DescribeArgs, DrainArgs, Endpoint, ExplainArgs, Format, GetArgs, GetWhat, MoveArgs, Pool,
    RebalanceArgs, TopArgs, WorkerArgs,
};

type Client = AdminClient<InterceptedService<Channel, BearerToken>>;

fn runtime() -> Result<tokio::runtime::Runtime, CommandError> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

async fn connect(endpoint: &Endpoint) -> Result<Client, CommandError> {
    let router = endpoint.endpoint.clone();
    let channel = super::router_channel(&router, "--endpoint", &endpoint.tls).await?;
    Ok(AdminClient::with_interceptor(
        channel,
        BearerToken::new(endpoint.token.as_deref(), "--token")?,
    ))
}

fn rpc(endpoint: &Endpoint) -> impl Fn(Status) -> CommandError + '_ {
    move |status| CommandError::Rpc {
        router: endpoint.endpoint.clone(),
        status,
    }
}

fn role_name(role: i32) -> &'static str {
    match WorkerRole::try_from(role) {
        Ok(WorkerRole::Prefill) => "prefill",
        Ok(WorkerRole::Decode) => "decode",
        _ => "unknown",
    }
}

fn state_name(state: i32) -> &'static str {
    match WorkerState::try_from(state) {
        Ok(WorkerState::Ready) => "ready",
        Ok(WorkerState::Cordoned) => "cordoned",
        Ok(WorkerState::Draining) => "draining",
        Ok(WorkerState::Drained) => "drained",
        Ok(WorkerState::Unreachable) => "unreachable",
        _ => "unknown",
    }
}

fn worker_json(w: &WorkerInfo) -> Value {
    let load = w.load.unwrap_or_default();
    json!({
        "id": w.id,
        "role": role_name(w.role),
        "state": state_name(w.state),
        "address": w.address,
        "model": w.model,
        "device": w.device,
        "detail": w.detail,
        "load": {
            "queued_prefill_tokens": load.queued_prefill_tokens,
            "running_sequences": load.running_sequences,
            "waiting_sequences": load.waiting_sequences,
            "kv_blocks_used": load.kv_blocks_used,
            "kv_blocks_total": load.kv_blocks_total,
            "tokens_per_second": load.tokens_per_second,
            "pending_transfers": load.pending_transfers,
            "router_in_flight": load.router_in_flight,
            "tokens_total": load.tokens_total,
            "cached_prompt_tokens": load.cached_prompt_tokens,
        },
    })
}

fn summary_json(s: &ClusterSummaryResponse) -> Value {
    json!({
        "model": s.model,
        "router_in_flight": s.router_in_flight,
        "pools": s.pools.iter().map(|p| json!({
            "role": role_name(p.role),
            "workers": p.workers,
            "ready": p.ready,
            "queued_prefill_tokens": p.queued_prefill_tokens,
            "running_sequences": p.running_sequences,
            "kv_blocks_used": p.kv_blocks_used,
            "kv_blocks_total": p.kv_blocks_total,
            "tokens_per_second": p.tokens_per_second,
        })).collect::<Vec<_>>(),
    })
}

fn workers_table(workers: &[WorkerInfo]) -> String {
    let mut rows = vec![
        [
            "ID",
            "ROLE",
            "STATE",
            "ADDRESS",
            "RUNNING",
            "QUEUED-TOKENS",
            "KV-BLOCKS",
            "TOK/S",
        ]
        .map(String::from),
    ];
    for w in workers {
        let l = w.load.unwrap_or_default();
        rows.push([
            w.id.clone(),
            role_name(w.role).into(),
            state_name(w.state).into(),
            w.address.clone(),
            l.running_sequences.to_string(),
            l.queued_prefill_tokens.to_string(),
            format!("{}/{}", l.kv_blocks_used, l.kv_blocks_total),
            format!("{:.1}", l.tokens_per_second),
        ]);
    }
    table(&rows)
}

fn pools_table(s: &ClusterSummaryResponse) -> String {
    let mut rows = vec![
        [
            "POOL",
            "WORKERS",
            "READY",
            "RUNNING",
            "QUEUED-TOKENS",
            "KV-BLOCKS",
            "TOK/S",
        ]
        .map(String::from),
    ];
    for p in &s.pools {
        rows.push([
            role_name(p.role).into(),
            p.workers.to_string(),
            p.ready.to_string(),
            p.running_sequences.to_string(),
            p.queued_prefill_tokens.to_string(),
            format!("{}/{}", p.kv_blocks_used, p.kv_blocks_total),
            format!("{:.1}", p.tokens_per_second),
        ]);
    }
    format!(
        "model {}, {} requests in flight\n{}",
        s.model,
        s.router_in_flight,
        table(&rows)
    )
}

/// Left-aligned columns, two spaces apart.
fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let widths: Vec<usize> = (0..N)
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    rows.iter()
        .map(|r| {
            r.iter()
                .zip(&widths)
                .map(|(cell, w)| format!("{cell:<w$}"))
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_owned()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// YAML for the JSON values these verbs print (objects, arrays, scalars).
fn yaml(value: &Value, indent: usize, out: &mut String) {
    let pad = " ".repeat(indent);
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (k, v) in map {
                match v {
                    Value::Object(m) if !m.is_empty() => {
                        out.push_str(&format!("{pad}{k}:\n"));
                        yaml(v, indent + 2, out);
                    }
                    Value::Array(a) if !a.is_empty() => {
                        out.push_str(&format!("{pad}{k}:\n"));
                        yaml(v, indent, out);
                    }
                    _ => out.push_str(&format!("{pad}{k}: {}\n", scalar(v))),
                }
            }
        }
        Value::Array(items) if !items.is_empty() => {
            for item in items {
                let mut inner = String::new();
                yaml(item, indent + 2, &mut inner);
                let inner = inner.trim_start().to_owned();
                out.push_str(&format!("{pad}- {inner}"));
                if !inner.ends_with('\n') {
                    out.push('\n');
                }
            }
        }
        other => out.push_str(&format!("{pad}{}\n", scalar(other))),
    }
}

fn scalar(v: &Value) -> String {
    match v {
        // JSON strings are valid YAML double-quoted scalars.
        Value::String(_) => v.to_string(),
        Value::Object(_) => "{}".into(),
        Value::Array(_) => "[]".into(),
        other => other.to_string(),
    }
}

fn print(format: Format, value: &Value, table: impl FnOnce() -> String) {
    match format {
        Format::Table => println!("{}", table()),
        Format::Json => println!("{value}"),
        Format::Yaml => {
            let mut out = String::new();
            yaml(value, 0, &mut out);
            print!("{out}");
        }
    }
}

/// `tandemctl get workers|pools`.
pub fn get(args: &GetArgs) -> Result<ExitCode, CommandError> {
    runtime()?.block_on(async {
        let mut client = connect(&args.endpoint).await?;
        match args.what {
            GetWhat::Workers => {
                print_workers(&mut client, &args.endpoint).await?;
            }
            GetWhat::Pools => {
                let summary = client
                    .cluster_summary(ClusterSummaryRequest {})
                    .await
                    .map_err(rpc(&args.endpoint))?
                    .into_inner();
                print(args.endpoint.format, &summary_json(&summary), || {
                    pools_table(&summary)
                });
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// Lists the workers and prints them in the endpoint's format.
async fn print_workers(client: &mut Client, endpoint: &Endpoint) -> Result<(), CommandError> {
    let workers = client
        .list_workers(ListWorkersRequest {})
        .await
        .map_err(rpc(endpoint))?
        .into_inner()
        .workers;
    let value = Value::Array(workers.iter().map(worker_json).collect());
    print(endpoint.format, &value, || workers_table(&workers));
    Ok(())
}

fn print_worker(format: Format, w: &WorkerInfo) {
    print(format, &worker_json(w), || {
        let mut out = String::new();
        yaml(&worker_json(w), 0, &mut out);
        out.trim_end().to_owned()
    });
}

/// `tandemctl describe worker ID`.
pub fn describe(args: &DescribeArgs) -> Result<ExitCode, CommandError> {
    runtime()?.block_on(async {
        let mut client = connect(&args.endpoint).await?;
        let worker = client
            .describe_worker(DescribeWorkerRequest {
                id: args.id.clone(),
            })
            .await
            .map_err(rpc(&args.endpoint))?
            .into_inner();
        print_worker(args.endpoint.format, &worker);
        Ok(ExitCode::SUCCESS)
    })
}

/// `tandemctl cordon ID` (or `uncordon ID` when `cordon` is false).
pub fn cordon(args: &WorkerArgs, cordon: bool) -> Result<ExitCode, CommandError> {
    runtime()?.block_on(async {
        let mut client = connect(&args.endpoint).await?;
        let request = CordonRequest {
            id: args.id.clone(),
        };
        let worker = if cordon {
            client.cordon(request).await
        } else {
            client.uncordon(request).await
        }
        .map_err(rpc(&args.endpoint))?
        .into_inner();
        print_worker(args.endpoint.format, &worker);
        Ok(ExitCode::SUCCESS)
    })
}

/// `tandemctl drain ID`: progress on stderr, the drained worker on stdout.
pub fn drain(args: &DrainArgs) -> Result<ExitCode, CommandError> {
    runtime()?.block_on(async {
        let mut client = connect(&args.endpoint).await?;
        let mut progress = client
            .drain(DrainRequest {
                id: args.id.clone(),
                timeout_seconds: args.timeout.unwrap_or(0.0),
            })
            .await
            .map_err(rpc(&args.endpoint))?
            .into_inner();
        while let Some(step) = progress.message().await.map_err(rpc(&args.endpoint))? {
            let Some(worker) = step.worker else { continue };
            let load = worker.load.unwrap_or_default();
            if step.drained {
                eprintln!("drain {}: drained", worker.id);
                print_worker(args.endpoint.format, &worker);
                return Ok(ExitCode::SUCCESS);
            }
            eprintln!(
                "drain {}: {} running, {} waiting, {} in flight from the router",
                worker.id, load.running_sequences, load.waiting_sequences, load.router_in_flight
            );
        }
        Err(CommandError::Cluster {
            process: format!("drain of {}", args.id),
            what: "ended without the worker drained".into(),
        })
    })
}

/// Prints each step of a move on stderr; returns the last worker reported once done.
async fn follow_moves(
    mut steps: tonic::Streaming<MoveProgress>,
    endpoint: &Endpoint,
    what: String,
) -> Result<Option<WorkerInfo>, CommandError> {
    let mut last = None;
    while let Some(step) = steps.message().await.map_err(rpc(endpoint))? {
        eprintln!("{what}: {}", step.message);
        if step.worker.is_some() {
            last = step.worker;
        }
        if step.done {
            return Ok(last);
        }
    }
    Err(CommandError::Cluster {
        process: what,
        what: "ended before it was done".into(),
    })
}

fn pool_role(pool: Pool) -> i32 {
    match pool {
        Pool::Prefill => WorkerRole::Prefill as i32,
        Pool::Decode => WorkerRole::Decode as i32,
    }
}

/// `tandemctl move ID --to POOL`: progress on stderr, the moved worker on stdout.
pub fn move_worker(args: &MoveArgs) -> Result<ExitCode, CommandError> {
    runtime()?.block_on(async {
        let mut client = connect(&args.endpoint).await?;
        let steps = client
            .r#move(MoveRequest {
                id: args.id.clone(),
                to: pool_role(args.to),
                timeout_seconds: args.timeout.unwrap_or(0.0),
            })
            .await
            .map_err(rpc(&args.endpoint))?
            .into_inner();
        let moved = follow_moves(steps, &args.endpoint, format!("move {}", args.id)).await?;
        if let Some(worker) = moved {
            print_worker(args.endpoint.format, &worker);
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// `tandemctl rebalance --prefill N --decode M`: progress on stderr, the workers on stdout.
pub fn rebalance(args: &RebalanceArgs) -> Result<ExitCode, CommandError> {
    runtime()?.block_on(async {
        let mut client = connect(&args.endpoint).await?;
        let steps = client
            .rebalance(RebalanceRequest {
                prefill: args.prefill,
                decode: args.decode,
                timeout_seconds: args.timeout.unwrap_or(0.0),
            })
            .await
            .map_err(rpc(&args.endpoint))?
            .into_inner();
        follow_moves(steps, &args.endpoint, "rebalance".into()).await?;
        print_workers(&mut client, &args.endpoint).await?;
        Ok(ExitCode::SUCCESS)
    })
}

/// `tandemctl top`: pools and workers, refreshed.
pub fn top(args: &TopArgs) -> Result<ExitCode, CommandError> {
    let interval = Duration::from_secs_f64(args.interval.max(0.1));
    runtime()?.block_on(async {
        let mut client = connect(&args.endpoint).await?;
        let mut shown = 0u64;
        loop {
            let summary = client
                .cluster_summary(ClusterSummaryRequest {})
                .await
                .map_err(rpc(&args.endpoint))?
                .into_inner();
            let workers = client
                .list_workers(ListWorkersRequest {})
                .await
                .map_err(rpc(&args.endpoint))?
                .into_inner()
                .workers;
            // Clear the screen and home the cursor, like top.
            print!(
                "\x1b[2J\x1b[H{}\n\n{}\n",
                pools_table(&summary),
                workers_table(&workers)
            );
            shown += 1;
            if args.iterations.is_some_and(|n| shown >= n) {
                return Ok(ExitCode::SUCCESS);
            }
            tokio::select! {
                () = tandem_common::server::shutdown_signal() => return Ok(ExitCode::SUCCESS),
                () = tokio::time::sleep(interval) => {}
            }
        }
    })
}

/// `tandemctl route explain`.
pub fn explain_route(args: &ExplainArgs) -> Result<ExitCode, CommandError> {
    runtime()?.block_on(async {
        let mut client = connect(&args.endpoint).await?;
        let explained = client
            .explain_route(ExplainRouteRequest {
                text: args.prompt.clone().unwrap_or_default(),
                token_ids: args.prompt_ids.clone(),
            })
            .await
            .map_err(rpc(&args.endpoint))?
            .into_inner();
        let value = json!({
            "routing": explained.routing,
            "prompt_tokens": explained.prompt_tokens,
            "candidates": explained.candidates.iter().map(|c| json!({
                "id": c.worker,
                "state": state_name(c.state),
                "cached_tokens": c.cached_tokens,
                "uncached_tokens": c.uncached_tokens,
                "queued_tokens": c.queued_tokens,
                "score": c.score,
                "chosen": c.chosen,
            })).collect::<Vec<_>>(),
        });
        print(args.endpoint.format, &value, || {
            let mut rows = vec![
                [
                    "WORKER", "STATE", "CACHED", "UNCACHED", "QUEUED", "SCORE", "CHOSEN",
                ]
                .map(str::to_owned),
            ];
            rows.extend(explained.candidates.iter().map(|c| {
                [
                    c.worker.clone(),
                    state_name(c.state).to_owned(),
                    c.cached_tokens.to_string(),
                    c.uncached_tokens.to_string(),
                    c.queued_tokens.to_string(),
                    c.score.to_string(),
                    if c.chosen { "*" } else { "" }.to_owned(),
                ]
            }));
            format!(
                "{} prompt tokens, routing {}\n{}",
                explained.prompt_tokens,
                explained.routing,
                table(&rows)
            )
        });
        Ok(ExitCode::SUCCESS)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_nests_objects_and_lists() {
        let mut out = String::new();
        yaml(
            &json!([{"id": "d-0", "load": {"running": 2}}, {"id": "p-0", "load": {}}]),
            0,
            &mut out,
        );
        assert_eq!(
            out,
            "- id: \"d-0\"\n  load:\n    running: 2\n- id: \"p-0\"\n  load: {}\n"
        );
    }

    #[test]
    fn table_aligns_columns() {
        let rows = [
            ["ID".to_owned(), "STATE".to_owned()],
            ["decode-0".to_owned(), "ready".to_owned()],
        ];
        assert_eq!(table(&rows), "ID        STATE\ndecode-0  ready");
    }
}

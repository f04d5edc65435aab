//! `tandemctl up`: a whole cluster on this machine (router, prefill and decode workers, each
//! its own process on loopback), supervised until Ctrl-C or SIGTERM.

use std::collections::HashMap;
use std::ffi::OsString;
use std::process::{ExitCode, ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};
use tokio::sync::mpsc;

use super::CommandError;
use super::generate::sibling_binary;
use crate::args::UpArgs;

/// How long processes get to stop after SIGTERM before they are killed.
const STOP_GRACE: Duration = Duration::from_secs(10);
const LOOPBACK_ANY_PORT: &str = "127.0.0.1:0";

/// A started process: its name, pid, and what its ready line said.
struct Started {
    name: String,
    pid: Option<u32>,
    ready: HashMap<String, String>,
}

/// Starts the cluster, prints the router's address and `ready`, and stops everything on
/// Ctrl-C or SIGTERM (or when any process exits on its own, which is an error).
pub fn run(args: &UpArgs) -> Result<ExitCode, CommandError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(up(args))
}

async fn up(args: &UpArgs) -> Result<ExitCode, CommandError> {
    let startup = Duration::from_secs_f64(args.startup_timeout_seconds.max(0.0));
    let model: Vec<OsString> = args
        .model
        .iter()
        .flat_map(|dir| [OsString::from("--model"), dir.clone().into_os_string()])
        .collect();
    let (exits, mut exited) = mpsc::channel(args.prefill + args.decode as usize + 1);
    let mut workers = Vec::new();
    let mut pending = Vec::new();
    for (role, count, binary, parallel) in [
        (
            "decode",
            args.decode as usize,
            "tandem-decode-worker",
            ["--ep".to_owned(), args.decode_ep.to_string()],
        ),
        (
            "prefill",
            args.prefill,
            "tandem-prefill-worker",
            ["--tp".to_owned(), args.prefill_tp.to_string()],
        ),
    ] {
        let path = sibling_binary(binary)?;
        for i in 0..count {
            let name = format!("{role}-{i}");
            let mut argv: Vec<OsString> = vec![
                "serve".into(),
                "--listen".into(),
                LOOPBACK_ANY_PORT.into(),
                "--worker-id".into(),
                name.clone().into(),
            ];
            argv.extend(model.iter().cloned());
            argv.extend(parallel.iter().map(OsString::from));
            pending.push(start(name, &path, &argv, exits.clone())?);
        }
    }
    for process in pending {
        workers.push(wait_ready(process, startup).await?);
    }
    let addrs = |prefix: &str| -> Vec<OsString> {
        workers
            .iter()
            .filter(|w| w.name.starts_with(prefix))
            .flat_map(|w| {
                let addr = w.ready.get("grpc").cloned().unwrap_or_default();
                [format!("--{prefix}-worker").into(), addr.into()]
            })
            .collect()
    };
    let mut argv: Vec<OsString> = vec![
        "--listen".into(),
        args.listen.to_string().into(),
        "--http-listen".into(),
        args.http_listen.to_string().into(),
    ];
    argv.extend(addrs("decode"));
    argv.extend(addrs("prefill"));
    let router_path = sibling_binary("tandem-router")?;
    let router = wait_ready(start("router".into(), &router_path, &argv, exits)?, startup).await?;
    let router_addr = router.ready.get("grpc").cloned().unwrap_or_default();
    let http_addr = router.ready.get("http").cloned().unwrap_or_default();
    println!("{router_addr}");
    println!(
        "ready: router {router_addr} (OpenAI HTTP at http://{http_addr}/v1) in front of {} prefill and {} decode workers (Ctrl-C stops them)",
        args.prefill, args.decode
    );

    let mut all = vec![router];
    all.extend(workers);
    let outcome = tokio::select! {
        () = tandem_common::server::shutdown_signal() => Ok(ExitCode::SUCCESS),
        Some((name, status)) = exited.recv() => Err(CommandError::Cluster {
            process: name,
            what: format!("exited on its own ({status}); stopping the cluster"),
        }),
    };
    stop(&all, &mut exited).await;
    outcome
}

/// Spawns a process whose stdout is read for its ready line; its exit is reported on `exits`.
fn start(
    name: String,
    path: &std::path::Path,
    argv: &[OsString],
    exits: mpsc::Sender<(String, ExitStatus)>,
) -> Result<(Started, Lines<BufReader<ChildStdout>>), CommandError> {
    let mut child: Child = Command::new(path)
        .args(argv)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| CommandError::Spawn {
            path: path.to_owned(),
            source,
        })?;
    let stdout = child.stdout.take().ok_or_else(|| CommandError::Cluster {
        process: name.clone(),
        what: "has no stdout".into(),
    })?;
    let pid = child.id();
    let reported = name.clone();
    tokio::spawn(async move {
        if let Ok(status) = child.wait().await {
            let _ = exits.send((reported, status)).await;
        }
    });
    let started = Started {
        name,
        pid,
        ready: HashMap::new(),
    };
    Ok((started, BufReader::new(stdout).lines()))
}

/// Reads stdout until the `ready k=v …` line, then keeps forwarding it to stderr.
async fn wait_ready(
    (mut started, mut lines): (Started, Lines<BufReader<ChildStdout>>),
    within: Duration,
) -> Result<Started, CommandError> {
    let not_ready = |what: String| CommandError::Cluster {
        process: started.name.clone(),
        what,
    };
    let ready_line = tokio::time::timeout(within, async {
        while let Some(line) = lines.next_line().await? {
            if let Some(fields) = line.strip_prefix("ready") {
                return Ok(Some(fields.to_owned()));
            }
            eprintln!("{line}");
        }
        Ok::<_, std::io::Error>(None)
    })
    .await
    .map_err(|_| not_ready(format!("was not ready within {within:?}")))??
    .ok_or_else(|| not_ready("exited before it was ready (its log is above)".into()))?;
    started.ready = ready_line
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let name = started.name.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            eprintln!("[{name}] {line}");
        }
    });
    Ok(started)
}

/// SIGTERM to every process (router first, so no request lands on a stopping worker), then
/// SIGKILL to any still running after the grace period.
async fn stop(processes: &[Started], exited: &mut mpsc::Receiver<(String, ExitStatus)>) {
    let mut running: Vec<&Started> = processes.iter().collect();
    for p in &running {
        signal(p, Signal::SIGTERM);
    }
    let deadline = tokio::time::Instant::now() + STOP_GRACE;
    while !running.is_empty() {
        match tokio::time::timeout_at(deadline, exited.recv()).await {
            Ok(Some((name, _))) => running.retain(|p| p.name != name),
            Ok(None) | Err(_) => break,
        }
    }
    for p in running {
        signal(p, Signal::SIGKILL);
    }
}

fn signal(process: &Started, signal: Signal) {
    if let Some(pid) = process.pid.and_then(|p| i32::try_from(p).ok()) {
        let _ = kill(Pid::from_raw(pid), signal);
    }
}

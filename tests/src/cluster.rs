//! Real binaries on loopback: each process binds port 0 and reports its addresses on a ready
//! line; stderr goes to `target/test-logs/<test>/<process>.log`, printed when a test fails.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::{binary, log_dir};

/// How long a process may take to print its ready line.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a process gets to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Log lines printed per process when a test fails.
const LOG_TAIL_LINES: usize = 40;

/// One running binary, stopped (SIGTERM, then SIGKILL) on drop.
#[derive(Debug)]
pub struct Process {
    pub name: String,
    child: Child,
    ready: HashMap<String, String>,
    log: PathBuf,
}

impl Process {
    /// Starts `binary` with `args` and waits for its `ready k=v …` line.
    pub fn start(name: &str, binary: &Path, args: &[OsString], logs: &Path) -> Self {
        let log = logs.join(format!("{name}.log"));
        let stderr = std::fs::File::create(&log).expect("log file");
        let mut child = Command::new(binary)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(fields) = line.strip_prefix("ready") {
                    let _ = tx.send(fields.to_owned());
                }
            }
        });
        let mut process = Self {
            name: name.to_owned(),
            child,
            ready: HashMap::new(),
            log,
        };
        match rx.recv_timeout(READY_TIMEOUT) {
            Ok(fields) => {
                process.ready = fields
                    .split_whitespace()
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect();
            }
            Err(_) => panic!(
                "{name} printed no ready line within {READY_TIMEOUT:?}; log:\n{}",
                process.log_tail()
            ),
        }
        process
    }

    /// An address from the ready line (`grpc`, `kv`).
    pub fn addr(&self, key: &str) -> String {
        self.ready
            .get(key)
            .cloned()
            .unwrap_or_else(|| panic!("{} reported no {key} address", self.name))
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr("grpc"))
    }

    pub fn signal(&self, signal: Signal) {
        let pid = i32::try_from(self.child.id()).expect("pid fits");
        let _ = kill(Pid::from_raw(pid), signal);
    }

    /// Its exit status, if it exits within `within`.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// SIGTERM, then SIGKILL if it has not exited in time; returns whether it exited cleanly
    /// (status 0) on SIGTERM.
    pub fn stop(&mut self) -> bool {
        if let Ok(Some(status)) = self.child.try_wait() {
            return status.success();
        }
        self.signal(Signal::SIGCONT);
        self.signal(Signal::SIGTERM);
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        false
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!(
                "--- {} ({}) ---\n{}",
                self.name,
                self.log.display(),
                self.log_tail()
            );
        }
    }
}

/// A router in front of prefill and decode workers, every one a real process.
#[derive(Debug)]
pub struct Cluster {
    /// Dropped first, so no request reaches a stopped worker.
    pub router: Process,
    pub prefill: Vec<Process>,
    pub decode: Vec<Process>,
}

/// How to start a [`Cluster`].
#[derive(Debug, Clone)]
pub struct ClusterBuilder {
    test: String,
    model: Option<PathBuf>,
    prefill: usize,
    decode: usize,
    router_args: Vec<OsString>,
    prefill_args: Vec<OsString>,
    decode_args: Vec<OsString>,
    etcd: Option<String>,
}

/// Lease TTL of workers registered in etcd by tests: short, so a killed worker leaves fast.
pub const TEST_LEASE_TTL_SECONDS: u64 = 2;

impl Cluster {
    /// A builder for test `test` (which names its log folder).
    pub fn builder(test: &str) -> ClusterBuilder {
        ClusterBuilder {
            test: test.to_owned(),
            model: None,
            prefill: 1,
            decode: 1,
            router_args: Vec::new(),
            prefill_args: Vec::new(),
            decode_args: Vec::new(),
            etcd: None,
        }
    }

    pub fn router_url(&self) -> String {
        self.router.url()
    }
}

fn os_args(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

impl ClusterBuilder {
    pub fn model(mut self, dir: PathBuf) -> Self {
        self.model = Some(dir);
        self
    }

    pub fn prefill(mut self, n: usize) -> Self {
        self.prefill = n;
        self
    }

    pub fn decode(mut self, n: usize) -> Self {
        self.decode = n;
        self
    }

    /// Workers register in etcd at `endpoint` (cluster named after the test) and the router
    /// follows it, instead of being given the workers' addresses.
    pub fn etcd(mut self, endpoint: String) -> Self {
        self.etcd = Some(endpoint);
        self
    }

    /// The flags that put a worker into this cluster's etcd registry (empty without etcd).
    pub fn registry_args(&self) -> Vec<OsString> {
        match &self.etcd {
            Some(endpoint) => os_args(&[
                "--etcd",
                endpoint,
                "--cluster",
                &self.test,
                "--lease-ttl-seconds",
                &TEST_LEASE_TTL_SECONDS.to_string(),
            ]),
            None => Vec::new(),
        }
    }

    pub fn router_args(mut self, args: &[&str]) -> Self {
        self.router_args.extend(os_args(args));
        self
    }

    pub fn prefill_args(mut self, args: &[&str]) -> Self {
        self.prefill_args.extend(os_args(args));
        self
    }

    pub fn decode_args(mut self, args: &[&str]) -> Self {
        self.decode_args.extend(os_args(args));
        self
    }

    /// Starts the workers, then the router in front of them; returns once all serve.
    pub fn start(self) -> Cluster {
        let logs = log_dir(&self.test);
        let model: Vec<OsString> = self
            .model
            .iter()
            .flat_map(|m| [OsString::from("--model"), m.clone().into_os_string()])
            .collect();
        let worker = |role: &str, i: usize, extra: &[OsString]| {
            let name = format!("{role}-{i}");
            let mut args = os_args(&["serve", "--listen", "127.0.0.1:0", "--worker-id", &name]);
            args.extend(model.iter().cloned());
            args.extend(self.registry_args());
            args.extend(extra.iter().cloned());
            Process::start(
                &name,
                &binary(&format!("tandem-{role}-worker")),
                &args,
                &logs,
            )
        };
        let decode: Vec<Process> = (0..self.decode)
            .map(|i| worker("decode", i, &self.decode_args))
            .collect();
        let prefill: Vec<Process> = (0..self.prefill)
            .map(|i| worker("prefill", i, &self.prefill_args))
            .collect();
        let mut args = os_args(&["--listen", "127.0.0.1:0"]);
        match &self.etcd {
            Some(endpoint) => args.extend(os_args(&["--etcd", endpoint, "--cluster", &self.test])),
            None => {
                for d in &decode {
                    args.extend(os_args(&["--decode-worker", &d.addr("grpc")]));
                }
                for p in &prefill {
                    args.extend(os_args(&["--prefill-worker", &p.addr("grpc")]));
                }
            }
        }
        args.extend(self.router_args);
        let router = Process::start("router", &binary("tandem-router"), &args, &logs);
        Cluster {
            router,
            prefill,
            decode,
        }
    }
}

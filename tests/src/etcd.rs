//! A real etcd on free loopback ports with a temporary data dir, for registry tests.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tandem_proto::etcd::RangeRequest;
use tandem_proto::etcd::kv_client::KvClient;

use crate::{installed, log_dir};

/// How long etcd may take to answer its first request.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// An etcd process, killed on drop.
#[derive(Debug)]
pub struct Etcd {
    child: Option<Child>,
    client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
    logs: PathBuf,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl Etcd {
    /// Starts etcd for `test`. Without an `etcd` binary the test is skipped (None, with a
    /// printed reason) unless `CI=true`, where that fails the run.
    pub fn start(test: &str) -> Option<Self> {
        if !installed("etcd", "etcd-server") {
            return None;
        }
        let logs = log_dir(&format!("{test}-etcd"));
        let mut etcd = Self {
            child: None,
            client_port: free_port(),
            peer_port: free_port(),
            data_dir: logs.join("data"),
            logs,
        };
        etcd.launch();
        Some(etcd)
    }

    /// `127.0.0.1:<port>` of the client API.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same ports and data.
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }

    fn launch(&mut self) {
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.logs.join("etcd.log"))
            .expect("etcd log");
        let child = Command::new("etcd")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--name", "test", "--listen-client-urls", &client])
            .args([
                "--advertise-client-urls",
                &client,
                "--listen-peer-urls",
                &peer,
            ])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("test={peer}")])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("etcd starts");
        self.child = Some(child);
        self.wait_ready();
    }

    /// Waits on etcd's own API (on a thread of its own, so async tests may call this).
    fn wait_ready(&self) {
        let url = format!("http://{}", self.endpoint());
        std::thread::scope(|s| {
            s.spawn(|| Self::ping_until_ready(url))
                .join()
                .expect("etcd readiness check");
        });
    }

    fn ping_until_ready(url: String) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let deadline = Instant::now() + READY_TIMEOUT;
        runtime.block_on(async {
            loop {
                if let Ok(mut kv) = KvClient::connect(url.clone()).await {
                    let ping = RangeRequest {
                        key: b"/".to_vec(),
                        ..RangeRequest::default()
                    };
                    if kv.range(ping).await.is_ok() {
                        return;
                    }
                }
                assert!(
                    Instant::now() < deadline,
                    "etcd not ready in {READY_TIMEOUT:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
    }
}

impl Etcd {
    /// Revokes every lease, as etcd does when it decides their holders are gone.
    pub async fn revoke_all_leases(&self) -> usize {
        use tandem_proto::etcd::lease_client::LeaseClient;
        use tandem_proto::etcd::{LeaseLeasesRequest, LeaseRevokeRequest};
        let mut lease = LeaseClient::connect(format!("http://{}", self.endpoint()))
            .await
            .expect("etcd");
        let leases = lease
            .lease_leases(LeaseLeasesRequest {})
            .await
            .expect("lease list")
            .into_inner()
            .leases;
        for l in &leases {
            lease
                .lease_revoke(LeaseRevokeRequest { id: l.id })
                .await
                .expect("revoke");
        }
        leases.len()
    }
}

impl Drop for Etcd {
    /// Kills etcd and drops its data (a preallocated WAL of 64 MB per test); the log stays.
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

//! A real Prometheus scraping test processes, queried over its HTTP API.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{installed, log_dir};

/// A Prometheus process scraping every second, killed on drop.
#[derive(Debug)]
pub struct Prometheus {
    child: Child,
    addr: String,
    data: PathBuf,
}

/// `GET path` on `addr` over HTTP/1.1: status code and body.
pub fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

impl Prometheus {
    /// Starts Prometheus for `test`, scraping `/metrics` of each `targets` (host:port).
    /// Without a `prometheus` binary the test is skipped (None, with a printed reason) unless
    /// `CI=true`, where that fails the run.
    pub fn start(test: &str, targets: &[String]) -> Option<Self> {
        if !installed("prometheus", "prometheus") {
            return None;
        }
        let dir = log_dir(&format!("{test}-prometheus"));
        let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: tandem\n    static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        );
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config).expect("prometheus config");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let addr = format!("127.0.0.1:{port}");
        let data = dir.join("data");
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!("--storage.tsdb.path={}", data.display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus starts");
        let prometheus = Self { child, addr, data };
        for _ in 0..300 {
            if matches!(http_get(&prometheus.addr, "/-/ready"), Ok((200, _))) {
                return Some(prometheus);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("prometheus not ready in 30 s; see {}", dir.display());
    }

    /// The sum of an instant query's samples (`expr` needs no URL escaping beyond spaces,
    /// quotes and braces), or None while it has none.
    pub fn query(&self, expr: &str) -> Option<f64> {
        let escaped: String = expr
            .chars()
            .map(|c| match c {
                ' ' => "%20".to_owned(),
                '"' => "%22".to_owned(),
                '{' => "%7B".to_owned(),
                '}' => "%7D".to_owned(),
                '+' => "%2B".to_owned(),
                c => c.to_string(),
            })
            .collect();
        let (status, body) =
            http_get(&self.addr, &format!("/api/v1/query?query={escaped}")).ok()?;
        assert_eq!(status, 200, "query {expr}: {body}");
        let json: serde_json::Value = serde_json::from_str(&body).expect("prometheus json");
        let samples = json["data"]["result"].as_array()?;
        if samples.is_empty() {
            return None;
        }
        Some(
            samples
                .iter()
                .filter_map(|s| s["value"][1].as_str()?.parse::<f64>().ok())
                .sum(),
        )
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

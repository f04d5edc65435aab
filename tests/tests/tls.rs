//! TLS on every listener. A cluster whose router and workers all demand certificates from one
//! CA answers a client holding one, over gRPC and HTTP, with the tokens of a single-process
//! run (so router → worker gRPC and prefill → decode KV ran over mutual TLS); a client with
//! no certificate, one from another CA, or plain text is refused at the router and at a
//! worker's gRPC and KV listeners.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tandem_common::tls::{ClientCertificates, Tls, TlsArgs};
use tandem_tests::Cluster;
use tandem_tests::pki::{Identity, TestCa};
use tandem_tests::{binary, log_dir, tandemctl_json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PROMPT: &str = "Once upon a time";

fn args(ca: &Path, identity: Option<&Identity>) -> TlsArgs {
    TlsArgs {
        tls_ca: Some(ca.to_owned()),
        tls_cert: identity.map(|i| i.cert.clone()),
        tls_key: identity.map(|i| i.key.clone()),
        tls_server_name: None,
    }
}

fn client(ca: &Path, identity: Option<&Identity>) -> Tls {
    args(ca, identity)
        .load_client()
        .expect("client tls")
        .expect("tls on")
}

/// Connects to `addr`, writes a byte and reads what comes back until the server closes:
/// Err when the connection or TLS fails.
async fn exchange(addr: &str, tls: Option<&Tls>) -> Result<Vec<u8>, String> {
    let attempt = async {
        let mut stream = tandem_common::tls::connect(addr, tls)
            .await
            .map_err(|e| e.to_string())?;
        stream.write_all(b"?").await.map_err(|e| e.to_string())?;
        let mut reply = Vec::new();
        stream
            .read_to_end(&mut reply)
            .await
            .map_err(|e| e.to_string())?;
        Ok(reply)
    };
    tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .unwrap_or_else(|_| Err("no answer in 10 s".into()))
}

/// A listener that answers `ok` to whoever gets through `tls`; returns its address.
async fn answering_listener(tls: Tls) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let mut incoming = tandem_common::tls::incoming(listener, Some(&tls));
    tokio::spawn(async move {
        while let Some(mut stream) = incoming.accept().await {
            tokio::spawn(async move {
                let mut byte = [0u8; 1];
                if stream.read_exact(&mut byte).await.is_ok() {
                    let _ = stream.write_all(b"ok").await;
                    let _ = stream.shutdown().await;
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn listeners_refuse_clients_without_a_certificate_from_the_ca() {
    let dir = log_dir("tls-listener");
    let (ca, rogue_ca) = (TestCa::new(&dir, "tandem"), TestCa::new(&dir, "rogue"));
    let (server, member, rogue) = (
        ca.issue("server"),
        ca.issue("client"),
        rogue_ca.issue("client"),
    );
    let load = |clients| {
        args(&ca.cert(), Some(&server))
            .load_component(clients)
            .expect("server tls")
            .expect("tls on")
    };
    let required = answering_listener(load(ClientCertificates::Required)).await;
    let optional = answering_listener(load(ClientCertificates::Optional)).await;

    let with_cert = client(&ca.cert(), Some(&member));
    let without_cert = client(&ca.cert(), None);
    let other_ca = client(&ca.cert(), Some(&rogue));
    let ok = Ok(b"ok".to_vec());
    assert_eq!(exchange(&required, Some(&with_cert)).await, ok);
    assert_ne!(exchange(&required, Some(&without_cert)).await, ok);
    assert_ne!(exchange(&required, Some(&other_ca)).await, ok);
    assert_ne!(exchange(&required, None).await, ok, "plain text");
    assert_eq!(exchange(&optional, Some(&with_cert)).await, ok);
    assert_eq!(exchange(&optional, Some(&without_cert)).await, ok);
    assert_ne!(exchange(&optional, Some(&other_ca)).await, ok);

    // A server whose certificate is from another CA is not trusted either.
    let impostor = args(&rogue_ca.cert(), Some(&rogue))
        .load_component(ClientCertificates::Optional)
        .expect("impostor tls")
        .expect("tls on");
    let impostor = answering_listener(impostor).await;
    let refused = exchange(&impostor, Some(&without_cert)).await;
    assert!(
        refused.as_ref().is_err_and(|e| e.contains("certificate")),
        "{refused:?}"
    );

    // A component needs all three files.
    let partial = TlsArgs {
        tls_ca: None,
        ..args(&ca.cert(), Some(&server))
    };
    let error = partial
        .load_component(ClientCertificates::Required)
        .expect_err("no ca");
    assert!(error.to_string().contains("--tls-ca"), "{error}");
}

/// `tandemctl generate --router … --output json` with `extra` flags: its JSON, or stderr.
fn remote_generate(router: &str, extra: &[&str]) -> Result<serde_json::Value, String> {
    let out = Command::new(binary("tandemctl"))
        .args(["generate", "--router", router, "--output", "json"])
        .args(["--prompt", PROMPT, "--max-tokens", "8"])
        .args(extra)
        .output()
        .expect("tandemctl runs");
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).expect("json"))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn flags(ca: &Path, identity: &Identity) -> Vec<String> {
    [
        "--tls-ca",
        &ca.to_string_lossy(),
        "--tls-cert",
        &identity.cert.to_string_lossy(),
        "--tls-key",
        &identity.key.to_string_lossy(),
    ]
    .map(str::to_owned)
    .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_under_mutual_tls_serves_members_and_refuses_everyone_else() {
    let dir = log_dir("tls-cluster-certs");
    let (ca, rogue_ca) = (TestCa::new(&dir, "tandem"), TestCa::new(&dir, "rogue"));
    let node = flags(&ca.cert(), &ca.issue("node"));
    let node: Vec<&str> = node.iter().map(String::as_str).collect();
    let member = flags(&ca.cert(), &ca.issue("client"));
    let member: Vec<&str> = member.iter().map(String::as_str).collect();
    let rogue = flags(&ca.cert(), &rogue_ca.issue("client"));
    let rogue: Vec<&str> = rogue.iter().map(String::as_str).collect();
    let ca_path = ca.cert().to_string_lossy().into_owned();

    let mut router_flags = vec!["--http-listen", "127.0.0.1:0"];
    router_flags.extend(&node);
    let cluster = Cluster::builder("tls-cluster")
        .router_args(&router_flags)
        .prefill_args(&node)
        .decode_args(&node)
        .start();
    let router = cluster.router.addr("grpc");

    let reference = tandemctl_json(&[
        "generate",
        "--output",
        "json",
        "--device",
        "cpu",
        "--prompt",
        PROMPT,
        "--max-tokens",
        "8",
    ]);
    let answered = tokio::task::block_in_place(|| remote_generate(&router, &member))
        .expect("a client with a certificate from the CA is served");
    assert_eq!(answered["token_ids"], reference["token_ids"]);
    assert_eq!(answered["text"], reference["text"]);

    for (what, extra) in [
        ("no certificate", vec!["--tls-ca", ca_path.as_str()]),
        ("another CA's certificate", rogue.clone()),
        ("plain text", vec![]),
    ] {
        let refused = tokio::task::block_in_place(|| remote_generate(&router, &extra));
        let error = refused.expect_err(what);
        assert!(error.contains("--tls-ca"), "{what}: {error}");
    }

    // OpenAI HTTP over the same TLS.
    let member_tls = client(&ca.cert(), Some(&ca.issue("http-client")));
    let http = cluster.router.addr("http");
    let request = format!("GET /v1/models HTTP/1.1\r\nhost: {http}\r\nconnection: close\r\n\r\n");
    let mut stream = tandem_common::tls::connect(&http, Some(&member_tls))
        .await
        .expect("https connects");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .expect("response");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains("\"vocab_size\""), "{response}");
    let no_cert = client(&ca.cert(), None);
    assert!(
        exchange(&http, Some(&no_cert)).await.is_err(),
        "https without a certificate"
    );

    // The workers' own listeners take no one without a certificate from the CA.
    let rogue_tls = client(&ca.cert(), Some(&rogue_ca.issue("worker-client")));
    for worker in [&cluster.prefill[0], &cluster.decode[0]] {
        for listener in ["grpc", "kv"] {
            let addr = worker.addr(listener);
            assert!(
                exchange(&addr, Some(&no_cert)).await.is_err(),
                "{listener} {addr} without a certificate"
            );
            assert!(
                exchange(&addr, Some(&rogue_tls)).await.is_err(),
                "{listener} {addr} with another CA's certificate"
            );
        }
    }
}

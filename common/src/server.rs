//! What every Tandem gRPC server shares: health and reflection services, the ready line that
//! tells a supervisor where it listens, and shutdown on Ctrl-C or SIGTERM.

use std::io::Write;
use std::net::SocketAddr;

use tonic_health::server::HealthReporter;

/// Routes holding `grpc.health.v1` (reporting nothing until the caller marks its services
/// serving through the returned reporter) and reflection over Tandem's and health's
/// descriptors; the caller adds its own services.
pub fn standard_routes()
-> Result<(tonic::service::RoutesBuilder, HealthReporter), tonic_reflection::server::Error> {
    let (reporter, health) = tonic_health::server::health_reporter();
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tandem_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let mut routes = tonic::service::Routes::builder();
    routes.add_service(health).add_service(reflection);
    Ok((routes, reporter))
}

/// Prints the line supervisors (tandemctl up, the test harness) wait for: `ready` followed
/// by `name=host:port` for each listener, on stdout.
pub fn announce_ready(listeners: &[(&str, SocketAddr)]) {
    let mut line = String::from("ready");
    for (name, addr) in listeners {
        line.push_str(&format!(" {name}={addr}"));
    }
    let mut out = std::io::stdout().lock();
    // A closed stdout must not stop a server that is otherwise fine.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// Runs `serve` until `until` resolves (Ctrl-C or SIGTERM: [`shutdown_signal`]), then lets
/// it drain for at most `grace`: `serve` must be a server started with `stop` as its shutdown
/// signal. Past the grace period the remaining connections are dropped, so a stuck client
/// cannot hold a rollout.
pub async fn serve_with_grace<E>(
    serve: impl std::future::Future<Output = Result<(), E>>,
    stop: tokio::sync::oneshot::Sender<()>,
    grace: std::time::Duration,
    until: impl std::future::Future<Output = ()>,
) -> Result<(), E> {
    tokio::pin!(serve);
    tokio::select! {
        result = &mut serve => return result,
        () = until => {}
    }
    tracing::info!(grace_seconds = grace.as_secs_f64(), "shutting down");
    let _ = stop.send(());
    match tokio::time::timeout(grace, serve).await {
        Ok(result) => result,
        Err(_) => {
            tracing::warn!("grace period over; dropping the remaining connections");
            Ok(())
        }
    }
}

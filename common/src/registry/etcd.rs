//! The fleet registry: records under `/tandem/<cluster>/workers/<id>` in etcd, each on a lease
//! kept alive at TTL/3. An unreachable etcd is not a lost lease (the worker keeps serving and
//! keeps trying); a lease etcd reports expired is.

use std::collections::BTreeMap;
use std::time::Duration;

use tandem_proto::etcd::kv_client::KvClient;
use tandem_proto::etcd::lease_client::LeaseClient;
use tandem_proto::etcd::watch_client::WatchClient;
use tandem_proto::etcd::{
    LeaseGrantRequest, LeaseKeepAliveRequest, LeaseRevokeRequest, PutRequest, RangeRequest,
    WatchCreateRequest, WatchRequest, event, watch_request,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use serde::de::DeserializeOwned;

use super::{
    DesiredState, DesiredStates, Publication, RETRY, Registration, Registry, RegistryError,
    WorkerRecord,
};

/// A registry in etcd for one cluster.
#[derive(Debug, Clone)]
pub struct EtcdRegistry {
    channel: Channel,
    cluster: String,
    ttl: Duration,
}

/// Republishes a record on its lease; stops the keep-alive and revokes the lease when its
/// registration drops.
struct Withdraw {
    keep_alive: tokio::task::JoinHandle<()>,
    channel: Channel,
    lease: i64,
    workers_prefix: Vec<u8>,
}

#[tonic::async_trait]
impl Publication for Withdraw {
    async fn republish(&self, record: &WorkerRecord) -> Result<(), RegistryError> {
        put_record(&self.channel, &self.workers_prefix, record, self.lease).await
    }
}

/// Writes `record` under `workers_prefix`, on `lease`.
async fn put_record(
    channel: &Channel,
    workers_prefix: &[u8],
    record: &WorkerRecord,
    lease: i64,
) -> Result<(), RegistryError> {
    let mut key = workers_prefix.to_vec();
    key.extend_from_slice(record.id.as_bytes());
    KvClient::new(channel.clone())
        .put(PutRequest {
            key,
            value: serde_json::to_vec(record)?,
            lease,
        })
        .await
        .map_err(|status| RegistryError::Etcd { op: "put", status })?;
    Ok(())
}

impl Drop for Withdraw {
    fn drop(&mut self) {
        self.keep_alive.abort();
        let mut lease = LeaseClient::new(self.channel.clone());
        let id = self.lease;
        // Best effort: an unrevoked lease expires after its TTL anyway.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = lease.lease_revoke(LeaseRevokeRequest { id }).await;
            });
        }
    }
}

impl EtcdRegistry {
    /// A registry at `endpoint` (`host:port` or `http://host:port`); connects on first use.
    /// Records live `ttl` after their worker stops renewing them.
    pub fn new(endpoint: &str, cluster: &str, ttl: Duration) -> Result<Self, RegistryError> {
        let url = if endpoint.contains("://") {
            endpoint.to_owned()
        } else {
            format!("http://{endpoint}")
        };
        let channel = Endpoint::from_shared(url)
            .map_err(|e| RegistryError::Endpoint {
                endpoint: endpoint.to_owned(),
                reason: e.to_string(),
            })?
            .connect_timeout(RETRY * 4)
            .connect_lazy();
        Ok(Self {
            channel,
            cluster: cluster.to_owned(),
            ttl,
        })
    }

    fn workers_prefix(&self) -> Vec<u8> {
        format!("/tandem/{}/workers/", self.cluster).into_bytes()
    }

    fn desired_prefix(&self) -> Vec<u8> {
        format!("/tandem/{}/desired/", self.cluster).into_bytes()
    }
}

/// The first key after every key starting with `prefix` (etcd's range end for a prefix).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[tonic::async_trait]
impl Registry for EtcdRegistry {
    async fn register(&self, record: WorkerRecord) -> Result<Registration, RegistryError> {
        let ttl = self.ttl.as_secs().max(1) as i64;
        let granted = LeaseClient::new(self.channel.clone())
            .lease_grant(LeaseGrantRequest { ttl, id: 0 })
            .await
            .map_err(|status| RegistryError::Etcd {
                op: "lease grant",
                status,
            })?
            .into_inner();
        if !granted.error.is_empty() || granted.id == 0 {
            return Err(RegistryError::Lease(granted.error));
        }
        let workers_prefix = self.workers_prefix();
        put_record(&self.channel, &workers_prefix, &record, granted.id).await?;
        let (lost_tx, lost) = watch::channel(false);
        let keep_alive = tokio::spawn(keep_alive(
            self.channel.clone(),
            granted.id,
            self.ttl / 3,
            lost_tx,
        ));
        let withdraw = Withdraw {
            keep_alive,
            channel: self.channel.clone(),
            lease: granted.id,
            workers_prefix,
        };
        Ok(Registration::new(lost, Box::new(withdraw)))
    }

    async fn watch_workers(&self) -> Result<watch::Receiver<Vec<WorkerRecord>>, RegistryError> {
        let (tx, rx) = watch::channel(Vec::new());
        let (by_id, mut by_id_rx) = watch::channel(BTreeMap::new());
        tokio::spawn(watch_loop(
            self.channel.clone(),
            self.workers_prefix(),
            by_id,
        ));
        tokio::spawn(async move {
            while by_id_rx.changed().await.is_ok() {
                let records: BTreeMap<String, WorkerRecord> = by_id_rx.borrow_and_update().clone();
                if tx.send(records.into_values().collect()).is_err() {
                    return;
                }
            }
        });
        Ok(rx)
    }

    async fn set_desired(&self, id: &str, desired: DesiredState) -> Result<(), RegistryError> {
        let mut key = self.desired_prefix();
        key.extend_from_slice(id.as_bytes());
        KvClient::new(self.channel.clone())
            .put(PutRequest {
                key,
                value: serde_json::to_vec(&desired)?,
                lease: 0,
            })
            .await
            .map_err(|status| RegistryError::Etcd { op: "put", status })?;
        Ok(())
    }

    async fn watch_desired(&self) -> Result<watch::Receiver<DesiredStates>, RegistryError> {
        let (tx, rx) = watch::channel(DesiredStates::new());
        tokio::spawn(watch_loop(self.channel.clone(), self.desired_prefix(), tx));
        Ok(rx)
    }
}

/// Logs an outage once when it starts (warn) and once when it ends (info), not every retry.
#[derive(Debug, Default)]
struct Outage {
    down: bool,
}

impl Outage {
    fn failed(&mut self, what: &'static str, error: &dyn std::fmt::Display) {
        if !self.down {
            tracing::warn!(%error, "{what} interrupted; retrying until etcd answers");
        } else {
            tracing::debug!(%error, "{what} still interrupted");
        }
        self.down = true;
    }

    fn recovered(&mut self, what: &'static str) {
        if self.down {
            tracing::info!("{what} restored");
        }
        self.down = false;
    }
}

/// Renews `lease` every `period` until etcd reports it expired (then `lost` turns true).
/// Connection errors only mean retrying: etcd restores leases when it comes back.
async fn keep_alive(channel: Channel, lease: i64, period: Duration, lost: watch::Sender<bool>) {
    let mut outage = Outage::default();
    loop {
        let (requests, stream) = mpsc::channel(1);
        // Queued before the call: etcd answers the call's headers only with its first
        // renewal, so awaiting the call before sending would wait forever.
        let _ = requests.send(LeaseKeepAliveRequest { id: lease }).await;
        let responses = tokio::time::timeout(
            period.max(RETRY),
            LeaseClient::new(channel.clone()).lease_keep_alive(ReceiverStream::new(stream)),
        )
        .await;
        if let Ok(Ok(responses)) = responses {
            let mut responses = responses.into_inner();
            loop {
                match tokio::time::timeout(period.max(RETRY), responses.message()).await {
                    Ok(Ok(Some(renewed))) if renewed.ttl > 0 => outage.recovered("etcd keep-alive"),
                    Ok(Ok(Some(_))) => {
                        tracing::error!(lease, "etcd reports the lease expired");
                        lost.send_replace(true);
                        return;
                    }
                    _ => break,
                }
                tokio::time::sleep(period).await;
                if requests
                    .send(LeaseKeepAliveRequest { id: lease })
                    .await
                    .is_err()
                {
                    break;
                }
            }
        }
        outage.failed("etcd keep-alive", &format!("lease {lease}"));
        tokio::time::sleep(RETRY).await;
    }
}

/// Values under `prefix` by the rest of their key (the worker id).
type ById<T> = BTreeMap<String, T>;

/// Lists the prefix, then follows its changes; after any interruption, lists again.
async fn watch_loop<T: DeserializeOwned + Clone + Send + Sync + 'static>(
    channel: Channel,
    prefix: Vec<u8>,
    out: watch::Sender<ById<T>>,
) {
    let end = prefix_end(&prefix);
    let mut outage = Outage::default();
    while !out.is_closed() {
        if let Err(error) = follow(&channel, &prefix, &end, &out, &mut outage).await {
            outage.failed("etcd watch", &error);
        }
        tokio::time::sleep(RETRY).await;
    }
}

async fn follow<T: DeserializeOwned + Clone>(
    channel: &Channel,
    prefix: &[u8],
    end: &[u8],
    out: &watch::Sender<ById<T>>,
    outage: &mut Outage,
) -> Result<(), RegistryError> {
    let listed = KvClient::new(channel.clone())
        .range(RangeRequest {
            key: prefix.to_vec(),
            range_end: end.to_vec(),
            ..RangeRequest::default()
        })
        .await
        .map_err(|status| RegistryError::Etcd {
            op: "range",
            status,
        })?
        .into_inner();
    outage.recovered("etcd watch");
    let id = |key: &[u8]| String::from_utf8_lossy(&key[prefix.len().min(key.len())..]).into_owned();
    let mut records: ById<T> = BTreeMap::new();
    for kv in listed.kvs {
        if let Some(record) = parse(&kv.value) {
            records.insert(id(&kv.key), record);
        }
    }
    out.send_replace(records.clone());
    let revision = listed.header.map(|h| h.revision).unwrap_or_default();
    let (requests, stream) = mpsc::channel(1);
    let create = WatchRequest {
        request_union: Some(watch_request::RequestUnion::CreateRequest(
            WatchCreateRequest {
                key: prefix.to_vec(),
                range_end: end.to_vec(),
                start_revision: revision + 1,
                progress_notify: false,
            },
        )),
    };
    let _ = requests.send(create).await;
    let mut events = WatchClient::new(channel.clone())
        .watch(ReceiverStream::new(stream))
        .await
        .map_err(|status| RegistryError::Etcd {
            op: "watch",
            status,
        })?
        .into_inner();
    // `requests` stays open for as long as the watch runs.
    while let Some(response) = events
        .message()
        .await
        .map_err(|status| RegistryError::Etcd {
            op: "watch",
            status,
        })?
    {
        if response.canceled {
            return Ok(());
        }
        for e in &response.events {
            let Some(kv) = &e.kv else { continue };
            if e.r#type == event::EventType::Delete as i32 {
                records.remove(&id(&kv.key));
            } else if let Some(record) = parse(&kv.value) {
                records.insert(id(&kv.key), record);
            }
        }
        if !response.events.is_empty() {
            out.send_replace(records.clone());
        }
        if out.is_closed() {
            return Ok(());
        }
    }
    drop(requests);
    Ok(())
}

fn parse<T: DeserializeOwned>(value: &[u8]) -> Option<T> {
    match serde_json::from_slice(value) {
        Ok(record) => Some(record),
        Err(error) => {
            tracing::warn!(%error, "skipping a registry value that does not parse");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_is_the_next_key_after_the_prefix() {
        assert_eq!(prefix_end(b"/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end(&[1, 255]), vec![2]);
        assert_eq!(prefix_end(&[255]), vec![0]);
    }
}

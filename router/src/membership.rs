//! Which workers the router uses. Workers live in a registry: etcd (they register themselves)
//! or the embedded one, seeded from `--decode-worker`/`--prefill-worker` (each joining the pool
//! of the role it serves now, which differs from its flag once it was moved). The router follows
//! the registry's snapshots, and learns the model card from the first decode worker.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tandem_common::registry::{
    DesiredState, DesiredStates, EmbeddedRegistry, EtcdRegistry, Registration, Registry,
    RegistryError, WorkerRecord, WorkerRole,
};
use tandem_common::tls::Tls;
use tandem_proto::internal::v1::worker_client::WorkerClient;
use tandem_proto::internal::v1::{DescribeRequest, Role, WorkerDescription};
use tokio::sync::watch;

use crate::StartError;
use crate::chat::ChatTemplate;
use crate::config::Config;
use crate::orchestrate::{Cluster, DecodeClient, PrefillClient};
use crate::pool::AdminState;
use crate::prefix_index::PrefixIndex;
use crate::validation::ModelCard;

/// Wait between attempts to reach a worker that is still starting.
const STARTUP_RETRY: Duration = Duration::from_millis(200);

/// The registry the router follows, and the records it published itself.
pub(crate) struct Membership {
    snapshots: watch::Receiver<Vec<WorkerRecord>>,
    desired: watch::Receiver<DesiredStates>,
    local: Arc<LocalRecords>,
    registry: Arc<dyn Registry>,
    tls: Option<Tls>,
}

/// Records this router publishes for its workers (the embedded registry's, seeded from the
/// flags), by worker id. Workers registered in etcd publish their own.
#[derive(Default)]
pub(crate) struct LocalRecords(tokio::sync::Mutex<BTreeMap<String, (WorkerRecord, Registration)>>);

impl LocalRecords {
    /// Records a moved worker's new role, if this router publishes its record.
    pub(crate) async fn set_role(&self, id: &str, role: WorkerRole) -> Result<(), RegistryError> {
        let mut records = self.0.lock().await;
        if let Some((record, registration)) = records.get_mut(id) {
            record.role = role;
            registration.update(record).await?;
        }
        Ok(())
    }
}

impl Membership {
    /// Connects to the registry (seeding the embedded one from the flags) and waits for a
    /// decode worker to learn the model from.
    pub(crate) async fn start(
        config: &Config,
        tls: Option<Tls>,
    ) -> Result<(Self, ModelCard), StartError> {
        let startup = Duration::from_secs_f64(config.worker_startup_timeout_seconds);
        let local = Arc::new(LocalRecords::default());
        let registry: Arc<dyn Registry> = match &config.etcd {
            Some(endpoint) => Arc::new(
                EtcdRegistry::new(endpoint, &config.cluster, Duration::from_secs(10))
                    .map_err(StartError::Registry)?,
            ),
            None => {
                let registry = EmbeddedRegistry::default();
                let flagged = config
                    .decode_workers
                    .iter()
                    .map(|a| (a, WorkerRole::Decode))
                    .chain(
                        config
                            .prefill_workers
                            .iter()
                            .map(|a| (a, WorkerRole::Prefill)),
                    );
                let mut seeded = local.0.lock().await;
                for (addr, flagged_role) in flagged {
                    let d = describe(addr, startup, tls.as_ref()).await?;
                    if seeded.contains_key(&d.worker_id) {
                        return Err(StartError::DuplicateWorkerId { id: d.worker_id });
                    }
                    let role = match Role::try_from(d.role) {
                        Ok(Role::Prefill) => WorkerRole::Prefill,
                        Ok(Role::Decode) => WorkerRole::Decode,
                        _ => flagged_role,
                    };
                    if role != flagged_role {
                        tracing::info!(id = %d.worker_id, ?role, ?flagged_role, "worker was moved; it joins the pool of the role it serves");
                    }
                    let record = WorkerRecord::from_description(d, role, addr.clone());
                    let registration = registry
                        .register(record.clone())
                        .await
                        .map_err(StartError::Registry)?;
                    seeded.insert(record.id.clone(), (record, registration));
                }
                drop(seeded);
                Arc::new(registry)
            }
        };
        let mut snapshots = registry
            .watch_workers()
            .await
            .map_err(StartError::Registry)?;
        let first = {
            let waited = tokio::time::timeout(
                startup,
                snapshots.wait_for(|records| records.iter().any(|r| r.role == WorkerRole::Decode)),
            )
            .await;
            match waited {
                Ok(Ok(records)) => records
                    .iter()
                    .find(|r| r.role == WorkerRole::Decode)
                    .cloned(),
                _ => None,
            }
        }
        .ok_or(StartError::NoDecodeWorker {
            seconds: startup.as_secs_f64(),
        })?;
        let description = describe(&first.grpc, startup, tls.as_ref()).await?;
        let tokenizer =
            tokenizers::Tokenizer::from_bytes(&description.tokenizer_json).map_err(|e| {
                StartError::Tokenizer {
                    addr: first.grpc.clone(),
                    reason: e.to_string(),
                }
            })?;
        let chat_template = if description.tokenizer_config_json.is_empty() {
            None
        } else {
            ChatTemplate::from_tokenizer_config(&description.tokenizer_config_json).map_err(
                |reason| StartError::Tokenizer {
                    addr: first.grpc.clone(),
                    reason,
                },
            )?
        };
        let card = ModelCard {
            name: description.model,
            vocab_size: description.vocab_size,
            max_position_embeddings: description.max_position_embeddings,
            eos_token_ids: description.eos_token_ids,
            tokenizer,
            chat_template,
        };
        let mut desired = registry
            .watch_desired()
            .await
            .map_err(StartError::Registry)?;
        if config.etcd.is_some() {
            // Serve only once the recorded cordons are known, so none is briefly ignored.
            let _ = tokio::time::timeout(startup, desired.changed()).await;
        }
        let membership = Self {
            snapshots,
            desired,
            local,
            registry,
            tls,
        };
        Ok((membership, card))
    }

    pub(crate) fn registry(&self) -> Arc<dyn Registry> {
        Arc::clone(&self.registry)
    }

    pub(crate) fn local_records(&self) -> Arc<LocalRecords> {
        Arc::clone(&self.local)
    }

    /// Applies the current workers and desired states to `cluster`, then every later change,
    /// for as long as the router runs.
    pub(crate) fn follow(mut self, cluster: Arc<Cluster>, model: String, max_message: usize) {
        self.apply(&cluster, &model, max_message);
        tokio::spawn(async move {
            let mut membership = self;
            loop {
                tokio::select! {
                    changed = membership.snapshots.changed() => if changed.is_err() { return },
                    changed = membership.desired.changed() => if changed.is_err() { return },
                }
                membership.apply(&cluster, &model, max_message);
            }
        });
    }

    fn apply(&mut self, cluster: &Arc<Cluster>, model: &str, max_message: usize) {
        let records = self.snapshots.borrow_and_update().clone();
        apply(cluster, &records, model, max_message, self.tls.as_ref());
        let desired = self.desired.borrow_and_update().clone();
        for w in cluster.decode.workers() {
            w.set_state(admin_state(desired.get(&w.id)));
        }
        for w in cluster.prefill.workers() {
            w.set_state(admin_state(desired.get(&w.id)));
        }
    }
}

/// The router's reading of what an SRE asked.
pub(crate) fn admin_state(desired: Option<&DesiredState>) -> AdminState {
    match desired {
        Some(d) if d.draining => AdminState::Draining,
        Some(d) if d.cordoned => AdminState::Cordoned,
        _ => AdminState::Ready,
    }
}

/// Makes the pools hold the snapshot's workers of the served model.
fn apply(
    cluster: &Arc<Cluster>,
    records: &[WorkerRecord],
    model: &str,
    max_message: usize,
    tls: Option<&Tls>,
) {
    let serving = |role| -> Vec<&WorkerRecord> {
        records
            .iter()
            .filter(|r| r.role == role)
            .filter(|r| {
                let same = r.model == model;
                if !same {
                    tracing::warn!(id = %r.id, model = %r.model, serving = %model, "ignoring a worker of another model");
                }
                same
            })
            .collect()
    };
    let (added, removed) = cluster.decode.sync(&serving(WorkerRole::Decode), tls, |c| {
        DecodeClient::new(c)
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message)
    });
    log_changes("decode", &added, &removed);
    let (added, removed) = cluster
        .prefill
        .sync(&serving(WorkerRole::Prefill), tls, |c| {
            PrefillClient::new(c)
                .max_decoding_message_size(max_message)
                .max_encoding_message_size(max_message)
        });
    log_changes("prefill", &added, &removed);
    // Every prefill worker's prefix cache is followed while it is in the pool.
    for worker in cluster.prefill.workers() {
        PrefixIndex::watch(cluster, &worker.id);
    }
}

fn log_changes(pool: &str, added: &[String], removed: &[String]) {
    for id in added {
        tracing::info!(pool, id = %id, "worker joined");
    }
    for id in removed {
        tracing::info!(pool, id = %id, "worker left");
    }
}

/// The worker's model description, retrying while it starts.
async fn describe(
    addr: &str,
    within: Duration,
    tls: Option<&Tls>,
) -> Result<WorkerDescription, StartError> {
    let channel =
        tandem_common::tls::grpc_channel(addr, tls).map_err(|e| StartError::BadWorkerAddress {
            addr: addr.to_owned(),
            reason: e.to_string(),
        })?;
    let deadline = tokio::time::Instant::now() + within;
    let mut client = WorkerClient::new(channel).max_decoding_message_size(usize::MAX);
    loop {
        match client.describe(DescribeRequest {}).await {
            Ok(response) => return Ok(response.into_inner()),
            Err(status) if tokio::time::Instant::now() + STARTUP_RETRY >= deadline => {
                return Err(StartError::WorkerUnreachable {
                    addr: addr.to_owned(),
                    seconds: within.as_secs_f64(),
                    last_error: status.message().to_owned(),
                });
            }
            Err(_) => tokio::time::sleep(STARTUP_RETRY).await,
        }
    }
}

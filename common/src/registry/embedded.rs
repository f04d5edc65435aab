//! The one-machine registry: records live in this process (the router's, in local mode).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use super::{
    DesiredState, DesiredStates, Publication, Registration, Registry, RegistryError, WorkerRecord,
};

/// Records in memory, shared by every clone.
#[derive(Clone)]
pub struct EmbeddedRegistry {
    records: Arc<Mutex<BTreeMap<String, WorkerRecord>>>,
    snapshots: watch::Sender<Vec<WorkerRecord>>,
    desired: watch::Sender<DesiredStates>,
}

/// Withdraws a record when its registration drops.
struct Withdraw {
    registry: EmbeddedRegistry,
    id: String,
}

impl Default for EmbeddedRegistry {
    fn default() -> Self {
        Self {
            records: Arc::default(),
            snapshots: watch::Sender::new(Vec::new()),
            desired: watch::Sender::new(DesiredStates::new()),
        }
    }
}

impl EmbeddedRegistry {
    fn insert(&self, record: WorkerRecord) {
        self.records
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(record.id.clone(), record);
        self.publish();
    }

    fn publish(&self) {
        let records = self
            .records
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.snapshots
            .send_replace(records.values().cloned().collect());
    }
}

#[tonic::async_trait]
impl Publication for Withdraw {
    async fn republish(&self, record: &WorkerRecord) -> Result<(), RegistryError> {
        self.registry.insert(record.clone());
        Ok(())
    }
}

impl Drop for Withdraw {
    fn drop(&mut self) {
        self.registry
            .records
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.id);
        self.registry.publish();
    }
}

#[tonic::async_trait]
impl Registry for EmbeddedRegistry {
    async fn register(&self, record: WorkerRecord) -> Result<Registration, RegistryError> {
        let id = record.id.clone();
        self.insert(record);
        // In-process records are never dropped behind the owner's back.
        let (_, lost) = watch::channel(false);
        let withdraw = Withdraw {
            registry: self.clone(),
            id,
        };
        Ok(Registration::new(lost, Box::new(withdraw)))
    }

    async fn watch_workers(&self) -> Result<watch::Receiver<Vec<WorkerRecord>>, RegistryError> {
        Ok(self.snapshots.subscribe())
    }

    async fn set_desired(&self, id: &str, desired: DesiredState) -> Result<(), RegistryError> {
        self.desired.send_modify(|states| {
            states.insert(id.to_owned(), desired);
        });
        Ok(())
    }

    async fn watch_desired(&self) -> Result<watch::Receiver<DesiredStates>, RegistryError> {
        Ok(self.desired.subscribe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::WorkerRole;

    fn record(id: &str) -> WorkerRecord {
        WorkerRecord {
            id: id.into(),
            role: WorkerRole::Decode,
            grpc: "127.0.0.1:1".into(),
            model: "m".into(),
            device: "cpu".into(),
            ranks: 1,
        }
    }

    #[tokio::test]
    async fn records_appear_in_snapshots_and_go_when_the_registration_drops() {
        let registry = EmbeddedRegistry::default();
        let mut watch = registry.watch_workers().await.expect("watch");
        let a = registry.register(record("a")).await.expect("a");
        let _b = registry.register(record("b")).await.expect("b");
        watch.changed().await.expect("changed");
        let ids: Vec<String> = watch
            .borrow_and_update()
            .iter()
            .map(|r| r.id.clone())
            .collect();
        assert_eq!(ids, ["a", "b"]);
        drop(a);
        let ids: Vec<String> = watch
            .borrow_and_update()
            .iter()
            .map(|r| r.id.clone())
            .collect();
        assert_eq!(ids, ["b"]);
    }
}

//! The op profile the bench prints: each operation timed between two stream
//! synchronizations while profiling is on.

use std::collections::BTreeMap;
use std::sync::PoisonError;
use std::time::Instant;

use super::CudaBackend;

/// Times one operation for the profile when dropped.
pub(super) struct OpTimer<'a> {
    backend: &'a CudaBackend,
    op: &'static str,
    started: Instant,
}

impl Drop for OpTimer<'_> {
    fn drop(&mut self) {
        let _ = self.backend.stream.synchronize();
        let mut profile = self
            .backend
            .profile
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(profile) = profile.as_mut() {
            let entry = profile.entry(self.op).or_default();
            entry.0 += 1;
            entry.1 += self.started.elapsed().as_secs_f64();
        }
    }
}

impl CudaBackend {
    pub(super) fn timed(&self, op: &'static str) -> Option<OpTimer<'_>> {
        self.profile
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()?;
        let _ = self.stream.synchronize();
        Some(OpTimer {
            backend: self,
            op,
            started: Instant::now(),
        })
    }

    /// Starts timing every operation (synchronizing around each) until [`Self::take_profile`].
    pub fn start_profile(&self) {
        *self.profile.lock().unwrap_or_else(PoisonError::into_inner) = Some(BTreeMap::new());
    }

    /// Stops profiling; one line per operation since [`Self::start_profile`], most time first.
    pub fn take_profile(&self) -> String {
        let profile = self
            .profile
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .unwrap_or_default();
        let mut ops: Vec<_> = profile.into_iter().collect();
        ops.sort_by(|a, b| b.1.1.total_cmp(&a.1.1));
        ops.iter()
            .map(|(op, (calls, seconds))| {
                format!("{op:>12}: {calls:>7} calls {:>9.2} ms", seconds * 1e3)
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

//! Sharding one model over several ranks: the collective-communication trait the model calls,
//! and which part of the weights each rank owns.
//!
//! Prefill workers split attention heads and MLP widths over ranks (tensor parallelism, an
//! all-reduce after the attention output and the MLP). Decode workers replicate attention,
//! each rank serving its own requests, and split the experts (expert parallelism, an
//! all-to-all dispatch and combine around every MoE block).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::backend::Backend;
use crate::checkpoint::LoadProgress;
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::model::Model;

pub(crate) mod expert;
pub(crate) mod host;
pub(crate) mod tensor;

/// Collective operations among the ranks of one group. Every rank calls the same operations
/// in the same order; each call returns once this rank's part is done.
pub trait Collective<B: Backend>: Send + Sync {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// Sums `x` over every rank, in rank order, so all ranks end with identical values.
    fn all_reduce_sum(&self, backend: &B, x: &mut B::Tensor) -> Result<()>;
    /// Every rank's `x` stacked by rows in rank order.
    fn all_gather(&self, backend: &B, x: &B::Tensor) -> Result<B::Tensor>;
    /// Sends rows `[offset_r, offset_r + send_rows[r])` of `x` to rank r; returns what every
    /// rank sent here, stacked in rank order, and how many rows came from each.
    fn all_to_all_v(
        &self,
        backend: &B,
        x: &B::Tensor,
        send_rows: &[usize],
    ) -> Result<(B::Tensor, Vec<usize>)>;
    fn send(&self, backend: &B, x: &B::Tensor, to: usize) -> Result<()>;
    /// Receives a `[rows, cols]` tensor that rank `from` sent here.
    fn recv(&self, backend: &B, from: usize, rows: usize, cols: usize) -> Result<B::Tensor>;
    fn barrier(&self) -> Result<()>;
    /// [`Collective::all_to_all_v`] for small host values (routing metadata).
    fn all_to_all_host(&self, backend: &B, send: Vec<Vec<f32>>) -> Result<Vec<Vec<f32>>>;
    /// Every rank's `x`, in rank order.
    fn all_gather_host(&self, backend: &B, x: &[f32]) -> Result<Vec<Vec<f32>>>;
}

/// How a rank's share of the model is chosen.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Parallelism {
    /// The whole model on one rank.
    #[default]
    Single,
    /// Rank `rank` of `size` holds 1/size of every layer's attention heads and MLP width.
    Tensor { rank: usize, size: usize },
    /// Rank `rank` holds the experts `placement` gives it; everything else is replicated.
    Expert {
        rank: usize,
        placement: ExpertPlacement,
    },
}

impl Parallelism {
    pub fn rank(&self) -> usize {
        match self {
            Self::Single => 0,
            Self::Tensor { rank, .. } | Self::Expert { rank, .. } => *rank,
        }
    }

    pub fn size(&self) -> usize {
        match self {
            Self::Single => 1,
            Self::Tensor { size, .. } => *size,
            Self::Expert { placement, .. } => placement.ranks,
        }
    }

    /// Tensor-parallel `(rank, size)`; `(0, 1)` for the other kinds.
    pub(crate) fn tensor_shard(&self) -> (usize, usize) {
        match self {
            Self::Tensor { rank, size } => (*rank, *size),
            _ => (0, 1),
        }
    }

    /// Whether this rank loads and runs `expert`.
    pub(crate) fn owns_expert(&self, expert: usize) -> bool {
        match self {
            Self::Expert { rank, placement } => placement.owner[expert] == *rank,
            _ => true,
        }
    }
}

/// Which rank runs each expert. Groundwork for load balancing: a file can place hot experts
/// deliberately instead of round-robin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpertPlacement {
    pub ranks: usize,
    /// `owner[e]` is the rank that runs expert e.
    pub owner: Vec<usize>,
}

/// The placement file: `{"owner": [rank of expert 0, rank of expert 1, …]}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PlacementFile {
    owner: Vec<usize>,
}

impl ExpertPlacement {
    /// Expert e on rank e mod `ranks`.
    pub fn round_robin(num_experts: usize, ranks: usize) -> Self {
        Self {
            ranks,
            owner: (0..num_experts).map(|e| e % ranks.max(1)).collect(),
        }
    }

    /// Reads a placement file and checks it against the model and the group.
    pub fn from_file(path: &Path, num_experts: usize, ranks: usize) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| EngineError::io(path, e))?;
        let file: PlacementFile =
            serde_json::from_str(&text).map_err(|source| EngineError::Json {
                path: path.to_owned(),
                source,
            })?;
        let placement = Self {
            ranks,
            owner: file.owner,
        };
        placement.validate(num_experts).map_err(|reason| {
            EngineError::Config(format!("expert placement {}: {reason}", path.display()))
        })?;
        Ok(placement)
    }

    /// Checks the placement covers `num_experts` experts with ranks below `ranks`.
    pub(crate) fn validate(&self, num_experts: usize) -> std::result::Result<(), String> {
        if self.ranks == 0 {
            return Err("an expert-parallel group needs at least one rank".into());
        }
        if self.owner.len() != num_experts {
            return Err(format!(
                "places {} experts, the model has {num_experts}",
                self.owner.len()
            ));
        }
        if let Some((expert, rank)) = self
            .owner
            .iter()
            .enumerate()
            .find(|(_, r)| **r >= self.ranks)
        {
            return Err(format!(
                "puts expert {expert} on rank {rank}, the group has {} ranks",
                self.ranks
            ));
        }
        Ok(())
    }

    /// The experts `rank` runs, in id order.
    pub fn experts_of(&self, rank: usize) -> Vec<usize> {
        (0..self.owner.len())
            .filter(|&e| self.owner[e] == rank)
            .collect()
    }
}

/// How one worker spreads the model over ranks (`--tp`, `--ep`, `--expert-placement`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sharding {
    /// Ranks splitting each layer's heads and MLP width (prefill).
    pub tensor_parallel: usize,
    /// Ranks splitting the experts, each serving its own requests (decode).
    pub expert_parallel: usize,
    /// Which rank holds each expert; round-robin when None.
    pub expert_placement: Option<PathBuf>,
    /// How long a rank waits for a peer's part of a host collective before failing it.
    pub collective_timeout: std::time::Duration,
}

impl Default for Sharding {
    fn default() -> Self {
        Self {
            tensor_parallel: 1,
            expert_parallel: 1,
            expert_placement: None,
            collective_timeout: host::DEFAULT_COLLECTIVE_TIMEOUT,
        }
    }
}

impl Sharding {
    /// Ranks (devices) the worker needs.
    pub fn ranks(&self) -> usize {
        self.tensor_parallel.max(1) * self.expert_parallel.max(1)
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.tensor_parallel == 0 || self.expert_parallel == 0 {
            return Err(format!(
                "--tp and --ep must be >= 1, got --tp {} --ep {}",
                self.tensor_parallel, self.expert_parallel
            ));
        }
        if self.tensor_parallel > 1 && self.expert_parallel > 1 {
            return Err(format!(
                "--tp {} with --ep {}: a worker splits either heads (prefill) or experts (decode), not both",
                self.tensor_parallel, self.expert_parallel
            ));
        }
        if self.expert_placement.is_some() && self.expert_parallel == 1 {
            return Err("--expert-placement needs --ep above 1".into());
        }
        Ok(())
    }
}

/// Loads the model in `dir` over `backends` as `sharding` says: one model per data-parallel
/// rank (a tensor-parallel group is one model driving the others).
pub fn load_ranks<B: Backend>(
    dir: &Path,
    backends: Vec<B>,
    sharding: &Sharding,
    progress: &mut dyn FnMut(LoadProgress),
) -> Result<Vec<Model<B>>> {
    sharding.validate().map_err(EngineError::Config)?;
    if backends.len() != sharding.ranks() {
        return Err(EngineError::Config(format!(
            "{} ranks need {} devices, got {}",
            sharding.ranks(),
            sharding.ranks(),
            backends.len()
        )));
    }
    if sharding.ranks() == 1 {
        let backend = backends
            .into_iter()
            .next()
            .ok_or_else(|| EngineError::Config("no device to load the model on".into()))?;
        return Ok(vec![Model::load(dir, backend, progress)?]);
    }
    let comms = B::group_collectives(&backends, sharding.collective_timeout)?;
    if sharding.tensor_parallel > 1 {
        return Ok(vec![tensor::load_tensor_parallel(
            dir, backends, comms, progress,
        )?]);
    }
    let num_experts = ModelConfig::from_dir(dir)?.moe.num_experts;
    let ranks = sharding.expert_parallel;
    let placement = match &sharding.expert_placement {
        Some(path) => ExpertPlacement::from_file(path, num_experts, ranks)?,
        None => ExpertPlacement::round_robin(num_experts, ranks),
    };
    let mut progress = Some(progress);
    backends
        .into_iter()
        .zip(comms)
        .enumerate()
        .map(|(rank, (backend, comm))| {
            let parallel = Parallelism::Expert {
                rank,
                placement: placement.clone(),
            };
            match progress.take() {
                Some(report) => Model::load_rank(dir, backend, parallel, Some(comm), report),
                None => Model::load_rank(dir, backend, parallel, Some(comm), &mut |_| {}),
            }
        })
        .collect()
}

/// A collective that failed: a peer gone or silent past the timeout.
pub(crate) fn collective_error(message: String) -> EngineError {
    EngineError::Collective(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_spreads_experts_evenly() {
        let p = ExpertPlacement::round_robin(8, 3);
        assert_eq!(p.owner, vec![0, 1, 2, 0, 1, 2, 0, 1]);
        assert_eq!(p.experts_of(2), vec![2, 5]);
        assert!(p.validate(8).is_ok());
    }

    #[test]
    fn placement_file_is_checked_against_model_and_group() {
        let dir = std::env::temp_dir().join(format!("tandem-placement-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("placement.json");
        std::fs::write(&path, r#"{"owner": [1, 1, 0, 0]}"#).unwrap();
        let p = ExpertPlacement::from_file(&path, 4, 2).unwrap();
        assert_eq!(p.experts_of(1), vec![0, 1]);
        let err = ExpertPlacement::from_file(&path, 8, 2)
            .unwrap_err()
            .to_string();
        assert!(err.contains("places 4 experts, the model has 8"), "{err}");
        std::fs::write(&path, r#"{"owner": [0, 2, 0, 0]}"#).unwrap();
        let err = ExpertPlacement::from_file(&path, 4, 2)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("expert 1 on rank 2, the group has 2 ranks"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

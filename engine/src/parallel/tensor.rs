//! Tensor parallelism inside one process: the rank that drives the engine (rank 0) hands
//! every forward pass to the other ranks, each running it on its own shard, KV cache and
//! thread; the all-reduces inside the pass keep them in step.

use std::ops::Range;
use std::path::Path;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex, PoisonError};

use crate::backend::{AttentionSeq, Backend, KvSpec};
use crate::block_pool::BlockId;
use crate::checkpoint::LoadProgress;
use crate::error::{EngineError, Result};
use crate::kv_cache::KvCache;
use crate::model::{ForwardBatch, Model};
use crate::parallel::{Collective, Parallelism, collective_error};

/// Commands queued per follower: one pass ahead is enough, the all-reduces keep ranks close.
const FOLLOWER_QUEUE: usize = 2;

/// The other ranks of a tensor-parallel group, as seen by rank 0.
pub(crate) struct Followers {
    commands: Vec<SyncSender<Command>>,
    /// The first error a follower hit (it then leaves the group).
    failure: Arc<Mutex<Option<String>>>,
}

#[derive(Clone)]
enum Command {
    Allocate { num_layers: usize, spec: KvSpec },
    Forward(OwnedBatch),
}

/// A [`ForwardBatch`] that owns its block tables, to send to another thread. Tensor-parallel
/// ranks never write into a peer's cache (the engine refuses it), so no peer export travels.
#[derive(Clone)]
struct OwnedBatch {
    tokens: Vec<u32>,
    positions: Vec<u32>,
    seqs: Vec<(Range<usize>, usize, Vec<BlockId>)>,
    logit_rows: Vec<usize>,
    exports: Vec<Vec<usize>>,
}

impl OwnedBatch {
    fn new<B: Backend>(batch: &ForwardBatch<'_, B>) -> Self {
        Self {
            tokens: batch.tokens.clone(),
            positions: batch.positions.clone(),
            seqs: batch
                .seqs
                .iter()
                .map(|s| (s.rows.clone(), s.first_position, s.block_table.to_vec()))
                .collect(),
            logit_rows: batch.logit_rows.clone(),
            exports: batch.exports.clone(),
        }
    }

    fn borrow<B: Backend>(&self) -> ForwardBatch<'_, B> {
        ForwardBatch {
            tokens: self.tokens.clone(),
            positions: self.positions.clone(),
            seqs: self
                .seqs
                .iter()
                .map(|(rows, first_position, table)| AttentionSeq {
                    rows: rows.clone(),
                    first_position: *first_position,
                    block_table: table,
                })
                .collect(),
            logit_rows: self.logit_rows.clone(),
            exports: self.exports.clone(),
            peer_exports: Vec::new(),
        }
    }
}

impl Followers {
    pub(crate) fn allocate(&self, num_layers: usize, spec: KvSpec) -> Result<()> {
        self.send(Command::Allocate { num_layers, spec })
    }

    pub(crate) fn forward<B: Backend>(&self, batch: &ForwardBatch<'_, B>) -> Result<()> {
        self.send(Command::Forward(OwnedBatch::new(batch)))
    }

    fn send(&self, command: Command) -> Result<()> {
        for (i, follower) in self.commands.iter().enumerate() {
            if follower.send(command.clone()).is_err() {
                return Err(self.explain(collective_error(format!(
                    "tensor-parallel rank {} stopped",
                    i + 1
                ))));
            }
        }
        Ok(())
    }

    /// `error`, with the follower failure that probably caused it.
    pub(crate) fn explain(&self, error: EngineError) -> EngineError {
        let failure = self
            .failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        match failure {
            Some(cause) => collective_error(format!("{error} (after {cause})")),
            None => error,
        }
    }
}

/// A follower's loop: run every pass rank 0 sends until it goes away or a pass fails.
fn follow<B: Backend>(
    model: Model<B>,
    commands: Receiver<Command>,
    failure: Arc<Mutex<Option<String>>>,
) {
    let mut kv: Option<KvCache<B>> = None;
    for command in commands {
        let result = match command {
            Command::Allocate { num_layers, spec } => {
                KvCache::new(&model.backend, num_layers, spec, false).map(|cache| kv = Some(cache))
            }
            Command::Forward(batch) => match kv.as_mut() {
                Some(kv) => model
                    .forward_logits(&batch.borrow(), kv, &mut |_, _, _| Ok(()))
                    .map(drop),
                None => Err(collective_error(
                    "a forward pass before the kv cache".into(),
                )),
            },
        };
        if let Err(e) = result {
            let rank = model.parallel.rank();
            *failure.lock().unwrap_or_else(PoisonError::into_inner) =
                Some(format!("tensor-parallel rank {rank} failed: {e}"));
            // Dropping the model leaves the group, so rank 0 fails instead of waiting.
            return;
        }
    }
}

/// Loads a tensor-parallel group of `backends.len()` ranks, one shard each (rank r reads
/// only its slices), and returns rank 0, which drives the others: they run on their own
/// threads, following each forward pass. `comms[r]` connects rank r to the group.
pub fn load_tensor_parallel<B: Backend>(
    dir: &Path,
    backends: Vec<B>,
    comms: Vec<Box<dyn Collective<B>>>,
    progress: &mut dyn FnMut(LoadProgress),
) -> Result<Model<B>> {
    let size = backends.len();
    if size == 0 || comms.len() != size {
        return Err(EngineError::Config(format!(
            "a tensor-parallel group needs one collective per backend, got {} and {size}",
            comms.len()
        )));
    }
    let mut ranks: Vec<_> = backends.into_iter().zip(comms).enumerate().collect();
    let (_, (leader_backend, leader_comm)) = ranks.remove(0);
    let (leader, followers) = std::thread::scope(|s| {
        let loading: Vec<_> = ranks
            .into_iter()
            .map(|(rank, (backend, comm))| {
                s.spawn(move || {
                    let parallel = Parallelism::Tensor { rank, size };
                    Model::load_rank(dir, backend, parallel, Some(comm), &mut |_| {})
                })
            })
            .collect();
        let parallel = Parallelism::Tensor { rank: 0, size };
        let leader = Model::load_rank(dir, leader_backend, parallel, Some(leader_comm), progress);
        let followers: Vec<Result<Model<B>>> = loading
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(collective_error("loading a rank panicked".into())))
            })
            .collect();
        (leader, followers)
    });
    let mut leader = leader?;
    let failure = Arc::new(Mutex::new(None));
    let mut commands = Vec::with_capacity(size - 1);
    for (i, follower) in followers.into_iter().enumerate() {
        let follower = follower?;
        let (tx, rx) = sync_channel(FOLLOWER_QUEUE);
        let failure = failure.clone();
        std::thread::Builder::new()
            .name(format!("tp-rank-{}", i + 1))
            .spawn(move || follow(follower, rx, failure))
            .map_err(|e| collective_error(format!("starting rank {}: {e}", i + 1)))?;
        commands.push(tx);
    }
    leader.followers = Some(Followers { commands, failure });
    Ok(leader)
}

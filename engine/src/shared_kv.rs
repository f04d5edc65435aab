//! A KV cache shared with other processes on the same device: a decode engine describes its
//! cache once ([`SharedKv`], carried in transfer tickets), and a prefill engine on that device
//! opens it ([`PeerCache`]) and writes each prompt's K and V straight into the reserved
//! blocks, so nothing goes through the host.

use std::sync::Arc;

use crate::backend::Backend;
use crate::error::{EngineError, Result};

const MAGIC: u32 = 0x564B_5354; // "TSKV"
/// magic | device [16] | block_size u32 | layers u32.
const HEADER_BYTES: usize = 4 + 16 + 4 + 4;
/// Peers a prefill engine keeps open: enough for every decode worker on one GPU.
const OPEN_PEERS: usize = 8;

/// Where a KV cache lives and one backend handle per layer's store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SharedKv {
    pub(crate) device: [u8; 16],
    pub(crate) block_size: usize,
    pub(crate) layers: Vec<Vec<u8>>,
}

impl SharedKv {
    /// `magic | device | block_size u32 | n u32 | (len u32 | handle) × n`, little endian.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            HEADER_BYTES + self.layers.iter().map(|l| 4 + l.len()).sum::<usize>(),
        );
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&self.device);
        out.extend_from_slice(&(self.block_size as u32).to_le_bytes());
        out.extend_from_slice(&(self.layers.len() as u32).to_le_bytes());
        for layer in &self.layers {
            out.extend_from_slice(&(layer.len() as u32).to_le_bytes());
            out.extend_from_slice(layer);
        }
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Self> {
        let invalid = |why: String| EngineError::InvalidRequest(format!("shared kv cache: {why}"));
        let mut rest = bytes;
        let mut take = |n: usize| -> Result<&[u8]> {
            if rest.len() < n {
                return Err(invalid(format!(
                    "{} bytes end before the {n} expected next",
                    rest.len()
                )));
            }
            let (head, tail) = rest.split_at(n);
            rest = tail;
            Ok(head)
        };
        let u32_at = |b: &[u8]| u32::from_le_bytes(b.try_into().expect("4 bytes"));
        if u32_at(take(4)?) != MAGIC {
            return Err(invalid("not a shared kv cache description".into()));
        }
        let device: [u8; 16] = take(16)?.try_into().expect("16 bytes");
        let block_size = u32_at(take(4)?) as usize;
        if block_size == 0 {
            return Err(invalid("block size 0".into()));
        }
        let count = u32_at(take(4)?) as usize;
        let mut layers = Vec::new();
        for _ in 0..count {
            let len = u32_at(take(4)?) as usize;
            layers.push(take(len)?.to_vec());
        }
        if !rest.is_empty() {
            return Err(invalid(format!(
                "{} bytes follow the last layer",
                rest.len()
            )));
        }
        Ok(Self {
            device,
            block_size,
            layers,
        })
    }
}

/// Another process's cache, every layer opened.
pub(crate) struct OpenedPeer<B: Backend> {
    pub(crate) block_size: usize,
    pub(crate) layers: Vec<B::PeerKv>,
}

/// Where one prompt's KV goes: the opened cache and the slot there of every prompt position.
pub(crate) struct PeerTarget<B: Backend> {
    pub(crate) peer: Arc<OpenedPeer<B>>,
    pub(crate) slots: Vec<usize>,
}

/// Caches a prefill engine has opened, the most recently used last. Opening maps memory, so
/// each description is opened once and the least recently used closes past `OPEN_PEERS`
/// (a decode worker that restarted shares new handles). A description that cannot be opened
/// here (another device, or another container without a shared IPC namespace) is not decoded
/// or tried again: every request to that decode worker carries it.
pub(crate) struct PeerCache<B: Backend> {
    open: Vec<(Vec<u8>, Arc<OpenedPeer<B>>)>,
    /// Descriptions that cannot be opened here, and why.
    refused: Vec<(Vec<u8>, String)>,
}

impl<B: Backend> Default for PeerCache<B> {
    fn default() -> Self {
        Self {
            open: Vec::new(),
            refused: Vec::new(),
        }
    }
}

impl<B: Backend> PeerCache<B> {
    /// The target for a prompt of `tokens` positions in `blocks` of the cache `shared`
    /// describes. `Unsupported` when that cache is not on this backend's device or cannot be
    /// opened from this process.
    pub(crate) fn target(
        &mut self,
        backend: &B,
        shared: &[u8],
        blocks: &[u32],
        tokens: usize,
        num_layers: usize,
    ) -> Result<PeerTarget<B>> {
        let peer = self.open(backend, shared, num_layers)?;
        let bs = peer.block_size;
        if blocks.len() * bs < tokens {
            return Err(EngineError::InvalidRequest(format!(
                "{} blocks of {bs} slots cannot hold a prompt of {tokens} tokens",
                blocks.len()
            )));
        }
        let slots = (0..tokens)
            .map(|p| blocks[p / bs] as usize * bs + p % bs)
            .collect();
        Ok(PeerTarget { peer, slots })
    }

    fn open(
        &mut self,
        backend: &B,
        shared: &[u8],
        num_layers: usize,
    ) -> Result<Arc<OpenedPeer<B>>> {
        if let Some(i) = self.open.iter().position(|(key, _)| key == shared) {
            let entry = self.open.remove(i);
            let peer = Arc::clone(&entry.1);
            self.open.push(entry);
            return Ok(peer);
        }
        if let Some((_, why)) = self.refused.iter().find(|(key, _)| key == shared) {
            return Err(EngineError::Unsupported(why.clone()));
        }
        let description = SharedKv::decode(shared)?;
        let opened = if backend.shareable_device() != Some(description.device) {
            Err(format!(
                "the kv cache is on another device than this {} backend's",
                backend.name()
            ))
        } else if description.layers.len() != num_layers {
            return Err(EngineError::InvalidRequest(format!(
                "shared kv cache has {} layers, the model {num_layers}",
                description.layers.len()
            )));
        } else {
            // On this device but not reachable from this process: the host path still works.
            description
                .layers
                .iter()
                .map(|handle| backend.open_peer_kv(handle))
                .collect::<Result<Vec<_>>>()
                .map_err(|e| format!("opening the kv cache shared on this device: {e}"))
        };
        let layers = match opened {
            Ok(layers) => layers,
            Err(why) => {
                if self.refused.len() >= OPEN_PEERS {
                    self.refused.remove(0);
                }
                self.refused.push((shared.to_vec(), why.clone()));
                return Err(EngineError::Unsupported(why));
            }
        };
        let peer = Arc::new(OpenedPeer {
            block_size: description.block_size,
            layers,
        });
        if self.open.len() >= OPEN_PEERS {
            self.open.remove(0);
        }
        self.open.push((shared.to_vec(), Arc::clone(&peer)));
        Ok(peer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CpuBackend;

    fn sample() -> SharedKv {
        SharedKv {
            device: [7; 16],
            block_size: 64,
            layers: vec![vec![1, 2, 3], Vec::new(), vec![9; 144]],
        }
    }

    #[test]
    fn description_round_trips() {
        assert_eq!(SharedKv::decode(&sample().encode()).unwrap(), sample());
    }

    #[test]
    fn truncated_or_padded_descriptions_are_refused() {
        let bytes = sample().encode();
        for cut in [0, 3, HEADER_BYTES - 1, HEADER_BYTES + 2, bytes.len() - 1] {
            let err = SharedKv::decode(&bytes[..cut]).unwrap_err().to_string();
            assert!(err.contains("shared kv cache"), "{cut}: {err}");
        }
        let mut padded = bytes.clone();
        padded.push(0);
        let err = SharedKv::decode(&padded).unwrap_err().to_string();
        assert!(err.contains("1 bytes follow"), "{err}");
        let mut wrong_magic = bytes;
        wrong_magic[0] ^= 1;
        assert!(SharedKv::decode(&wrong_magic).is_err());
    }

    #[test]
    fn a_backend_without_shared_memory_refuses_to_open_a_peer() {
        let mut peers = PeerCache::<CpuBackend>::default();
        for attempt in 0..2 {
            let err = peers
                .target(&CpuBackend, &sample().encode(), &[0], 1, 3)
                .err()
                .expect("the cpu backend opens nothing");
            assert!(
                matches!(err, EngineError::Unsupported(ref m) if m.contains("another device")),
                "attempt {attempt}: {err}"
            );
        }
        assert_eq!(peers.refused.len(), 1, "remembered once");
    }
}

//! Memory-mapped safetensors checkpoints, single file or sharded through
//! `model.safetensors.index.json`.

use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use rayon::prelude::*;
use safetensors::tensor::{Dtype, Metadata, SafeTensors};
use serde::Deserialize;

use crate::error::{EngineError, Result};

const SINGLE_FILE: &str = "model.safetensors";
const INDEX_FILE: &str = "model.safetensors.index.json";
/// Bytes of the little-endian header length that starts every safetensors file.
const HEADER_LEN_BYTES: usize = 8;

/// Progress of weight loading, reported once per tensor.
#[derive(Debug, Clone, Copy)]
pub struct LoadProgress {
    pub tensors_loaded: usize,
    pub tensors_total: usize,
}

/// A tensor read from the checkpoint and widened to f32, row-major.
#[derive(Debug, Clone)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// An opened checkpoint: every shard mapped, every header parsed once.
pub(crate) struct Checkpoint {
    dir: PathBuf,
    shards: Vec<Shard>,
    /// Tensor name → index into `shards`.
    locations: HashMap<String, usize>,
}

struct Shard {
    path: PathBuf,
    map: Mmap,
    data_start: usize,
    metadata: Metadata,
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: HashMap<String, String>,
}

impl Checkpoint {
    /// Maps the checkpoint in `dir`, preferring the sharded index when both exist.
    pub(crate) fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join(INDEX_FILE);
        let files: Vec<String> = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path)
                .map_err(|e| EngineError::io(&index_path, e))?;
            let index: ShardIndex =
                serde_json::from_str(&text).map_err(|source| EngineError::Json {
                    path: index_path.clone(),
                    source,
                })?;
            let mut files: Vec<String> = index.weight_map.into_values().collect();
            files.sort();
            files.dedup();
            files
        } else if dir.join(SINGLE_FILE).exists() {
            vec![SINGLE_FILE.to_owned()]
        } else {
            return Err(EngineError::Checkpoint {
                path: dir.to_owned(),
                message: format!("neither {SINGLE_FILE} nor {INDEX_FILE} is present"),
            });
        };
        let mut shards = Vec::with_capacity(files.len());
        let mut locations = HashMap::new();
        for file in files {
            let shard = Shard::open(&dir.join(file))?;
            for name in shard.metadata.tensors().into_keys() {
                locations.insert(name, shards.len());
            }
            shards.push(shard);
        }
        Ok(Self {
            dir: dir.to_owned(),
            shards,
            locations,
        })
    }

    /// Number of tensors in the checkpoint.
    pub(crate) fn len(&self) -> usize {
        self.locations.len()
    }

    pub(crate) fn names(&self) -> impl Iterator<Item = &str> {
        self.locations.keys().map(String::as_str)
    }

    pub(crate) fn contains(&self, name: &str) -> bool {
        self.locations.contains_key(name)
    }

    /// Reads the box `ranges` (one range per axis) of tensor `name`, after checking its
    /// shape, and widens it to f32. Only the bytes inside the box are touched, so a rank that
    /// holds a slice of a tensor reads only that slice from disk.
    pub(crate) fn tensor_part(
        &self,
        name: &str,
        expected_shape: &[usize],
        ranges: &[Range<usize>],
    ) -> Result<HostTensor> {
        let missing = || EngineError::MissingTensor {
            name: name.to_owned(),
            dir: self.dir.clone(),
        };
        let shard = self
            .locations
            .get(name)
            .map(|&i| &self.shards[i])
            .ok_or_else(missing)?;
        let info = shard.metadata.info(name).ok_or_else(missing)?;
        if info.shape != expected_shape {
            return Err(EngineError::ShapeMismatch {
                name: name.to_owned(),
                expected: expected_shape.to_vec(),
                actual: info.shape.clone(),
            });
        }
        let fits = ranges.len() == info.shape.len()
            && ranges
                .iter()
                .zip(&info.shape)
                .all(|(r, &d)| r.start <= r.end && r.end <= d);
        if !fits {
            return Err(EngineError::Checkpoint {
                path: shard.path.clone(),
                message: format!(
                    "slice {ranges:?} of tensor `{name}` lies outside its shape {:?}",
                    info.shape
                ),
            });
        }
        let (start, end) = info.data_offsets;
        let bytes = shard
            .map
            .get(shard.data_start + start..shard.data_start + end)
            .ok_or_else(|| EngineError::Checkpoint {
                path: shard.path.clone(),
                message: format!("tensor `{name}` lies outside the file"),
            })?;
        let count: usize = info.shape.iter().product();
        let elem = match info.dtype {
            Dtype::F32 => 4,
            Dtype::BF16 | Dtype::F16 => 2,
            other => {
                return Err(EngineError::UnsupportedDtype {
                    name: name.to_owned(),
                    dtype: format!("{other:?}"),
                });
            }
        };
        if bytes.len() != count * elem {
            return Err(EngineError::Checkpoint {
                path: shard.path.clone(),
                message: format!(
                    "tensor `{name}` holds {} bytes, its shape {:?} needs {}",
                    bytes.len(),
                    info.shape,
                    count * elem
                ),
            });
        }
        let data = match contiguous_run(&info.shape, ranges) {
            // A whole tensor or a run of its rows: widened where the file maps it.
            Some(run) => widen(name, info.dtype, &bytes[run.start * elem..run.end * elem])?,
            None => {
                let mut selected = Vec::new();
                copy_box(bytes, elem, &info.shape, ranges, 0, 0, &mut selected);
                widen(name, info.dtype, &selected)?
            }
        };
        Ok(HostTensor {
            shape: ranges.iter().map(|r| r.len()).collect(),
            data,
        })
    }
}

/// The box `ranges` of a row-major tensor of `shape` as one run of flat indices, where it is
/// one: single indices on the leading axes, any range on the next, whole axes after it.
fn contiguous_run(shape: &[usize], ranges: &[Range<usize>]) -> Option<Range<usize>> {
    if shape.is_empty() {
        // A 0-d tensor: one value.
        return Some(0..1);
    }
    let whole_tail = shape
        .iter()
        .zip(ranges)
        .rev()
        .take_while(|(d, r)| r.start == 0 && r.end == **d)
        .count();
    // The axis that may take any range; those before it must take one index each.
    let axis = (shape.len() - 1).saturating_sub(whole_tail);
    if ranges[..axis].iter().any(|r| r.len() != 1) {
        return None;
    }
    let stride = |i: usize| -> usize { shape[i + 1..].iter().product() };
    let start: usize = (0..=axis).map(|i| ranges[i].start * stride(i)).sum();
    Some(start..start + ranges[axis].len() * stride(axis))
}

/// Appends the bytes of the box `ranges` of a row-major tensor to `out`, axis by axis;
/// `prefix` is the flat index of the leading axes chosen so far.
fn copy_box(
    bytes: &[u8],
    elem: usize,
    shape: &[usize],
    ranges: &[Range<usize>],
    axis: usize,
    prefix: usize,
    out: &mut Vec<u8>,
) {
    let Some(range) = ranges.get(axis) else {
        // A 0-d tensor: one value.
        out.extend_from_slice(&bytes[..elem.min(bytes.len())]);
        return;
    };
    if axis + 1 == shape.len() {
        let start = (prefix * shape[axis] + range.start) * elem;
        out.extend_from_slice(&bytes[start..start + range.len() * elem]);
        return;
    }
    for i in range.clone() {
        copy_box(
            bytes,
            elem,
            shape,
            ranges,
            axis + 1,
            prefix * shape[axis] + i,
            out,
        );
    }
}

impl Shard {
    fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| EngineError::io(path, e))?;
        let map = map_read_only(&file).map_err(|e| EngineError::io(path, e))?;
        let (header_len, metadata) =
            SafeTensors::read_metadata(&map).map_err(|e| EngineError::Checkpoint {
                path: path.to_owned(),
                message: e.to_string(),
            })?;
        Ok(Self {
            path: path.to_owned(),
            map,
            data_start: HEADER_LEN_BYTES + header_len,
            metadata,
        })
    }
}

#[allow(unsafe_code)]
fn map_read_only(file: &File) -> std::io::Result<Mmap> {
    // SAFETY: the mapping is read-only and checkpoints are not modified while a worker runs;
    // a concurrent truncation would be an operator error that the kernel reports as SIGBUS.
    unsafe { Mmap::map(file) }
}

/// Values a thread converts at least where a tensor's are converted on every core (widened
/// here, narrowed to bf16 by the CUDA backend): a model's weights take every core, a norm's
/// vector one.
pub(crate) const PARALLEL_MIN_VALUES: usize = 1 << 16;

/// Little-endian values as f32, on every core for large tensors (a checkpoint's load was
/// mostly this loop, one value at a time).
fn widen(name: &str, dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>> {
    let values = match dtype {
        Dtype::F32 => bytes
            .par_chunks_exact(4)
            .with_min_len(PARALLEL_MIN_VALUES)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::BF16 => bytes
            .par_chunks_exact(2)
            .with_min_len(PARALLEL_MIN_VALUES)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F16 => bytes
            .par_chunks_exact(2)
            .with_min_len(PARALLEL_MIN_VALUES)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => {
            return Err(EngineError::UnsupportedDtype {
                name: name.to_owned(),
                dtype: format!("{other:?}"),
            });
        }
    };
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boxes_of_whole_trailing_axes_are_one_run() {
        let shape = [4, 6, 8];
        // The whole tensor, rows of its first axis, a part of one expert's rows.
        assert_eq!(contiguous_run(&shape, &[0..4, 0..6, 0..8]), Some(0..192));
        assert_eq!(contiguous_run(&shape, &[1..3, 0..6, 0..8]), Some(48..144));
        assert_eq!(contiguous_run(&shape, &[2..3, 1..4, 0..8]), Some(104..128));
        assert_eq!(contiguous_run(&shape, &[2..3, 5..6, 3..7]), Some(139..143));
        // Columns of several rows, or several experts' parts, are not.
        assert_eq!(contiguous_run(&shape, &[0..4, 0..6, 0..4]), None);
        assert_eq!(contiguous_run(&shape, &[0..2, 1..4, 0..8]), None);
        assert_eq!(contiguous_run(&[], &[]), Some(0..1));
        let empty = 2..2;
        assert_eq!(
            contiguous_run(&[5], std::slice::from_ref(&empty)),
            Some(2..2)
        );
    }
}

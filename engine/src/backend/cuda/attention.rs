//! Attention over the paged KV cache: decode rows split over the context (flash-decoding, on
//! the tensor cores for grouped-query heads), prefill runs in query tiles (tensor cores, or
//! warpgroup instructions on Hopper), and a layer's attention inputs in one kernel.

use cudarc::driver::LaunchConfig;

use super::projection::projections_read_bf16;
use super::{
    CudaBackend, CudaKvStore, CudaTensor, CudaVector, Kernel, MAX_HEAD_DIM, ROW_THREADS, WARP,
    per_row, shape_error,
};
use crate::backend::{AttentionBatch, HeadTransforms, attention_inputs_stepwise};
use crate::error::{EngineError, Result};

/// Keys per split of `attention_split` (`SPLIT_KEYS` in kernels/attention.cu).
const SPLIT_KEYS: usize = 256;
/// `attention_prefill`'s limits: `PREFILL_MAX_HEAD_DIM`, `Q_TILE` rows a block, 4 warps.
const PREFILL_MAX_HEAD_DIM: usize = 128;
const PREFILL_Q_TILE: usize = 16;
const PREFILL_THREADS: u32 = 128;

/// `attention_prefill_mma`'s limits: head_dim a multiple of 16 up to `FLASH_MAX_HEAD_DIM`,
/// `FLASH_Q_TILE` rows a block, 4 warps.
const FLASH_MAX_HEAD_DIM: usize = 128;
const FLASH_Q_TILE: usize = 64;
const FLASH_THREADS: u32 = 128;
/// Its two stages of keys and values (`FLASH_SHARED_BYTES`): more than a block gets without
/// opting in.
pub(super) const FLASH_SHARED_BYTES: usize = 2 * 2 * DECODE_KEYS * (FLASH_MAX_HEAD_DIM + 8) * 2;
/// `attention_prefill_wgmma_hd128` (sm_90a): `FLASH_WGMMA_Q_TILE` rows a block, 8 warps; 1 KB
/// of alignment, the swizzled query tile, then two stages of swizzled keys and values.
const FLASH_WGMMA_Q_TILE: usize = 128;
const FLASH_WGMMA_THREADS: u32 = 256;
pub(super) const FLASH_WGMMA_SHARED_BYTES: usize =
    1024 + FLASH_WGMMA_Q_TILE * FIXED_HEAD_DIM * 2 + 2 * 2 * DECODE_KEYS * FIXED_HEAD_DIM * 2;
/// `attention_decode_mma`: keys a warp takes (`FLASH_K_TILE`), and the most query heads a KV
/// head may serve (the 16 rows of one mma tile).
const DECODE_KEYS: usize = 64;
const DECODE_MAX_GROUP: usize = 16;
/// The head_dim the tensor-core attention kernels also come built for (`_hd128`): their
/// loops then unroll without a test per step.
const FIXED_HEAD_DIM: usize = 128;

/// A tiled prefill attention kernel and its launch shape.
struct PrefillKernel {
    kernel: Kernel,
    /// Query rows a block takes.
    q_tile: usize,
    threads: u32,
    shared_bytes: usize,
    /// Queries arrive scaled by log2(e) too (the kernel takes exp2).
    log2_scaled: bool,
}

/// The prefill attention kernel for `head_dim`: on the tensor cores for multiples of 16 up
/// to 128 (built for 128 itself, and on Hopper, `hopper`, with warpgroup-instruction scores
/// over 128-row tiles), else the CUDA-core one.
fn prefill_kernel(head_dim: usize, hopper: bool) -> PrefillKernel {
    let mma = |kernel| PrefillKernel {
        kernel,
        q_tile: FLASH_Q_TILE,
        threads: FLASH_THREADS,
        shared_bytes: FLASH_SHARED_BYTES,
        log2_scaled: true,
    };
    match head_dim {
        FIXED_HEAD_DIM if hopper => PrefillKernel {
            kernel: Kernel::AttentionPrefillWgmmaHd128,
            q_tile: FLASH_WGMMA_Q_TILE,
            threads: FLASH_WGMMA_THREADS,
            shared_bytes: FLASH_WGMMA_SHARED_BYTES,
            log2_scaled: true,
        },
        FIXED_HEAD_DIM => mma(Kernel::AttentionPrefillMmaHd128),
        d if d.is_multiple_of(16) && d <= FLASH_MAX_HEAD_DIM => mma(Kernel::AttentionPrefillMma),
        _ => PrefillKernel {
            kernel: Kernel::AttentionPrefill,
            q_tile: PREFILL_Q_TILE,
            threads: PREFILL_THREADS,
            shared_bytes: 0,
            log2_scaled: false,
        },
    }
}

/// The grouped-query decode kernel for `head_dim`.
fn decode_kernel(head_dim: usize) -> Kernel {
    if head_dim == FIXED_HEAD_DIM {
        Kernel::AttentionDecodeMmaHd128
    } else {
        Kernel::AttentionDecodeMma
    }
}

/// Query tiles of a prefill attention kernel: each up to `size` consecutive rows of one
/// sequence.
struct PrefillTiles {
    size: usize,
    rows: Vec<i32>,
    counts: Vec<i32>,
    positions: Vec<i32>,
    table_offsets: Vec<i32>,
}

impl PrefillTiles {
    fn new(size: usize) -> Self {
        Self {
            size,
            rows: Vec::new(),
            counts: Vec::new(),
            positions: Vec::new(),
            table_offsets: Vec::new(),
        }
    }

    fn add(&mut self, rows: std::ops::Range<usize>, first_position: usize, table_offset: i32) {
        for start in rows.clone().step_by(self.size) {
            self.rows.push(start as i32);
            self.counts.push((rows.end - start).min(self.size) as i32);
            self.positions
                .push((first_position + start - rows.start) as i32);
            self.table_offsets.push(table_offset);
        }
    }

    /// Orders the tiles by how many keys they read, most first: a tile's work grows with its
    /// last position, and the longest ones should not start in the last wave.
    fn longest_first(&mut self) {
        let mut order: Vec<usize> = (0..self.rows.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(self.positions[i] + self.counts[i]));
        for column in [
            &mut self.rows,
            &mut self.counts,
            &mut self.positions,
            &mut self.table_offsets,
        ] {
            *column = order.iter().map(|&i| column[i]).collect();
        }
    }
}

impl CudaBackend {
    /// The trait's `attention_inputs`: q/k norms, RoPE and the KV writes in one kernel where
    /// the shapes allow, else the separate calls.
    pub(super) fn attention_inputs_fused(
        &self,
        qkv: [CudaTensor; 3],
        heads: &HeadTransforms<'_, CudaVector>,
        store: &mut CudaKvStore,
        slots: &[usize],
    ) -> Result<CudaTensor> {
        let [mut q, k, v] = qkv;
        let head_dim = heads.rope.head_dim;
        let width = store.width();
        let fused = head_dim > 0
            && head_dim.is_multiple_of(64)
            && head_dim <= MAX_HEAD_DIM
            && q.cols.is_multiple_of(head_dim)
            && (k.cols, v.cols) == (width, width)
            && width.is_multiple_of(head_dim)
            && [k.rows, v.rows, slots.len(), heads.rope.rows()] == [q.rows; 4]
            && heads
                .norms
                .is_none_or(|(qn, kn)| qn.len == head_dim && kn.len == head_dim);
        if !fused || q.rows == 0 {
            // Other shapes take the separate calls, whose errors name what is wrong.
            return attention_inputs_stepwise(self, [q, k, v], heads, store, slots);
        }
        let _timer = self.timed("attention_inputs");
        let slots_dev = self.checked_slots(store, slots, "write_kv")?;
        let rope = self.rope_inputs(heads.rope)?;
        let (q_heads, kv_heads) = (q.cols / head_dim, width / head_dim);
        let (q_heads_i, kv_heads_i, head_dim_i) =
            (q_heads as i32, kv_heads as i32, head_dim as i32);
        let mut launch = self.launch(Kernel::AttentionInputs);
        launch
            .arg(q.values_mut())
            .arg(&k.data)
            .arg(&v.data)
            .arg(heads.norms.map(|(q_norm, _)| &q_norm.data))
            .arg(heads.norms.map(|(_, k_norm)| &k_norm.data))
            .arg(&mut store.k)
            .arg(&mut store.v)
            .arg(slots_dev.as_ref())
            .arg(rope.positions.as_ref())
            .arg(rope.inv_freq.as_ref())
            .arg(&q_heads_i)
            .arg(&kv_heads_i)
            .arg(&head_dim_i)
            .arg(&heads.eps);
        let warps = ROW_THREADS / WARP;
        let config = LaunchConfig {
            grid_dim: (
                q.rows as u32,
                ((q_heads + 2 * kv_heads) as u32).div_ceil(warps),
                1,
            ),
            ..per_row(q.rows)
        };
        // SAFETY: a warp per (row, head) of q (rows · q_heads heads of head_dim, a multiple
        // of 64 up to 256), k and v (rows · kv_heads each); the norms hold head_dim values,
        // the rope tables a position a row and head_dim / 2 frequencies; slots (one a row)
        // were checked inside the caches, whose rows hold kv_heads · head_dim values.
        unsafe { launch.launch(config) }?;
        Ok(q)
    }

    /// The trait's `attention` over the paged cache: decode rows split over the context,
    /// prefill runs in query tiles.
    pub(super) fn paged_attention(
        &self,
        q: &CudaTensor,
        store: &CudaKvStore,
        batch: &AttentionBatch<'_>,
    ) -> Result<CudaTensor> {
        let _timer = self.timed("attention");
        if batch.head_dim > MAX_HEAD_DIM || batch.num_kv_heads == 0 {
            return Err(EngineError::Unsupported(format!(
                "cuda attention takes head_dim <= {MAX_HEAD_DIM} and >= 1 kv head, got {} and {}",
                batch.head_dim, batch.num_kv_heads
            )));
        }
        // Rows decoding one token go to the split kernel; longer runs of a sequence's rows
        // (prefill) go in tiles to a prefill kernel: on the tensor cores for head_dim a
        // multiple of 16 up to 128, else the CUDA-core one up to 128.
        let tensor_cores =
            batch.head_dim.is_multiple_of(16) && batch.head_dim <= FLASH_MAX_HEAD_DIM;
        let tiled = batch.head_dim <= PREFILL_MAX_HEAD_DIM;
        let mut positions = vec![-1i32; q.rows];
        let mut offsets = vec![0i32; q.rows];
        let prefill = prefill_kernel(batch.head_dim, self.hopper);
        let mut tiles = PrefillTiles::new(prefill.q_tile);
        let mut tables: Vec<i32> = Vec::new();
        let mut covered = vec![false; q.rows];
        for seq in batch.seqs {
            let offset = tables.len() as i32;
            tables.extend(seq.block_table.iter().map(|b| b.0 as i32));
            let last = seq.first_position + seq.rows.len().saturating_sub(1);
            if seq.rows.end > q.rows
                || (!seq.rows.is_empty() && last / batch.block_size >= seq.block_table.len())
            {
                return Err(shape_error(
                    "attention",
                    format!(
                        "rows {:?} up to position {last} are past the sequence's {} blocks or the {} query rows",
                        seq.rows,
                        seq.block_table.len(),
                        q.rows
                    ),
                ));
            }
            seq.rows.clone().for_each(|row| covered[row] = true);
            if tiled && seq.rows.len() > 1 {
                tiles.add(seq.rows.clone(), seq.first_position, offset);
                continue;
            }
            for (i, row) in seq.rows.clone().enumerate() {
                positions[row] = (seq.first_position + i) as i32;
                offsets[row] = offset;
            }
        }
        // Rows of no sequence stay zero; otherwise the kernels write every value (and no
        // memset stands between the kernels before and after, which would stop them
        // overlapping).
        let mut out = match covered.iter().all(|&row| row) {
            true => self.output(q.rows, q.cols)?,
            false => self.tensor(q.rows, q.cols)?,
        };
        if q.rows == 0 {
            return Ok(out);
        }
        // A prefill's output in bf16 too, for the o projection's GEMM, where its kernels
        // write every row.
        let decoding = positions.iter().any(|&p| p >= 0);
        let mut out16 = match !decoding && projections_read_bf16(q.rows) {
            true => Some(self.uninit::<u16>(q.rows * q.cols)?),
            false => None,
        };
        let reused = |name, host: &[i32]| self.upload_reused(&self.reused_i32, (name, 0), host);
        let tables = reused("attention.tables", &tables)?;
        let (heads, kv_heads, head_dim, block_size) = (
            batch.num_heads as i32,
            batch.num_kv_heads as i32,
            batch.head_dim as i32,
            batch.block_size as i32,
        );
        let scale = 1.0 / (batch.head_dim as f32).sqrt();
        // Decode rows of grouped heads on the tensor cores: a KV head's keys are read once for
        // all the query heads sharing it.
        let group = batch.num_heads / batch.num_kv_heads;
        let grouped = tensor_cores
            && batch.num_heads.is_multiple_of(batch.num_kv_heads)
            && group <= DECODE_MAX_GROUP;
        if let Some(&last) = positions.iter().max().filter(|&&p| p >= 0) {
            let (kernel, split_keys, grid_heads, split_scale) = if grouped {
                let log2_e = std::f32::consts::LOG2_E;
                let kv = batch.num_kv_heads as u32;
                let kernel = decode_kernel(batch.head_dim);
                (kernel, DECODE_KEYS, kv, scale * log2_e)
            } else {
                let h = batch.num_heads as u32;
                (Kernel::AttentionSplit, SPLIT_KEYS, h, scale)
            };
            let splits = (last as usize + 1).div_ceil(split_keys);
            let parts = q.rows * batch.num_heads * splits;
            let mut partial_out = self.uninit::<f32>(parts * batch.head_dim)?;
            let mut partial_max = self.uninit::<f32>(parts)?;
            let mut partial_sum = self.uninit::<f32>(parts)?;
            let positions = reused("attention.positions", &positions)?;
            let offsets = reused("attention.offsets", &offsets)?;
            let mut launch = self.launch(kernel);
            launch
                .arg(&q.data)
                .arg(&store.k)
                .arg(&store.v)
                .arg(&mut partial_out)
                .arg(&mut partial_max)
                .arg(&mut partial_sum)
                .arg(positions.as_ref())
                .arg(offsets.as_ref())
                .arg(tables.as_ref())
                .arg(&heads)
                .arg(&kv_heads)
                .arg(&head_dim)
                .arg(&block_size)
                .arg(&split_scale);
            let config = LaunchConfig {
                grid_dim: (q.rows as u32, grid_heads, splits as u32),
                block_dim: (WARP, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: one warp per (row, head, split) — or (row, KV head, split) writing the
            // partials of that KV head's group of query heads — writing only its own partials;
            // rows of the tiled kernels have position -1 and are skipped; every position lies
            // inside its block table (checked above), whose blocks lie inside the store.
            unsafe { launch.launch(config) }?;
            let splits_i = splits as i32;
            let mut launch = self.launch(Kernel::AttentionCombine);
            launch
                .arg(&partial_out)
                .arg(&partial_max)
                .arg(&partial_sum)
                .arg(&mut out.data)
                .arg(positions.as_ref())
                .arg(&heads)
                .arg(&head_dim)
                .arg(&splits_i);
            let config = LaunchConfig {
                grid_dim: (q.rows as u32, batch.num_heads as u32, 1),
                block_dim: (batch.head_dim.next_multiple_of(WARP as usize) as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: one block per (row, head) reading the partials the split kernel wrote
            // for rows it handled, writing that head of that row.
            unsafe { launch.launch(config) }?;
        }
        if !tiles.rows.is_empty() {
            tiles.longest_first();
            let count = tiles.rows.len();
            let rows = reused("attention.tile_rows", &tiles.rows)?;
            let counts = reused("attention.tile_counts", &tiles.counts)?;
            let tile_positions = reused("attention.tile_positions", &tiles.positions)?;
            let tile_offsets = reused("attention.tile_offsets", &tiles.table_offsets)?;
            let (kernel, threads, shared) = (prefill.kernel, prefill.threads, prefill.shared_bytes);
            let q_scale = if prefill.log2_scaled {
                scale * std::f32::consts::LOG2_E
            } else {
                scale
            };
            let mut launch = self.launch(kernel);
            launch
                .arg(&q.data)
                .arg(&store.k)
                .arg(&store.v)
                .arg(&mut out.data)
                .arg(out16.as_mut())
                .arg(rows.as_ref())
                .arg(counts.as_ref())
                .arg(tile_positions.as_ref())
                .arg(tile_offsets.as_ref())
                .arg(tables.as_ref())
                .arg(&heads)
                .arg(&kv_heads)
                .arg(&head_dim)
                .arg(&block_size)
                .arg(&q_scale);
            // Heads vary fastest, so the longest tiles of every head start first and the
            // short ones fill the last wave.
            let config = LaunchConfig {
                grid_dim: (batch.num_heads as u32, count as u32, 1),
                block_dim: (threads, 1, 1),
                shared_mem_bytes: shared as u32,
            };
            // SAFETY: one block per (head, tile); each tile's rows lie inside q and out (and
            // out16, where given) and its positions inside its block table (checked above).
            unsafe { launch.launch(config) }?;
        }
        out.bf16 = out16;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::super::kernels::tests::assert_host_constants;
    use super::*;

    #[test]
    fn launch_constants_match_the_kernels() {
        assert_host_constants(&[
            ("SPLIT_KEYS", SPLIT_KEYS),
            ("PREFILL_MAX_HEAD_DIM", PREFILL_MAX_HEAD_DIM),
            ("Q_TILE", PREFILL_Q_TILE),
            ("PREFILL_WARPS * 32", PREFILL_THREADS as usize),
            ("FLASH_MAX_HEAD_DIM", FLASH_MAX_HEAD_DIM),
            ("FLASH_Q_TILE", FLASH_Q_TILE),
            ("FLASH_THREADS", FLASH_THREADS as usize),
            ("FLASH_SHARED_BYTES", FLASH_SHARED_BYTES),
            ("FLASH_WGMMA_Q_TILE", FLASH_WGMMA_Q_TILE),
            ("FLASH_WGMMA_THREADS", FLASH_WGMMA_THREADS as usize),
            ("FLASH_K_TILE", DECODE_KEYS),
        ]);
    }

    #[test]
    fn prefill_kernel_takes_warpgroup_instructions_only_on_hopper_at_head_dim_128() {
        let pick = |head_dim, hopper| prefill_kernel(head_dim, hopper).kernel;
        assert_eq!(pick(128, true), Kernel::AttentionPrefillWgmmaHd128);
        assert_eq!(pick(128, false), Kernel::AttentionPrefillMmaHd128);
        assert_eq!(pick(64, true), Kernel::AttentionPrefillMma);
        assert_eq!(pick(80, false), Kernel::AttentionPrefillMma);
        assert_eq!(pick(72, true), Kernel::AttentionPrefill);
        assert_eq!(prefill_kernel(128, true).q_tile, FLASH_WGMMA_Q_TILE);
        assert!(!prefill_kernel(72, false).log2_scaled);
        assert_eq!(decode_kernel(128), Kernel::AttentionDecodeMmaHd128);
        assert_eq!(decode_kernel(64), Kernel::AttentionDecodeMma);
    }

    #[test]
    fn prefill_tiles_cut_runs_and_start_the_longest_first() {
        let mut tiles = PrefillTiles::new(64);
        tiles.add(0..150, 10, 3);
        tiles.add(150..170, 0, 7);
        assert_eq!(tiles.rows, [0, 64, 128, 150]);
        assert_eq!(tiles.counts, [64, 64, 22, 20]);
        assert_eq!(tiles.positions, [10, 74, 138, 0]);
        tiles.longest_first();
        assert_eq!(tiles.rows, [128, 64, 0, 150]);
        assert_eq!(tiles.counts, [22, 64, 64, 20]);
        assert_eq!(tiles.positions, [138, 74, 10, 0]);
        assert_eq!(tiles.table_offsets, [3, 3, 3, 7]);
    }
}

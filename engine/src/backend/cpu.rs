//! Pure-Rust CPU backend: f32 compute over f32 copies of the weights, `gemm` for products and
//! rayon for parallel loops.

use rayon::prelude::*;

use crate::backend::{
    AttentionBatch, Backend, HostCounters, KvRows, KvSpec, RopeTable, Routing, check_scatter_rows,
};
use crate::checkpoint::HostTensor;
use crate::error::{EngineError, Result};
use crate::weights::ExpertWeights;

mod matmul;

use matmul::{Threads, matmul};

/// The CPU backend. Stateless: threads come from rayon's global pool.
#[derive(Debug, Default, Clone, Copy)]
pub struct CpuBackend;

/// Row-major f32 activations.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuTensor {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

/// A weight matrix stored transposed (`[in, out]`), the layout `gemm` streams fastest.
#[derive(Debug, Clone)]
pub struct CpuMatrix {
    pub out_dim: usize,
    pub in_dim: usize,
    transposed: Vec<f32>,
}

/// One layer's K and V, `[slot, kv_head, head_dim]`.
#[derive(Debug, Clone)]
pub struct CpuKvStore {
    spec: KvSpec,
    k: Vec<f32>,
    v: Vec<f32>,
}

impl CpuKvStore {
    fn width(&self) -> usize {
        self.spec.num_kv_heads * self.spec.head_dim
    }

    /// Where `slot`'s row lives in `k` and `v`.
    fn slot_range(&self, slot: usize, op: &str) -> Result<std::ops::Range<usize>> {
        let capacity = self.spec.num_blocks * self.spec.block_size;
        if slot >= capacity {
            return Err(shape_error(
                op,
                format!("slot {slot} is outside the cache of {capacity}"),
            ));
        }
        let width = self.width();
        Ok(slot * width..(slot + 1) * width)
    }

    /// Writes row i of `k` and `v` into `slots[i]`.
    fn store_rows(&mut self, k: &[f32], v: &[f32], slots: &[usize]) -> Result<()> {
        let width = self.width();
        if k.len() != slots.len() * width || v.len() != k.len() {
            return Err(shape_error(
                "store_kv",
                format!(
                    "{} k and {} v values for {} slots of width {width}",
                    k.len(),
                    v.len(),
                    slots.len()
                ),
            ));
        }
        for (i, &slot) in slots.iter().enumerate() {
            let range = self.slot_range(slot, "store_kv")?;
            self.k[range.clone()].copy_from_slice(&k[i * width..(i + 1) * width]);
            self.v[range].copy_from_slice(&v[i * width..(i + 1) * width]);
        }
        Ok(())
    }
}

impl CpuTensor {
    pub(crate) fn zeros(rows: usize, cols: usize) -> Self {
        Self {
            rows,
            cols,
            data: vec![0.0; rows * cols],
        }
    }

    fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }
}

/// Input columns in each band `CpuMatrix::from_rows` transposes on one core.
const TRANSPOSE_BAND: usize = 64;

impl CpuMatrix {
    /// Builds a matrix from `[out, in]` rows: bands of TRANSPOSE_BAND input columns on
    /// separate cores, each written a short run of every row at a time, so the band's output
    /// rows stay in cache (a value at a time down whole columns was most of a model's load).
    fn from_rows(out_dim: usize, in_dim: usize, rows: &[f32]) -> Self {
        let mut transposed = vec![0.0; rows.len()];
        if out_dim > 0 && in_dim > 0 {
            transposed
                .par_chunks_mut(TRANSPOSE_BAND * out_dim)
                .enumerate()
                .for_each(|(band, columns)| {
                    let first = band * TRANSPOSE_BAND;
                    let width = columns.len() / out_dim;
                    for o in 0..out_dim {
                        let row = &rows[o * in_dim + first..o * in_dim + first + width];
                        for (i, &value) in row.iter().enumerate() {
                            columns[i * out_dim + o] = value;
                        }
                    }
                });
        }
        Self {
            out_dim,
            in_dim,
            transposed,
        }
    }

    /// `x · selfᵀ` for a packed row-major `x` of `m` rows.
    pub(crate) fn apply(&self, x: &[f32], m: usize, threads: Threads) -> Vec<f32> {
        let mut out = vec![0.0; m * self.out_dim];
        matmul(
            &mut out,
            x,
            &self.transposed,
            (m, self.in_dim, self.out_dim),
            threads,
        );
        out
    }
}

fn shape_error(op: &str, detail: String) -> EngineError {
    EngineError::InvalidRequest(format!("cpu {op}: {detail}"))
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

impl Backend for CpuBackend {
    type Tensor = CpuTensor;
    type Matrix = CpuMatrix;
    type Vector = Vec<f32>;
    type KvStore = CpuKvStore;
    type ExpertCounters = HostCounters;
    /// Host memory is not shared between processes: nothing to open.
    type PeerKv = std::convert::Infallible;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn expert_counters(&self, experts: usize) -> Result<HostCounters> {
        Ok(HostCounters::new(experts))
    }

    fn count_experts(&self, counters: &HostCounters, expert_ids: &[usize]) {
        counters.add(expert_ids);
    }

    fn read_expert_counters(&self, counters: &HostCounters) -> Result<Vec<u64>> {
        Ok(counters.read())
    }

    fn matrix(&self, host: HostTensor) -> Result<CpuMatrix> {
        let [out_dim, in_dim] = host.shape[..] else {
            return Err(shape_error(
                "matrix",
                format!("shape {:?} is not 2-D", host.shape),
            ));
        };
        Ok(CpuMatrix::from_rows(out_dim, in_dim, &host.data))
    }

    fn vector(&self, host: Vec<f32>) -> Result<Vec<f32>> {
        Ok(host)
    }

    fn kv_store(&self, spec: &KvSpec) -> Result<CpuKvStore> {
        let len = spec.num_blocks * spec.block_size * spec.num_kv_heads * spec.head_dim;
        Ok(CpuKvStore {
            spec: *spec,
            k: vec![0.0; len],
            v: vec![0.0; len],
        })
    }

    fn embed(&self, table: &CpuMatrix, ids: &[u32]) -> Result<CpuTensor> {
        let hidden = table.in_dim;
        let mut out = CpuTensor::zeros(ids.len(), hidden);
        for (dst, &id) in out.data.chunks_exact_mut(hidden).zip(ids) {
            let id = id as usize;
            if id >= table.out_dim {
                return Err(shape_error(
                    "embed",
                    format!(
                        "token id {id} is outside the vocabulary of {}",
                        table.out_dim
                    ),
                ));
            }
            // A strided gather: only a handful of rows per step, not worth a second copy of
            // the table in row order.
            for (i, d) in dst.iter_mut().enumerate() {
                *d = table.transposed[i * table.out_dim + id];
            }
        }
        Ok(out)
    }

    fn rms_norm(&self, x: &CpuTensor, weight: &Vec<f32>, eps: f32) -> Result<CpuTensor> {
        let width = weight.len();
        if width == 0 || !x.cols.is_multiple_of(width) {
            return Err(shape_error(
                "rms_norm",
                format!("row of {} is not a multiple of weight {width}", x.cols),
            ));
        }
        let mut out = x.clone();
        out.data.par_chunks_mut(width).for_each(|run| {
            let mean_sq = run.iter().map(|v| v * v).sum::<f32>() / width as f32;
            let inv = 1.0 / (mean_sq + eps).sqrt();
            for (v, w) in run.iter_mut().zip(weight) {
                *v = *v * inv * w;
            }
        });
        Ok(out)
    }

    fn linear(&self, x: &CpuTensor, w: &CpuMatrix, bias: Option<&Vec<f32>>) -> Result<CpuTensor> {
        if x.cols != w.in_dim {
            return Err(shape_error(
                "linear",
                format!("input width {} against weight in {}", x.cols, w.in_dim),
            ));
        }
        let mut data = w.apply(&x.data, x.rows, Threads::Pool);
        if let Some(bias) = bias {
            for row in data.chunks_exact_mut(w.out_dim) {
                row.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
            }
        }
        Ok(CpuTensor {
            rows: x.rows,
            cols: w.out_dim,
            data,
        })
    }

    fn add_assign(&self, acc: &mut CpuTensor, x: &CpuTensor) -> Result<()> {
        if acc.data.len() != x.data.len() {
            return Err(shape_error(
                "add",
                format!("{} vs {} values", acc.data.len(), x.data.len()),
            ));
        }
        acc.data.iter_mut().zip(&x.data).for_each(|(a, b)| *a += b);
        Ok(())
    }

    fn scale_rows(&self, x: &mut CpuTensor, scales: &[f32]) -> Result<()> {
        if scales.len() != x.rows {
            return Err(shape_error(
                "scale_rows",
                format!("{} scales for {} rows", scales.len(), x.rows),
            ));
        }
        let cols = x.cols;
        for (row, s) in x.data.chunks_exact_mut(cols.max(1)).zip(scales) {
            row.iter_mut().for_each(|v| *v *= s);
        }
        Ok(())
    }

    fn swiglu(&self, gate_up: &CpuTensor) -> Result<CpuTensor> {
        Ok(CpuTensor {
            rows: gate_up.rows,
            cols: gate_up.cols / 2,
            data: silu_mul(gate_up),
        })
    }

    fn rope(&self, x: &mut CpuTensor, table: &RopeTable) -> Result<()> {
        let dim = table.head_dim;
        let half = dim / 2;
        if table.rows() != x.rows || dim == 0 || !x.cols.is_multiple_of(dim) {
            return Err(shape_error(
                "rope",
                format!(
                    "{} table rows for {} rows of {}",
                    table.rows(),
                    x.rows,
                    x.cols
                ),
            ));
        }
        let cols = x.cols;
        let (cos, sin) = table.cos_sin();
        x.data
            .par_chunks_mut(cols)
            .zip(cos.par_chunks(half.max(1)).zip(sin.par_chunks(half.max(1))))
            .for_each(|(row, (cos, sin))| {
                for head in row.chunks_exact_mut(dim) {
                    for i in 0..half {
                        let (a, b) = (head[i], head[i + half]);
                        head[i] = a * cos[i] - b * sin[i];
                        head[i + half] = b * cos[i] + a * sin[i];
                    }
                }
            });
        Ok(())
    }

    fn write_kv(
        &self,
        store: &mut CpuKvStore,
        k: &CpuTensor,
        v: &CpuTensor,
        slots: &[usize],
    ) -> Result<()> {
        let width = store.width();
        if k.cols != width || v.cols != width {
            return Err(shape_error(
                "write_kv",
                format!("k has width {}, v {}, the cache {width}", k.cols, v.cols),
            ));
        }
        store.store_rows(&k.data, &v.data, slots)
    }

    fn read_kv(&self, store: &CpuKvStore, slots: &[usize]) -> Result<KvRows> {
        let width = store.width();
        let mut rows = KvRows {
            k: Vec::with_capacity(slots.len() * width),
            v: Vec::with_capacity(slots.len() * width),
        };
        for &slot in slots {
            let range = store.slot_range(slot, "read_kv")?;
            rows.k.extend_from_slice(&store.k[range.clone()]);
            rows.v.extend_from_slice(&store.v[range]);
        }
        Ok(rows)
    }

    fn load_kv(&self, store: &mut CpuKvStore, rows: &KvRows, slots: &[usize]) -> Result<()> {
        store.store_rows(&rows.k, &rows.v, slots)
    }

    fn write_peer_kv(
        &self,
        _store: &CpuKvStore,
        _slots: &[usize],
        peer: &Self::PeerKv,
        _peer_slots: &[usize],
    ) -> Result<()> {
        match *peer {}
    }

    fn attention(
        &self,
        q: &CpuTensor,
        store: &CpuKvStore,
        batch: &AttentionBatch<'_>,
    ) -> Result<CpuTensor> {
        let head_dim = batch.head_dim;
        let group = batch.num_heads / batch.num_kv_heads.max(1);
        let kv_width = batch.num_kv_heads * head_dim;
        let scale = 1.0 / (head_dim as f32).sqrt();
        let mut out = CpuTensor::zeros(q.rows, q.cols);
        // (position, block table) of every query row.
        let mut rows: Vec<Option<(usize, &[crate::block_pool::BlockId])>> = vec![None; q.rows];
        for seq in batch.seqs {
            for (offset, row) in seq.rows.clone().enumerate() {
                let position = seq.first_position + offset;
                if position / batch.block_size >= seq.block_table.len() || row >= q.rows {
                    return Err(shape_error(
                        "attention",
                        format!(
                            "row {row} at position {position} is past the sequence's {} blocks",
                            seq.block_table.len()
                        ),
                    ));
                }
                rows[row] = Some((position, seq.block_table));
            }
        }
        let cols = q.cols;
        out.data
            .par_chunks_mut(cols)
            .zip(rows.into_par_iter())
            .enumerate()
            .for_each(|(row, (dst, meta))| {
                let Some((position, table)) = meta else {
                    return;
                };
                let query = q.row(row);
                let mut scores = vec![0.0f32; position + 1];
                for head in 0..batch.num_heads {
                    let kv_head = head / group;
                    let qh = &query[head * head_dim..(head + 1) * head_dim];
                    let slot_offset = |pos: usize| {
                        let slot = table[pos / batch.block_size].0 as usize * batch.block_size
                            + pos % batch.block_size;
                        slot * kv_width + kv_head * head_dim
                    };
                    let mut max = f32::NEG_INFINITY;
                    for (pos, s) in scores.iter_mut().enumerate() {
                        let at = slot_offset(pos);
                        let key = &store.k[at..at + head_dim];
                        *s = qh.iter().zip(key).map(|(a, b)| a * b).sum::<f32>() * scale;
                        max = max.max(*s);
                    }
                    let mut total = 0.0;
                    for s in scores.iter_mut() {
                        *s = (*s - max).exp();
                        total += *s;
                    }
                    let dh = &mut dst[head * head_dim..(head + 1) * head_dim];
                    for (pos, s) in scores.iter().enumerate() {
                        let at = slot_offset(pos);
                        let value = &store.v[at..at + head_dim];
                        let w = s / total;
                        dh.iter_mut().zip(value).for_each(|(d, v)| *d += w * v);
                    }
                }
            });
        Ok(out)
    }

    fn moe_experts(
        &self,
        x: &CpuTensor,
        routing: &Routing,
        experts: &[ExpertWeights<Self>],
    ) -> Result<CpuTensor> {
        let hidden = x.cols;
        let k = routing.experts_per_token;
        // Tokens grouped by expert: (token row, routing weight).
        let mut groups: Vec<Vec<(usize, f32)>> = vec![Vec::new(); experts.len()];
        for (slot, (&expert, &weight)) in
            routing.expert_ids.iter().zip(&routing.weights).enumerate()
        {
            let group = groups.get_mut(expert).ok_or_else(|| {
                shape_error("moe", format!("expert {expert} of {}", experts.len()))
            })?;
            group.push((slot / k.max(1), weight));
        }
        let outputs: Vec<(usize, Vec<f32>)> = groups
            .par_iter()
            .enumerate()
            .filter(|(_, tokens)| !tokens.is_empty())
            .map(|(e, tokens)| {
                let mut gathered = Vec::with_capacity(tokens.len() * hidden);
                for &(token, _) in tokens {
                    gathered.extend_from_slice(x.row(token));
                }
                let expert = &experts[e];
                let gate_up = CpuTensor {
                    rows: tokens.len(),
                    cols: expert.gate_up.out_dim,
                    data: expert
                        .gate_up
                        .apply(&gathered, tokens.len(), Threads::Single),
                };
                let act = silu_mul(&gate_up);
                (e, expert.down.apply(&act, tokens.len(), Threads::Single))
            })
            .collect();
        let mut out = CpuTensor::zeros(x.rows, hidden);
        for (e, rows) in outputs {
            for (&(token, weight), row) in groups[e].iter().zip(rows.chunks_exact(hidden)) {
                let dst = &mut out.data[token * hidden..(token + 1) * hidden];
                dst.iter_mut().zip(row).for_each(|(d, v)| *d += weight * v);
            }
        }
        Ok(out)
    }

    fn select_rows(&self, x: &CpuTensor, rows: &[usize]) -> Result<CpuTensor> {
        let mut out = CpuTensor::zeros(rows.len(), x.cols);
        for (dst, &r) in out.data.chunks_exact_mut(x.cols.max(1)).zip(rows) {
            if r >= x.rows {
                return Err(shape_error("select_rows", format!("row {r} of {}", x.rows)));
            }
            dst.copy_from_slice(x.row(r));
        }
        Ok(out)
    }

    fn scatter_add_rows(&self, acc: &mut CpuTensor, x: &CpuTensor, rows: &[usize]) -> Result<()> {
        check_scatter_rows((acc.rows, acc.cols), (x.rows, x.cols), rows)
            .map_err(|detail| shape_error("scatter_add_rows", detail))?;
        for (i, &r) in rows.iter().enumerate() {
            let dst = &mut acc.data[r * acc.cols..(r + 1) * acc.cols];
            for (d, s) in dst.iter_mut().zip(x.row(i)) {
                *d += s;
            }
        }
        Ok(())
    }

    fn shape(&self, x: &CpuTensor) -> (usize, usize) {
        (x.rows, x.cols)
    }

    fn upload_tensor(&self, rows: usize, cols: usize, data: Vec<f32>) -> Result<CpuTensor> {
        if data.len() != rows * cols {
            return Err(shape_error(
                "upload_tensor",
                format!("{} values for [{rows}, {cols}]", data.len()),
            ));
        }
        Ok(CpuTensor { rows, cols, data })
    }

    fn to_host(&self, x: &CpuTensor) -> Result<Vec<f32>> {
        Ok(x.data.clone())
    }
}

fn silu_mul(gate_up: &CpuTensor) -> Vec<f32> {
    let width = gate_up.cols / 2;
    let mut out = Vec::with_capacity(gate_up.rows * width);
    for src in gate_up.data.chunks_exact(gate_up.cols.max(1)) {
        let (gate, up) = src.split_at(width);
        out.extend(gate.iter().zip(up).map(|(g, u)| silu(*g) * u));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matrices_are_stored_transposed_across_tile_edges() {
        // Shapes across TRANSPOSE_BAND's edges, a single row and an empty matrix.
        for (out_dim, in_dim) in [(70, 130), (64, 64), (1, 5), (5, 1), (0, 3)] {
            let rows: Vec<f32> = (0..out_dim * in_dim).map(|x| x as f32).collect();
            let m = CpuMatrix::from_rows(out_dim, in_dim, &rows);
            for o in 0..out_dim {
                for i in 0..in_dim {
                    assert_eq!(m.transposed[i * out_dim + o], rows[o * in_dim + i]);
                }
            }
        }
    }
}

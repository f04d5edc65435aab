//! Dense projections: cuBLAS GEMMs (bf16 inputs, f32 accumulate) for many rows, `gemv_rows`
//! and `gemv_rows_mma` for a decode step's few, and the rates the bench measures them against.

use std::ffi::c_void;

use cudarc::cublas::sys as blas;
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaSlice, DevicePtr, DevicePtrMut};

use super::{
    CudaBackend, CudaMatrix, CudaTensor, CudaVector, ELEMENT_THREADS, Kernel, ROW_THREADS, WARP,
    blocks, collect_array, device_error, per_row, shape_error,
};
use crate::backend::Backend;
use crate::checkpoint::HostTensor;
use crate::error::Result;
use crate::rng::Rng;

/// Rows of x up to which projections run as `gemv_rows` (a weight row a warp, or a few), in
/// blocks of GEMV_WARPS warps, GEMV_BLOCKS_PER_SM an SM, each warp loading GEMV_ROUND_CHUNKS
/// 16-byte chunks of its row before using any.
const GEMV_MAX_ROWS: usize = 4;
const GEMV_WARPS: usize = 8;
const GEMV_BLOCKS_PER_SM: usize = 4;
const GEMV_ROUND_CHUNKS: usize = 32 * 8;
/// One row of x runs as `gemv_row_parts` where a weight row is at most GEMV_WARPS parts of
/// GEMV_PART_LOADS 16-byte loads a lane and the launch at most GEMV_PARTS_MAX_WAVES waves of
/// gemv_rows' warps (longer ones, the LM head, stream at the copy rate a warp a row).
const GEMV_PART_LOADS: usize = 2;
const GEMV_PARTS_MAX_WAVES: usize = 4;
/// Rows of x up to which projections run as matrix-vector products, past GEMV_MAX_ROWS as
/// `gemv_rows_mma`: a block of GEMV_MMA_WARPS warps a tile of GEMV_MMA_TILE weight rows, or
/// of GEMV_MMA_MAX_WARPS where the launch has fewer tiles than the GPU has SMs (a batch of
/// 8's o projection, 128 tiles of 4096 values; the router's 8): each warp then makes half
/// the trips to memory along its rows.
const GEMV_MMA_ROWS: usize = 8;
const GEMV_MMA_TILE: usize = 16;
const GEMV_MMA_WARPS: u32 = 8;
const GEMV_MMA_MAX_WARPS: u32 = 16;
/// Weights one `gemv_rows` or `gemv_rows_mma` launch multiplies x by.
const GEMV_MAX_WEIGHTS: usize = 3;
/// Values one thread of `to_bf16` converts.
const TO_BF16_VALUES: usize = 8;

/// Warps a weight row of `k` bf16 values is cut into, each lane of a warp loading
/// `loads_per_lane` 16-byte chunks (a power of two, parts past the row's chunks empty): how
/// the kernels' rows in parts (`gemv_row_parts`, `moe_gate_up`) share a row out.
pub(super) fn row_parts(k: usize, loads_per_lane: usize) -> usize {
    (k / 8)
        .div_ceil(WARP as usize * loads_per_lane)
        .next_power_of_two()
}

/// Whether projections of `rows` rows read them in bf16 (GEMMs), not f32 (`gemv_rows` and
/// `gemv_rows_mma`, up to GEMV_MMA_ROWS).
pub(super) fn projections_read_bf16(rows: usize) -> bool {
    rows > GEMV_MMA_ROWS
}

/// A projection's input as the kernels read it (see `CudaBackend::projection_input`).
pub(super) enum ProjectionInput<'a> {
    /// Few rows, read as f32 by `gemv_rows`.
    Rows(&'a CudaTensor),
    /// `rows` rows of `cols` values in bf16 for the GEMMs.
    Bf16 {
        x16: Bf16Rows<'a>,
        rows: usize,
        cols: usize,
    },
}

/// A tensor's values in bf16: the copy the kernel that wrote them made, or one made here.
pub(super) enum Bf16Rows<'a> {
    Written(&'a CudaSlice<u16>),
    Converted(CudaSlice<u16>),
}

impl std::ops::Deref for Bf16Rows<'_> {
    type Target = CudaSlice<u16>;

    fn deref(&self) -> &CudaSlice<u16> {
        match self {
            Self::Written(x16) => x16,
            Self::Converted(x16) => x16,
        }
    }
}

impl ProjectionInput<'_> {
    /// Values a row.
    fn cols(&self) -> usize {
        match self {
            Self::Rows(x) => x.cols,
            Self::Bf16 { cols, .. } => *cols,
        }
    }

    /// The input in bf16, where it is at hand.
    pub(super) fn bf16(&self) -> Option<&CudaSlice<u16>> {
        match self {
            Self::Bf16 { x16, .. } => Some(x16),
            Self::Rows(x) => x.bf16.as_ref(),
        }
    }
}

/// `n` values uniform over [-1, 1), the engine's seeded generator's from `seed`.
fn spread(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng::seeded(seed);
    (0..n)
        .map(|_| (2.0 * rng.next_f64() - 1.0) as f32)
        .collect()
}

impl CudaBackend {
    /// FLOP/s of this backend's GEMM (bf16 in, f32 accumulate) on an n×n×n product whose
    /// input is already bf16: the ceiling prefill is measured against. The inputs are spread
    /// over (-1, 1) like a model's: on zeros the tensor cores draw less power and cuBLAS ran
    /// ~10% faster than any checkpoint lets it. (It once timed the input's conversion too,
    /// which cost a quarter of the rate while that was slow.)
    pub fn gemm_rate(&self, n: usize, repeats: usize) -> Result<f64> {
        let x16 = self.spread_matrix(n, n, 1)?.data;
        let w = self.spread_matrix(n, n, 2)?;
        self.flop_rate(2 * n * n * n, repeats, || {
            self.gemm_bf16(&x16, n, n, &w).map(drop)
        })
    }

    /// The same for `x` of `m` × `k` times a weight of `n` × `k`: FLOP/s of the projection
    /// path (conversion to bf16 included) at one layer's shape.
    pub fn gemm_shape_rate(&self, m: usize, k: usize, n: usize, repeats: usize) -> Result<f64> {
        let x = CudaTensor {
            rows: m,
            cols: k,
            data: self.upload(&spread(m * k, 1))?,
            bf16: None,
        };
        let w = self.spread_matrix(n, k, 2)?;
        self.flop_rate(2 * m * n * k, repeats, || self.gemm(&x, &w).map(drop))
    }

    /// An `out_dim` × `in_dim` weight of [`spread`] values, rounded to bf16 as any is.
    fn spread_matrix(&self, out_dim: usize, in_dim: usize, seed: u64) -> Result<CudaMatrix> {
        self.matrix(HostTensor {
            shape: vec![out_dim, in_dim],
            data: spread(out_dim * in_dim, seed),
        })
    }

    /// `flops` over the time of `repeats` runs of `run`, after one to warm up.
    fn flop_rate(&self, flops: usize, repeats: usize, run: impl Fn() -> Result<()>) -> Result<f64> {
        run()?;
        self.synchronize()?;
        let started = std::time::Instant::now();
        for _ in 0..repeats {
            run()?;
        }
        self.synchronize()?;
        Ok((flops * repeats) as f64 / started.elapsed().as_secs_f64())
    }

    /// Seconds of one row's `x · wᵀ` (`k` values, a weight of `n` rows: the matrix-vector
    /// kernel of a decode step of one sequence), `repeats` samples of each: with the weight in
    /// HBM only (L2 emptied first by a copy of `flush_bytes`), and read again at once (from
    /// L2, where it fits). Each is timed alone between events.
    pub fn gemv_seconds(
        &self,
        k: usize,
        n: usize,
        flush_bytes: usize,
        repeats: usize,
    ) -> Result<(Vec<f64>, Vec<f64>)> {
        let x = CudaTensor {
            rows: 1,
            cols: k,
            data: self.upload(&spread(k, 1))?,
            bf16: None,
        };
        let w = self.spread_matrix(n, k, 2)?;
        let src = self.zeros::<u8>(flush_bytes)?;
        let mut dst = self.zeros::<u8>(flush_bytes)?;
        let event = || {
            self.stream
                .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(|e| device_error("recording an event", e))
        };
        let elapsed = |start: &CudaEvent, end: &CudaEvent| {
            start
                .elapsed_ms(end)
                .map(|ms| f64::from(ms) * 1e-3)
                .map_err(|e| device_error("timing events", e))
        };
        let (mut from_hbm, mut again) = (Vec::new(), Vec::new());
        for _ in 0..repeats {
            self.stream
                .memcpy_dtod(&src, &mut dst)
                .map_err(|e| device_error("device copy", e))?;
            let start = event()?;
            self.linear(&x, &w, None)?;
            let cold = event()?;
            self.linear(&x, &w, None)?;
            let warm = event()?;
            from_hbm.push(elapsed(&start, &cold)?);
            again.push(elapsed(&cold, &warm)?);
        }
        Ok((from_hbm, again))
    }

    /// `y[m, n] = x[m, k] · w[n, k]ᵀ` with bf16 inputs and f32 accumulation.
    fn gemm(&self, x: &CudaTensor, w: &CudaMatrix) -> Result<CudaTensor> {
        let x16 = self.bf16_copy(x)?;
        self.gemm_bf16(&x16, x.rows, x.cols, w)
    }

    /// The same for `x16`, `m` rows of `k` values already in bf16.
    fn gemm_bf16(
        &self,
        x16: &CudaSlice<u16>,
        m: usize,
        k: usize,
        w: &CudaMatrix,
    ) -> Result<CudaTensor> {
        let n = w.out_dim;
        let _timer = self.timed("gemm");
        let mut y = self.output(m, n)?;
        if m == 0 {
            return Ok(y);
        }
        let (alpha, beta) = (1.0f32, 0.0f32);
        {
            let (a, _a_guard) = w.data.device_ptr(&self.stream);
            let (b, _b_guard) = x16.device_ptr(&self.stream);
            let (c, _c_guard) = y.data.device_ptr_mut(&self.stream);
            // Column-major view: yᵀ[n, m] = w[n, k] (stored k-major, transposed) · x16ᵀ[k, m].
            // SAFETY: a holds n·k, b m·k and c m·n elements of the declared types; the
            // leading dimensions match those row lengths; alpha and beta outlive the call,
            // which is queued on the handle's stream like every other operation here.
            unsafe {
                cudarc::cublas::result::gemm_ex(
                    *self.blas.handle(),
                    blas::cublasOperation_t::CUBLAS_OP_T,
                    blas::cublasOperation_t::CUBLAS_OP_N,
                    n as i32,
                    m as i32,
                    k as i32,
                    (&alpha as *const f32).cast::<c_void>(),
                    a as *const c_void,
                    blas::cudaDataType::CUDA_R_16BF,
                    k as i32,
                    b as *const c_void,
                    blas::cudaDataType::CUDA_R_16BF,
                    k as i32,
                    (&beta as *const f32).cast::<c_void>(),
                    c as *mut c_void,
                    blas::cudaDataType::CUDA_R_32F,
                    n as i32,
                    blas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    blas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
            .map_err(|e| device_error("cublas gemm", e))?;
        }
        Ok(y)
    }

    /// How projections of `x` read it: a decode step's few rows straight from f32 by
    /// `gemv_rows` or `gemv_rows_mma`, more in bf16 for the GEMMs (the copy the kernel that
    /// wrote x made, else one made here).
    pub(super) fn projection_input<'a>(&self, x: &'a CudaTensor) -> Result<ProjectionInput<'a>> {
        if !projections_read_bf16(x.rows) && x.cols.is_multiple_of(8) {
            return Ok(ProjectionInput::Rows(x));
        }
        let x16 = match &x.bf16 {
            Some(x16) => Bf16Rows::Written(x16),
            None => Bf16Rows::Converted(self.bf16_copy(x)?),
        };
        Ok(ProjectionInput::Bf16 {
            x16,
            rows: x.rows,
            cols: x.cols,
        })
    }

    /// Where a kernel writing `rows` rows of `cols` values that projections read next (a
    /// norm's output) should write their bf16 copy too: wherever a GEMM will read them,
    /// from two rows up (the MoE's grouped GEMMs; projections from GEMV_MMA_ROWS up).
    pub(super) fn gemm_input_buffer(
        &self,
        rows: usize,
        cols: usize,
    ) -> Result<Option<CudaSlice<u16>>> {
        match rows > 1 {
            true => self.uninit(rows * cols).map(Some),
            false => Ok(None),
        }
    }

    /// `x · wᵀ` in f32 for a prepared input.
    pub(super) fn project(
        &self,
        input: &ProjectionInput<'_>,
        w: &CudaMatrix,
    ) -> Result<CudaTensor> {
        let [y] = self.project_many(input, [w])?;
        Ok(y)
    }

    /// `x · wᵀ` for each of up to three weights of one prepared input (few rows: one
    /// launch for all); every projection's width check.
    fn project_many<const N: usize>(
        &self,
        input: &ProjectionInput<'_>,
        weights: [&CudaMatrix; N],
    ) -> Result<[CudaTensor; N]> {
        const { assert!(N <= GEMV_MAX_WEIGHTS) };
        if let Some(w) = weights.iter().find(|w| w.in_dim != input.cols()) {
            return Err(shape_error(
                "linear",
                format!(
                    "x has {} columns, the weight takes {}",
                    input.cols(),
                    w.in_dim
                ),
            ));
        }
        let x = match input {
            ProjectionInput::Bf16 { x16, rows, cols } => {
                let ys = weights.map(|w| self.gemm_bf16(x16, *rows, *cols, w));
                return collect_array(ys);
            }
            ProjectionInput::Rows(x) => x,
        };
        let _timer = self.timed("gemv");
        let mut ys = collect_array(weights.map(|w| self.output(x.rows, w.out_dim)))?;
        let total: usize = weights.iter().map(|w| w.out_dim).sum();
        if x.rows == 0 || total == 0 {
            return Ok(ys);
        }
        let (rows, k) = (x.rows as i32, input.cols() as i32);
        let null = 0u64;
        let outs: [i32; GEMV_MAX_WEIGHTS] =
            std::array::from_fn(|m| weights.get(m).map_or(0, |w| w.out_dim as i32));
        // Warps a weight row, or a block a tile of them (each weight's rows start a tile).
        let mut launch;
        let config = if let Some(parts) = self.gemv_row_parts(x.rows, total, input.cols()) {
            launch = self.launch(Kernel::GemvRowParts);
            launch.arg(&x.data).arg(&k).arg(&parts);
            blocks(total * parts as usize * WARP as usize, ROW_THREADS)
        } else if x.rows <= GEMV_MAX_ROWS {
            let split = self.gemv_split(total, input.cols());
            launch = self.launch(Kernel::GemvRows);
            launch.arg(&x.data).arg(&rows).arg(&k).arg(&split);
            blocks(total * split as usize * WARP as usize, ROW_THREADS)
        } else {
            let tiles: usize = weights
                .iter()
                .map(|w| w.out_dim.div_ceil(GEMV_MMA_TILE))
                .sum();
            let warps = if tiles < self.multiprocessors {
                GEMV_MMA_MAX_WARPS
            } else {
                GEMV_MMA_WARPS
            };
            launch = self.launch(Kernel::GemvRowsMma);
            launch.arg(&x.data).arg(&rows).arg(&k);
            blocks(tiles * (warps * WARP) as usize, warps * WARP)
        };
        let mut outputs = ys.iter_mut();
        for (m, n) in outs.iter().enumerate() {
            match (weights.get(m), outputs.next()) {
                (Some(w), Some(y)) => launch.arg(&w.data).arg(&mut y.data),
                _ => launch.arg(&null).arg(&null),
            };
            launch.arg(n);
        }
        // SAFETY: `split` warps of one block per weight row j (gemv_rows; split divides the
        // block's warps; gemv_row_parts: `parts` of them, x one row), or a block per
        // GEMV_MMA_TILE rows from j (gemv_rows_mma), of each weight m (w_m holds n_m · k bf16
        // values, k a multiple of 8; rows past n_m and absent weights, n_m = 0, are never
        // read), reading the rows of x (at most the kernel's limit, rows · k floats,
        // allocation-aligned) and writing columns j … below n_m of y_m (rows · n_m).
        unsafe { launch.launch(config) }?;
        Ok(ys)
    }

    /// The parts of `gemv_row_parts` a weight row of `k` values takes, where one row of x
    /// times `rows` weight rows runs there (see GEMV_PART_LOADS).
    fn gemv_row_parts(&self, x_rows: usize, rows: usize, k: usize) -> Option<i32> {
        let parts = row_parts(k, GEMV_PART_LOADS);
        let warps = GEMV_WARPS * GEMV_BLOCKS_PER_SM * self.multiprocessors;
        (x_rows == 1 && parts <= GEMV_WARPS && rows <= GEMV_PARTS_MAX_WAVES * warps)
            .then_some(parts as i32)
    }

    /// Warps of `gemv_rows` a weight row of `k` values takes, of `rows` rows in all: the
    /// row's rounds of loads shared out while one wave still holds every row's warps.
    fn gemv_split(&self, rows: usize, k: usize) -> i32 {
        let rounds = (k / 8).div_ceil(GEMV_ROUND_CHUNKS);
        let warps = GEMV_WARPS * GEMV_BLOCKS_PER_SM * self.multiprocessors;
        let mut split = 1;
        while split < rounds.min(GEMV_WARPS) && rows * split * 2 <= warps {
            split *= 2;
        }
        split as i32
    }

    /// `x · wᵀ + bias` for each of up to three projections of one prepared input.
    pub(super) fn linear_many<const N: usize>(
        &self,
        input: &ProjectionInput<'_>,
        projections: [(&CudaMatrix, Option<&CudaVector>); N],
    ) -> Result<[CudaTensor; N]> {
        let mut ys = self.project_many(input, projections.map(|(w, _)| w))?;
        for (y, (_, bias)) in ys.iter_mut().zip(projections) {
            if let Some(bias) = bias {
                self.add_bias(y, bias)?;
            }
        }
        Ok(ys)
    }

    /// `y += bias` on every row.
    fn add_bias(&self, y: &mut CudaTensor, bias: &CudaVector) -> Result<()> {
        if y.rows == 0 {
            return Ok(());
        }
        if bias.len != y.cols {
            return Err(shape_error(
                "linear",
                format!("a bias of {} for {} columns", bias.len, y.cols),
            ));
        }
        let cols = y.cols as i32;
        let mut launch = self.launch(Kernel::AddBias);
        launch.arg(y.values_mut()).arg(&bias.data).arg(&cols);
        // SAFETY: one block per row of y; the bias holds y.cols values.
        unsafe { launch.launch(per_row(y.rows)) }
    }

    /// `x`'s values rounded to bf16 (as 16-bit words), the tensor cores' input.
    pub(super) fn bf16_copy(&self, x: &CudaTensor) -> Result<CudaSlice<u16>> {
        let n = x.rows * x.cols;
        let mut x16 = self.uninit::<u16>(n)?;
        if n == 0 {
            return Ok(x16);
        }
        let count = n as i32;
        let mut launch = self.launch(Kernel::ToBf16);
        launch.arg(&x.data).arg(&mut x16).arg(&count);
        // SAFETY: to_bf16 reads `count` floats of x and writes as many words of x16, both
        // that long, TO_BF16_VALUES a thread.
        unsafe { launch.launch(blocks(n.div_ceil(TO_BF16_VALUES), ELEMENT_THREADS)) }?;
        Ok(x16)
    }
}

#[cfg(test)]
mod tests {
    use super::super::kernels::tests::assert_host_constants;
    use super::*;

    #[test]
    fn matrix_vector_rows_match_the_kernel() {
        assert_host_constants(&[
            ("GEMV_MAX_ROWS", GEMV_MAX_ROWS),
            ("GEMV_WARPS", GEMV_WARPS),
            ("GEMV_WARPS * 32", ROW_THREADS as usize),
            ("LOADS_IN_FLIGHT * 32", GEMV_ROUND_CHUNKS),
            ("GEMV_PART_LOADS", GEMV_PART_LOADS),
            ("GEMV_MMA_ROWS", GEMV_MMA_ROWS),
            ("GEMV_MMA_TILE", GEMV_MMA_TILE),
            ("GEMV_MMA_MAX_WARPS", GEMV_MMA_MAX_WARPS as usize),
            ("TO_BF16_VALUES", TO_BF16_VALUES),
        ]);
    }

    #[test]
    fn rows_in_parts_round_up_to_a_power_of_two() {
        // 2048 values are 256 chunks: two loads a lane take 4 parts, four loads 2.
        assert_eq!(row_parts(2048, 2), 4);
        assert_eq!(row_parts(2048, 4), 2);
        // 2056 values are 257 chunks: 5 parts of 64, rounded up to 8 (three empty).
        assert_eq!(row_parts(2056, 2), 8);
        assert_eq!(row_parts(8, 2), 1);
    }

    #[test]
    fn rate_inputs_spread_over_the_open_unit_interval() {
        let values = spread(100_000, 1);
        assert!(values.iter().all(|v| (-1.0..1.0).contains(v)));
        let mean = values.iter().sum::<f32>() / values.len() as f32;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!(values.iter().filter(|v| v.abs() > 0.5).count() > 40_000);
        assert_eq!(spread(8, 1), spread(8, 1));
        assert_ne!(spread(8, 1), spread(8, 2));
    }
}

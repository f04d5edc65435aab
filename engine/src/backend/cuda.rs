//! CUDA backend through cudarc, loading libcuda, libnvrtc and libcublas at run time so the
//! workspace builds and runs where they are absent. Activations are f32 on the device; weights
//! and the KV cache are bf16. Dense projections are cuBLAS GEMMs (bf16 inputs, f32 accumulate
//! and output) or matrix-vector kernels for a decode step's few rows (`projection`);
//! everything else is the CUDA C in `kernels/`, compiled once per process with NVRTC for the
//! device's architecture (`kernels`): MoE routed and grouped on the device (`moe`), its
//! experts as grouped tensor-core GEMMs, tensor-core attention for prefill and for decode of
//! grouped-query heads (`attention`), and greedy sampling (`sampling`).
//!
//! This is the only module of the engine that uses cudarc, and the only one with `unsafe`
//! beyond the CPU backend's gemm call and the checkpoint mmap: kernel launches and the raw
//! cuBLAS GEMM, each with its safety argument.
#![allow(unsafe_code)]

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use cudarc::cublas::CudaBlas;
use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, CudaView, LaunchConfig};
use rayon::prelude::*;

use crate::backend::{
    AttentionBatch, Backend, HeadTransforms, KvRows, KvSpec, ResidualNorm, RopeTable, RouteRule,
    Routing, check_scatter_rows,
};
use crate::checkpoint::{HostTensor, PARALLEL_MIN_VALUES};
use crate::error::{EngineError, Result};
use crate::parallel::Collective;
use crate::parallel::host::host_collectives;
use crate::weights::ExpertWeights;
use kernels::{HOPPER, Kernel, Kernels};
use launch::Launch;
use memory::ReusedUploads;

mod attention;
mod kernels;
mod launch;
mod memory;
mod moe;
mod nccl;
mod peer;
mod profile;
mod projection;
mod sampling;
mod timeline;

pub use kernels::{KERNEL_NAMES, KERNELS_SOURCE, compile_kernels};
pub use launch::MAX_ARGS as KERNEL_MAX_ARGS;
pub use moe::CudaExpertCounters;
pub use nccl::{NCCL_ID_BYTES, NcclCollective, nccl_probe, nccl_unique_id};
pub use peer::CudaPeerKv;
pub use timeline::{KernelOnTimeline, TimelineLaunch, timeline_by_kernel};

/// Threads per block of the row-wise kernels.
const ROW_THREADS: u32 = 256;
/// Threads per block of the element-wise kernels.
const ELEMENT_THREADS: u32 = 256;
const WARP: u32 = 32;
/// Heads one block of `rope` rotates (its kernel's `ROPE_HEADS_PER_BLOCK`): a decode step's
/// one row spreads over several blocks.
const ROPE_HEADS_PER_BLOCK: u32 = 8;
/// Runs of at most this many values (a head's q or k) are normalized a warp each.
const RMS_NORM_SHORT_RUN: usize = 256;
/// The most values of a head the kernels take: 8 a lane (RoPE's shared tables, split
/// attention's registers).
const MAX_HEAD_DIM: usize = 256;

fn device_error(what: &str, error: impl std::fmt::Display) -> EngineError {
    EngineError::Device(format!("{what}: {error}"))
}

/// Why CUDA cannot be used here, or `Ok` when a device and every library it needs are found.
/// Checked before the first CUDA call, since cudarc panics on a missing library.
pub fn probe() -> std::result::Result<(), String> {
    // SAFETY: each check only tries to dlopen the library; none calls into it.
    let missing = unsafe {
        [
            (
                "libcuda (the NVIDIA driver)",
                cudarc::driver::sys::is_culib_present(),
            ),
            ("libnvrtc", cudarc::nvrtc::sys::is_culib_present()),
            ("libcublas", cudarc::cublas::sys::is_culib_present()),
        ]
    };
    let missing: Vec<&str> = missing
        .iter()
        .filter(|(_, present)| !present)
        .map(|(name, _)| *name)
        .collect();
    if !missing.is_empty() {
        return Err(format!("{} not found", missing.join(", ")));
    }
    match CudaContext::device_count() {
        Ok(0) => Err("the driver sees no CUDA device".into()),
        Ok(_) => Ok(()),
        Err(e) => Err(format!("the driver did not start: {e}")),
    }
}

/// One GPU: its stream, cuBLAS handle and kernels.
pub struct CudaBackend {
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    kernels: Kernels,
    device_name: String,
    /// Tells whether another process's KV stores are on this same GPU.
    device_uuid: [u8; 16],
    /// The kernels were built for sm_90a: the MoE GEMMs and prefill attention's scores run on
    /// warpgroup instructions.
    hopper: bool,
    /// Kernels launch while the previous one drains (programmatic dependent launch).
    dependent_launch: bool,
    /// Kernels launched twice, to measure their cost in the stream (`TANDEM_CUDA_REPEAT`).
    repeated: Vec<Kernel>,
    /// The kernels launched since the timeline was last read, in order
    /// (`TANDEM_CUDA_TIMELINE=1`).
    timeline: Option<Mutex<Vec<&'static str>>>,
    /// Streaming multiprocessors: how many blocks one wave of a launch runs.
    multiprocessors: usize,
    reused_i32: ReusedUploads<i32>,
    reused_f32: ReusedUploads<f32>,
    reused_u64: ReusedUploads<u64>,
    /// While profiling: calls and seconds per operation, each timed between two stream
    /// synchronizations (so profiling slows the run down).
    profile: Mutex<Option<BTreeMap<&'static str, (u64, f64)>>>,
    /// Nanoseconds the host waited in copies back from the device (`read_back`).
    host_wait_ns: AtomicU64,
    /// When the backend was made: the clock `idle_since_ns` counts from.
    started: Instant,
    /// Nanoseconds since `started` at which the last copy back to the host left the stream
    /// empty (0: a kernel has been launched since), and the idle nanoseconds summed.
    idle_since_ns: AtomicU64,
    idle_ns: AtomicU64,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend")
            .field("device", &self.device_name)
            .finish_non_exhaustive()
    }
}

/// Row-major f32 activations on the device.
pub struct CudaTensor {
    pub rows: usize,
    pub cols: usize,
    /// Changed in place only through [`CudaTensor::values_mut`], which drops `bf16`.
    data: CudaSlice<f32>,
    /// The same values rounded to bf16, where the kernel that wrote them made that copy for
    /// the GEMMs reading them next (a norm's output, see `CudaBackend::gemm_input_buffer`).
    bf16: Option<CudaSlice<u16>>,
}

impl CudaTensor {
    /// The values to change in place; a bf16 copy of the old ones would be stale.
    fn values_mut(&mut self) -> &mut CudaSlice<f32> {
        self.bf16 = None;
        &mut self.data
    }
}

/// A bf16 weight matrix `[out, in]`, row-major as the checkpoint stores it.
pub struct CudaMatrix {
    pub out_dim: usize,
    pub in_dim: usize,
    data: CudaSlice<u16>,
}

/// An f32 vector on the device.
pub struct CudaVector {
    len: usize,
    data: CudaSlice<f32>,
}

/// One layer's K and V in bf16, `[slot, kv_head, head_dim]`.
pub struct CudaKvStore {
    spec: KvSpec,
    k: CudaSlice<u16>,
    v: CudaSlice<u16>,
}

impl CudaKvStore {
    fn width(&self) -> usize {
        self.spec.num_kv_heads * self.spec.head_dim
    }
}

fn shape_error(op: &str, detail: String) -> EngineError {
    EngineError::InvalidRequest(format!("{op}: {detail}"))
}

/// A rotary table on the device: a position a row and head_dim / 2 frequencies.
struct RopeInputs {
    positions: Arc<CudaSlice<i32>>,
    inv_freq: Arc<CudaSlice<f32>>,
}

/// The array of results, or the first error.
fn collect_array<T, const N: usize>(items: [Result<T>; N]) -> Result<[T; N]> {
    let items = items.into_iter().collect::<Result<Vec<T>>>()?;
    items
        .try_into()
        .map_err(|_| EngineError::Device("an array changed length".into()))
}

fn blocks(n: usize, per_block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((n as u32).div_ceil(per_block), 1, 1),
        block_dim: (per_block, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn per_row(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (ROW_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn slots_i32(slots: &[usize]) -> Vec<i32> {
    slots.iter().map(|&s| s as i32).collect()
}

/// GPUs the driver sees.
pub(crate) fn cuda_device_count() -> Result<usize> {
    probe().map_err(|reason| EngineError::DeviceUnavailable {
        device: "cuda".into(),
        reason,
    })?;
    CudaContext::device_count()
        .map(|n| n.max(0) as usize)
        .map_err(|e| device_error("counting devices", e))
}

impl CudaBackend {
    /// Opens device `ordinal` and compiles the kernels for it. Call [`probe`] first.
    pub fn new(ordinal: usize) -> Result<Self> {
        probe().map_err(|reason| EngineError::DeviceUnavailable {
            device: "cuda".into(),
            reason,
        })?;
        let ctx = CudaContext::new(ordinal).map_err(|e| device_error("opening the device", e))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| device_error("reading the compute capability", e))?;
        // SAFETY: the backend uses one stream, so cudarc's per-buffer events (created with every
        // allocation, recorded with every launch) order nothing and only cost time.
        unsafe { ctx.disable_event_tracking() };
        memory::keep_freed_memory(&ctx)?;
        let multiprocessors = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| device_error("reading the multiprocessor count", e))?
            .max(1) as usize;
        let device_name = ctx.name().unwrap_or_else(|_| "cuda".into());
        let device_uuid = ctx
            .uuid()
            .map_err(|e| device_error("reading the device's uuid", e))?
            .bytes
            .map(|b| b as u8);
        // A stream of its own: programmatic dependent launch is a property of ordinary
        // streams (the legacy default stream also orders against every other stream).
        let stream = ctx
            .new_stream()
            .map_err(|e| device_error("creating a stream", e))?;
        let kernels = Kernels::load(&ctx, (major, minor))?;
        let blas = CudaBlas::new(Arc::clone(&stream)).map_err(|e| device_error("cublas", e))?;
        Ok(Self {
            stream,
            blas,
            kernels,
            device_name,
            device_uuid,
            hopper: (major, minor) == HOPPER,
            dependent_launch: launch::dependent_launch_enabled((major, minor)),
            repeated: launch::repeated_kernels()?,
            timeline: timeline::timeline_enabled()?.then(Mutex::default),
            multiprocessors,
            reused_i32: ReusedUploads::default(),
            reused_f32: ReusedUploads::default(),
            reused_u64: ReusedUploads::default(),
            profile: Mutex::new(None),
            host_wait_ns: AtomicU64::new(0),
            started: Instant::now(),
            idle_since_ns: AtomicU64::new(0),
            idle_ns: AtomicU64::new(0),
        })
    }

    /// The GPU's name, as the driver gives it.
    pub fn device_name(&self) -> &str {
        &self.device_name
    }

    /// Waits for every queued kernel (for timing).
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| device_error("synchronizing", e))
    }

    fn function(&self, kernel: Kernel) -> &CudaFunction {
        self.kernels.get(kernel)
    }

    /// A launch of `kernel` on the backend's stream, its arguments still to add.
    fn launch(&self, kernel: Kernel) -> Launch<'_> {
        Launch::new(self, kernel)
    }

    /// `out[rows[i], :] += weights[i] · y[i, :]`.
    fn scatter_add_weighted(
        &self,
        out: &mut CudaTensor,
        y: &CudaTensor,
        rows: &CudaView<'_, i32>,
        weights: &CudaView<'_, f32>,
    ) -> Result<()> {
        if y.rows == 0 {
            return Ok(());
        }
        let cols = out.cols as i32;
        let mut launch = self.launch(Kernel::ScatterAddWeighted);
        launch
            .arg(out.values_mut())
            .arg(&y.data)
            .arg(rows)
            .arg(weights)
            .arg(&cols);
        // SAFETY: one block per row of y; rows and weights hold y.rows entries and every row
        // index is below out.rows (the caller's tokens).
        unsafe { launch.launch(per_row(y.rows)) }
    }

    fn gather(&self, x: &CudaTensor, rows: &CudaView<'_, i32>, n: usize) -> Result<CudaTensor> {
        let mut out = self.output(n, x.cols)?;
        if n == 0 {
            return Ok(out);
        }
        let cols = x.cols as i32;
        let mut launch = self.launch(Kernel::GatherRows);
        launch.arg(&x.data).arg(rows).arg(&mut out.data).arg(&cols);
        // SAFETY: one block per output row; rows holds n indices below x.rows.
        unsafe { launch.launch(per_row(n)) }?;
        Ok(out)
    }

    fn store_rows(
        &self,
        store: &mut CudaSlice<u16>,
        src: &CudaSlice<f32>,
        slots: &CudaSlice<i32>,
        rows: usize,
        width: usize,
    ) -> Result<()> {
        if rows == 0 {
            return Ok(());
        }
        let width = width as i32;
        let mut launch = self.launch(Kernel::StoreRows);
        launch.arg(store).arg(src).arg(slots).arg(&width);
        // SAFETY: one block per row; every slot was checked against the store's capacity
        // and src holds rows · width values.
        unsafe { launch.launch(per_row(rows)) }
    }

    /// The rotary table's positions and frequencies on the device (the angles' cos and sin
    /// are computed there: only positions travel).
    fn rope_inputs(&self, table: &RopeTable) -> Result<RopeInputs> {
        let positions: Vec<i32> = table.positions.iter().map(|&p| p as i32).collect();
        Ok(RopeInputs {
            positions: self.upload_reused(&self.reused_i32, ("rope.positions", 0), &positions)?,
            inv_freq: self.upload_reused(
                &self.reused_f32,
                ("rope.inv_freq", 0),
                &table.inv_freq,
            )?,
        })
    }

    fn checked_slots(
        &self,
        store: &CudaKvStore,
        slots: &[usize],
        op: &'static str,
    ) -> Result<Arc<CudaSlice<i32>>> {
        let capacity = store.spec.num_blocks * store.spec.block_size;
        if let Some(bad) = slots.iter().find(|&&s| s >= capacity) {
            return Err(shape_error(
                op,
                format!("slot {bad} is outside the cache of {capacity}"),
            ));
        }
        self.upload_reused(&self.reused_i32, (op, 0), &slots_i32(slots))
    }

    fn load_rows(
        &self,
        store: &CudaSlice<u16>,
        slots: &CudaSlice<i32>,
        rows: usize,
        width: usize,
    ) -> Result<Vec<f32>> {
        if rows > 0 {
            let mut out = self.uninit::<f32>(rows * width)?;
            let w = width as i32;
            let mut launch = self.launch(Kernel::LoadRows);
            launch.arg(store).arg(slots).arg(&mut out).arg(&w);
            // SAFETY: one block per row; slots were checked against the store's capacity and
            // out holds rows · width values.
            unsafe { launch.launch(per_row(rows)) }?;
            let mut host = self.read_back(&out)?;
            host.truncate(rows * width);
            return Ok(host);
        }
        Ok(Vec::new())
    }
}

impl Backend for CudaBackend {
    type Tensor = CudaTensor;
    type Matrix = CudaMatrix;
    type Vector = CudaVector;
    type KvStore = CudaKvStore;
    type ExpertCounters = CudaExpertCounters;
    type PeerKv = CudaPeerKv;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn expert_counters(&self, experts: usize) -> Result<CudaExpertCounters> {
        self.new_expert_counters(experts)
    }

    fn count_experts(&self, counters: &CudaExpertCounters, expert_ids: &[usize]) {
        Self::add_host_counts(counters, expert_ids);
    }

    fn read_expert_counters(&self, counters: &CudaExpertCounters) -> Result<Vec<u64>> {
        self.read_counters(counters)
    }

    fn matrix(&self, host: HostTensor) -> Result<CudaMatrix> {
        let [out_dim, in_dim] = host.shape[..] else {
            return Err(shape_error(
                "matrix",
                format!("shape {:?} is not 2-D", host.shape),
            ));
        };
        // Round to nearest even, as torch converts; on every core (a model's load was
        // mostly this loop and the checkpoint's widening).
        let bits: Vec<u16> = host
            .data
            .par_iter()
            .with_min_len(PARALLEL_MIN_VALUES)
            .map(|&x| half::bf16::from_f32(x).to_bits())
            .collect();
        Ok(CudaMatrix {
            out_dim,
            in_dim,
            data: self.upload(&bits)?,
        })
    }

    fn vector(&self, host: Vec<f32>) -> Result<CudaVector> {
        Ok(CudaVector {
            len: host.len(),
            data: self.upload(&host)?,
        })
    }

    fn kv_store(&self, spec: &KvSpec) -> Result<CudaKvStore> {
        let n = spec.num_blocks * spec.block_size * spec.num_kv_heads * spec.head_dim;
        Ok(CudaKvStore {
            spec: *spec,
            k: self.shareable_zeros(n)?,
            v: self.shareable_zeros(n)?,
        })
    }

    fn shareable_device(&self) -> Option<[u8; 16]> {
        Some(self.device_uuid)
    }

    fn share_kv(&self, store: &CudaKvStore) -> Result<Vec<u8>> {
        self.share_store(store)
    }

    fn open_peer_kv(&self, handle: &[u8]) -> Result<CudaPeerKv> {
        self.open_peer_store(handle)
    }

    fn write_peer_kv(
        &self,
        store: &CudaKvStore,
        slots: &[usize],
        peer: &CudaPeerKv,
        peer_slots: &[usize],
    ) -> Result<()> {
        self.write_peer_store(store, slots, peer, peer_slots)
    }

    fn synchronize(&self) -> Result<()> {
        CudaBackend::synchronize(self)
    }

    fn embed(&self, table: &CudaMatrix, ids: &[u32]) -> Result<CudaTensor> {
        let _timer = self.timed("embed");
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= table.out_dim) {
            return Err(shape_error(
                "embed",
                format!("token {bad} of {}", table.out_dim),
            ));
        }
        let mut out = self.output(ids.len(), table.in_dim)?;
        if ids.is_empty() {
            return Ok(out);
        }
        let ids = self.upload(ids)?;
        let cols = table.in_dim as i32;
        let mut launch = self.launch(Kernel::Embed);
        launch
            .arg(&table.data)
            .arg(&ids)
            .arg(&mut out.data)
            .arg(&cols);
        // SAFETY: one block per id, each checked below the table's rows.
        unsafe { launch.launch(per_row(out.rows)) }?;
        Ok(out)
    }

    fn rms_norm(&self, x: &CudaTensor, weight: &CudaVector, eps: f32) -> Result<CudaTensor> {
        let _timer = self.timed("rms_norm");
        let len = weight.len;
        if len == 0 || !x.cols.is_multiple_of(len) {
            return Err(shape_error(
                "rms_norm",
                format!("{} columns in runs of {len}", x.cols),
            ));
        }
        let mut out = self.output(x.rows, x.cols)?;
        let runs = x.rows * x.cols / len;
        if runs == 0 {
            return Ok(out);
        }
        let len_i = len as i32;
        let runs_i = runs as i32;
        let mut out16 = None;
        let mut launch;
        let config = if len <= RMS_NORM_SHORT_RUN {
            launch = self.launch(Kernel::RmsNormShort);
            launch.arg(&x.data).arg(&weight.data).arg(&mut out.data);
            launch.arg(&len_i).arg(&eps).arg(&runs_i);
            blocks(runs * WARP as usize, ROW_THREADS)
        } else {
            // Whole rows (not heads) feed projections: their bf16 copy too, where GEMMs read it.
            out16 = match len == x.cols {
                true => self.gemm_input_buffer(x.rows, x.cols)?,
                false => None,
            };
            launch = self.launch(Kernel::RmsNorm);
            launch.arg(&x.data).arg(&weight.data).arg(&mut out.data);
            launch.arg(out16.as_mut()).arg(&len_i).arg(&eps);
            per_row(runs)
        };
        // SAFETY: one block (or warp, for short runs, those past `runs` returning) per run of
        // len values; x and out (and out16 where given) hold runs · len values.
        unsafe { launch.launch(config) }?;
        out.bf16 = out16;
        Ok(out)
    }

    fn linear(
        &self,
        x: &CudaTensor,
        w: &CudaMatrix,
        bias: Option<&CudaVector>,
    ) -> Result<CudaTensor> {
        let _timer = self.timed("linear");
        let input = self.projection_input(x)?;
        let [y] = self.linear_many(&input, [(w, bias)])?;
        Ok(y)
    }

    fn linear_qkv(
        &self,
        x: &CudaTensor,
        projections: [(&CudaMatrix, Option<&CudaVector>); 3],
    ) -> Result<[CudaTensor; 3]> {
        let _timer = self.timed("linear");
        // At most one conversion of x (or one matrix-vector launch) for the three.
        let input = self.projection_input(x)?;
        self.linear_many(&input, projections)
    }

    fn add_assign(&self, acc: &mut CudaTensor, x: &CudaTensor) -> Result<()> {
        let _timer = self.timed("add_assign");
        if (acc.rows, acc.cols) != (x.rows, x.cols) {
            return Err(shape_error("add_assign", "shapes differ".into()));
        }
        let n = acc.rows * acc.cols;
        if n == 0 {
            return Ok(());
        }
        let n_i = n as i32;
        let mut launch = self.launch(Kernel::AddAssign);
        launch.arg(acc.values_mut()).arg(&x.data).arg(&n_i);
        // SAFETY: both hold n values.
        unsafe { launch.launch(blocks(n, ELEMENT_THREADS)) }
    }

    fn add_rms_norm(
        &self,
        h: &mut CudaTensor,
        delta: &CudaTensor,
        weight: &CudaVector,
        eps: f32,
    ) -> Result<CudaTensor> {
        if weight.len != h.cols || (h.rows, h.cols) != (delta.rows, delta.cols) || h.rows == 0 {
            // Per-head runs, or shapes the separate calls will name in their errors.
            self.add_assign(h, delta)?;
            return self.rms_norm(h, weight, eps);
        }
        let _timer = self.timed("add_rms_norm");
        let mut out = self.output(h.rows, h.cols)?;
        let mut out16 = self.gemm_input_buffer(h.rows, h.cols)?;
        let len = h.cols as i32;
        let mut launch = self.launch(Kernel::AddRmsNorm);
        launch
            .arg(h.values_mut())
            .arg(&delta.data)
            .arg(&weight.data)
            .arg(&mut out.data)
            .arg(out16.as_mut())
            .arg(&len)
            .arg(&eps);
        // SAFETY: one block per row of len values; h, delta and out (and out16 where given)
        // hold rows · len values, the weight len.
        unsafe { launch.launch(per_row(h.rows)) }?;
        out.bf16 = out16;
        Ok(out)
    }

    fn scale_rows(&self, x: &mut CudaTensor, scales: &[f32]) -> Result<()> {
        let _timer = self.timed("scale_rows");
        if scales.len() != x.rows {
            return Err(shape_error(
                "scale_rows",
                format!("{} scales for {} rows", scales.len(), x.rows),
            ));
        }
        if x.rows == 0 {
            return Ok(());
        }
        let scales = self.upload(scales)?;
        let cols = x.cols as i32;
        let mut launch = self.launch(Kernel::ScaleRows);
        launch.arg(x.values_mut()).arg(&scales).arg(&cols);
        // SAFETY: one block per row; scales holds x.rows values.
        unsafe { launch.launch(per_row(x.rows)) }
    }

    fn swiglu(&self, gate_up: &CudaTensor) -> Result<CudaTensor> {
        let _timer = self.timed("swiglu");
        let inter = gate_up.cols / 2;
        let mut out = self.output(gate_up.rows, inter)?;
        if gate_up.rows == 0 {
            return Ok(out);
        }
        let inter_i = inter as i32;
        let mut launch = self.launch(Kernel::Swiglu);
        launch.arg(&gate_up.data).arg(&mut out.data).arg(&inter_i);
        // SAFETY: one block per row; gate_up rows hold 2 · inter values, out rows inter.
        unsafe { launch.launch(per_row(out.rows)) }?;
        Ok(out)
    }

    fn rope(&self, x: &mut CudaTensor, table: &RopeTable) -> Result<()> {
        let _timer = self.timed("rope");
        let head_dim = table.head_dim;
        if table.rows() != x.rows || head_dim == 0 || !x.cols.is_multiple_of(head_dim) {
            return Err(shape_error(
                "rope",
                format!(
                    "{} rows of {} for a table of {} rows of head_dim {head_dim}",
                    x.rows,
                    x.cols,
                    table.rows()
                ),
            ));
        }
        if x.rows == 0 {
            return Ok(());
        }
        if head_dim > MAX_HEAD_DIM {
            return Err(shape_error(
                "rope",
                format!("head_dim {head_dim} is over {MAX_HEAD_DIM}"),
            ));
        }
        let rope = self.rope_inputs(table)?;
        let heads = (x.cols / head_dim) as i32;
        let head_dim = head_dim as i32;
        let mut launch = self.launch(Kernel::Rope);
        launch
            .arg(x.values_mut())
            .arg(rope.positions.as_ref())
            .arg(rope.inv_freq.as_ref())
            .arg(&heads)
            .arg(&head_dim);
        let config = LaunchConfig {
            grid_dim: (
                x.rows as u32,
                (heads as u32).div_ceil(ROPE_HEADS_PER_BLOCK),
                1,
            ),
            ..per_row(x.rows)
        };
        // SAFETY: one block per (row, group of ROPE_HEADS_PER_BLOCK heads); positions holds
        // one value a row, inv_freq head_dim / 2, at most MAX_HEAD_DIM / 2 (the kernel's
        // shared tables).
        unsafe { launch.launch(config) }
    }

    fn write_kv(
        &self,
        store: &mut CudaKvStore,
        k: &CudaTensor,
        v: &CudaTensor,
        slots: &[usize],
    ) -> Result<()> {
        let _timer = self.timed("write_kv");
        let width = store.width();
        if k.rows != slots.len() || v.rows != slots.len() || k.cols != width || v.cols != width {
            return Err(shape_error(
                "write_kv",
                format!("{} slots of width {width}", slots.len()),
            ));
        }
        let slots_dev = self.checked_slots(store, slots, "write_kv")?;
        self.store_rows(&mut store.k, &k.data, &slots_dev, slots.len(), width)?;
        self.store_rows(&mut store.v, &v.data, &slots_dev, slots.len(), width)
    }

    fn attention_inputs(
        &self,
        qkv: [CudaTensor; 3],
        heads: &HeadTransforms<'_, CudaVector>,
        store: &mut CudaKvStore,
        slots: &[usize],
    ) -> Result<CudaTensor> {
        self.attention_inputs_fused(qkv, heads, store, slots)
    }

    fn read_kv(&self, store: &CudaKvStore, slots: &[usize]) -> Result<KvRows> {
        let _timer = self.timed("read_kv");
        let width = store.width();
        let slots_dev = self.checked_slots(store, slots, "read_kv")?;
        Ok(KvRows {
            k: self.load_rows(&store.k, &slots_dev, slots.len(), width)?,
            v: self.load_rows(&store.v, &slots_dev, slots.len(), width)?,
        })
    }

    fn load_kv(&self, store: &mut CudaKvStore, rows: &KvRows, slots: &[usize]) -> Result<()> {
        let _timer = self.timed("load_kv");
        let width = store.width();
        if rows.k.len() != slots.len() * width || rows.v.len() != rows.k.len() {
            return Err(shape_error(
                "load_kv",
                format!(
                    "{} k and {} v values for {} slots of width {width}",
                    rows.k.len(),
                    rows.v.len(),
                    slots.len()
                ),
            ));
        }
        let slots_dev = self.checked_slots(store, slots, "load_kv")?;
        let k = self.upload(&rows.k)?;
        let v = self.upload(&rows.v)?;
        self.store_rows(&mut store.k, &k, &slots_dev, slots.len(), width)?;
        self.store_rows(&mut store.v, &v, &slots_dev, slots.len(), width)
    }

    fn attention(
        &self,
        q: &CudaTensor,
        store: &CudaKvStore,
        batch: &AttentionBatch<'_>,
    ) -> Result<CudaTensor> {
        self.paged_attention(q, store, batch)
    }

    fn moe_experts(
        &self,
        x: &CudaTensor,
        routing: &Routing,
        experts: &[ExpertWeights<Self>],
    ) -> Result<CudaTensor> {
        let _timer = self.timed("moe_experts");
        self.moe_host_routed(x, routing, experts)
    }

    fn moe_routed(
        &self,
        x: &CudaTensor,
        router: &CudaMatrix,
        rule: &RouteRule,
        experts: &[ExpertWeights<Self>],
        counters: &CudaExpertCounters,
    ) -> Result<CudaTensor> {
        self.moe_routed_on_device(x, router, rule, experts, counters, None)
    }

    fn moe_routed_add_rms_norm(
        &self,
        x: &CudaTensor,
        router: &CudaMatrix,
        rule: &RouteRule,
        experts: &[ExpertWeights<Self>],
        counters: &CudaExpertCounters,
        norm: ResidualNorm<'_, Self>,
    ) -> Result<CudaTensor> {
        self.moe_routed_on_device(x, router, rule, experts, counters, Some(norm))
    }

    fn select_rows(&self, x: &CudaTensor, rows: &[usize]) -> Result<CudaTensor> {
        let _timer = self.timed("select_rows");
        if let Some(bad) = rows.iter().find(|&&r| r >= x.rows) {
            return Err(shape_error(
                "select_rows",
                format!("row {bad} of {}", x.rows),
            ));
        }
        let indices = self.upload(&slots_i32(rows))?;
        self.gather(x, &indices.as_view(), rows.len())
    }

    fn greedy(&self, logits: &CudaTensor, vocab: usize) -> Result<Vec<(u32, f32)>> {
        self.greedy_on_device(logits, vocab)
    }

    fn scatter_add_rows(&self, acc: &mut CudaTensor, x: &CudaTensor, rows: &[usize]) -> Result<()> {
        let _timer = self.timed("scatter_add_rows");
        check_scatter_rows((acc.rows, acc.cols), (x.rows, x.cols), rows)
            .map_err(|detail| shape_error("scatter_add_rows", detail))?;
        let indices = self.upload(&slots_i32(rows))?;
        let ones = self.upload(&vec![1.0f32; rows.len()])?;
        self.scatter_add_weighted(acc, x, &indices.as_view(), &ones.as_view())
    }

    fn shape(&self, x: &CudaTensor) -> (usize, usize) {
        (x.rows, x.cols)
    }

    fn upload_tensor(&self, rows: usize, cols: usize, data: Vec<f32>) -> Result<CudaTensor> {
        if data.len() != rows * cols {
            return Err(shape_error(
                "upload_tensor",
                format!("{} values for [{rows}, {cols}]", data.len()),
            ));
        }
        Ok(CudaTensor {
            rows,
            cols,
            data: self.upload(&data)?,
            bf16: None,
        })
    }

    /// NCCL when every rank has its own GPU and libnccl loads; otherwise (NCCL cannot put two
    /// ranks on one GPU) the host collective.
    fn group_collectives(
        backends: &[Self],
        timeout: std::time::Duration,
    ) -> Result<Vec<Box<dyn Collective<Self>>>> {
        let mut ordinals: Vec<usize> = backends
            .iter()
            .map(|b| b.stream.context().ordinal())
            .collect();
        ordinals.sort_unstable();
        ordinals.dedup();
        if ordinals.len() == backends.len() && nccl_probe().is_ok() {
            return Ok(NcclCollective::group(backends)?
                .into_iter()
                .map(|c| Box::new(c) as Box<dyn Collective<Self>>)
                .collect());
        }
        Ok(host_collectives(backends.len(), timeout))
    }

    fn to_host(&self, x: &CudaTensor) -> Result<Vec<f32>> {
        let _timer = self.timed("to_host");
        let mut host = self.read_back(&x.data)?;
        host.truncate(x.rows * x.cols);
        Ok(host)
    }
}

#[cfg(test)]
mod tests {
    use super::kernels::tests::assert_host_constants;
    use super::*;

    #[test]
    fn rope_and_head_limits_match_the_kernels() {
        assert_host_constants(&[
            ("ROPE_HEADS_PER_BLOCK", ROPE_HEADS_PER_BLOCK as usize),
            ("MAX_PER_LANE * 32", MAX_HEAD_DIM),
        ]);
    }
}

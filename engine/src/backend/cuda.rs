//! CUDA backend through cudarc, loading libcuda, libnvrtc and libcublas at run time so the
//! workspace builds and runs where they are absent. Activations are f32 on the device; weights
//! and the KV cache are bf16. Dense projections are cuBLAS GEMMs (bf16 inputs, f32 accumulate
//! and output); everything else is the CUDA C in `kernels.cu`, compiled once per process with
//! NVRTC for the device's architecture: MoE routed and grouped on the device (`moe`), its
//! experts as grouped tensor-core GEMMs, and tensor-core attention for prefill and for decode
//! of grouped-query heads.
//!
//! This is the only module of the engine that uses cudarc, and the only one with `unsafe`
//! beyond the CPU backend's gemm call and the checkpoint mmap: kernel launches and the raw
//! cuBLAS GEMM, each with its safety argument.
#![allow(unsafe_code)]

use std::collections::{BTreeMap, HashMap};
use std::ffi::c_void;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Instant;

use cudarc::cublas::{CudaBlas, sys as blas};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, CudaView, DevicePtr, DevicePtrMut,
    LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::{CompileOptions, Ptx};

use crate::backend::{
    AttentionBatch, Backend, HeadTransforms, KvRows, KvSpec, RopeTable, RouteRule, Routing,
    attention_inputs_stepwise, check_scatter_rows,
};
use crate::checkpoint::HostTensor;
use crate::error::{EngineError, Result};
use crate::parallel::Collective;
use crate::parallel::host::host_collectives;
use crate::weights::ExpertWeights;

mod moe;
mod nccl;
mod peer;

pub use moe::CudaExpertCounters;
pub use nccl::{NCCL_ID_BYTES, NcclCollective, nccl_probe, nccl_unique_id};
pub use peer::CudaPeerKv;

/// The kernels' CUDA C source.
pub const KERNELS_SOURCE: &str = include_str!("cuda/kernels.cu");

/// Every kernel `kernels.cu` defines.
pub const KERNEL_NAMES: [&str; 38] = [
    "embed",
    "rms_norm",
    "rms_norm_short",
    "add_assign",
    "add_bias",
    "scale_rows",
    "swiglu",
    "rope",
    "store_rows",
    "load_rows",
    "copy_kv_rows",
    "to_bf16",
    "gather_rows",
    "scatter_add_weighted",
    "attention_split",
    "attention_combine",
    "attention_prefill",
    "attention_prefill_mma",
    "attention_prefill_mma_hd128",
    "attention_prefill_wgmma_hd128",
    "attention_decode_mma",
    "attention_decode_mma_hd128",
    "greedy_partial",
    "greedy_combine",
    "moe_route",
    "moe_offsets",
    "moe_route_place",
    "moe_place",
    "moe_gate_up",
    "moe_down",
    "moe_gemm_gate_up",
    "moe_gemm_down",
    "moe_wgmma_gate_up",
    "moe_wgmma_down",
    "moe_combine",
    "gemv_rows",
    "add_rms_norm",
    "attention_inputs",
];

/// Threads per block of the row-wise kernels.
const ROW_THREADS: u32 = 256;
/// Logits one block of `greedy_partial` takes: a row's vocabulary is spread over many blocks
/// (a single block per row waited on its loads for ~0.3 ms at a 152k vocabulary).
const GREEDY_PART_LEN: usize = 4096;
/// Threads per block of the element-wise kernels.
const ELEMENT_THREADS: u32 = 256;
/// Split attention runs one warp per (query row, head, split).
const WARP: u32 = 32;
/// Heads one block of `rope` rotates (its kernel's `ROPE_HEADS_PER_BLOCK`): a decode step's
/// one row spreads over several blocks.
const ROPE_HEADS_PER_BLOCK: u32 = 8;
/// Rows of x up to which projections run as matrix-vector products (`gemv_rows`).
const GEMV_MAX_ROWS: usize = 4;
/// Weights one `gemv_rows` launch multiplies x by.
const GEMV_MAX_WEIGHTS: usize = 3;
/// Runs of at most this many values (a head's q or k) are normalized a warp each.
const RMS_NORM_SHORT_RUN: usize = 256;
/// The split attention kernel holds at most 8 values of a head per lane.
const MAX_HEAD_DIM: usize = 256;
/// Keys per split of `attention_split` (`SPLIT_KEYS` in kernels.cu).
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
const FLASH_SHARED_BYTES: usize = 2 * 2 * DECODE_KEYS * (FLASH_MAX_HEAD_DIM + 8) * 2;
/// `attention_prefill_wgmma_hd128` (sm_90a): `FLASH_WGMMA_Q_TILE` rows a block, 8 warps; 1 KB
/// of alignment, the swizzled query tile, then two stages of swizzled keys and values.
const FLASH_WGMMA_Q_TILE: usize = 128;
const FLASH_WGMMA_THREADS: u32 = 256;
const FLASH_WGMMA_SHARED_BYTES: usize =
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
    name: &'static str,
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
    let mma = |name| PrefillKernel {
        name,
        q_tile: FLASH_Q_TILE,
        threads: FLASH_THREADS,
        shared_bytes: FLASH_SHARED_BYTES,
        log2_scaled: true,
    };
    match head_dim {
        FIXED_HEAD_DIM if hopper => PrefillKernel {
            name: "attention_prefill_wgmma_hd128",
            q_tile: FLASH_WGMMA_Q_TILE,
            threads: FLASH_WGMMA_THREADS,
            shared_bytes: FLASH_WGMMA_SHARED_BYTES,
            log2_scaled: true,
        },
        FIXED_HEAD_DIM => mma("attention_prefill_mma_hd128"),
        d if d.is_multiple_of(16) && d <= FLASH_MAX_HEAD_DIM => mma("attention_prefill_mma"),
        _ => PrefillKernel {
            name: "attention_prefill",
            q_tile: PREFILL_Q_TILE,
            threads: PREFILL_THREADS,
            shared_bytes: 0,
            log2_scaled: false,
        },
    }
}

/// The grouped-query decode kernel for `head_dim`.
fn decode_kernel(head_dim: usize) -> &'static str {
    if head_dim == FIXED_HEAD_DIM {
        "attention_decode_mma_hd128"
    } else {
        "attention_decode_mma"
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

fn device_error(what: &str, error: impl std::fmt::Display) -> EngineError {
    EngineError::Device(format!("{what}: {error}"))
}

/// A launch's outcome (it records no events: everything runs on one stream).
fn launched<T>(
    result: std::result::Result<T, cudarc::driver::DriverError>,
    kernel: &str,
) -> Result<()> {
    result.map(drop).map_err(|e| device_error(kernel, e))
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

/// The compute capability whose kernels compile as `sm_90a`.
const HOPPER: (i32, i32) = (9, 0);

/// The architecture the kernels are compiled for on a device of this compute capability:
/// Hopper's own (`sm_90a`), whose warpgroup instructions other devices lack, else the
/// family's.
fn kernel_arch(major: i32, minor: i32) -> String {
    if (major, minor) == HOPPER {
        "sm_90a".into()
    } else {
        format!("sm_{major}{minor}")
    }
}

/// Compiles the kernels for `arch` (`sm_90`, `sm_90a`, …) to PTX. Needs libnvrtc, not a GPU.
pub fn compile_kernels(arch: &'static str) -> Result<String> {
    // SAFETY: only tries to dlopen libnvrtc.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(EngineError::DeviceUnavailable {
            device: "cuda".into(),
            reason: "libnvrtc not found".into(),
        });
    }
    let options = CompileOptions {
        arch: Some(arch),
        name: Some("tandem_kernels.cu".into()),
        ..CompileOptions::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(KERNELS_SOURCE, options)
        .map_err(|e| device_error("compiling kernels.cu", e))?;
    Ok(ptx.to_src())
}

/// PTX by architecture, compiled once per process.
fn cached_ptx(arch: &str) -> Result<Ptx> {
    static CACHE: OnceLock<Mutex<HashMap<String, String>>> = OnceLock::new();
    let mut cache = CACHE
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if let Some(src) = cache.get(arch) {
        return Ok(Ptx::from_src(src.clone()));
    }
    // NVRTC takes the architecture as a 'static str; there are only a few, each leaked once.
    let arch_static: &'static str = Box::leak(arch.to_owned().into_boxed_str());
    let src = compile_kernels(arch_static)?;
    cache.insert(arch.to_owned(), src.clone());
    Ok(Ptx::from_src(src))
}

struct Kernels {
    functions: HashMap<&'static str, CudaFunction>,
}

impl Kernels {
    fn get(&self, name: &str) -> &CudaFunction {
        &self.functions[name]
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
    reused_i32: ReusedUploads<i32>,
    reused_f32: ReusedUploads<f32>,
    reused_u64: ReusedUploads<u64>,
    /// While profiling: calls and seconds per operation, each timed between two stream
    /// synchronizations (so profiling slows the run down).
    profile: Mutex<Option<BTreeMap<&'static str, (u64, f64)>>>,
}

/// The last upload made for each purpose, used again while the host values are the same:
/// every layer of a forward pass uploads the same rope table, cache slots and attention
/// metadata, and every step the same expert table per layer. Small synchronous copies, ten a
/// layer, were a large share of a small batch's step. Kernels only read these buffers.
struct ReusedUploads<T> {
    last: Mutex<HashMap<UploadKey, Uploaded<T>>>,
}

/// Values on the host and the device copy made of them.
struct Uploaded<T> {
    host: Vec<T>,
    device: Arc<CudaSlice<T>>,
}

/// A purpose and a discriminator (0, or what tells apart the layers of one purpose).
type UploadKey = (&'static str, u64);

impl<T> Default for ReusedUploads<T> {
    fn default() -> Self {
        Self {
            last: Mutex::new(HashMap::new()),
        }
    }
}

/// Times one operation for the profile when dropped.
struct OpTimer<'a> {
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
    data: CudaSlice<f32>,
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

/// A projection's input as the kernels read it (see `CudaBackend::projection_input`).
enum ProjectionInput<'a> {
    /// Few rows, read as f32 by `gemv_rows`.
    Rows(&'a CudaTensor),
    /// `rows` rows of `cols` values converted to bf16 for the GEMMs.
    Bf16 {
        x16: CudaSlice<u16>,
        rows: usize,
        cols: usize,
    },
}

impl ProjectionInput<'_> {
    /// Values a row.
    fn cols(&self) -> usize {
        match self {
            Self::Rows(x) => x.cols,
            Self::Bf16 { cols, .. } => *cols,
        }
    }

    /// The bf16 copy, where one was made.
    fn into_bf16(self) -> Option<CudaSlice<u16>> {
        match self {
            Self::Bf16 { x16, .. } => Some(x16),
            Self::Rows(_) => None,
        }
    }
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
        let device_name = ctx.name().unwrap_or_else(|_| "cuda".into());
        let device_uuid = ctx
            .uuid()
            .map_err(|e| device_error("reading the device's uuid", e))?
            .bytes
            .map(|b| b as u8);
        let stream = ctx.default_stream();
        let module = ctx
            .load_module(cached_ptx(&kernel_arch(major, minor))?)
            .map_err(|e| device_error("loading the kernels", e))?;
        let mut functions = HashMap::new();
        for name in KERNEL_NAMES {
            let function = module
                .load_function(name)
                .map_err(|e| device_error(&format!("kernel {name}"), e))?;
            functions.insert(name, function);
        }
        for (name, bytes) in [
            ("attention_prefill_mma", FLASH_SHARED_BYTES),
            ("attention_prefill_mma_hd128", FLASH_SHARED_BYTES),
            ("attention_prefill_wgmma_hd128", FLASH_WGMMA_SHARED_BYTES),
            ("moe_gemm_gate_up", moe::GEMM_SHARED_BYTES),
            ("moe_gemm_down", moe::GEMM_SHARED_BYTES),
            ("moe_wgmma_gate_up", moe::WGMMA_SHARED_BYTES),
            ("moe_wgmma_down", moe::WGMMA_SHARED_BYTES),
        ] {
            functions[name]
                .set_attribute(
                    cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    bytes as i32,
                )
                .map_err(|e| device_error(&format!("opting {name} in to its shared memory"), e))?;
        }
        let blas = CudaBlas::new(Arc::clone(&stream)).map_err(|e| device_error("cublas", e))?;
        Ok(Self {
            stream,
            blas,
            kernels: Kernels { functions },
            device_name,
            device_uuid,
            hopper: (major, minor) == HOPPER,
            reused_i32: ReusedUploads::default(),
            reused_f32: ReusedUploads::default(),
            reused_u64: ReusedUploads::default(),
            profile: Mutex::new(None),
        })
    }

    fn timed(&self, op: &'static str) -> Option<OpTimer<'_>> {
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

    /// Device-to-device copy bandwidth in bytes/s, counting bytes read and written: the HBM
    /// figure decode is measured against.
    pub fn copy_bandwidth(&self, bytes: usize, repeats: usize) -> Result<f64> {
        let src = self.zeros::<u8>(bytes)?;
        let mut dst = self.zeros::<u8>(bytes)?;
        let copy = |dst: &mut CudaSlice<u8>| {
            self.stream
                .memcpy_dtod(&src, dst)
                .map_err(|e| device_error("device copy", e))
        };
        copy(&mut dst)?;
        self.synchronize()?;
        let started = std::time::Instant::now();
        for _ in 0..repeats {
            copy(&mut dst)?;
        }
        self.synchronize()?;
        Ok((2 * bytes * repeats) as f64 / started.elapsed().as_secs_f64())
    }

    /// FLOP/s of this backend's GEMM (bf16 in, f32 accumulate) on an n×n×n product: the rate
    /// prefill is measured against.
    pub fn gemm_rate(&self, n: usize, repeats: usize) -> Result<f64> {
        self.gemm_shape_rate(n, n, n, repeats)
    }

    /// The same for `x` of `m` × `k` times a weight of `n` × `k`: FLOP/s of the projection
    /// path (conversion to bf16 included) at one layer's shape.
    pub fn gemm_shape_rate(&self, m: usize, k: usize, n: usize, repeats: usize) -> Result<f64> {
        let x = self.tensor(m, k)?;
        let w = CudaMatrix {
            out_dim: n,
            in_dim: k,
            data: self.zeros(n * k)?,
        };
        self.gemm(&x, &w)?;
        self.synchronize()?;
        let started = std::time::Instant::now();
        for _ in 0..repeats {
            self.gemm(&x, &w)?;
        }
        self.synchronize()?;
        Ok((2 * m * n * k * repeats) as f64 / started.elapsed().as_secs_f64())
    }

    fn zeros<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        n: usize,
    ) -> Result<CudaSlice<T>> {
        self.stream
            .alloc_zeros(n.max(1))
            .map_err(|e| device_error("allocating device memory", e))
    }

    fn upload<T: cudarc::driver::DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        if host.is_empty() {
            return self.uninit::<T>(1);
        }
        self.stream
            .clone_htod(host)
            .map_err(|e| device_error("copying to the device", e))
    }

    /// `host` on the device, uploaded again only when it differs from the last values
    /// uploaded for `key` (see [`ReusedUploads`]).
    fn upload_reused<T: cudarc::driver::DeviceRepr + Clone + PartialEq>(
        &self,
        cache: &ReusedUploads<T>,
        key: UploadKey,
        host: &[T],
    ) -> Result<Arc<CudaSlice<T>>> {
        let mut last = cache.last.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(uploaded) = last.get(&key)
            && uploaded.host[..] == *host
        {
            return Ok(Arc::clone(&uploaded.device));
        }
        let device = Arc::new(self.upload(host)?);
        // Replacing an entry frees its buffer in stream order, after the kernels reading it.
        let uploaded = Uploaded {
            host: host.to_vec(),
            device: Arc::clone(&device),
        };
        last.insert(key, uploaded);
        Ok(device)
    }

    /// Memory a kernel will fully write before anything reads it (at least one element).
    fn uninit<T: cudarc::driver::DeviceRepr>(&self, n: usize) -> Result<CudaSlice<T>> {
        // SAFETY: every caller hands the buffer to a kernel or GEMM that writes all of it
        // before it is read, or never reads it (empty uploads).
        unsafe { self.stream.alloc::<T>(n.max(1)) }.map_err(|e| device_error("allocating", e))
    }

    /// An output tensor a kernel fills completely.
    fn output(&self, rows: usize, cols: usize) -> Result<CudaTensor> {
        Ok(CudaTensor {
            rows,
            cols,
            data: self.uninit(rows * cols)?,
        })
    }

    fn tensor(&self, rows: usize, cols: usize) -> Result<CudaTensor> {
        Ok(CudaTensor {
            rows,
            cols,
            data: self.zeros(rows * cols)?,
        })
    }

    fn function(&self, name: &str) -> &CudaFunction {
        self.kernels.get(name)
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
    /// `gemv_rows`, more through one bf16 copy for the GEMMs.
    fn projection_input<'a>(&self, x: &'a CudaTensor) -> Result<ProjectionInput<'a>> {
        if x.rows <= GEMV_MAX_ROWS && x.cols.is_multiple_of(8) {
            Ok(ProjectionInput::Rows(x))
        } else {
            Ok(ProjectionInput::Bf16 {
                x16: self.bf16_copy(x)?,
                rows: x.rows,
                cols: x.cols,
            })
        }
    }

    /// `x · wᵀ` in f32 for a prepared input.
    fn project(&self, input: &ProjectionInput<'_>, w: &CudaMatrix) -> Result<CudaTensor> {
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
        let mut launch = self.stream.launch_builder(self.function("gemv_rows"));
        launch.arg(&x.data).arg(&rows).arg(&k);
        let mut outputs = ys.iter_mut();
        for (m, n) in outs.iter().enumerate() {
            match (weights.get(m), outputs.next()) {
                (Some(w), Some(y)) => launch.arg(&w.data).arg(&mut y.data),
                _ => launch.arg(&null).arg(&null),
            };
            launch.arg(n);
        }
        // SAFETY: a warp per weight row j of each weight m (w_m holds n_m · k bf16 values, k
        // a multiple of 8; absent weights have n_m = 0 and are never read), reading the rows
        // <= GEMV_MAX_ROWS of x (rows · k floats, allocation-aligned) and writing column j of
        // y_m (rows · n_m).
        launched(
            unsafe { launch.launch(blocks(total * WARP as usize, ROW_THREADS)) },
            "gemv_rows",
        )?;
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
        let mut launch = self.stream.launch_builder(self.function("add_bias"));
        launch.arg(&mut y.data).arg(&bias.data).arg(&cols);
        // SAFETY: one block per row of y; the bias holds y.cols values.
        launched(unsafe { launch.launch(per_row(y.rows)) }, "add_bias")
    }

    /// `x`'s values rounded to bf16 (as 16-bit words), the tensor cores' input.
    fn bf16_copy(&self, x: &CudaTensor) -> Result<CudaSlice<u16>> {
        let n = x.rows * x.cols;
        let mut x16 = self.uninit::<u16>(n)?;
        if n == 0 {
            return Ok(x16);
        }
        let count = n as i32;
        let mut launch = self.stream.launch_builder(self.function("to_bf16"));
        launch.arg(&x.data).arg(&mut x16).arg(&count);
        // SAFETY: to_bf16 reads `count` floats of x and writes as many words of x16, both
        // that long.
        launched(
            unsafe { launch.launch(blocks(n, ELEMENT_THREADS)) },
            "to_bf16",
        )?;
        Ok(x16)
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
        let mut launch = self
            .stream
            .launch_builder(self.function("scatter_add_weighted"));
        launch
            .arg(&mut out.data)
            .arg(&y.data)
            .arg(rows)
            .arg(weights)
            .arg(&cols);
        // SAFETY: one block per row of y; rows and weights hold y.rows entries and every row
        // index is below out.rows (the caller's tokens).
        launched(unsafe { launch.launch(per_row(y.rows)) }, "scatter_add")
    }

    fn gather(&self, x: &CudaTensor, rows: &CudaView<'_, i32>, n: usize) -> Result<CudaTensor> {
        let mut out = self.output(n, x.cols)?;
        if n == 0 {
            return Ok(out);
        }
        let cols = x.cols as i32;
        let mut launch = self.stream.launch_builder(self.function("gather_rows"));
        launch.arg(&x.data).arg(rows).arg(&mut out.data).arg(&cols);
        // SAFETY: one block per output row; rows holds n indices below x.rows.
        launched(unsafe { launch.launch(per_row(n)) }, "gather_rows")?;
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
        let mut launch = self.stream.launch_builder(self.function("store_rows"));
        launch.arg(store).arg(src).arg(slots).arg(&width);
        // SAFETY: one block per row; every slot was checked against the store's capacity
        // and src holds rows · width values.
        launched(unsafe { launch.launch(per_row(rows)) }, "store_rows")
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
            let mut launch = self.stream.launch_builder(self.function("load_rows"));
            launch.arg(store).arg(slots).arg(&mut out).arg(&w);
            // SAFETY: one block per row; slots were checked against the store's capacity and
            // out holds rows · width values.
            launched(unsafe { launch.launch(per_row(rows)) }, "load_rows")?;
            let mut host = self
                .stream
                .clone_dtoh(&out)
                .map_err(|e| device_error("copying to the host", e))?;
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
        // Round to nearest even, as torch converts.
        let bits: Vec<u16> = host
            .data
            .iter()
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
        let mut launch = self.stream.launch_builder(self.function("embed"));
        launch
            .arg(&table.data)
            .arg(&ids)
            .arg(&mut out.data)
            .arg(&cols);
        // SAFETY: one block per id, each checked below the table's rows.
        launched(unsafe { launch.launch(per_row(out.rows)) }, "embed")?;
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
        let short = len <= RMS_NORM_SHORT_RUN;
        let kernel = if short { "rms_norm_short" } else { "rms_norm" };
        let mut launch = self.stream.launch_builder(self.function(kernel));
        launch
            .arg(&x.data)
            .arg(&weight.data)
            .arg(&mut out.data)
            .arg(&len_i)
            .arg(&eps);
        let runs_i = runs as i32;
        let config = if short {
            launch.arg(&runs_i);
            blocks(runs * WARP as usize, ROW_THREADS)
        } else {
            per_row(runs)
        };
        // SAFETY: one block (or warp, for short runs, those past `runs` returning) per run of
        // len values; x and out hold runs · len values.
        launched(unsafe { launch.launch(config) }, kernel)?;
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
        let [mut y] = self.project_many(&input, [w])?;
        if let Some(bias) = bias {
            self.add_bias(&mut y, bias)?;
        }
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
        let mut ys = self.project_many(&input, projections.map(|(w, _)| w))?;
        for (y, (_, bias)) in ys.iter_mut().zip(projections) {
            if let Some(bias) = bias {
                self.add_bias(y, bias)?;
            }
        }
        Ok(ys)
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
        let mut launch = self.stream.launch_builder(self.function("add_assign"));
        launch.arg(&mut acc.data).arg(&x.data).arg(&n_i);
        // SAFETY: both hold n values.
        launched(
            unsafe { launch.launch(blocks(n, ELEMENT_THREADS)) },
            "add_assign",
        )
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
        let len = h.cols as i32;
        let mut launch = self.stream.launch_builder(self.function("add_rms_norm"));
        launch
            .arg(&mut h.data)
            .arg(&delta.data)
            .arg(&weight.data)
            .arg(&mut out.data)
            .arg(&len)
            .arg(&eps);
        // SAFETY: one block per row of len values; h, delta and out hold rows · len values,
        // the weight len.
        launched(unsafe { launch.launch(per_row(h.rows)) }, "add_rms_norm")?;
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
        let mut launch = self.stream.launch_builder(self.function("scale_rows"));
        launch.arg(&mut x.data).arg(&scales).arg(&cols);
        // SAFETY: one block per row; scales holds x.rows values.
        launched(unsafe { launch.launch(per_row(x.rows)) }, "scale_rows")
    }

    fn swiglu(&self, gate_up: &CudaTensor) -> Result<CudaTensor> {
        let _timer = self.timed("swiglu");
        let inter = gate_up.cols / 2;
        let mut out = self.output(gate_up.rows, inter)?;
        if gate_up.rows == 0 {
            return Ok(out);
        }
        let inter_i = inter as i32;
        let mut launch = self.stream.launch_builder(self.function("swiglu"));
        launch.arg(&gate_up.data).arg(&mut out.data).arg(&inter_i);
        // SAFETY: one block per row; gate_up rows hold 2 · inter values, out rows inter.
        launched(unsafe { launch.launch(per_row(out.rows)) }, "swiglu")?;
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
        let mut launch = self.stream.launch_builder(self.function("rope"));
        launch
            .arg(&mut x.data)
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
        launched(unsafe { launch.launch(config) }, "rope")
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
        let null = 0u64;
        let mut launch = self
            .stream
            .launch_builder(self.function("attention_inputs"));
        launch.arg(&mut q.data).arg(&k.data).arg(&v.data);
        match heads.norms {
            Some((q_norm, k_norm)) => launch.arg(&q_norm.data).arg(&k_norm.data),
            None => launch.arg(&null).arg(&null),
        };
        launch
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
        launched(unsafe { launch.launch(config) }, "attention_inputs")?;
        Ok(q)
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
            if tiled && seq.rows.len() > 1 {
                tiles.add(seq.rows.clone(), seq.first_position, offset);
                continue;
            }
            for (i, row) in seq.rows.clone().enumerate() {
                positions[row] = (seq.first_position + i) as i32;
                offsets[row] = offset;
            }
        }
        let mut out = self.tensor(q.rows, q.cols)?;
        if q.rows == 0 {
            return Ok(out);
        }
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
                ("attention_split", SPLIT_KEYS, h, scale)
            };
            let splits = (last as usize + 1).div_ceil(split_keys);
            let parts = q.rows * batch.num_heads * splits;
            let mut partial_out = self.uninit::<f32>(parts * batch.head_dim)?;
            let mut partial_max = self.uninit::<f32>(parts)?;
            let mut partial_sum = self.uninit::<f32>(parts)?;
            let positions = reused("attention.positions", &positions)?;
            let offsets = reused("attention.offsets", &offsets)?;
            let mut launch = self.stream.launch_builder(self.function(kernel));
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
            launched(unsafe { launch.launch(config) }, kernel)?;
            let splits_i = splits as i32;
            let mut launch = self
                .stream
                .launch_builder(self.function("attention_combine"));
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
            launched(unsafe { launch.launch(config) }, "attention_combine")?;
        }
        if !tiles.rows.is_empty() {
            tiles.longest_first();
            let count = tiles.rows.len();
            let rows = reused("attention.tile_rows", &tiles.rows)?;
            let counts = reused("attention.tile_counts", &tiles.counts)?;
            let tile_positions = reused("attention.tile_positions", &tiles.positions)?;
            let tile_offsets = reused("attention.tile_offsets", &tiles.table_offsets)?;
            let (kernel, threads, shared) = (prefill.name, prefill.threads, prefill.shared_bytes);
            let q_scale = if prefill.log2_scaled {
                scale * std::f32::consts::LOG2_E
            } else {
                scale
            };
            let mut launch = self.stream.launch_builder(self.function(kernel));
            launch
                .arg(&q.data)
                .arg(&store.k)
                .arg(&store.v)
                .arg(&mut out.data)
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
            // SAFETY: one block per (head, tile); each tile's rows lie inside q and out and
            // its positions inside its block table (checked above).
            launched(unsafe { launch.launch(config) }, kernel)?;
        }
        Ok(out)
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
        self.moe_routed_on_device(x, router, rule, experts, counters)
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
        let _timer = self.timed("greedy");
        if logits.cols != vocab {
            return Err(shape_error(
                "greedy",
                format!("{} columns, vocab {vocab}", logits.cols),
            ));
        }
        if logits.rows == 0 {
            return Ok(Vec::new());
        }
        let rows = logits.rows;
        let parts = vocab.div_ceil(GREEDY_PART_LEN);
        let mut part_best = self.uninit::<f32>(rows * parts)?;
        let mut part_index = self.uninit::<i32>(rows * parts)?;
        let mut part_sum = self.uninit::<f32>(rows * parts)?;
        let (vocab_i, part_len) = (vocab as i32, GREEDY_PART_LEN as i32);
        let mut launch = self.stream.launch_builder(self.function("greedy_partial"));
        launch
            .arg(&logits.data)
            .arg(&mut part_best)
            .arg(&mut part_index)
            .arg(&mut part_sum)
            .arg(&vocab_i)
            .arg(&part_len);
        let config = LaunchConfig {
            grid_dim: (rows as u32, parts as u32, 1),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: one block of ROW_THREADS (= the kernel's 256 shared slots) per (row, part)
        // of vocab logits, writing that part's entry of rows · parts.
        launched(unsafe { launch.launch(config) }, "greedy_partial")?;
        let mut picks = self.uninit::<u32>(2 * rows)?;
        let (rows_i, parts_i) = (rows as i32, parts as i32);
        let mut launch = self.stream.launch_builder(self.function("greedy_combine"));
        launch
            .arg(&part_best)
            .arg(&part_index)
            .arg(&part_sum)
            .arg(&mut picks)
            .arg(&rows_i)
            .arg(&parts_i);
        // SAFETY: one thread per row reading its parts, writing its two entries of picks.
        launched(
            unsafe { launch.launch(blocks(rows, ELEMENT_THREADS)) },
            "greedy_combine",
        )?;
        let picks = self
            .stream
            .clone_dtoh(&picks)
            .map_err(|e| device_error("copying to the host", e))?;
        Ok(picks
            .chunks_exact(2)
            .take(rows)
            .map(|p| (p[0], f32::from_bits(p[1])))
            .collect())
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
        let mut host = self
            .stream
            .clone_dtoh(&x.data)
            .map_err(|e| device_error("copying to the host", e))?;
        host.truncate(x.rows * x.cols);
        Ok(host)
    }
}

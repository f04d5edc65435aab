//! MoE on the device: routing, placement of the routing slots in expert order, and every
//! expert's MLP as grouped matrix-vector products (few slots) or grouped tensor-core GEMMs
//! (many), with nothing going back to the host between the router's logits and the layer's
//! output. Kernels are in `kernels/moe_routing.cu`, `matvec.cu` and `moe_gemm.cu`.

use cudarc::driver::{CudaSlice, DevicePtr, LaunchConfig};

use super::projection::row_parts;
use super::{
    CudaBackend, CudaMatrix, CudaTensor, Kernel, ROW_THREADS, blocks, per_row, shape_error,
};
use crate::backend::{Backend, HostCounters, ResidualNorm, RouteRule, Routing, moe_routed_on_host};
use crate::error::{EngineError, Result};
use crate::weights::ExpertWeights;

/// Routing slots (tokens × top-k) up to which the experts run as grouped matrix-vector
/// products rather than grouped GEMMs. Measured on an H100 (Qwen3-30B-A3B shape, CUDA_NOTES
/// v10 and v15): at 64 slots (batch 8) the grouped GEMMs take 2.47-2.49 ms a step against
/// 2.56 ms this way (v10: 2.77 against 3.53); at 256 (batch 32) 4.45-4.51 against 5.66; at 8
/// slots (batch 1) the two are within run-to-run spread.
const MOE_GEMV_MAX_PAIRS: usize = 8;
/// Warps a block of `moe_gate_up` / `moe_down` has: `moe_gate_up` computes a row a warp.
const MOE_WARPS_PER_BLOCK: usize = (ROW_THREADS / 32) as usize;
/// 16-byte loads a lane of `moe_gate_up` issues at once from each of gate and up (its
/// kernel's `GATE_UP_LOADS`): a row's part.
const GATE_UP_LOADS: usize = 2;
/// The same for one token's slots (`moe_gate_up_one`'s `GATE_UP_ONE_LOADS`).
const GATE_UP_ONE_LOADS: usize = 4;
/// Rows a warp of `moe_down` computes (its kernel's `DOWN_ROWS_PER_WARP`).
const DOWN_ROWS_PER_WARP: usize = 4;
/// Most routing slots one block of the matrix-vector kernels takes (`MOE_MAX_GROUP`).
const MOE_MAX_GROUP: usize = 4;
/// `GEMM_BM`, `GEMM_BN`, `GEMM_THREADS` and `GEMM_SHARED_BYTES` (three stages of 128 × 64
/// bf16 A and B tiles, padded: more than a block gets without opting in) of the grouped GEMM
/// kernels.
const GEMM_BM: usize = 128;
const GEMM_BN: usize = 128;
const GEMM_THREADS: u32 = 256;
pub(super) const GEMM_SHARED_BYTES: usize = 3 * (GEMM_BM + GEMM_BN) * (64 + 8) * 2;
/// `WGMMA_SHARED_BYTES` of the warpgroup (sm_90a) GEMMs: three unpadded stages and 1 KB to
/// align them to the swizzle pattern.
pub(super) const WGMMA_SHARED_BYTES: usize = 3 * (GEMM_BM + GEMM_BN) * 64 * 2 + 1024;
/// `WGMMA_NARROW_BM` and `WGMMA_NARROW_SHARED_BYTES` of the warpgroup GEMMs' narrow tiles
/// (four stages of 64 rows of A, 128 of B), which Hopper runs up to WGMMA_NARROW_MAX_PAIRS
/// routing slots (a decode batch of 128 at top-8: experts average 8 rows).
const WGMMA_NARROW_BM: usize = 64;
pub(super) const WGMMA_NARROW_SHARED_BYTES: usize = 4 * (WGMMA_NARROW_BM + GEMM_BN) * 64 * 2 + 1024;
const WGMMA_NARROW_MAX_PAIRS: usize = 1024;
/// The most blocks a launch's second grid dimension takes (the GEMMs' row tiles).
const MAX_GRID_Y: usize = 65_535;
/// Experts `moe_route` scores (`ROUTE_MAX_PER_LANE` × 32) and picks at most (a lane each).
const ROUTE_MAX_EXPERTS: usize = 512;
const ROUTE_MAX_TOP_K: usize = 32;
/// Routing slots up to which one block places them (`moe_offsets`, or `moe_route_place`
/// routing them too: a decode step's few, one or two launches fewer a layer), rather than a
/// `moe_place` launch of a thread a slot.
const PLACE_IN_OFFSETS_MAX_PAIRS: usize = 1024;
/// Threads of the one block of `moe_offsets` (a thread an expert) and of `moe_route_place`
/// (also a warp a routed row).
const MAX_EXPERTS: usize = 1024;

/// Rows of a placement's tiles for `pairs` routing slots of `tokens` tokens: matrix-vector
/// groups for a few (pairs <= MOE_GEMV_MAX_PAIRS), of one slot where one token has them
/// (its experts differ, so a group of one loses nothing and `moe_gate_up_one` and
/// `moe_down_one` run in fewer registers); GEMM row tiles for more (narrow ones on Hopper up
/// to WGMMA_NARROW_MAX_PAIRS).
fn tile_rows(tokens: usize, pairs: usize, hopper: bool) -> usize {
    if pairs <= MOE_GEMV_MAX_PAIRS {
        if tokens == 1 { 1 } else { MOE_MAX_GROUP }
    } else if hopper && pairs <= WGMMA_NARROW_MAX_PAIRS {
        WGMMA_NARROW_BM
    } else {
        GEMM_BM
    }
}

/// (token, expert) pairs per expert of one layer: counted on the device by routing done
/// there, on the host by routing done on the host (expert parallelism).
pub struct CudaExpertCounters {
    host: HostCounters,
    device: CudaSlice<u64>,
}

/// One MoE call's routing on the device: expert and weight per slot (token · top_k + j).
struct DeviceRouting {
    top_k: usize,
    expert_ids: CudaSlice<i32>,
    weights: CudaSlice<f32>,
}

/// Most experts a token has for `moe_combine_add_rms_norm` (`COMBINE_NORM_MAX_TOP_K`).
const COMBINE_NORM_MAX_TOP_K: usize = 8;

/// What `run_experts` is given to find where the slots go: a placement already made (a
/// decode step's, by `moe_route_place`, in matrix-vector groups), or each expert's count.
enum Slots {
    Placed(Placement),
    Counted(CudaSlice<i32>),
}

/// Where each slot went: `offsets` (num_experts + 1) locate every expert's positions,
/// `tiles` (2 · max_tiles) gives each tile's expert and first position (expert -1 past the
/// last tile), `sorted_slot` names the slot at each position and `slot_position` the
/// position of each slot.
struct Placement {
    max_tiles: usize,
    offsets: CudaSlice<i32>,
    tiles: CudaSlice<i32>,
    sorted_slot: CudaSlice<i32>,
    slot_position: CudaSlice<i32>,
}

impl CudaBackend {
    pub(super) fn new_expert_counters(&self, experts: usize) -> Result<CudaExpertCounters> {
        Ok(CudaExpertCounters {
            host: HostCounters::new(experts),
            device: self.zeros(experts)?,
        })
    }

    pub(super) fn add_host_counts(counters: &CudaExpertCounters, expert_ids: &[usize]) {
        counters.host.add(expert_ids);
    }

    pub(super) fn read_counters(&self, counters: &CudaExpertCounters) -> Result<Vec<u64>> {
        let device = self.read_back(&counters.device)?;
        Ok(counters
            .host
            .read()
            .iter()
            .zip(device)
            .map(|(h, d)| h + d)
            .collect())
    }

    /// Routes on the device when the rule and shapes allow it, else on the host; then adds
    /// the output to the residual and normalizes it where `norm` is given.
    pub(super) fn moe_routed_on_device(
        &self,
        x: &CudaTensor,
        router: &CudaMatrix,
        rule: &RouteRule,
        experts: &[ExpertWeights<Self>],
        counters: &CudaExpertCounters,
        norm: Option<ResidualNorm<'_, Self>>,
    ) -> Result<CudaTensor> {
        let _timer = self.timed("moe_routed");
        let k = rule.experts_per_token;
        if rule.num_experts > ROUTE_MAX_EXPERTS
            || k == 0
            || k > ROUTE_MAX_TOP_K.min(rule.num_experts)
            || router.out_dim != rule.num_experts
            || experts.len() != rule.num_experts
        {
            let out = moe_routed_on_host(self, x, router, rule, experts, counters)?;
            return self.then_norm(out, norm);
        }
        let route_timer = self.timed("moe.route");
        // The tokens in bf16 at most once, for the router and the experts' GEMMs.
        let input = self.projection_input(x)?;
        let logits = self.project(&input, router)?;
        let pairs = x.rows * k;
        let mut routing = DeviceRouting {
            top_k: k,
            expert_ids: self.uninit(pairs)?,
            weights: self.uninit(pairs)?,
        };
        let (rows, num_experts, top_k, renormalize) = (
            x.rows as i32,
            rule.num_experts as i32,
            k as i32,
            i32::from(rule.renormalize),
        );
        // A decode step's few rows: routing and placement in one block, in the tiles
        // run_experts takes for that many slots.
        let threads = (x.rows * 32).max(rule.num_experts.next_multiple_of(32));
        if (1..=PLACE_IN_OFFSETS_MAX_PAIRS).contains(&pairs) && threads <= MAX_EXPERTS {
            let tile_rows = tile_rows(x.rows, pairs, self.hopper);
            let mut place = self.new_placement(pairs, rule.num_experts, tile_rows)?;
            let (tile_rows_i, max_tiles_i) = (tile_rows as i32, place.max_tiles as i32);
            let mut launch = self.launch(Kernel::MoeRoutePlace);
            launch
                .arg(&logits.data)
                .arg(&mut routing.expert_ids)
                .arg(&mut routing.weights)
                .arg(&counters.device)
                .arg(&rows)
                .arg(&num_experts)
                .arg(&top_k)
                .arg(&renormalize)
                .arg(&mut place.offsets)
                .arg(&mut place.tiles)
                .arg(&tile_rows_i)
                .arg(&max_tiles_i)
                .arg(&mut place.sorted_slot)
                .arg(&mut place.slot_position);
            // SAFETY: one block of at least rows warps and num_experts threads (at most
            // 1024); warp r routes row r of the logits as moe_route does, then the block
            // writes num_experts + 1 offsets, the tiles' 2 · max_tiles entries and places the
            // rows · top_k slots (expert ids below num_experts) as moe_offsets does.
            unsafe {
                launch.launch(LaunchConfig {
                    grid_dim: (1, 1, 1),
                    block_dim: (threads as u32, 1, 1),
                    shared_mem_bytes: 0,
                })
            }?;
            drop(route_timer);
            let slots = Slots::Placed(place);
            return self.run_experts(x, input.bf16(), &routing, slots, experts, norm);
        }
        let mut counts = self.zeros(experts.len())?;
        let mut launch = self.launch(Kernel::MoeRoute);
        launch
            .arg(&logits.data)
            .arg(&mut routing.expert_ids)
            .arg(&mut routing.weights)
            .arg(&mut counts)
            .arg(&counters.device)
            .arg(&rows)
            .arg(&num_experts)
            .arg(&top_k)
            .arg(&renormalize);
        let warps_per_block = ROW_THREADS / 32;
        // SAFETY: one warp per row of the [rows, num_experts] logits (num_experts <= 32 ·
        // ROUTE_MAX_PER_LANE, top_k <= 32); it writes that row's top_k slots of expert_ids and
        // weights (rows · top_k each) and counts experts below num_experts, the length of
        // counts and of the layer's device counters.
        unsafe { launch.launch(blocks(x.rows * 32, warps_per_block * 32)) }?;
        drop(route_timer);
        let slots = Slots::Counted(counts);
        self.run_experts(x, input.bf16(), &routing, slots, experts, norm)
    }

    /// The experts of host routing (expert parallelism, or rules the device does not take).
    pub(super) fn moe_host_routed(
        &self,
        x: &CudaTensor,
        routing: &Routing,
        experts: &[ExpertWeights<Self>],
    ) -> Result<CudaTensor> {
        let k = routing.experts_per_token.max(1);
        if let Some(bad) = routing.expert_ids.iter().find(|&&e| e >= experts.len()) {
            return Err(shape_error(
                "moe",
                format!("expert {bad} of {}", experts.len()),
            ));
        }
        if routing.expert_ids.len() != x.rows * k || routing.weights.len() != x.rows * k {
            return Err(shape_error(
                "moe",
                format!(
                    "{} expert ids and {} weights for {} tokens of {k} experts",
                    routing.expert_ids.len(),
                    routing.weights.len(),
                    x.rows
                ),
            ));
        }
        let ids: Vec<i32> = routing.expert_ids.iter().map(|&e| e as i32).collect();
        let mut counts = vec![0i32; experts.len()];
        for &e in &routing.expert_ids {
            counts[e] += 1;
        }
        let counts = self.upload(&counts)?;
        let routing = DeviceRouting {
            top_k: k,
            expert_ids: self.upload(&ids)?,
            weights: self.upload(&routing.weights)?,
        };
        let slots = Slots::Counted(counts);
        self.run_experts(x, x.bf16.as_ref(), &routing, slots, experts, None)
    }

    /// Every token's experts, weighted and summed (into the residual and the norm after it,
    /// where `norm` is given); the routing stays on the device. `x16`: the tokens in bf16
    /// when the caller has them already.
    fn run_experts(
        &self,
        x: &CudaTensor,
        x16: Option<&CudaSlice<u16>>,
        routing: &DeviceRouting,
        slots: Slots,
        experts: &[ExpertWeights<Self>],
        norm: Option<ResidualNorm<'_, Self>>,
    ) -> Result<CudaTensor> {
        let Some(first) = experts.first() else {
            return Err(shape_error("moe", "no experts".into()));
        };
        let (hidden, inter) = (x.cols, first.down.in_dim);
        let uniform = experts.iter().all(|e| {
            (
                e.gate_up.out_dim,
                e.gate_up.in_dim,
                e.down.out_dim,
                e.down.in_dim,
            ) == (2 * inter, hidden, hidden, inter)
        });
        if !uniform || hidden % 8 != 0 || inter % 8 != 0 || experts.len() > MAX_EXPERTS {
            return Err(EngineError::Unsupported(format!(
                "cuda MoE takes up to {MAX_EXPERTS} experts of one shape with widths that are multiples of 8; got {} experts, hidden {hidden}, expert width {inter}",
                experts.len()
            )));
        }
        let pairs = x.rows * routing.top_k;
        if pairs == 0 {
            let out = self.tensor(x.rows, hidden)?;
            return self.then_norm(out, norm);
        }
        let gemv = pairs <= MOE_GEMV_MAX_PAIRS;
        let tile_rows = tile_rows(x.rows, pairs, self.hopper);
        let place = match slots {
            // Placed in tiles of tile_rows(x.rows, pairs, self.hopper) too.
            Slots::Placed(place) => place,
            Slots::Counted(counts) => self.place(routing, &counts, experts.len(), tile_rows)?,
        };
        // One upload: every gate_up pointer, then every down pointer.
        let pointers: Vec<u64> = experts
            .iter()
            .map(|e| e.gate_up.data.device_ptr(&self.stream).0)
            .chain(
                experts
                    .iter()
                    .map(|e| e.down.data.device_ptr(&self.stream).0),
            )
            .collect();
        // Each layer's experts have their own table, told apart by its first pointer.
        let pointers =
            self.upload_reused(&self.reused_u64, ("moe.experts", pointers[0]), &pointers)?;
        let (gate_up, down) = (
            pointers.slice(..experts.len()),
            pointers.slice(experts.len()..),
        );
        // Expert outputs as bf16: the combine reads each once.
        let mut y = self.uninit::<u16>(pairs * hidden)?;
        let (hidden_i, inter_i, top_k) = (hidden as i32, inter as i32, routing.top_k as i32);
        if gemv {
            let group_i = tile_rows as i32;
            let (gate_up_kernel, down_kernel, part_loads) = match tile_rows {
                1 => (Kernel::MoeGateUpOne, Kernel::MoeDownOne, GATE_UP_ONE_LOADS),
                _ => (Kernel::MoeGateUp, Kernel::MoeDown, GATE_UP_LOADS),
            };
            let mut act = self.uninit::<f32>(pairs * inter)?;
            let grid = |rows: usize, rows_per_warp: usize| LaunchConfig {
                grid_dim: (
                    place.max_tiles as u32,
                    rows.div_ceil(MOE_WARPS_PER_BLOCK * rows_per_warp) as u32,
                    1,
                ),
                block_dim: (ROW_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // Gate and up rows in parts of part_loads loads a lane, a warp each.
            let parts = row_parts(hidden, part_loads).min(MOE_WARPS_PER_BLOCK);
            let parts_i = parts as i32;
            let mut launch = self.launch(gate_up_kernel);
            launch
                .arg(&x.data)
                .arg(&gate_up)
                .arg(&place.offsets)
                .arg(&place.tiles)
                .arg(&place.sorted_slot)
                .arg(&mut act)
                .arg(&group_i)
                .arg(&hidden_i)
                .arg(&inter_i)
                .arg(&top_k)
                .arg(&parts_i);
            // SAFETY: the pointer table holds a live [2·inter, hidden] bf16 matrix per expert;
            // blocks past the last group return; positions index act ([pairs, inter]) and
            // sorted_slot names slots below pairs = x.rows · top_k, rows of x ([x.rows,
            // hidden], hidden a multiple of 8).
            unsafe { launch.launch(grid(inter * parts, 1)) }?;
            let mut launch = self.launch(down_kernel);
            launch
                .arg(&act)
                .arg(&down)
                .arg(&place.offsets)
                .arg(&place.tiles)
                .arg(&mut y)
                .arg(&group_i)
                .arg(&hidden_i)
                .arg(&inter_i);
            // SAFETY: as above, with [hidden, inter] down matrices, act rows read and y of
            // pairs · hidden values.
            unsafe { launch.launch(grid(hidden, DOWN_ROWS_PER_WARP)) }?;
        } else {
            if place.max_tiles > MAX_GRID_Y {
                return Err(EngineError::Unsupported(format!(
                    "{pairs} routing slots need up to {} GEMM tiles, over the {MAX_GRID_Y} a launch takes; lower max_batch_tokens",
                    place.max_tiles
                )));
            }
            // The tokens in bf16, gathered by the gate/up GEMM for each of their slots.
            let converted;
            let x16 = match x16 {
                Some(x16) => x16,
                None => {
                    converted = self.bf16_copy(x)?;
                    &converted
                }
            };
            let gate_up_timer = self.timed("moe.gemm_gate_up");
            let mut act = self.uninit::<u16>(pairs * inter)?;
            // Hopper runs the warpgroup-instruction builds of the same GEMMs.
            let (gate_up_kernel, down_kernel, shared) = if tile_rows == WGMMA_NARROW_BM {
                (
                    Kernel::MoeWgmmaNarrowGateUp,
                    Kernel::MoeWgmmaNarrowDown,
                    WGMMA_NARROW_SHARED_BYTES,
                )
            } else if self.hopper {
                (
                    Kernel::MoeWgmmaGateUp,
                    Kernel::MoeWgmmaDown,
                    WGMMA_SHARED_BYTES,
                )
            } else {
                (
                    Kernel::MoeGemmGateUp,
                    Kernel::MoeGemmDown,
                    GEMM_SHARED_BYTES,
                )
            };
            let gemm = |columns: usize| LaunchConfig {
                grid_dim: (columns as u32, place.max_tiles as u32, 1),
                block_dim: (GEMM_THREADS, 1, 1),
                shared_mem_bytes: shared as u32,
            };
            let mut launch = self.launch(gate_up_kernel);
            launch
                .arg(x16)
                .arg(&place.sorted_slot)
                .arg(&top_k)
                .arg(&gate_up)
                .arg(&place.offsets)
                .arg(&place.tiles)
                .arg(&inter_i)
                .arg(&hidden_i)
                .arg(&mut act);
            // SAFETY: each block takes one tile of tile_rows positions of one expert (blocks
            // past the last return), reads the rows of x16 ([x.rows, hidden]) of those
            // positions' slots (sorted_slot holds slots below x.rows · top_k) and rows of
            // that expert's [2·inter, hidden] matrix (hidden a multiple of 8, reads past it
            // zero-filled) and writes act ([pairs, inter]) inside its rows and columns.
            unsafe { launch.launch(gemm(inter.div_ceil(GEMM_BN / 2))) }?;
            drop(gate_up_timer);
            let _down_timer = self.timed("moe.gemm_down");
            let mut launch = self.launch(down_kernel);
            launch
                .arg(&act)
                .arg(&down)
                .arg(&place.offsets)
                .arg(&place.tiles)
                .arg(&hidden_i)
                .arg(&inter_i)
                .arg(&mut y);
            // SAFETY: as above with [hidden, inter] down matrices, writing y ([pairs,
            // hidden]).
            unsafe { launch.launch(gemm(hidden.div_ceil(GEMM_BN))) }?;
        }
        let _combine_timer = self.timed("moe.combine");
        let mut out = self.output(x.rows, hidden)?;
        let norm = match norm {
            Some(norm)
                if norm.weight.len == hidden
                    && (norm.h.rows, norm.h.cols) == (x.rows, hidden)
                    && routing.top_k <= COMBINE_NORM_MAX_TOP_K =>
            {
                norm
            }
            norm => {
                let mut launch = self.launch(Kernel::MoeCombine);
                launch
                    .arg(&y)
                    .arg(&place.slot_position)
                    .arg(&routing.weights)
                    .arg(&mut out.data)
                    .arg(&hidden_i)
                    .arg(&top_k);
                // SAFETY: one block per token, reading its top_k slots' weights and y rows
                // (positions below pairs) and writing its row of out.
                unsafe { launch.launch(per_row(x.rows)) }?;
                return self.then_norm(out, norm);
            }
        };
        let mut out16 = self.gemm_input_buffer(x.rows, hidden)?;
        let mut launch = self.launch(Kernel::MoeCombineAddRmsNorm);
        launch
            .arg(&y)
            .arg(&place.slot_position)
            .arg(&routing.weights)
            .arg(norm.h.values_mut())
            .arg(&norm.weight.data)
            .arg(&mut out.data)
            .arg(out16.as_mut())
            .arg(&hidden_i)
            .arg(&top_k)
            .arg(&norm.eps);
        // SAFETY: as moe_combine, then the token's row of h (x.rows · hidden values, checked
        // above) and of out (and out16 where given) as add_rms_norm, the weight hidden values.
        unsafe { launch.launch(per_row(x.rows)) }?;
        out.bf16 = out16;
        Ok(out)
    }

    /// `out` added to the residual and normalized where `norm` is given.
    fn then_norm(
        &self,
        out: CudaTensor,
        norm: Option<ResidualNorm<'_, Self>>,
    ) -> Result<CudaTensor> {
        match norm {
            Some(norm) => self.add_rms_norm(norm.h, &out, norm.weight, norm.eps),
            None => Ok(out),
        }
    }

    /// Buffers for the placement of `pairs` slots among `num_experts` in tiles of
    /// `tile_rows`, each filled by the kernel that places them.
    fn new_placement(
        &self,
        pairs: usize,
        num_experts: usize,
        tile_rows: usize,
    ) -> Result<Placement> {
        // The most tiles the slots can make: each of at most min(experts, pairs) experts
        // fills a last tile by at least 1 of tile_rows (none partial in groups of one).
        let max_tiles = (pairs + num_experts.min(pairs) * (tile_rows - 1)) / tile_rows;
        Ok(Placement {
            max_tiles,
            offsets: self.uninit(num_experts + 1)?,
            tiles: self.uninit(2 * max_tiles)?,
            sorted_slot: self.uninit(pairs)?,
            slot_position: self.uninit(pairs)?,
        })
    }

    /// Places every slot among its expert's (`counts` slots each), in tiles of `tile_rows`.
    fn place(
        &self,
        routing: &DeviceRouting,
        counts: &CudaSlice<i32>,
        num_experts: usize,
        tile_rows: usize,
    ) -> Result<Placement> {
        let _timer = self.timed("moe.place");
        let pairs = routing.expert_ids.len();
        let mut place = self.new_placement(pairs, num_experts, tile_rows)?;
        let max_tiles = place.max_tiles;
        let mut cursor = self.uninit::<i32>(num_experts)?;
        let (experts_i, tile_i, max_tiles_i, pairs_i) = (
            num_experts as i32,
            tile_rows as i32,
            max_tiles as i32,
            pairs as i32,
        );
        let place_in_offsets = pairs <= PLACE_IN_OFFSETS_MAX_PAIRS;
        let offsets_places = if place_in_offsets { pairs_i } else { 0 };
        let mut launch = self.launch(Kernel::MoeOffsets);
        launch
            .arg(counts)
            .arg(&mut place.offsets)
            .arg(&mut place.tiles)
            .arg(&mut cursor)
            .arg(&experts_i)
            .arg(&tile_i)
            .arg(&max_tiles_i)
            .arg(&routing.expert_ids)
            .arg(&mut place.sorted_slot)
            .arg(&mut place.slot_position)
            .arg(&offsets_places);
        let threads = num_experts.next_multiple_of(32) as u32;
        // SAFETY: one block of at least num_experts (<= 1024) threads reading num_experts
        // counts and writing num_experts + 1 offsets, num_experts cursors and the tiles'
        // 2 · max_tiles entries (max_tiles bounds the tiles the counts make);
        // placing, it reads the pairs' expert ids (below num_experts, routed on the device
        // or checked on the host) and hands out each position below pairs once.
        unsafe {
            launch.launch(LaunchConfig {
                grid_dim: (1, 1, 1),
                block_dim: (threads, 1, 1),
                shared_mem_bytes: 0,
            })
        }?;
        if place_in_offsets {
            return Ok(place);
        }
        let mut launch = self.launch(Kernel::MoePlace);
        launch
            .arg(&routing.expert_ids)
            .arg(&mut cursor)
            .arg(&mut place.sorted_slot)
            .arg(&mut place.slot_position)
            .arg(&pairs_i);
        // SAFETY: one thread per slot; expert ids are below num_experts (routed on the device,
        // or checked on the host), and the cursors hand out each position below pairs once.
        unsafe { launch.launch(blocks(pairs, ROW_THREADS)) }?;
        Ok(place)
    }
}

#[cfg(test)]
mod tests {
    use super::super::kernels::tests::assert_host_constants;
    use super::*;

    #[test]
    fn one_token_takes_groups_of_one_and_decode_batches_narrow_tiles_on_hopper_only() {
        assert_eq!(tile_rows(1, 8, true), 1);
        assert_eq!(tile_rows(2, 8, true), MOE_MAX_GROUP);
        assert_eq!(tile_rows(1, 9, true), WGMMA_NARROW_BM);
        // A decode batch of 128 at top-8.
        assert_eq!(tile_rows(128, 1024, true), WGMMA_NARROW_BM);
        assert_eq!(tile_rows(1025, 1025, true), GEMM_BM);
        assert_eq!(tile_rows(64, 64, false), GEMM_BM);
    }

    #[test]
    fn launch_constants_match_the_kernels() {
        assert_host_constants(&[
            ("DOWN_ROWS_PER_WARP", DOWN_ROWS_PER_WARP),
            ("GATE_UP_LOADS", GATE_UP_LOADS),
            ("GATE_UP_ONE_LOADS", GATE_UP_ONE_LOADS),
            ("MOE_MAX_GROUP", MOE_MAX_GROUP),
            ("GEMM_BM", GEMM_BM),
            ("GEMM_BN", GEMM_BN),
            ("GEMM_THREADS", GEMM_THREADS as usize),
            ("GEMM_SHARED_BYTES", GEMM_SHARED_BYTES),
            ("WGMMA_SHARED_BYTES", WGMMA_SHARED_BYTES),
            ("WGMMA_NARROW_BM", WGMMA_NARROW_BM),
            ("WGMMA_NARROW_SHARED_BYTES", WGMMA_NARROW_SHARED_BYTES),
            ("ROUTE_MAX_PER_LANE * 32", ROUTE_MAX_EXPERTS),
            ("COMBINE_NORM_MAX_TOP_K", COMBINE_NORM_MAX_TOP_K),
        ]);
    }
}

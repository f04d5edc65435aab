// Matrix-vector products for a decode step's few rows: dense projections (gemv_rows) and
// the MoE's experts when few slots are routed.

// Few pairs (decode): each tile of at most MOE_MAX_GROUP positions is a group whose expert
// MLP runs as matrix-vector products, reading each weight row once for the whole group.
// A warp computes one output row: lane l reads 16-byte chunks l, l + 32, … of the bf16 row
// (widths must be multiples of 8) and the group's input rows straight from global memory
// (small, so cached), so weight loads start at once: staging the inputs in shared memory
// held every block behind a copy and a barrier first.
#define MOE_MAX_GROUP 4
// Chunks a lane loads before using any: one load at a time left the warp waiting on each
// (the kernels read weights at ~half the copy rate); 8 cover a 2048-wide row in one round.
#define LOADS_IN_FLIGHT 8

// Chunks c0, c0 + 32, … (LOADS of them, those below `chunks`) of a bf16 row as 16-byte
// words, all issued before any is used.
template <int LOADS = LOADS_IN_FLIGHT>
__device__ __forceinline__ void load_row_chunks(uint4* a, const uint4* row, int c0, int chunks) {
#pragma unroll
    for (int u = 0; u < LOADS; u++) {
        if (c0 + 32 * u < chunks) a[u] = row[c0 + 32 * u];
    }
}

__device__ __forceinline__ float dot8(uint4 w, const float* x) {
    return x[0] * __uint_as_float(w.x << 16) + x[1] * __uint_as_float(w.x & 0xffff0000u)
         + x[2] * __uint_as_float(w.y << 16) + x[3] * __uint_as_float(w.y & 0xffff0000u)
         + x[4] * __uint_as_float(w.z << 16) + x[5] * __uint_as_float(w.z & 0xffff0000u)
         + x[6] * __uint_as_float(w.w << 16) + x[7] * __uint_as_float(w.w & 0xffff0000u);
}

// The same product with 8 f32 values of x in global memory (16-byte aligned).
__device__ __forceinline__ float dot8_global(uint4 w, const float* x) {
    float v[8];
    load8(v, x);
    return dot8(w, v);
}


// The weight unit `unit` (a row, or a tile of `per_unit` rows) of up to three weights falls
// in: w, y and n become that weight's, and the unit's index in it is returned. Each weight's
// rows start a unit of their own.
__device__ __forceinline__ int pick_weight(int unit, int per_unit, const bf16_t*& w, float*& y,
                                           int& n, const bf16_t* w0, float* y0, int n0,
                                           const bf16_t* w1, float* y1, int n1,
                                           const bf16_t* w2, float* y2, int n2) {
    int units0 = (n0 + per_unit - 1) / per_unit, units1 = (n1 + per_unit - 1) / per_unit;
    w = w0, y = y0, n = n0;
    if (unit >= units0) {
        unit -= units0;
        w = w1, y = y1, n = n1;
        if (unit >= units1) {
            unit -= units1;
            w = w2, y = y2, n = n2;
        }
    }
    return unit;
}

// y_m[r, j] = x[r] · w_m[j] for the few rows of a decode step (rows <= GEMV_MAX_ROWS) and up
// to three projections of one x (a layer's q, k and v in one launch; n_m rows of w_m, 0 for
// an absent one): x f32 (no bf16 copy to make), w_m [n_m, k] bf16, k a multiple of 8. Each
// weight row is read once for every row of x, by `split` warps of one block (1, 2, 4 or 8)
// taking turns at its rounds of 32 · LOADS_IN_FLIGHT chunks: a launch of few long rows (a
// decode layer's o projection, 2048 rows of 4096 values) then runs in one wave of one round
// a warp. cuBLAS took 7-10 µs for each of a decode layer's 2-17 MB projections, a third of
// the copy rate. Four 256-thread blocks an SM (64 registers, no spill; 74 allowed three): a
// layer's q, k and v rows fill the GPU in fewer waves.
#define GEMV_MAX_ROWS 4
#define GEMV_WARPS 8
// The weight row this warp of a gemv launch reads a part of (`per_row` warps a row, in
// turn across up to three weights): w, y and n become that weight's, `part` the warp's part;
// the row's index in its weight is returned (n or more past its last row).
__device__ __forceinline__ int gemv_warp_row(int per_row, int& part, const bf16_t*& w, float*& y,
                                             int& n, const bf16_t* w0, float* y0, int n0,
                                             const bf16_t* w1, float* y1, int n1,
                                             const bf16_t* w2, float* y2, int n2) {
    int unit = blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5);
    part = unit % per_row;
    return pick_weight(unit / per_row, 1, w, y, n, w0, y0, n0, w1, y1, n1, w2, y2, n2);
}

extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32, 4)
    gemv_rows(const float* x, int rows, int k, int split, const bf16_t* w0, float* y0, int n0,
              const bf16_t* w1, float* y1, int n1, const bf16_t* w2, float* y2, int n2) {
    let_next_kernel_launch();
    const bf16_t* w;
    float* y;
    int n, part;
    int j = gemv_warp_row(split, part, w, y, n, w0, y0, n0, w1, y1, n1, w2, y2, n2);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    bool has_row = j < n;
    int chunks = k / 8;
    int first = lane + part * 32 * LOADS_IN_FLIGHT;
    const uint4* row = (const uint4*)(w + (size_t)j * k);
    // The first chunks of the weight row are read while the previous kernel finishes: no
    // kernel writes weights, and the row's first loads are most of a short launch's wait.
    uint4 a[LOADS_IN_FLIGHT];
    if (has_row) load_row_chunks(a, row, first, chunks);
    wait_for_previous_kernel();
    float acc[GEMV_MAX_ROWS] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int c0 = first; has_row && c0 < chunks; c0 += 32 * LOADS_IN_FLIGHT * split) {
        if (c0 != first) load_row_chunks(a, row, c0, chunks);
#pragma unroll
        for (int u = 0; u < LOADS_IN_FLIGHT; u++) {
            int c = c0 + 32 * u;
#pragma unroll
            for (int r = 0; r < GEMV_MAX_ROWS; r++) {
                if (c < chunks && r < rows) acc[r] += dot8_global(a[u], x + (size_t)r * k + c * 8);
            }
        }
    }
    // A row's parts meet in shared memory; the first part's warp writes it.
    __shared__ float partial[GEMV_WARPS][GEMV_MAX_ROWS];
#pragma unroll
    for (int r = 0; r < GEMV_MAX_ROWS; r++) {
        float v = warp_sum(acc[r]);
        if (lane == 0) partial[warp][r] = v;
    }
    if (split > 1) {
        __syncthreads();
    } else {
        __syncwarp();
    }
    if (!has_row || part != 0 || lane >= rows) return;
    float sum = 0.0f;
    for (int p = 0; p < split; p++) sum += partial[warp + p][lane];
    y[(size_t)lane * n + j] = sum;
}

// The same products for one row of x (a batch-1 step's projections), each weight row cut
// into `parts` parts (1, 2, 4 or 8, those past the row's chunks empty) of 32 ·
// GEMV_PART_LOADS chunks, a warp each, a row's parts meeting in shared memory. Short warps
// and eight blocks an SM (32 registers): 64 KB of loads in flight an SM, where gemv_rows
// cut into parts ran four blocks an SM, 32 KB, and slower (CUDA_NOTES v25). A batch-1 step's
// q/k/v read 20.2 → 16.1 µs from HBM this way, o 15.6 → 14.4 (v32).
#define GEMV_PART_LOADS 2
extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32, 6)
    gemv_row_parts(const float* x, int k, int parts, const bf16_t* w0, float* y0, int n0,
                   const bf16_t* w1, float* y1, int n1, const bf16_t* w2, float* y2, int n2) {
    let_next_kernel_launch();
    const bf16_t* w;
    float* y;
    int n, part;
    int j = gemv_warp_row(parts, part, w, y, n, w0, y0, n0, w1, y1, n1, w2, y2, n2);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    bool has_row = j < n;
    int chunks = k / 8;
    int c0 = lane + part * 32 * GEMV_PART_LOADS;
    // As in gemv_rows, the weights are read while the previous kernel finishes.
    uint4 a[GEMV_PART_LOADS];
    if (has_row) load_row_chunks<GEMV_PART_LOADS>(a, (const uint4*)(w + (size_t)j * k), c0, chunks);
    wait_for_previous_kernel();
    float acc = 0.0f;
#pragma unroll
    for (int u = 0; u < GEMV_PART_LOADS; u++) {
        int c = c0 + 32 * u;
        if (has_row && c < chunks) acc += dot8_global(a[u], x + c * 8);
    }
    acc = warp_sum(acc);
    __shared__ float partial[GEMV_WARPS];
    if (lane == 0) partial[warp] = acc;
    __syncthreads();
    if (!has_row || part != 0 || lane != 0) return;
    float sum = 0.0f;
    for (int p = 0; p < parts; p++) sum += partial[warp + p];
    y[j] = sum;
}

// The same products for up to GEMV_MMA_ROWS rows of x (a batch of 8) on the tensor cores:
// a block takes GEMV_MMA_TILE consecutive rows of one weight (a tile), its warps (8, or up
// to GEMV_MMA_MAX_WARPS for launches of fewer tiles than SMs) split k (warp w the 32-value
// blocks w, w + warps, …) and add their partial sums in shared memory. Each block of 32 k
// values is two mma.m16n8k16: A the tile's weight rows, B the rows of x (as bf16, zeros past
// `rows`). A thread loads 8 consecutive values of weight rows g and g + 8 and of x row g
// (g = lane / 4, at k0 + 8 (lane % 4)), and the instructions' k slots take them in an order
// A and B agree on, so no shuffle or shared staging is needed: x is read once a tile where
// a warp a weight row read all of x from L1 for each (eight rows of x: sixteen times the
// weight's bytes, and eight accumulators spilled under the 64-register cap). cuBLAS ran an
// 8-row step's q, k and v at about a third of the copy rate.
#define GEMV_MMA_ROWS 8
#define GEMV_MMA_TILE 16
#define GEMV_MMA_MAX_WARPS 16
// 32-value blocks of k a warp loads before using any.
#define GEMV_MMA_LOADS 4
// Registers capped for 768 threads an SM (80 used): three 256-thread blocks, so a layer's
// 320 q/k/v tiles run in one wave, or one of 512.
extern "C" __global__ void __launch_bounds__(768, 1)
    gemv_rows_mma(const float* x, int rows, int k, const bf16_t* w0, float* y0, int n0,
                  const bf16_t* w1, float* y1, int n1, const bf16_t* w2, float* y2, int n2) {
    let_next_kernel_launch();
    const bf16_t* w;
    float* y;
    int n;
    int j0 = pick_weight(blockIdx.x, GEMV_MMA_TILE, w, y, n, w0, y0, n0, w1, y1, n1, w2, y2, n2) *
             GEMV_MMA_TILE;
    int warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    int blocks = (k + 31) / 32;
    // Weight rows j0 + g and j0 + g + 8 (the last row again past n: loaded, never written).
    const bf16_t* lo = w + (size_t)min(j0 + g, n - 1) * k;
    const bf16_t* hi = w + (size_t)min(j0 + g + 8, n - 1) * k;
    uint4 a_lo[GEMV_MMA_LOADS], a_hi[GEMV_MMA_LOADS];
    auto load_weights = [&](int first) {
#pragma unroll
        for (int u = 0; u < GEMV_MMA_LOADS; u++) {
            int kk = (first + u * warps) * 32 + 8 * t;
            bool in = first + u * warps < blocks && kk < k;
            a_lo[u] = in ? *(const uint4*)(lo + kk) : make_uint4(0, 0, 0, 0);
            a_hi[u] = in ? *(const uint4*)(hi + kk) : make_uint4(0, 0, 0, 0);
        }
    };
    // No kernel writes weights: the first loads overlap the previous kernel's end.
    load_weights(warp);
    wait_for_previous_kernel();
    const float* xg = x + (size_t)g * k;
    float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int first = warp; first < blocks; first += warps * GEMV_MMA_LOADS) {
        if (first != warp) load_weights(first);
#pragma unroll
        for (int u = 0; u < GEMV_MMA_LOADS; u++) {
            int kk = (first + u * warps) * 32 + 8 * t;
            float xv[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
            if (g < rows && first + u * warps < blocks && kk < k) load8(xv, xg + kk);
            unsigned int b0[2] = {pack_bf16(xv[0], xv[1]), pack_bf16(xv[2], xv[3])};
            unsigned int b1[2] = {pack_bf16(xv[4], xv[5]), pack_bf16(xv[6], xv[7])};
            unsigned int f0[4] = {a_lo[u].x, a_hi[u].x, a_lo[u].y, a_hi[u].y};
            unsigned int f1[4] = {a_lo[u].z, a_hi[u].z, a_lo[u].w, a_hi[u].w};
            mma_bf16(c, f0, b0);
            mma_bf16(c, f1, b1);
        }
    }
    // c: tile rows g and g + 8, x rows 2t and 2t + 1; the warps' partial sums meet here.
    __shared__ float partial[GEMV_MMA_MAX_WARPS][GEMV_MMA_TILE][GEMV_MMA_ROWS];
    partial[warp][g][2 * t] = c[0];
    partial[warp][g][2 * t + 1] = c[1];
    partial[warp][g + 8][2 * t] = c[2];
    partial[warp][g + 8][2 * t + 1] = c[3];
    __syncthreads();
    if (threadIdx.x < GEMV_MMA_TILE * GEMV_MMA_ROWS) {
        int m = threadIdx.x / GEMV_MMA_ROWS, r = threadIdx.x % GEMV_MMA_ROWS;
        float sum = 0.0f;
        for (int v = 0; v < warps; v++) sum += partial[v][m][r];
        if (r < rows && j0 + m < n) y[(size_t)r * n + j0 + m] = sum;
    }
}

// Rows of `width` values of a group of up to GROUP: position j's row (the last repeated past
// count, unread).
template <int GROUP>
__device__ __forceinline__ void group_rows(const float** rows, const float* base,
                                           const int* row_of, int first, int count,
                                           int divisor, int width) {
#pragma unroll
    for (int j = 0; j < GROUP; j++) {
        int position = first + min(j, count - 1);
        int row = row_of ? row_of[position] / divisor : position;
        rows[j] = base + (size_t)row * width;
    }
}

// act[position, i] = silu(gate row i · x[t]) · (up row i · x[t]) for the positions of group
// blockIdx.x (t = sorted_slot[position] / top_k); grid (groups, ceil(inter · parts /
// GEMV_WARPS)), GEMV_WARPS warps a block. Rows i of gate and up are cut alike into `parts`
// parts (1, 2, 4 or 8) of 32 · GATE_UP_LOADS chunks, a warp each (longer rows in rounds of
// them), a row's parts meeting in shared memory: short warps, four blocks an SM (64 KB of
// loads in flight; five spilled at 48 registers). Blocks past the last group return.
#define GATE_UP_LOADS 2
template <int GROUP, int LOADS>
__device__ __forceinline__ void moe_gate_up_group(const float* x,
                                                  const unsigned long long* gate_up,
                                                  const int* offsets, const int* tiles,
                                                  const int* sorted_slot, float* act,
                                                  int group_size, int hidden, int inter,
                                                  int top_k, int parts) {
    // moe_down launches once every block here is past its wait, so the routing it reads
    // before its own wait (two kernels back) is complete.
    wait_for_previous_kernel();
    let_next_kernel_launch();
    int expert, first, count;
    if (!moe_tile(offsets, tiles, group_size, blockIdx.x, &expert, &first, &count)) return;
    count = min(count, GROUP);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int unit = blockIdx.y * GEMV_WARPS + warp;
    int i = unit / parts, part = unit % parts;
    bool has_row = i < inter;
    const float* xs[GROUP];
    group_rows<GROUP>(xs, x, sorted_slot, first, count, top_k, hidden);
    const bf16_t* w = (const bf16_t*)gate_up[expert];
    const uint4* gate = (const uint4*)(w + (size_t)i * hidden);
    const uint4* up = (const uint4*)(w + (size_t)(inter + i) * hidden);
    int chunks = hidden / 8;
    float gs[GROUP] = {}, us[GROUP] = {};
    for (int c0 = lane + part * 32 * LOADS; has_row && c0 < chunks;
         c0 += 32 * LOADS * parts) {
        uint4 a[LOADS], b[LOADS];
        load_row_chunks<LOADS>(a, gate, c0, chunks);
        load_row_chunks<LOADS>(b, up, c0, chunks);
#pragma unroll
        for (int u = 0; u < LOADS; u++) {
            int c = c0 + 32 * u;
#pragma unroll
            for (int j = 0; j < GROUP; j++) {
                if (c < chunks && j < count) {
                    float xv[8];
                    load8(xv, xs[j] + c * 8);
                    gs[j] += dot8(a[u], xv);
                    us[j] += dot8(b[u], xv);
                }
            }
        }
    }
    __shared__ float partial[2][GROUP][GEMV_WARPS];
#pragma unroll
    for (int j = 0; j < GROUP; j++) {
        float gv = warp_sum(gs[j]), uv = warp_sum(us[j]);
        if (lane == 0) partial[0][j][warp] = gv, partial[1][j][warp] = uv;
    }
    __syncthreads();
    if (!has_row || part != 0 || lane >= count) return;
    float gv = 0.0f, uv = 0.0f;
    for (int p = 0; p < parts; p++) gv += partial[0][lane][warp + p], uv += partial[1][lane][warp + p];
    act[(size_t)(first + lane) * inter + i] = gv / (1.0f + expf(-gv)) * uv;
}

extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32, 4)
    moe_gate_up(const float* x, const unsigned long long* gate_up, const int* offsets,
                const int* tiles, const int* sorted_slot, float* act, int group_size, int hidden,
                int inter, int top_k, int parts) {
    moe_gate_up_group<MOE_MAX_GROUP, GATE_UP_LOADS>(x, gate_up, offsets, tiles, sorted_slot, act,
                                                    group_size, hidden, inter, top_k, parts);
}

// One token's slots (a batch-1 step: an expert takes at most one of them, so a group is one
// slot): the same product with one slot's sums and parts of GATE_UP_ONE_LOADS loads a lane,
// four blocks an SM: 128 KB of loads in flight an SM. Loads in flight set the rate here, not
// warps: one load a lane at six blocks was slower than the group-of-four kernel, two at five
// and four at four faster (CUDA_NOTES v34-v36).
#define GATE_UP_ONE_LOADS 4
extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32, 4)
    moe_gate_up_one(const float* x, const unsigned long long* gate_up, const int* offsets,
                    const int* tiles, const int* sorted_slot, float* act, int group_size,
                    int hidden, int inter, int top_k, int parts) {
    moe_gate_up_group<1, GATE_UP_ONE_LOADS>(x, gate_up, offsets, tiles, sorted_slot, act,
                                            group_size, hidden, inter, top_k, parts);
}

// y[position, h] = down row h · act[position] for the positions of group blockIdx.x; a warp
// per DOWN_ROWS_PER_WARP rows h, grid (groups, ceil(hidden / (warps · DOWN_ROWS_PER_WARP))).
// Down rows are short (an expert's width: 768 values, 3 chunks a lane), so a warp loads
// several rows' chunks at once; a row a warp spent most of its time finding its tile.
#define DOWN_ROWS_PER_WARP 4
#define DOWN_LOADS 4
template <int GROUP, int LOADS>
__device__ __forceinline__ void moe_down_group(const float* act, const unsigned long long* down,
                                               const int* offsets, const int* tiles, bf16_t* y,
                                               int group_size, int hidden, int inter) {
    let_next_kernel_launch();
    // The tile table is moe_gate_up's input, complete once moe_down launches (moe_gate_up
    // lets it launch only past its own wait): the tile and the first weight chunks are read
    // while moe_gate_up finishes.
    int expert, first, count;
    int h0 = (blockIdx.y * (blockDim.x >> 5) + (threadIdx.x >> 5)) * DOWN_ROWS_PER_WARP;
    bool has_rows =
        moe_tile(offsets, tiles, group_size, blockIdx.x, &expert, &first, &count) && h0 < hidden;
    count = min(count, GROUP);
    const bf16_t* w = has_rows ? (const bf16_t*)__ldcg(down + expert) : nullptr;
    int lane = threadIdx.x & 31, chunks = inter / 8;
    uint4 a[DOWN_ROWS_PER_WARP][LOADS];
#pragma unroll
    for (int r = 0; r < DOWN_ROWS_PER_WARP; r++) {
        if (has_rows && h0 + r < hidden) {
            load_row_chunks<LOADS>(a[r], (const uint4*)(w + (size_t)(h0 + r) * inter), lane,
                                        chunks);
        }
    }
    wait_for_previous_kernel();
    if (!has_rows) return;
    const float* as[GROUP];
    group_rows<GROUP>(as, act, nullptr, first, count, 1, inter);
    float ds[DOWN_ROWS_PER_WARP][GROUP] = {};
    for (int c0 = lane; c0 < chunks; c0 += 32 * LOADS) {
        if (c0 != lane) {
#pragma unroll
            for (int r = 0; r < DOWN_ROWS_PER_WARP; r++) {
                if (h0 + r < hidden) {
                    load_row_chunks<LOADS>(a[r], (const uint4*)(w + (size_t)(h0 + r) * inter),
                                                c0, chunks);
                }
            }
        }
#pragma unroll
        for (int u = 0; u < LOADS; u++) {
            int c = c0 + 32 * u;
#pragma unroll
            for (int j = 0; j < GROUP; j++) {
                if (c < chunks && j < count) {
                    float av[8];
                    load8(av, as[j] + c * 8);
#pragma unroll
                    for (int r = 0; r < DOWN_ROWS_PER_WARP; r++) {
                        if (h0 + r < hidden) ds[r][j] += dot8(a[r][u], av);
                    }
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < DOWN_ROWS_PER_WARP; r++) {
#pragma unroll
        for (int j = 0; j < GROUP; j++) {
            if (h0 + r < hidden && j < count) {
                float d = warp_sum(ds[r][j]);
                if (lane == 0) y[(size_t)(first + j) * hidden + h0 + r] = f32_to_bf16(d);
            }
        }
    }
}

extern "C" __global__ void moe_down(const float* act, const unsigned long long* down,
                                    const int* offsets, const int* tiles, bf16_t* y,
                                    int group_size, int hidden, int inter) {
    moe_down_group<MOE_MAX_GROUP, DOWN_LOADS>(act, down, offsets, tiles, y, group_size, hidden,
                                              inter);
}

// One token's slots (see moe_gate_up_one): one slot's sums, and loads of 3 chunks a lane (a
// 768-wide row in one round), so three blocks an SM fit where two did.
extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32, 3)
    moe_down_one(const float* act, const unsigned long long* down, const int* offsets,
                 const int* tiles, bf16_t* y, int group_size, int hidden, int inter) {
    moe_down_group<1, 3>(act, down, offsets, tiles, y, group_size, hidden, inter);
}

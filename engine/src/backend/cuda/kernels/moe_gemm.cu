// The MoE's experts as grouped GEMMs on the tensor cores (mma.sync, and wgmma on sm_90a),
// and the weighted combine of their outputs.

// Many pairs (prefill, large decode batches): one grouped GEMM per projection on the tensor
// cores. Each block computes a GEMM_BM × GEMM_BN tile of rows of one expert (tile
// blockIdx.y of moe_tile) times that expert's weight rows (column block blockIdx.x), over k
// in GEMM_BK steps staged through shared memory by cp.async, GEMM_STAGES deep (dynamic
// shared memory, GEMM_SHARED_BYTES). Column blocks vary fastest, so those of one row tile
// run together and share its rows in L2 (with row tiles fastest, every column block read
// all the rows again from memory). Warps as GEMM_WARPS_M × GEMM_WARPS_N, each
// GEMM_MI × GEMM_NI mma.m16n8k16 (bf16 in, f32 accumulate) on fragments loaded by
// ldmatrix. Inputs are bf16 rows of k values, k a multiple of 8 (16-byte copies; a partial
// last step reads zeros).
#define GEMM_BM 128
#define GEMM_BN 128
#define GEMM_BK 64
#define GEMM_STAGES 3
// Shared row of GEMM_BK bf16 plus 8 of padding: ldmatrix's 8 row addresses then fall in
// different banks.
#define GEMM_LD (GEMM_BK + 8)
// Warps as GEMM_WARPS_M × GEMM_WARPS_N, each a (GEMM_BM / GEMM_WARPS_M) ×
// (GEMM_BN / GEMM_WARPS_N) tile of the block's (2 × 2 warps of 64 × 64 measured the same).
#define GEMM_WARPS_M 2
#define GEMM_WARPS_N 4
#define GEMM_THREADS (32 * GEMM_WARPS_M * GEMM_WARPS_N)
#define GEMM_MI (GEMM_BM / GEMM_WARPS_M / 16)
#define GEMM_NI (GEMM_BN / GEMM_WARPS_N / 8)
#define GEMM_SHARED_BYTES (GEMM_STAGES * (GEMM_BM + GEMM_BN) * GEMM_LD * 2)
// Rows of each tile a thread copies a stage: one 16-byte chunk of each.
#define GEMM_COPIES (GEMM_BM * GEMM_BK / 8 / GEMM_THREADS)

// SWIGLU: the expert's matrix holds `n` gate rows then `n` up rows, and block column j
// computes gate and up rows j · 64 … j · 64 + 63 together, writing silu(gate) · up as bf16
// to `act` ([rows, n]). Otherwise it computes rows j · 128 … of an [n, k] matrix into f32 `c`.
// Where row r of a grouped GEMM's A (r < BM) and B tiles comes from, null past the expert's
// rows or the matrix: row p of the expert's rows is row a_rows[p] / a_row_divisor of `a`
// when a_rows is given (a token's row gathered for each of its slots), else row m0 + p; B
// rows are weight rows of column block blockIdx.x (for SWIGLU, runs of SWIGLU_RUN gate rows
// then the same columns' up rows). `threads` threads share the work; the caller
// synchronizes.
template <bool SWIGLU, int BM = GEMM_BM, int SWIGLU_RUN = GEMM_BN / 2>
__device__ __forceinline__ void gemm_row_sources(const bf16_t** row_src, const bf16_t* a,
                                                 const int* a_rows, int a_row_divisor,
                                                 const bf16_t* w, int rows, int m0, int n,
                                                 int k, int thread, int threads) {
    for (int r = thread; r < BM + GEMM_BN; r += threads) {
        const bf16_t* src = nullptr;
        if (r < BM) {
            if (r < rows) src = a + (size_t)(a_rows ? a_rows[m0 + r] / a_row_divisor : m0 + r) * k;
        } else {
            int b_row = r - BM, row;
            if (SWIGLU) {
                int run = b_row / (2 * SWIGLU_RUN), in_run = b_row % (2 * SWIGLU_RUN);
                int col = blockIdx.x * (GEMM_BN / 2) + run * SWIGLU_RUN + in_run % SWIGLU_RUN;
                row = col >= n ? -1 : (in_run < SWIGLU_RUN ? col : n + col);
            } else {
                row = blockIdx.x * GEMM_BN + b_row;
                if (row >= n) row = -1;
            }
            if (row >= 0) src = w + (size_t)row * k;
        }
        row_src[r] = src;
    }
}

// The 16-byte chunks one thread copies each stage: chunk `column` of rows first_row + i ·
// row_step of the A and B tiles (of A's BM rows fewer), their sources from gemm_row_sources
// (null past the rows or the matrix), held in registers rather than read from the table at
// every stage (the barriers keep the compiler from hoisting those loads).
template <int BM = GEMM_BM>
struct GemmCopies {
    static constexpr int A_COPIES = BM * GEMM_BK / 8 / GEMM_THREADS;
    const bf16_t* a_src[A_COPIES];
    const bf16_t* b_src[GEMM_COPIES];
    __device__ __forceinline__ GemmCopies(const bf16_t* const* row_src, int first_row,
                                          int row_step, int column) {
#pragma unroll
        for (int i = 0; i < A_COPIES; i++) {
            const bf16_t* src = row_src[first_row + i * row_step];
            a_src[i] = src ? src + column : nullptr;
        }
#pragma unroll
        for (int i = 0; i < GEMM_COPIES; i++) {
            const bf16_t* src = row_src[BM + first_row + i * row_step];
            b_src[i] = src ? src + column : nullptr;
        }
    }
    // Queues one stage's copies, values [k0 + column, k0 + column + 8) of each row, to a_dst
    // and b_dst plus i · row_step · row_bytes; zeros past k (`in_k`: every output reads
    // them; such a copy names `a` or `w`, unread). Rows past the tile or the matrix are not
    // copied: their stale values reach only output rows or columns no epilogue stores, and
    // zero-filling them crowded the copy queue (MIO) the tiles' real rows go through.
    __device__ __forceinline__ void queue(const bf16_t* a, const bf16_t* w, unsigned int a_dst,
                                          unsigned int b_dst, int row_bytes, int row_step,
                                          int k0, bool in_k) const {
#pragma unroll
        for (int i = 0; i < GEMM_COPIES; i++) {
            unsigned int at = i * row_step * row_bytes;
            if (i < A_COPIES && a_src[i]) {
                copy16_async_to(a_dst + at, in_k ? a_src[i] + k0 : a, in_k);
            }
            if (b_src[i]) copy16_async_to(b_dst + at, in_k ? b_src[i] + k0 : w, in_k);
        }
    }
};

// Queues step `step`'s copies (load(stage, k0) of k values k0 …) into stage step % stages as
// one commit group, empty past the last step, so every step waits for its own group alike.
template <typename Load>
__device__ __forceinline__ void queue_gemm_step(const Load& load, int step, int steps,
                                                int stages = GEMM_STAGES) {
    if (step < steps) load(step % stages, step * GEMM_BK);
    copies_commit();
}

template <bool SWIGLU>
__device__ __forceinline__ void grouped_gemm(const bf16_t* a, const int* a_rows, int a_row_divisor,
                                             const unsigned long long* matrices,
                                             const int* offsets, const int* tiles, int n, int k,
                                             bf16_t* c, bf16_t* act) {
    extern __shared__ __align__(16) unsigned char gemm_shared[];
    int expert, m0, rows;
    if (!moe_tile(offsets, tiles, GEMM_BM, blockIdx.y, &expert, &m0, &rows)) {
        return;
    }
    const bf16_t* w = (const bf16_t*)matrices[expert];
    typedef bf16_t ATile[GEMM_BM][GEMM_LD];
    typedef bf16_t BTile[GEMM_BN][GEMM_LD];
    ATile* as = (ATile*)gemm_shared;
    BTile* bs = (BTile*)(gemm_shared + GEMM_STAGES * sizeof(ATile));
    int tid = threadIdx.x;
    int warp = tid >> 5, lane = tid & 31;
    int warp_m = warp / GEMM_WARPS_N, warp_n = warp % GEMM_WARPS_N;
    int g = lane >> 2, t = lane & 3;
    __shared__ const bf16_t* row_src[GEMM_BM + GEMM_BN];
    gemm_row_sources<SWIGLU>(row_src, a, a_rows, a_row_divisor, w, rows, m0, n, k, tid,
                             GEMM_THREADS);
    __syncthreads();
    // Thread tid copies chunk `chunk` of rows first_row + i · row_step of both tiles.
    const int row_step = GEMM_THREADS / (GEMM_BK / 8);
    int chunk = (tid % (GEMM_BK / 8)) * 8;
    int first_row = tid / (GEMM_BK / 8);
    unsigned int a_dst = shared_address(&as[0][first_row][chunk]);
    unsigned int b_dst = shared_address(&bs[0][first_row][chunk]);
    const GemmCopies<> copies(row_src, first_row, row_step, chunk);
    auto load = [&](int stage, int k0) {
        copies.queue(a, w, a_dst + stage * sizeof(ATile), b_dst + stage * sizeof(BTile),
                     GEMM_LD * 2, row_step, k0, k0 + chunk < k);
    };
    float acc[GEMM_MI][GEMM_NI][4];
#pragma unroll
    for (int mi = 0; mi < GEMM_MI; mi++)
#pragma unroll
        for (int ni = 0; ni < GEMM_NI; ni++)
#pragma unroll
            for (int q = 0; q < 4; q++) acc[mi][ni][q] = 0.0f;
    // ldmatrix row addresses. A, a 16 × 16 fragment: row lane % 16, columns 8 (lane / 16) ….
    // B, two n8 fragments: row lane % 8 + 8 (lane / 16), columns 8 ((lane / 8) % 2) ….
    const int warp_rows = GEMM_MI * 16, warp_cols = GEMM_NI * 8;
    int a_row = warp_m * warp_rows + (lane & 15), a_col = (lane >> 4) * 8;
    int b_row = warp_n * warp_cols + (lane & 7) + ((lane >> 4) << 3);
    int b_col = ((lane >> 3) & 1) * 8;
    int steps = (k + GEMM_BK - 1) / GEMM_BK;
#pragma unroll
    for (int s = 0; s < GEMM_STAGES - 1; s++) queue_gemm_step(load, s, steps);
    for (int step = 0; step < steps; step++) {
        copies_wait<GEMM_STAGES - 2>();
        __syncthreads();
        queue_gemm_step(load, step + GEMM_STAGES - 1, steps);
        int stage = step % GEMM_STAGES;
#pragma unroll
        for (int ks = 0; ks < GEMM_BK; ks += 16) {
            unsigned int af[GEMM_MI][4], bf[GEMM_NI][2];
#pragma unroll
            for (int mi = 0; mi < GEMM_MI; mi++) {
                load_matrices_x4(af[mi], &as[stage][a_row + mi * 16][a_col + ks]);
            }
#pragma unroll
            for (int pair = 0; pair < GEMM_NI / 2; pair++) {
                unsigned int r[4];
                load_matrices_x4(r, &bs[stage][b_row + pair * 16][b_col + ks]);
                bf[2 * pair][0] = r[0];
                bf[2 * pair][1] = r[1];
                bf[2 * pair + 1][0] = r[2];
                bf[2 * pair + 1][1] = r[3];
            }
#pragma unroll
            for (int mi = 0; mi < GEMM_MI; mi++)
#pragma unroll
                for (int ni = 0; ni < GEMM_NI; ni++) mma_bf16(acc[mi][ni], af[mi], bf[ni]);
        }
    }
    if (!SWIGLU) {
#pragma unroll
        for (int mi = 0; mi < GEMM_MI; mi++) {
#pragma unroll
            for (int ni = 0; ni < GEMM_NI; ni++) {
                int r = warp_m * warp_rows + mi * 16 + g;
                int col = blockIdx.x * GEMM_BN + warp_n * warp_cols + ni * 8 + t * 2;
                if (col >= n) continue;
                if (r < rows) {
                    *(unsigned int*)(c + (size_t)(m0 + r) * n + col) =
                        pack_bf16(acc[mi][ni][0], acc[mi][ni][1]);
                }
                if (r + 8 < rows) {
                    *(unsigned int*)(c + (size_t)(m0 + r + 8) * n + col) =
                        pack_bf16(acc[mi][ni][2], acc[mi][ni][3]);
                }
            }
        }
        return;
    }
    // Gate and up of one column sit in different warps: meet in shared memory.
    copies_wait<0>();
    __syncthreads();
    typedef float CTile[GEMM_BN + 4];
    CTile* cs = (CTile*)gemm_shared;
#pragma unroll
    for (int mi = 0; mi < GEMM_MI; mi++) {
#pragma unroll
        for (int ni = 0; ni < GEMM_NI; ni++) {
            int r = warp_m * warp_rows + mi * 16 + g;
            int col = warp_n * warp_cols + ni * 8 + t * 2;
            *(float2*)&cs[r][col] = make_float2(acc[mi][ni][0], acc[mi][ni][1]);
            *(float2*)&cs[r + 8][col] = make_float2(acc[mi][ni][2], acc[mi][ni][3]);
        }
    }
    __syncthreads();
    for (int i = tid; i < GEMM_BM * (GEMM_BN / 2); i += GEMM_THREADS) {
        int r = i / (GEMM_BN / 2);
        int local = i % (GEMM_BN / 2);
        int col = blockIdx.x * (GEMM_BN / 2) + local;
        if (r < rows && col < n) {
            float gate = cs[r][local];
            float up = cs[r][GEMM_BN / 2 + local];
            act[(size_t)(m0 + r) * n + col] = f32_to_bf16(gate / (1.0f + expf(-gate)) * up);
        }
    }
}

// act[position] = silu(x[token] · gateᵀ) · (x[token] · upᵀ) as bf16, the token of the slot
// at each position (sorted_slot / top_k) gathered from x ([tokens, hidden] bf16); grid
// (ceil(inter / 64), tiles upper bound).
extern "C" __global__ void __launch_bounds__(GEMM_THREADS, 2)
    moe_gemm_gate_up(const bf16_t* x, const int* sorted_slot, int top_k,
                     const unsigned long long* gate_up, const int* offsets, const int* tiles,
                     int inter, int hidden, bf16_t* act) {
    after_previous_kernel();
    grouped_gemm<true>(x, sorted_slot, top_k, gate_up, offsets, tiles, inter, hidden, nullptr,
                       act);
}

// y[position] = act[position] · downᵀ as bf16 (half the bytes moe_combine reads);
// grid (ceil(hidden / 128), tiles upper bound).
extern "C" __global__ void __launch_bounds__(GEMM_THREADS, 2)
    moe_gemm_down(const bf16_t* act, const unsigned long long* down, const int* offsets,
                  const int* tiles, int hidden, int inter, bf16_t* y) {
    after_previous_kernel();
    grouped_gemm<false>(act, nullptr, 1, down, offsets, tiles, hidden, inter, y, nullptr);
}

// The same GEMMs on Hopper's warpgroup tensor-core instructions (sm_90a: wgmma reads both
// operands from shared memory, where mma.sync kernels spend most of their instructions
// loading fragments). Two warpgroups per 128 × 128 tile, each 64 rows × 128 columns as
// wgmma m64n128k16; tiles stored 128-byte swizzled (16-byte chunk c of row r at chunk
// c ^ (r % 8)), the layout the matrix descriptors name. For SWIGLU a thread holds a gate
// column and its up column (n8 blocks j and j + 8), so the activation needs no shared memory.
//
// Narrow tiles (BM = WGMMA_NARROW_BM) are for a decode batch's few rows an expert: 64 rows,
// the two warpgroups on the same rows and half the columns each (m64n64k16; for SWIGLU the
// B rows in runs of 32 gate then 32 up rows, so each half holds whole gate/up pairs, n8
// blocks j and j + 4). Without A's unused rows a stage is 24 KB, so two blocks an SM keep
// WGMMA_NARROW_STAGES stages: three in flight a block, not two, where the wide tiles read
// weights at ~80% of the copy rate with 64 KB an SM in flight.
#define WGMMA_STAGE_BYTES ((GEMM_BM + GEMM_BN) * GEMM_BK * 2)
// Stages plus slack to align them to the 1024-byte swizzle pattern.
#define WGMMA_SHARED_BYTES (GEMM_STAGES * WGMMA_STAGE_BYTES + 1024)
#define WGMMA_NARROW_BM 64
#define WGMMA_NARROW_STAGES 4
#define WGMMA_NARROW_STAGE_BYTES ((WGMMA_NARROW_BM + GEMM_BN) * GEMM_BK * 2)
#define WGMMA_NARROW_SHARED_BYTES (WGMMA_NARROW_STAGES * WGMMA_NARROW_STAGE_BYTES + 1024)

template <bool SWIGLU, int BM>
__device__ __forceinline__ void grouped_gemm_wgmma(const bf16_t* a, const int* a_rows,
                                                   int a_row_divisor,
                                                   const unsigned long long* matrices,
                                                   const int* offsets, const int* tiles, int n,
                                                   int k, bf16_t* c, bf16_t* act) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    constexpr bool NARROW = BM == WGMMA_NARROW_BM;
    constexpr int STAGES = NARROW ? WGMMA_NARROW_STAGES : GEMM_STAGES;
    constexpr int STAGE_BYTES = (BM + GEMM_BN) * GEMM_BK * 2;
    // A warpgroup's n8 blocks of columns (its accumulators: four each).
    constexpr int N8 = NARROW ? GEMM_BN / 16 : GEMM_BN / 8;
    extern __shared__ __align__(16) unsigned char gemm_shared[];
    __shared__ const bf16_t* row_src[BM + GEMM_BN];
    int expert, m0, rows;
    if (!moe_tile(offsets, tiles, BM, blockIdx.y, &expert, &m0, &rows)) {
        return;
    }
    const bf16_t* w = (const bf16_t*)matrices[expert];
    int tid = threadIdx.x;
    gemm_row_sources<SWIGLU, BM, NARROW ? GEMM_BN / 4 : GEMM_BN / 2>(
        row_src, a, a_rows, a_row_divisor, w, rows, m0, n, k, tid, GEMM_THREADS);
    __syncthreads();
    // Stage s: A rows at base + s · STAGE_BYTES, B rows BM · 128 bytes after.
    unsigned int base = (shared_address(gemm_shared) + 1023) & ~1023u;
    const int row_step = GEMM_THREADS / (GEMM_BK / 8);
    int chunk = tid % (GEMM_BK / 8);
    int first_row = tid / (GEMM_BK / 8);
    // row_step is a multiple of 8, so every row this thread copies swizzles its chunk alike.
    unsigned int dst = base + first_row * 128 + ((chunk ^ (first_row & 7)) << 4);
    const GemmCopies<BM> copies(row_src, first_row, row_step, chunk * 8);
    auto load = [&](int stage, int k0) {
        unsigned int at = dst + stage * STAGE_BYTES;
        copies.queue(a, w, at, at + BM * 128, 128, row_step, k0, k0 + chunk * 8 < k);
    };
    float d[4 * N8];
#pragma unroll
    for (int i = 0; i < 4 * N8; i++) d[i] = 0.0f;
    int warpgroup = tid >> 7;
    int steps = (k + GEMM_BK - 1) / GEMM_BK;
#pragma unroll
    for (int s = 0; s < STAGES - 1; s++) queue_gemm_step(load, s, steps, STAGES);
    // Each step's wgmmas run while the next step's copies are queued and waited for: a
    // warpgroup waits only for the step before (wait_group 1), and the stage that step read
    // is refilled once every warpgroup is past that wait. Waiting for each step's own
    // wgmmas left the tensor cores idle through every barrier and copy issue.
    for (int step = 0; step < steps; step++) {
        copies_wait<STAGES - 2>();
        // The copies were generic-proxy writes; wgmma reads through the async proxy.
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        __syncthreads();
        unsigned int stage = base + (step % STAGES) * STAGE_BYTES;
        asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
        for (int ks = 0; ks < GEMM_BK / 16; ks++) {
            // 16 k values are 32 bytes along the swizzled row.
            if (NARROW) {
                wgmma_m64n64k16(d, wgmma_descriptor(stage + ks * 32),
                                wgmma_descriptor(stage + (BM + warpgroup * 64) * 128 + ks * 32));
            } else {
                wgmma_m64n128k16(d, wgmma_descriptor(stage + warpgroup * 64 * 128 + ks * 32),
                                 wgmma_descriptor(stage + BM * 128 + ks * 32));
            }
        }
        asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
        asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
        __syncthreads();
        // Stage (step + STAGES - 1) % STAGES is the one the last step read.
        queue_gemm_step(load, step + STAGES - 1, steps, STAGES);
    }
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
    // d[4j + e]: row 16 (warp % 4) + g (+ 8 for e >= 2) of the warpgroup's 64, column
    // 8j + 2t (+ 1 for odd e) of its columns.
    int lane = tid & 31, g = lane >> 2, t = lane & 3;
    int row = (NARROW ? 0 : warpgroup * 64) + ((tid >> 5) & 3) * 16 + g;
#pragma unroll
    for (int half = 0; half < 2; half++) {
        int r = row + 8 * half;
        if (r >= rows) continue;
        if (SWIGLU) {
#pragma unroll
            for (int j = 0; j < N8 / 2; j++) {
                int col = blockIdx.x * (GEMM_BN / 2) + (NARROW ? warpgroup * GEMM_BN / 4 : 0) +
                          8 * j + 2 * t;
                if (col >= n) continue;
                float out[2];
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    float gate = d[4 * j + 2 * half + e];
                    float up = d[4 * (j + N8 / 2) + 2 * half + e];
                    out[e] = gate / (1.0f + expf(-gate)) * up;
                }
                *(unsigned int*)(act + (size_t)(m0 + r) * n + col) = pack_bf16(out[0], out[1]);
            }
        } else {
#pragma unroll
            for (int j = 0; j < N8; j++) {
                int col = blockIdx.x * GEMM_BN + (NARROW ? warpgroup * GEMM_BN / 2 : 0) + 8 * j +
                          2 * t;
                if (col >= n) continue;
                *(unsigned int*)(c + (size_t)(m0 + r) * n + col) =
                    pack_bf16(d[4 * j + 2 * half], d[4 * j + 2 * half + 1]);
            }
        }
    }
#else
    __trap();  // launched only on devices the kernels were built for as sm_90a
#endif
}

// The gate/up and down GEMMs of BM-row tiles (GEMM_BM, or WGMMA_NARROW_BM).
#define MOE_WGMMA_KERNELS(gate_up_name, down_name, bm)                                        \
    extern "C" __global__ void __launch_bounds__(GEMM_THREADS, 2)                             \
        gate_up_name(const bf16_t* x, const int* sorted_slot, int top_k,                      \
                     const unsigned long long* gate_up, const int* offsets, const int* tiles, \
                     int inter, int hidden, bf16_t* act) {                                    \
        after_previous_kernel();                                                              \
        grouped_gemm_wgmma<true, bm>(x, sorted_slot, top_k, gate_up, offsets, tiles, inter,   \
                                     hidden, nullptr, act);                                   \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(GEMM_THREADS, 2)                             \
        down_name(const bf16_t* act, const unsigned long long* down, const int* offsets,      \
                  const int* tiles, int hidden, int inter, bf16_t* y) {                       \
        after_previous_kernel();                                                              \
        grouped_gemm_wgmma<false, bm>(act, nullptr, 1, down, offsets, tiles, hidden, inter, y, \
                                      nullptr);                                               \
    }
MOE_WGMMA_KERNELS(moe_wgmma_gate_up, moe_wgmma_down, GEMM_BM)
MOE_WGMMA_KERNELS(moe_wgmma_narrow_gate_up, moe_wgmma_narrow_down, WGMMA_NARROW_BM)

// A token's experts as rms_norm_run's delta (rows.cu): its top_k (at most
// COMBINE_NORM_MAX_TOP_K) rows of y weighted and summed in slot order, the arithmetic of
// moe_combine below. The rows and weights sit in registers and each step issues every row's
// load before it adds any, so a step waits for memory once, not top_k times.
#define COMBINE_NORM_MAX_TOP_K 8
struct ExpertsDelta {
    static constexpr bool adds = true;
    const bf16_t* y;
    int hidden, top_k;
    int rows[COMBINE_NORM_MAX_TOP_K];
    float weights[COMBINE_NORM_MAX_TOP_K];
    __device__ bool aligned() const { return (hidden & 3) == 0; }
    __device__ float4 four(int i) const {
        uint2 packed[COMBINE_NORM_MAX_TOP_K];
#pragma unroll
        for (int j = 0; j < COMBINE_NORM_MAX_TOP_K; j++) {
            if (j < top_k) packed[j] = *(const uint2*)(y + (size_t)rows[j] * hidden + i);
        }
        float4 sum = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
        for (int j = 0; j < COMBINE_NORM_MAX_TOP_K; j++) {
            if (j < top_k) {
                float w = weights[j];
                sum.x += w * __uint_as_float(packed[j].x << 16);
                sum.y += w * __uint_as_float(packed[j].x & 0xffff0000u);
                sum.z += w * __uint_as_float(packed[j].y << 16);
                sum.w += w * __uint_as_float(packed[j].y & 0xffff0000u);
            }
        }
        return sum;
    }
    __device__ float one(int i) const {
        float sum = 0.0f;
#pragma unroll
        for (int j = 0; j < COMBINE_NORM_MAX_TOP_K; j++) {
            if (j < top_k) sum += weights[j] * bf16_to_f32(y[(size_t)rows[j] * hidden + i]);
        }
        return sum;
    }
};

// moe_combine and the add_rms_norm after it in one pass, one block a token: h += its experts'
// weighted sum, then out = RMSNorm(h) · weight (and out16 where given, see rms_norm_run). Saves
// the combine's launch and its output's write and read. top_k <= COMBINE_NORM_MAX_TOP_K.
extern "C" __global__ void moe_combine_add_rms_norm(const bf16_t* y, const int* slot_position,
                                                    const float* weights, float* h,
                                                    const float* weight, float* out,
                                                    bf16_t* out16, int hidden, int top_k,
                                                    float eps) {
    after_previous_kernel();
    size_t at = (size_t)blockIdx.x * hidden, first = (size_t)blockIdx.x * top_k;
    ExpertsDelta experts;
    experts.y = y;
    experts.hidden = hidden;
    experts.top_k = top_k;
#pragma unroll
    for (int j = 0; j < COMBINE_NORM_MAX_TOP_K; j++) {
        experts.rows[j] = j < top_k ? slot_position[first + j] : 0;
        experts.weights[j] = j < top_k ? weights[first + j] : 0.0f;
    }
    rms_norm_run(h + at, experts, weight, out + at, out16 ? out16 + at : nullptr, hidden, eps);
}

// out[t] = sum over j < top_k of weights[t · top_k + j] · y[slot_position[t · top_k + j]], in
// slot order; one block per token, 8 columns a thread at a time (16-byte loads of y) when
// hidden is a multiple of 8 (two-byte loads ran at ~30% of the copy rate).
extern "C" __global__ void moe_combine(const bf16_t* y, const int* slot_position,
                                       const float* weights, float* out, int hidden, int top_k) {
    after_previous_kernel();
    size_t first = (size_t)blockIdx.x * top_k;
    float* dst = out + (size_t)blockIdx.x * hidden;
    if ((hidden & 7) == 0) {
        for (int c = threadIdx.x * 8; c < hidden; c += blockDim.x * 8) {
            float sum[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
            for (int j = 0; j < top_k; j++) {
                float w = weights[first + j];
                uint4 packed = *(const uint4*)(y + (size_t)slot_position[first + j] * hidden + c);
                const unsigned int words[4] = {packed.x, packed.y, packed.z, packed.w};
#pragma unroll
                for (int e = 0; e < 8; e++) {
                    bf16_t h = (bf16_t)(words[e >> 1] >> (16 * (e & 1)));
                    sum[e] += w * bf16_to_f32(h);
                }
            }
            *(float4*)(dst + c) = make_float4(sum[0], sum[1], sum[2], sum[3]);
            *(float4*)(dst + c + 4) = make_float4(sum[4], sum[5], sum[6], sum[7]);
        }
        return;
    }
    for (int h = threadIdx.x; h < hidden; h += blockDim.x) {
        float sum = 0.0f;
        for (int j = 0; j < top_k; j++) {
            sum += weights[first + j] *
                   bf16_to_f32(y[(size_t)slot_position[first + j] * hidden + h]);
        }
        dst[h] = sum;
    }
}

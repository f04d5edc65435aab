// Prefill attention on the tensor cores (flash-attention 2 form): one block of 4 warps per
// (head, tile of up to FLASH_Q_TILE query rows of one sequence), each warp 16 rows. Keys and
// values come from the paged cache FLASH_K_TILE at a time through cp.async into two stages
// of dynamic shared memory (FLASH_SHARED_BYTES): the next tile loads while this one
// computes. Scores S = Q·Kᵀ stay in mma accumulators; the online softmax runs on them in
// registers (a row's values sit in one quad of lanes), and the probabilities, rounded to
// bf16, are reused in place as the A operand of O += P·V. Key and value fragments come
// through ldmatrix (values transposed). Queries arrive pre-scaled by log2(e)/sqrt(head_dim),
// so exp2 gives the softmax. head_dim a multiple of 16, at most FLASH_MAX_HEAD_DIM.
// Registers are capped so three blocks (12 warps) share an SM, which shared memory also
// allows. Where out16 is given, the output goes there in bf16 too (the o projection's GEMM
// input, which to_bf16 would otherwise make by reading the output back).
//
// The attention kernels come built for head_dim 128 (`_hd128`, the MoE families') besides
// any head_dim (template argument 0): with the size known the loops unroll without a test per
// step, which took most of the generic kernel's instructions.
#define FLASH_Q_TILE 64
#define FLASH_K_TILE 64
#define FLASH_MAX_HEAD_DIM 128
#define FLASH_LD (FLASH_MAX_HEAD_DIM + 8)
#define FLASH_THREADS 128
#define FLASH_SHARED_BYTES (2 * 2 * FLASH_K_TILE * FLASH_LD * 2)

// 2^x in one instruction (the scores are finite or -inf, whose power is 0).
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ float quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

typedef bf16_t KvTile[FLASH_LD];

// The cache slots of positions [first, first + FLASH_K_TILE) of a sequence (its block table
// `table`) into `slots`, one division a row shared by every copy of it. Positions past `last`
// take last's slot: finite values the scores mask (a probability of 0 times a stale value
// that happened to be NaN would not be 0).
__device__ __forceinline__ void find_slots(int* slots, const int* table, int block_size,
                                           int first, int last, int thread, int threads) {
    for (int j = thread; j < FLASH_K_TILE; j += threads) {
        int position = min(first + j, last);
        int block = position / block_size;
        slots[j] = table[block] * block_size + position - block * block_size;
    }
}

// Queues copies of one KV head's keys and values at the cache slots `slots` (from
// find_slots) into ks and vs: two commit groups, keys then values. THREADS
// threads share the copies, each keeping one 16-byte column. SWIZZLED stores both as the
// warpgroup instructions read them (see prefill_attention's WGMMA), else padded rows.
// RANGED copies only rows from … to - 1 (decode loads a tile's cached keys before its
// previous kernel is done, and the newest key after).
template <int THREADS, int HD, bool SWIZZLED = false, bool RANGED = false>
__device__ __forceinline__ void load_kv_tiles(KvTile* ks, KvTile* vs, const bf16_t* k_cache,
                                              const bf16_t* v_cache, const int* slots,
                                              int kv_width, int kv_head, int head_dim,
                                              int thread, int from = 0,
                                              int to = FLASH_K_TILE) {
    const int hd = HD ? HD : head_dim;
    const int chunks = hd / 8;
    const int row_step = THREADS / chunks;
    const int rows = (FLASH_K_TILE + row_step - 1) / row_step;
    const bool whole = rows * row_step == FLASH_K_TILE;
    int j0 = thread / chunks;
    int c = (thread - j0 * chunks) * 8;
    for (int pass = 0; pass < 2; pass++) {
        const bf16_t* cache = (pass == 0 ? k_cache : v_cache) + kv_head * hd + c;
        KvTile* tile = pass == 0 ? ks : vs;
        if (j0 < row_step) {
            // Swizzled, row_step is a multiple of 8, so every row this thread copies
            // swizzles its chunk alike.
            int chunk = c / 8;
            unsigned int dst =
                SWIZZLED ? shared_address(tile) + (chunk >> 3) * (FLASH_K_TILE * 128) + j0 * 128 +
                               (((chunk & 7) ^ (j0 & 7)) << 4)
                         : shared_address(&tile[j0][c]);
            int row_bytes = SWIZZLED ? 128 : (int)sizeof(KvTile);
#pragma unroll
            for (int i = 0; i < rows; i++) {
                int j = j0 + i * row_step;
                if ((whole || j < FLASH_K_TILE) && (!RANGED || (j >= from && j < to))) {
                    copy16_async_to(dst + i * row_step * row_bytes,
                                    cache + (size_t)slots[j] * kv_width, true);
                }
            }
        }
        copies_commit();
    }
}

// -inf for scores of keys (positions from `first`) past the lane's rows' `limit`s when
// `masked`; `tile_max` gets each of the lane's two rows' largest score.
__device__ __forceinline__ void mask_scores(float (*s)[4], float* tile_max, int first,
                                            const int* limit, bool masked, int t) {
    tile_max[0] = tile_max[1] = NEG_INF;
#pragma unroll
    for (int n = 0; n < FLASH_K_TILE / 8; n++) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
            if (masked && first + n * 8 + t * 2 + (e & 1) > limit[e >> 1]) s[n][e] = NEG_INF;
            tile_max[e >> 1] = fmaxf(tile_max[e >> 1], s[n][e]);
        }
    }
}

// s = Q · Kᵀ for one 16-row query fragment (qf, head_dim / 16 steps) and the tile's keys
// (positions from `first`), -inf for keys past the lane's rows' `limit`s when `masked` (a
// tile wholly in every row's past needs no mask); `tile_max` gets each of the lane's two
// rows' largest score.
template <int HD>
__device__ __forceinline__ void tile_scores(float (*s)[4], float* tile_max,
                                            const unsigned int (*qf)[4], const KvTile* ks,
                                            int head_dim, int first, const int* limit,
                                            bool masked, int lane) {
    const int steps = (HD ? HD : head_dim) / 16;
    int t = lane & 3;
    // Matrix m of an x4 load: key rows n · 8 …, columns 8 m … of a pair of k steps.
    const bf16_t* key_row = &ks[lane & 7][(lane >> 3) * 8];
#pragma unroll
    for (int n = 0; n < FLASH_K_TILE / 8; n++) {
#pragma unroll
        for (int e = 0; e < 4; e++) s[n][e] = 0.0f;
    }
    // k steps outermost: the eight key groups' accumulations are independent, so their mmas
    // overlap instead of waiting on each other.
#pragma unroll
    for (int st = 0; st < FLASH_MAX_HEAD_DIM / 16; st += 2) {
#pragma unroll
        for (int n = 0; n < FLASH_K_TILE / 8; n++) {
            unsigned int b[4];
            if (st + 1 < steps) {
                load_matrices_x4(b, key_row + n * 8 * FLASH_LD + st * 16);
                mma_bf16(s[n], qf[st], b);
                mma_bf16(s[n], qf[st + 1], b + 2);
            } else if (st < steps) {
                load_matrices_x2(b, key_row + n * 8 * FLASH_LD + st * 16);
                mma_bf16(s[n], qf[st], b);
            }
        }
    }
    mask_scores(s, tile_max, first, limit, masked, t);
}

// Scores to softmax numerators in place, exp2(s - row max), added to the lane's row sums.
__device__ __forceinline__ void exponentiate(float (*s)[4], const float* row_max,
                                             float* row_sum) {
#pragma unroll
    for (int n = 0; n < FLASH_K_TILE / 8; n++) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
            float p = fast_exp2(s[n][e] - row_max[e >> 1]);
            s[n][e] = p;
            row_sum[e >> 1] += p;
        }
    }
}

// The probabilities of keys 16 kk … 16 kk + 15 rounded to bf16 as an A fragment, straight
// from the score accumulators (an m16n8 accumulator pair has the layout of an m16k16 A
// fragment).
__device__ __forceinline__ void probability_fragment(unsigned int* a, const float (*p)[4],
                                                     int kk) {
    a[0] = pack_bf16(p[2 * kk][0], p[2 * kk][1]);
    a[1] = pack_bf16(p[2 * kk][2], p[2 * kk][3]);
    a[2] = pack_bf16(p[2 * kk + 1][0], p[2 * kk + 1][1]);
    a[3] = pack_bf16(p[2 * kk + 1][2], p[2 * kk + 1][3]);
}

// o += P · V with P's fragments from probability_fragment. head_dim is a multiple of 16, so
// value columns go in pairs of n8 fragments.
template <int HD>
__device__ __forceinline__ void accumulate_values(float (*o)[4], const float (*p)[4],
                                                  const KvTile* vs, int head_dim, int lane) {
    const int chunks = (HD ? HD : head_dim) / 8;
    // Matrix m of an x4 load: value rows 8 (m % 2) …, columns 8 (m / 2) … of a pair.
    const bf16_t* value_row = &vs[lane & 15][(lane >> 4) * 8];
#pragma unroll
    for (int kk = 0; kk < FLASH_K_TILE / 16; kk++) {
        unsigned int a[4];
        probability_fragment(a, p, kk);
#pragma unroll
        for (int n = 0; n < FLASH_MAX_HEAD_DIM / 8; n += 2) {
            if (n < chunks) {
                unsigned int b[4];
                load_matrices_x4_transposed(b, value_row + kk * 16 * FLASH_LD + n * 8);
                mma_bf16(o[n], a, b);
                mma_bf16(o[n + 1], a, b + 2);
            }
        }
    }
}

// o += P · V on warpgroup instructions (sm_90a, head_dim 128): P's fragments as the register
// A operand, the values (`values`, a swizzled tile as load_kv_tiles stores it) read
// transposed. Waits for its instructions: the caller's next barrier lets the next tile's
// copies overwrite the values.
__device__ __forceinline__ void accumulate_values_wgmma(float (*o)[4], const float (*s)[4],
                                                        unsigned int values) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    unsigned int p[FLASH_K_TILE / 16][4];
#pragma unroll
    for (int kk = 0; kk < FLASH_K_TILE / 16; kk++) probability_fragment(p[kk], s, kk);
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
    for (int kk = 0; kk < FLASH_K_TILE / 16; kk++) {
        // k step kk: keys 16 kk …, 16 rows of 128 bytes down both halves.
        wgmma_m64n128k16_registers(&o[0][0], p[kk],
                                   wgmma_descriptor(values + kk * 16 * 128, FLASH_K_TILE * 128));
    }
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
#else
    __trap();  // launched only on devices the kernels were built for as sm_90a
#endif
}

// A row's sum over the four lanes holding its columns.
__device__ __forceinline__ float quad_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// WGMMA (head_dim 128, sm_90a only): 8 warps and 128 query rows a block, so each key and
// value tile read from L2 serves twice the rows; warpgroup instructions (each warpgroup 64
// rows) take the scores from queries and keys in shared memory and P · V from the
// probabilities in registers and the values in shared memory, read transposed. Queries,
// keys and values are stored 128-byte swizzled in two 64-column halves (the layout the GEMMs
// use). Two blocks an SM (128 registers, no spills), so one block's softmax runs while the
// other's warpgroup instructions do (a quarter less time than one block of 145 registers).
#define FLASH_WGMMA_Q_TILE 128
#define FLASH_WGMMA_THREADS 256

template <int HD, bool WGMMA>
__device__ __forceinline__ void prefill_attention(
    const float* q, const bf16_t* k_cache, const bf16_t* v_cache, float* out, bf16_t* out16,
    const int* tile_rows, const int* tile_counts, const int* tile_positions,
    const int* tile_table_offsets, const int* block_tables, int num_heads, int num_kv_heads,
    int head_dim, int block_size, float q_scale) {
    extern __shared__ __align__(16) unsigned char flash_shared[];
    const int threads = WGMMA ? FLASH_WGMMA_THREADS : FLASH_THREADS;
    const int q_tile = WGMMA ? FLASH_WGMMA_Q_TILE : FLASH_Q_TILE;
    // Cache slots of the keys of stage i's tile.
    __shared__ int stage_slots[2][FLASH_K_TILE];
    // WGMMA: the swizzled query tile first (1024-byte aligned, 128 bytes a row per half).
    // Stage i: keys at key_tile(i), values at value_tile(i); swizzled, a tile takes 128
    // bytes a row per half.
    const int tile_bytes = WGMMA ? FLASH_K_TILE * 256 : (int)sizeof(KvTile) * FLASH_K_TILE;
    unsigned char* query_base =
        flash_shared + (WGMMA ? (1024 - (shared_address(flash_shared) & 1023)) & 1023 : 0);
    unsigned char* stage_base = query_base + (WGMMA ? FLASH_WGMMA_Q_TILE * 256 : 0);
    // Computed, not held in an array: indexed by tile & 1, an array would live in local
    // memory.
    auto key_tile = [&](int stage) { return (KvTile*)(stage_base + 2 * stage * tile_bytes); };
    auto value_tile = [&](int stage) {
        return (KvTile*)(stage_base + (2 * stage + 1) * tile_bytes);
    };
    // The query tile is staged where the first values go.
    KvTile* ks = value_tile(0);
    const int hd = HD ? HD : head_dim;
    int head = blockIdx.x;
    QueryTile qt = query_tile(tile_rows, tile_counts, tile_positions, tile_table_offsets,
                              block_tables, num_heads, num_kv_heads, hd);
    int first_row = qt.first_row, count = qt.count, first_position = qt.first_position;
    int kv_head = qt.kv_head, kv_width = qt.kv_width, q_width = qt.q_width;
    const int* table = qt.table;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int g = lane >> 2, t = lane & 3;
    const int steps = hd / 16;
    const int chunks = hd / 8;

    int row = warp * 16 + g;  // this lane's rows: row and row + 8
    unsigned int qf[FLASH_MAX_HEAD_DIM / 16][4];
    if (WGMMA) {
        // The scaled query tile as bf16 into its swizzled place, 8 values a copy.
        for (int i = threadIdx.x; i < FLASH_WGMMA_Q_TILE * 16; i += threads) {
            int r = i >> 4, chunk = i & 15;
            uint4 packed = make_uint4(0, 0, 0, 0);
            if (r < count) {
                const float4* src =
                    (const float4*)(q + (size_t)(first_row + r) * q_width + head * hd + chunk * 8);
                float4 lo = src[0], hi = src[1];
                packed = make_uint4(pack_bf16(lo.x * q_scale, lo.y * q_scale),
                                    pack_bf16(lo.z * q_scale, lo.w * q_scale),
                                    pack_bf16(hi.x * q_scale, hi.y * q_scale),
                                    pack_bf16(hi.z * q_scale, hi.w * q_scale));
            }
            *(uint4*)(query_base + (chunk >> 3) * (FLASH_WGMMA_Q_TILE * 128) + r * 128 +
                      (((chunk & 7) ^ (r & 7)) << 4)) = packed;
        }
        // Generic-proxy writes the warpgroup instructions will read.
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        __syncthreads();
    } else {
        // The scaled query tile goes through ks as bf16; each warp keeps its rows' A
        // fragments.
        for (int i = threadIdx.x; i < FLASH_Q_TILE * hd; i += FLASH_THREADS) {
            int r = i / hd, d = i % hd;
            float v = r < count ? q[(size_t)(first_row + r) * q_width + head * hd + d] * q_scale
                                : 0.0f;
            ks[r][d] = f32_to_bf16(v);
        }
        __syncthreads();
    }
#pragma unroll
    for (int s = 0; s < FLASH_MAX_HEAD_DIM / 16; s++) {
        if (!WGMMA && s < steps) {
            int c = s * 16 + t * 2;
            qf[s][0] = shared_word(&ks[row][c]);
            qf[s][1] = shared_word(&ks[row + 8][c]);
            qf[s][2] = shared_word(&ks[row][c + 8]);
            qf[s][3] = shared_word(&ks[row + 8][c + 8]);
        }
    }
    float o[FLASH_MAX_HEAD_DIM / 8][4];
#pragma unroll
    for (int n = 0; n < FLASH_MAX_HEAD_DIM / 8; n++) {
#pragma unroll
        for (int e = 0; e < 4; e++) o[n][e] = 0.0f;
    }
    float row_max[2] = {NEG_INF, NEG_INF};
    float row_sum[2] = {0.0f, 0.0f};
    int position[2] = {first_position + row, first_position + row + 8};
    int last_position = first_position + count - 1;

    int tiles = last_position / FLASH_K_TILE + 1;
    // Slots for the first two tiles; each later tile's are found two tiles ahead, between
    // the barriers that order them after the last copies reading that stage's slots.
    for (int stage = 0; stage < 2; stage++) {
        find_slots(stage_slots[stage], table, block_size, stage * FLASH_K_TILE, last_position,
                   threadIdx.x, threads);
    }
    __syncthreads();  // every warp has its query fragments: stage 0 may be overwritten
    load_kv_tiles<WGMMA ? FLASH_WGMMA_THREADS : FLASH_THREADS, HD, WGMMA>(
        key_tile(0), value_tile(0), k_cache, v_cache, stage_slots[0], kv_width, kv_head, hd,
        threadIdx.x);
    for (int tile = 0; tile < tiles; tile++) {
        int key_start = tile * FLASH_K_TILE;
        const KvTile* ks = key_tile(tile & 1);
        const KvTile* vs = value_tile(tile & 1);
        if (tile + 1 < tiles) {
            int next = (tile + 1) & 1;
            load_kv_tiles<WGMMA ? FLASH_WGMMA_THREADS : FLASH_THREADS, HD, WGMMA>(
                key_tile(next), value_tile(next), k_cache, v_cache, stage_slots[next],
                kv_width, kv_head, hd, threadIdx.x);
        } else {
            // Empty groups keep the counts below the same on the last tile.
            copies_commit();
            copies_commit();
        }
        // This tile's keys and values are in (they were queued a tile ago); the next
        // tile's may not be.
        copies_wait<2>();
        // The copies were generic-proxy writes; wgmma reads through the async proxy.
        if (WGMMA) asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        __syncthreads();
        if (tile + 2 < tiles) {
            find_slots(stage_slots[tile & 1], table, block_size, key_start + 2 * FLASH_K_TILE,
                       last_position, threadIdx.x, threads);
        }
        float s[FLASH_K_TILE / 8][4], tile_max[2];
        bool masked = key_start + FLASH_K_TILE - 1 > first_position;
        if (WGMMA) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#pragma unroll
            for (int n = 0; n < FLASH_K_TILE / 8; n++) {
#pragma unroll
                for (int e = 0; e < 4; e++) s[n][e] = 0.0f;
            }
            unsigned int keys = shared_address(ks);
            // This warpgroup's 64 query rows.
            unsigned int queries = shared_address(query_base) + (warp >> 2) * 64 * 128;
            asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
            for (int st = 0; st < 8; st++) {
                // k step st: half st / 4 of the head, 32 bytes a step along its rows.
                int at = (st & 3) * 32;
                wgmma_m64n64k16(
                    &s[0][0],
                    wgmma_descriptor(queries + (st >> 2) * FLASH_WGMMA_Q_TILE * 128 + at),
                    wgmma_descriptor(keys + (st >> 2) * FLASH_K_TILE * 128 + at));
            }
            asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
            asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
            mask_scores(s, tile_max, key_start, position, masked, t);
#else
            __trap();  // launched only on devices the kernels were built for as sm_90a
#endif
        } else {
            tile_scores<HD>(s, tile_max, qf, ks, hd, key_start, position, masked, lane);
        }
        float correction[2];
#pragma unroll
        for (int r = 0; r < 2; r++) {
            // Key 0 is in every row's past, so after the first tile the max is finite.
            float new_max = fmaxf(row_max[r], quad_max(tile_max[r]));
            correction[r] = fast_exp2(row_max[r] - new_max);
            row_max[r] = new_max;
            row_sum[r] *= correction[r];
        }
        exponentiate(s, row_max, row_sum);
#pragma unroll
        for (int n = 0; n < FLASH_MAX_HEAD_DIM / 8; n++) {
#pragma unroll
            for (int e = 0; e < 4; e++) o[n][e] *= correction[e >> 1];
        }
        if (WGMMA) {
            accumulate_values_wgmma(o, s, shared_address(vs));
        } else {
            accumulate_values<HD>(o, s, vs, hd, lane);
        }
        __syncthreads();  // every warp is done with this stage before the next tile refills it
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        int local = row + 8 * r;
        float inverse = 1.0f / quad_sum(row_sum[r]);
        if (local >= count) continue;
        size_t at = (size_t)(first_row + local) * q_width + head * hd + t * 2;
#pragma unroll
        for (int n = 0; n < FLASH_MAX_HEAD_DIM / 8; n++) {
            if (n < chunks) {
                float2 y = make_float2(o[n][2 * r] * inverse, o[n][2 * r + 1] * inverse);
                *(float2*)(out + at + n * 8) = y;
                if (out16) *(unsigned int*)(out16 + at + n * 8) = pack_bf16(y.x, y.y);
            }
        }
    }
}

#define PREFILL_MMA_KERNEL(name, hd, wgmma, threads, blocks)                                   \
    extern "C" __global__ void __launch_bounds__(threads, blocks)                             \
        name(const float* q, const bf16_t* k_cache, const bf16_t* v_cache, float* out,        \
             bf16_t* out16, const int* tile_rows, const int* tile_counts,                     \
             const int* tile_positions, const int* tile_table_offsets,                        \
             const int* block_tables, int num_heads, int num_kv_heads, int head_dim,          \
             int block_size, float q_scale) {                                                 \
        after_previous_kernel();                                                              \
        prefill_attention<hd, wgmma>(q, k_cache, v_cache, out, out16, tile_rows, tile_counts,\
                                     tile_positions, tile_table_offsets, block_tables,        \
                                     num_heads, num_kv_heads, head_dim, block_size, q_scale); \
    }
PREFILL_MMA_KERNEL(attention_prefill_mma, 0, false, FLASH_THREADS, 3)
PREFILL_MMA_KERNEL(attention_prefill_mma_hd128, 128, false, FLASH_THREADS, 3)
PREFILL_MMA_KERNEL(attention_prefill_wgmma_hd128, 128, true, FLASH_WGMMA_THREADS, 2)

// Decode attention on the tensor cores for grouped-query heads: one warp per (query row, KV
// head, split of FLASH_K_TILE keys) reads that split's keys and values once for every query
// head sharing the KV head (at most 16: the rows of one m16 tile), instead of once per
// query head. Writes the same unnormalized partials as attention_split (max in natural-log
// units) for attention_combine. Queries arrive pre-scaled by log2(e)/sqrt(head_dim).
//
// A warp queues its tile's cached keys and values before it waits for the previous kernel
// (attention_inputs, which writes only the newest key): the slots come from the step's
// uploads, and the cache's older positions from earlier steps (behind the host's
// synchronization for their tokens) or from store_rows and copy_kv_rows, which let no
// kernel launch before they finish. So the cache reads overlap the kernels before.
struct DecodeSplit {
    // The row's newest position (-1: a row of another kernel), the split's keys first …
    // last, and the first of its tile's rows that must wait (the newest key's).
    int position, first, last, newest_row;
};

template <int HD>
__device__ __forceinline__ DecodeSplit decode_cached_keys(KvTile* ks, KvTile* vs, int* slots,
                                                          const bf16_t* k_cache,
                                                          const bf16_t* v_cache,
                                                          const int* positions,
                                                          const int* table_offsets,
                                                          const int* block_tables,
                                                          int num_kv_heads, int head_dim,
                                                          int block_size) {
    const int hd = HD ? HD : head_dim;
    int row = blockIdx.x, lane = threadIdx.x;
    DecodeSplit split;
    split.position = positions[row];
    split.first = blockIdx.z * FLASH_K_TILE;
    split.last = min(split.first + FLASH_K_TILE - 1, split.position);
    split.newest_row =
        split.last == split.position ? split.position - split.first : FLASH_K_TILE;
    if (split.position < 0 || split.first > split.position) return split;
    find_slots(slots, block_tables + table_offsets[row], block_size, split.first, split.last,
               lane, 32);
    __syncwarp();
    load_kv_tiles<32, HD, false, true>(ks, vs, k_cache, v_cache, slots, num_kv_heads * hd,
                                       blockIdx.y, hd, lane, 0, split.newest_row);
    return split;
}

// The rest of a decode warp's work, past the previous kernel.
template <int HD>
__device__ __forceinline__ void decode_attention(const DecodeSplit& split, KvTile* ks,
                                                 KvTile* vs, const int* slots, const float* q,
                                                 const bf16_t* k_cache, const bf16_t* v_cache,
                                                 float* partial_out, float* partial_max,
                                                 float* partial_sum, int num_heads,
                                                 int num_kv_heads, int head_dim,
                                                 float q_scale) {
    const int hd = HD ? HD : head_dim;
    int row = blockIdx.x;
    int kv_head = blockIdx.y;
    int lane = threadIdx.x;
    int g = lane >> 2, t = lane & 3;
    int position = split.position, first = split.first, last = split.last;
    if (position < 0) return;
    int group = num_heads / num_kv_heads;
    int kv_width = num_kv_heads * hd;
    const int steps = hd / 16;
    const int chunks = hd / 8;
    // This lane's two query heads (rows g and g + 8 of the tile) and where their partials go.
    size_t part[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
        part[r] = ((size_t)row * num_heads + kv_head * group + g + 8 * r) * gridDim.z +
                  blockIdx.z;
    }
    if (first > position) {
        // Past this row's context: an empty partial, which attention_combine skips.
        if (t == 0) {
#pragma unroll
            for (int r = 0; r < 2; r++) {
                if (g + 8 * r < group) {
                    partial_max[part[r]] = NEG_INF;
                    partial_sum[part[r]] = 0.0f;
                }
            }
        }
        return;
    }
    load_kv_tiles<32, HD, false, true>(ks, vs, k_cache, v_cache, slots, kv_width, kv_head, hd,
                                       lane, split.newest_row, FLASH_K_TILE);
    // A fragments of the group's queries straight from global memory (rows past the group
    // are zero).
    const float* qrow = q + (size_t)row * num_heads * hd + (size_t)kv_head * group * hd;
    unsigned int qf[FLASH_MAX_HEAD_DIM / 16][4];
#pragma unroll
    for (int s = 0; s < FLASH_MAX_HEAD_DIM / 16; s++) {
        if (s < steps) {
#pragma unroll
            for (int half = 0; half < 2; half++) {
#pragma unroll
                for (int r = 0; r < 2; r++) {
                    int h = g + 8 * r;
                    float2 v = make_float2(0.0f, 0.0f);
                    if (h < group) {
                        v = *(const float2*)(qrow + (size_t)h * hd + s * 16 + half * 8 + t * 2);
                    }
                    qf[s][half * 2 + r] = pack_bf16(v.x * q_scale, v.y * q_scale);
                }
            }
        }
    }
    // Four commit groups: the cached keys and values, then the newest's; the keys are in
    // once all but the last are.
    copies_wait<1>();
    __syncwarp();
    float s[FLASH_K_TILE / 8][4], row_max[2];
    int limit[2] = {last, last};
    tile_scores<HD>(s, row_max, qf, ks, hd, first, limit, last < first + FLASH_K_TILE - 1, lane);
    float row_sum[2] = {0.0f, 0.0f};
#pragma unroll
    for (int r = 0; r < 2; r++) row_max[r] = quad_max(row_max[r]);
    exponentiate(s, row_max, row_sum);
    copies_wait<0>();
    __syncwarp();
    float o[FLASH_MAX_HEAD_DIM / 8][4];
#pragma unroll
    for (int n = 0; n < FLASH_MAX_HEAD_DIM / 8; n++) {
#pragma unroll
        for (int e = 0; e < 4; e++) o[n][e] = 0.0f;
    }
    accumulate_values<HD>(o, s, vs, hd, lane);
#pragma unroll
    for (int r = 0; r < 2; r++) row_sum[r] = quad_sum(row_sum[r]);
    const float ln2 = 0.6931471805599453f;
#pragma unroll
    for (int r = 0; r < 2; r++) {
        if (g + 8 * r >= group) continue;
        float* dst = partial_out + part[r] * hd;
#pragma unroll
        for (int n = 0; n < FLASH_MAX_HEAD_DIM / 8; n++) {
            if (n < chunks) {
                *(float2*)(dst + n * 8 + t * 2) = make_float2(o[n][2 * r], o[n][2 * r + 1]);
            }
        }
        if (t == 0) {
            partial_max[part[r]] = row_max[r] * ln2;
            partial_sum[part[r]] = row_sum[r];
        }
    }
}

#define DECODE_MMA_KERNEL(name, hd)                                                           \
    extern "C" __global__ void __launch_bounds__(32)                                          \
        name(const float* q, const bf16_t* k_cache, const bf16_t* v_cache,                    \
             float* partial_out, float* partial_max, float* partial_sum, const int* positions, \
             const int* table_offsets, const int* block_tables, int num_heads,                \
             int num_kv_heads, int head_dim, int block_size, float q_scale) {                 \
        __shared__ __align__(16) KvTile ks[FLASH_K_TILE];                                     \
        __shared__ __align__(16) KvTile vs[FLASH_K_TILE];                                     \
        __shared__ int slots[FLASH_K_TILE];                                                   \
        let_next_kernel_launch();                                                             \
        DecodeSplit split =                                                                   \
            decode_cached_keys<hd>(ks, vs, slots, k_cache, v_cache, positions, table_offsets, \
                                   block_tables, num_kv_heads, head_dim, block_size);         \
        wait_for_previous_kernel();                                                           \
        decode_attention<hd>(split, ks, vs, slots, q, k_cache, v_cache, partial_out,          \
                             partial_max, partial_sum, num_heads, num_kv_heads, head_dim,     \
                             q_scale);                                                        \
    }
DECODE_MMA_KERNEL(attention_decode_mma, 0)
DECODE_MMA_KERNEL(attention_decode_mma_hd128, 128)

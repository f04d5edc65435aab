// Attention on CUDA cores: split decode attention (flash-decoding) and its combine, and the
// tiled prefill kernel for head sizes the tensor-core kernels (attention_mma.cu) do not take.

// Most values of a head one lane holds: head_dim <= 256.
#define MAX_PER_LANE 8
// Keys one warp of split decode attention covers.
#define SPLIT_KEYS 256

// Decode attention split over the context (flash-decoding): one warp per (query row, head,
// split of SPLIT_KEYS keys), writing an unnormalized partial (output, max, sum) that
// attention_combine merges. In each round of 32 keys, lane j scores key j (the whole dot
// product, so 32 loads are in flight), then lane l accumulates elements l, l + 32, … of the
// output over those keys. Rows with position -1 belong to another kernel.
extern "C" __global__ void attention_split(const float* q, const bf16_t* k_cache,
                                           const bf16_t* v_cache, float* partial_out,
                                           float* partial_max, float* partial_sum,
                                           const int* positions, const int* table_offsets,
                                           const int* block_tables, int num_heads,
                                           int num_kv_heads, int head_dim, int block_size,
                                           float scale) {
    after_previous_kernel();
    __shared__ float q_shared[MAX_PER_LANE * 32];
    int row = blockIdx.x;
    int head = blockIdx.y;
    int split = blockIdx.z;
    int lane = threadIdx.x;
    int position = positions[row];
    if (position < 0) return;
    size_t part = ((size_t)row * num_heads + head) * gridDim.z + split;
    int kv_head = head / (num_heads / num_kv_heads);
    int kv_width = num_kv_heads * head_dim;
    const int* table = block_tables + table_offsets[row];
    const float* qh = q + (size_t)row * num_heads * head_dim + head * head_dim;
    for (int d = lane; d < head_dim; d += 32) q_shared[d] = qh[d] * scale;
    __syncwarp();
    float acc[MAX_PER_LANE];
#pragma unroll
    for (int i = 0; i < MAX_PER_LANE; i++) acc[i] = 0.0f;
    float running_max = NEG_INF;
    float total = 0.0f;
    int first = split * SPLIT_KEYS;
    int end = min(first + SPLIT_KEYS, position + 1);
    for (int base = first; base < end; base += 32) {
        int key = base + lane;
        size_t offset = 0;
        float score = NEG_INF;
        if (key < end) {
            size_t slot = (size_t)table[key / block_size] * block_size + key % block_size;
            offset = slot * kv_width + kv_head * head_dim;
            const bf16_t* k = k_cache + offset;
            float dot = 0.0f;
            if ((head_dim & 7) == 0) {
                const uint4* k8 = (const uint4*)k;
                for (int c = 0; c < head_dim / 8; c++) {
                    uint4 w = k8[c];
                    const float* qc = q_shared + c * 8;
                    dot += qc[0] * __uint_as_float(w.x << 16) + qc[1] * __uint_as_float(w.x & 0xffff0000u)
                         + qc[2] * __uint_as_float(w.y << 16) + qc[3] * __uint_as_float(w.y & 0xffff0000u)
                         + qc[4] * __uint_as_float(w.z << 16) + qc[5] * __uint_as_float(w.z & 0xffff0000u)
                         + qc[6] * __uint_as_float(w.w << 16) + qc[7] * __uint_as_float(w.w & 0xffff0000u);
                }
            } else {
                for (int d = 0; d < head_dim; d++) dot += q_shared[d] * bf16_to_f32(k[d]);
            }
            score = dot;
        }
        float round_max = score;
        for (int o = 16; o > 0; o >>= 1) {
            round_max = fmaxf(round_max, __shfl_xor_sync(0xffffffffu, round_max, o));
        }
        float new_max = fmaxf(running_max, round_max);
        float correction = expf(running_max - new_max);
        float p = (key < end) ? expf(score - new_max) : 0.0f;
        total = total * correction + warp_sum(p);
        running_max = new_max;
#pragma unroll
        for (int i = 0; i < MAX_PER_LANE; i++) acc[i] *= correction;
        int keys = min(32, end - base);
        for (int j = 0; j < keys; j++) {
            float pj = __shfl_sync(0xffffffffu, p, j);
            size_t vj = __shfl_sync(0xffffffffu, offset, j);
            const bf16_t* v = v_cache + vj;
#pragma unroll
            for (int i = 0; i < MAX_PER_LANE; i++) {
                int d = lane + 32 * i;
                if (d < head_dim) acc[i] += pj * bf16_to_f32(v[d]);
            }
        }
    }
    float* out = partial_out + part * head_dim;
#pragma unroll
    for (int i = 0; i < MAX_PER_LANE; i++) {
        int d = lane + 32 * i;
        if (d < head_dim) out[d] = acc[i];
    }
    if (lane == 0) {
        partial_max[part] = running_max;
        partial_sum[part] = total;
    }
}

// Merges the splits of attention_split: one block per (row, head), head_dim threads rounded
// up to a warp. Each warp finds the splits' largest max and weighted sum itself (lanes over
// the splits, shuffles); then, 32 splits at a time, lane l weighs split l and the warp takes
// each weight by shuffle as it sums its dimensions. No barrier, no shared memory, so no
// limit on the splits. Up to 32 splits (a decode step's 2k context) every load is issued at
// once, before any result is used: the block's time is then one round trip to L2, where
// finding the max first, then the sums, then the values in rounds took five or six.
#define COMBINE_AT_ONCE 32
extern "C" __global__ void attention_combine(const float* partial_out, const float* partial_max,
                                             const float* partial_sum, float* out,
                                             const int* positions, int num_heads, int head_dim,
                                             int splits) {
    after_previous_kernel();
    int row = blockIdx.x;
    int head = blockIdx.y;
    int d = threadIdx.x, lane = d & 31;
    if (positions[row] < 0) return;
    size_t first = ((size_t)row * num_heads + head) * splits;
    const float* maxes = partial_max + first;
    // Lanes past head_dim stay for the shuffles.
    bool in_head = d < head_dim;
    const float* values = partial_out + first * head_dim + (in_head ? d : 0);
    float value = 0.0f, total = 0.0f;
    if (splits <= COMBINE_AT_ONCE) {
        bool mine = lane < splits;
        float my_max = mine ? maxes[lane] : NEG_INF;
        float my_sum = mine ? partial_sum[first + lane] : 0.0f;
        float v[COMBINE_AT_ONCE];
#pragma unroll
        for (int j = 0; j < COMBINE_AT_ONCE; j++) {
            v[j] = j < splits ? values[(size_t)j * head_dim] : 0.0f;
        }
        float m = warp_max(my_max);
        // An empty split (max -inf) weighs 0; its values (never written) are read but not used.
        float w = my_max != NEG_INF ? expf(my_max - m) : 0.0f;
        total = warp_sum(w * my_sum);
#pragma unroll
        for (int j = 0; j < COMBINE_AT_ONCE; j++) {
            float wj = __shfl_sync(0xffffffffu, w, j);
            value += wj != 0.0f ? wj * v[j] : 0.0f;
        }
    } else {
        float m = NEG_INF;
        for (int s = lane; s < splits; s += 32) m = fmaxf(m, maxes[s]);
        m = warp_max(m);
        for (int s = lane; s < splits; s += 32) {
            if (maxes[s] != NEG_INF) total += expf(maxes[s] - m) * partial_sum[first + s];
        }
        total = warp_sum(total);
        for (int s0 = 0; s0 < splits; s0 += 32) {
            int s = s0 + lane;
            float w = s < splits && maxes[s] != NEG_INF ? expf(maxes[s] - m) : 0.0f;
            int count = min(32, splits - s0);
#pragma unroll 8
            for (int j = 0; j < count; j++) {
                float wj = __shfl_sync(0xffffffffu, w, j);
                float v = values[(size_t)(s0 + j) * head_dim];
                value += wj != 0.0f ? wj * v : 0.0f;
            }
        }
    }
    if (in_head) out[(size_t)row * num_heads * head_dim + head * head_dim + d] = value / total;
}

// A prefill kernel's tile of query rows (blockIdx.y) for one head (blockIdx.x): its first
// row, row count, first position, its sequence's block table, the head's KV head and the
// widths of a KV and a query row.
struct QueryTile {
    int first_row, count, first_position, kv_head, kv_width, q_width;
    const int* table;
};

__device__ __forceinline__ QueryTile query_tile(const int* tile_rows, const int* tile_counts,
                                                const int* tile_positions,
                                                const int* tile_table_offsets,
                                                const int* block_tables, int num_heads,
                                                int num_kv_heads, int head_dim) {
    int tile = blockIdx.y;
    QueryTile qt;
    qt.kv_head = blockIdx.x / (num_heads / num_kv_heads);
    qt.kv_width = num_kv_heads * head_dim;
    qt.q_width = num_heads * head_dim;
    qt.first_row = tile_rows[tile];
    qt.count = tile_counts[tile];
    qt.first_position = tile_positions[tile];
    qt.table = block_tables + tile_table_offsets[tile];
    return qt;
}

// Prefill attention, flash style on CUDA cores: a block takes a tile of up to Q_TILE
// consecutive query rows of one sequence and one head, and walks that sequence's keys in tiles
// of K_TILE staged in shared memory, each warp owning Q_TILE / 4 rows with an online softmax.
// Lane j scores key j of the tile; lane l accumulates elements l, l + 32, … of the output.
// Needs head_dim <= PREFILL_MAX_HEAD_DIM. Where out16 is given, the output goes there in
// bf16 too (the o projection's GEMM input), as in the tensor-core kernels.
#define Q_TILE 16
#define K_TILE 32
#define PREFILL_MAX_HEAD_DIM 128
#define PREFILL_WARPS 4
#define ROWS_PER_WARP (Q_TILE / PREFILL_WARPS)

extern "C" __global__ void __launch_bounds__(PREFILL_WARPS * 32)
attention_prefill(const float* q, const bf16_t* k_cache, const bf16_t* v_cache, float* out,
                  bf16_t* out16, const int* tile_rows, const int* tile_counts, const int* tile_positions,
                  const int* tile_table_offsets, const int* block_tables, int num_heads,
                  int num_kv_heads, int head_dim, int block_size, float scale) {
    after_previous_kernel();
    __shared__ float q_tile[Q_TILE][PREFILL_MAX_HEAD_DIM];
    __shared__ float k_tile[K_TILE][PREFILL_MAX_HEAD_DIM + 1];
    __shared__ float v_tile[K_TILE][PREFILL_MAX_HEAD_DIM];
    int head = blockIdx.x;
    QueryTile qt = query_tile(tile_rows, tile_counts, tile_positions, tile_table_offsets,
                              block_tables, num_heads, num_kv_heads, head_dim);
    int first_row = qt.first_row, count = qt.count, first_position = qt.first_position;
    int kv_head = qt.kv_head, kv_width = qt.kv_width, q_width = qt.q_width;
    const int* table = qt.table;
    int warp = threadIdx.x >> 5;
    int lane = threadIdx.x & 31;

    for (int i = threadIdx.x; i < Q_TILE * head_dim; i += blockDim.x) {
        int r = i / head_dim;
        int d = i % head_dim;
        q_tile[r][d] = (r < count) ? q[(size_t)(first_row + r) * q_width + head * head_dim + d] * scale
                                   : 0.0f;
    }
    float running_max[ROWS_PER_WARP];
    float total[ROWS_PER_WARP];
    float acc[ROWS_PER_WARP][PREFILL_MAX_HEAD_DIM / 32];
#pragma unroll
    for (int r = 0; r < ROWS_PER_WARP; r++) {
        running_max[r] = NEG_INF;
        total[r] = 0.0f;
#pragma unroll
        for (int i = 0; i < PREFILL_MAX_HEAD_DIM / 32; i++) acc[r][i] = 0.0f;
    }
    int last_position = first_position + count - 1;
    for (int key_start = 0; key_start <= last_position; key_start += K_TILE) {
        __syncthreads();
        for (int i = threadIdx.x; i < K_TILE * head_dim; i += blockDim.x) {
            int j = i / head_dim;
            int d = i % head_dim;
            int pos = key_start + j;
            float kv = 0.0f, vv = 0.0f;
            if (pos <= last_position) {
                size_t slot = (size_t)table[pos / block_size] * block_size + pos % block_size;
                size_t at = slot * kv_width + kv_head * head_dim + d;
                kv = bf16_to_f32(k_cache[at]);
                vv = bf16_to_f32(v_cache[at]);
            }
            k_tile[j][d] = kv;
            v_tile[j][d] = vv;
        }
        __syncthreads();
#pragma unroll
        for (int r = 0; r < ROWS_PER_WARP; r++) {
            int row = warp * ROWS_PER_WARP + r;
            if (row >= count) continue;
            int position = first_position + row;
            int key = key_start + lane;
            float score = NEG_INF;
            if (key <= position) {
                score = 0.0f;
                for (int d = 0; d < head_dim; d++) score += q_tile[row][d] * k_tile[lane][d];
            }
            float tile_max = score;
            for (int offset = 16; offset > 0; offset >>= 1) {
                tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, offset));
            }
            if (tile_max == NEG_INF) continue;
            float new_max = fmaxf(running_max[r], tile_max);
            float correction = expf(running_max[r] - new_max);
            float p = (key <= position) ? expf(score - new_max) : 0.0f;
            total[r] = total[r] * correction + warp_sum(p);
            running_max[r] = new_max;
#pragma unroll
            for (int i = 0; i < PREFILL_MAX_HEAD_DIM / 32; i++) acc[r][i] *= correction;
            for (int j = 0; j < K_TILE; j++) {
                float pj = __shfl_sync(0xffffffffu, p, j);
#pragma unroll
                for (int i = 0; i < PREFILL_MAX_HEAD_DIM / 32; i++) {
                    int d = lane + 32 * i;
                    if (d < head_dim) acc[r][i] += pj * v_tile[j][d];
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < ROWS_PER_WARP; r++) {
        int row = warp * ROWS_PER_WARP + r;
        if (row >= count) continue;
        size_t at = (size_t)(first_row + row) * q_width + head * head_dim;
#pragma unroll
        for (int i = 0; i < PREFILL_MAX_HEAD_DIM / 32; i++) {
            int d = lane + 32 * i;
            if (d < head_dim) {
                float y = acc[r][i] / total[r];
                out[at + d] = y;
                if (out16) out16[at + d] = f32_to_bf16(y);
            }
        }
    }
}

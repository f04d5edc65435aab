// Tandem's CUDA kernels, compiled at run time with NVRTC for the device's architecture.
// Activations are f32; weights and the KV cache are bf16, stored as raw 16-bit words so no
// CUDA header is needed (NVRTC then compiles this file without an include path).

typedef unsigned short bf16_t;

// -inf without math headers.
#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float bf16_to_f32(bf16_t h) {
    return __uint_as_float(((unsigned int)h) << 16);
}

// Round to nearest even, as torch does.
__device__ __forceinline__ bf16_t f32_to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu) != 0u) {
        return (bf16_t)((u >> 16) | 0x40u);  // keep NaN a NaN
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_t)(u >> 16);
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, offset);
    }
    return v;
}

// Sum over a block of blockDim.x threads (a multiple of 32, at most 1024).
__device__ float block_sum(float v) {
    __shared__ float partial[32];
    int lane = threadIdx.x & 31;
    int warp = threadIdx.x >> 5;
    v = warp_sum(v);
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    int warps = blockDim.x >> 5;
    v = (threadIdx.x < warps) ? partial[threadIdx.x] : 0.0f;
    if (warp == 0) v = warp_sum(v);
    if (threadIdx.x == 0) partial[0] = v;
    __syncthreads();
    v = partial[0];
    __syncthreads();
    return v;
}

// out[r, :] = table[ids[r], :]; one block per row.
extern "C" __global__ void embed(const bf16_t* table, const unsigned int* ids, float* out,
                                 int cols) {
    const bf16_t* src = table + (size_t)ids[blockIdx.x] * cols;
    float* dst = out + (size_t)blockIdx.x * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) dst[c] = bf16_to_f32(src[c]);
}

// RMSNorm over each run of `len` values (a row or one head); one block per run.
extern "C" __global__ void rms_norm(const float* x, const float* weight, float* out, int len,
                                    float eps) {
    const float* src = x + (size_t)blockIdx.x * len;
    float* dst = out + (size_t)blockIdx.x * len;
    float sq = 0.0f;
    for (int i = threadIdx.x; i < len; i += blockDim.x) sq += src[i] * src[i];
    float inv = rsqrtf(block_sum(sq) / (float)len + eps);
    for (int i = threadIdx.x; i < len; i += blockDim.x) dst[i] = src[i] * inv * weight[i];
}

extern "C" __global__ void add_assign(float* acc, const float* x, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) acc[i] += x[i];
}

// x[r, :] += bias; one block per row.
extern "C" __global__ void add_bias(float* x, const float* bias, int cols) {
    float* row = x + (size_t)blockIdx.x * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) row[c] += bias[c];
}

// x[r, :] *= scales[r]; one block per row.
extern "C" __global__ void scale_rows(float* x, const float* scales, int cols) {
    float* row = x + (size_t)blockIdx.x * cols;
    float s = scales[blockIdx.x];
    for (int c = threadIdx.x; c < cols; c += blockDim.x) row[c] *= s;
}

// out[r, i] = silu(gate[r, i]) * up[r, i] where gate_up[r] = gate ++ up; one block per row.
extern "C" __global__ void swiglu(const float* gate_up, float* out, int inter) {
    const float* gate = gate_up + (size_t)blockIdx.x * 2 * inter;
    const float* up = gate + inter;
    float* dst = out + (size_t)blockIdx.x * inter;
    for (int i = threadIdx.x; i < inter; i += blockDim.x) {
        float g = gate[i];
        dst[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

// Rotate-half RoPE on every head of row blockIdx.x; cos and sin are [rows, head_dim / 2].
extern "C" __global__ void rope(float* x, const float* cos_table, const float* sin_table,
                                int heads, int head_dim) {
    int half = head_dim / 2;
    float* row = x + (size_t)blockIdx.x * heads * head_dim;
    const float* c = cos_table + (size_t)blockIdx.x * half;
    const float* s = sin_table + (size_t)blockIdx.x * half;
    for (int i = threadIdx.x; i < heads * half; i += blockDim.x) {
        int head = i / half;
        int j = i % half;
        float* h = row + head * head_dim;
        float x1 = h[j];
        float x2 = h[j + half];
        h[j] = x1 * c[j] - x2 * s[j];
        h[j + half] = x2 * c[j] + x1 * s[j];
    }
}

// store[slots[r], :] = bf16(src[r, :]); one block per row.
extern "C" __global__ void store_rows(bf16_t* store, const float* src, const int* slots,
                                      int width) {
    bf16_t* dst = store + (size_t)slots[blockIdx.x] * width;
    const float* row = src + (size_t)blockIdx.x * width;
    for (int c = threadIdx.x; c < width; c += blockDim.x) dst[c] = f32_to_bf16(row[c]);
}

// out[r, :] = f32(store[slots[r], :]); one block per row.
extern "C" __global__ void load_rows(const bf16_t* store, const int* slots, float* out,
                                     int width) {
    const bf16_t* src = store + (size_t)slots[blockIdx.x] * width;
    float* dst = out + (size_t)blockIdx.x * width;
    for (int c = threadIdx.x; c < width; c += blockDim.x) dst[c] = bf16_to_f32(src[c]);
}

extern "C" __global__ void to_bf16(const float* x, bf16_t* out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = f32_to_bf16(x[i]);
}

// out[r, :] = x[rows[r], :]; one block per output row.
extern "C" __global__ void gather_rows(const float* x, const int* rows, float* out, int cols) {
    const float* src = x + (size_t)rows[blockIdx.x] * cols;
    float* dst = out + (size_t)blockIdx.x * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) dst[c] = src[c];
}

// out[rows[r], :] += weights[r] * y[r, :]; one block per row of y. Rows may repeat within
// one launch (a token's several experts on one expert-parallel rank), so adds are atomic.
extern "C" __global__ void scatter_add_weighted(float* out, const float* y, const int* rows,
                                                const float* weights, int cols) {
    float* dst = out + (size_t)rows[blockIdx.x] * cols;
    const float* src = y + (size_t)blockIdx.x * cols;
    float w = weights[blockIdx.x];
    for (int c = threadIdx.x; c < cols; c += blockDim.x) atomicAdd(&dst[c], w * src[c]);
}

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

// Merges the splits of attention_split: one block of head_dim threads per (row, head).
extern "C" __global__ void attention_combine(const float* partial_out, const float* partial_max,
                                             const float* partial_sum, float* out,
                                             const int* positions, int num_heads, int head_dim,
                                             int splits) {
    int row = blockIdx.x;
    int head = blockIdx.y;
    int d = threadIdx.x;
    if (positions[row] < 0 || d >= head_dim) return;
    size_t first = ((size_t)row * num_heads + head) * splits;
    float m = NEG_INF;
    for (int s = 0; s < splits; s++) m = fmaxf(m, partial_max[first + s]);
    float value = 0.0f, total = 0.0f;
    for (int s = 0; s < splits; s++) {
        float mx = partial_max[first + s];
        if (mx == NEG_INF) continue;
        float w = expf(mx - m);
        value += w * partial_out[(first + s) * head_dim + d];
        total += w * partial_sum[first + s];
    }
    out[(size_t)row * num_heads * head_dim + head * head_dim + d] = value / total;
}

// Prefill attention, flash style on CUDA cores: a block takes a tile of up to Q_TILE
// consecutive query rows of one sequence and one head, and walks that sequence's keys in tiles
// of K_TILE staged in shared memory, each warp owning Q_TILE / 4 rows with an online softmax.
// Lane j scores key j of the tile; lane l accumulates elements l, l + 32, … of the output.
// Needs head_dim <= PREFILL_MAX_HEAD_DIM.
#define Q_TILE 16
#define K_TILE 32
#define PREFILL_MAX_HEAD_DIM 128
#define PREFILL_WARPS 4
#define ROWS_PER_WARP (Q_TILE / PREFILL_WARPS)

extern "C" __global__ void __launch_bounds__(PREFILL_WARPS * 32)
attention_prefill(const float* q, const bf16_t* k_cache, const bf16_t* v_cache, float* out,
                  const int* tile_rows, const int* tile_counts, const int* tile_positions,
                  const int* tile_table_offsets, const int* block_tables, int num_heads,
                  int num_kv_heads, int head_dim, int block_size, float scale) {
    __shared__ float q_tile[Q_TILE][PREFILL_MAX_HEAD_DIM];
    __shared__ float k_tile[K_TILE][PREFILL_MAX_HEAD_DIM + 1];
    __shared__ float v_tile[K_TILE][PREFILL_MAX_HEAD_DIM];
    int tile = blockIdx.x;
    int head = blockIdx.y;
    int first_row = tile_rows[tile];
    int count = tile_counts[tile];
    int first_position = tile_positions[tile];
    const int* table = block_tables + tile_table_offsets[tile];
    int kv_head = head / (num_heads / num_kv_heads);
    int kv_width = num_kv_heads * head_dim;
    int q_width = num_heads * head_dim;
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
        float* o = out + (size_t)(first_row + row) * q_width + head * head_dim;
#pragma unroll
        for (int i = 0; i < PREFILL_MAX_HEAD_DIM / 32; i++) {
            int d = lane + 32 * i;
            if (d < head_dim) o[d] = acc[r][i] / total[r];
        }
    }
}

// Greedy pick per row of `vocab` logits: the largest (ties to the lowest id) and its logprob
// (value minus the row's log-sum-exp). One block of 256 threads per row.
extern "C" __global__ void greedy(const float* logits, unsigned int* tokens, float* logprobs,
                                  int vocab) {
    __shared__ float best_value[256];
    __shared__ int best_index[256];
    const float* row = logits + (size_t)blockIdx.x * vocab;
    float value = NEG_INF;
    int index = 0x7fffffff;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        if (row[i] > value) {
            value = row[i];
            index = i;
        }
    }
    best_value[threadIdx.x] = value;
    best_index[threadIdx.x] = index;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) {
            float v = best_value[threadIdx.x + stride];
            int j = best_index[threadIdx.x + stride];
            if (v > best_value[threadIdx.x] || (v == best_value[threadIdx.x] && j < best_index[threadIdx.x])) {
                best_value[threadIdx.x] = v;
                best_index[threadIdx.x] = j;
            }
        }
        __syncthreads();
    }
    float max = best_value[0];
    int token = best_index[0];
    float sum = 0.0f;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) sum += expf(row[i] - max);
    sum = block_sum(sum);
    if (threadIdx.x == 0) {
        tokens[blockIdx.x] = (unsigned int)token;
        logprobs[blockIdx.x] = -logf(sum);
    }
}

// MoE for decode-sized batches without a launch per expert: routing slots (pairs) are grouped
// by expert, at most `group_size` (<= MOE_MAX_GROUP) to a group, and one block computes a tile
// of output rows for a whole group, reading each weight row once for all its tokens. Expert
// weights are reached through tables of device pointers. Pair p belongs to token p / top_k.
// A warp computes one output row at a time: lane l reads 16-byte chunks l, l + 32, … of the
// bf16 row (widths must be multiples of 8); the group's inputs sit in shared memory.
#define MOE_MAX_GROUP 4
#define MOE_ROWS_PER_WARP 4

__device__ __forceinline__ float dot8(uint4 w, const float* x) {
    return x[0] * __uint_as_float(w.x << 16) + x[1] * __uint_as_float(w.x & 0xffff0000u)
         + x[2] * __uint_as_float(w.y << 16) + x[3] * __uint_as_float(w.y & 0xffff0000u)
         + x[4] * __uint_as_float(w.z << 16) + x[5] * __uint_as_float(w.z & 0xffff0000u)
         + x[6] * __uint_as_float(w.w << 16) + x[7] * __uint_as_float(w.w & 0xffff0000u);
}

// act[p, i] = silu(gate row i · x[t]) · (up row i · x[t]) for the group's pairs; grid
// (groups, ceil(inter / (warps · MOE_ROWS_PER_WARP))); dynamic shared memory holds the
// group's x rows (count · hidden floats).
extern "C" __global__ void moe_gate_up(const float* x, const unsigned long long* gate_up,
                                       const int* group_expert, const int* group_first,
                                       const int* group_count, const int* pair_order,
                                       float* act, int hidden, int inter, int top_k) {
    extern __shared__ float staged[];
    int g = blockIdx.x;
    int count = group_count[g];
    const int* pairs = pair_order + group_first[g];
    for (int j = 0; j < count; j++) {
        const float* xt = x + (size_t)(pairs[j] / top_k) * hidden;
        for (int i = threadIdx.x; i < hidden; i += blockDim.x) staged[j * hidden + i] = xt[i];
    }
    __syncthreads();
    const bf16_t* w = (const bf16_t*)gate_up[group_expert[g]];
    int lane = threadIdx.x & 31;
    int first = (blockIdx.y * (blockDim.x >> 5) + (threadIdx.x >> 5)) * MOE_ROWS_PER_WARP;
    for (int r = 0; r < MOE_ROWS_PER_WARP; r++) {
        int i = first + r;
        if (i >= inter) break;
        const uint4* gate = (const uint4*)(w + (size_t)i * hidden);
        const uint4* up = (const uint4*)(w + (size_t)(inter + i) * hidden);
        float gs[MOE_MAX_GROUP] = {0.0f, 0.0f, 0.0f, 0.0f};
        float us[MOE_MAX_GROUP] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int c = lane; c < hidden / 8; c += 32) {
            uint4 a = gate[c];
            uint4 b = up[c];
#pragma unroll
            for (int j = 0; j < MOE_MAX_GROUP; j++) {
                if (j < count) {
                    const float* xc = staged + j * hidden + c * 8;
                    gs[j] += dot8(a, xc);
                    us[j] += dot8(b, xc);
                }
            }
        }
#pragma unroll
        for (int j = 0; j < MOE_MAX_GROUP; j++) {
            if (j < count) {
                float gv = warp_sum(gs[j]);
                float uv = warp_sum(us[j]);
                if (lane == 0) act[(size_t)pairs[j] * inter + i] = gv / (1.0f + expf(-gv)) * uv;
            }
        }
    }
}

// y[p, h] = weights[p] · (down row h · act[p]) for the group's pairs; grid (groups,
// ceil(hidden / (warps · MOE_ROWS_PER_WARP))); dynamic shared memory holds the group's act
// rows (count · inter floats).
extern "C" __global__ void moe_down(const float* act, const unsigned long long* down,
                                    const int* group_expert, const int* group_first,
                                    const int* group_count, const int* pair_order,
                                    const float* weights, float* y, int hidden, int inter) {
    extern __shared__ float staged[];
    int g = blockIdx.x;
    int count = group_count[g];
    const int* pairs = pair_order + group_first[g];
    for (int j = 0; j < count; j++) {
        const float* ap = act + (size_t)pairs[j] * inter;
        for (int i = threadIdx.x; i < inter; i += blockDim.x) staged[j * inter + i] = ap[i];
    }
    __syncthreads();
    const bf16_t* w = (const bf16_t*)down[group_expert[g]];
    int lane = threadIdx.x & 31;
    int first = (blockIdx.y * (blockDim.x >> 5) + (threadIdx.x >> 5)) * MOE_ROWS_PER_WARP;
    for (int r = 0; r < MOE_ROWS_PER_WARP; r++) {
        int h = first + r;
        if (h >= hidden) break;
        const uint4* row = (const uint4*)(w + (size_t)h * inter);
        float ds[MOE_MAX_GROUP] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int c = lane; c < inter / 8; c += 32) {
            uint4 a = row[c];
#pragma unroll
            for (int j = 0; j < MOE_MAX_GROUP; j++) {
                if (j < count) ds[j] += dot8(a, staged + j * inter + c * 8);
            }
        }
#pragma unroll
        for (int j = 0; j < MOE_MAX_GROUP; j++) {
            if (j < count) {
                float d = warp_sum(ds[j]);
                if (lane == 0) y[(size_t)pairs[j] * hidden + h] = weights[pairs[j]] * d;
            }
        }
    }
}

// out[t, :] = sum over j < top_k of y[t · top_k + j, :], in slot order (deterministic).
extern "C" __global__ void moe_sum(const float* y, float* out, int hidden, int top_k) {
    float* dst = out + (size_t)blockIdx.x * hidden;
    const float* src = y + (size_t)blockIdx.x * top_k * hidden;
    for (int h = threadIdx.x; h < hidden; h += blockDim.x) {
        float sum = 0.0f;
        for (int j = 0; j < top_k; j++) sum += src[(size_t)j * hidden + h];
        dst[h] = sum;
    }
}

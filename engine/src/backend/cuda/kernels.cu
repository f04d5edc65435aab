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

// out[rows[r], :] += weights[r] * y[r, :]; one block per row of y. Rows must be distinct
// within one launch (one expert's tokens are).
extern "C" __global__ void scatter_add_weighted(float* out, const float* y, const int* rows,
                                                const float* weights, int cols) {
    float* dst = out + (size_t)rows[blockIdx.x] * cols;
    const float* src = y + (size_t)blockIdx.x * cols;
    float w = weights[blockIdx.x];
    for (int c = threadIdx.x; c < cols; c += blockDim.x) dst[c] += w * src[c];
}

// Most values of a head one lane holds: head_dim <= 256.
#define MAX_PER_LANE 8

// Causal GQA attention of one query row and head per warp (grid: rows × heads, 32 threads),
// with an online softmax over the row's cached positions 0..=position. Lane l holds elements
// l, l + 32, … of the query and output; scores are summed across the warp.
extern "C" __global__ void attention(const float* q, const bf16_t* k_cache,
                                     const bf16_t* v_cache, float* out, const int* positions,
                                     const int* table_offsets, const int* block_tables,
                                     int num_heads, int num_kv_heads, int head_dim,
                                     int block_size, float scale) {
    int row = blockIdx.x;
    int head = blockIdx.y;
    int lane = threadIdx.x;
    int position = positions[row];
    if (position < 0) return;
    int kv_head = head / (num_heads / num_kv_heads);
    int kv_width = num_kv_heads * head_dim;
    const int* table = block_tables + table_offsets[row];
    const float* qh = q + (size_t)row * num_heads * head_dim + head * head_dim;
    float qv[MAX_PER_LANE];
    float acc[MAX_PER_LANE];
#pragma unroll
    for (int i = 0; i < MAX_PER_LANE; i++) {
        qv[i] = (lane + 32 * i < head_dim) ? qh[lane + 32 * i] * scale : 0.0f;
        acc[i] = 0.0f;
    }
    float running_max = NEG_INF;
    float total = 0.0f;
    for (int pos = 0; pos <= position; pos++) {
        size_t slot = (size_t)table[pos / block_size] * block_size + pos % block_size;
        const bf16_t* key = k_cache + slot * kv_width + kv_head * head_dim;
        float partial = 0.0f;
#pragma unroll
        for (int i = 0; i < MAX_PER_LANE; i++) {
            if (lane + 32 * i < head_dim) partial += qv[i] * bf16_to_f32(key[lane + 32 * i]);
        }
        float score = warp_sum(partial);
        float new_max = fmaxf(running_max, score);
        float correction = expf(running_max - new_max);
        float p = expf(score - new_max);
        total = total * correction + p;
        const bf16_t* value = v_cache + slot * kv_width + kv_head * head_dim;
#pragma unroll
        for (int i = 0; i < MAX_PER_LANE; i++) {
            if (lane + 32 * i < head_dim) {
                acc[i] = acc[i] * correction + p * bf16_to_f32(value[lane + 32 * i]);
            }
        }
        running_max = new_max;
    }
    float* oh = out + (size_t)row * num_heads * head_dim + head * head_dim;
#pragma unroll
    for (int i = 0; i < MAX_PER_LANE; i++) {
        if (lane + 32 * i < head_dim) oh[lane + 32 * i] = acc[i] / total;
    }
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

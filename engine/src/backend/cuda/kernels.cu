// Tandem's CUDA kernels, compiled at run time with NVRTC for the device's architecture.
// Activations are f32; weights and the KV cache are bf16, stored as raw 16-bit words so no
// CUDA header is needed (NVRTC then compiles this file without an include path).

typedef unsigned short bf16_t;

// -inf without math headers.
#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float bf16_to_f32(bf16_t h) {
    return __uint_as_float(((unsigned int)h) << 16);
}

// Round to nearest even, as torch converts; one instruction (sm_80+, like the bf16 mma).
__device__ __forceinline__ bf16_t f32_to_bf16(float f) {
    unsigned short h;
    asm("cvt.rn.bf16.f32 %0, %1;\n" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, offset);
    }
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
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

__device__ __forceinline__ bool aligned16(const void* p) { return ((size_t)p & 15) == 0; }

// RMSNorm of one block's run of `len` values, four a load where the run and pointers allow;
// with ADD, src += delta first (the residual add before a norm), written back to src.
template <bool ADD>
__device__ __forceinline__ void rms_norm_run(float* src, const float* delta, const float* weight,
                                             float* dst, int len, float eps) {
    bool vector = (len & 3) == 0 && aligned16(src) && aligned16(dst) && aligned16(weight) &&
                  (!ADD || aligned16(delta));
    int first = vector ? threadIdx.x * 4 : len;
    int step = blockDim.x * 4;
    float sq = 0.0f;
    for (int i = first; i < len; i += step) {
        float4 v = *(const float4*)(src + i);
        if (ADD) {
            float4 d = *(const float4*)(delta + i);
            v = make_float4(v.x + d.x, v.y + d.y, v.z + d.z, v.w + d.w);
            *(float4*)(src + i) = v;
        }
        sq += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
    }
    if (!vector) {
        for (int i = threadIdx.x; i < len; i += blockDim.x) {
            if (ADD) src[i] += delta[i];
            sq += src[i] * src[i];
        }
    }
    // Each thread reads back only the values it wrote above.
    float inv = rsqrtf(block_sum(sq) / (float)len + eps);
    for (int i = first; i < len; i += step) {
        float4 v = *(const float4*)(src + i), w = *(const float4*)(weight + i);
        *(float4*)(dst + i) = make_float4(v.x * inv * w.x, v.y * inv * w.y, v.z * inv * w.z,
                                          v.w * inv * w.w);
    }
    if (!vector) {
        for (int i = threadIdx.x; i < len; i += blockDim.x) dst[i] = src[i] * inv * weight[i];
    }
}

// RMSNorm over each run of `len` values (a row or one head); one block per run.
extern "C" __global__ void rms_norm(const float* x, const float* weight, float* out, int len,
                                    float eps) {
    size_t at = (size_t)blockIdx.x * len;
    rms_norm_run<false>((float*)x + at, nullptr, weight, out + at, len, eps);
}

// h += delta, then out = RMSNorm(h) · weight, a row a block: the residual add and the next
// norm in one pass (two launches and a reread of h apart).
extern "C" __global__ void add_rms_norm(float* h, const float* delta, const float* weight,
                                        float* out, int len, float eps) {
    size_t at = (size_t)blockIdx.x * len;
    rms_norm_run<true>(h + at, delta + at, weight, out + at, len, eps);
}

// The same for short runs (a head's q or k): a warp per run, so a block does not sit mostly
// idle behind its barriers; `runs` in all.
extern "C" __global__ void rms_norm_short(const float* x, const float* weight, float* out,
                                          int len, float eps, int runs) {
    int run = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (run >= runs) return;
    int lane = threadIdx.x & 31;
    const float* src = x + (size_t)run * len;
    float* dst = out + (size_t)run * len;
    float sq = 0.0f;
    for (int i = lane; i < len; i += 32) sq += src[i] * src[i];
    float inv = rsqrtf(warp_sum(sq) / (float)len + eps);
    for (int i = lane; i < len; i += 32) dst[i] = src[i] * inv * weight[i];
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

// Rotate-half RoPE of heads ROPE_HEADS_PER_BLOCK · blockIdx.y … of row blockIdx.x at
// positions[row]: the row's cos and sin (float32 angle position · inv_freq[j], as
// transformers computes it) go to shared memory once, then those heads use them (one block
// for a decode row's 32 heads took ~7 µs). head_dim at most 256.
#define ROPE_HEADS_PER_BLOCK 8
extern "C" __global__ void rope(float* x, const int* positions, const float* inv_freq,
                                int heads, int head_dim) {
    __shared__ float cos_row[128];
    __shared__ float sin_row[128];
    int half = head_dim / 2;
    float position = (float)positions[blockIdx.x];
    for (int j = threadIdx.x; j < half; j += blockDim.x) {
        sincosf(position * inv_freq[j], &sin_row[j], &cos_row[j]);
    }
    __syncthreads();
    int first_head = blockIdx.y * ROPE_HEADS_PER_BLOCK;
    int block_heads = min(heads - first_head, ROPE_HEADS_PER_BLOCK);
    float* row = x + ((size_t)blockIdx.x * heads + first_head) * head_dim;
    for (int i = threadIdx.x; i < block_heads * half; i += blockDim.x) {
        int head = i / half;
        int j = i - head * half;
        float* h = row + head * head_dim;
        float x1 = h[j];
        float x2 = h[j + half];
        h[j] = x1 * cos_row[j] - x2 * sin_row[j];
        h[j + half] = x2 * cos_row[j] + x1 * sin_row[j];
    }
}

// A layer's attention inputs for row blockIdx.x in one pass, a warp a head: q's heads
// normed (by q_norm when given) and rotated in place; k's normed and rotated, and k and v
// stored as bf16 at slot slots[row] of the caches. Lane l holds a head's values l + 32 i
// (i < PER_LANE, head_dim = 32 · PER_LANE), so for head_dim a multiple of 64 (at most 256)
// each rotate-half pair sits in one lane. The same arithmetic as rms_norm_short and rope,
// in the same order.
template <int PER_LANE>
__device__ __forceinline__ void attention_input_head(
    float* q, const float* k, const float* v, const float* q_norm, const float* k_norm,
    bf16_t* k_cache, bf16_t* v_cache, const int* slots, const int* positions,
    const float* inv_freq, int q_heads, int kv_heads, float eps, int head) {
    constexpr int HD = 32 * PER_LANE, PAIRS = PER_LANE / 2;
    int lane = threadIdx.x & 31, row = blockIdx.x;
    int kv_width = kv_heads * HD;
    const float* src;
    float* dst_f32 = nullptr;
    bf16_t* dst_bf16 = nullptr;
    const float* norm = nullptr;
    if (head < q_heads) {
        src = dst_f32 = q + ((size_t)row * q_heads + head) * HD;
        norm = q_norm;
    } else if (head < q_heads + kv_heads) {
        int h = head - q_heads;
        src = k + (size_t)row * kv_width + h * HD;
        dst_bf16 = k_cache + (size_t)slots[row] * kv_width + h * HD;
        norm = k_norm;
    } else {
        int h = head - q_heads - kv_heads;
        src = v + (size_t)row * kv_width + h * HD;
        dst_bf16 = v_cache + (size_t)slots[row] * kv_width + h * HD;
    }
    float x[PER_LANE];
    float sq = 0.0f;
#pragma unroll
    for (int i = 0; i < PER_LANE; i++) {
        x[i] = src[lane + 32 * i];
        sq += x[i] * x[i];
    }
    if (norm) {
        float inv = rsqrtf(warp_sum(sq) / (float)HD + eps);
#pragma unroll
        for (int i = 0; i < PER_LANE; i++) x[i] = x[i] * inv * norm[lane + 32 * i];
    }
    if (head < q_heads + kv_heads) {
        float position = (float)positions[row];
#pragma unroll
        for (int i = 0; i < PAIRS; i++) {
            float sin_j, cos_j;
            sincosf(position * inv_freq[lane + 32 * i], &sin_j, &cos_j);
            float x1 = x[i], x2 = x[i + PAIRS];
            x[i] = x1 * cos_j - x2 * sin_j;
            x[i + PAIRS] = x2 * cos_j + x1 * sin_j;
        }
    }
#pragma unroll
    for (int i = 0; i < PER_LANE; i++) {
        if (dst_f32) {
            dst_f32[lane + 32 * i] = x[i];
        } else {
            dst_bf16[lane + 32 * i] = f32_to_bf16(x[i]);
        }
    }
}

extern "C" __global__ void attention_inputs(float* q, const float* k, const float* v,
                                            const float* q_norm, const float* k_norm,
                                            bf16_t* k_cache, bf16_t* v_cache, const int* slots,
                                            const int* positions, const float* inv_freq,
                                            int q_heads, int kv_heads, int head_dim, float eps) {
    int head = blockIdx.y * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (head >= q_heads + 2 * kv_heads) return;
#define ATTENTION_INPUT_HEAD(per_lane)                                                        \
    attention_input_head<per_lane>(q, k, v, q_norm, k_norm, k_cache, v_cache, slots,         \
                                   positions, inv_freq, q_heads, kv_heads, eps, head)
    switch (head_dim) {
        case 64: ATTENTION_INPUT_HEAD(2); break;
        case 128: ATTENTION_INPUT_HEAD(4); break;
        case 192: ATTENTION_INPUT_HEAD(6); break;
        case 256: ATTENTION_INPUT_HEAD(8); break;
        default: __trap();  // the host sends only these
    }
#undef ATTENTION_INPUT_HEAD
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

// Copies K and V of src_slots[r] into dst_slots[r] of another store (another process's,
// opened through CUDA IPC); one block per row, 16-byte moves when rows allow them.
extern "C" __global__ void copy_kv_rows(const bf16_t* src_k, const bf16_t* src_v,
                                        bf16_t* dst_k, bf16_t* dst_v, const int* src_slots,
                                        const int* dst_slots, int width) {
    size_t from = (size_t)src_slots[blockIdx.x] * width;
    size_t to = (size_t)dst_slots[blockIdx.x] * width;
    if (width % 8 == 0) {
        const uint4* sk = (const uint4*)(src_k + from);
        const uint4* sv = (const uint4*)(src_v + from);
        uint4* dk = (uint4*)(dst_k + to);
        uint4* dv = (uint4*)(dst_v + to);
        for (int c = threadIdx.x; c < width / 8; c += blockDim.x) {
            dk[c] = sk[c];
            dv[c] = sv[c];
        }
    } else {
        for (int c = threadIdx.x; c < width; c += blockDim.x) {
            dst_k[to + c] = src_k[from + c];
            dst_v[to + c] = src_v[from + c];
        }
    }
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

// Merges the splits of attention_split: one block per (row, head), head_dim threads rounded
// up to a warp. Each warp finds the splits' largest max and weighted sum itself (lanes over
// the splits, shuffles); then, 32 splits at a time, lane l weighs split l and the warp takes
// each weight by shuffle as it sums its dimensions. No barrier, no shared memory, so no
// limit on the splits.
extern "C" __global__ void attention_combine(const float* partial_out, const float* partial_max,
                                             const float* partial_sum, float* out,
                                             const int* positions, int num_heads, int head_dim,
                                             int splits) {
    int row = blockIdx.x;
    int head = blockIdx.y;
    int d = threadIdx.x, lane = d & 31;
    if (positions[row] < 0) return;
    size_t first = ((size_t)row * num_heads + head) * splits;
    const float* maxes = partial_max + first;
    float m = NEG_INF;
    for (int s = lane; s < splits; s += 32) m = fmaxf(m, maxes[s]);
    m = warp_max(m);
    // An empty split (max -inf) weighs 0; its values (never written) are read but not used.
    float total = 0.0f;
    for (int s = lane; s < splits; s += 32) {
        if (maxes[s] != NEG_INF) total += expf(maxes[s] - m) * partial_sum[first + s];
    }
    total = warp_sum(total);
    // Lanes past head_dim stay for the shuffles.
    bool in_head = d < head_dim;
    const float* values = partial_out + first * head_dim + (in_head ? d : 0);
    float value = 0.0f;
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
// Greedy picks in two steps so a row's vocabulary is read by many blocks, not one
// latency-bound block: greedy_partial takes part blockIdx.y of row blockIdx.x (gridDim.y
// parts of `part_len` logits) and writes its best logit, that logit's lowest index and the
// sum of exp(logit - best) over the part; greedy_combine merges a row's parts into its token
// and logprob, written to out[2r] and (as bits) out[2r + 1] for one copy back.
extern "C" __global__ void greedy_partial(const float* logits, float* part_best,
                                          int* part_index, float* part_sum, int vocab,
                                          int part_len) {
    __shared__ float best_value[256];
    __shared__ int best_index[256];
    const float* row = logits + (size_t)blockIdx.x * vocab;
    int begin = blockIdx.y * part_len;
    int end = min(vocab, begin + part_len);
    float value = NEG_INF;
    int index = 0x7fffffff;
    for (int i = begin + threadIdx.x; i < end; i += blockDim.x) {
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
    float best = best_value[0];
    float sum = 0.0f;
    // A part of -inf logits adds nothing (and must not add exp(-inf + inf) = NaN).
    if (best != NEG_INF) {
        for (int i = begin + threadIdx.x; i < end; i += blockDim.x) sum += expf(row[i] - best);
    }
    sum = block_sum(sum);
    if (threadIdx.x == 0) {
        int at = blockIdx.x * gridDim.y + blockIdx.y;
        part_best[at] = best;
        part_index[at] = best_index[0];
        part_sum[at] = sum;
    }
}

// One thread per row over its `parts` partial results; ties go to the lowest id.
extern "C" __global__ void greedy_combine(const float* part_best, const int* part_index,
                                          const float* part_sum, unsigned int* out, int rows,
                                          int parts) {
    int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    float best = NEG_INF;
    int index = 0x7fffffff;
    for (int p = r * parts; p < (r + 1) * parts; ++p) {
        if (part_best[p] > best || (part_best[p] == best && part_index[p] < index)) {
            best = part_best[p];
            index = part_index[p];
        }
    }
    float sum = 0.0f;
    for (int p = r * parts; p < (r + 1) * parts; ++p) {
        if (part_sum[p] > 0.0f) sum += part_sum[p] * expf(part_best[p] - best);
    }
    out[2 * r] = (unsigned int)index;
    out[2 * r + 1] = __float_as_uint(-logf(sum));
}

// MoE, routed on the device. Routing slots (pairs) p = token · top_k + j are counted per
// expert, placed in expert order (`sorted_slot[position] = p`, `slot_position[p] = position`),
// and cut into tiles of at most `tile_rows` positions of one expert, listed by moe_offsets
// so a block finds its tile in one load and no count goes back to the host. Expert weights are reached through tables of device
// pointers. Every expert kernel writes rows by position; moe_combine sums each token's
// weighted rows in slot order (deterministic whatever order placement took).

// Experts routed at most: registers one lane of moe_route holds.
#define ROUTE_MAX_PER_LANE 16

// Softmax over each row's router logits, top_k experts (ties to the lower id, as
// torch.topk), weights renormalized over the chosen if `renormalize`. One warp per row.
// Counts each chosen expert in `counts` (this call) and `load` (the layer's lifetime).
__device__ __forceinline__ void route_row(const float* logits, int* expert_ids, float* weights,
                                          int* counts, unsigned long long* load, int row,
                                          int num_experts, int top_k, int renormalize) {
    int lane = threadIdx.x & 31;
    const float* l = logits + (size_t)row * num_experts;
    float v[ROUTE_MAX_PER_LANE];
    float max = NEG_INF;
#pragma unroll
    for (int i = 0; i < ROUTE_MAX_PER_LANE; i++) {
        int e = lane + 32 * i;
        v[i] = e < num_experts ? l[e] : NEG_INF;
        max = fmaxf(max, v[i]);
    }
    for (int offset = 16; offset > 0; offset >>= 1) {
        max = fmaxf(max, __shfl_xor_sync(0xffffffffu, max, offset));
    }
    float total = 0.0f;
#pragma unroll
    for (int i = 0; i < ROUTE_MAX_PER_LANE; i++) {
        // Experts not present score -1: below every probability, never chosen.
        v[i] = lane + 32 * i < num_experts ? expf(v[i] - max) : -1.0f;
        total += fmaxf(v[i], 0.0f);
    }
    total = warp_sum(total);
    int my_expert = 0;
    float my_prob = 0.0f, chosen = 0.0f;
    for (int j = 0; j < top_k; j++) {
        float best = -2.0f;
        int best_expert = 0x7fffffff;
#pragma unroll
        for (int i = 0; i < ROUTE_MAX_PER_LANE; i++) {
            if (v[i] > best) {
                best = v[i];
                best_expert = lane + 32 * i;
            }
        }
        for (int offset = 16; offset > 0; offset >>= 1) {
            float other = __shfl_xor_sync(0xffffffffu, best, offset);
            int other_expert = __shfl_xor_sync(0xffffffffu, best_expert, offset);
            if (other > best || (other == best && other_expert < best_expert)) {
                best = other;
                best_expert = other_expert;
            }
        }
#pragma unroll
        for (int i = 0; i < ROUTE_MAX_PER_LANE; i++) {
            if (lane + 32 * i == best_expert) v[i] = -2.0f;
        }
        float prob = best / total;
        chosen += prob;
        if (lane == j) {
            my_expert = best_expert;
            my_prob = prob;
        }
    }
    if (lane < top_k) {
        size_t p = (size_t)row * top_k + lane;
        expert_ids[p] = my_expert;
        weights[p] = renormalize ? my_prob / chosen : my_prob;
        atomicAdd(&counts[my_expert], 1);
        atomicAdd(&load[my_expert], 1ull);
    }
}

extern "C" __global__ void moe_route(const float* logits, int* expert_ids, float* weights,
                                     int* counts, unsigned long long* load, int rows,
                                     int num_experts, int top_k, int renormalize) {
    int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row < rows) {
        route_row(logits, expert_ids, weights, counts, load, row, num_experts, top_k,
                  renormalize);
    }
}

// Exclusive scan of the per-expert counts (`offsets`, num_experts + 1 entries), and the
// table of tiles of `tile_rows` positions: tile t's expert and first position at tiles[2t]
// and tiles[2t + 1], expert -1 for the tiles past the last (up to max_tiles), so a GEMM
// block finds its tile in one load instead of a search over the experts. `cursor` (when
// given) starts at each expert's offset. One block of at least num_experts threads (at most
// 1024). With
// place_pairs > 0 the block also places that many slots (moe_place's work, a launch fewer
// for a decode step's few).
__device__ __forceinline__ void offsets_and_tiles(int count, int* offsets, int* tiles,
                                                  int* cursor, int num_experts, int tile_rows,
                                                  int max_tiles, const int* expert_ids,
                                                  int* sorted_slot, int* slot_position,
                                                  int place_pairs) {
    __shared__ int rows[1024];
    __shared__ int tile_end[1024];
    int e = threadIdx.x;
    int my_tiles = (count + tile_rows - 1) / tile_rows;
    rows[e] = count;
    tile_end[e] = my_tiles;
    __syncthreads();
    for (int offset = 1; offset < blockDim.x; offset <<= 1) {
        int r = e >= offset ? rows[e - offset] : 0;
        int t = e >= offset ? tile_end[e - offset] : 0;
        __syncthreads();
        rows[e] += r;
        tile_end[e] += t;
        __syncthreads();
    }
    int first = rows[e] - count;
    if (e < num_experts) {
        offsets[e + 1] = rows[e];
        if (cursor) cursor[e] = first;
        for (int i = 0, t = tile_end[e] - my_tiles; i < my_tiles; i++, t++) {
            tiles[2 * t] = e;
            tiles[2 * t + 1] = first + i * tile_rows;
        }
    }
    if (e == 0) offsets[0] = 0;
    for (int t = tile_end[blockDim.x - 1] + e; t < max_tiles; t += blockDim.x) tiles[2 * t] = -1;
    if (place_pairs == 0) return;
    // The tile ends are read; their array becomes the cursors.
    __syncthreads();
    tile_end[e] = first;
    __syncthreads();
    for (int p = e; p < place_pairs; p += blockDim.x) {
        int position = atomicAdd(&tile_end[expert_ids[p]], 1);
        sorted_slot[position] = p;
        slot_position[p] = position;
    }
}

extern "C" __global__ void moe_offsets(const int* counts, int* offsets, int* tiles, int* cursor,
                                       int num_experts, int tile_rows, int max_tiles,
                                       const int* expert_ids, int* sorted_slot,
                                       int* slot_position, int place_pairs) {
    int e = threadIdx.x;
    offsets_and_tiles(e < num_experts ? counts[e] : 0, offsets, tiles, cursor, num_experts,
                      tile_rows, max_tiles, expert_ids, sorted_slot, slot_position, place_pairs);
}

// moe_route, moe_offsets and the placement in one block for a decode step's few rows (a
// warp each, at most 32), the counts kept in shared memory: two launches fewer a layer.
// blockDim.x covers both the rows' warps and the experts (at most 1024).
extern "C" __global__ void moe_route_place(const float* logits, int* expert_ids, float* weights,
                                           unsigned long long* load, int rows, int num_experts,
                                           int top_k, int renormalize, int* offsets,
                                           int* tiles, int tile_rows, int max_tiles,
                                           int* sorted_slot, int* slot_position) {
    __shared__ int counts[1024];
    int e = threadIdx.x;
    counts[e] = 0;
    __syncthreads();
    int warp = threadIdx.x >> 5;
    if (warp < rows) {
        route_row(logits, expert_ids, weights, counts, load, warp, num_experts, top_k,
                  renormalize);
    }
    // The barrier also makes this block's expert_ids writes visible to the placement.
    __syncthreads();
    offsets_and_tiles(e < num_experts ? counts[e] : 0, offsets, tiles, nullptr, num_experts,
                      tile_rows, max_tiles, expert_ids, sorted_slot, slot_position,
                      rows * top_k);
}

// Gives every slot a position among its expert's slots.
extern "C" __global__ void moe_place(const int* expert_ids, int* cursor, int* sorted_slot,
                                     int* slot_position, int pairs) {
    int p = blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= pairs) return;
    int position = atomicAdd(&cursor[expert_ids[p]], 1);
    sorted_slot[position] = p;
    slot_position[p] = position;
}

// Rows [first, first + count) of tile t (moe_offsets' table), and its expert; false past
// the last tile.
__device__ __forceinline__ bool moe_tile(const int* offsets, const int* tiles, int tile_rows,
                                         int t, int* expert, int* first, int* count) {
    int e = tiles[2 * t];
    if (e < 0) return false;
    *expert = e;
    *first = tiles[2 * t + 1];
    *count = min(tile_rows, offsets[e + 1] - *first);
    return true;
}

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

// Eight f32 values at p (16-byte aligned).
__device__ __forceinline__ void load8(float* v, const float* p) {
    float4 lo = *(const float4*)p, hi = *(const float4*)(p + 4);
    v[0] = lo.x, v[1] = lo.y, v[2] = lo.z, v[3] = lo.w;
    v[4] = hi.x, v[5] = hi.y, v[6] = hi.z, v[7] = hi.w;
}

// The same product with 8 f32 values of x in global memory (16-byte aligned).
__device__ __forceinline__ float dot8_global(uint4 w, const float* x) {
    float v[8];
    load8(v, x);
    return dot8(w, v);
}


// y_m[r, j] = x[r] · w_m[j] for the few rows of a decode step (rows <= GEMV_MAX_ROWS) and up
// to three projections of one x (a layer's q, k and v in one launch; n_m rows of w_m, 0 for
// an absent one): x f32 (no bf16 copy to make), w_m [n_m, k] bf16, k a multiple of 8. A warp
// per weight row, read once for every row of x. cuBLAS took 7-10 µs for each of a decode
// layer's 2-17 MB projections, a third of the copy rate. Four 256-thread blocks an SM (64
// registers, no spill; 74 allowed three): a layer's q, k and v rows fill the GPU in fewer
// waves.
#define GEMV_MAX_ROWS 4
extern "C" __global__ void __launch_bounds__(256, 4) gemv_rows(const float* x, int rows, int k, const bf16_t* w0, float* y0,
                                     int n0, const bf16_t* w1, float* y1, int n1,
                                     const bf16_t* w2, float* y2, int n2) {
    int j = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const bf16_t* w = w0;
    float* y = y0;
    int n = n0;
    if (j >= n0) {
        j -= n0;
        w = w1, y = y1, n = n1;
        if (j >= n1) {
            j -= n1;
            w = w2, y = y2, n = n2;
            if (j >= n2) return;
        }
    }
    int lane = threadIdx.x & 31;
    int chunks = k / 8;
    const uint4* row = (const uint4*)(w + (size_t)j * k);
    float acc[GEMV_MAX_ROWS] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int c0 = lane; c0 < chunks; c0 += 32 * LOADS_IN_FLIGHT) {
        uint4 a[LOADS_IN_FLIGHT];
        load_row_chunks(a, row, c0, chunks);
#pragma unroll
        for (int u = 0; u < LOADS_IN_FLIGHT; u++) {
            int c = c0 + 32 * u;
#pragma unroll
            for (int r = 0; r < GEMV_MAX_ROWS; r++) {
                if (c < chunks && r < rows) acc[r] += dot8_global(a[u], x + (size_t)r * k + c * 8);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < GEMV_MAX_ROWS; r++) {
        if (r < rows) {
            float v = warp_sum(acc[r]);
            if (lane == 0) y[(size_t)r * n + j] = v;
        }
    }
}

// Rows of `width` values of a group: position j's row (the last repeated past count, unread).
__device__ __forceinline__ void group_rows(const float** rows, const float* base,
                                           const int* row_of, int first, int count,
                                           int divisor, int width) {
#pragma unroll
    for (int j = 0; j < MOE_MAX_GROUP; j++) {
        int position = first + min(j, count - 1);
        int row = row_of ? row_of[position] / divisor : position;
        rows[j] = base + (size_t)row * width;
    }
}

// act[position, i] = silu(gate row i · x[t]) · (up row i · x[t]) for the positions of group
// blockIdx.x (t = sorted_slot[position] / top_k); a warp per row i, grid (groups, ceil(inter
// / warps)); blocks past the last group return.
extern "C" __global__ void moe_gate_up(const float* x, const unsigned long long* gate_up,
                                       const int* offsets, const int* tiles,
                                       const int* sorted_slot, float* act, int group_size,
                                       int hidden, int inter, int top_k) {
    int expert, first, count;
    if (!moe_tile(offsets, tiles, group_size, blockIdx.x, &expert, &first, &count)) return;
    int i = blockIdx.y * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (i >= inter) return;
    const float* xs[MOE_MAX_GROUP];
    group_rows(xs, x, sorted_slot, first, count, top_k, hidden);
    const bf16_t* w = (const bf16_t*)gate_up[expert];
    const uint4* gate = (const uint4*)(w + (size_t)i * hidden);
    const uint4* up = (const uint4*)(w + (size_t)(inter + i) * hidden);
    int lane = threadIdx.x & 31, chunks = hidden / 8;
    float gs[MOE_MAX_GROUP] = {0.0f, 0.0f, 0.0f, 0.0f};
    float us[MOE_MAX_GROUP] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int c0 = lane; c0 < chunks; c0 += 32 * LOADS_IN_FLIGHT) {
        uint4 a[LOADS_IN_FLIGHT], b[LOADS_IN_FLIGHT];
        load_row_chunks(a, gate, c0, chunks);
        load_row_chunks(b, up, c0, chunks);
#pragma unroll
        for (int u = 0; u < LOADS_IN_FLIGHT; u++) {
            int c = c0 + 32 * u;
#pragma unroll
            for (int j = 0; j < MOE_MAX_GROUP; j++) {
                if (c < chunks && j < count) {
                    float xv[8];
                    load8(xv, xs[j] + c * 8);
                    gs[j] += dot8(a[u], xv);
                    us[j] += dot8(b[u], xv);
                }
            }
        }
    }
#pragma unroll
    for (int j = 0; j < MOE_MAX_GROUP; j++) {
        if (j < count) {
            float gv = warp_sum(gs[j]);
            float uv = warp_sum(us[j]);
            if (lane == 0) act[(size_t)(first + j) * inter + i] = gv / (1.0f + expf(-gv)) * uv;
        }
    }
}

// y[position, h] = down row h · act[position] for the positions of group blockIdx.x; a warp
// per DOWN_ROWS_PER_WARP rows h, grid (groups, ceil(hidden / (warps · DOWN_ROWS_PER_WARP))).
// Down rows are short (an expert's width: 768 values, 3 chunks a lane), so a warp loads
// several rows' chunks at once; a row a warp spent most of its time finding its tile.
#define DOWN_ROWS_PER_WARP 4
#define DOWN_LOADS 4
extern "C" __global__ void moe_down(const float* act, const unsigned long long* down,
                                    const int* offsets, const int* tiles, bf16_t* y,
                                    int group_size, int hidden, int inter) {
    int expert, first, count;
    if (!moe_tile(offsets, tiles, group_size, blockIdx.x, &expert, &first, &count)) return;
    int h0 = (blockIdx.y * (blockDim.x >> 5) + (threadIdx.x >> 5)) * DOWN_ROWS_PER_WARP;
    if (h0 >= hidden) return;
    const float* as[MOE_MAX_GROUP];
    group_rows(as, act, nullptr, first, count, 1, inter);
    const bf16_t* w = (const bf16_t*)down[expert];
    int lane = threadIdx.x & 31, chunks = inter / 8;
    float ds[DOWN_ROWS_PER_WARP][MOE_MAX_GROUP] = {};
    for (int c0 = lane; c0 < chunks; c0 += 32 * DOWN_LOADS) {
        uint4 a[DOWN_ROWS_PER_WARP][DOWN_LOADS];
#pragma unroll
        for (int r = 0; r < DOWN_ROWS_PER_WARP; r++) {
            if (h0 + r < hidden) {
                load_row_chunks<DOWN_LOADS>(a[r], (const uint4*)(w + (size_t)(h0 + r) * inter), c0,
                                            chunks);
            }
        }
#pragma unroll
        for (int u = 0; u < DOWN_LOADS; u++) {
            int c = c0 + 32 * u;
#pragma unroll
            for (int j = 0; j < MOE_MAX_GROUP; j++) {
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
        for (int j = 0; j < MOE_MAX_GROUP; j++) {
            if (h0 + r < hidden && j < count) {
                float d = warp_sum(ds[r][j]);
                if (lane == 0) y[(size_t)(first + j) * hidden + h0 + r] = f32_to_bf16(d);
            }
        }
    }
}

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

__device__ __forceinline__ unsigned int shared_address(const void* p) {
    unsigned long long a;
    asm("cvta.to.shared.u64 %0, %1;" : "=l"(a) : "l"(p));
    return (unsigned int)a;
}

// 16 bytes from global to shared memory (a shared-window address), asynchronously; zeros
// when !valid (src unread).
__device__ __forceinline__ void copy16_async_to(unsigned int dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                 "r"(valid ? 16 : 0));
}

__device__ __forceinline__ void copy16_async(void* dst, const void* src, bool valid) {
    copy16_async_to(shared_address(dst), src, valid);
}

__device__ __forceinline__ void copies_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int PENDING>
__device__ __forceinline__ void copies_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING));
}

// c[16 × 8] += a[16 × 16] · b[16 × 8], bf16 inputs as pairs in 32-bit registers.
__device__ __forceinline__ void mma_bf16(float* c, const unsigned int* a, const unsigned int* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ unsigned int shared_word(const bf16_t* p) {
    return *(const unsigned int*)p;
}

// Two floats as a bf16 pair, `lo` in the low half: one conversion instruction.
__device__ __forceinline__ unsigned int pack_bf16(float lo, float hi) {
    unsigned int packed;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(packed) : "f"(hi), "f"(lo));
    return packed;
}

// Fragments of 8 × 8 bf16 matrices from shared memory: lane l gives the address of row l % 8
// of matrix l / 8, and gets row l / 4, columns 2 (l % 4) and the next of each matrix.
__device__ __forceinline__ void load_matrices_x2(unsigned int* r, const bf16_t* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(shared_address(row)));
}

__device__ __forceinline__ void load_matrices_x4(unsigned int* r, const bf16_t* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_address(row)));
}

// The same, each matrix transposed on the way in.
__device__ __forceinline__ void load_matrices_x4_transposed(unsigned int* r, const bf16_t* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_address(row)));
}

// SWIGLU: the expert's matrix holds `n` gate rows then `n` up rows, and block column j
// computes gate and up rows j · 64 … j · 64 + 63 together, writing silu(gate) · up as bf16
// to `act` ([rows, n]). Otherwise it computes rows j · 128 … of an [n, k] matrix into f32 `c`.
// Where row r of a grouped GEMM's A (r < GEMM_BM) and B tiles comes from, null past the
// expert's rows or the matrix: row p of the expert's rows is row a_rows[p] / a_row_divisor
// of `a` when a_rows is given (a token's row gathered for each of its slots), else row
// m0 + p; B rows are weight rows of column block blockIdx.x (for SWIGLU, gate rows then the
// same columns' up rows). `threads` threads share the work; the caller synchronizes.
template <bool SWIGLU>
__device__ __forceinline__ void gemm_row_sources(const bf16_t** row_src, const bf16_t* a,
                                                 const int* a_rows, int a_row_divisor,
                                                 const bf16_t* w, int rows, int m0, int n,
                                                 int k, int thread, int threads) {
    for (int r = thread; r < GEMM_BM + GEMM_BN; r += threads) {
        const bf16_t* src = nullptr;
        if (r < GEMM_BM) {
            if (r < rows) src = a + (size_t)(a_rows ? a_rows[m0 + r] / a_row_divisor : m0 + r) * k;
        } else {
            int b_row = r - GEMM_BM, row;
            if (SWIGLU) {
                int col = blockIdx.x * (GEMM_BN / 2) + b_row % (GEMM_BN / 2);
                row = col >= n ? -1 : (b_row < GEMM_BN / 2 ? col : n + col);
            } else {
                row = blockIdx.x * GEMM_BN + b_row;
                if (row >= n) row = -1;
            }
            if (row >= 0) src = w + (size_t)row * k;
        }
        row_src[r] = src;
    }
}

// Queues one stage's copies of a grouped GEMM's tiles: values [k0 + column, k0 + column + 8)
// of rows first_row + i · row_step (i < GEMM_COPIES) of the A and B tiles (sources from
// gemm_row_sources; zeros past the rows, the matrix or k) to a_dst and b_dst plus
// i · row_step · row_bytes. A zero-filled copy names `a` or `w`, unread.
__device__ __forceinline__ void queue_gemm_copies(const bf16_t* const* row_src, const bf16_t* a,
                                                  const bf16_t* w, unsigned int a_dst,
                                                  unsigned int b_dst, int row_bytes,
                                                  int first_row, int row_step, int column,
                                                  int k0, int k) {
    bool in_k = k0 + column < k;
#pragma unroll
    for (int i = 0; i < GEMM_COPIES; i++) {
        unsigned int at = i * row_step * row_bytes;
        const bf16_t* src = row_src[first_row + i * row_step];
        copy16_async_to(a_dst + at, in_k && src ? src + k0 + column : a, in_k && src);
        src = row_src[GEMM_BM + first_row + i * row_step];
        copy16_async_to(b_dst + at, in_k && src ? src + k0 + column : w, in_k && src);
    }
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
    auto load = [&](int stage, int k0) {
        queue_gemm_copies(row_src, a, w, a_dst + stage * sizeof(ATile),
                          b_dst + stage * sizeof(BTile), GEMM_LD * 2, first_row, row_step, chunk,
                          k0, k);
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
    for (int s = 0; s < GEMM_STAGES - 1; s++) {
        if (s < steps) load(s, s * GEMM_BK);
        copies_commit();
    }
    for (int step = 0; step < steps; step++) {
        copies_wait<GEMM_STAGES - 2>();
        __syncthreads();
        int next = step + GEMM_STAGES - 1;
        if (next < steps) load(next % GEMM_STAGES, next * GEMM_BK);
        copies_commit();
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
    grouped_gemm<true>(x, sorted_slot, top_k, gate_up, offsets, tiles, inter, hidden, nullptr,
                       act);
}

// y[position] = act[position] · downᵀ as bf16 (half the bytes moe_combine reads);
// grid (ceil(hidden / 128), tiles upper bound).
extern "C" __global__ void __launch_bounds__(GEMM_THREADS, 2)
    moe_gemm_down(const bf16_t* act, const unsigned long long* down, const int* offsets,
                  const int* tiles, int hidden, int inter, bf16_t* y) {
    grouped_gemm<false>(act, nullptr, 1, down, offsets, tiles, hidden, inter, y, nullptr);
}

// The same GEMMs on Hopper's warpgroup tensor-core instructions (sm_90a: wgmma reads both
// operands from shared memory, where mma.sync kernels spend most of their instructions
// loading fragments). Two warpgroups per 128 × 128 tile, each 64 rows × 128 columns as
// wgmma m64n128k16; tiles stored 128-byte swizzled (16-byte chunk c of row r at chunk
// c ^ (r % 8)), the layout the matrix descriptors name. For SWIGLU a thread holds a gate
// column and its up column (n8 blocks j and j + 8), so the activation needs no shared memory.
#define WGMMA_STAGE_BYTES ((GEMM_BM + GEMM_BN) * GEMM_BK * 2)
// Stages plus slack to align them to the 1024-byte swizzle pattern.
#define WGMMA_SHARED_BYTES (GEMM_STAGES * WGMMA_STAGE_BYTES + 1024)

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// Shared-memory matrix descriptor, 128-byte swizzle: 8-row groups (rows of 128 bytes)
// 1024 bytes apart. K-major operands have k along the rows; MN-major ones (the transposed
// form) have 64 m or n values along a row, k down the rows, and the next 64 m or n values
// `mn_block_bytes` further.
__device__ __forceinline__ unsigned long long wgmma_descriptor(unsigned int address,
                                                               unsigned int mn_block_bytes = 0) {
    return (unsigned long long)((address & 0x3FFFF) >> 4) |
           ((unsigned long long)(mn_block_bytes >> 4) << 16) |
           ((unsigned long long)(1024 >> 4) << 32) | (1ull << 62);
}

// wgmma operand lists: accumulator registers %0 … (eight a macro) and their constraints.
#define WGMMA_REGS8(a, b, c, d, e, f, g, h) "%" #a ", %" #b ", %" #c ", %" #d ", %" #e ", %" #f ", %" #g ", %" #h
#define WGMMA_REGS32                                                                          \
    WGMMA_REGS8(0, 1, 2, 3, 4, 5, 6, 7) ", " WGMMA_REGS8(8, 9, 10, 11, 12, 13, 14, 15) ", "   \
        WGMMA_REGS8(16, 17, 18, 19, 20, 21, 22, 23) ", " WGMMA_REGS8(24, 25, 26, 27, 28, 29, 30, 31)
#define WGMMA_OUT8(d, i)                                                                      \
    "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
        "+f"(d[i + 6]), "+f"(d[i + 7])
#define WGMMA_OUT32(d, i) WGMMA_OUT8(d, i), WGMMA_OUT8(d, i + 8), WGMMA_OUT8(d, i + 16), WGMMA_OUT8(d, i + 24)
// The start of an m64n128k16 instruction (its 64 accumulators); `scale_d` names the operand
// that says whether d is added to.
#define WGMMA_M64N128K16(scale_d)                                                             \
    "{\n.reg .pred p;\nsetp.ne.b32 p, " scale_d ", 0;\n"                                     \
    "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {" WGMMA_REGS32 ", "               \
    WGMMA_REGS8(32, 33, 34, 35, 36, 37, 38, 39) ", " WGMMA_REGS8(40, 41, 42, 43, 44, 45, 46, 47) ", " \
    WGMMA_REGS8(48, 49, 50, 51, 52, 53, 54, 55) ", " WGMMA_REGS8(56, 57, 58, 59, 60, 61, 62, 63) "}, "

__device__ __forceinline__ void wgmma_m64n128k16(float* d, unsigned long long a,
                                                 unsigned long long b) {
    asm volatile(WGMMA_M64N128K16("%66") "%64, %65, p, 1, 1, 0, 0;\n}\n"
        : WGMMA_OUT32(d, 0), WGMMA_OUT32(d, 32)
        : "l"(a), "l"(b), "r"(1)
        : "memory");
}

// d[64 × 128] += a · b with a in registers (an mma m16k16 A fragment a warp, the warp's
// 16 rows of the 64) and b an MN-major (transposed) descriptor.
__device__ __forceinline__ void wgmma_m64n128k16_registers(float* d, const unsigned int* a,
                                                           unsigned long long b) {
    asm volatile(WGMMA_M64N128K16("%69") "{%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
        : WGMMA_OUT32(d, 0), WGMMA_OUT32(d, 32)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1)
        : "memory");
}

// d[64 × 64] += a · b, both shared-memory descriptors.
__device__ __forceinline__ void wgmma_m64n64k16(float* d, unsigned long long a,
                                                unsigned long long b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {" WGMMA_REGS32
        "}, %32, %33, p, 1, 1, 0, 0;\n}\n"
        : WGMMA_OUT32(d, 0)
        : "l"(a), "l"(b), "r"(1)
        : "memory");
}
#endif

template <bool SWIGLU>
__device__ __forceinline__ void grouped_gemm_wgmma(const bf16_t* a, const int* a_rows,
                                                   int a_row_divisor,
                                                   const unsigned long long* matrices,
                                                   const int* offsets, const int* tiles, int n,
                                                   int k, bf16_t* c, bf16_t* act) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    extern __shared__ __align__(16) unsigned char gemm_shared[];
    __shared__ const bf16_t* row_src[GEMM_BM + GEMM_BN];
    int expert, m0, rows;
    if (!moe_tile(offsets, tiles, GEMM_BM, blockIdx.y, &expert, &m0, &rows)) {
        return;
    }
    const bf16_t* w = (const bf16_t*)matrices[expert];
    int tid = threadIdx.x;
    gemm_row_sources<SWIGLU>(row_src, a, a_rows, a_row_divisor, w, rows, m0, n, k, tid,
                             GEMM_THREADS);
    __syncthreads();
    // Stage s: A rows at base + s · WGMMA_STAGE_BYTES, B rows GEMM_BM · 128 bytes after.
    unsigned int base = (shared_address(gemm_shared) + 1023) & ~1023u;
    const int row_step = GEMM_THREADS / (GEMM_BK / 8);
    int chunk = tid % (GEMM_BK / 8);
    int first_row = tid / (GEMM_BK / 8);
    // row_step is a multiple of 8, so every row this thread copies swizzles its chunk alike.
    unsigned int dst = base + first_row * 128 + ((chunk ^ (first_row & 7)) << 4);
    auto load = [&](int stage, int k0) {
        unsigned int at = dst + stage * WGMMA_STAGE_BYTES;
        queue_gemm_copies(row_src, a, w, at, at + GEMM_BM * 128, 128, first_row, row_step,
                          chunk * 8, k0, k);
    };
    float d[64];
#pragma unroll
    for (int i = 0; i < 64; i++) d[i] = 0.0f;
    int warpgroup = tid >> 7;
    int steps = (k + GEMM_BK - 1) / GEMM_BK;
#pragma unroll
    for (int s = 0; s < GEMM_STAGES - 1; s++) {
        if (s < steps) load(s, s * GEMM_BK);
        copies_commit();
    }
    for (int step = 0; step < steps; step++) {
        copies_wait<GEMM_STAGES - 2>();
        // The copies were generic-proxy writes; wgmma reads through the async proxy.
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        __syncthreads();
        // Every warpgroup finished the last step's wgmmas (waited below), so the stage
        // they read may be refilled.
        int next = step + GEMM_STAGES - 1;
        if (next < steps) load(next % GEMM_STAGES, next * GEMM_BK);
        copies_commit();
        unsigned int stage = base + (step % GEMM_STAGES) * WGMMA_STAGE_BYTES;
        unsigned int a_tile = stage + warpgroup * 64 * 128;
        unsigned int b_tile = stage + GEMM_BM * 128;
        asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
        for (int ks = 0; ks < GEMM_BK / 16; ks++) {
            // 16 k values are 32 bytes along the swizzled row.
            wgmma_m64n128k16(d, wgmma_descriptor(a_tile + ks * 32),
                             wgmma_descriptor(b_tile + ks * 32));
        }
        asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
        asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
    }
    // d[4j + e]: row 16 (warp % 4) + g (+ 8 for e >= 2) of the warpgroup's 64, column
    // 8j + 2t (+ 1 for odd e).
    int lane = tid & 31, g = lane >> 2, t = lane & 3;
    int row = warpgroup * 64 + ((tid >> 5) & 3) * 16 + g;
#pragma unroll
    for (int half = 0; half < 2; half++) {
        int r = row + 8 * half;
        if (r >= rows) continue;
        if (SWIGLU) {
#pragma unroll
            for (int j = 0; j < 8; j++) {
                int col = blockIdx.x * (GEMM_BN / 2) + 8 * j + 2 * t;
                if (col >= n) continue;
                float out[2];
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    float gate = d[4 * j + 2 * half + e];
                    float up = d[4 * (j + 8) + 2 * half + e];
                    out[e] = gate / (1.0f + expf(-gate)) * up;
                }
                *(unsigned int*)(act + (size_t)(m0 + r) * n + col) = pack_bf16(out[0], out[1]);
            }
        } else {
#pragma unroll
            for (int j = 0; j < 16; j++) {
                int col = blockIdx.x * GEMM_BN + 8 * j + 2 * t;
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

extern "C" __global__ void __launch_bounds__(GEMM_THREADS, 2)
    moe_wgmma_gate_up(const bf16_t* x, const int* sorted_slot, int top_k,
                      const unsigned long long* gate_up, const int* offsets, const int* tiles,
                      int inter, int hidden, bf16_t* act) {
    grouped_gemm_wgmma<true>(x, sorted_slot, top_k, gate_up, offsets, tiles, inter, hidden,
                             nullptr, act);
}

extern "C" __global__ void __launch_bounds__(GEMM_THREADS, 2)
    moe_wgmma_down(const bf16_t* act, const unsigned long long* down, const int* offsets,
                   const int* tiles, int hidden, int inter, bf16_t* y) {
    grouped_gemm_wgmma<false>(act, nullptr, 1, down, offsets, tiles, hidden, inter, y, nullptr);
}

// out[t] = sum over j < top_k of weights[t · top_k + j] · y[slot_position[t · top_k + j]], in
// slot order; one block per token, 8 columns a thread at a time (16-byte loads of y) when
// hidden is a multiple of 8 (two-byte loads ran at ~30% of the copy rate).
extern "C" __global__ void moe_combine(const bf16_t* y, const int* slot_position,
                                       const float* weights, float* out, int hidden, int top_k) {
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
// allows.
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
template <int THREADS, int HD, bool SWIZZLED = false>
__device__ __forceinline__ void load_kv_tiles(KvTile* ks, KvTile* vs, const bf16_t* k_cache,
                                              const bf16_t* v_cache, const int* slots,
                                              int kv_width, int kv_head, int head_dim,
                                              int thread) {
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
                if (whole || j < FLASH_K_TILE) {
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
    const float* q, const bf16_t* k_cache, const bf16_t* v_cache, float* out,
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
        float* dst = out + (size_t)(first_row + local) * q_width + head * hd;
#pragma unroll
        for (int n = 0; n < FLASH_MAX_HEAD_DIM / 8; n++) {
            if (n < chunks) {
                *(float2*)(dst + n * 8 + t * 2) =
                    make_float2(o[n][2 * r] * inverse, o[n][2 * r + 1] * inverse);
            }
        }
    }
}

#define PREFILL_MMA_KERNEL(name, hd, wgmma, threads, blocks)                                   \
    extern "C" __global__ void __launch_bounds__(threads, blocks)                             \
        name(const float* q, const bf16_t* k_cache, const bf16_t* v_cache, float* out,        \
             const int* tile_rows, const int* tile_counts, const int* tile_positions,         \
             const int* tile_table_offsets, const int* block_tables, int num_heads,           \
             int num_kv_heads, int head_dim, int block_size, float q_scale) {                 \
        prefill_attention<hd, wgmma>(q, k_cache, v_cache, out, tile_rows, tile_counts,       \
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
template <int HD>
__device__ __forceinline__ void decode_attention(
    const float* q, const bf16_t* k_cache, const bf16_t* v_cache, float* partial_out,
    float* partial_max, float* partial_sum, const int* positions, const int* table_offsets,
    const int* block_tables, int num_heads, int num_kv_heads, int head_dim, int block_size,
    float q_scale) {
    __shared__ __align__(16) KvTile ks[FLASH_K_TILE];
    __shared__ __align__(16) KvTile vs[FLASH_K_TILE];
    __shared__ int slots[FLASH_K_TILE];
    const int hd = HD ? HD : head_dim;
    int row = blockIdx.x;
    int kv_head = blockIdx.y;
    int split = blockIdx.z;
    int lane = threadIdx.x;
    int g = lane >> 2, t = lane & 3;
    int position = positions[row];
    if (position < 0) return;
    int group = num_heads / num_kv_heads;
    int kv_width = num_kv_heads * hd;
    const int steps = hd / 16;
    const int chunks = hd / 8;
    int first = split * FLASH_K_TILE;
    // This lane's two query heads (rows g and g + 8 of the tile) and where their partials go.
    size_t part[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
        part[r] = ((size_t)row * num_heads + kv_head * group + g + 8 * r) * gridDim.z + split;
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
    const int* table = block_tables + table_offsets[row];
    int last = min(first + FLASH_K_TILE - 1, position);
    find_slots(slots, table, block_size, first, last, lane, 32);
    __syncwarp();
    load_kv_tiles<32, HD>(ks, vs, k_cache, v_cache, slots, kv_width, kv_head, hd, lane);
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
        decode_attention<hd>(q, k_cache, v_cache, partial_out, partial_max, partial_sum,     \
                             positions, table_offsets, block_tables, num_heads, num_kv_heads, \
                             head_dim, block_size, q_scale);                                  \
    }
DECODE_MMA_KERNEL(attention_decode_mma, 0)
DECODE_MMA_KERNEL(attention_decode_mma_hd128, 128)

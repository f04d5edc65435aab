// Row-wise and element-wise kernels: embedding, RMSNorm, residual adds, RoPE, a layer's
// attention inputs, KV cache stores and loads, row gathers and scatters.

// out[r, :] = table[ids[r], :]; one block per row.
extern "C" __global__ void embed(const bf16_t* table, const unsigned int* ids, float* out,
                                 int cols) {
    after_previous_kernel();
    const bf16_t* src = table + (size_t)ids[blockIdx.x] * cols;
    float* dst = out + (size_t)blockIdx.x * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) dst[c] = bf16_to_f32(src[c]);
}

// What rms_norm_run adds to its run before the norm: nothing, or a run of floats (the
// residual add). Another source (moe_gemm.cu's experts) gives the same three members.
struct NoDelta {
    static constexpr bool adds = false;
    __device__ bool aligned() const { return true; }
    __device__ float4 four(int) const { return make_float4(0.0f, 0.0f, 0.0f, 0.0f); }
    __device__ float one(int) const { return 0.0f; }
};

struct RunDelta {
    static constexpr bool adds = true;
    const float* run;
    __device__ bool aligned() const { return aligned16(run); }
    __device__ float4 four(int i) const { return *(const float4*)(run + i); }
    __device__ float one(int i) const { return run[i]; }
};

// RMSNorm of one block's run of `len` values, four a load where the run and pointers allow;
// where delta adds, src += delta first (the residual add before a norm), written back to
// src. Where dst16 is given, the result goes there rounded to bf16 too: the GEMMs' input,
// made here instead of by to_bf16 reading dst back.
template <class Delta>
__device__ __forceinline__ void rms_norm_run(float* src, Delta delta, const float* weight,
                                             float* dst, bf16_t* dst16, int len, float eps) {
    bool vector = (len & 3) == 0 && aligned16(src) && aligned16(dst) && aligned16(weight) &&
                  delta.aligned() && ((size_t)dst16 & 7) == 0;
    int first = vector ? threadIdx.x * 4 : len;
    int step = blockDim.x * 4;
    float sq = 0.0f;
    for (int i = first; i < len; i += step) {
        float4 v = *(const float4*)(src + i);
        if (Delta::adds) {
            float4 d = delta.four(i);
            v = make_float4(v.x + d.x, v.y + d.y, v.z + d.z, v.w + d.w);
            *(float4*)(src + i) = v;
        }
        sq += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
    }
    if (!vector) {
        for (int i = threadIdx.x; i < len; i += blockDim.x) {
            if (Delta::adds) src[i] += delta.one(i);
            sq += src[i] * src[i];
        }
    }
    // Each thread reads back only the values it wrote above.
    float inv = rsqrtf(block_sum(sq) / (float)len + eps);
    for (int i = first; i < len; i += step) {
        float4 v = *(const float4*)(src + i), w = *(const float4*)(weight + i);
        float4 y = make_float4(v.x * inv * w.x, v.y * inv * w.y, v.z * inv * w.z, v.w * inv * w.w);
        *(float4*)(dst + i) = y;
        if (dst16) *(uint2*)(dst16 + i) = make_uint2(pack_bf16(y.x, y.y), pack_bf16(y.z, y.w));
    }
    if (!vector) {
        for (int i = threadIdx.x; i < len; i += blockDim.x) {
            float y = src[i] * inv * weight[i];
            dst[i] = y;
            if (dst16) dst16[i] = f32_to_bf16(y);
        }
    }
}

// RMSNorm over each run of `len` values (a row or one head), one block a run (out16, given
// only for rows: see rms_norm_run).
extern "C" __global__ void rms_norm(const float* x, const float* weight, float* out,
                                    bf16_t* out16, int len, float eps) {
    after_previous_kernel();
    size_t at = (size_t)blockIdx.x * len;
    rms_norm_run((float*)x + at, NoDelta(), weight, out + at, out16 ? out16 + at : nullptr, len,
                 eps);
}

// h += delta, then out = RMSNorm(h) · weight, a row a block: the residual add and the next
// norm in one pass (two launches and a reread of h apart).
extern "C" __global__ void add_rms_norm(float* h, const float* delta, const float* weight,
                                        float* out, bf16_t* out16, int len, float eps) {
    after_previous_kernel();
    size_t at = (size_t)blockIdx.x * len;
    rms_norm_run(h + at, RunDelta{delta + at}, weight, out + at, out16 ? out16 + at : nullptr,
                 len, eps);
}

// The same for short runs (a head's q or k): a warp per run, so a block does not sit mostly
// idle behind its barriers; `runs` in all.
extern "C" __global__ void rms_norm_short(const float* x, const float* weight, float* out,
                                          int len, float eps, int runs) {
    after_previous_kernel();
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
    after_previous_kernel();
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) acc[i] += x[i];
}

// x[r, :] += bias; one block per row.
extern "C" __global__ void add_bias(float* x, const float* bias, int cols) {
    after_previous_kernel();
    float* row = x + (size_t)blockIdx.x * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) row[c] += bias[c];
}

// x[r, :] *= scales[r]; one block per row.
extern "C" __global__ void scale_rows(float* x, const float* scales, int cols) {
    after_previous_kernel();
    float* row = x + (size_t)blockIdx.x * cols;
    float s = scales[blockIdx.x];
    for (int c = threadIdx.x; c < cols; c += blockDim.x) row[c] *= s;
}

// out[r, i] = silu(gate[r, i]) * up[r, i] where gate_up[r] = gate ++ up; one block per row.
extern "C" __global__ void swiglu(const float* gate_up, float* out, int inter) {
    after_previous_kernel();
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
    after_previous_kernel();
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
    after_previous_kernel();
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

// store[slots[r], :] = bf16(src[r, :]); one block per row. Like every writer of cached keys
// but attention_inputs, it lets the next kernel launch only once it is done: decode attention
// reads older keys before its wait.
extern "C" __global__ void store_rows(bf16_t* store, const float* src, const int* slots,
                                      int width) {
    wait_for_previous_kernel();
    bf16_t* dst = store + (size_t)slots[blockIdx.x] * width;
    const float* row = src + (size_t)blockIdx.x * width;
    for (int c = threadIdx.x; c < width; c += blockDim.x) dst[c] = f32_to_bf16(row[c]);
}

// out[r, :] = f32(store[slots[r], :]); one block per row.
extern "C" __global__ void load_rows(const bf16_t* store, const int* slots, float* out,
                                     int width) {
    after_previous_kernel();
    const bf16_t* src = store + (size_t)slots[blockIdx.x] * width;
    float* dst = out + (size_t)blockIdx.x * width;
    for (int c = threadIdx.x; c < width; c += blockDim.x) dst[c] = bf16_to_f32(src[c]);
}

// Copies K and V of src_slots[r] into dst_slots[r] of another store (another process's,
// opened through CUDA IPC); one block per row, 16-byte moves when rows allow them.
extern "C" __global__ void copy_kv_rows(const bf16_t* src_k, const bf16_t* src_v,
                                        bf16_t* dst_k, bf16_t* dst_v, const int* src_slots,
                                        const int* dst_slots, int width) {
    wait_for_previous_kernel();  // no early launch after it, as store_rows
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

// out = bf16(x), TO_BF16_VALUES values a thread: two 16-byte loads and one 16-byte store where
// n and the pointers allow (a value a thread ran at about a third of the copy rate: 22 µs to
// convert a 2048 × 2048 prompt's activations before its GEMMs, 680 µs of a 2k prefill).
#define TO_BF16_VALUES 8
extern "C" __global__ void to_bf16(const float* x, bf16_t* out, int n) {
    after_previous_kernel();
    size_t first = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * TO_BF16_VALUES;
    if (first >= (size_t)n) return;
    if (first + TO_BF16_VALUES <= (size_t)n && aligned16(x + first) && aligned16(out + first)) {
        float v[TO_BF16_VALUES];
        load8(v, x + first);
        *(uint4*)(out + first) = make_uint4(pack_bf16(v[0], v[1]), pack_bf16(v[2], v[3]),
                                            pack_bf16(v[4], v[5]), pack_bf16(v[6], v[7]));
        return;
    }
    for (size_t i = first; i < first + TO_BF16_VALUES && i < (size_t)n; i++) {
        out[i] = f32_to_bf16(x[i]);
    }
}

// out[r, :] = x[rows[r], :]; one block per output row.
extern "C" __global__ void gather_rows(const float* x, const int* rows, float* out, int cols) {
    after_previous_kernel();
    const float* src = x + (size_t)rows[blockIdx.x] * cols;
    float* dst = out + (size_t)blockIdx.x * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) dst[c] = src[c];
}

// out[rows[r], :] += weights[r] * y[r, :]; one block per row of y. Rows may repeat within
// one launch (a token's several experts on one expert-parallel rank), so adds are atomic.
extern "C" __global__ void scatter_add_weighted(float* out, const float* y, const int* rows,
                                                const float* weights, int cols) {
    after_previous_kernel();
    float* dst = out + (size_t)rows[blockIdx.x] * cols;
    const float* src = y + (size_t)blockIdx.x * cols;
    float w = weights[blockIdx.x];
    for (int c = threadIdx.x; c < cols; c += blockDim.x) atomicAdd(&dst[c], w * src[c]);
}

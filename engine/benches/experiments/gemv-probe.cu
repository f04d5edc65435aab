// A decode step's one-row matrix-vector products (q/k/v: 5120 x 2048, o: 2048 x 4096, bf16)
// against a read-only kernel of the same bytes, each timed cold (L2 emptied by a 256 MB
// write) alone and eight different matrices back to back. Says whether the engine's
// gemv_rows is short of what a kernel can read at this size, and whether staging the weights
// through shared memory by bulk copies (many more bytes in flight an SM than registers hold)
// gets closer. Standalone, built on the GPU machine:
//   nvcc -O3 -gencode=arch=compute_90a,code=sm_90a -o /tmp/gemv-probe gemv-probe.cu && /tmp/gemv-probe
// Rows cut into parts (gemv_parts: half or quarter rows a warp) ran at the read-only
// kernel's rate where a warp a row did not; the engine's version of them was slower
// (CUDA_NOTES v25). The last variant holds parts to the engine's four blocks an SM, to
// tell occupancy from the rest of the engine's kernel (not yet run).
// It also builds on a CPU-only machine, the binary carried over: pip's 13.0 wheels
// nvidia-cuda-nvcc, nvidia-cuda-crt (crt/host_config.h) and nvidia-nvvm (cicc) unpacked
// into one tree, nvidia-cuda-runtime for cuda_runtime.h and libcudart_static.a; add
// -I<runtime>/include -L<runtime>/lib -cudart static to the command above.
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <algorithm>
#include <cmath>
#include <cstring>

#include "probe-check.cuh"

typedef unsigned short bf16_t;

__device__ __forceinline__ float dot8(uint4 w, const float* x) {
    return x[0] * __uint_as_float(w.x << 16) + x[1] * __uint_as_float(w.x & 0xffff0000u)
         + x[2] * __uint_as_float(w.y << 16) + x[3] * __uint_as_float(w.y & 0xffff0000u)
         + x[4] * __uint_as_float(w.z << 16) + x[5] * __uint_as_float(w.z & 0xffff0000u)
         + x[6] * __uint_as_float(w.w << 16) + x[7] * __uint_as_float(w.w & 0xffff0000u);
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Reads `words` 16-byte words, LOADS in flight a thread; writes one word so nothing is
// optimised away.
#define LOADS 8
__global__ void read_only(const uint4* p, size_t words, unsigned int* out) {
    unsigned int acc = 0;
    size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < words; i += stride * LOADS) {
        uint4 a[LOADS];
#pragma unroll
        for (int u = 0; u < LOADS; u++) a[u] = i + u * stride < words ? p[i + u * stride] : make_uint4(0, 0, 0, 0);
#pragma unroll
        for (int u = 0; u < LOADS; u++) acc ^= a[u].x ^ a[u].y ^ a[u].z ^ a[u].w;
    }
    if (acc == 0x12345678u) *out = acc;
}

// The engine's gemv_rows for one row: a warp a weight row, LOADS chunks a lane in flight.
__global__ void __launch_bounds__(256, 4) gemv_warp_rows(const float* x, const bf16_t* w, float* y, int n, int k) {
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int j = blockIdx.x * 8 + warp;
    if (j >= n) return;
    const uint4* row = (const uint4*)(w + (size_t)j * k);
    int chunks = k / 8;
    float acc = 0.0f;
    for (int c0 = lane; c0 < chunks; c0 += 32 * LOADS) {
        uint4 a[LOADS];
#pragma unroll
        for (int u = 0; u < LOADS; u++) if (c0 + 32 * u < chunks) a[u] = row[c0 + 32 * u];
#pragma unroll
        for (int u = 0; u < LOADS; u++) {
            int c = c0 + 32 * u;
            if (c < chunks) {
                float4 lo = *(const float4*)(x + c * 8), hi = *(const float4*)(x + c * 8 + 4);
                float xv[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
                acc += dot8(a[u], xv);
            }
        }
    }
    acc = warp_sum(acc);
    if (lane == 0) y[j] = acc;
}

// Rows cut into parts of 32 · L chunks (L 16-byte loads a lane, all in flight at once), a
// warp a part, a row's parts in one block meeting in shared memory: more, shorter warps than
// a warp a row (L = 8 for 2048-value rows), so the last wave of blocks is a smaller share.
template <int L>
__global__ void __launch_bounds__(256, 6) gemv_parts(const float* x, const bf16_t* w, float* y, int n, int k) {
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int chunks = k / 8, parts = chunks / (32 * L);
    int unit = blockIdx.x * 8 + warp;
    int j = unit / parts, part = unit % parts;
    float acc = 0.0f;
    if (j < n) {
        const uint4* row = (const uint4*)(w + (size_t)j * k) + part * 32 * L;
        uint4 a[L];
#pragma unroll
        for (int u = 0; u < L; u++) a[u] = row[lane + 32 * u];
#pragma unroll
        for (int u = 0; u < L; u++) {
            int c = part * 32 * L + lane + 32 * u;
            float4 lo = *(const float4*)(x + c * 8), hi = *(const float4*)(x + c * 8 + 4);
            float xv[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
            acc += dot8(a[u], xv);
        }
    }
    acc = warp_sum(acc);
    __shared__ float partial[8];
    if (lane == 0) partial[warp] = acc;
    __syncthreads();
    if (j >= n || part != 0 || lane != 0) return;
    float sum = 0.0f;
    for (int p = 0; p < parts; p++) sum += partial[warp + p];
    y[j] = sum;
}

// Bulk-copy staging: block b takes rows [b n / grid, (b + 1) n / grid), a contiguous byte
// range, copied into a ring of `stages` chunks of CHUNK bytes by one thread with
// cp.async.bulk (an mbarrier a chunk); the 256 threads take each chunk's 16-byte words in
// turn and add into the row's sum.
#define CHUNK 16384
#define THREADS 256
__device__ __forceinline__ unsigned int smem_addr(const void* p) {
    return (unsigned int)__cvta_generic_to_shared(p);
}
__device__ __forceinline__ void bar_init(unsigned long long* bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count));
}
__device__ __forceinline__ void bulk_load(void* dst, const void* src, unsigned int bytes, unsigned long long* bar) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
                 ::"r"(smem_addr(dst)), "l"(src), "r"(bytes), "r"(smem_addr(bar)) : "memory");
}
__device__ __forceinline__ void bar_wait(unsigned long long* bar, unsigned int parity) {
    asm volatile(
        "{\n .reg .pred p;\n WAIT_%=:\n"
        " mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
        " @!p bra WAIT_%=;\n}\n" ::"r"(smem_addr(bar)), "r"(parity) : "memory");
}

__global__ void __launch_bounds__(THREADS, 1) gemv_bulk(const float* x, const bf16_t* w, float* y, int n, int k, int stages) {
    extern __shared__ __align__(128) unsigned char ring[];
    __shared__ unsigned long long bars[32];
    __shared__ float sums[128];
    int r0 = (int)((long long)blockIdx.x * n / gridDim.x), r1 = (int)((long long)(blockIdx.x + 1) * n / gridDim.x);
    const unsigned char* src = (const unsigned char*)(w + (size_t)r0 * k);
    size_t bytes = (size_t)(r1 - r0) * k * 2;
    int chunks = (int)((bytes + CHUNK - 1) / CHUNK);
    if (threadIdx.x < 128) sums[threadIdx.x] = 0.0f;
    if (threadIdx.x == 0) {
        for (int s = 0; s < stages; s++) bar_init(&bars[s], 1);
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int c = 0; c < stages && c < chunks; c++) {
            unsigned int b = (unsigned int)min((size_t)CHUNK, bytes - (size_t)c * CHUNK);
            bulk_load(ring + (size_t)c * CHUNK, src + (size_t)c * CHUNK, b, &bars[c]);
        }
    }
    // A thread's x values: word t of each 2048-value pass (k a multiple of 2048).
    int passes_per_row = k / (THREADS * 8);
    float xv[2][8];
    for (int p = 0; p < passes_per_row && p < 2; p++) {
        const float* xp = x + (p * THREADS + threadIdx.x) * 8;
        for (int i = 0; i < 8; i++) xv[p][i] = xp[i];
    }
    int words_per_chunk = CHUNK / 16;
    for (int c = 0; c < chunks; c++) {
        int s = c % stages;
        bar_wait(&bars[s], (c / stages) & 1);
        const uint4* chunk = (const uint4*)(ring + (size_t)s * CHUNK);
        size_t first_word = (size_t)c * words_per_chunk;
        int words = (int)min((size_t)words_per_chunk, bytes / 16 - first_word);
        // Word i of the chunk is pass (first_word + i) / THREADS; threadIdx.x == i % THREADS.
        for (int i = threadIdx.x; i < words; i += THREADS) {
            size_t word = first_word + i;
            int pass = (int)(word / THREADS);
            // Static indices keep xv in registers.
            float v = passes_per_row == 2 && (pass & 1) ? dot8(chunk[i], xv[1]) : dot8(chunk[i], xv[0]);
            v = warp_sum(v);
            if ((threadIdx.x & 31) == 0) atomicAdd(&sums[pass / passes_per_row], v);
        }
        __syncthreads();
        if (threadIdx.x == 0 && c + stages < chunks) {
            size_t at = (size_t)(c + stages) * CHUNK;
            unsigned int b = (unsigned int)min((size_t)CHUNK, bytes - at);
            bulk_load(ring + (size_t)s * CHUNK, src + at, b, &bars[s]);
        }
    }
    __syncthreads();
    if (threadIdx.x < r1 - r0) y[r0 + threadIdx.x] = sums[threadIdx.x];
}

static float median(std::vector<float> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}

int main() {
    cudaDeviceProp prop;
    CHECK(cudaGetDeviceProperties(&prop, 0));
    int sms = prop.multiProcessorCount;
    printf("%s: %d SMs, L2 %d MB\n", prop.name, sms, prop.l2CacheSize >> 20);
    const int copies = 8;
    const size_t max_bytes = 12288ull * 2048 * 2;
    const int max_rows = 12288;
    unsigned char *weights, *flush;
    float *x, *y;
    unsigned int* sink;
    CHECK(cudaMalloc(&weights, max_bytes * copies));
    CHECK(cudaMalloc(&flush, 256u << 20));
    CHECK(cudaMalloc(&x, 4096 * 4));
    CHECK(cudaMalloc(&y, (size_t)max_rows * 4 * copies));
    CHECK(cudaFuncSetAttribute(gemv_bulk, cudaFuncAttributeMaxDynamicSharedMemorySize, 12 * CHUNK));
    // A quarter of an SM's shared memory, less the 1 KB each block reserves.
    const int quarter_sm = (int)prop.sharedMemPerMultiprocessor / 4 - 2048;
    CHECK(cudaFuncSetAttribute(gemv_parts<2>, cudaFuncAttributeMaxDynamicSharedMemorySize, quarter_sm));
    CHECK(cudaMalloc(&sink, 4));
    {
        std::vector<bf16_t> h(max_bytes / 2);
        srand(1);
        for (auto& v : h) v = (bf16_t)(0x3c00 + (rand() % 0x200) - 0x100 + ((rand() & 1) << 15));
        for (int c = 0; c < copies; c++) CHECK(cudaMemcpy(weights + c * max_bytes, h.data(), max_bytes, cudaMemcpyHostToDevice));
        std::vector<float> hx(4096);
        for (auto& v : hx) v = (rand() % 2001 - 1000) / 1000.0f;
        CHECK(cudaMemcpy(x, hx.data(), 4096 * 4, cudaMemcpyHostToDevice));
        // Reference for q/k/v and o shapes from copy 0.
        for (int shape = 0; shape < 2; shape++) {
            int n = shape ? 2048 : 5120, k = shape ? 4096 : 2048;
            std::vector<float> ref(n);
            for (int j = 0; j < n; j++) {
                double s = 0;
                for (int i = 0; i < k; i++) {
                    unsigned int u = (unsigned int)h[(size_t)j * k + i] << 16;
                    float f;
                    memcpy(&f, &u, 4);
                    s += f * hx[i];
                }
                ref[j] = (float)s;
            }
            const int smem_stages[] = {4, 8, 12};
            for (int variant = 0; variant < 6; variant++) {
                CHECK(cudaMemset(y, 0, n * 4));
                int chunks = k / 8;
                if (variant == 0) {
                    gemv_warp_rows<<<(n + 7) / 8, 256>>>(x, (const bf16_t*)weights, y, n, k);
                } else if (variant == 4) {
                    gemv_parts<4><<<(n * (chunks / 128) + 7) / 8, 256>>>(x, (const bf16_t*)weights, y, n, k);
                } else if (variant == 5) {
                    gemv_parts<2><<<(n * (chunks / 64) + 7) / 8, 256>>>(x, (const bf16_t*)weights, y, n, k);
                } else {
                    int st = smem_stages[variant - 1];
                    gemv_bulk<<<sms, THREADS, st * CHUNK>>>(x, (const bf16_t*)weights, y, n, k, st);
                }
                CHECK(cudaDeviceSynchronize());
                std::vector<float> got(n);
                CHECK(cudaMemcpy(got.data(), y, n * 4, cudaMemcpyDeviceToHost));
                double worst = 0;
                for (int j = 0; j < n; j++) worst = std::max(worst, (double)fabsf(got[j] - ref[j]) / (fabsf(ref[j]) + 1.0));
                printf("check shape %d variant %d: worst relative error %.2e%s\n", shape, variant, worst, worst > 1e-3 ? "  WRONG" : "");
            }
        }
    }
    cudaEvent_t a, b;
    CHECK(cudaEventCreate(&a));
    CHECK(cudaEventCreate(&b));
    const int samples = 30;
    printf("\n| shape | kernel | MB | cold alone µs | GB/s | 8 back to back µs each | GB/s |\n| --- | --- | ---: | ---: | ---: | ---: | ---: |\n");
    struct Shape { const char* name; int n, k; } shapes[] = {{"q, k, v", 5120, 2048}, {"o", 2048, 4096}, {"expert gate/up x8", 8 * 1536, 2048}};
    for (auto shape : shapes) {
        size_t bytes = (size_t)shape.n * shape.k * 2;
        for (int variant = 0; variant < 11; variant++) {
            const char* names[] = {"read-only, 4 blocks an SM", "read-only, 8 blocks an SM", "gemv_rows (engine)", "bulk ring 4 x 16 KB", "bulk ring 8 x 16 KB", "bulk ring 12 x 16 KB", "bulk ring 8, 2 blocks an SM", "read-only, 1 block an SM", "parts of 128 chunks", "parts of 64 chunks", "parts of 64 chunks, 4 blocks an SM"};
            int chunks = shape.k / 8;
            auto launch = [&](int c) {
                const unsigned char* w = weights + (size_t)c * max_bytes;
                switch (variant) {
                case 0: read_only<<<sms * 4, 256>>>((const uint4*)w, bytes / 16, sink); break;
                case 1: read_only<<<sms * 8, 256>>>((const uint4*)w, bytes / 16, sink); break;
                case 7: read_only<<<sms, 1024>>>((const uint4*)w, bytes / 16, sink); break;
                case 8: gemv_parts<4><<<(shape.n * (chunks / 128) + 7) / 8, 256>>>(x, (const bf16_t*)w, y + (size_t)c * max_rows, shape.n, shape.k); break;
                case 9: gemv_parts<2><<<(shape.n * (chunks / 64) + 7) / 8, 256>>>(x, (const bf16_t*)w, y + (size_t)c * max_rows, shape.n, shape.k); break;
                // Shared memory no block uses holds the SM to four blocks: the engine's
                // gemv_rows occupancy (64 registers), where the kernel alone gets eight.
                case 10: gemv_parts<2><<<(shape.n * (chunks / 64) + 7) / 8, 256, quarter_sm>>>(x, (const bf16_t*)w, y + (size_t)c * max_rows, shape.n, shape.k); break;
                case 2: gemv_warp_rows<<<(shape.n + 7) / 8, 256>>>(x, (const bf16_t*)w, y + (size_t)c * max_rows, shape.n, shape.k); break;
                default: {
                    int st = variant == 3 ? 4 : variant == 4 ? 8 : variant == 5 ? 12 : 6;
                    int grid = variant == 6 ? sms * 2 : sms;
                    // A block's rows must fit its sums array (128).
                    if ((shape.n + grid - 1) / grid > 128) grid = (shape.n + 127) / 128;
                    gemv_bulk<<<grid, THREADS, st * CHUNK>>>(x, (const bf16_t*)w, y + (size_t)c * max_rows, shape.n, shape.k, st);
                }
                }
            };
            std::vector<float> alone, chained;
            for (int s = 0; s < samples; s++) {
                CHECK(cudaMemset(flush, s, 256u << 20));
                CHECK(cudaEventRecord(a));
                launch(0);
                CHECK(cudaEventRecord(b));
                CHECK(cudaEventSynchronize(b));
                float ms;
                CHECK(cudaEventElapsedTime(&ms, a, b));
                alone.push_back(ms * 1000);
                CHECK(cudaMemset(flush, s + 1, 256u << 20));
                CHECK(cudaEventRecord(a));
                for (int c = 0; c < copies; c++) launch(c);
                CHECK(cudaEventRecord(b));
                CHECK(cudaEventSynchronize(b));
                CHECK(cudaEventElapsedTime(&ms, a, b));
                chained.push_back(ms * 1000 / copies);
            }
            CHECK(cudaGetLastError());
            float t1 = median(alone), t8 = median(chained);
            printf("| %s | %s | %.1f | %.1f | %.0f | %.1f | %.0f |\n", shape.name, names[variant], bytes / 1e6, t1, bytes / t1 / 1e3, t8, bytes / t8 / 1e3);
        }
    }
    // The empty-kernel cost of an event pair around one launch.
    std::vector<float> empty;
    for (int s = 0; s < samples; s++) {
        CHECK(cudaEventRecord(a));
        read_only<<<sms, 256>>>((const uint4*)weights, 0, sink);
        CHECK(cudaEventRecord(b));
        CHECK(cudaEventSynchronize(b));
        float ms;
        CHECK(cudaEventElapsedTime(&ms, a, b));
        empty.push_back(ms * 1000);
    }
    printf("\nan empty launch between two events: %.1f µs\n", median(empty));
    return 0;
}

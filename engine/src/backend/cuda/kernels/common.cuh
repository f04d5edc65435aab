// Tandem's CUDA kernels are these files, compiled at run time with NVRTC as one program in the
// order `KERNELS_SOURCE` (cuda/kernels.rs) lists them; each may use what the earlier ones define.
// Activations are f32; weights and the KV cache are bf16, stored as raw 16-bit words so no
// CUDA header is needed (NVRTC then compiles them without an include path).
//
// This part: the bf16 type and conversions, warp and block reductions.

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

__device__ __forceinline__ bool aligned16(const void* p) { return ((size_t)p & 15) == 0; }

// Eight f32 values at p (16-byte aligned).
__device__ __forceinline__ void load8(float* v, const float* p) {
    float4 lo = *(const float4*)p, hi = *(const float4*)(p + 4);
    v[0] = lo.x, v[1] = lo.y, v[2] = lo.z, v[3] = lo.w;
    v[4] = hi.x, v[5] = hi.y, v[6] = hi.z, v[7] = hi.w;
}

// Programmatic dependent launch (sm_90+). The host launches each kernel allowed to start while
// the one before it in the stream still runs; every kernel therefore waits for the previous
// one's completion and writes (`wait_for_previous_kernel`) before it touches memory an earlier
// kernel writes or reads, and before any return. What comes before the wait may only read
// what no kernel writes (weights), or what a kernel further back wrote where the previous
// kernel lets this one launch only past its own wait (moe_gate_up, then moe_down), or what
// was written by a kernel that lets none launch before it is done (the KV cache's older
// positions, which decode attention reads before its wait). Elsewhere
// both are no-ops, and a kernel launched without the attribute passes the wait at once.
#ifdef TANDEM_TIMELINE
// The step's timeline (TANDEM_CUDA_TIMELINE=1 compiles it in): each launch's first block
// records, at its wait for the previous kernel, the launch (%gridid) and the global clock
// (ns) when it got there and when the wait let it go, so the host can tell how long each
// kernel held the stream's critical path and how early its blocks were in place.
#define TIMELINE_CAPACITY 65536
__device__ unsigned long long timeline_records[TIMELINE_CAPACITY * 3];
__device__ unsigned int timeline_count;

__device__ __forceinline__ unsigned long long global_ns() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
#endif

__device__ __forceinline__ void wait_for_previous_kernel() {
#ifdef TANDEM_TIMELINE
    unsigned long long arrived = global_ns();
#endif
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
#ifdef TANDEM_TIMELINE
    if ((threadIdx.x | threadIdx.y | threadIdx.z | blockIdx.x | blockIdx.y | blockIdx.z) == 0) {
        unsigned long long released = global_ns(), grid;
        asm volatile("mov.u64 %0, %%gridid;" : "=l"(grid));
        unsigned int slot = atomicAdd(&timeline_count, 1u);
        if (slot < TIMELINE_CAPACITY) {
            timeline_records[3 * slot] = grid;
            timeline_records[3 * slot + 1] = arrived;
            timeline_records[3 * slot + 2] = released;
        }
    }
#endif
}

// Lets the next kernel's blocks launch once every block of this one has started, so its
// launch and prologue overlap this one's work; it then waits in `wait_for_previous_kernel`.
__device__ __forceinline__ void let_next_kernel_launch() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// The start of every kernel that reads nothing before the previous kernel is done.
__device__ __forceinline__ void after_previous_kernel() {
    let_next_kernel_launch();
    wait_for_previous_kernel();
}

// Does the order in which the MoE GEMMs ask for expert weights cap their DRAM rate? The wide
// grouped GEMMs read a layer's gate/up weights (128 experts × 1536 rows × 2048 bf16, 805 MB)
// as 128-row panels, a stage 128 bytes of each of the panel's 128 rows (rows 4 KB apart), and
// ncu put them at 75% of DRAM's peak in two tile shapes (CUDA_NOTES v49). This reads the same
// bytes with the GEMM's copy machinery (cp.async into a ring of three 16 KB stages, two
// blocks of 256 threads an SM, panels handed out column block fastest) but no math, each
// stage STEP bytes of 16 KB / STEP rows: 128 (the GEMM's order), 256, 512, 1024 and 4096 (a
// stage four whole rows, i.e. the panel read front to back). Against the device-to-device
// copy rate (read + write) and a plain read-only kernel, each the median of 5 runs after one
// warm-up, L2 emptied before each (a 256 MB write).
// If the longer runs read well above 128's rate, the GEMMs need their weights asked for in
// longer runs a row (k steps of 128+ values, or panels packed at load so a stage is
// contiguous). Standalone, built as gemv-probe.cu is:
//   nvcc -O3 -gencode=arch=compute_90a,code=sm_90a -o /tmp/panel-read-probe panel-read-probe.cu
// (on a CPU-only machine add the runtime wheel's -I, -L and -cudart static, gemv-probe.cu).
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "probe-check.cuh"

constexpr int EXPERTS = 128, ROWS = 1536, ROW_BYTES = 2048 * 2, PANEL_ROWS = 128;
constexpr int STAGE_BYTES = 16 * 1024, STAGES = 3, THREADS = 256;
constexpr size_t TOTAL = (size_t)EXPERTS * ROWS * ROW_BYTES;

__device__ __forceinline__ void copy16(unsigned int dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src));
}

// Block b reads panel b (column block b % 12 of expert b / 12): 128 rows, in stages of STEP
// bytes of 16 KB / STEP rows, rows of a group first, then the group's next STEP bytes. One
// 16-byte chunk a thread a copy, four copies a thread a stage.
template <int STEP>
__global__ void __launch_bounds__(THREADS, 2) read_panels(const unsigned char* w, int* sink) {
    __shared__ __align__(16) unsigned char stage[STAGES][STAGE_BYTES];
    constexpr int GROUP = STAGE_BYTES / STEP;  // rows a stage
    constexpr int STEPS = (PANEL_ROWS / GROUP) * (ROW_BYTES / STEP);
    const unsigned char* panel = w + (size_t)blockIdx.x * PANEL_ROWS * ROW_BYTES;
    auto load = [&](int s) {
        if (s < STEPS) {
            int group = s / (ROW_BYTES / STEP), k0 = (s % (ROW_BYTES / STEP)) * STEP;
            for (int c = threadIdx.x; c < STAGE_BYTES / 16; c += THREADS) {
                int row = group * GROUP + c / (STEP / 16), at = k0 + (c % (STEP / 16)) * 16;
                unsigned int dst = (unsigned int)__cvta_generic_to_shared(&stage[s % STAGES][c * 16]);
                copy16(dst, panel + (size_t)row * ROW_BYTES + at);
            }
        }
        asm volatile("cp.async.commit_group;\n" ::);
    };
    for (int s = 0; s < STAGES - 1; s++) load(s);
    int acc = 0;
    for (int s = 0; s < STEPS; s++) {
        asm volatile("cp.async.wait_group %0;\n" ::"n"(STAGES - 2));
        __syncthreads();
        acc += stage[s % STAGES][threadIdx.x * 16];
        __syncthreads();
        load(s + STAGES - 1);
    }
    if (acc == 0x7fffffff) *sink = acc;  // keeps the reads
}

// Every byte once, 16 bytes a thread a load, eight loads in flight a thread.
__global__ void read_only(const uint4* w, size_t n, int* sink) {
    unsigned int acc = 0;
    size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += 8 * stride) {
        uint4 v[8];
#pragma unroll
        for (int u = 0; u < 8; u++) v[u] = i + u * stride < n ? __ldcs(w + i + u * stride) : uint4{};
#pragma unroll
        for (int u = 0; u < 8; u++) acc ^= v[u].x ^ v[u].w;
    }
    if (acc == 0x7fffffffu) *sink = (int)acc;
}

template <typename Run>
double median_seconds(Run run, unsigned char* flush) {
    cudaEvent_t start, stop;
    CHECK(cudaEventCreate(&start));
    CHECK(cudaEventCreate(&stop));
    std::vector<float> ms;
    for (int i = 0; i < 6; i++) {
        CHECK(cudaMemset(flush, i, 256 << 20));
        CHECK(cudaEventRecord(start));
        run();
        CHECK(cudaEventRecord(stop));
        CHECK(cudaEventSynchronize(stop));
        float t;
        CHECK(cudaEventElapsedTime(&t, start, stop));
        if (i > 0) ms.push_back(t);
    }
    std::sort(ms.begin(), ms.end());
    return ms[ms.size() / 2] / 1e3;
}

int main() {
    unsigned char *w, *copy, *flush;
    int* sink;
    CHECK(cudaMalloc(&w, TOTAL));
    CHECK(cudaMalloc(&copy, TOTAL));
    CHECK(cudaMalloc(&flush, 256 << 20));
    CHECK(cudaMalloc(&sink, 4));
    CHECK(cudaMemset(w, 1, TOTAL));
    int sms;
    CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    cudaDeviceProp prop;
    CHECK(cudaGetDeviceProperties(&prop, 0));
    double copy_rate = 2.0 * TOTAL / median_seconds([&] {
        CHECK(cudaMemcpy(copy, w, TOTAL, cudaMemcpyDeviceToDevice));
    }, flush);
    printf("%s: %d SMs; %.0f MB of weights\n", prop.name, sms, TOTAL / 1e6);
    printf("| read | GB/s | of copy rate |\n| --- | ---: | ---: |\n");
    printf("| device-to-device copy (read + write) | %.0f | 100%% |\n", copy_rate / 1e9);
    double plain = TOTAL / median_seconds([&] {
        read_only<<<sms * 8, 256>>>((const uint4*)w, TOTAL / 16, sink);
    }, flush);
    printf("| read-only, front to back | %.0f | %.0f%% |\n", plain / 1e9, 100 * plain / copy_rate);
    int panels = EXPERTS * ROWS / PANEL_ROWS;
    auto panel_rate = [&](auto kernel, int step) {
        double rate = TOTAL / median_seconds([&] { kernel<<<panels, THREADS>>>(w, sink); }, flush);
        printf("| panels, stages of %d B × %d rows | %.0f | %.0f%% |\n", step,
               STAGE_BYTES / step, rate / 1e9, 100 * rate / copy_rate);
    };
    panel_rate(read_panels<128>, 128);
    panel_rate(read_panels<256>, 256);
    panel_rate(read_panels<512>, 512);
    panel_rate(read_panels<1024>, 1024);
    panel_rate(read_panels<4096>, 4096);
    CHECK(cudaGetLastError());
    return 0;
}

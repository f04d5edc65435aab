// Tensor-core building blocks shared by the MoE GEMMs and attention: asynchronous copies to
// shared memory, mma.sync and ldmatrix fragments, and (sm_90a) warpgroup instructions.

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

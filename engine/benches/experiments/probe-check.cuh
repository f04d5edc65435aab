// What the standalone probes (*-probe.cu) share: stop with the call, its error and line when
// a CUDA runtime call fails.
#pragma once
#include <cstdio>
#include <cstdlib>

#define CHECK(x)                                                                             \
    do {                                                                                     \
        cudaError_t e = (x);                                                                 \
        if (e != cudaSuccess) {                                                              \
            fprintf(stderr, "%s: %s (line %d)\n", #x, cudaGetErrorString(e), __LINE__);      \
            exit(1);                                                                         \
        }                                                                                    \
    } while (0)

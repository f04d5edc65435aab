// Greedy sampling on the device: per row of `vocab` logits, the largest (ties to the lowest
// id) and its logprob (value minus the row's log-sum-exp).

// Greedy picks in two steps so a row's vocabulary is read by many blocks, not one
// latency-bound block: greedy_partial takes part blockIdx.y of row blockIdx.x (gridDim.y
// parts of `part_len` logits) and writes its best logit, that logit's lowest index and the
// sum of exp(logit - best) over the part; greedy_combine merges a row's parts into its token
// and logprob, written to out[2r] and (as bits) out[2r + 1] for one copy back.
extern "C" __global__ void greedy_partial(const float* logits, float* part_best,
                                          int* part_index, float* part_sum, int vocab,
                                          int part_len) {
    after_previous_kernel();
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
    after_previous_kernel();
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

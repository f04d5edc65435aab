// MoE, routed on the device. Routing slots (pairs) p = token · top_k + j are counted per
// expert, placed in expert order (`sorted_slot[position] = p`, `slot_position[p] = position`),
// and cut into tiles of at most `tile_rows` positions of one expert, listed by moe_offsets
// so a block finds its tile in one load and no count goes back to the host. Expert weights
// are reached through tables of device pointers. Every expert kernel writes rows by
// position; moe_combine (moe_gemm.cu) sums each token's weighted rows in slot order
// (deterministic whatever order placement took).

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
    after_previous_kernel();
    int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row < rows) {
        route_row(logits, expert_ids, weights, counts, load, row, num_experts, top_k,
                  renormalize);
    }
}

// The sum of v over this lane and the lanes below it.
__device__ __forceinline__ int inclusive_warp_scan(int v) {
    int lane = threadIdx.x & 31;
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1) {
        int below = __shfl_up_sync(0xffffffffu, v, offset);
        if (lane >= offset) v += below;
    }
    return v;
}

// Exclusive scan of the per-expert counts (`offsets`, num_experts + 1 entries), and the
// table of tiles of `tile_rows` positions: tile t's expert and first position at tiles[2t]
// and tiles[2t + 1], expert -1 for the tiles past the last (up to max_tiles), so a GEMM
// block finds its tile in one load instead of a search over the experts. `cursor` (when
// given) starts at each expert's offset. One block of at least num_experts threads (at most
// 1024, a multiple of 32). With place_pairs > 0 the block also places that many slots
// (moe_place's work, a launch fewer for a decode step's few).
__device__ __forceinline__ void offsets_and_tiles(int count, int* offsets, int* tiles,
                                                  int* cursor, int num_experts, int tile_rows,
                                                  int max_tiles, const int* expert_ids,
                                                  int* sorted_slot, int* slot_position,
                                                  int place_pairs) {
    // Inclusive scans of the counts and the tile counts: in each warp by shuffles, then over
    // the warps' totals (two barriers where a scan through shared memory took fourteen, a
    // dependent chain a decode layer waits on).
    __shared__ int warp_rows[32], warp_tiles[32];
    __shared__ int cursors[1024];
    int e = threadIdx.x, lane = e & 31, warp = e >> 5;
    int my_tiles = (count + tile_rows - 1) / tile_rows;
    int rows = inclusive_warp_scan(count), tile_end = inclusive_warp_scan(my_tiles);
    if (lane == 31) warp_rows[warp] = rows, warp_tiles[warp] = tile_end;
    __syncthreads();
    if (warp == 0) {
        bool has_warp = lane < (int)(blockDim.x >> 5);
        warp_rows[lane] = inclusive_warp_scan(has_warp ? warp_rows[lane] : 0);
        warp_tiles[lane] = inclusive_warp_scan(has_warp ? warp_tiles[lane] : 0);
    }
    __syncthreads();
    if (warp > 0) rows += warp_rows[warp - 1], tile_end += warp_tiles[warp - 1];
    int all_tiles = warp_tiles[(blockDim.x >> 5) - 1];
    int first = rows - count;
    if (e < num_experts) {
        offsets[e + 1] = rows;
        if (cursor) cursor[e] = first;
        for (int i = 0, t = tile_end - my_tiles; i < my_tiles; i++, t++) {
            tiles[2 * t] = e;
            tiles[2 * t + 1] = first + i * tile_rows;
        }
    }
    if (e == 0) offsets[0] = 0;
    for (int t = all_tiles + e; t < max_tiles; t += blockDim.x) tiles[2 * t] = -1;
    if (place_pairs == 0) return;
    cursors[e] = first;
    __syncthreads();
    for (int p = e; p < place_pairs; p += blockDim.x) {
        int position = atomicAdd(&cursors[expert_ids[p]], 1);
        sorted_slot[position] = p;
        slot_position[p] = position;
    }
}

extern "C" __global__ void moe_offsets(const int* counts, int* offsets, int* tiles, int* cursor,
                                       int num_experts, int tile_rows, int max_tiles,
                                       const int* expert_ids, int* sorted_slot,
                                       int* slot_position, int place_pairs) {
    after_previous_kernel();
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
    after_previous_kernel();
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
    after_previous_kernel();
    int p = blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= pairs) return;
    int position = atomicAdd(&cursor[expert_ids[p]], 1);
    sorted_slot[position] = p;
    slot_position[p] = position;
}

// Rows [first, first + count) of tile t (moe_offsets' table), and its expert; false past
// the last tile. Read from L2 (`ldcg`), so a kernel may read a table an earlier kernel than
// the one it waits for wrote (moe_down), with no stale line in its SM's L1.
__device__ __forceinline__ bool moe_tile(const int* offsets, const int* tiles, int tile_rows,
                                         int t, int* expert, int* first, int* count) {
    int e = __ldcg(tiles + 2 * t);
    if (e < 0) return false;
    *expert = e;
    *first = __ldcg(tiles + 2 * t + 1);
    *count = min(tile_rows, __ldcg(offsets + e + 1) - *first);
    return true;
}

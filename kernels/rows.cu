// Kernel 1 of 3: one pass over every prior's logits.
//
// For each row it computes the log-sum-exp (f32, row maximum subtracted) and
// writes the mining key: the background loss lse - x[0] for a negative
// candidate, a marker for positives and ignored priors. Positives add their
// cross-entropy and smooth-L1 terms to per-block sums. Nothing here needs N
// (the batch's positive count), so nothing waits: the gradients, which do,
// are written by kernel 3.
//
// Blocks walk tiles of `tile_rows` consecutive rows, whose logits are one
// contiguous range. The block first copies a tile into shared memory with
// 16-byte loads, four in flight per thread, and loads the tile's labels with
// it; the lane groups then read their rows from shared memory for both
// passes of row_stats (max, then sum of exp). The logits are read from DRAM
// once, in whole sectors, whatever C is. The arithmetic is row_stats', per
// row, so keys do not depend on the tiling. Rows too long for a tile in
// shared memory (the plan says tile_rows == 0) are read from global memory.
#include "multibox.cuh"

__device__ __forceinline__ float smooth_l1(float d, float beta) {
    const float a = fabsf(d);
    return a < beta ? 0.5f * d * d / beta : a - 0.5f * beta;
}

// Copies n elements from global `src` to shared `dst`, which share their
// address modulo 16 (so 16-byte-aligned global vectors land on aligned
// shared ones): element copies up to src's first 16-byte boundary, 16-byte
// copies with IN_FLIGHT loads issued before their stores, element copies for
// the tail. Every thread runs the vector loop the same number of times.
template <typename T> __device__ __forceinline__ void stage_tile(T* dst, const T* src, u64 n) {
    constexpr u32 PER_VECTOR = 16 / sizeof(T);
    constexpr u32 IN_FLIGHT = 4;
    u64 head = ((16u - u32(u64(src) & 15u)) & 15u) / sizeof(T);
    if (head > n) head = n;
    for (u64 i = threadIdx.x; i < head; i += ROW_THREADS) dst[i] = src[i];
    const u64 vectors = (n - head) / PER_VECTOR;
    const uint4* from = reinterpret_cast<const uint4*>(src + head);
    uint4* to = reinterpret_cast<uint4*>(dst + head);
    for (u64 base = threadIdx.x; base < vectors; base += IN_FLIGHT * ROW_THREADS) {
        uint4 v[IN_FLIGHT];
#pragma unroll
        for (u32 k = 0; k < IN_FLIGHT; ++k)
            if (base + k * ROW_THREADS < vectors) v[k] = from[base + k * ROW_THREADS];
#pragma unroll
        for (u32 k = 0; k < IN_FLIGHT; ++k)
            if (base + k * ROW_THREADS < vectors) to[base + k * ROW_THREADS] = v[k];
    }
    for (u64 i = head + vectors * PER_VECTOR + threadIdx.x; i < n; i += ROW_THREADS) dst[i] = src[i];
}

template <typename T, typename L> __device__ void mining_keys_and_positive_terms(const MultiboxParams& p) {
    __shared__ float scratch[ROW_THREADS / WARP];
    __shared__ u32 status_scratch[ROW_THREADS / WARP];
    __shared__ i64 tile_labels[ROW_THREADS];
    MB_DYNAMIC_SHARED(unsigned char, staged);
    const T* confidence = static_cast<const T*>(p.confidence);
    const T* pred = static_cast<const T*>(p.predicted_locations);
    const T* gt = static_cast<const T*>(p.gt_locations);
    const u32 lanes = p.lanes_per_row;
    const u32 sub = threadIdx.x % lanes;
    const u32 rows_per_step = ROW_THREADS / lanes;
    const u64 rows = u64(p.batch) * p.priors;
    const bool staging = p.tile_rows != 0;
    const u32 tile_rows = staging ? p.tile_rows : rows_per_step;

    // Kernel 2 counts its finished blocks here; it runs after this kernel.
    if (blockIdx.x == 0 && threadIdx.x == 0) p.totals->images_done = 0;

    float regression = 0.0f, positive_ce = 0.0f;
    u32 status = 0;
    for (u64 first = u64(blockIdx.x) * tile_rows; first < rows; first += u64(gridDim.x) * tile_rows) {
        const u32 count = u32(rows - first < tile_rows ? rows - first : tile_rows);
        const T* tile = confidence + first * p.classes;
        if (staging) {
            // At the same offset within a 16-byte line as in global memory.
            T* copy = reinterpret_cast<T*>(staged + (u64(tile) & 15u));
            stage_tile(copy, tile, u64(count) * p.classes);
            if (threadIdx.x < count) tile_labels[threadIdx.x] = load_label<L>(p.labels, first + threadIdx.x);
            __syncthreads();  // the tile and its labels are in shared memory
            tile = copy;
        }
        // Every lane walks the same number of steps, so the group shuffles
        // always find all 32 lanes; rows past the tile are inactive.
        for (u32 step = 0; step < count; step += rows_per_step) {
            const u32 r = step + threadIdx.x / lanes;
            const u64 row = first + r;
            const bool in_range = r < count;
            i64 label = !in_range ? -1 : staging ? tile_labels[r] : load_label<L>(p.labels, row);
            if (label < -1 || label >= i64(p.classes)) {
                // Never index with it: count the prior as ignored and flag the call.
                status |= STATUS_INVALID_LABEL;
                label = -1;
            }
            const bool active = label >= 0;
            const T* x = tile + u64(r) * p.classes;
            bool nonfinite = false;
            const RowStats stats = row_stats(x, p.classes, sub, lanes, active, label, &nonfinite);
            if (nonfinite) status |= STATUS_NONFINITE_INPUT;
            if (!active) {
                if (in_range && sub == 0) p.keys[row] = KEY_IGNORED;
                continue;
            }
            // row_stats left class `label` out of sum_exp_others: the loss of
            // the background class for a candidate, of the object class for a positive.
            const float loss = stats.loss_of_skipped(to_f32(x[label]));
            if (label == 0) {
                if (sub == 0) p.keys[row] = candidate_key(loss);
                continue;
            }
            if (sub == 0) {
                p.keys[row] = KEY_POSITIVE;
                positive_ce += loss;
            }
            for (u32 j = sub; j < 4; j += lanes) {
                const float d = to_f32(pred[row * 4 + j]) - to_f32(gt[row * 4 + j]);
                if (!isfinite(d)) status |= STATUS_NONFINITE_INPUT;
                regression += smooth_l1(d, p.beta);
            }
        }
        if (staging) __syncthreads();  // every row is read before the next tile is staged
    }

    regression = block_sum<ROW_THREADS>(regression, scratch);
    positive_ce = block_sum<ROW_THREADS>(positive_ce, scratch);
    status = block_or<ROW_THREADS>(status, status_scratch);
    if (threadIdx.x == 0) {
        RowBlockPartial out;
        out.regression = regression;
        out.positive_ce = positive_ce;
        out.status = status;
        out.unused = 0;
        p.partials[blockIdx.x] = out;
    }
}

MB_KERNEL(multibox_rows_f32_i32, MultiboxParams, ROW_THREADS) { mining_keys_and_positive_terms<float, i32>(p); }
MB_KERNEL(multibox_rows_f32_i64, MultiboxParams, ROW_THREADS) { mining_keys_and_positive_terms<float, i64>(p); }
MB_KERNEL(multibox_rows_f16_i32, MultiboxParams, ROW_THREADS) { mining_keys_and_positive_terms<f16, i32>(p); }
MB_KERNEL(multibox_rows_f16_i64, MultiboxParams, ROW_THREADS) { mining_keys_and_positive_terms<f16, i64>(p); }
MB_KERNEL(multibox_rows_bf16_i32, MultiboxParams, ROW_THREADS) { mining_keys_and_positive_terms<bf16, i32>(p); }
MB_KERNEL(multibox_rows_bf16_i64, MultiboxParams, ROW_THREADS) { mining_keys_and_positive_terms<bf16, i64>(p); }

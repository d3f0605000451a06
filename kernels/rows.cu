// Kernel 1 of 3: one pass over every prior's logits.
//
// For each row it computes the log-sum-exp (f32, row maximum subtracted) and
// writes the mining key: the background loss lse - x[0] for a negative
// candidate, a marker for positives and ignored priors. Positives add their
// cross-entropy and smooth-L1 terms to per-block sums. Nothing here needs N
// (the batch's positive count), so nothing waits: the gradients, which do,
// are written by kernel 3.
#include "multibox.cuh"

__device__ __forceinline__ float smooth_l1(float d, float beta) {
    const float a = fabsf(d);
    return a < beta ? 0.5f * d * d / beta : a - 0.5f * beta;
}

template <typename T, typename L> __device__ void mining_keys_and_positive_terms(const MultiboxParams& p) {
    __shared__ float scratch[ROW_THREADS / WARP];
    __shared__ u32 status_scratch[ROW_THREADS / WARP];
    const T* confidence = static_cast<const T*>(p.confidence);
    const T* pred = static_cast<const T*>(p.predicted_locations);
    const T* gt = static_cast<const T*>(p.gt_locations);
    const u32 lanes = p.lanes_per_row;
    const u32 sub = threadIdx.x % lanes;
    const u32 rows_per_step = ROW_THREADS / lanes;
    const u64 rows = u64(p.batch) * p.priors;

    // Kernel 2 counts its finished blocks here; it runs after this kernel.
    if (blockIdx.x == 0 && threadIdx.x == 0) p.totals->images_done = 0;

    float regression = 0.0f, positive_ce = 0.0f;
    u32 status = 0;
    // Every lane walks the same number of steps, so the group shuffles
    // always find all 32 lanes; rows past the end are inactive.
    for (u64 first = u64(blockIdx.x) * rows_per_step; first < rows; first += u64(gridDim.x) * rows_per_step) {
        const u64 row = first + threadIdx.x / lanes;
        const bool in_range = row < rows;
        i64 label = in_range ? load_label<L>(p.labels, row) : -1;
        if (label < -1 || label >= i64(p.classes)) {
            // Never index with it: count the prior as ignored and flag the call.
            status |= STATUS_INVALID_LABEL;
            label = -1;
        }
        const bool active = label >= 0;
        const T* x = confidence + row * p.classes;
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

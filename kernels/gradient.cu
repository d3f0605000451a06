// Kernel 3 of 3: the gradients, written once, for every prior.
//
// Rows in the classification set (positives and mined negatives) get
// g_cls / N * (softmax(x) - one_hot(label)); every other row gets zeros
// without its logits being read, so the logits are read again only for the
// few rows that enter the loss. Positives get g_reg / N * clamp(d / beta, -1, 1)
// for their box offsets. The scale is applied in f32 before the one rounding
// to T.
#include "multibox.cuh"

template <typename T, typename L> __device__ void write_gradients(const MultiboxParams& p) {
    const T* confidence = static_cast<const T*>(p.confidence);
    const T* pred = static_cast<const T*>(p.predicted_locations);
    const T* gt = static_cast<const T*>(p.gt_locations);
    T* grad_confidence = static_cast<T*>(p.grad_confidence);
    T* grad_locations = static_cast<T*>(p.grad_locations);
    const u32 lanes = p.lanes_per_row;
    const u32 sub = threadIdx.x % lanes;
    const u32 rows_per_step = ROW_THREADS / lanes;
    const u64 rows = u64(p.batch) * p.priors;

    const u32 num_pos = load_global_coherent(&p.totals->num_pos);
    const float g_reg = p.upstream ? p.upstream[0] : p.g_reg;
    const float g_cls = p.upstream ? p.upstream[1] : p.g_cls;
    // N == 0: every gradient is 0 (and nothing is read).
    const float cls_scale = num_pos > 0 ? g_cls / float(num_pos) : 0.0f;
    const float reg_scale = num_pos > 0 ? g_reg / float(num_pos) : 0.0f;
    const T zero = from_f32<T>(0.0f);

    for (u64 first = u64(blockIdx.x) * rows_per_step; first < rows; first += u64(gridDim.x) * rows_per_step) {
        const u64 row = first + threadIdx.x / lanes;
        const bool in_range = row < rows;
        const u32 key = in_range ? p.keys[row] : KEY_IGNORED;
        const bool positive = key == KEY_POSITIVE && num_pos > 0;
        bool in_set = positive;
        if (is_candidate(key) && num_pos > 0) {
            const u32 image = u32(row / p.priors), prior = u32(row % p.priors);
            in_set = is_mined(p.images[image], key, prior);
        }
        const i64 label = positive ? load_label<L>(p.labels, row) : 0;
        // Uniform per row group, so the shuffles inside see all lanes.
        const T* x = confidence + row * p.classes;
        bool nonfinite;
        const RowStats stats = row_stats(x, p.classes, sub, lanes, in_set, label, &nonfinite);
        if (!in_range) continue;
        T* g = grad_confidence + row * p.classes;
        if (in_set) {
            // softmax[label] - 1 would cancel to 0 in f32 for a confident row
            // (1 - 1e-9 rounds to 1), though the true value is representable
            // in every T. Written as -(sum of the other classes' exp) / sum,
            // it keeps full relative precision.
            const float inv_sum = 1.0f / stats.sum_exp;
            for (u32 c = sub; c < p.classes; c += lanes) {
                const float d = i64(c) == label ? -stats.sum_exp_others * inv_sum : expf(to_f32(x[c]) - stats.max) * inv_sum;
                g[c] = from_f32<T>(cls_scale * d);
            }
        } else {
            for (u32 c = sub; c < p.classes; c += lanes) g[c] = zero;
        }
        for (u32 j = sub; j < 4; j += lanes) {
            float gj = 0.0f;
            if (positive) {
                const float d = to_f32(pred[row * 4 + j]) - to_f32(gt[row * 4 + j]);
                gj = reg_scale * fminf(fmaxf(d / p.beta, -1.0f), 1.0f);
            }
            grad_locations[row * 4 + j] = from_f32<T>(gj);
        }
    }
}

MB_KERNEL(multibox_gradient_f32_i32, MultiboxParams, ROW_THREADS) { write_gradients<float, i32>(p); }
MB_KERNEL(multibox_gradient_f32_i64, MultiboxParams, ROW_THREADS) { write_gradients<float, i64>(p); }
MB_KERNEL(multibox_gradient_f16_i32, MultiboxParams, ROW_THREADS) { write_gradients<f16, i32>(p); }
MB_KERNEL(multibox_gradient_f16_i64, MultiboxParams, ROW_THREADS) { write_gradients<f16, i64>(p); }
MB_KERNEL(multibox_gradient_bf16_i32, MultiboxParams, ROW_THREADS) { write_gradients<bf16, i32>(p); }
MB_KERNEL(multibox_gradient_bf16_i64, MultiboxParams, ROW_THREADS) { write_gradients<bf16, i64>(p); }

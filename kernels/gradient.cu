// Kernel 3 of 3: the gradients, written once, for every prior.
//
// Rows in the classification set (positives and mined negatives, ~10 % of
// rows at neg_pos_ratio 3) get g_cls / N * (softmax(x) - one_hot(label));
// every other row gets zeros, without its logits being read. Positives get
// g_reg / N * clamp(d / beta, -1, 1) for their box offsets, the rest zeros.
// The scale is applied in f32 before the one rounding to T.
//
// Blocks walk tiles of ROW_THREADS consecutive rows. In a tile:
//   1. One thread per row reads its key (a coalesced 4-byte load per lane),
//      decides whether the row is in the set, and writes its four box
//      gradients (one 8- or 16-byte store). A block scan lists, in row order,
//      the set's rows and the spans of rows between them.
//   2. Each warp takes spans and writes zeros over their logit gradients
//      with 16-byte stores: most of the tile, with no shuffle at all.
//   3. Lane groups (as in kernel 1) take the set's rows and write their
//      softmax gradients; only these rows' logits are read.
// Every element is written exactly once, by step 2 or step 3.
#include "multibox.cuh"

struct GradientShared {
    u32 scan[ROW_THREADS / WARP + 1];
    u32 set_rows[ROW_THREADS];      // tile offsets of the set's rows, in order
    u32 set_labels[ROW_THREADS];    // their labels (0 for mined negatives)
    u32 span_first[ROW_THREADS];    // spans of consecutive rows outside the set
    u32 span_end[ROW_THREADS];
    u8 in_set[ROW_THREADS];
};

template <typename T, typename L> __device__ void write_gradients(const MultiboxParams& p) {
    __shared__ GradientShared sh;
    const T* confidence = static_cast<const T*>(p.confidence);
    const T* pred = static_cast<const T*>(p.predicted_locations);
    const T* gt = static_cast<const T*>(p.gt_locations);
    T* grad_confidence = static_cast<T*>(p.grad_confidence);
    T* grad_locations = static_cast<T*>(p.grad_locations);
    const u32 t = threadIdx.x, lane = t % WARP, warp = t / WARP;
    const u64 rows = u64(p.batch) * p.priors;
    const u64 classes = p.classes;

    const u32 num_pos = load_global_coherent(&p.totals->num_pos);
    const float g_reg = p.upstream ? p.upstream[0] : p.g_reg;
    const float g_cls = p.upstream ? p.upstream[1] : p.g_cls;
    // N == 0: every gradient is 0 (and no logit is read).
    const float cls_scale = num_pos > 0 ? g_cls / float(num_pos) : 0.0f;
    const float reg_scale = num_pos > 0 ? g_reg / float(num_pos) : 0.0f;

    for (u64 first = u64(blockIdx.x) * ROW_THREADS; first < rows; first += u64(gridDim.x) * ROW_THREADS) {
        const u32 count = u32(rows - first < ROW_THREADS ? rows - first : ROW_THREADS);

        // 1. This thread's row: in the set? Its box gradients.
        bool in_set = false, positive = false;
        u32 label = 0;
        if (t < count && num_pos > 0) {
            const u64 row = first + t;
            const u32 key = p.keys[row];
            if (key == KEY_POSITIVE) {
                // Kernel 1 keyed invalid labels as ignored: this one is in 1..C-1.
                positive = in_set = true;
                label = u32(load_label<L>(p.labels, row));
            } else if (is_candidate(key)) {
                const u32 image = u32(row / p.priors), prior = u32(row % p.priors);
                in_set = is_mined(p.images[image], key, prior);
            }
        }
        if (t < count) {
            const u64 row = first + t;
            float g[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            if (positive) {
                float a[4], b[4];
                load4(pred + row * 4, a);
                load4(gt + row * 4, b);
                for (int j = 0; j < 4; ++j) g[j] = reg_scale * fminf(fmaxf((a[j] - b[j]) / p.beta, -1.0f), 1.0f);
            }
            store4(grad_locations + row * 4, g);
        }
        sh.in_set[t] = in_set;
        __syncthreads();
        // A span of rows outside the set starts here if the row before is in
        // the set (or this is the tile's first row). One scan counts both
        // lists: set rows in the low half, span starts in the high half.
        const bool span_start = t < count && !in_set && (t == 0 || sh.in_set[t - 1]);
        u32 totals;
        const u32 slots = block_exclusive_scan<ROW_THREADS>(u32(in_set) | u32(span_start) << 16, sh.scan, &totals);
        const u32 set_count = totals & 0xffffu, span_count = totals >> 16;
        if (in_set) {
            sh.set_rows[slots & 0xffffu] = t;
            sh.set_labels[slots & 0xffffu] = label;
        }
        if (span_start) {
            u32 end = t + 1;
            while (end < count && !sh.in_set[end]) ++end;
            sh.span_first[slots >> 16] = t;
            sh.span_end[slots >> 16] = end;
        }
        __syncthreads();  // the lists are complete

        // 2. Zeros over the spans, a warp per span. The lanes leave a span's
        // loop after different trip counts; __syncwarp reconverges them, so
        // that each span's stores issue as whole-warp requests.
        for (u32 s = warp; s < span_count; s += ROW_THREADS / WARP) {
            __syncwarp();
            const u64 row = first + sh.span_first[s];
            zero_span(grad_confidence + row * classes, u64(sh.span_end[s] - sh.span_first[s]) * classes, lane, WARP);
        }

        // 3. The set's rows, a lane group each. Every thread walks the same
        // number of steps, so the group shuffles always find all 32 lanes.
        const u32 lanes = p.lanes_per_row, sub = t % lanes, group = t / lanes;
        const u32 groups = ROW_THREADS / lanes;
        for (u32 base = 0; base < set_count; base += groups) {
            const u32 i = base + group;
            const bool active = i < set_count;
            const u64 row = first + (active ? sh.set_rows[i] : 0u);
            const i64 row_label = active ? i64(sh.set_labels[i]) : 0;
            const T* x = confidence + row * classes;
            bool nonfinite;
            const RowStats stats = row_stats(x, p.classes, sub, lanes, active, row_label, &nonfinite);
            if (!active) continue;
            // softmax[label] - 1 would cancel to 0 in f32 for a confident row
            // (1 - 1e-9 rounds to 1), though the true value is representable
            // in every T. Written as -(sum of the other classes' exp) / sum,
            // it keeps full relative precision.
            const float inv_sum = 1.0f / stats.sum_exp;
            T* g = grad_confidence + row * classes;
            for (u32 c = sub; c < p.classes; c += lanes) {
                const float d =
                    i64(c) == row_label ? -stats.sum_exp_others * inv_sum : expf(to_f32(x[c]) - stats.max) * inv_sum;
                g[c] = from_f32<T>(cls_scale * d);
            }
        }
        // No barrier here: the next tile writes in_set, read only before
        // "the lists are complete", and rewrites the lists only after its
        // own first barrier, which every thread reaches after this tile.
    }
}

MB_KERNEL(multibox_gradient_f32_i32, MultiboxParams, ROW_THREADS) { write_gradients<float, i32>(p); }
MB_KERNEL(multibox_gradient_f32_i64, MultiboxParams, ROW_THREADS) { write_gradients<float, i64>(p); }
MB_KERNEL(multibox_gradient_f16_i32, MultiboxParams, ROW_THREADS) { write_gradients<f16, i32>(p); }
MB_KERNEL(multibox_gradient_f16_i64, MultiboxParams, ROW_THREADS) { write_gradients<f16, i64>(p); }
MB_KERNEL(multibox_gradient_bf16_i32, MultiboxParams, ROW_THREADS) { write_gradients<bf16, i32>(p); }
MB_KERNEL(multibox_gradient_bf16_i64, MultiboxParams, ROW_THREADS) { write_gradients<bf16, i64>(p); }

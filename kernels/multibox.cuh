// What the three loss kernels share: the host arguments, the workspace
// records, the mining keys, and the walk over rows (one row = one prior's
// logits). Mirrored in src/plan.rs; the sizes are asserted on both sides.
//
// The launch sequence (src/loss.rs):
//   1. multibox_rows_*     per prior: log-sum-exp, mining key, positive terms
//   2. multibox_select_*   per image: radix select of the hard negatives,
//                          then the last block to finish sums the losses
//   3. multibox_gradient_* per prior: softmax - one-hot for the chosen set,
//                          smooth-L1 gradient for positives, zeros elsewhere
// A forward-only call stops after 2.
#pragma once
#include "common.cuh"

// Bits of the device status word.
constexpr u32 STATUS_INVALID_LABEL = 1u;    // a label outside -1..C-1
constexpr u32 STATUS_NONFINITE_INPUT = 2u;  // a NaN or inf among the values the loss read

struct MultiboxParams {
    const void* confidence;           // [B, P, C] T
    const void* predicted_locations;  // [B, P, 4] T
    const void* labels;               // [B, P] L
    const void* gt_locations;         // [B, P, 4] T
    const float* upstream;            // [g_reg, g_cls] on the device, or null: use g_reg, g_cls below
    void* grad_confidence;            // [B, P, C] T
    void* grad_locations;             // [B, P, 4] T
    float* regression_loss;           // [1]
    float* classification_loss;       // [1]
    i32* num_pos;                     // [1]
    u8* mask;                         // [B, P], or null
    // Workspace sections; the layout is planned in src/plan.rs.
    u32* keys;                        // [B * P]
    struct RowBlockPartial* partials; // [row_blocks]
    struct ImageSelection* images;    // [B]
    struct Totals* totals;            // [1]
    u32 batch;
    u32 priors;
    u32 classes;
    u32 lanes_per_row;  // power of two in 1..32: lanes that share one row
    u32 row_blocks;     // grid of kernels 1 and 3, = entries of `partials`
    u32 min_negatives;
    float neg_pos_ratio;
    float beta;
    float g_reg;
    float g_cls;
    u32 tile_rows;      // kernel 1's rows per tile in shared memory; 0: rows read from global memory
    u32 unused;
};
MB_ASSERT_SIZE(MultiboxParams, 168);

// Kernel 1's per-block sums, added up in block order by kernel 2's last block
// so that the losses are bit-identical run after run.
struct RowBlockPartial {
    float regression;   // smooth-L1 over this block's positives
    float positive_ce;  // lse - x[label] over this block's positives
    u32 status;
    u32 unused;
};
MB_ASSERT_SIZE(RowBlockPartial, 16);

// What kernel 2 decided for one image. A negative candidate with key `k`
// at prior `i` is mined iff k > threshold, or k == threshold and i <= tie_cutoff.
struct ImageSelection {
    u32 threshold;
    i32 tie_cutoff;
    u32 num_pos;
    float negative_ce;  // sum of the mined negatives' background losses
};
MB_ASSERT_SIZE(ImageSelection, 16);

struct Totals {
    u32 images_done;  // kernel 2's arrival counter; kernel 1 zeroes it
    u32 num_pos;      // N, for kernel 3
    u32 status;
    u32 unused;
};
MB_ASSERT_SIZE(Totals, 16);

// ---------------------------------------------------------------------------
// Mining keys: one u32 per prior, ordered like the background loss.
//
// A non-negative float's bits, with the top bit set, sort as unsigned
// integers in the order of the floats, so the radix select can work on
// integers. The background loss lse(x) - x[0] is never negative in f32 (lse
// rounds to at least the row maximum), so the top half of the key space is
// all candidates need; the bottom keeps two markers. NaN ranks above every
// number, as in a descending torch.sort.
constexpr u32 KEY_IGNORED = 0u;     // label -1 (or invalid): not in any set
constexpr u32 KEY_POSITIVE = 1u;    // label > 0: always in the set
constexpr u32 KEY_CANDIDATE = 0x80000000u;
constexpr u32 KEY_NAN = 0xffffffffu;

__device__ __forceinline__ u32 candidate_key(float background_loss) {
    if (background_loss != background_loss) return KEY_NAN;
    return KEY_CANDIDATE | (background_loss > 0.0f ? f32_bits(background_loss) : 0u);
}
__device__ __forceinline__ bool is_candidate(u32 key) { return key >= KEY_CANDIDATE; }
__device__ __forceinline__ float key_loss(u32 key) { return f32_from_bits(key & ~KEY_CANDIDATE); }

__device__ __forceinline__ bool is_mined(const ImageSelection& s, u32 key, u32 prior) {
    return is_candidate(key) && (key > s.threshold || (key == s.threshold && i32(prior) <= s.tie_cutoff));
}

// floor(ratio * positives), exactly, without f64 (slow on most GPUs): a
// finite f32 ratio >= 0 is m * 2^e with an integer m < 2^24, so the product
// is the integer m * positives < 2^55, shifted by e. Saturates past 2^64.
__device__ __forceinline__ u64 floor_ratio_times(float ratio, u32 positives) {
    const u32 bits = f32_bits(ratio);
    const u32 biased = (bits >> 23) & 0xffu;
    const u64 m = biased == 0 ? (bits & 0x7fffffu) : ((bits & 0x7fffffu) | 0x800000u);
    const int e = biased == 0 ? -149 : int(biased) - 150;
    const u64 product = m * positives;
    if (product == 0) return 0;
    if (e >= 0) return e >= 64 || product > (~0ull >> e) ? ~0ull : product << e;
    return -e >= 64 ? 0ull : product >> -e;
}

// ---------------------------------------------------------------------------
// Rows. Kernels 1 and 3 give each row `lanes_per_row` consecutive lanes of a
// warp (a power of two, chosen from C by the plan so that each lane holds a
// few classes): a warp covers 32 / lanes_per_row consecutive rows, whose
// logits are contiguous, so its loads are coalesced also for C = 21. Lane
// reductions use xor shuffles below lanes_per_row, which stay in the group.

constexpr int ROW_THREADS = 256;

__device__ __forceinline__ float group_max(float v, u32 lanes) {
    for (u32 offset = lanes / 2; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, offset));
    return v;
}

__device__ __forceinline__ float group_sum(float v, u32 lanes) {
    for (u32 offset = lanes / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(FULL_MASK, v, offset);
    return v;
}

__device__ __forceinline__ u32 group_or(u32 v, u32 lanes) {
    for (u32 offset = lanes / 2; offset > 0; offset /= 2) v |= __shfl_xor_sync(FULL_MASK, v, offset);
    return v;
}

// Row maximum, sum of exp(x - max), and that sum without class `skip`, of
// one row, reduced over its lanes; every lane of the group gets them. Two
// passes over the row: the second hits L1.
struct RowStats {
    float max;
    float sum_exp;
    float sum_exp_others;  // without class `skip`
    // -log softmax[skip] = lse(x) - x[skip]. For a confident row (x[skip]
    // the maximum, the other classes far below) max + log(sum) - x[skip]
    // rounds to 0 in f32 although the loss is, say, 1e-9; log1p of the
    // others' share keeps it, so mining still ranks such rows by their loss.
    __device__ __forceinline__ float loss_of_skipped(float x_skip) const {
        const float e = expf(x_skip - max);
        return e >= 1e-6f ? log1pf(sum_exp_others / e) : (max - x_skip) + logf(sum_exp);
    }
};

template <typename T>
__device__ __forceinline__ RowStats row_stats(const T* x, u32 classes, u32 sub, u32 lanes, bool active, i64 skip,
                                              bool* nonfinite) {
    float m = NEG_INF;
    bool bad = false;
    if (active) {
        for (u32 c = sub; c < classes; c += lanes) {
            const float v = to_f32(x[c]);
            bad |= !isfinite(v);
            m = fmaxf(m, v);
        }
    }
    m = group_max(m, lanes);
    float s = 0.0f, others = 0.0f;
    if (active) {
        for (u32 c = sub; c < classes; c += lanes) {
            const float e = expf(to_f32(x[c]) - m);
            s += e;
            if (i64(c) != skip) others += e;
        }
    }
    RowStats r;
    r.max = m;
    r.sum_exp = group_sum(s, lanes);
    r.sum_exp_others = group_sum(others, lanes);
    *nonfinite = bad;
    return r;
}

template <typename L> __device__ __forceinline__ i64 load_label(const void* labels, u64 row) {
    return i64(static_cast<const L*>(labels)[row]);
}

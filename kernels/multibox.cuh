// What the three loss kernels share: the host arguments, the workspace
// records, the mining keys, and the walk over rows (one row = one prior's
// logits). Mirrored in src/plan.rs; the sizes are asserted on both sides.
//
// The launch sequence (src/plan.rs, `launches`; src/launch.rs runs it):
//   1. multibox_rows_*     per prior: log-sum-exp, mining key, positive terms
//   2. multibox_select     per image: radix select of the hard negatives,
//                          then the last block to finish sums the losses
//   3. multibox_gradient_* per prior: softmax - one-hot for the chosen set,
//                          smooth-L1 gradient for positives, zeros elsewhere
// A forward-only call stops after 2.
#pragma once
#include "common.cuh"

// Bits of the device status word.
constexpr u32 STATUS_INVALID_LABEL = 1u;    // a label outside -1..C-1
constexpr u32 STATUS_NONFINITE_INPUT = 2u;  // a NaN or inf among the values the loss read
constexpr u32 STATUS_STALE_WORKSPACE = 4u;  // a backward found no forward of its call in the workspace

// The layouts of a call's four tensors (Layout in src/config.rs).
constexpr u32 LAYOUT_ROW_MAJOR = 0u;      // [B, P, C] logits, [B, P, 4] boxes
constexpr u32 LAYOUT_CHANNEL_MAJOR = 1u;  // [B, C, P] logits, [B, 4, P] boxes

// What the loss sums are divided by (SPEC.md, "Normalisation").
constexpr u32 NORMALIZER_POSITIVES = 0u;  // N, the batch's positives
constexpr u32 NORMALIZER_GIVEN = 1u;      // the caller's n: `normalizer` on the device, else normalizer_value
constexpr u32 NORMALIZER_PER_IMAGE = 2u;  // each image by B * pos_b

struct MultiboxParams {
    const void* confidence;           // [B, P, C] or [B, C, P] T
    const void* predicted_locations;  // [B, P, 4] or [B, 4, P] T
    const void* labels;               // [B, P] L
    const void* gt_locations;         // as predicted_locations
    const float* upstream;            // [g_reg, g_cls] on the device, or null: use g_reg, g_cls below
    void* grad_confidence;            // as confidence
    void* grad_locations;             // as predicted_locations
    float* regression_loss;           // [1]
    float* classification_loss;       // [1]
    i32* num_pos;                     // [1]
    u8* mask;                         // [B, P], or null
    const float* normalizer;          // NORMALIZER_GIVEN's n on the device, or null: normalizer_value
    // Workspace sections; the layout is planned in src/plan.rs.
    u32* keys;                        // [B * P]
    struct PositiveTerms* terms;      // [B * P], written and read at positives only
    u32* block_status;                // [row_blocks]
    struct ImageSelection* images;    // [B]
    struct Totals* totals;            // [1]
    u32 batch;
    u32 priors;
    u32 classes;
    u32 lanes_per_row;  // power of two in 1..32: kernel 1's lanes that share one row
    u32 set_lanes;      // power of two in 1..32: kernel 3's lanes per row of the set
    u32 row_blocks;     // grid of kernel 1, = entries of `block_status`
    u32 min_negatives;
    float neg_pos_ratio;
    float beta;
    float g_reg;
    float g_cls;
    u32 tile_rows;      // kernel 1's priors per tile in shared memory (ROW_THREADS / lanes_per_row, which the kernel works out); 0: rows read from global memory
    u32 layout;         // LAYOUT_*
    u32 normalizer_kind;     // NORMALIZER_*
    float normalizer_value;  // NORMALIZER_GIVEN's n when `normalizer` is null
    u32 gradient_tile_rows;  // kernel 3's rows per tile staged in shared memory (ROW_THREADS), or 0
    u32 set_copy_lanes;      // power of two in 1..32: kernel 3's lanes that copy a set row into shared memory
    u32 set_slot_bytes;      // unstaged: bytes of kernel 3's shared slot per lane group, or 0 (set rows from global)
    u32 plane_stride;        // channel-major, staged: elements between kernel 1's class planes in shared memory
    u32 gradient_plane_rows;    // channel-major: priors of each staged part of kernel 3's tile, or 0 (from global)
    u32 gradient_plane_stride;  // elements between that part's class planes in shared memory
    u32 select_staged_keys;     // 1: kernel 2 keeps an image's keys in dynamic shared memory; 0: it reads them from L2
    u32 forward_stamp;          // the call's stamp (src/launch.rs): kernel 2 leaves it in Totals
    u32 check_forward_stamp;    // 1: kernel 3 checks Totals' stamp (a backward alone); 0: its kernel 2 just wrote it
};
MB_ASSERT_SIZE(MultiboxParams, 232);

// A positive prior's two loss terms, from kernel 1 to kernel 2, which adds
// them up per image (for NORMALIZER_PER_IMAGE, and so that every normaliser
// sums in the same order).
struct PositiveTerms {
    float cross_entropy;  // lse - x[label]
    float regression;     // smooth-L1 over the four offsets
};
MB_ASSERT_SIZE(PositiveTerms, 8);

// What kernel 2 decided for one image, and its loss sums. A negative
// candidate with key `k` at prior `i` is mined iff k > threshold, or
// k == threshold and i <= tie_cutoff.
struct ImageSelection {
    u32 threshold;
    i32 tie_cutoff;
    u32 num_pos;
    float negative_ce;  // sum of the mined negatives' background losses
    float positive_ce;  // sum of the positives' cross-entropy
    float regression;   // sum of the positives' smooth-L1
    u32 unused[2];
};
MB_ASSERT_SIZE(ImageSelection, 32);

// Batch-wide results of kernel 2's last block, for kernel 3: the divisor
// its gradients use is the one the losses used, whatever a later backward
// call is given, and the stamp that tells it a forward of its own call
// (shape, layout, types, configuration) wrote this workspace.
struct Totals {
    u32 images_done;      // kernel 2's arrival counter; kernel 1 zeroes it
    u32 num_pos;          // N
    u32 status;
    u32 normalizer_kind;  // NORMALIZER_*
    float divisor;        // the batch's divisor (N or n); 0: zeros; NaN: NaN. Unused per image
    u32 forward_stamp;    // the forward's MultiboxParams::forward_stamp, never 0
    u32 unused[2];
};
MB_ASSERT_SIZE(Totals, 32);

// The divisor a set row's gradients use: the batch's, or its image's
// B * pos_b under NORMALIZER_PER_IMAGE (0 for an image without positives).
__device__ __forceinline__ float row_divisor(u32 kind, float batch_divisor, u32 batch, u32 image_positives) {
    if (kind != NORMALIZER_PER_IMAGE) return batch_divisor;
    return float(u64(batch) * image_positives);  // one rounding, from the exact product
}

// g / divisor, with the divisor's two special values: 0 (no positives,
// n <= 0) gives 0, NaN (a non-finite n) gives NaN.
__device__ __forceinline__ float divide_or_zero(float g, float divisor) {
    return divisor > 0.0f ? g / divisor : divisor == 0.0f ? 0.0f : f32_from_bits(0x7fc00000u);
}

// ---------------------------------------------------------------------------
// Mining keys: one u32 per prior, ordered like the background loss.
//
// A non-negative float's bits, with the top bit set, sort as unsigned
// integers in the order of the floats, so the radix select can work on
// integers. The background loss is never negative (loss_of in rows.cu: the
// log1p of a non-negative ratio, or the row's maximum minus x[0] plus the
// log of a sum of at least 1), so the top half of the key space is all
// candidates need; the bottom keeps two markers. candidate_key still maps
// anything not above 0 to the smallest candidate key: a negative float's
// sign bit is the candidates' top bit, and its other bits would rank it
// among the largest losses. NaN ranks above every number, as in a
// descending torch.sort.
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
// Rows. Kernels 1 and 3 walk rows (one prior's C logits) with groups of
// consecutive lanes of a warp, a power of two wide: kernel 1 with
// `lanes_per_row` (1 when a tile of a row per thread fits shared memory),
// kernel 3 with `set_lanes` (up to 16 classes a lane for rows staged in
// its tile, where a lane's share costs it little and each lane adds
// shuffles; up to 4 for longer rows, whose gradients go to global memory,
// so that a group's stores are coalesced).
// Group reductions use xor shuffles below the group's width, which stay in
// the group.

constexpr int ROW_THREADS = 256;

__device__ __forceinline__ float group_max(float v, u32 lanes) {
    for (u32 offset = lanes / 2; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, offset));
    return v;
}

__device__ __forceinline__ float group_sum(float v, u32 lanes) {
    for (u32 offset = lanes / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(FULL_MASK, v, offset);
    return v;
}

template <typename L> __device__ __forceinline__ i64 load_label(const void* labels, u64 row) {
    return i64(static_cast<const L*>(labels)[row]);
}

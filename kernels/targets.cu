// Target assignment: each prior's label and encoded box offsets from the
// images' ground-truth boxes (SPEC.md, "Target assignment"). Launch
// sequence and workspace: src/targets/plan.rs.
//
//   1. targets_reset     zeroes each box's best-prior key and the status word
//   2. targets_match_*   per (image, tile of priors): each prior's best box,
//                        each box's best prior (64-bit atomic max)
//   3. targets_encode_*  per (image, tile): forced matches, labels, offsets
//
// The IoU and the encoding use the _rn intrinsics: they are never contracted
// into a fused multiply-add, so every operation rounds once, as in the f32
// reference, and ties between priors of one size come out the same.
#include "common.cuh"

constexpr u32 TARGET_STATUS_COUNT_CLAMPED = 1u;      // gt_counts[b] outside 0..=T, clamped
constexpr u32 TARGET_STATUS_INVALID_BOX_LABEL = 2u;  // a box label < 1 or >= C (when C is known)
constexpr u32 TARGET_STATUS_DEGENERATE_BOX = 4u;     // a non-finite box or x1 <= x0 or y1 <= y0: skipped
// What a prior matched to a box labelled below 1 gets: below -1, so never
// a label the loss accepts (src/targets/mod.rs: INVALID_PRIOR_LABEL).
constexpr i32 INVALID_PRIOR_LABEL = -2;

constexpr int PRIOR_TILE = 256;    // priors per block, one per thread
constexpr int RESET_THREADS = 256;

// Kernel 2's result for one prior; index -1: no box.
struct PriorMatch {
    float iou;
    i32 index;
};
MB_ASSERT_SIZE(PriorMatch, 8);

struct TargetParams {
    const float* priors;     // [P, 4] center form
    const float* gt_boxes;   // [B, T, 4] corner form
    const void* gt_labels;   // [B, T] L
    const i32* gt_counts;    // [B]
    void* labels;            // [B, P] L
    void* gt_locations;      // [B, P, 4] T
    u64* box_best;           // [B * T] workspace
    PriorMatch* prior_best;  // [B * P] workspace
    u32* status;             // [1] workspace
    u32 batch;
    u32 priors_count;
    u32 max_boxes;
    u32 num_classes;  // C, or 0 when unknown (then labels are only checked >= 1)
    u32 tiles_per_image;
    float iou_threshold;
    float center_variance;
    float size_variance;
};
MB_ASSERT_SIZE(TargetParams, 104);

struct Box {
    float x0, y0, x1, y1;
};

__device__ __forceinline__ u32 clamped_count(const TargetParams& p, u32 image, bool* clamped) {
    const i32 c = p.gt_counts[image];
    *clamped = c < 0 || u32(c) > p.max_boxes;
    return c < 0 ? 0u : min(u32(c), p.max_boxes);
}

// Skipped as if absent (SPEC.md): the negated comparisons also catch NaN.
__device__ __forceinline__ bool valid_box(const Box& b) {
    return isfinite(b.x0) && isfinite(b.y0) && isfinite(b.x1) && isfinite(b.y1) && b.x1 > b.x0 && b.y1 > b.y0;
}

__device__ __forceinline__ Box load_box(const TargetParams& p, u64 row) {
    const float* b = p.gt_boxes + row * 4;
    return Box{b[0], b[1], b[2], b[3]};
}

// A box label outside 1..C-1 (only below 1 when C is unknown, 0).
template <typename L> __device__ __forceinline__ bool invalid_box_label(const TargetParams& p, u64 row) {
    const i64 label = i64(static_cast<const L*>(p.gt_labels)[row]);
    return label < 1 || (p.num_classes != 0 && label >= i64(p.num_classes));
}

__device__ __forceinline__ float clamp0(float x) { return x < 0.0f ? 0.0f : x; }

__device__ __forceinline__ float area(const Box& b) {
    return __fmul_rn(clamp0(__fsub_rn(b.x1, b.x0)), clamp0(__fsub_rn(b.y1, b.y0)));
}

// (cx - w/2, cy - h/2, cx + w/2, cy + h/2): w/2 is exact, one rounding each.
__device__ __forceinline__ Box prior_corners(const float* c) {
    const float hw = __fdiv_rn(c[2], 2.0f), hh = __fdiv_rn(c[3], 2.0f);
    return Box{__fsub_rn(c[0], hw), __fsub_rn(c[1], hh), __fadd_rn(c[0], hw), __fadd_rn(c[1], hh)};
}

// overlap / (area_t + area_p - overlap + 1e-5), in exactly this order.
__device__ __forceinline__ float iou(const Box& t, float area_t, const Box& q, float area_q) {
    const float w = clamp0(__fsub_rn(fminf(t.x1, q.x1), fmaxf(t.x0, q.x0)));
    const float h = clamp0(__fsub_rn(fminf(t.y1, q.y1), fmaxf(t.y0, q.y0)));
    const float overlap = __fmul_rn(w, h);
    return __fdiv_rn(overlap, __fadd_rn(__fsub_rn(__fadd_rn(area_t, area_q), overlap), 1e-5f));
}

// A box's best prior as one u64, so that one atomicMax keeps the largest
// iou and, among equal ious, the lowest prior (its index is inverted). IoUs
// are >= 0, whose bits order like the floats; NaN and -0 count as 0, so
// every prior's key is above the reset value 0 and an image's box has a key
// once its tiles ran.
__device__ __forceinline__ u64 prior_key(float v, u32 prior) {
    const u32 bits = v > 0.0f ? f32_bits(v) : 0u;
    return (u64(bits) << 32) | u64(~prior);
}

__device__ __forceinline__ u64 warp_max_u64(u64 v) {
#pragma unroll
    for (int offset = WARP / 2; offset > 0; offset /= 2) {
        const u64 o = __shfl_xor_sync(FULL_MASK, v, offset);
        v = o > v ? o : v;
    }
    return v;
}

// ---------------------------------------------------------------------------
// 1. Reset. The keys are accumulated by atomics in kernel 2, so they must
// start at 0 on every call; the status word is ORed by kernel 2.

MB_KERNEL(targets_reset, TargetParams, RESET_THREADS) {
    const u64 i = u64(blockIdx.x) * RESET_THREADS + threadIdx.x;
    if (i < u64(p.batch) * p.max_boxes) p.box_best[i] = 0ull;
    if (i == 0) *p.status = 0u;
}

// ---------------------------------------------------------------------------
// 2. Match. Block (image, tile): thread i owns prior tile * 256 + i. The
// image's boxes go through shared memory a chunk at a time; every thread
// walks the chunk in box order (so the first box with the largest iou wins
// a prior, as torch.max gives), and each warp reduces its 32 keys for the
// box before one shared atomic per warp and one global atomic per block.

constexpr int BOX_CHUNK = PRIOR_TILE;

template <typename L> __device__ void match(const TargetParams& p) {
    __shared__ Box boxes[BOX_CHUNK];
    __shared__ float areas[BOX_CHUNK];
    __shared__ u8 valid[BOX_CHUNK];
    __shared__ u64 keys[BOX_CHUNK];

    const u32 image = blockIdx.x / p.tiles_per_image;
    const u32 tile = blockIdx.x % p.tiles_per_image;
    const u32 prior = tile * PRIOR_TILE + threadIdx.x;
    const bool has_prior = prior < p.priors_count;
    bool clamped;
    const u32 n = clamped_count(p, image, &clamped);
    // One block per image reports the image's inputs.
    const bool reporter = tile == 0;
    u32 status = reporter && clamped && threadIdx.x == 0 ? TARGET_STATUS_COUNT_CLAMPED : 0u;

    Box q = {0.0f, 0.0f, 0.0f, 0.0f};
    if (has_prior) q = prior_corners(p.priors + u64(prior) * 4);
    const float area_q = area(q);
    float best_iou = -1.0f;
    i32 best_index = -1;
    const u64 first_row = u64(image) * p.max_boxes;

    for (u32 chunk = 0; chunk < n; chunk += BOX_CHUNK) {
        const u32 len = min(n - chunk, u32(BOX_CHUNK));
        if (threadIdx.x < len) {
            const u64 row = first_row + chunk + threadIdx.x;
            const Box b = load_box(p, row);
            const bool ok = valid_box(b);
            boxes[threadIdx.x] = b;
            areas[threadIdx.x] = ok ? area(b) : 0.0f;
            valid[threadIdx.x] = ok;
            keys[threadIdx.x] = 0ull;
            if (reporter) {
                if (invalid_box_label<L>(p, row)) status |= TARGET_STATUS_INVALID_BOX_LABEL;
                if (!ok) status |= TARGET_STATUS_DEGENERATE_BOX;
            }
        }
        __syncthreads();
        for (u32 j = 0; j < len; ++j) {
            if (!valid[j]) continue;  // uniform over the block: the shuffles below see every lane
            const float v = iou(boxes[j], areas[j], q, area_q);
            if (has_prior && v > best_iou) {
                best_iou = v;
                best_index = i32(chunk + j);
            }
            const u64 key = warp_max_u64(has_prior ? prior_key(v, prior) : 0ull);
            if (threadIdx.x % WARP == 0) atomicMax(&keys[j], key);
        }
        __syncthreads();
        if (threadIdx.x < len && valid[threadIdx.x]) atomicMax(&p.box_best[first_row + chunk + threadIdx.x], keys[threadIdx.x]);
        // No barrier here: after the one above, each thread reads only its
        // own box's entries, which only it rewrites for the next chunk.
    }
    if (has_prior) p.prior_best[u64(image) * p.priors_count + prior] = PriorMatch{best_iou, best_index};
    if (status) atomicOr(p.status, status);
}

MB_KERNEL(targets_match_i32, TargetParams, PRIOR_TILE) { match<i32>(p); }
MB_KERNEL(targets_match_i64, TargetParams, PRIOR_TILE) { match<i64>(p); }

// ---------------------------------------------------------------------------
// 3. Encode. Block (image, tile): first the forced matches that fall in this
// tile, scattered into shared memory with atomicMax on the box row (box t
// is forced after every earlier box, so the later box wins a shared prior),
// a box with an invalid label before any valid one: its label then reaches
// at least its best prior, and through it the loss, whose losses are NaN
// as SPEC.md asks, even where a later box shares that prior. Then one
// thread per prior writes its label and offsets. Every prior is written,
// background too, and an image without a box gets zeros.

// A forced match as one u32 for atomicMax: an invalid label's flag above
// the box row + 1 (T < 2^31 - 1: TargetShape::validate); 0, none.
constexpr u32 FORCED_INVALID = 0x80000000u;

template <typename T, typename L> __device__ void encode(const TargetParams& p) {
    __shared__ u32 forced[PRIOR_TILE];
    const u32 image = blockIdx.x / p.tiles_per_image;
    const u32 tile = blockIdx.x % p.tiles_per_image;
    const u32 tile_start = tile * PRIOR_TILE;
    bool clamped;
    const u32 n = clamped_count(p, image, &clamped);
    const u64 first_row = u64(image) * p.max_boxes;

    forced[threadIdx.x] = 0u;
    __syncthreads();
    for (u32 t = threadIdx.x; t < n; t += PRIOR_TILE) {
        const u64 key = p.box_best[first_row + t];
        if (key == 0ull) continue;  // a skipped box forces nothing
        const u32 best = ~u32(key);
        if (best >= tile_start && best - tile_start < u32(PRIOR_TILE)) {
            const u32 flag = invalid_box_label<L>(p, first_row + t) ? FORCED_INVALID : 0u;
            atomicMax(&forced[best - tile_start], flag | (t + 1));
        }
    }
    __syncthreads();

    const u32 prior = tile_start + threadIdx.x;
    if (prior >= p.priors_count) return;
    const u64 out = u64(image) * p.priors_count + prior;
    const PriorMatch m = p.prior_best[out];
    const u32 f = forced[threadIdx.x];
    const i32 index = f != 0u ? i32((f & ~FORCED_INVALID) - 1) : m.index;
    const float v = f != 0u ? 2.0f : m.iou;  // a forced match passes any threshold, as the reference's fill of 2
    T* loc = static_cast<T*>(p.gt_locations) + out * 4;
    L* labels = static_cast<L*>(p.labels);
    if (index < 0) {
        labels[out] = L(0);
        for (int k = 0; k < 4; ++k) loc[k] = from_f32<T>(0.0f);
        return;
    }
    const u64 row = first_row + u32(index);
    // A box label below 1 is invalid (its matched priors are neither
    // background nor ignored): it goes out as INVALID_PRIOR_LABEL, which
    // the loss refuses like any label outside -1..C-1, so that its losses
    // are NaN. A label >= C goes out as it is, for the same reason.
    const L box_label = static_cast<const L*>(p.gt_labels)[row];
    labels[out] = v < p.iou_threshold ? L(0) : box_label < L(1) ? L(INVALID_PRIOR_LABEL) : box_label;

    const Box b = load_box(p, row);
    const float* c = p.priors + u64(prior) * 4;
    const float bcx = __fdiv_rn(__fadd_rn(b.x0, b.x1), 2.0f);
    const float bcy = __fdiv_rn(__fadd_rn(b.y0, b.y1), 2.0f);
    const float bw = __fsub_rn(b.x1, b.x0);
    const float bh = __fsub_rn(b.y1, b.y0);
    // Divisions, not products with reciprocals: the reference divides.
    loc[0] = from_f32<T>(__fdiv_rn(__fdiv_rn(__fsub_rn(bcx, c[0]), c[2]), p.center_variance));
    loc[1] = from_f32<T>(__fdiv_rn(__fdiv_rn(__fsub_rn(bcy, c[1]), c[3]), p.center_variance));
    loc[2] = from_f32<T>(__fdiv_rn(logf(__fdiv_rn(bw, c[2])), p.size_variance));
    loc[3] = from_f32<T>(__fdiv_rn(logf(__fdiv_rn(bh, c[3])), p.size_variance));
}

MB_KERNEL(targets_encode_f32_i32, TargetParams, PRIOR_TILE) { encode<float, i32>(p); }
MB_KERNEL(targets_encode_f32_i64, TargetParams, PRIOR_TILE) { encode<float, i64>(p); }
MB_KERNEL(targets_encode_f16_i32, TargetParams, PRIOR_TILE) { encode<f16, i32>(p); }
MB_KERNEL(targets_encode_f16_i64, TargetParams, PRIOR_TILE) { encode<f16, i64>(p); }
MB_KERNEL(targets_encode_bf16_i32, TargetParams, PRIOR_TILE) { encode<bf16, i32>(p); }
MB_KERNEL(targets_encode_bf16_i64, TargetParams, PRIOR_TILE) { encode<bf16, i64>(p); }

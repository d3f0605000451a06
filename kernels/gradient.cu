// Kernel 3 of 3: the gradients, written once, for every prior.
//
// Rows in the classification set (positives and mined negatives, ~10 % of
// rows at neg_pos_ratio 3) get g_cls / D * (softmax(x) - one_hot(label));
// every other row gets zeros, without its logits being read (but for the
// bytes that share a 16-byte word with a set row's, or channel-major staged
// a 32-byte sector with a set prior's: loaded and dropped). Positives get
// g_reg / D * clamp(d / beta, -1, 1) for their box offsets, the rest zeros.
// D is the divisor the forward's losses used, which kernel 2 left in Totals
// (N, the caller's n, or B * pos_b for the row's image), so a backward call
// needs no normaliser. The scale is applied in f32 before the one rounding
// to T.
//
// Row-major, blocks walk tiles of ROW_THREADS consecutive rows. In a tile:
//   1. One thread per row reads its key (a coalesced 4-byte load per lane),
//      decides whether the row is in the set, and writes its four box
//      gradients (one 8- or 16-byte store). A block scan lists the set's
//      rows in row order.
//   2. Lane groups (`set_lanes` wide) take the set's rows and compute their
//      softmax gradients; only these rows' logits are read: once from
//      global memory, as the 16-byte words that cover them, into shared
//      memory (gather_run), but for rows too long for the slots (below).
//      Staged, each lane takes up to 16 classes, so a row needs few lanes
//      and few shuffle steps.
//   3. The tile's logit gradients are one contiguous run of global memory.
//      Staged (`gradient_tile_rows`, when the tile fits shared memory), the
//      run is built in shared memory, zeros first and the set's rows over
//      them, and then stored by copy_run: 16-byte stores, each sector inside
//      the run written whole by one request, and the partial 16-byte words
//      at its two ends (shared with the neighbouring tiles) element by
//      element. Unstaged (long rows), step 1's scan
//      also lists the spans of rows between the set's rows; warps write
//      zeros over the spans with 16-byte stores, and step 2 reads each set
//      row from its group's slot of shared memory (`set_slot_bytes`; from
//      global memory, three times, where the slots would not fit) and
//      writes its gradients to global memory directly.
// Every element is written exactly once to global memory.
#include "multibox.cuh"

// A set row's maximum, sum of exp(x - max), and that sum without class
// `skip`, reduced over its group's lanes; every lane of the group gets
// them. Two passes over the row: the second hits L1 or shared memory.
// Kernel 3 reads only the set's rows, so it keeps expf and the per-class
// test for `skip`: the softmax it writes is as exact as f32 allows. Class c
// of the row is x[c * stride]: 1 for a row-major row; channel-major, P in
// global memory or the staged part's `gradient_plane_stride`. Both layouts
// use the same lanes (set_lanes depends on the shape and type, not the
// layout) in the same order, so they give the same bits.
struct RowStats {
    float max;
    float sum_exp;
    float sum_exp_others;  // without class `skip`
};

template <typename T>
__device__ __forceinline__ RowStats row_stats(const T* x, u64 stride, u32 classes, u32 sub, u32 lanes, bool active,
                                              u32 skip) {
    float m = NEG_INF;
    if (active)
        for (u32 c = sub; c < classes; c += lanes) m = fmaxf(m, to_f32(x[c * stride]));
    m = group_max(m, lanes);
    float s = 0.0f, others = 0.0f;
    if (active) {
        for (u32 c = sub; c < classes; c += lanes) {
            const float e = expf(to_f32(x[c * stride]) - m);
            s += e;
            if (c != skip) others += e;
        }
    }
    RowStats r;
    r.max = m;
    r.sum_exp = group_sum(s, lanes);
    r.sum_exp_others = group_sum(others, lanes);
    return r;
}

// Row indices within a tile fit 16 bits (a span's end can be ROW_THREADS).
struct GradientShared {
    u32 scan[ROW_THREADS / WARP + 1];
    u16 set_rows[ROW_THREADS];      // tile offsets of the set's rows, in order
    u32 set_labels[ROW_THREADS];    // their labels (0 for mined negatives)
    float set_scales[ROW_THREADS];  // their g_cls / divisor
    u16 span_first[ROW_THREADS];    // unstaged: spans of consecutive rows outside the set
    u16 span_end[ROW_THREADS];
    u8 in_set[ROW_THREADS];
};

// The upstream gradients, and the divisor the forward used (Totals).
struct Scales {
    float g_reg, g_cls;
    u32 normalizer_kind;
    float divisor;
};

__device__ __forceinline__ Scales gradient_scales(const MultiboxParams& p) {
    Scales s;
    s.g_reg = p.upstream ? p.upstream[0] : p.g_reg;
    s.g_cls = p.upstream ? p.upstream[1] : p.g_cls;
    // Kernel 2 wrote Totals in an earlier launch: plain loads see it.
    s.normalizer_kind = p.totals->normalizer_kind;
    s.divisor = p.totals->divisor;
    return s;
}

// One row's part in the gradients.
struct RowDecision {
    bool in_set;    // a positive or a mined negative, whose divisor is not 0
    bool positive;
    u32 label;      // for a positive; 0 otherwise
    float cls_scale, reg_scale;
};

// A row whose divisor is 0 (N == 0, n <= 0, or an image without positives
// when normalising per image) is left out of the set: its gradients are
// zeros, and its logits are never read.
template <typename L>
__device__ __forceinline__ RowDecision decide(const MultiboxParams& p, const Scales& s, u64 row, bool in_range) {
    RowDecision d;
    d.in_set = d.positive = false;
    d.label = 0;
    d.cls_scale = d.reg_scale = 0.0f;
    if (!in_range) return d;
    const u32 key = p.keys[row];
    if (key != KEY_POSITIVE && !is_candidate(key)) return d;
    const u32 image = u32(row / p.priors), prior = u32(row % p.priors);
    const bool per_image = s.normalizer_kind == NORMALIZER_PER_IMAGE;
    ImageSelection sel = {};
    if (per_image || key != KEY_POSITIVE) sel = p.images[image];
    const float divisor = row_divisor(s.normalizer_kind, s.divisor, p.batch, per_image ? sel.num_pos : 0u);
    if (divisor == 0.0f) return d;
    if (key == KEY_POSITIVE) {
        // Kernel 1 keyed invalid labels as ignored: this one is in 1..C-1.
        d.positive = d.in_set = true;
        d.label = u32(load_label<L>(p.labels, row));
    } else {
        d.in_set = is_mined(sel, key, prior);
    }
    d.cls_scale = divide_or_zero(s.g_cls, divisor);
    d.reg_scale = divide_or_zero(s.g_reg, divisor);
    return d;
}

// A positive's box gradient g_reg / divisor * clamp(d / beta, -1, 1); zeros
// for every other row. Coordinates `stride` elements apart.
template <typename T>
__device__ __forceinline__ void box_gradient(const MultiboxParams& p, const RowDecision& row, const T* pred,
                                             const T* gt, u64 stride, float g[4]) {
    for (int j = 0; j < 4; ++j) g[j] = 0.0f;
    if (!row.positive) return;
    float a[4], b[4];
    load_box(pred, stride, a);
    load_box(gt, stride, b);
    // clamp(d / beta, -1, 1) by comparisons, which a NaN fails: it stays
    // NaN, as in the reference (fminf and fmaxf would drop it for -1).
    for (int j = 0; j < 4; ++j) {
        const float r = (a[j] - b[j]) / p.beta;
        g[j] = row.reg_scale * (r < -1.0f ? -1.0f : r > 1.0f ? 1.0f : r);
    }
}

// softmax(x)[c] - onehot(label)[c]. softmax[label] - 1 would cancel to 0 in
// f32 for a confident row (1 - 1e-9 rounds to 1), though the true value is
// representable in every T. Written as -(sum of the other classes' exp) /
// sum, it keeps full relative precision. The label's exp is computed and
// dropped: a select, where a branch around it costs four instructions a
// class for every lane.
// `logit` is the row's class c.
__device__ __forceinline__ float softmax_minus_onehot(const RowStats& stats, float inv_sum, float logit, u32 c,
                                                      u32 label) {
    const float e = expf(logit - stats.max);
    return (c == label ? -stats.sum_exp_others : e) * inv_sum;
}

// Lane group `group`'s slot for the set row at `src` (its copy, read from
// global memory once): `bytes` a slot, the row at its offset within 16
// bytes, so that the copy stores its whole words whole.
template <typename T>
__device__ __forceinline__ T* group_slot(unsigned char* slots, u32 bytes, u32 group, const T* src) {
    return reinterpret_cast<T*>(slots + group * bytes + u32(u64(src) & 15u));
}

// Zeros over the 16-byte words that hold `bytes` bytes from `tile`, by the
// whole block: the staged tile before its set rows are written into it.
__device__ __forceinline__ void zero_tile(unsigned char* tile, u32 bytes) {
    uint4* words = reinterpret_cast<uint4*>(tile);
#pragma unroll 1
    for (u32 i = threadIdx.x; i < (bytes + 15u) / 16u; i += ROW_THREADS) words[i] = make_uint4(0u, 0u, 0u, 0u);
}

// Where kernel 3 reads a set row's logits from. Template arguments, so
// that shared-memory accesses compile to LDS/STS, not generic ones.
enum SetRowsIn : u32 {
    SET_ROWS_IN_TILE,   // the staged tile (gradient_tile_rows != 0)
    SET_ROWS_IN_SLOTS,  // a slot per lane group (set_slot_bytes != 0)
    SET_ROWS_IN_GLOBAL, // global memory, three passes
};

template <typename T, typename L, SetRowsIn FROM>
__device__ void write_gradients_row_major(const MultiboxParams& p, GradientShared& sh) {
    constexpr bool STAGED = FROM == SET_ROWS_IN_TILE;
    MB_DYNAMIC_SHARED(unsigned char, staged);  // the tile, or the slots
    const T* confidence = static_cast<const T*>(p.confidence);
    const T* pred = static_cast<const T*>(p.predicted_locations);
    const T* gt = static_cast<const T*>(p.gt_locations);
    T* grad_confidence = static_cast<T*>(p.grad_confidence);
    T* grad_locations = static_cast<T*>(p.grad_locations);
    const u32 t = threadIdx.x, lane = t % WARP, warp = t / WARP;
    const u64 rows = u64(p.batch) * p.priors;
    const u64 classes = p.classes;

    const Scales scales = gradient_scales(p);

    for (u64 first = u64(blockIdx.x) * ROW_THREADS; first < rows; first += u64(gridDim.x) * ROW_THREADS) {
        const u32 count = u32(rows - first < ROW_THREADS ? rows - first : ROW_THREADS);
        // The tile's logit gradients, count * C elements; staged, their copy
        // in shared memory keeps their offset within a 16-byte line, so that
        // aligned shared words store to aligned global ones.
        T* const out = grad_confidence + first * classes;
        const u32 copy_offset = u32(u64(out) & 15u);

        // 1. This thread's row: in the set? Its box gradients.
        const RowDecision mine = decide<L>(p, scales, first + t, t < count);
        if (t < count) {
            float g[4];
            box_gradient(p, mine, pred + (first + t) * 4, gt + (first + t) * 4, 1, g);
            store4(grad_locations + (first + t) * 4, g);
        }
        const bool in_set = mine.in_set;
        // Unstaged, a span of rows outside the set starts here if the row
        // before is in the set (or this is the tile's first row). One scan
        // counts both lists: set rows in the low half, span starts in the
        // high half.
        bool span_start = false;
        if (!STAGED) {
            sh.in_set[t] = in_set;
            __syncthreads();
            span_start = t < count && !in_set && (t == 0 || sh.in_set[t - 1]);
        }
        u32 totals;
        const u32 slots = block_exclusive_scan<ROW_THREADS>(u32(in_set) | u32(span_start) << 16, sh.scan, &totals);
        const u32 set_count = totals & 0xffffu, span_count = totals >> 16;
        if (in_set) {
            sh.set_rows[slots & 0xffffu] = u16(t);
            sh.set_labels[slots & 0xffffu] = mine.label;
            sh.set_scales[slots & 0xffffu] = mine.cls_scale;
        }
        if (span_start) {
            u32 end = t + 1;
            while (end < count && !sh.in_set[end]) ++end;
            sh.span_first[slots >> 16] = u16(t);
            sh.span_end[slots >> 16] = u16(end);
        }
        // Staged, zeros over the tile's copy. The scan's barriers put this
        // after every thread's stores of the previous tile's copy, and the
        // barrier below before the set rows are written over it.
        if (STAGED) zero_tile(staged, copy_offset + count * p.classes * u32(sizeof(T)));
        __syncthreads();  // the lists are complete, the copy zeroed

        // Unstaged, zeros over the spans, a warp per span. The lanes leave a
        // span's loop after different trip counts; __syncwarp reconverges
        // them, so that each span's stores issue as whole-warp requests.
        for (u32 s = warp; s < span_count; s += ROW_THREADS / WARP) {
            __syncwarp();
            const u64 row = first + sh.span_first[s];
            zero_span(grad_confidence + row * classes, u64(sh.span_end[s] - sh.span_first[s]) * classes, lane, WARP);
        }

        // 2. The set's rows, a lane group each. Every thread walks the same
        // number of steps, so the group shuffles always find all 32 lanes.
        const u32 lanes = p.set_lanes, sub = t % lanes, group = t / lanes;
        const u32 groups = ROW_THREADS / lanes;
        for (u32 base = 0; base < set_count; base += groups) {
            const u32 i = base + group;
            const bool active = i < set_count;
            const u32 r = active ? sh.set_rows[i] : 0u;
            const u32 row_label = active ? sh.set_labels[i] : 0u;
            const T* x = confidence + (first + r) * classes;
            T* g = out + u64(r) * classes;
            if (FROM != SET_ROWS_IN_GLOBAL) {
                // The rows of this warp's groups into shared memory, read
                // from global memory as the whole 16-byte words that cover
                // them (gather_run), and read from there: once from global
                // memory, not three times. Into the tile, each row at its
                // place, where its gradients overwrite it, each lane
                // reading and writing only its own classes; or into its
                // group's slot, at the row's offset within 16 bytes, the
                // gradients going to global memory. The copy takes wider
                // groups than the arithmetic: set_copy_lanes has a lane
                // for every word a row can cover (up to a warp), so for
                // rows of up to 32 words each round is one load
                // instruction over 32 / set_copy_lanes rows that fetches
                // each of their sectors once. The lanes of a round whose
                // rows cover fewer words sit out its loop: the __syncwarp
                // at each round reconverges them, so that each round's
                // loads issue as whole-warp requests (and orders the last
                // step's reads of a slot before it is overwritten); the
                // last one orders the copy before the groups read it.
                const u32 copy_lanes = p.set_copy_lanes, rows_per_warp = WARP / lanes;
                const u32 warp_first = base + warp * rows_per_warp;
                for (u32 round = 0; round < rows_per_warp && warp_first + round < set_count;
                     round += WARP / copy_lanes) {
                    __syncwarp();
                    const u32 k = warp_first + round + lane / copy_lanes;
                    if (k < set_count) {
                        const u32 row = sh.set_rows[k];
                        const T* src = confidence + (first + row) * classes;
                        gather_run(STAGED ? reinterpret_cast<T*>(staged + copy_offset) + u64(row) * classes
                                          : group_slot<T>(staged, p.set_slot_bytes, k - base, src),
                                   src, p.classes, lane % copy_lanes, copy_lanes, u64(confidence),
                                   u64(confidence + rows * classes));
                    }
                }
                __syncwarp();
                if (STAGED) {
                    g = reinterpret_cast<T*>(staged + copy_offset) + u64(r) * classes;
                    x = g;
                } else {
                    x = group_slot<T>(staged, p.set_slot_bytes, group, x);
                }
            }
            const RowStats stats = row_stats(x, 1, p.classes, sub, lanes, active, row_label);
            if (!active) continue;
            const float scale = sh.set_scales[i], inv_sum = 1.0f / stats.sum_exp;
            for (u32 c = sub; c < p.classes; c += lanes)
                g[c] = from_f32<T>(scale * softmax_minus_onehot(stats, inv_sum, to_f32(x[c]), c, row_label));
        }

        // 3. Staged, the whole tile from shared memory.
        if (STAGED) {
            __syncthreads();  // the set's rows are in the copy
            copy_run(out, reinterpret_cast<const T*>(staged + copy_offset), count * p.classes, t, ROW_THREADS);
        }
        // No barrier here. The next tile writes in_set (unstaged), read only
        // before "the lists are complete", and rewrites the lists and the
        // staged copy only after its scan's barriers, which every thread
        // reaches after finishing this tile.
    }
}

// Channel-major: tiles of ROW_THREADS consecutive priors of one image, a
// thread per prior. Every class plane's run of the tile's priors is one
// contiguous range of the logits and of the gradient.
//   1. Each thread decides its prior and writes its box gradients; a block
//      scan lists the set's priors, as row-major, and a ballot per warp
//      marks them in a bitmask of the tile.
//   Steps 2 and 3 then run on parts of the tile: staged
//   (gradient_plane_rows != 0), parts of gradient_plane_rows priors, the
//   whole tile where its planes fit shared memory; otherwise one part.
//   Staged, for each part a warp per class plane first copies into shared
//   memory the 32-byte sectors of the plane's run that hold a set prior's
//   logit (stage_set_sectors): whole, by coalesced 16-byte loads. A set
//   prior's C logits lie in C planes; read one by one at stride P, each is
//   a request of its own in each of steps 2 and 3, which uses about a tenth
//   of the bytes of the sectors it fetches. Copied, each sector the set
//   needs is fetched once, and no other. Unstaged (planes too long for even
//   32 priors' to fit), steps 2 and 3 read them so.
//   2. Lane groups take the part's set priors and compute their row
//      statistics with row_stats, reading each class plane at its stride
//      (the staged part's, or P): the same lanes and the same order as the
//      row-major path, so every gradient is bit for bit the row-major
//      call's.
//   3. A warp per class plane writes the plane's run of the part in 16-byte
//      words (its ends, wherever c * P puts them, element by element): a
//      word over priors outside the set is zeros, found from the bitmask
//      without reading anything else; a set prior's element is softmax -
//      one-hot, from the statistics its group left in shared memory.
struct ColumnShared {
    u32 scan[ROW_THREADS / WARP + 1];
    u16 set_rows[ROW_THREADS];         // tile offsets of the set's priors, in order
    u32 set_labels[ROW_THREADS];
    RowStats stats[ROW_THREADS];       // per set prior, from step 2; sum_exp holds 1 / sum_exp
    u32 in_set[ROW_THREADS / WARP];    // bit r % 32 of word r / 32: tile prior r is in the set
    u32 set_before[ROW_THREADS / WARP];  // the set's priors before word w's: the list index of its first
    float cls_scale;                   // the set's g_cls / divisor: one image, one divisor
};

// Bits `first`, ..., `first + n - 1` (n <= 32) of the tile's set bitmask, from bit 0.
__device__ __forceinline__ u32 set_bits(const ColumnShared& sh, u32 first, u32 n) {
    const u32 w = first / WARP;
    const u64 two = u64(sh.in_set[w]) | (w + 1 < ROW_THREADS / WARP ? u64(sh.in_set[w + 1]) << 32 : 0ull);
    return u32(two >> (first % WARP)) & (n == 32 ? ~0u : (1u << n) - 1u);
}

// The set's priors before tile prior r: r's index in the set's list, if r
// is in the set.
__device__ __forceinline__ u32 set_index(const ColumnShared& sh, u32 r) {
    return sh.set_before[r / WARP] + __popc(sh.in_set[r / WARP] & ((1u << (r % WARP)) - 1u));
}

// The gradient of class c at the set's i-th prior, whose class c logit is
// `logit`: the same expression, in the same order, as the row-major
// path's. Step 2 took the reciprocal of the prior's sum once, for its C
// elements.
template <typename T>
__device__ __forceinline__ T set_prior_gradient(const ColumnShared& sh, float cls_scale, float logit, u32 i, u32 c) {
    const RowStats stats = sh.stats[i];
    return from_f32<T>(cls_scale * softmax_minus_onehot(stats, stats.sum_exp, logit, c, sh.set_labels[i]));
}

// Whether the 32-byte sector that holds element i of a class plane's run of
// a part of the tile (from `run`, `count` priors from tile prior `from`)
// holds a set prior's logit: the sectors that stage_set_sectors copies.
template <typename T>
__device__ __forceinline__ bool sector_has_set(const ColumnShared& sh, const T* run, u32 i, u32 count, u32 from) {
    constexpr u32 PER_SECTOR = 32 / sizeof(T);
    const u32 before = u32(u64(run + i) & 31u) / u32(sizeof(T));  // the sector's elements before i
    const u32 first = i > before ? i - before : 0u;
    const u32 end = i + (PER_SECTOR - before) < count ? i + (PER_SECTOR - before) : count;
    return set_bits(sh, from + first, end - first) != 0;
}

// Staged channel-major: the sectors of each class plane's run of a part of
// the tile (`count` priors from tile prior `from`) that hold a set prior
// (sector_has_set), from `x0` (planes `priors` apart) into `dst` (planes
// `stride` apart, each at its run's offset within 16 bytes), a warp a
// plane. The words of a run are 16-byte loads and stores, its ends (where
// c * P puts them; to the sector boundaries, sector_split) an element a
// lane. A word whose sector holds a set prior is copied even if its own
// priors are not in the set: its sector is fetched anyway, and the warp's
// request then takes every byte of it. The other elements of the part are
// left as they are, and never read.
template <typename T>
__device__ __forceinline__ void stage_set_sectors(T* dst, u32 stride, const T* x0, u64 priors, u32 classes, u32 count,
                                                  u32 from, const ColumnShared& sh) {
    constexpr u32 PER_VECTOR = 16 / sizeof(T);
    constexpr u32 WARPS = ROW_THREADS / WARP;
    const u32 lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
#pragma unroll 1
    for (u32 c = warp; c < classes; c += WARPS) {
        const T* run = x0 + c * priors;
        T* out = dst + c * stride;
        const SectorSplit split = sector_split(run, count);
        const u32 head = split.head, words = split.words;
#pragma unroll 1
        for (u32 w = lane; w < words; w += WARP) {
            if (sector_has_set(sh, run, head + w * PER_VECTOR, count, from))
                reinterpret_cast<uint4*>(out + head)[w] = reinterpret_cast<const uint4*>(run + head)[w];
        }
        // The ends, within a sector each: a lane each.
        const u32 i = lane < head ? lane : head + words * PER_VECTOR + (lane - head);
        if (i < count && sector_has_set(sh, run, i, count, from)) out[i] = run[i];
    }
}

template <typename T, typename L, bool STAGED>
__device__ void write_gradients_channel_major(const MultiboxParams& p, ColumnShared& sh) {
    constexpr u32 PER_VECTOR = 16 / sizeof(T);
    constexpr u32 WARPS = ROW_THREADS / WARP;
    const T* confidence = static_cast<const T*>(p.confidence);
    const T* pred = static_cast<const T*>(p.predicted_locations);
    const T* gt = static_cast<const T*>(p.gt_locations);
    T* grad_confidence = static_cast<T*>(p.grad_confidence);
    T* grad_locations = static_cast<T*>(p.grad_locations);
    const u32 t = threadIdx.x, lane = t % WARP, warp = t / WARP;
    const u64 priors = p.priors;
    const u32 per_image = (p.priors + ROW_THREADS - 1) / ROW_THREADS;
    const u64 tiles = u64(p.batch) * per_image;
    const Scales scales = gradient_scales(p);
    const u32 lanes = p.set_lanes, sub = t % lanes, group = t / lanes;
    const u32 groups = ROW_THREADS / lanes;
    MB_DYNAMIC_SHARED(unsigned char, staged);  // a part's planes, staged
    // Class c of a part's prior r (from its first) lies at x[r + c * stride].
    const u64 stride = STAGED ? p.gradient_plane_stride : priors;
    const u32 part_rows = STAGED ? p.gradient_plane_rows : ROW_THREADS;

    for (u64 tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        const u64 image = tile / per_image;
        const u32 p0 = u32(tile % per_image) * ROW_THREADS;
        const u32 count = p.priors - p0 < ROW_THREADS ? p.priors - p0 : ROW_THREADS;
        const T* x0 = confidence + image * p.classes * priors + p0;  // class c of tile prior r: x0[r + c * P]
        T* const g0 = grad_confidence + image * p.classes * priors + p0;

        // 1. This thread's prior.
        const RowDecision mine = decide<L>(p, scales, image * priors + p0 + t, t < count);
        if (t < count) {
            const u64 box = image * 4 * priors + p0 + t;
            float g[4];
            box_gradient(p, mine, pred + box, gt + box, priors, g);
            store_box(grad_locations + box, priors, g);
        }
        u32 set_count;
        const u32 slot = block_exclusive_scan<ROW_THREADS>(u32(mine.in_set), sh.scan, &set_count);
        const u32 warp_set = __ballot_sync(FULL_MASK, mine.in_set);
        if (mine.in_set) {
            sh.set_rows[slot] = u16(t);
            sh.set_labels[slot] = mine.label;
            if (slot == 0) sh.cls_scale = mine.cls_scale;
        }
        if (lane == 0) {
            sh.in_set[warp] = warp_set;
            sh.set_before[warp] = slot;
        }
        __syncthreads();  // the list and the bitmask are complete
        const float cls_scale = set_count != 0 ? sh.cls_scale : 0.0f;
        // Whether the logits and their gradients lie at the same offset
        // within 16 bytes (tensors from an allocator do), so that a word of
        // one is a word of the other.
        const bool same_words = STAGED && ((u64(x0) ^ u64(g0)) & 15u) == 0;

        // The parts: a multiple of 32 priors apart, so that each starts at
        // a word of the bitmask, and at x0's offset within 16 bytes.
        for (u32 from = 0; from < count; from += part_rows) {
            const u32 n = count - from < part_rows ? count - from : part_rows;
            // Staged, the part's planes at its offset within 16 bytes, which
            // the stride keeps for every plane (gradient_plane_stride).
            // Derived from `staged` where it is used, so that the compiler
            // knows it for shared memory.
            T* const copy = reinterpret_cast<T*>(staged + (u64(x0) & 15u));
            const T* const x = STAGED ? copy : x0 + from;
            if (STAGED) {
                // The previous part's step 3 has read its copy.
                if (from != 0) __syncthreads();
                stage_set_sectors(copy, p.gradient_plane_stride, x0 + from, priors, p.classes, n, from, sh);
                __syncthreads();  // the part's set logits are in shared memory
            }

            // 2. The part's set statistics, a lane group per prior. Every
            // thread walks the same number of steps, so the group shuffles
            // find all 32 lanes. The part's set priors are consecutive in
            // the list.
            const u32 set_first = from == 0 ? 0u : set_index(sh, from);
            const u32 set_end = from + n == count ? set_count : set_index(sh, from + n);
            for (u32 base = set_first; base < set_end; base += groups) {
                const u32 i = base + group;
                const bool active = i < set_end;
                const u32 r = active ? sh.set_rows[i] - from : 0u;
                RowStats stats =
                    row_stats(x + r, stride, p.classes, sub, lanes, active, active ? sh.set_labels[i] : 0u);
                stats.sum_exp = 1.0f / stats.sum_exp;
                if (active && sub == 0) sh.stats[i] = stats;
            }
            __syncthreads();  // the statistics are complete

            // 3. The class planes' runs of the part, a warp each at a time.
#pragma unroll 1
            for (u32 c = warp; c < p.classes; c += WARPS) {
                T* out = g0 + c * priors + from;
                const SectorSplit split = sector_split(out, n);
                const u32 head = split.head, words = split.words;
#pragma unroll 1
                for (u32 w = lane; w < words; w += WARP) {
                    const u32 first = head + w * PER_VECTOR;
                    uint4 v = make_uint4(0u, 0u, 0u, 0u);
                    const u32 word_set = set_bits(sh, from + first, PER_VECTOR);
                    if (word_set != 0) {
                        // The word's set priors are consecutive in the list.
                        const u32 i0 = set_index(sh, from + first);
                        // Staged, and where the logits' words are the
                        // gradient's, the word's logits are one 16-byte
                        // shared load: its sector holds a set prior, so it
                        // was copied.
                        const T* const xc = x + c * stride + first;
                        Chunk<T> logits;
                        if (same_words) logits = chunk_of<T>(*reinterpret_cast<const uint4*>(xc));
                        constexpr u32 PER_U32 = 4 / sizeof(T), BITS = 8 * sizeof(T);
                        u32 bits[4] = {0u, 0u, 0u, 0u};
#pragma unroll
                        for (u32 e = 0; e < PER_VECTOR; ++e) {
                            if (word_set & (1u << e)) {
                                const u32 i = i0 + __popc(word_set & ((1u << e) - 1u));
                                const float logit = same_words ? logits.at(e) : to_f32(xc[e]);
                                const T g = set_prior_gradient<T>(sh, cls_scale, logit, i, c);
                                bits[e / PER_U32] |= element_bits(g) << (e % PER_U32 * BITS);
                            }
                        }
                        v = make_uint4(bits[0], bits[1], bits[2], bits[3]);
                    }
                    *reinterpret_cast<uint4*>(out + first) = v;
                }
                // The ends, within a sector each: a lane each.
                const u32 i = lane < head ? lane : head + words * PER_VECTOR + (lane - head);
                if (i < n) {
                    // One store for both cases, so that the warp's end
                    // elements are one request.
                    T g = from_f32<T>(0.0f);
                    if (set_bits(sh, from + i, 1) != 0)
                        g = set_prior_gradient<T>(sh, cls_scale, to_f32(x[i + c * stride]), set_index(sh, from + i),
                                                  c);
                    out[i] = g;
                }
            }
        }
        // No barrier here: the next tile's first shared writes (the lists,
        // the bitmask, set_before, cls_scale, the staged planes) come after
        // its scan's barriers, which every thread reaches only after
        // finishing this tile's step 3.
    }
}

// Every gradient element NaN, and the status word STATUS_STALE_WORKSPACE,
// when the workspace's Totals hold no stamp of this call's forward: a
// backward on a workspace whose last forward was another call's (Totals
// sit at offset 0 for every shape, so any forward overwrites the stamp),
// or on one no forward wrote, would otherwise compute gradients from
// whatever the keys hold, silently (zeros, for a zeroed workspace). NaN
// is loud: a loss scaler skips the step, and a plain loop's weights show
// it. Only a backward alone checks (check_forward_stamp): a
// forward_backward's kernel 3 follows its own kernel 2, and the check
// would only put the stamp's round trip to L2 ahead of its first loads.
// Every thread reads the same stamp, so the branch is uniform and the
// rest of the kernel never runs. The two gradients are B * P * C and
// B * P * 4 contiguous elements in either layout, written an element a
// thread (their addresses are only element-aligned); only block 0 writes
// the status word, which no block of this kernel reads.
template <typename T> __device__ bool stale_workspace_gives_nan(const MultiboxParams& p) {
    if (!p.check_forward_stamp || p.totals->forward_stamp == p.forward_stamp) return false;
    const T nan = from_f32<T>(f32_from_bits(0x7fc00000u));
    const u64 rows = u64(p.batch) * p.priors, step = u64(gridDim.x) * blockDim.x;
    const u64 first = u64(blockIdx.x) * blockDim.x + threadIdx.x;
    for (u64 i = first; i < rows * p.classes; i += step) static_cast<T*>(p.grad_confidence)[i] = nan;
    for (u64 i = first; i < rows * 4; i += step) static_cast<T*>(p.grad_locations)[i] = nan;
    if (first == 0) p.totals->status = STATUS_STALE_WORKSPACE;
    return true;
}

// One kernel entry per layout. A kernel gets the registers of its most
// demanding path, and the channel-major staging holds more live values
// (the part's offsets, its plane stride, the sector tests) than any
// row-major path: in one entry the row-major paths ran at 53 registers
// (51 in f32) on sm_90. The plan picks the entry (Step::kernel_name), and
// each has the shared record of its own path only.
//
// Both entries ask ptxas for 5 resident blocks of 256 threads (at most 48
// registers), which an sm_90 SM's 228 KiB of shared memory allows with
// tiles of up to about 40.7 KiB each row-major (C = 81's bf16 tile is 40.5
// KiB) and 39.9 KiB channel-major: 40 warps an SM, where 53 registers
// allowed 32. The row-major entry fits in 48 on sm_90 as it is (46 in
// f32); the channel-major one pays for it with 3 % more instructions in
// its plane writer (320 -> 329 in the half types). Nothing spills on any
// architecture (tests/kernel_build.rs). An sm_75 SM holds 1,024 threads,
// 4 blocks, whatever the bound.
constexpr u32 GRADIENT_BLOCKS = 5;
#define GRADIENT_KERNEL(name) MB_KERNEL_BLOCKS(name, MultiboxParams, ROW_THREADS, GRADIENT_BLOCKS)

template <typename T, typename L> __device__ void write_gradients_rows(const MultiboxParams& p) {
    __shared__ GradientShared sh;
    if (stale_workspace_gives_nan<T>(p)) return;
    if (p.gradient_tile_rows != 0)
        write_gradients_row_major<T, L, SET_ROWS_IN_TILE>(p, sh);
    else if (p.set_slot_bytes != 0)
        write_gradients_row_major<T, L, SET_ROWS_IN_SLOTS>(p, sh);
    else
        write_gradients_row_major<T, L, SET_ROWS_IN_GLOBAL>(p, sh);
}

template <typename T, typename L> __device__ void write_gradients_planes(const MultiboxParams& p) {
    __shared__ ColumnShared sh;
    if (stale_workspace_gives_nan<T>(p)) return;
    if (p.gradient_plane_rows != 0)
        write_gradients_channel_major<T, L, true>(p, sh);
    else
        write_gradients_channel_major<T, L, false>(p, sh);
}

GRADIENT_KERNEL(multibox_gradient_f32_i32) { write_gradients_rows<float, i32>(p); }
GRADIENT_KERNEL(multibox_gradient_f32_i64) { write_gradients_rows<float, i64>(p); }
GRADIENT_KERNEL(multibox_gradient_f16_i32) { write_gradients_rows<f16, i32>(p); }
GRADIENT_KERNEL(multibox_gradient_f16_i64) { write_gradients_rows<f16, i64>(p); }
GRADIENT_KERNEL(multibox_gradient_bf16_i32) { write_gradients_rows<bf16, i32>(p); }
GRADIENT_KERNEL(multibox_gradient_bf16_i64) { write_gradients_rows<bf16, i64>(p); }
GRADIENT_KERNEL(multibox_gradient_channel_major_f32_i32) { write_gradients_planes<float, i32>(p); }
GRADIENT_KERNEL(multibox_gradient_channel_major_f32_i64) { write_gradients_planes<float, i64>(p); }
GRADIENT_KERNEL(multibox_gradient_channel_major_f16_i32) { write_gradients_planes<f16, i32>(p); }
GRADIENT_KERNEL(multibox_gradient_channel_major_f16_i64) { write_gradients_planes<f16, i64>(p); }
GRADIENT_KERNEL(multibox_gradient_channel_major_bf16_i32) { write_gradients_planes<bf16, i32>(p); }
GRADIENT_KERNEL(multibox_gradient_channel_major_bf16_i64) { write_gradients_planes<bf16, i64>(p); }

// Kernel 1 of 3: one pass over every prior's logits.
//
// For each row it computes the log-sum-exp (f32, row maximum subtracted) and
// writes the mining key: the background loss lse - x[0] for a negative
// candidate, a marker for positives and ignored priors. Positives write
// their cross-entropy and smooth-L1 terms, which kernel 2 adds up per image.
// Nothing here needs the divisor (N, n, or per image), so nothing waits: the
// gradients, which do, are written by kernel 3.
//
// Blocks walk tiles of `tile_rows` rows. Row-major, a tile is consecutive
// rows, whose logits are one contiguous range: the block copies it into
// shared memory with 16-byte loads, four in flight per thread. Channel-major,
// a tile is `tile_rows` consecutive priors of one image: the block copies
// each class plane's run of them, transposing into rows on the way, with
// lanes across priors so that every request is contiguous. The tile's labels
// come with it. The lane groups then read their rows from shared memory for
// both passes of row_stats (max, then sum of exp). The logits are read from
// DRAM once, in whole sectors, whatever C is. The arithmetic is row_stats',
// per row, in the same order for both layouts, so the keys, and with them
// the mined set, are bit for bit the same whatever the layout or the tiling.
// Rows too long for a tile in shared memory (the plan says tile_rows == 0)
// are read from global memory.
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

// Channel-major counterpart of stage_tile: `count` priors of each of the
// `classes` class planes of one image (`plane` elements apart in global
// memory) into rows of `stride` elements in shared memory, so that the
// tile is read back as [prior][class * stride]. A warp copies one plane's
// run of priors at a time: each request covers consecutive priors.
template <typename T>
__device__ __forceinline__ void stage_planes(T* dst, u32 stride, const T* src, u64 plane, u32 classes, u32 count) {
    const u32 lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    for (u32 c = warp; c < classes; c += ROW_THREADS / WARP)
        for (u32 i = lane; i < count; i += WARP) dst[c * stride + i] = src[c * plane + i];
}

// One tile of kernel 1: `count` consecutive rows from global row `first`,
// whose class c of tile row r is x[r * row_stride + c * class_stride]
// (from `x`, in shared memory once staged), and whose boxes are `boxes`
// with the same strides over 4 coordinates.
struct Tile {
    u64 first;
    u32 count;
    u64 box_first;   // element offset of the first row's first coordinate
    u64 box_row;     // elements between two rows' boxes
    u64 box_coord;   // elements between two coordinates of a box
};

// Row-major tiles are `tile_rows` consecutive rows anywhere in the batch;
// channel-major tiles stay in one image (its priors are contiguous in
// each class plane), `tile_rows` priors from prior `p0`.
__device__ __forceinline__ Tile tile_at(const MultiboxParams& p, u64 t, u32 tile_rows, u64 rows) {
    Tile tile;
    if (p.layout == LAYOUT_ROW_MAJOR) {
        tile.first = t * tile_rows;
        tile.count = u32(rows - tile.first < tile_rows ? rows - tile.first : tile_rows);
        tile.box_first = tile.first * 4;
        tile.box_row = 4;
        tile.box_coord = 1;
    } else {
        const u32 per_image = (p.priors + tile_rows - 1) / tile_rows;
        const u64 image = t / per_image;
        const u32 p0 = u32(t % per_image) * tile_rows;
        tile.first = image * p.priors + p0;
        tile.count = p.priors - p0 < tile_rows ? p.priors - p0 : tile_rows;
        tile.box_first = image * 4 * p.priors + p0;
        tile.box_row = 1;
        tile.box_coord = p.priors;
    }
    return tile;
}

template <typename T, typename L> __device__ void mining_keys_and_positive_terms(const MultiboxParams& p) {
    __shared__ u32 status_scratch[ROW_THREADS / WARP];
    __shared__ i64 tile_labels[ROW_THREADS];
    __shared__ u32 tile_keys[ROW_THREADS];
    MB_DYNAMIC_SHARED(unsigned char, staged);
    const T* confidence = static_cast<const T*>(p.confidence);
    const T* pred = static_cast<const T*>(p.predicted_locations);
    const T* gt = static_cast<const T*>(p.gt_locations);
    const u32 lanes = p.lanes_per_row;
    const u32 sub = threadIdx.x % lanes;
    const u32 rows_per_step = ROW_THREADS / lanes;
    const u64 rows = u64(p.batch) * p.priors;
    const bool staging = p.tile_rows != 0;
    const bool channel_major = p.layout == LAYOUT_CHANNEL_MAJOR;
    const u32 tile_rows = staging ? p.tile_rows : rows_per_step;
    const u64 tiles = channel_major ? u64(p.batch) * ((p.priors + tile_rows - 1) / tile_rows)
                                    : (rows + tile_rows - 1) / tile_rows;
    // Channel-major classes in shared memory are an odd number of 4-byte
    // words apart (tile_rows, a multiple of 8, plus one f32 or two halves),
    // so that the lanes of a group, reading consecutive classes of one
    // prior, fall into different banks. The plan counts tile_rows + 1
    // elements of 4 bytes per class.
    const u32 staged_stride = tile_rows + (sizeof(T) == 4 ? 1u : 2u);

    // Kernel 2 counts its finished blocks here; it runs after this kernel.
    if (blockIdx.x == 0 && threadIdx.x == 0) p.totals->images_done = 0;

    u32 status = 0;
    for (u64 t = blockIdx.x; t < tiles; t += gridDim.x) {
        const Tile tile = tile_at(p, t, tile_rows, rows);
        // Class c of tile row r is x[r * row_stride + c * class_stride].
        const T* x0;
        u64 row_stride, class_stride;
        if (!channel_major) {
            x0 = confidence + tile.first * p.classes;
            row_stride = p.classes;
            class_stride = 1;
        } else {
            const u64 image = tile.first / p.priors, p0 = tile.first % p.priors;
            x0 = confidence + image * p.classes * p.priors + p0;
            row_stride = 1;
            class_stride = p.priors;
        }
        if (staging) {
            T* copy;
            if (!channel_major) {
                // At the same offset within a 16-byte line as in global memory.
                copy = reinterpret_cast<T*>(staged + (u64(x0) & 15u));
                stage_tile(copy, x0, u64(tile.count) * p.classes);
            } else {
                // Transposed on the way: row r, class c at copy[r + c * stride].
                copy = reinterpret_cast<T*>(staged);
                stage_planes(copy, staged_stride, x0, p.priors, p.classes, tile.count);
                class_stride = staged_stride;
            }
            if (threadIdx.x < tile.count) tile_labels[threadIdx.x] = load_label<L>(p.labels, tile.first + threadIdx.x);
            __syncthreads();  // the tile and its labels are in shared memory
            x0 = copy;
        }
        // Every lane walks the same number of steps, so the group shuffles
        // always find all 32 lanes; rows past the tile are inactive.
        for (u32 step = 0; step < tile.count; step += rows_per_step) {
            const u32 r = step + threadIdx.x / lanes;
            const u64 row = tile.first + r;
            const bool in_range = r < tile.count;
            i64 label = !in_range ? -1 : staging ? tile_labels[r] : load_label<L>(p.labels, row);
            if (label < -1 || label >= i64(p.classes)) {
                // Never index with it: count the prior as ignored and flag the call.
                status |= STATUS_INVALID_LABEL;
                label = -1;
            }
            const bool active = label >= 0;
            const T* x = x0 + u64(r) * row_stride;
            bool nonfinite = false;
            const RowStats stats = row_stats(x, class_stride, p.classes, sub, lanes, active, label, &nonfinite);
            if (nonfinite) status |= STATUS_NONFINITE_INPUT;
            if (sub != 0) continue;  // the group's first lane writes the row's results
            if (!active) {
                if (in_range) tile_keys[r] = KEY_IGNORED;
                continue;
            }
            // row_stats left class `label` out of sum_exp_others: the loss of
            // the background class for a candidate, of the object class for a positive.
            const float loss = stats.loss_of_skipped(to_f32(x[u64(label) * class_stride]));
            if (label == 0) {
                tile_keys[r] = candidate_key(loss);
                continue;
            }
            tile_keys[r] = KEY_POSITIVE;
            PositiveTerms terms;
            terms.cross_entropy = loss;
            terms.regression = 0.0f;
            const u64 box = tile.box_first + r * tile.box_row;
            float a[4], b[4];
            load_box(pred + box, tile.box_coord, a);
            load_box(gt + box, tile.box_coord, b);
            for (u32 j = 0; j < 4; ++j) {
                const float d = a[j] - b[j];
                if (!isfinite(d)) status |= STATUS_NONFINITE_INPUT;
                terms.regression += smooth_l1(d, p.beta);
            }
            p.terms[row] = terms;
        }
        // Every row of the tile is done (and the staged tile read): the keys
        // go out in one contiguous store per warp, not one 4-byte store per
        // row from the first lane of its group.
        __syncthreads();
        if (threadIdx.x < tile.count) p.keys[tile.first + threadIdx.x] = tile_keys[threadIdx.x];
        // Staged, the next tile's staging barrier orders this read before
        // its rows rewrite tile_keys; unstaged, nothing else does.
        if (!staging) __syncthreads();
    }

    status = block_or<ROW_THREADS>(status, status_scratch);
    if (threadIdx.x == 0) p.block_status[blockIdx.x] = status;
}

MB_KERNEL(multibox_rows_f32_i32, MultiboxParams, ROW_THREADS) { mining_keys_and_positive_terms<float, i32>(p); }
MB_KERNEL(multibox_rows_f32_i64, MultiboxParams, ROW_THREADS) { mining_keys_and_positive_terms<float, i64>(p); }
MB_KERNEL(multibox_rows_f16_i32, MultiboxParams, ROW_THREADS) { mining_keys_and_positive_terms<f16, i32>(p); }
MB_KERNEL(multibox_rows_f16_i64, MultiboxParams, ROW_THREADS) { mining_keys_and_positive_terms<f16, i64>(p); }
MB_KERNEL(multibox_rows_bf16_i32, MultiboxParams, ROW_THREADS) { mining_keys_and_positive_terms<bf16, i32>(p); }
MB_KERNEL(multibox_rows_bf16_i64, MultiboxParams, ROW_THREADS) { mining_keys_and_positive_terms<bf16, i64>(p); }

// Kernel 2 of 3: per image, choose the hard negatives by radix select; then
// the last block to finish adds up the losses.
//
// Top-k by radix select instead of sorting: the reference sorts the
// background losses twice (argsort of argsort) to rank them; we only need to
// know, per image, which candidates are among the k largest. Keys are u32
// (see multibox.cuh), examined 11 bits at a time from the top: count the
// candidates per digit into a shared histogram, find the digit where the
// k-th largest lies, keep only keys with that prefix, repeat. 11 + 11 + 10
// bits resolve a key in at most 3 passes over the image's keys (which sit in
// L2 after kernel 1), with a 2048-bucket histogram that fits shared memory
// easily; 8-bit digits would need 4 passes, 16-bit ones a 256 KiB histogram.
// The first pass is also the one that counts the image's positives and
// candidates, which k needs.
// The first pass reads the keys from global memory, LOADS of them a thread
// before it counts any, so that their L2 round trips overlap; where an
// image's keys fit (select_shared_bytes: up to 9,984 priors), it also
// leaves them in shared memory, and every later pass (up to two more
// digits, the tie search, the mask and the sums) reads them there: each step of those
// loops waits on a load before its warp collectives, so a step costs a
// shared-memory round trip instead of an L2 one.
// A pass ends the search early when the chosen bucket holds exactly the keys
// still needed. What remains are ties with the k-th key itself; they go to
// the lowest prior indices, as a stable descending sort would order them, so
// the result is a threshold key and a tie cutoff per image: no index list,
// no sort.
#include "multibox.cuh"

constexpr int SELECT_THREADS = 512;
constexpr u32 LOADS = 4;  // keys a thread loads at once (load_chunk)
constexpr int DIGIT_BITS = 11;
constexpr u32 BUCKETS = 1u << DIGIT_BITS;
constexpr u32 BUCKETS_PER_THREAD = BUCKETS / SELECT_THREADS;

constexpr int SELECT_WARPS = SELECT_THREADS / WARP;

// What the block adds up, each in one block_reduce: an image's counts, which
// k needs; its loss sums; and, in the last block, the batch's.
struct ImageCounts {
    u32 positives, candidates;
};
struct ImageSums {
    float negative_ce, positive_ce, regression;
};
struct BatchSums {
    u32 num_pos, status;
    float regression, classification;
};

struct SelectShared {
    u32 histogram[BUCKETS];
    union {  // one use at a time: each ends with a barrier
        u32 scan[SELECT_WARPS + 1];
        ImageCounts counts[SELECT_WARPS];
        ImageSums sums[SELECT_WARPS];
        BatchSums batch[SELECT_WARPS];
    } scratch;
    u32 digit;
    u32 above;  // keys with the current prefix and a larger digit
    i32 tie_cutoff;
    u32 is_last;
};

// Adds one to histogram[bucket] for each lane where `counted`; all 32
// lanes of the warp call it. An image's keys crowd into few buckets (the
// background losses of most priors share their exponent, the top bits of
// the key), and shared atomics on one address serialise. So up to
// GROUPED_BUCKETS times, the lanes in the first remaining lane's bucket add
// theirs with one atomic; lanes left after that (keys spread over many
// buckets, as in the later passes) add theirs one by one, on addresses
// that mostly differ.
constexpr int GROUPED_BUCKETS = 4;

__device__ __forceinline__ void count_in_warp(u32* histogram, u32 bucket, bool counted) {
    const u32 lane = threadIdx.x % WARP;
    u32 remaining = __ballot_sync(FULL_MASK, counted);
    for (int round = 0; round < GROUPED_BUCKETS && remaining != 0; ++round) {
        const int leader = __ffs(int(remaining)) - 1;
        const u32 leader_bucket = __shfl_sync(FULL_MASK, bucket, leader);
        const u32 peers = __ballot_sync(FULL_MASK, (remaining >> lane & 1u) && bucket == leader_bucket);
        if (lane == u32(leader)) atomicAdd(&histogram[leader_bucket], u32(__popc(peers)));
        remaining &= ~peers;
    }
    if (remaining >> lane & 1u) atomicAdd(&histogram[bucket], 1u);
}

// Adds to the histogram the digit at `shift` (`digit_mask` wide) of every
// candidate key whose bits above the digit equal `prefix`.
__device__ void count_digits(const u32* keys, u32 n, u32 prefix, u32 prefix_mask, u32 shift, u32 digit_mask,
                             u32* histogram) {
    for (u32 b = threadIdx.x; b < BUCKETS; b += SELECT_THREADS) histogram[b] = 0;
    __syncthreads();
    // Every thread walks the same steps: count_in_warp needs whole warps.
    for (u32 base = 0; base < n; base += SELECT_THREADS) {
        const u32 i = base + threadIdx.x;
        const u32 key = i < n ? keys[i] : KEY_IGNORED;
        const bool counted = is_candidate(key) && (key & prefix_mask) == prefix;
        count_in_warp(histogram, (key >> shift) & digit_mask, counted);
    }
    __syncthreads();
}

// Finds the digit d holding the `remaining`-th largest key: fewer than
// `remaining` keys have a larger digit, at least `remaining` have d or larger.
// Each thread owns BUCKETS_PER_THREAD consecutive buckets counted from the
// top; a block scan of the per-thread totals tells each thread how many
// keys lie above its buckets.
__device__ void find_digit(SelectShared& sh, u32 remaining) {
    u32 counts[BUCKETS_PER_THREAD];
    u32 local = 0;
    for (u32 j = 0; j < BUCKETS_PER_THREAD; ++j) {
        counts[j] = sh.histogram[BUCKETS - 1 - (threadIdx.x * BUCKETS_PER_THREAD + j)];
        local += counts[j];
    }
    u32 total;
    u32 above = block_exclusive_scan<SELECT_THREADS>(local, sh.scratch.scan, &total);
    for (u32 j = 0; j < BUCKETS_PER_THREAD; ++j) {
        if (above < remaining && above + counts[j] >= remaining) {
            sh.digit = BUCKETS - 1 - (threadIdx.x * BUCKETS_PER_THREAD + j);
            sh.above = above;
        }
        above += counts[j];
    }
    __syncthreads();
}

// The prior index of the `rank`-th (1-based) key equal to `key`, in index order.
__device__ i32 nth_tie(SelectShared& sh, const u32* keys, u32 n, u32 key, u32 rank) {
    u32 seen = 0;
    for (u32 base = 0; base < n; base += SELECT_THREADS) {
        const u32 i = base + threadIdx.x;
        const u32 tie = i < n && keys[i] == key;
        u32 in_chunk;
        const u32 before = block_exclusive_scan<SELECT_THREADS>(tie, sh.scratch.scan, &in_chunk);
        if (tie && seen + before + 1 == rank) sh.tie_cutoff = i32(i);
        seen += in_chunk;  // the same on every thread, so the exit is uniform
        if (seen >= rank) break;
    }
    __syncthreads();
    return sh.tie_cutoff;
}

// Chooses the k largest candidate keys of one image. The histogram of the
// first digit over every candidate is already in `sh.histogram`.
__device__ ImageSelection select_top_k(SelectShared& sh, const u32* keys, u32 n, u32 k, u32 candidates) {
    ImageSelection s;
    s.tie_cutoff = -1;
    if (k == 0) {  // nothing: no key exceeds the largest
        s.threshold = KEY_NAN;
        return s;
    }
    if (k >= candidates) {  // everything: every candidate exceeds this
        s.threshold = KEY_CANDIDATE - 1;
        return s;
    }
    u32 prefix = 0, prefix_mask = 0, remaining = k;
    const u32 shifts[3] = {32 - DIGIT_BITS, 32 - 2 * DIGIT_BITS, 0};
    const u32 widths[3] = {DIGIT_BITS, DIGIT_BITS, 32 - 2 * DIGIT_BITS};
    for (int pass = 0; pass < 3; ++pass) {
        const u32 shift = shifts[pass], digit_mask = (1u << widths[pass]) - 1u;
        if (pass > 0) count_digits(keys, n, prefix, prefix_mask, shift, digit_mask, sh.histogram);
        find_digit(sh, remaining);
        const u32 digit = sh.digit, in_bucket = sh.histogram[digit];
        remaining -= sh.above;
        prefix |= digit << shift;
        prefix_mask |= digit_mask << shift;
        __syncthreads();  // everyone has read sh before the next pass rewrites it
        if (in_bucket == remaining) {
            // The whole bucket is taken: every key >= its smallest key.
            s.threshold = prefix - 1;
            return s;
        }
    }
    // The full key is known and more keys equal it than are still needed.
    s.threshold = prefix;
    s.tie_cutoff = nth_tie(sh, keys, n, prefix, remaining);
    return s;
}

// Another block's selection, read past this SM's L1 (which may hold a
// stale copy) in two 16-byte halves.
__device__ __forceinline__ ImageSelection load_image(const ImageSelection* at) {
    struct Half { u32 w[4]; };
    const Half* halves = reinterpret_cast<const Half*>(at);
    const Half lo = load_global_coherent(halves), hi = load_global_coherent(halves + 1);
    ImageSelection s;
    copy_bytes(&s, &lo, 16);
    copy_bytes(reinterpret_cast<unsigned char*>(&s) + 16, &hi, 16);
    return s;
}

// The passes that wait on L2 (the first, for the keys, and the one that adds
// up the sums, for the positives' terms) take an image's priors in chunks
// of LOADS a thread: thread t's j-th prior of the chunk at `base` is
// base + j * SELECT_THREADS + t, so a warp's loads for one j are contiguous.
__device__ __forceinline__ u32 chunk_prior(u32 base, u32 j) { return base + j * SELECT_THREADS + threadIdx.x; }

// A thread's LOADS keys of the chunk at `base` (KEY_IGNORED past the end),
// all loads issued before any key is used, so their round trips overlap.
__device__ __forceinline__ void load_chunk(const u32* keys, u32 n, u32 base, u32 (&key)[LOADS]) {
#pragma unroll
    for (u32 j = 0; j < LOADS; ++j) {
        const u32 i = chunk_prior(base, j);
        key[j] = i < n ? keys[i] : KEY_IGNORED;
    }
}

__device__ void select_and_reduce(const MultiboxParams& p) {
    __shared__ SelectShared sh;
    MB_DYNAMIC_SHARED(u32, staged_keys);  // the image's keys, where they fit
    const u32 image = blockIdx.x;
    const u32 n = p.priors;
    const bool staged = p.select_staged_keys != 0;
    const u32* const image_keys = p.keys + u64(image) * n;

    // One read of the keys counts the positives and candidates (k needs
    // them), builds the first radix pass's histogram over all candidates
    // and, staged, copies them to shared memory.
    for (u32 b = threadIdx.x; b < BUCKETS; b += SELECT_THREADS) sh.histogram[b] = 0;
    __syncthreads();
    ImageCounts counts{0, 0};
    for (u32 base = 0; base < n; base += LOADS * SELECT_THREADS) {  // whole warps, for count_in_warp
        u32 key[LOADS];
        load_chunk(image_keys, n, base, key);
#pragma unroll
        for (u32 j = 0; j < LOADS; ++j) {
            const u32 i = chunk_prior(base, j);
            if (staged && i < n) staged_keys[i] = key[j];
            counts.positives += key[j] == KEY_POSITIVE;
            counts.candidates += is_candidate(key[j]);
            count_in_warp(sh.histogram, key[j] >> (32 - DIGIT_BITS), is_candidate(key[j]));
        }
    }
    // The reduction's barriers also complete the histogram and the staged keys.
    counts = block_reduce<SELECT_THREADS>(counts, sh.scratch.counts, [](ImageCounts a, ImageCounts b) {
        return ImageCounts{a.positives + b.positives, a.candidates + b.candidates};
    });
    const u32 positives = counts.positives, candidates = counts.candidates;
    const u32* const keys = staged ? staged_keys : image_keys;

    // k = min(max(floor(ratio * pos), min_neg), candidates), as in
    // MultiboxConfig::negatives_to_mine.
    u64 k = floor_ratio_times(p.neg_pos_ratio, positives);
    if (k < p.min_negatives) k = p.min_negatives;
    if (k > candidates) k = candidates;

    ImageSelection s = select_top_k(sh, keys, n, u32(k), candidates);
    s.num_pos = positives;

    // The mined negatives' cross-entropy is their background loss, which the
    // key holds exactly; the positives' terms are where kernel 1 left them.
    // Add up the image's sums here, and write the mask on the way. A
    // thread reads LOADS keys, then its positives' terms (from L2), before it
    // adds any, so the round trips overlap instead of stalling each step
    // that holds a positive; it still adds its priors in index order.
    const PositiveTerms* terms = p.terms + u64(image) * n;
    u8* const mask = p.mask ? p.mask + u64(image) * n : nullptr;
    ImageSums sums{0.0f, 0.0f, 0.0f};
    for (u32 base = 0; base < n; base += LOADS * SELECT_THREADS) {
        u32 key[LOADS];
        load_chunk(keys, n, base, key);
        PositiveTerms t[LOADS];
#pragma unroll
        for (u32 j = 0; j < LOADS; ++j)
            t[j] = key[j] == KEY_POSITIVE ? terms[chunk_prior(base, j)] : PositiveTerms{0.0f, 0.0f};
#pragma unroll
        for (u32 j = 0; j < LOADS; ++j) {
            const u32 i = chunk_prior(base, j);
            const bool mined = is_mined(s, key[j], i);
            if (mined) sums.negative_ce += key_loss(key[j]);
            if (key[j] == KEY_POSITIVE) {
                sums.positive_ce += t[j].cross_entropy;
                sums.regression += t[j].regression;
            }
            if (mask && i < n) mask[i] = u8(mined || key[j] == KEY_POSITIVE);
        }
    }
    sums = block_reduce<SELECT_THREADS>(sums, sh.scratch.sums, [](ImageSums a, ImageSums b) {
        return ImageSums{a.negative_ce + b.negative_ce, a.positive_ce + b.positive_ce, a.regression + b.regression};
    });
    s.negative_ce = sums.negative_ce;
    s.positive_ce = sums.positive_ce;
    s.regression = sums.regression;
    s.unused[0] = s.unused[1] = 0;
    if (threadIdx.x == 0) p.images[image] = s;

    // The last block to get here sums every image's terms and every row
    // block's status, in index order, and divides by the normaliser's
    // divisor on the device (reading a device-side n here): no host
    // round-trip, and no float atomics, so the losses are bit-identical run
    // after run. Thread 0 wrote this image's selection: its fence releases
    // it before the arrival count; the last block's thread 0 fences again
    // to acquire the others', and the barrier passes that on to every thread.
    if (threadIdx.x == 0) {
        __threadfence();
        sh.is_last = atomicAdd(&p.totals->images_done, 1u) == gridDim.x - 1;
        if (sh.is_last) __threadfence();
    }
    __syncthreads();
    if (!sh.is_last) return;

    // Per image in index order, then over the block in a fixed order. Under
    // NORMALIZER_PER_IMAGE each image's sums are divided by B * pos_b first.
    const bool per_image = p.normalizer_kind == NORMALIZER_PER_IMAGE;
    BatchSums batch{0u, 0u, 0.0f, 0.0f};
    for (u32 b = threadIdx.x; b < p.batch; b += SELECT_THREADS) {
        const ImageSelection img = load_image(p.images + b);
        batch.num_pos += img.num_pos;
        const float cls = img.positive_ce + img.negative_ce;
        if (per_image) {
            const float d = row_divisor(NORMALIZER_PER_IMAGE, 0.0f, p.batch, img.num_pos);
            batch.regression += divide_or_zero(img.regression, d);
            batch.classification += divide_or_zero(cls, d);
        } else {
            batch.regression += img.regression;
            batch.classification += cls;
        }
    }
    for (u32 r = threadIdx.x; r < p.row_blocks; r += SELECT_THREADS)
        batch.status |= load_global_coherent(p.block_status + r);
    batch = block_reduce<SELECT_THREADS>(batch, sh.scratch.batch, [](BatchSums a, BatchSums b) {
        return BatchSums{a.num_pos + b.num_pos, a.status | b.status, a.regression + b.regression,
                         a.classification + b.classification};
    });
    if (threadIdx.x == 0) {
        // The batch's divisor: N == 0 and n <= 0 make both losses 0, not
        // 0 / 0; a non-finite n makes them NaN.
        float divisor = 1.0f;  // per image: the division is done
        if (p.normalizer_kind == NORMALIZER_POSITIVES) {
            divisor = float(batch.num_pos);
        } else if (p.normalizer_kind == NORMALIZER_GIVEN) {
            const float n = p.normalizer ? *p.normalizer : p.normalizer_value;
            divisor = !isfinite(n) ? f32_from_bits(0x7fc00000u) : n > 0.0f ? n : 0.0f;
        }
        float reg = divide_or_zero(batch.regression, divisor);
        float cls = divide_or_zero(batch.classification, divisor);
        if (batch.status & STATUS_INVALID_LABEL) {
            // A step with a bad label must not train: NaN makes loss scalers skip it.
            reg = f32_from_bits(0x7fc00000u);
            cls = reg;
        }
        *p.regression_loss = reg;
        *p.classification_loss = cls;
        *p.num_pos = i32(batch.num_pos);
        Totals t;
        t.images_done = 0;
        t.num_pos = batch.num_pos;
        t.status = batch.status;
        t.normalizer_kind = p.normalizer_kind;
        t.divisor = divisor;
        t.forward_stamp = p.forward_stamp;
        t.unused[0] = t.unused[1] = 0;
        *p.totals = t;
    }
}

// Three blocks an SM, so at most 40 registers (a warp's are allocated 256
// at a time; sm_90 takes 38): at SSD300's 8,732 priors a block's staged
// keys and histogram (43 KiB) fit five times in an H100 SM's shared memory,
// so registers set the limit, and three blocks run 396 images in one wave
// on 132 SMs where two would run 264.
MB_KERNEL_BLOCKS(multibox_select, MultiboxParams, SELECT_THREADS, 3) { select_and_reduce(p); }

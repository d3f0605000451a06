// Kernel 1 of 3: one pass over every prior's logits.
//
// For each row it computes the log-sum-exp and writes the mining key: the
// background loss lse - x[0] for a negative candidate, a marker for
// positives and ignored priors. Positives write their cross-entropy and
// smooth-L1 terms, which kernel 2 adds up per image. Nothing here needs the
// divisor (N, n, or per image), so nothing waits: the gradients, which do,
// are written by kernel 3.
//
// Blocks walk tiles of one step of the lane groups, ROW_THREADS /
// lanes_per_row rows. Row-major, a tile is consecutive rows, whose logits
// are one contiguous range: the block copies it into shared memory with
// 16-byte loads, four in flight per thread. Channel-major, a tile is
// consecutive priors of one image: a warp copies each class plane's run of
// them with 16-byte loads, into shared planes spaced so that each keeps its
// offset within 16 bytes (the plan's plane_stride), whatever P is.
// The copy also checks every logit for NaN and infinity, and the tile's
// labels come with it. The logits are read from DRAM once, in whole
// sectors, whatever C is. Rows too long for a tile (the plan says
// tile_rows == 0) are read from global memory.
//
// The arithmetic (RowSums) is the same for every path: one pass over the
// row, the sum of its exponentials shifted by its own logit (a second try
// against its maximum for the rare row where that overflows, or whose own
// logit is beyond 1.2e7 in magnitude), base-2 exponentials on the
// special-function unit with log2(e) folded into one fma, each lane of a
// row's group over its own contiguous run of classes in class order, and
// the group's partial sums added by a fixed xor tree.
// The sum leaves out the row's own class (its label; the background for a
// negative), whose term is kept apart: the loss is log1p(others / e_own),
// and a confident row's small loss keeps its relative precision. A staged
// row-major row is read with 16-byte shared loads, 4 or 8 classes at a
// time, and a channel-major one a class at a time: two neighbouring priors'
// elements a load where the planes are 2-element aligned, element by
// element where not. All add the same terms in the same order, so the
// keys, and with them the mined set, are bit for bit the same whatever the
// layout, the tiling or the alignment of the logits.
#include "multibox.cuh"

__device__ __forceinline__ float smooth_l1(float d, float beta) {
    const float a = fabsf(d);
    return a < beta ? 0.5f * d * d / beta : a - 0.5f * beta;
}

// ---------------------------------------------------------------------------
// The log-sum-exp of a row, in base 2 with an integer shift:
//   e_c = 2^(x_c log2(e) - shift) = exp(x_c - shift ln 2),
//   shift = rint(x_k * log2(e)),   lse = shift ln 2 + log(sum_c e_c),
// with x_k the row's own logit (its label's, the background's for a
// negative). It is within a unit of log2 of the own term, so the
// terms neither all underflow nor, checked, overflow, and one fma per
// class computes the exponent: its only rounding is relative to the
// result, and an error in the shift scales every term alike, which
// log1p(rest / e) cancels. That holds while x_k log2(e) is below 2^24:
// beyond, the product's own rounding (half its ulp, 2^8 at 2^32) moves the
// shift so far from x_k log2(e) that the own term itself over- or
// underflows. Such a row (|x_k| above about 1.2e7), and the rare row whose
// sum overflows at its own shift, take a second try against the row's
// maximum m instead (own_or_max_shift):
//   e_c = 2^((x_c - m) log2(e)),   lse = m + log(sum_c e_c),
// an exact difference wherever the term is not negligible, whatever the
// logits' magnitude.

constexpr float LOG2E = 1.44269504088896341f;
// ln 2 in two parts: shift * LN2_HI is exact for |shift| < 2^9, and beyond
// that rounded at the scale of the loss itself.
constexpr float LN2_HI = 0.693145751953125f;
constexpr float LN2_LO = 1.42860682030941723e-6f;
// The most a row's sum of other terms may be at the own logit's shift:
// its loss divides it by the own term, at least 2^-0.75 there (see
// NEAR_LIMIT), and 2^127.75 is still finite.
constexpr float SUM_LIMIT = 0x1p127f;
// The first try's bound on |x_k log2(e)|: below it the product's rounding
// to f32 is at most a quarter of a unit (below 2^23) or half of one (an
// integer already), so the own term stays within 2^+-0.75 and a sum below
// SUM_LIMIT divided by it is still finite.
constexpr float NEAR_LIMIT = 0x1p24f;

// A class's term at a row's integer shift: the first try, one fma.
struct AtShift {
    float shift;
    __device__ __forceinline__ float operator()(float x) const { return exp2_approx(fmaf(x, LOG2E, -shift)); }
};
// A class's term against the row's maximum m: the second try. The
// difference first, rounded relative to itself (exact for x within a
// factor 2 of m), so that the magnitude of the logits never enters; one
// instruction more a class than the first try, in a rare pass.
struct FromMax {
    float m;
    __device__ __forceinline__ float operator()(float x) const { return exp2_approx((x - m) * LOG2E); }
};

// A row's log-sum-exp in two parts: the term of its own class (its label,
// the background for a negative) and the sum of the others. Summed apart,
// so that a confident row's small loss, log1p(others / e), keeps its
// relative precision: a sum that took in the own term (about 1 there) and
// took it out again would keep that term's rounding, about 6e-8 for each
// class added after it, next to a loss of 1e-4 or less.
struct RowSums {
    float shift;   // an integer: the first try's, 0 after a second try
    float m;       // the second try's maximum, 0 after a first try: lse = m + shift ln 2 + log(e + others)
    float others;  // sum of e_c over the classes but the own: each lane's in class order, then the group's xor tree
    float x;       // the own class's logit
    float e;       // and its term
};

// -log softmax[k] = lse - x_k, from its term e (of logit x) and `others`,
// the sum of every other class's. While e is well inside f32's normal
// range, log1p(others / e): the shift cancels, and a confident row's small
// loss (1e-9, say) keeps its relative precision, so mining still ranks such
// rows by their loss. Past that the loss is above 69: lse - x directly,
// with m + shift ln 2 - x formed before the rounding at the scale of shift
// (one of m and shift is 0).
__device__ __forceinline__ float loss_of(const RowSums& r) {
    if (r.e >= 0x1p-100f) return log1pf(r.others / r.e);
    return fmaf(r.shift, LN2_HI, r.m - r.x) + fmaf(r.shift, LN2_LO, logf(r.e + r.others));
}

// The chunk whose positions [lo, hi) are p[lo, hi), read element by
// element, and the rest -inf: the ends of a run in global memory, whose
// other bytes may lie outside the buffer.
template <typename T> __device__ __forceinline__ Chunk<T> gather(const T* p, u32 lo, u32 hi) {
    Chunk<T> c;
#pragma unroll
    for (u32 i = 0; i < 4; ++i) c.w[i] = Chunk<T>::PADDING;
#pragma unroll
    for (u32 j = 0; j < Chunk<T>::PER; ++j)
        if (j >= lo && j < hi) c.set(j, p[j]);
    return c;
}

// The chunk with positions outside [lo, hi) padded.
template <typename T> __device__ __forceinline__ Chunk<T> keep(Chunk<T> c, u32 lo, u32 hi) {
#pragma unroll
    for (u32 j = 0; j < Chunk<T>::PER; ++j)
        if (j < lo || j >= hi) c.pad(j);
    return c;
}

// Running maximum over chunks. Half types on sm_80 and later compare two
// elements per instruction (max.{bf16,f16}x2, which like fmaxf ignores a
// NaN); the maximum is one of the elements either way, so it is the same.
template <typename T> struct MaxOf {
    float m = NEG_INF;
    __device__ __forceinline__ void add(const Chunk<T>& c) {
#pragma unroll
        for (u32 j = 0; j < Chunk<T>::PER; ++j) m = fmaxf(m, c.at(j));
    }
    __device__ __forceinline__ float value() const { return m; }
};

#if MB_SM80
template <typename T> struct PackedMax {
    u32 m = u32(HALF_NEG_INF<T>) * 0x10001u;  // two halves
    __device__ __forceinline__ void add(const Chunk<T>& c) {
        const T* t = nullptr;
        m = max2(t, m, max2(t, max2(t, c.w[0], c.w[1]), max2(t, c.w[2], c.w[3])));
    }
    __device__ __forceinline__ float value() const {
        Chunk<T> c;
        c.w[0] = m;
        return fmaxf(c.at(0), c.at(1));
    }
};
template <> struct MaxOf<bf16> : PackedMax<bf16> {};
template <> struct MaxOf<f16> : PackedMax<f16> {};
#endif

// s plus the chunk's terms (AtShift or FromMax), in position order.
template <typename T, typename Term>
__device__ __forceinline__ float add_terms(const Chunk<T>& c, Term term, float s) {
#pragma unroll
    for (u32 j = 0; j < Chunk<T>::PER; ++j) s += term(c.at(j));
    return s;
}

// The classes lane `sub` of a group of `lanes` takes in a row: one
// contiguous run, [lo, hi), ceil(C / lanes) classes long (the last lanes'
// shorter or empty). Contiguous, so that a row-major lane reads its run
// with 16-byte loads from shared memory; by class index, not by address, so
// that every layout and alignment gives a lane the same classes.
struct ClassRun {
    u32 lo, hi;
};

__device__ __forceinline__ ClassRun lane_classes(u32 classes, u32 sub, u32 lanes) {
    const u32 per = (classes + lanes - 1) / lanes;
    ClassRun run;
    run.lo = sub * per < classes ? sub * per : classes;
    run.hi = classes - run.lo < per ? classes : run.lo + per;
    return run;
}

// Calls f on each 16-byte chunk that covers row[lo, hi), in order: the
// aligned chunks, the first and the last padded outside the run, and the
// first also over the run's first `skip` (0 or 1) elements. The middle
// chunks are 16-byte loads. So are the ends in a staged tile (STAGED),
// whose bytes around the run are all readable; in global memory the ends
// are read element by element, only within the run.
//
// PAIRS takes the middle two chunks an iteration, which halves the loop's
// own instructions (4 a chunk) but leaves an odd chunk to a second loop.
// The rows of a warp start at different offsets within 16 bytes, so their
// counts of middle chunks can differ by one, and a warp runs both loops
// whenever its lanes' counts differ in parity: at C = 21 in f16, one or two
// middle chunks, a pair plus a single instead of two singles. Worth it
// where f is cheap next to the loop's 4 instructions: the maximum (8 or 9
// a chunk, in a second try) and f32's sum (17), not the half types' sum
// (37, which the conversions double).
template <bool STAGED, bool PAIRS, typename T, typename F>
__device__ __forceinline__ void for_each_chunk(const T* row, u32 lo, u32 hi, u32 skip, F f) {
    if (lo >= hi) return;
    constexpr u32 PER = Chunk<T>::PER;
    const T* run = row + lo;
    const u32 head = u32(u64(run) & 15u) / u32(sizeof(T));  // run[0]'s position in chunks[0]
    // By pointer arithmetic, not through an integer, so that the compiler
    // still knows the run for shared memory.
    const uint4* chunks = reinterpret_cast<const uint4*>(run - head);
    const u32 end = head + (hi - lo);
    const u32 last = (end - 1) / PER;
    const auto end_chunk = [&](u32 k, u32 from, u32 to) {
        return STAGED ? keep(chunk_of<T>(chunks[k]), from, to) : gather(reinterpret_cast<const T*>(chunks + k), from, to);
    };
    f(end_chunk(0, head + skip, last == 0 ? end : PER));
    // The middle chunks, [1, last).
    u32 k = 1;
    if (PAIRS) {
        const u32 pairs_end = last > 0 ? last - 1 : 0;
#pragma unroll 1
        for (; k < pairs_end; k += 2) {
            const uint4 a = chunks[k], b = chunks[k + 1];
            f(chunk_of<T>(a));
            f(chunk_of<T>(b));
        }
    }
#pragma unroll 1
    for (; k < last; ++k) f(chunk_of<T>(chunks[k]));
    if (last > 0) f(end_chunk(last, 0, end - last * PER));
}

// A row's sums at its own logit's shift, rint(x_own log2(e)), and against
// its maximum where that fails. The own shift makes the own term about 1
// and needs no pass for the maximum, so a row is one pass: the sum of its
// other terms. Only a class some 88 above the own one makes a term of
// 2^127; a row whose sum reaches that (SUM_LIMIT), or is not finite, or
// whose own logit is too large for the shift (NEAR_LIMIT), takes a second
// try against its maximum after all: a pass for the maximum and a second
// sum, while every other row keeps its one pass. Whole warps run that
// second try (its shuffles need every lane), but a row's sums depend on
// its own logits alone, never on its neighbours', so every path and layout
// still gives the same bits. The first try's own term is between 2^-0.75
// and 2^0.75, the second's maximum term 1: the terms never all underflow,
// and log1p(others / e) cancels the shift either way.
//
// sums_at(terms, on, others): for each of the N rows a lane group walks
// together, the group's sum of that row's other terms, terms[j] (AtShift
// or FromMax) of each class, each lane's run in class order (every lane
// calls it; lanes with !on read nothing and add 0). run_max(on, m): this
// lane's maximum over its run of each row, -inf where !on. x_own[j]: row
// j's own logit, which every lane of the group has. A row's second try is
// its own: where only one of the N needs one, the others keep their first
// sums.
template <u32 N, typename Sums, typename Max>
__device__ __forceinline__ void own_or_max_shift(const float (&x_own)[N], u32 lanes, bool active, Sums sums_at,
                                                 Max run_max, RowSums (&out)[N]) {
    AtShift at_own[N];
    float others[N];
#pragma unroll
    for (u32 j = 0; j < N; ++j) at_own[j].shift = rintf(x_own[j] * LOG2E);
    sums_at(at_own, active, others);
    // Too large, infinite or NaN (a NaN logit, which the call reports):
    // the group's sum, so every lane of the group agrees.
    bool again[N], any = false;
#pragma unroll
    for (u32 j = 0; j < N; ++j) {
        again[j] = active && !(others[j] < SUM_LIMIT && fabsf(x_own[j] * LOG2E) < NEAR_LIMIT);
        any = any || again[j];
    }
#pragma unroll
    for (u32 j = 0; j < N; ++j) {
        out[j].shift = at_own[j].shift;
        out[j].m = 0.0f;
        out[j].others = others[j];
        out[j].x = x_own[j];
        out[j].e = active ? at_own[j](x_own[j]) : 0.0f;
    }
    if (__any_sync(FULL_MASK, any)) {
        float m[N], sums[N];
        run_max(any, m);
        FromMax at_max[N];
        // The own class counts in the maximum even where the tile has it -inf.
#pragma unroll
        for (u32 j = 0; j < N; ++j) at_max[j].m = fmaxf(group_max(m[j], lanes), x_own[j]);
        sums_at(at_max, any, sums);
#pragma unroll
        for (u32 j = 0; j < N; ++j) {
            if (again[j]) {
                out[j].shift = 0.0f;
                out[j].m = at_max[j].m;
                out[j].others = sums[j];
                out[j].e = at_max[j](x_own[j]);
            }
        }
    }
}

// own_or_max_shift of one row: sum_at(term, on) its group's sum of the
// other terms, run_max(on) this lane's maximum.
template <typename Sum, typename Max>
__device__ __forceinline__ RowSums own_or_max_shift(float x_own, u32 lanes, bool active, Sum sum_at, Max run_max) {
    const float x[1] = {x_own};
    RowSums r[1];
    const auto sums_at = [&](const auto& terms, bool on, float (&others)[1]) { others[0] = sum_at(terms[0], on); };
    const auto max_of = [&](bool on, float (&m)[1]) { m[0] = run_max(on); };
    own_or_max_shift(x, lanes, active, sums_at, max_of, r);
    return r[0];
}

// RowSums of a row-major row by a group of `lanes`, each lane reading its
// run of classes with 16-byte loads: from the staged tile (STAGED), or from
// global memory for rows too long for one. The own class `own`, whose
// logit `x_own` the caller read, is left out of the sum, so that
// each lane's part of `others` is its run's other terms in class order: a
// negative's (class 0) padded out of lane 0's first chunk, a positive's
// out of the staged tile by the caller (-inf, leave_out_own), or in global
// memory by walking the classes on either side of it apart (the chunk
// that holds it padded at each end: the same terms in the same order).
// Every lane of the group calls it (the shuffles need them); inactive rows
// read nothing.
template <bool STAGED, typename T>
__device__ __forceinline__ RowSums chunked_row_sums(const T* row, u32 classes, u32 own, float x_own, u32 sub,
                                                    u32 lanes, bool active) {
    const ClassRun run = lane_classes(classes, sub, lanes);
    // Where the walk stops short of a positive's own class in global memory.
    const u32 split = !STAGED && own != 0 && own >= run.lo && own < run.hi ? own : run.hi;
    const auto sum_at = [&](auto term, bool on) {
        float s = 0.0f;
        const auto add = [&](const Chunk<T>& c) { s = add_terms(c, term, s); };
        if (on) {
            for_each_chunk<STAGED, sizeof(T) == 4>(row, run.lo, split, own == 0 && run.lo == 0 ? 1u : 0u, add);
            if (!STAGED) for_each_chunk<STAGED, sizeof(T) == 4>(row, split + 1, run.hi, 0, add);
        }
        return group_sum(s, lanes);
    };
    const auto run_max = [&](bool on) {
        MaxOf<T> max;
        if (on) for_each_chunk<STAGED, true>(row, run.lo, run.hi, 0, [&](const Chunk<T>& c) { max.add(c); });
        return max.value();
    };
    return own_or_max_shift(x_own, lanes, active, sum_at, run_max);
}

// RowSums element by element, class c of the row at x[c * stride], each
// lane over its run of classes: the very terms of chunked_row_sums, in the
// same order, at the same shifts. The own class adds an exact 0 (staged,
// from the -inf that leave_out_own put there, or a 0 for a negative's
// class 0), as a position chunked_row_sums pads out does, or, read from
// global memory, is skipped: the sums are the same.
// Every lane of the group calls it; inactive rows read nothing.
template <bool STAGED, typename T>
__device__ __forceinline__ RowSums strided_row_sums(const T* x, u64 stride, u32 classes, u32 own, float x_own,
                                                    u32 sub, u32 lanes, bool active) {
    const ClassRun run = lane_classes(classes, sub, lanes);
    const auto sum_at = [&](auto term, bool on) {
        float s = 0.0f;
        if (on && STAGED) {
            // A positive's own class is -inf in the tile (leave_out_own).
            // Every lane reads the first class of its run in the same
            // step, lane 0 of a negative's group adding nothing for class
            // 0, so the lanes of a group stay a fixed number of planes
            // apart, which the plan's stride spreads over the banks
            // (rows_plane_stride).
            if (run.lo < run.hi) {
                const float first = term(to_f32(x[run.lo * stride]));
                s += own == 0 && run.lo == 0 ? 0.0f : first;
            }
#pragma unroll 16
            for (u32 c = run.lo + 1; c < run.hi; ++c) s += term(to_f32(x[c * stride]));
        } else if (on) {
            for (u32 c = own == 0 && run.lo == 0 ? 1 : run.lo; c < run.hi; ++c)
                if (c != own) s += term(to_f32(x[c * stride]));
        }
        return group_sum(s, lanes);
    };
    const auto run_max = [&](bool on) {
        float m = NEG_INF;
        if (on)
            for (u32 c = run.lo; c < run.hi; ++c) m = fmaxf(m, to_f32(x[c * stride]));
        return m;
    };
    return own_or_max_shift(x_own, lanes, active, sum_at, run_max);
}

// Two neighbouring priors' elements of a class plane, as one shared load:
// 4 bytes of two halves, or 8 of two f32 (LDS.64). Where a tile's planes
// are 2-element aligned (P even, the logits 2-element aligned), a thread
// that takes two neighbouring priors reads both with the load one of them
// took, and the address arithmetic and loop of an element are shared by
// two logits.
template <typename T> struct TwoOf {
    u32 w;
    __device__ __forceinline__ static TwoOf load(const T* p) {
        TwoOf t;
        t.w = *reinterpret_cast<const u32*>(p);
        return t;
    }
    __device__ __forceinline__ float at(u32 j) const {
        T h;
        h.bits = u16(j == 0 ? w : w >> 16);
        return to_f32(h);
    }
};
template <> struct TwoOf<float> {
    uint2 v;
    __device__ __forceinline__ static TwoOf load(const float* p) {
        TwoOf t;
        t.v = *reinterpret_cast<const uint2*>(p);
        return t;
    }
    __device__ __forceinline__ float at(u32 j) const { return f32_from_bits(j == 0 ? v.x : v.y); }
};

// The running maximum of two rows. The half types on sm_80 and later
// compare both rows' elements in one max.{bf16,f16}x2, as MaxOf does a
// chunk's: the maximum is one of the elements either way.
template <typename T> struct TwoMax {
    float m[2] = {NEG_INF, NEG_INF};
    __device__ __forceinline__ void add(const TwoOf<T>& x) {
        m[0] = fmaxf(m[0], x.at(0));
        m[1] = fmaxf(m[1], x.at(1));
    }
    __device__ __forceinline__ float value(u32 j) const { return m[j]; }
};
#if MB_SM80
template <typename T> struct PackedTwoMax {
    TwoOf<T> m = {u32(HALF_NEG_INF<T>) * 0x10001u};
    __device__ __forceinline__ void add(const TwoOf<T>& x) { m.w = max2(static_cast<const T*>(nullptr), m.w, x.w); }
    __device__ __forceinline__ float value(u32 j) const { return m.at(j); }
};
template <> struct TwoMax<bf16> : PackedTwoMax<bf16> {};
template <> struct TwoMax<f16> : PackedTwoMax<f16> {};
#endif

// Calls f on the pairs x[c * stride] for c in [lo, hi), in class order:
// whole rounds of UNROLL loads, which test no bound between them, then the
// rest one by one.
template <u32 UNROLL, typename T, typename F>
__device__ __forceinline__ void for_each_class_pair(const T* x, u32 stride, u32 lo, u32 hi, F f) {
    const T* q = x + lo * stride;
#pragma unroll 1
    for (u32 rounds = (hi - lo) / UNROLL; rounds != 0; --rounds, q += UNROLL * stride) {
        TwoOf<T> v[UNROLL];
#pragma unroll
        for (u32 k = 0; k < UNROLL; ++k) v[k] = TwoOf<T>::load(q + k * stride);
#pragma unroll
        for (u32 k = 0; k < UNROLL; ++k) f(v[k]);
    }
#pragma unroll 1
    for (u32 rest = (hi - lo) % UNROLL; rest != 0; --rest, q += stride) f(TwoOf<T>::load(q));
}

// strided_row_sums of a staged channel-major tile for two neighbouring
// priors at once, x at the first one's class 0 (2-element aligned): each
// lane of the pair's group over its run of classes, both rows' terms in
// the very order strided_row_sums adds them, so both rows get the same
// bits (own_or_max_shift's shifts, each row's second try its own). own[j],
// x_own[j]: row j's own class and its logit; its own class is -inf in the
// tile for a positive (leave_out_own), class 0 is left out of lane 0's
// first step for a negative. Every lane of the group calls it.
template <typename T>
__device__ __forceinline__ void paired_row_sums(const T* x, u32 stride, u32 classes, const u32 (&own)[2],
                                                const float (&x_own)[2], u32 sub, u32 lanes, bool active,
                                                RowSums (&out)[2]) {
    const ClassRun run = lane_classes(classes, sub, lanes);
    // Eight classes a round: eight loads in flight (8 registers, 16 in f32),
    // and the loop's own instructions shared by 16 logits. 0 spills on
    // every architecture at kernel 1's 64 registers (tests/kernel_build).
    constexpr u32 ROUND = 8;
    // Both rows' sums of their other terms, as strided_row_sums adds them.
    const auto sums_at = [&](const auto& terms, bool on, float (&others)[2]) {
        float s[2] = {0.0f, 0.0f};
        if (on && run.lo < run.hi) {
            const TwoOf<T> first = TwoOf<T>::load(x + run.lo * stride);
#pragma unroll
            for (u32 j = 0; j < 2; ++j) {
                const float t = terms[j](first.at(j));
                s[j] += own[j] == 0 && run.lo == 0 ? 0.0f : t;
            }
            for_each_class_pair<ROUND>(x, stride, run.lo + 1, run.hi, [&](const TwoOf<T>& v) {
#pragma unroll
                for (u32 j = 0; j < 2; ++j) s[j] += terms[j](v.at(j));
            });
        }
#pragma unroll
        for (u32 j = 0; j < 2; ++j) others[j] = group_sum(s[j], lanes);
    };
    const auto run_max = [&](bool on, float (&m)[2]) {
        TwoMax<T> max;
        if (on) for_each_class_pair<ROUND>(x, stride, run.lo, run.hi, [&](const TwoOf<T>& v) { max.add(v); });
#pragma unroll
        for (u32 j = 0; j < 2; ++j) m[j] = max.value(j);
    };
    own_or_max_shift(x_own, lanes, active, sums_at, run_max, out);
}

// -inf as a T: its term is an exact 0.
template <typename T> __device__ __forceinline__ T minus_infinity() {
    T t;
    t.bits = HALF_NEG_INF<T>;
    return t;
}
template <> __device__ __forceinline__ float minus_infinity<float>() { return NEG_INF; }

// A staged row's own class (its label; the background for a negative),
// read, and for a positive left out of the tile: -inf in its place, so
// that the row sums add the other classes directly, with no test in their
// loops (a negative's class 0 is left out of lane 0's first chunk or first
// class instead). Every lane of the group reads it, then (after a
// __syncwarp) the lane whose run holds it writes it; the caller's barrier
// then orders the write before every read of the tile, the 16-byte words
// of neighbouring rows' ends included, which may be another warp's (the
// pair walk reads nothing another lane wrote, and has none). Every lane of
// the warp calls it.
template <typename T>
__device__ __forceinline__ float leave_out_own(const T* own_element, u32 own, u32 classes, u32 sub, u32 lanes,
                                               bool active) {
    const float x = active ? to_f32(*own_element) : 0.0f;
    __syncwarp();
    const ClassRun run = lane_classes(classes, sub, lanes);
    // The tile is the block's own copy in shared memory.
    if (active && own != 0 && own >= run.lo && own < run.hi) *const_cast<T*>(own_element) = minus_infinity<T>();
    return x;
}

// Whether any element passed through is NaN or infinite: x * 0 + acc is
// NaN once any x was NaN or infinite, and stays so (for f32, and for half
// types on sm_80 and later, two per instruction).
template <typename T> struct FiniteCheck {
    bool bad = false;
    __device__ __forceinline__ void add(T x) { bad |= !isfinite(to_f32(x)); }
    __device__ __forceinline__ void add(uint4 v) {
        const Chunk<T> c = chunk_of<T>(v);
        if constexpr (sizeof(T) == 4) {
            // One fma per element, where isfinite takes two instructions.
#pragma unroll
            for (u32 j = 0; j < 4; ++j) product = fmaf(c.at(j), 0.0f, product);
            return;
        }
#if MB_SM80
        if constexpr (sizeof(T) == 2) {
            const T* t = nullptr;
            for (u32 i = 0; i < 4; ++i) acc = times_zero_plus(t, c.w[i], acc);
            return;
        }
#endif
#pragma unroll
        for (u32 j = 0; j < Chunk<T>::PER; ++j) bad |= !isfinite(c.at(j));
    }
    __device__ __forceinline__ bool any() const { return bad || product != 0.0f || (acc & 0x7fff7fffu) != 0; }
    u32 acc = 0;          // two halves' x * 0 + acc
    float product = 0.0f; // f32's x * 0 + product
};

// Copies n elements from global `src` to shared `dst`, which share their
// address modulo 16 (so 16-byte-aligned global vectors land on aligned
// shared ones): element copies up to src's first 16-byte boundary, 16-byte
// copies, element copies for the tail. The vector loop issues IN_FLIGHT
// loads before their stores and tests no bounds between them: the last
// partial round is a loop of its own. A tile is under 48 KiB, so its
// indices are 32-bit. Each element also passes through `check`.
template <typename T>
__device__ __forceinline__ void stage_tile(T* dst, const T* src, u32 n, FiniteCheck<T>& check) {
    constexpr u32 PER_VECTOR = 16 / sizeof(T);
    constexpr u32 IN_FLIGHT = 4;
    constexpr u32 ROUND = IN_FLIGHT * ROW_THREADS;
    const u32 head = head_to_16_bytes(src, n);
    for (u32 i = threadIdx.x; i < head; i += ROW_THREADS) check.add(dst[i] = src[i]);
    const u32 vectors = (n - head) / PER_VECTOR;
    // This thread's vectors are threadIdx.x, + ROW_THREADS, ...: whole
    // rounds of IN_FLIGHT, then the rest one by one. Counted down, with
    // pointers stepped by a round, so that the loads and stores take their
    // offsets as immediates.
    const u32 mine = threadIdx.x < vectors ? (vectors - threadIdx.x + ROW_THREADS - 1) / ROW_THREADS : 0u;
    const uint4* from = reinterpret_cast<const uint4*>(src + head) + threadIdx.x;
    uint4* to = reinterpret_cast<uint4*>(dst + head) + threadIdx.x;
#pragma unroll 1
    for (u32 rounds = mine / IN_FLIGHT; rounds != 0; --rounds, from += ROUND, to += ROUND) {
        uint4 v[IN_FLIGHT];
#pragma unroll
        for (u32 k = 0; k < IN_FLIGHT; ++k) v[k] = from[k * ROW_THREADS];
#pragma unroll
        for (u32 k = 0; k < IN_FLIGHT; ++k) {
            to[k * ROW_THREADS] = v[k];
            check.add(v[k]);
        }
    }
#pragma unroll 1
    for (u32 rest = mine % IN_FLIGHT; rest != 0; --rest, from += ROW_THREADS, to += ROW_THREADS) {
        const uint4 v = *from;
        *to = v;
        check.add(v);
    }
    for (u32 j = head + vectors * PER_VECTOR + threadIdx.x; j < n; j += ROW_THREADS) check.add(dst[j] = src[j]);
}

// Channel-major counterpart of stage_tile: `count` priors of each of the
// `classes` class planes of one image (`plane` elements apart in global
// memory) into runs `stride` elements apart in shared memory, so that class
// c of tile prior r is dst[r + c * stride]. The plan makes `stride`
// congruent to `plane` modulo a 16-byte word's elements, and dst shares
// src's offset within 16 bytes: every plane's run then shares its global
// offset within 16 bytes, and is copied like a row-major tile, in whole
// 16-byte words with its ends element by element (to the sector
// boundaries: sector_split), whatever P is. One word a lane at a time: a
// plane's run of ROW_THREADS priors is a word a lane (two in f32), and more
// in flight would spill at the 64 registers a thread that kernel 1's
// launch bounds leave.
template <typename T>
__device__ __forceinline__ void stage_planes(T* dst, u32 stride, const T* src, u64 plane, u32 classes, u32 count,
                                             FiniteCheck<T>& check) {
    constexpr u32 PER_VECTOR = 16 / sizeof(T);
    constexpr u32 WARPS = ROW_THREADS / WARP;
    const u32 lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    const T* run = src + warp * plane;
    T* out = dst + warp * stride;
#pragma unroll 1
    for (u32 c = warp; c < classes; c += WARPS, run += WARPS * plane, out += WARPS * stride) {
        const SectorSplit split = sector_split(run, count);
        const u32 head = split.head, words = split.words;
#pragma unroll 1
        for (u32 w = lane; w < words; w += WARP) {
            const uint4 v = reinterpret_cast<const uint4*>(run + head)[w];
            reinterpret_cast<uint4*>(out + head)[w] = v;
            check.add(v);
        }
        // The ends, within a sector each: a lane each.
        const u32 i = lane < head ? lane : head + words * PER_VECTOR + (lane - head);
        if (i < count) check.add(out[i] = run[i]);
    }
}

// One tile of kernel 1: `count` consecutive rows from global row `first`.
// Coordinate k of tile row r's box is element
// box_first + r * box_row + k * box_coord of a box tensor (row-major 4 and
// 1, channel-major 1 and P); walk_tiles works out the logits' strides.
struct Tile {
    u64 first;
    u32 count;
    u64 box_first;   // element offset of the first row's first coordinate
    u64 box_row;     // elements between two rows' boxes
    u64 box_coord;   // elements between two coordinates of a box
};

// Row-major tiles are `tile_rows` consecutive rows anywhere in the batch;
// channel-major tiles stay in one image (its priors are contiguous in
// each class plane), `tile_rows` priors from prior `p0`. Rows and tiles
// count in 32 bits: B * P < 2^31 (Shape::validate).
__device__ __forceinline__ Tile tile_at(const MultiboxParams& p, u32 t, u32 tile_rows, u32 rows) {
    Tile tile;
    if (p.layout == LAYOUT_ROW_MAJOR) {
        const u32 first = t * tile_rows;
        tile.first = first;
        tile.count = rows - first < tile_rows ? rows - first : tile_rows;
        tile.box_first = tile.first * 4;
        tile.box_row = 4;
        tile.box_coord = 1;
    } else {
        const u32 per_image = (p.priors + tile_rows - 1) / tile_rows;
        const u32 image = t / per_image;
        const u32 p0 = t % per_image * tile_rows;
        tile.first = image * p.priors + p0;
        tile.count = p.priors - p0 < tile_rows ? p.priors - p0 : tile_rows;
        tile.box_first = u64(image) * 4 * p.priors + p0;
        tile.box_row = 1;
        tile.box_coord = p.priors;
    }
    return tile;
}

// Checks a row read from global memory (tiles too long for shared memory,
// which the copy would have checked).
template <typename T>
__device__ __forceinline__ bool row_nonfinite(const T* x, u64 stride, u32 classes, u32 sub, u32 lanes) {
    FiniteCheck<T> check;
    for (u32 c = sub; c < classes; c += lanes) check.add(x[c * stride]);
    return check.any();
}

// A block's walk over its tiles (t = blockIdx.x, + gridDim.x, ...), and the
// status bits it found. PAIRS: the call's tiles are staged channel-major
// planes read two priors a lane group (pairs_of_priors); a body of its own,
// so that the other paths keep the registers they had without it.
template <typename T, typename L, bool PAIRS>
__device__ __forceinline__ u32 walk_tiles(const MultiboxParams& p, i32* tile_labels, u32* tile_keys) {
    MB_DYNAMIC_SHARED(unsigned char, staged);
    const T* confidence = static_cast<const T*>(p.confidence);
    const T* pred = static_cast<const T*>(p.predicted_locations);
    const T* gt = static_cast<const T*>(p.gt_locations);
    const u32 lanes = p.lanes_per_row;
    const u32 sub = threadIdx.x % lanes;
    const u32 rows = p.batch * p.priors;  // below 2^31 (Shape::validate)
    const bool staging = PAIRS || p.tile_rows != 0;
    const bool channel_major = PAIRS || p.layout == LAYOUT_CHANNEL_MAJOR;
    // A tile is one step of the lane groups: row r of it is lane group r.
    const u32 tile_rows = ROW_THREADS / lanes;
    const u32 r = threadIdx.x / lanes;

    const u32 tiles = channel_major ? p.batch * ((p.priors + tile_rows - 1) / tile_rows)
                                    : (rows + tile_rows - 1) / tile_rows;

    u32 status = 0;
    for (u32 t = blockIdx.x; t < tiles; t += gridDim.x) {
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
        const bool in_range = r < tile.count;
        const T* global_row = x0 + u64(r) * row_stride;
        // Staged, the tile in shared memory at the logits' offset within a
        // 16-byte line, so that 16-byte global vectors land on aligned
        // shared ones: row-major as in global memory, channel-major as class
        // planes `plane_stride` apart. Derived from `staged` where it is
        // used, so that the compiler knows it for shared memory (32-bit
        // addresses, LDS).
        const u32 copy_offset = u32(u64(x0) & 15u);
        if (staging) {
            FiniteCheck<T> check;
            T* copy = reinterpret_cast<T*>(staged + copy_offset);
            if (!channel_major)
                stage_tile(copy, x0, tile.count * p.classes, check);
            else
                stage_planes(copy, p.plane_stride, x0, p.priors, p.classes, tile.count, check);
            if (check.any()) status |= STATUS_NONFINITE_INPUT;
            if (threadIdx.x < tile.count) {
                const i64 l = load_label<L>(p.labels, tile.first + threadIdx.x);
                tile_labels[threadIdx.x] = i32(l < -2 ? -2 : l > i64(p.classes) ? i64(p.classes) : l);
            }
            __syncthreads();  // the tile and its labels are in shared memory
            if (channel_major) class_stride = p.plane_stride;
        } else if (in_range && row_nonfinite(global_row, class_stride, p.classes, sub, lanes)) {
            status |= STATUS_NONFINITE_INPUT;
        }
        // A row's label, clamped: an invalid one is counted as ignored and
        // flags the call, so that nothing ever indexes with it.
        const auto label_of = [&](u32 rr) -> i32 {
            const i64 l = rr >= tile.count ? -1 : staging ? tile_labels[rr] : load_label<L>(p.labels, tile.first + rr);
            if (l < -1 || l >= i64(p.classes)) {
                status |= STATUS_INVALID_LABEL;
                return -1;
            }
            return i32(l);
        };
        const auto staged_row = [&](u32 rr) {
            return reinterpret_cast<const T*>(staged + copy_offset) + u64(rr) * row_stride;
        };
        // Pairs: the first half of the block's lane groups take the tile's
        // rows two at a time (paired_row_sums), and the other half's warps
        // wait at the next barrier. Either way each row's lanes and terms
        // are the same.
        const u32 first_row = PAIRS ? 2 * r : r;  // of this lane group's one or two
        i32 label[2] = {-1, -1};
        RowSums sums[2] = {};
        if constexpr (PAIRS) {
            u32 own[2];
            float x_own[2];
#pragma unroll
            for (u32 j = 0; j < 2; ++j) {
                label[j] = label_of(first_row + j);
                own[j] = label[j] >= 0 ? u32(label[j]) : 0u;
                x_own[j] = leave_out_own(staged_row(first_row + j) + u64(own[j]) * class_stride, own[j], p.classes,
                                         sub, lanes, label[j] >= 0);
            }
            // No barrier: a pair's loads hold the group's own two rows only,
            // and every lane reads the classes of its run, whose own
            // elements it wrote itself (the same run for both rows).
            // Whole warps: ROW_THREADS / 2 is a multiple of 32.
            if (threadIdx.x < ROW_THREADS / 2)
                paired_row_sums(staged_row(first_row), class_stride, p.classes, own, x_own, sub, lanes,
                                label[0] >= 0 || label[1] >= 0, sums);
        } else {
            label[0] = label_of(r);
            const bool active = label[0] >= 0;
            const u32 own = active ? u32(label[0]) : 0u;  // the row's own class
            float x_own;
            if (staging) {
                x_own = leave_out_own(staged_row(r) + u64(own) * class_stride, own, p.classes, sub, lanes, active);
                __syncthreads();  // the tile without the rows' own classes
            } else {
                x_own = active ? to_f32(global_row[u64(own) * class_stride]) : 0.0f;
            }
            // Every lane of the block calls these, so the group shuffles find
            // all 32 lanes. A call each, so that the compiler knows which
            // rows are in shared memory (LDS, 32-bit addresses).
            if (channel_major && staging) {
                sums[0] = strided_row_sums<true>(staged_row(r), class_stride, p.classes, own, x_own, sub, lanes, active);
            } else if (channel_major) {
                sums[0] = strided_row_sums<false>(global_row, class_stride, p.classes, own, x_own, sub, lanes, active);
            } else if (staging) {
                sums[0] = chunked_row_sums<true>(staged_row(r), p.classes, own, x_own, sub, lanes, active);
            } else {
                sums[0] = chunked_row_sums<false>(global_row, p.classes, own, x_own, sub, lanes, active);
            }
        }
        // The group's first lane writes each of its rows' results. A row's
        // loss is taken before the branch on its kind, so that a warp of
        // negatives and positives runs loss_of once, and only for rows that
        // have one: ignored rows, rows past the tile and the pair walk's
        // idle warps skip it (and its log branch).
#pragma unroll
        for (u32 j = 0; j < 2; ++j) {
            const u32 rr = first_row + j;
            if (sub != 0 || rr >= tile.count || (j == 1 && !PAIRS)) continue;
            if (label[j] < 0) {
                tile_keys[rr] = KEY_IGNORED;
                continue;
            }
            const float loss = loss_of(sums[j]);
            if (label[j] == 0) {
                tile_keys[rr] = candidate_key(loss);
            } else {
                tile_keys[rr] = KEY_POSITIVE;
                PositiveTerms terms;
                terms.cross_entropy = loss;
                terms.regression = 0.0f;
                const u64 box = tile.box_first + rr * tile.box_row;
                float a[4], b[4];
                load_box(pred + box, tile.box_coord, a);
                load_box(gt + box, tile.box_coord, b);
                for (u32 k = 0; k < 4; ++k) {
                    const float d = a[k] - b[k];
                    if (!isfinite(d)) status |= STATUS_NONFINITE_INPUT;
                    terms.regression += smooth_l1(d, p.beta);
                }
                p.terms[tile.first + rr] = terms;
            }
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

    return status;
}

// Whether a call's staged channel-major planes are 2-element aligned in
// every tile, so that kernel 1 can read them two priors a load: P even
// (each plane's run then starts where the first's does, modulo 2
// elements, and a tile's first prior is a multiple of tile_rows) and the
// logits 2-element aligned.
template <typename T> __device__ __forceinline__ bool pairs_of_priors(const MultiboxParams& p) {
    return p.layout == LAYOUT_CHANNEL_MAJOR && p.tile_rows != 0 && p.priors % 2 == 0 &&
           u64(p.confidence) % (2 * sizeof(T)) == 0;
}

template <typename T, typename L> __device__ void mining_keys_and_positive_terms(const MultiboxParams& p) {
    __shared__ u32 status_scratch[ROW_THREADS / WARP];
    // Labels as i32, clamped to -2..C: an invalid label stays invalid, and
    // the 1 KiB this saves over i64 lets one-thread-per-row tiles reach
    // C = 91 in f16/bf16 (SSDLite on COCO) within 48 KiB. Declared here,
    // once for both walks.
    __shared__ i32 tile_labels[ROW_THREADS];
    __shared__ u32 tile_keys[ROW_THREADS];

    // Kernel 2 counts its finished blocks here; it runs after this kernel.
    if (blockIdx.x == 0 && threadIdx.x == 0) p.totals->images_done = 0;

    u32 status = pairs_of_priors<T>(p) ? walk_tiles<T, L, true>(p, tile_labels, tile_keys)
                                       : walk_tiles<T, L, false>(p, tile_labels, tile_keys);
    status = block_reduce<ROW_THREADS>(status, status_scratch, BitOr{});
    if (threadIdx.x == 0) p.block_status[block_index()] = status;
}

MB_KERNEL(multibox_rows_f32_i32, MultiboxParams, ROW_THREADS) { mining_keys_and_positive_terms<float, i32>(p); }
MB_KERNEL(multibox_rows_f32_i64, MultiboxParams, ROW_THREADS) { mining_keys_and_positive_terms<float, i64>(p); }
MB_KERNEL(multibox_rows_f16_i32, MultiboxParams, ROW_THREADS) { mining_keys_and_positive_terms<f16, i32>(p); }
MB_KERNEL(multibox_rows_f16_i64, MultiboxParams, ROW_THREADS) { mining_keys_and_positive_terms<f16, i64>(p); }
MB_KERNEL(multibox_rows_bf16_i32, MultiboxParams, ROW_THREADS) { mining_keys_and_positive_terms<bf16, i32>(p); }
MB_KERNEL(multibox_rows_bf16_i64, MultiboxParams, ROW_THREADS) { mining_keys_and_positive_terms<bf16, i64>(p); }

// Shared by every kernel: integer types, the kernel declaration macro,
// loads and stores per dtype, and the block-wide primitives.
//
// The GPU build (NVRTC) and the CPU build (the test-only emulator in emu/, a
// plain C++17 compiler) differ only inside `#if defined(MULTIBOX_EMULATOR)`
// blocks, all in this header: CUDA's built-ins just below, and the few
// loads, stores and bit conversions that each build writes its own way.
// Elsewhere, `#if MB_SM80` guards a path built on sm_80 instructions (the
// half2 maxima and finiteness checks of rows.cu) whose portable form, the
// one sm_75 runs, gives the same results. The emulator builds each kernel
// file twice, as sm_75 and as sm_90 run it (MULTIBOX_EMU_SM), and computes
// those instructions here as PTX defines them, so that both paths run in
// the tests.
#pragma once

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef int i32;
typedef long long i64;
typedef unsigned long long u64;

#if defined(MULTIBOX_EMULATOR)
// CUDA's built-ins (threadIdx, __syncthreads, shuffles, atomics, ...) for
// the CPU; see emu/include/multibox_emu.h.
#include "multibox_emu.h"
#define MB_KERNEL(name, Params, threads) MB_EMU_KERNEL(name, Params)
#define MB_KERNEL_BLOCKS(name, Params, threads, blocks) MB_EMU_KERNEL(name, Params)
#define MB_DYNAMIC_SHARED(T, var) T* var = static_cast<T*>(::emu::dynamic_shared_memory())
#else
// Kernels take their host arguments as one struct, mirrored in Rust with a
// size check on both sides, rather than ten loose integers.
//
// Kernels promise ptxas 1024 resident threads per SM (at most 64
// registers): left to itself, ptxas for sm_100 aims at full occupancy, 32
// registers, and spills. A kernel that fits in fewer registers states its
// own minimum (MB_KERNEL_BLOCKS).
#define MB_MIN_BLOCKS(threads) (1024 / (threads))
#define MB_KERNEL(name, Params, threads) MB_KERNEL_BLOCKS(name, Params, threads, MB_MIN_BLOCKS(threads))
#define MB_KERNEL_BLOCKS(name, Params, threads, blocks) \
    extern "C" __global__ void __launch_bounds__(threads, blocks) name(const Params p)
#define MB_DYNAMIC_SHARED(T, var)                                     \
    extern __shared__ __align__(16) unsigned char mb_dynamic_smem_[]; \
    T* var = reinterpret_cast<T*>(mb_dynamic_smem_)
#endif

#define MB_ASSERT_SIZE(T, n) static_assert(sizeof(T) == (n), #T " must match its Rust mirror")

// Whether this build takes the paths built on sm_80 instructions.
#if defined(MULTIBOX_EMULATOR)
#define MB_SM80 (MULTIBOX_EMU_SM >= 80)
#else
#define MB_SM80 (__CUDA_ARCH__ >= 800)
#endif

// ---------------------------------------------------------------------------
// Storage types. Half types travel as their bits; all arithmetic is f32.

struct f16 { u16 bits; };
struct bf16 { u16 bits; };

__device__ __forceinline__ u32 f32_bits(float x) {
#if defined(MULTIBOX_EMULATOR)
    u32 u;
    __builtin_memcpy(&u, &x, 4);
    return u;
#else
    return __float_as_uint(x);
#endif
}

__device__ __forceinline__ float f32_from_bits(u32 u) {
#if defined(MULTIBOX_EMULATOR)
    float x;
    __builtin_memcpy(&x, &u, 4);
    return x;
#else
    return __uint_as_float(u);
#endif
}

// Copies the bytes of a value: how a value changes type without undefined
// behaviour (the compiler turns it into moves, or nothing).
__device__ __forceinline__ void copy_bytes(void* to, const void* from, u32 n) {
#if defined(MULTIBOX_EMULATOR)
    __builtin_memcpy(to, from, n);
#else
    memcpy(to, from, n);
#endif
}

// -inf without math.h, which NVRTC does not have.
constexpr u32 NEG_INF_BITS = 0xff800000u;
#define NEG_INF f32_from_bits(NEG_INF_BITS)

__device__ __forceinline__ float to_f32(float x) { return x; }

// bf16 is the top half of an f32: widening is exact everywhere.
__device__ __forceinline__ float to_f32(bf16 x) { return f32_from_bits(u32(x.bits) << 16); }

__device__ __forceinline__ float to_f32(f16 x) {
#if defined(MULTIBOX_EMULATOR)
    // Exact widening of IEEE binary16, subnormals included.
    const u32 sign = u32(x.bits & 0x8000u) << 16;
    const u32 exp = (x.bits >> 10) & 0x1fu;
    u32 man = x.bits & 0x3ffu;
    if (exp == 0x1f) return f32_from_bits(sign | 0x7f800000u | (man << 13));
    if (exp != 0) return f32_from_bits(sign | ((exp + 112u) << 23) | (man << 13));
    if (man == 0) return f32_from_bits(sign);
    // Subnormal: shift the leading one up into the implicit bit.
    u32 e = 113u;
    while ((man & 0x400u) == 0) { man <<= 1; --e; }
    return f32_from_bits(sign | (e << 23) | ((man & 0x3ffu) << 13));
#else
    float y;
    asm("cvt.f32.f16 %0, %1;" : "=f"(y) : "h"(x.bits));
    return y;
#endif
}

// 2^x on the special-function unit: ex2.approx.ftz.f32, within 2 ulp,
// results below 2^-126 flushed to 0, -inf giving 0. Kernel 1's only
// exponential; kernel 3 keeps expf for the gradients it writes.
__device__ __forceinline__ float exp2_approx(float x) {
#if defined(MULTIBOX_EMULATOR)
    return emu_ex2_approx_ftz(x);
#else
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
#endif
}

template <typename T> __device__ __forceinline__ T from_f32(float x);

template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }

// Round to nearest even, NaN to the canonical 0x7fff. sm_80 and later have
// the instruction (cvt.rn.bf16.f32, one F2FP where the integer version
// takes seven, once per gradient element); the emulator and sm_75 do the
// same rounding in integer arithmetic, which is the instruction's
// definition for every input, subnormals, infinities and NaN included.
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float x) {
    bf16 r;
#if !defined(MULTIBOX_EMULATOR) && __CUDA_ARCH__ >= 800
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r.bits) : "f"(x));
#else
    const u32 u = f32_bits(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) { r.bits = 0x7fffu; return r; }
    r.bits = u16((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
#endif
    return r;
}

template <> __device__ __forceinline__ f16 from_f32<f16>(float x) {
    f16 r;
#if defined(MULTIBOX_EMULATOR)
    // IEEE round to nearest even, as cvt.rn.f16.f32 does; NaN becomes the
    // canonical 0x7fff like on the GPU.
    const u32 u = f32_bits(x);
    const u32 sign = (u >> 16) & 0x8000u;
    const u32 a = u & 0x7fffffffu;
    if (a > 0x7f800000u) { r.bits = 0x7fffu; return r; }
    if (a >= 0x477ff000u) { r.bits = u16(sign | 0x7c00u); return r; }  // rounds to inf
    if (a >= 0x38800000u) {                                            // normal f16
        const u32 v = a - 0x38000000u;  // rebias exponent 127 -> 15
        r.bits = u16(sign | ((v + 0xfffu + ((v >> 13) & 1u)) >> 13));
        return r;
    }
    if (a < 0x33000000u) { r.bits = u16(sign); return r; }  // below half the smallest subnormal
    // Subnormal f16: make the implicit bit explicit and shift it into place.
    const u32 exp = a >> 23;
    const u32 man = (a & 0x7fffffu) | 0x800000u;
    const u32 shift = 126u - exp;  // 14 + (113 - exp) bits fall off
    const u32 half_bit = 1u << (shift - 1);
    u32 q = man >> shift;
    const u32 rem = man & ((1u << shift) - 1u);
    if (rem > half_bit || (rem == half_bit && (q & 1u))) ++q;
    r.bits = u16(sign | q);
#else
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.bits) : "f"(x));
#endif
    return r;
}

#if MB_SM80
// Two halves per instruction (sm_80 and later), the type given by a null
// pointer's type: max2 is max.{bf16,f16}x2, times_zero_plus(x, acc) is
// fma.rn.{bf16,f16}x2 with b = 0. The emulator computes each half as PTX
// defines the instruction: max returns the other operand where one is NaN,
// a NaN where both are, else (a > b ? a : b); x * 0 + acc is NaN once x is
// NaN or infinite, else acc plus a signed zero, which is exact.
#if defined(MULTIBOX_EMULATOR)
template <typename T> inline T emu_half(u32 word, u32 j) { return T{u16(word >> (16 * j))}; }
template <typename T> inline u32 max2(const T*, u32 a, u32 b) {
    u32 d = 0;
    for (u32 j = 0; j < 2; ++j) {
        const T x = emu_half<T>(a, j), y = emu_half<T>(b, j);
        const float fx = to_f32(x), fy = to_f32(y);
        const u16 m = isnan(fx) ? (isnan(fy) ? u16(0x7fffu) : y.bits) : isnan(fy) ? x.bits : fx > fy ? x.bits : y.bits;
        d |= u32(m) << (16 * j);
    }
    return d;
}
template <typename T> inline u32 times_zero_plus(const T*, u32 x, u32 acc) {
    u32 d = 0;
    for (u32 j = 0; j < 2; ++j)
        d |= u32(from_f32<T>(fmaf(to_f32(emu_half<T>(x, j)), 0.0f, to_f32(emu_half<T>(acc, j)))).bits) << (16 * j);
    return d;
}
#else
__device__ __forceinline__ u32 max2(const bf16*, u32 a, u32 b) {
    u32 d;
    asm("max.bf16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    return d;
}
__device__ __forceinline__ u32 max2(const f16*, u32 a, u32 b) {
    u32 d;
    asm("max.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    return d;
}
__device__ __forceinline__ u32 times_zero_plus(const bf16*, u32 x, u32 acc) {
    asm("fma.rn.bf16x2 %0, %1, %2, %0;" : "+r"(acc) : "r"(x), "r"(0u));
    return acc;
}
__device__ __forceinline__ u32 times_zero_plus(const f16*, u32 x, u32 acc) {
    asm("fma.rn.f16x2 %0, %1, %2, %0;" : "+r"(acc) : "r"(x), "r"(0u));
    return acc;
}
#endif
#endif

// ---------------------------------------------------------------------------
// Warp and block primitives. Every kernel reduces through these.

constexpr u32 FULL_MASK = 0xffffffffu;
constexpr int WARP = 32;

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int offset = WARP / 2; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, offset));
    return v;
}

// Shuffles a value of 4-byte words (a number, or a struct of numbers) word by
// word: one xor shuffle per word.
template <typename T> __device__ __forceinline__ T shfl_xor_words(T v, int offset) {
    static_assert(sizeof(T) % 4 == 0, "4-byte words only");
    u32 words[sizeof(T) / 4];
    copy_bytes(words, &v, sizeof(T));
#pragma unroll
    for (u32 w = 0; w < sizeof(T) / 4; ++w) words[w] = __shfl_xor_sync(FULL_MASK, words[w], offset);
    copy_bytes(&v, words, sizeof(T));
    return v;
}

// The combines of the reductions below.
struct Plus {
    template <typename T> __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};
struct BitOr {
    __device__ __forceinline__ u32 operator()(u32 a, u32 b) const { return a | b; }
};

// Reduces `v` over each group of LANES lanes (a power of two, aligned) of
// a warp with `combine` (associative and commutative) by a butterfly; every
// lane gets its group's result. At each step the two lanes of a pair combine
// the same two values, in either order (a + b == b + a in floats too), so
// the lanes agree bit for bit.
template <int LANES = WARP, typename T, typename Combine>
__device__ __forceinline__ T warp_reduce(T v, Combine combine) {
    static_assert(LANES >= 1 && LANES <= WARP && (LANES & (LANES - 1)) == 0, "a power of two up to 32 lanes");
#pragma unroll
    for (int offset = LANES / 2; offset > 0; offset /= 2) v = combine(v, shfl_xor_words(v, offset));
    return v;
}

// Reduces `v` over a block of THREADS threads with `combine`; every thread
// gets the result. The order is fixed, each warp's butterfly and then one
// over the warps' results, so a float sum is bit-identical run after run.
// T may be a struct of 4-byte numbers, so that several reductions share one
// pair of barriers, their shuffles interleaved, where each alone would wait
// out two barriers and two dependent shuffle chains. `scratch` holds
// THREADS / 32 values of T and may be reused once this returns.
template <int THREADS, typename T, typename Combine>
__device__ __forceinline__ T block_reduce(T v, T* scratch, Combine combine) {
    constexpr int WARPS = THREADS / WARP;
    static_assert(THREADS % WARP == 0 && THREADS <= 1024 && (WARPS & (WARPS - 1)) == 0,
                  "a power-of-two count of whole warps");
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    v = warp_reduce(v, combine);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    // Every group of WARPS lanes holds all the warps' results.
    const T total = warp_reduce<WARPS>(scratch[lane % WARPS], combine);
    __syncthreads();
    return total;
}

// Exclusive prefix sum over a block of THREADS threads, in thread order.
// Returns this thread's exclusive prefix; `*total` gets the block's sum.
// `scratch` holds THREADS / 32 + 1 values.
template <int THREADS> __device__ __forceinline__ u32 block_exclusive_scan(u32 v, u32* scratch, u32* total) {
    static_assert(THREADS % WARP == 0 && THREADS <= 1024, "whole warps only");
    constexpr int WARPS = THREADS / WARP;
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    u32 inclusive = v;
#pragma unroll
    for (int offset = 1; offset < WARP; offset *= 2) {
        const u32 up = __shfl_up_sync(FULL_MASK, inclusive, offset);
        if (lane >= offset) inclusive += up;
    }
    if (lane == WARP - 1) scratch[warp] = inclusive;
    __syncthreads();
    if (warp == 0) {
        u32 w = lane < WARPS ? scratch[lane] : 0u;
        u32 w_inclusive = w;
#pragma unroll
        for (int offset = 1; offset < WARP; offset *= 2) {
            const u32 up = __shfl_up_sync(FULL_MASK, w_inclusive, offset);
            if (lane >= offset) w_inclusive += up;
        }
        if (lane < WARPS) scratch[lane] = w_inclusive - w;  // exclusive, per warp
        if (lane == WARPS - 1) scratch[WARPS] = w_inclusive;
    }
    __syncthreads();
    const u32 result = scratch[warp] + inclusive - v;
    *total = scratch[WARPS];
    __syncthreads();
    return result;
}

// ---------------------------------------------------------------------------
// Vector memory access. User buffers are only element-aligned (a PyTorch
// slice can start anywhere), so these take the wide path when the address
// allows and fall back to element accesses otherwise.

// The vector type as wide as four elements of T: one prior's box.
template <typename T> struct Vec4Of;
template <> struct Vec4Of<float> { typedef uint4 type; };
template <> struct Vec4Of<f16> { typedef uint2 type; };
template <> struct Vec4Of<bf16> { typedef uint2 type; };

// Four consecutive elements (one prior's box), as one 16-byte (f32) or
// 8-byte (f16, bf16) access when the address is aligned for it.
template <typename T> __device__ __forceinline__ void load4(const T* p, float out[4]) {
    typedef typename Vec4Of<T>::type V;
    T v[4];
    if ((u64(p) & (sizeof(V) - 1)) == 0) {
        const V bits = *reinterpret_cast<const V*>(p);
        copy_bytes(v, &bits, sizeof(V));
    } else {
        for (int j = 0; j < 4; ++j) v[j] = p[j];
    }
    for (int j = 0; j < 4; ++j) out[j] = to_f32(v[j]);
}

template <typename T> __device__ __forceinline__ void store4(T* p, const float in[4]) {
    typedef typename Vec4Of<T>::type V;
    T v[4];
    for (int j = 0; j < 4; ++j) v[j] = from_f32<T>(in[j]);
    if ((u64(p) & (sizeof(V) - 1)) == 0) {
        V bits;
        copy_bytes(&bits, v, sizeof(V));
        *reinterpret_cast<V*>(p) = bits;
    } else {
        for (int j = 0; j < 4; ++j) p[j] = v[j];
    }
}

// One prior's box, whose coordinates are `stride` elements apart: one
// vector access when they are contiguous (row-major), else four.
template <typename T> __device__ __forceinline__ void load_box(const T* p, u64 stride, float out[4]) {
    if (stride == 1) {
        load4(p, out);
    } else {
        for (int j = 0; j < 4; ++j) out[j] = to_f32(p[j * stride]);
    }
}

template <typename T> __device__ __forceinline__ void store_box(T* p, u64 stride, const float in[4]) {
    if (stride == 1) {
        store4(p, in);
    } else {
        for (int j = 0; j < 4; ++j) p[j * stride] = from_f32<T>(in[j]);
    }
}

// The elements of T from `p` up to its first 16-byte boundary, at most n:
// the head that the vector loops below handle element by element.
template <typename T> __device__ __forceinline__ u32 head_to_16_bytes(const T* p, u64 n) {
    const u32 head = ((16u - u32(u64(p) & 15u)) & 15u) / u32(sizeof(T));
    return n < head ? u32(n) : head;
}

// A warp's copy of a run of n elements from p as 16-byte words, with its
// ends element by element (one request: a lane an element), split so that
// no 32-byte sector is touched both by the ends' request and by a word's,
// which would fetch or write it twice. An end that falls inside a 16-byte
// word goes element by element to the sector boundary (splitting at the
// word left the sector around it to both requests); an end on a 16-byte
// boundary needs no elements. Each end is under 32 bytes, so head + tail
// < 2 * 32 / sizeof(T) <= 32 elements: a lane each.
struct SectorSplit {
    u32 head;   // elements before the first word
    u32 words;  // 16-byte words after them; the rest of the run is the tail
};
template <typename T> __device__ __forceinline__ SectorSplit sector_split(const T* p, u32 n) {
    const u64 start = u64(p), end = start + u64(n) * sizeof(T);
    const u64 up = (start + 31) & ~u64(31);
    const u64 lo = (start & 15) == 0 ? start : up < end ? up : end;  // the words' first byte
    const u64 down = end & ~u64(31);
    const u64 hi = (end & 15) == 0 ? end : down > lo ? down : lo;  // past their last
    SectorSplit s;
    s.head = u32((lo - start) / sizeof(T));
    s.words = u32((hi - lo) / 16);
    return s;
}

// blockIdx.x, read again from its special register where it is used. A
// kernel near its register cap may otherwise keep the value from its start
// to its end, and spill it to local memory to do so.
__device__ __forceinline__ u32 block_index() {
#if defined(MULTIBOX_EMULATOR)
    return blockIdx.x;
#else
    u32 b;
    asm volatile("mov.u32 %0, %%ctaid.x;" : "=r"(b));
    return b;
#endif
}

// Zeros over `n` elements from `p` by `lanes` lanes of a warp (or group):
// element stores up to the first 16-byte boundary, 16-byte stores, then
// element stores for the tail.
template <typename T>
__device__ __forceinline__ void zero_span(T* p, u64 n, u32 lane, u32 lanes) {
    constexpr u32 PER_VECTOR = 16 / sizeof(T);
    const T zero = from_f32<T>(0.0f);
    const u64 head = head_to_16_bytes(p, n);
    for (u64 i = lane; i < head; i += lanes) p[i] = zero;
    const u64 vectors = (n - head) / PER_VECTOR;
    uint4* v = reinterpret_cast<uint4*>(p + head);
    for (u64 i = lane; i < vectors; i += lanes) v[i] = make_uint4(0u, 0u, 0u, 0u);
    for (u64 i = head + vectors * PER_VECTOR + lane; i < n; i += lanes) p[i] = zero;
}

// Copies n elements from `src` to `dst` by `lanes` lanes of a warp (or
// group, or block). When the two share their address modulo 16, the 16-byte
// words wholly inside the run are copied as 16-byte loads and stores, and
// the partial words at its ends element by element, never whole: their
// other bytes belong to someone else (a neighbouring tile, another group's
// row). Otherwise every element is copied on its own. Its runs lie within
// a tile of shared memory, so 32-bit indices.
template <typename T>
__device__ __forceinline__ void copy_run(T* dst, const T* src, u32 n, u32 lane, u32 lanes) {
    constexpr u32 PER_VECTOR = 16 / sizeof(T);
    u32 head = n, vectors = 0;
    if (((u64(dst) ^ u64(src)) & 15u) == 0) {
        head = head_to_16_bytes(dst, n);
        vectors = (n - head) / PER_VECTOR;
    }
#pragma unroll 1
    for (u32 i = lane; i < head; i += lanes) dst[i] = src[i];
    const uint4* from = reinterpret_cast<const uint4*>(src + head);
    uint4* to = reinterpret_cast<uint4*>(dst + head);
#pragma unroll 1
    for (u32 i = lane; i < vectors; i += lanes) to[i] = from[i];
#pragma unroll 1
    for (u32 i = head + vectors * PER_VECTOR + lane; i < n; i += lanes) dst[i] = src[i];
}

// A 16-byte store to 16-byte aligned shared memory as one STS.128. The
// compiler splits a uint4 that two paths assemble into four 4-byte stores,
// even behind __builtin_assume_aligned.
__device__ __forceinline__ void store_shared_16(void* p, uint4 v) {
#if defined(MULTIBOX_EMULATOR)
    *static_cast<uint4*>(p) = v;
#else
    asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};" ::"r"(u32(__cvta_generic_to_shared(p))), "r"(v.x),
                 "r"(v.y), "r"(v.z), "r"(v.w)
                 : "memory");
#endif
}

// The bits of one element of T, as an unsigned integer of its size.
template <typename T> struct ElementBits { typedef u16 type; };
template <> struct ElementBits<float> { typedef u32 type; };

// An element's bits, zero-extended to 32.
__device__ __forceinline__ u32 element_bits(float x) { return f32_bits(x); }
__device__ __forceinline__ u32 element_bits(f16 x) { return x.bits; }
__device__ __forceinline__ u32 element_bits(bf16 x) { return x.bits; }

// -inf in each half type's bits.
template <typename T> constexpr u16 HALF_NEG_INF = 0;
template <> constexpr u16 HALF_NEG_INF<f16> = 0xfc00u;
template <> constexpr u16 HALF_NEG_INF<bf16> = 0xff80u;

// 16 bytes of logits: PER elements of T, as 4 words. Kernel 1 pads a
// row's positions outside it with -inf, which the maximum ignores
// and whose term is exactly 0, so a chunk's sum is its row's elements' in
// order whatever the chunk's alignment. This one is f16's and bf16's: two
// elements a word, the first in the low half.
template <typename T> struct Chunk {
    static constexpr u32 PER = 8;
    static constexpr u32 PADDING = u32(HALF_NEG_INF<T>) * 0x10001u;  // a word of two -inf
    u32 w[4];
    __device__ __forceinline__ float at(u32 j) const {
        T h;
        h.bits = u16(j & 1 ? w[j / 2] >> 16 : w[j / 2]);
        return to_f32(h);
    }
    __device__ __forceinline__ void set(u32 j, T x) {
        const u32 s = (j & 1) * 16;
        w[j / 2] = (w[j / 2] & ~(0xffffu << s)) | (u32(x.bits) << s);
    }
    __device__ __forceinline__ void pad(u32 j) {
        const u32 s = (j & 1) * 16;
        w[j / 2] = (w[j / 2] & ~(0xffffu << s)) | (PADDING & (0xffffu << s));
    }
};

template <> struct Chunk<float> {
    static constexpr u32 PER = 4;
    static constexpr u32 PADDING = NEG_INF_BITS;
    u32 w[4];
    __device__ __forceinline__ float at(u32 j) const { return f32_from_bits(w[j]); }
    __device__ __forceinline__ void set(u32 j, float x) { w[j] = f32_bits(x); }
    __device__ __forceinline__ void pad(u32 j) { w[j] = PADDING; }
};

// The chunk of a 16-byte word's bits.
template <typename T> __device__ __forceinline__ Chunk<T> chunk_of(uint4 v) {
    Chunk<T> c;
    c.w[0] = v.x;
    c.w[1] = v.y;
    c.w[2] = v.z;
    c.w[3] = v.w;
    return c;
}

// Copies the n elements from `src` (global memory, within the buffer of
// bytes [lo, hi)) to `dst` (shared memory) by `lanes` lanes, reading the
// 16-byte words that cover the run whole, a word a lane: one load
// instruction fetches each of the run's sectors once, where copy_run's
// element loads at the two ends would fetch the end sectors again. A
// word's bytes outside the run (a neighbouring row's logits, read and
// dropped) lie in sectors the run touches anyway; only a word that
// reaches outside the buffer (around its first or last element) is read
// element by element. Only the run's elements are stored: the words of
// `dst` on either side belong to other rows. Where `dst` shares the run's
// offset within 16 bytes, a word inside the run is stored whole. The
// elements travel as raw bits, so that the word stays in four registers
// and its whole store is one STS.128. Indices are i32 (a word's first
// element may lie before the run): n is a row, far below 2^31.
template <typename T>
__device__ __forceinline__ void gather_run(T* dst, const T* src, u32 n, u32 lane, u32 lanes, u64 lo, u64 hi) {
    typedef typename ElementBits<T>::type B;
    static_assert(sizeof(B) == sizeof(T), "an element's bits are as wide as the element");
    constexpr u32 PER_VECTOR = 16 / sizeof(T), PER_U32 = 4 / sizeof(T), BITS = 8 * sizeof(T);
    const u32 phase_bytes = u32(u64(src) & 15u);
    const u32 phase = phase_bytes / u32(sizeof(T));  // elements of the first word before the run
    const u32 words = (phase + n + PER_VECTOR - 1) / PER_VECTOR;
    const bool whole_stores = ((u64(dst) ^ u64(src)) & 15u) == 0;
    // Derived from `src`, not from an integer, so that the compiler knows a
    // global pointer (LDG, not a generic load).
    const uint4* base = reinterpret_cast<const uint4*>(reinterpret_cast<const unsigned char*>(src) - phase_bytes);
    const B* from = reinterpret_cast<const B*>(src);
    B* to = reinterpret_cast<B*>(dst);
#pragma unroll 1
    for (u32 w = lane; w < words; w += lanes) {
        const u64 at = u64(base + w);
        const i32 first = i32(w * PER_VECTOR) - i32(phase);  // the run's index of the word's first element
        uint4 word;
        if (at >= lo && at + 16u <= hi) {
            word = base[w];
        } else {
            u32 v[4] = {0u, 0u, 0u, 0u};
#pragma unroll
            for (u32 j = 0; j < PER_VECTOR; ++j)
                if (first + i32(j) >= 0 && first + i32(j) < i32(n))
                    v[j / PER_U32] |= u32(from[first + i32(j)]) << (j % PER_U32 * BITS);
            word = make_uint4(v[0], v[1], v[2], v[3]);
        }
        if (whole_stores && first >= 0 && first + i32(PER_VECTOR) <= i32(n)) {
            store_shared_16(dst + first, word);
        } else {
            const u32 v[4] = {word.x, word.y, word.z, word.w};
#pragma unroll
            for (u32 j = 0; j < PER_VECTOR; ++j)
                if (first + i32(j) >= 0 && first + i32(j) < i32(n))
                    to[first + i32(j)] = B(v[j / PER_U32] >> (j % PER_U32 * BITS));
        }
    }
}

// A load that bypasses L1: for values another block wrote during this
// launch (the last-block reductions), which this SM's L1 may hold stale.
template <typename T> __device__ __forceinline__ T load_global_coherent(const T* p) {
    static_assert(sizeof(T) == 4 || sizeof(T) == 16, "4- or 16-byte records only");
#if defined(MULTIBOX_EMULATOR)
    return *p;
#else
    T v;
    if constexpr (sizeof(T) == 4) {
        const u32 bits = __ldcg(reinterpret_cast<const unsigned int*>(p));
        memcpy(&v, &bits, 4);
    } else {
        const uint4 bits = __ldcg(reinterpret_cast<const uint4*>(p));
        memcpy(&v, &bits, 16);
    }
    return v;
#endif
}

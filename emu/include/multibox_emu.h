// CUDA's device built-ins for a plain C++17 compiler: the test-only CPU
// emulator of kernels/*.cu. Included by common.cuh when MULTIBOX_EMULATOR is
// defined; the GPU build (NVRTC) never sees this file.
//
// Threads of a block run as fibers on the launching OS thread; they switch
// only at barriers, warp collectives and exit (see emu/src/runtime.cpp).
#pragma once

#if !defined(MULTIBOX_EMULATOR)
#error "multibox_emu.h is the CPU emulator's CUDA shim: include common.cuh instead"
#endif

#include <cmath>
#include <cstdio>
#include <cstring>
#include <type_traits>

// The GPU architecture whose code paths this build of a kernel file takes
// (`MB_SM80` in common.cuh): emu/build.rs builds kernels/*.cu once as sm_75
// runs it and once, in a namespace of its own, as sm_90 does.
#if !defined(MULTIBOX_EMU_SM)
#define MULTIBOX_EMU_SM 75
#endif

// ---------------------------------------------------------------------------
// Qualifiers. `__shared__` variables are per OS thread: a launch runs its
// blocks one after another on the calling thread, all fibers of a block on
// that same thread, so the block's threads share them and other launches
// (on other OS threads) do not. `__restrict__` is a GCC keyword already.

#define __global__
#define __device__
#define __host__
// Forced, as on the GPU. It also keeps the checker's view whole: GCC's
// ThreadSanitizer pass, whose hooks the checker takes, leaves uninstrumented
// a call whose aggregate result is stored straight to memory (`p[i] =
// from_f32<f16>(x)`, when the call is not inlined).
#if defined(MULTIBOX_EMU_NO_FORCEINLINE)
// The O0 coverage build (scripts/kernel-coverage): every helper a function
// of its own, so gcov reports each template instance apart.
#define __forceinline__ inline
#else
#define __forceinline__ inline __attribute__((always_inline))
#endif
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static __thread

struct uint3 {
    unsigned x, y, z;
};

namespace emu {
namespace detail {
// A vector copy reads `from` and writes `to`, `size` bytes each: a GPU
// faults unless both are aligned to the width, so the checker holds shared
// and global addresses to it (a CPU would not complain).
void on_vector_copy(void* to, const void* from, unsigned size);
}  // namespace detail
}  // namespace emu

// CUDA's vector types. A copy is one access of the whole width, as on the
// GPU (LDG.E.128, STG.E.64), not one per member: the checker and the traffic
// model see what the GPU does.
struct alignas(8) uint2 {
    unsigned x, y;
    uint2() = default;
    constexpr uint2(unsigned x_, unsigned y_) : x(x_), y(y_) {}
    uint2(const uint2& o) {
        ::emu::detail::on_vector_copy(this, &o, sizeof *this);
        __builtin_memcpy(static_cast<void*>(this), &o, sizeof *this);
    }
    uint2& operator=(const uint2& o) {
        ::emu::detail::on_vector_copy(this, &o, sizeof *this);
        __builtin_memcpy(static_cast<void*>(this), &o, sizeof *this);
        return *this;
    }
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
    uint4() = default;
    constexpr uint4(unsigned x_, unsigned y_, unsigned z_, unsigned w_) : x(x_), y(y_), z(z_), w(w_) {}
    uint4(const uint4& o) {
        ::emu::detail::on_vector_copy(this, &o, sizeof *this);
        __builtin_memcpy(static_cast<void*>(this), &o, sizeof *this);
    }
    uint4& operator=(const uint4& o) {
        ::emu::detail::on_vector_copy(this, &o, sizeof *this);
        __builtin_memcpy(static_cast<void*>(this), &o, sizeof *this);
        return *this;
    }
};
inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
struct dim3 {
    unsigned x, y, z;
};

// Set by the scheduler each time it resumes a fiber.
extern __thread uint3 threadIdx;
extern __thread uint3 blockIdx;
extern __thread dim3 blockDim;
extern __thread dim3 gridDim;
constexpr int warpSize = 32;

namespace emu {
namespace detail {

struct Site {
    const char* what;  // the intrinsic, e.g. "__syncthreads"
    const char* file;
    int line;
};

enum Op : int {
    SYNCTHREADS, SYNCTHREADS_COUNT, SYNCTHREADS_OR, SYNCTHREADS_AND,
    SYNCWARP, SHFL_IDX, SHFL_UP, SHFL_DOWN, SHFL_XOR, BALLOT, ANY, ALL,
};

using Trampoline = void (*)(const void* params);
struct Registrar {
    Registrar(const char* name, Trampoline fn, unsigned long params_size, unsigned sm);
};

extern __thread void* dynamic_shared;

// The checker's hooks (emu/src/check.cpp). Plain loads and stores reach it
// through GCC's -fsanitize=thread instrumentation of the kernel files (the
// `__tsan_*` callbacks, implemented by the emulator: no TSan runtime is
// linked); atomics and fences, which that instrumentation would fold into
// calls the emulator does not model, announce themselves here instead.
void on_atomic(const void* addr, unsigned size, const void* pc);
void on_fence();

int block_barrier(const Site& site, Op op, int pred);
unsigned long long warp_op(const Site& site, Op op, unsigned mask, unsigned long long value, int arg, int width);
unsigned active_mask();
[[noreturn]] void trap(const Site& site);

template <typename T> inline T shfl(const Site& site, Op op, unsigned mask, T var, int arg, int width = warpSize) {
    static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "shuffles move at most 8 bytes");
    unsigned long long bits = 0;
    std::memcpy(&bits, &var, sizeof(T));
    bits = warp_op(site, op, mask, bits, arg, width);
    std::memcpy(&var, &bits, sizeof(T));
    return var;
}

inline void syncwarp(const Site& site, unsigned mask = 0xffffffffu) { warp_op(site, SYNCWARP, mask, 0, 0, warpSize); }

// Atomics are functions of their own, never inlined and not instrumented, so
// that the return address names the kernel's call site and the checker sees
// one atomic access, not the loads and compare-and-swaps inside.
#define EMU_ATOMIC __attribute__((noinline, no_sanitize_thread))
#define EMU_NO_TSAN __attribute__((no_sanitize_thread))
#define EMU_ATOMIC_HOOK(addr) ::emu::detail::on_atomic((addr), sizeof(*(addr)), __builtin_return_address(0))

// Read-modify-write through a compare-and-swap loop (any 4 or 8 byte type).
template <typename T, typename F> EMU_NO_TSAN inline T atomic_rmw(T* addr, F f) {
    T old;
    __atomic_load(addr, &old, __ATOMIC_RELAXED);
    T next = f(old);
    while (!__atomic_compare_exchange(addr, &old, &next, false, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) next = f(old);
    return old;
}

}  // namespace detail

// 16-byte aligned, as large as the launch's dynamic_shared_bytes.
inline void* dynamic_shared_memory() { return detail::dynamic_shared; }

}  // namespace emu

// ---------------------------------------------------------------------------
// Kernel declaration: registers `name` with a trampoline that copies the
// params bytes into a `Params` and calls the body that follows the macro.

#define MB_EMU_KERNEL(name, Params)                                                                 \
    static void name(const Params p);                                                               \
    static_assert(std::is_trivially_copyable<Params>::value, #Params " must be trivially copyable"); \
    EMU_NO_TSAN static void name##_emu_trampoline(const void* bytes) {                                          \
        Params params;                                                                              \
        std::memcpy(static_cast<void*>(&params), bytes, sizeof(Params));                            \
        name(params);                                                                               \
    }                                                                                               \
    static const ::emu::detail::Registrar name##_emu_registrar(#name, &name##_emu_trampoline, sizeof(Params), \
                                                               MULTIBOX_EMU_SM);                            \
    static void name([[maybe_unused]] const Params p)

// ---------------------------------------------------------------------------
// Barriers and warp collectives. The macros record where they were called so
// that a barrier that can never complete is reported by file:line.

#define EMU_SITE(what) (::emu::detail::Site{what, __FILE__, __LINE__})
#define __syncthreads() ((void)::emu::detail::block_barrier(EMU_SITE("__syncthreads"), ::emu::detail::SYNCTHREADS, 1))
#define __syncthreads_count(pred) \
    ::emu::detail::block_barrier(EMU_SITE("__syncthreads_count"), ::emu::detail::SYNCTHREADS_COUNT, (pred) != 0)
#define __syncthreads_or(pred) \
    ::emu::detail::block_barrier(EMU_SITE("__syncthreads_or"), ::emu::detail::SYNCTHREADS_OR, (pred) != 0)
#define __syncthreads_and(pred) \
    ::emu::detail::block_barrier(EMU_SITE("__syncthreads_and"), ::emu::detail::SYNCTHREADS_AND, (pred) != 0)
#define __syncwarp(...) ::emu::detail::syncwarp(EMU_SITE("__syncwarp") __VA_OPT__(, ) __VA_ARGS__)
#define __shfl_sync(...) ::emu::detail::shfl(EMU_SITE("__shfl_sync"), ::emu::detail::SHFL_IDX, __VA_ARGS__)
#define __shfl_up_sync(...) ::emu::detail::shfl(EMU_SITE("__shfl_up_sync"), ::emu::detail::SHFL_UP, __VA_ARGS__)
#define __shfl_down_sync(...) ::emu::detail::shfl(EMU_SITE("__shfl_down_sync"), ::emu::detail::SHFL_DOWN, __VA_ARGS__)
#define __shfl_xor_sync(...) ::emu::detail::shfl(EMU_SITE("__shfl_xor_sync"), ::emu::detail::SHFL_XOR, __VA_ARGS__)
#define __ballot_sync(mask, pred) \
    unsigned(::emu::detail::warp_op(EMU_SITE("__ballot_sync"), ::emu::detail::BALLOT, (mask), (pred) != 0, 0, warpSize))
#define __any_sync(mask, pred) \
    int(::emu::detail::warp_op(EMU_SITE("__any_sync"), ::emu::detail::ANY, (mask), (pred) != 0, 0, warpSize))
#define __all_sync(mask, pred) \
    int(::emu::detail::warp_op(EMU_SITE("__all_sync"), ::emu::detail::ALL, (mask), (pred) != 0, 0, warpSize))
// Every lane of the calling warp: the emulator does not model divergence, so
// this is what a converged warp gives (exited lanes included).
#define __activemask() ::emu::detail::active_mask()
#define __trap() ::emu::detail::trap(EMU_SITE("__trap"))

// Fibers never run concurrently and a launch is synchronous, so no hardware
// fence is needed; the checker records the device-wide fence, which orders
// this thread's writes before its next atomic (release) and that atomic's
// observations before its next accesses (acquire) for other blocks.
inline void __threadfence() { ::emu::detail::on_fence(); }
// Orders accesses within the block only, which barriers already order here.
inline void __threadfence_block() {}

// ---------------------------------------------------------------------------
// Bits and reinterpretation.

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(unsigned(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
    unsigned r = 0;
    for (int i = 0; i < 32; ++i, x >>= 1) r = (r << 1) | (x & 1u);
    return r;
}
inline unsigned long long __brevll(unsigned long long x) {
    return ((unsigned long long)__brev(unsigned(x)) << 32) | __brev(unsigned(x >> 32));
}

template <typename To, typename From> inline To emu_bit_cast(From x) {
    static_assert(sizeof(To) == sizeof(From), "same size");
    To y;
    std::memcpy(&y, &x, sizeof y);
    return y;
}
inline unsigned __float_as_uint(float x) { return emu_bit_cast<unsigned>(x); }
inline float __uint_as_float(unsigned x) { return emu_bit_cast<float>(x); }
inline int __float_as_int(float x) { return emu_bit_cast<int>(x); }
inline float __int_as_float(int x) { return emu_bit_cast<float>(x); }
inline long long __double_as_longlong(double x) { return emu_bit_cast<long long>(x); }
inline double __longlong_as_double(long long x) { return emu_bit_cast<double>(x); }

template <typename T> inline T __ldg(const T* p) { return *p; }

// ---------------------------------------------------------------------------
// Math: <cmath> has the float functions (expf, logf, log1pf, fmaxf, ...).
// The fast intrinsics are the accurate ones here.
//
// The device's are less accurate than the host's: CUDA bounds expf and
// exp2f within 2 ulp, logf and log1pf within 1, ex2.approx within 2. A
// launch with the device math model on (`Checks::device_math`) moves each
// finite normal result of these by a whole number of ulps within that bound,
// drawn from a hash of the function, its argument and the launch's seed: a
// function of its argument, as on the device (equal inputs, equal outputs),
// but not the host's. A test that passes under several seeds shows that the
// kernels' answers (mined sets included) do not hang on the last bits of a
// math library. Off, the host's results stand.

namespace emu {
namespace detail {
enum MathFunction : unsigned { MATH_EXP = 1, MATH_EXP2 = 2, MATH_LOG = 3, MATH_LOG1P = 4, MATH_EX2_APPROX = 5 };
// `exact` (the host's result for argument x) moved as the model says, or
// `exact` itself while the model is off. Not instrumented: no access the
// checker sees.
float device_math(float exact, float x, MathFunction function, unsigned ulps);
}  // namespace detail
}  // namespace emu

inline float emu_device_expf(float x) { return ::emu::detail::device_math(expf(x), x, ::emu::detail::MATH_EXP, 2); }
inline float emu_device_exp2f(float x) { return ::emu::detail::device_math(exp2f(x), x, ::emu::detail::MATH_EXP2, 2); }
inline float emu_device_logf(float x) { return ::emu::detail::device_math(logf(x), x, ::emu::detail::MATH_LOG, 1); }
inline float emu_device_log1pf(float x) {
    return ::emu::detail::device_math(log1pf(x), x, ::emu::detail::MATH_LOG1P, 1);
}
// ex2.approx.ftz.f32: a subnormal argument is read as 0, a result below
// 2^-126 is flushed to 0; NaN stays NaN.
inline float emu_ex2_approx_ftz(float x) {
    if (fabsf(x) < 0x1p-126f) x = 0.0f;
    const float y = ::emu::detail::device_math(exp2f(x), x, ::emu::detail::MATH_EX2_APPROX, 2);
    return y < 0x1p-126f ? 0.0f : y;
}
// Kernel code calls the plain names; no header is included after this one
// in a kernel file, and runtime.cpp defines MULTIBOX_EMU_RUNTIME to keep its
// standard headers clear of these macros.
#if !defined(MULTIBOX_EMU_RUNTIME)
#define expf(x) emu_device_expf(x)
#define exp2f(x) emu_device_exp2f(x)
#define logf(x) emu_device_logf(x)
#define log1pf(x) emu_device_log1pf(x)
#endif

using std::isfinite;
using std::isinf;
using std::isnan;
using std::signbit;
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float x) { return x > 0.0f ? (x < 1.0f ? x : 1.0f) : 0.0f; }  // NaN -> 0
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
// IEEE operations rounded to nearest, never contracted: what the CPU build
// does for plain operators already (no -ffp-contract=fast, no -mfma).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }

#define EMU_MIN_MAX(T)                             \
    inline T min(T a, T b) { return b < a ? b : a; } \
    inline T max(T a, T b) { return a < b ? b : a; }
EMU_MIN_MAX(int)
EMU_MIN_MAX(unsigned)
EMU_MIN_MAX(long long)
EMU_MIN_MAX(unsigned long long)
#undef EMU_MIN_MAX
inline unsigned min(int a, unsigned b) { return min(unsigned(a), b); }
inline unsigned min(unsigned a, int b) { return min(a, unsigned(b)); }
inline unsigned max(int a, unsigned b) { return max(unsigned(a), b); }
inline unsigned max(unsigned a, int b) { return max(a, unsigned(b)); }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }

// ---------------------------------------------------------------------------
// Atomics. Blocks of a launch run on one OS thread, so these only need to be
// atomic against other launches; they are real atomics all the same.

#define EMU_ATOMIC_FETCH(name, builtin, T) \
    EMU_ATOMIC inline T name(T* a, T v) {     \
        EMU_ATOMIC_HOOK(a);                   \
        return builtin(a, v, __ATOMIC_SEQ_CST); \
    }
#define EMU_ATOMIC_INTS(name, builtin)                     \
    EMU_ATOMIC_FETCH(name, builtin, int)                   \
    EMU_ATOMIC_FETCH(name, builtin, unsigned)              \
    EMU_ATOMIC_FETCH(name, builtin, unsigned long long)
EMU_ATOMIC_INTS(atomicAdd, __atomic_fetch_add)
EMU_ATOMIC_INTS(atomicSub, __atomic_fetch_sub)
EMU_ATOMIC_INTS(atomicAnd, __atomic_fetch_and)
EMU_ATOMIC_INTS(atomicOr, __atomic_fetch_or)
EMU_ATOMIC_INTS(atomicXor, __atomic_fetch_xor)
EMU_ATOMIC_INTS(atomicExch, __atomic_exchange_n)
#undef EMU_ATOMIC_INTS
#undef EMU_ATOMIC_FETCH

EMU_ATOMIC inline float atomicAdd(float* a, float v) {
    EMU_ATOMIC_HOOK(a);
    return ::emu::detail::atomic_rmw(a, [v](float o) { return o + v; });
}
EMU_ATOMIC inline double atomicAdd(double* a, double v) {
    EMU_ATOMIC_HOOK(a);
    return ::emu::detail::atomic_rmw(a, [v](double o) { return o + v; });
}
EMU_ATOMIC inline float atomicExch(float* a, float v) {
    EMU_ATOMIC_HOOK(a);
    float old;
    __atomic_exchange(a, &v, &old, __ATOMIC_SEQ_CST);
    return old;
}

#define EMU_ATOMIC_MIN_MAX(T)                                                     \
    EMU_ATOMIC inline T atomicMin(T* a, T v) {                                    \
        EMU_ATOMIC_HOOK(a);                                                       \
        return ::emu::detail::atomic_rmw(a, [v](T o) { return v < o ? v : o; }); \
    }                                                                             \
    EMU_ATOMIC inline T atomicMax(T* a, T v) {                                    \
        EMU_ATOMIC_HOOK(a);                                                       \
        return ::emu::detail::atomic_rmw(a, [v](T o) { return o < v ? v : o; }); \
    }
EMU_ATOMIC_MIN_MAX(int)
EMU_ATOMIC_MIN_MAX(unsigned)
EMU_ATOMIC_MIN_MAX(long long)
EMU_ATOMIC_MIN_MAX(unsigned long long)
#undef EMU_ATOMIC_MIN_MAX

EMU_ATOMIC inline unsigned atomicInc(unsigned* a, unsigned limit) {
    EMU_ATOMIC_HOOK(a);
    return ::emu::detail::atomic_rmw(a, [limit](unsigned o) { return o >= limit ? 0u : o + 1u; });
}
EMU_ATOMIC inline unsigned atomicDec(unsigned* a, unsigned limit) {
    EMU_ATOMIC_HOOK(a);
    return ::emu::detail::atomic_rmw(a, [limit](unsigned o) { return (o == 0u || o > limit) ? limit : o - 1u; });
}

template <typename T> EMU_NO_TSAN inline T emu_atomic_cas(T* a, T compare, T value) {
    __atomic_compare_exchange_n(a, &compare, value, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return compare;  // the old value either way
}
EMU_ATOMIC inline int atomicCAS(int* a, int c, int v) {
    EMU_ATOMIC_HOOK(a);
    return emu_atomic_cas(a, c, v);
}
EMU_ATOMIC inline unsigned atomicCAS(unsigned* a, unsigned c, unsigned v) {
    EMU_ATOMIC_HOOK(a);
    return emu_atomic_cas(a, c, v);
}
EMU_ATOMIC inline unsigned long long atomicCAS(unsigned long long* a, unsigned long long c, unsigned long long v) {
    EMU_ATOMIC_HOOK(a);
    return emu_atomic_cas(a, c, v);
}

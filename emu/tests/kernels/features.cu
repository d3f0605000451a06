// Kernels with known answers, one per emulated CUDA feature; checked by
// emu/tests/features.rs. Params structs are mirrored there.
#include "common.cuh"

struct IoParams {
    const int* in;
    int* out;
    int* out2;
};
MB_ASSERT_SIZE(IoParams, 24);

// block_reduce from common.cuh: every thread gets its block's sum.
MB_KERNEL(emu_test_block_sum, IoParams, 256) {
    __shared__ int scratch[256 / WARP];
    const u32 i = blockIdx.x * 256 + threadIdx.x;
    const int total = block_reduce<256>(p.in[i], scratch, Plus{});
    p.out[i] = total;
    if (threadIdx.x == 0) p.out2[blockIdx.x] = total;
}

// block_reduce of a struct, three reductions at once: out[3 * thread ..] is
// what that thread got (sum, OR, minimum), out2[3 * block ..] thread 0's.
struct SumOrMin {
    int sum;
    u32 bits;
    int min;
};
template <int THREADS> __device__ void block_reduce_struct(const IoParams& p) {
    __shared__ SumOrMin scratch[THREADS / WARP];
    const u32 i = blockIdx.x * THREADS + threadIdx.x;
    const int v = p.in[i];
    const SumOrMin mine{v, 1u << (u32(v) % 32), v};
    const SumOrMin total = block_reduce<THREADS>(mine, scratch, [](SumOrMin a, SumOrMin b) {
        return SumOrMin{a.sum + b.sum, a.bits | b.bits, a.min < b.min ? a.min : b.min};
    });
    const int got[3] = {total.sum, int(total.bits), total.min};
    for (int k = 0; k < 3; ++k) {
        p.out[3 * i + k] = got[k];
        if (threadIdx.x == 0) p.out2[3 * blockIdx.x + k] = got[k];
    }
}
// One warp (no second stage) and the selection's 16.
MB_KERNEL(emu_test_block_reduce_32, IoParams, 32) { block_reduce_struct<32>(p); }
MB_KERNEL(emu_test_block_reduce_512, IoParams, 512) { block_reduce_struct<512>(p); }

// Warp collectives in divergent code: only the lanes they name take part.
MB_KERNEL(emu_test_divergent_warp, IoParams, 128) {
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    int v = p.in[threadIdx.x];
    if (warp == 1) {
        v = warp_reduce(v, Plus{});
    } else if (warp == 2) {
        if (lane < 16) v = __shfl_down_sync(0x0000ffffu, v, 1, 16);
    } else if (warp == 3 && lane >= 8) {
        __syncwarp(0xffffff00u);
        v = __shfl_sync(0xffffff00u, v, 8);
    }
    __syncthreads();
    p.out[threadIdx.x] = v;
}

// Shuffles of every kind, width and type. out[case * blockDim.x + thread];
// block of 64 (two warps).
constexpr int SHFL_CASES = 16;
MB_KERNEL(emu_test_shuffles, IoParams, 64) {
    const int t = threadIdx.x, lane = t % WARP, n = blockDim.x;
    const int v = p.in[t];
    int* o = p.out;
    o[0 * n + t] = __shfl_sync(FULL_MASK, v, (lane * 7 + 3) & 31);
    o[1 * n + t] = __shfl_sync(FULL_MASK, v, lane + 5, 8);
    o[2 * n + t] = __shfl_sync(FULL_MASK, v, 40);
    o[3 * n + t] = __shfl_up_sync(FULL_MASK, v, 3);
    o[4 * n + t] = __shfl_up_sync(FULL_MASK, v, 2, 8);
    o[5 * n + t] = __shfl_down_sync(FULL_MASK, v, 5);
    o[6 * n + t] = __shfl_down_sync(FULL_MASK, v, 3, 16);
    o[7 * n + t] = __shfl_xor_sync(FULL_MASK, v, 9);
    o[8 * n + t] = __shfl_xor_sync(FULL_MASK, v, 1, 4);
    o[9 * n + t] = __shfl_xor_sync(FULL_MASK, v, 6, 4);  // may read an earlier group
    o[10 * n + t] = int(__shfl_xor_sync(FULL_MASK, double(v) + 0.25, 16) * 4.0);
    o[11 * n + t] = int(__shfl_down_sync(FULL_MASK, (u64(v) << 33) | 1u, 1) >> 33);
    o[12 * n + t] = int(__shfl_up_sync(FULL_MASK, -i64(v) * 1000000007ll, 1) / 1000000007ll);
    o[13 * n + t] = int(__shfl_sync(FULL_MASK, float(v) + 0.5f, lane ^ 3) * 2.0f);
    o[14 * n + t] = int(__shfl_sync(FULL_MASK, u32(v), 31 - lane));
    // Lanes 8..15 read lanes 16..23, which the mask does not name: poison.
    o[15 * n + t] = lane < 16 ? __shfl_down_sync(0x0000ffffu, v, 8) : -2;
}

// Warp votes; out[case * blockDim.x + thread], block of 64.
MB_KERNEL(emu_test_votes, IoParams, 64) {
    const int t = threadIdx.x, lane = t % WARP, n = blockDim.x;
    int* o = p.out;
    o[0 * n + t] = int(__ballot_sync(FULL_MASK, lane % 3 == 0));
    o[1 * n + t] = __any_sync(FULL_MASK, t == 37);
    o[2 * n + t] = __all_sync(FULL_MASK, t < 48);
    o[3 * n + t] = lane >= 8 ? int(__ballot_sync(0xffffff00u, lane & 1)) : -1;
    o[4 * n + t] = int(__activemask());
    o[5 * n + t] = __popc(0xf0f0u << (t % 8)) + __clz(t) * 100 + __ffs(t << 3) * 10000;
    o[6 * n + t] = int(__brev(u32(t))) ^ __clzll(i64(t) << 20) ^ __popcll(~0ull >> t) ^ (__ffsll(i64(1) << 40) << 8);
}

// Block votes over a block of 100 threads (a partial last warp);
// out[case * 100 + thread].
MB_KERNEL(emu_test_block_votes, IoParams, 100) {
    const int t = threadIdx.x, n = blockDim.x;
    int* o = p.out + blockIdx.x * 4 * n;
    o[0 * n + t] = __syncthreads_count(t % 7 == 0);
    o[1 * n + t] = __syncthreads_or(t == 99 && blockIdx.x == 1);
    o[2 * n + t] = __syncthreads_and(t != 50 || blockIdx.x == 0);
    o[3 * n + t] = __syncthreads_count(1);
}

// Atomics under contention from every block; mirrored as `Counters`.
struct Counters {
    int add_i;
    u32 add_u;
    u64 add_u64;
    float add_f;
    int max_i, min_i;
    u32 max_u, min_u;
    u32 inc, dec;
    i64 max_i64, min_i64;
    u64 max_u64, min_u64;
    int cas_i;
    u32 cas_u;
    u64 cas_u64;
    u32 or_bits, and_bits;
    u32 xor_bits;
    int sub_i;
    int exch_i;
    float exch_f;
};
MB_ASSERT_SIZE(Counters, 120);
struct AtomicParams {
    Counters* c;
    int* tickets;  // [threads], each ticket handed out once
};
MB_KERNEL(emu_test_atomics, AtomicParams, 128) {
    Counters* c = p.c;
    const int g = int(blockIdx.x * blockDim.x + threadIdx.x);
    p.tickets[atomicAdd(&c->add_i, 1)] += 1;
    atomicAdd(&c->add_u, 2u);
    atomicAdd(&c->add_u64, 1ull << 33);
    atomicAdd(&c->add_f, 1.0f);
    const int key = (g * 7919) % 10007 - 5000;
    atomicMax(&c->max_i, key);
    atomicMin(&c->min_i, key);
    atomicMax(&c->max_u, u32(key + 5000));
    atomicMin(&c->min_u, u32(key + 5000));
    atomicInc(&c->inc, 999u);
    atomicDec(&c->dec, 9u);
    atomicMax(&c->max_i64, i64(key) << 32);
    atomicMin(&c->min_i64, i64(key) << 32);
    atomicMax(&c->max_u64, u64(key + 5000) << 32);
    atomicMin(&c->min_u64, u64(key + 5000) << 32);
    // The loops start from a guess, not a plain read of the counter, which
    // would race with the other blocks' atomics.
    for (int old = 0;;) {
        const int seen = atomicCAS(&c->cas_i, old, old + 3);
        if (seen == old) break;
        old = seen;
    }
    for (u32 old = 0;;) {
        const u32 seen = atomicCAS(&c->cas_u, old, old + 1u);
        if (seen == old) break;
        old = seen;
    }
    atomicCAS(&c->cas_u64, u64(g), u64(g) + 1u);  // succeeds only in thread order
    atomicOr(&c->or_bits, 1u << (g % 32));
    atomicAnd(&c->and_bits, ~(1u << (g % 31)));
    atomicXor(&c->xor_bits, 1u << (g % 3));
    atomicSub(&c->sub_i, 2);
    atomicExch(&c->exch_i, g);
    atomicExch(&c->exch_f, 0.5f);
}

// Dynamic shared memory: each block reverses its slice through it.
MB_KERNEL(emu_test_dynamic_shared, IoParams, 1024) {
    MB_DYNAMIC_SHARED(int, s);
    const u32 base = blockIdx.x * blockDim.x, t = threadIdx.x;
    s[t] = p.in[base + t];
    __syncthreads();
    p.out[base + t] = s[blockDim.x - 1 - t];
    if (t == 0) p.out2[blockIdx.x] = int(reinterpret_cast<unsigned long long>(s) % 16);
}

// Multi-dimensional grids and blocks: 6 values per thread, and a warp sum
// over the linear thread index (warps are formed from it).
MB_KERNEL(emu_test_indices, IoParams, 1024) {
    const u32 b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    const u32 t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    const u32 g = b * (blockDim.x * blockDim.y * blockDim.z) + t;
    int* o = p.out + 6 * g;
    o[0] = int(threadIdx.x | threadIdx.y << 8 | threadIdx.z << 16);
    o[1] = int(blockIdx.x | blockIdx.y << 8 | blockIdx.z << 16);
    o[2] = int(blockDim.x | blockDim.y << 8 | blockDim.z << 16);
    o[3] = int(gridDim.x | gridDim.y << 8 | gridDim.z << 16);
    o[4] = warp_reduce(int(t), Plus{});
    o[5] = int(g);
}

// The math functions the kernels use, on floats passed as bits: out[5 i + f]
// for f = expf, exp2f, logf, log1pf, exp2_approx. With the device math
// model on, each may move within CUDA's bound (emu/tests/features.rs).
MB_KERNEL(emu_test_math, IoParams, 64) {
    const u32 i = blockIdx.x * 64 + threadIdx.x;
    const float x = __int_as_float(p.in[i]);
    int* o = p.out + 5 * i;
    o[0] = __float_as_int(expf(x));
    o[1] = __float_as_int(exp2f(x));
    o[2] = __float_as_int(logf(x));
    o[3] = __float_as_int(log1pf(x));
    o[4] = __float_as_int(exp2_approx(x));
}

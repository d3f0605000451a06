// Planted bugs for the checker, each next to its correct twin:
// emu/tests/races.rs checks that each bug is reported with the right kind and
// both lines (found by their MARK comments), and that each twin runs clean.
#include "common.cuh"

struct RaceParams {
    int* out;        // [blocks * threads]
    const int* in;   // [n]
    u32 n;
    u32 variant;     // 0: the correct kernel; 1..: a planted bug
    u32* counter;    // for the last-block reductions
    int* partials;   // [blocks]
};

constexpr int RACE_THREADS = 128;

// Each thread publishes a value, then reads a neighbour's from another warp.
// Variant 1 drops the barrier: thread 32 reads what thread 0 wrote (RAW).
MB_KERNEL(emu_race_missing_barrier, RaceParams, RACE_THREADS) {
    __shared__ int s[RACE_THREADS];
    const u32 t = threadIdx.x;
    s[t] = int(t) * 3;  // MARK:missing_barrier_write
    if (p.variant == 0) __syncthreads();
    p.out[blockIdx.x * blockDim.x + t] = t >= 32 ? s[t - 32] : 0;  // MARK:missing_barrier_read
}

// Two block sums through one scratch array, as block_reduce does. Variant 1
// drops the barrier after the first sum's reads: a fast warp overwrites its
// slot for the second sum while slower warps still read the first (WAR).
MB_KERNEL(emu_race_scratch_reuse, RaceParams, RACE_THREADS) {
    __shared__ int scratch[RACE_THREADS / WARP];
    const u32 lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    int total = 0;
    for (int round = 0; round < 2; ++round) {
        const int v = warp_reduce(int(threadIdx.x) + round, Plus{});
        if (lane == 0) scratch[warp] = v;  // MARK:scratch_write
        __syncthreads();
        total += scratch[lane % (RACE_THREADS / WARP)];  // MARK:scratch_read
        if (p.variant == 0) __syncthreads();
    }
    p.out[blockIdx.x * blockDim.x + threadIdx.x] = total;
}

// Lane 0 writes, the other lanes of its warp read. Variant 0 orders them with
// __syncwarp; variant 1 relies on the warp running in lockstep (RAW), which
// independent thread scheduling (sm_70+) does not promise.
MB_KERNEL(emu_race_warp_synchronous, RaceParams, WARP) {
    __shared__ int s[1];
    if (threadIdx.x == 0) s[0] = 42;  // MARK:warp_write
    if (p.variant == 0) __syncwarp();
    p.out[blockIdx.x * blockDim.x + threadIdx.x] = s[0];  // MARK:warp_read
}

// Two warps of one block write one global element: thread 0 first, then
// thread 32. Variant 0 orders them with a barrier; variant 1 does not (WAW
// within the block: which write lands is up to the warps' schedule).
MB_KERNEL(emu_race_warps_write_global, RaceParams, RACE_THREADS) {
    const u32 t = threadIdx.x;
    if (t == 0) p.out[blockIdx.x] = 1;  // MARK:warps_global_first
    if (p.variant == 0) __syncthreads();
    if (t == 32) p.out[blockIdx.x] = 2;  // MARK:warps_global_second
}

// Thread 0 sets a static __shared__ value that every thread then reads.
// Variant 1 sets it in block 0 only: block 1 reads bytes it never wrote
// (on a GPU, whatever was there; in the emulator, block 0's 7).
MB_KERNEL(emu_race_uninitialised_shared, RaceParams, RACE_THREADS) {
    __shared__ int value;
    if (threadIdx.x == 0 && (p.variant == 0 || blockIdx.x == 0)) value = 7;
    __syncthreads();
    p.out[blockIdx.x * blockDim.x + threadIdx.x] = value;  // MARK:uninitialised_read
}

// Variant 0: each block writes its own element. Variant 1: every block
// writes element 0 (WAW between blocks).
MB_KERNEL(emu_race_blocks_write_write, RaceParams, RACE_THREADS) {
    const u32 i = p.variant == 0 ? blockIdx.x : 0u;
    if (threadIdx.x == 0) p.out[i] = int(blockIdx.x);  // MARK:blocks_write
}

// The last block to finish adds up every block's partial sum, as the loss's
// selection kernel does. Variant 0 is the correct pattern: write, fence,
// atomic; the last block fences, then reads. Variant 1 drops the writer's
// fence, 2 the reader's, 3 reads the earlier blocks' sums before the atomic
// (and reports what the last block read so), 4 takes the block of the
// highest index for the last (right only when it happens to finish last).
MB_KERNEL(emu_race_last_block, RaceParams, RACE_THREADS) {
    __shared__ int partial[RACE_THREADS / WARP];
    __shared__ bool is_last;
    const u32 lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    int v = warp_reduce(int(threadIdx.x + blockIdx.x), Plus{});
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
        int sum = 0;
        for (int w = 0; w < RACE_THREADS / WARP; ++w) sum += partial[w];
        p.partials[blockIdx.x] = sum;  // MARK:last_write
        if (p.variant != 1) __threadfence();
    }
    int early = 0;
    if (p.variant == 3 && threadIdx.x == 0)
        for (u32 b = 0; b < blockIdx.x; ++b) early += p.partials[b];  // MARK:last_early_read
    if (threadIdx.x == 0) {
        const u32 count = atomicAdd(p.counter, 1u);
        // Variant 4 takes the block with the highest index for the last.
        is_last = p.variant == 4 ? blockIdx.x == gridDim.x - 1 : count == gridDim.x - 1;
    }
    __syncthreads();
    if (!is_last) return;
    if (p.variant != 2) __threadfence();
    if (threadIdx.x == 0) {
        int total = 0;
        for (u32 b = 0; b < gridDim.x; ++b) total += p.partials[b];  // MARK:last_read
        p.out[0] = p.variant == 3 ? early : total;
        *p.counter = 0;
    }
}

// Reads `in[0..n)`; variant 1 reads one element more (past its region).
MB_KERNEL(emu_race_bounds, RaceParams, RACE_THREADS) {
    const u32 end = p.n + (p.variant == 1 ? 1u : 0u);
    int sum = 0;
    for (u32 i = threadIdx.x; i < end; i += blockDim.x) sum += p.in[i];  // MARK:bounds_read
    p.out[blockIdx.x * blockDim.x + threadIdx.x] = sum;
}

// A 16-byte load from `in` and a 16-byte store to shared memory, a word a
// thread. Variant 1 loads 4 bytes past a 16-byte boundary, variant 2
// stores 8 bytes past one: a GPU faults on either, though a CPU would not.
MB_KERNEL(emu_race_misaligned, RaceParams, RACE_THREADS) {
    __shared__ __align__(16) u32 words[4 * (RACE_THREADS + 1)];
    // Volatile, so that the host compiler cannot drop a skew it could prove
    // makes the access misaligned (undefined behaviour for it).
    volatile u32 load_skew = p.variant == 1 ? 4u : 0u, store_skew = p.variant == 2 ? 8u : 0u;
    const unsigned long long first = (reinterpret_cast<unsigned long long>(p.in) + 15ull) & ~15ull;
    const uint4* from = reinterpret_cast<const uint4*>(first + load_skew) + threadIdx.x;
    const uint4 v = *from;  // MARK:misaligned_load
    uint4* to = reinterpret_cast<uint4*>(reinterpret_cast<unsigned char*>(words) + store_skew) + threadIdx.x;
    *to = v;  // MARK:misaligned_store
    p.out[blockIdx.x * blockDim.x + threadIdx.x] = int(v.x);
}

// ---------------------------------------------------------------------------
// Traffic: patterns with known sector and bank counts.

// out[i] = in[i]: 32 lanes x 4 bytes = 4 sectors per request, all used.
MB_KERNEL(emu_traffic_copy, RaceParams, RACE_THREADS) {
    const u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < p.n) p.out[i] = p.in[i];
}

// out[i] = in[32 i]: every lane in its own sector, 4 of 32 bytes used.
MB_KERNEL(emu_traffic_gather, RaceParams, RACE_THREADS) {
    const u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < p.n) p.out[i] = p.in[32 * i];
}

// Lane l reads word 32 l of shared memory: all 32 in bank 0, 32 ways.
// Variant 1 reads word 33 l: one word per bank, 1 way.
MB_KERNEL(emu_traffic_banks, RaceParams, WARP) {
    __shared__ int s[WARP * 33];
    for (u32 i = threadIdx.x; i < WARP * 33; i += WARP) s[i] = int(i);
    __syncwarp();
    const u32 stride = p.variant == 0 ? 32u : 33u;
    p.out[blockIdx.x * blockDim.x + threadIdx.x] = s[threadIdx.x * stride];
}

// Every thread adds to one counter: as many atomics on it as threads.
MB_KERNEL(emu_traffic_atomics, RaceParams, RACE_THREADS) {
    atomicAdd(p.counter, 1u);
    p.out[blockIdx.x * blockDim.x + threadIdx.x] = 0;
}

// Three spans of 40 elements, a warp-strided loop each: lanes 0..7 store
// twice per span, the rest once. __syncwarp after each span reconverges
// the warp, so each span is two requests: 32 lanes, then 8.
MB_KERNEL(emu_traffic_ragged, RaceParams, WARP) {
    for (u32 s = 0; s < 3; ++s) {
        for (u32 i = threadIdx.x; i < 40; i += WARP) p.out[s * 64 + i] = int(i);
        __syncwarp();
    }
}

// 16-byte vector copies: 32 lanes x 16 bytes = 16 sectors per request.
MB_KERNEL(emu_traffic_vector, RaceParams, RACE_THREADS) {
    const u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < p.n / 4) reinterpret_cast<uint4*>(p.out)[i] = reinterpret_cast<const uint4*>(p.in)[i];
}

// The block primitives promise that their scratch may be reused once they
// return: thread 0 overwrites it at once after each one (then a barrier
// hands it to the next). Without their closing barriers, that write races
// with slower warps still reading.
MB_KERNEL(emu_race_primitives_reuse_scratch, RaceParams, RACE_THREADS) {
    __shared__ u32 scratch[RACE_THREADS / WARP + 1];
    auto reuse = [&] {
        if (threadIdx.x == 0)
            for (u32 i = 0; i <= RACE_THREADS / WARP; ++i) scratch[i] = 0xdeadu;
        __syncthreads();
    };
    u32 total;
    const u32 before = block_exclusive_scan<RACE_THREADS>(1u, scratch, &total);
    reuse();
    const u32 bits = block_reduce<RACE_THREADS>(1u << (threadIdx.x % 32), scratch, BitOr{});
    reuse();
    const u32 sum = block_reduce<RACE_THREADS>(u32(threadIdx.x), scratch, Plus{});
    reuse();
    u32* out = reinterpret_cast<u32*>(p.out) + 4 * (blockIdx.x * blockDim.x + threadIdx.x);
    out[0] = before;
    out[1] = total;
    out[2] = bits;
    out[3] = sum;
}

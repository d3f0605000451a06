// Kernels that break CUDA's rules; emu/tests/faults.rs checks that each
// launch fails with an error naming the kernel, block and barrier (it finds
// the barrier's line by the MARK comment).
#include "common.cuh"

struct FaultParams {
    int* out;
};

// Each thread of the grid writes its own element: the faults below are the
// only thing wrong with these kernels (no race between blocks).
__device__ __forceinline__ u32 global_thread() {
    return (blockIdx.x + gridDim.x * blockIdx.y) * blockDim.x + threadIdx.x;
}

// Block 1: threads 16.. exit while 0..15 wait.
MB_KERNEL(emu_fault_partial_syncthreads, FaultParams, 32) {
    if (blockIdx.x == 0 || threadIdx.x < 16) __syncthreads();  // MARK:partial_syncthreads
    p.out[global_thread()] = 1;
}

// Two different __syncthreads: never the same barrier.
MB_KERNEL(emu_fault_split_syncthreads, FaultParams, 64) {
    if (threadIdx.x < 16) {
        __syncthreads();  // MARK:split_a
    } else {
        __syncthreads();  // MARK:split_b
    }
    p.out[threadIdx.x] = 1;
}

// Lanes 16..31 never reach the shuffle that names them.
MB_KERNEL(emu_fault_partial_shuffle, FaultParams, 64) {
    int v = int(threadIdx.x);
    if (threadIdx.x % WARP < 16) v = __shfl_xor_sync(FULL_MASK, v, 1);  // MARK:partial_shuffle
    p.out[threadIdx.x] = v;
}

// Lane 0 names lanes 0-1, lane 1 names the whole warp: mismatched masks.
MB_KERNEL(emu_fault_mask_mismatch, FaultParams, 32) {
    const u32 mask = threadIdx.x == 0 ? 0x3u : FULL_MASK;
    p.out[threadIdx.x] = __shfl_sync(mask, int(threadIdx.x), 0);  // MARK:mask_mismatch
}

// Warp 0 waits at a shuffle, warp 1 at __syncthreads.
MB_KERNEL(emu_fault_warp_vs_block, FaultParams, 64) {
    if (threadIdx.x < 32) {
        if (threadIdx.x != 5) p.out[threadIdx.x] = warp_reduce(1, Plus{});
    } else {
        __syncthreads();
    }
}

MB_KERNEL(emu_fault_bad_width, FaultParams, 32) {
    p.out[threadIdx.x] = __shfl_sync(FULL_MASK, 1, 0, 12);  // MARK:bad_width
}

MB_KERNEL(emu_fault_mask_without_self, FaultParams, 32) {
    p.out[threadIdx.x] = int(__ballot_sync(0x1u, 1));  // MARK:without_self
}

MB_KERNEL(emu_fault_trap, FaultParams, 32) {
    if (threadIdx.x == 7 && blockIdx.y == 1) __trap();  // MARK:trap
    p.out[global_thread()] = 1;
}

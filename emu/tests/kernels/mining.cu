// multibox.cuh's arithmetic that the selection kernel relies on, launched
// one value per thread (emu/tests/mining.rs compares it with f64).
#include "multibox.cuh"

struct FloorParams {
    const float* ratios;
    const u32* positives;
    u64* out;
    u32 n;
};

MB_KERNEL(emu_test_floor_ratio_times, FloorParams, 256) {
    const u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < p.n) p.out[i] = floor_ratio_times(p.ratios[i], p.positives[i]);
}

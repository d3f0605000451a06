// Deliberately broken: writes one element past the end of its output. Only
// compiled with MULTIBOX_EMU_SANITIZE=address MULTIBOX_EMU_ASAN_DEMO=1, to
// show that an ASan build catches out-of-bounds accesses (emu/README.md).
#include "common.cuh"

struct OobParams {
    int* out;
    u32 n;
    u32 unused;
};

MB_KERNEL(emu_asan_oob_write, OobParams, 64) {
    const u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i <= p.n) p.out[i] = 1;  // BUG on purpose: `<=` writes out[n]
}

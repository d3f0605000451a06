// The packed half instructions of common.cuh (max.{bf16,f16}x2 and
// fma.rn.{bf16,f16}x2 with b = 0) as the emulator computes them, over
// pairs of words; emu/tests/halfs.rs holds them to PTX's definitions. Built
// as sm_90, the only architecture that has them.
#define MULTIBOX_EMU_SM 90
#include "common.cuh"

struct PackedParams {
    const u32* a;
    const u32* b;
    u32* out;  // per pair: max bf16, max f16, a * 0 + b bf16, a * 0 + b f16
    u32 n;
    u32 unused;
};
MB_ASSERT_SIZE(PackedParams, 32);

MB_KERNEL(emu_test_packed_halves, PackedParams, 64) {
    const u32 i = blockIdx.x * 64 + threadIdx.x;
    if (i >= p.n) return;
    const bf16* b16 = nullptr;
    const f16* f16p = nullptr;
    u32* o = p.out + 4 * i;
    o[0] = max2(b16, p.a[i], p.b[i]);
    o[1] = max2(f16p, p.a[i], p.b[i]);
    o[2] = times_zero_plus(b16, p.a[i], p.b[i]);
    o[3] = times_zero_plus(f16p, p.a[i], p.b[i]);
}

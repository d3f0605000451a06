// The f16 / bf16 conversions of common.cuh, element-wise over an array;
// emu/tests/halfs.rs compares them with the `half` crate bit for bit.
#include "common.cuh"

struct ConvertParams {
    const void* in;
    void* out;
    u32 n;
    u32 unused;
};
MB_ASSERT_SIZE(ConvertParams, 24);

template <typename From, typename To> __device__ void convert(const ConvertParams& p) {
    const From* in = static_cast<const From*>(p.in);
    To* out = static_cast<To*>(p.out);
    for (u32 i = blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += gridDim.x * blockDim.x) {
        if constexpr (std::is_same<To, float>::value) {
            out[i] = to_f32(in[i]);
        } else {
            out[i] = from_f32<To>(in[i]);
        }
    }
}

MB_KERNEL(emu_test_f16_to_f32, ConvertParams, 256) { convert<f16, float>(p); }
MB_KERNEL(emu_test_bf16_to_f32, ConvertParams, 256) { convert<bf16, float>(p); }
MB_KERNEL(emu_test_f32_to_f16, ConvertParams, 256) { convert<float, f16>(p); }
MB_KERNEL(emu_test_f32_to_bf16, ConvertParams, 256) { convert<float, bf16>(p); }

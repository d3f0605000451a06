// Per-row log-sum-exp: lse[r] = log(sum_c exp(x[r, c])). A small kernel on
// common.cuh's half loads and warp reductions, written like the loss
// kernels, with an answer a test can compute independently.
#include "common.cuh"

struct LseParams {
    const void* logits;  // [rows, classes] of T
    float* lse;          // [rows]
    u32 rows;
    u32 classes;
};
MB_ASSERT_SIZE(LseParams, 24);

constexpr int LSE_THREADS = 256;

// One warp per row: the row maximum first, so exp never overflows, then the
// sum of exp(x - max). Classes are read with stride 32 so a warp's loads are
// contiguous.
template <typename T> __device__ void logsumexp_rows(const LseParams& p) {
    const T* logits = static_cast<const T*>(p.logits);
    const u32 lane = threadIdx.x % WARP;
    const u32 row = (blockIdx.x * LSE_THREADS + threadIdx.x) / WARP;
    if (row >= p.rows) return;  // the whole warp leaves together
    const T* x = logits + u64(row) * p.classes;
    float m = NEG_INF;
    for (u32 c = lane; c < p.classes; c += WARP) m = fmaxf(m, to_f32(x[c]));
    m = warp_max(m);
    float s = 0.0f;
    for (u32 c = lane; c < p.classes; c += WARP) s += expf(to_f32(x[c]) - m);
    s = warp_reduce(s, Plus{});
    if (lane == 0) p.lse[row] = m + logf(s);
}

MB_KERNEL(multibox_logsumexp_f32, LseParams, LSE_THREADS) { logsumexp_rows<float>(p); }
MB_KERNEL(multibox_logsumexp_f16, LseParams, LSE_THREADS) { logsumexp_rows<f16>(p); }
MB_KERNEL(multibox_logsumexp_bf16, LseParams, LSE_THREADS) { logsumexp_rows<bf16>(p); }

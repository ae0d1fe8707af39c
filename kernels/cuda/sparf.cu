// SparF channel-subset scoring: the CUDA twin of sparf_scores in
// kernels/src/sparf.rs. K stored dim-major, Kt [d][n] (f32/f16/bf16); for
// the group's heads q [heads][d] (heads <= SPARF_MAX_HEADS) and the chosen
// channels [r]:
//   out[t] = scale * max_h sum_{ci < r} q[h][channels[ci]] * Kt[channels[ci]][t]
// accumulated in channel order (a channel >= d is skipped). One thread per
// token: each channel row is read coalesced across the block. Dynamic
// shared memory: heads * r floats.
#include "common.cuh"

#define SPARF_MAX_HEADS 16

template <typename E>
__device__ void sparf_scores(const float* __restrict__ q, int heads, int d,
                             const typename E::T* __restrict__ kt, int n,
                             const u32* __restrict__ channels, int r, float scale,
                             float* __restrict__ out) {
    extern __shared__ float qsel[];
    for (int i = threadIdx.x; i < heads * r; i += blockDim.x) {
        const int h = i / r, ci = i - h * r;
        const u32 c = channels[ci];
        qsel[i] = c < (u32)d ? q[h * d + c] : 0.f;
    }
    __syncthreads();
    const long t = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= n) return;
    float acc[SPARF_MAX_HEADS];
#pragma unroll
    for (int h = 0; h < SPARF_MAX_HEADS; ++h) acc[h] = 0.f;
    for (int ci = 0; ci < r; ++ci) {
        const u32 c = channels[ci];
        if (c >= (u32)d) continue;
        const float x = E::ld(kt, (long)c * n + t);
#pragma unroll
        for (int h = 0; h < SPARF_MAX_HEADS; ++h) {
            if (h < heads) acc[h] = fmaf(qsel[h * r + ci], x, acc[h]);
        }
    }
    float best = acc[0];
#pragma unroll
    for (int h = 1; h < SPARF_MAX_HEADS; ++h) {
        if (h < heads) best = fmaxf(best, acc[h]);
    }
    out[t] = best * scale;
}

#define SPARF_SCORES(S, E)                                                                 \
    extern "C" __global__ void sparf_scores_##S(const float* q, int heads, int d,            \
                                                const E::T* kt, int n, const u32* channels, \
                                                int r, float scale, float* out) {           \
        sparf_scores<E>(q, heads, d, kt, n, channels, r, scale, out);                       \
    }
STRATA_FOR_TYPES(SPARF_SCORES)

// Chunk abstracts of keys and their upper bound: the CUDA twin of
// kernels/src/abstracts.rs. K [n][d] (f32/f16/bf16) in chunks of `chunk`
// tokens; per chunk three f16 rows [chunks][d]: min rounded toward -inf,
// max rounded toward +inf, mean (f32 sum in token order / count) rounded to
// nearest. UB_j(q) = sum_i max(q_i * max[j][i], q_i * min[j][i]) >= q.k for
// every key k of chunk j.
#include "common.cuh"

// Grid: one block per chunk; threads over channels (coalesced per token).
template <typename E>
__device__ void chunk_abstracts(const typename E::T* __restrict__ k, int n, int d, int chunk,
                                u16* __restrict__ mn, u16* __restrict__ mx, u16* __restrict__ mean) {
    const int j = blockIdx.x;
    const int start = j * chunk, end = min(n, start + chunk);
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        float lo = STRATA_POS_INF, hi = STRATA_NEG_INF, sum = 0.f;
        for (int t = start; t < end; ++t) {
            const float x = E::ld(k, (long)t * d + c);
            lo = fminf(lo, x);
            hi = fmaxf(hi, x);
            sum += x;
        }
        const long o = (long)j * d + c;
        mn[o] = f32_to_f16_rm(lo);
        mx[o] = f32_to_f16_rp(hi);
        mean[o] = f32_to_f16_rn(sum / (float)(end - start));
    }
}

#define CHUNK_ABSTRACTS(S, E)                                                           \
    extern "C" __global__ void chunk_abstracts_##S(const E::T* k, int n, int d, int chunk, \
                                                  u16* mn, u16* mx, u16* mean) {        \
        chunk_abstracts<E>(k, n, d, chunk, mn, mx, mean);                                \
    }
STRATA_FOR_TYPES(CHUNK_ABSTRACTS)

// out [heads][chunks]. One warp per (head, chunk); lanes over channels.
extern "C" __global__ void chunk_upper_bounds(const float* __restrict__ q, int heads, int d,
                                              const u16* __restrict__ mn,
                                              const u16* __restrict__ mx, int chunks,
                                              float* __restrict__ out) {
    const long w = ((long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (w >= (long)heads * chunks) return;  // whole warps only
    const int h = (int)(w / chunks), j = (int)(w - (long)h * chunks);
    float s = 0.f;
    for (int c = lane; c < d; c += 32) {
        const float a = q[h * d + c];
        const float x = a * f16_to_f32(mx[(long)j * d + c]);
        const float y = a * f16_to_f32(mn[(long)j * d + c]);
        s += fmaxf(x, y);
    }
    s = warp_sum(s);
    if (lane == 0) out[(long)h * chunks + j] = s;
}

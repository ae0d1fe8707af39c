// Key sketches: the CUDA twins of kernels/src/sketch.rs.
//
// sketch_encode_{f32,f16,bf16}: KV head `head` of token-major keys
// k [n][kv_heads][d] to 8-bit codes [d][stride] (token t of channel i at
// codes[i * stride + t]) against the box lo, hi [d]:
//   code = clamp(floor((x - lo) / step + 0.5), 0, 255),
//   step = (hi - lo) * (1/255) when finite and > 0, else 0 (code 0).
// One thread per (channel, token); slots from n to stride are not written.
//
// sketch_scores: the group scores of `nb` blocks of `n` tokens at once
// (codes [nb][d][stride], the boxes of the chosen channels lo, hi
// [nb][r]): for block b and token t,
//   out[b * n + t] = scale * max_h (sum_ci q[h][c] lo[ci]
//                                   + sum_ci q[h][c] step[ci] code[c][t])
// with c = channels[ci], summed in channel order as the CPU does (the
// CPU splits the same sum into a base and a coded part, so results agree
// to rounding). A block whose chosen boxes are not all finite gets -inf
// scores and ok[b] = 0 (the caller scores it from its keys). One thread
// per (block, token); heads <= SKETCH_MAX_HEADS.
//
// span_lse: the log-sum-exp of each span (start, len) of scores, -inf for
// an empty span or one of -inf scores. One thread per span.
//
// run_upper_bounds: LeoAM's bound of blocks b0..b0 + nb of a run whose
// boxes are channel-major (lo, hi [d][cap], f16 bits):
//   out[h * nb + b] = sum_c max(q[h][c] * hi[c][b0 + b], q[h][c] * lo[c][b0 + b])
// summed in channel order, products rounded apart, as the CPU does (the
// same bits). One thread per (head, block); neighbouring threads read
// neighbouring blocks of a channel.
#include "common.cuh"

#define SKETCH_MAX_HEADS 16

__device__ __forceinline__ float sketch_step(float lo, float hi) {
    const float w = hi - lo;
    return (isfinite(w) && w > 0.f) ? w * (1.f / 255.f) : 0.f;
}

template <typename E>
__device__ void sketch_encode(const typename E::T* __restrict__ k, int n, int kv_heads, int head,
                              int d, const float* __restrict__ lo, const float* __restrict__ hi,
                              int stride, u8* __restrict__ codes) {
    const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)n * d) return;
    const int t = (int)(i / d), c = (int)(i - (long)t * d);
    const float x = E::ld(k, ((long)t * kv_heads + head) * d + c);
    const float s = sketch_step(lo[c], hi[c]);
    float q = 0.f;
    if (s > 0.f) q = fminf(fmaxf(floorf((x - lo[c]) / s + 0.5f), 0.f), 255.f);
    codes[(long)c * stride + t] = (u8)q;
}

#define SKETCH_ENCODE(S, E)                                                                     \
    extern "C" __global__ void sketch_encode_##S(const E::T* k, int n, int kv_heads, int head,   \
                                                 int d, const float* lo, const float* hi,       \
                                                 int stride, u8* codes) {                       \
        sketch_encode<E>(k, n, kv_heads, head, d, lo, hi, stride, codes);                       \
    }
STRATA_FOR_TYPES(SKETCH_ENCODE)

extern "C" __global__ void sketch_scores(const float* __restrict__ q, int heads, int d,
                                         const u8* __restrict__ codes, int nb, int n, int stride,
                                         const float* __restrict__ lo,
                                         const float* __restrict__ hi,
                                         const u32* __restrict__ channels, int r, float scale,
                                         float* __restrict__ out, u8* __restrict__ ok) {
    const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)nb * n) return;
    const int b = (int)(i / n), t = (int)(i - (long)b * n);
    const float* blo = lo + (long)b * r;
    const float* bhi = hi + (long)b * r;
    bool finite = true;
    for (int ci = 0; ci < r; ++ci) finite = finite && isfinite(blo[ci]) && isfinite(bhi[ci]);
    if (t == 0) ok[b] = finite ? 1 : 0;
    if (!finite) {
        out[i] = STRATA_NEG_INF;
        return;
    }
    float base[SKETCH_MAX_HEADS], acc[SKETCH_MAX_HEADS];
#pragma unroll
    for (int h = 0; h < SKETCH_MAX_HEADS; ++h) base[h] = acc[h] = 0.f;
    const u8* bc = codes + (long)b * d * stride;
    for (int ci = 0; ci < r; ++ci) {
        const u32 c = channels[ci];
        const float s = sketch_step(blo[ci], bhi[ci]);
        const float x = (float)bc[(long)c * stride + t];
#pragma unroll
        for (int h = 0; h < SKETCH_MAX_HEADS; ++h) {
            if (h < heads) {
                const float qc = q[h * d + c];
                base[h] = fmaf(qc, blo[ci], base[h]);
                acc[h] = fmaf(qc * s, x, acc[h]);
            }
        }
    }
    float best = base[0] + acc[0];
#pragma unroll
    for (int h = 1; h < SKETCH_MAX_HEADS; ++h) {
        if (h < heads) best = fmaxf(best, base[h] + acc[h]);
    }
    out[i] = best * scale;
}

extern "C" __global__ void span_lse(const float* __restrict__ scores,
                                    const u64* __restrict__ spans, int count,
                                    float* __restrict__ out) {
    const int s = blockIdx.x * blockDim.x + threadIdx.x;
    if (s >= count) return;
    const long start = (long)spans[2 * s], len = (long)spans[2 * s + 1];
    float m = STRATA_NEG_INF;
    for (long j = 0; j < len; ++j) m = fmaxf(m, scores[start + j]);
    if (m == STRATA_NEG_INF) {
        out[s] = m;
        return;
    }
    float sum = 0.f;
    for (long j = 0; j < len; ++j) sum += __expf(scores[start + j] - m);
    out[s] = m + __logf(sum);
}

extern "C" __global__ void run_upper_bounds(const float* __restrict__ q, int heads, int d,
                                            const u16* __restrict__ lo,
                                            const u16* __restrict__ hi, int cap, int b0, int nb,
                                            float* __restrict__ out) {
    const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)heads * nb) return;
    const int h = (int)(i / nb), b = (int)(i - (long)h * nb);
    float s = 0.f;
    for (int c = 0; c < d; ++c) {
        const float a = q[h * d + c];
        const long at = (long)c * cap + b0 + b;
        const float x = __fmul_rn(a, f16_to_f32(hi[at]));
        const float y = __fmul_rn(a, f16_to_f32(lo[at]));
        s = __fadd_rn(s, x > y ? x : y);
    }
    out[i] = s;
}

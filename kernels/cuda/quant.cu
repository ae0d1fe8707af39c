// int8 / int4 per-channel asymmetric quantisation of a [n][d] tile: the
// CUDA twin of kernels/src/quant.rs. Per channel c: lo = min, step =
// (max - min) / L (L = 255 or 15); code = rint(clamp((x - lo) * inv, 0, L))
// with inv = 1/step (0 when step = 0); x' = lo + code * step. int8 codes
// [n][d]; int4 codes [n][d/2], channel 2j in the low nibble of byte j.
#include "common.cuh"

// One thread per channel (coalesced across channels for each token).
template <typename E>
__device__ void quant_params(const typename E::T* __restrict__ x, int n, int d, float levels,
                             float* __restrict__ lo, float* __restrict__ step) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= d) return;
    float a = STRATA_POS_INF, b = STRATA_NEG_INF;
    for (int t = 0; t < n; ++t) {
        const float v = E::ld(x, (long)t * d + c);
        a = fminf(a, v);
        b = fmaxf(b, v);
    }
    lo[c] = a;
    step[c] = (b - a) / levels;
}

__device__ __forceinline__ u32 quant_code(float x, float lo, float step, float levels) {
    const float inv = step > 0.f ? 1.f / step : 0.f;
    const float y = fminf(fmaxf((x - lo) * inv, 0.f), levels);
    return (u32)rintf(y);
}

// One thread per code byte.
template <typename E>
__device__ void quantize_int8(const typename E::T* __restrict__ x, int n, int d,
                              const float* __restrict__ lo, const float* __restrict__ step,
                              u8* __restrict__ codes) {
    const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)n * d) return;
    const int c = (int)(i % d);
    codes[i] = (u8)quant_code(E::ld(x, i), lo[c], step[c], 255.f);
}

template <typename E>
__device__ void quantize_int4(const typename E::T* __restrict__ x, int n, int d,
                              const float* __restrict__ lo, const float* __restrict__ step,
                              u8* __restrict__ codes) {
    const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    const int half = d / 2;
    if (i >= (long)n * half) return;
    const long t = i / half;
    const int c = 2 * (int)(i - t * half);
    const u32 a = quant_code(E::ld(x, t * d + c), lo[c], step[c], 15.f);
    const u32 b = quant_code(E::ld(x, t * d + c + 1), lo[c + 1], step[c + 1], 15.f);
    codes[i] = (u8)(a | (b << 4));
}

#define QUANT(S, E)                                                                           \
    extern "C" __global__ void quant_params_##S(const E::T* x, int n, int d, float levels,     \
                                                float* lo, float* step) {                     \
        quant_params<E>(x, n, d, levels, lo, step);                                           \
    }                                                                                         \
    extern "C" __global__ void quantize_int8_##S(const E::T* x, int n, int d, const float* lo, \
                                                 const float* step, u8* codes) {              \
        quantize_int8<E>(x, n, d, lo, step, codes);                                           \
    }                                                                                         \
    extern "C" __global__ void quantize_int4_##S(const E::T* x, int n, int d, const float* lo, \
                                                 const float* step, u8* codes) {              \
        quantize_int4<E>(x, n, d, lo, step, codes);                                           \
    }
STRATA_FOR_TYPES(QUANT)

// One thread per output element.
extern "C" __global__ void dequantize_int8(const u8* __restrict__ codes, int n, int d,
                                           const float* __restrict__ lo,
                                           const float* __restrict__ step,
                                           float* __restrict__ out) {
    const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)n * d) return;
    const int c = (int)(i % d);
    out[i] = lo[c] + (float)codes[i] * step[c];
}

extern "C" __global__ void dequantize_int4(const u8* __restrict__ codes, int n, int d,
                                           const float* __restrict__ lo,
                                           const float* __restrict__ step,
                                           float* __restrict__ out) {
    const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)n * d) return;
    const int c = (int)(i % d);
    const u8 b = codes[i / 2];  // d is even: byte i/2 holds channels c & ~1 and c | 1
    const u32 code = (c & 1) ? (b >> 4) : (b & 15);
    out[i] = lo[c] + (float)code * step[c];
}

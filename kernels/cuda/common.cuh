// Shared by Strata's CUDA kernel families (kernels/cuda/*.cu): element
// loads, f16 rounding, warp reductions. Self-contained (no CUDA headers), so
// that NVRTC compiles it without include paths; the Rust side splices this
// file in where a .cu file includes it.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define STRATA_NEG_INF __int_as_float(0xff800000)
#define STRATA_POS_INF __int_as_float(0x7f800000)

__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ float bf16_to_f32(u16 h) {
    return __uint_as_float(((u32)h) << 16);
}

// f32 -> f16 to nearest even, toward -inf, toward +inf.
__device__ __forceinline__ u16 f32_to_f16_rn(float x) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
    return h;
}

__device__ __forceinline__ u16 f32_to_f16_rm(float x) {
    u16 h;
    asm("cvt.rm.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
    return h;
}

__device__ __forceinline__ u16 f32_to_f16_rp(float x) {
    u16 h;
    asm("cvt.rp.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
    return h;
}

// Stored element types of K and V; `ld` widens to f32 (exact).
struct F32 {
    typedef float T;
    static __device__ __forceinline__ float ld(const float* p, long i) { return p[i]; }
};
struct F16 {
    typedef u16 T;
    static __device__ __forceinline__ float ld(const u16* p, long i) { return f16_to_f32(p[i]); }
};
struct BF16 {
    typedef u16 T;
    static __device__ __forceinline__ float ld(const u16* p, long i) { return bf16_to_f32(p[i]); }
};

// Instantiates M(suffix, type) for the three element types; kernel names
// end in _f32, _f16, _bf16 (KvElem::NAME on the Rust side).
#define STRATA_FOR_TYPES(M) M(f32, F32) M(f16, F16) M(bf16, BF16)

__device__ __forceinline__ float warp_sum(float x) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

__device__ __forceinline__ float warp_max(float x) {
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}

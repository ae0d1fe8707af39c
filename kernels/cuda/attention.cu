// Partial attention of a GQA group over one KV head, and the exact
// log-sum-exp merge: the CUDA twin of kernels/src/attention.rs (same math,
// same layouts: q [heads][d] f32; K, V [n][d] f32/f16/bf16; o [heads][d],
// lse [heads] f32; empty set -> lse = -inf, o = 0).
//
// attn_partial_<type>: split-K. Block b covers token positions
// [b * per_block, min(count, (b + 1) * per_block)) in tiles of `tile`
// tokens (K and V tiles widened to f32 in shared memory, read once for all
// heads), runs the online softmax per head and writes its partial
// o_part [blocks][heads][d], lse_part [blocks][heads]. attn_merge_splits
// then merges the blocks' partials per head.
//
// Token selection (`mode`): 0 = rows 0..count; 1 = the same, row t only when
// bit t % 64 of mask[t / 64] is set; 2 = position j is row rows[j] (a row
// >= n is skipped: the device never reads out of bounds, where the CPU twin
// asserts).
//
// Shared memory (floats): heads*d (q) + tile*(d+1) (K, padded against bank
// conflicts) + tile*d (V) + heads*tile (scores) + heads*d (acc) + 3*heads,
// then tile ints.
#include "common.cuh"

template <typename E>
__device__ void attn_partial(const float* __restrict__ q, const typename E::T* __restrict__ k,
                             const typename E::T* __restrict__ v, int n, int heads, int d, float scale,
                             int mode, const u64* __restrict__ mask, const u32* __restrict__ rows,
                             int count, int per_block, int tile, float* __restrict__ o_part,
                             float* __restrict__ lse_part) {
    extern __shared__ float smem[];
    const int kstride = d + 1;
    float* qs = smem;
    float* ks = qs + heads * d;
    float* vs = ks + tile * kstride;
    float* sc = vs + tile * d;
    float* acc = sc + heads * tile;
    float* m = acc + heads * d;
    float* l = m + heads;
    float* alpha = l + heads;
    int* valid = (int*)(alpha + heads);

    const int tid = threadIdx.x, nt = blockDim.x;
    const int lane = tid & 31, warp = tid >> 5, nwarps = nt >> 5;
    const int begin = blockIdx.x * per_block;
    const int end = min(count, begin + per_block);

    for (int i = tid; i < heads * d; i += nt) {
        qs[i] = q[i];
        acc[i] = 0.f;
    }
    for (int h = tid; h < heads; h += nt) {
        m[h] = STRATA_NEG_INF;
        l[h] = 0.f;
    }
    __syncthreads();

    for (int t0 = begin; t0 < end; t0 += tile) {
        const int len = min(tile, end - t0);
        for (int j = tid; j < tile; j += nt) {
            int ok = 0;
            if (j < len) {
                const int pos = t0 + j;
                if (mode == 1) ok = (mask[pos >> 6] >> (pos & 63)) & 1ull;
                else if (mode == 2) ok = rows[pos] < (u32)n;
                else ok = 1;
            }
            valid[j] = ok;
        }
        __syncthreads();
        for (int i = tid; i < len * d; i += nt) {
            const int j = i / d, c = i - j * d;
            float kx = 0.f, vx = 0.f;
            if (valid[j]) {
                const long row = mode == 2 ? (long)rows[t0 + j] : (long)(t0 + j);
                kx = E::ld(k, row * d + c);
                vx = E::ld(v, row * d + c);
            }
            ks[j * kstride + c] = kx;
            vs[j * d + c] = vx;
        }
        __syncthreads();

        for (int i = tid; i < heads * tile; i += nt) {
            const int h = i / tile, j = i - h * tile;
            float s = STRATA_NEG_INF;
            if (j < len && valid[j]) {
                const float* qh = qs + h * d;
                const float* kj = ks + j * kstride;
                float dot = 0.f;
                for (int c = 0; c < d; ++c) dot = fmaf(qh[c], kj[c], dot);
                s = dot * scale;
            }
            sc[i] = s;
        }
        __syncthreads();

        // One warp per head: running max, weights, running sum.
        for (int h = warp; h < heads; h += nwarps) {
            float* sh = sc + h * tile;
            float mx = STRATA_NEG_INF;
            for (int j = lane; j < len; j += 32) mx = fmaxf(mx, sh[j]);
            mx = warp_max(mx);
            const float m_old = m[h];
            const float m_new = fmaxf(m_old, mx);
            float a = 1.f, sum = 0.f;
            if (m_new != STRATA_NEG_INF) {
                a = expf(m_old - m_new);  // m_old = -inf gives 0
                for (int j = lane; j < len; j += 32) {
                    const float p = expf(sh[j] - m_new);  // masked (-inf) gives 0
                    sh[j] = p;
                    sum += p;
                }
            } else {
                for (int j = lane; j < len; j += 32) sh[j] = 0.f;
            }
            sum = warp_sum(sum);
            if (lane == 0) {
                l[h] = l[h] * a + sum;
                m[h] = m_new;
                alpha[h] = a;
            }
        }
        __syncthreads();

        for (int i = tid; i < heads * d; i += nt) {
            const int h = i / d, c = i - h * d;
            const float* p = sc + h * tile;
            float o = acc[i] * alpha[h];
            for (int j = 0; j < len; ++j) o = fmaf(p[j], vs[j * d + c], o);
            acc[i] = o;
        }
        __syncthreads();
    }

    const long base = (long)blockIdx.x * heads;
    for (int i = tid; i < heads * d; i += nt) {
        const float lh = l[i / d];
        o_part[base * d + i] = lh > 0.f ? acc[i] / lh : 0.f;
    }
    for (int h = tid; h < heads; h += nt) {
        lse_part[base + h] = l[h] > 0.f ? m[h] + logf(l[h]) : STRATA_NEG_INF;
    }
}

#define ATTN_PARTIAL(S, E)                                                                     \
    extern "C" __global__ void attn_partial_##S(                                               \
        const float* q, const E::T* k, const E::T* v, int n, int heads, int d, float scale,    \
        int mode,                                                                              \
        const u64* mask, const u32* rows, int count, int per_block, int tile, float* o_part,   \
        float* lse_part) {                                                                     \
        attn_partial<E>(q, k, v, n, heads, d, scale, mode, mask, rows, count, per_block, tile, \
                        o_part, lse_part);                                                     \
    }
STRATA_FOR_TYPES(ATTN_PARTIAL)

// Grid: one block per head. o = sum_s exp(lse_s - M) o_s / L,
// lse = M + ln L, M = max_s lse_s, L = sum_s exp(lse_s - M).
extern "C" __global__ void attn_merge_splits(const float* __restrict__ o_part,
                                             const float* __restrict__ lse_part, int splits,
                                             int heads, int d, float* __restrict__ o,
                                             float* __restrict__ lse) {
    const int h = blockIdx.x;
    float mx = STRATA_NEG_INF;
    for (int s = 0; s < splits; ++s) mx = fmaxf(mx, lse_part[s * heads + h]);
    if (mx == STRATA_NEG_INF) {
        for (int c = threadIdx.x; c < d; c += blockDim.x) o[h * d + c] = 0.f;
        if (threadIdx.x == 0) lse[h] = STRATA_NEG_INF;
        return;
    }
    float total = 0.f;
    for (int s = 0; s < splits; ++s) total += expf(lse_part[s * heads + h] - mx);
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        float a = 0.f;
        for (int s = 0; s < splits; ++s) {
            const float w = expf(lse_part[s * heads + h] - mx);
            a = fmaf(w, o_part[((long)s * heads + h) * d + c], a);
        }
        o[h * d + c] = a / total;
    }
    if (threadIdx.x == 0) lse[h] = mx + logf(total);
}

// Twin of merge_into: (o, lse) <- merge((o, lse), (o_b, lse_b)).
// Grid: one block per head.
extern "C" __global__ void attn_merge_into(float* __restrict__ o, float* __restrict__ lse,
                                           const float* __restrict__ o_b,
                                           const float* __restrict__ lse_b, int heads, int d) {
    const int h = blockIdx.x;
    const float a = lse[h], b = lse_b[h];
    __syncthreads();  // every thread has read lse[h] before it is written
    if (b == STRATA_NEG_INF) return;
    if (a == STRATA_NEG_INF) {
        for (int c = threadIdx.x; c < d; c += blockDim.x) o[h * d + c] = o_b[h * d + c];
        if (threadIdx.x == 0) lse[h] = b;
        return;
    }
    const float mx = fmaxf(a, b);
    const float wa = expf(a - mx), wb = expf(b - mx);
    const float total = wa + wb;
    const float fa = wa / total, fb = wb / total;
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        o[h * d + c] = o[h * d + c] * fa + o_b[h * d + c] * fb;
    }
    if (threadIdx.x == 0) lse[h] = mx + logf(total);
}

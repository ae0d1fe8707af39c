// Top-k per row: the CUDA twin of top_k in kernels/src/topk.rs, with the
// same result bit for bit. scores [rows][n] f32; for each row the best
// kk = min(k, non-NaN scores) go to idx [rows][k] u32 and val [rows][k] f32
// (entries kk.. of a row are not written) and kk to count [rows] u32.
// Order: higher value first, equal values by lower index first; -0 and +0
// are equal (as `==` says on the CPU); NaN is never selected; val is the
// score's own bits.
//
// topk_rows: one thread block per row (blockDim a multiple of 32, <= 1024).
//  1. Radix select on key(x), a map of the non-NaN floats to u32 that keeps
//     their order: four passes over the row, 8 bits each from the top, each
//     a shared-memory histogram of the rows still in the running, find the
//     key T of the kk-th best and how many ties of T are taken (`rem`).
//  2. Compaction in index order: every score with key > T (exactly
//     kk - rem of them) and the first `rem` with key == T, by a block-wide
//     prefix count over index order (ballots per warp, a scan over warps),
//     so the ties taken are the lowest indices, as on the CPU.
//  3. Bitonic sort of the kk chosen in shared memory by
//     (~key << 32 | index) ascending, i.e. value descending then index
//     ascending; padded to a power of two with entries that sort last.
// No step depends on the order of atomics: the histograms only count.
//
// Dynamic shared memory: 8 * next_pow2(k) bytes (the sort); k <= 8192
// (64 KB, beyond the 48 KB default: the host opts in) is the limit the host
// enforces.
#include "common.cuh"

#define TOPK_FULL 0xffffffffu

// Order-preserving map of a non-NaN float to u32 (larger float, larger
// key): flip every bit of a negative, set the sign bit of a positive. -0
// maps to +0's key because the CPU twin treats them as equal (ties by
// index); the output value is read back from the row, so its sign stays.
__device__ __forceinline__ u32 topk_key(float x) {
    const u32 u = __float_as_uint(x);
    if ((u << 1) == 0) return 0x80000000u;
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Sort entry of (key, index): ascending entries = key descending, then
// index ascending. The padding ~0 sorts after every real entry (a real key
// is never 0: that is the key of a negative NaN bit pattern).
__device__ __forceinline__ u64 topk_entry(u32 key, u32 i) {
    return ((u64)(~key) << 32) | i;
}

extern "C" __global__ void __launch_bounds__(1024)
    topk_rows(const float* __restrict__ scores, int n, int k, u32* __restrict__ idx,
              float* __restrict__ val, u32* __restrict__ count) {
    extern __shared__ u64 sorted[];
    __shared__ u32 hist[256];
    __shared__ u32 warp_above[32], warp_tie[32];
    __shared__ u32 s_bin, s_rem, s_kk, s_tile_above, s_tile_tie;

    const int tid = threadIdx.x, nt = blockDim.x;
    const int lane = tid & 31, warp = tid >> 5, nwarps = nt >> 5;
    const float* row = scores + (long)blockIdx.x * n;

    // 1. Radix select. Candidates of a pass: non-NaN keys whose digits
    // above `shift` equal those chosen so far (key & mask == prefix).
    u32 prefix = 0, mask = 0, rem = 0, kk = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = tid; b < 256; b += nt) hist[b] = 0;
        __syncthreads();
        // The bound is the same for the whole block, so every lane of every
        // warp reaches the warp-wide intrinsics below.
        for (int base = 0; base < n; base += nt) {
            const int i = base + tid;
            u32 bin = 256;  // not counted
            if (i < n) {
                const float x = row[i];
                if (x == x) {
                    const u32 key = topk_key(x);
                    if ((key & mask) == prefix) bin = (key >> shift) & 255u;
                }
            }
            // Lanes with the same bin add once: scores crowd into a few
            // bins (one exponent byte on the first pass, ties on the last),
            // and shared atomics on one address serialise.
            const u32 peers = __match_any_sync(TOPK_FULL, bin);
            if (bin < 256 && lane == __ffs(peers) - 1) atomicAdd(&hist[bin], __popc(peers));
        }
        __syncthreads();
        if (warp == 0) {
            // Lane l holds bins [8l, 8l + 8); suffix sums over lanes give
            // the candidates in higher bins, and the one lane whose range
            // holds the rem-th best walks its bins from the top.
            u32 own = 0;
            for (int j = 0; j < 8; ++j) own += hist[lane * 8 + j];
            u32 suffix = own;  // bins >= 8 * lane
            for (int o = 1; o < 32; o <<= 1) {
                const u32 y = __shfl_down_sync(TOPK_FULL, suffix, o);
                if (lane + o < 32) suffix += y;
            }
            const u32 total = __shfl_sync(TOPK_FULL, suffix, 0);
            // First pass: every non-NaN score is a candidate.
            const u32 want = shift == 24 ? min((u32)k, total) : rem;
            const u32 above = suffix - own;
            if (want > 0 && above < want && want <= suffix) {
                u32 acc = above;
                int b = lane * 8 + 7;
                while (acc + hist[b] < want) acc += hist[b--];
                s_bin = (u32)b;
                s_rem = want - acc;
            }
            if (lane == 0 && want == 0) s_rem = 0;
            if (lane == 0 && shift == 24) s_kk = want;
        }
        __syncthreads();
        if (shift == 24) kk = s_kk;
        rem = s_rem;
        if (kk == 0) break;  // k == 0 or no score but NaN: the same in every thread
        prefix |= s_bin << shift;
        mask |= 255u << shift;
        // s_bin, s_rem are next written after the next pass's first barrier.
    }
    if (kk == 0) {
        if (tid == 0) count[blockIdx.x] = 0;
        return;
    }

    // 2. Compaction in index order: above-threshold entries fill
    // sorted[0, n_above), taken ties sorted[n_above, kk).
    const u32 thr = prefix, n_above = kk - rem;
    const u32 below = (1u << lane) - 1;  // lanes before this one
    u32 run_above = 0, run_tie = 0;      // found in earlier tiles
    for (int base = 0; base < n; base += nt) {
        const int i = base + tid;
        u32 key = 0;
        bool is_above = false, is_tie = false;
        if (i < n) {
            const float x = row[i];
            if (x == x) {
                key = topk_key(x);
                is_above = key > thr;
                is_tie = key == thr;
            }
        }
        const u32 ba = __ballot_sync(TOPK_FULL, is_above), bt = __ballot_sync(TOPK_FULL, is_tie);
        if (lane == 0) {
            warp_above[warp] = __popc(ba);
            warp_tie[warp] = __popc(bt);
        }
        __syncthreads();
        if (warp == 0) {
            // Exclusive scan over the warps of this tile, in place.
            const u32 a0 = lane < nwarps ? warp_above[lane] : 0;
            const u32 t0 = lane < nwarps ? warp_tie[lane] : 0;
            u32 a = a0, t = t0;
            for (int o = 1; o < 32; o <<= 1) {
                const u32 ya = __shfl_up_sync(TOPK_FULL, a, o);
                const u32 yt = __shfl_up_sync(TOPK_FULL, t, o);
                if (lane >= o) {
                    a += ya;
                    t += yt;
                }
            }
            if (lane < nwarps) {
                warp_above[lane] = a - a0;
                warp_tie[lane] = t - t0;
            }
            if (lane == 31) {
                s_tile_above = a;
                s_tile_tie = t;
            }
        }
        __syncthreads();
        if (is_above) {
            const u32 p = run_above + warp_above[warp] + __popc(ba & below);
            if (p < n_above) sorted[p] = topk_entry(key, (u32)i);  // always, by the select
        }
        if (is_tie) {
            const u32 r = run_tie + warp_tie[warp] + __popc(bt & below);
            if (r < rem) sorted[n_above + r] = topk_entry(key, (u32)i);
        }
        run_above += s_tile_above;
        run_tie += s_tile_tie;
        __syncthreads();  // the scan's slots are rewritten by the next tile
        // Nothing above is left and the ties taken are known: stop reading.
        if (run_above >= n_above && run_tie >= rem) break;
    }

    // 3. Bitonic sort of sorted[0, pad), ascending.
    u32 pad = 1;
    while (pad < kk) pad <<= 1;
    for (u32 j = kk + tid; j < pad; j += nt) sorted[j] = ~0ull;
    __syncthreads();
    for (u32 size = 2; size <= pad; size <<= 1) {
        for (u32 stride = size >> 1; stride > 0; stride >>= 1) {
            for (u32 t = tid; t < pad / 2; t += nt) {
                // The t-th pair: lo has bit `stride` clear, hi = lo + stride;
                // runs of `size` alternate direction until the last merge.
                const u32 lo = 2 * t - (t & (stride - 1)), hi = lo + stride;
                const bool up = (lo & size) == 0;
                const u64 a = sorted[lo], b = sorted[hi];
                if ((a > b) == up) {
                    sorted[lo] = b;
                    sorted[hi] = a;
                }
            }
            __syncthreads();
        }
    }

    u32* out_idx = idx + (long)blockIdx.x * k;
    float* out_val = val + (long)blockIdx.x * k;
    for (u32 j = tid; j < kk; j += nt) {
        const u32 i = (u32)sorted[j];
        out_idx[j] = i;
        out_val[j] = row[i];
    }
    if (tid == 0) count[blockIdx.x] = kk;
}

// A host emulation of the CUDA subset that kernels/cuda/topk.cu uses, so
// that the kernel's own source runs on a CPU in the test suite
// (kernels/tests/topk_emulated.rs). One thread block at a time; each CUDA
// thread is a std::thread.
//
// What is emulated, and how:
// * __shared__ variables are function statics (one block runs at a time);
//   the dynamic shared array is the global `emu_dynamic_shared`, followed by
//   a canary that the harness checks after each launch;
// * __syncthreads is a std::barrier over the block;
// * warp intrinsics (__ballot_sync, __match_any_sync, __shfl*_sync)
//   exchange values through per-warp slots between two warp barriers. Only
//   the full mask is accepted: any other mask aborts, so a kernel that
//   calls them from a partial warp fails here instead of deadlocking;
// * atomicAdd on shared memory is std::atomic_ref.
// Not emulated: memory model subtleties beyond barrier ordering, timing,
// bank conflicts, register limits. The NVRTC test compiles the same file
// for the real device.
#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(threads)
#define __shared__ static

struct EmuDim3 {
    unsigned x = 0, y = 0, z = 0;
};
inline thread_local EmuDim3 threadIdx, blockIdx;
inline EmuDim3 blockDim;

// Dynamic shared memory: 8 * EMU_SHARED_U64 bytes plus a canary region.
#define EMU_SHARED_U64 (1 << 15)
#define EMU_CANARY_U64 1024
#define EMU_CANARY 0xC0FFEE00C0FFEE00ull
alignas(16) inline u64 emu_dynamic_shared[EMU_SHARED_U64 + EMU_CANARY_U64];

namespace emu {
struct Warp {
    std::unique_ptr<std::barrier<>> bar;
    u64 slot[32];
};
inline std::unique_ptr<std::barrier<>> block_bar;
inline std::vector<Warp> warps;

inline void full_mask(u32 mask, const char* what) {
    if (mask != 0xffffffffu) {
        std::fprintf(stderr, "emu: %s with mask %08x (only full warps are emulated)\n", what, mask);
        std::abort();
    }
}

// Every lane's `v`, after every lane of the warp has offered its own.
inline void exchange(u64 v, u64 out[32]) {
    Warp& w = warps[threadIdx.x / 32];
    w.slot[threadIdx.x % 32] = v;
    w.bar->arrive_and_wait();
    std::memcpy(out, w.slot, sizeof w.slot);
    w.bar->arrive_and_wait();
}
}  // namespace emu

inline void __syncthreads() { emu::block_bar->arrive_and_wait(); }

inline u32 __ballot_sync(u32 mask, bool pred) {
    emu::full_mask(mask, "__ballot_sync");
    u64 all[32];
    emu::exchange(pred ? 1 : 0, all);
    u32 bits = 0;
    for (int l = 0; l < 32; ++l) bits |= (u32)(all[l] != 0) << l;
    return bits;
}

inline u32 __match_any_sync(u32 mask, u32 v) {
    emu::full_mask(mask, "__match_any_sync");
    u64 all[32];
    emu::exchange(v, all);
    u32 bits = 0;
    for (int l = 0; l < 32; ++l) bits |= (u32)(all[l] == v) << l;
    return bits;
}

inline u32 __shfl_sync(u32 mask, u32 v, int src) {
    emu::full_mask(mask, "__shfl_sync");
    u64 all[32];
    emu::exchange(v, all);
    return (u32)all[src & 31];
}

// Out of range: the lane keeps its own value, as on the device.
inline u32 __shfl_down_sync(u32 mask, u32 v, unsigned o) {
    emu::full_mask(mask, "__shfl_down_sync");
    u64 all[32];
    emu::exchange(v, all);
    const unsigned lane = threadIdx.x % 32;
    return lane + o < 32 ? (u32)all[lane + o] : v;
}

inline u32 __shfl_up_sync(u32 mask, u32 v, unsigned o) {
    emu::full_mask(mask, "__shfl_up_sync");
    u64 all[32];
    emu::exchange(v, all);
    const unsigned lane = threadIdx.x % 32;
    return lane >= o ? (u32)all[lane - o] : v;
}

inline int __popc(u32 x) { return __builtin_popcount(x); }
inline int __ffs(u32 x) { return __builtin_ffs((int)x); }
inline u32 atomicAdd(u32* p, u32 v) { return std::atomic_ref<u32>(*p).fetch_add(v); }
inline u32 __float_as_uint(float x) {
    u32 u;
    std::memcpy(&u, &x, 4);
    return u;
}
template <class T>
inline T min(T a, T b) {
    return b < a ? b : a;
}

// Runs `kernel()` as `grid` blocks of `threads` threads, one block at a
// time. `shared_u64` is the dynamic shared memory granted, in u64 entries:
// the canary from there on must survive the launch (exit 4 if not).
template <class F>
void emu_launch(unsigned grid, unsigned threads, size_t shared_u64, F kernel) {
    if (threads == 0 || threads % 32 != 0 || threads > 1024 || shared_u64 > EMU_SHARED_U64) {
        std::fprintf(stderr, "emu: bad launch (%u threads, %zu u64 of shared)\n", threads, shared_u64);
        std::exit(2);
    }
    blockDim.x = threads;
    blockDim.y = blockDim.z = 1;
    for (unsigned b = 0; b < grid; ++b) {
        // Garbage where the kernel must write before it reads, a canary
        // where it must never write.
        for (size_t i = 0; i < EMU_SHARED_U64 + EMU_CANARY_U64; ++i)
            emu_dynamic_shared[i] = i < shared_u64 ? 0x5A5A5A5A5A5A5A5Aull * (i + 1) : EMU_CANARY;
        emu::block_bar = std::make_unique<std::barrier<>>(threads);
        emu::warps = std::vector<emu::Warp>(threads / 32);
        for (auto& w : emu::warps) w.bar = std::make_unique<std::barrier<>>(32);
        std::vector<std::thread> pool;
        pool.reserve(threads);
        for (unsigned t = 0; t < threads; ++t) {
            pool.emplace_back([=] {
                threadIdx.x = t;
                blockIdx.x = b;
                kernel();
            });
        }
        for (auto& th : pool) th.join();
        for (size_t i = shared_u64; i < EMU_SHARED_U64 + EMU_CANARY_U64; ++i) {
            if (emu_dynamic_shared[i] != EMU_CANARY) {
                std::fprintf(stderr, "emu: block %u wrote shared entry %zu beyond the %zu granted\n", b,
                             i, shared_u64);
                std::exit(4);
            }
        }
    }
}

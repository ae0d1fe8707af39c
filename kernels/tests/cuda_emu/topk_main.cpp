// Runs topk_rows (kernels/cuda/topk.cu, spliced by the test with shim.h in
// place of common.cuh) on the cases of a file and writes its outputs.
//
//   topk_emu <in> <out>
// in:  u32 cases, then per case u32 rows, n, k, threads; f32 scores[rows * n]
// out: per case u32 count[rows], u32 idx[rows * k], f32 val[rows * k]
//      (idx, val start as 0xFFFFFFFF bit patterns: slots the kernel leaves
//      alone stay so)
#include "topk_kernel.cu"

#include <chrono>

static void read_or_die(FILE* f, void* p, size_t bytes) {
    if (bytes && std::fread(p, 1, bytes, f) != bytes) {
        std::fprintf(stderr, "topk_emu: short input\n");
        std::exit(2);
    }
}

int main(int argc, char** argv) {
    if (argc != 3) {
        std::fprintf(stderr, "usage: topk_emu <in> <out>\n");
        return 2;
    }
    // A kernel whose threads part at a barrier would hang: fail instead.
    std::thread([] {
        std::this_thread::sleep_for(std::chrono::seconds(240));
        std::fprintf(stderr, "topk_emu: still running after 240 s (a barrier not met?)\n");
        std::_Exit(3);
    }).detach();
    FILE* in = std::fopen(argv[1], "rb");
    FILE* out = std::fopen(argv[2], "wb");
    if (!in || !out) return 2;
    u32 cases;
    read_or_die(in, &cases, 4);
    for (u32 c = 0; c < cases; ++c) {
        u32 h[4];
        read_or_die(in, h, sizeof h);
        const u32 rows = h[0], n = h[1], k = h[2], threads = h[3];
        std::vector<float> scores((size_t)rows * n);
        read_or_die(in, scores.data(), scores.size() * 4);
        std::vector<u32> idx((size_t)rows * k, 0xFFFFFFFFu), count(rows, 0xFFFFFFFFu);
        std::vector<float> val((size_t)rows * k);
        std::memset(val.data(), 0xFF, val.size() * 4);
        // The host wrapper's grant: next_pow2(max(k, 1)) entries.
        size_t grant = 1;
        while (grant < k) grant <<= 1;
        const float* s = scores.data();
        u32 *pi = idx.data(), *pc = count.data();
        float* pv = val.data();
        emu_launch(rows, threads, grant, [=] { topk_rows(s, (int)n, (int)k, pi, pv, pc); });
        std::fwrite(count.data(), 4, count.size(), out);
        std::fwrite(idx.data(), 4, idx.size(), out);
        std::fwrite(val.data(), 4, val.size(), out);
    }
    return std::fclose(out) == 0 ? 0 : 2;
}

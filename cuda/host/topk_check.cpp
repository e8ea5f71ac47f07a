// The block-wide top-k code of cuda/topk.cuh, unchanged, run on the host as one block of the
// grid emulation (grid_shim.h): entry points for tests/cuda_topk_host.rs. Not part of the kernels.
// Each returns 0, or 1 with the violation printed (a rule of grid_shim.h broken).
#include <cstdio>

#include "grid_shim.h"
#include "../topk.cuh"

static int report(const std::string& err) {
    if (err.empty()) return 0;
    std::fprintf(stderr, "[cuda host check] %s\n", err.c_str());
    return 1;
}

// block_select over `scores[0..count)`: the k best ascending into out[0..k).
extern "C" int ek_cuda_host_select(const float* scores, int count, int k, unsigned threads, unsigned* out) {
    SelectShared s;
    return report(ekemu::launch(EkDim3{1, 1, 1}, EkDim3{threads, 1, 1}, 0,
                                [&] { block_select([&](int i) { return scores[i]; }, count, k, s, out); }));
}

// block_rank_topk over `keys[0..count)`: the min(k, count) best by rank into out[0..).
extern "C" int ek_cuda_host_topk(const double* keys, int count, int k, unsigned threads, unsigned* out) {
    SelectShared s;
    std::vector<unsigned long long> key_s(RANK_SORT_CAP);  // the block's shared arrays
    std::vector<unsigned> idx_s(RANK_SORT_CAP);
    std::vector<unsigned> scratch(std::max(std::min(k, count), 1));  // global memory
    return report(ekemu::launch(EkDim3{1, 1, 1}, EkDim3{threads, 1, 1}, 0, [&] {
        block_rank_topk([&](int i) { return keys[i]; }, count, k, s, key_s.data(), idx_s.data(), scratch.data(), out);
    }));
}

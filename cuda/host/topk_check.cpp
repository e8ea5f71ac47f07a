// The block-wide top-k code of cuda/topk.cuh, unchanged, run on the host through block_shim.h:
// entry points for tests/cuda_topk_host.rs. Not part of the kernels.
#include "block_shim.h"
#include "../topk.cuh"

// block_select over `scores[0..count)`: the k best ascending into out[0..k).
extern "C" void ek_cuda_host_select(const float* scores, int count, int k, unsigned threads, unsigned* out) {
    SelectShared s;
    run_block(threads, [&] { block_select([&](int i) { return scores[i]; }, count, k, s, out); });
}

// block_topk over `keys[0..count)` (k ≤ TOPK_CAP): the k best by rank into out[0..min(k, count)).
extern "C" void ek_cuda_host_topk(const double* keys, int count, int k, unsigned threads, unsigned* out) {
    std::vector<unsigned long long> key_s(2 * TOPK_CAP);  // the block's shared arrays
    std::vector<unsigned> idx_s(2 * TOPK_CAP);
    run_block(threads, [&] { block_topk([&](int i) { return keys[i]; }, count, k, key_s.data(), idx_s.data(), out); });
}

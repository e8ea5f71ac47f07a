// Host emulation of one CUDA thread block, for the block-wide top-k code of cuda/topk.cuh (tests
// only: tests/cuda_topk_host.rs). Each CUDA thread is an OS thread; __syncthreads is a barrier;
// __ballot_sync exchanges predicates through the block (valid where the whole block calls it
// together, as topk.cuh does); shared memory is the caller's. Blocks run one at a time.
#pragma once

#include <algorithm>
#include <barrier>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#define __device__
#define __forceinline__ inline

struct EkDim3 {
    unsigned x = 0, y = 0, z = 0;
};
inline thread_local EkDim3 threadIdx;
inline EkDim3 blockDim;

namespace ekshim {
inline std::barrier<>* barrier = nullptr;
inline std::vector<int> votes;
}  // namespace ekshim

inline void __syncthreads() { ekshim::barrier->arrive_and_wait(); }

inline unsigned __ballot_sync(unsigned, int pred) {
    ekshim::votes[threadIdx.x] = pred;
    __syncthreads();
    const unsigned base = threadIdx.x & ~31u;
    unsigned ballot = 0;
    for (unsigned l = 0; l < 32 && base + l < blockDim.x; l++) ballot |= (ekshim::votes[base + l] ? 1u : 0u) << l;
    __syncthreads();
    return ballot;
}

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline unsigned atomicAdd(unsigned* a, unsigned v) { return __atomic_fetch_add(a, v, __ATOMIC_RELAXED); }
inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline long long __double_as_longlong(double d) {
    long long u;
    std::memcpy(&u, &d, 8);
    return u;
}
using std::max;
using std::min;

// Runs `body` as one block of `threads` threads; one block at a time in the process (the block's
// dimensions, barrier and votes are process-wide, and callers may run on several threads).
inline void run_block(unsigned threads, const std::function<void()>& body) {
    static std::mutex one_block;
    const std::lock_guard<std::mutex> lock(one_block);
    std::barrier<> bar(threads);
    ekshim::barrier = &bar;
    ekshim::votes.assign(threads, 0);
    blockDim.x = threads;
    std::vector<std::thread> ts;
    for (unsigned t = 0; t < threads; t++)
        ts.emplace_back([t, &body] {
            threadIdx.x = t;
            body();
        });
    for (auto& t : ts) t.join();
    ekshim::barrier = nullptr;
}

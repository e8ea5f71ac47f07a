// Block-wide top-k by chunked bitonic sort in shared memory: the k best (key, index) pairs of a
// row, larger keys first, ties to the lower index — the order SPEC §2.10 and §4.5 ask for.
// Keys are doubles mapped to order-preserving 64-bit integers (a total order, NaN included).

#pragma once

#define TOPK_CAP 1024  // block_topk: k ≤ TOPK_CAP; shared memory: 2·CAP·(8 + 4) bytes = 24 KiB

__device__ __forceinline__ unsigned long long sortable(double x) {
    const unsigned long long b = (unsigned long long)__double_as_longlong(x);
    return (b >> 63) ? ~b : (b | 0x8000000000000000ull);
}

// Whether (ka, ia) ranks before (kb, ib).
__device__ __forceinline__ bool ranks_before(unsigned long long ka, unsigned ia, unsigned long long kb, unsigned ib) {
    return ka > kb || (ka == kb && ia < ib);
}

// Sorts n = 2·CAP pairs by rank (best first). All threads of the block take part.
__device__ void bitonic_rank(unsigned long long* key, unsigned* idx, int n) {
    for (int size = 2; size <= n; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            __syncthreads();
            for (int i = threadIdx.x; i < n / 2; i += blockDim.x) {
                const int lo = 2 * i - (i & (stride - 1));
                const int hi = lo + stride;
                const bool up = ((lo & size) == 0);  // this run sorts best-first
                const bool swap = up ? ranks_before(key[hi], idx[hi], key[lo], idx[lo])
                                     : ranks_before(key[lo], idx[lo], key[hi], idx[hi]);
                if (swap) {
                    const unsigned long long tk = key[lo];
                    key[lo] = key[hi];
                    key[hi] = tk;
                    const unsigned ti = idx[lo];
                    idx[lo] = idx[hi];
                    idx[hi] = ti;
                }
            }
        }
    }
    __syncthreads();
}

// Keeps the best k (≤ TOPK_CAP) of `count` keys read through `get(i)`, written best-first to
// `out[0..min(k, count)]`. `key`/`idx` are shared arrays of 2·TOPK_CAP entries.
template <typename Get>
__device__ void block_topk(Get get, int count, int k, unsigned long long* key, unsigned* idx, unsigned* out) {
    const int cap = TOPK_CAP, n = 2 * TOPK_CAP;
    for (int i = threadIdx.x; i < cap; i += blockDim.x) {
        key[i] = 0;  // below every real key
        idx[i] = 0xffffffffu;
    }
    for (int c0 = 0; c0 < count; c0 += cap) {
        __syncthreads();
        for (int i = threadIdx.x; i < cap; i += blockDim.x) {
            const int j = c0 + i;
            key[cap + i] = j < count ? sortable(get(j)) : 0;
            idx[cap + i] = j < count ? (unsigned)j : 0xffffffffu;
        }
        bitonic_rank(key, idx, n);  // the best cap of the two halves end up first
    }
    __syncthreads();
    const int keep = min(k, count);
    for (int i = threadIdx.x; i < keep; i += blockDim.x) out[i] = idx[i];
    __syncthreads();
}

// ------------------------------------------------------------------------------------------------
// Block-wide selection of the k best of `count` f32 scores, ties to the lower index, written in
// ascending index order to out[0..k) — no cap on k. The k-th best key is found digit by digit
// (radix select: SELECT_PASSES passes over the row, each counting the keys that share the digits
// found so far in a shared histogram of their next digit), then one ascending pass keeps every key
// above it plus the first `ties` equal to it, compacted with warp ballots. blockDim.x must be a
// multiple of 32; every thread of the block takes part.

#define SELECT_DIGIT_BITS 8
#define SELECT_BINS (1 << SELECT_DIGIT_BITS)
#define SELECT_PASSES (32 / SELECT_DIGIT_BITS)
#define SELECT_MAX_WARPS 32

struct SelectShared {
    unsigned hist[SELECT_BINS];
    unsigned kept[SELECT_MAX_WARPS];  // per-warp counts of one chunk
    unsigned tied[SELECT_MAX_WARPS];
    unsigned prefix;     // the k-th best key's digits found so far
    unsigned remaining;  // keys sharing that prefix still to keep
};

__device__ __forceinline__ unsigned sortable32(float x) {
    const unsigned b = __float_as_uint(x);
    return (b >> 31) ? ~b : (b | 0x80000000u);
}

// Threads before this one (in thread order) whose `flag` is set, and the block's total.
__device__ __forceinline__ unsigned block_rank(bool flag, unsigned* warp_counts, unsigned& total) {
    const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const unsigned ballot = __ballot_sync(0xffffffffu, flag);
    if (lane == 0) warp_counts[warp] = __popc(ballot);
    __syncthreads();
    unsigned before = __popc(ballot & ((1u << lane) - 1u));
    total = 0;
    for (unsigned w = 0; w < warps; w++) {
        const unsigned c = warp_counts[w];
        before += w < warp ? c : 0u;
        total += c;
    }
    __syncthreads();  // warp_counts may be rewritten by the next call
    return before;
}

template <typename Get>
__device__ void block_select(Get get, int count, int k, SelectShared& s, unsigned* out) {
    if (threadIdx.x == 0) {
        s.prefix = 0;
        s.remaining = (unsigned)k;
    }
    unsigned known = 0;  // bits of the key found so far
    for (int pass = SELECT_PASSES - 1; pass >= 0; pass--) {
        const int shift = pass * SELECT_DIGIT_BITS;
        for (int d = threadIdx.x; d < SELECT_BINS; d += blockDim.x) s.hist[d] = 0;
        __syncthreads();
        const unsigned prefix = s.prefix;
        for (int i = threadIdx.x; i < count; i += blockDim.x) {
            const unsigned key = sortable32(get(i));
            if ((key & known) == prefix) atomicAdd(&s.hist[(key >> shift) & (SELECT_BINS - 1)], 1u);
        }
        __syncthreads();
        if (threadIdx.x == 0) {  // the digit holding the remaining-th best, from the top
            unsigned r = s.remaining, d = SELECT_BINS - 1;
            while (s.hist[d] < r) r -= s.hist[d--];
            s.prefix = prefix | (d << shift);
            s.remaining = r;
        }
        known |= (unsigned)(SELECT_BINS - 1) << shift;
        __syncthreads();
    }
    const unsigned kth = s.prefix, ties = s.remaining;
    unsigned kept = 0, tied = 0;
    for (int c0 = 0; c0 < count && kept < (unsigned)k; c0 += blockDim.x) {
        const int i = c0 + threadIdx.x;
        const unsigned key = i < count ? sortable32(get(i)) : 0u;
        const bool tie = i < count && key == kth;
        unsigned chunk_ties, chunk_kept;
        const unsigned tie_rank = tied + block_rank(tie, s.tied, chunk_ties);
        const bool keep = (i < count && key > kth) || (tie && tie_rank < ties);
        const unsigned at = kept + block_rank(keep, s.kept, chunk_kept);
        if (keep && at < (unsigned)k) out[at] = (unsigned)i;  // the bound holds by construction
        kept += chunk_kept;
        tied += chunk_ties;
    }
    __syncthreads();
}

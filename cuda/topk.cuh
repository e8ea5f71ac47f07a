// Block-wide selection and ranking: the k best (key, index) pairs of a row, larger keys first,
// ties to the lower index — the order SPEC §2.10 and §4.5 ask for. Keys are floats or doubles
// mapped to order-preserving integers (a total order, NaN included).
//   block_select       the k best in ascending index order, any k (radix select)
//   block_rank_topk    the k best in rank order: selected first, then sorted (bitonic, in shared
//                      memory, up to RANK_SORT_CAP of them) or ranked by counting (beyond)

#pragma once

#define TOPK_CAP 1024                // half the bitonic sort's shared arrays
#define RANK_SORT_CAP (2 * TOPK_CAP) // block_rank_topk sorts this many in shared memory: 24 KiB

// Every NaN is taken as the negative quiet NaN, below −inf, whatever its bits (the hardware's
// NaNs are positive, x86's negative): the hosts' numerics::rank_cmp order.
__device__ __forceinline__ unsigned long long sortable(double x) {
    const unsigned long long b = x != x ? 0xFFF8000000000000ull : (unsigned long long)__double_as_longlong(x);
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

// ------------------------------------------------------------------------------------------------
// Block-wide selection of the k best of `count` keys, ties to the lower index, written in
// ascending index order to out[0..k) — no cap on k. The k-th best key is found digit by digit
// (radix select: one pass over the row per 8-bit digit, each counting the keys that share the
// digits found so far in a shared histogram of their next digit), then one ascending pass keeps
// every key above it plus the first `ties` equal to it, compacted with warp ballots. blockDim.x
// must be a multiple of 32; every thread of the block takes part.

#define SELECT_DIGIT_BITS 8
#define SELECT_BINS (1 << SELECT_DIGIT_BITS)
#define SELECT_MAX_WARPS 32

struct SelectShared {
    unsigned hist[SELECT_BINS];
    unsigned kept[SELECT_MAX_WARPS];  // per-warp counts of one chunk
    unsigned tied[SELECT_MAX_WARPS];
    unsigned long long prefix;  // the k-th best key's digits found so far
    unsigned remaining;         // keys sharing that prefix still to keep
};

__device__ __forceinline__ unsigned sortable32(float x) {
    const unsigned b = x != x ? 0xFFC00000u : __float_as_uint(x);
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

// `key(i)` is an order-preserving unsigned integer (Key: unsigned or unsigned long long).
template <typename Key, typename GetKey>
__device__ void block_select_keys(GetKey key_of, int count, int k, SelectShared& s, unsigned* out) {
    constexpr int passes = (int)sizeof(Key) * 8 / SELECT_DIGIT_BITS;
    if (threadIdx.x == 0) {
        s.prefix = 0;
        s.remaining = (unsigned)k;
    }
    Key known = 0;  // bits of the key found so far
    for (int pass = passes - 1; pass >= 0; pass--) {
        const int shift = pass * SELECT_DIGIT_BITS;
        for (int d = threadIdx.x; d < SELECT_BINS; d += blockDim.x) s.hist[d] = 0;
        __syncthreads();
        const Key prefix = (Key)s.prefix;
        for (int i = threadIdx.x; i < count; i += blockDim.x) {
            const Key key = key_of(i);
            if ((key & known) == prefix) atomicAdd(&s.hist[(unsigned)(key >> shift) & (SELECT_BINS - 1)], 1u);
        }
        __syncthreads();
        if (threadIdx.x == 0) {  // the digit holding the remaining-th best, from the top
            unsigned r = s.remaining, d = SELECT_BINS - 1;
            while (s.hist[d] < r) r -= s.hist[d--];
            s.prefix = (unsigned long long)(prefix | ((Key)d << shift));
            s.remaining = r;
        }
        known |= (Key)(SELECT_BINS - 1) << shift;
        __syncthreads();
    }
    const Key kth = (Key)s.prefix;
    const unsigned ties = s.remaining;
    unsigned kept = 0, tied = 0;
    for (int c0 = 0; c0 < count && kept < (unsigned)k; c0 += blockDim.x) {
        const int i = c0 + threadIdx.x;
        const Key key = i < count ? key_of(i) : (Key)0;
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

// The k best of `count` f32 scores read through `get(i)`, ascending index order.
template <typename Get> __device__ void block_select(Get get, int count, int k, SelectShared& s, unsigned* out) {
    block_select_keys<unsigned>([&](int i) { return sortable32(get(i)); }, count, k, s, out);
}

// The min(k, count) best of `count` f64 keys read through `get(i)`, in rank order (larger
// first, ties to the lower index), into out[0..): the radix selection writes them in ascending
// index order to `scratch` (min(k, count) entries of global memory), then up to RANK_SORT_CAP
// are sorted in shared memory (`key_s`/`idx_s`: RANK_SORT_CAP entries each), more are ranked by
// counting among the selected (O(k²) over the block). Every thread of the block takes part.
template <typename Get>
__device__ void block_rank_topk(Get get, int count, int k, SelectShared& s, unsigned long long* key_s, unsigned* idx_s,
                                unsigned* scratch, unsigned* out) {
    const int keep = min(k, count);
    if (keep <= 0) return;
    block_select_keys<unsigned long long>([&](int i) { return sortable(get(i)); }, count, keep, s, scratch);
    __syncthreads();  // the selection in `scratch` is visible to the whole block
    if (keep <= RANK_SORT_CAP) {
        int n = 2;
        while (n < keep) n <<= 1;
        for (int i = threadIdx.x; i < n; i += blockDim.x) {
            const bool real = i < keep;
            const unsigned j = real ? scratch[i] : 0xffffffffu;
            key_s[i] = real ? sortable(get((int)j)) : 0;  // below every real key
            idx_s[i] = j;
        }
        bitonic_rank(key_s, idx_s, n);
        for (int i = threadIdx.x; i < keep; i += blockDim.x) out[i] = idx_s[i];
        __syncthreads();
        return;
    }
    for (int i = threadIdx.x; i < keep; i += blockDim.x) {
        const unsigned ii = scratch[i];
        const unsigned long long ki = sortable(get((int)ii));
        int rank = 0;
        for (int j = 0; j < keep; j++) {
            const unsigned jj = scratch[j];
            rank += ranks_before(sortable(get((int)jj)), jj, ki, ii);
        }
        out[rank] = ii;
    }
    __syncthreads();
}

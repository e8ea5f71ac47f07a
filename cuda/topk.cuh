// Block-wide top-k by chunked bitonic sort in shared memory: the k best (key, index) pairs of a
// row, larger keys first, ties to the lower index — the order SPEC §2.10 and §4.5 ask for.
// Keys are doubles mapped to order-preserving 64-bit integers (a total order, NaN included).

#pragma once

#define TOPK_CAP 1024  // k ≤ TOPK_CAP; shared memory: 2·CAP·(8 + 4) bytes = 24 KiB

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

// Sorts the first m (≤ 2·TOPK_CAP) unsigned values ascending in place (shared array `v`).
__device__ void bitonic_ascending(unsigned* v, int m) {
    int n = 1;
    while (n < m) n <<= 1;
    for (int i = m + threadIdx.x; i < n; i += blockDim.x) v[i] = 0xffffffffu;
    for (int size = 2; size <= n; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            __syncthreads();
            for (int i = threadIdx.x; i < n / 2; i += blockDim.x) {
                const int lo = 2 * i - (i & (stride - 1));
                const int hi = lo + stride;
                const bool up = ((lo & size) == 0);
                if ((v[lo] > v[hi]) == up) {
                    const unsigned t = v[lo];
                    v[lo] = v[hi];
                    v[hi] = t;
                }
            }
        }
    }
    __syncthreads();
}

// kv_compress on the device (SPEC §4). Rows r = w·G + g are the window queries of a kv head's
// group; window query w is aligned with cache entry N - W + w and masked after it.
//   stats  (chunks, Hkv, B)   per row and key chunk: running max and sum (base 2)
//   means  (chunks, Hkv, B)   merge the stats, rescore, window-mean probabilities a[b, hq, n]
//                             (both with FMAs, or — 16-bit caches, D 64/128 — mma.sync: `_mma`)
//   pool   (n / 256, Hc, B)   group reduction (mean / max / per query head), 1-D pooling
//   topk   (Hc, B)            the budget - W best positions (ties to the lower), ascending, by
//                              radix select (any budget)
//   gather (capacity, Hc, B)  kept entries then the window into [B, Hc, capacity, D]
//   compact (Hc, B)           or, over a paged cache (SPEC §7.5), moved in place: entries
//                             0 .. len - 1 of the head's own pages, its length set
// Over a paged cache every kernel reads keys through the block table, each head scores its own
// N_h - W entries (`head_lens`; 0: the sequence does not compress) and rows keep the longest
// head's stride.
// AdaKV (one budget shared by a batch row's heads) replaces topk by:
//   topk on a copy of the params: each head's `floor_keep` best into floor_sel
//   adakv_mask  (Hc, B)       those positions' pooled scores to -inf
//   adakv_extra (B)           the `extra_keep` best of the row's concatenated heads (ties: lower
//                             head, then lower position = lower concatenated index)
//   adakv_merge (Hc, B)       each head's two ascending lists merged into `selected`, `lengths`

#define COMPRESS_THREADS 128
#define COMPRESS_KEYS 32

__device__ __forceinline__ int compress_rows(const EkCompressParams& p) { return p.group * p.window; }

// Entries head h of sequence b holds: its own length over a paged cache (0: the sequence does not
// compress, and every kernel leaves it), `entries` over contiguous caches.
__device__ __forceinline__ int head_entries(const EkCompressParams& p, int b, int h) {
    return p.head_lens ? (int)reinterpret_cast<const unsigned*>(p.head_lens)[(long long)b * p.out_heads + h] : p.entries;
}

// Scores per (b, head) row of means / pooled: the longest head's N - W (a shorter head's row ends early).
__device__ __forceinline__ int score_stride(const EkCompressParams& p) { return p.entries - p.window; }

// Element offset of entry `key` of head h of sequence b: through the block table over a paged
// cache, by the tensor's strides otherwise (`t`: k_cache or v_cache, for its strides).
__device__ __forceinline__ long long cache_row(const EkCompressParams& p, const EkTensor& t, int b, int h, int key) {
    if (!p.block_table) return row_offset(t, b, h, key);
    const long long page = reinterpret_cast<const unsigned*>(p.block_table)[(long long)b * p.table_width + key / p.page_size];
    return page * p.page_stride + (long long)(key % p.page_size) * p.slot_stride + (long long)h * p.head_stride;
}

// Loads the group's window queries (scaled to base 2) into qs [rows][d + 1].
template <typename T> __device__ void load_window(const EkCompressParams& p, int b, int h, float* qs) {
    const int d = p.obs.shape[3], rows = compress_rows(p);
    const T* obs = tensor_ptr<T>(p.obs);
    for (int i = threadIdx.x; i < rows * d; i += blockDim.x) {
        const int r = i / d, x = i % d, w = r / p.group, g = r % p.group;
        qs[r * (d + 1) + x] = to_f32(obs[row_offset(p.obs, b, h * p.group + g, w) + x]) * p.scale_log2;
    }
}

// Loads keys k0..k0 + COMPRESS_KEYS (zero past n) into ks [keys][d + 1].
template <typename T> __device__ void load_keys(const EkCompressParams& p, int b, int h, int k0, int n, float* ks) {
    const int d = p.k_cache.shape[3];
    const T* k = tensor_ptr<T>(p.k_cache);
    for (int i = threadIdx.x; i < COMPRESS_KEYS * d; i += blockDim.x) {
        const int j = i / d, x = i % d;
        ks[j * (d + 1) + x] = (k0 + j < n) ? to_f32(ld_global_elem(k + cache_row(p, p.k_cache, b, h, k0 + j) + x)) : 0.f;
    }
}

// Score of row r against key slot j, or -inf where the window query may not see the key (the
// head holds n entries; window query w sits at entry n - W + w).
__device__ __forceinline__ float window_score(const EkCompressParams& p, const float* qs, const float* ks, int r, int j, int key, int n) {
    const int d = p.k_cache.shape[3];
    const int w = r / p.group;
    if (key >= n || key > n - p.window + w) return EK_NEG_INF;
    float acc = 0.f;
    for (int x = 0; x < d; x++) acc += qs[r * (d + 1) + x] * ks[j * (d + 1) + x];
    return acc;
}

// Row r's softmax reference and 1/sum over all chunks (the stats of every chunk merged).
__device__ __forceinline__ void compress_row_norm(const EkCompressParams& p, int b, int h, int r, float& ref, float& inv_l) {
    const int rows = compress_rows(p);
    const float* stats = reinterpret_cast<const float*>(p.stats);
    const long long base = (((long long)b * p.k_cache.shape[1] + h) * p.chunks) * rows + r;
    float m = EK_NEG_INF;
    for (int cc = 0; cc < p.chunks; cc++) m = fmaxf(m, stats[(base + (long long)cc * rows) * 2]);
    ref = fmaxf(m, EK_NEG_BIG);
    float l = 0.f;
    for (int cc = 0; cc < p.chunks; cc++) {
        const long long o = (base + (long long)cc * rows) * 2;
        l += stats[o + 1] * exp2_f32(stats[o] - ref);
    }
    inv_l = 1.f / l;
}

// Every row's (reference, 1/sum) into norm [rows][2]; the caller's next barrier publishes them.
__device__ __forceinline__ void compress_row_norms(const EkCompressParams& p, int b, int h, float* norm) {
    for (int r = threadIdx.x; r < compress_rows(p); r += blockDim.x) compress_row_norm(p, b, h, r, norm[2 * r], norm[2 * r + 1]);
}

// A block's per-row (max, sum) of chunk c, ml [rows][2], into stats.
__device__ __forceinline__ void compress_store_stats(const EkCompressParams& p, int b, int h, int c, const float* ml) {
    __syncthreads();
    const int rows = compress_rows(p);
    float* stats = reinterpret_cast<float*>(p.stats);
    for (int r = threadIdx.x; r < rows; r += blockDim.x) {
        const long long o = ((((long long)b * p.k_cache.shape[1] + h) * p.chunks + c) * rows + r) * 2;
        stats[o] = ml[2 * r];
        stats[o + 1] = ml[2 * r + 1];
    }
}

// Window-mean probabilities of a key tile, acc [keys][group], written to means[b, hq, k0 + j] / W.
__device__ __forceinline__ void compress_flush_means(const EkCompressParams& p, int b, int h, int k0, int k_end, int keys, const float* acc) {
    const int scored = score_stride(p);
    float* means = reinterpret_cast<float*>(p.means);
    for (int i = threadIdx.x; i < keys * p.group; i += blockDim.x) {
        const int j = i / p.group, g = i % p.group;
        if (k0 + j < k_end) means[((long long)b * p.obs.shape[1] + h * p.group + g) * scored + k0 + j] = acc[i] / p.window;
    }
}

template <typename T> __device__ void compress_stats(const EkCompressParams& p) {
    EK_DYNAMIC_SHARED(float, smem);
    const int c = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int d = p.k_cache.shape[3], rows = compress_rows(p), n = head_entries(p, b, h);
    if (n == 0) return;
    float* qs = smem;
    float* ks = qs + rows * (d + 1);
    float* ml = ks + COMPRESS_KEYS * (d + 1);  // [rows][2]: running max and sum, one owner thread
    load_window<T>(p, b, h, qs);
    for (int r = threadIdx.x; r < rows; r += blockDim.x) ml[2 * r] = EK_NEG_INF, ml[2 * r + 1] = 0.f;
    const int k_end = min((c + 1) * p.chunk, n);
    for (int k0 = c * p.chunk; k0 < k_end; k0 += COMPRESS_KEYS) {
        __syncthreads();
        load_keys<T>(p, b, h, k0, k_end, ks);
        __syncthreads();
        for (int r = threadIdx.x; r < rows; r += blockDim.x) {
            float m = ml[2 * r], l = ml[2 * r + 1];
            // Streaming online softmax: one exp per key, a rescale when the max moves.
            for (int j = 0; j < COMPRESS_KEYS && k0 + j < k_end; j++) {
                const float sj = window_score(p, qs, ks, r, j, k0 + j, n);
                if (sj > m) {
                    l = l * exp2_f32(m - sj) + 1.f;
                    m = sj;
                } else {
                    l += exp2_f32(sj - fmaxf(m, EK_NEG_BIG));
                }
            }
            ml[2 * r] = m, ml[2 * r + 1] = l;
        }
    }
    compress_store_stats(p, b, h, c, ml);
}

// The window-mean numerators without atomics: rows go in passes of one row per thread, each
// pass's probabilities into probs [COMPRESS_THREADS][COMPRESS_KEYS + 1] (padded: conflict-free
// row-wise writes), then one thread per (key, group head) adds the pass's rows r ≡ g (mod G) in
// order to acc [keys][group]. The same bits on every run, unlike atomic adds.
template <typename T> __device__ void compress_means(const EkCompressParams& p) {
    EK_DYNAMIC_SHARED(float, smem);
    const int c = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int d = p.k_cache.shape[3], rows = compress_rows(p), n = head_entries(p, b, h), scored = n - p.window, G = p.group;
    if (n == 0) return;
    constexpr int PS = COMPRESS_KEYS + 1;
    float* qs = smem;
    float* ks = qs + rows * (d + 1);
    float* acc = ks + COMPRESS_KEYS * (d + 1);  // [keys][group]
    float* norm = acc + COMPRESS_KEYS * G;      // [rows][2]: reference and 1/sum
    float* probs = norm + 2 * rows;             // [COMPRESS_THREADS][PS]
    load_window<T>(p, b, h, qs);
    compress_row_norms(p, b, h, norm);
    const int k_end = min((c + 1) * p.chunk, scored);
    for (int k0 = c * p.chunk; k0 < k_end; k0 += COMPRESS_KEYS) {
        __syncthreads();
        load_keys<T>(p, b, h, k0, k_end, ks);
        for (int i = threadIdx.x; i < COMPRESS_KEYS * G; i += blockDim.x) acc[i] = 0.f;
        for (int r0 = 0; r0 < rows; r0 += blockDim.x) {
            __syncthreads();  // keys loaded, sums cleared; the previous pass's probs consumed
            const int r = r0 + threadIdx.x;
            if (r < rows)
                for (int j = 0; j < COMPRESS_KEYS && k0 + j < k_end; j++)
                    probs[threadIdx.x * PS + j] = exp2_f32(window_score(p, qs, ks, r, j, k0 + j, n) - norm[2 * r]) * norm[2 * r + 1];
            __syncthreads();
            const int r1 = min(r0 + (int)blockDim.x, rows);
            for (int i = threadIdx.x; i < COMPRESS_KEYS * G; i += blockDim.x) {
                const int j = i / G, g = i % G;
                if (k0 + j >= k_end) continue;
                float sum = acc[i];
                for (int rr = r0 + ((g - r0 % G) % G + G) % G; rr < r1; rr += G) sum += probs[(rr - r0) * PS + j];
                acc[i] = sum;
            }
        }
        __syncthreads();
        compress_flush_means(p, b, h, k0, k_end, COMPRESS_KEYS, acc);
    }
}

// ---------------------------------------------------------------------------------------------
// Tensor-core scoring (f16/bf16 caches, D 64 or 128, 16-byte aligned key rows): the same stats and
// means with S = obs·Kᵀ on mma.sync m16n8k16 (the prefill's fragment code), f32 accumulation,
// 64-key tiles. Rows are padded to 16-row slabs; warp w takes slabs w, w + 4, …; per-row state
// lives in shared memory, so any row count whose tiles fit in it.

#define COMPRESS_MMA_WARPS 4
#define COMPRESS_MMA_KEYS 64

// The window rows r = w·G + g as 16-bit values into qs [slabs·16][D + 8] (padding rows zero).
template <int D> __device__ void compress_mma_window(const EkCompressParams& p, int b, int h, int rows_pad, unsigned short* qs) {
    const int rows = compress_rows(p);
    const unsigned short* obs = reinterpret_cast<const unsigned short*>(p.obs.ptr);
    for (int i = threadIdx.x; i < rows_pad * D; i += blockDim.x) {
        const int r = i / D, x = i % D;
        qs[r * (D + 8) + x] = r < rows ? obs[row_offset(p.obs, b, h * p.group + r % p.group, r / p.group) + x] : 0;
    }
}

// Keys k0 .. k0 + COMPRESS_MMA_KEYS (zero at and past `end`) into ks [keys][D + 8], 16 bytes at a time.
template <int D> __device__ void compress_mma_keys(const EkCompressParams& p, int b, int h, int k0, int end, unsigned short* ks) {
    const unsigned short* k = reinterpret_cast<const unsigned short*>(p.k_cache.ptr);
    for (int i = threadIdx.x; i < COMPRESS_MMA_KEYS * (D / 8); i += blockDim.x) {
        const int j = i / (D / 8), x = (i % (D / 8)) * 8;
        uint32_t w[4] = {0, 0, 0, 0};
        if (k0 + j < end) ld_global_16(k + cache_row(p, p.k_cache, b, h, k0 + j) + x, w);
        const uint4 v = make_uint4(w[0], w[1], w[2], w[3]);
        *reinterpret_cast<uint4*>(ks + j * (D + 8) + x) = v;
    }
}

// S (unscaled) of slab `sl`'s rows against the key tile: s[nt][e] is row sl·16 + g + 8·(e / 2),
// key nt·8 + 2·(lane % 4) + e % 2 (the mma accumulator layout).
template <typename T, int D>
__device__ __forceinline__ void compress_mma_slab(const unsigned short* qs, const unsigned short* ks, int sl, float (*s)[4]) {
    constexpr int DP = D + 8, NT = COMPRESS_MMA_KEYS / 8;
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int nt = 0; nt < NT; nt++) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
    // Fragments by ldmatrix, as in the prefill: the slab's A, K's B for two key tiles at once.
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) {
        uint32_t qa[4];
        ldmatrix_x4(qa, qs + (sl * 16 + (lane & 15)) * DP + kk * 16 + (lane >> 4) * 8);
#pragma unroll
        for (int nt = 0; nt < NT; nt += 2) {
            uint32_t kb[4];
            ldmatrix_x4(kb, ks + (nt * 8 + (lane >> 4) * 8 + (lane & 7)) * DP + kk * 16 + ((lane >> 3) & 1) * 8);
            Mma<T>::run(s[nt], qa, kb[0], kb[1]);
            Mma<T>::run(s[nt + 1], qa, kb[2], kb[3]);
        }
    }
}

template <typename T, int D> __device__ void compress_stats_mma(const EkCompressParams& p) {
    EK_DYNAMIC_SHARED(unsigned short, sh);
    constexpr int NT = COMPRESS_MMA_KEYS / 8;
    const int c = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int rows = compress_rows(p), slabs = (rows + 15) / 16, n = head_entries(p, b, h);
    if (n == 0) return;
    unsigned short* qs = sh;
    unsigned short* ks = qs + slabs * 16 * (D + 8);
    // Running max and sum per row in shared memory (a row belongs to one warp), so the slab loop
    // stays rolled and any number of rows fits: register arrays for 4 unrolled slabs took 244
    // registers at D 128.
    float* ml = reinterpret_cast<float*>(ks + COMPRESS_MMA_KEYS * (D + 8));  // [slabs·16][2]
    compress_mma_window<D>(p, b, h, slabs * 16, qs);
    for (int i = threadIdx.x; i < slabs * 16; i += blockDim.x) ml[2 * i] = EK_NEG_INF, ml[2 * i + 1] = 0.f;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, cp = (lane & 3) * 2;
    const int k_end = min((c + 1) * p.chunk, n);
    for (int k0 = c * p.chunk; k0 < k_end; k0 += COMPRESS_MMA_KEYS) {
        __syncthreads();
        compress_mma_keys<D>(p, b, h, k0, k_end, ks);
        __syncthreads();
#pragma unroll 1
        for (int sl = warp; sl < slabs; sl += COMPRESS_MMA_WARPS) {
            float s[NT][4];
            compress_mma_slab<T, D>(qs, ks, sl, s);
            const int r[2] = {sl * 16 + g, sl * 16 + g + 8};
            float mx[2] = {ml[2 * r[0]], ml[2 * r[1]]}, m_old[2] = {mx[0], mx[1]};
#pragma unroll
            for (int nt = 0; nt < NT; nt++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int key = k0 + nt * 8 + cp + (e & 1), w = r[e >> 1] / p.group;
                    const bool visible = key < k_end && key <= n - p.window + w;
                    s[nt][e] = visible ? s[nt][e] * p.scale_log2 : EK_NEG_INF;
                    mx[e >> 1] = fmaxf(mx[e >> 1], s[nt][e]);
                }
            float sum[2] = {0.f, 0.f};
#pragma unroll
            for (int h2 = 0; h2 < 2; h2++) {
                mx[h2] = fmaxf(mx[h2], __shfl_xor_sync(0xffffffffu, mx[h2], 1));
                mx[h2] = fmaxf(mx[h2], __shfl_xor_sync(0xffffffffu, mx[h2], 2));
                const float ref = fmaxf(mx[h2], EK_NEG_BIG);
#pragma unroll
                for (int nt = 0; nt < NT; nt++) sum[h2] += exp2_f32(s[nt][2 * h2] - ref) + exp2_f32(s[nt][2 * h2 + 1] - ref);
                sum[h2] += __shfl_xor_sync(0xffffffffu, sum[h2], 1);
                sum[h2] += __shfl_xor_sync(0xffffffffu, sum[h2], 2);
                sum[h2] += ml[2 * r[h2] + 1] * exp2_f32(m_old[h2] - ref);
            }
            __syncwarp();  // every lane of the quad has read the row's old state
            if ((lane & 3) == 0)
#pragma unroll
                for (int h2 = 0; h2 < 2; h2++) ml[2 * r[h2]] = mx[h2], ml[2 * r[h2] + 1] = sum[h2];
        }
    }
    compress_store_stats(p, b, h, c, ml);
}

// A warp's slab of probabilities, [16][COMPRESS_MMA_PS] floats (padded rows).
#define COMPRESS_MMA_PS (COMPRESS_MMA_KEYS + 8)

// The window-mean numerators without atomics: a warp writes its slab's probabilities to its own
// scratch, then each lane adds the slab's rows of the (key, group head) pairs it owns to the
// warp's partial sums, rows in order; after the slabs, the warps' partials are added in warp
// order. The same bits on every run.
template <typename T, int D> __device__ void compress_means_mma(const EkCompressParams& p) {
    EK_DYNAMIC_SHARED(unsigned short, sh);
    constexpr int NT = COMPRESS_MMA_KEYS / 8;
    const int c = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int rows = compress_rows(p), slabs = (rows + 15) / 16, n = head_entries(p, b, h), scored = n - p.window, G = p.group;
    if (n == 0) return;
    unsigned short* qs = sh;
    unsigned short* ks = qs + slabs * 16 * (D + 8);
    float* norm = reinterpret_cast<float*>(ks + COMPRESS_MMA_KEYS * (D + 8));  // [rows][2]
    float* part = norm + 2 * rows;                                            // [warps][keys][group]
    float* probs = part + COMPRESS_MMA_WARPS * COMPRESS_MMA_KEYS * G;          // [warps][16][PS]
    compress_mma_window<D>(p, b, h, slabs * 16, qs);
    compress_row_norms(p, b, h, norm);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, cp = (lane & 3) * 2;
    float* mine = part + warp * COMPRESS_MMA_KEYS * G;
    float* slab_probs = probs + warp * 16 * COMPRESS_MMA_PS;
    const int k_end = min((c + 1) * p.chunk, scored);
    for (int k0 = c * p.chunk; k0 < k_end; k0 += COMPRESS_MMA_KEYS) {
        __syncthreads();
        compress_mma_keys<D>(p, b, h, k0, k_end, ks);
        for (int i = threadIdx.x; i < COMPRESS_MMA_WARPS * COMPRESS_MMA_KEYS * G; i += blockDim.x) part[i] = 0.f;
        __syncthreads();
#pragma unroll 1
        for (int sl = warp; sl < slabs; sl += COMPRESS_MMA_WARPS) {
            float s[NT][4];
            compress_mma_slab<T, D>(qs, ks, sl, s);
            // Every scored key is visible to every window row (keys < N - W).
#pragma unroll
            for (int h2 = 0; h2 < 2; h2++) {
                const int r = sl * 16 + g + 8 * h2;
                const float ref = r < rows ? norm[2 * r] : 0.f, inv_l = r < rows ? norm[2 * r + 1] : 0.f;
#pragma unroll
                for (int nt = 0; nt < NT; nt++)
#pragma unroll
                    for (int e = 2 * h2; e < 2 * h2 + 2; e++)
                        slab_probs[(g + 8 * h2) * COMPRESS_MMA_PS + nt * 8 + cp + (e & 1)] =
                            exp2_f32(s[nt][e] * p.scale_log2 - ref) * inv_l;
            }
            __syncwarp();
            // Lane-owned pairs (key j, head g): the slab's rows r ≡ g (mod G), ascending.
            for (int i = lane; i < COMPRESS_MMA_KEYS * G; i += 32) {
                const int j = i / G, gh = i % G;
                if (k0 + j >= k_end) continue;
                float sum = mine[i];
                for (int rr = sl * 16 + ((gh - sl * 16 % G) % G + G) % G; rr < min(sl * 16 + 16, rows); rr += G)
                    sum += slab_probs[(rr - sl * 16) * COMPRESS_MMA_PS + j];
                mine[i] = sum;
            }
            __syncwarp();  // the slab's probabilities are consumed before the next slab's
        }
        __syncthreads();
        // The warps' partials in warp order, into warp 0's (each element read and written by one thread).
        for (int i = threadIdx.x; i < COMPRESS_MMA_KEYS * G; i += blockDim.x) {
            float sum = part[i];
            for (int w = 1; w < COMPRESS_MMA_WARPS; w++) sum += part[w * COMPRESS_MMA_KEYS * G + i];
            part[i] = sum;
        }
        __syncthreads();
        compress_flush_means(p, b, h, k0, k_end, COMPRESS_MMA_KEYS, part);
    }
}

// The group-reduced score of output head hc at position n.
__device__ __forceinline__ float reduced(const EkCompressParams& p, const float* means, int b, int hc, int n) {
    const int scored = score_stride(p), hq_all = p.obs.shape[1];
    const float* row0 = means + (long long)b * hq_all * scored;
    if (p.gqa_mode == 2) return row0[(long long)hc * scored + n];
    float v = p.gqa_mode == 1 ? EK_NEG_INF : 0.f;
    for (int g = 0; g < p.group; g++) {
        const float x = row0[(long long)(hc * p.group + g) * scored + n];
        v = p.gqa_mode == 1 ? fmaxf(v, x) : v + x;
    }
    return p.gqa_mode == 1 ? v : v / p.group;
}

// Positions past a shorter head's scores pool to -inf: never above a real (≥ 0) score.
__device__ void compress_pool(const EkCompressParams& p) {
    const int hc = blockIdx.y, b = blockIdx.z;
    const int stride = score_stride(p), scored = head_entries(p, b, hc) - p.window, half = p.pooling_kernel / 2;
    const int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= stride) return;
    float* pooled = reinterpret_cast<float*>(p.pooled) + ((long long)b * p.out_heads + hc) * stride;
    if (n >= scored) {
        pooled[n] = EK_NEG_INF;
        return;
    }
    const float* means = reinterpret_cast<const float*>(p.means);
    const int lo = max(n - half, 0), hi = min(n + half + 1, scored);
    float out;
    if (p.pooling == 0) {
        out = reduced(p, means, b, hc, n);
    } else if (p.pooling == 1) {
        float sum = 0.f;
        for (int i = lo; i < hi; i++) sum += reduced(p, means, b, hc, i);
        out = sum * (1.f / p.pooling_kernel);
    } else {
        out = EK_NEG_INF;
        for (int i = lo; i < hi; i++) out = fmaxf(out, reduced(p, means, b, hc, i));
    }
    pooled[n] = out;
}

// The budget - W best of a head's scores (all of them when it holds fewer); with `lengths`, the
// entries the head keeps, window included.
__device__ void compress_topk(const EkCompressParams& p) {
    __shared__ SelectShared s;
    const int hc = blockIdx.x, b = blockIdx.y, n = head_entries(p, b, hc);
    if (n == 0) return;
    const int stride = score_stride(p), keep = p.budget - p.window, k = min(keep, n - p.window);
    const long long row = (long long)b * p.out_heads + hc;
    const float* scores = reinterpret_cast<const float*>(p.pooled) + row * stride;
    unsigned* sel = reinterpret_cast<unsigned*>(p.selected) + row * keep;
    // Radix select + ascending compaction: any keep, positions already ascending.
    if (k > 0) block_select([&](int i) { return scores[i]; }, n - p.window, k, s, sel);
    if (p.lengths && threadIdx.x == 0) reinterpret_cast<unsigned*>(p.lengths)[row] = k + p.window;
}

// A head's floor picks: its floor_keep best, or all its scores when it holds fewer.
__device__ __forceinline__ int adakv_floor_of(const EkCompressParams& p, int b, int hc) {
    return min(p.floor_keep, head_entries(p, b, hc) - p.window);
}

// AdaKV's cross-head picks of batch row b: what the row's budget leaves after the floors, at most
// the scores the floors left (every head compressing holds at least W entries).
__device__ __forceinline__ int adakv_extras(const EkCompressParams& p, int b) {
    if (!p.head_lens) return p.extra_keep;
    const int share = p.budget - p.window;
    int floors = 0, rest = 0;
    for (int hc = 0; hc < p.out_heads; hc++) {
        const int f = adakv_floor_of(p, b, hc);
        floors += f;
        rest += head_entries(p, b, hc) - p.window - f;
    }
    return min(p.out_heads * share - floors, rest);
}

// AdaKV: floor picks can never be extras (pooled scores are ≥ 0, the masked ones -inf, and
// extra_keep ≤ the unmasked count).
__device__ void compress_adakv_mask(const EkCompressParams& p) {
    const int hc = blockIdx.x, b = blockIdx.y, stride = score_stride(p);
    if (head_entries(p, b, hc) == 0) return;
    const long long row = (long long)b * p.out_heads + hc;
    const unsigned* floor = reinterpret_cast<const unsigned*>(p.floor_sel) + row * p.floor_keep;
    float* pooled = reinterpret_cast<float*>(p.pooled) + row * stride;
    for (int i = threadIdx.x; i < adakv_floor_of(p, b, hc); i += blockDim.x) pooled[floor[i]] = EK_NEG_INF;
}

// What the shared picks may not take — a head's floor picks (masked to -inf, which no real
// score is: real ones are ≥ 0, or NaN) and the padding past a shorter head's scores — ranks
// below everything, NaN included (key 0); the count is at most what is left, so it is never
// picked.
__device__ void compress_adakv_extra(const EkCompressParams& p) {
    __shared__ SelectShared s;
    const int b = blockIdx.x, stride = score_stride(p);
    if (head_entries(p, b, 0) == 0) return;
    const int extras = adakv_extras(p, b);
    const float* rows = reinterpret_cast<const float*>(p.pooled) + (long long)b * p.out_heads * stride;
    unsigned* out = reinterpret_cast<unsigned*>(p.extra_sel) + (long long)b * p.extra_keep;
    const auto key = [&](int i) -> unsigned {
        const float x = rows[i];
        const bool taken = x == EK_NEG_INF || i % stride >= head_entries(p, b, i / stride) - p.window;
        return taken ? 0u : sortable32(x);
    };
    if (extras > 0) block_select_keys<unsigned>(key, p.out_heads * stride, extras, s, out);
}

// First index of the ascending a[0..n) that is ≥ x.
__device__ __forceinline__ int lower_bound_u32(const unsigned* a, int n, unsigned x) {
    int lo = 0;
    while (n > 0) {
        const int half = n / 2;
        if (a[lo + half] < x) lo += half + 1, n -= half + 1;
        else n = half;
    }
    return lo;
}

// Merge by rank: an element's place is its index in its own list plus the count of smaller
// elements in the other (the lists are disjoint).
__device__ void compress_adakv_merge(const EkCompressParams& p) {
    const int hc = blockIdx.x, b = blockIdx.y, stride = score_stride(p);
    if (head_entries(p, b, hc) == 0) return;
    const long long row = (long long)b * p.out_heads + hc;
    const int nf = adakv_floor_of(p, b, hc), extras = adakv_extras(p, b);
    const unsigned* floor = reinterpret_cast<const unsigned*>(p.floor_sel) + row * p.floor_keep;
    const unsigned* all = reinterpret_cast<const unsigned*>(p.extra_sel) + (long long)b * p.extra_keep;
    const unsigned base = (unsigned)hc * stride;
    const int e0 = lower_bound_u32(all, extras, base);
    const int ne = lower_bound_u32(all, extras, base + stride) - e0;
    const unsigned* extra = all + e0;
    unsigned* out = reinterpret_cast<unsigned*>(p.selected) + row * p.list_stride;
    for (int i = threadIdx.x; i < nf; i += blockDim.x)
        out[i + lower_bound_u32(extra, ne, base + floor[i])] = floor[i];
    for (int j = threadIdx.x; j < ne; j += blockDim.x) {
        const unsigned pos = extra[j] - base;
        out[j + lower_bound_u32(floor, nf, pos)] = pos;
    }
    if (threadIdx.x == 0) reinterpret_cast<unsigned*>(p.lengths)[row] = nf + ne + p.window;
}

// Slot `slot` of head (b, hc): a kept position, then the window; slots past the head's length
// are left as allocated (zero).
template <typename T> __device__ void compress_gather(const EkCompressParams& p) {
    const int slot = blockIdx.x, hc = blockIdx.y, b = blockIdx.z;
    const long long row = (long long)b * p.out_heads + hc;
    const int len = p.lengths ? (int)reinterpret_cast<const unsigned*>(p.lengths)[row] : p.budget;
    if (slot >= len) return;
    const int d = p.k_cache.shape[3], keep = len - p.window;
    const int src = slot < keep ? (int)reinterpret_cast<const unsigned*>(p.selected)[row * p.list_stride + slot]
                                : p.entries - p.window + (slot - keep);
    const int h = hc / (p.out_heads / p.k_cache.shape[1]);
    const T* k = tensor_ptr<T>(p.k_cache);
    const T* v = tensor_ptr<T>(p.v_cache);
    T* ko = reinterpret_cast<T*>(p.k_out);
    T* vo = reinterpret_cast<T*>(p.v_out);
    const long long o = (row * p.capacity + slot) * d;
    for (int x = threadIdx.x; x < d; x += blockDim.x) {
        ko[o + x] = k[row_offset(p.k_cache, b, h, src) + x];
        vo[o + x] = v[row_offset(p.v_cache, b, h, src) + x];
    }
}

// Compaction in place over a paged cache (SPEC §7.5): head (b, hc)'s kept positions, then its
// window, move to entries 0 .. len - 1 of its own pages, and the cache's length becomes len.
// Race-free: one CTA per head moves COMPACT_ROWS entries a pass, every read of a pass before any
// of its writes (a barrier between). Entry j's source p_j ≥ j and the sources ascend, so a pass
// writes only entries below every later pass's sources. Rows move as words W: 16-byte vectors
// when the rows and pools lie on the 16-byte grid (`_v16`), elements otherwise. Per pass the rows'
// source and destination offsets are worked out once (K and V share the page layout);
// moved [2][COMPACT_ROWS][row words]: K then V.
#define COMPACT_ROWS 32

template <typename W> __device__ void compress_compact(const EkCompressParams& p) {
    EK_DYNAMIC_SHARED(uint4, raw);  // 16-byte aligned, whatever W
    W* moved = reinterpret_cast<W*>(raw);
    __shared__ long long from[COMPACT_ROWS], to[COMPACT_ROWS];  // byte offsets; -1: stays in place
    const int hc = blockIdx.x, b = blockIdx.y, n = head_entries(p, b, hc);
    if (n == 0) return;
    const int elem = p.dtype == EK_F32 ? 4 : 2, words = p.k_cache.shape[3] * elem / (int)sizeof(W);
    const long long row = (long long)b * p.out_heads + hc;
    const int len = (int)reinterpret_cast<const unsigned*>(p.lengths)[row], keep = len - p.window;
    const unsigned* sel = reinterpret_cast<const unsigned*>(p.selected) + row * p.list_stride;
    unsigned char* k = reinterpret_cast<unsigned char*>(p.k_cache.ptr);
    unsigned char* v = reinterpret_cast<unsigned char*>(p.v_cache.ptr);
    for (int j0 = 0; j0 < len; j0 += COMPACT_ROWS) {
        for (int r = threadIdx.x; r < COMPACT_ROWS; r += blockDim.x) {
            const int j = j0 + r;
            const int src = j < keep ? (int)sel[j] : n - p.window + (j - keep);
            const bool moves = j < len && src != j;
            from[r] = moves ? cache_row(p, p.k_cache, b, hc, src) * elem : -1;
            to[r] = moves ? cache_row(p, p.k_cache, b, hc, j) * elem : -1;
        }
        __syncthreads();
        // Plain loads (not the read-only path): this kernel writes the pools.
        for (int i = threadIdx.x; i < COMPACT_ROWS * words; i += blockDim.x) {
            const int r = i / words, x = i % words;
            if (from[r] >= 0) {
                moved[i] = ld_global_elem(reinterpret_cast<const W*>(k + from[r]) + x);
                moved[COMPACT_ROWS * words + i] = ld_global_elem(reinterpret_cast<const W*>(v + from[r]) + x);
            }
        }
        __syncthreads();
        for (int i = threadIdx.x; i < COMPACT_ROWS * words; i += blockDim.x) {
            const int r = i / words, x = i % words;
            if (to[r] >= 0) {
                reinterpret_cast<W*>(k + to[r])[x] = moved[i];
                reinterpret_cast<W*>(v + to[r])[x] = moved[COMPACT_ROWS * words + i];
            }
        }
        __syncthreads();  // offsets and staging are rewritten by the next pass
    }
    if (threadIdx.x == 0) reinterpret_cast<unsigned*>(p.cache_lens)[row] = (unsigned)len;
}

extern "C" __global__ void __launch_bounds__(COMPRESS_THREADS) ek_compress_stats_f32(EkCompressParams p) { compress_stats<float>(p); }
extern "C" __global__ void __launch_bounds__(COMPRESS_THREADS) ek_compress_stats_f16(EkCompressParams p) { compress_stats<f16_t>(p); }
extern "C" __global__ void __launch_bounds__(COMPRESS_THREADS) ek_compress_stats_bf16(EkCompressParams p) { compress_stats<bf16_t>(p); }
extern "C" __global__ void __launch_bounds__(COMPRESS_THREADS) ek_compress_means_f32(EkCompressParams p) { compress_means<float>(p); }
extern "C" __global__ void __launch_bounds__(COMPRESS_THREADS) ek_compress_means_f16(EkCompressParams p) { compress_means<f16_t>(p); }
extern "C" __global__ void __launch_bounds__(COMPRESS_THREADS) ek_compress_means_bf16(EkCompressParams p) { compress_means<bf16_t>(p); }
#define EK_COMPRESS_MMA(T, sfx, D)                                                                                 \
    extern "C" __global__ void __launch_bounds__(COMPRESS_MMA_WARPS * 32) ek_compress_stats_mma_##sfx##_d##D(EkCompressParams p) { \
        compress_stats_mma<T, D>(p);                                                                               \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(COMPRESS_MMA_WARPS * 32) ek_compress_means_mma_##sfx##_d##D(EkCompressParams p) { \
        compress_means_mma<T, D>(p);                                                                               \
    }
EK_COMPRESS_MMA(f16_t, f16, 64)
EK_COMPRESS_MMA(f16_t, f16, 128)
EK_COMPRESS_MMA(bf16_t, bf16, 64)
EK_COMPRESS_MMA(bf16_t, bf16, 128)
extern "C" __global__ void __launch_bounds__(256) ek_compress_pool(EkCompressParams p) { compress_pool(p); }
extern "C" __global__ void __launch_bounds__(512) ek_compress_topk(EkCompressParams p) { compress_topk(p); }
extern "C" __global__ void __launch_bounds__(256) ek_compress_adakv_mask(EkCompressParams p) { compress_adakv_mask(p); }
extern "C" __global__ void __launch_bounds__(512) ek_compress_adakv_extra(EkCompressParams p) { compress_adakv_extra(p); }
extern "C" __global__ void __launch_bounds__(256) ek_compress_adakv_merge(EkCompressParams p) { compress_adakv_merge(p); }
extern "C" __global__ void __launch_bounds__(COMPRESS_THREADS) ek_compress_gather_f32(EkCompressParams p) { compress_gather<float>(p); }
extern "C" __global__ void __launch_bounds__(COMPRESS_THREADS) ek_compress_gather_f16(EkCompressParams p) { compress_gather<f16_t>(p); }
extern "C" __global__ void __launch_bounds__(COMPRESS_THREADS) ek_compress_gather_bf16(EkCompressParams p) { compress_gather<bf16_t>(p); }
extern "C" __global__ void __launch_bounds__(COMPRESS_THREADS) ek_compress_compact_f32(EkCompressParams p) { compress_compact<unsigned>(p); }
extern "C" __global__ void __launch_bounds__(COMPRESS_THREADS) ek_compress_compact_f16(EkCompressParams p) { compress_compact<unsigned short>(p); }
extern "C" __global__ void __launch_bounds__(COMPRESS_THREADS) ek_compress_compact_bf16(EkCompressParams p) { compress_compact<unsigned short>(p); }
extern "C" __global__ void __launch_bounds__(COMPRESS_THREADS) ek_compress_compact_v16(EkCompressParams p) { compress_compact<uint4>(p); }

// kv_compress on the device (SPEC §4). Rows r = w·G + g are the window queries of a kv head's
// group; window query w is aligned with cache entry N - W + w and masked after it.
//   stats  (chunks, Hkv, B)   per row and key chunk: running max and sum (base 2)
//   means  (chunks, Hkv, B)   merge the stats, rescore, window-mean probabilities a[b, hq, n]
//   pool   (n / 256, Hc, B)   group reduction (mean / max / per query head), 1-D pooling
//   topk   (Hc, B)            the budget - W best positions (ties to the lower), ascending, by
//                              radix select (any budget)
//   gather (budget, Hc, B)    kept entries then the window into [B, Hc, budget, D]

#define COMPRESS_THREADS 128
#define COMPRESS_KEYS 32

__device__ __forceinline__ int compress_rows(const EkCompressParams& p) { return p.group * p.window; }

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
        ks[j * (d + 1) + x] = (k0 + j < n) ? to_f32(k[row_offset(p.k_cache, b, h, k0 + j) + x]) : 0.f;
    }
}

// Score of row r against key slot j, or -inf where the window query may not see the key.
__device__ __forceinline__ float window_score(const EkCompressParams& p, const float* qs, const float* ks, int r, int j, int key) {
    const int d = p.k_cache.shape[3];
    const int w = r / p.group;
    if (key >= p.entries || key > p.entries - p.window + w) return EK_NEG_INF;
    float acc = 0.f;
    for (int x = 0; x < d; x++) acc += qs[r * (d + 1) + x] * ks[j * (d + 1) + x];
    return acc;
}

template <typename T> __device__ void compress_stats(const EkCompressParams& p) {
    extern __shared__ float smem[];
    const int c = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int d = p.k_cache.shape[3], rows = compress_rows(p);
    float* qs = smem;
    float* ks = smem + rows * (d + 1);
    load_window<T>(p, b, h, qs);
    const int k_end = min((c + 1) * p.chunk, p.entries);
    float m[2] = {EK_NEG_INF, EK_NEG_INF}, l[2] = {0.f, 0.f};  // rows tid and tid + 128
    for (int k0 = c * p.chunk; k0 < k_end; k0 += COMPRESS_KEYS) {
        __syncthreads();
        load_keys<T>(p, b, h, k0, k_end, ks);
        __syncthreads();
        for (int i = 0; i < 2; i++) {
            const int r = threadIdx.x + i * COMPRESS_THREADS;
            if (r >= rows) continue;
            // Streaming online softmax: one exp per key, a rescale when the max moves.
            for (int j = 0; j < COMPRESS_KEYS && k0 + j < k_end; j++) {
                const float sj = window_score(p, qs, ks, r, j, k0 + j);
                if (sj > m[i]) {
                    l[i] = l[i] * exp2_f32(m[i] - sj) + 1.f;
                    m[i] = sj;
                } else {
                    l[i] += exp2_f32(sj - fmaxf(m[i], EK_NEG_BIG));
                }
            }
        }
    }
    float* stats = reinterpret_cast<float*>(p.stats);
    for (int i = 0; i < 2; i++) {
        const int r = threadIdx.x + i * COMPRESS_THREADS;
        if (r >= rows) continue;
        const long long o = ((((long long)b * p.k_cache.shape[1] + h) * p.chunks + c) * rows + r) * 2;
        stats[o] = m[i];
        stats[o + 1] = l[i];
    }
}

template <typename T> __device__ void compress_means(const EkCompressParams& p) {
    extern __shared__ float smem[];
    const int c = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int d = p.k_cache.shape[3], rows = compress_rows(p), hkv = p.k_cache.shape[1];
    const int scored = p.entries - p.window;
    float* qs = smem;
    float* ks = qs + rows * (d + 1);
    float* acc = ks + COMPRESS_KEYS * (d + 1);  // [keys][group]
    load_window<T>(p, b, h, qs);
    // Each row's softmax normaliser over all chunks.
    const float* stats = reinterpret_cast<const float*>(p.stats);
    float ref[2] = {0.f, 0.f}, inv_l[2] = {0.f, 0.f};
    for (int i = 0; i < 2; i++) {
        const int r = threadIdx.x + i * COMPRESS_THREADS;
        if (r >= rows) continue;
        const long long base = (((long long)b * hkv + h) * p.chunks) * rows + r;
        float m = EK_NEG_INF;
        for (int cc = 0; cc < p.chunks; cc++) m = fmaxf(m, stats[(base + (long long)cc * rows) * 2]);
        ref[i] = fmaxf(m, EK_NEG_BIG);
        float l = 0.f;
        for (int cc = 0; cc < p.chunks; cc++) {
            const long long o = (base + (long long)cc * rows) * 2;
            l += stats[o + 1] * exp2_f32(stats[o] - ref[i]);
        }
        inv_l[i] = 1.f / l;
    }
    float* means = reinterpret_cast<float*>(p.means);
    const int k_end = min((c + 1) * p.chunk, scored);
    for (int k0 = c * p.chunk; k0 < k_end; k0 += COMPRESS_KEYS) {
        __syncthreads();
        load_keys<T>(p, b, h, k0, k_end, ks);
        for (int i = threadIdx.x; i < COMPRESS_KEYS * p.group; i += blockDim.x) acc[i] = 0.f;
        __syncthreads();
        for (int i = 0; i < 2; i++) {
            const int r = threadIdx.x + i * COMPRESS_THREADS;
            if (r >= rows) continue;
            for (int j = 0; j < COMPRESS_KEYS && k0 + j < k_end; j++) {
                const float pr = exp2_f32(window_score(p, qs, ks, r, j, k0 + j) - ref[i]) * inv_l[i];
                atomicAdd(&acc[j * p.group + r % p.group], pr);
            }
        }
        __syncthreads();
        for (int i = threadIdx.x; i < COMPRESS_KEYS * p.group; i += blockDim.x) {
            const int j = i / p.group, g = i % p.group;
            if (k0 + j < k_end)
                means[((long long)b * p.obs.shape[1] + h * p.group + g) * scored + k0 + j] = acc[i] / p.window;
        }
    }
}

// The group-reduced score of output head hc at position n.
__device__ __forceinline__ float reduced(const EkCompressParams& p, const float* means, int b, int hc, int n) {
    const int scored = p.entries - p.window, hq_all = p.obs.shape[1];
    const float* row0 = means + (long long)b * hq_all * scored;
    if (p.gqa_mode == 2) return row0[(long long)hc * scored + n];
    float v = p.gqa_mode == 1 ? EK_NEG_INF : 0.f;
    for (int g = 0; g < p.group; g++) {
        const float x = row0[(long long)(hc * p.group + g) * scored + n];
        v = p.gqa_mode == 1 ? fmaxf(v, x) : v + x;
    }
    return p.gqa_mode == 1 ? v : v / p.group;
}

__device__ void compress_pool(const EkCompressParams& p) {
    const int hc = blockIdx.y, b = blockIdx.z;
    const int scored = p.entries - p.window, half = p.pooling_kernel / 2;
    const int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= scored) return;
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
    reinterpret_cast<float*>(p.pooled)[((long long)b * p.out_heads + hc) * scored + n] = out;
}

__device__ void compress_topk(const EkCompressParams& p) {
    __shared__ SelectShared s;
    const int hc = blockIdx.x, b = blockIdx.y;
    const int scored = p.entries - p.window, keep = p.budget - p.window;
    const float* row = reinterpret_cast<const float*>(p.pooled) + ((long long)b * p.out_heads + hc) * scored;
    unsigned* sel = reinterpret_cast<unsigned*>(p.selected) + ((long long)b * p.out_heads + hc) * keep;
    // Radix select + ascending compaction: any keep, positions already ascending.
    block_select([&](int i) { return row[i]; }, scored, keep, s, sel);
}

template <typename T> __device__ void compress_gather(const EkCompressParams& p) {
    const int slot = blockIdx.x, hc = blockIdx.y, b = blockIdx.z;
    const int d = p.k_cache.shape[3], keep = p.budget - p.window;
    const int src = slot < keep ? (int)reinterpret_cast<const unsigned*>(p.selected)[((long long)b * p.out_heads + hc) * keep + slot]
                                : p.entries - p.window + (slot - keep);
    const int h = hc / (p.out_heads / p.k_cache.shape[1]);
    const T* k = tensor_ptr<T>(p.k_cache);
    const T* v = tensor_ptr<T>(p.v_cache);
    T* ko = reinterpret_cast<T*>(p.k_out);
    T* vo = reinterpret_cast<T*>(p.v_out);
    const long long o = (((long long)b * p.out_heads + hc) * p.budget + slot) * d;
    for (int x = threadIdx.x; x < d; x += blockDim.x) {
        ko[o + x] = k[row_offset(p.k_cache, b, h, src) + x];
        vo[o + x] = v[row_offset(p.v_cache, b, h, src) + x];
    }
}

extern "C" __global__ void __launch_bounds__(COMPRESS_THREADS) ek_compress_stats_f32(EkCompressParams p) { compress_stats<float>(p); }
extern "C" __global__ void __launch_bounds__(COMPRESS_THREADS) ek_compress_stats_f16(EkCompressParams p) { compress_stats<f16_t>(p); }
extern "C" __global__ void __launch_bounds__(COMPRESS_THREADS) ek_compress_stats_bf16(EkCompressParams p) { compress_stats<bf16_t>(p); }
extern "C" __global__ void __launch_bounds__(COMPRESS_THREADS) ek_compress_means_f32(EkCompressParams p) { compress_means<float>(p); }
extern "C" __global__ void __launch_bounds__(COMPRESS_THREADS) ek_compress_means_f16(EkCompressParams p) { compress_means<f16_t>(p); }
extern "C" __global__ void __launch_bounds__(COMPRESS_THREADS) ek_compress_means_bf16(EkCompressParams p) { compress_means<bf16_t>(p); }
extern "C" __global__ void __launch_bounds__(256) ek_compress_pool(EkCompressParams p) { compress_pool(p); }
extern "C" __global__ void __launch_bounds__(512) ek_compress_topk(EkCompressParams p) { compress_topk(p); }
extern "C" __global__ void __launch_bounds__(COMPRESS_THREADS) ek_compress_gather_f32(EkCompressParams p) { compress_gather<float>(p); }
extern "C" __global__ void __launch_bounds__(COMPRESS_THREADS) ek_compress_gather_f16(EkCompressParams p) { compress_gather<f16_t>(p); }
extern "C" __global__ void __launch_bounds__(COMPRESS_THREADS) ek_compress_gather_bf16(EkCompressParams p) { compress_gather<bf16_t>(p); }

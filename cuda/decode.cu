// Decode attention over compacted caches with per-head lengths (flash-decoding, split-K).
// Pass 1: one CTA per (split, cache head, batch) scores its key chunk for the group's query rows
// (q rows and scores in shared memory), then writes per-row max, sum and unnormalised output.
// Pass 2: one CTA per (query row, cache head, batch) merges the splits.

#define DECODE_THREADS 128

template <typename T> __device__ void decode_split(const EkDecodeParams& p) {
    EK_DYNAMIC_SHARED(float, smem);
    const int s = blockIdx.x, hc = blockIdx.y, b = blockIdx.z;
    const int hcs = p.k_cache.shape[1], d = p.q.shape[3], nq = p.q.shape[1];
    const int rows = nq * p.group;
    const int kps = p.keys_per_split;
    const int len = (int)reinterpret_cast<const uint32_t*>(p.lengths)[b * hcs + hc];
    const int k0 = s * kps, k1 = min(len, k0 + kps), n = max(0, k1 - k0);
    float* qs = smem;               // [rows][d]
    float* sc = smem + rows * d;    // [rows][kps]
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, warps = blockDim.x >> 5;
    const T* q = tensor_ptr<T>(p.q);
    const T* kc = tensor_ptr<T>(p.k_cache);
    const T* vc = tensor_ptr<T>(p.v_cache);
    for (int i = tid; i < rows * d; i += blockDim.x) {
        const int r = i / d, x = i % d;
        const int qi = r / p.group, hq = hc * p.group + r % p.group;
        qs[i] = to_f32(q[row_offset(p.q, b, qi, hq) + x]) * p.scale_log2;
    }
    __syncthreads();
    // Scores: a warp per key, lanes across the head dim.
    for (int j = warp; j < n; j += warps) {
        const T* krow = kc + row_offset(p.k_cache, b, hc, k0 + j);
        float kv[8];
#pragma unroll
        for (int t = 0; t < 8; t++) kv[t] = (lane + 32 * t < d) ? to_f32(krow[lane + 32 * t]) : 0.f;
        for (int r = 0; r < rows; r++) {
            float acc = 0.f;
#pragma unroll
            for (int t = 0; t < 8; t++)
                if (lane + 32 * t < d) acc += qs[r * d + lane + 32 * t] * kv[t];
            acc = warp_sum(acc);
            if (lane == 0) sc[r * kps + j] = acc;
        }
    }
    __syncthreads();
    float* part = reinterpret_cast<float*>(p.partial);
    const long long base = (((long long)(b * hcs + hc) * p.splits + s) * rows) * (d + 2);
    // Row max and sum: a warp per row; probabilities replace scores in place.
    for (int r = warp; r < rows; r += warps) {
        float m = EK_NEG_INF;
        for (int j = lane; j < n; j += 32) m = fmaxf(m, sc[r * kps + j]);
        m = warp_max(m);
        const float ref = fmaxf(m, EK_NEG_BIG);
        float l = 0.f;
        for (int j = lane; j < n; j += 32) {
            const float e = exp2_f32(sc[r * kps + j] - ref);
            sc[r * kps + j] = e;
            l += e;
        }
        l = warp_sum(l);
        if (lane == 0) {
            part[base + (long long)r * (d + 2) + d] = m;
            part[base + (long long)r * (d + 2) + d + 1] = l;
        }
    }
    __syncthreads();
    // Unnormalised outputs: a thread per (row, dim); value rows read coalesced.
    for (int i = tid; i < rows * d; i += blockDim.x) {
        const int r = i / d, x = i % d;
        float acc = 0.f;
        for (int j = 0; j < n; j++) acc += sc[r * kps + j] * to_f32(vc[row_offset(p.v_cache, b, hc, k0 + j) + x]);
        part[base + (long long)r * (d + 2) + x] = acc;
    }
}

template <typename T> __device__ void decode_merge(const EkDecodeParams& p) {
    const int r = blockIdx.x, hc = blockIdx.y, b = blockIdx.z;
    const int hcs = p.k_cache.shape[1], d = p.q.shape[3], nq = p.q.shape[1];
    const int rows = nq * p.group;
    const float* part = reinterpret_cast<const float*>(p.partial);
    const long long head = ((long long)(b * hcs + hc) * p.splits) * rows;
    float m = EK_NEG_INF;
    for (int s = 0; s < p.splits; s++) m = fmaxf(m, part[(head + (long long)s * rows + r) * (d + 2) + d]);
    const float ref = fmaxf(m, EK_NEG_BIG);
    float l = 0.f;
    for (int s = 0; s < p.splits; s++) {
        const float* ps = part + (head + (long long)s * rows + r) * (d + 2);
        l += ps[d + 1] * exp2_f32(ps[d] - ref);
    }
    const int qi = r / p.group, hq = hc * p.group + r % p.group;
    T* out = tensor_mut<T>(p.out);
    for (int x = threadIdx.x; x < d; x += blockDim.x) {
        float acc = 0.f;
        for (int s = 0; s < p.splits; s++) {
            const float* ps = part + (head + (long long)s * rows + r) * (d + 2);
            acc += ps[x] * exp2_f32(ps[d] - ref);
        }
        out[row_offset(p.out, b, qi, hq) + x] = from_f32<T>(acc / l);
    }
}

extern "C" __global__ void __launch_bounds__(DECODE_THREADS) ek_decode_split_f32(EkDecodeParams p) { decode_split<float>(p); }
extern "C" __global__ void __launch_bounds__(DECODE_THREADS) ek_decode_split_f16(EkDecodeParams p) { decode_split<f16_t>(p); }
extern "C" __global__ void __launch_bounds__(DECODE_THREADS) ek_decode_split_bf16(EkDecodeParams p) { decode_split<bf16_t>(p); }
extern "C" __global__ void __launch_bounds__(DECODE_THREADS) ek_decode_merge_f32(EkDecodeParams p) { decode_merge<float>(p); }
extern "C" __global__ void __launch_bounds__(DECODE_THREADS) ek_decode_merge_f16(EkDecodeParams p) { decode_merge<f16_t>(p); }
extern "C" __global__ void __launch_bounds__(DECODE_THREADS) ek_decode_merge_bf16(EkDecodeParams p) { decode_merge<bf16_t>(p); }

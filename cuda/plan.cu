// Planning on the device (SPEC §2), in five launches, with no host round trip between them:
//   reps_q  (segments, B)       qmax + qmin per segment and query head, f64 (exact)
//   reps_k  (blocks, B)         kmax, kmin per block and kv head, f64
//   logits  (block tiles, Hkv, B) group-mean logits, f64 ranking keys, causal block mask
//   softmax (units)             distribution, layer fusion, entropy (f64 reductions)
//   decide  (B·Hkv)             head class, f32 budget recurrence, keep counts, segment maxima
//   rank    (units)             each unit's ranking (top `width`, ties to the lower block)
// The f32 budget recurrence uses round-to-nearest intrinsics so it is the host's bit for bit.

#define PLAN_THREADS 256

__device__ __forceinline__ int plan_unit(const EkPlanParams& p, int b, int h, int s) {
    return (b * p.kv_heads + h) * p.segments + s;
}

template <typename T> __device__ void plan_reps_q(const EkPlanParams& p) {
    const int s = blockIdx.x, b = blockIdx.y, d = p.head_dim;
    const int t0 = s * p.segment_size, t1 = min(t0 + p.segment_size, p.seq_len);
    const T* q = tensor_ptr<T>(p.q);
    double* qsum = reinterpret_cast<double*>(p.qsum);
    for (int i = threadIdx.x; i < p.q_heads * d; i += blockDim.x) {
        const int hq = i / d, x = i % d;
        float mx = EK_NEG_INF, mn = -EK_NEG_INF;
        for (int t = t0; t < t1; t++) {
            const float v = to_f32(q[row_offset(p.q, b, t, hq) + x]);
            mx = fmaxf(mx, v);
            mn = fminf(mn, v);
        }
        qsum[(((long long)b * p.segments + s) * p.q_heads + hq) * d + x] = (double)mx + (double)mn;
    }
}

template <typename T> __device__ void plan_reps_k(const EkPlanParams& p) {
    const int j = blockIdx.x, b = blockIdx.y, d = p.head_dim;
    const T* k = tensor_ptr<T>(p.k);
    double* krep = reinterpret_cast<double*>(p.krep);
    for (int i = threadIdx.x; i < p.kv_heads * d; i += blockDim.x) {
        const int h = i / d, x = i % d;
        float mx = EK_NEG_INF, mn = -EK_NEG_INF;
        for (int t = j * p.block_size; t < (j + 1) * p.block_size; t++) {
            const float v = to_f32(k[row_offset(p.k, b, t, h) + x]);
            mx = fmaxf(mx, v);
            mn = fminf(mn, v);
        }
        const long long o = (((long long)b * p.blocks + j) * p.kv_heads + h) * 2 * d;
        krep[o + x] = mx;
        krep[o + d + x] = mn;
    }
}

// One CTA per tile of `logit_tile` blocks of a kv head: the tile's K representatives are read
// into shared memory once and serve every segment that sees them (the segments' Q sums pass
// through in batches), so each K representative crosses L2 once instead of once per segment.
// Work item (segment, block, group head) = one pair of f64 dot products over D, summed in order
// x = 0 .. D-1; the group mean adds the heads in order: the same arithmetic as one thread per
// (unit, block).
__device__ void plan_logits(const EkPlanParams& p) {
    EK_DYNAMIC_SHARED(double, sm);
    const int jt = p.logit_tile, d = p.head_dim, g = p.q_heads / p.kv_heads, n = p.blocks;
    const int j0 = blockIdx.x * jt, h = blockIdx.y, b = blockIdx.z;
    const int jn = min(jt, n - j0), row = 2 * d + 1;      // K rows padded: conflict-free reads
    const int sb = max(1, (int)blockDim.x / (jt * g));    // segments per pass
    const int bps = p.segment_size / p.block_size;
    double* ks = sm;                                      // [jt][row]: max then min representative
    double* qs = ks + jt * row;                           // [sb][g][d]
    double* part = qs + sb * g * d;                       // [sb][jt][g]
    const double* qsum = reinterpret_cast<const double*>(p.qsum);
    const double* krep = reinterpret_cast<const double*>(p.krep);
    double* key = reinterpret_cast<double*>(p.key);
    float* logits = p.logits ? reinterpret_cast<float*>(p.logits) : 0;
    for (int i = threadIdx.x; i < jn * 2 * d; i += blockDim.x) {
        const int jj = i / (2 * d), x = i % (2 * d);
        ks[jj * row + x] = krep[(((long long)b * n + j0 + jj) * p.kv_heads + h) * 2 * d + x];
    }
    // Segment s sees blocks j < min(s · bps, n): those before `first` see none of this tile.
    const int first = min(p.segments, j0 / bps + 1);
    if (logits)
        for (int i = threadIdx.x; i < first * jn; i += blockDim.x)
            logits[(long long)plan_unit(p, b, h, i / jn) * n + j0 + i % jn] = EK_NEG_INF;
    for (int s0 = first; s0 < p.segments; s0 += sb) {
        const int sn = min(sb, p.segments - s0);
        __syncthreads();  // the K tile is in; the previous pass's qs and part are consumed
        for (int i = threadIdx.x; i < sn * g * d; i += blockDim.x)
            qs[i] = qsum[(((long long)b * p.segments + s0 + i / (g * d)) * p.q_heads + h * g) * d + i % (g * d)];
        __syncthreads();
        // Consecutive threads take consecutive blocks: distinct K rows, one Q row (broadcast).
        for (int i = threadIdx.x; i < sn * jt * g; i += blockDim.x) {
            const int jj = i % jt, gi = (i / jt) % g, sl = i / (jt * g);
            if (jj >= jn || j0 + jj >= min((s0 + sl) * bps, n)) continue;
            const double* q = qs + (sl * g + gi) * d;
            const double* kr = ks + jj * row;
            double with_max = 0.0, with_min = 0.0;
            for (int x = 0; x < d; x++) {
                with_max += q[x] * kr[x];
                with_min += q[x] * kr[d + x];
            }
            part[(sl * jt + jj) * g + gi] = 0.5 * fmax(with_max, with_min);
        }
        __syncthreads();
        for (int i = threadIdx.x; i < sn * jt; i += blockDim.x) {
            const int jj = i % jt, s = s0 + i / jt, j = j0 + jj;
            if (jj >= jn) continue;
            const long long u = plan_unit(p, b, h, s);
            if (j >= min(s * bps, n)) {
                if (logits) logits[u * n + j] = EK_NEG_INF;
                continue;
            }
            double sum = 0.0;
            for (int gi = 0; gi < g; gi++) sum += part[(i / jt * jt + jj) * g + gi];
            const double x = sum / g;
            key[u * n + j] = x;
            if (logits) logits[u * n + j] = (float)x;
        }
    }
}

// f64 block reductions through shared memory (blockDim.x a multiple of 32, ≤ 1024).
__device__ double block_max_f64(double v, double* red) {
    v = warp_max_f64(v);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    __syncthreads();
    double r = (threadIdx.x < (blockDim.x >> 5)) ? red[threadIdx.x] : EK_NEG_INF_F64;
    if (threadIdx.x < 32) r = warp_max_f64(r);
    if (threadIdx.x == 0) red[0] = r;
    __syncthreads();
    r = red[0];
    __syncthreads();
    return r;
}
__device__ double block_sum_f64(double v, double* red) {
    v = warp_sum_f64(v);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    __syncthreads();
    double r = (threadIdx.x < (blockDim.x >> 5)) ? red[threadIdx.x] : 0.0;
    if (threadIdx.x < 32) r = warp_sum_f64(r);
    if (threadIdx.x == 0) red[0] = r;
    __syncthreads();
    r = red[0];
    __syncthreads();
    return r;
}

__device__ void plan_softmax(const EkPlanParams& p) {
    __shared__ double red[32];
    const int u = blockIdx.x, s = u % p.segments, n = p.blocks;
    const int lim = min(s * (p.segment_size / p.block_size), n);
    double* key = reinterpret_cast<double*>(p.key) + (long long)u * n;
    float* scores = p.scores ? reinterpret_cast<float*>(p.scores) + (long long)u * n : 0;
    const float* prev = p.prev ? reinterpret_cast<const float*>(p.prev) + (long long)u * n : 0;
    double mx = EK_NEG_INF_F64;
    for (int j = threadIdx.x; j < lim; j += blockDim.x) mx = fmax(mx, key[j]);
    mx = block_max_f64(mx, red);
    double z = 0.0;
    for (int j = threadIdx.x; j < lim; j += blockDim.x) z += exp(key[j] - mx);
    z = block_sum_f64(z, red);
    double h = 0.0;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        double pj = s == 0 ? 1.0 / n : (j < lim ? exp(key[j] - mx) / z : 0.0);
        if (prev) pj = 0.25 * (double)prev[j] + 0.75 * pj;
        h -= pj * log(pj + 1e-9);
        if (scores) scores[j] = (float)pj;
        // With fusion the ranking follows the fused distribution.
        if (prev && j < lim) key[j] = pj;
    }
    h = block_sum_f64(h, red);
    if (threadIdx.x == 0) reinterpret_cast<float*>(p.entropy)[u] = (float)h;
}

// One thread per (b, h): SPEC §2.7–2.9 exactly as `plan::rules`, in f32 round-to-nearest.
__device__ void plan_decide(const EkPlanParams& p) {
    const int bh = blockIdx.x * blockDim.x + threadIdx.x;
    if (bh >= p.batch * p.kv_heads) return;
    const float* ent = reinterpret_cast<const float*>(p.entropy) + (long long)bh * p.segments;
    float* budget = reinterpret_cast<float*>(p.budgets) + (long long)bh * p.segments;
    uint32_t* keep = reinterpret_cast<uint32_t*>(p.keep) + (long long)bh * p.segments;
    bool rigid = true;
    for (int s = 1; s < p.segments; s++) rigid = rigid && ent[s] < p.e_t;
    if (p.fixed_budget) rigid = true;
    reinterpret_cast<uint8_t*>(p.classes)[bh] = rigid ? 0 : 1;
    const float base = (float)p.base_budget;
    const int nrep = p.segment_size / p.block_size;
    for (int s = 0; s < p.segments; s++) {
        float out;
        if (s == 0 || rigid) {
            out = base;
        } else {
            float r;
            if (s == 1) {
                r = p.delta_t;
            } else {
                const float prev = fmaxf(ent[s - 1], p.entropy_floor);
                r = __fdiv_rn(__fsub_rn(fmaxf(ent[s], p.entropy_floor), prev), __fadd_rn(prev, 1e-9f));
            }
            r = (r != r) ? 0.f : fminf(fmaxf(r, 0.f), __fadd_rn(1.f, p.delta_t));
            const float step = __fmul_rn(__fmul_rn(p.alpha, base), __fsub_rn(r, p.delta_t));
            out = fminf(fmaxf(__fadd_rn(budget[s - 1], step), base), __fmul_rn(3.f, base));
        }
        budget[s] = out;
        unsigned k = 0;
        if (s > 0) {
            const int by_budget = (int)floorf(__fdiv_rn(out, (float)p.block_size));
            k = (unsigned)min(min(by_budget, min(s * nrep, p.blocks)), p.keep_cap);
        }
        keep[s] = k;
        atomicMax(reinterpret_cast<unsigned*>(p.topk) + s, k);
    }
}

__device__ void plan_rank(const EkPlanParams& p) {
    __shared__ unsigned long long key_s[2 * TOPK_CAP];
    __shared__ unsigned idx_s[2 * TOPK_CAP];
    const int u = blockIdx.x, s = u % p.segments, n = p.blocks;
    const int lim = min(s * (p.segment_size / p.block_size), n);
    const double* key = reinterpret_cast<const double*>(p.key) + (long long)u * n;
    unsigned* order = reinterpret_cast<unsigned*>(p.order) + (long long)u * p.width;
    block_topk([&](int j) { return key[j]; }, lim, p.width, key_s, idx_s, order);
    // Rows with fewer candidates than the width go on with the masked blocks, ascending.
    for (int i = lim + threadIdx.x; i < p.width; i += blockDim.x) order[i] = (unsigned)i;
}

// Rankings wider than TOPK_CAP (3·base_budget / block_size > 1024: rare configurations): each
// candidate's rank is the number of candidates ranking before it — O(lim²) per unit, no shared
// memory, the same order as block_topk (larger first, ties to the lower index).
__device__ void plan_rank_wide(const EkPlanParams& p) {
    const int u = blockIdx.x, s = u % p.segments, n = p.blocks;
    const int lim = min(s * (p.segment_size / p.block_size), n);
    const double* key = reinterpret_cast<const double*>(p.key) + (long long)u * n;
    unsigned* order = reinterpret_cast<unsigned*>(p.order) + (long long)u * p.width;
    for (int i = threadIdx.x; i < lim; i += blockDim.x) {
        const unsigned long long ki = sortable(key[i]);
        int rank = 0;
        for (int j = 0; j < lim; j++) rank += ranks_before(sortable(key[j]), (unsigned)j, ki, (unsigned)i);
        if (rank < p.width) order[rank] = (unsigned)i;
    }
    // Rows with fewer candidates than the width go on with the masked blocks, ascending.
    for (int i = lim + threadIdx.x; i < p.width; i += blockDim.x) order[i] = (unsigned)i;
}

extern "C" __global__ void __launch_bounds__(PLAN_THREADS) ek_plan_reps_q_f32(EkPlanParams p) { plan_reps_q<float>(p); }
extern "C" __global__ void __launch_bounds__(PLAN_THREADS) ek_plan_reps_q_f16(EkPlanParams p) { plan_reps_q<f16_t>(p); }
extern "C" __global__ void __launch_bounds__(PLAN_THREADS) ek_plan_reps_q_bf16(EkPlanParams p) { plan_reps_q<bf16_t>(p); }
extern "C" __global__ void __launch_bounds__(PLAN_THREADS) ek_plan_reps_k_f32(EkPlanParams p) { plan_reps_k<float>(p); }
extern "C" __global__ void __launch_bounds__(PLAN_THREADS) ek_plan_reps_k_f16(EkPlanParams p) { plan_reps_k<f16_t>(p); }
extern "C" __global__ void __launch_bounds__(PLAN_THREADS) ek_plan_reps_k_bf16(EkPlanParams p) { plan_reps_k<bf16_t>(p); }
extern "C" __global__ void __launch_bounds__(PLAN_THREADS) ek_plan_logits(EkPlanParams p) { plan_logits(p); }
extern "C" __global__ void __launch_bounds__(PLAN_THREADS) ek_plan_softmax(EkPlanParams p) { plan_softmax(p); }
extern "C" __global__ void __launch_bounds__(PLAN_THREADS) ek_plan_decide(EkPlanParams p) { plan_decide(p); }
extern "C" __global__ void __launch_bounds__(PLAN_THREADS) ek_plan_rank(EkPlanParams p) { plan_rank(p); }
extern "C" __global__ void __launch_bounds__(PLAN_THREADS) ek_plan_rank_wide(EkPlanParams p) { plan_rank_wide(p); }

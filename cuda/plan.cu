// Planning on the device (SPEC §2), in six launches, with no host round trip between them:
//   reps_q  (planned segments, B) qmax + qmin per segment and query head, f64 (exact)
//   reps_k  (visible blocks, B)  kmax, kmin per block and kv head, f64
//   logits  (block tiles, Hkv, B) group-mean logits, f64 ranking keys, causal block mask
//   softmax (planned units)      distribution, layer fusion, entropy (f64 reductions)
//   decide  (B·Hkv)              head class, f32 budget recurrence, keep counts, segment maxima;
//                                `streaming` states continued and left for the next chunk
//   rank    (planned units)      each unit's ranking (top `width` by radix select, then sorted;
//                                ties to the lower block)
// A one-shot plan covers every segment of [B, L] tensors; a chunk (SPEC §7.2) plans segments
// seg_first .. seg_end of one sequence, its queries rows of a THD chunk and its keys read from
// the cache's pages. The f32 budget recurrence uses round-to-nearest intrinsics so it is the
// host's bit for bit.

#define PLAN_THREADS EK_LANES  // the lane sums of numerics.cuh need exactly this many threads
#define PLAN_RANK_THREADS 512  // ek_plan_rank: the bitonic sort's steps over RANK_SORT_CAP keys

__device__ __forceinline__ int plan_unit(const EkPlanParams& p, int b, int h, int s) {
    return (b * p.kv_heads + h) * p.segments + s;
}

// The planned unit of CTA x of the per-unit kernels (planned segments of every (b, h)). The
// ranking keys and rankings are kept per planned unit (row x), the plan's maps per unit.
__device__ __forceinline__ int planned_unit(const EkPlanParams& p, int x) {
    const int planned = p.seg_end - p.seg_first;
    return (x / planned) * p.segments + p.seg_first + x % planned;
}

// Row of unit (b, h, s), s planned, in the per-planned-unit buffers (`key`, `order`).
__device__ __forceinline__ long long planned_row(const EkPlanParams& p, int b, int h, int s) {
    return (long long)(b * p.kv_heads + h) * (p.seg_end - p.seg_first) + s - p.seg_first;
}

// Blocks the planned segments may select: those before the last one (SPEC §2.3's causal limit).
__device__ __forceinline__ int plan_visible_blocks(const EkPlanParams& p) {
    return min((p.seg_end - 1) * (p.segment_size / p.block_size), p.blocks);
}

// Element offset of query position t of query head hq.
__device__ __forceinline__ long long plan_q_row(const EkPlanParams& p, int b, int t, int hq) {
    return row_offset(p.q, b, p.q_token0 + t - p.q_pos0, hq);
}

// Element offset of key t of kv head h: through the sequence's block table over a paged cache.
__device__ __forceinline__ long long plan_k_row(const EkPlanParams& p, int b, int t, int h) {
    if (!p.block_table) return row_offset(p.k, b, t, h);
    const long long page = reinterpret_cast<const unsigned*>(p.block_table)[t / p.page_size];
    return page * p.page_stride + (long long)(t % p.page_size) * p.slot_stride + (long long)h * p.head_stride;
}

template <typename T> __device__ void plan_reps_q(const EkPlanParams& p) {
    const int s = p.seg_first + blockIdx.x, b = blockIdx.y, d = p.head_dim;
    const int t0 = s * p.segment_size, t1 = min(t0 + p.segment_size, p.seq_len);
    const T* q = tensor_ptr<T>(p.q);
    double* qsum = reinterpret_cast<double*>(p.qsum);
    for (int i = threadIdx.x; i < p.q_heads * d; i += blockDim.x) {
        const int hq = i / d, x = i % d;
        float mx = EK_NEG_INF, mn = -EK_NEG_INF;
        for (int t = t0; t < t1; t++) {
            const float v = to_f32(q[plan_q_row(p, b, t, hq) + x]);
            mx = fmaxf(mx, v);
            mn = fminf(mn, v);
        }
        qsum[(((long long)b * p.segments + s) * p.q_heads + hq) * d + x] = __dadd_rn((double)mx, (double)mn);
    }
}

template <typename T> __device__ void plan_reps_k(const EkPlanParams& p) {
    const int j = blockIdx.x, b = blockIdx.y, d = p.head_dim;
    // A plan of segment 0 alone sees no block (the grid cannot be empty).
    if (j >= plan_visible_blocks(p)) return;
    const T* k = tensor_ptr<T>(p.k);
    double* krep = reinterpret_cast<double*>(p.krep);
    for (int i = threadIdx.x; i < p.kv_heads * d; i += blockDim.x) {
        const int h = i / d, x = i % d;
        float mx = EK_NEG_INF, mn = -EK_NEG_INF;
        for (int t = j * p.block_size; t < (j + 1) * p.block_size; t++) {
            const float v = to_f32(k[plan_k_row(p, b, t, h) + x]);
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
// A work item is (pair of segments, block, group head): the two segments' Q sums share each K
// element read from shared memory (the Q rows are warp-wide broadcasts, the K rows are not), so a
// warp reads 6 shared wavefronts per 256 f64 operations instead of 5 per 128. Q sums pass through
// `logit_segments` segments × `logit_heads` group heads at a time (the host sizes them to the
// device's shared memory). Every dot product is numerics::dot's (ek_dot) for f32 inputs and
// numerics::dot32's (ek_dot32) for 16-bit inputs (ek_plan_logits_f32), the group mean adds the
// heads in order: the CPU's arithmetic.
#define PLAN_SEGS 2  // segments per work item

// ek_dot of rows qa and qb with the max (ka) and min (kb) representatives, in one pass: out =
// {qa·ka, qa·kb, qb·ka, qb·kb}, each with ek_dot's partial sums and order (f64 logits: f32 inputs).
__device__ __forceinline__ void plan_dots(const double* qa, const double* qb, const double* ka, const double* kb, int n,
                                          double* out) {
    double acc[4][8];
#pragma unroll
    for (int r = 0; r < 4; r++)
#pragma unroll
        for (int i = 0; i < 8; i++) acc[r][i] = 0.0;
    const int whole = n - n % 8;
    for (int x = 0; x < whole; x += 8)
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const double a = qa[x + i], b = qb[x + i], kx = ka[x + i], kn = kb[x + i];
            acc[0][i] = __dadd_rn(acc[0][i], __dmul_rn(a, kx));
            acc[1][i] = __dadd_rn(acc[1][i], __dmul_rn(a, kn));
            acc[2][i] = __dadd_rn(acc[2][i], __dmul_rn(b, kx));
            acc[3][i] = __dadd_rn(acc[3][i], __dmul_rn(b, kn));
        }
#pragma unroll
    for (int r = 0; r < 4; r++) {
        double sum = 0.0;
#pragma unroll
        for (int i = 0; i < 8; i++) sum = __dadd_rn(sum, acc[r][i]);
        out[r] = sum;
    }
    for (int x = whole; x < n; x++) {
        out[0] = __dadd_rn(out[0], __dmul_rn(qa[x], ka[x]));
        out[1] = __dadd_rn(out[1], __dmul_rn(qa[x], kb[x]));
        out[2] = __dadd_rn(out[2], __dmul_rn(qb[x], ka[x]));
        out[3] = __dadd_rn(out[3], __dmul_rn(qb[x], kb[x]));
    }
}

// The same four dots of f32 rows and keys by ek_dot32 (numerics::dot32: the logits of 16-bit
// inputs), widened to f64.
__device__ __forceinline__ void plan_dots(const float* qa, const float* qb, const float* ka, const float* kb, int n,
                                          double* out) {
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int x = 0; x < n; x++) {
        const float a = qa[x], b = qb[x], kx = ka[x], kn = kb[x];
        acc[0] = __fmaf_rn(a, kx, acc[0]);
        acc[1] = __fmaf_rn(a, kn, acc[1]);
        acc[2] = __fmaf_rn(b, kx, acc[2]);
        acc[3] = __fmaf_rn(b, kn, acc[3]);
    }
#pragma unroll
    for (int r = 0; r < 4; r++) out[r] = (double)acc[r];
}

// R: the dot products' precision (numerics::LogitPrecision) — double for f32 inputs, float for
// 16-bit inputs. The representatives are read as R: K's are f32 values (exact either way), Q's sums
// qmax + qmin, summed in f64, are rounded to f32 by the conversion (cvt.rn: the f32 sum's bits).
// Partial logits, group means and the key rows stay f64.
template <typename R> __device__ void plan_logits(const EkPlanParams& p) {
    EK_DYNAMIC_SHARED(double, sm);
    const int jt = p.logit_tile, d = p.head_dim, g = p.q_heads / p.kv_heads, n = p.blocks;
    const int j0 = blockIdx.x * jt, h = blockIdx.y, b = blockIdx.z;
    const int jn = min(jt, n - j0), row = 2 * d + 1;   // K rows padded: conflict-free reads
    const int sb = p.logit_segments, gb = p.logit_heads; // segments and group heads per pass
    const int bps = p.segment_size / p.block_size;
    R* ks = reinterpret_cast<R*>(sm);                     // [jt][row]: max then min representative
    R* qs = ks + jt * row;                                // [sb][gb][d]
    // [sb][jt][g], f64-aligned after the R arrays (LogitTiling::smem)
    double* part = sm + ((long long)(jt * row + sb * gb * d) * sizeof(R) + sizeof(double) - 1) / sizeof(double);
    const double* qsum = reinterpret_cast<const double*>(p.qsum);
    const double* krep = reinterpret_cast<const double*>(p.krep);
    double* key = reinterpret_cast<double*>(p.key);
    float* logits = p.logits ? reinterpret_cast<float*>(p.logits) : 0;
    // Only the blocks some planned segment sees have representatives (reps_k's grid).
    const int visible = min(jn, max(0, plan_visible_blocks(p) - j0));
    for (int i = threadIdx.x; i < visible * 2 * d; i += blockDim.x) {
        const int jj = i / (2 * d), x = i % (2 * d);
        ks[jj * row + x] = (R)krep[(((long long)b * n + j0 + jj) * p.kv_heads + h) * 2 * d + x];
    }
    // Segment s sees blocks j < min(s · bps, n): those before `first` see none of this tile.
    const int first = max(p.seg_first, min(p.seg_end, j0 / bps + 1));
    if (logits)
        for (int i = threadIdx.x; i < (first - p.seg_first) * jn; i += blockDim.x)
            logits[(long long)plan_unit(p, b, h, p.seg_first + i / jn) * n + j0 + i % jn] = EK_NEG_INF;
    for (int s0 = first; s0 < p.seg_end; s0 += sb) {
        const int sn = min(sb, p.seg_end - s0);
        for (int g0 = 0; g0 < g; g0 += gb) {
            const int gn = min(gb, g - g0);
            __syncthreads();  // the K tile is in; the previous pass's qs (and part) are consumed
            for (int i = threadIdx.x; i < sn * gn * d; i += blockDim.x) {
                const int sl = i / (gn * d), gi = (i / d) % gn, x = i % d;
                qs[(sl * gb + gi) * d + x] = (R)qsum[(((long long)b * p.segments + s0 + sl) * p.q_heads + h * g + g0 + gi) * d + x];
            }
            __syncthreads();
            // Consecutive threads take consecutive blocks: distinct K rows, one pair of Q rows.
            for (int i = threadIdx.x; i < (sb + PLAN_SEGS - 1) / PLAN_SEGS * jt * gn; i += blockDim.x) {
                const int jj = i % jt, gi = (i / jt) % gn, sa = i / (jt * gn) * PLAN_SEGS, sbb = min(sa + 1, sn - 1);
                // Later segments see more blocks: if the first of the pair sees none, the second may.
                if (jj >= jn || sa >= sn || j0 + jj >= min((s0 + sbb) * bps, n)) continue;
                const R* kr = ks + jj * row;
                double dots[4];
                plan_dots(qs + (sa * gb + gi) * d, qs + (sbb * gb + gi) * d, kr, kr + d, d, dots);
                part[(sa * jt + jj) * g + g0 + gi] = __dmul_rn(0.5, fmax(dots[0], dots[1]));
                part[(sbb * jt + jj) * g + g0 + gi] = __dmul_rn(0.5, fmax(dots[2], dots[3]));
            }
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
            for (int gi = 0; gi < g; gi++) sum = __dadd_rn(sum, part[(i / jt * jt + jj) * g + gi]);
            const double x = __ddiv_rn(sum, (double)g);
            key[planned_row(p, b, h, s) * n + j] = x;
            if (logits) logits[u * n + j] = (float)x;
        }
    }
}

// f64 block maximum through shared memory (blockDim.x a multiple of 32, ≤ 1024): exact in any order.
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

// Distribution, fusion and entropy of one unit, in the CPU's arithmetic (src/cpu/plan.rs):
// ek_exp/ek_ln, sums in numerics::lane_sum's order (EK_LANES threads).
__device__ void plan_softmax(const EkPlanParams& p) {
    __shared__ double red[EK_LANES];
    const int u = planned_unit(p, blockIdx.x), s = u % p.segments, n = p.blocks;
    const int lim = min(s * (p.segment_size / p.block_size), n);
    double* key = reinterpret_cast<double*>(p.key) + (long long)blockIdx.x * n;
    float* scores = p.scores ? reinterpret_cast<float*>(p.scores) + (long long)u * n : 0;
    const float* prev = p.prev ? reinterpret_cast<const float*>(p.prev) + (long long)u * n : 0;
    double mx = EK_NEG_INF_F64;
    for (int j = threadIdx.x; j < lim; j += blockDim.x) mx = fmax(mx, key[j]);
    mx = block_max_f64(mx, red);
    double z = 0.0;
    for (int j = threadIdx.x; j < lim; j += blockDim.x) z = __dadd_rn(z, ek_exp(__dsub_rn(key[j], mx)));
    z = ek_lane_sum(z, red);
    double h = 0.0;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        double pj = s == 0 ? __ddiv_rn(1.0, (double)n) : (j < lim ? __ddiv_rn(ek_exp(__dsub_rn(key[j], mx)), z) : 0.0);
        if (prev) pj = __dadd_rn(__dmul_rn(0.25, (double)prev[j]), __dmul_rn(0.75, pj));
        h = __dadd_rn(h, __dmul_rn(pj, ek_ln(__dadd_rn(pj, 1e-9))));
        if (scores) scores[j] = (float)pj;
        // With fusion the ranking follows the fused distribution.
        if (prev && j < lim) key[j] = pj;
    }
    h = ek_lane_sum(h, red);
    if (threadIdx.x == 0) reinterpret_cast<float*>(p.entropy)[u] = (float)(-h);
}

// One thread per (b, h): SPEC §2.7–2.9 and §7.2 exactly as `plan::rules` (budget_step), in f32
// round-to-nearest. `prompt` classes look at every segment's entropy (one-shot plans only);
// `streaming` ones decide each planned segment from the state the earlier segments left.
__device__ void plan_decide(const EkPlanParams& p) {
    const int bh = blockIdx.x * blockDim.x + threadIdx.x;
    if (bh >= p.batch * p.kv_heads) return;
    const float* ent = reinterpret_cast<const float*>(p.entropy) + (long long)bh * p.segments;
    float* budget = reinterpret_cast<float*>(p.budgets) + (long long)bh * p.segments;
    uint32_t* keep = reinterpret_cast<uint32_t*>(p.keep) + (long long)bh * p.segments;
    EkPlanState* states = reinterpret_cast<EkPlanState*>(p.states);
    EkPlanState st = states ? states[bh] : EkPlanState{1u, 0.f, 0.f, 0u};
    bool class_rigid = true;
    for (int s = 1; s < p.segments; s++) class_rigid = class_rigid && ent[s] < p.e_t;
    const float base = (float)p.base_budget;
    const int nrep = p.segment_size / p.block_size;
    for (int s = p.seg_first; s < p.seg_end; s++) {
        const float h = ent[s], floored = fmaxf(h, p.entropy_floor);
        bool rigid = p.prompt_classes ? class_rigid : (s == 0 || (st.rigid && h < p.e_t));
        rigid = rigid || p.fixed_budget;
        float out;
        if (s == 0 || rigid) {
            out = base;
        } else {
            float r = s == 1 ? p.delta_t
                             : __fdiv_rn(__fsub_rn(floored, st.floored_entropy), __fadd_rn(st.floored_entropy, 1e-9f));
            r = (r != r) ? 0.f : fminf(fmaxf(r, 0.f), __fadd_rn(1.f, p.delta_t));
            const float step = __fmul_rn(__fmul_rn(p.alpha, base), __fsub_rn(r, p.delta_t));
            out = fminf(fmaxf(__fadd_rn(st.budget, step), base), __fmul_rn(3.f, base));
        }
        st = EkPlanState{(s == 0 || rigid) ? 1u : 0u, out, floored, (uint32_t)s + 1};
        budget[s] = out;
        unsigned k = 0;
        if (s > 0) {
            const int by_budget = (int)floorf(__fdiv_rn(out, (float)p.block_size));
            k = (unsigned)min(min(by_budget, min(s * nrep, p.blocks)), p.keep_cap);
        }
        keep[s] = k;
        atomicMax(reinterpret_cast<unsigned*>(p.topk) + s, k);
    }
    const bool rigid_class = p.prompt_classes ? (class_rigid || p.fixed_budget) : st.rigid != 0;
    reinterpret_cast<uint8_t*>(p.classes)[bh] = rigid_class ? 0 : 1;
    if (states) states[bh] = st;
}

// Each unit's ranking: its `width` best candidate blocks (larger key first, ties to the lower
// block) by radix selection, then sorted in shared memory (up to RANK_SORT_CAP) or ranked by
// counting among the selected (wider rankings: rare configurations, O(width²)). Rows with fewer
// candidates than the width go on with the masked blocks, ascending. `order` rows are 2·width
// long: the ranking, then the selection's scratch.
__device__ void plan_rank(const EkPlanParams& p) {
    __shared__ SelectShared sel;
    __shared__ unsigned long long key_s[RANK_SORT_CAP];
    __shared__ unsigned idx_s[RANK_SORT_CAP];
    const int u = planned_unit(p, blockIdx.x), s = u % p.segments, n = p.blocks;
    const int lim = min(s * (p.segment_size / p.block_size), n);
    const double* key = reinterpret_cast<const double*>(p.key) + (long long)blockIdx.x * n;
    unsigned* order = reinterpret_cast<unsigned*>(p.order) + (long long)blockIdx.x * 2 * p.width;
    block_rank_topk([&](int j) { return key[j]; }, lim, p.width, sel, key_s, idx_s, order + p.width, order);
    for (int i = lim + threadIdx.x; i < p.width; i += blockDim.x) order[i] = (unsigned)i;
}

extern "C" __global__ void __launch_bounds__(PLAN_THREADS) ek_plan_reps_q_f32(EkPlanParams p) { plan_reps_q<float>(p); }
extern "C" __global__ void __launch_bounds__(PLAN_THREADS) ek_plan_reps_q_f16(EkPlanParams p) { plan_reps_q<f16_t>(p); }
extern "C" __global__ void __launch_bounds__(PLAN_THREADS) ek_plan_reps_q_bf16(EkPlanParams p) { plan_reps_q<bf16_t>(p); }
extern "C" __global__ void __launch_bounds__(PLAN_THREADS) ek_plan_reps_k_f32(EkPlanParams p) { plan_reps_k<float>(p); }
extern "C" __global__ void __launch_bounds__(PLAN_THREADS) ek_plan_reps_k_f16(EkPlanParams p) { plan_reps_k<f16_t>(p); }
extern "C" __global__ void __launch_bounds__(PLAN_THREADS) ek_plan_reps_k_bf16(EkPlanParams p) { plan_reps_k<bf16_t>(p); }
extern "C" __global__ void __launch_bounds__(PLAN_THREADS) ek_plan_logits(EkPlanParams p) { plan_logits<double>(p); }
extern "C" __global__ void __launch_bounds__(PLAN_THREADS) ek_plan_logits_f32(EkPlanParams p) { plan_logits<float>(p); }
extern "C" __global__ void __launch_bounds__(PLAN_THREADS) ek_plan_softmax(EkPlanParams p) { plan_softmax(p); }
extern "C" __global__ void __launch_bounds__(PLAN_THREADS) ek_plan_decide(EkPlanParams p) { plan_decide(p); }
extern "C" __global__ void __launch_bounds__(PLAN_RANK_THREADS) ek_plan_rank(EkPlanParams p) { plan_rank(p); }

// numerics.cuh on arrays (EkProbeParams), for the tests that compare its bits with src/numerics.rs.
extern "C" __global__ void __launch_bounds__(EK_LANES) ek_numerics_probe(EkProbeParams p) {
    __shared__ double red[EK_LANES];
    const double* x = reinterpret_cast<const double*>(p.x);
    const double* y = reinterpret_cast<const double*>(p.y);
    double* out = reinterpret_cast<double*>(p.out);
    if (p.op == EK_PROBE_LANE_SUM) {
        double v = 0.0;
        for (int j = threadIdx.x; j < p.n; j += blockDim.x) v = __dadd_rn(v, x[j]);
        v = ek_lane_sum(v, red);
        if (threadIdx.x == 0) out[0] = v;
        return;
    }
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= p.n) return;
    if (p.op == EK_PROBE_EXP) out[i] = ek_exp(x[i]);
    else if (p.op == EK_PROBE_LN) out[i] = ek_ln(x[i]);
    else out[i] = ek_dot(x + (long long)i * p.dim, y + (long long)i * p.dim, p.dim);
}

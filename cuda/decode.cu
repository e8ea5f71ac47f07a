// Decode attention over compacted caches with per-head lengths (flash-decoding, split-K).
// Pass 1: one CTA per (split, cache head, batch) scores its key chunk for the group's query rows
// (q rows and scores in shared memory), then writes per-row max, sum and unnormalised output.
// Memory-bound: every K and V row of the split is read from global memory once (16-byte loads
// where aligned), whatever the number of query rows up to DECODE_ROW_PASS.
// Pass 2: one CTA per (query row, cache head, batch) merges the splits.

#define DECODE_THREADS 128
#define DECODE_LANE_ELEMS 8  // elements of a cache row one lane holds (D ≤ 256)
#define DECODE_ROW_PASS 4    // query rows a thread accumulates outputs for at once

// How a warp covers cache rows: `lanes` lanes per row (a power of two ≤ 32), each holding
// `vectors` runs of VEC consecutive elements; element run i of lane `sub` starts at
// (sub + lanes·i)·VEC. VEC·sizeof(T) is 16 bytes when the host found the rows 16-byte aligned
// (one vector load per run), else VEC = 1.
template <int VEC> struct DecodeLanes {
    int lanes, vectors;
    __device__ __forceinline__ explicit DecodeLanes(int d) {
        const int runs = (d + VEC - 1) / VEC;
        lanes = 1;
        while (lanes < runs && lanes < 32) lanes *= 2;
        vectors = (runs + lanes - 1) / lanes;
    }
};

// Run i of lane `sub` of cache row `row` as floats (zeros past D).
template <typename T, int VEC>
__device__ __forceinline__ void decode_load(const T* row, int d, const DecodeLanes<VEC>& dl, int sub, float* out) {
#pragma unroll
    for (int i = 0; i < DECODE_LANE_ELEMS / VEC; i++) {
        const int x = (sub + dl.lanes * i) * VEC;
        if (i < dl.vectors && x < d) load_f32<T, VEC>(row + x, out + i * VEC);
        else
#pragma unroll
            for (int e = 0; e < VEC; e++) out[i * VEC + e] = 0.f;
    }
}

template <typename T, int VEC> __device__ void decode_split(const EkDecodeParams& p) {
    EK_DYNAMIC_SHARED(float, smem);
    const int s = blockIdx.x, hc = blockIdx.y, b = blockIdx.z;
    const int hcs = p.k_cache.shape[1], d = p.q.shape[3], nq = p.q.shape[1];
    const int rows = nq * p.group;
    const int kps = p.keys_per_split;
    const int len = (int)reinterpret_cast<const uint32_t*>(p.lengths)[b * hcs + hc];
    const int k0 = s * kps, k1 = min(len, k0 + kps), n = max(0, k1 - k0);
    const DecodeLanes<VEC> dl(d);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, warps = blockDim.x >> 5;
    const int sub = lane % dl.lanes, slot = lane / dl.lanes, per_warp = 32 / dl.lanes;
    const int streams = warps * per_warp, stream = warp * per_warp + slot;  // keys in flight
    // Region 1: the query rows, then (once scored) the per-stream partial outputs, ≤ 16 KiB:
    // streams · DECODE_ROW_PASS · D floats, streams = 4 · 32 / lanes.
    float* qs = smem;                                                          // [rows][d]
    float* red = smem;                                                         // [streams][ROW_PASS][d]
    float* sc = smem + max(rows * d, streams * DECODE_ROW_PASS * d);          // [rows][kps]
    const T* q = tensor_ptr<T>(p.q);
    const T* kc = tensor_ptr<T>(p.k_cache);
    const T* vc = tensor_ptr<T>(p.v_cache);
    for (int i = tid; i < rows * d; i += blockDim.x) {
        const int r = i / d, x = i % d;
        const int qi = r / p.group, hq = hc * p.group + r % p.group;
        qs[i] = to_f32(q[row_offset(p.q, b, qi, hq) + x]) * p.scale_log2;
    }
    __syncthreads();
    // This lane's elements of the first DECODE_ROW_PASS query rows, in registers: read from shared
    // memory per cache element loaded, they would cost `rows` shared loads per global one (zeros
    // past D or past the rows add nothing).
    float qr[DECODE_ROW_PASS][DECODE_LANE_ELEMS];
#pragma unroll
    for (int rr = 0; rr < DECODE_ROW_PASS; rr++)
#pragma unroll
        for (int i = 0; i < DECODE_LANE_ELEMS / VEC; i++) {
            const int x = (sub + dl.lanes * i) * VEC;
            const bool real = rr < rows && i < dl.vectors && x < d;
#pragma unroll
            for (int e = 0; e < VEC; e++) qr[rr][i * VEC + e] = real ? qs[rr * d + x + e] : 0.f;
        }
    // Scores: `lanes` lanes per key, each key row read once; the warp steps together (its
    // shuffles need every lane) and lanes past the split's keys hold zeros.
    for (int j0 = warp * per_warp; j0 < n; j0 += streams) {
        const int j = j0 + slot;
        float kv[DECODE_LANE_ELEMS];
        if (j < n) decode_load<T, VEC>(kc + row_offset(p.k_cache, b, hc, k0 + j), d, dl, sub, kv);
        else
#pragma unroll
            for (int e = 0; e < DECODE_LANE_ELEMS; e++) kv[e] = 0.f;
        auto store = [&](int r, float acc) {
            for (int o = dl.lanes / 2; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
            if (j < n && sub == 0) sc[r * kps + j] = acc;
        };
#pragma unroll
        for (int rr = 0; rr < DECODE_ROW_PASS; rr++) {
            if (rr >= rows) break;
            float acc = 0.f;
#pragma unroll
            for (int e = 0; e < DECODE_LANE_ELEMS; e++) acc += qr[rr][e] * kv[e];
            store(rr, acc);
        }
        for (int r = DECODE_ROW_PASS; r < rows; r++) {
            float acc = 0.f;
#pragma unroll
            for (int i = 0; i < DECODE_LANE_ELEMS / VEC; i++) {
                const int x = (sub + dl.lanes * i) * VEC;
                if (i < dl.vectors && x < d)
#pragma unroll
                    for (int e = 0; e < VEC; e++) acc += qs[r * d + x + e] * kv[i * VEC + e];
            }
            store(r, acc);
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
    // Unnormalised outputs, DECODE_ROW_PASS rows at a time: each stream sums its keys' value rows
    // (each read once per pass) into registers, then the streams' sums are added in a fixed
    // order (the same bits whatever the schedule).
    for (int r0 = 0; r0 < rows; r0 += DECODE_ROW_PASS) {
        __syncthreads();  // the scores are final; the previous pass's sums have been read
        float acc[DECODE_ROW_PASS][DECODE_LANE_ELEMS];
#pragma unroll
        for (int rr = 0; rr < DECODE_ROW_PASS; rr++)
#pragma unroll
            for (int e = 0; e < DECODE_LANE_ELEMS; e++) acc[rr][e] = 0.f;
        for (int j = stream; j < n; j += streams) {
            float vv[DECODE_LANE_ELEMS];
            decode_load<T, VEC>(vc + row_offset(p.v_cache, b, hc, k0 + j), d, dl, sub, vv);
#pragma unroll
            for (int rr = 0; rr < DECODE_ROW_PASS; rr++) {
                const float pr = r0 + rr < rows ? sc[(r0 + rr) * kps + j] : 0.f;
#pragma unroll
                for (int e = 0; e < DECODE_LANE_ELEMS; e++) acc[rr][e] += pr * vv[e];
            }
        }
#pragma unroll
        for (int i = 0; i < DECODE_LANE_ELEMS / VEC; i++) {
            const int x = (sub + dl.lanes * i) * VEC;
            if (i < dl.vectors && x < d)
#pragma unroll
                for (int rr = 0; rr < DECODE_ROW_PASS; rr++)
#pragma unroll
                    for (int e = 0; e < VEC; e++) red[(stream * DECODE_ROW_PASS + rr) * d + x + e] = acc[rr][i * VEC + e];
        }
        __syncthreads();
        for (int i = tid; i < DECODE_ROW_PASS * d; i += blockDim.x) {
            const int rr = i / d, x = i % d;
            if (r0 + rr >= rows) continue;
            float sum = 0.f;
            for (int st = 0; st < streams; st++) sum += red[(st * DECODE_ROW_PASS + rr) * d + x];
            part[base + (long long)(r0 + rr) * (d + 2) + x] = sum;
        }
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

// `ek_decode_split_<dtype>_v<VEC>`: VEC elements per load (16 bytes, or 1 for unaligned rows).
#define EK_DECODE_SPLIT(T, name, VEC)                                                                     \
    extern "C" __global__ void __launch_bounds__(DECODE_THREADS) ek_decode_split_##name##_v##VEC(EkDecodeParams p) { \
        decode_split<T, VEC>(p);                                                                          \
    }
EK_DECODE_SPLIT(float, f32, 4)
EK_DECODE_SPLIT(float, f32, 1)
EK_DECODE_SPLIT(f16_t, f16, 8)
EK_DECODE_SPLIT(f16_t, f16, 1)
EK_DECODE_SPLIT(bf16_t, bf16, 8)
EK_DECODE_SPLIT(bf16_t, bf16, 1)
extern "C" __global__ void __launch_bounds__(DECODE_THREADS) ek_decode_merge_f32(EkDecodeParams p) { decode_merge<float>(p); }
extern "C" __global__ void __launch_bounds__(DECODE_THREADS) ek_decode_merge_f16(EkDecodeParams p) { decode_merge<f16_t>(p); }
extern "C" __global__ void __launch_bounds__(DECODE_THREADS) ek_decode_merge_bf16(EkDecodeParams p) { decode_merge<bf16_t>(p); }

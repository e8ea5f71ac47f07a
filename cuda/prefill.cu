// Fused dense + block-sparse causal prefill (SPEC §3), one launch per layer.
//
// Grid: x = query tiles of all segments (longest first), y = batch · kv head. A tile stacks the
// G query heads of a group over `tile_tokens` tokens (row r = token·G + g), so every K/V row is
// read once per group. Each unit's keys are "slots": its selected blocks' tokens (gathered from
// global memory straight into shared memory: no gathered copy of K/V), then its segment's own
// keys, masked causally where a key comes after a row's token.
//
// Two kernels: `prefill_mma` (f16/bf16, D 64 or 128: mma.sync m16n8k16, f32 accumulation, the
// FlashAttention-2 register layout) and `prefill_simt` (every dtype and D ≤ 256: plain FMAs).
//
// `prefill_mma` comes in two tile heights, 16 rows per warp either way (same registers per
// thread): 4 warps × 16 = 64 rows, or 8 warps × 16 = 128 rows, which halves how often each K/V
// tile is re-read (from L2) per query row at the price of twice the shared memory for Q and fewer,
// larger CTAs. With GQA 32/8 a 64-row tile covers only 16 tokens, so at 16K tokens the re-reads
// (~32 GB per layer) rival the tensor work; the host picks per launch (`PrefillTile`).

#define PREFILL_MMA_ROWS_PER_WARP 16  // one m16 slab of the mma per warp
#define PREFILL_MMA_KEYS 64           // keys per shared-memory tile
#define PREFILL_SIMT_THREADS 128
#define PREFILL_SIMT_ROWS 32  // 4 threads per row
#define PREFILL_SIMT_KEYS 32  // keys per K/V tile; the `_k16` kernels take 16 (D up to 256 in 99 KiB)

// The keys of one unit, numbered as slots.
struct KeySlots {
    const uint32_t* list;  // selected blocks, or 0 for a dense unit
    int selected;          // selected tokens (blocks · Bk)
    int block;
    int own_start;         // the unit's own keys start here (segment start, or 0 when dense)
    int end;               // one past the tile's last query token
    __device__ __forceinline__ int total() const { return selected + (end - own_start); }
    __device__ __forceinline__ int token(int j) const {
        return j < selected ? (int)__ldg(list + j / block) * block + j % block : own_start + (j - selected);
    }
};

// The tile this CTA runs, or false when the tile is empty (a short last segment).
struct Tile {
    int b, h, t0, t1, rows;
    KeySlots keys;
};

__device__ __forceinline__ bool prefill_tile(const EkPrefillParams& p, Tile& t) {
    const int hkv = p.k.shape[2], len = p.q.shape[1];
    t.b = blockIdx.y / hkv;
    t.h = blockIdx.y % hkv;
    const int tile = gridDim.x - 1 - blockIdx.x;  // late (long) tiles first
    const int s = tile / p.tiles_per_segment, ti = tile % p.tiles_per_segment;
    const int seg_start = s * p.segment_size, seg_end = min(seg_start + p.segment_size, len);
    t.t0 = seg_start + ti * p.tile_tokens;
    if (t.t0 >= seg_end) return false;
    t.t1 = min(t.t0 + p.tile_tokens, seg_end);
    t.rows = (t.t1 - t.t0) * p.group;
    t.keys.block = p.block_size;
    t.keys.end = t.t1;
    const int u = blockIdx.y * p.segments + s;
    const uint32_t count = p.offsets ? reinterpret_cast<const uint32_t*>(p.counts)[u] : EK_DENSE_UNIT;
    if (count == EK_DENSE_UNIT) {
        t.keys.list = 0;
        t.keys.selected = 0;
        t.keys.own_start = 0;
    } else {
        t.keys.list = reinterpret_cast<const uint32_t*>(p.indices) + reinterpret_cast<const uint32_t*>(p.offsets)[u];
        t.keys.selected = (int)count * p.block_size;
        t.keys.own_start = seg_start;
    }
    return true;
}

// ---------------------------------------------------------------------------------------------
// SIMT kernel: 4 threads per row, each owning the dims d ≡ part (mod 4) of the row's output;
// KEYS keys per K/V tile.

template <typename T, int KEYS = PREFILL_SIMT_KEYS> __device__ void prefill_simt(const EkPrefillParams& p) {
    Tile t;
    if (!prefill_tile(p, t)) return;
    EK_DYNAMIC_SHARED(float, smem);
    const int d = p.q.shape[3], dp = d + 1;  // padded rows: no bank conflicts between rows
    float* qs = smem;                                 // [ROWS][dp]
    float* os = qs + PREFILL_SIMT_ROWS * dp;          // [ROWS][dp]
    float* ks = os + PREFILL_SIMT_ROWS * dp;          // [KEYS][dp]
    float* vs = ks + KEYS * dp;                       // [KEYS][dp]
    int* tok = reinterpret_cast<int*>(vs + KEYS * dp); // [KEYS]
    const int tid = threadIdx.x, r = tid >> 2, part = tid & 3;
    const T* q = tensor_ptr<T>(p.q);
    const T* k = tensor_ptr<T>(p.k);
    const T* v = tensor_ptr<T>(p.v);
    for (int i = tid; i < PREFILL_SIMT_ROWS * d; i += blockDim.x) {
        const int rr = i / d, x = i % d;
        float val = 0.f;
        if (rr < t.rows) val = to_f32(q[row_offset(p.q, t.b, t.t0 + rr / p.group, t.h * p.group + rr % p.group) + x]);
        qs[rr * dp + x] = val * p.scale_log2;
        os[rr * dp + x] = 0.f;
    }
    const int my_token = t.t0 + r / p.group;
    float m = EK_NEG_INF, l = 0.f;
    const int total = t.keys.total();
    for (int j0 = 0; j0 < total; j0 += KEYS) {
        __syncthreads();
        for (int i = tid; i < KEYS * d; i += blockDim.x) {
            const int j = i / d, x = i % d;
            float kv = 0.f, vv = 0.f;
            if (j0 + j < total) {
                const int tk = t.keys.token(j0 + j);
                kv = to_f32(k[row_offset(p.k, t.b, tk, t.h) + x]);
                vv = to_f32(v[row_offset(p.v, t.b, tk, t.h) + x]);
                if (x == 0) tok[j] = tk;
            } else if (x == 0) {
                tok[j] = 0x7fffffff;  // past the end: masked for every row
            }
            ks[j * dp + x] = kv;
            vs[j * dp + x] = vv;
        }
        __syncthreads();
        float s[KEYS];
        float mx = m;
#pragma unroll
        for (int j = 0; j < KEYS; j++) {
            float acc = 0.f;
            for (int x = part; x < d; x += 4) acc += qs[r * dp + x] * ks[j * dp + x];
            acc += __shfl_xor_sync(0xffffffffu, acc, 1);
            acc += __shfl_xor_sync(0xffffffffu, acc, 2);
            const int tk = tok[j];
            // Keys before the tile are visible to every row; later ones only up to the row's token.
            const bool visible = tk != 0x7fffffff && (tk < t.t0 || tk <= my_token);
            s[j] = visible ? acc : EK_NEG_INF;
            mx = fmaxf(mx, s[j]);
        }
        const float ref = fmaxf(mx, EK_NEG_BIG);
        const float alpha = exp2_f32(m - ref);
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < KEYS; j++) {
            s[j] = exp2_f32(s[j] - ref);
            sum += s[j];
        }
        l = l * alpha + sum;
        m = mx;
        for (int x = part; x < d; x += 4) {
            float acc = os[r * dp + x] * alpha;
#pragma unroll
            for (int j = 0; j < KEYS; j++) acc += s[j] * vs[j * dp + x];
            os[r * dp + x] = acc;
        }
    }
    if (r < t.rows) {
        const int hq = t.h * p.group + r % p.group;
        T* out = tensor_mut<T>(p.out);
        const long long o = row_offset(p.out, t.b, my_token, hq);
        for (int x = part; x < d; x += 4) out[o + x] = from_f32<T>(os[r * dp + x] / l);
        if (p.lse && part == 0) {
            reinterpret_cast<float*>(p.lse)[((long long)t.b * p.q.shape[2] + hq) * p.q.shape[1] + my_token] =
                (m + __log2f(l)) * 0.69314718055994531f;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tensor-core kernel (f16/bf16).

template <typename T> struct Mma;
template <> struct Mma<f16_t> {
    __device__ __forceinline__ static void run(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) { mma_f16(c, a, b0, b1); }
    __device__ __forceinline__ static uint32_t pack(float lo, float hi) { return pack_f16x2(lo, hi); }
};
template <> struct Mma<bf16_t> {
    __device__ __forceinline__ static void run(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) { mma_bf16(c, a, b0, b1); }
    __device__ __forceinline__ static uint32_t pack(float lo, float hi) { return pack_bf16x2(lo, hi); }
};


template <typename T, int D, int WARPS> __device__ void prefill_mma(const EkPrefillParams& p) {
    Tile t;
    if (!prefill_tile(p, t)) return;
    constexpr int DP = D + 8;  // padded shared rows (16 bytes): conflict-free fragment loads
    constexpr int KSTEPS = D / 16, DTILES = D / 8, NT = PREFILL_MMA_KEYS / 8;
    constexpr int ROWS = WARPS * PREFILL_MMA_ROWS_PER_WARP, CHUNKS = D / 8;  // 16-byte chunks per row
    EK_DYNAMIC_SHARED(unsigned short, sh);
    // K and V tiles double-buffered: tile i + 1 is copied (cp.async) while tile i is computed.
    unsigned short* qs = sh;                                      // [ROWS][DP]
    unsigned short* ks = qs + ROWS * DP;                          // [2][KEYS][DP]
    unsigned short* vs = ks + 2 * PREFILL_MMA_KEYS * DP;          // [2][KEYS][DP]
    int* toks = reinterpret_cast<int*>(vs + 2 * PREFILL_MMA_KEYS * DP);  // [2][KEYS]
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, c = (lane & 3) * 2;  // fragment row and column pair
    const unsigned short* q = reinterpret_cast<const unsigned short*>(p.q.ptr);
    const unsigned short* k = reinterpret_cast<const unsigned short*>(p.k.ptr);
    const unsigned short* v = reinterpret_cast<const unsigned short*>(p.v.ptr);
    const int total = t.keys.total();
    // Enqueues the K and V rows of slots j0 .. j0 + KEYS into buffer `buf`, 16 bytes at a time (D
    // is a multiple of 8), zeros past the unit's keys; one commit group per tile.
    auto issue = [&](int j0, int buf) {
        unsigned short* kb = ks + buf * PREFILL_MMA_KEYS * DP;
        unsigned short* vb = vs + buf * PREFILL_MMA_KEYS * DP;
        for (int i = tid; i < PREFILL_MMA_KEYS * CHUNKS; i += blockDim.x) {
            const int j = i / CHUNKS, x = (i % CHUNKS) * 8;
            const bool real = j0 + j < total;
            const int tk = real ? t.keys.token(j0 + j) : 0;
            cp_async_16(kb + j * DP + x, k + (real ? row_offset(p.k, t.b, tk, t.h) + x : 0), real ? 16 : 0);
            cp_async_16(vb + j * DP + x, v + (real ? row_offset(p.v, t.b, tk, t.h) + x : 0), real ? 16 : 0);
            if (x == 0) toks[buf * PREFILL_MMA_KEYS + j] = real ? tk : 0x7fffffff;
        }
        cp_async_commit();
    };
    // Q rows by cp.async too (zeros past the tile's rows), landing with the first K/V tile.
    for (int i = tid; i < ROWS * CHUNKS; i += blockDim.x) {
        const int rr = i / CHUNKS, x = (i % CHUNKS) * 8;
        const bool real = rr < t.rows;
        const long long src = real ? row_offset(p.q, t.b, t.t0 + rr / p.group, t.h * p.group + rr % p.group) + x : 0;
        cp_async_16(qs + rr * DP + x, q + src, real ? 16 : 0);
    }
    issue(0, 0);
    // Q stays in shared memory; its A fragments are reloaded per k-step (saves 4·D/16 registers
    // per thread, which keeps D = 128 under 255 registers without spills).
    const int r0 = warp * PREFILL_MMA_ROWS_PER_WARP + g;
    float o[DTILES][4];
#pragma unroll
    for (int i = 0; i < DTILES; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m[2] = {EK_NEG_INF, EK_NEG_INF}, l[2] = {0.f, 0.f};
    const int row_token[2] = {t.t0 + r0 / p.group, t.t0 + (r0 + 8) / p.group};
    for (int j0 = 0, buf = 0; j0 < total; j0 += PREFILL_MMA_KEYS, buf ^= 1) {
        // Tile j0 has landed (the next one may still be in flight) and is visible to every warp;
        // the buffer the next tile fills was released by the barrier ending the previous pass.
        if (j0 + PREFILL_MMA_KEYS < total) {
            issue(j0 + PREFILL_MMA_KEYS, buf ^ 1);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const unsigned short* kt = ks + buf * PREFILL_MMA_KEYS * DP;
        const unsigned short* vt = vs + buf * PREFILL_MMA_KEYS * DP;
        const int* tok = toks + buf * PREFILL_MMA_KEYS;
        // S = Q·Kᵀ for this warp's 16 rows and the tile's 64 keys.
        float s[NT][4];
#pragma unroll
        for (int nt = 0; nt < NT; nt++) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
        // Fragments by ldmatrix: Q's A (rows lane % 16, k half lane / 16), K's B for two key tiles
        // at once (keys of tile lane / 16, k half (lane / 8) % 2).
#pragma unroll
        for (int ks_ = 0; ks_ < KSTEPS; ks_++) {
            uint32_t qa[4];
            ldmatrix_x4(qa, qs + (warp * PREFILL_MMA_ROWS_PER_WARP + (lane & 15)) * DP + ks_ * 16 + (lane >> 4) * 8);
#pragma unroll
            for (int nt = 0; nt < NT; nt += 2) {
                uint32_t kb[4];  // b0, b1 of key tiles nt and nt + 1
                ldmatrix_x4(kb, kt + (nt * 8 + (lane >> 4) * 8 + (lane & 7)) * DP + ks_ * 16 + ((lane >> 3) & 1) * 8);
                Mma<T>::run(s[nt], qa, kb[0], kb[1]);
                Mma<T>::run(s[nt + 1], qa, kb[2], kb[3]);
            }
        }
        // Scale, mask, online softmax (rows g and g + 8 of the warp; a quad shares a row).
        float mx[2] = {m[0], m[1]};
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int half = e >> 1, tk = tok[nt * 8 + c + (e & 1)];
                const bool visible = tk != 0x7fffffff && (tk < t.t0 || tk <= row_token[half]);
                s[nt][e] = visible ? s[nt][e] * p.scale_log2 : EK_NEG_INF;
                mx[half] = fmaxf(mx[half], s[nt][e]);
            }
        }
        float alpha[2];
#pragma unroll
        for (int h2 = 0; h2 < 2; h2++) {
            mx[h2] = fmaxf(mx[h2], __shfl_xor_sync(0xffffffffu, mx[h2], 1));
            mx[h2] = fmaxf(mx[h2], __shfl_xor_sync(0xffffffffu, mx[h2], 2));
            const float ref = fmaxf(mx[h2], EK_NEG_BIG);
            alpha[h2] = exp2_f32(m[h2] - ref);
            m[h2] = mx[h2];
            l[h2] *= alpha[h2];
        }
        const float ref[2] = {fmaxf(m[0], EK_NEG_BIG), fmaxf(m[1], EK_NEG_BIG)};
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                s[nt][e] = exp2_f32(s[nt][e] - ref[e >> 1]);
                l[e >> 1] += s[nt][e];
            }
        }
#pragma unroll
        for (int dt = 0; dt < DTILES; dt++) {
            o[dt][0] *= alpha[0];
            o[dt][1] *= alpha[0];
            o[dt][2] *= alpha[1];
            o[dt][3] *= alpha[1];
        }
        // O += P·V: P's accumulator layout is the A-fragment layout of the next mma.
#pragma unroll
        for (int kk = 0; kk < PREFILL_MMA_KEYS / 16; kk++) {
            uint32_t pa[4];
            pa[0] = Mma<T>::pack(s[2 * kk][0], s[2 * kk][1]);
            pa[1] = Mma<T>::pack(s[2 * kk][2], s[2 * kk][3]);
            pa[2] = Mma<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            pa[3] = Mma<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
            // V's B fragments transposed from its [key][d] rows, two d tiles per ldmatrix.
            const unsigned short* vrow = vt + (kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * DP + (lane >> 4) * 8;
#pragma unroll
            for (int dt = 0; dt < DTILES; dt += 2) {
                uint32_t vb[4];  // b0, b1 of d tiles dt and dt + 1
                ldmatrix_x4_trans(vb, vrow + dt * 8);
                Mma<T>::run(o[dt], pa, vb[0], vb[1]);
                Mma<T>::run(o[dt + 1], pa, vb[2], vb[3]);
            }
        }
        __syncthreads();  // every warp is done with this buffer before it is refilled
    }
    // Finish: full row sums across the quad, normalise, write rows that exist.
#pragma unroll
    for (int h2 = 0; h2 < 2; h2++) {
        l[h2] += __shfl_xor_sync(0xffffffffu, l[h2], 1);
        l[h2] += __shfl_xor_sync(0xffffffffu, l[h2], 2);
    }
    T* out = tensor_mut<T>(p.out);
#pragma unroll
    for (int h2 = 0; h2 < 2; h2++) {
        const int r = r0 + 8 * h2;
        if (r >= t.rows) continue;
        const int hq = t.h * p.group + r % p.group;
        const long long off = row_offset(p.out, t.b, row_token[h2], hq);
        const float inv = 1.f / l[h2];
#pragma unroll
        for (int dt = 0; dt < DTILES; dt++) {
            out[off + dt * 8 + c] = from_f32<T>(o[dt][2 * h2] * inv);
            out[off + dt * 8 + c + 1] = from_f32<T>(o[dt][2 * h2 + 1] * inv);
        }
        if (p.lse && (lane & 3) == 0) {
            reinterpret_cast<float*>(p.lse)[((long long)t.b * p.q.shape[2] + hq) * p.q.shape[1] + row_token[h2]] =
                (m[h2] + __log2f(l[h2])) * 0.69314718055994531f;
        }
    }
}

extern "C" __global__ void __launch_bounds__(PREFILL_SIMT_THREADS) ek_prefill_simt_f32(EkPrefillParams p) { prefill_simt<float>(p); }
extern "C" __global__ void __launch_bounds__(PREFILL_SIMT_THREADS) ek_prefill_simt_f16(EkPrefillParams p) { prefill_simt<f16_t>(p); }
extern "C" __global__ void __launch_bounds__(PREFILL_SIMT_THREADS) ek_prefill_simt_bf16(EkPrefillParams p) { prefill_simt<bf16_t>(p); }
extern "C" __global__ void __launch_bounds__(PREFILL_SIMT_THREADS) ek_prefill_simt_f32_k16(EkPrefillParams p) { prefill_simt<float, 16>(p); }
extern "C" __global__ void __launch_bounds__(PREFILL_SIMT_THREADS) ek_prefill_simt_f16_k16(EkPrefillParams p) { prefill_simt<f16_t, 16>(p); }
extern "C" __global__ void __launch_bounds__(PREFILL_SIMT_THREADS) ek_prefill_simt_bf16_k16(EkPrefillParams p) { prefill_simt<bf16_t, 16>(p); }
// One kernel per (dtype, D, M = tile rows): `ek_prefill_mma_<dtype>_d<D>_m<M>`.
#define EK_PREFILL_MMA(T, name, D, M)                                                                     \
    extern "C" __global__ void __launch_bounds__(M / PREFILL_MMA_ROWS_PER_WARP * 32)                      \
        ek_prefill_mma_##name##_d##D##_m##M(EkPrefillParams p) {                                          \
        prefill_mma<T, D, M / PREFILL_MMA_ROWS_PER_WARP>(p);                                              \
    }
EK_PREFILL_MMA(f16_t, f16, 64, 64)
EK_PREFILL_MMA(f16_t, f16, 128, 64)
EK_PREFILL_MMA(bf16_t, bf16, 64, 64)
EK_PREFILL_MMA(bf16_t, bf16, 128, 64)
EK_PREFILL_MMA(f16_t, f16, 64, 128)
EK_PREFILL_MMA(f16_t, f16, 128, 128)
EK_PREFILL_MMA(bf16_t, bf16, 64, 128)
EK_PREFILL_MMA(bf16_t, bf16, 128, 128)

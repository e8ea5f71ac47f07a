// Attention over a paged cache with ragged queries (SPEC §7.4): prefill chunks, multi-token and
// single-token decode, dense or with a sequence's block plan, LSE out. The host cuts the work
// into tiles (EkAttendTile: ≤ ATTEND_ROWS query rows of one sequence and cache head, within one
// segment of a planned sequence); a tile's keys are its plan unit's listed blocks followed by its
// own contiguous range, numbered 0.. as "virtual" keys and cut into splits (split-K).
// Pass 1 (`ek_attend_split_*`): one CTA per (tile, split) — online softmax over ATTEND_KEYS-key
// tiles of K and V gathered through the block table into shared memory, every row's output
// accumulated in shared memory — writes the split's unnormalised output, max and sum.
// Pass 2 (`ek_attend_merge_*`): one CTA per tile merges the splits in order, writes out and lse.
// SIMT and untuned: the reference shape of the device's engine path, correct on every layout.
// Positions are int: caches up to 2^31 entries per head.

#define ATTEND_THREADS 128
#define ATTEND_KEYS 16  // keys per shared K/V tile

// Cache position of virtual key v of a tile (its unit's listed blocks first, then own_from..).
__device__ __forceinline__ int attend_key(const EkAttendParams& p, const EkAttendTile& t, int listed, int v) {
    if (v < listed * (int)t.block_size) {
        const uint32_t* idx = reinterpret_cast<const uint32_t*>(p.indices);
        const uint32_t first = reinterpret_cast<const uint32_t*>(p.offsets)[t.unit];
        return (int)idx[first + v / t.block_size] * (int)t.block_size + v % (int)t.block_size;
    }
    return (int)t.own_from + v - listed * (int)t.block_size;
}

// Element offset of cache position `pos` of (sequence, head) in a pool.
__device__ __forceinline__ long long attend_entry(const EkAttendParams& p, const EkAttendTile& t, int pos) {
    const uint32_t page = reinterpret_cast<const uint32_t*>(p.block_table)[(long long)t.seq * p.table_width + pos / p.page_size];
    return (long long)page * p.page_stride + (long long)(pos % p.page_size) * p.slot_stride + (long long)t.head * p.head_stride;
}

// Where query row r of a tile lives in q / out (THD or one sequence per batch row).
__device__ __forceinline__ long long attend_row(const EkAttendParams& p, const EkTensor& x, const EkAttendTile& t, int r) {
    const int token = (int)t.token + r / (int)t.q_heads;
    const int hq = (int)t.head * p.group + (int)t.q_head + r % (int)t.q_heads;
    if (p.batched_rows > 0) return row_offset(x, token / p.batched_rows, token % p.batched_rows, hq);
    return row_offset(x, 0, token, hq);
}

template <typename T> __device__ void attend_split(const EkAttendParams& p) {
    EK_DYNAMIC_SHARED(float, smem);
    const EkAttendTile t = reinterpret_cast<const EkAttendTile*>(p.tiles)[blockIdx.x];
    const int s = blockIdx.y, d = p.q.shape[3], rows = (int)(t.tokens * t.q_heads), R = p.tile_rows;
    const int listed = t.unit == EK_ATTEND_NO_UNIT ? 0 : (int)reinterpret_cast<const uint32_t*>(p.counts)[t.unit];
    const int total = listed * (int)t.block_size + (int)(t.own_end - t.own_from);
    const int v0 = s * p.keys_per_split, v1 = min(total, v0 + p.keys_per_split);
    float* qs = smem;                       // [R][d], pre-scaled
    float* os = qs + R * d;                 // [R][d]
    const int kst = d + 1;                  // K rows padded: the score loop's lanes read one x of
    float* ks = os + R * d;                 // [ATTEND_KEYS][d + 1]   16 rows, in 16 banks
    float* vs = ks + ATTEND_KEYS * kst;     // [ATTEND_KEYS][d]
    float* sc = vs + ATTEND_KEYS * d;       // [R][ATTEND_KEYS]: scores, then probabilities
    float* m = sc + R * ATTEND_KEYS;        // [R] running max (base 2)
    float* l = m + R;                       // [R] running sum
    float* alpha = l + R;                   // [R] rescale of this key tile
    int* ktok = reinterpret_cast<int*>(alpha + R);  // [ATTEND_KEYS] cache positions
    const T* q = tensor_ptr<T>(p.q);
    const T* kp = reinterpret_cast<const T*>(p.k_pool);
    const T* vp = reinterpret_cast<const T*>(p.v_pool);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, warps = blockDim.x >> 5;
    for (int i = tid; i < R * d; i += blockDim.x) {
        const int r = i / d, x = i % d;
        qs[i] = r < rows ? to_f32(q[attend_row(p, p.q, t, r) + x]) * p.scale_log2 : 0.f;
        os[i] = 0.f;
    }
    for (int r = tid; r < R; r += blockDim.x) {
        m[r] = EK_NEG_INF;
        l[r] = 0.f;
    }
    for (int k0 = v0; k0 < v1; k0 += ATTEND_KEYS) {
        const int n = min(ATTEND_KEYS, v1 - k0);
        __syncthreads();  // the previous tile's K, V and probabilities have been used
        if (tid < ATTEND_KEYS) ktok[tid] = tid < n ? attend_key(p, t, listed, k0 + tid) : 0;
        __syncthreads();
        for (int i = tid; i < ATTEND_KEYS * d; i += blockDim.x) {
            const int j = i / d, x = i % d;
            if (j < n) {
                const long long e = attend_entry(p, t, ktok[j]) + x;
                load_f32<T, 1>(kp + e, ks + j * kst + x);
                load_f32<T, 1>(vp + e, vs + i);
            } else {
                ks[j * kst + x] = 0.f;
                vs[i] = 0.f;
            }
        }
        __syncthreads();
        // Rows past the tile's (padding up to R) are never scored, softmaxed or accumulated.
        for (int i = tid; i < rows * ATTEND_KEYS; i += blockDim.x) {
            const int r = i / ATTEND_KEYS, j = i % ATTEND_KEYS;
            const int qpos = (int)t.pos + r / (int)t.q_heads;
            const bool visible = j < n && (!t.causal || ktok[j] <= qpos);
            float acc = EK_NEG_INF;
            if (visible) {
                acc = 0.f;
                for (int x = 0; x < d; x++) acc += qs[r * d + x] * ks[j * kst + x];
            }
            sc[i] = acc;
        }
        __syncthreads();
        // Online softmax, a warp per row: the tile's max, its probabilities, the rescale.
        for (int r = warp; r < rows; r += warps) {
            const float x = lane < ATTEND_KEYS ? sc[r * ATTEND_KEYS + lane] : EK_NEG_INF;
            const float m_new = fmaxf(m[r], warp_max(x));
            const float ref = fmaxf(m_new, EK_NEG_BIG);
            const float e = exp2_f32(x - ref);
            const float sum = warp_sum(lane < ATTEND_KEYS ? e : 0.f);
            if (lane < ATTEND_KEYS) sc[r * ATTEND_KEYS + lane] = e;
            __syncwarp();
            if (lane == 0) {
                const float a = exp2_f32(fmaxf(m[r], EK_NEG_BIG) - ref);
                alpha[r] = a;
                l[r] = l[r] * a + sum;
                m[r] = m_new;
            }
        }
        __syncthreads();
        for (int i = tid; i < rows * d; i += blockDim.x) {
            const int r = i / d, x = i % d;
            float acc = os[i] * alpha[r];
            for (int j = 0; j < n; j++) acc += sc[r * ATTEND_KEYS + j] * vs[j * d + x];
            os[i] = acc;
        }
    }
    __syncthreads();
    float* part = reinterpret_cast<float*>(p.partial) + ((long long)blockIdx.x * p.splits + s) * R * (d + 2);
    for (int i = tid; i < rows * (d + 2); i += blockDim.x) {
        const int r = i / (d + 2), x = i % (d + 2);
        part[i] = x < d ? os[r * d + x] : (x == d ? m[r] : l[r]);
    }
}

template <typename T> __device__ void attend_merge(const EkAttendParams& p) {
    const EkAttendTile t = reinterpret_cast<const EkAttendTile*>(p.tiles)[blockIdx.x];
    const int d = p.q.shape[3], rows = (int)(t.tokens * t.q_heads), R = p.tile_rows;
    const float* part = reinterpret_cast<const float*>(p.partial) + (long long)blockIdx.x * p.splits * R * (d + 2);
    T* out = tensor_mut<T>(p.out);
    for (int r = 0; r < rows; r++) {
        float mx = EK_NEG_INF;
        for (int s = 0; s < p.splits; s++) mx = fmaxf(mx, part[((long long)s * R + r) * (d + 2) + d]);
        const float ref = fmaxf(mx, EK_NEG_BIG);
        float sum = 0.f;
        for (int s = 0; s < p.splits; s++) {
            const float* ps = part + ((long long)s * R + r) * (d + 2);
            sum += ps[d + 1] * exp2_f32(ps[d] - ref);
        }
        const long long o = attend_row(p, p.out, t, r);
        for (int x = threadIdx.x; x < d; x += blockDim.x) {
            float acc = 0.f;
            for (int s = 0; s < p.splits; s++) {
                const float* ps = part + ((long long)s * R + r) * (d + 2);
                acc += ps[x] * exp2_f32(ps[d] - ref);
            }
            out[o + x] = from_f32<T>(acc / sum);
        }
        if (p.lse && threadIdx.x == 0) {
            const int token = (int)t.token + r / (int)t.q_heads;
            const int hq = (int)t.head * p.group + (int)t.q_head + r % (int)t.q_heads;
            const int hqs = p.q.shape[2];
            const long long li = p.batched_rows > 0
                ? ((long long)(token / p.batched_rows) * hqs + hq) * p.batched_rows + token % p.batched_rows
                : (long long)token * hqs + hq;
            reinterpret_cast<float*>(p.lse)[li] = (ref + __log2f(sum)) * 0.69314718055994531f;
        }
    }
}

#define EK_ATTEND(T, name)                                                                                   \
    extern "C" __global__ void __launch_bounds__(ATTEND_THREADS) ek_attend_split_##name(EkAttendParams p) { \
        attend_split<T>(p);                                                                                  \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(ATTEND_THREADS) ek_attend_merge_##name(EkAttendParams p) { \
        attend_merge<T>(p);                                                                                  \
    }
EK_ATTEND(float, f32)
EK_ATTEND(f16_t, f16)
EK_ATTEND(bf16_t, bf16)

// Pieces of kv_compress shared by the vector kernels (kv_compress.cpp) and the cube-scoring
// kernels (kv_compress_cube.cpp): the params' derived sizes, the stats layout, the per-row
// visibility of window rows, the running softmax statistics of a pass of rows over key tiles,
// and the merge of every chunk's statistics.
#pragma once

namespace ekcompress {

using namespace AscendC;

constexpr uint32_t COMPRESS_ROW_CHUNK = 64;  // window rows scored together (of the group's G · W)
constexpr uint32_t COMPRESS_MAX_GROUP = 16;  // query heads per kv head (the means accumulators)

enum Pooling { POOL_NONE = 0, POOL_AVG = 1, POOL_MAX = 2 };
enum GqaMode { GQA_MEAN = 0, GQA_MAX = 1, GQA_PER_QUERY_HEAD = 2 };

__aicore__ inline uint32_t Min(uint32_t a, uint32_t b) { return a < b ? a : b; }

__aicore__ inline uint32_t PoolPad(const EkCompressParams& p) {
    return p.pooling == POOL_NONE ? 0 : (uint32_t)p.pooling_kernel / 2;
}

// Row stride of `means`: the padded row on the 8-float (32-byte) grid.
__aicore__ inline uint32_t MeansStride(const EkCompressParams& p) {
    return PaddedElems<float>((uint32_t)(p.entries - p.window) + 2 * PoolPad(p));
}

// Where (b, kv head h, chunk c)'s statistics start: maxes of its G·W rows, then their sums.
__aicore__ inline uint64_t StatsOffset(const EkCompressParams& p, int32_t b, int32_t h, int32_t c) {
    return (((uint64_t)b * p.k_cache.shape[1] + h) * p.chunks + c) * 2 * (uint64_t)(p.group * p.window);
}

// Entries head h of batch row b scores: its own length in `head_lens` over a paged cache (0: the
// sequence does not compress), `entries` otherwise.
__aicore__ inline uint32_t HeadEntries(const EkCompressParams& p, int32_t b, int32_t h) {
    if (!p.head_lens) return (uint32_t)p.entries;
    GlobalTensor<uint32_t> lens;
    lens.SetGlobalBuffer(reinterpret_cast<__gm__ uint32_t*>(p.head_lens));
    return lens.GetValue((uint64_t)b * p.k_cache.shape[1] + h);
}

// Keys of the tile [j0, j0 + n) that window row r of a head of `entries` keys may see
// (key ≤ entries − W + w, w = r mod W).
__aicore__ inline uint32_t VisibleKeys(const EkCompressParams& p, uint32_t entries, uint32_t r, uint32_t j0, uint32_t n) {
    const int64_t last = (int64_t)entries - p.window + (int64_t)(r % p.window);
    return last < (int64_t)j0 ? 0 : Min(n, (uint32_t)(last - j0 + 1));
}

__aicore__ inline uint32_t VisibleKeys(const EkCompressParams& p, uint32_t r, uint32_t j0, uint32_t n) {
    return VisibleKeys(p, (uint32_t)p.entries, r, j0, n);
}

// Running softmax max and sum of up to COMPRESS_ROW_CHUNK rows over key tiles, on whole tiles:
// score rows one repeat apart (keys in the first `width` ≤ 64 lanes), hidden keys −inf, row max
// and sum by BlockReduce passes, m and α as vectors, e^(S − m) through a Brcb broadcast — no
// scalar round trip per tile.
class RowStats {
public:
    // Starting running max: finite and below any score (a row with nothing visible keeps α = 1).
    static constexpr float M_START = -1e30f;

    template <typename Pipe> __aicore__ inline void Init(Pipe& pipe) {
        pipe.InitBuffer(buf_, ST_END * RP * sizeof(float));
    }
    // A new pass of `nr` rows.
    __aicore__ inline void Start(uint32_t nr) {
        nr_ = nr;
        cur_ = 0;
        Duplicate(Stat(ST_M), M_START, (int32_t)nr);
        VecBarrier();
        Duplicate(Stat(ST_L), 0.0f, (int32_t)nr);
        VecBarrier();
    }
    // Hides keys [vis, width) of score row i of `sc` (rows one repeat apart).
    __aicore__ inline void Hide(const LocalTensor<float>& sc, uint32_t i, uint32_t vis, uint32_t width) {
        if (vis >= width) return;
        const uint64_t lanes = width >= 64 ? ~0ull : ((1ull << width) - 1);
        uint64_t hidden[2] = {(~0ull << vis) & lanes, 0};
        Duplicate(sc[i * FLOATS_PER_REPEAT], NegInf(), hidden, 1, 1, 8);
        VecBarrier();
    }
    // Folds a tile of scores (the first `width` lanes of nr_ rows, hidden keys already −inf) into
    // m and l; `sc` is overwritten with e^(S − m).
    __aicore__ inline void Step(const LocalTensor<float>& sc, uint32_t width) {
        const int32_t n = (int32_t)nr_;
        const uint8_t rows = (uint8_t)nr_, groups = (uint8_t)((nr_ + FLOATS_PER_BLOCK - 1) / FLOATS_PER_BLOCK);
        LocalTensor<float> m_old = Stat(ST_M + cur_), m_new = Stat(ST_M + 1 - cur_), alpha = Stat(ST_ALPHA);
        RowReduce<true>(Stat(ST_MAX), sc, nr_, width, FLOATS_PER_REPEAT, Stat(ST_PART));  // ends with a barrier
        Max(m_new, m_old, Stat(ST_MAX), n);
        VecBarrier();
        Sub(alpha, m_old, m_new, n);
        VecBarrier();
        Exp(alpha, alpha, n);
        VecBarrier();
        Brcb(Stat(ST_BCAST), m_new, groups, BrcbRepeatParams(1, 8));
        VecBarrier();
        Sub(sc, sc, Stat(ST_BCAST), (uint64_t)width, rows, BinaryRepeatParams(1, 1, 0, 8, 8, 1));
        VecBarrier();
        Exp(sc, sc, (uint64_t)width, rows, UnaryRepeatParams(1, 1, 8, 8));
        VecBarrier();
        RowReduce<false>(Stat(ST_SUM), sc, nr_, width, FLOATS_PER_REPEAT, Stat(ST_PART));  // ends with a barrier
        Mul(Stat(ST_L), Stat(ST_L), alpha, n);
        VecBarrier();
        Add(Stat(ST_L), Stat(ST_L), Stat(ST_SUM), n);
        VecBarrier();
        cur_ = 1 - cur_;
    }
    __aicore__ inline LocalTensor<float> M() { return Stat(ST_M + cur_); }
    __aicore__ inline LocalTensor<float> L() { return Stat(ST_L); }

private:
    static constexpr uint32_t RP = COMPRESS_ROW_CHUNK;  // rows (a multiple of 8)
    // Floats in units of RP: m ping-pong, l, α, row max, row sum, 8 partials per row, a
    // broadcast block per row.
    static constexpr uint32_t ST_M = 0, ST_L = 2, ST_ALPHA = 3, ST_MAX = 4, ST_SUM = 5, ST_PART = 6;
    static constexpr uint32_t ST_BCAST = ST_PART + 8, ST_END = ST_BCAST + 8;
    __aicore__ inline LocalTensor<float> Stat(uint32_t at) { return buf_.Get<float>()[at * RP]; }
    TBuf<TPosition::VECCALC> buf_;
    uint32_t nr_ = 0, cur_ = 0;
};

// Writes a pass's maxes and sums (rows [r0, r0 + nr) of the G·W) into chunk c's statistics.
template <typename Que>
__aicore__ inline void StoreStats(const EkCompressParams& p, const GlobalTensor<float>& statsGm, Que& out, RowStats& st,
                                  int32_t b, int32_t h, int32_t c, uint32_t r0, uint32_t nr) {
    const uint32_t half = PaddedElems<float>(nr), rows = p.group * p.window;
    LocalTensor<float> t = out.template AllocTensor<float>();
    DataCopy(t, st.M(), half);
    VecBarrier();
    DataCopy(t[half], st.L(), half);
    VecBarrier();
    out.EnQue(t);
    t = out.template DeQue<float>();
    const uint32_t gap = (rows - nr) * sizeof(float);
    DataCopyPad(statsGm[StatsOffset(p, b, h, c) + r0], t, DataCopyExtParams(2, nr * sizeof(float), 0, gap, 0));
    out.FreeTensor(t);
}

// Global softmax max and sum of window rows [r0, r0 + nr) of (b, h), merged over every chunk's
// statistics, into mx and sm (vectors of nr; a and e scratch of as many).
template <typename Que>
__aicore__ inline void MergeStats(const EkCompressParams& p, const GlobalTensor<float>& statsGm, Que& in, int32_t b, int32_t h,
                                  uint32_t r0, uint32_t nr, const LocalTensor<float>& mx, const LocalTensor<float>& sm,
                                  const LocalTensor<float>& a, const LocalTensor<float>& e, int32_t chunks) {
    const uint32_t rp = PaddedElems<float>(nr), rows = p.group * p.window;
    const uint32_t gap = (rows - nr) * sizeof(float);
    for (int32_t c = 0; c < chunks; c++) {
        LocalTensor<float> st = in.template AllocTensor<float>();
        // maxes into [0, nr), sums into [rp, rp + nr).
        DataCopyPad(st, statsGm[StatsOffset(p, b, h, c) + r0], DataCopyExtParams(2, nr * sizeof(float), gap, 0, 0),
                    DataCopyPadExtParams<float>(true, 0, 0, 0.0f));
        in.EnQue(st);
        st = in.template DeQue<float>();
        if (c == 0) {  // every row sees key 0, so chunk 0's maxes are finite
            DataCopy(mx, st, rp);
            VecBarrier();
            DataCopy(sm, st[rp], rp);
            VecBarrier();
        } else {
            // M' = max(M, m_c); L = L·e^(M − M') + l_c·e^(m_c − M')
            Max(a, mx, st, (int32_t)nr);
            VecBarrier();
            Sub(e, mx, a, (int32_t)nr);
            VecBarrier();
            Exp(e, e, (int32_t)nr);
            VecBarrier();
            Mul(sm, sm, e, (int32_t)nr);
            VecBarrier();
            Sub(e, st, a, (int32_t)nr);
            VecBarrier();
            Exp(e, e, (int32_t)nr);
            VecBarrier();
            Mul(e, e, st[rp], (int32_t)nr);
            VecBarrier();
            Add(sm, sm, e, (int32_t)nr);
            VecBarrier();
            DataCopy(mx, a, rp);
            VecBarrier();
        }
        in.FreeTensor(st);
    }
}

}  // namespace ekcompress

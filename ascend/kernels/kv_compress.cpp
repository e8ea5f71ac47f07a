// kv_compress (SPEC §4) on vector cores, as five launches over one EkCompressParams; each launch
// spreads its work items round-robin over the cores, and the launch boundary is the only
// cross-core synchronisation needed. For f16/bf16 caches the host launches the cube-scoring
// kernels of kv_compress_cube.cpp instead of `stats` and `means` (same outputs).
//
//   ek_compress_stats   item (b, kv head, key chunk): per window row r = g·W + w of the group, the
//                       softmax max and sum over the chunk's visible keys (n ≤ N − W + w).
//                       stats: float [B, Hkv, chunks, 2, rows] (maxes, then sums)
//   ek_compress_means   item (b, kv head, key chunk): merges every chunk's stats, recomputes the
//                       probabilities of the chunk's keys n < N − W, and writes the window mean
//                       per query head. means: float [B, Hq, S], S = MeansStride(): each row padded
//                       by ⌊kernel/2⌋ on both sides for the pooling, data at offset ⌊kernel/2⌋.
//   ek_compress_pool    item (b, out head): group reduction (mean/max, in place into the group's
//                       first row) and pooling by shifted reads of the padded row. pooled: [B, Hc, N−W]
//   ek_compress_topk    item (b, out head): the keep = budget − W best pooled positions by
//                       Sort32 + MrgSort over tiles (ties to the lower position), then sorted
//                       ascending (keep ≤ TOPK_CAP). selected: uint32 [B, Hc, keep]
//   ek_compress_select  the same selection by threshold (any keep; the host launches one of the
//                       two): a search for the keep-th score by vector counting, then one
//                       ascending compaction pass with GatherMask.
//   ek_compress_gather  item (b, out head): the kept rows then the last W rows into k_out/v_out.
//   ek_compress_compact item (b, cache head) of a paged cache: the kept entries moved in place to
//                       the head's first entries (SPEC §7.5).
//
// UB plan (192 KiB; the G·W window rows in chunks of 64, G ≤ 16, D ≤ 256):
//   stats/means  obs rows f32 64 × D × 4 ≤ 64 KiB; K tile 32 × D: T ≤ 16 KiB (+ f32 copy 32 KiB);
//                products 32 × D × 4 ≤ 32 KiB + 1 KiB partials; scores 64 × 32 × 4 = 8 KiB (stats:
//                one 256-byte repeat per row, 16 KiB) + row statistics 4 KiB; means accumulators
//                G × 512 × 4 ≤ 32 KiB (means ≤ 189 KiB, stats ≤ 166 KiB at D 256, G 16)
//   (a group with more than 64 window rows reads each key chunk once per 64 rows)
//   pool         2 × 1024 f32 in + 1024 accumulator = 12 KiB
//   topk         scores tile 1024 f32 + indices 1024 u32 + sorted tile and merge scratch 2 × 8 KiB
//                + running best list and merge target 2 × 8 × 4096 B = 64 KiB: ≈ 100 KiB
//   select       scores tiles 2 × 4 KiB, 15 count accumulators of 1024 f32 = 60 KiB, ones, work,
//                positions (ramp, tile, ties) 4 KiB each, 4 bit masks of 128 B, output 2 × 4 KiB: ≈ 101 KiB
//   gather       2 rows of D in flight (double-buffered GM → UB → GM)
// Expected utilisation: stats and means are vector-bound on the (row, key) dot products, 2 × rows ×
// N × D × 2 FLOPs in total, each row scored against a 32-key tile in ~5 instructions (products,
// fold, two BlockReduceSum); the stats' softmax runs on whole tiles (~12 instructions per tile for
// all rows); pooling, sorting and gathering are small.

#include "kernel_operator.h"
#include "entropy_params.h"
#include "common.h"
#include "compress_common.h"

using namespace AscendC;
using namespace ekcompress;

namespace {

constexpr uint32_t COMPRESS_KEYS = 32;       // keys per scoring tile
constexpr uint32_t POOL_TILE = 1024;         // positions per pooling tile
constexpr uint32_t TOPK_TILE = 1024;         // scores sorted per step
constexpr uint32_t TOPK_CAP = 4064;          // most positions kept (MrgSort lists hold ≤ 4095)
constexpr uint32_t SELECT_TILE = 1024;       // scores per threshold-selection step (whole repeats)
constexpr uint32_t SELECT_FANOUT = 16;       // key intervals per counting pass (15 thresholds)
constexpr uint32_t SORT_GROUP = 32;          // Sort32 sorts groups of 32
constexpr uint32_t PAIR = 2;                 // floats per (score, index) structure


// ------------------------------------------------------------------------------------------------
// Scoring: obs rows against key tiles, shared by the stats and means launches.

template <typename T> class ScoreKernel {
protected:
    // `score_stride`: floats between scores rows (COMPRESS_KEYS, or one repeat where whole-tile
    // row reductions need a row per repeat).
    __aicore__ inline void Init(const EkCompressParams& p, uint32_t score_stride = COMPRESS_KEYS) {
        p_ = p;
        srow_ = score_stride;
        d_ = p.k_cache.shape[3];
        rows_ = p.group * p.window;
        chunkRows_ = Min(rows_, COMPRESS_ROW_CHUNK);
        dpt_ = PaddedElems<T>(d_);
        dpf_ = PaddedElems<float>(d_);
        scale_ = p.scale_log2 * LN2;  // natural-log scale for Exp
        obsGm_.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(p.obs.ptr));
        kGm_.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(p.k_cache.ptr));
        if (p.block_table) tableGm_.SetGlobalBuffer(reinterpret_cast<__gm__ uint32_t*>(p.block_table));
        statsGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(p.stats));
        pipe_.InitBuffer(kIn_, 1, COMPRESS_KEYS * dpt_ * sizeof(T));
        pipe_.InitBuffer(rowIn_, 1, dpt_ * sizeof(T));
        pipe_.InitBuffer(obs_, chunkRows_ * dpf_ * sizeof(float));
        if (!SameType<T, float>::value) {
            pipe_.InitBuffer(kf_, COMPRESS_KEYS * dpt_ * sizeof(float));
            pipe_.InitBuffer(rowf_, dpt_ * sizeof(float));
        }
        pipe_.InitBuffer(scores_, chunkRows_ * srow_ * sizeof(float));
        pipe_.InitBuffer(tmp_, COMPRESS_KEYS * dpt_ * sizeof(float));
        pipe_.InitBuffer(part_, COMPRESS_KEYS * FLOATS_PER_BLOCK * sizeof(float));
    }

    // Window rows [r0, r0 + nr) of kv head h (row r: query head h·G + r / W, window slot r % W),
    // pre-scaled, into obs rows 0..nr.
    __aicore__ inline void LoadObs(int32_t b, int32_t h, uint32_t r0, uint32_t nr) {
        LocalTensor<float> obs = obs_.Get<float>();
        for (uint32_t i = 0; i < nr; i++) {
            const uint32_t r = r0 + i;
            const int32_t hq = h * p_.group + r / p_.window, w = r % p_.window;
            const int64_t off = b * p_.obs.stride[0] + hq * p_.obs.stride[1] + w * p_.obs.stride[2];
            LocalTensor<T> held;
            LocalTensor<float> row = LoadRows<T>(rowIn_, WideBuffer<T>(rowf_), obsGm_[off], 1, d_, d_, held);
            Muls(obs[i * dpf_], row, scale_, (int32_t)dpf_);
            VecBarrier();
            rowIn_.FreeTensor(held);
        }
    }

    // Scores of loaded row r against the first `n` keys of the tile into scores row r (entries
    // past `n` are scratch).
    __aicore__ inline LocalTensor<float> Score(uint32_t r, const LocalTensor<float>& keys, uint32_t n) {
        LocalTensor<float> row = scores_.Get<float>()[r * srow_];
        TileDots(row, obs_.Get<float>()[r * dpf_], keys, n, d_, dpt_, tmp_.Get<float>(), part_.Get<float>());  // ends with a barrier
        return row;
    }

    __aicore__ inline LocalTensor<float> LoadKeys(int32_t b, int32_t h, uint32_t j0, uint32_t n, LocalTensor<T>& held) {
        if (p_.block_table)
            return LoadPagedRows<T>(kIn_, WideBuffer<T>(kf_), kGm_, tableGm_, b, p_.table_width, p_.page_size, p_.page_stride,
                                    p_.slot_stride, p_.head_stride, h, j0, n, d_, held);
        const int64_t off = b * p_.k_cache.stride[0] + h * p_.k_cache.stride[1] + j0 * p_.k_cache.stride[2];
        return LoadRows<T>(kIn_, WideBuffer<T>(kf_), kGm_[off], n, d_, p_.k_cache.stride[2], held);
    }

    EkCompressParams p_;
    uint32_t d_ = 0, rows_ = 0, chunkRows_ = 0, dpt_ = 0, dpf_ = 0, srow_ = COMPRESS_KEYS;
    float scale_ = 0;
    TPipe pipe_;
    TQue<TPosition::VECIN, 1> kIn_, rowIn_;
    TBuf<TPosition::VECCALC> obs_, kf_, rowf_, scores_, tmp_, part_;
    GlobalTensor<T> obsGm_, kGm_;
    GlobalTensor<uint32_t> tableGm_;
    GlobalTensor<float> statsGm_;
};

// Per window row, the softmax max and sum over a key chunk, on whole tiles (RowStats): every row
// of the pass scored against a 32-key tile (one repeat per row, the keys in the first half),
// hidden keys −inf, then the running max and sum as vectors.
template <typename T> class StatsKernel : public ScoreKernel<T> {
    using B = ScoreKernel<T>;

public:
    __aicore__ inline void Run(const EkCompressParams& p) {
        B::Init(p, FLOATS_PER_REPEAT);
        B::pipe_.InitBuffer(out_, 1, 2 * PaddedElems<float>(B::chunkRows_) * sizeof(float));
        st_.Init(B::pipe_);
        const uint32_t items = p.k_cache.shape[0] * p.k_cache.shape[1] * p.chunks;
        for (uint32_t it = GetBlockIdx(); it < items; it += GetBlockNum()) Item(it);
    }

private:
    __aicore__ inline void Item(uint32_t it) {
        const int32_t c = it % B::p_.chunks, bh = it / B::p_.chunks;
        const int32_t b = bh / B::p_.k_cache.shape[1], h = bh % B::p_.k_cache.shape[1];
        // A head's chunks past its own length (paged caches) hold no keys: the means merge only its own.
        const uint32_t entries = HeadEntries(B::p_, b, h);
        if (c * (uint32_t)B::p_.chunk >= entries) return;
        for (uint32_t r0 = 0; r0 < B::rows_; r0 += B::chunkRows_) Rows(b, h, c, entries, r0, Min(B::chunkRows_, B::rows_ - r0));
    }

    // Stats of window rows [r0, r0 + nr) over key chunk c of a head of `entries` keys.
    __aicore__ inline void Rows(int32_t b, int32_t h, int32_t c, uint32_t entries, uint32_t r0, uint32_t nr) {
        B::LoadObs(b, h, r0, nr);
        st_.Start(nr);
        const uint32_t lo = c * B::p_.chunk, hi = Min(entries, lo + B::p_.chunk);
        LocalTensor<float> sc = B::scores_.template Get<float>();
        for (uint32_t j0 = lo; j0 < hi; j0 += COMPRESS_KEYS) {
            const uint32_t n = Min(COMPRESS_KEYS, hi - j0);
            LocalTensor<T> held;
            LocalTensor<float> keys = B::LoadKeys(b, h, j0, n, held);
            for (uint32_t i = 0; i < nr; i++) {
                B::Score(i, keys, n);
                // Keys past the row's window limit or past the tile: −inf.
                st_.Hide(sc, i, VisibleKeys(B::p_, entries, r0 + i, j0, n), COMPRESS_KEYS);
            }
            B::kIn_.FreeTensor(held);
            st_.Step(sc, COMPRESS_KEYS);
        }
        StoreStats(B::p_, B::statsGm_, out_, st_, b, h, c, r0, nr);
    }

    TQue<TPosition::VECOUT, 1> out_;
    RowStats st_;
};

template <typename T> class MeansKernel : public ScoreKernel<T> {
    using B = ScoreKernel<T>;

public:
    __aicore__ inline void Run(const EkCompressParams& p) {
        B::Init(p);
        const uint32_t rp = PaddedElems<float>(B::chunkRows_);
        B::pipe_.InitBuffer(statIn_, 1, 2 * rp * sizeof(float));
        B::pipe_.InitBuffer(max_, rp * sizeof(float));
        B::pipe_.InitBuffer(sum_, rp * sizeof(float));
        B::pipe_.InitBuffer(mix_, 2 * rp * sizeof(float));
        B::pipe_.InitBuffer(acc_, 1, p.group * p.chunk * sizeof(float));
        meansGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(p.means));
        const uint32_t items = p.k_cache.shape[0] * p.k_cache.shape[1] * p.chunks;
        for (uint32_t it = GetBlockIdx(); it < items; it += GetBlockNum()) Item(it);
    }

private:
    // Global softmax max and sum of window rows [r0, r0 + nr), merged over every chunk's stats.
    __aicore__ inline void MergeStats(int32_t b, int32_t h, uint32_t entries, uint32_t r0, uint32_t nr, float* m, float* l) {
        LocalTensor<float> mx = max_.Get<float>(), sm = sum_.Get<float>(), a = mix_.Get<float>(), e = a[PaddedElems<float>(B::chunkRows_)];
        const int32_t chunks = (int32_t)((entries + B::p_.chunk - 1) / B::p_.chunk);
        ekcompress::MergeStats(B::p_, B::statsGm_, statIn_, b, h, r0, nr, mx, sm, a, e, chunks);
        SetFlag<HardEvent::V_S>(0);
        WaitFlag<HardEvent::V_S>(0);
        for (uint32_t i = 0; i < nr; i++) {
            m[i] = mx.GetValue(i);
            l[i] = sm.GetValue(i);
        }
    }

    __aicore__ inline void Item(uint32_t it) {
        const int32_t c = it % B::p_.chunks, bh = it / B::p_.chunks;
        const int32_t b = bh / B::p_.k_cache.shape[1], h = bh % B::p_.k_cache.shape[1];
        const uint32_t entries = HeadEntries(B::p_, b, h);
        if (entries == 0) return;  // a sequence that does not compress
        const uint32_t scored = entries - B::p_.window;
        const uint32_t lo = c * B::p_.chunk, hi = Min(scored, lo + B::p_.chunk);
        if (lo >= hi) return;  // a chunk of window keys only: nothing to average
        // acc[g][key - lo]: the window mean of query head h·G + g over this chunk's keys.
        LocalTensor<float> acc = acc_.AllocTensor<float>();
        Duplicate(acc, 0.0f, (int32_t)(B::p_.group * B::p_.chunk));
        VecBarrier();
        const float inv_w = 1.0f / (float)B::p_.window;
        for (uint32_t r0 = 0; r0 < B::rows_; r0 += B::chunkRows_) {
            const uint32_t nr = Min(B::chunkRows_, B::rows_ - r0);
            float m[COMPRESS_ROW_CHUNK], l[COMPRESS_ROW_CHUNK];
            MergeStats(b, h, entries, r0, nr, m, l);
            B::LoadObs(b, h, r0, nr);
            for (uint32_t j0 = lo; j0 < hi; j0 += COMPRESS_KEYS) {
                const uint32_t n = Min(COMPRESS_KEYS, hi - j0);
                LocalTensor<T> held;
                LocalTensor<float> keys = B::LoadKeys(b, h, j0, n, held);
                for (uint32_t i = 0; i < nr; i++) {
                    // Keys below N − W are visible to every window row.
                    LocalTensor<float> row = B::Score(i, keys, n);
                    Adds(row, row, -m[i], (int32_t)n);
                    VecBarrier();
                    Exp(row, row, (int32_t)n);
                    VecBarrier();
                    Axpy(acc[((r0 + i) / B::p_.window) * B::p_.chunk + (j0 - lo)], row, inv_w / l[i], (int32_t)n);
                    VecBarrier();
                }
                B::kIn_.FreeTensor(held);
            }
        }
        acc_.EnQue(acc);
        acc = acc_.DeQue<float>();
        const uint32_t stride = MeansStride(B::p_), pad = PoolPad(B::p_);
        for (int32_t g = 0; g < B::p_.group; g++) {
            const uint64_t off = ((uint64_t)b * B::p_.obs.shape[1] + h * B::p_.group + g) * stride + pad + lo;
            DataCopyPad(meansGm_[off], acc[g * B::p_.chunk], DataCopyExtParams(1, (hi - lo) * sizeof(float), 0, 0, 0));
        }
        acc_.FreeTensor(acc);
    }

    TQue<TPosition::VECIN, 1> statIn_;
    TQue<TPosition::VECOUT, 1> acc_;
    TBuf<TPosition::VECCALC> max_, sum_, mix_;
    GlobalTensor<float> meansGm_;
};

// ------------------------------------------------------------------------------------------------
// Group reduction and pooling.

class PoolKernel {
public:
    __aicore__ inline void Run(const EkCompressParams& p) {
        p_ = p;
        meansGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(p.means));
        pooledGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(p.pooled));
        pipe_.InitBuffer(in_, 2, POOL_TILE * sizeof(float));
        pipe_.InitBuffer(out_, 1, POOL_TILE * sizeof(float));
        pipe_.InitBuffer(pads_, 1, PaddedElems<float>(PoolPad(p) > 0 ? PoolPad(p) : 1) * sizeof(float));
        const uint32_t items = p.obs.shape[0] * p.out_heads;
        for (uint32_t it = GetBlockIdx(); it < items; it += GetBlockNum()) Item(it);
    }

private:
    __aicore__ inline LocalTensor<float> Load(uint64_t off, uint32_t n) {
        LocalTensor<float> t = in_.AllocTensor<float>();
        DataCopyPad(t, meansGm_[off], DataCopyExtParams(1, n * sizeof(float), 0, 0, 0), DataCopyPadExtParams<float>(true, 0, 0, 0.0f));
        in_.EnQue(t);
        return in_.DeQue<float>();
    }

    __aicore__ inline void Combine(bool max, const LocalTensor<float>& acc, const LocalTensor<float>& x, uint32_t n) {
        if (max) {
            Max(acc, acc, x, (int32_t)n);
            VecBarrier();
        } else {
            Add(acc, acc, x, (int32_t)n);
            VecBarrier();
        }
    }

    __aicore__ inline void Item(uint32_t it) {
        const uint32_t b = it / p_.out_heads, hc = it % p_.out_heads;
        // Over a paged cache the out heads are the cache's heads, each of its own length.
        const uint32_t entries = HeadEntries(p_, b, hc);
        if (entries == 0) return;
        const uint32_t scored = entries - p_.window, stride = MeansStride(p_), pad = PoolPad(p_);
        const bool per_query = p_.gqa_mode == GQA_PER_QUERY_HEAD;
        const uint32_t first = per_query ? hc : hc * p_.group, heads = per_query ? 1 : p_.group;
        const uint64_t row = ((uint64_t)b * p_.obs.shape[1] + first) * stride;
        // A: the group's rows reduced into the first one, tile by tile in place.
        if (heads > 1) {
            for (uint32_t t0 = 0; t0 < scored; t0 += POOL_TILE) {
                const uint32_t n = Min(POOL_TILE, scored - t0);
                LocalTensor<float> acc = out_.AllocTensor<float>();
                for (uint32_t g = 0; g < heads; g++) {
                    LocalTensor<float> x = Load(row + g * stride + pad + t0, n);
                    if (g == 0) {
                        DataCopy(acc, x, PaddedElems<float>(n));
                        VecBarrier();
                    } else {
                        Combine(p_.gqa_mode == GQA_MAX, acc, x, n);
                    }
                    in_.FreeTensor(x);
                }
                if (p_.gqa_mode == GQA_MEAN) Muls(acc, acc, 1.0f / (float)heads, (int32_t)n);
                VecBarrier();
                out_.EnQue(acc);
                acc = out_.DeQue<float>();
                DataCopyPad(meansGm_[row + pad + t0], acc, DataCopyExtParams(1, n * sizeof(float), 0, 0, 0));
                out_.FreeTensor(acc);
            }
        }
        // The padding: zeros for avg (always divided by the kernel), -inf for max (never wins).
        if (pad > 0) {
            LocalTensor<float> pv = pads_.AllocTensor<float>();
            Duplicate(pv, p_.pooling == POOL_MAX ? NegInf() : 0.0f, (int32_t)PaddedElems<float>(pad));
            VecBarrier();
            pads_.EnQue(pv);
            pv = pads_.DeQue<float>();
            DataCopyPad(meansGm_[row], pv, DataCopyExtParams(1, pad * sizeof(float), 0, 0, 0));
            DataCopyPad(meansGm_[row + pad + scored], pv, DataCopyExtParams(1, pad * sizeof(float), 0, 0, 0));
            pads_.FreeTensor(pv);
        }
        // B reads what A wrote to global memory.
        SetFlag<HardEvent::MTE3_MTE2>(0);
        WaitFlag<HardEvent::MTE3_MTE2>(0);
        // B: pooled[i] = op over j in [0, 2·pad] of padded[i + j].
        for (uint32_t t0 = 0; t0 < scored; t0 += POOL_TILE) {
            const uint32_t n = Min(POOL_TILE, scored - t0);
            LocalTensor<float> acc = out_.AllocTensor<float>();
            for (uint32_t j = 0; j <= 2 * pad; j++) {
                LocalTensor<float> x = Load(row + t0 + j, n);
                if (j == 0) {
                    DataCopy(acc, x, PaddedElems<float>(n));
                    VecBarrier();
                } else {
                    Combine(p_.pooling == POOL_MAX, acc, x, n);
                }
                in_.FreeTensor(x);
            }
            if (p_.pooling == POOL_AVG) Muls(acc, acc, 1.0f / (float)p_.pooling_kernel, (int32_t)n);
            VecBarrier();
            out_.EnQue(acc);
            acc = out_.DeQue<float>();
            const uint64_t row_stride = (uint64_t)(p_.entries - p_.window);  // the longest head's
            DataCopyPad(pooledGm_[((uint64_t)b * p_.out_heads + hc) * row_stride + t0], acc, DataCopyExtParams(1, n * sizeof(float), 0, 0, 0));
            out_.FreeTensor(acc);
        }
    }

    EkCompressParams p_;
    TPipe pipe_;
    TQue<TPosition::VECIN, 2> in_;
    TQue<TPosition::VECOUT, 1> out_, pads_;
    GlobalTensor<float> meansGm_, pooledGm_;
};

// ------------------------------------------------------------------------------------------------
// Top-k by sort and merge.

// Pooled scores src[0, n) into the next buffer of `que`, as `slots` ≥ n floats: the slots past n
// score −inf (they sort last, and count under no threshold). They are written by the vector unit
// after the copy: DataCopyPad fills the rest of a partial 32-byte block with copies of the burst's
// first element, not with a pad value (DataCopyPad page), which would put up to 7 phantom scores
// into the sort or the counts.
template <typename Que> __aicore__ inline LocalTensor<float> LoadScores(Que& que, const GlobalTensor<float>& src, uint32_t n, uint32_t slots) {
    LocalTensor<float> sc = que.template AllocTensor<float>();
    DataCopyPad(sc, src, DataCopyExtParams(1, n * sizeof(float), 0, 0, 0), DataCopyPadExtParams<float>(false, 0, 0, 0.0f));
    que.EnQue(sc);
    sc = que.template DeQue<float>();
    if (n < slots) {
        const uint32_t block = n / FLOATS_PER_BLOCK * FLOATS_PER_BLOCK, rest = n % FLOATS_PER_BLOCK;
        if (rest) {  // the partial block's tail, by a bit mask
            const uint64_t tail[2] = {((1ull << FLOATS_PER_BLOCK) - 1) & ~((1ull << rest) - 1), 0};
            Duplicate(sc[block], NegInf(), tail, 1, 1, 8);
            VecBarrier();
        }
        const uint32_t next = block + (rest ? FLOATS_PER_BLOCK : 0);
        if (next < slots) Duplicate(sc[next], NegInf(), (int32_t)(slots - next));
        VecBarrier();
    }
    return sc;
}

class TopKKernel {
public:
    __aicore__ inline void Run(const EkCompressParams& p) {
        p_ = p;
        keep_ = p.budget - p.window;
        pooledGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(p.pooled));
        selGm_.SetGlobalBuffer(reinterpret_cast<__gm__ uint32_t*>(p.selected));
        const uint32_t list = PaddedElems<float>(PAIR * (TOPK_CAP + TOPK_TILE));
        pipe_.InitBuffer(in_, 1, TOPK_TILE * sizeof(float));
        pipe_.InitBuffer(idx_, TOPK_TILE * sizeof(uint32_t));
        pipe_.InitBuffer(ramp_, TOPK_TILE * sizeof(uint32_t));
        pipe_.InitBuffer(best_, list * sizeof(float));
        pipe_.InitBuffer(merged_, list * sizeof(float));
        pipe_.InitBuffer(tile_, PAIR * TOPK_TILE * sizeof(float));
        pipe_.InitBuffer(spare_, list * sizeof(float));
        pipe_.InitBuffer(out_, 1, PaddedElems<uint32_t>(TOPK_CAP) * sizeof(uint32_t));
        LocalTensor<uint32_t> ramp = ramp_.Get<uint32_t>();
        for (uint32_t i = 0; i < TOPK_TILE; i++) ramp.SetValue(i, i);
        ScalarToVector();
        const uint32_t items = p.obs.shape[0] * p.out_heads;
        for (uint32_t it = GetBlockIdx(); it < items; it += GetBlockNum()) Item(it);
    }

private:
    // Merges the sorted runs of `len` structures each (the last may be shorter) in `a` into one
    // run, 4 at a time, ping-ponging with `b`; returns the buffer holding the result.
    __aicore__ inline LocalTensor<float> MergeRuns(LocalTensor<float> a, LocalTensor<float> b, uint32_t total, uint32_t len) {
        while (len < total) {
            for (uint32_t s = 0; s < total; s += 4 * len) {
                uint16_t lens[4] = {0, 0, 0, 0};
                uint16_t lists = 0;
                for (uint32_t k = 0; k < 4 && s + k * len < total; k++) {
                    lens[k] = (uint16_t)Min(len, total - (s + k * len));
                    lists++;
                }
                if (lists == 1) {  // a lone tail run: carried over as it is
                    DataCopy(b[PAIR * s], a[PAIR * s], PaddedElems<float>(PAIR * lens[0]));
                    VecBarrier();
                    continue;
                }
                LocalTensor<float> src[4];
                for (uint32_t k = 0; k < 4; k++) src[k] = k < lists ? a[PAIR * (s + k * len)] : a;
                const uint16_t valid = lists == 2 ? 0x3 : lists == 3 ? 0x7 : 0xf;
                MrgSort(b[PAIR * s], MrgSortSrcList<float>(src[0], src[1], src[2], src[3]), MrgSort4Info(lens, false, valid, 1));
                VecBarrier();
            }
            LocalTensor<float> t = a;
            a = b;
            b = t;
            len *= 4;
        }
        return a;
    }

    __aicore__ inline void Item(uint32_t it) {
        const uint32_t b = it / p_.out_heads, hc = it % p_.out_heads;
        const uint32_t scored = p_.entries - p_.window;
        const uint64_t row = ((uint64_t)b * p_.out_heads + hc) * scored;
        LocalTensor<float> best = best_.Get<float>(), merged = merged_.Get<float>(), tile = tile_.Get<float>(), spare = spare_.Get<float>();
        LocalTensor<uint32_t> idx = idx_.Get<uint32_t>(), ramp = ramp_.Get<uint32_t>();
        uint32_t have = 0;
        for (uint32_t t0 = 0; t0 < scored; t0 += TOPK_TILE) {
            const uint32_t n = Min(TOPK_TILE, scored - t0), groups = (n + SORT_GROUP - 1) / SORT_GROUP;
            LocalTensor<float> sc = LoadScores(in_, pooledGm_[row + t0], n, groups * SORT_GROUP);
            Adds(idx.ReinterpretCast<int32_t>(), ramp.ReinterpretCast<int32_t>(), (int32_t)t0, (int32_t)(groups * SORT_GROUP));
            VecBarrier();
            Sort32(tile, sc, idx, (int32_t)groups);
            VecBarrier();
            in_.FreeTensor(sc);
            LocalTensor<float> sorted = MergeRuns(tile, spare, groups * SORT_GROUP, SORT_GROUP);
            const uint32_t take = Min(n, keep_);  // padding slots never reach the kept list
            if (have == 0) {
                DataCopy(best, sorted, PaddedElems<float>(PAIR * take));
                VecBarrier();
                have = take;
                continue;
            }
            // Earlier positions (the kept list) go first on equal scores: list 1.
            uint16_t lens[4] = {(uint16_t)have, (uint16_t)take, 0, 0};
            MrgSort(merged, MrgSortSrcList<float>(best, sorted, best, best), MrgSort4Info(lens, false, 0x3, 1));
            VecBarrier();
            have = Min(keep_, have + take);
            DataCopy(best, merged, PaddedElems<float>(PAIR * have));
            VecBarrier();
        }
        // The kept positions in ascending order: sort again with score = −position.
        SetFlag<HardEvent::V_S>(0);
        WaitFlag<HardEvent::V_S>(0);
        const uint32_t groups = (have + SORT_GROUP - 1) / SORT_GROUP;
        LocalTensor<float> neg = spare;
        LocalTensor<uint32_t> pos = merged.ReinterpretCast<uint32_t>();
        for (uint32_t i = 0; i < groups * SORT_GROUP; i++) {
            const uint32_t at = i < have ? best.ReinterpretCast<uint32_t>().GetValue(PAIR * i + 1) : 0;
            neg.SetValue(i, i < have ? -(float)at : NegInf());
            pos.SetValue(i, at);
        }
        ScalarToVector();
        Sort32(best, neg, pos, (int32_t)groups);
        VecBarrier();
        LocalTensor<float> asc = MergeRuns(best, merged, groups * SORT_GROUP, SORT_GROUP);
        SetFlag<HardEvent::V_S>(0);
        WaitFlag<HardEvent::V_S>(0);
        LocalTensor<uint32_t> o = out_.AllocTensor<uint32_t>();
        // The scalar unit rewrites `o`, which the previous item's UB -> GM copy may still read.
        SetFlag<HardEvent::MTE3_S>(0);
        WaitFlag<HardEvent::MTE3_S>(0);
        for (uint32_t i = 0; i < have; i++) o.SetValue(i, asc.ReinterpretCast<uint32_t>().GetValue(PAIR * i + 1));
        SetFlag<HardEvent::S_MTE3>(0);
        WaitFlag<HardEvent::S_MTE3>(0);
        out_.EnQue(o);
        o = out_.DeQue<uint32_t>();
        DataCopyPad(selGm_[((uint64_t)b * p_.out_heads + hc) * keep_], o, DataCopyExtParams(1, have * sizeof(uint32_t), 0, 0, 0));
        out_.FreeTensor(o);
    }

    EkCompressParams p_;
    uint32_t keep_ = 0;
    TPipe pipe_;
    TQue<TPosition::VECIN, 1> in_;
    TQue<TPosition::VECOUT, 1> out_;
    TBuf<TPosition::VECCALC> idx_, ramp_, best_, merged_, tile_, spare_;
    GlobalTensor<float> pooledGm_;
    GlobalTensor<uint32_t> selGm_;
};

// ------------------------------------------------------------------------------------------------
// Top-k by threshold selection (any keep; the host picks it over sort/merge beyond TOPK_CAP).
// A 16-ary search over the scores' order-preserving 32-bit keys finds the keep-th largest score t
// (8 counting passes over the row, 15 thresholds each, counted on the vector units: CompareScalar,
// Select of ones, Add; one ReduceSum per threshold and pass), one more pass counts the scores
// above t, and a last ascending pass keeps every position scoring above t plus the first
// keep − #(> t) positions scoring exactly t: ties go to the lower position by construction, the
// positions come out ascending, compacted by GatherMask, with no sort and no list-length limit.

class SelectKernel {
public:
    __aicore__ inline void Run(const EkCompressParams& p) {
        p_ = p;
        keep_ = p.budget - p.window;
        const uint64_t rows = (uint64_t)p.obs.shape[0] * p.out_heads;
        pooledGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(p.pooled), rows * (uint32_t)(p.entries - p.window));
        selGm_.SetGlobalBuffer(reinterpret_cast<__gm__ uint32_t*>(p.selected), rows * keep_);
        pipe_.InitBuffer(in_, 2, SELECT_TILE * sizeof(float));
        pipe_.InitBuffer(out_, 2, SELECT_TILE * sizeof(uint32_t));
        pipe_.InitBuffer(acc_, (SELECT_FANOUT - 1) * SELECT_TILE * sizeof(float));
        pipe_.InitBuffer(ones_, SELECT_TILE * sizeof(float));
        pipe_.InitBuffer(work_, SELECT_TILE * sizeof(float));
        pipe_.InitBuffer(sums_, SELECT_FANOUT * FLOATS_PER_BLOCK * sizeof(float));
        pipe_.InitBuffer(masks_, SELECT_MASKS * MASK_BYTES);
        pipe_.InitBuffer(ramp_, SELECT_TILE * sizeof(uint32_t));
        pipe_.InitBuffer(rampF_, SELECT_TILE * sizeof(float));
        pipe_.InitBuffer(pos_, SELECT_TILE * sizeof(uint32_t));
        pipe_.InitBuffer(eqPos_, SELECT_TILE * sizeof(uint32_t));
        LocalTensor<uint32_t> ramp = ramp_.Get<uint32_t>();
        LocalTensor<float> rampF = rampF_.Get<float>(), ones = ones_.Get<float>();
        for (uint32_t i = 0; i < SELECT_TILE; i++) {
            ramp.SetValue(i, i);
            rampF.SetValue(i, (float)i);
        }
        ScalarToVector();
        Duplicate(ones, 1.0f, (int32_t)SELECT_TILE);
        VecBarrier();
        const uint32_t items = p.obs.shape[0] * p.out_heads;
        for (uint32_t it = GetBlockIdx(); it < items; it += GetBlockNum()) Item(it);
    }

private:
    static constexpr uint32_t MASK_BYTES = SELECT_TILE / 8;  // one bit per score
    static constexpr uint32_t SELECT_MASKS = 4;               // bit masks held at once

    // Order-preserving keys: a larger float has a larger key (−0 just below +0).
    __aicore__ static inline uint32_t KeyOf(float f) {
        union {
            float f;
            uint32_t u;
        } v;
        v.f = f;
        return (v.u & 0x80000000u) ? ~v.u : (v.u | 0x80000000u);
    }
    __aicore__ static inline float FloatOf(uint32_t k) {
        union {
            float f;
            uint32_t u;
        } v;
        v.u = (k & 0x80000000u) ? (k & 0x7fffffffu) : ~k;
        return v.f;
    }

    __aicore__ inline LocalTensor<uint8_t> Mask(uint32_t i) { return masks_.Get<uint8_t>()[i * MASK_BYTES]; }

    // Scores [t0, t0 + n) of the row into a tile; the slots past n score −inf.
    __aicore__ inline LocalTensor<float> Load(uint64_t row, uint32_t t0, uint32_t n) {
        return LoadScores(in_, pooledGm_[row + t0], n, SELECT_TILE);
    }

    // counts[j] = #{scores s of the row : s `mode` thr[j]}, j < m, in one pass over the row.
    __aicore__ inline void Count(uint64_t row, uint32_t scored, const float* thr, uint32_t m, CMPMODE mode, uint32_t* counts) {
        LocalTensor<float> acc = acc_.Get<float>(), ones = ones_.Get<float>(), work = work_.Get<float>(), sums = sums_.Get<float>();
        LocalTensor<float> hit = work;  // 1.0 where the comparison holds (reused for ReduceSum below)
        LocalTensor<uint8_t> mask = Mask(0);
        Duplicate(acc, 0.0f, (int32_t)(m * SELECT_TILE));
        VecBarrier();
        for (uint32_t t0 = 0; t0 < scored; t0 += SELECT_TILE) {
            LocalTensor<float> sc = Load(row, t0, Min(SELECT_TILE, scored - t0));
            for (uint32_t j = 0; j < m; j++) {
                CompareScalar(mask, sc, thr[j], mode, SELECT_TILE);
                VecBarrier();
                Select(hit, mask, ones, 0.0f, SELMODE::VSEL_TENSOR_SCALAR_MODE, SELECT_TILE);
                VecBarrier();
                Add(acc[j * SELECT_TILE], acc[j * SELECT_TILE], hit, (int32_t)SELECT_TILE);
                VecBarrier();
            }
            in_.FreeTensor(sc);
        }
        for (uint32_t j = 0; j < m; j++) {
            ReduceSum(sums[j * FLOATS_PER_BLOCK], acc[j * SELECT_TILE], work, (int32_t)SELECT_TILE);
            VecBarrier();  // the next one reuses `work`
        }
        SetFlag<HardEvent::V_S>(0);
        WaitFlag<HardEvent::V_S>(0);
        for (uint32_t j = 0; j < m; j++) counts[j] = (uint32_t)sums.GetValue(j * FLOATS_PER_BLOCK);  // exact below 2^24
    }

    __aicore__ inline void Item(uint32_t it) {
        const uint32_t b = it / p_.out_heads, hc = it % p_.out_heads;
        const uint32_t scored = p_.entries - p_.window;
        const uint64_t row = ((uint64_t)b * p_.out_heads + hc) * scored;
        // The largest key k with #(s ≥ k) ≥ keep lies in [lo, hi): lo = −inf holds (every score
        // counts), hi = just past +inf does not.
        uint32_t lo = KeyOf(NegInf()), hi = KeyOf(-NegInf()) + 1;
        float thr[SELECT_FANOUT];
        uint32_t keys[SELECT_FANOUT], counts[SELECT_FANOUT];
        while (hi - lo > 1) {
            const uint64_t step = ((uint64_t)(hi - lo) + SELECT_FANOUT - 1) / SELECT_FANOUT;
            uint32_t m = 0;
            for (uint64_t k = lo + step; k < hi && m < SELECT_FANOUT - 1; k += step) {
                keys[m] = (uint32_t)k;
                thr[m++] = FloatOf((uint32_t)k);
            }
            Count(row, scored, thr, m, CMPMODE::GE, counts);
            uint32_t j = 0;
            while (j < m && counts[j] >= keep_) lo = keys[j++];
            if (j < m) hi = keys[j];
        }
        const float t = FloatOf(lo);
        uint32_t above = 0;
        Count(row, scored, &t, 1, CMPMODE::GT, &above);
        Compact(row, scored, t, keep_ - above, ((uint64_t)b * p_.out_heads + hc) * keep_);
    }

    // The kept positions, ascending: every score above t, and the first `ties` scoring t.
    __aicore__ inline void Compact(uint64_t row, uint32_t scored, float t, uint32_t ties, uint64_t out) {
        LocalTensor<float> acc = acc_.Get<float>(), ones = ones_.Get<float>(), rampF = rampF_.Get<float>();
        LocalTensor<float> above = acc, tie = acc[SELECT_TILE], first = acc[2 * SELECT_TILE];
        LocalTensor<uint32_t> ramp = ramp_.Get<uint32_t>(), pos = pos_.Get<uint32_t>(), eqPos = eqPos_.Get<uint32_t>();
        LocalTensor<uint8_t> gtMask = Mask(0), eqMask = Mask(1), cutMask = Mask(2), keepMask = Mask(3);
        const GatherMaskParams gm(1, 1, 0, 0);
        uint32_t taken = 0, written = 0;
        for (uint32_t t0 = 0; t0 < scored && written < keep_; t0 += SELECT_TILE) {
            const uint32_t n = Min(SELECT_TILE, scored - t0);
            LocalTensor<float> sc = Load(row, t0, n);
            Adds(pos.ReinterpretCast<int32_t>(), ramp.ReinterpretCast<int32_t>(), (int32_t)t0, (int32_t)SELECT_TILE);
            VecBarrier();
            CompareScalar(eqMask, sc, t, CMPMODE::EQ, SELECT_TILE);
            VecBarrier();
            uint64_t equal = 0;
            GatherMask(eqPos, pos, eqMask.ReinterpretCast<uint32_t>(), true, SELECT_TILE, gm, equal);
            VecBarrier();
            // The count (and eqPos) come from the vector pipe: the scalar unit waits for them.
            SetFlag<HardEvent::V_S>(0);
            WaitFlag<HardEvent::V_S>(0);
            // Ties in this tile are kept below `cut` (a tile-relative position): all of them, or
            // up to the first one past the quota.
            uint32_t cut = n;
            if (ties - taken < equal) {
                cut = Min(n, eqPos.GetValue(ties - taken) - t0);
                taken = ties;
            } else {
                taken += (uint32_t)equal;
            }
            CompareScalar(gtMask, sc, t, CMPMODE::GT, SELECT_TILE);
            VecBarrier();
            CompareScalar(cutMask, rampF, (float)cut, CMPMODE::LT, SELECT_TILE);
            VecBarrier();
            in_.FreeTensor(sc);
            // kept = (s > t) or (s = t and position < cut), as 1.0 / 0.0 (exact for t = −inf too).
            Select(above, gtMask, ones, 0.0f, SELMODE::VSEL_TENSOR_SCALAR_MODE, SELECT_TILE);
            VecBarrier();
            Select(tie, eqMask, ones, 0.0f, SELMODE::VSEL_TENSOR_SCALAR_MODE, SELECT_TILE);
            VecBarrier();
            Select(first, cutMask, tie, 0.0f, SELMODE::VSEL_TENSOR_SCALAR_MODE, SELECT_TILE);
            VecBarrier();
            Max(above, above, first, (int32_t)SELECT_TILE);
            VecBarrier();
            CompareScalar(keepMask, above, 0.5f, CMPMODE::GT, SELECT_TILE);
            VecBarrier();
            LocalTensor<uint32_t> o = out_.AllocTensor<uint32_t>();
            uint64_t kept = 0;
            GatherMask(o, pos, keepMask.ReinterpretCast<uint32_t>(), true, SELECT_TILE, gm, kept);
            VecBarrier();
            SetFlag<HardEvent::V_S>(0);  // the count is the vector pipe's
            WaitFlag<HardEvent::V_S>(0);
            out_.EnQue(o);
            o = out_.DeQue<uint32_t>();
            // Never more than the quota, whatever the scores (NaN counts nowhere).
            const uint32_t take = Min((uint32_t)kept, keep_ - written);
            if (take > 0) DataCopyPad(selGm_[out + written], o, DataCopyExtParams(1, take * sizeof(uint32_t), 0, 0, 0));
            out_.FreeTensor(o);
            written += take;
        }
    }

    EkCompressParams p_;
    uint32_t keep_ = 0;
    TPipe pipe_;
    TQue<TPosition::VECIN, 2> in_;
    TQue<TPosition::VECOUT, 2> out_;
    TBuf<TPosition::VECCALC> acc_, ones_, work_, sums_, masks_, ramp_, rampF_, pos_, eqPos_;
    GlobalTensor<float> pooledGm_;
    GlobalTensor<uint32_t> selGm_;
};

// ------------------------------------------------------------------------------------------------
// Gather: kept rows, then the window's rows, into the compacted caches.

template <typename T> class GatherKernel {
public:
    __aicore__ inline void Run(const EkCompressParams& p) {
        p_ = p;
        d_ = p.k_cache.shape[3];
        keep_ = p.budget - p.window;
        selGm_.SetGlobalBuffer(reinterpret_cast<__gm__ uint32_t*>(p.selected));
        pipe_.InitBuffer(rows_, 2, PaddedElems<T>(d_) * sizeof(T));
        const uint32_t items = p.obs.shape[0] * p.out_heads;
        for (uint32_t it = GetBlockIdx(); it < items; it += GetBlockNum()) Item(it);
    }

private:
    __aicore__ inline void Copy(const EkTensor& src, uint64_t out, int32_t b, int32_t h, uint32_t pos, uint64_t dst_off) {
        GlobalTensor<T> s, d;
        s.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(src.ptr));
        d.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(out));
        MoveRow(rows_, s[b * src.stride[0] + h * src.stride[1] + pos * src.stride[2]], d[dst_off], d_);
    }

    __aicore__ inline void Item(uint32_t it) {
        const int32_t b = it / p_.out_heads, hc = it % p_.out_heads;
        const int32_t h = p_.gqa_mode == GQA_PER_QUERY_HEAD ? hc / p_.group : hc;
        for (uint32_t slot = 0; slot < (uint32_t)p_.budget; slot++) {
            const uint32_t pos = slot < keep_ ? selGm_.GetValue(((uint64_t)b * p_.out_heads + hc) * keep_ + slot)
                                              : p_.entries - p_.window + (slot - keep_);
            const uint64_t dst = (((uint64_t)b * p_.out_heads + hc) * p_.budget + slot) * d_;
            Copy(p_.k_cache, p_.k_out, b, h, pos, dst);
            Copy(p_.v_cache, p_.v_out, b, h, pos, dst);
        }
    }

    EkCompressParams p_;
    uint32_t d_ = 0, keep_ = 0;
    TPipe pipe_;
    TQueBind<TPosition::VECIN, TPosition::VECOUT, 2> rows_;
    GlobalTensor<uint32_t> selGm_;
};

// ------------------------------------------------------------------------------------------------
// In-place compaction of a paged cache (SPEC §7.5): item (sequence b, cache head h) moves its kept
// entries selected[u·list_stride + j] (ascending) to entries j = 0 .. lengths[u] of its own pages,
// K then V, one row at a time through a two-deep GM → UB → GM queue. Race-free in place: p_j ≥ j
// ascending, so a row is read before any write could reach it (the write of row j follows the
// reads of every p_i ≤ j through the queue's MTE2 → MTE3 order) and no row is read after it is
// written (a later source p_k ≥ k > j). Sequences do not share pages (checked on the host).

template <typename T> class CompactKernel {
public:
    __aicore__ inline void Run(const EkCompressParams& p) {
        p_ = p;
        d_ = p.k_cache.shape[3];
        selGm_.SetGlobalBuffer(reinterpret_cast<__gm__ uint32_t*>(p.selected));
        lenGm_.SetGlobalBuffer(reinterpret_cast<__gm__ uint32_t*>(p.lengths));
        tableGm_.SetGlobalBuffer(reinterpret_cast<__gm__ uint32_t*>(p.block_table));
        kGm_.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(p.k_cache.ptr));
        vGm_.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(p.v_cache.ptr));
        pipe_.InitBuffer(rows_, 2, PaddedElems<T>(d_) * sizeof(T));
        const uint32_t items = p.k_cache.shape[0] * p.k_cache.shape[1];
        for (uint32_t it = GetBlockIdx(); it < items; it += GetBlockNum()) Item(it);
    }

private:
    // Element offset of entry n of head h of sequence b.
    __aicore__ inline int64_t Entry(int32_t b, int32_t h, uint32_t n) {
        const int64_t page = tableGm_.GetValue((int64_t)b * p_.table_width + n / (uint32_t)p_.page_size);
        return page * p_.page_stride + (int64_t)(n % (uint32_t)p_.page_size) * p_.slot_stride + (int64_t)h * p_.head_stride;
    }

    __aicore__ inline void Item(uint32_t u) {
        const int32_t b = u / p_.k_cache.shape[1], h = u % p_.k_cache.shape[1];
        const uint32_t keep = lenGm_.GetValue(u);  // 0: the sequence does not compress
        for (uint32_t j = 0; j < keep; j++) {
            const uint32_t pos = selGm_.GetValue((uint64_t)u * p_.list_stride + j);
            if (pos == j) continue;
            const int64_t src = Entry(b, h, pos), dst = Entry(b, h, j);
            MoveRow(rows_, kGm_[src], kGm_[dst], d_);
            MoveRow(rows_, vGm_[src], vGm_[dst], d_);
        }
    }

    EkCompressParams p_;
    uint32_t d_ = 0;
    TPipe pipe_;
    TQueBind<TPosition::VECIN, TPosition::VECOUT, 2> rows_;
    GlobalTensor<uint32_t> selGm_, lenGm_, tableGm_;
    GlobalTensor<T> kGm_, vGm_;
};

}  // namespace

extern "C" __global__ __aicore__ void ek_compress_compact(GM_ADDR params) { Dispatch<CompactKernel>(ReadParams<EkCompressParams>(params)); }
extern "C" __global__ __aicore__ void ek_compress_stats(GM_ADDR params) { Dispatch<StatsKernel>(ReadParams<EkCompressParams>(params)); }
extern "C" __global__ __aicore__ void ek_compress_means(GM_ADDR params) { Dispatch<MeansKernel>(ReadParams<EkCompressParams>(params)); }
extern "C" __global__ __aicore__ void ek_compress_pool(GM_ADDR params) {
    PoolKernel k;
    k.Run(ReadParams<EkCompressParams>(params));
    DrainPipes();
}
extern "C" __global__ __aicore__ void ek_compress_topk(GM_ADDR params) {
    TopKKernel k;
    k.Run(ReadParams<EkCompressParams>(params));
    DrainPipes();
}
extern "C" __global__ __aicore__ void ek_compress_select(GM_ADDR params) {
    SelectKernel k;
    k.Run(ReadParams<EkCompressParams>(params));
    DrainPipes();
}
extern "C" __global__ __aicore__ void ek_compress_gather(GM_ADDR params) { Dispatch<GatherKernel>(ReadParams<EkCompressParams>(params)); }

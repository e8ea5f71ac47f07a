// kv_compress scoring on the cube for f16/bf16 caches: the stats and means launches of
// kv_compress.cpp as mixed kernels (f32 caches keep the vector ones: A2's cube takes 16-bit data).
//
// Work item = (b, kv head h, key chunk c), in passes of ≤ CUBE_ROWS of the group's G·W window
// rows. Per pass the AIC loads the rows into L0A (resident for the pass), then for each CUBE_KEYS
// tile of the chunk gathers K into L1 → L0B and computes S = obs·Kᵀ into a 2-slot GM workspace;
// the two AIVs copy the tile to UB and do what the vector kernels do with their own dot products:
//   ek_compress_cube_stats  AIV k: its half of the pass's rows → running softmax max and sum
//                           (RowStats, whole tiles), stored per chunk as the vector stats are
//   ek_compress_cube_means  AIV k: the rows of its query heads (g ≡ k mod 2) → e^(S − m)/l summed
//                           into the window means of those heads
// Flags: FLAG_S (AIC → AIVs: a tile is in slot seq % 2), FLAG_FREE (each AIV → AIC: it copied the
// slot out); the AIC waits for FLAG_FREE before refilling a slot and drains the last two at the end.
//
// Tile plan (CUBE_ROWS 64, CUBE_KEYS 64, D ≤ 256, T = half/bf16):
//   L1   obs 64×256×2 = 32 KiB, K 32 KiB                          ( 64 of 512 KiB)
//   L0A  obs 32 KiB;  L0B Kᵀ 32 KiB;  L0C S 64×64×4 = 16 KiB
//   UB (each AIV) S tile 16 KiB + RowStats 5.5 KiB (stats); S tile 16 KiB + means accumulators
//        ≤ 8 heads × 512 × 4 = 16 KiB + merged stats 1 KiB + per-row broadcasts 4 KiB (means)
//   GM workspace per AI core: 2 × 64 × 64 × 4 = 32 KiB
// Expected utilisation: each pass is 2·rows·keys·D FLOPs on the cube at full fractal occupancy
// when rows = 64 (G·W ≥ 64), against ~10 whole-tile vector instructions per tile and AIV for the
// statistics: the dot products — all of the vector kernels' work — leave the vector units.

#include "kernel_operator.h"
#include "entropy_params.h"
#include "common.h"
#include "compress_common.h"
#include "cube_common.h"

using namespace AscendC;
using namespace ekcompress;
using namespace ekcube;

namespace {

constexpr uint32_t CUBE_ROWS = 64;  // window rows per pass (COMPRESS_ROW_CHUNK)
constexpr uint32_t CUBE_KEYS = 64;  // keys per score tile: one 256-byte repeat per f32 row
constexpr uint32_t CUBE_MAX_D = 256;
constexpr uint32_t WS_TILE = CUBE_ROWS * CUBE_KEYS;  // floats of one workspace slot
constexpr uint32_t WS_SLOTS = 2;
constexpr int32_t FLAG_S = 4, FLAG_FREE = 5;
static_assert(CUBE_ROWS == COMPRESS_ROW_CHUNK, "passes as in the vector kernels (RowStats holds 64 rows)");

// Keys chunk c scores: every key for the stats; for the means only those below N − W (the
// window's own keys are kept anyway). False: nothing to do.
__aicore__ inline bool ChunkKeys(const EkCompressParams& p, int32_t c, bool means, uint32_t& lo, uint32_t& hi) {
    const uint32_t end = means ? (uint32_t)(p.entries - p.window) : (uint32_t)p.entries;
    lo = (uint32_t)c * p.chunk;
    hi = Min(end, lo + p.chunk);
    return lo < hi;
}

__aicore__ inline uint32_t ItemCount(const EkCompressParams& p) { return p.k_cache.shape[0] * p.k_cache.shape[1] * p.chunks; }

// ------------------------------------------------------------------------------------------------
// Cube side.

template <typename T> class CompressCube {
public:
    __aicore__ inline void Run(const EkCompressParams& p, bool means) {
        p_ = p;
        means_ = means;
        d_ = p.k_cache.shape[3];
        dp_ = Up16(d_);
        rows_ = p.group * p.window;
        obsGm_.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(p.obs.ptr));
        kGm_.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(p.k_cache.ptr));
        ws_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(p.workspace) + (uint64_t)GetBlockIdx() * WS_SLOTS * WS_TILE,
                            WS_SLOTS * WS_TILE);
        pipe_.InitBuffer(oL1_, CUBE_ROWS * CUBE_MAX_D * sizeof(T));
        pipe_.InitBuffer(kL1_, CUBE_KEYS * CUBE_MAX_D * sizeof(T));
        pipe_.InitBuffer(oL0_, CUBE_ROWS * CUBE_MAX_D * sizeof(T));
        pipe_.InitBuffer(kL0_, CUBE_KEYS * CUBE_MAX_D * sizeof(T));
        pipe_.InitBuffer(sL0_, CUBE_ROWS * CUBE_KEYS * sizeof(float));
        oL1Free_.Start(0);
        kL1Free_.Start(1);
        oL0Free_.Start(0);
        kL0Free_.Start(1);
        sL0Free_.Start(0);
        for (uint32_t it = GetBlockIdx(); it < ItemCount(p); it += GetBlockNum()) Item(it);
        for (uint32_t k = 0; k < Min(seq_, WS_SLOTS); k++) CrossCoreWaitFlag(FLAG_FREE);  // slots still out
        oL1Free_.Drain();
        kL1Free_.Drain();
        oL0Free_.Drain();
        kL0Free_.Drain();
        sL0Free_.Drain();
    }

private:
    __aicore__ inline void Item(uint32_t it) {
        const int32_t c = it % p_.chunks, bh = it / p_.chunks;
        const int32_t b = bh / p_.k_cache.shape[1], h = bh % p_.k_cache.shape[1];
        uint32_t lo, hi;
        if (!ChunkKeys(p_, c, means_, lo, hi)) return;
        for (uint32_t r0 = 0; r0 < rows_; r0 += CUBE_ROWS) {
            const uint32_t nr = Min(CUBE_ROWS, rows_ - r0), mpad = Up16(nr);
            LoadObs(b, h, r0, nr, mpad);
            for (uint32_t j0 = lo; j0 < hi; j0 += CUBE_KEYS) Scores(b, h, j0, Min(CUBE_KEYS, hi - j0), nr, mpad);
            oL0Free_.AfterRead();  // the pass's last Mmad with these rows is issued
        }
    }

    // Window rows [r0, r0 + nr) of kv head h (row r: query head h·G + r / W, slot r mod W), one
    // run per query head, into L1 and on to L0A.
    __aicore__ inline void LoadObs(int32_t b, int32_t h, uint32_t r0, uint32_t nr, uint32_t mpad) {
        LocalTensor<T> oL1 = oL1_.Get<T>(), oL0 = oL0_.Get<T>();
        const uint32_t w = p_.window;
        oL1Free_.BeforeWrite();
        for (uint32_t row = 0; row < nr;) {
            const uint32_t r = r0 + row, run = Min(w - r % w, nr - row);
            const int64_t off = b * p_.obs.stride[0] + (h * p_.group + r / w) * p_.obs.stride[1] + (r % w) * p_.obs.stride[2];
            DataCopy(oL1[row * FRACTAL], obsGm_[off], Nd2NzParams(1, run, d_, 0, p_.obs.stride[2], mpad, 1, 0));
            row += run;
        }
        CopiesToL1Done();
        oL0Free_.BeforeWrite();
        ToL0A(oL0, oL1, mpad, dp_);
        oL1Free_.AfterRead();
    }

    // S = obs·Kᵀ for keys [j0, j0 + n) into the next workspace slot (a short tile is padded with
    // copies of key j0: finite, never read).
    __aicore__ inline void Scores(int32_t b, int32_t h, uint32_t j0, uint32_t n, uint32_t nr, uint32_t mpad) {
        LocalTensor<T> kL1 = kL1_.Get<T>(), kL0 = kL0_.Get<T>(), oL0 = oL0_.Get<T>();
        LocalTensor<float> sL0 = sL0_.Get<float>();
        const int64_t off = b * p_.k_cache.stride[0] + h * p_.k_cache.stride[1] + j0 * p_.k_cache.stride[2];
        const uint16_t stride = (uint16_t)p_.k_cache.stride[2];
        kL1Free_.BeforeWrite();
        DataCopy(kL1, kGm_[off], Nd2NzParams(1, n, d_, 0, stride, CUBE_KEYS, 1, 0));
        if (n < CUBE_KEYS) DataCopy(kL1[n * FRACTAL], kGm_[off], Nd2NzParams(CUBE_KEYS - n, 1, d_, 0, stride, CUBE_KEYS, 1, FRACTAL));
        CopiesToL1Done();
        kL0Free_.BeforeWrite();
        TransposedToL0B(kL0, kL1, CUBE_KEYS, dp_);
        kL1Free_.AfterRead();
        if (seq_ >= WS_SLOTS) CrossCoreWaitFlag(FLAG_FREE);  // both AIVs copied this slot's last tile
        MatmulToGm(ws_[(seq_ % WS_SLOTS) * WS_TILE], CUBE_KEYS, sL0, sL0Free_, oL0, kL0, nr, CUBE_KEYS, d_, mpad);
        kL0Free_.AfterRead();
        CrossCoreSetFlag<2, PIPE_FIX>(FLAG_S);
        seq_++;
    }

    EkCompressParams p_;
    bool means_ = false;
    uint32_t d_ = 0, dp_ = 0, rows_ = 0, seq_ = 0;
    TPipe pipe_;
    TBuf<TPosition::A1> oL1_;
    TBuf<TPosition::B1> kL1_;
    TBuf<TPosition::A2> oL0_;
    TBuf<TPosition::B2> kL0_;
    TBuf<TPosition::CO1> sL0_;
    L1Handoff oL1Free_, kL1Free_;
    L0Handoff oL0Free_, kL0Free_;
    L0CHandoff sL0Free_;
    GlobalTensor<T> obsGm_, kGm_;
    GlobalTensor<float> ws_;
};

// ------------------------------------------------------------------------------------------------
// Vector side: AIV k of AI core i (block index 2i + k) takes the tiles of AIC i, in its order.

class CompressVector {
public:
    __aicore__ inline void Run(const EkCompressParams& p, bool means) {
        p_ = p;
        means_ = means;
        rows_ = p.group * p.window;
        scale_ = p.scale_log2 * LN2;  // natural-log scale, as the vector kernels pre-scale obs
        const uint32_t core = GetBlockIdx() / GetSubBlockNum();  // as in prefill.cpp (catlass's mixed kernels)
        sub_ = GetSubBlockIdx();
        ws_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(p.workspace) + (uint64_t)core * WS_SLOTS * WS_TILE, WS_SLOTS * WS_TILE);
        statsGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(p.stats));
        meansGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(p.means));
        pipe_.InitBuffer(sIn_, 1, WS_TILE * sizeof(float));
        if (means) {
            heads_ = ((uint32_t)p.group + 1 - sub_) / 2;  // query heads g ≡ sub_ (mod 2)
            pipe_.InitBuffer(statIn_, 1, 2 * CUBE_ROWS * sizeof(float));
            pipe_.InitBuffer(merged_, 4 * CUBE_ROWS * sizeof(float));  // max, sum, weights, scratch
            pipe_.InitBuffer(bcast_, 2 * CUBE_ROWS * FLOATS_PER_BLOCK * sizeof(float));  // m, weights per row
            if (heads_ > 0) pipe_.InitBuffer(acc_, 1, heads_ * p.chunk * sizeof(float));
        } else {
            pipe_.InitBuffer(out_, 1, 2 * CUBE_ROWS * sizeof(float));
            st_.Init(pipe_);
        }
        for (uint32_t it = core; it < ItemCount(p); it += GetBlockNum()) Item(it);
    }

private:
    // The AIC's next tile into UB, the slot released after: `copy(row, n)` is called for the
    // runs of rows this AIV reads (rows keep their place in the tile).
    template <typename Runs> __aicore__ inline LocalTensor<float> NextTile(Runs runs) {
        CrossCoreWaitFlag(FLAG_S);
        LocalTensor<float> sc = sIn_.AllocTensor<float>();
        const GlobalTensor<float> slot = ws_[(seq_ % WS_SLOTS) * WS_TILE];
        runs([&](uint32_t row, uint32_t n) { DataCopy(sc[row * CUBE_KEYS], slot[row * CUBE_KEYS], n * CUBE_KEYS); });
        sIn_.EnQue(sc);
        sc = sIn_.DeQue<float>();
        CrossCoreSetFlag<2, PIPE_MTE2>(FLAG_FREE);
        seq_++;
        return sc;
    }

    // f(row, run, g) for each run of rows [0, nr) of the pass at r0 that belongs to one of this
    // AIV's query heads g (g ≡ sub_ mod 2).
    template <typename F> __aicore__ inline void MyHeadRuns(uint32_t r0, uint32_t nr, F f) {
        const uint32_t w = p_.window;
        for (uint32_t row = 0; row < nr;) {
            const uint32_t r = r0 + row, run = Min(w - r % w, nr - row);
            if ((r / w) % 2 == sub_) f(row, run, r / w);
            row += run;
        }
    }

    __aicore__ inline void Item(uint32_t it) {
        const int32_t c = it % p_.chunks, bh = it / p_.chunks;
        const int32_t b = bh / p_.k_cache.shape[1], h = bh % p_.k_cache.shape[1];
        uint32_t lo, hi;
        if (!ChunkKeys(p_, c, means_, lo, hi)) return;
        if (means_) {
            Means(b, h, lo, hi);
            return;
        }
        for (uint32_t r0 = 0; r0 < rows_; r0 += CUBE_ROWS) {
            const uint32_t nr = Min(CUBE_ROWS, rows_ - r0), split = (nr + 1) / 2;
            const uint32_t a = sub_ == 0 ? 0 : split, n = (sub_ == 0 ? split : nr) - a;  // this AIV's rows
            if (n > 0) st_.Start(n);
            for (uint32_t j0 = lo; j0 < hi; j0 += CUBE_KEYS) {
                LocalTensor<float> sc = NextTile([&](auto copy) {
                    if (n > 0) copy(a, n);
                });
                if (n > 0) {
                    LocalTensor<float> mine = sc[a * CUBE_KEYS];
                    Muls(mine, mine, scale_, (int32_t)(n * CUBE_KEYS));
                    VecBarrier();
                    for (uint32_t i = 0; i < n; i++) st_.Hide(mine, i, VisibleKeys(p_, r0 + a + i, j0, Min(CUBE_KEYS, hi - j0)), CUBE_KEYS);
                    st_.Step(mine, CUBE_KEYS);
                }
                sIn_.FreeTensor(sc);
            }
            if (n > 0) StoreStats(p_, statsGm_, out_, st_, b, h, c, r0 + a, n);
        }
    }

    // Window means of this AIV's query heads over keys [lo, hi) (all visible to every row).
    __aicore__ inline void Means(int32_t b, int32_t h, uint32_t lo, uint32_t hi) {
        const uint32_t w = p_.window;
        LocalTensor<float> acc;
        if (heads_ > 0) {
            acc = acc_.AllocTensor<float>();
            Duplicate(acc, 0.0f, (int32_t)(heads_ * p_.chunk));
            VecBarrier();
        }
        const uint8_t rep = (uint8_t)(CUBE_KEYS / FLOATS_PER_BLOCK);
        LocalTensor<float> mg = merged_.Get<float>(), bcM = bcast_.Get<float>(), bcC = bcM[CUBE_ROWS * FLOATS_PER_BLOCK];
        for (uint32_t r0 = 0; r0 < rows_; r0 += CUBE_ROWS) {
            const uint32_t nr = Min(CUBE_ROWS, rows_ - r0);
            if (heads_ > 0) {
                // Per row of the pass: m, and the weight 1 / (W·l) of its probabilities in the
                // mean, each broadcast to one block per row.
                LocalTensor<float> mx = mg, sm = mg[CUBE_ROWS], coef = mg[2 * CUBE_ROWS];
                MergeStats(p_, statsGm_, statIn_, b, h, r0, nr, mx, sm, coef, mg[3 * CUBE_ROWS], p_.chunks);
                Muls(sm, sm, (float)w, (int32_t)nr);
                VecBarrier();
                Duplicate(coef, 1.0f, (int32_t)nr);
                VecBarrier();
                Div(coef, coef, sm, (int32_t)nr);
                VecBarrier();
                const uint8_t groups = (uint8_t)((nr + FLOATS_PER_BLOCK - 1) / FLOATS_PER_BLOCK);
                Brcb(bcM, mx, groups, BrcbRepeatParams(1, 8));
                VecBarrier();
                Brcb(bcC, coef, groups, BrcbRepeatParams(1, 8));
                VecBarrier();
            }
            for (uint32_t j0 = lo; j0 < hi; j0 += CUBE_KEYS) {
                const uint32_t n = Min(CUBE_KEYS, hi - j0);
                // This AIV's rows of the pass: runs of whole query heads g ≡ sub_ (mod 2), copied
                // run by run (rows outside the runs stay unread).
                LocalTensor<float> sc = NextTile([&](auto copy) { MyHeadRuns(r0, nr, [&](uint32_t row, uint32_t run, uint32_t) { copy(row, run); }); });
                MyHeadRuns(r0, nr, [&](uint32_t row, uint32_t run, uint32_t g) {
                    // The run's rows as whole-tile steps: e^(scale·S − m) / (W·l), summed over
                    // the rows (padded keys past n are finite and never added to acc).
                    LocalTensor<float> s = sc[row * CUBE_KEYS];
                    const uint8_t rows = (uint8_t)run;
                    Muls(s, s, scale_, (int32_t)(run * CUBE_KEYS));
                    VecBarrier();
                    Sub(s, s, bcM[row * FLOATS_PER_BLOCK], (uint64_t)CUBE_KEYS, rows, BinaryRepeatParams(1, 1, 0, rep, rep, 1));
                    VecBarrier();
                    Exp(s, s, (uint64_t)CUBE_KEYS, rows, UnaryRepeatParams(1, 1, rep, rep));
                    VecBarrier();
                    Mul(s, s, bcC[row * FLOATS_PER_BLOCK], (uint64_t)CUBE_KEYS, rows, BinaryRepeatParams(1, 1, 0, rep, rep, 1));
                    VecBarrier();
                    FoldRows(s, run, CUBE_KEYS);  // ends with a barrier (or issues nothing after the barriered Mul)
                    LocalTensor<float> dst = acc[(g / 2) * p_.chunk + (j0 - lo)];
                    Add(dst, dst, s, (int32_t)n);
                    VecBarrier();
                });
                sIn_.FreeTensor(sc);
            }
        }
        if (heads_ == 0) return;
        acc_.EnQue(acc);
        acc = acc_.DeQue<float>();
        const uint32_t stride = MeansStride(p_), pad = PoolPad(p_);
        for (uint32_t k = 0; k < heads_; k++) {
            const uint32_t g = 2 * k + sub_;
            const uint64_t off = ((uint64_t)b * p_.obs.shape[1] + h * p_.group + g) * stride + pad + lo;
            DataCopyPad(meansGm_[off], acc[k * p_.chunk], DataCopyExtParams(1, (hi - lo) * sizeof(float), 0, 0, 0));
        }
        acc_.FreeTensor(acc);
    }

    EkCompressParams p_;
    bool means_ = false;
    uint32_t rows_ = 0, sub_ = 0, heads_ = 0, seq_ = 0;
    float scale_ = 0;
    TPipe pipe_;
    TQue<TPosition::VECIN, 1> sIn_, statIn_;
    TQue<TPosition::VECOUT, 1> out_, acc_;
    TBuf<TPosition::VECCALC> merged_, bcast_;
    RowStats st_;
    GlobalTensor<float> ws_, statsGm_, meansGm_;
};

template <typename T> __aicore__ inline void RunCompress(const EkCompressParams& p, bool means) {
    if ASCEND_IS_AIC {
        CompressCube<T> k;
        k.Run(p, means);
    } else {
        CompressVector k;
        k.Run(p, means);
    }
}

__aicore__ inline void Dispatch(GM_ADDR sync, GM_ADDR params, bool means) {
    SetSyncBaseAddr(reinterpret_cast<uint64_t>(sync));  // the cross-core flags' address, on every core
    const EkCompressParams p = ReadParams<EkCompressParams>(params);
    if (p.dtype == EK_BF16) {
        RunCompress<bfloat16_t>(p, means);
    } else {
        RunCompress<half>(p, means);  // f16 (f32 caches use the vector kernels)
    }
    DrainPipes();
}

}  // namespace

// Mixed kernels (one AIC, two AIVs): the hardware sync address first, then the params.
extern "C" __global__ __aicore__ void ek_compress_cube_stats(GM_ADDR sync, GM_ADDR params) {
    KERNEL_TASK_TYPE_DEFAULT(KERNEL_TYPE_MIX_AIC_1_2);
    Dispatch(sync, params, false);
}
extern "C" __global__ __aicore__ void ek_compress_cube_means(GM_ADDR sync, GM_ADDR params) {
    KERNEL_TASK_TYPE_DEFAULT(KERNEL_TYPE_MIX_AIC_1_2);
    Dispatch(sync, params, true);
}

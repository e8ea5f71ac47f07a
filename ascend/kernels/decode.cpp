// Decode attention over compacted caches with per-head lengths (vector cores).
//
// One item = (batch, cache head, ≤ 16 of its nq·G query rows); cores take items round-robin. The
// item's query rows stay in UB as f32; keys and values stream through in tiles of DECODE_KEYS rows, each tile one
// DataCopyPad (rows padded to 32 bytes, zero-filled), widened to f32; scores, the online softmax
// and the output accumulate in f32. Tile plan (UB 192 KiB, D ≤ 256, f16/bf16 worst case):
//   K and V tiles in T       2 × 32 × 256 × 2 B  =  32 KiB
//   K and V tiles in f32     2 × 32 × 256 × 4 B  =  64 KiB   (not needed for f32 inputs)
//   q rows, output rows      2 × 16 × 256 × 4 B  =  32 KiB
//   scores, scratch          16 × 32 × 4 B + 32 × 256 × 4 B products + 1 KiB partials/broadcasts
// Per (row, key tile): the scores against all 32 keys (TileDots: ~5 instructions), the online
// softmax (row max and sum through the scalar unit), then P·V for all 32 value rows
// (TileWeightedSum: ~9 instructions). Expected utilisation: vector-bound on the dot products,
// acceptable for decode's few rows; the cube path is the prefill kernel's.

#include "kernel_operator.h"
#include "entropy_params.h"
#include "common.h"

using namespace AscendC;

namespace {

constexpr uint32_t DECODE_KEYS = 32;
constexpr uint32_t DECODE_MAX_ROWS = 16;

template <typename T> class DecodeKernel {
public:
    __aicore__ inline void Run(const EkDecodeParams& p) {
        p_ = p;
        d_ = p.q.shape[3];
        rows_ = p.q.shape[1] * p.group;
        dpt_ = PaddedElems<T>(d_);   // a row of T in UB
        dpf_ = PaddedElems<float>(d_);  // a row of f32 in UB (≤ dpt_ for 16-bit T)
        qGm_.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(p.q.ptr));
        kGm_.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(p.k_cache.ptr));
        vGm_.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(p.v_cache.ptr));
        oGm_.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(p.out.ptr));
        lenGm_.SetGlobalBuffer(reinterpret_cast<__gm__ uint32_t*>(p.lengths));
        const uint32_t tile = DECODE_KEYS * dpt_ * sizeof(T);
        pipe_.InitBuffer(kIn_, 1, tile);
        pipe_.InitBuffer(vIn_, 1, tile);
        pipe_.InitBuffer(rowIn_, 1, dpt_ * sizeof(T));
        pipe_.InitBuffer(rowOut_, 1, dpt_ * sizeof(T));
        chunk_ = rows_ < DECODE_MAX_ROWS ? rows_ : DECODE_MAX_ROWS;
        pipe_.InitBuffer(q_, chunk_ * dpf_ * sizeof(float));
        pipe_.InitBuffer(o_, chunk_ * dpf_ * sizeof(float));
        if (!SameType<T, float>::value) {
            pipe_.InitBuffer(kf_, DECODE_KEYS * dpt_ * sizeof(float));
            pipe_.InitBuffer(vf_, DECODE_KEYS * dpt_ * sizeof(float));
        }
        pipe_.InitBuffer(scores_, chunk_ * DECODE_KEYS * sizeof(float));
        pipe_.InitBuffer(tmp_, DECODE_KEYS * dpt_ * sizeof(float));
        pipe_.InitBuffer(part_, DECODE_KEYS * FLOATS_PER_BLOCK * sizeof(float));
        pipe_.InitBuffer(red_, ONE_BLK_SIZE);
        pipe_.InitBuffer(work_, ONE_REPEAT_BYTES);
        // Item = (unit, chunk of at most DECODE_MAX_ROWS query rows); a unit with more rows reads
        // its K/V once per chunk.
        const uint32_t units = p.q.shape[0] * p.k_cache.shape[1], chunks = (rows_ + chunk_ - 1) / chunk_;
        for (uint32_t it = GetBlockIdx(); it < units * chunks; it += GetBlockNum()) {
            const uint32_t r0 = (it % chunks) * chunk_;
            Unit(it / chunks, r0, rows_ - r0 < chunk_ ? rows_ - r0 : chunk_);
        }
    }

private:
    __aicore__ inline LocalTensor<float> LoadTile(TQue<TPosition::VECIN, 1>& que, TBuf<TPosition::VECCALC>& wide,
                                                  const GlobalTensor<T>& src, uint32_t n, int64_t stride, LocalTensor<T>& held) {
        return LoadRows<T>(que, WideBuffer<T>(wide), src, n, d_, stride, held);
    }

    // Rows [r0, r0 + nr) of unit u (row r = query r / G, head h·G + r % G).
    __aicore__ inline void Unit(uint32_t u, uint32_t r0, uint32_t nr) {
        const int32_t hcs = p_.k_cache.shape[1];
        const int32_t b = u / hcs, h = u % hcs;
        const uint32_t len = lenGm_.GetValue(u);
        const float scale = p_.scale_log2 * LN2;  // natural-log scale for Exp
        LocalTensor<float> q = q_.Get<float>(), o = o_.Get<float>(), sc = scores_.Get<float>();
        const RowTileScratch scratch{tmp_.Get<float>(), part_.Get<float>(), red_.Get<float>(), work_.Get<float>()};
        // The group's query rows, scaled, as f32.
        for (uint32_t r = 0; r < nr; r++) {
            const uint32_t row = r0 + r;
            const int64_t off = b * p_.q.stride[0] + (row / p_.group) * p_.q.stride[1] + (h * p_.group + row % p_.group) * p_.q.stride[2];
            LoadScaledRow<T>(rowIn_, q[r * dpf_], qGm_[off], d_, dpf_, scale);
        }
        Duplicate(o, 0.0f, (int32_t)(nr * dpf_));
        VecBarrier();
        float m[DECODE_MAX_ROWS], l[DECODE_MAX_ROWS];
        for (uint32_t r = 0; r < nr; r++) {
            m[r] = NegInf();
            l[r] = 0.0f;
        }
        // K and V may be laid out differently: each head offset from its own strides.
        const int64_t khead = b * p_.k_cache.stride[0] + h * p_.k_cache.stride[1];
        const int64_t vhead = b * p_.v_cache.stride[0] + h * p_.v_cache.stride[1];
        for (uint32_t j0 = 0; j0 < len; j0 += DECODE_KEYS) {
            const uint32_t n = len - j0 < DECODE_KEYS ? len - j0 : DECODE_KEYS;
            LocalTensor<T> kt, vt;
            LocalTensor<float> kf = LoadTile(kIn_, kf_, kGm_[khead + j0 * p_.k_cache.stride[2]], n, p_.k_cache.stride[2], kt);
            LocalTensor<float> vf = LoadTile(vIn_, vf_, vGm_[vhead + j0 * p_.v_cache.stride[2]], n, p_.v_cache.stride[2], vt);
            for (uint32_t r = 0; r < nr; r++)
                RowTileStep(o[r * dpf_], dpf_, sc[r * DECODE_KEYS], q[r * dpf_], kf, vf, n, d_, dpt_, scratch, m[r], l[r]);
            kIn_.FreeTensor(kt);
            vIn_.FreeTensor(vt);
        }
        for (uint32_t r = 0; r < nr; r++) {
            const uint32_t row = r0 + r;
            const int64_t off = b * p_.out.stride[0] + (row / p_.group) * p_.out.stride[1] + (h * p_.group + row % p_.group) * p_.out.stride[2];
            StoreScaledRow<T>(rowOut_, oGm_[off], o[r * dpf_], d_, dpf_, 1.0f / l[r]);
        }
    }

    EkDecodeParams p_;
    uint32_t d_ = 0, rows_ = 0, chunk_ = 0, dpt_ = 0, dpf_ = 0;
    TPipe pipe_;
    TQue<TPosition::VECIN, 1> kIn_, vIn_, rowIn_;
    TQue<TPosition::VECOUT, 1> rowOut_;
    TBuf<TPosition::VECCALC> q_, o_, kf_, vf_, scores_, tmp_, part_, red_, work_;
    GlobalTensor<T> qGm_, kGm_, vGm_, oGm_;
    GlobalTensor<uint32_t> lenGm_;
};

}  // namespace

extern "C" __global__ __aicore__ void ek_decode(GM_ADDR params) { Dispatch<DecodeKernel>(ReadParams<EkDecodeParams>(params)); }

// f32 sparse prefill (SPEC §3) on the vector cores: the path for f32 inputs, which A2's cube
// cannot take through P·V (the transposing L1 → L0B load is for 16-bit types only), so the
// cube/vector kernel in prefill.cpp serves f16/bf16 and this one f32, with the same work items
// and virtual key lists (prefill_items.h).
//
// Item = (b, kv head, segment, query tile of tile_tokens × G rows); its rows in chunks of
// VEC_ROWS, each chunk streaming the item's key list in tiles of VEC_KEYS keys gathered run by
// run (a selected block, or a stretch of own keys) straight into UB. Per row and key tile: the
// scores against the row's visible prefix of the tile (TileDots), the online softmax (row max and
// sum through the scalar unit), then P·V (TileWeightedSum) — no masking needed, a row simply
// stops at its visible count. End of chunk: O / l → out, lse = m + ln l.
//
// Tile plan (UB 192 KiB, D ≤ 256): q rows and O accumulators 2 × 16 × 256 × 4 = 32 KiB; K and V
// tiles 2 × 32 × 256 × 4 = 64 KiB; products 32 KiB; scores 2 KiB; partials and broadcasts 1 KiB;
// row staging 1 KiB (~133 KiB). Expected utilisation: vector-bound (f32 dot products on the vector
// units, ~1/8 of the cube's f16 rate); f32 is the accuracy path, f16/bf16 the fast one.

#include "kernel_operator.h"
#include "entropy_params.h"
#include "common.h"
#include "prefill_items.h"

using namespace AscendC;
using namespace ekprefill;

namespace {

constexpr uint32_t VEC_ROWS = 16;       // query rows held at once (q and O in UB)
constexpr uint32_t VEC_KEYS = 32;       // keys per tile

class PrefillF32 {
public:
    __aicore__ inline void Run(const EkPrefillParams& p) {
        p_ = p;
        d_ = p.q.shape[3];
        dp_ = PaddedElems<float>(d_);
        scale_ = p.scale_log2 * LN2;  // natural-log scale for Exp
        qGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(p.q.ptr));
        kGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(p.k.ptr));
        vGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(p.v.ptr));
        outGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(p.out.ptr));
        lseGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(p.lse));
        offsetsGm_.SetGlobalBuffer(reinterpret_cast<__gm__ uint32_t*>(p.offsets));
        countsGm_.SetGlobalBuffer(reinterpret_cast<__gm__ uint32_t*>(p.counts));
        indicesGm_.SetGlobalBuffer(reinterpret_cast<__gm__ uint32_t*>(p.indices));
        pipe_.InitBuffer(rowIn_, 1, dp_ * sizeof(float));
        pipe_.InitBuffer(kIn_, 1, VEC_KEYS * dp_ * sizeof(float));
        pipe_.InitBuffer(vIn_, 1, VEC_KEYS * dp_ * sizeof(float));
        pipe_.InitBuffer(rowOut_, 1, dp_ * sizeof(float));
        pipe_.InitBuffer(lseOut_, 1, ONE_BLK_SIZE);
        pipe_.InitBuffer(q_, VEC_ROWS * dp_ * sizeof(float));
        pipe_.InitBuffer(o_, VEC_ROWS * dp_ * sizeof(float));
        pipe_.InitBuffer(tmp_, VEC_KEYS * dp_ * sizeof(float));
        pipe_.InitBuffer(scores_, VEC_ROWS * VEC_KEYS * sizeof(float));
        pipe_.InitBuffer(part_, VEC_KEYS * FLOATS_PER_BLOCK * sizeof(float));
        pipe_.InitBuffer(red_, ONE_BLK_SIZE);
        pipe_.InitBuffer(work_, ONE_REPEAT_BYTES);
        const uint32_t items = ItemCount(p);
        for (uint32_t it = GetBlockIdx(); it < items; it += GetBlockNum()) {
            Item x;
            if (!MakeItem(p_, it, x, offsetsGm_, countsGm_)) continue;
            for (uint32_t r0 = 0; r0 < x.rows; r0 += VEC_ROWS) Rows(x, r0, Min(VEC_ROWS, x.rows - r0));
        }
    }

private:
    // GM offset of row r of item x in a BSND tensor (token t0 + r / G, head h·G + r % G).
    __aicore__ inline int64_t RowOffset(const EkTensor& t, const Item& x, uint32_t r) const {
        return x.b * t.stride[0] + (x.t0 + r / p_.group) * t.stride[1] + (x.h * p_.group + r % p_.group) * t.stride[2];
    }

    // Virtual keys [v0, v0 + n) of item x (K or V) into UB rows, run by run; returns the tile.
    __aicore__ inline LocalTensor<float> Gather(TQue<TPosition::VECIN, 1>& que, const GlobalTensor<float>& src, const EkTensor& t,
                                                const Item& x, uint32_t v0, uint32_t n) {
        LocalTensor<float> tile = que.AllocTensor<float>();
        const uint32_t in_blocks = x.blocks * p_.block_size;
        for (uint32_t row = 0; row < n;) {
            const uint32_t v = v0 + row;
            // A run ends at the end of a block (block part) or of the list (own part).
            const uint32_t run = v < in_blocks ? Min(p_.block_size - v % p_.block_size, Min(in_blocks - v, n - row)) : n - row;
            const int64_t off = x.b * t.stride[0] + KeyPosition(x, v, p_.block_size, indicesGm_) * t.stride[1] + x.h * t.stride[2];
            DataCopyPad(tile[row * dp_], src[off], DataCopyExtParams(run, d_ * sizeof(float), (t.stride[1] - d_) * sizeof(float), 0, 0),
                        DataCopyPadExtParams<float>(true, 0, 0, 0.0f));
            row += run;
        }
        que.EnQue(tile);
        return que.DeQue<float>();
    }

    // Rows [r0, r0 + nr) of item x against its whole key list.
    __aicore__ inline void Rows(const Item& x, uint32_t r0, uint32_t nr) {
        LocalTensor<float> q = q_.Get<float>(), o = o_.Get<float>(), sc = scores_.Get<float>();
        const RowTileScratch scratch{tmp_.Get<float>(), part_.Get<float>(), red_.Get<float>(), work_.Get<float>()};
        for (uint32_t r = 0; r < nr; r++) {
            LocalTensor<float> t = rowIn_.AllocTensor<float>();
            DataCopyPad(t, qGm_[RowOffset(p_.q, x, r0 + r)], DataCopyExtParams(1, d_ * sizeof(float), 0, 0, 0),
                        DataCopyPadExtParams<float>(true, 0, 0, 0.0f));
            rowIn_.EnQue(t);
            t = rowIn_.DeQue<float>();
            Muls(q[r * dp_], t, scale_, (int32_t)dp_);
            VecBarrier();
            rowIn_.FreeTensor(t);
        }
        Duplicate(o, 0.0f, (int32_t)(nr * dp_));
        VecBarrier();
        float m[VEC_ROWS], l[VEC_ROWS];
        for (uint32_t r = 0; r < nr; r++) {
            m[r] = NegInf();
            l[r] = 0.0f;
        }
        // Keys any of these rows may see: the last row's prefix.
        const uint32_t keys = x.Visible(r0 + nr - 1, p_.group, p_.block_size);
        for (uint32_t v0 = 0; v0 < keys; v0 += VEC_KEYS) {
            const uint32_t n = Min(VEC_KEYS, keys - v0);
            LocalTensor<float> kt = Gather(kIn_, kGm_, p_.k, x, v0, n);
            LocalTensor<float> vt = Gather(vIn_, vGm_, p_.v, x, v0, n);
            for (uint32_t r = 0; r < nr; r++) {
                const uint32_t seen = x.Visible(r0 + r, p_.group, p_.block_size);
                const uint32_t vis = seen > v0 ? Min(n, seen - v0) : 0;
                if (vis == 0) continue;  // the row's state is unchanged
                RowTileStep(o[r * dp_], dp_, sc[r * VEC_KEYS], q[r * dp_], kt, vt, vis, d_, dp_, scratch, m[r], l[r]);
            }
            kIn_.FreeTensor(kt);
            vIn_.FreeTensor(vt);
        }
        for (uint32_t r = 0; r < nr; r++) {
            LocalTensor<float> t = rowOut_.AllocTensor<float>();
            Muls(t, o[r * dp_], 1.0f / l[r], (int32_t)dp_);
            VecBarrier();
            rowOut_.EnQue(t);
            t = rowOut_.DeQue<float>();
            DataCopyPad(outGm_[RowOffset(p_.out, x, r0 + r)], t, DataCopyExtParams(1, d_ * sizeof(float), 0, 0, 0));
            rowOut_.FreeTensor(t);
            if (p_.lse) {
                const uint32_t row = r0 + r, tok = x.t0 + row / p_.group, hq = x.h * p_.group + row % p_.group;
                LocalTensor<float> v = lseOut_.AllocTensor<float>();
                Duplicate(v, l[r], (int32_t)FLOATS_PER_BLOCK);
                VecBarrier();
                Ln(v, v, (int32_t)FLOATS_PER_BLOCK);
                VecBarrier();
                Adds(v, v, m[r], (int32_t)FLOATS_PER_BLOCK);
                VecBarrier();
                lseOut_.EnQue(v);
                v = lseOut_.DeQue<float>();
                const uint64_t at = ((uint64_t)x.b * p_.q.shape[2] + hq) * p_.q.shape[1] + tok;
                DataCopyPad(lseGm_[at], v, DataCopyExtParams(1, sizeof(float), 0, 0, 0));
                lseOut_.FreeTensor(v);
            }
        }
    }

    EkPrefillParams p_;
    uint32_t d_ = 0, dp_ = 0;
    float scale_ = 0;
    TPipe pipe_;
    TQue<TPosition::VECIN, 1> rowIn_, kIn_, vIn_;
    TQue<TPosition::VECOUT, 1> rowOut_, lseOut_;
    TBuf<TPosition::VECCALC> q_, o_, tmp_, scores_, part_, red_, work_;
    GlobalTensor<float> qGm_, kGm_, vGm_, outGm_, lseGm_;
    GlobalTensor<uint32_t> offsetsGm_, countsGm_, indicesGm_;
};

}  // namespace

extern "C" __global__ __aicore__ void ek_prefill_vec(GM_ADDR params) {
    PrefillF32 k;
    k.Run(ReadParams<EkPrefillParams>(params));
    DrainPipes();
}
